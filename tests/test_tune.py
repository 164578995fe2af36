"""lfads-fast tune: AutoLFADS's explore step, the stopper, the settings' checks, and whole
population-based searches on Ray Tune (a local Ray, and a Ray cluster started by the test)."""
import csv
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lfads_fast import synth
from lfads_fast.cli import main
from lfads_fast.train import TrainConfig, config_for_data, load_checkpoint
from lfads_fast.tune import (DEFAULT_SPACE, METRIC, SETUP_FILE, HyperParam,
                             ImprovementRatioStopper, SearchSettings, explore,
                             load_search_settings, require_ray, run_search)
from lfads_fast import tune as tune_module

import lfads_fast

# Where the lfads_fast under test lives (the checkout, or site-packages in CI): the Ray
# cluster's workers and the driver process import it from there.
PACKAGE_PARENT = Path(lfads_fast.__file__).resolve().parent.parent
# The searches below: a population of 4, 3 generations of 2 epochs on tiny data (about a
# minute on 2 CPUs with Ray's start; timed in the notes, not asserted: a loaded machine is slower).
TINY = {"model": dict(ic_enc_dim=12, ic_dim=6, gen_dim=16, fac_dim=6, co_dim=0, ci_enc_dim=0,
                      con_dim=0),
        "train": dict(batch_size=32, kl_increase_epoch=1, l2_increase_epoch=1),
        "tune": dict(perturbation_interval=2, burn_in=0)}


# The test machine may be shared: Ray's memory monitor would kill members when other
# processes fill the memory, which says nothing about the search.
RAY_ENV = {"RAY_memory_monitor_refresh_ms": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _ray_or_skip():
    """Ray Tune is in the test extra; installed from PyPI here when missing, skipped only
    when that is impossible (no network), with the reason."""
    try:
        return require_ray()
    except ImportError:
        pass
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "ray[tune]>=2.60"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"Ray Tune is not installed and could not be installed: {proc.stderr[-300:]}")
    return require_ray()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    ds = synth.chaotic_rnn(n_conditions=16, trials_per_condition=5, train_per_condition=4,
                           n_bins=20, max_firing_rate=60.0, n_neurons=20)
    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    synth.save_h5(ds, path)
    return path


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


# ------------------------------------------------------------------ the explore step


def test_explore_is_autolfads_multiplicative_perturbation():
    rng = random.Random(0)
    values = {"lr_init": 1e-3, "dropout_rate": 0.3, "kl_ic_scale": 1e-4}
    space = {k: DEFAULT_SPACE[k] for k in values}
    factors = {k: [] for k in values}
    for _ in range(300):
        new = explore(values, space, rng)
        for k in values:
            factors[k].append(new[k] / values[k])
    for k, f in factors.items():
        w = space[k].explore_weight
        assert all(1 - w - 1e-12 <= x <= 1 + w + 1e-12 for x in f), k
        assert all(abs(x - 1) >= 0.002 * w - 1e-12 for x in f), k  # never a no-op
        assert sum(x > 1 for x in f) > 100 and sum(x < 1 for x in f) > 100, k  # both signs


def test_explore_keeps_bounds_and_hard_limits():
    rng = random.Random(1)
    space = {"lr_init": HyperParam(1e-4, 1e-3, explore_weight=0.5, enforce_bounds=True),
             "dropout_rate": HyperParam(0.1, 0.5, sample="uniform", explore_weight=0.9),
             "kl_ic_scale": HyperParam(1e-6, 1e-4, explore_weight=0.9)}
    for _ in range(200):
        new = explore({"lr_init": 1e-3, "dropout_rate": 0.95, "kl_ic_scale": 1.0}, space, rng)
        assert 1e-4 <= new["lr_init"] <= 1e-3
        assert 0 <= new["dropout_rate"] <= 0.99  # unenforced range, but a rate stays below 1
        assert new["kl_ic_scale"] > 0
    # Far outside enforced bounds no factor gets back in: the value is clipped to them.
    assert explore({"lr_init": 1.0}, {"lr_init": space["lr_init"]}, rng)["lr_init"] == 1e-3
    # Resampling draws from the range.
    new = explore({"kl_ic_scale": 1.0}, {"kl_ic_scale": space["kl_ic_scale"]}, rng,
                  resample_probability=1.0)
    assert 1e-6 <= new["kl_ic_scale"] <= 1e-4


