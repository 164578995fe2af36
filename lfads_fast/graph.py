"""The step graph: forward and backward of one batch over the ops, as functions of the
parameters, the batch and the noise.

Inside, everything is time-major ([T, B, ...]). The arrays are those of the parameters'
module (numpy or cupy): this module never asks which. docs/math.md writes down every
equation implemented here.
"""
from __future__ import annotations

import numpy as np

from . import ops
from .batch import Batch, Segment
from .data import POSTERIOR_FIELDS
from .noise import NoiseReader
from .params import Params, encoder_bins, encoders, l2_terms

__all__ = ["Workspace", "forward", "encode", "repeat_encoded", "backward", "OUTPUTS", "output_names"]

# The outputs of a pass: lfads-torch's names, those of a posterior file.
OUTPUTS = POSTERIOR_FIELDS


def output_names(names) -> tuple:
    """The outputs asked for (None: all) as a tuple of OUTPUTS, checked."""
    if names is None:
        return OUTPUTS
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    bad = [n for n in names if n not in OUTPUTS]
    if bad or not names:
        raise ValueError(f"outputs must name some of {list(OUTPUTS)}, got {list(names)}")
    return names


class Workspace:
    """Scratch arrays reused from step to step: fresh multi-100-MB arrays cost more in page
    faults (or device allocations) than the kernels that fill them. One pass at a time: a
    model is not safe to use from two threads at once.

    Args:
        xp: the array module of the parameters.
        dtype: their dtype.
    """

    def __init__(self, xp, dtype):
        self.xp, self.dtype = xp, dtype
        self._arrays: dict = {}

    def buf(self, name: str, shape: tuple):
        """Scratch array `name` of this shape, reusing the memory of earlier steps (it grows
        to the largest size asked for, so batches of different sizes share it)."""
        n = int(np.prod(shape))
        a = self._arrays.get(name)
        if a is None or a.size < n:
            a = self.xp.empty(n, dtype=self.dtype)
            self._arrays[name] = a
        return a[:n].reshape(shape)


