"""JAX implementation of the lfads_fast model, for parity tests and framework benchmarks.

Written from docs/math.md like tests/torch_reference.py, in JAX's own idiom: the recurrences
are ``lax.scan`` loops, the input projections of all steps are one product before each scan,
gradients come from ``jax.value_and_grad`` and the whole loss is one ``jax.jit`` program. It
does not import lfads_fast. Parameters, noise and outputs use the names, shapes and layouts of
tests/torch_reference.py (batch-major data and outputs, time-major noise), so the two
references and the compiled model can be fed the same arrays. Single-session models only.

Float64 is enabled at import (``jax_enable_x64``) so that the gradient checks can run in
float64; float32 inputs still compute in float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

jax.config.update("jax_enable_x64", True)

# Noise keys read here (time-major [T, B, ...] or [B, ...]); None or absent = off.
NOISE_KEYS = ("ic_eps", "co_eps", "co_kl_eps", "cd_keep", "drop_data", "drop_ic_hn", "drop_ci",
              "drop_fac_in", "drop_g0", "drop_gen", "drop_ext")
TERMS = ("loss", "recon", "kl_ic", "kl_co", "l2")


def loss_and_grads(params, cfg, encod_data, recon_data, ext_input=None, noise=None, *,
                   kl_ramp=1.0, l2_ramp=1.0, dtype=np.float64):
    """Loss terms and parameter gradients of one batch (one jitted call).

    Args:
        params: dict name -> array with the names and shapes of
            torch_reference.param_shapes(cfg).
        cfg: object with the LFADSConfig attributes (LFADSConfig or torch_reference.make_config).
        encod_data: [B, T_e, N_e] spike counts; NaN enters as 0.
        recon_data: [B, T_r, N_r]; NaN bins are left out of the loss.
        ext_input: [B, T_r, E] or [B, T_e, E] (zero-padded to T_r), or None.
        noise: dict of NOISE_KEYS (time-major arrays, as model.draw_noise returns), or None.
        kl_ramp, l2_ramp: factors on the KL terms and the L2 penalty.
        dtype: numpy dtype of the computation.

    Returns:
        (terms, grads): terms a dict of floats (TERMS), grads a dict name -> numpy array.
    """
    step = make_loss_and_grads(cfg, kl_ramp=kl_ramp, l2_ramp=l2_ramp)
    p, inputs = device_inputs(params, cfg, encod_data, recon_data, ext_input, noise, dtype)
    terms, grads = step(p, inputs)
    return ({k: float(v) for k, v in terms.items()},
            {k: np.asarray(v) for k, v in grads.items()})


def make_loss_and_grads(cfg, *, kl_ramp=1.0, l2_ramp=1.0):
    """A jitted function (params, inputs) -> (terms, grads) for one configuration.

    ``inputs`` is what ``device_inputs`` returns. The first call compiles (time it apart).
    """
    def loss(p, inputs):
        terms = _terms(p, cfg, inputs, kl_ramp, l2_ramp)
        return terms["loss"], terms

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    @jax.jit
    def step(p, inputs):
        (_, terms), grads = grad_fn(p, inputs)
        return terms, grads

    return step


def make_forward(cfg):
    """A jitted function (params, inputs) -> batch-major outputs (rates, factors, states...)."""

    @jax.jit
    def forward(p, inputs):
        out = _forward(p, cfg, inputs)
        out["output_params"] = jnp.exp(out.pop("log_rates"))
        return out

    return forward


def device_inputs(params, cfg, encod_data, recon_data, ext_input, noise, dtype):
    """JAX arrays of the parameters and of the batch (data batch-major, noise batch-major)."""
    dtype = np.dtype(dtype)
    p = {k: jnp.asarray(np.asarray(v, dtype=dtype)) for k, v in params.items()}
    encod_data = np.asarray(encod_data, dtype=dtype)
    recon_data = np.asarray(recon_data, dtype=dtype)
    B = encod_data.shape[0]
    ext = np.zeros((B, cfg.recon_seq_len, cfg.ext_input_dim), dtype=dtype)
    if ext_input is not None:
        ext_input = np.asarray(ext_input, dtype=dtype)
        ext[:, : ext_input.shape[1]] = ext_input
    inputs = {"encod_data": jnp.asarray(encod_data), "recon_data": jnp.asarray(recon_data),
              "ext_input": jnp.asarray(ext)}
    noise = noise or {}
    unknown = sorted(set(noise) - set(NOISE_KEYS))
    if unknown:
        raise ValueError(f"noise has unknown keys {unknown}")
    for key in NOISE_KEYS:
        value = noise.get(key)
        if value is not None:
            value = np.asarray(value, dtype=dtype)
            if value.ndim == 3:
                value = np.swapaxes(value, 0, 1)
            if value.size == 0:  # a width-0 mask of a part the model lacks
                value = None
        inputs[key] = None if value is None else jnp.asarray(value)
    return p, inputs


# Model


def _uses_controller(cfg):
    return cfg.ci_enc_dim > 0 and cfg.con_dim > 0 and cfg.co_dim > 0


def _scaled(x, multiplier):
    return x if multiplier is None else x * multiplier


def _cell(xproj_t, h, W_hh, clip):
    """One clipped GRU step; xproj_t = x W_ih^T + b_ih [B, 3H] (gates z, r, n)."""
    H = h.shape[1]
    hzr = h @ W_hh[: 2 * H].T
    z = jax.nn.sigmoid(xproj_t[:, :H] + hzr[:, :H])
    r = jax.nn.sigmoid(xproj_t[:, H : 2 * H] + hzr[:, H:])
    n = jnp.tanh(xproj_t[:, 2 * H :] + (r * h) @ W_hh[2 * H :].T)
    return jnp.clip(z * h + (1 - z) * n, -clip, clip)


def _gru(x, h0, W_ih, b_ih, W_hh, clip, reverse):
    """States [B, T, H] of a clipped GRU over x [B, T, I], each at its own time index."""
    xproj = jnp.swapaxes(x @ W_ih.T + b_ih, 0, 1)  # [T, B, 3H]

    def body(h, xp_t):
        h = _cell(xp_t, h, W_hh, clip)
        return h, h

    _, hs = lax.scan(body, jnp.broadcast_to(h0, (x.shape[0], h0.shape[0])), xproj,
                     reverse=reverse)
    return jnp.swapaxes(hs, 0, 1)


def _bidirectional(x, p, prefix, clip):
    h0 = p[f"{prefix}_h0"]
    out = []
    for d, direction in enumerate(("fwd", "bwd")):
        w = [p[f"{prefix}_{direction}_{k}"] for k in ("W_ih", "b_ih", "W_hh")]
        out.append(_gru(x, h0[d], *w, clip, reverse=direction == "bwd"))
    return out


def _forward(p, cfg, inputs):
    clip = cfg.cell_clip
    has_con = _uses_controller(cfg)
    x = jnp.nan_to_num(inputs["encod_data"], nan=0.0)
    if inputs["cd_keep"] is not None:
        x = x * inputs["cd_keep"] / (1.0 - cfg.cd_rate)
    x = _scaled(x, inputs["drop_data"])
    B, t_e = x.shape[:2]
    t_r = cfg.recon_seq_len

    hf, hb = _bidirectional(x, p, "ic_enc", clip)
    h_n = _scaled(jnp.concatenate([hf[:, -1], hb[:, 0]], axis=1), inputs["drop_ic_hn"])
    ic_out = h_n @ p["ic_linear_W"].T + p["ic_linear_b"]
    ic_mean, ic_logvar = ic_out[:, : cfg.ic_dim], ic_out[:, cfg.ic_dim :]
    ic_std = jnp.sqrt(jnp.exp(ic_logvar) + cfg.ic_post_var_min)
    ic = ic_mean if inputs["ic_eps"] is None else ic_mean + ic_std * inputs["ic_eps"]

    fac_W = p["fac_W"] / jnp.linalg.norm(p["fac_W"], axis=1, keepdims=True)
    g0 = ic @ p["ic_to_g0_W"].T + p["ic_to_g0_b"]
    f0 = _scaled(g0, inputs["drop_g0"]) @ fac_W.T

    def tm(a, width):  # batch-major [B, T, W] -> time-major, or zeros when off
        if a is None:
            return jnp.ones((t_r, B, width), dtype=x.dtype)
        return jnp.swapaxes(a, 0, 1)

    ext = jnp.swapaxes(_scaled(inputs["ext_input"], inputs["drop_ext"]), 0, 1)
    drop_gen = tm(inputs["drop_gen"], cfg.gen_dim)
    U = cfg.co_dim if has_con else 0
    if has_con:
        cf, cb = _bidirectional(x, p, "ci_enc", clip)
        H = cf.shape[2]
        kept = max(t_e - cfg.ci_lag, 0)
        cf = jnp.concatenate([jnp.zeros((B, t_e - kept, H), x.dtype), cf[:, :kept]], axis=1)
        cb = jnp.concatenate([cb[:, t_e - kept :], jnp.zeros((B, t_e - kept, H), x.dtype)], axis=1)
        ci = jnp.concatenate([cf, cb], axis=2)
        ci = jnp.concatenate([ci, jnp.zeros((B, t_r - t_e, 2 * H), x.dtype)], axis=1)
        ci = _scaled(ci, inputs["drop_ci"])
        C = cfg.con_dim
        W_ci, W_f = p["con_W_ih"][:, : 2 * H], p["con_W_ih"][:, 2 * H :]
        xcon = jnp.swapaxes(ci @ W_ci.T + p["con_b_ih"], 0, 1)  # [T, B, 3C]
        drop_fac_in = tm(inputs["drop_fac_in"], cfg.fac_dim)
        co_eps = (jnp.zeros((t_r, B, U), x.dtype) if inputs["co_eps"] is None
                  else jnp.swapaxes(inputs["co_eps"], 0, 1))
        c0 = jnp.broadcast_to(p["con_h0"], (B, C))
    W_gen_u = p["gen_W_ih"][:, :U]
    xgen = ext @ p["gen_W_ih"][:, U:].T + p["gen_b_ih"]  # [T, B, 3G]

    def body(carry, step):
        g, f, c = carry
        out = {}
        if has_con:
            xc, dfi, eps, xg, dg = step
            c = _cell(xc + (f * dfi) @ W_f.T, c, p["con_W_hh"], clip)
            co = c @ p["co_linear_W"].T + p["co_linear_b"]
            co_mean, co_logvar = co[:, :U], co[:, U:]
            co_std = jnp.exp(0.5 * co_logvar)
            u = co_mean + co_std * eps
            xg = xg + u @ W_gen_u.T
            out.update(con_states=c, co_means=co_mean, co_stds=co_std, u=u)
        else:
            xg, dg = step
        g = _cell(xg, g, p["gen_W_hh"], clip)
        f = (g * dg) @ fac_W.T
        out.update(gen_states=g, factors=f)
        return (g, f, c), out

    if has_con:
        steps = (xcon, drop_fac_in, co_eps, xgen, drop_gen)
        carry = (g0, f0, c0)
    else:
        steps = (xgen, drop_gen)
        carry = (g0, f0, jnp.zeros((B, 0), x.dtype))
    _, series = lax.scan(body, carry, steps)
    out = {k: jnp.swapaxes(v, 0, 1) for k, v in series.items()}
    zeros = jnp.zeros((B, t_r, 0), x.dtype)
    gen_inputs = jnp.concatenate([out.pop("u", zeros), jnp.swapaxes(ext, 0, 1)], axis=2)
    out.setdefault("con_states", zeros)
    out.setdefault("co_means", zeros)
    out.setdefault("co_stds", zeros)
    out.update(gen_inputs=gen_inputs, gen_init=g0, ic_mean=ic_mean, ic_std=ic_std,
               log_rates=out["factors"] @ p["readout_W"].T + p["readout_b"])
    return out


# Loss terms


def _terms(p, cfg, inputs, kl_ramp, l2_ramp):
    out = _forward(p, cfg, inputs)
    recon = _recon_loss(cfg, out["log_rates"], inputs)
    kl_ic = _kl_ic(cfg, out["ic_mean"], out["ic_std"], p["ic_prior_mean"])
    if _uses_controller(cfg):
        kl_co = _kl_co(out["co_means"], out["co_stds"], inputs["co_kl_eps"],
                       p["co_prior_logtau"], p["co_prior_lognvar"])
    else:
        kl_co = jnp.zeros((), recon.dtype)
    l2 = _l2(p, cfg)
    kl = cfg.kl_ic_scale * kl_ic + cfg.kl_co_scale * kl_co
    loss = cfg.loss_scale * (recon + l2_ramp * l2 + kl_ramp * kl)
    return dict(loss=loss, recon=recon, kl_ic=kl_ic, kl_co=kl_co, l2=l2)


def _recon_loss(cfg, log_rates, inputs):
    y = inputs["recon_data"]
    valid = ~jnp.isnan(y)
    y = jnp.where(valid, y, 0.0)
    nll = jnp.exp(log_rates) - y * log_rates + lax.lgamma(y + 1.0)
    if inputs["cd_keep"] is not None:
        # Bins whose input the encoder saw add their value but no gradient.
        t_e, n_e = cfg.encod_seq_len, cfg.encod_data_dim
        grad_mask = jnp.ones_like(nll).at[:, :t_e, :n_e].set(1.0 - inputs["cd_keep"])
        nll = grad_mask * nll + lax.stop_gradient((1.0 - grad_mask) * nll)
    total = jnp.sum(jnp.where(valid, nll, 0.0))
    if cfg.recon_reduce_mean:
        return total / jnp.maximum(jnp.sum(valid), 1)
    return total / y.shape[0]


def _kl_ic(cfg, mean, std, prior_mean):
    v = cfg.ic_prior_var
    kl = 0.5 * math.log(v) - jnp.log(std) + (std**2 + (mean - prior_mean) ** 2) / (2.0 * v) - 0.5
    return kl.sum(axis=1).mean()


def _kl_co(mean, std, eps, logtau, lognvar):
    s = mean if eps is None else mean + std * eps
    log_2pi = math.log(2.0 * math.pi)
    log_q = -0.5 * log_2pi - jnp.log(std) - 0.5 * ((s - mean) / std) ** 2
    alpha = jnp.exp(-1.0 / jnp.exp(logtau))
    nvar = jnp.exp(lognvar)
    resid = jnp.concatenate([s[:, :1], s[:, 1:] - alpha * s[:, :-1]], axis=1)
    var = jnp.concatenate([(nvar / (1.0 - alpha**2))[None],
                           jnp.broadcast_to(nvar, (s.shape[1] - 1, nvar.shape[0]))], axis=0)
    log_p = -0.5 * (log_2pi + jnp.log(var)) - resid**2 / (2.0 * var)
    return (log_q - log_p).sum(axis=(1, 2)).mean()


def _l2(p, cfg):
    terms = [("ic_enc_fwd_W_hh", cfg.l2_ic_enc_scale), ("ic_enc_bwd_W_hh", cfg.l2_ic_enc_scale),
             ("gen_W_hh", cfg.l2_gen_scale)]
    if _uses_controller(cfg):
        terms += [("ci_enc_fwd_W_hh", cfg.l2_ci_enc_scale),
                  ("ci_enc_bwd_W_hh", cfg.l2_ci_enc_scale), ("con_W_hh", cfg.l2_con_scale)]
    penalty = jnp.zeros((), p["gen_W_hh"].dtype)
    size = 0
    for name, scale in terms:
        if scale > 0:
            penalty = penalty + scale * 0.5 * jnp.sum(p[name] ** 2)
            size += p[name].size
    return penalty / (size + 1e-8)
