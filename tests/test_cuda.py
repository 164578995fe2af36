"""CUDA kernels (lfads_fast._cuda) against float64 references.

GPU tests (marker ``gpu``) skip cleanly when cupy, a driver or a device is missing. Each draws
fresh random inputs (the seed is in every failure message), poisons every output with NaN before
the run and checks that all of it was written, and holds the float32 GPU result to

    err(GPU float32) <= GPU_VS_CPU32 * err(CPU float32) + floor,

both errors ||x - ref|| / ||ref|| against the float64 result. The GRU's references are the CPU
kernels (lfads_fast._cpu in float64 and float32); the decoder's, ELBO's and Adam's are the NumPy
versions of their header contracts in cuda_reference.py, whose float64 gradients the CPU-only
tests at the end check against finite differences.
"""
from __future__ import annotations

import os
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

import cuda_reference as ref
from lfads_fast import weight_grads as wg
from lfads_fast._backend import cpu, cuda

# Flash-attention's rule: the float32 GPU kernel may be at most twice as far from float64 as the
# float32 CPU kernel is.
GPU_VS_CPU32 = 2.0
# Floors for outputs whose CPU float32 error happens to be near zero. Element-wise ops: about
# 8 float32 ulps (a different but equally valid order of a few operations, e.g. in Adam's
# update). Recurrences and products: sums of up to 3H = 768 products in another order than
# BLAS, carried through up to T steps.
FLOOR_ELEMENTWISE = 1e-6
FLOOR_RECURRENT = 1e-5
# Finite differences of the float64 references: central differences with step FD_STEP have
# truncation error ~ FD_STEP^2 and rounding error ~ 1e-16 / FD_STEP.
FD_STEP = 1e-6
FD_RTOL = 1e-6
CLIP = 5.0


def fresh_rng():
    # A seed per test, the same on every run (failures reproduce; see conftest's rng).
    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0].encode())
    return np.random.default_rng(seed), seed


def rel_err(x, r):
    x = np.asarray(x, np.float64)
    r = np.asarray(r, np.float64)
    den = np.linalg.norm(r)
    return np.linalg.norm(x - r) / (den if den > 0 else 1.0)


def check(name, got, r64, r32, floor, ctx):
    got = np.asarray(got, np.float64)
    r64 = np.asarray(r64, np.float64)
    assert got.shape == r64.shape, f"{name}: shape {got.shape}, expected {r64.shape} ({ctx})"
    bad = np.size(got) - np.count_nonzero(np.isfinite(got))
    assert bad == 0, (
        f"{name}: {bad} non-finite values: unwritten outputs keep the NaN poison ({ctx})")
    e_gpu, e_cpu = rel_err(got, r64), rel_err(r32, r64)
    assert e_gpu <= GPU_VS_CPU32 * e_cpu + floor, (
        f"{name}: GPU float32 error {e_gpu:.3e} > {GPU_VS_CPU32} x CPU float32 error "
        f"{e_cpu:.3e} + {floor:.0e} ({ctx})")


# ---------------------------------------------------------------------------- GPU fixtures


@pytest.fixture(scope="module")
def gpu():
    """cupy, the _cuda module and a non-blocking stream; skips without a usable device."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except Exception as e:  # no driver: cupy raises its own runtime error type
        pytest.skip(f"no CUDA device ({e})")
    try:
        mod = cuda()
    except RuntimeError as e:
        pytest.skip(str(e))
    if mod.device_count() == 0:
        pytest.skip("lfads_fast._cuda sees no CUDA device")
    return SimpleNamespace(cp=cupy, mod=mod, stream=cupy.cuda.Stream(non_blocking=True))


def to_dev(g, x):
    return None if x is None else g.cp.asarray(np.asarray(x, np.float32))


def poisoned(g, shape, dtype=np.float32):
    return g.cp.full(shape, np.nan, dtype)


def workspace(g, nbytes):
    return g.cp.empty(max(int(nbytes), 16), np.uint8)


def host(g, a):
    g.stream.synchronize()
    return None if a is None else a.get()


@pytest.fixture
def tile(request, monkeypatch):
    """Forces the persistent kernels' batch tile (LFADS_FAST_CUDA_TILE) when a test asks."""
    value = getattr(request, "param", None)
    if value:
        monkeypatch.setenv("LFADS_FAST_CUDA_TILE", str(value))
    else:
        monkeypatch.delenv("LFADS_FAST_CUDA_TILE", raising=False)
    return value


# ---------------------------------------------------------------------------- GRU


def gru_inputs(rng, T, B, H, LD):
    return dict(
        xproj=rng.standard_normal((T, B, LD)),
        W_hh=rng.standard_normal((3 * H, H)) / np.sqrt(H),
        h0=rng.standard_normal((B, H)),
        d_hs=rng.standard_normal((T, B, H)),
        d_hT=rng.standard_normal((B, H)),
    )


