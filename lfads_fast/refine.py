"""Semi-amortised inference: each trial's initial condition refined by gradient steps on its
own negative log joint under a trained model (docs/refine_ic.md).
"""
from __future__ import annotations

import numpy as np

from . import graph, ops
from .batch import Batch, as_array, expect_shape, given_ic, session_index
from .model import LFADS
from .noise import NoiseReader

__all__ = ["refine_ic", "ic_objective"]


def refine_ic(model: LFADS, encod_data, ext_input=None, *, session: int | None = None, recon_data=None,
              steps: int = 50, lr: float = 0.05, ic_init=None) -> dict:
    """Semi-amortised inference: refines each trial's initial condition by gradient
    steps on its own negative log joint, starting from the encoder's posterior mean.

    The encoder's posterior mean is an amortised guess, one network for all trials; per
    trial, the initial condition that best explains that trial's spikes under the trained
    generator is the minimiser of

        sum over bins and neurons of Poisson NLL(spikes | rates(ic))
        + 0.5 * sum((ic - ic_prior_mean)^2) / ic_prior_var

    (the model's likelihood and its Gaussian prior of the initial condition; no dropout,
    the controller's outputs at their posterior means). Adam minimises it for every
    trial at once (the trials are independent, and Adam's steps are per element), its
    step decaying from lr to 0 over the steps on a cosine. docs/refine_ic.md shows what
    it gains and costs.

    Args:
        encod_data: spike counts [B, encod_seq_len, encod_data_dim] (with sessions:
            session_neurons[session] neurons); NaN = missing bin.
        ext_input: external inputs [B, T, ext_input_dim], or None.
        session: the session of the trials; required with sessions, else None.
        recon_data: the counts the objective fits, [B, recon_seq_len, recon_data_dim]
            (with sessions: session_recon_neurons[session]); NaN = not fitted. None fits
            the encoder's own spikes: the model's first encod_data_dim read-out neurons
            over the first encod_seq_len bins (held-in neurons come first, forward
            prediction bins last); the other read-out neurons and bins are not fitted.
        steps: Adam steps (0 returns the posterior means).
        lr: Adam's initial step size, in initial-condition units.
        ic_init: starting initial conditions [B, ic_dim]; None: the posterior means.

    Returns:
        dict: ic [B, ic_dim] (the model's dtype), ic_init [B, ic_dim] (the start),
        objective [steps + 1] (the objective above, summed over the trials, before each
        step and after the last).
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float, np.floating)) and np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    with ops.device_scope(model.flat):
        return _refine(model, encod_data, ext_input, session, recon_data, steps, lr, ic_init)


def _refine(model: LFADS, encod_data, ext_input, session, recon_data, steps: int, lr: float,
            ic_init) -> dict:
    dt, xp = model.dtype, model.xp
    batch, noise = _ic_batch(model, encod_data, ext_input, session, recon_data)
    # The encoders do not depend on the initial condition: encoded once for all steps.
    encoded = graph.encode(model.parameters, model.workspace, batch, NoiseReader(noise, dt, xp))
    ic = given_ic(model.config, dt, xp, encoded["ic_mean"] if ic_init is None else ic_init,
                  batch.size, name="ic_init").copy()
    start = ic.copy()
    m = xp.zeros_like(ic)
    v = xp.zeros_like(ic)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    objective = np.empty(steps + 1)
    for k in range(steps + 1):
        objective[k], grad = _ic_objective(model, batch, noise, ic, grads=k < steps, encoded=encoded)
        if not np.isfinite(objective[k]):
            raise FloatingPointError(f"refine_ic: the objective became {objective[k]} at step {k}")
        if k == steps:
            break
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        step = lr * 0.5 * (1.0 + np.cos(np.pi * k / steps))
        m_hat = m / (1 - beta1 ** (k + 1))
        v_hat = v / (1 - beta2 ** (k + 1))
        ic -= (step * m_hat / (xp.sqrt(v_hat) + eps)).astype(dt)
    return {"ic": ops.to_host(ic), "ic_init": ops.to_host(start), "objective": objective}


def ic_objective(model: LFADS, encod_data, ic, ext_input=None, *, session: int | None = None,
                 recon_data=None, grads: bool = True):
    """refine_ic's objective (its docstring) at given initial conditions, and its gradient.

    Args:
        encod_data, ext_input, session, recon_data: as in refine_ic.
        ic: initial conditions [B, ic_dim].
        grads: also compute the gradient.

    Returns:
        (objective, grad): the objective summed over the trials (float) and its gradient
        with respect to ic [B, ic_dim] (None when grads is False). Each trial's
        objective depends on its own row of ic only.
    """
    with ops.device_scope(model.flat):
        batch, noise = _ic_batch(model, encod_data, ext_input, session, recon_data)
        ic = given_ic(model.config, model.dtype, model.xp, ic, batch.size)
        objective, grad = _ic_objective(model, batch, noise, ic, grads=grads)
    return objective, ops.to_host(grad)


def _ic_batch(model: LFADS, encod_data, ext_input, session, recon_data):
    encod_data = as_array("encod_data", encod_data, 3)
    if recon_data is None:
        recon_data = _encoder_targets(model, encod_data, session)
    batch = model.make_batch(encod_data, recon_data, ext_input, session=session)
    # No dropout, posterior means of the controller (its KL noise is drawn but unused).
    return batch, model.draw_noise(batch, np.random.default_rng(0), train=False, sample=False)


def _ic_objective(model: LFADS, batch: Batch, noise: dict, ic: np.ndarray, *, grads: bool,
                  encoded: dict | None = None):
    cfg, dt = model.config, model.dtype
    c = graph.forward(model.parameters, model.workspace, batch, noise, grads=grads, kl_ramp=0.0,
                      l2_ramp=0.0, outputs=False, ic=ic, encoded=encoded)
    diff = ic - model.params["ic_prior_mean"]
    inv_var = 1.0 / cfg.ic_prior_var
    # The forward pass reports the reconstruction as the sum divided by the number of valid
    # bins (recon_reduce_mean) or of trials; one session per batch here.
    to_sum = batch.n_valid if cfg.recon_reduce_mean else batch.size
    objective = float(c["terms"]["recon"]) * to_sum + 0.5 * inv_var * float(model.xp.vdot(diff, diff))
    if not grads:
        return objective, None
    d_recon = graph.backward(model.parameters, model.workspace, c, ic_only=True)
    return objective, d_recon * dt.type(to_sum / cfg.loss_scale) + diff * dt.type(inv_var)


def _encoder_targets(model: LFADS, encod_data: np.ndarray, session) -> np.ndarray:
    """refine_ic's default targets: the encoder's spikes in the read-out's first neurons
    and bins, NaN (not fitted) elsewhere."""
    cfg = model.config
    n_e, n_r = cfg.encod_data_dim, cfg.recon_data_dim
    if cfg.multisession:
        if session is None:
            raise ValueError(f"session= is required: the model has {cfg.n_sessions} sessions")
        s = session_index(model.config, session)
        n_e, n_r = cfg.session_neurons[s], cfg.session_recon_neurons[s]
    B = encod_data.shape[0]
    expect_shape("encod_data", encod_data, (B, cfg.encod_seq_len, n_e))
    if (cfg.recon_seq_len, n_r) == (cfg.encod_seq_len, n_e):
        return encod_data
    if n_r < n_e or cfg.recon_seq_len < cfg.encod_seq_len:
        raise ValueError("recon_data is required: the model's read-out has fewer neurons or bins "
                         f"({cfg.recon_seq_len} x {n_r}) than its encoder ({cfg.encod_seq_len} x {n_e})")
    targets = np.full((B, cfg.recon_seq_len, n_r), np.nan, np.float32)
    targets[:, : cfg.encod_seq_len, :n_e] = encod_data
    return targets