def forward(P: Params, ws: Workspace, batch: Batch, noise: dict, *, grads: bool, kl_ramp: float, l2_ramp: float,
             outputs: bool, ic: np.ndarray | None = None, encoded: dict | None = None,
             recon: bool = True, average: int = 1, keep: tuple = OUTPUTS) -> dict:
    """One pass; ic replaces the posterior's sample (refine_ic); encoded is the _encode
    result of an earlier pass of the same batch and noise, reused instead of encoding
    again (its arrays live in this model's buffers, so no other pass may run between).
    recon=False (outputs only, no gradients): the batch has no targets, so only the
    read-out runs (log-rates), not the Poisson likelihood; terms["recon"] is NaN.
    average > 1: the batch holds each trial `average` times in a row, and the outputs are
    the per-trial means over them (averaged before the arrays are made batch-major).
    keep: the outputs to make (output_names)."""
    cfg, p, dt = P.config, P.views, P.dtype
    xp = P.xp
    B = batch.size
    Tr, Nr = cfg.recon_seq_len, cfg.recon_data_dim
    G, F, U = cfg.gen_dim, cfg.fac_dim, cfg.co_dim
    con = cfg.use_con
    clip = cfg.cell_clip
    nz = NoiseReader(noise, dt, P.xp)
    c: dict = {"batch": batch, "nz": nz, "kl_ramp": kl_ramp, "l2_ramp": l2_ramp}
    c.update(encode(P, ws, batch, nz) if encoded is None else encoded)
    cd_keep, cd_pass = c["cd_keep"], c["cd_pass"]
    if ic is not None:  # given initial conditions replace the sample
        c.update(ic_samp=ic, ic_eps=None)
    else:
        ic_eps = c["ic_eps"]
        c["ic_samp"] = c["ic_mean"] + c["ic_std"] * ic_eps if ic_eps is not None else c["ic_mean"]
    c["ic_given"] = ic is not None
    ic_samp = c["ic_samp"]

    # Generator initial state and factors.
    g0 = xp.ascontiguousarray(ic_samp @ p["ic_to_g0_W"].T + p["ic_to_g0_b"])
    fac_norm = xp.linalg.norm(p["fac_W"], axis=1, keepdims=True)
    W_fac = xp.ascontiguousarray(p["fac_W"] / fac_norm)
    drop_g0 = nz.get("drop_g0", (B, G))
    g0_d = g0 * drop_g0 if drop_g0 is not None else g0
    f0 = xp.ascontiguousarray(g0_d @ W_fac.T)
    c.update(g0=g0, g0_d=g0_d, drop_g0=drop_g0, W_fac=W_fac, fac_norm=fac_norm)

    # Decoder inputs (their projections come from _encode).
    dec = {"g0": g0, "f0": f0, "W_fac": W_fac, "W_gen_hh": p["gen_W_hh"],
           "mask_g": nz.get("drop_gen", (Tr, B, G))}
    if con:
        nci = cfg.ci_enc_dirs * cfg.ci_enc_dim
        dec.update(xcon=c["xcon"],
                   W_con_f=xp.ascontiguousarray(p["con_W_ih"][:, nci:]),
                   W_con_hh=p["con_W_hh"],
                   c0=xp.ascontiguousarray(xp.broadcast_to(p["con_h0"], (B, cfg.con_dim))),
                   W_co=p["co_linear_W"], b_co=p["co_linear_b"],
                   eps=nz.get("co_eps", (Tr, B, U)),
                   mask_f=nz.get("drop_fac_in", (Tr, B, F)),
                   W_gen_u=xp.ascontiguousarray(p["gen_W_ih"][:, :U]))
    dec["xgen"] = c["xgen"]
    sample = con and dec.get("eps") is not None
    C = cfg.con_dim if con else 0
    dec_sizes = {"con_states": C, "con_gates": 3 * C, "co_mean": U if con else 0,
                 "co_logvar": U if con else 0, "u": U if con else 0, "gen_states": G,
                 "gen_gates": 3 * G, "factors": F}
    out = ops.decoder_forward(dec, Tr, clip=clip, sample=sample,
                              out={k: ws.buf(k, (Tr, B, n)) for k, n in dec_sizes.items()})
    c.update(dec=dec, dec_out=out, sample=sample)

    # Reconstruction (read-out + Poisson NLL, fused with its gradient) and the KL terms.
    terms = {}
    d_factors = ws.buf("d_factors", (Tr, B, F)) if grads else None
    if not recon:
        if grads or not outputs:
            raise ValueError("recon=False is for outputs without gradients")
        elbos = [_readout(P, ws, out["factors"], batch.segments)]
    elif batch.segments is None:
        recon_scale = 1.0 / (batch.n_valid if cfg.recon_reduce_mean else B)
        weight = None if batch.recon_weight is None else batch.recon_weight.reshape(Tr * B, Nr)
        elbo = ops.poisson_elbo(out["factors"].reshape(Tr * B, F), p["readout_W"], p["readout_b"],
                                batch.recon.reshape(Tr * B, Nr), T=Tr, scale=cfg.loss_scale * recon_scale,
                                loss_weight=weight,
                                grad_mask=_recon_grad_mask(P, ws, cd_keep, cd_pass, B, Nr),
                                grads=grads, log_rates=outputs,
                                d_factors=None if d_factors is None else d_factors.reshape(Tr * B, F))
        elbos = [elbo]
    else:
        elbos = _session_elbos(P, ws, batch.segments, cd_keep, cd_pass, out["factors"], d_factors,
                               grads=grads, log_rates=outputs)
    terms["recon"] = sum(e["loss"] for e in elbos) / cfg.loss_scale
    c.update(elbos=elbos, d_factors=d_factors)

    kl_ic_w = cfg.loss_scale * kl_ramp * cfg.kl_ic_scale
    kl = ops.kl_ic(c["ic_mean"], c["ic_logvar"], p["ic_prior_mean"],
                   xp.full(cfg.ic_dim, np.log(cfg.ic_prior_var), dtype=dt),
                   var_min=cfg.ic_post_var_min, scale=1.0, grads=grads)
    terms["kl_ic"] = kl["kl"]
    c["kl_ic"] = kl
    c["kl_ic_w"] = kl_ic_w
    if con:
        kl_co_w = cfg.loss_scale * kl_ramp * cfg.kl_co_scale
        kl = ops.kl_co(out["co_mean"], out["co_logvar"], nz.require("co_kl_eps", (Tr, B, U)),
                       p["co_prior_logtau"], p["co_prior_lognvar"], scale=1.0, grads=grads)
        terms["kl_co"] = kl["kl"]
        c["kl_co"] = kl
        c["kl_co_w"] = kl_co_w
    else:
        terms["kl_co"] = 0.0

    l2, l2_denom = 0.0, 0.0
    for name, scale in l2_terms(P.config):
        if scale > 0:
            W = p[name]
            l2 += scale * 0.5 * ops.scalar(xp.vdot(W, W))
            l2_denom += W.size
    terms["l2"] = l2 / (l2_denom + 1e-8)
    c["l2_denom"] = l2_denom
    terms["loss"] = cfg.loss_scale * (terms["recon"] + l2_ramp * terms["l2"] + kl_ramp * (
        cfg.kl_ic_scale * terms["kl_ic"] + cfg.kl_co_scale * terms["kl_co"]))
    c["terms"] = terms
    if outputs:
        c["outputs"] = _outputs(P, c, terms, average, keep)
    return c