def gru_cpu(x, dt, off, reverse, clip):
    a = {k: v.astype(dt) for k, v in x.items()}
    T, B, LD = a["xproj"].shape
    H = a["h0"].shape[1]
    hs, gates = np.zeros((T, B, H), dt), np.zeros((T, B, 3 * H), dt)
    cpu.gru_forward(a["xproj"], off, a["W_hh"], a["h0"], hs, gates, reverse, clip)
    d_x, d_W = np.zeros((T, B, LD), dt), np.zeros((3 * H, H), dt)
    d_h0, work = np.zeros((B, H), dt), np.zeros((T, B, H), dt)
    cpu.gru_backward(a["W_hh"], a["h0"], hs, gates, a["d_hs"], a["d_hT"], d_x, off, d_W, d_h0,
                     work, reverse, clip)
    return dict(hs=hs, gates=gates, d_x=d_x[..., off : off + 3 * H], d_W_hh=d_W, d_h0=d_h0,
                work=work)


def gru_gpu(g, x, off, reverse, clip):
    m = g.mod
    T, B, LD = x["xproj"].shape
    H = x["h0"].shape[1]
    with g.stream:
        a = {k: to_dev(g, v) for k, v in x.items()}
        hs, gates = poisoned(g, (T, B, H)), poisoned(g, (T, B, 3 * H))
        nbytes = m.gru_forward_workspace_size(H)
        ws = workspace(g, nbytes)
        m.gru_forward(a["xproj"], off, a["W_hh"], a["h0"], hs, gates,
                      reverse, clip, T=T, B=B, H=H, ldx=LD, workspace=ws,
                      workspace_bytes=nbytes, stream=g.stream.ptr)
        d_x, d_h0, work = poisoned(g, (T, B, LD)), poisoned(g, (B, H)), poisoned(g, (T, B, H))
        m.gru_backward(a["W_hh"], a["h0"], hs, gates, a["d_hs"],
                       a["d_hT"], d_x, off, d_h0, work, reverse, clip, T=T,
                       B=B, H=H, ldx=LD, stream=g.stream.ptr)
        d_W = wg.gru_weight_grad(d_x[..., off:], hs, a["h0"], work, reverse)
        d_x_host = host(g, d_x)
        out = dict(hs=host(g, hs), gates=host(g, gates), d_x=d_x_host[..., off : off + 3 * H],
                   d_W_hh=host(g, d_W), d_h0=host(g, d_h0), work=host(g, work))
    # Columns outside the GRU's 3H must be left alone (other GRUs may share the buffer).
    assert np.isnan(d_x_host[..., :off]).all() and np.isnan(d_x_host[..., off + 3 * H :]).all()
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("T,B,H", [(1, 1, 1), (1, 1, 7), (5, 3, 33), (9, 13, 100), (3, 37, 256)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("clip", [CLIP, 0.8])
def test_gru_matches_cpu(gpu, tile, T, B, H, reverse, clip):
    rng, seed = fresh_rng()
    off = 2
    x = gru_inputs(rng, T, B, H, 3 * H + 5)
    r64 = gru_cpu(x, np.float64, off, reverse, clip)
    r32 = gru_cpu(x, np.float32, off, reverse, clip)
    got = gru_gpu(gpu, x, off, reverse, clip)
    ctx = f"T={T} B={B} H={H} reverse={reverse} clip={clip} seed={seed}"
    for k in r64:
        check(f"gru {k}", got[k], r64[k], r32[k], FLOOR_RECURRENT, ctx)


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [1, 2, 4, 8], indirect=True)
def test_gru_every_tile(gpu, tile):
    rng, seed = fresh_rng()
    T, B, H = 6, 21, 50
    x = gru_inputs(rng, T, B, H, 3 * H)
    r64, r32 = gru_cpu(x, np.float64, 0, False, CLIP), gru_cpu(x, np.float32, 0, False, CLIP)
    got = gru_gpu(gpu, x, 0, False, CLIP)
    for k in r64:
        check(f"gru {k}", got[k], r64[k], r32[k], FLOOR_RECURRENT, f"tile={tile} seed={seed}")


# ---------------------------------------------------------------------------- decoder

DECODER_SIZES = {  # T, B, C, U, G, F
    "tiny": (1, 1, 3, 1, 5, 2),
    "no_controller": (6, 5, 0, 0, 33, 7),
    "odd": (7, 19, 17, 3, 40, 9),
    "nlb": (5, 150, 80, 4, 100, 40),  # weights over the shared-memory limit: some read from L2
    "wide": (3, 9, 128, 4, 256, 40),  # W_gen_hh alone over the limit
}


def decoder_inputs(rng, T, B, C, U, G, F, masks, extra_cols=3):
    def drop(shape):
        return (rng.random(shape) > 0.3) / 0.7

    a = dict(
        xgen=rng.standard_normal((T, B, 3 * G + extra_cols)),
        W_gen_hh=rng.standard_normal((3 * G, G)) / np.sqrt(G),
        g0=rng.standard_normal((B, G)),
        f0=rng.standard_normal((B, F)),
        W_fac=rng.standard_normal((F, G)) / np.sqrt(G),
        mask_g=drop((T, B, G)) if masks else None,
    )
    if C:
        a.update(
            xcon=rng.standard_normal((T, B, 3 * C + extra_cols)),
            W_con_f=rng.standard_normal((3 * C, F)) / np.sqrt(F),
            W_con_hh=rng.standard_normal((3 * C, C)) / np.sqrt(C),
            c0=rng.standard_normal((B, C)),
            W_co=rng.standard_normal((2 * U, C)) / np.sqrt(C),
            b_co=rng.standard_normal(2 * U) * 0.3,
            eps=rng.standard_normal((T, B, U)),
            mask_f=drop((T, B, F)) if masks else None,
            W_gen_u=rng.standard_normal((3 * G, U)) / np.sqrt(U),
        )
    d_in = dict(d_factors=rng.standard_normal((T, B, F)))
    if C:
        d_in.update(d_co_mean=rng.standard_normal((T, B, U)),
                    d_co_logvar=rng.standard_normal((T, B, U)))
    return a, d_in


def decoder_reference(a, d_in, size, sample, dt):
    T, B, C, U, G, F = size
    a = {k: (None if v is None else v.astype(dt)) for k, v in a.items()}
    d_in = {k: v.astype(dt) for k, v in d_in.items()}
    o = ref.decoder_forward(a, T, B, C, U, G, F, CLIP, sample)
    r = ref.decoder_backward(a, o, T, B, C, U, G, F, CLIP, sample, **d_in)
    grads = wg.decoder_weight_grads(
        d_xgen=r["d_xgen"], d_factors_total=r["d_factors_total"], rh_gen=r["rh_gen"],
        gen_states=o["gen_states"], g0=a["g0"], mask_g=a["mask_g"],
        **(dict(d_xcon=r["d_xcon"], d_co=r["d_co"], rh_con=r["rh_con"],
                con_states=o["con_states"], c0=a["c0"], u=o["u"], factors=o["factors"],
                f0=a["f0"], mask_f=a["mask_f"]) if C else {}))
    return {**o, **r, **grads}


FWD_ARRAYS = ["xcon", "W_con_f", "W_con_hh", "c0", "W_co", "b_co", "eps", "mask_f", "xgen",
              "W_gen_u", "W_gen_hh", "g0", "f0", "W_fac", "mask_g", "con_states", "con_gates",
              "co_mean", "co_logvar", "u", "gen_states", "gen_gates", "factors"]


def decoder_gpu(g, a, d_in, size, sample):
    m = g.mod
    T, B, C, U, G, F = size
    ld_xc = a["xcon"].shape[2] if C else 0
    ld_xg = a["xgen"].shape[2]
    kw = dict(T=T, B=B, C=C, U=U, G=G, F=F, ld_xc=ld_xc, ld_xg=ld_xg, clip=CLIP, sample=sample)
    with g.stream:
        d = {k: to_dev(g, a.get(k)) for k in FWD_ARRAYS if k in a}
        outs = dict(gen_states=(T, B, G), gen_gates=(T, B, 3 * G), factors=(T, B, F))
        if C:
            outs.update(con_states=(T, B, C), con_gates=(T, B, 3 * C), co_mean=(T, B, U),
                        co_logvar=(T, B, U), u=(T, B, U))
        for k, shape in outs.items():
            d[k] = poisoned(g, shape)
        nbytes = m.decoder_forward_workspace_size(C, U, G, F)
        ws = workspace(g, nbytes)
        m.decoder_forward(*[d.get(k) for k in FWD_ARRAYS], workspace=ws,
                          workspace_bytes=nbytes, stream=g.stream.ptr, **kw)
        di = {k: to_dev(g, v) for k, v in d_in.items()}
        bo = dict(d_xgen=poisoned(g, (T, B, ld_xg)), d_g0=poisoned(g, (B, G)),
                  d_f0=poisoned(g, (B, F)), d_factors_total=poisoned(g, (T, B, F)),
                  rh_gen=poisoned(g, (T, B, G)))
        if C:
            bo.update(d_xcon=poisoned(g, (T, B, ld_xc)), d_c0=poisoned(g, (B, C)),
                      d_co=poisoned(g, (T, B, 2 * U)), rh_con=poisoned(g, (T, B, C)))
        m.decoder_backward(
            *[d.get(k) for k in FWD_ARRAYS], di.get("d_factors"),
            di.get("d_co_mean"), di.get("d_co_logvar"), bo.get("d_xcon"),
            bo.get("d_c0"), bo["d_xgen"], bo["d_g0"], bo["d_f0"],
            bo["d_factors_total"], bo.get("d_co"), bo["rh_gen"],
            bo.get("rh_con"), stream=g.stream.ptr, **kw)
        grads = wg.decoder_weight_grads(
            d_xgen=bo["d_xgen"], d_factors_total=bo["d_factors_total"], rh_gen=bo["rh_gen"],
            gen_states=d["gen_states"], g0=d["g0"], mask_g=d.get("mask_g"),
            **(dict(d_xcon=bo["d_xcon"], d_co=bo["d_co"], rh_con=bo["rh_con"],
                    con_states=d["con_states"], c0=d["c0"], u=d["u"], factors=d["factors"],
                    f0=d["f0"], mask_f=d.get("mask_f")) if C else {}))
        res = {k: host(g, v) for k, v in {**{k: d[k] for k in outs}, **bo, **grads}.items()}
    # Only the first 3C / 3G columns of d_xcon / d_xgen are the op's; the rest stay untouched.
    for k, w in (("d_xgen", 3 * G), ("d_xcon", 3 * C)):
        if k in res:
            assert np.isnan(res[k][..., w:]).all(), f"{k}: columns past {w} were written"
            res[k] = res[k][..., :w]
    return res


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(DECODER_SIZES))
@pytest.mark.parametrize("sample,masks", [(True, True), (False, False)])
def test_decoder_matches_reference(gpu, tile, name, sample, masks):
    size = DECODER_SIZES[name]
    rng, seed = fresh_rng()
    a, d_in = decoder_inputs(rng, *size, masks)
    r64 = decoder_reference(a, d_in, size, sample, np.float64)
    r32 = decoder_reference(a, d_in, size, sample, np.float32)
    got = decoder_gpu(gpu, a, d_in, size, sample)
    ctx = f"{name} {size} sample={sample} masks={masks} seed={seed}"
    for k in got:
        check(f"decoder {k}", got[k], r64[k], r32[k], FLOOR_RECURRENT, ctx)


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [1, 2, 4, 8], indirect=True)
def test_decoder_every_tile(gpu, tile):
    size = DECODER_SIZES["odd"]
    rng, seed = fresh_rng()
    a, d_in = decoder_inputs(rng, *size, True)
    r64 = decoder_reference(a, d_in, size, True, np.float64)
    r32 = decoder_reference(a, d_in, size, True, np.float32)
    got = decoder_gpu(gpu, a, d_in, size, True)
    for k in got:
        check(f"decoder {k}", got[k], r64[k], r32[k], FLOOR_RECURRENT, f"tile={tile} seed={seed}")


