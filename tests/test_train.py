"""The trainer: learning, schedules, checkpoints and exact resume, the non-finite guard; and
the sample-validation weights that make_batch adds to the reconstruction loss."""
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from lfads_fast import LFADS, LFADSConfig, ops, synth
from lfads_fast import train as train_module
from lfads_fast.train import (NonFiniteLossError, Trainer, TrainConfig, config_for_data,
                              draw_temporal_shifts, load_checkpoint, load_model, ramp,
                              temporal_shift)

# float64 central differences of the whole loss (~10): truncation ~ step^2, rounding
# ~ 1e-16 * 10 / step ~ 1e-9 absolute, which dominates for the smallest gradients.
FD_STEP = 1e-6
FD_RTOL = 1e-6
FD_ATOL = 1e-8
TINY_MODEL = dict(ic_enc_dim=16, ic_dim=8, gen_dim=24, fac_dim=8, co_dim=0, ci_enc_dim=0,
                  con_dim=0, dropout_rate=0.0)
TINY_TRAIN = dict(batch_size=32, max_epochs=4, lr_init=1e-2, kl_increase_epoch=2,
                  l2_increase_epoch=2)


@pytest.fixture(scope="module")
def tiny():
    """A small chaotic-RNN dataset (128 train, 32 valid trials of 30 bins, 50 neurons)."""
    return synth.chaotic_rnn(n_conditions=32, trials_per_condition=5, train_per_condition=4,
                             n_bins=30, max_firing_rate=60.0).to_dataset()


def make_trainer(ds, out, model_kw=None, **train_kw):
    cfg = config_for_data(ds, **dict(TINY_MODEL, **(model_kw or {})))
    model = LFADS(cfg, seed=3)
    return Trainer(model, ds, TrainConfig(**dict(TINY_TRAIN, **train_kw)), out, progress=False)


def timeless(history):
    return [{k: v for k, v in row.items() if k not in ("train_s", "epoch_s", "time_s")}
            for row in history]


# ------------------------------------------------------------------ schedules and config


