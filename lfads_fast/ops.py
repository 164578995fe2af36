"""The one place that calls the compiled kernels.

Every function takes arrays of one array module (numpy for the CPU kernels; cupy for the CUDA
kernels, where built), allocates the outputs with that module and returns them. Shapes use the
names of csrc/common.h: T time, B batch, H hidden, F factors, N neurons, C controller,
U controller outputs, G generator. Everything is time-major.

For cupy arrays the calls go through _CudaOps, which gives the CUDA bindings what they expect:
the arrays themselves (the bindings check dtype, shape, contiguity and device of each), the
sizes, the current CuPy stream of the arrays' device as an int, and device workspaces cached
per device and stream; the weight gradients the CUDA backward ops leave to the caller are
cuBLAS GEMMs through CuPy (weight_grads.py). This module is also where the rest of the package
asks about devices (array_module, to_device, to_host, generator, scalar): nothing above it
branches on numpy or cupy.
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np

from . import _backend
from ._backend import cpu

# The most CPU threads set_num_threads accepts: a few per logical CPU (more only oversubscribe
# the cores; thousands exhaust the process's resources inside the OpenMP runtime).
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))

__all__ = [
    "set_num_threads",
    "get_num_threads",
    "gru_forward",
    "gru_backward",
    "decoder_forward",
    "decoder_backward",
    "poisson_elbo",
    "kl_ic",
    "kl_co",
    "adam_step",
    "matmul",
    "array_module",
    "device_of",
    "check_device",
    "device_scope",
    "to_device",
    "to_host",
    "scalar",
    "generator",
    "cuda_available",
]


def set_num_threads(n: int) -> None:
    """Sets the number of OpenMP threads of the CPU kernels."""
    _check_threads(n)
    cpu.set_num_threads(int(n))


def get_num_threads() -> int:
    """Returns the number of OpenMP threads of the CPU kernels."""
    return cpu.get_num_threads()


def gru_forward(xproj, x_offset: int, W_hh, h0, *, reverse: bool = False, clip: float = 5.0,
                out=None):
    """Runs a clipped GRU over a whole sequence.

    Args:
        xproj: input projection of every step incl. b_ih, [T, B, LD]; this GRU reads columns
            x_offset .. x_offset + 3H (gates z, r, n), so several GRUs can share one buffer.
        x_offset: first column of this GRU in xproj.
        W_hh: recurrent weights [3H, H].
        h0: initial state [B, H].
        reverse: process t = T-1 .. 0 (outputs stay at their time index).
        clip: cell clip value.
        out: optional preallocated (hs, gates) to write into.

    Returns:
        (hs [T, B, H], gates [T, B, 3H]): states and the saved gates for gru_backward.
    """
    xp = _xp(xproj)
    T, B, _ = _shape(xproj, "xproj", 3)
    H = _shape(W_hh, "W_hh", 2)[1]
    if out is None:
        out = (xp.empty((T, B, H), dtype=xproj.dtype), xp.empty((T, B, 3 * H), dtype=xproj.dtype))
    hs, gates = out
    _check_no_alias({"out[0] (hs)": hs, "out[1] (gates)": gates},
                    {"xproj": xproj, "W_hh": W_hh, "h0": h0})
    _module(xproj).gru_forward(xproj, int(x_offset), W_hh, h0, hs, gates, bool(reverse), float(clip))
    return hs, gates


def gru_backward(W_hh, h0, hs, gates, d_hs, d_hT, d_xproj, x_offset: int, *, reverse: bool = False,
                 clip: float = 5.0, work=None):
    """Backpropagates through gru_forward.

    Args:
        W_hh, h0, hs, gates: as given to / returned by gru_forward.
        d_hs: gradient on every state [T, B, H], or None.
        d_hT: gradient on the final state [B, H] (hs[T-1], or hs[0] if reverse), or None.
        d_xproj: [T, B, LD] buffer; columns x_offset .. x_offset + 3H receive the gradient of
            the pre-activations (= of xproj).
        x_offset, reverse, clip: as in gru_forward.
        work: optional scratch [T, B, H] (reused between calls to avoid fresh allocations).

    Returns:
        (d_W_hh [3H, H], d_h0 [B, H]).
    """
    xp = _xp(hs)
    T, B, H = _shape(hs, "hs", 3)
    d_W_hh = xp.empty((3 * H, H), dtype=hs.dtype)
    d_h0 = xp.empty((B, H), dtype=hs.dtype)
    if work is None:
        work = xp.empty((T, B, H), dtype=hs.dtype)
    _check_no_alias({"d_xproj": d_xproj, "work": work},
                    {"W_hh": W_hh, "h0": h0, "hs": hs, "gates": gates, "d_hs": d_hs, "d_hT": d_hT})
    _module(hs).gru_backward(W_hh, h0, hs, gates, d_hs, d_hT, d_xproj, int(x_offset), d_W_hh, d_h0,
                             work, bool(reverse), float(clip))
    return d_W_hh, d_h0


DECODER_INPUTS = ("xcon", "W_con_f", "W_con_hh", "c0", "W_co", "b_co", "eps", "mask_f", "xgen",
                  "W_gen_u", "W_gen_hh", "g0", "f0", "W_fac", "mask_g")
DECODER_OUTPUTS = ("con_states", "con_gates", "co_mean", "co_logvar", "u", "gen_states",
                   "gen_gates", "factors")


def decoder_forward(inputs: dict, T: int, *, clip: float = 5.0, sample: bool = True,
                    out: dict | None = None) -> dict:
    """Runs the fused LFADS decoder (controller, sampling, generator, factors) for T steps.

    Args:
        inputs: arrays named as in csrc/decoder.h: xcon [T, B, LC] (controller-input
            projection incl. b_ih), W_con_f [3C, F], W_con_hh [3C, C], c0 [B, C], W_co [2U, C],
            b_co [2U], eps [T, B, U], mask_f [T, B, F], xgen [T, B, LG] (generator-input
            projection of the external inputs incl. b_ih), W_gen_u [3G, U], W_gen_hh [3G, G],
            g0 [B, G], f0 [B, F], W_fac [F, G] (row-normalised), mask_g [T, B, G]. With no
            controller (C = 0) the controller entries may be None; masks and eps may be None.
        T: number of steps.
        clip: cell clip value.
        sample: draw u = co_mean + exp(co_logvar / 2) * eps (else u = co_mean).
        out: optional preallocated outputs (a dict like the one returned).

    Returns:
        dict of the outputs named in DECODER_OUTPUTS, each [T, B, ...].
    """
    g0 = inputs["g0"]
    xp = _xp(g0)
    B, G = _shape(g0, "g0", 2)
    F = _shape(inputs["W_fac"], "W_fac", 2)[0]
    C = 0 if inputs.get("W_con_hh") is None else inputs["W_con_hh"].shape[1]
    U = 0 if inputs.get("W_co") is None else inputs["W_co"].shape[0] // 2
    dt = g0.dtype
    sizes = {"con_states": C, "con_gates": 3 * C, "co_mean": U, "co_logvar": U, "u": U,
             "gen_states": G, "gen_gates": 3 * G, "factors": F}
    if out is None:
        out = {k: xp.empty((T, B, n), dtype=dt) for k, n in sizes.items()}
    arrays = {k: inputs.get(k) for k in DECODER_INPUTS}
    _check_no_alias(out, arrays)
    arrays.update(out)
    _module(g0).decoder_forward(arrays, float(clip), bool(sample))
    return out


def decoder_backward(inputs: dict, outputs: dict, d_factors, d_co_mean, d_co_logvar, *,
                     clip: float = 5.0, sample: bool = True, workspace=None) -> dict:
    """Backpropagates through decoder_forward (BPTT over all steps).

    Args:
        inputs, outputs: as given to / returned by decoder_forward.
        d_factors: gradient on the factors [T, B, F] (from the read-out), or None.
        d_co_mean, d_co_logvar: gradients on co_mean, co_logvar [T, B, U] (from the KL), or None.
        clip, sample: as in decoder_forward.
        workspace: optional dict of preallocated arrays reused between calls: `work`
            [T, B, 2F + 2G + 2U + C], `d_xcon` [T, B, LC], `d_xgen` [T, B, LG].

    Returns:
        dict with d_xcon [T, B, 3C], d_W_con_f, d_W_con_hh, d_c0 [B, C], d_W_co, d_b_co,
        d_xgen [T, B, 3G], d_W_gen_u, d_W_gen_hh, d_g0 [B, G], d_f0 [B, F], d_W_fac (on the
        row-normalised weights).
    """
    g0 = inputs["g0"]
    xp = _xp(g0)
    T, B, G = outputs["gen_states"].shape
    F = outputs["factors"].shape[2]
    C = outputs["con_states"].shape[2]
    U = outputs["u"].shape[2]
    dt = g0.dtype
    LC = inputs["xcon"].shape[2] if C > 0 else 0
    LG = inputs["xgen"].shape[2]
    shapes = {"d_xcon": (T, B, LC), "d_W_con_f": (3 * C, F), "d_W_con_hh": (3 * C, C),
              "d_c0": (B, C), "d_W_co": (2 * U, C), "d_b_co": (2 * U,), "d_xgen": (T, B, LG),
              "d_W_gen_u": (3 * G, U), "d_W_gen_hh": (3 * G, G), "d_g0": (B, G), "d_f0": (B, F),
              "d_W_fac": (F, G)}
    shapes["work"] = (T, B, 2 * F + 2 * G + 2 * U + C)
    ws = workspace or {}
    grads = {k: ws[k] if k in ws else xp.empty(s, dtype=dt) for k, s in shapes.items()}
    arrays = {k: inputs.get(k) for k in DECODER_INPUTS}
    arrays.update(outputs)
    call = dict(grads, d_factors=d_factors, d_co_mean=d_co_mean, d_co_logvar=d_co_logvar)
    _module(g0).decoder_backward(arrays, call, float(clip), bool(sample))
    del grads["work"]
    grads["d_xcon"] = grads["d_xcon"][..., : 3 * C]
    grads["d_xgen"] = grads["d_xgen"][..., : 3 * G]
    return grads


def poisson_elbo(factors, W_ro, b_ro, counts, *, T: int, scale: float, loss_weight=None,
                 grad_mask=None, grads: bool = True, log_rates: bool = False,
                 d_factors=None) -> dict:
    """Read-out, Poisson NLL and its gradient, fused.

    Args:
        factors: [R, F], R = T * B rows, time-major.
        W_ro: read-out weights [N, F]; b_ro: read-out bias [N].
        counts: spike counts [R, N]; NaN = missing bin (no loss, no gradient).
        T: number of time steps (R must be a multiple).
        scale: loss = scale * sum over bins of weight * nll.
        loss_weight: [R, N] per-bin weights of the loss and its gradient, or None.
        grad_mask: [R, N]; 0 blocks a bin's gradient, its loss still counts; or None.
        grads: compute d_factors, d_W_ro, d_b_ro.
        log_rates: also return the log-rates [R, N].
        d_factors: optional preallocated [R, F] for the factors' gradient.

    Returns:
        dict: loss (float), nll_tn ([T, N] unscaled weighted NLL summed over the batch),
        log_rates, d_factors [R, F], d_W_ro [N, F], d_b_ro [N] (None where not asked for).
    """
    xp = _xp(factors)
    R, F = _shape(factors, "factors", 2)
    N = _shape(W_ro, "W_ro", 2)[0]
    if T < 1 or R % T:
        raise ValueError(f"factors has {R} rows, which is not a multiple of T = {T}")
    dt = factors.dtype
    loss = xp.zeros(1, dtype=dt)
    out = {
        "nll_tn": xp.empty((T, N), dtype=dt),
        "log_rates": xp.empty((R, N), dtype=dt) if log_rates else None,
        "d_factors": (d_factors if d_factors is not None else xp.empty((R, F), dtype=dt)) if grads else None,
        "d_W_ro": xp.empty((N, F), dtype=dt) if grads else None,
        "d_b_ro": xp.empty((N,), dtype=dt) if grads else None,
    }
    _check_no_alias({k: v for k, v in out.items() if k != "nll_tn"},
                    {"factors": factors, "W_ro": W_ro, "b_ro": b_ro, "counts": counts,
                     "loss_weight": loss_weight, "grad_mask": grad_mask})
    _module(factors).poisson_elbo(factors, W_ro, b_ro, counts, loss_weight, grad_mask, float(scale),
                                  int(T), loss, out["log_rates"], out["nll_tn"], out["d_factors"],
                                  out["d_W_ro"], out["d_b_ro"])
    out["loss"] = scalar(loss)
    return out


def kl_ic(mean, logvar, prior_mean, prior_logvar, *, var_min: float, scale: float = 1.0,
          grads: bool = True) -> dict:
    """KL of the initial-condition posterior N(mean, exp(logvar) + var_min) from the prior.

    Args:
        mean, logvar: [B, D]. prior_mean, prior_logvar: [D].
        var_min: floor added to the posterior variance.
        scale: multiplies the KL and its gradients.

    Returns:
        dict: kl (scalar(), scale * mean over b of the sum over d), d_mean, d_logvar [B, D],
        d_prior_mean [D] (None when grads is False).
    """
    xp = _xp(mean)
    dt = mean.dtype
    kl = xp.zeros(1, dtype=dt)
    out = {k: (xp.empty(a.shape, dtype=dt) if grads else None)
           for k, a in (("d_mean", mean), ("d_logvar", logvar), ("d_prior_mean", prior_mean))}
    _module(mean).kl_ic(mean, logvar, prior_mean, prior_logvar, float(var_min), float(scale), kl,
                        out["d_mean"], out["d_logvar"], out["d_prior_mean"])
    out["kl"] = scalar(kl)
    return out


def kl_co(mean, logvar, eps, logtau, lognvar, *, scale: float = 1.0, grads: bool = True) -> dict:
    """One-sample KL of the inferred inputs' posterior from the AR(1) prior.

    Args:
        mean, logvar: posterior [T, B, U]. eps: the KL's own sample noise [T, B, U].
        logtau, lognvar: the prior's log time constant and log noise variance [U].
        scale: multiplies the KL and its gradients.

    Returns:
        dict: kl (scalar(), scale * mean over b of the sum over t, u of log q - log p), d_mean,
        d_logvar [T, B, U], d_logtau, d_lognvar [U] (None when grads is False).
    """
    xp = _xp(mean)
    dt = mean.dtype
    kl = xp.zeros(1, dtype=dt)
    out = {k: (xp.empty(a.shape, dtype=dt) if grads else None)
           for k, a in (("d_mean", mean), ("d_logvar", logvar), ("d_logtau", logtau),
                        ("d_lognvar", lognvar))}
    _module(mean).kl_co(mean, logvar, eps, logtau, lognvar, float(scale), kl, out["d_mean"],
                        out["d_logvar"], out["d_logtau"], out["d_lognvar"])
    out["kl"] = scalar(kl)
    return out


def adam_step(params, grads, m, v, *, lr: float, beta1: float = 0.9, beta2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 0.0, max_grad_norm: float = 0.0,
              step: int, mask=None) -> float:
    """One fused Adam(W) step over flat vectors, with global gradient-norm clipping.

    Args:
        params, grads, m, v: flat [n] vectors; params, m and v are updated in place.
        lr, beta1, beta2, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay).
        max_grad_norm: clip the global gradient norm to this (<= 0: no clipping).
        step: 1-based step count including this one.
        mask: uint8 [n], 0 = frozen element, or None.

    Returns:
        The gradient norm before clipping; when it is not finite nothing was changed.
    """
    xp = _xp(params)
    _check_adam_args(lr, beta1, beta2, eps, weight_decay, max_grad_norm, step)
    _check_no_alias({"params": params, "m": m, "v": v}, {"grads": grads, "mask": mask})
    norm = xp.zeros(1, dtype=params.dtype)
    _module(params).adam_step(params, grads, m, v, mask, float(lr), float(beta1), float(beta2),
                              float(eps), float(weight_decay), float(max_grad_norm), int(step), norm)
    return float(norm[0])


# Fraction of nonzero entries up to which matmul(sparse=...) multiplies only the nonzeros on
# the CPU (bench/bench_sparse.py measured where the dense product catches up; docs/performance.md).
SPARSE_MAX_DENSITY = 0.12


def matmul(a, b, out=None, *, beta: float = 0.0, sparse: str | None = None):
    """out = a @ b + beta * out for 2-D arrays, the product split over the kernels' threads.

    numpy's own matmul runs on its BLAS's thread pool (one thread where OPENBLAS_NUM_THREADS=1
    keeps it out of the kernels' way); this one runs on the kernels' OpenMP threads.

    Args:
        a: [M, K]; b: [K, N]; float32 or float64 like out. Each may be C-contiguous, a slice of
            a C-contiguous array's columns, or the transpose of either (e.g. ``W.T``).
        out: [M, N] with unit stride along its last axis (None: allocated with a's dtype;
            beta must be 0).
        beta: multiplies out's previous contents.
        sparse: "a" or "b" when that operand is mostly zeros (spike counts): on the CPU, when
            at most SPARSE_MAX_DENSITY of its entries are nonzero, only they are multiplied
            ("a" needs a row-major a; "b" a row-major b and a transposed a, the weight
            gradient ``d.T @ x``). The result equals the dense product up to rounding, except
            that a NaN or infinity of the other operand meets only the nonzeros (the dense
            product also gives NaN for its 0 * inf and 0 * NaN terms); on a GPU, and
            otherwise, the dense product runs.

    Returns:
        out.
    """
    _xp(a)  # a TypeError for anything but an array
    if sparse not in (None, "a", "b"):
        raise ValueError(f"sparse must be None, 'a' or 'b', got {sparse!r}")
    mod = _module(a)
    if out is None:
        if beta != 0.0:
            raise ValueError("beta != 0 needs out")
        _shape(a, "a", 2)
        _shape(b, "b", 2)
        out = _xp(a).empty((a.shape[0], b.shape[1]), dtype=a.dtype)
    _check_no_alias({"out": out}, {"a": a, "b": b})
    mod.matmul(a, b, out, float(beta), sparse or "", SPARSE_MAX_DENSITY)
    return out


# Devices


def array_module(a):
    """numpy or cupy: the module of array `a` (a TypeError for anything else)."""
    return _xp(a)


def device_scope(a):
    """A context in which new arrays and kernels go to array `a`'s device: that GPU made
    current (CuPy allocates and launches on the current device, which may be another one);
    nothing for numpy."""
    if _xp(a) is np:
        return contextlib.nullcontext()
    import cupy

    return cupy.cuda.Device(a.device.id)


def cuda_available() -> tuple[bool, str]:
    """(whether the CUDA backend can run here, the reason when not)."""
    try:
        import cupy
    except ImportError as e:
        return False, f"CuPy is not installed ({e}); install the gpu extra: pip install 'lfads_fast[gpu]'"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver: CuPy raises its own runtime error type
        return False, f"no CUDA driver or device ({e})"
    if n == 0:
        return False, "no CUDA device"
    try:
        _backend.cuda()
    except RuntimeError as e:
        return False, f"{e} (build with LFADS_FAST_CUDA=ON)"
    return True, ""


def device_of(a) -> str:
    """"cpu" or "cuda:N": where array `a` lives."""
    if _xp(a) is np:
        return "cpu"
    return f"cuda:{a.device.id}"


def check_device(device) -> tuple[str, int | None]:
    """Checks that `device` ("cpu", "cuda", "cuda:N") names a device that can run here.

    Returns:
        ("cpu", None) or ("cuda", N or None for the current device).

    Raises:
        ValueError: an unknown name, or a CUDA device where the CUDA backend cannot run (the
            message says why: no CuPy, no driver or device, or no CUDA build).
    """
    kind, index = _parse_device(device)
    if kind == "cpu":
        return kind, index
    ok, why = cuda_available()
    if not ok:
        raise ValueError(f"device {device!r} is not available: {why}")
    import cupy

    n = cupy.cuda.runtime.getDeviceCount()
    if index is not None and index >= n:
        raise ValueError(f"device {device!r} is not available: there are {n} CUDA devices")
    return kind, index


def to_device(a, device: str):
    """Array `a` on `device` ("cpu", "cuda", "cuda:N"): `a` itself when it is there already,
    else a copy.

    Raises:
        ValueError: as check_device; or a float64 array for a CUDA device (the CUDA kernels
            are float32).
    """
    kind, index = check_device(device)
    if kind == "cpu":
        return to_host(a)
    import cupy

    if getattr(a, "dtype", np.dtype(np.float32)) == np.float64:
        raise ValueError(f"device {device!r} runs float32 only (the CUDA kernels are float32), got float64")
    if index is None:
        index = cupy.cuda.runtime.getDevice()
    if _xp(a) is cupy and a.device.id == index:
        return a
    with cupy.cuda.Device(index):
        return cupy.asarray(a) if isinstance(a, np.ndarray) else a.copy()


def to_host(a):
    """`a` as a numpy array (a copy from the device; `a` itself on the host). None stays None."""
    if a is None or type(a) is np.ndarray:
        return a
    if hasattr(a, "__cuda_array_interface__") and hasattr(a, "get"):
        return a.get()
    return np.asarray(a)


def scalar(a):
    """The value of a one-element array: a float for numpy; on a GPU a 0-d device array, so
    that reading it (float()) is left to the caller and the device need not wait."""
    if isinstance(a, np.generic) or _xp(a) is np:
        return float(a.reshape(()))
    return a.reshape(())


def generator(xp, rng):
    """A random generator of module `xp` driven by numpy Generator `rng`: `rng` itself for
    numpy; for cupy a device generator seeded by one draw of `rng` (reproducible from its seed,
    resumable from its checkpointed state). A generator of `xp` is returned as it is."""
    if xp is np or not isinstance(rng, np.random.Generator):
        return rng
    return xp.random.default_rng(int(rng.integers(2**63)))


def _parse_device(device) -> tuple[str, int | None]:
    if isinstance(device, str):
        name = device.strip().lower()
        if name == "cpu":
            return "cpu", None
        if name == "cuda":
            return "cuda", None
        if name.startswith("cuda:") and name[5:].isdigit():
            return "cuda", int(name[5:])
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


# Helpers


def _xp(a):
    # By the array type's module, so that anything CuPy-like (also an ndarray subclass, as
    # the CPU emulation of the CUDA backend in the tests is) goes to the CUDA path.
    if type(a) is np.ndarray:
        return np
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    if isinstance(a, np.ndarray):
        return np
    raise TypeError(f"expected a numpy or cupy array, got {type(a).__name__}")


def _module(a):
    return cpu if _xp(a) is np else _cuda_ops()


def _check_threads(n) -> None:
    """Threads must be an integer in [1, MAX_THREADS]: thousands of OpenMP threads exhaust
    the process's resources and kill it."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"threads must be an integer from 1 to {MAX_THREADS} (this machine "
                         f"has {os.cpu_count()} CPUs), got {n!r}")


