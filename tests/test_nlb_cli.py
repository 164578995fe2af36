"""lfads-fast nlb-eval and nlb-submission from the command line, on a small NLB tensor file."""
import json

import h5py
import numpy as np
import pytest

from lfads_fast import nlb
from lfads_fast.cli import main

# A tiny model trains for a few epochs: the commands are under test, not the fit.
TINY = ["--set", "model.ic_enc_dim=8", "--set", "model.ci_enc_dim=4", "--set", "model.con_dim=4",
        "--set", "model.co_dim=1", "--set", "model.ic_dim=4", "--set", "model.gen_dim=8",
        "--set", "model.fac_dim=4", "--set", "train.max_epochs=2"]


def _write_nlb(path, rng, n_train=16, n_eval=6, T=12, T_f=3, n_in=6, n_out=3, eval_targets=True):
    arrays = {}
    for prefix, B in (("train", n_train), ("eval", n_eval)):
        lat = np.sin(np.linspace(0, 3, T + T_f)[None, :, None] + rng.uniform(0, 6, (B, 1, 1)))
        rates = np.exp(-0.5 + lat * rng.normal(size=(1, 1, n_in + n_out)))
        spikes = rng.poisson(rates).astype(np.float32)
        arrays[f"{prefix}_spikes_heldin"] = spikes[:, :T, :n_in]
        if prefix == "train" or eval_targets:
            arrays[f"{prefix}_spikes_heldout"] = spikes[:, :T, n_in:]
            arrays[f"{prefix}_spikes_heldin_forward"] = spikes[:, T:, :n_in]
            arrays[f"{prefix}_spikes_heldout_forward"] = spikes[:, T:, n_in:]
            arrays[f"{prefix}_behavior"] = np.concatenate([lat[:, :T], -lat[:, :T]], 2).astype(
                np.float32) + 0.1 * rng.normal(size=(B, T, 2)).astype(np.float32)
            arrays[f"{prefix}_condition"] = np.arange(B) % 3
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v
    return arrays


def test_train_then_nlb_eval_and_submission(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "nlb.h5"
    arrays = _write_nlb(data, rng)
    out = tmp_path / "run"
    assert main(["--threads", "1", "train", str(data), "--out", str(out), "--quiet",
                 "--samples", "2"] + TINY) == 0
    assert main(["nlb-eval", str(out / "posterior.h5"), str(data), "--out", str(tmp_path / "ev"),
                 "--conditions", "condition", "--psth-sigma", "1"]) == 0
    printed = capsys.readouterr().out
    assert "co-bps" in printed and "vel R2" in printed and "psth R2" in printed
    result = json.loads((tmp_path / "ev" / "nlb_eval.json").read_text())
    for key in ("co_bps", "fp_bps", "vel_r2", "psth_r2"):
        assert result[key] is not None and np.isfinite(result[key])
    assert (tmp_path / "ev" / "velocity.png").stat().st_size > 1000
    assert (tmp_path / "ev" / "psth.png").stat().st_size > 1000
    # The JSON's co-bps is nlb.score's on the posterior's own valid rates.
    with h5py.File(out / "posterior.h5") as f:
        rates = f["valid_output_params"][()]
    s, _ = nlb.score(rates, nlb.read_nlb_tensors(data)["eval"])
    assert result["co_bps"] == pytest.approx(s.co_bps, abs=1e-9)

    sub = tmp_path / "sub.h5"
    assert main(["nlb-submission", str(out / "posterior.h5"), str(data), "--dataset",
                 "mc_maze_small", "--out", str(sub)]) == 0
    with h5py.File(sub) as f:
        g = f["mc_maze_small"]
        assert g["eval_rates_heldout"].shape == arrays["eval_spikes_heldout"].shape
        assert g["eval_rates_heldin_forward"].shape == arrays["eval_spikes_heldin_forward"].shape
        assert g["train_rates_heldin"].shape == arrays["train_spikes_heldin"].shape


def test_nlb_eval_kfold(tmp_path, capsys):
    rng = np.random.default_rng(1)
    data = tmp_path / "nlb.h5"
    _write_nlb(data, rng, n_train=15)
    assert main(["--threads", "1", "nlb-eval", "--kfold", "3", str(data), "--out",
                 str(tmp_path / "cv"), "--samples", "2", "--quiet", "--folds", "0,2"] + TINY) == 0
    summary = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 2]
    tested = sum((f["test_trials"] for f in summary["folds"]), [])
    assert len(tested) == len(set(tested)) == 10
    assert set(summary["mean"]) == {"lfads", "smoothing"}
    assert summary["folds"][0]["scores"]["lfads"]["epochs"] == 2
    assert (tmp_path / "cv" / "fold0" / "checkpoints" / "best.h5").exists()
    assert (tmp_path / "cv" / "velocity.png").exists()
    assert "smoothing: co-bps" in capsys.readouterr().out


def test_nlb_eval_bad_input(tmp_path, capsys):
    rng = np.random.default_rng(2)
    data = tmp_path / "nlb.h5"
    _write_nlb(data, rng)
    post = tmp_path / "post.h5"
    with h5py.File(post, "w") as f:
        f["train_output_params"] = np.ones((16, 15, 9), np.float32)
        f["valid_output_params"] = np.ones((6, 15, 8), np.float32)
    assert main(["nlb-eval", str(post), str(data)]) == 2
    assert "valid_output_params has shape (6, 15, 8)" in capsys.readouterr().err
    # Behaviour missing: the velocity decoder is skipped, and asking for PSTHs names the key.
    nobeh = tmp_path / "nobeh.h5"
    with h5py.File(data) as f, h5py.File(nobeh, "w") as g:
        for k in f:
            if "behavior" not in k and "condition" not in k:
                g[k] = f[k][()]
    with h5py.File(post, "a") as f:
        del f["valid_output_params"]
        f["valid_output_params"] = np.ones((6, 15, 9), np.float32)
    assert main(["nlb-eval", str(post), str(nobeh), "--conditions", "condition"]) == 2
    assert "train_condition" in capsys.readouterr().err
    assert main(["nlb-eval", str(post), str(nobeh)]) == 0
    assert "vel R2" not in capsys.readouterr().out
    assert main(["nlb-eval", str(post)]) == 2
    assert "POSTERIOR.h5 DATA.h5" in capsys.readouterr().err
    assert main(["nlb-submission", str(post), str(data), "--dataset", "maze", "--out",
                 str(tmp_path / "s.h5")]) == 2
    assert "dataset_name must be one of" in capsys.readouterr().err