# ------------------------------------------------------------------ the stopper


def results(stopper, generation_scores, first=2, interval=2):
    """Feeds one result per member at each generation's last epoch (and one in between)."""
    stops = []
    for g, scores in enumerate(generation_scores):
        epoch = first + g * interval
        for i, s in enumerate(scores):
            stopper(f"t{i}", {"epoch": epoch - 1, METRIC: s})
            stops.append(stopper(f"t{i}", {"epoch": epoch, METRIC: s}))
    return stops


def test_improvement_ratio_stopper_stops_on_a_plateau_only():
    improving = ImprovementRatioStopper(2, 2, 2, patience=3, min_improvement_ratio=1e-2)
    results(improving, [[1.0, 1.1], [0.9, 1.0], [0.8, 0.9], [0.7, 0.8]])
    assert improving.best_per_generation == [1.0, 0.9, 0.8, 0.7]
    assert not improving.stop_all() and improving.stopped_by == ""
    flat = ImprovementRatioStopper(2, 2, 2, patience=3, min_improvement_ratio=1e-2)
    results(flat, [[1.0, 1.1], [0.999, 1.0], [0.9985, 1.2]])
    assert flat.stop_all() and flat.stopped_by == "improvement_ratio"
    # Not before patience generations, whatever the values.
    early = ImprovementRatioStopper(2, 2, 2, patience=3, min_improvement_ratio=1e-2)
    results(early, [[1.0, 1.0], [1.0, 1.0]])
    assert not early.stop_all()


def test_stopper_ends_members_after_max_generations():
    s = ImprovementRatioStopper(2, 4, 2, max_generations=2)
    assert results(s, [[1.0, 1.1]], first=4) == [False, False]
    assert results(s, [[0.9, 1.0]], first=6) == [True, True]
    assert s.stopped_by == "max_generations" and not s.stop_all()


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("space, match", [
    ({"gen_dim": {"low": 16, "high": 64}}, "unknown hyperparameter 'gen_dim'"),
    ({"kl_ic_scael": {"low": 1e-6, "high": 1e-3}}, "unknown hyperparameter 'kl_ic_scael'"),
    ({"kl_ic_scale": {"low": 1e-3, "high": 1e-6}}, "bounds the wrong way round"),
    ({"kl_ic_scale": {"low": 0.0, "high": 1e-3}}, "loguniform range needs low > 0"),
    ({"dropout_rate": {"low": 0.0, "high": 0.5, "sample": "normal"}}, "sample must be one of"),
    ({"lr_init": {"low": 1e-5, "high": 1e-3, "init": 1e-2}}, "init"),
    ({"lr_init": {"low": 1e-5, "high": 1e-3, "explore_weight": 1.5}}, "explore_weight"),
    ({"lr_init": {"low": 1e-5, "high": 1e-3, "spread": 2}}, "spread"),
])
def test_search_space_errors(space, match):
    with pytest.raises(ValueError, match=match):
        SearchSettings(space=space)


@pytest.mark.parametrize("kw, match", [
    ({"population": 1}, "population must be >= 2"), ({"mode": "grid"}, "mode"),
    ({"quantile_fraction": 0.7}, "quantile_fraction"), ({"perturbation_interval": 0}, "interval"),
    ({"time_budget": 0.0}, "time_budget"), ({"gpus_per_trial": -1.0}, "gpus_per_trial"),
])
def test_settings_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SearchSettings(**kw)


