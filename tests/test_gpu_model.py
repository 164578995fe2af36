"""The whole model on the GPU against the CPU, at real sizes (marker ``gpu``; skips cleanly
without CuPy, a driver, a device or the CUDA build).

One code path serves both backends (graph.py over ops.py); these tests check what only a GPU
can: the CUDA kernels wired through ops (workspaces, streams, weight-gradient GEMMs) give the
loss, every parameter's gradient and the posterior outputs of the CPU within the float32
contract of test_cuda.py, on the NLB MC_Maze 5 ms configuration (T_e = 140, T_r = 180,
137 -> 182 neurons) with gen_dim 100 and 200 (the larger generator's weights do not fit in one
SM's shared memory and are split with L2); that noise drawn on the device is reproducible from
the seed; and that a few hundred training steps on the GPU reach the CPU's loss within the
seed-to-seed spread of CPU runs.
"""
from __future__ import annotations

import numpy as np
import pytest

from lfads_fast import LFADS, LFADSConfig, ops, synth
from lfads_fast.train import Trainer, TrainConfig, config_for_data, load_checkpoint, load_model

pytestmark = pytest.mark.gpu

# Flash-attention's rule, as in test_cuda.py: the float32 GPU result may be at most twice as
# far from float64 as the float32 CPU result, plus a floor for values whose CPU error happens
# to be near zero (sums of up to a few hundred products carried through up to 180 steps).
GPU_VS_CPU32 = 2.0
FLOOR = 1e-5

NLB5MS = dict(encod_data_dim=137, recon_data_dim=182, encod_seq_len=140, recon_seq_len=180,
              ic_enc_dim=100, ci_enc_dim=80, con_dim=80, co_dim=4, ic_dim=100, gen_dim=100,
              fac_dim=40, dropout_rate=0.05, cd_rate=0.1, l2_gen_scale=1e-4, l2_con_scale=1e-4)
# Odd sizes everywhere (no multiple of 32), external inputs, for the adapters' edge cases.
ODD = dict(encod_data_dim=13, recon_data_dim=17, encod_seq_len=9, recon_seq_len=11, ic_enc_dim=33,
           ci_enc_dim=7, con_dim=5, co_dim=3, ic_dim=6, gen_dim=37, fac_dim=9, ext_input_dim=2,
           dropout_rate=0.1, cd_rate=0.2)
CASES = {"odd": (ODD, 5), "nlb5ms": (NLB5MS, 64), "nlb5ms_gen200": (dict(NLB5MS, gen_dim=200), 32)}


@pytest.fixture(scope="module")
def cuda():
    ok, why = ops.cuda_available()
    if not ok:
        pytest.skip(why)
    import cupy

    return cupy


def rel_err(x, r):
    x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
    den = np.linalg.norm(r)
    return float(np.linalg.norm(x - r) / (den if den > 0 else 1.0))


def check(name, got, r64, r32, ctx):
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all(), f"{name}: non-finite values ({ctx})"
    e_gpu, e_cpu = rel_err(got, r64), rel_err(r32, r64)
    assert e_gpu <= GPU_VS_CPU32 * e_cpu + FLOOR, (
        f"{name}: GPU float32 error {e_gpu:.3e} > {GPU_VS_CPU32} x CPU float32 error {e_cpu:.3e} "
        f"+ {FLOOR:.0e} ({ctx})")