def _check_no_alias(outputs: dict, inputs: dict) -> None:
    """Refuses an output array that overlaps an input or another output: the kernels write
    outputs while reading inputs, so an overlap gives silently wrong results. None entries
    and non-arrays are left to the kernels' own checks."""
    outs = [(k, a) for k, a in outputs.items() if isinstance(a, np.ndarray)]
    ins = [(k, a) for k, a in inputs.items() if isinstance(a, np.ndarray)]
    for i, (name, a) in enumerate(outs):
        for other, b in outs[i + 1:] + ins:
            if np.may_share_memory(a, b) and np.shares_memory(a, b):
                raise ValueError(f"{name} overlaps {other} in memory; the kernel writes {name} "
                                 f"while reading {other}: pass separate arrays")


def _check_adam_args(lr, beta1, beta2, eps, weight_decay, max_grad_norm, step) -> None:
    """Refuses Adam hyperparameters that would write NaN or infinite parameters."""
    def real(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or not math.isfinite(v):
            raise ValueError(f"adam_step: {name} must be a finite number, got {v!r}")
        return float(v)

    if real("lr", lr) < 0:
        raise ValueError(f"adam_step: lr must be >= 0, got {lr!r}")
    for name, v in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= real(name, v) < 1.0:
            raise ValueError(f"adam_step: {name} must be in [0, 1), got {v!r}")
    if real("eps", eps) <= 0:
        raise ValueError(f"adam_step: eps must be > 0, got {eps!r}")
    if real("weight_decay", weight_decay) < 0:
        raise ValueError(f"adam_step: weight_decay must be >= 0, got {weight_decay!r}")
    real("max_grad_norm", max_grad_norm)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"adam_step: step must be an integer >= 1, got {step!r}")


