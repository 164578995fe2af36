"""NumPy references of the decoder, ELBO and Adam contracts (csrc/decoder.h, elbo.h, adam.h).

They run in whatever dtype their inputs have: float64 gives the reference, float32 the CPU
float32 error that the GPU's error is measured against. The decoder follows decoder_cpu.cpp
step by step; the ELBO and Adam follow the formulas of their headers. test_cuda.py checks the
float64 gradients of these references against finite differences, so a GPU kernel that matches
them matches the math.
"""
from __future__ import annotations

import math

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# Clipped GRU (gru_cell.h)


def gru_step(xin, h, W_hh, clip):
    """xin [B, >=3H], h [B, H] -> (h' [B, H], gates [B, 3H])."""
    H = h.shape[1]
    hzr = h @ W_hh[: 2 * H].T
    z = sigmoid(xin[:, :H] + hzr[:, :H])
    r = sigmoid(xin[:, H : 2 * H] + hzr[:, H:])
    n = np.tanh(xin[:, 2 * H : 3 * H] + (r * h) @ W_hh[2 * H :].T)
    h_new = np.clip(z * h + (1 - z) * n, -clip, clip)
    return h_new, np.concatenate([z, r, n], axis=1)


def gru_step_backward(dh, h, gates, W_hh, clip):
    """Gradient on h' -> (d pre-activations [B, 3H], gradient on h [B, H])."""
    H = h.shape[1]
    z, r, n = gates[:, :H], gates[:, H : 2 * H], gates[:, 2 * H :]
    pre = z * h + (1 - z) * n
    g = dh * ((pre >= -clip) & (pre <= clip))
    dz = g * (h - n) * z * (1 - z)
    dn = g * (1 - z) * (1 - n * n)
    drh = dn @ W_hh[2 * H :]
    dr = drh * h * r * (1 - r)
    dh_prev = g * z + drh * r + np.concatenate([dz, dr], axis=1) @ W_hh[: 2 * H]
    return np.concatenate([dz, dr, dn], axis=1), dh_prev


# Decoder (decoder.h)


def _mask(m, t):
    return 1.0 if m is None else m[t]


def decoder_forward(a, T, B, C, U, G, F, clip, sample):
    """a: dict of DecoderForwardArgs inputs (xcon/xgen may be wider than 3C/3G). Returns the
    outputs as a dict (con_* / co_* / u only when C > 0)."""
    dt = a["xgen"].dtype
    o = {
        "gen_states": np.zeros((T, B, G), dt),
        "gen_gates": np.zeros((T, B, 3 * G), dt),
        "factors": np.zeros((T, B, F), dt),
    }
    if C:
        for k, w in (("con_states", C), ("con_gates", 3 * C), ("co_mean", U),
                     ("co_logvar", U), ("u", U)):
            o[k] = np.zeros((T, B, w), dt)
    f, g = a["f0"], a["g0"]
    c = a["c0"] if C else None
    for t in range(T):
        xg = a["xgen"][t][:, : 3 * G]
        if C:
            fd = f * _mask(a.get("mask_f"), t)
            xc = a["xcon"][t][:, : 3 * C] + fd @ a["W_con_f"].T
            c, o["con_gates"][t] = gru_step(xc, c, a["W_con_hh"], clip)
            o["con_states"][t] = c
            co = c @ a["W_co"].T + a["b_co"]
            mean, logvar = co[:, :U], co[:, U:]
            u = mean + np.exp(0.5 * logvar) * a["eps"][t] if sample else mean
            o["co_mean"][t], o["co_logvar"][t], o["u"][t] = mean, logvar, u
            xg = xg + u @ a["W_gen_u"].T
        g, o["gen_gates"][t] = gru_step(xg, g, a["W_gen_hh"], clip)
        o["gen_states"][t] = g
        f = (g * _mask(a.get("mask_g"), t)) @ a["W_fac"].T
        o["factors"][t] = f
    return o


def decoder_backward(a, o, T, B, C, U, G, F, clip, sample, d_factors=None, d_co_mean=None,
                     d_co_logvar=None):
    """BPTT of decoder_forward. Returns the gradients of decoder.h plus the per-step outputs of
    the CUDA op (d_factors_total, d_co, rh_gen, rh_con)."""
    dt = a["xgen"].dtype
    r = {
        "d_xgen": np.zeros((T, B, 3 * G), dt),
        "d_factors_total": np.zeros((T, B, F), dt),
        "rh_gen": np.zeros((T, B, G), dt),
    }
    if C:
        r.update(d_xcon=np.zeros((T, B, 3 * C), dt), d_co=np.zeros((T, B, 2 * U), dt),
                 rh_con=np.zeros((T, B, C), dt))
    dg = np.zeros((B, G), dt)
    dc = np.zeros((B, C), dt)
    df = np.zeros((B, F), dt)
    for t in range(T - 1, -1, -1):
        dft = df + (d_factors[t] if d_factors is not None else 0)
        r["d_factors_total"][t] = dft
        dg = dg + (dft @ a["W_fac"]) * _mask(a.get("mask_g"), t)
        g_prev = a["g0"] if t == 0 else o["gen_states"][t - 1]
        gg = o["gen_gates"][t]
        r["rh_gen"][t] = gg[:, G : 2 * G] * g_prev
        dxg, dg = gru_step_backward(dg, g_prev, gg, a["W_gen_hh"], clip)
        r["d_xgen"][t] = dxg
        df = np.zeros((B, F), dt)
        if C:
            du = dxg @ a["W_gen_u"]
            dm = du + (d_co_mean[t] if d_co_mean is not None else 0)
            dl = du * a["eps"][t] * 0.5 * np.exp(0.5 * o["co_logvar"][t]) if sample else 0 * du
            dl = dl + (d_co_logvar[t] if d_co_logvar is not None else 0)
            r["d_co"][t] = np.concatenate([dm, dl], axis=1)
            dc = dc + r["d_co"][t] @ a["W_co"]
            c_prev = a["c0"] if t == 0 else o["con_states"][t - 1]
            cg = o["con_gates"][t]
            r["rh_con"][t] = cg[:, C : 2 * C] * c_prev
            dxc, dc = gru_step_backward(dc, c_prev, cg, a["W_con_hh"], clip)
            r["d_xcon"][t] = dxc
            df = (dxc @ a["W_con_f"]) * _mask(a.get("mask_f"), t)
    r["d_g0"], r["d_f0"] = dg, df
    if C:
        r["d_c0"] = dc
    return r