def three_models(spec, seed=0):
    """The same parameters as float64 and float32 on the CPU and float32 on the GPU."""
    cfg = LFADSConfig(**spec)
    m32 = LFADS(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    m32.flat += (rng.standard_normal(m32.num_params) * 0.05).astype(np.float32)
    m64 = LFADS(cfg, seed=seed, dtype=np.float64)
    m64.flat = m32.flat.astype(np.float64)
    gpu = LFADS(cfg, seed=seed)
    gpu.flat = m32.flat
    gpu.to("cuda")
    return cfg, m64, m32, gpu


def data(cfg, B, rng):
    encod = rng.poisson(0.4, (B, cfg.encod_seq_len, cfg.encod_data_dim)).astype(np.float32)
    recon = rng.poisson(0.4, (B, cfg.recon_seq_len, cfg.recon_data_dim)).astype(np.float32)
    recon[:, : cfg.encod_seq_len, : cfg.encod_data_dim] = encod
    recon[rng.random(recon.shape) < 0.02] = np.nan
    ext = (rng.standard_normal((B, cfg.recon_seq_len, cfg.ext_input_dim)).astype(np.float32)
           if cfg.ext_input_dim else None)
    return encod, recon, ext


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_every_gradient_match_cpu(cuda, case):
    spec, B = CASES[case]
    cfg, m64, m32, gpu = three_models(spec)
    assert gpu.device.startswith("cuda") and gpu.xp is cuda
    encod, recon, ext = data(cfg, B, np.random.default_rng(2))
    noise = m32.draw_noise(m32.make_batch(encod, recon, ext), np.random.default_rng(3))
    results = {}
    for name, m in (("64", m64), ("32", m32), ("gpu", gpu)):
        batch = m.make_batch(encod, recon, ext)
        terms, grad = m.loss_and_grads(batch, noise, kl_ramp=0.7, l2_ramp=0.9)
        results[name] = ({k: float(v) for k, v in terms.items()}, ops.to_host(grad))
    ctx = f"{case}, B={B}"
    for k in results["64"][0]:
        check(f"loss term {k}", [results["gpu"][0][k]], [results["64"][0][k]], [results["32"][0][k]],
              ctx)
    g64, g32, ggpu = (m64.views(results["64"][1]), m32.views(results["32"][1]),
                      m32.views(results["gpu"][1]))
    for name in g64:
        check(f"d_{name}", ggpu[name], g64[name], g32[name], ctx)


@pytest.mark.parametrize("case", ["odd", "nlb5ms"])
def test_posterior_outputs_match_cpu(cuda, case):
    spec, B = CASES[case]
    cfg, m64, m32, gpu = three_models(spec, seed=4)
    encod, recon, ext = data(cfg, B, np.random.default_rng(5))
    outs = [m.forward(encod, ext, sample=True, seed=6) for m in (m64, m32, gpu)]
    for k, r64 in outs[0].items():
        if k == "terms":
            continue
        assert isinstance(outs[2][k], np.ndarray), f"{k}: forward returns host arrays"
        check(k, outs[2][k], r64, outs[1][k], f"{case}, B={B}")


def test_device_noise_is_reproducible_from_the_seed(cuda):
    cfg, _, _, gpu = three_models(ODD)
    batch = gpu.make_batch(*data(cfg, 40, np.random.default_rng(0)))
    a = gpu.draw_noise(batch, np.random.default_rng(7))
    b = gpu.draw_noise(batch, np.random.default_rng(7))
    c = gpu.draw_noise(batch, np.random.default_rng(8))
    assert set(a) == set(b)
    for k in a:
        assert isinstance(a[k], cuda.ndarray), f"{k} was drawn on the host"
        assert cuda.array_equal(a[k], b[k]), k
        assert not cuda.array_equal(a[k], c[k]), k
    keep = float(a["drop_gen"].astype(bool).mean())
    assert abs(keep - (1 - cfg.dropout_rate)) < 0.02


def test_ops_refuse_float64_and_strided_device_arrays(cuda):
    T, B, H = 3, 4, 5
    xproj = cuda.zeros((T, B, 3 * H), np.float32)
    W_hh, h0 = cuda.zeros((3 * H, H), np.float32), cuda.zeros((B, H), np.float32)
    with pytest.raises(ValueError, match=r"h0 must be \[4, 5\] float32, got \(4, 5\) float64"):
        ops.gru_forward(xproj, 0, W_hh, h0.astype(np.float64))
    with pytest.raises(ValueError, match="W_hh must be .* C-contiguous"):
        ops.gru_forward(xproj, 0, cuda.zeros((H, 3 * H), np.float32).T, h0)


def test_training_on_the_gpu_reaches_the_cpu_loss(cuda, tmp_path):
    ds = synth.chaotic_rnn(n_conditions=32, trials_per_condition=5, train_per_condition=4,
                           n_bins=50, max_firing_rate=60.0).to_dataset()
    cfg = config_for_data(ds, ic_enc_dim=64, ci_enc_dim=32, con_dim=32, co_dim=2, ic_dim=32,
                          gen_dim=64, fac_dim=16, dropout_rate=0.1)
    # 128 train trials in batches of 16: 8 steps per epoch, 320 steps in all.
    tc = dict(batch_size=16, max_epochs=40, lr_init=5e-3, kl_increase_epoch=10,
              l2_increase_epoch=10, lr_patience=100, es_patience=100)

    def final(seed, device):
        t = Trainer(LFADS(cfg, seed=0), ds, TrainConfig(**tc, seed=seed), tmp_path / f"{device}{seed}",
                    progress=False, device=device)
        t.fit()
        return t, float(np.mean([row["valid_recon"] for row in t.history[-5:]]))

    _, cpu0 = final(0, "cpu")
    _, cpu1 = final(1, "cpu")
    trainer, gpu = final(0, "cuda")
    spread = abs(cpu0 - cpu1)
    assert abs(gpu - cpu0) <= 3 * spread + 0.01 * cpu0, (
        f"GPU valid_recon {gpu:.5f}, CPU {cpu0:.5f} (seed-to-seed spread on the CPU {spread:.5f})")
    # The checkpoints were written from the device and load anywhere.
    np.testing.assert_array_equal(load_checkpoint(trainer.last_checkpoint).flat,
                                  ops.to_host(trainer.model.flat))
    assert load_model(trainer.best_checkpoint).device == "cpu"
