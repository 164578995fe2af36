"""Trainer.perturb: new hyperparameters applied to a run's state at its last checkpoint
(population-based training's explore step)."""
import numpy as np
import pytest

from lfads_fast import LFADS, synth
from lfads_fast.train import (PERTURBABLE_FIELDS, Trainer, TrainConfig, config_for_data,
                              load_checkpoint)

TINY_MODEL = dict(ic_enc_dim=12, ic_dim=6, gen_dim=16, fac_dim=6, co_dim=0, ci_enc_dim=0,
                  con_dim=0, dropout_rate=0.05)
TINY_TRAIN = dict(batch_size=32, max_epochs=2, lr_init=1e-2, kl_increase_epoch=1,
                  l2_increase_epoch=1, lr_stop=1e-12)


@pytest.fixture(scope="module")
def tiny():
    return synth.chaotic_rnn(n_conditions=16, trials_per_condition=5, train_per_condition=4,
                             n_bins=20, max_firing_rate=60.0, n_neurons=20).to_dataset()


def make_trainer(ds, out, model_kw=None, **train_kw):
    cfg = config_for_data(ds, **dict(TINY_MODEL, **(model_kw or {})))
    return Trainer(LFADS(cfg, seed=3), ds, TrainConfig(**dict(TINY_TRAIN, **train_kw)), out,
                   progress=False)


def test_perturb_without_changes_resumes_exactly(tiny, tmp_path):
    full = make_trainer(tiny, tmp_path / "full", max_epochs=4)
    full.fit()
    part = make_trainer(tiny, tmp_path / "part", max_epochs=2)
    part.fit()
    again = make_trainer(tiny, tmp_path / "part", max_epochs=4)
    assert again.perturb({}) == {}
    again.fit(resume=True)
    assert np.array_equal(again.model.flat, full.model.flat)
    assert np.array_equal(again.adam_m, full.adam_m) and np.array_equal(again.adam_v, full.adam_v)


def test_perturb_applies_new_values_to_the_resumed_state(tiny, tmp_path):
    t = make_trainer(tiny, tmp_path)
    t.fit()
    before = load_checkpoint(t.last_checkpoint)
    changes = {"lr_init": 1e-9, "dropout_rate": 0.3, "cd_rate": 0.2, "kl_ic_scale": 0.5,
               "kl_co_scale": 2e-4, "l2_gen_scale": 1e-2, "l2_con_scale": 3e-3}
    t2 = make_trainer(tiny, tmp_path, max_epochs=3)
    done = t2.perturb(changes, reseed=7)
    assert set(done) == set(changes)
    assert done["dropout_rate"] == (0.05, 0.3) and done["lr_init"] == (1e-2, 1e-9)
    # The state is the checkpoint's; the configurations carry the new values.
    assert np.array_equal(t2.model.flat, before.flat)
    assert np.array_equal(t2.adam_m, before.adam_m) and np.array_equal(t2.adam_v, before.adam_v)
    assert (t2.epoch, t2.step) == (before.epoch, before.state["step"])
    assert t2.lr == 1e-9
    for k, v in changes.items():
        owner = t2.model.config if PERTURBABLE_FIELDS[k] == "model" else t2.config
        assert getattr(owner, k) == v
    # Written back: the checkpoint holds the new configuration, and so does config.yaml.
    after = load_checkpoint(t2.last_checkpoint)
    assert after.model_config.kl_ic_scale == 0.5 and after.train_config.lr_init == 1e-9
    assert np.array_equal(after.flat, before.flat)
    assert "kl_ic_scale: 0.5" in (tmp_path / "config.yaml").read_text()
    # A trainer built with the new configuration resumes it (the old one would be refused).
    t3 = Trainer(LFADS(after.model_config, seed=0), tiny, after.train_config, tmp_path,
                 progress=False)
    t3.config.max_epochs = 3
    result = t3.fit(resume=True)
    row = result.history[-1]
    assert result.epochs == 3 and row["epoch"] == 2
    # The learning rate reached Adam: a step of 1e-9 barely moves the parameters.
    assert row["lr"] == 1e-9
    assert np.max(np.abs(t3.model.flat - before.flat)) < 1e-6
    # The new KL scale is in the loss the epoch reports.
    cfg = t3.model.config
    expected = cfg.loss_scale * (row["valid_recon"] + row["l2_ramp"] * row["valid_l2"] + row["kl_ramp"] * (
        0.5 * row["valid_kl_ic"] + 2e-4 * row["valid_kl_co"]))
    assert row["valid_loss"] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="model differs"):
        make_trainer(tiny, tmp_path, max_epochs=4).fit(resume=True)


def test_reseed_changes_the_noise_and_none_keeps_it(tiny, tmp_path):
    runs = {}
    for name, reseed in (("a", None), ("b", None), ("c", 1)):
        t = make_trainer(tiny, tmp_path / name)
        t.fit()
        t = make_trainer(tiny, tmp_path / name, max_epochs=3)
        t.perturb({"dropout_rate": 0.2}, reseed=reseed)
        t.fit(resume=True)
        runs[name] = t.model.flat.copy()
    assert np.array_equal(runs["a"], runs["b"])
    assert not np.array_equal(runs["a"], runs["c"])


@pytest.mark.parametrize("changes, reseed, match", [
    ({"gen_dim": 8}, None, "gen_dim cannot change"),
    ({"max_epochs": 8}, None, "max_epochs cannot change"),
    ({"dropout_rate": 1.5}, None, "dropout_rate must be in"),
    ({"kl_ic_scale": -1.0}, None, "kl_ic_scale must be"),
    ({"lr_init": 1e-20}, None, "lr_stop"),
    ({}, -1, "reseed"),
])
def test_perturb_rejects_bad_input(tiny, tmp_path, changes, reseed, match):
    t = make_trainer(tiny, tmp_path, max_epochs=1)
    t.fit()
    with pytest.raises(ValueError, match=match):
        make_trainer(tiny, tmp_path, max_epochs=1).perturb(changes, reseed=reseed)


def test_perturb_needs_a_checkpoint_of_this_run(tiny, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        make_trainer(tiny, tmp_path / "empty").perturb({"lr_init": 1e-3})
    make_trainer(tiny, tmp_path).fit()
    with pytest.raises(ValueError, match="model differs"):
        make_trainer(tiny, tmp_path, model_kw={"gen_dim": 12}).perturb({"lr_init": 1e-3})