def encode(P: Params, ws: Workspace, batch: Batch, nz) -> dict:
    """The part of a pass that does not depend on the initial condition: the encoders,
    the initial-condition posterior, the controller's input projection and the external
    inputs' projection (a dict of cache entries for _forward)."""
    cfg, p, dt = P.config, P.views, P.dtype
    xp = P.xp
    Te, B, Ne = cfg.encod_seq_len, batch.size, cfg.encod_data_dim
    Tr, Hi, Hc, G, E = cfg.recon_seq_len, cfg.ic_enc_dim, cfg.ci_enc_dim, cfg.gen_dim, cfg.ext_input_dim
    clip = cfg.cell_clip
    con = cfg.use_con
    c: dict = {}
    # Encoder input: coordinated dropout (on the recorded neurons), the sessions' read-ins,
    # then dropout.
    x1, x = _with_ones(ws, "x", (Te, B, Ne))
    drop_data = nz.get("drop_data", (Te, B, Ne))
    if batch.segments is None:
        cd_keep, cd_pass = (nz.get(key, (Te, B, Ne)) for key in ("cd_keep", "cd_pass"))
        if cd_keep is not None:
            xp.multiply(batch.encod, cd_keep, out=x)
            x *= dt.type(1.0 / (1.0 - cfg.cd_rate))
            if drop_data is not None:
                x *= drop_data
        elif drop_data is not None:  # one pass: copy and mask
            xp.multiply(batch.encod, drop_data, out=x)
        else:
            x[...] = batch.encod
    else:
        shapes = [(Te, seg.size, cfg.session_neurons[seg.session]) for seg in batch.segments]
        cd_keep, cd_pass = (nz.get_segments(key, shapes) for key in ("cd_keep", "cd_pass"))
        c["readin_in"] = _readin(P, batch.segments, cd_keep, x)
        if drop_data is not None:
            x *= drop_data
    if cd_pass is not None and cd_keep is None:
        raise ValueError("noise['cd_pass'] is given without noise['cd_keep']: the pass mask "
                         "only acts on the bins coordinated dropout kept")
    c.update(x=x, drop_data=drop_data)

    # One GEMM projects the input for all encoder GRUs, the bias included ([x, 1] times
    # [W, b]: no pass of its own over the projection, forward or backward). Spike counts
    # are mostly zeros: without read-ins, only their nonzeros are multiplied (ops.matmul).
    enc = encoders(P.config)
    xproj = ws.buf("xproj", (Te, B, P.enc_input_weights()[0].shape[0]))
    sparse = "a" if batch.segments is None else None
    ops.matmul(x1.reshape(Te * B, Ne + 1), _stacked(ws, "W_enc1", *P.enc_input_weights()).T,
               out=xproj.reshape(Te * B, -1), sparse=sparse)
    c.update(xproj=xproj, x1=x1)
    c["enc"] = {}
    for name, H, off, rev, h0_name, h0_row in enc:
        t0, t1 = encoder_bins(cfg, name)
        h0 = xp.ascontiguousarray(xp.broadcast_to(p[h0_name][h0_row], (B, H)))
        out = (ws.buf(f"{name}_hs", (t1 - t0, B, H)), ws.buf(f"{name}_gates", (t1 - t0, B, 3 * H)))
        hs, gates = ops.gru_forward(xproj[t0:t1], off, p[f"{name}_W_hh"], h0, reverse=rev, clip=clip,
                                    out=out)
        c["enc"][name] = (hs, gates, h0)

    # Initial-condition posterior.
    hs_f, hs_b = c["enc"]["ic_enc_fwd"][0], c["enc"]["ic_enc_bwd"][0]
    h_n = xp.concatenate([hs_f[-1], hs_b[0]], axis=1)
    drop_ic = nz.get("drop_ic_hn", (B, 2 * Hi))
    h_n_d = h_n * drop_ic if drop_ic is not None else h_n
    ic_params = h_n_d @ p["ic_linear_W"].T + p["ic_linear_b"]
    ic_mean = xp.ascontiguousarray(ic_params[:, : cfg.ic_dim])
    ic_logvar = xp.ascontiguousarray(ic_params[:, cfg.ic_dim :])
    ic_std = xp.sqrt(xp.exp(ic_logvar) + dt.type(cfg.ic_post_var_min))
    c.update(h_n_d=h_n_d, drop_ic=drop_ic, ic_mean=ic_mean, ic_logvar=ic_logvar, ic_std=ic_std,
             ic_eps=nz.get("ic_eps", (B, cfg.ic_dim)), cd_keep=cd_keep, cd_pass=cd_pass)

    # Controller input: the lagged CI, projected by one GEMM over all steps.
    if con:
        nci = cfg.ci_enc_dirs * Hc
        ci1, ci = _with_ones(ws, "ci", (Tr, B, nci))
        lag = cfg.ci_lag
        t0, _ = encoder_bins(cfg, "ci_enc_fwd")  # the CI encoder sees bins t0 .. Te-1
        n = Te - t0
        drop_ci = nz.get("drop_ci", (Tr, B, nci))
        # Each half: the lagged states on bins [a, b), zeros elsewhere, times the dropout
        # mask (written in one pass).
        halves = [(slice(0, Hc), t0 + lag, Te, c["enc"]["ci_enc_fwd"][0][: max(n - lag, 0)])]
        if not cfg.ci_enc_causal:
            halves.append((slice(Hc, nci), t0, Te - lag, c["enc"]["ci_enc_bwd"][0][lag:]))
        for cols, a, b, src in halves:
            if lag >= n:
                ci[:, :, cols] = 0
                continue
            ci[:a, :, cols] = 0
            ci[b:, :, cols] = 0
            if drop_ci is None:
                ci[a:b, :, cols] = src
            else:
                xp.multiply(src, drop_ci[a:b, :, cols], out=ci[a:b, :, cols])
        xcon = ws.buf("xcon", (Tr, B, 3 * cfg.con_dim))
        ops.matmul(ci1.reshape(Tr * B, nci + 1),
                   _stacked(ws, "W_con1", p["con_W_ih"][:, :nci], p["con_b_ih"]).T,
                   out=xcon.reshape(Tr * B, -1))
        c.update(ci1=ci1, drop_ci=drop_ci, xcon=xcon)

    # Generator input from the external inputs (one GEMM over all steps).
    Ug = cfg.co_dim if con else 0
    xgen = ws.buf("xgen", (Tr, B, 3 * G))
    if E > 0:
        drop_ext = nz.get("drop_ext", (Tr, B, E))
        ext_d = batch.ext * drop_ext if drop_ext is not None else batch.ext
        ops.matmul(ext_d.reshape(Tr * B, E), p["gen_W_ih"][:, Ug:].T, out=xgen.reshape(Tr * B, -1))
        xgen += p["gen_b_ih"]
        c.update(ext_d=ext_d)
    else:
        xgen[...] = p["gen_b_ih"]
    c["xgen"] = xgen
    return c