def test_settings_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tune:\n  population: 8\n  space:\n    kl_ic_scale: {low: 1e-6, high: 1e-3, "
                    "explore_weight: 0.8}\n")
    s = load_search_settings(path, population=6, address=None)
    assert s.population == 6 and s.address is None
    assert s.space["kl_ic_scale"] == HyperParam(1e-6, 1e-3, explore_weight=0.8)
    path.write_text("tune:\n  populaton: 8\n")
    with pytest.raises(ValueError, match="unknown tune settings: populaton"):
        load_search_settings(path)


def test_controller_terms_need_a_controller(data_file, tmp_path):
    ds = synth.chaotic_rnn(n_conditions=4, trials_per_condition=5, train_per_condition=4,
                           n_bins=10, n_neurons=5).to_dataset()
    cfg = config_for_data(ds, co_dim=0, ci_enc_dim=0, con_dim=0)
    settings = SearchSettings(space={"kl_co_scale": {"low": 1e-6, "high": 1e-4}})
    _ray_or_skip()
    with pytest.raises(ValueError, match="kl_co_scale act on the controller"):
        run_search(ds, cfg, TrainConfig(), tmp_path, settings)
    # The default space leaves them out for such a model.
    assert "kl_co_scale" not in tune_module._check_space(SearchSettings().space, cfg)


class FakeRay:
    def __init__(self, cpus, memory):
        self.resources = {"CPU": cpus, "memory": memory}

    def cluster_resources(self):
        return self.resources


def test_population_larger_than_the_memory_for_the_data(data_file):
    from lfads_fast import data

    ds = data.load_dataset(data_file)
    cfg = config_for_data(ds, **TINY["model"])
    train = TrainConfig(**TINY["train"])
    need = tune_module.member_bytes(cfg, train, [ds])
    assert need > ds.train.encod_data.nbytes
    ok = SearchSettings(population=8)
    tune_module._check_population(FakeRay(8, 8 * need + 1), ok, cfg, train, [ds])
    with pytest.raises(ValueError, match="population 8: 8 members run at once"):
        tune_module._check_population(FakeRay(8, 4 * need), ok, cfg, train, [ds])
    # Fewer members at once (more CPUs each) fit.
    tune_module._check_population(FakeRay(8, 4 * need), SearchSettings(population=8, cpus_per_trial=2),
                                  cfg, train, [ds])
    with pytest.raises(ValueError, match="cpus_per_trial = 4 but the Ray cluster has 2"):
        tune_module._check_population(FakeRay(2, 1e12), SearchSettings(cpus_per_trial=4), cfg,
                                      train, [ds])


def test_gpus_per_trial_needs_gpus_in_the_cluster_and_puts_members_on_them(data_file):
    from lfads_fast import data

    ds = data.load_dataset(data_file)
    cfg = config_for_data(ds, **TINY["model"])
    train = TrainConfig(**TINY["train"])
    with pytest.raises(ValueError, match="gpus_per_trial = 0.5 but the Ray cluster has 0 GPUs"):
        tune_module._check_population(FakeRay(8, 1e12), SearchSettings(gpus_per_trial=0.5), cfg,
                                      train, [ds])
    plan = SimpleNamespace(gpus=0.5)
    assert tune_module._device(plan) == {"device": "cuda"}
    assert tune_module._device(SimpleNamespace(gpus=0.0)) == {}


