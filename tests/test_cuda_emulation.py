"""The GPU code path of the Python layer, run on the CPU against an emulation of CuPy and of
the CUDA bindings.

GPU machines are lent rarely and briefly, so what can be checked without one is checked here:
the model, the trainer, posterior sampling, refinement and fixed points running on "cuda"
go through the same ops adapters (_CudaOps: sizes, workspaces, streams, the weight-gradient
GEMMs of weight_grads.py) as on a GPU, and call bindings whose argument names, order and
keyword-only split are those of the compiled lfads_fast._cuda (compared with its signatures
when it is built). The emulated device is numpy memory behind a CuPy-like array type; the
emulated kernels are the float32 NumPy references of the CUDA contracts (cuda_reference.py)
and the CPU GRU kernel. What this cannot check is the CUDA kernels themselves: test_cuda.py
and test_gpu_model.py do that on a GPU.
"""
from __future__ import annotations

import contextlib
import inspect
import re
import sys
import types

import numpy as np
import pytest

import cuda_reference as ref
from lfads_fast import LFADS, LFADSConfig, _backend, fixed_points, ops, posterior, refine, synth
from lfads_fast._backend import cpu
from lfads_fast.train import Trainer, TrainConfig, config_for_data, load_checkpoint, load_model

# The emulated kernels are NumPy float32 references, not the CPU kernels: the same math with
# sums in another order, so float32 rounding apart (through T steps of two recurrences).
RTOL = 2e-4

CFG = dict(encod_data_dim=13, recon_data_dim=17, encod_seq_len=9, recon_seq_len=11, ic_enc_dim=10,
           ci_enc_dim=7, con_dim=5, co_dim=3, ic_dim=6, gen_dim=12, fac_dim=9, ext_input_dim=2,
           dropout_rate=0.1, cd_rate=0.2, l2_gen_scale=1e-3, l2_con_scale=1e-3)


# ---------------------------------------------------------------------------- emulated CuPy


class ndarray(np.ndarray):  # noqa: N801 - CuPy's name, which ops recognises by module
    """numpy memory posing as device memory."""

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ctypes.data, False),
                "strides": None if self.flags.c_contiguous else self.strides, "version": 3}

    @property
    def device(self):
        return types.SimpleNamespace(id=0)

    def get(self):
        return np.array(self)


ndarray.__module__ = "cupy"


def _dev(x):
    """A result of numpy as an emulated device array (0-d for scalars, as CuPy)."""
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x).view(ndarray)
    return x


class _Generator:
    def __init__(self, seed):
        self._rng = np.random.default_rng(seed)

    def standard_normal(self, size, dtype=np.float64):
        return _dev(self._rng.standard_normal(size, dtype=dtype))

    def random(self, size, dtype=np.float64):
        return _dev(self._rng.random(size, dtype=dtype))


def make_cupy():
    cp = types.ModuleType("cupy")
    cp.ndarray = ndarray
    cp.__version__ = "emulated"

    def asarray(a, dtype=None):
        if isinstance(a, ndarray) and (dtype is None or a.dtype == dtype):
            return a
        return _dev(np.array(a, dtype=dtype))  # a copy: device memory is not host memory

    def wrap(name):
        f = getattr(np, name)
        return lambda *args, **kwargs: _dev(f(*args, **kwargs))

    cp.asarray = asarray
    cp.__getattr__ = lambda name: wrap(name)
    cp.linalg = types.SimpleNamespace(norm=wrap_linalg_norm)
    cp.random = types.SimpleNamespace(default_rng=_Generator)
    cp.cuda = types.SimpleNamespace(
        Device=lambda i=0: contextlib.nullcontext(),
        get_current_stream=lambda: types.SimpleNamespace(ptr=0),
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDevice=lambda: 0))
    return cp


def wrap_linalg_norm(*args, **kwargs):
    return _dev(np.linalg.norm(*args, **kwargs))


# ---------------------------------------------------------------------------- emulated bindings


def _host(a, name, dtype=np.float32):
    """The numpy view of an emulated device array, checked as the bindings check."""
    if a is None:
        return None
    assert isinstance(a, ndarray), f"{name}: {type(a).__name__} passed where a device array goes"
    assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
    assert a.flags.c_contiguous, f"{name}: not C-contiguous"
    return np.asarray(a)


def _put(dst, value, name):
    if dst is not None and dst.size:
        np.asarray(dst)[...] = value


DEC_IN = ["xcon", "W_con_f", "W_con_hh", "c0", "W_co", "b_co", "eps", "mask_f", "xgen", "W_gen_u",
          "W_gen_hh", "g0", "f0", "W_fac", "mask_g"]