# ---------------------------------------------------------------------------- ELBO


def elbo_inputs(rng, T, B, F, N, weights):
    counts = rng.poisson(2.0, (T * B, N)).astype(np.float64)
    counts[rng.random(counts.shape) < 0.1] = np.nan  # missing bins
    return dict(
        factors=rng.standard_normal((T * B, F)),
        W_ro=rng.standard_normal((N, F)) / np.sqrt(F),
        b_ro=rng.standard_normal(N) * 0.5,
        counts=counts,
        loss_weight=rng.random((T * B, N)) if weights else None,
        grad_mask=(rng.random((T * B, N)) > 0.3).astype(np.float64) if weights else None,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("T,B,F,N", [(1, 1, 1, 1), (3, 5, 7, 70), (2, 40, 45, 65),
                                     (4, 33, 40, 182)])
@pytest.mark.parametrize("weights", [False, True])
def test_poisson_elbo_matches_reference(gpu, T, B, F, N, weights):
    rng, seed = fresh_rng()
    x = elbo_inputs(rng, T, B, F, N, weights)
    scale = 1.0 / (T * B * N)

    def run_ref(dt):
        a = {k: (None if v is None else v.astype(dt)) for k, v in x.items()}
        loss, lr, nll_tn, d_lr, d_b = ref.poisson_elbo(**a, scale=dt(scale), T=T, B=B)
        d_f, d_W = wg.readout_grads(d_lr, a["factors"], a["W_ro"])
        return dict(loss=np.array([loss]), log_rates=lr, nll_tn=nll_tn, d_log_rates=d_lr,
                    d_b_ro=d_b, d_factors=d_f, d_W_ro=d_W)

    r64, r32 = run_ref(np.float64), run_ref(np.float32)
    g, m = gpu, gpu.mod
    R = T * B
    with g.stream:
        a = {k: to_dev(g, v) for k, v in x.items()}
        out = dict(loss=poisoned(g, (1,)), log_rates=poisoned(g, (R, N)),
                   nll_tn=poisoned(g, (T, N)), d_log_rates=poisoned(g, (R, N)),
                   d_b_ro=poisoned(g, (N,)))
        nbytes = m.poisson_elbo_workspace_size(T, B, N)
        ws = workspace(g, nbytes)
        m.poisson_elbo(*[a[k] for k in ("factors", "W_ro", "b_ro", "counts",
                                             "loss_weight", "grad_mask")], scale,
                       *[out[k] for k in ("loss", "log_rates", "nll_tn", "d_log_rates",
                                               "d_b_ro")],
                       T=T, B=B, F=F, N=N, workspace=ws, workspace_bytes=nbytes,
                       stream=g.stream.ptr)
        out["d_factors"], out["d_W_ro"] = wg.readout_grads(out["d_log_rates"], a["factors"],
                                                           a["W_ro"])
        got = {k: host(g, v) for k, v in out.items()}
    ctx = f"T={T} B={B} F={F} N={N} weights={weights} seed={seed}"
    for k in r64:
        check(f"elbo {k}", got[k], r64[k], r32[k], FLOOR_RECURRENT, ctx)


@pytest.mark.gpu
@pytest.mark.parametrize("B,D", [(1, 1), (37, 100), (300, 3)])
def test_kl_ic_matches_reference(gpu, B, D):
    rng, seed = fresh_rng()
    x = dict(mean=rng.standard_normal((B, D)), logvar=rng.standard_normal((B, D)) - 1,
             prior_mean=rng.standard_normal(D) * 0.3,
             prior_logvar=np.log(0.1) + rng.standard_normal(D) * 0.1)
    var_min, scale = 1e-4, 0.7

    def run_ref(dt):
        a = {k: v.astype(dt) for k, v in x.items()}
        kl, dm, dl, dp = ref.kl_ic(**a, var_min=dt(var_min), scale=dt(scale))
        return dict(kl=np.array([kl]), d_mean=dm, d_logvar=dl, d_prior_mean=dp)

    r64, r32 = run_ref(np.float64), run_ref(np.float32)
    g, m = gpu, gpu.mod
    with g.stream:
        a = {k: to_dev(g, v) for k, v in x.items()}
        out = dict(kl=poisoned(g, (1,)), d_mean=poisoned(g, (B, D)),
                   d_logvar=poisoned(g, (B, D)), d_prior_mean=poisoned(g, (D,)))
        nbytes = m.kl_ic_workspace_size(B, D)
        ws = workspace(g, nbytes)
        m.kl_ic(a["mean"], a["logvar"], a["prior_mean"], a["prior_logvar"],
                var_min, scale, out["kl"], out["d_mean"], out["d_logvar"],
                out["d_prior_mean"], B=B, D=D, workspace=ws, workspace_bytes=nbytes,
                stream=g.stream.ptr)
        got = {k: host(g, v) for k, v in out.items()}
    for k in r64:
        check(f"kl_ic {k}", got[k], r64[k], r32[k], FLOOR_ELEMENTWISE, f"B={B} D={D} seed={seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("T,B,U", [(1, 1, 1), (30, 7, 4), (5, 300, 1)])
def test_kl_co_matches_reference(gpu, T, B, U):
    rng, seed = fresh_rng()
    x = dict(mean=rng.standard_normal((T, B, U)) * 0.5,
             logvar=rng.standard_normal((T, B, U)) * 0.3 - 1,
             eps=rng.standard_normal((T, B, U)),
             logtau=np.log(10.0) + rng.standard_normal(U) * 0.1,
             lognvar=np.log(0.1) + rng.standard_normal(U) * 0.1)
    scale = 0.9

    def run_ref(dt):
        a = {k: v.astype(dt) for k, v in x.items()}
        kl, dm, dl, dt_, dn = ref.kl_co(**a, scale=dt(scale))
        return dict(kl=np.array([kl]), d_mean=dm, d_logvar=dl, d_logtau=dt_, d_lognvar=dn)

    r64, r32 = run_ref(np.float64), run_ref(np.float32)
    g, m = gpu, gpu.mod
    with g.stream:
        a = {k: to_dev(g, v) for k, v in x.items()}
        out = dict(kl=poisoned(g, (1,)), d_mean=poisoned(g, (T, B, U)),
                   d_logvar=poisoned(g, (T, B, U)), d_logtau=poisoned(g, (U,)),
                   d_lognvar=poisoned(g, (U,)))
        nbytes = m.kl_co_workspace_size(B, U)
        ws = workspace(g, nbytes)
        m.kl_co(*[a[k] for k in ("mean", "logvar", "eps", "logtau", "lognvar")], scale,
                *[out[k] for k in ("kl", "d_mean", "d_logvar", "d_logtau", "d_lognvar")],
                T=T, B=B, U=U, workspace=ws, workspace_bytes=nbytes, stream=g.stream.ptr)
        got = {k: host(g, v) for k, v in out.items()}
    for k in r64:
        check(f"kl_co {k}", got[k], r64[k], r32[k], FLOOR_RECURRENT,
              f"T={T} B={B} U={U} seed={seed}")


# ---------------------------------------------------------------------------- Adam

ADAM_HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def adam_gpu(g, x, max_grad_norm, step):
    m = g.mod
    n = x["params"].size
    with g.stream:
        p, gr, mm, vv = (to_dev(g, x[k]) for k in ("params", "grads", "m", "v"))
        mask = None if x["mask"] is None else g.cp.asarray(x["mask"])
        norm = poisoned(g, (1,))
        nbytes = m.adam_workspace_size(n)
        ws = workspace(g, nbytes)
        m.adam_step(p, gr, mm, vv, mask, **ADAM_HP,
                    max_grad_norm=max_grad_norm, step=step, grad_norm=norm, n=n,
                    workspace=ws, workspace_bytes=nbytes, stream=g.stream.ptr)
        return host(g, p), host(g, mm), host(g, vv), host(g, norm)


def adam_inputs(rng, n, masked):
    return dict(params=rng.standard_normal(n), grads=rng.standard_normal(n) * 0.1,
                m=rng.standard_normal(n) * 0.01, v=rng.random(n) * 1e-3,
                mask=(rng.random(n) > 0.2).astype(np.uint8) if masked else None)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 1000, 1_000_003])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_adam_matches_reference(gpu, n, masked, max_grad_norm):
    rng, seed = fresh_rng()
    x = adam_inputs(rng, n, masked)
    step = 7

    def run_ref(dt):
        a = {k: (v if v is None or k == "mask" else v.astype(dt)) for k, v in x.items()}
        p, m1, v1, norm = ref.adam_step(**a, **ADAM_HP, max_grad_norm=max_grad_norm, step=step)
        return p, m1, v1, np.array([norm])

    r64, r32 = run_ref(np.float64), run_ref(np.float32)
    got = adam_gpu(gpu, x, max_grad_norm, step)
    for name, g_, a_, b_ in zip(("params", "m", "v", "grad_norm"), got, r64, r32):
        check(f"adam {name}", g_, a_, b_, FLOOR_ELEMENTWISE,
              f"n={n} masked={masked} max_grad_norm={max_grad_norm} seed={seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_adam_skips_non_finite_norm(gpu, bad):
    rng, _ = fresh_rng()
    x = adam_inputs(rng, 5000, False)
    x["grads"][1234] = bad
    p, m1, v1, norm = adam_gpu(gpu, x, 1.0, 3)
    assert not np.isfinite(norm[0])
    np.testing.assert_array_equal(p, x["params"].astype(np.float32))
    np.testing.assert_array_equal(m1, x["m"].astype(np.float32))
    np.testing.assert_array_equal(v1, x["v"].astype(np.float32))


# ---------------------------------------------------------------------------- bad input


@pytest.mark.gpu
def test_bad_arguments_raise_clear_errors(gpu):
    """The bindings check dtype, shape, contiguity and device of every array: a float64, a
    transposed or a host array gets an error naming it, never a silent wrong result."""
    g, m, cp = gpu, gpu.mod, gpu.cp
    T, B, H = 2, 3, 4
    with g.stream:
        good = dict(xproj=cp.zeros((T, B, 3 * H), np.float32), W_hh=cp.zeros((3 * H, H), np.float32),
                    h0=cp.zeros((B, H), np.float32), hs=cp.zeros((T, B, H), np.float32),
                    gates=cp.zeros((T, B, 3 * H), np.float32))
        nbytes = m.gru_forward_workspace_size(H)
        ws = workspace(g, nbytes)

        def call(x_offset=0, workspace_bytes=nbytes, ws=ws, **change):
            a = dict(good, **change)
            m.gru_forward(a["xproj"], x_offset, a["W_hh"], a["h0"], a["hs"], a["gates"], False, CLIP,
                          T=T, B=B, H=H, ldx=3 * H, workspace=ws, workspace_bytes=workspace_bytes,
                          stream=g.stream.ptr)

        call()
        with pytest.raises(TypeError, match=r"h0 must be \[3, 4\] float32 on the GPU"):
            call(h0=np.zeros((B, H), np.float32))
        with pytest.raises(TypeError, match="h0 must be"):
            call(h0=cp.zeros((B, H), np.float32).data.ptr)
        with pytest.raises(ValueError, match=r"h0 must be \[3, 4\] float32, got \(3, 4\) float64"):
            call(h0=cp.zeros((B, H), np.float64))
        with pytest.raises(ValueError, match=r"W_hh must be \[12, 4\] float32, got \(4, 12\) float32"):
            call(W_hh=cp.zeros((H, 3 * H), np.float32))
        with pytest.raises(ValueError, match="h0 must be .* C-contiguous"):
            call(h0=cp.zeros((H, B), np.float32).T)
        with pytest.raises(ValueError, match="xproj must be .* required"):
            call(xproj=None)
        with pytest.raises(ValueError, match="workspace_bytes must be >="):
            call(workspace_bytes=nbytes - 4)
        with pytest.raises(ValueError, match="workspace must be a contiguous uint8 device array"):
            call(ws=cp.zeros(nbytes, np.float32))
        with pytest.raises(ValueError, match="x_offset must leave 3H columns"):
            call(x_offset=1)
        g.stream.synchronize()


@pytest.mark.gpu
def test_arrays_on_two_devices_are_refused(gpu):
    cp, m = gpu.cp, gpu.mod
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    with cp.cuda.Device(0):
        mean = cp.zeros((2, 3), np.float32)
        kl = cp.zeros(1, np.float32)
        ws = cp.empty(max(m.kl_ic_workspace_size(2, 3), 16), np.uint8)
    with cp.cuda.Device(1):
        logvar = cp.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="logvar is on device 1, earlier arguments on device 0"):
        m.kl_ic(mean, logvar, mean[0], mean[0], 0.1, 1.0, kl, None, None, None, B=2, D=3,
                workspace=ws, workspace_bytes=ws.size, stream=0)


