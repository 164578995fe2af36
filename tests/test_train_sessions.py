"""The trainer on several sessions: learning, logs, exact resume, the data check on resume,
the non-finite guard, and what it refuses."""
from operator import attrgetter

import numpy as np
import pytest

from lfads_fast import LFADS, LFADSConfig, data, stitching, synth
from lfads_fast.train import NonFiniteLossError, Trainer, TrainConfig, load_checkpoint

TINY_MODEL = dict(ic_enc_dim=12, ic_dim=6, gen_dim=16, fac_dim=8, co_dim=0, ci_enc_dim=0,
                  con_dim=0, dropout_rate=0.0)
TINY_TRAIN = dict(batch_size=16, max_epochs=3, lr_init=1e-2, kl_increase_epoch=2,
                  l2_increase_epoch=2)
SHARED_DIM = 8


@pytest.fixture(scope="module")
def sessions():
    """Three sessions of one chaotic RNN (12, 16 and 10 neurons; 48 / 16 trials, 20 bins)."""
    found = synth.chaotic_rnn_sessions(n_sessions=3, neurons_per_session=[12, 16, 10],
                                       n_conditions=16, trials_per_condition=4,
                                       train_per_condition=3, n_units=40, n_bins=20,
                                       max_firing_rate=60.0)
    return [d.to_dataset() for d in found]


def make_trainer(sessions, out, model_kw=None, **train_kw):
    cfg = stitching.config_for_sessions(sessions, SHARED_DIM, **dict(TINY_MODEL, **(model_kw or {})))
    model = LFADS(cfg, seed=3)
    stitching.init_session_layers(model, sessions)
    return Trainer(model, sessions, TrainConfig(**dict(TINY_TRAIN, **train_kw)), out, progress=False)


def timeless(history):
    return [{k: v for k, v in row.items() if k not in ("train_s", "epoch_s", "time_s")}
            for row in history]


def test_stitched_trainer_learns_and_logs_every_session(sessions, tmp_path):
    t = make_trainer(sessions, tmp_path, max_epochs=12)
    frozen = t.model.trainable_mask() == 0
    readins = t.model.flat[frozen].copy()
    result = t.fit()
    h = result.history
    assert result.epochs == 12 and t.step == 12 * 3  # 36 train trials per session, 16 a step
    assert h[-1]["train_recon"] < h[0]["train_recon"] - 0.01
    assert h[-1]["valid_recon"] < h[0]["valid_recon"]
    assert h[-1]["valid_r2"] > h[0]["valid_r2"] + 0.1
    np.testing.assert_array_equal(t.model.flat[frozen], readins)  # read-ins stay frozen
    for row in h:
        # The logged validation values are the means over the sessions of their own values.
        for name in ("recon", "r2", "bps"):
            per = [row[f"valid_{name}_s{s}"] for s in range(3)]
            assert row[f"valid_{name}"] == pytest.approx(sum(per) / 3, rel=1e-12)
    for name in ("session_factors.png", "training_curves.png", "log.csv",
                 "checkpoints/best.h5", "checkpoints/last.h5"):
        assert (tmp_path / name).is_file(), name
    assert load_checkpoint(result.last_checkpoint).model_config.session_neurons == [12, 16, 10]


def test_validation_recon_is_the_models_session_mean(sessions, tmp_path):
    """With posterior means and no sampling noise, a session's logged validation recon is
    the model's loss on that session's valid trials, and their mean the model's loss on a
    batch mixing all of them."""
    t = make_trainer(sessions, tmp_path, model_kw=dict(ic_post_var_min=1e-30))
    model = t.model
    model.params["ic_linear_W"][model.config.ic_dim:] = 0.0
    model.params["ic_linear_b"][model.config.ic_dim:] = -80.0  # posterior std ~ 0
    row = t._validate(0, kl_ramp=1.0, l2_ramp=1.0)
    parts = [(s, ds.valid.encod_data, ds.valid.recon_data) for s, ds in enumerate(sessions)]
    mixed, _ = model.loss_and_grads(model.make_session_batch(parts), None, grads=False)
    alone = [model.loss_and_grads(model.make_session_batch([p]), None, grads=False)[0]["recon"]
             for p in parts]
    for s in range(3):
        assert row[f"valid_recon_s{s}"] == pytest.approx(alone[s], rel=1e-5)
    assert row["valid_recon"] == pytest.approx(mixed["recon"], rel=1e-5)


def test_sample_validation_per_session(sessions, tmp_path):
    h = make_trainer(sessions, tmp_path, max_epochs=2, sv_rate=0.2).fit().history
    for row in h:
        per = [row[f"valid_recon_sv_s{s}"] for s in range(3)]
        assert all(np.isfinite(per))
        assert row["valid_recon_sv"] == pytest.approx(sum(per) / 3, rel=1e-12)


