"""Device placement and the backend-agnostic helpers of ops, on any machine.

The same model code runs over numpy here and over cupy on a GPU (test_gpu_model.py checks the
GPU against the CPU); these tests hold the device API to its contract without a GPU: names,
errors where CUDA cannot run, moves that copy or not, and checkpoints that do not care where
they were written.
"""
from __future__ import annotations

import numpy as np
import pytest

from lfads_fast import LFADS, LFADSConfig, cli, ops, synth
from lfads_fast.train import Trainer, TrainConfig, config_for_data

CFG = dict(encod_data_dim=7, recon_data_dim=7, encod_seq_len=6, recon_seq_len=6, ic_enc_dim=5,
           ci_enc_dim=4, con_dim=3, co_dim=2, ic_dim=3, gen_dim=6, fac_dim=3)


def cuda_reason() -> str | None:
    ok, why = ops.cuda_available()
    return None if ok else why


def test_cpu_is_the_default_and_to_cpu_keeps_the_vector():
    model = LFADS(LFADSConfig(**CFG), seed=1)
    assert model.device == "cpu" and model.xp is np
    flat = model.flat
    assert model.to("cpu") is model and model.flat is flat
    assert np.array_equal(LFADS(LFADSConfig(**CFG), seed=1, device="cpu").flat, flat)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:-1", "", None, 0])
def test_unknown_device_names_are_refused(device):
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        LFADS(LFADSConfig(**CFG), device=device)


def test_cuda_where_it_cannot_run_says_why():
    why = cuda_reason()
    if why is None:
        pytest.skip("CUDA runs here")
    model = LFADS(LFADSConfig(**CFG))
    for call in (lambda: LFADS(LFADSConfig(**CFG), device="cuda"), lambda: model.to("cuda:0")):
        with pytest.raises(ValueError, match="is not available: ") as e:
            call()
        assert why in str(e.value)
    assert model.device == "cpu"  # a refused move leaves the model where it was


def test_cli_refuses_an_unavailable_device_before_any_work(tmp_path, capsys):
    if cuda_reason() is None:
        pytest.skip("CUDA runs here")
    data = tmp_path / "data.h5"
    synth.save_h5(synth.chaotic_rnn(n_conditions=4, trials_per_condition=3, train_per_condition=2,
                                    n_bins=10), data)
    out = tmp_path / "run"
    assert cli.main(["train", str(data), "--out", str(out), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "lfads-fast train: error: --device cuda: device 'cuda' is not available" in err
    assert not out.exists()
    assert cli.main(["infer", str(tmp_path / "none.h5"), str(data), "--out", str(tmp_path / "o.h5"),
                     "--device", "tpu"]) == 2
    assert "--device tpu: device must be" in capsys.readouterr().err


def test_flat_assignment_writes_through_the_views():
    model = LFADS(LFADSConfig(**CFG), seed=2)
    flat, view = model.flat, model.params["gen_W_hh"]
    model.flat = np.arange(model.num_params, dtype=np.float32)
    assert model.flat is flat and view[0, 0] == _offset(model, "gen_W_hh")
    model.flat += 1.0
    assert model.flat is flat and model.flat[0] == 1.0


def _offset(model, name):
    i = 0
    for n, shape in model.layout:
        if n == name:
            return i
        i += int(np.prod(shape))
    raise KeyError(name)


def test_host_helpers():
    a = np.ones(3, np.float32)
    assert ops.to_host(a) is a and ops.to_host(None) is None
    assert isinstance(ops.to_host([1, 2]), np.ndarray)
    assert ops.array_module(a) is np and ops.device_of(a) == "cpu"
    v = ops.scalar(np.array([2.5], np.float32))
    assert type(v) is float and v == 2.5
    rng = np.random.default_rng(0)
    assert ops.generator(np, rng) is rng
    with pytest.raises(TypeError, match="expected a numpy or cupy array"):
        ops.array_module([1.0])


def test_trainer_device_argument_trains_on_that_device(tmp_path):
    ds = synth.chaotic_rnn(n_conditions=4, trials_per_condition=3, train_per_condition=2,
                           n_bins=10).to_dataset()
    cfg = config_for_data(ds, ic_enc_dim=4, ci_enc_dim=4, con_dim=4, co_dim=2, ic_dim=3, gen_dim=5,
                          fac_dim=3)
    tc = TrainConfig(batch_size=4, max_epochs=2)
    a = Trainer(LFADS(cfg, seed=0), ds, tc, tmp_path / "a", progress=False, device="cpu")
    a.fit()
    b = Trainer(LFADS(cfg, seed=0), ds, tc, tmp_path / "b", progress=False)
    b.fit()
    assert a.model.device == "cpu"
    np.testing.assert_array_equal(a.model.flat, b.model.flat)
    with pytest.raises(ValueError, match="device must be"):
        Trainer(LFADS(cfg, seed=0), ds, tc, tmp_path / "c", progress=False, device="gpu")