def repeat_encoded(P: Params, c: dict, reps: int, nz: NoiseReader, size: int) -> dict:
    """An encode() result of B trials as that of a batch holding each trial reps times in a
    row (size = B * reps rows, trial-major), for a pass without gradients: the posteriors
    and the controller's and generator's input projections repeated, the initial
    condition's sampling noise from nz (the repeated batch's). The encoders run once per
    trial instead of once per row: they see the same data and, without dropout, give the
    same result for every repeat.
    """
    if c["cd_keep"] is not None:
        raise ValueError("repeat_encoded is for passes without coordinated dropout")
    xp = P.xp
    out = {k: xp.repeat(c[k], reps, axis=0) for k in ("ic_mean", "ic_logvar", "ic_std")}
    out.update({k: xp.repeat(c[k], reps, axis=1) for k in ("xcon", "xgen", "ext_d") if k in c})
    out.update(cd_keep=None, cd_pass=None, ic_eps=nz.get("ic_eps", (size, P.config.ic_dim)))
    return out


def backward(P: Params, ws: Workspace, c: dict, ic_only: bool = False) -> np.ndarray:
    """The gradient of the total loss (flat, the parameters' layout); with ic_only, only
    the reconstruction term's gradient with respect to the initial-condition sample
    [B, ic_dim] (refine_ic), and no parameter gradients past the decoder."""
    cfg, p, dt = P.config, P.views, P.dtype
    xp = P.xp
    grad = xp.zeros_like(P.flat)
    g = P.views_of(grad)
    batch = c["batch"]
    Te, B, Ne = cfg.encod_seq_len, batch.size, cfg.encod_data_dim
    Tr, F, G, U, E = cfg.recon_seq_len, cfg.fac_dim, cfg.gen_dim, cfg.co_dim, cfg.ext_input_dim
    Hi, Hc = cfg.ic_enc_dim, cfg.ci_enc_dim
    con = cfg.use_con
    clip = cfg.cell_clip
    dec, out = c["dec"], c["dec_out"]
    d_seq: dict = {}  # the CI encoders' output gradients

    if batch.segments is None:
        g["readout_W"][...] = c["elbos"][0]["d_W_ro"]
        g["readout_b"][...] = c["elbos"][0]["d_b_ro"]
    else:
        for seg, e in zip(batch.segments, c["elbos"]):
            g[f"readout_W_{seg.session}"][...] = e["d_W_ro"]
            g[f"readout_b_{seg.session}"][...] = e["d_b_ro"]
    d_co_mean = d_co_logvar = None
    if con:
        w = dt.type(c["kl_co_w"])
        d_co_mean = c["kl_co"]["d_mean"] * w
        d_co_logvar = c["kl_co"]["d_logvar"] * w
        g["co_prior_logtau"][...] = c["kl_co"]["d_logtau"] * w
        g["co_prior_lognvar"][...] = c["kl_co"]["d_lognvar"] * w
    C = cfg.con_dim if con else 0
    Uc = U if con else 0
    dec_ws = {"work": ws.buf("dec_work", (Tr, B, 2 * F + 2 * G + 2 * Uc + C)),
          "d_xgen": ws.buf("d_xgen", (Tr, B, 3 * G)),
          "d_xcon": ws.buf("d_xcon", (Tr, B, 3 * C))}
    d = ops.decoder_backward(dec, out, c["d_factors"], d_co_mean, d_co_logvar,
                             clip=clip, sample=c["sample"], workspace=dec_ws)
    # The initial state's gradient: from the recurrence and from the factors f0 of g0.
    d_g0_d = d["d_f0"] @ c["W_fac"]
    d_g0 = d["d_g0"] + (d_g0_d * c["drop_g0"] if c["drop_g0"] is not None else d_g0_d)
    if ic_only:
        return d_g0 @ p["ic_to_g0_W"]
    g["gen_W_hh"][...] = d["d_W_gen_hh"]
    Ug = U if con else 0
    d_xgen = d["d_xgen"].reshape(Tr * B, 3 * G)
    g["gen_b_ih"][...] = d_xgen.sum(axis=0)
    if E > 0:
        ops.matmul(d_xgen.T, c["ext_d"].reshape(Tr * B, E), out=g["gen_W_ih"][:, Ug:])
    if con:
        g["gen_W_ih"][:, :U] = d["d_W_gen_u"]
        g["co_linear_W"][...] = d["d_W_co"]
        g["co_linear_b"][...] = d["d_b_co"]
        g["con_W_hh"][...] = d["d_W_con_hh"]
        g["con_h0"][...] = d["d_c0"].sum(axis=0)
        d_xcon = d["d_xcon"].reshape(Tr * B, -1)
        nci = cfg.ci_enc_dirs * Hc
        g["con_W_ih"][:, nci:] = d["d_W_con_f"]
        d_W1 = ws.buf("d_W_con1", (d_xcon.shape[1], nci + 1))
        ops.matmul(d_xcon.T, c["ci1"].reshape(Tr * B, nci + 1), out=d_W1)
        g["con_W_ih"][:, :nci] = d_W1[:, :nci]
        g["con_b_ih"][...] = d_W1[:, nci]
        d_ci = ws.buf("d_ci", (Tr, B, nci))
        ops.matmul(d_xcon, p["con_W_ih"][:, :nci], out=d_ci.reshape(Tr * B, -1))
        if c["drop_ci"] is not None:
            d_ci *= c["drop_ci"]
        # Undo the lag: ci[t0 + q] = [cf[q - lag], cb[q + lag]] for the CI encoder's bins
        # t0 + q, q < n.
        lag = cfg.ci_lag
        t0, _ = encoder_bins(cfg, "ci_enc_fwd")
        n = Te - t0
        d_cf = ws.buf("d_cf", (n, B, Hc))
        d_cf[max(n - lag, 0) :] = 0
        if lag < n:
            d_cf[: n - lag] = d_ci[t0 + lag : Te, :, :Hc]
        d_seq["ci_enc_fwd"] = d_cf
        if not cfg.ci_enc_causal:
            d_cb = ws.buf("d_cb", (n, B, Hc))
            d_cb[: min(lag, n)] = 0
            if lag < n:
                d_cb[lag:] = d_ci[t0 : Te - lag, :, Hc:]
            d_seq["ci_enc_bwd"] = d_cb

    # Factors of the initial state, and the row normalisation of fac_W.
    d_W_fac = d["d_W_fac"] + d["d_f0"].T @ c["g0_d"]
    Wn = c["W_fac"]
    g["fac_W"][...] = (d_W_fac - Wn * xp.sum(d_W_fac * Wn, axis=1, keepdims=True)) / c["fac_norm"]

    # Initial condition: g0 = W ic_samp + b; ic_samp = mean + std * eps; KL.
    g["ic_to_g0_W"][...] = d_g0.T @ c["ic_samp"]
    g["ic_to_g0_b"][...] = d_g0.sum(axis=0)
    d_samp = d_g0 @ p["ic_to_g0_W"]
    w = dt.type(c["kl_ic_w"])
    kl = c["kl_ic"]
    d_mean = d_samp + kl["d_mean"] * w
    d_logvar = kl["d_logvar"] * w
    if c["ic_eps"] is not None:
        d_std = d_samp * c["ic_eps"]
        d_logvar = d_logvar + d_std * xp.exp(c["ic_logvar"]) / (2 * c["ic_std"])
    g["ic_prior_mean"][...] = kl["d_prior_mean"] * w
    d_params = xp.concatenate([d_mean, d_logvar], axis=1)
    g["ic_linear_W"][...] = d_params.T @ c["h_n_d"]
    g["ic_linear_b"][...] = d_params.sum(axis=0)
    d_h_n = d_params @ p["ic_linear_W"]
    if c["drop_ic"] is not None:
        d_h_n *= c["drop_ic"]

    # Encoders: BPTT of each GRU into one shared projection-gradient buffer, then one GEMM.
    # Each encoder's backward fills its own 3H columns over its bins; with ic_enc_seq_len the
    # encoders cover different bins, and only the bins outside an encoder's are zeroed.
    d_xproj = ws.buf("d_xproj", c["xproj"].shape)
    for name, H, off, *_ in encoders(cfg):
        t0, t1 = encoder_bins(cfg, name)
        d_xproj[:t0, :, off : off + 3 * H] = 0
        d_xproj[t1:, :, off : off + 3 * H] = 0
    d_final = {"ic_enc_fwd": xp.ascontiguousarray(d_h_n[:, :Hi]),
               "ic_enc_bwd": xp.ascontiguousarray(d_h_n[:, Hi:])}
    for name, H, off, rev, h0_name, h0_row in encoders(P.config):
        hs, gates, h0 = c["enc"][name]
        t0, t1 = encoder_bins(cfg, name)
        d_W_hh, d_h0 = ops.gru_backward(p[f"{name}_W_hh"], h0, hs, gates, d_seq.get(name),
                                        d_final.get(name), d_xproj[t0:t1], off, reverse=rev, clip=clip,
                                        work=ws.buf("gru_work", hs.shape))
        g[f"{name}_W_hh"][...] = d_W_hh
        g[h0_name][h0_row] = d_h0.sum(axis=0)
    d_W_enc, d_b_enc = P.enc_input_weights(grad)
    d_xp = d_xproj.reshape(Te * B, -1)
    d_W1 = ws.buf("d_W_enc1", (d_xp.shape[1], Ne + 1))
    ops.matmul(d_xp.T, c["x1"].reshape(Te * B, Ne + 1), out=d_W1,
               sparse="b" if batch.segments is None else None)
    d_W_enc[...] = d_W1[:, :Ne]
    d_b_enc[...] = d_W1[:, Ne]

    # Session read-ins (frozen ones keep a zero gradient): x = dropout(readin(counts)).
    if batch.segments is not None and cfg.train_readin:
        d_x = ws.buf("d_x", (Te, B, Ne))
        W_enc = P.enc_input_weights()[0]
        ops.matmul(d_xp, W_enc, out=d_x.reshape(Te * B, Ne))
        if c["drop_data"] is not None:
            d_x *= c["drop_data"]
        for seg, counts in zip(batch.segments, c["readin_in"]):
            d_x_s = xp.ascontiguousarray(d_x[:, seg.start : seg.stop]).reshape(-1, Ne)
            ops.matmul(d_x_s.T, counts, out=g[f"readin_W_{seg.session}"], sparse="b")
            g[f"readin_b_{seg.session}"][...] = d_x_s.sum(axis=0)

    # L2 penalty on the recurrent weights.
    if c["l2_denom"] > 0:
        coef = cfg.loss_scale * c["l2_ramp"] / (c["l2_denom"] + 1e-8)
        for name, scale in l2_terms(P.config):
            if scale > 0:
                g[name] += dt.type(coef * scale) * p[name]
    return grad


