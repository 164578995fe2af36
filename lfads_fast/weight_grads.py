"""Weight gradients of the recurrent and read-out ops: large reductions over all T * B rows.

The recurrent kernels store per-step gradients of the pre-activations; a weight gradient is then
a sum over time and batch of outer products, i.e. one large matrix product, which is what BLAS
and cuBLAS do best (and what no persistent kernel should do step by step). The CUDA backward
ops leave these products to the caller; the functions here do them with ``xp`` (numpy or cupy,
whichever holds the arrays), with the same formulas as the CPU kernels (gru_weight_grad_cpu,
the end of decoder_backward_cpu).

Shapes use the names of csrc/common.h; arrays are time-major ``[T, B, ...]``.
"""
from __future__ import annotations

import numpy as np


def _xp(a):
    """numpy or cupy, whichever module `a` belongs to (cupy is imported only if present)."""
    if isinstance(a, np.ndarray):
        return np
    import cupy  # noqa: PLC0415  (only reached for non-numpy arrays)

    return cupy.get_array_module(a)


def _rows(a, cols):
    """[T, B, >=cols] -> [T*B, cols] (the first `cols` columns)."""
    return a[..., :cols].reshape(-1, cols)


def gru_weight_grad(d_x, hs, h0, rh, reverse=False):
    """Recurrent-weight gradient of a clipped-GRU sequence.

    d_W_hh[z, r] = sum_t d_x[t][z, r]^T h_prev[t],  d_W_hh[n] = sum_t d_x[t][n]^T rh[t],
    h_prev[t] = hs[t-1] (hs[t+1] if reverse) and h0 for the first step processed.

    Args:
        d_x: pre-activation gradients [T, B, >=3H] (the first 3H columns are used; pass
            ``d_xproj[..., off:]`` for a GRU at column offset ``off`` of a shared buffer).
        hs: states [T, B, H].  h0: initial state [B, H].  rh: r * h_prev of every step [T, B, H]
            (the ``work`` output of gru_backward).
        reverse: the sequence ran from t = T-1 down to 0.

    Returns:
        d_W_hh [3H, H], the dtype of d_x.
    """
    xp = _xp(d_x)
    T, B, H = hs.shape
    d_W = xp.empty((3 * H, H), dtype=d_x.dtype)
    zr = d_x[..., : 2 * H]
    first, rest = (T - 1, slice(0, T - 1)) if reverse else (0, slice(1, T))
    prev = hs[1:] if reverse else hs[:-1]
    d_W[: 2 * H] = zr[first].T @ h0
    if T > 1:
        d_W[: 2 * H] += _rows(zr[rest], 2 * H).T @ prev.reshape(-1, H)
    d_W[2 * H :] = _rows(d_x[..., 2 * H : 3 * H], H).T @ rh.reshape(-1, H)
    return d_W


def decoder_weight_grads(*, d_xgen, d_factors_total, rh_gen, gen_states, g0, mask_g=None,
                         d_xcon=None, d_co=None, rh_con=None, con_states=None, c0=None, u=None,
                         factors=None, f0=None, mask_f=None):
    """Weight gradients of the decoder from the per-step outputs of its backward op.

    Args (time-major, shapes as in csrc/decoder.h):
        d_xgen [T, B, >=3G], d_factors_total [T, B, F], rh_gen [T, B, G]: from decoder_backward.
        gen_states [T, B, G], g0 [B, G], mask_g [T, B, G] or None: the forward's.
        Controller (omit all when C == 0): d_xcon [T, B, >=3C], d_co [T, B, 2U], rh_con [T, B, C]
        from decoder_backward; con_states [T, B, C], c0 [B, C], u [T, B, U], factors [T, B, F],
        f0 [B, F], mask_f [T, B, F] or None from the forward.

    Returns:
        dict with d_W_fac [F, G] and d_W_gen_hh [3G, G]; with a controller also d_W_gen_u
        [3G, U], d_W_co [2U, C], d_b_co [2U], d_W_con_hh [3C, C], d_W_con_f [3C, F].
    """
    T, B, G = gen_states.shape
    F = d_factors_total.shape[2]
    gd = gen_states if mask_g is None else gen_states * mask_g
    out = {
        "d_W_fac": d_factors_total.reshape(-1, F).T @ gd.reshape(-1, G),
        "d_W_gen_hh": gru_weight_grad(d_xgen, gen_states, g0, rh_gen),
    }
    if d_xcon is None:
        return out
    xp = _xp(d_xgen)
    C = con_states.shape[2]
    U = u.shape[2]
    dco = d_co.reshape(-1, 2 * U)
    f_prev = xp.concatenate([f0[None], factors[:-1]], axis=0)  # f_{t-1}, f_{-1} = f0
    fd = f_prev if mask_f is None else f_prev * mask_f
    out["d_W_gen_u"] = _rows(d_xgen, 3 * G).T @ u.reshape(-1, U)
    out["d_W_co"] = dco.T @ con_states.reshape(-1, C)
    out["d_b_co"] = dco.sum(axis=0)
    out["d_W_con_hh"] = gru_weight_grad(d_xcon, con_states, c0, rh_con)
    out["d_W_con_f"] = _rows(d_xcon, 3 * C).T @ fd.reshape(-1, F)
    return out


def readout_grads(d_log_rates, factors, W_ro):
    """Gradients of the read-out GEMM from the log-rate gradient of poisson_elbo.

    Args:
        d_log_rates [R, N], factors [R, F], W_ro [N, F] (R = T * B; [T, B, ...] arrays may be
        passed reshaped).

    Returns:
        (d_factors [R, F], d_W_ro [N, F]).
    """
    return d_log_rates @ W_ro, d_log_rates.T @ factors