# ELBO (elbo.h)


def lgamma(x):
    return np.vectorize(math.lgamma, otypes=[np.float64])(x).astype(x.dtype)


def poisson_elbo(factors, W_ro, b_ro, counts, loss_weight, grad_mask, scale, T, B):
    """Returns (loss, log_rates, nll_tn, d_log_rates, d_b_ro); R = T * B rows."""
    x = factors @ W_ro.T + b_ro
    valid = ~np.isnan(counts)
    y = np.where(valid, counts, 0)
    w = 1 if loss_weight is None else loss_weight
    gm = 1 if grad_mask is None else grad_mask
    rate = np.exp(x)
    nll = np.where(valid, w * (rate - y * x + lgamma(y + 1)), 0)
    d = np.where(valid, scale * w * gm * (rate - y), 0).astype(x.dtype)
    N = x.shape[1]
    return (scale * nll.sum(), x, nll.reshape(T, B, N).sum(axis=1), d, d.sum(axis=0))


def kl_ic(mean, logvar, prior_mean, prior_logvar, var_min, scale):
    """Returns (kl, d_mean, d_logvar, d_prior_mean)."""
    B = mean.shape[0]
    v = np.exp(logvar) + var_min
    pv = np.exp(prior_logvar)
    diff = mean - prior_mean
    kl = 0.5 * (prior_logvar - np.log(v)) + (v + diff**2) / (2 * pv) - 0.5
    c = scale / B
    d_mean = c * diff / pv
    d_logvar = c * (0.5 / pv - 0.5 / v) * np.exp(logvar)
    return c * kl.sum(), d_mean, d_logvar, -d_mean.sum(axis=0)


def kl_co(mean, logvar, eps, logtau, lognvar, scale):
    """One-sample KL of the inferred inputs against the AR(1) prior.
    Returns (kl, d_mean, d_logvar, d_logtau, d_lognvar)."""
    T, B, U = mean.shape
    log2pi = math.log(2 * math.pi)
    tau = np.exp(logtau)
    alpha = np.exp(-1 / tau)
    nvar = np.exp(lognvar)
    var0 = nvar / (1 - alpha**2)
    sd = np.exp(0.5 * logvar)
    s = mean + sd * eps
    s_prev = np.concatenate([np.zeros_like(s[:1]), s[:-1]], axis=0)
    var = np.concatenate([np.broadcast_to(var0, s[:1].shape), np.broadcast_to(nvar, s[1:].shape)])
    resid = s - alpha * s_prev  # s_prev = 0 at t = 0
    log_q = -0.5 * eps**2 - 0.5 * log2pi - 0.5 * logvar
    log_p = -0.5 * (log2pi + np.log(var)) - resid**2 / (2 * var)
    c = scale / B
    gs = resid / var
    gs[:-1] -= alpha * resid[1:] / nvar
    d_alpha = np.concatenate(
        [alpha / (1 - alpha**2) - s[:1] ** 2 * alpha / nvar, -resid[1:] * s_prev[1:] / nvar])
    d_nvar = np.concatenate(
        [0.5 / nvar - s[:1] ** 2 * (1 - alpha**2) / (2 * nvar**2),
         0.5 / nvar - resid[1:] ** 2 / (2 * nvar**2)])
    return (c * (log_q - log_p).sum(), c * gs, c * (gs * 0.5 * sd * eps - 0.5),
            c * d_alpha.sum(axis=(0, 1)) * alpha / tau, c * d_nvar.sum(axis=(0, 1)) * nvar)


# Adam (adam.h)


def adam_step(params, grads, m, v, mask, lr, beta1, beta2, eps, weight_decay, max_grad_norm,
              step):
    """Returns (params, m, v, grad_norm) after one step; inputs are not modified."""
    norm = np.sqrt(np.sum(grads.astype(np.float64) ** 2)).astype(grads.dtype)
    if not np.isfinite(norm):
        return params.copy(), m.copy(), v.copy(), norm
    c = min(1.0, max_grad_norm / (norm + 1e-6)) if max_grad_norm > 0 else 1.0
    dt = params.dtype.type
    g = dt(c) * grads
    p = params - dt(lr * weight_decay) * params
    m1 = dt(beta1) * m + dt(1 - beta1) * g
    v1 = dt(beta2) * v + dt(1 - beta2) * g * g
    p = p - dt(lr) * (m1 / dt(1 - beta1**step)) / (np.sqrt(v1 / dt(1 - beta2**step)) + dt(eps))
    keep = np.ones_like(params, bool) if mask is None else mask != 0
    return (np.where(keep, p, params), np.where(keep, m1, m), np.where(keep, v1, v), norm)