def test_missing_ray_is_a_clear_error(monkeypatch, data_file, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.tune", None)
    with pytest.raises(ImportError, match=r"pip install 'lfads_fast\[tune\]'"):
        require_ray()
    assert main(["tune", str(data_file), "--out", str(tmp_path / "o")]) == 2
    assert "lfads_fast[tune]" in capsys.readouterr().err


def test_cli_rejects_a_bad_space_before_starting_ray(data_file, tmp_path, capsys):
    _ray_or_skip()
    bad = dict(TINY, tune={"space": {"lr_init": {"low": 1e-2, "high": 1e-4}}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["tune", str(data_file), "--out", str(tmp_path / "o"), "--config", str(path)]) == 2
    assert "wrong way round" in capsys.readouterr().err
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), "Ray was started before the space was checked"


# ------------------------------------------------------------------ whole searches


def check_search(out: Path, population: int) -> dict:
    """The acceptance checks: outputs present, an exploit with perturbed values, and the best
    metric improved over the generations."""
    summary = json.loads((out / "search.json").read_text())
    assert len(summary["trials"]) == population
    assert all(t["status"] == "done" for t in summary["trials"])
    assert [g["generation"] for g in summary["generations"]] == [1, 2, 3]
    assert summary["stop_reason"] == "max_generations"
    # An exploit: a member went on from another member's checkpoint with perturbed values.
    assert summary["exploits"], "no exploit happened"
    space = summary["settings"]["space"]
    perturbed = [e for e in summary["exploits"] if e["changes"]]
    assert perturbed
    for e in perturbed:
        assert e["source"] != e["trial"]
        for name, (old, new) in e["changes"].items():
            w = space[name]["explore_weight"]
            assert 1 - w - 1e-9 <= new / old <= 1 + w + 1e-9 and new != old
    lineages = [seg for t in summary["trials"] for seg in t["lineage"] if seg["source"]]
    assert lineages and all(seg["source"] != seg["trial"] for seg in lineages)
    # The population's best smoothed validation reconstruction improved.
    bests = [g["best"] for g in summary["generations"]]
    assert bests[-1] < bests[0]
    # Outputs as lfads-fast train writes them, for the best member.
    for name in ("config.yaml", "checkpoints/best.h5", "checkpoints/last.h5", "log.csv",
                 "posterior.h5", "search_trials.csv", "search_trials.md", "search.png"):
        assert (out / name).is_file(), name
    best = load_checkpoint(out / "checkpoints" / "best.h5")
    assert best.model_config.kl_ic_scale == pytest.approx(summary["best_values"]["kl_ic_scale"])
    assert best.train_config.lr_scheduler is False  # the plateau schedule is off in PBT
    assert summary["best_metric"] == pytest.approx(min(t["best_metric"] for t in summary["trials"]))
    rows = (out / "search_trials.csv").read_text().splitlines()
    assert len(rows) == population + 1 and "kl_ic_scale" in rows[0]
    check_no_member_runs_left(out, summary)
    return summary


def check_no_member_runs_left(out: Path, summary: dict) -> None:
    """Members train in a scratch directory outside Ray's trial directories (which Ray uploads
    while they train) and remove it when they stop; Ray keeps only the tune.Checkpoints."""
    experiment = json.loads((out / SETUP_FILE).read_text())["experiment"]
    trial_dirs = [d for d in Path(experiment).iterdir() if d.is_dir()]
    assert trial_dirs and not any((d / "lfads").exists() for d in trial_dirs)
    scratch = tune_module._scratch_root(experiment[: -len("/search")])
    assert scratch.parent.parent == Path(tempfile.gettempdir())
    assert not scratch.exists(), sorted(scratch.rglob("*"))[:5]
    assert len(summary["trials"]) >= 1


def test_pbt_search_on_local_ray(data_file, config_file, tmp_path, monkeypatch):
    ray, _ = _ray_or_skip()
    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "search"
    try:
        code = main(["tune", str(data_file), "--out", str(out), "--config", str(config_file),
                     "--population", "4", "--generations", "3", "--cpus-per-trial", "1",
                     "--samples", "2", "--quiet"])
    finally:
        ray.shutdown()
    assert code == 0
    check_search(out, 4)
    # A used directory is kept unless asked.
    assert main(["tune", str(data_file), "--out", str(out), "--config", str(config_file)]) == 2


def test_random_search(data_file, config_file, tmp_path, monkeypatch):
    ray, _ = _ray_or_skip()
    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "random"
    try:
        code = main(["tune", str(data_file), "--out", str(out), "--config", str(config_file),
                     "--mode", "random", "--population", "3", "--set", "train.max_epochs=3",
                     "--samples", "0", "--quiet"])
    finally:
        ray.shutdown()
    assert code == 0
    summary = json.loads((out / "search.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 3 and all(t["status"] == "done" and t["epochs"] == 3 for t in trials)
    assert summary["exploits"] == [] and summary["generations"] == []
    space = summary["settings"]["space"]
    drawn = {t["values"]["kl_ic_scale"] for t in trials}
    assert len(drawn) == 3
    assert all(space["kl_ic_scale"]["low"] <= v <= space["kl_ic_scale"]["high"] for v in drawn)
    best = load_checkpoint(out / "checkpoints" / "best.h5")
    assert best.train_config.lr_scheduler is True  # random search keeps the trainer's schedules
    assert not (out / "posterior.h5").exists()  # --samples 0


def test_search_per_fold_of_a_cross_validation(tmp_path, monkeypatch):
    """nlb.cross_validate with tune.cv_fit: each fold's model is the best member of a search
    on that fold's training and validation trials, scored on its test trials."""
    from lfads_fast import nlb
    from test_nlb_cli import _write_nlb

    ray, _ = _ray_or_skip()
    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)
    import numpy as np

    path = tmp_path / "nlb.h5"
    _write_nlb(path, np.random.default_rng(0), n_train=15)
    tensors = nlb.read_nlb_tensors(path)["train"]
    model = dict(ic_enc_dim=8, ci_enc_dim=4, con_dim=4, co_dim=1, ic_dim=4, gen_dim=8,
                 fac_dim=4)
    settings = SearchSettings(mode="random", population=2, seed=3)
    try:
        summary = nlb.cross_validate(tensors, 3, tmp_path / "cv", model_fields=model,
                                     train_fields={"max_epochs": 2}, n_samples=2, folds=[1],
                                     fit_fold=tune_module.cv_fit(settings), log=lambda *a: None)
    finally:
        ray.shutdown()
    fold = summary["folds"][0]
    lfads = fold["scores"]["lfads"]
    assert lfads["search_members"] == 2 and lfads["epochs"] == 2 and lfads["best_epoch"] <= 1
    assert math.isfinite(lfads["co_bps"]) and lfads["search_exploits"] == 0
    run = tmp_path / "cv" / "fold1"
    searched = json.loads((run / "search.json").read_text())
    assert lfads["best_kl_ic_scale"] == pytest.approx(searched["best_values"]["kl_ic_scale"])
    # The search saw the fold's training and validation trials only (10 of 15).
    setup = json.loads((run / SETUP_FILE).read_text())
    shapes = setup["data"][0]["shapes"]
    assert shapes["train.encod_data"][0] + shapes["valid.encod_data"][0] == 10, shapes
    assert len(fold["test_trials"]) == 5
    check_no_member_runs_left(run, searched)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path):
    """A Ray head node on loopback with 2 CPUs, started with `ray start` (its workers import
    the lfads_fast under test), stopped with `ray stop` afterwards."""
    _ray_or_skip()
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_bin is None:
        pytest.skip("the ray command is not on PATH next to this Python")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_PARENT), OMP_NUM_THREADS="1", **RAY_ENV)
    start = subprocess.run([ray_bin, "start", "--head", "--num-cpus", "2", "--port", str(port),
                            "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
                            "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([ray_bin, "stop"], env=env, capture_output=True, timeout=120)


def test_pbt_search_on_a_ray_cluster(data_file, config_file, tmp_path, ray_cluster):
    address, env = ray_cluster
    out = tmp_path / "search"
    proc = subprocess.run([sys.executable, "-m", "lfads_fast.cli", "tune", str(data_file),
                           "--out", str(out), "--config", str(config_file), "--address", address,
                           "--population", "4", "--generations", "3", "--samples", "2",
                           "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = check_search(out, 4)
    assert "exploits" in proc.stdout and math.isfinite(summary["best_metric"])


# ------------------------------------------------------------------ resuming


def _checkpoint_epochs(experiment: Path) -> dict:
    """Per member (Ray's trial directory) the epoch of its newest checkpoint so far."""
    epochs = {}
    for meta in experiment.glob("*/checkpoint_*/member.json"):
        try:
            epoch = json.loads(meta.read_text())["epoch"]
        except (OSError, ValueError):  # being written
            continue
        trial = meta.parent.parent.name
        epochs[trial] = max(epochs.get(trial, 0), epoch)
    return epochs


def _reported_epochs(experiment: Path) -> dict:
    """Per member every epoch it reported to Ray Tune, in order (its progress.csv)."""
    out = {}
    for path in experiment.glob("*/progress.csv"):
        with open(path) as f:
            out[path.parent.name] = [int(row["epoch"]) for row in csv.DictReader(f)]
    return out


def _search_in_its_second_generation(data_file, config_file, out: Path, generations: int,
                                     samples: int):
    """Starts `lfads-fast tune` (population 2) in a session of its own (the driver and the Ray
    processes it starts get a signal together) and returns (cmd, env, proc) once a member has
    checkpointed its second generation; the process is killed if that does not happen."""
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_PARENT), OMP_NUM_THREADS="1", **RAY_ENV)
    cmd = [sys.executable, "-m", "lfads_fast.cli", "tune", str(data_file), "--out", str(out),
           "--config", str(config_file), "--population", "2", "--generations",
           str(generations), "--samples", str(samples), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while max(_checkpoint_epochs(out / "ray" / "search").values(), default=0) < 4:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no member reached its second generation"
            time.sleep(0.2)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return cmd, env, proc


def test_resume_a_search_whose_driver_was_killed(data_file, config_file, tmp_path, capsys):
    """A search whose driver is killed (SIGKILL, no chance to save anything) in its second
    generation goes on with --resume from the members' checkpoints to the end."""
    _ray_or_skip()
    out = tmp_path / "search"
    cmd, env, proc = _search_in_its_second_generation(data_file, config_file, out, 4, 2)
    experiment = out / "ray" / "search"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    before = _checkpoint_epochs(experiment)
    assert len(before) == 2 and min(before.values()) >= 2, before
    assert not (out / "search.json").exists()

    # Not resumed by accident, and not with other settings or data.
    base = cmd[3:-1]
    assert main(base) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(base + ["--resume", "--population", "3"]) == 2
    assert "settings.population: 2 then, 3 now" in capsys.readouterr().err
    assert main(base + ["--resume", "--generations", "5", "--set", "train.lr_init=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "settings.max_generations: 4 then, 5 now" in err and "train.lr_init" in err
    other = tmp_path / "other.h5"
    synth.save_h5(synth.chaotic_rnn(n_conditions=16, trials_per_condition=5,
                                    train_per_condition=4, n_bins=20, max_firing_rate=60.0,
                                    n_neurons=20, seed=7), other)
    assert main([base[0], str(other)] + base[2:] + ["--resume"]) == 2
    assert "data.0.sha256" in capsys.readouterr().err

    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "search.json").read_text())
    assert summary["stop_reason"] == "max_generations"
    assert [g["generation"] for g in summary["generations"]] == [1, 2, 3, 4]
    assert [t["epochs"] for t in summary["trials"]] == [8, 8]
    # The members went on from their checkpoints: none started again from its first epoch,
    # and each reported every epoch up to the last.
    reported = _reported_epochs(experiment)
    assert set(reported) == set(before)
    for trial, epochs in reported.items():
        assert epochs.count(1) == 1 and set(epochs) == set(range(1, 9)), (trial, epochs)
    assert json.loads((out / SETUP_FILE).read_text())["resumes"] == 1
    for name in ("config.yaml", "checkpoints/best.h5", "checkpoints/last.h5", "log.csv",
                 "posterior.h5", "search_trials.csv", "search.png"):
        assert (out / name).is_file(), name
    assert load_checkpoint(out / "checkpoints" / "last.h5").epoch == 8
    assert main(base + ["--resume"]) == 2
    assert "has finished" in capsys.readouterr().err


def test_ctrl_c_stops_with_a_resume_hint_and_resume_finishes(data_file, config_file, tmp_path):
    """Ctrl-C (SIGINT to the command's process group, as a terminal sends it) in the second
    generation: exit status 130, a hint to resume, no outputs of a finished search; --resume
    then finishes it."""
    _ray_or_skip()
    out = tmp_path / "search"
    cmd, env, proc = _search_in_its_second_generation(data_file, config_file, out, 3, 0)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        text = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, text[-3000:]
    assert "--resume" in text and "interrupted" in text, text[-3000:]
    assert not (out / "search.json").exists() and not (out / "checkpoints").exists()
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "search.json").read_text())
    assert summary["stop_reason"] == "max_generations"
    assert [t["epochs"] for t in summary["trials"]] == [6, 6]


class _FakeTuner:
    """Does to the SIGINT handler what Ray Tune's run does: installs its own for the run and,
    when it catches the signal, puts the replaced one back and ends the run normally."""

    def __init__(self, interrupt: bool):
        self.interrupt = interrupt

    def fit(self):
        replaced = signal.getsignal(signal.SIGINT)

        def catch(sig, frame):
            signal.signal(signal.SIGINT, replaced)

        signal.signal(signal.SIGINT, catch)
        if self.interrupt:
            signal.raise_signal(signal.SIGINT)
        return "grid"


@pytest.mark.parametrize("interrupt", [False, True])
def test_a_ctrl_c_during_the_run_is_noted_and_the_handler_put_back(interrupt):
    """A Ctrl-C that Ray Tune caught counts as an interruption even when every member ended
    cleanly; either way the caller's SIGINT handler is in place afterwards."""
    from lfads_fast.tune import _fit_noting_interrupt

    def mine(sig, frame):
        raise AssertionError("not called")

    old = signal.signal(signal.SIGINT, mine)
    try:
        assert _fit_noting_interrupt(_FakeTuner(interrupt)) == ("grid", interrupt)
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, old)