class FakeDeviceArray:
    """Exposes only __cuda_array_interface__, pointing at no memory: enough to exercise the
    bindings' argument checks, which all come before the device check, on a machine without
    a GPU."""

    def __init__(self, shape, typestr="<f4", strides=None, mask=None):
        self.__cuda_array_interface__ = dict(shape=tuple(shape), typestr=typestr, data=(4096, False),
                                             strides=strides, mask=mask, version=3)


def test_bindings_check_every_array_without_a_device():
    try:
        m = cuda()
    except RuntimeError as e:
        pytest.skip(f"no CUDA build: {e}")
    T, B, H = 2, 3, 4
    nbytes = m.gru_forward_workspace_size(H)

    def gru(xproj):
        m.gru_forward(xproj, 0, None, None, None, None, False, CLIP, T=T, B=B, H=H, ldx=3 * H,
                      workspace=None, workspace_bytes=nbytes, stream=0)

    expected = r"xproj must be \[2, 3, 12\] float32"
    with pytest.raises(TypeError, match=expected + r" on the GPU \(an array with __cuda_array_interface__"):
        gru(np.zeros((T, B, 3 * H), np.float32))
    with pytest.raises(TypeError, match=expected):
        gru(4096)  # a bare pointer carries no dtype or shape: refused
    with pytest.raises(ValueError, match=expected + r" \(it is required; got None\)"):
        gru(None)
    with pytest.raises(ValueError, match=expected + r", got \(2, 3, 12\) float64"):
        gru(FakeDeviceArray((T, B, 3 * H), "<f8"))
    with pytest.raises(ValueError, match=expected + r", got \(3, 2, 12\) float32"):
        gru(FakeDeviceArray((B, T, 3 * H)))
    with pytest.raises(ValueError, match=expected + r", got \(2, 3, 12\) float32"):
        gru(FakeDeviceArray((T, B, 3 * H), ">f4"))  # big-endian
    with pytest.raises(ValueError, match=expected + r" and C-contiguous, got strides \(4, 8, 24\)"):
        gru(FakeDeviceArray((T, B, 3 * H), strides=(4, 8, 24)))
    with pytest.raises(ValueError, match="xproj: masked arrays are not supported"):
        gru(FakeDeviceArray((T, B, 3 * H), mask=FakeDeviceArray((T, B, 3 * H), "|b1")))
    # Strides of a C-contiguous array, given explicitly, pass the checks (and reach the
    # device check, which a pointer to no memory fails).
    with pytest.raises(ValueError, match="xproj must point to device memory"):
        gru(FakeDeviceArray((T, B, 3 * H), strides=(B * 3 * H * 4, 3 * H * 4, 4)))
    with pytest.raises(ValueError, match=r"factors must be \[6, 7\] float32, got \(2, 3, 7\) float32"):
        m.poisson_elbo(FakeDeviceArray((2, 3, 7)), None, None, None, None, None, 1.0, None, None,
                       None, None, None, T=2, B=3, F=7, N=4, workspace=None,
                       workspace_bytes=1 << 20, stream=0)