DEC_OUT = ["con_states", "con_gates", "co_mean", "co_logvar", "u", "gen_states", "gen_gates", "factors"]


class FakeCuda:
    """The functions of lfads_fast._cuda, with its argument names, emulated in NumPy."""

    calls: list

    def __init__(self):
        self.calls = []

    def device_count(self):
        return 1

    def gru_forward_workspace_size(self, H):
        return 64

    def decoder_forward_workspace_size(self, C, U, G, F):
        return 64

    def poisson_elbo_workspace_size(self, T, B, N):
        return 64

    def kl_ic_workspace_size(self, B, D):
        return 64

    def kl_co_workspace_size(self, B, U):
        return 64

    def adam_workspace_size(self, n):
        return 64

    def gru_forward(self, xproj, x_offset, W_hh, h0, hs, gates, reverse, clip, *, T, B, H, ldx,
                    workspace, workspace_bytes, stream):
        self.calls.append("gru_forward")
        assert xproj.shape == (T, B, ldx) and W_hh.shape == (3 * H, H)
        cpu.gru_forward(_host(xproj, "xproj"), x_offset, _host(W_hh, "W_hh"), _host(h0, "h0"),
                        _host(hs, "hs"), _host(gates, "gates"), reverse, clip)

    def gru_backward(self, W_hh, h0, hs, gates, d_hs, d_hT, d_xproj, x_offset, d_h0, work, reverse,
                     clip, *, T, B, H, ldx, stream):
        self.calls.append("gru_backward")
        d_W = np.empty((3 * H, H), np.float32)
        cpu.gru_backward(_host(W_hh, "W_hh"), _host(h0, "h0"), _host(hs, "hs"), _host(gates, "gates"),
                         _host(d_hs, "d_hs"), _host(d_hT, "d_hT"), _host(d_xproj, "d_xproj"), x_offset,
                         d_W, _host(d_h0, "d_h0"), _host(work, "work"), reverse, clip)

    def decoder_forward(self, xcon, W_con_f, W_con_hh, c0, W_co, b_co, eps, mask_f, xgen, W_gen_u,
                        W_gen_hh, g0, f0, W_fac, mask_g, con_states, con_gates, co_mean, co_logvar, u,
                        gen_states, gen_gates, factors, *, T, B, C, U, G, F, ld_xc, ld_xg, clip,
                        sample, workspace, workspace_bytes, stream):
        self.calls.append("decoder_forward")
        args = locals()
        a = {k: _host(args[k], k) for k in DEC_IN}
        o = ref.decoder_forward(a, T, B, C, U, G, F, clip, sample)
        for k in DEC_OUT:
            if k in o:
                _put(args[k], o[k], k)

    def decoder_backward(self, xcon, W_con_f, W_con_hh, c0, W_co, b_co, eps, mask_f, xgen, W_gen_u,
                         W_gen_hh, g0, f0, W_fac, mask_g, con_states, con_gates, co_mean, co_logvar, u,
                         gen_states, gen_gates, factors, d_factors, d_co_mean, d_co_logvar, d_xcon,
                         d_c0, d_xgen, d_g0, d_f0, d_factors_total, d_co, rh_gen, rh_con, *, T, B, C,
                         U, G, F, ld_xc, ld_xg, clip, sample, stream):
        self.calls.append("decoder_backward")
        args = locals()
        a = {k: _host(args[k], k) for k in DEC_IN}
        o = {k: _host(args[k], k) for k in DEC_OUT}
        r = ref.decoder_backward(a, o, T, B, C, U, G, F, clip, sample,
                                 d_factors=_host(d_factors, "d_factors"),
                                 d_co_mean=_host(d_co_mean, "d_co_mean"),
                                 d_co_logvar=_host(d_co_logvar, "d_co_logvar"))
        np.asarray(d_xgen)[..., : 3 * G] = r["d_xgen"]
        if C:
            np.asarray(d_xcon)[..., : 3 * C] = r["d_xcon"]
        for k in ("d_c0", "d_g0", "d_f0", "d_factors_total", "d_co", "rh_gen", "rh_con"):
            if k in r:
                _put(args[k], r[k], k)

    def poisson_elbo(self, factors, W_ro, b_ro, counts, loss_weight, grad_mask, scale, loss,
                     log_rates, nll_tn, d_log_rates, d_b_ro, *, T, B, F, N, workspace,
                     workspace_bytes, stream):
        self.calls.append("poisson_elbo")
        assert factors.shape == (T * B, F) and counts.shape == (T * B, N)
        out = ref.poisson_elbo(_host(factors, "factors"), _host(W_ro, "W_ro"), _host(b_ro, "b_ro"),
                               _host(counts, "counts"), _host(loss_weight, "loss_weight"),
                               _host(grad_mask, "grad_mask"), np.float32(scale), T, B)
        for dst, v, k in zip((loss, log_rates, nll_tn, d_log_rates, d_b_ro), out,
                             ("loss", "log_rates", "nll_tn", "d_log_rates", "d_b_ro")):
            _put(dst, v, k)

    def kl_ic(self, mean, logvar, prior_mean, prior_logvar, var_min, scale, kl, d_mean, d_logvar,
              d_prior_mean, *, B, D, workspace, workspace_bytes, stream):
        self.calls.append("kl_ic")
        out = ref.kl_ic(_host(mean, "mean"), _host(logvar, "logvar"), _host(prior_mean, "prior_mean"),
                        _host(prior_logvar, "prior_logvar"), np.float32(var_min), np.float32(scale))
        for dst, v in zip((kl, d_mean, d_logvar, d_prior_mean), out):
            _put(dst, v, "kl_ic")

    def kl_co(self, mean, logvar, eps, logtau, lognvar, scale, kl, d_mean, d_logvar, d_logtau,
              d_lognvar, *, T, B, U, workspace, workspace_bytes, stream):
        self.calls.append("kl_co")
        out = ref.kl_co(_host(mean, "mean"), _host(logvar, "logvar"), _host(eps, "eps"),
                        _host(logtau, "logtau"), _host(lognvar, "lognvar"), np.float32(scale))
        for dst, v in zip((kl, d_mean, d_logvar, d_logtau, d_lognvar), out):
            _put(dst, v, "kl_co")

    def adam_step(self, params, grads, m, v, mask, lr, beta1, beta2, eps, weight_decay,
                  max_grad_norm, step, grad_norm, *, n, workspace, workspace_bytes, stream):
        self.calls.append("adam_step")
        p1, m1, v1, norm = ref.adam_step(_host(params, "params"), _host(grads, "grads"), _host(m, "m"),
                                         _host(v, "v"), _host(mask, "mask", np.uint8), lr, beta1,
                                         beta2, eps, weight_decay, max_grad_norm, step)
        for dst, val in ((params, p1), (m, m1), (v, v1), (grad_norm, norm)):
            _put(dst, val, "adam")