def _with_ones(ws: Workspace, name: str, shape: tuple):
    """Scratch [..., n + 1] whose last column is 1, and the view of its first n columns: a
    GEMM input that carries its bias (``_stacked``) and whose weight-gradient GEMM gives the
    bias gradient in its last column."""
    a = ws.buf(name + "1", (*shape[:-1], shape[-1] + 1))
    a[..., -1] = 1
    return a, a[..., :-1]


def _stacked(ws: Workspace, name: str, W, b):
    """Scratch [W, b] ([rows, k + 1]) for a GEMM with an input from _with_ones."""
    Wb = ws.buf(name, (W.shape[0], W.shape[1] + 1))
    Wb[:, :-1] = W
    Wb[:, -1] = b
    return Wb


def _readin(P: Params, segments: list[Segment], cd_keep: list | None, x: np.ndarray) -> list:
    """Writes each session's read-in of its counts into its rows of x [T_e, B, N_e], one
    GEMM per session over all its bins.

    Returns:
        The read-ins' inputs per segment, [T_e * B_s, n_s] (counts after coordinated
        dropout), which the read-in weight gradients need.
    """
    cfg, p, dt = P.config, P.views, P.dtype
    Te, Ne = cfg.encod_seq_len, cfg.encod_data_dim
    inputs = []
    for i, seg in enumerate(segments):
        counts = seg.encod
        if cd_keep is not None:
            counts = counts * cd_keep[i]
            counts *= dt.type(1.0 / (1.0 - cfg.cd_rate))
        counts = counts.reshape(Te * seg.size, -1)
        proj = ops.matmul(counts, p[f"readin_W_{seg.session}"].T, sparse="a")
        proj += p[f"readin_b_{seg.session}"]
        x[:, seg.start : seg.stop] = proj.reshape(Te, seg.size, Ne)
        inputs.append(counts)
    return inputs


