"""The lfads-fast command line, end to end on tiny data."""
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from lfads_fast import LFADSConfig, cli, data, posterior, refine, synth
from lfads_fast.train import TrainConfig, load_checkpoint, load_model

TINY = ["--set", "model.ic_enc_dim=8", "--set", "ic_dim=4", "--set", "gen_dim=12",
        "--set", "fac_dim=4", "--set", "co_dim=0", "--set", "ci_enc_dim=0",
        "--set", "con_dim=0", "--set", "train.batch_size=16", "--set", "max_epochs=2",
        "--set", "lr_init=1e-2"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    sd = synth.chaotic_rnn(n_conditions=10, trials_per_condition=4, train_per_condition=3,
                           n_bins=20, n_neurons=16)
    return str(synth.save_h5(sd, tmp_path_factory.mktemp("data") / "tiny.h5"))


def run(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_infer_resume(data_file, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(["train", data_file, "--out", str(out), "--samples", "2", "--quiet",
                             *TINY], capsys)
    assert code == 0, err
    assert "trained 2 epochs" in stdout
    for name in ("config.yaml", "log.csv", "posterior.h5", "checkpoints/best.h5",
                 "checkpoints/last.h5", "training_curves.png"):
        assert (out / name).is_file(), name
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["gen_dim"] == 12 and cfg["train"]["lr_init"] == 0.01
    post = data.read_posterior_h5(out / "posterior.h5")
    assert post["valid_output_params"].shape == (10, 20, 16)

    # A used directory needs --resume or --overwrite.
    code, _, err = run(["train", data_file, "--out", str(out), "--quiet", *TINY], capsys)
    assert code == 2 and "--resume" in err

    # --resume reads DIR/config.yaml; more epochs may be asked for.
    code, stdout, err = run(["train", data_file, "--out", str(out), "--resume", "--quiet",
                             "--samples", "0", "--set", "max_epochs=3"], capsys)
    assert code == 0, err
    assert "trained 3 epochs (1 now" in stdout
    assert load_checkpoint(out / "checkpoints" / "last.h5").epoch == 3

    target = tmp_path / "post.h5"
    code, stdout, err = run(["infer", str(out / "checkpoints" / "best.h5"), data_file, "--out",
                             str(target), "--samples", "3", "--splits", "valid"], capsys)
    assert code == 0, err
    post = data.read_posterior_h5(target)
    assert set(post) == {f"valid_{k}" for k in data.POSTERIOR_FIELDS} | {"valid_inds"}
    # Refined initial conditions: valid_ic_mean holds them, the encoder's std stays.
    refined = tmp_path / "refined.h5"
    code, stdout, err = run(["infer", str(out / "checkpoints" / "best.h5"), data_file, "--out",
                             str(refined), "--samples", "3", "--splits", "valid", "--refine-ic", "5",
                             "--refine-lr", "0.1"], capsys)
    assert code == 0, err
    assert "initial conditions refined by 5 steps" in stdout
    post_r = data.read_posterior_h5(refined)
    best = load_model(out / "checkpoints" / "best.h5")
    spikes = data.load_dataset(data_file).valid.encod_data
    expect = refine.refine_ic(best, spikes, steps=5, lr=0.1)["ic"]
    np.testing.assert_allclose(post_r["valid_ic_mean"], expect, rtol=1e-5, atol=1e-6)
    assert not np.allclose(post_r["valid_ic_mean"], post["valid_ic_mean"])
    np.testing.assert_allclose(post_r["valid_ic_std"], post["valid_ic_std"], rtol=1e-5)
    # An ensemble of two checkpoints: only the averaged rates are written.
    ens = tmp_path / "ens.h5"
    code, stdout, err = run(["infer", str(out / "checkpoints" / "best.h5"), data_file, "--out",
                             str(ens), "--samples", "3", "--splits", "valid", "--ensemble",
                             str(out / "checkpoints" / "last.h5")], capsys)
    assert code == 0, err
    assert "ensemble of 2 models" in stdout
    post_e = data.read_posterior_h5(ens)
    assert set(post_e) == {"valid_output_params", "valid_inds"}
    last = posterior.posterior_outputs(load_model(out / "checkpoints" / "last.h5"),
                                       data.load_dataset(data_file), n_samples=3,
                                       splits=("valid",))["valid"]["output_params"]
    np.testing.assert_allclose(post_e["valid_output_params"],
                               (post["valid_output_params"].astype(np.float64) + last) / 2, rtol=1e-5)
    code, _, err = run(["infer", str(out / "checkpoints" / "best.h5"), data_file, "--out", str(ens),
                        "--ensemble", str(tmp_path / "nope.h5")], capsys)
    assert code == 2 and "nope.h5 does not exist" in err
    with pytest.raises(SystemExit):
        run(["infer", str(out / "checkpoints" / "best.h5"), data_file, "--out", str(refined),
             "--refine-ic", "-1"], capsys)
    assert "argument --refine-ic: expected an integer >= 0" in capsys.readouterr().err
    code, _, err = run(["infer", str(out / "checkpoints" / "best.h5"), data_file, data_file,
                        "--out", str(target)], capsys)
    assert code == 2 and "has 1 session but 2 data files were given" in err
    other = synth.save_h5(synth.chaotic_rnn(n_conditions=4, trials_per_condition=2,
                                            train_per_condition=1, n_bins=20, n_neurons=12),
                          tmp_path / "other.h5")
    code, _, err = run(["infer", str(out / "checkpoints" / "best.h5"), str(other),
                        "--out", str(target)], capsys)
    assert code == 2 and "the checkpoint's model has encod_data_dim = 16 but the data" in err
    assert "other.h5) have 12" in err


@pytest.fixture(scope="module")
def session_files(tmp_path_factory):
    """Two session files (10 and 14 neurons, 24 / 8 trials of 15 bins) and a third session
    with 12 bins."""
    root = tmp_path_factory.mktemp("sessions")
    found = synth.chaotic_rnn_sessions(n_sessions=2, neurons_per_session=[10, 14], n_conditions=8,
                                       trials_per_condition=4, train_per_condition=3, n_units=30,
                                       n_bins=15)
    paths = synth.save_sessions_h5(found, root / "data")
    short = synth.chaotic_rnn_sessions(n_sessions=1, neurons_per_session=8, n_conditions=8,
                                       trials_per_condition=4, train_per_condition=3, n_units=30,
                                       n_bins=12)
    return paths, synth.save_h5(short[0], root / "short.h5")


def test_train_infer_resume_sessions(session_files, tmp_path, capsys):
    (a, b), _ = session_files
    out = tmp_path / "run"
    code, stdout, err = run(["train", a, b, "--out", str(out), "--samples", "2", "--quiet", *TINY],
                            capsys)
    assert code == 0, err
    assert "2 sessions, shared read-in dimension 4; read-ins from PCR on condition averages" in stdout
    for name in ("config.yaml", "log.csv", "session_factors.png", "checkpoints/best.h5",
                 "lfads_output_session_00.h5", "lfads_output_session_01.h5"):
        assert (out / name).is_file(), name
    assert not (out / "posterior.h5").exists()
    cfg = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert cfg["session_neurons"] == [10, 14] and cfg["encod_data_dim"] == 4
    post = data.read_posterior_h5(out / "lfads_output_session_01.h5")
    assert post["valid_output_params"].shape == (8, 15, 14)
    assert "valid_r2_s1" in (out / "log.csv").read_text().splitlines()[0].split(",")

    # A quoted glob pattern names the same sessions; --resume reads DIR/config.yaml.
    pattern = os.path.join(os.path.dirname(a), "session_*.h5")
    code, stdout, err = run(["train", pattern, "--out", str(out), "--resume", "--quiet",
                             "--samples", "0", "--set", "max_epochs=3"], capsys)
    assert code == 0, err
    assert "trained 3 epochs (1 now" in stdout

    target = tmp_path / "post"
    code, stdout, err = run(["infer", str(out / "checkpoints" / "best.h5"), a, b, "--out",
                             str(target), "--samples", "0", "--splits", "valid"], capsys)
    assert code == 0, err
    post = data.read_posterior_h5(target / "lfads_output_session_00.h5")
    assert set(post) == {f"valid_{k}" for k in data.POSTERIOR_FIELDS} | {"valid_inds"}
    assert post["valid_output_params"].shape == (8, 15, 10)

    best = str(out / "checkpoints" / "best.h5")
    other = tmp_path / "other"
    assert run(["train", a, b, "--out", str(other), "--samples", "0", "--quiet", *TINY,
                "--set", "seed=1"], capsys)[0] == 0
    last = str(other / "checkpoints" / "best.h5")
    # An ensemble of multi-session checkpoints: per session the rates averaged over the models.
    single = tmp_path / "single"
    code, _, err = run(["infer", last, a, b, "--out", str(single), "--samples", "2", "--splits",
                        "valid", "--refine-ic", "2"], capsys)
    assert code == 0, err
    ens = tmp_path / "ens"
    code, stdout, err = run(["infer", best, a, b, "--out", str(ens), "--samples", "2", "--splits",
                             "valid", "--refine-ic", "2", "--ensemble", last], capsys)
    assert code == 0, err
    assert "ensemble of 2 models, rates averaged (2 samples, initial conditions refined" in stdout
    alone = tmp_path / "alone"
    assert run(["infer", best, a, b, "--out", str(alone), "--samples", "2", "--splits", "valid",
                "--refine-ic", "2"], capsys)[0] == 0
    for s in ("00", "01"):
        got = data.read_posterior_h5(ens / f"lfads_output_session_{s}.h5")
        assert set(got) == {"valid_output_params", "valid_inds"}
        one = [data.read_posterior_h5(d / f"lfads_output_session_{s}.h5")["valid_output_params"]
               for d in (alone, single)]
        assert not np.allclose(one[0], one[1])  # the two models differ
        np.testing.assert_allclose(got["valid_output_params"], (one[0] + one[1]) / 2, rtol=1e-5)
    code, _, err = run(["infer", best, a, b, "--out", str(ens), "--ensemble",
                        str(tmp_path / "nope.h5")], capsys)
    assert code == 2 and "nope.h5" in err
    swapped = tmp_path / "swapped"
    assert run(["train", b, a, "--out", str(swapped), "--samples", "0", "--quiet", *TINY,
                "--set", "max_epochs=1"], capsys)[0] == 0
    code, _, err = run(["infer", best, a, b, "--out", str(ens), "--ensemble",
                        str(swapped / "checkpoints" / "best.h5")], capsys)
    assert code == 2 and ("has 2 sessions of [14, 10] neurons but the first checkpoint's model "
                          "2 sessions of [10, 14] neurons") in err
    # A single-session model beside multi-session ones, either way round.
    single_run = tmp_path / "single_run"
    assert run(["train", a, "--out", str(single_run), "--samples", "0", "--quiet", *TINY,
                "--set", "max_epochs=1"], capsys)[0] == 0
    single_best = str(single_run / "checkpoints" / "best.h5")
    code, _, err = run(["infer", best, a, b, "--out", str(ens), "--ensemble", single_best], capsys)
    assert code == 2 and "has one session but the first checkpoint's model 2 sessions" in err
    code, _, err = run(["infer", single_best, a, "--out", str(tmp_path / "x.h5"), "--ensemble",
                        best], capsys)
    assert code == 2 and "has 2 sessions of [10, 14] neurons but the first checkpoint's model one session" in err

    code, _, err = run(["infer", best, a, "--out", str(target)], capsys)
    assert code == 2 and "the checkpoint's model has 2 sessions but 1 data file was given" in err
    code, _, err = run(["infer", best, b, a, "--out", str(target)], capsys)
    assert code == 2 and "has encod_data_dim = 14 but the model expects 10" in err


def test_sessions_need_the_same_bins(session_files, tmp_path, capsys):
    (a, _), short = session_files
    code, _, err = run(["train", a, short, "--out", str(tmp_path / "run"), "--quiet", *TINY], capsys)
    assert code == 2 and "short.h5: encod_seq_len is 12 but" in err
    code, _, err = run(["train", a, str(tmp_path / "none_*.h5"), "--out", str(tmp_path / "run")],
                       capsys)
    assert code == 2 and "no data file matches" in err


def test_shared_dimension_from_the_config(session_files, tmp_path, capsys):
    (a, b), _ = session_files
    out = tmp_path / "run"
    code, stdout, err = run(["train", a, b, "--out", str(out), "--quiet", "--samples", "0", *TINY,
                             "--set", "encod_data_dim=3", "--set", "max_epochs=1"], capsys)
    assert code == 0, err
    assert "shared read-in dimension 3" in stdout
    assert load_checkpoint(out / "checkpoints" / "last.h5").model_config.encod_data_dim == 3
    code, _, err = run(["train", a, b, "--out", str(tmp_path / "other"), "--quiet", *TINY,
                        "--set", "encod_seq_len=20"], capsys)
    assert code == 2 and "encod_seq_len = 20 in the config, but the data files give 15" in err


def test_config_file_and_time_budget(data_file, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text("model:\n  gen_dim: 10\n  co_dim: 0\n  ci_enc_dim: 0\n  con_dim: 0\n"
                      "  ic_enc_dim: 8\n  ic_dim: 4\n  fac_dim: 4\n"
                      "train:\n  lr_init: 1e-2\n  max_epochs: 100000\n  batch_size: 16\n"
                      "  early_stopping: false\n")  # only the budget may stop it
    out = tmp_path / "run"
    code, stdout, err = run(["train", data_file, "--out", str(out), "--config", str(config),
                             "--time-budget", "1", "--samples", "0", "--quiet"], capsys)
    assert code == 0, err
    assert "stopped by time_budget" in stdout
    ckpt = load_checkpoint(out / "checkpoints" / "last.h5")
    assert ckpt.model_config.gen_dim == 10 and ckpt.train_config.lr_init == 0.01


@pytest.mark.parametrize("args, message", [
    (["train", "missing.h5", "--out", "x"], "missing.h5 does not exist"),
    (["train", "DATA", "--out", "x", "--set", "gen_dimm=3"], "did you mean gen_dim"),
    (["train", "DATA", "--out", "x", "--set", "model.lr_init=3"], "model has no field 'lr_init'"),
    (["train", "DATA", "--out", "x", "--set", "gen_dim=abc"], "model.gen_dim must be an int"),
    (["train", "DATA", "--out", "x", "--set", "gen_dim"], "key=value"),
    (["train", "DATA", "--out", "x", "--set", "lr_init=-1"], "lr_init must be > 0"),
    (["train", "DATA", "--out", "x", "--config", "nope.yaml"], "nope.yaml does not exist"),
    (["infer", "nope.h5", "DATA", "--out", "p.h5"], "checkpoint nope.h5 does not exist"),
])
def test_clear_errors(data_file, tmp_path, capsys, args, message):
    args = [data_file if a == "DATA" else a for a in args]
    args = [str(tmp_path / a) if a in ("x", "p.h5") else a for a in args]
    code, _, err = run(args, capsys)
    assert code == 2
    assert message in err


def test_bad_config_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modle:\n  gen_dim: 3\n")
    with pytest.raises(ValueError, match="unknown section 'modle'"):
        cli.load_config(path)


def test_load_config_converts_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dropout_rate: 0\n  gen_dim: 1.0e2\ntrain:\n  lr_init: 1e-3\n"
                    "  time_budget: null\n  lr_scheduler: false\n")
    model, train = cli.load_config(path, ["train.early_stopping_burn_in=none", "seed=3"])
    assert model == {"dropout_rate": 0.0, "gen_dim": 100}
    assert train == {"lr_init": 1e-3, "time_budget": None, "lr_scheduler": False,
                     "early_stopping_burn_in": None, "seed": 3}
    assert isinstance(model["dropout_rate"], float) and isinstance(model["gen_dim"], int)


def test_set_reaches_the_augmentation_options():
    model, train = cli.load_config(None, ["model.cd_pass_rate=0.25", "train.temporal_shift_std=2",
                                          "temporal_shift_max=4"])
    assert model == {"cd_pass_rate": 0.25}
    assert train == {"temporal_shift_std": 2.0, "temporal_shift_max": 4}
    assert isinstance(train["temporal_shift_std"], float)
    with pytest.raises(ValueError, match="train.temporal_shift_max must be an int"):
        cli.load_config(None, ["train.temporal_shift_max=1.5"])


def test_presets_come_first_and_the_file_and_set_win(tmp_path):
    from lfads_fast.presets import PRESETS

    for name, preset in PRESETS.items():  # every preset's fields exist and have valid values
        model, train = cli.load_config(None, [], name)
        assert model == preset.model and train == preset.train
        LFADSConfig(**model)
        TrainConfig(**train)
    model, train = cli.load_config(None, [], "lfads_torch_mc_maze_small")
    assert model["cd_rate"] == 0.3 and train["batch_size"] == 64
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  cd_rate: 0.1\ntrain:\n  batch_size: 32\n")
    model, train = cli.load_config(path, ["train.batch_size=8"], "lfads_torch_mc_maze_small")
    assert model["cd_rate"] == 0.1 and model["kl_ic_scale"] == 0.0
    assert train["batch_size"] == 8 and train["lr_scheduler"] is False
    with pytest.raises(ValueError, match="unknown preset 'nbl'; expected one of "):
        cli.load_config(None, [], "nbl")


def test_train_with_a_preset(data_file, tmp_path, capsys):
    out = tmp_path / "run"
    tiny = [a for pair in zip(TINY[::2], TINY[1::2]) if pair[1] != "train.batch_size=16" for a in pair]
    assert len(tiny) == len(TINY) - 2  # the preset's batch size is not overridden
    code, _, err = run(["train", data_file, "--out", str(out), "--preset", "nlb", "--samples", "0",
                        "--quiet", *tiny], capsys)
    assert code == 0, err
    batch = load_checkpoint(out / "checkpoints" / "last.h5").train_config.batch_size
    assert batch == cli.get_preset("nlb").train["batch_size"] != TrainConfig().batch_size
    with pytest.raises(SystemExit):
        cli.main(["train", data_file, "--out", str(tmp_path / "x"), "--preset", "nope"])
    assert "argument --preset: invalid choice: 'nope'" in capsys.readouterr().err


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run(["demo", "--quick", "--minutes", "0.02", "--samples", "2",
                             "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert "valid R^2: LFADS" in stdout
    report = (out / "report.md").read_text()
    assert "with refined initial conditions" in stdout
    for text in ("| LFADS (2 posterior samples averaged) |", "best Gaussian smoothing",
                 "+ PCA", "| total |", "| LFADS, initial conditions refined per trial (50 steps",
                 "| refinement of the initial conditions (50 steps x 24 valid trials) |",
                 "## Where the error sits", "| rates | bins 0-9 | bins 10-19 |",
                 "| LFADS, refined | ", "| smoothing + PCA | "):
        assert text in report
    for name in ("data.h5", "posterior.h5", "posterior_refined.h5", "example_trials.png",
                 "factor_trajectories.png", "train/checkpoints/best.h5"):
        assert (out / name).is_file(), name
    refined = data.read_posterior_h5(out / "posterior_refined.h5")
    assert refined["valid_output_params"].shape == (24, 100, 50)
    # The error table's LFADS row is that of the R^2 above (its tenths average to 1 - R^2).
    rows = {line.split(" | ")[0][2:]: line.strip(" |").split(" | ")[1:]
            for line in report.splitlines() if line.startswith("| ")}
    r2 = float(rows["LFADS (2 posterior samples averaged)"][0])
    # (Each entry is rounded to 0.0005, R^2 to 0.00005.)
    assert np.mean([float(e) for e in rows["LFADS"]]) == pytest.approx(1 - r2, abs=6e-4)


def test_demo_ensemble(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run(["demo", "--quick", "--minutes", "0.01", "--samples", "2", "--ensemble",
                             "2", "--refine-ic", "3", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert "ensemble of 2" in stdout
    report = (out / "report.md").read_text()
    for text in ("| ensemble of 2 LFADS models, rates averaged (`ensemble.h5`) |",
                 "| ensemble of 2, each with refined initial conditions", "## Ensemble",
                 "| 2 | 1 |", "| training (2 models; model 1: ",
                 "| valid posteriors of the ensemble's models 2-2, plain and refined |",
                 "| ensemble, refined | "):
        assert text in report, text
    for name in ("train/checkpoints/best.h5", "train_1/checkpoints/best.h5", "ensemble.h5",
                 "ensemble_refined.h5"):
        assert (out / name).is_file(), name
    ens = data.read_posterior_h5(out / "ensemble.h5")["valid_output_params"]
    first = data.read_posterior_h5(out / "posterior.h5")["valid_output_params"]
    second = posterior.sample_and_average(load_model(out / "train_1" / "checkpoints" / "best.h5"),
                                          data.load_dataset(out / "data.h5").valid.encod_data,
                                          n_samples=2, seed=0)["output_params"]
    np.testing.assert_allclose(ens, (first.astype(np.float64) + second) / 2, rtol=1e-5)
    assert not np.allclose(ens, first)


def test_train_nonfinite_stop_says_which_checkpoints_are_kept(data_file, tmp_path, capsys,
                                                              monkeypatch):
    from lfads_fast.model import LFADS
    original, calls = LFADS.loss_and_grads, {"n": 0}

    def nan_after_2(self, *args, **kwargs):  # two batches per epoch: epoch 0 trains
        terms, grad = original(self, *args, **kwargs)
        calls["n"] += 1
        return (dict(terms, kl_ic=float("nan")), grad) if calls["n"] > 2 else (terms, grad)

    monkeypatch.setattr(LFADS, "loss_and_grads", nan_after_2)
    out = tmp_path / "run"
    code, _, err = run(["train", data_file, "--out", str(out), "--quiet", *TINY, "--set",
                        "max_epochs=4", "--set", "max_nonfinite_steps=2"], capsys)
    assert code == 2
    assert "loss term 'kl_ic' = nan" in err
    assert "Epochs completed: 1. Checkpoints kept: best (epoch 0)" in err
    assert "--resume goes on from it" in err
    assert load_checkpoint(out / "checkpoints" / "last.h5").epoch == 1


def test_demo_goes_on_from_the_best_checkpoint_after_a_nonfinite_stop(tmp_path, capsys,
                                                                      monkeypatch):
    # Three batches per epoch; every step after the fourth is NaN, so the guard stops the run
    # in its second epoch. The demo reports on the first epoch's checkpoint and says why.
    from lfads_fast.model import LFADS
    original, calls = LFADS.loss_and_grads, {"n": 0}

    def nan_after_4(self, *args, **kwargs):
        terms, grad = original(self, *args, **kwargs)
        calls["n"] += 1
        return (dict(terms, recon=float("nan")), grad) if calls["n"] > 4 else (terms, grad)

    monkeypatch.setattr(LFADS, "loss_and_grads", nan_after_4)
    out = tmp_path / "demo"
    code, stdout, err = run(["demo", "--quick", "--minutes", "0.2", "--samples", "1",
                             "--refine-ic", "0", "--out", str(out), "--set", "train.batch_size=32",
                             "--set", "train.max_nonfinite_steps=2"], capsys)
    assert code == 0, err
    assert "goes on with the best checkpoint (epoch 0)" in stdout + err
    report = (out / "report.md").read_text()
    assert "stopped by nonfinite" in report
    assert "Training stopped early: LFADS training stopped: 2 consecutive steps" in report
    assert "loss term 'recon' = nan" in report
    assert np.isfinite(data.read_posterior_h5(out / "posterior.h5")["valid_output_params"]).all()


def test_demo_set_overrides_the_demo_configuration(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run(["demo", "--quick", "--minutes", "0.02", "--samples", "1",
                             "--out", str(out), "--quiet", "--set", "model.gen_dim=24",
                             "--set", "train.lr_patience=7", "--burn-in", "5", "--refine-ic", "0"],
                            capsys)
    assert code == 0, err
    assert "burn_in_bins=5" in (out / "report.md").read_text()
    assert "refined" not in (out / "report.md").read_text() and "refined" not in stdout
    assert not (out / "posterior_refined.h5").exists()
    saved = yaml.safe_load((out / "train" / "config.yaml").read_text())
    assert saved["model"]["gen_dim"] == 24 and saved["train"]["lr_patience"] == 7
    assert saved["model"]["ic_dim"] == 32  # the rest of the demo's configuration stays
    assert "gen_dim 24" in (out / "report.md").read_text()
    code, _, err = run(["demo", "--quick", "--out", str(out), "--set", "train.time_budget=5"],
                       capsys)
    assert code == 2 and "--minutes" in err
    code, _, err = run(["demo", "--quick", "--out", str(out), "--set", "model.gen_dimm=5"],
                       capsys)
    assert code == 2 and "gen_dimm" in err


def test_module_entry_point(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, "-m", "lfads_fast.cli", "train", "--help"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--resume" in done.stdout
    done = subprocess.run([sys.executable, "-m", "lfads_fast.cli", "infer", "a", "b", "--out",
                           str(tmp_path / "p.h5")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_a_missing_optional_part_is_one_line_and_other_import_errors_are_bugs(tmp_path, capsys, monkeypatch):
    """export, fit-decoder, serve, tune and import-lfads-torch need optional parts
    (safetensors, redis, the real-time library, Ray, torch): without one they print one line
    saying how to get it; any other ImportError, in those commands too, is a bug and keeps
    its traceback."""
    from lfads_fast import export
    from lfads_fast.errors import MissingOptionalPart

    def missing(*a, **k):
        raise MissingOptionalPart("exporting needs the safetensors package: pip install 'lfads_fast[realtime]'")

    monkeypatch.setattr(export, "export_checkpoint", missing)
    ckpt = tmp_path / "c.h5"
    ckpt.write_bytes(b"")
    assert cli.main(["export", str(ckpt), "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["lfads-fast export: error: exporting needs the safetensors "
                                        "package: pip install 'lfads_fast[realtime]'"]

    def broken(*a, **k):
        raise ImportError("cannot import name 'x'")

    monkeypatch.setattr(cli, "_demo", broken)
    assert cli.main(["demo"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "this is a bug" in err
    monkeypatch.setattr(export, "export_checkpoint", broken)
    assert cli.main(["export", str(ckpt), "--out", str(tmp_path / "m.safetensors")]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "this is a bug" in err