def _signature(doc: str):
    """(positional names, keyword-only names) from a pybind11 docstring's first line."""
    head = doc.strip().splitlines()[0]
    params = head[head.index("(") + 1 : head.rindex(")")]
    names, kw_only, star = [], [], False
    for part in re.split(r",\s*(?![^\[]*\])", params):
        part = part.strip()
        if part == "*":
            star = True
            continue
        (kw_only if star else names).append(part.split(":")[0].strip())
    return names, kw_only


@pytest.fixture
def emulated(monkeypatch):
    """CuPy and lfads_fast._cuda emulated for this test; ops' adapter state reset."""
    monkeypatch.setitem(sys.modules, "cupy", make_cupy())
    fake = FakeCuda()
    monkeypatch.setattr(_backend, "_cuda_module", fake)
    monkeypatch.setattr(_backend, "_cuda_error", None)
    monkeypatch.setattr(ops, "_CUDA_OPS", None)
    return fake


# ---------------------------------------------------------------------------- tests


def test_emulated_bindings_have_the_signatures_of_the_compiled_ones():
    try:
        real = _backend.cuda()
    except RuntimeError as e:
        pytest.skip(f"no CUDA build to compare with: {e}")
    for name, f in inspect.getmembers(FakeCuda, inspect.isfunction):
        if name.startswith("_") or name == "device_count":
            continue
        sig = inspect.signature(f)
        pos = [p.name for p in sig.parameters.values()
               if p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "self"]
        kw = [p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY]
        assert (pos, kw) == _signature(getattr(real, name).__doc__), name


def test_cuda_is_refused_cleanly_without_it():
    if ops.cuda_available()[0]:
        pytest.skip("CUDA runs here")
    with pytest.raises(ValueError, match="not available"):
        ops.check_device("cuda")


@pytest.mark.parametrize("causal", [{}, dict(ic_enc_seq_len=3, ci_enc_causal=True, ci_lag=2)],
                         ids=["bidirectional", "causal"])