def _readout(P: Params, ws: Workspace, factors, segments: list[Segment] | None) -> dict:
    """The read-out alone: log-rates [T_r * B, n_r] of factors [T_r, B, F] (of the one
    session in segments, if any), as poisson_elbo's result without its likelihood."""
    p = P.views
    Tr, B, F = factors.shape
    if segments is None:
        W, b = p["readout_W"], p["readout_b"]
    elif len(segments) == 1:
        W, b = p[f"readout_W_{segments[0].session}"], p[f"readout_b_{segments[0].session}"]
    else:
        raise ValueError("outputs without targets are for one session at a time")
    log_rates = ws.buf("log_rates", (Tr * B, W.shape[0]))
    ops.matmul(factors.reshape(Tr * B, F), W.T, out=log_rates)
    log_rates += b
    return {"loss": float("nan"), "log_rates": log_rates}


def _session_elbos(P: Params, ws: Workspace, segments: list[Segment], cd_keep: list | None,
                   cd_pass: list | None, factors: np.ndarray, d_factors: np.ndarray | None, *,
                   grads: bool, log_rates: bool) -> list:
    """One fused read-out + Poisson NLL per session, on that session's factor rows.

    Each session's reconstruction term is its own mean over its valid bins (or, with
    recon_reduce_mean off, its sum per trial), and the total is the mean over the sessions
    in the batch, so every session counts equally whatever its number of trials or
    neurons (lfads-torch's multi-session loss).

    Args:
        factors: [T_r, B, F] of the whole batch.
        d_factors: [T_r, B, F] receiving each segment's factor gradient, or None.

    Returns:
        The poisson_elbo results, one per segment.
    """
    cfg, p = P.config, P.views
    xp = P.xp
    Tr, F = cfg.recon_seq_len, cfg.fac_dim
    elbos = []
    for i, seg in enumerate(segments):
        Bs, n_r = seg.size, seg.recon.shape[2]
        norm = seg.n_valid if cfg.recon_reduce_mean else Bs
        e = ops.poisson_elbo(xp.ascontiguousarray(factors[:, seg.start : seg.stop]).reshape(Tr * Bs, F),
                             p[f"readout_W_{seg.session}"], p[f"readout_b_{seg.session}"],
                             seg.recon.reshape(Tr * Bs, n_r), T=Tr,
                             scale=cfg.loss_scale / (len(segments) * norm),
                             loss_weight=None if seg.recon_weight is None
                             else seg.recon_weight.reshape(Tr * Bs, n_r),
                             grad_mask=_recon_grad_mask(P, ws, None if cd_keep is None else cd_keep[i],
                                                        None if cd_pass is None else cd_pass[i],
                                                        Bs, n_r),
                             grads=grads, log_rates=log_rates)
        if grads:
            d_factors[:, seg.start : seg.stop] = e["d_factors"].reshape(Tr, Bs, F)
        elbos.append(e)
    return elbos