# ---------------------------------------------------------------------------- references (CPU)


def fd_check(loss, params, grads, rng, what):
    """Central-difference directional derivative along a random direction, per parameter."""
    for name, g in grads.items():
        v = rng.standard_normal(params[name].shape)
        base = params[name].copy()
        params[name] = base + FD_STEP * v
        lp = loss(params)
        params[name] = base - FD_STEP * v
        lm = loss(params)
        params[name] = base
        fd = (lp - lm) / (2 * FD_STEP)
        an = float(np.sum(g * v))
        assert abs(fd - an) <= FD_RTOL * max(1.0, abs(an)) * 10, f"{what} {name}: fd {fd} vs {an}"


@pytest.mark.parametrize("name", ["odd", "no_controller"])
@pytest.mark.parametrize("sample", [True, False])
def test_decoder_reference_gradients(name, sample):
    rng = np.random.default_rng(11)
    T, B, C, U, G, F = (4, 3, 5, 2, 6, 3) if name == "odd" else (4, 3, 0, 0, 6, 3)
    a, d_in = decoder_inputs(rng, T, B, C, U, G, F, True, extra_cols=0)

    def loss(p):
        o = ref.decoder_forward(p, T, B, C, U, G, F, CLIP, sample)
        s = np.sum(o["factors"] * d_in["d_factors"])
        if C:
            s += np.sum(o["co_mean"] * d_in["d_co_mean"])
            s += np.sum(o["co_logvar"] * d_in["d_co_logvar"])
        return s

    r = decoder_reference(a, d_in, (T, B, C, U, G, F), sample, np.float64)
    grads = {"xgen": r["d_xgen"], "g0": r["d_g0"], "f0": r["d_f0"], "W_gen_hh": r["d_W_gen_hh"],
             "W_fac": r["d_W_fac"]}
    if C:
        grads.update(xcon=r["d_xcon"], c0=r["d_c0"], W_con_f=r["d_W_con_f"],
                     W_con_hh=r["d_W_con_hh"], W_co=r["d_W_co"], b_co=r["d_b_co"],
                     W_gen_u=r["d_W_gen_u"])
    fd_check(loss, a, grads, rng, f"decoder reference ({name}, sample={sample})")