def test_one_step_on_the_emulated_device_matches_the_cpu(emulated, causal):
    cfg = LFADSConfig(**CFG, **causal)
    host = LFADS(cfg, seed=3)
    dev = LFADS(cfg, seed=3, device="cuda")
    assert dev.device == "cuda:0" and isinstance(dev.flat, ndarray)
    np.testing.assert_array_equal(dev.flat.get(), host.flat)
    rng = np.random.default_rng(0)
    encod = rng.poisson(0.8, (6, 9, 13)).astype(np.float32)
    recon = rng.poisson(0.8, (6, 11, 17)).astype(np.float32)
    recon[:, :9, :13] = encod
    recon[0, 3, 4] = np.nan
    ext = rng.standard_normal((6, 11, 2)).astype(np.float32)
    noise = host.draw_noise(host.make_batch(encod, recon, ext), np.random.default_rng(1))
    results = []
    for m in (host, dev):
        batch = m.make_batch(encod, recon, ext)
        terms, grad = m.loss_and_grads(batch, noise, kl_ramp=0.5, l2_ramp=0.8)
        results.append(({k: float(v) for k, v in terms.items()}, ops.to_host(grad)))
    assert isinstance(grad, ndarray) and isinstance(terms["loss"], ndarray)
    for k, v in results[0][0].items():
        assert results[1][0][k] == pytest.approx(v, rel=RTOL, abs=1e-7), k
    g_host, g_dev = host.views(results[0][1]), host.views(results[1][1])
    for name in g_host:
        err = np.linalg.norm(g_dev[name] - g_host[name]) / max(np.linalg.norm(g_host[name]), 1e-12)
        assert err < RTOL, f"d_{name}: relative error {err:.2e}"
    for op in ("gru_forward", "gru_backward", "decoder_forward", "decoder_backward", "poisson_elbo",
               "kl_ic", "kl_co"):
        assert op in emulated.calls, f"{op} was not reached through ops"
    noise_dev = dev.draw_noise(dev.make_batch(encod, recon, ext), np.random.default_rng(1))
    assert all(isinstance(v, ndarray) for v in noise_dev.values()), "noise drawn on the host"


def test_training_and_analyses_on_the_emulated_device(emulated, tmp_path):
    ds = synth.chaotic_rnn(n_conditions=4, trials_per_condition=3, train_per_condition=2,
                           n_bins=10).to_dataset()
    cfg = config_for_data(ds, ic_enc_dim=6, ci_enc_dim=4, con_dim=4, co_dim=2, ic_dim=3, gen_dim=7,
                          fac_dim=3, dropout_rate=0.1)
    trainer = Trainer(LFADS(cfg, seed=0), ds, TrainConfig(batch_size=4, max_epochs=3), tmp_path,
                      progress=False, device="cuda")
    result = trainer.fit()
    assert result.epochs == 3 and trainer.model.device == "cuda:0"
    assert isinstance(trainer.adam_m, ndarray) and "adam_step" in emulated.calls
    assert all(np.isfinite(row["train_loss"]) and type(row["train_loss"]) is float
               for row in trainer.history)
    # Checkpoints hold host arrays; they load on the CPU and resume on the device.
    ckpt = load_checkpoint(trainer.last_checkpoint)
    assert type(ckpt.flat) is np.ndarray
    np.testing.assert_array_equal(ckpt.flat, trainer.model.flat.get())
    again = Trainer(LFADS(cfg, seed=0), ds, TrainConfig(batch_size=4, max_epochs=4), tmp_path,
                    progress=False, device="cuda")
    again.fit(resume=True)
    assert again.epoch == 4
    model = load_model(trainer.best_checkpoint).to("cuda")
    valid = ds.valid.encod_data
    out = posterior.sample_and_average(model, valid, n_samples=3, seed=0)
    assert type(out["output_params"]) is np.ndarray and np.isfinite(out["output_params"]).all()
    host = load_model(trainer.best_checkpoint)
    ref_out = posterior.sample_and_average(host, valid, n_samples=3, seed=0)
    np.testing.assert_allclose(out["output_params"], ref_out["output_params"], rtol=1e-3)
    refined = refine.refine_ic(model, valid, steps=3)
    assert type(refined["ic"]) is np.ndarray and np.isfinite(refined["objective"]).all()
    fps = fixed_points.find(model, valid, n_init=20, seed=0)
    assert fps.trajectories.shape == (valid.shape[0], cfg.recon_seq_len, cfg.gen_dim)


def test_export_of_a_model_on_the_device(emulated, tmp_path):
    pytest.importorskip("safetensors")
    from lfads_fast.export import export_model, read_export

    cfg = LFADSConfig(**dict(CFG, ext_input_dim=0, ic_enc_seq_len=3, ci_enc_causal=True))
    export_model(LFADS(cfg, seed=3, device="cuda"), tmp_path / "m.safetensors")
    back, _ = read_export(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(back.flat, LFADS(cfg, seed=3).flat)