class Killed(Exception):
    pass


def fit_until_killed(trainer, call):
    """Runs fit() with a model whose call-th loss_and_grads call raises Killed."""
    original, calls = trainer.model.loss_and_grads, [0]

    def dies(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise Killed
        return original(*args, **kwargs)

    trainer.model.loss_and_grads = dies
    with pytest.raises(Killed):
        trainer.fit()


@pytest.mark.parametrize("extra", [{}, dict(temporal_shift_std=1.5, temporal_shift_max=3)],
                         ids=["plain", "temporal_shift_cd_pass"])
def test_kill_and_resume_is_bit_identical(sessions, tmp_path, extra):
    cd = dict(cd_rate=0.2, cd_pass_rate=0.5 if extra else 0.0)
    kw = dict(max_epochs=5, sv_rate=0.1, model_kw=dict(dropout_rate=0.1, **cd), **extra)
    full = make_trainer(sessions, tmp_path / "full", **kw)
    full.fit()
    fit_until_killed(make_trainer(sessions, tmp_path / "run", **kw), 2 * 3 + 2)  # epoch 2, batch 1
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.h5").epoch == 2

    resumed = make_trainer(sessions, tmp_path / "run", **kw)
    resumed.model.flat[...] = 0.0  # a new process starts from another model
    assert resumed.fit(resume=True).epochs_this_call == 3
    for name in ("model.flat", "adam_m", "adam_v", "step", "lr"):
        assert np.array_equal(attrgetter(name)(resumed), attrgetter(name)(full)), name
    assert timeless(resumed.history) == timeless(full.history)


def test_resume_refuses_other_data(sessions, tmp_path):
    make_trainer(sessions, tmp_path, max_epochs=1).fit()
    t = sessions[1].train
    fewer = data.from_arrays(t.encod_data[1:], sessions[1].valid.encod_data)
    with pytest.raises(ValueError, match=r"other data \(session 1 \(<arrays>\): \{'n_train': 48"):
        make_trainer([sessions[0], fewer, sessions[2]], tmp_path, max_epochs=2).fit(resume=True)
    result = make_trainer(sessions, tmp_path, max_epochs=2).fit(resume=True)
    assert result.epochs == 2 and result.epochs_this_call == 1


def test_nonfinite_loss_names_the_session(sessions, tmp_path):
    t = make_trainer(sessions, tmp_path, max_nonfinite_steps=2)
    t.model.params["readout_b_1"][...] = 1e4  # its rates overflow
    before = t.model.flat.copy()
    with pytest.raises(NonFiniteLossError) as info:
        t.fit()
    msg = str(info.value)
    assert "2 consecutive steps" in msg and "epoch 0, batch 1 of 3" in msg
    assert "train trials of session 0: " in msg and "; session 2: " in msg
    assert msg.split("no dropout): ")[1].startswith("session 1 (<arrays>).")
    np.testing.assert_array_equal(t.model.flat, before)


def test_sessions_from_paths_and_glob(tmp_path):
    found = synth.chaotic_rnn_sessions(n_sessions=2, neurons_per_session=[6, 8], n_conditions=4,
                                       trials_per_condition=3, train_per_condition=2,
                                       n_units=20, n_bins=10)
    paths = synth.save_sessions_h5(found, tmp_path / "data")
    sessions = data.load_sessions(paths)
    cfg = stitching.config_for_sessions(sessions, 4, **dict(TINY_MODEL, fac_dim=4))
    by_glob = Trainer(LFADS(cfg), str(tmp_path / "data" / "session_*.h5"), out_dir=tmp_path / "a")
    assert [ds.source for ds in by_glob.sessions] == paths
    assert [ds.source for ds in Trainer(LFADS(cfg), paths, out_dir=tmp_path / "b").sessions] == paths


def test_refusals(sessions, tmp_path):
    cfg = stitching.config_for_sessions(sessions, SHARED_DIM, **TINY_MODEL)
    with pytest.raises(ValueError, match="the model has 3 sessions, got 2 datasets"):
        Trainer(LFADS(cfg), sessions[:2], out_dir=tmp_path)
    with pytest.raises(ValueError, match="session 0 .* has encod_data_dim = 16 but the model expects 12"):
        Trainer(LFADS(cfg), [sessions[1], sessions[0], sessions[2]], out_dir=tmp_path)
    with pytest.raises(TypeError, match="one Dataset or HDF5 path per session"):
        Trainer(LFADS(cfg), sessions[0], out_dir=tmp_path)
    single = LFADS(LFADSConfig(encod_data_dim=12, encod_seq_len=20, **TINY_MODEL))
    with pytest.raises(ValueError, match="several sessions: build the model's config"):
        Trainer(single, sessions, out_dir=tmp_path)