def _shape(a, name: str, ndim: int):
    if getattr(a, "ndim", None) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {getattr(a, 'shape', None)}")
    return a.shape


# CUDA adapters: the CPU module's call signatures over the CUDA bindings.

_CUDA_OPS = None


def _cuda_ops():
    global _CUDA_OPS
    if _CUDA_OPS is None:
        _CUDA_OPS = _CudaOps(_backend.cuda())
    return _CUDA_OPS


class _CudaOps:
    """Calls the CUDA bindings with the arguments of the CPU module's functions.

    Per call: the arrays' device is made current (the bindings check that all arrays share
    it), the stream is CuPy's current stream of that device, and the workspace is a cached
    uint8 buffer per (device, stream) that grows to the largest size asked for; calls on
    one stream run in order, so they may share it. The weight gradients that the CUDA backward
    ops leave to the caller are GEMMs through CuPy (weight_grads.py), on the same stream.
    """

    def __init__(self, mod):
        import cupy

        self.mod, self.cupy = mod, cupy
        self._workspaces: dict[tuple[int, int], object] = {}
        self._scratch: dict[tuple[int, int, str], object] = {}

    # -- plumbing

    def _on(self, a):
        """(device context, stream int) of array `a`."""
        dev = self.cupy.cuda.Device(a.device.id)
        with dev:
            stream = self.cupy.cuda.get_current_stream().ptr
        return dev, stream

    def _workspace(self, a, stream: int, nbytes: int):
        key = (a.device.id, stream)
        ws = self._workspaces.get(key)
        if ws is None or ws.size < nbytes:
            with self.cupy.cuda.Device(a.device.id):
                ws = self.cupy.empty(max(int(nbytes), 256), dtype=np.uint8)
            self._workspaces[key] = ws
        return ws, ws.size

    def _scratch_array(self, a, stream: int, name: str, shape: tuple):
        """A float32 scratch array of `shape` on `a`'s device (cached like the workspace)."""
        n = int(np.prod(shape))
        key = (a.device.id, stream, name)
        buf = self._scratch.get(key)
        if buf is None or buf.size < n:
            with self.cupy.cuda.Device(a.device.id):
                buf = self.cupy.empty(max(n, 1), dtype=np.float32)
            self._scratch[key] = buf
        return buf[:n].reshape(shape)

    # -- GRU

    def gru_forward(self, xproj, x_offset, W_hh, h0, hs, gates, reverse, clip):
        T, B, LD = xproj.shape
        H = W_hh.shape[1]
        dev, stream = self._on(xproj)
        with dev:
            ws, nbytes = self._workspace(xproj, stream, self.mod.gru_forward_workspace_size(H))
            self.mod.gru_forward(xproj, x_offset, W_hh, h0, hs, gates, reverse, clip, T=T, B=B, H=H,
                                 ldx=LD, workspace=ws, workspace_bytes=nbytes, stream=stream)

    def gru_backward(self, W_hh, h0, hs, gates, d_hs, d_hT, d_xproj, x_offset, d_W_hh, d_h0, work,
                     reverse, clip):
        from . import weight_grads

        T, B, H = hs.shape
        dev, stream = self._on(hs)
        with dev:
            self.mod.gru_backward(W_hh, h0, hs, gates, d_hs, d_hT, d_xproj, x_offset, d_h0, work,
                                  reverse, clip, T=T, B=B, H=H, ldx=d_xproj.shape[2], stream=stream)
            d_W_hh[...] = weight_grads.gru_weight_grad(d_xproj[..., x_offset:], hs, h0, work, reverse)

    # -- decoder

    def _decoder_sizes(self, a):
        T, B, G = a["gen_states"].shape
        F = a["factors"].shape[2]
        C = 0 if a.get("W_con_hh") is None else a["W_con_hh"].shape[1]
        U = 0 if a.get("W_co") is None else a["W_co"].shape[0] // 2
        return dict(T=T, B=B, C=C, U=U, G=G, F=F, ld_xc=a["xcon"].shape[2] if C else 0,
                    ld_xg=a["xgen"].shape[2])

    def decoder_forward(self, arrays, clip, sample):
        sizes = self._decoder_sizes(arrays)
        g0 = arrays["g0"]
        dev, stream = self._on(g0)
        with dev:
            ws, nbytes = self._workspace(g0, stream, self.mod.decoder_forward_workspace_size(
                sizes["C"], sizes["U"], sizes["G"], sizes["F"]))
            self.mod.decoder_forward(*[_none_if_empty(arrays.get(k)) for k in _DECODER_ARRAYS],
                                     **sizes, clip=clip, sample=sample, workspace=ws,
                                     workspace_bytes=nbytes, stream=stream)

    def decoder_backward(self, arrays, call, clip, sample):
        from . import weight_grads

        s = self._decoder_sizes(arrays)
        T, B, C, U, G, F = (s[k] for k in "TBCUGF")
        g0 = arrays["g0"]
        dev, stream = self._on(g0)
        con = C > 0
        with dev:
            work = {"d_factors_total": self._scratch_array(g0, stream, "dec_d_factors_total", (T, B, F)),
                    "rh_gen": self._scratch_array(g0, stream, "dec_rh_gen", (T, B, G)),
                    "d_co": self._scratch_array(g0, stream, "dec_d_co", (T, B, 2 * U)) if con else None,
                    "rh_con": self._scratch_array(g0, stream, "dec_rh_con", (T, B, C)) if con else None}
            self.mod.decoder_backward(
                *[_none_if_empty(arrays.get(k)) for k in _DECODER_ARRAYS],
                *[_none_if_empty(call.get(k)) for k in ("d_factors", "d_co_mean", "d_co_logvar")],
                call["d_xcon"] if con else None, call["d_c0"] if con else None, call["d_xgen"],
                call["d_g0"], call["d_f0"], work["d_factors_total"], work["d_co"], work["rh_gen"],
                work["rh_con"], **s, clip=clip, sample=sample, stream=stream)
            ctl = {} if not con else dict(
                d_xcon=call["d_xcon"], d_co=work["d_co"], rh_con=work["rh_con"],
                con_states=arrays["con_states"], c0=arrays["c0"], u=arrays["u"],
                factors=arrays["factors"], f0=arrays["f0"], mask_f=arrays.get("mask_f"))
            w = weight_grads.decoder_weight_grads(
                d_xgen=call["d_xgen"], d_factors_total=work["d_factors_total"], rh_gen=work["rh_gen"],
                gen_states=arrays["gen_states"], g0=g0, mask_g=arrays.get("mask_g"), **ctl)
            for k, v in w.items():
                call[k][...] = v
            for k in ("d_W_con_f", "d_W_con_hh", "d_W_co", "d_b_co", "d_W_gen_u"):
                if k not in w and call[k].size:
                    call[k][...] = 0

    # -- ELBO and KL

    def poisson_elbo(self, factors, W_ro, b_ro, counts, loss_weight, grad_mask, scale, T, loss,
                     log_rates, nll_tn, d_factors, d_W_ro, d_b_ro):
        from . import weight_grads

        R, F = factors.shape
        N = W_ro.shape[0]
        B = R // T
        dev, stream = self._on(factors)
        with dev:
            ws, nbytes = self._workspace(factors, stream, self.mod.poisson_elbo_workspace_size(T, B, N))
            d_lr = None if d_factors is None else self._scratch_array(factors, stream, "elbo_d_log_rates",
                                                                     (R, N))
            self.mod.poisson_elbo(factors, W_ro, b_ro, counts, loss_weight, grad_mask, scale, loss,
                                  log_rates, nll_tn, d_lr, d_b_ro, T=T, B=B, F=F, N=N, workspace=ws,
                                  workspace_bytes=nbytes, stream=stream)
            if d_lr is not None:
                d_f, d_W = weight_grads.readout_grads(d_lr, factors, W_ro)
                d_factors[...] = d_f
                d_W_ro[...] = d_W

    def kl_ic(self, mean, logvar, prior_mean, prior_logvar, var_min, scale, kl, d_mean, d_logvar,
              d_prior_mean):
        B, D = mean.shape
        dev, stream = self._on(mean)
        with dev:
            ws, nbytes = self._workspace(mean, stream, self.mod.kl_ic_workspace_size(B, D))
            self.mod.kl_ic(mean, logvar, prior_mean, prior_logvar, var_min, scale, kl, d_mean, d_logvar,
                           d_prior_mean, B=B, D=D, workspace=ws, workspace_bytes=nbytes, stream=stream)

    def kl_co(self, mean, logvar, eps, logtau, lognvar, scale, kl, d_mean, d_logvar, d_logtau,
              d_lognvar):
        T, B, U = mean.shape
        dev, stream = self._on(mean)
        with dev:
            ws, nbytes = self._workspace(mean, stream, self.mod.kl_co_workspace_size(B, U))
            self.mod.kl_co(mean, logvar, eps, logtau, lognvar, scale, kl, d_mean, d_logvar, d_logtau,
                           d_lognvar, T=T, B=B, U=U, workspace=ws, workspace_bytes=nbytes, stream=stream)

    # -- Adam and GEMM

    def adam_step(self, params, grads, m, v, mask, lr, beta1, beta2, eps, weight_decay,
                  max_grad_norm, step, grad_norm):
        n = params.size
        dev, stream = self._on(params)
        with dev:
            ws, nbytes = self._workspace(params, stream, self.mod.adam_workspace_size(n))
            self.mod.adam_step(params, grads, m, v, mask, lr, beta1, beta2, eps, weight_decay,
                               max_grad_norm, step, grad_norm, n=n, workspace=ws, workspace_bytes=nbytes,
                               stream=stream)

    def matmul(self, a, b, out, beta, sparse="", max_density=0.0):
        dev, _ = self._on(a)
        with dev:
            if beta == 0.0:
                out[...] = a @ b
            else:
                out *= out.dtype.type(beta)
                out += a @ b
        return False  # the dense product, always (cuBLAS)


_DECODER_ARRAYS = DECODER_INPUTS + DECODER_OUTPUTS


def _none_if_empty(a):
    """None for absent or zero-size arrays (the bindings take None for unused ones)."""
    return None if a is None or a.size == 0 else a