def test_elbo_and_kl_reference_gradients():
    rng = np.random.default_rng(12)
    T, B, F, N = 3, 4, 5, 6
    x = elbo_inputs(rng, T, B, F, N, True)
    x["grad_mask"] = None  # a blocked gradient is not the derivative of the loss
    _, _, _, d_lr, d_b = ref.poisson_elbo(**x, scale=0.3, T=T, B=B)
    d_f, d_W = wg.readout_grads(d_lr, x["factors"], x["W_ro"])
    fd_check(lambda p: ref.poisson_elbo(**p, scale=0.3, T=T, B=B)[0], x,
             {"factors": d_f, "W_ro": d_W, "b_ro": d_b}, rng, "poisson_elbo")

    k = dict(mean=rng.standard_normal((B, F)), logvar=rng.standard_normal((B, F)),
             prior_mean=rng.standard_normal(F), prior_logvar=rng.standard_normal(F))
    _, dm, dl, dp = ref.kl_ic(**k, var_min=1e-4, scale=0.7)
    fd_check(lambda p: ref.kl_ic(**p, var_min=1e-4, scale=0.7)[0], k,
             {"mean": dm, "logvar": dl, "prior_mean": dp}, rng, "kl_ic")

    c = dict(mean=rng.standard_normal((T, B, 2)), logvar=rng.standard_normal((T, B, 2)) * 0.3,
             eps=rng.standard_normal((T, B, 2)), logtau=np.log([10.0, 3.0]),
             lognvar=np.log([0.1, 0.3]))
    _, dm, dl, dtau, dnv = ref.kl_co(**c, scale=0.9)
    fd_check(lambda p: ref.kl_co(**p, scale=0.9)[0], c,
             {"mean": dm, "logvar": dl, "logtau": dtau, "lognvar": dnv}, rng, "kl_co")


@pytest.mark.parametrize("reverse", [False, True])
def test_gru_weight_grad_matches_cpu_kernel(reverse):
    rng = np.random.default_rng(13)
    x = gru_inputs(rng, 6, 5, 7, 3 * 7 + 4)
    r = gru_cpu(x, np.float64, 3, reverse, CLIP)
    got = wg.gru_weight_grad(r["d_x"], r["hs"], x["h0"], r["work"], reverse)
    np.testing.assert_allclose(got, r["d_W_hh"], rtol=1e-12, atol=1e-12)