def test_ramp_follows_lfads_torch():
    assert [ramp(e, 0, 3) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [ramp(e, 2, 1) for e in range(5)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert ramp(0, 0, 0) == 1.0


@pytest.mark.parametrize("field, value, match", [
    ("batch_size", 0, "batch_size"), ("lr_init", -1.0, "lr_init"), ("lr_decay", 1.0, "lr_decay"),
    ("lr_stop", 1.0, "lr_stop"), ("sv_rate", 1.0, "sv_rate"), ("lr_scheduler", 1, "lr_scheduler"),
    ("time_budget", 0.0, "time_budget"), ("max_epochs", 2.5, "max_epochs"),
    ("divergence_factor", 1.0, "divergence_factor"),
    ("divergence_lr_factor", 0.0, "divergence_lr_factor"), ("max_divergences", -1, "max_div"),
    ("temporal_shift_std", -1.0, "temporal_shift_std must be >= 0.0"),
    ("temporal_shift_std", float("inf"), "temporal_shift_std must be a finite number"),
    ("temporal_shift_max", -1, "temporal_shift_max must be an integer >= 0"),
    ("temporal_shift_max", 2.5, "temporal_shift_max must be an integer >= 0"),
])
def test_train_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_config_for_data_checks_sizes(tiny):
    cfg = config_for_data(tiny, gen_dim=12)
    assert (cfg.encod_data_dim, cfg.encod_seq_len, cfg.gen_dim) == (50, 30, 12)
    with pytest.raises(ValueError, match="encod_data_dim = 7"):
        config_for_data(tiny, encod_data_dim=7)
    with pytest.raises(ValueError, match="encod_seq_len"):
        Trainer(LFADS(LFADSConfig(encod_data_dim=50, encod_seq_len=10)), tiny, out_dir="unused")


# ------------------------------------------------------------------ learning


def test_trainer_learns(tiny, tmp_path):
    result = make_trainer(tiny, tmp_path, max_epochs=25, lr_init=2e-2).fit()
    h = result.history
    assert result.stop_reason == "max_epochs" and result.epochs == 25
    assert h[-1]["train_recon"] < 0.8 * h[0]["train_recon"]
    assert h[-1]["valid_recon"] < h[0]["valid_recon"]
    assert h[-1]["valid_r2"] > h[0]["valid_r2"] + 0.3
    assert h[-1]["valid_r2"] > 0.3
    for name in ("config.yaml", "log.csv", "log.json", "training_curves.png",
                 "checkpoints/best.h5", "checkpoints/last.h5"):
        assert (tmp_path / name).is_file(), name
    assert not [p for p in tmp_path.rglob(".tmp*")], "temporary files left behind"
    rows = json.loads((tmp_path / "log.json").read_text())
    assert len(rows) == 25 and rows[-1]["epoch"] == 24
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    for col in ("epoch", "lr", "train_loss", "train_recon", "valid_recon", "valid_recon_smth",
                "valid_r2", "valid_bps", "kl_ramp", "epoch_s"):
        assert col in header


def test_same_seed_same_run(tiny, tmp_path):
    a = make_trainer(tiny, tmp_path / "a", seed=5)
    b = make_trainer(tiny, tmp_path / "b", seed=5)
    c = make_trainer(tiny, tmp_path / "c", seed=6)
    for t in (a, b, c):
        t.fit()
    assert np.array_equal(a.model.flat, b.model.flat)
    assert timeless(a.history) == timeless(b.history)
    assert not np.array_equal(a.model.flat, c.model.flat)


def test_smoothed_validation_recon(tiny, tmp_path):
    t = make_trainer(tiny, tmp_path, recon_smth_coef=0.3)
    t.fit()
    h = t.history
    assert h[0]["valid_recon_smth"] == h[0]["valid_recon"]
    for prev, row in zip(h, h[1:]):
        expected = 0.3 * prev["valid_recon_smth"] + 0.7 * row["valid_recon"]
        assert row["valid_recon_smth"] == pytest.approx(expected, rel=1e-12)


def scripted_validation(trainer, values):
    """Replaces the validation pass by a fixed sequence of reconstruction values."""
    it = iter(values)

    def fake(epoch, kl_ramp, l2_ramp):
        v = next(it)
        return {"valid_loss": v, "valid_recon": v, "valid_kl_ic": 0.0, "valid_kl_co": 0.0,
                "valid_l2": 0.0, "valid_recon_smth": v}

    trainer._validate = fake


def test_lr_decays_on_plateau_and_early_stopping_triggers(tiny, tmp_path):
    t = make_trainer(tiny, tmp_path, max_epochs=50, lr_patience=1, lr_decay=0.5,
                     early_stopping_patience=3, early_stopping_burn_in=0)
    scripted_validation(t, [1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95])
    result = t.fit()
    lrs = [row["lr"] for row in result.history]
    # ReduceLROnPlateau: decay once more than lr_patience epochs failed to improve (after
    # epoch 3); the log shows the rate each epoch trained with.
    assert lrs == [1e-2, 1e-2, 1e-2, 1e-2, 5e-3]
    # EarlyStopping: 3 epochs without improvement after the best (epoch 1).
    assert result.stop_reason == "early_stopping" and result.epochs == 5
    assert result.best_epoch == 1 and result.best_valid_recon_smth == 0.9
    assert load_checkpoint(result.best_checkpoint).epoch == 2
    assert load_checkpoint(result.last_checkpoint).epoch == 5


def test_burn_in_defers_early_stopping_and_best(tiny, tmp_path):
    t = make_trainer(tiny, tmp_path, max_epochs=50, early_stopping_patience=2,
                     early_stopping_burn_in=3)
    scripted_validation(t, [0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    result = t.fit()
    # Epochs 0-2 are burn-in (the best is the latest); epoch 3 starts the tracking.
    assert result.best_epoch == 3 and result.epochs == 6
    assert result.stop_reason == "early_stopping"


def test_lr_floor_and_no_scheduler(tiny, tmp_path):
    t = make_trainer(tiny, tmp_path / "a", max_epochs=6, lr_patience=0, lr_decay=0.1,
                     lr_stop=5e-4, early_stopping=False)
    scripted_validation(t, [1.0] * 6)
    assert [row["lr"] for row in t.fit().history][-1] == 5e-4
    t = make_trainer(tiny, tmp_path / "b", max_epochs=4, lr_patience=0, lr_scheduler=False)
    scripted_validation(t, [1.0] * 4)
    assert {row["lr"] for row in t.fit().history} == {1e-2}


def test_time_budget_stops_between_epochs(tiny, tmp_path):
    result = make_trainer(tiny, tmp_path, max_epochs=10_000, time_budget=1.5,
                          early_stopping=False).fit()  # only the budget may stop it
    assert result.stop_reason == "time_budget"
    assert 1 <= result.epochs < 10_000
    assert load_checkpoint(result.last_checkpoint).epoch == result.epochs


def test_time_budget_final_phase_lowers_lr(tiny, tmp_path, monkeypatch):
    # A simulated clock, every reading 13 ms after the one before: each pass of the loop
    # (epoch, checkpoint, logs) lasts the same, whatever else the machine does.
    ticks = itertools.count()
    monkeypatch.setattr(train_module, "_now", lambda: 0.013 * next(ticks))
    t = make_trainer(tiny, tmp_path, max_epochs=10_000, time_budget=2.0, lr_scheduler=False,
                     time_budget_lr_factor=0.25, early_stopping=False)
    result = t.fit()
    assert result.stop_reason == "time_budget"
    lrs = [row["lr"] for row in result.history]
    final = [lr for lr in lrs if lr != 1e-2]
    assert lrs[0] == 1e-2 and len(final) >= 2 and set(final) == {2.5e-3}
    assert lrs[-len(final):] == final  # the lowered rate only at the end
    assert t.lr == 1e-2  # the schedule's own rate is untouched


def test_sample_validation_runs_and_logs_heldout_recon(tiny, tmp_path):
    result = make_trainer(tiny, tmp_path, sv_rate=0.2).fit()
    h = result.history
    assert all(np.isfinite(row["valid_recon_sv"]) for row in h)
    # The held-out bins are never trained on, so their loss stays above the kept bins'.
    assert h[-1]["valid_recon_sv"] > h[-1]["valid_recon"] * 0.9


def test_logged_metrics_agree_with_metrics_module(rng):
    from lfads_fast import metrics
    from lfads_fast.train import _bits_per_spike, _pooled_r2

    truth = rng.gamma(2.0, 0.2, size=(20, 30, 7)).astype(np.float32)
    rates = (truth * rng.uniform(0.5, 1.5, truth.shape)).astype(np.float32)
    spikes = rng.poisson(truth).astype(np.float32)
    spikes[rng.random(spikes.shape) < 0.05] = np.nan
    spikes[:, :, 3] = np.nan  # a neuron never observed
    assert _pooled_r2(rates, truth) == pytest.approx(metrics.r2(rates, truth), rel=1e-9)
    # float32 per-bin terms (as the model's rates), float64 sums.
    assert _bits_per_spike(rates, spikes) == pytest.approx(metrics.bits_per_spike(rates, spikes),
                                                           rel=1e-6)


# ------------------------------------------------------------------ checkpoints and resume


def test_checkpoint_contents(tiny, tmp_path):
    t = make_trainer(tiny, tmp_path, max_epochs=2)
    t.fit()
    ckpt = load_checkpoint(t.last_checkpoint)
    assert ckpt.model_config == t.model.config and ckpt.train_config == t.config
    assert np.array_equal(ckpt.flat, t.model.flat)
    assert np.array_equal(ckpt.adam_m, t.adam_m) and np.array_equal(ckpt.adam_v, t.adam_v)
    assert ckpt.epoch == 2 and ckpt.state["step"] == t.step == 2 * 4
    assert ckpt.state["rng"] == t.rng.bit_generator.state
    assert len(ckpt.state["history"]) == 2
    with h5py.File(t.last_checkpoint, "r") as f:
        # Plain arrays and JSON strings: nothing that needs pickle to read.
        assert sorted(f) == ["adam_m", "adam_v", "checksums", "flat", "state_json", "step"]
        assert all(f[k].dtype.kind in "fiuS" or h5py.check_string_dtype(f[k].dtype)
                   for k in f)
    model = load_model(t.best_checkpoint)
    assert model.config == t.model.config


def test_load_checkpoint_errors(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    with pytest.raises(ValueError, match="cannot open"):
        load_checkpoint(bad)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(ValueError, match="not an lfads_fast checkpoint"):
        load_checkpoint(tmp_path / "other.h5")


class Killed(Exception):
    pass


@pytest.mark.parametrize("extra", [{}, dict(temporal_shift_std=2.0)], ids=["plain", "temporal_shift"])
def test_kill_and_resume_is_bit_identical(tiny, tmp_path, extra):
    full = make_trainer(tiny, tmp_path / "full", max_epochs=6, sv_rate=0.1,
                        model_kw=dict(dropout_rate=0.1), **extra)
    full.fit()

    run = make_trainer(tiny, tmp_path / "run", max_epochs=6, sv_rate=0.1,
                       model_kw=dict(dropout_rate=0.1), **extra)
    calls = {"n": 0}
    original = run.model.loss_and_grads

    def dies_in_epoch_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 * 4 + 2:  # second batch of epoch index 3
            raise Killed
        return original(*args, **kwargs)

    run.model.loss_and_grads = dies_in_epoch_4
    with pytest.raises(Killed):
        run.fit()
    assert load_checkpoint(run.last_checkpoint).epoch == 3

    # A new process would start from a fresh model: parameters differ until resumed.
    resumed = make_trainer(tiny, tmp_path / "run", max_epochs=6, sv_rate=0.1,
                           model_kw=dict(dropout_rate=0.1), **extra)
    resumed.model.flat[...] = 0.0
    result = resumed.fit(resume=True)
    assert result.epochs_this_call == 3
    assert np.array_equal(resumed.model.flat, full.model.flat)
    assert np.array_equal(resumed.adam_m, full.adam_m)
    assert np.array_equal(resumed.adam_v, full.adam_v)
    assert resumed.step == full.step and resumed.lr == full.lr
    assert timeless(resumed.history) == timeless(full.history)


_CHILD = """
import sys
from lfads_fast import LFADS, ops, synth
from lfads_fast.train import Trainer, TrainConfig, config_for_data
ops.set_num_threads(2)
ds = synth.chaotic_rnn(n_conditions=32, trials_per_condition=5, train_per_condition=4,
                       n_bins=30, max_firing_rate=60.0).to_dataset()
model = LFADS(config_for_data(ds, **{model}), seed=3)
Trainer(model, ds, TrainConfig(**{train}), sys.argv[1], progress=False).fit()
"""


def test_sigkill_and_resume_is_bit_identical(tiny, tmp_path):
    train_kw = dict(TINY_TRAIN, max_epochs=30)
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(model=TINY_MODEL, train=train_kw), str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / "checkpoints" / "last.h5"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if last.exists() and load_checkpoint(last).epoch >= 2:
                break
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate()
    killed_at = load_checkpoint(last).epoch
    assert 2 <= killed_at < 30, err.decode()

    # Results are identical for the same seed and thread count (the child's; other tests of
    # this process may have changed the count).
    old = ops.get_num_threads()
    ops.set_num_threads(2)
    try:
        resumed = make_trainer(tiny, out, **dict(train_kw, batch_size=TINY_TRAIN["batch_size"]))
        resumed.fit(resume=True)
        full = make_trainer(tiny, tmp_path / "full", max_epochs=30)
        full.fit()
    finally:
        ops.set_num_threads(old)
    assert np.array_equal(resumed.model.flat, full.model.flat)
    assert timeless(resumed.history) == timeless(full.history)


def test_resume_rejects_other_settings_and_allows_more_epochs(tiny, tmp_path):
    make_trainer(tiny, tmp_path, max_epochs=2).fit()
    with pytest.raises(ValueError, match="lr_init"):
        make_trainer(tiny, tmp_path, max_epochs=2, lr_init=1e-3).fit(resume=True)
    with pytest.raises(ValueError, match="gen_dim"):
        make_trainer(tiny, tmp_path, model_kw=dict(gen_dim=8), max_epochs=2).fit(resume=True)
    result = make_trainer(tiny, tmp_path, max_epochs=3).fit(resume=True)
    assert result.epochs == 3 and result.epochs_this_call == 1


# ------------------------------------------------------------------ non-finite guard


def test_nonfinite_loss_never_reaches_the_parameters(tiny, tmp_path):
    t = make_trainer(tiny, tmp_path, max_nonfinite_steps=5)
    before = t.model.flat.copy()
    original = t.model.loss_and_grads

    def broken(*args, **kwargs):
        terms, grad = original(*args, **kwargs)
        return dict(terms, recon=float("nan"), loss=float("nan")), grad

    t.model.loss_and_grads = broken
    with pytest.raises(NonFiniteLossError) as info:
        t.fit()
    msg = str(info.value)
    assert "5 consecutive steps" in msg and "epoch 1, batch 0 of 4" in msg
    assert "loss term 'recon' = nan" in msg and "train trials" in msg
    assert np.array_equal(t.model.flat, before)
    assert t.skipped_steps == 5 and t.step == 0


def test_nonfinite_gradient_is_skipped_and_lowers_lr(tiny, tmp_path):
    t = make_trainer(tiny, tmp_path, max_epochs=2, lr_scheduler=False)
    original = t.model.loss_and_grads
    calls = {"n": 0}

    def inf_gradient_thrice(*args, **kwargs):
        terms, grad = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] <= 3:
            grad[7] = np.inf
        return terms, grad

    t.model.loss_and_grads = inf_gradient_thrice
    result = t.fit()
    assert result.skipped_steps == 3 and t.step == 2 * 4 - 3
    assert [row["skipped_steps"] for row in result.history] == [3, 0]
    assert t.lr == pytest.approx(0.5e-2)
    assert np.all(np.isfinite(t.model.flat))


def test_nonfinite_gradient_message(tiny, tmp_path):
    t = make_trainer(tiny, tmp_path, max_nonfinite_steps=2)
    original = t.model.loss_and_grads

    def inf_gradient(*args, **kwargs):
        terms, grad = original(*args, **kwargs)
        grad[0] = np.inf
        return terms, grad

    t.model.loss_and_grads = inf_gradient
    with pytest.raises(NonFiniteLossError, match="gradient is not finite"):
        t.fit()


def test_nonfinite_stop_carries_what_the_run_had_done(tiny, tmp_path):
    # 4 batches per epoch: epochs 0 and 1 train, then every step from epoch 2's second on is
    # NaN. The error carries a result whose checkpoints are those of the completed epochs.
    t = make_trainer(tiny, tmp_path, max_epochs=6, max_nonfinite_steps=3)
    original = t.model.loss_and_grads
    calls = {"n": 0}

    def nan_from_step_10(*args, **kwargs):
        terms, grad = original(*args, **kwargs)
        calls["n"] += 1
        return (dict(terms, loss=float("nan")), grad) if calls["n"] > 9 else (terms, grad)

    t.model.loss_and_grads = nan_from_step_10
    with pytest.raises(NonFiniteLossError) as info:
        t.fit()
    result = info.value.result
    assert result is not None and result.stop_reason == "nonfinite"
    assert result.stop_message == str(info.value) and "3 consecutive steps" in result.stop_message
    assert result.epochs == 2 and len(result.history) == 2 and result.epochs_this_call == 2
    assert result.best_epoch in (0, 1)
    assert load_checkpoint(result.last_checkpoint).epoch == 2
    assert load_checkpoint(result.best_checkpoint).epoch == result.best_epoch + 1
    assert np.all(np.isfinite(load_model(result.best_checkpoint).flat))
    # The last checkpoint is an exact place to go on from: a run resumed there with the
    # loss repaired matches an uninterrupted one.
    resumed = make_trainer(tiny, tmp_path, max_epochs=6, max_nonfinite_steps=3).fit(resume=True)
    reference = make_trainer(tiny, tmp_path / "ref", max_epochs=6, max_nonfinite_steps=3).fit()
    assert resumed.epochs == reference.epochs == 6
    np.testing.assert_array_equal(load_model(resumed.last_checkpoint).flat,
                                  load_model(reference.last_checkpoint).flat)


def test_nonfinite_stop_in_the_first_epoch_carries_no_result(tiny, tmp_path):
    t = make_trainer(tiny, tmp_path, max_nonfinite_steps=2)
    original = t.model.loss_and_grads

    def inf_kl(*args, **kwargs):
        terms, grad = original(*args, **kwargs)
        return dict(terms, kl_ic=float("inf")), grad

    t.model.loss_and_grads = inf_kl
    with pytest.raises(NonFiniteLossError, match="kl_ic") as info:
        t.fit()
    assert info.value.result is None
    assert not t.best_checkpoint.exists()


# ------------------------------------------------------------------ divergence


def blow_up(trainer, at):
    """Makes the trainer's model report a 100x reconstruction cost (finite) at the given
    (epoch, batch) pairs; returns the list of (epoch, batch, flat copy) seen at each call."""
    original = trainer.model.loss_and_grads
    seen = []

    def hook(*args, **kwargs):
        epoch = trainer.epoch
        batch = sum(1 for e, _, _ in seen if e == epoch)
        seen.append((epoch, batch, trainer.model.flat.copy()))
        terms, grad = original(*args, **kwargs)
        if (epoch, batch) in at:
            terms = dict(terms, recon=100.0 * terms["recon"], loss=100.0 * terms["loss"])
        return terms, grad

    trainer.model.loss_and_grads = hook
    return seen


def test_divergence_rolls_back_to_the_best_checkpoint(tiny, tmp_path):
    t = make_trainer(tiny, tmp_path, max_epochs=5, lr_scheduler=False)
    best_after = {}
    original_save = t._save

    def save(path):  # what the best checkpoint holds at each moment
        original_save(path)
        if path in (t.best_checkpoint, t._pending_best):  # the pending one becomes best.h5
            best_after[t.epoch] = load_checkpoint(path)

    t._save = save
    seen = blow_up(t, {(3, 2)})
    with pytest.warns(RuntimeWarning, match=r"diverged at epoch 3, batch 2 of 4: the "
                      r"reconstruction cost .* is .* times the lowest epoch mean"):
        result = t.fit()
    assert result.divergences == 1 and result.stop_reason == "max_epochs"
    assert [row["divergences"] for row in result.history] == [0, 0, 0, 1, 0]
    assert t.step == 5 * 4 - 1  # the divergent step was not applied
    assert t.lr == pytest.approx(0.5e-2)
    # The step after the divergence starts from the best checkpoint written so far (epoch
    # index 2: the burn-in ends there), not from the parameters the blow-up came from.
    best = best_after[3]
    assert t.best_epoch >= 2 and best.state["early_stopping"]["best_epoch"] == 2
    (after,) = [flat for e, b, flat in seen if (e, b) == (3, 3)]
    (before,) = [flat for e, b, flat in seen if (e, b) == (3, 2)]
    assert np.array_equal(after, best.flat) and not np.array_equal(before, best.flat)


def test_repeated_divergence_stops_with_the_best_parameters(tiny, tmp_path):
    t = make_trainer(tiny, tmp_path, max_epochs=8, max_divergences=2)
    blow_up(t, {(3, b) for b in range(4)} | {(4, b) for b in range(4)})
    with pytest.warns(RuntimeWarning, match="diverged") as caught:
        result = t.fit()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3 and "learning rate lowered to 0.0025" in messages[1]
    assert "divergence 3 (max_divergences 2): training stops" in messages[2]
    assert result.stop_reason == "diverged" and result.divergences == 3
    assert result.epochs == 4
    best = load_checkpoint(t.best_checkpoint)
    assert np.array_equal(t.model.flat, best.flat)
    assert np.array_equal(load_checkpoint(t.last_checkpoint).flat, best.flat)


def test_divergence_and_resume_is_bit_identical(tiny, tmp_path):
    at = {(2, 1), (4, 0)}
    full = make_trainer(tiny, tmp_path / "full", max_epochs=6, model_kw=dict(dropout_rate=0.1))
    blow_up(full, at)
    with pytest.warns(RuntimeWarning, match="diverged"):
        full.fit()
    assert full.divergences == 2

    part = make_trainer(tiny, tmp_path / "run", max_epochs=4, model_kw=dict(dropout_rate=0.1))
    blow_up(part, at)
    with pytest.warns(RuntimeWarning, match="diverged"):
        part.fit()
    resumed = make_trainer(tiny, tmp_path / "run", max_epochs=6, model_kw=dict(dropout_rate=0.1))
    blow_up(resumed, at)
    with pytest.warns(RuntimeWarning, match="diverged"):
        resumed.fit(resume=True)
    assert resumed.divergences == 2
    assert np.array_equal(resumed.model.flat, full.model.flat)
    assert np.array_equal(resumed.adam_v, full.adam_v)
    assert resumed.lr == full.lr
    assert timeless(resumed.history) == timeless(full.history)


def test_divergence_check_can_be_turned_off(tiny, tmp_path):
    t = make_trainer(tiny, tmp_path, max_epochs=4, divergence_factor=None)
    blow_up(t, {(2, 1)})
    assert t.fit().divergences == 0 and t.step == 16


# ------------------------------------------------------------------ temporal shift


@pytest.mark.parametrize("T, B, N", [(9, 4, 5), (1, 3, 2), (6, 1, 1)])
def test_temporal_shift_matches_a_loop(rng, T, B, N):
    data = rng.poisson(2.0, size=(T, B, N)).astype(np.float64)
    data[rng.random(data.shape) < 0.1] = np.nan
    shifts = rng.integers(-T - 2, T + 3, size=(B, N))
    out = temporal_shift(data, shifts)
    expected = np.empty_like(data)
    for t, b, n in itertools.product(range(T), range(B), range(N)):
        expected[t, b, n] = data[min(max(t - shifts[b, n], 0), T - 1), b, n]
    np.testing.assert_array_equal(out, expected)
    # A strided view of the same values gives the same.
    np.testing.assert_array_equal(temporal_shift(np.repeat(data, 2, axis=1)[:, ::2], shifts), expected)
    with pytest.raises(ValueError, match=r"shifts must have shape \[%d, %d\]" % (B, N)):
        temporal_shift(data, shifts[:, :0])


def test_draw_temporal_shifts_are_rounded_clamped_normals():
    std, cap = 3.0, 4
    shifts = draw_temporal_shifts(np.random.default_rng(11), (200, 150), std, cap)
    assert shifts.shape == (200, 150) and shifts.dtype == np.int64
    assert shifts.min() == -cap and shifts.max() == cap
    # Fraction of each value against the normal's mass on its rounding interval (the ends
    # collect the clamped tails); Z standard errors, seed fixed.
    Z = 5.0
    for k in range(-cap, cap + 1):
        lo = -np.inf if k == -cap else (k - 0.5) / std
        hi = np.inf if k == cap else (k + 0.5) / std
        p = 0.5 * (math.erf(hi / math.sqrt(2)) - math.erf(lo / math.sqrt(2)))
        assert abs(np.mean(shifts == k) - p) < Z * math.sqrt(p * (1 - p) / shifts.size), k


def test_temporal_shift_applies_to_training_batches_only(tiny, tmp_path, monkeypatch):
    t = make_trainer(tiny, tmp_path / "shift", temporal_shift_std=2.0, temporal_shift_max=3)
    step = t._epoch_steps()[0]
    plain = t._batch(step)
    shifted = t._batch(step, np.random.default_rng(0))
    again = t._batch(step, np.random.default_rng(0))
    assert np.array_equal(shifted.encod, again.encod) and np.array_equal(shifted.recon, again.recon)
    assert not np.array_equal(shifted.encod, plain.encod)
    # Each channel of each trial is its unshifted series moved by at most 3 bins.
    T = plain.encod.shape[0]
    idx = np.arange(T)[:, None, None]
    matches = [np.all(shifted.encod == np.take_along_axis(plain.encod, np.clip(idx - k, 0, T - 1), 0), axis=0)
               for k in range(-3, 4)]
    assert np.all(np.any(matches, axis=0))
    # The reconstruction gets its own shifts, even where it is the encoder's data.
    assert t._train_time_major[0][1] is None and np.array_equal(plain.recon, plain.encod)
    assert not np.array_equal(shifted.recon, shifted.encod)

    # Validation never shifts: the same model validates alike with and without the option.
    off = make_trainer(tiny, tmp_path / "off")
    assert np.array_equal(off.model.flat, t.model.flat)
    np.testing.assert_equal(t._validate(0, 1.0, 1.0), off._validate(0, 1.0, 1.0))
    calls = []
    original = train_module.temporal_shift

    def counting(data, shifts):
        calls.append(data.shape)
        return original(data, shifts)

    monkeypatch.setattr(train_module, "temporal_shift", counting)
    t.fit()
    n_train = tiny.train.n_trials
    steps = t.config.max_epochs * math.ceil(n_train / t.config.batch_size)
    assert len(calls) == 2 * steps  # encoder and reconstruction data of each training step
    assert sum(shape[1] for shape in calls) == 2 * t.config.max_epochs * n_train


def test_temporal_shift_run_is_reproducible(tiny, tmp_path):
    """Same seed, same run; the shifts change it (exact resume: test_kill_and_resume_is_bit_identical)."""
    kw = dict(max_epochs=3, temporal_shift_std=2.0)
    runs = [make_trainer(tiny, tmp_path / name, **kw) for name in ("a", "b")]
    runs.append(make_trainer(tiny, tmp_path / "off", **dict(kw, temporal_shift_std=0.0)))
    for t in runs:
        t.fit()
    assert np.array_equal(runs[0].model.flat, runs[1].model.flat)
    assert timeless(runs[0].history) == timeless(runs[1].history)
    assert not np.array_equal(runs[0].model.flat, runs[2].model.flat)


# ------------------------------------------------------------------ sample validation weights


def sv_setup(rng, dtype=np.float64):
    cfg = LFADSConfig(encod_data_dim=6, recon_data_dim=8, encod_seq_len=7, recon_seq_len=9,
                      ic_enc_dim=5, ci_enc_dim=4, con_dim=4, co_dim=2, ic_dim=3, gen_dim=6,
                      fac_dim=3, dropout_rate=0.0, loss_scale=1.0)
    model = LFADS(cfg, seed=1, dtype=dtype)
    model.flat += (rng.normal(size=model.flat.shape) * 0.1).astype(dtype)
    B = 4
    encod = rng.poisson(1.5, size=(B, 7, 6)).astype(np.float64)
    recon = rng.poisson(1.5, size=(B, 9, 8)).astype(np.float64)
    recon[:, :7, :6] = encod
    recon[0, 1, 2] = encod[0, 1, 2] = np.nan
    keep = rng.random(encod.shape) >= 0.3
    return model, encod, recon, keep


def test_sv_mask_weights_the_loss_and_scales_the_input(rng):
    model, encod, recon, keep = sv_setup(rng)
    rate = 0.3
    batch = model.make_batch(encod, recon, sv_mask=keep, sv_rate=rate)
    # The encoder sees the kept bins scaled by 1 / (1 - rate), the held-out ones as 0.
    scaled = np.nan_to_num(encod) * keep / (1 - rate)
    assert np.array_equal(model.make_batch(scaled, recon, check_counts=False).encod, batch.encod)
    # The reconstruction is the NLL weighted by the same factors (1 beyond the encoder's bins).
    out = model.forward(encod, recon_data=recon, sv_mask=keep, sv_rate=rate)
    rates = out["output_params"]
    w = np.ones_like(recon)
    w[:, :7, :6] = keep / (1 - rate)
    ok = ~np.isnan(recon)
    y = np.where(ok, recon, 0.0)
    nll = rates - y * np.log(rates) + np.vectorize(math.lgamma)(y + 1)
    assert out["terms"]["recon"] == pytest.approx(np.sum((w * nll)[ok]) / ok.sum(), rel=1e-10)
    noise = model.draw_noise(4, np.random.default_rng(0), train=False, sample=False)
    terms, _ = model.loss_and_grads(batch, noise, grads=False)
    assert terms["recon"] == pytest.approx(out["terms"]["recon"], rel=1e-12)


def test_sv_mask_gradient_matches_finite_differences(rng):
    model, encod, recon, keep = sv_setup(rng)
    batch = model.make_batch(encod, recon, sv_mask=keep, sv_rate=0.25)
    noise = model.draw_noise(4, np.random.default_rng(1), train=False, sample=True)
    _, grad = model.loss_and_grads(batch, noise, kl_ramp=0.5, l2_ramp=0.5)
    idx = rng.choice(model.flat.size, size=25, replace=False)
    for i in idx:
        saved = model.flat[i]
        model.flat[i] = saved + FD_STEP
        up = model.loss_and_grads(batch, noise, kl_ramp=0.5, l2_ramp=0.5, grads=False)[0]["loss"]
        model.flat[i] = saved - FD_STEP
        down = model.loss_and_grads(batch, noise, kl_ramp=0.5, l2_ramp=0.5, grads=False)[0]["loss"]
        model.flat[i] = saved
        fd = (up - down) / (2 * FD_STEP)
        assert grad[i] == pytest.approx(fd, rel=FD_RTOL, abs=FD_ATOL), i


def test_sv_mask_errors(rng):
    model, encod, recon, keep = sv_setup(rng)
    with pytest.raises(ValueError, match="sv_rate"):
        model.make_batch(encod, recon, sv_mask=keep)
    with pytest.raises(ValueError, match="sv_mask must have shape"):
        model.make_batch(encod, recon, sv_mask=keep[:, :3], sv_rate=0.2)
    with pytest.raises(ValueError, match="only 0 and 1"):
        model.make_batch(encod, recon, sv_mask=keep * 2.0, sv_rate=0.2)