def test_resume_needs_a_search(data_file, config_file, tmp_path, capsys):
    _ray_or_skip()
    out = tmp_path / "empty"
    assert main(["tune", str(data_file), "--out", str(out), "--config", str(config_file),
                 "--resume"]) == 2
    assert f"{out} holds no search to resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", str(data_file), "--out", str(out), "--resume", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_resume_boundary_counts_only_members_that_train_again(tmp_path):
    ray_tune = pytest.importorskip("ray.tune")

    def member(name, epoch, stop_reason):
        d = tmp_path / name
        d.mkdir()
        (d / "member.json").write_text(json.dumps({"epoch": epoch, "stop_reason": stop_reason}))
        return SimpleNamespace(checkpoint=ray_tune.Checkpoint.from_directory(str(d)))

    plan = SimpleNamespace(max_epochs=12)
    grid = [member("a", 6, "max_epochs"), member("b", 8, "max_epochs"),
            member("c", 2, "diverged"),      # stopped for good: would pull the boundary to 2
            member("d", 12, "max_epochs"),   # done
            SimpleNamespace(checkpoint=None)]  # no checkpoint yet: starts from epoch 0
    assert sorted(tune_module._resuming_epochs(grid, plan)) == [0, 6, 8]
    assert tune_module._resuming_epochs(grid[:4], plan) == [6, 8]


def test_random_search_stop_reason_counts_the_members_budgets():
    """A random search under a time budget ended by it when a member's trainer stopped at its
    share, even where the search's own seconds (since its last start, after a resume) are
    fewer than the budget."""
    settings = SearchSettings(mode="random", population=2, time_budget=100.0)
    plan = tune_module._Plan.of(settings, TrainConfig(max_epochs=50))
    members = [{"trial": "a", "epochs": 50, "stop_reason": "max_epochs", "rows": []},
               {"trial": "b", "epochs": 20, "stop_reason": "time_budget", "rows": []}]
    assert tune_module._stop_reason(members, settings, plan, seconds=30.0) == "time_budget"
    members[1]["stop_reason"] = "early_stopping"
    assert tune_module._stop_reason(members, settings, plan, seconds=30.0) == "finished"
    assert tune_module._stop_reason(members, settings, plan, seconds=100.0) == "time_budget"
    no_budget = SearchSettings(mode="random", population=2)
    assert tune_module._stop_reason(members, no_budget, plan, seconds=1e6) == "finished"