def _recon_grad_mask(P: Params, ws: Workspace, cd_keep: np.ndarray | None, cd_pass: np.ndarray | None,
                     B: int, n_r: int) -> np.ndarray | None:
    """Coordinated dropout's gradient mask of the reconstruction, [T_r * B, n_r]: 0 where
    the encoder saw the bin (it may not learn to copy it) unless cd_pass lets it through,
    1 elsewhere; None without coordinated dropout.

    Args:
        cd_keep, cd_pass: 0/1 [T_e, B, n_e]; cd_pass None: no bin passes.
    """
    if cd_keep is None:
        return None
    Te, n_e = cd_keep.shape[0], cd_keep.shape[2]
    Tr = P.config.recon_seq_len
    mask = ws.buf("grad_mask", (Tr, B, n_r))
    mask[...] = 1.0
    seen = mask[:Te, :, :n_e]
    if cd_pass is None:
        P.xp.subtract(1.0, cd_keep, out=seen)
    else:  # 1 - cd_keep * (1 - cd_pass)
        P.xp.subtract(1.0, cd_pass, out=seen)
        seen *= cd_keep
        P.xp.subtract(1.0, seen, out=seen)
    return mask.reshape(Tr * B, n_r)


def _outputs(P: Params, c: dict, terms: dict, average: int = 1, keep: tuple = OUTPUTS) -> dict:
    cfg = P.config
    xp = P.xp
    out = c["dec_out"]
    Tr, B = out["factors"].shape[:2]
    n = B // average

    def mean(a, axis):  # mean over each trial's `average` consecutive rows along axis
        if average == 1:
            return a
        return a.reshape(a.shape[:axis] + (n, average) + a.shape[axis + 1:]).mean(axis=axis + 1)

    def bm(a):  # time-major -> batch-major (averaged first: less to move)
        return xp.ascontiguousarray(mean(a, 1).transpose(1, 0, 2))

    def rows(a):
        return mean(a, 0).copy() if average == 1 else mean(a, 0)

    def gen_inputs():
        parts = [out["u"]] if cfg.use_con else []
        if cfg.ext_input_dim > 0:
            parts.append(c["ext_d"])
        return xp.concatenate(parts, axis=2) if parts else xp.zeros((Tr, B, 0), P.dtype)

    # forward() runs one session at a time, so there is one read-out here. Each output is
    # made only when asked for.
    make = {
        "output_params": lambda: bm(xp.exp(c["elbos"][0]["log_rates"].reshape(Tr, B, -1))),
        "factors": lambda: bm(out["factors"]),
        "gen_states": lambda: bm(out["gen_states"]),
        "gen_init": lambda: rows(c["g0"]),
        "gen_inputs": lambda: bm(gen_inputs()),
        "con_states": lambda: bm(out["con_states"]),
        "co_means": lambda: bm(out["co_mean"]),
        "co_stds": lambda: bm(xp.exp(out["co_logvar"] / 2)),
        "ic_mean": lambda: rows(c["ic_samp"]) if c["ic_given"] else rows(c["ic_mean"]),
        "ic_std": lambda: rows(c["ic_std"]),
    }
    result = {k: make[k]() for k in keep}
    result["terms"] = dict(terms)
    return result
