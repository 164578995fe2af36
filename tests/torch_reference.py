"""Independent PyTorch implementation of the lfads_fast model, for parity tests.

Written from docs/math.md with torch autograd: batch-major like lfads-torch ([B, T, ...]),
one Python loop iteration per time step, plain torch ops. It does not import lfads_fast, so
the compiled model's loss terms, gradients and outputs can be checked against it.

Sizes: B batch, T_e encod_seq_len, T_r recon_seq_len, N_e encod_data_dim, N_r recon_data_dim,
E ext_input_dim, C con_dim, U co_dim, G gen_dim, F fac_dim.
Noise and mask arrays are time-major ([T, B, ...]) as in the compiled core; data, parameters
and outputs are batch-major.

Several sessions (cfg.session_neurons set): ``reference_multisession_loss_and_grads``. Each
session s has a linear read-in from its n_s neurons to the N_e encoder inputs and a linear
read-out from the factors to its own neurons; the trials of all sessions share the encoders and
the decoder, and the reconstruction is the mean over the sessions of each session's own mean.
"""

import math
from types import SimpleNamespace

import numpy as np
import torch

# Noise and masks of one batch (docs/math.md, "Noise and masks"); None or absent = off.
NOISE_KEYS = (
    "ic_eps",
    "co_eps",
    "co_kl_eps",
    "cd_keep",
    "cd_pass",
    "drop_data",
    "drop_ic_hn",
    "drop_ci",
    "drop_fac_in",
    "drop_g0",
    "drop_gen",
    "drop_ext",
)

_DEFAULT_CONFIG = dict(
    encod_data_dim=4,
    recon_data_dim=4,
    encod_seq_len=5,
    recon_seq_len=5,
    ext_input_dim=0,
    ic_enc_dim=3,
    ci_enc_dim=2,
    ci_lag=1,
    con_dim=3,
    co_dim=2,
    ic_dim=2,
    gen_dim=4,
    fac_dim=3,
    cell_clip=5.0,
    ic_post_var_min=1e-4,
    ic_prior_mean=0.0,
    ic_prior_var=0.1,
    co_prior_tau=10.0,
    co_prior_nvar=0.1,
    dropout_rate=0.2,
    cd_rate=0.3,
    cd_pass_rate=0.0,
    loss_scale=1.0,
    recon_reduce_mean=True,
    # Distinct non-zero weights, so that a swapped or dropped term changes the loss.
    l2_ic_enc_scale=0.01,
    l2_ci_enc_scale=0.02,
    l2_gen_scale=0.05,
    l2_con_scale=0.03,
    kl_ic_scale=0.5,
    kl_co_scale=0.7,
    session_neurons=None,
    session_recon_neurons=None,
    # Causal options: IC from the first ic_enc_seq_len bins (0: all), CI encoder on the rest
    # (lfads-torch), forward-only CI encoder.
    ic_enc_seq_len=0,
    ci_enc_causal=False,
)


def reference_loss_and_grads(
    params,
    cfg,
    encod_data,
    recon_data,
    ext_input=None,
    noise=None,
    kl_ramp=1.0,
    l2_ramp=1.0,
    dtype=torch.float64,
):
    """Loss terms, parameter gradients and outputs of one batch.

    Args:
        params: dict name -> numpy array, exactly the names and shapes of
            ``param_shapes(cfg)`` (no controller parameters when the controller is off).
        cfg: object with the LFADSConfig attributes listed in ``make_config``.
        encod_data: encoder input spike counts [B, T_e, N_e]; NaN bins enter as 0.
        recon_data: reconstruction targets [B, T_r, N_r]; NaN bins are left out of the loss.
        ext_input: external inputs [B, T_r, E] or [B, T_e, E] (zero-padded to T_r), or None
            (E = 0, or all zeros).
        noise: dict with keys of ``NOISE_KEYS``, time-major arrays; absent or None = off.
        kl_ramp: factor on the KL terms, in [0, 1].
        l2_ramp: factor on the L2 penalty, in [0, 1].
        dtype: torch dtype of the computation (float64 for gradient checks).

    Returns:
        terms: dict of floats: loss, recon, kl_ic, kl_co (before kl_*_scale and ramp),
            l2 (before ramp).
        grads: dict name -> numpy array, d loss / d param, same shapes as ``params``.
        outputs: dict of batch-major numpy arrays: output_params (rates) [B, T_r, N_r],
            factors [B, T_r, F], gen_states [B, T_r, G], gen_init [B, G],
            gen_inputs [B, T_r, U + E], con_states [B, T_r, C], co_means [B, T_r, U],
            co_stds [B, T_r, U], ic_mean [B, ic_dim], ic_std [B, ic_dim]. Without a
            controller, con_states, co_means and co_stds have width 0.
    """
    _check_params(params, cfg)
    p = {
        name: torch.tensor(np.asarray(value), dtype=dtype, requires_grad=True)
        for name, value in params.items()
    }
    inputs = _prepare_inputs(cfg, encod_data, recon_data, ext_input, noise or {}, dtype)

    out = _forward(p, cfg, inputs)
    recon = _recon_loss(cfg, out["log_rates"], inputs)
    kl_ic = _kl_ic(cfg, out["ic_mean"], out["ic_std"], p["ic_prior_mean"])
    if uses_controller(cfg):
        kl_co = _kl_co_ar1(
            out["co_means"], out["co_stds"], inputs["co_kl_eps"],
            p["co_prior_logtau"], p["co_prior_lognvar"],
        )
    else:
        kl_co = recon.new_zeros(())
    l2 = _l2_penalty(p, cfg)
    kl = cfg.kl_ic_scale * kl_ic + cfg.kl_co_scale * kl_co
    loss = cfg.loss_scale * (recon + l2_ramp * l2 + kl_ramp * kl)

    d_params = torch.autograd.grad(loss, list(p.values()))
    grads = {name: d.numpy() for name, d in zip(p, d_params)}
    terms = {
        "loss": loss.item(),
        "recon": recon.item(),
        "kl_ic": kl_ic.item(),
        "kl_co": kl_co.item(),
        "l2": l2.item(),
    }
    outputs = {
        "output_params": torch.exp(out["log_rates"]),
        "factors": out["factors"],
        "gen_states": out["gen_states"],
        "gen_init": out["gen_init"],
        "gen_inputs": out["gen_inputs"],
        "con_states": out["con_states"],
        "co_means": out["co_means"],
        "co_stds": out["co_stds"],
        "ic_mean": out["ic_mean"],
        "ic_std": out["ic_std"],
    }
    outputs = {key: value.detach().numpy() for key, value in outputs.items()}
    return terms, grads, outputs


def reference_ic_objective(params, cfg, encod_data, recon_data, ext_input, ic, dtype=torch.float64):
    """The negative log joint of spikes and initial conditions that refinement minimises.

    Sum over the valid (non-NaN) bins of recon_data of the Poisson NLL (with lgamma(y + 1))
    of the rates the generator makes from the given initial conditions, with no dropout and
    the controller's outputs at their means, plus 0.5 * sum((ic - ic_prior_mean)^2) /
    ic_prior_var.

    Args:
        params, cfg, encod_data, recon_data, ext_input: as in reference_loss_and_grads.
        ic: initial conditions [B, ic_dim].

    Returns:
        (objective, grad): the float summed over the trials, and d objective / d ic.
    """
    _check_params(params, cfg)
    p = {name: torch.tensor(np.asarray(value), dtype=dtype) for name, value in params.items()}
    inputs = _prepare_inputs(cfg, encod_data, recon_data, ext_input, {}, dtype)
    ic_t = torch.tensor(np.asarray(ic), dtype=dtype, requires_grad=True)
    out = _forward(p, cfg, inputs, ic=ic_t)
    y = inputs["recon_data"]
    valid = ~torch.isnan(y)
    y = torch.where(valid, y, torch.zeros_like(y))
    lr = out["log_rates"]
    nll = torch.exp(lr) - y * lr + torch.lgamma(y + 1.0)
    prior = 0.5 * ((ic_t - p["ic_prior_mean"]) ** 2).sum() / cfg.ic_prior_var
    objective = torch.where(valid, nll, torch.zeros_like(nll)).sum() + prior
    (grad,) = torch.autograd.grad(objective, [ic_t])
    return objective.item(), grad.numpy()


def reference_multisession_loss_and_grads(
    params,
    cfg,
    sessions,
    ext_input=None,
    noise=None,
    kl_ramp=1.0,
    l2_ramp=1.0,
    dtype=torch.float64,
):
    """Loss terms and parameter gradients of one batch mixing several sessions.

    Args:
        params: dict name -> numpy array with the names and shapes of ``param_shapes(cfg)``
            (readin_W_{s} [N_e, n_s], readin_b_{s} [N_e], readout_W_{s} [n_recon_s, F],
            readout_b_{s} [n_recon_s] per session instead of readout_W, readout_b).
        cfg: configuration with session_neurons and session_recon_neurons set.
        sessions: list of (session index, encod_data [B_s, T_e, n_s], recon_data
            [B_s, T_r, n_recon_s]) in batch order; the batch is their concatenation.
        ext_input: external inputs of the whole batch [B, T_r or T_e, E], or None.
        noise: as in reference_loss_and_grads for the whole batch of B trials, except
            cd_keep and cd_pass: lists with one [T_e, B_s, n_s] array per entry of
            ``sessions``.
        kl_ramp, l2_ramp, dtype: as in reference_loss_and_grads.

    Returns:
        terms: dict of floats as in reference_loss_and_grads; recon is the mean over the
            sessions of each session's reconstruction term.
        grads: dict name -> numpy array, d loss / d param.
        rates: list of [B_s, T_r, n_recon_s] numpy arrays, one per entry of ``sessions``.
    """
    _check_params(params, cfg)
    p = {
        name: torch.tensor(np.asarray(value), dtype=dtype, requires_grad=True)
        for name, value in params.items()
    }
    noise = dict(noise or {})
    cd_keep = noise.pop("cd_keep", None)
    cd_pass = noise.pop("cd_pass", None)
    B = sum(np.shape(encod)[0] for _, encod, _ in sessions)
    inputs = {"ext_input": _ext_tensor(cfg, ext_input, B, dtype)}
    inputs.update(_noise_tensors(cfg, B, noise, dtype))
    inputs["cd_keep"] = None

    # Read-ins: each session's counts (after coordinated dropout) into the shared inputs.
    parts, targets = [], []
    for i, (s, encod, recon) in enumerate(sessions):
        x_s = torch.nan_to_num(torch.as_tensor(np.asarray(encod), dtype=dtype), nan=0.0)
        keep = passed = None
        if cd_keep is not None:
            keep = torch.as_tensor(np.asarray(cd_keep[i]), dtype=dtype).transpose(0, 1)
            x_s = x_s * keep / (1.0 - cfg.cd_rate)
        if cd_pass is not None:
            passed = torch.as_tensor(np.asarray(cd_pass[i]), dtype=dtype).transpose(0, 1)
        parts.append(x_s @ p[f"readin_W_{s}"].T + p[f"readin_b_{s}"])
        targets.append((s, torch.as_tensor(np.asarray(recon), dtype=dtype), keep, passed))
    x = _scaled(torch.cat(parts, dim=0), inputs["drop_data"])

    out = _forward(p, cfg, inputs, x=x)
    recons, rates, start = [], [], 0
    for s, y, keep, passed in targets:
        stop = start + y.shape[0]
        log_rates = out["factors"][start:stop] @ p[f"readout_W_{s}"].T + p[f"readout_b_{s}"]
        session_cfg = SimpleNamespace(encod_seq_len=cfg.encod_seq_len,
                                      encod_data_dim=cfg.session_neurons[s],
                                      recon_reduce_mean=cfg.recon_reduce_mean)
        recons.append(_recon_loss(session_cfg, log_rates,
                                  {"recon_data": y, "cd_keep": keep, "cd_pass": passed}))
        rates.append(torch.exp(log_rates).detach().numpy())
        start = stop
    recon = torch.stack(recons).mean()
    kl_ic = _kl_ic(cfg, out["ic_mean"], out["ic_std"], p["ic_prior_mean"])
    if uses_controller(cfg):
        kl_co = _kl_co_ar1(
            out["co_means"], out["co_stds"], inputs["co_kl_eps"],
            p["co_prior_logtau"], p["co_prior_lognvar"],
        )
    else:
        kl_co = recon.new_zeros(())
    l2 = _l2_penalty(p, cfg)
    loss = cfg.loss_scale * (
        recon + l2_ramp * l2 + kl_ramp * (cfg.kl_ic_scale * kl_ic + cfg.kl_co_scale * kl_co)
    )
    d_params = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
    grads = {
        name: (np.zeros(params[name].shape) if d is None else d.numpy())
        for name, d in zip(p, d_params)
    }
    terms = {"loss": loss.item(), "recon": recon.item(), "kl_ic": kl_ic.item(),
             "kl_co": kl_co.item(), "l2": l2.item()}
    return terms, grads, rates


def make_config(**overrides):
    """A small configuration with every attribute the reference reads.

    Args:
        **overrides: attribute values replacing the defaults (LFADSConfig names).

    Returns:
        types.SimpleNamespace with encod/recon sizes, model sizes, cell_clip, prior
        settings, dropout_rate, cd_rate, loss_scale, recon_reduce_mean, the l2_*_scale and
        kl_*_scale weights.

    Raises:
        TypeError: an override names no known attribute.
    """
    unknown = sorted(set(overrides) - set(_DEFAULT_CONFIG))
    if unknown:
        raise TypeError(f"make_config got unknown attributes {unknown}")
    return SimpleNamespace(**{**_DEFAULT_CONFIG, **overrides})


def uses_controller(cfg):
    """True when the model has a CI encoder, a controller and inferred inputs."""
    return cfg.ci_enc_dim > 0 and cfg.con_dim > 0 and cfg.co_dim > 0


def param_shapes(cfg):
    """Names and shapes of the model parameters, in a fixed order.

    Args:
        cfg: configuration (see ``make_config``).

    Returns:
        dict name -> shape tuple. Gate order of every [3H, ...] block is z, r, n.
    """
    n_e, n_r, ext = cfg.encod_data_dim, cfg.recon_data_dim, cfg.ext_input_dim
    h_ic, h_ci = cfg.ic_enc_dim, cfg.ci_enc_dim
    c, g, f = cfg.con_dim, cfg.gen_dim, cfg.fac_dim
    u = cfg.co_dim if uses_controller(cfg) else 0

    shapes = {"ic_enc_h0": (2, h_ic)}
    for direction in ("fwd", "bwd"):
        shapes.update(_gru_shapes(f"ic_enc_{direction}", n_e, h_ic))
    shapes["ic_linear_W"] = (2 * cfg.ic_dim, 2 * h_ic)
    shapes["ic_linear_b"] = (2 * cfg.ic_dim,)
    if uses_controller(cfg):
        dirs = _ci_directions(cfg)
        shapes["ci_enc_h0"] = (len(dirs), h_ci)
        for direction in dirs:
            shapes.update(_gru_shapes(f"ci_enc_{direction}", n_e, h_ci))
        shapes.update(_gru_shapes("con", len(dirs) * h_ci + f, c))
        shapes["con_h0"] = (c,)
        shapes["co_linear_W"] = (2 * u, c)
        shapes["co_linear_b"] = (2 * u,)
    shapes.update(_gru_shapes("gen", u + ext, g))
    shapes["ic_to_g0_W"] = (g, cfg.ic_dim)
    shapes["ic_to_g0_b"] = (g,)
    shapes["fac_W"] = (f, g)
    if _sessions(cfg) is None:
        shapes["readout_W"] = (n_r, f)
        shapes["readout_b"] = (n_r,)
    shapes["ic_prior_mean"] = (cfg.ic_dim,)
    if uses_controller(cfg):
        shapes["co_prior_logtau"] = (u,)
        shapes["co_prior_lognvar"] = (u,)
    for s, (n, n_recon) in enumerate(_sessions(cfg) or []):
        shapes[f"readin_W_{s}"] = (n_e, n)
        shapes[f"readin_b_{s}"] = (n_e,)
        shapes[f"readout_W_{s}"] = (n_recon, f)
        shapes[f"readout_b_{s}"] = (n_recon,)
    return shapes


def init_params(cfg, seed):
    """Parameters drawn with the lfads-torch initialisation, float64.

    Encoder GRUs: W_ih, W_hh ~ N(0, 1 / (input_size + hidden)). Decoder GRUs (con, gen):
    W_ih ~ N(0, 1 / input_size), W_hh ~ N(0, 1 / hidden). Every b_ih is 1 on the z and r
    rows and 0 on the n rows. Linear weights ~ N(0, 1 / in_features), biases 0. Initial
    states 0. ic_prior_mean = cfg.ic_prior_mean; co_prior_logtau = log(cfg.co_prior_tau);
    co_prior_lognvar = log(cfg.co_prior_nvar).

    Args:
        cfg: configuration (see ``make_config``).
        seed: seed of the numpy generator (draws in a fixed order).

    Returns:
        dict name -> float64 numpy array with the shapes of ``param_shapes(cfg)``.
    """
    rng = np.random.default_rng(seed)
    shapes = param_shapes(cfg)
    params = {}

    def normal(name, fan):
        # A generator without inputs has an empty W_ih: nothing to draw, and no 1 / 0.
        if fan == 0:
            return np.zeros(shapes[name])
        return rng.normal(0.0, 1.0 / math.sqrt(fan), size=shapes[name])

    def gru(prefix, ih_fan, hh_fan):
        hidden = shapes[f"{prefix}_W_hh"][1]
        params[f"{prefix}_W_ih"] = normal(f"{prefix}_W_ih", ih_fan)
        params[f"{prefix}_b_ih"] = np.concatenate([np.ones(2 * hidden), np.zeros(hidden)])
        params[f"{prefix}_W_hh"] = normal(f"{prefix}_W_hh", hh_fan)

    def linear(prefix):
        params[f"{prefix}_W"] = normal(f"{prefix}_W", shapes[f"{prefix}_W"][1])
        params[f"{prefix}_b"] = np.zeros(shapes[f"{prefix}_b"])

    encoders = ["ic_enc"] + (["ci_enc"] if uses_controller(cfg) else [])
    for enc in encoders:
        hidden = shapes[f"{enc}_h0"][1]
        params[f"{enc}_h0"] = np.zeros(shapes[f"{enc}_h0"])
        for direction in ("fwd", "bwd") if enc == "ic_enc" else _ci_directions(cfg):
            fan = cfg.encod_data_dim + hidden
            gru(f"{enc}_{direction}", fan, fan)
    linear("ic_linear")
    if uses_controller(cfg):
        gru("con", shapes["con_W_ih"][1], cfg.con_dim)
        params["con_h0"] = np.zeros(shapes["con_h0"])
        linear("co_linear")
        params["co_prior_logtau"] = np.full(shapes["co_prior_logtau"], math.log(cfg.co_prior_tau))
        params["co_prior_lognvar"] = np.full(
            shapes["co_prior_lognvar"], math.log(cfg.co_prior_nvar)
        )
    gru("gen", shapes["gen_W_ih"][1], cfg.gen_dim)
    linear("ic_to_g0")
    params["fac_W"] = normal("fac_W", cfg.gen_dim)
    linear("readout")
    params["ic_prior_mean"] = np.full(shapes["ic_prior_mean"], float(cfg.ic_prior_mean))
    return {name: params[name] for name in shapes}


def draw_noise(cfg, B, seed, dropout=True, cd=True, sample=True):
    """A full noise dict for one batch, time-major.

    Args:
        cfg: configuration (see ``make_config``).
        B: batch size.
        seed: seed of the numpy generator.
        dropout: draw the drop_* multipliers: 0 with probability cfg.dropout_rate,
            1 / (1 - dropout_rate) otherwise.
        cd: draw cd_keep: 0 with probability cfg.cd_rate, 1 otherwise; and, when
            cfg.cd_pass_rate > 0, cd_pass: 1 with probability cfg.cd_pass_rate.
        sample: draw the standard normal ic_eps, co_eps and co_kl_eps.

    Returns:
        dict with every key of ``NOISE_KEYS``. A key is None when its group is switched off,
        when its rate is 0 (cd_keep with cd_rate 0 would block every gradient of the
        encoder bins), or when the model lacks the part it acts on (no controller: co_eps,
        co_kl_eps, drop_ci, drop_fac_in; E = 0: drop_ext).
    """
    rng = np.random.default_rng(seed)
    shapes = _noise_shapes(cfg, B)
    has_con = uses_controller(cfg)
    noise = dict.fromkeys(NOISE_KEYS)
    if sample:
        noise["ic_eps"] = rng.standard_normal(shapes["ic_eps"])
        if has_con:
            noise["co_eps"] = rng.standard_normal(shapes["co_eps"])
            noise["co_kl_eps"] = rng.standard_normal(shapes["co_kl_eps"])
    if cd and cfg.cd_rate > 0:
        noise["cd_keep"] = (rng.random(shapes["cd_keep"]) >= cfg.cd_rate).astype(np.float64)
        if cfg.cd_pass_rate > 0:
            noise["cd_pass"] = (rng.random(shapes["cd_pass"]) < cfg.cd_pass_rate).astype(np.float64)
    if dropout and cfg.dropout_rate > 0:
        keys = ["drop_data", "drop_ic_hn", "drop_g0", "drop_gen"]
        keys += ["drop_ci", "drop_fac_in"] if has_con else []
        keys += ["drop_ext"] if cfg.ext_input_dim > 0 else []
        keep = 1.0 - cfg.dropout_rate
        for key in keys:
            noise[key] = (rng.random(shapes[key]) < keep) / keep
    return noise


# Shapes and inputs


def _gru_shapes(prefix, input_size, hidden):
    return {
        f"{prefix}_W_ih": (3 * hidden, input_size),
        f"{prefix}_b_ih": (3 * hidden,),
        f"{prefix}_W_hh": (3 * hidden, hidden),
    }


def _noise_shapes(cfg, B):
    """Time-major shape of every noise key; controller keys have width 0 without one."""
    t_e, t_r = cfg.encod_seq_len, cfg.recon_seq_len
    has_con = uses_controller(cfg)
    u = cfg.co_dim if has_con else 0
    ci = len(_ci_directions(cfg)) * cfg.ci_enc_dim if has_con else 0
    return {
        "ic_eps": (B, cfg.ic_dim),
        "co_eps": (t_r, B, u),
        "co_kl_eps": (t_r, B, u),
        "cd_keep": (t_e, B, cfg.encod_data_dim),
        "cd_pass": (t_e, B, cfg.encod_data_dim),
        "drop_data": (t_e, B, cfg.encod_data_dim),
        "drop_ic_hn": (B, 2 * cfg.ic_enc_dim),
        "drop_ci": (t_r, B, ci),
        "drop_fac_in": (t_r, B, cfg.fac_dim if has_con else 0),
        "drop_g0": (B, cfg.gen_dim),
        "drop_gen": (t_r, B, cfg.gen_dim),
        "drop_ext": (t_r, B, cfg.ext_input_dim),
    }


def _sessions(cfg):
    """[(n_s, n_recon_s)] per session, or None for a single-session config."""
    neurons = getattr(cfg, "session_neurons", None)
    if neurons is None:
        return None
    recon = getattr(cfg, "session_recon_neurons", None) or neurons
    return list(zip(neurons, recon))


def _check_params(params, cfg):
    expected = param_shapes(cfg)
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(f"params: missing {missing}, unexpected {unexpected}")
    for name, shape in expected.items():
        got = np.shape(params[name])
        if got != shape:
            raise ValueError(f"{name} must have shape {shape}, got {got}")


def _check_shape(name, array, shape):
    if array.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {array.shape}")


def _prepare_inputs(cfg, encod_data, recon_data, ext_input, noise, dtype):
    """Checked batch-major tensors of the data and the noise.

    Returns:
        dict with encod_data [B, T_e, N_e] (NaN kept), recon_data [B, T_r, N_r] (NaN kept),
        ext_input [B, T_r, E] (zero-padded), and every noise key batch-major or None.
    """
    encod_data = np.asarray(encod_data)
    recon_data = np.asarray(recon_data)
    B = encod_data.shape[0]
    t_e, t_r, ext = cfg.encod_seq_len, cfg.recon_seq_len, cfg.ext_input_dim
    if t_r < t_e or cfg.recon_data_dim < cfg.encod_data_dim:
        raise ValueError("need recon_seq_len >= encod_seq_len and recon_data_dim >= encod_data_dim")
    _check_shape("encod_data", encod_data, (B, t_e, cfg.encod_data_dim))
    _check_shape("recon_data", recon_data, (B, t_r, cfg.recon_data_dim))

    inputs = {
        "encod_data": torch.as_tensor(encod_data, dtype=dtype),
        "recon_data": torch.as_tensor(recon_data, dtype=dtype),
        "ext_input": _ext_tensor(cfg, ext_input, B, dtype),
    }
    inputs.update(_noise_tensors(cfg, B, noise, dtype))
    return inputs


def _ext_tensor(cfg, ext_input, B, dtype):
    """External inputs [B, T_r, E], zero-padded after T_e; zeros when None."""
    t_e, t_r, ext = cfg.encod_seq_len, cfg.recon_seq_len, cfg.ext_input_dim
    ext_full = torch.zeros(B, t_r, ext, dtype=dtype)
    if ext_input is not None:
        ext_input = np.asarray(ext_input)
        if ext_input.shape not in ((B, t_r, ext), (B, t_e, ext)):
            raise ValueError(
                f"ext_input must have shape {(B, t_r, ext)} or {(B, t_e, ext)}, "
                f"got {ext_input.shape}"
            )
        ext_full[:, : ext_input.shape[1]] = torch.as_tensor(ext_input, dtype=dtype)
    return ext_full


def _noise_tensors(cfg, B, noise, dtype):
    """Every noise key present in NOISE_KEYS order as a checked batch-major tensor, or None."""
    unknown = sorted(set(noise) - set(NOISE_KEYS))
    if unknown:
        raise ValueError(f"noise has unknown keys {unknown}")
    inputs = {}
    for key, shape in _noise_shapes(cfg, B).items():
        value = noise.get(key)
        if value is not None:
            value = np.asarray(value)
            _check_shape(key, value, shape)
            value = torch.as_tensor(value, dtype=dtype)
            if value.dim() == 3:
                value = value.transpose(0, 1)
        inputs[key] = value
    return inputs


# Model


def _scaled(x, multiplier):
    """x * multiplier, or x itself when the multiplier (a noise or mask) is off."""
    return x if multiplier is None else x * multiplier


def _step(mask, t):
    """Time step t of a batch-major mask [B, T, ...], or None."""
    return None if mask is None else mask[:, t]


def _clipped_gru_cell(x, h, W_ih, b_ih, W_hh, clip):
    """One step of the LFADS clipped GRU (reset gate applied before the recurrent product).

    Args:
        x: input [B, I]. h: state [B, H]. W_ih: [3H, I], b_ih: [3H], W_hh: [3H, H] (rows z, r, n).
        clip: cell_clip; the new state is clamped to [-clip, clip].

    Returns:
        new state [B, H].
    """
    H = h.shape[1]
    xz, xr, xn = torch.split(x @ W_ih.T + b_ih, H, dim=1)
    hz, hr = torch.split(h @ W_hh[: 2 * H].T, H, dim=1)
    z = torch.sigmoid(xz + hz)
    r = torch.sigmoid(xr + hr)
    n = torch.tanh(xn + (r * h) @ W_hh[2 * H :].T)
    return torch.clamp(z * h + (1 - z) * n, -clip, clip)


def _ci_directions(cfg):
    return ("fwd",) if getattr(cfg, "ci_enc_causal", False) else ("fwd", "bwd")


def _ic_bins(cfg):
    """Bins the IC encoder reads: the first ic_enc_seq_len (0: all)."""
    k = getattr(cfg, "ic_enc_seq_len", 0)
    return k if k > 0 else cfg.encod_seq_len


def _forward_gru(x, p, prefix, clip):
    """A forward-only clipped GRU from {prefix}_h0[0]: [B, T, H] states."""
    h = p[f"{prefix}_h0"][0].expand(x.shape[0], -1)
    out = []
    for t in range(x.shape[1]):
        h = _clipped_gru_cell(x[:, t], h, p[f"{prefix}_fwd_W_ih"], p[f"{prefix}_fwd_b_ih"],
                              p[f"{prefix}_fwd_W_hh"], clip)
        out.append(h)
    return torch.stack(out, dim=1)


def _bidirectional_gru(x, p, prefix, clip):
    """Forward and backward clipped GRUs over a whole sequence.

    Args:
        x: input [B, T, I]. p: parameters; uses {prefix}_h0 [2, H] and the {prefix}_fwd_*,
        {prefix}_bwd_* GRU weights. clip: cell_clip.

    Returns:
        fwd [B, T, H]: state after reading x[:, 0..t]; bwd [B, T, H]: state after reading
        x[:, T-1..t]. Both at their own time index t.
    """
    B, T = x.shape[:2]
    h0 = p[f"{prefix}_h0"]

    def weights(direction):
        return [p[f"{prefix}_{direction}_{w}"] for w in ("W_ih", "b_ih", "W_hh")]

    h = h0[0].expand(B, -1)
    fwd = []
    for t in range(T):
        h = _clipped_gru_cell(x[:, t], h, *weights("fwd"), clip)
        fwd.append(h)
    h = h0[1].expand(B, -1)
    bwd = [None] * T
    for t in reversed(range(T)):
        h = _clipped_gru_cell(x[:, t], h, *weights("bwd"), clip)
        bwd[t] = h
    return torch.stack(fwd, dim=1), torch.stack(bwd, dim=1)


def _encoder_input(cfg, inputs):
    """NaN -> 0, coordinated dropout (keep mask scaled by 1 / (1 - cd_rate)), dropout."""
    x = torch.nan_to_num(inputs["encod_data"], nan=0.0)
    if inputs["cd_keep"] is not None:
        x = x * inputs["cd_keep"] / (1.0 - cfg.cd_rate)
    return _scaled(x, inputs["drop_data"])


def _controller_inputs(cfg, x, p, drop_ci):
    """CI encoder outputs with the lag, zero-padded to T_r, with dropout: [B, T_r, 2 ci_enc_dim].

    ci_t = [cf_{t - lag}, cb_{t + lag}], zero where the index leaves [0, T_e) and for t >= T_e.
    With ic_enc_seq_len = K > 0 the CI encoder reads only bins K .. T_e - 1 (its own time
    starts at K) and ci is zero on the first K bins; with ci_enc_causal only cf exists.
    """
    k0 = getattr(cfg, "ic_enc_seq_len", 0)
    x = x[:, k0:]
    causal = getattr(cfg, "ci_enc_causal", False)
    if causal:
        cf, cb = _forward_gru(x, p, "ci_enc", cfg.cell_clip), None
    else:
        cf, cb = _bidirectional_gru(x, p, "ci_enc", cfg.cell_clip)
    B, t_e, H = cf.shape
    lag = cfg.ci_lag
    kept = max(t_e - lag, 0)  # steps of each direction that survive the shift
    parts = [torch.cat([cf.new_zeros(B, t_e - kept, H), cf[:, :kept]], dim=1)]
    if not causal:
        parts.append(torch.cat([cb[:, t_e - kept :], cb.new_zeros(B, t_e - kept, H)], dim=1))
    ci = torch.cat(parts, dim=2)
    width = ci.shape[2]
    ci = torch.cat([ci.new_zeros(B, k0, width), ci,
                    ci.new_zeros(B, cfg.recon_seq_len - k0 - t_e, width)], dim=1)
    return _scaled(ci, drop_ci)


def _forward(p, cfg, inputs, x=None, ic=None):
    """The model's forward pass; returns batch-major tensors (see reference_loss_and_grads).

    x: the encoder input [B, T_e, N_e] when the caller made it (session read-ins); then the
    read-outs, and log_rates, are also the caller's.
    ic: initial conditions [B, ic_dim] that replace the posterior's sample or mean.
    """
    has_con = uses_controller(cfg)
    clip = cfg.cell_clip
    if x is None:
        x = _encoder_input(cfg, inputs)
    B = x.shape[0]

    hf, hb = _bidirectional_gru(x[:, : _ic_bins(cfg)], p, "ic_enc", clip)
    h_n = _scaled(torch.cat([hf[:, -1], hb[:, 0]], dim=1), inputs["drop_ic_hn"])
    ic_mean, ic_logvar = torch.split(
        h_n @ p["ic_linear_W"].T + p["ic_linear_b"], cfg.ic_dim, dim=1
    )
    ic_std = torch.sqrt(torch.exp(ic_logvar) + cfg.ic_post_var_min)
    ic_samp = ic_mean if inputs["ic_eps"] is None else ic_mean + ic_std * inputs["ic_eps"]
    if ic is not None:
        ic_samp = ic

    fac_W_n = p["fac_W"] / torch.linalg.vector_norm(p["fac_W"], dim=1, keepdim=True)
    g0 = ic_samp @ p["ic_to_g0_W"].T + p["ic_to_g0_b"]
    g = g0
    f = _scaled(g0, inputs["drop_g0"]) @ fac_W_n.T
    gen_w = [p["gen_W_ih"], p["gen_b_ih"], p["gen_W_hh"]]
    if has_con:
        ci = _controller_inputs(cfg, x, p, inputs["drop_ci"])
        c = p["con_h0"].expand(B, -1)
        con_w = [p["con_W_ih"], p["con_b_ih"], p["con_W_hh"]]

    series = {key: [] for key in ("gen_states", "factors", "gen_inputs", "con_states",
                                  "co_means", "co_stds")}
    for t in range(cfg.recon_seq_len):
        ext_t = _scaled(inputs["ext_input"][:, t], _step(inputs["drop_ext"], t))
        if has_con:
            con_in = torch.cat([ci[:, t], _scaled(f, _step(inputs["drop_fac_in"], t))], dim=1)
            c = _clipped_gru_cell(con_in, c, *con_w, clip)
            co_mean, co_logvar = torch.split(
                c @ p["co_linear_W"].T + p["co_linear_b"], cfg.co_dim, dim=1
            )
            co_std = torch.exp(0.5 * co_logvar)
            co_eps = _step(inputs["co_eps"], t)
            u = co_mean if co_eps is None else co_mean + co_std * co_eps
            gen_in = torch.cat([u, ext_t], dim=1)
            series["con_states"].append(c)
            series["co_means"].append(co_mean)
            series["co_stds"].append(co_std)
        else:
            gen_in = ext_t
        g = _clipped_gru_cell(gen_in, g, *gen_w, clip)
        f = _scaled(g, _step(inputs["drop_gen"], t)) @ fac_W_n.T
        series["gen_states"].append(g)
        series["factors"].append(f)
        series["gen_inputs"].append(gen_in)

    out = {}
    for key, steps in series.items():
        # Without a controller its series are empty: width-0 outputs.
        out[key] = torch.stack(steps, dim=1) if steps else x.new_zeros(B, cfg.recon_seq_len, 0)
    if "readout_W" in p:
        out["log_rates"] = out["factors"] @ p["readout_W"].T + p["readout_b"]
    out.update(gen_init=g0, ic_mean=ic_mean, ic_std=ic_std)
    return out


# Loss terms


def _recon_loss(cfg, log_rates, inputs):
    """Poisson NLL with lgamma(y + 1), masked where recon_data is NaN.

    Coordinated dropout: bins whose encoder input was kept (t < T_e, n < N_e, cd_keep = 1)
    add their value but no gradient, unless their pass mask (cd_pass = 1) lets it through.

    Args:
        log_rates: [B, T_r, N_r].

    Returns:
        scalar: sum over valid bins / number of valid bins (recon_reduce_mean), or / B.
    """
    y = inputs["recon_data"]
    valid = ~torch.isnan(y)
    y = torch.where(valid, y, torch.zeros_like(y))
    nll = torch.exp(log_rates) - y * log_rates + torch.lgamma(y + 1.0)
    if inputs["cd_keep"] is not None:
        grad_mask = torch.ones_like(nll)
        t_e, n_e = cfg.encod_seq_len, cfg.encod_data_dim
        blocked = inputs["cd_keep"] > 0.5
        if inputs.get("cd_pass") is not None:
            blocked = blocked & (inputs["cd_pass"] < 0.5)
        grad_mask[:, :t_e, :n_e] = (~blocked).to(nll.dtype)
        nll = grad_mask * nll + ((1.0 - grad_mask) * nll).detach()
    total = torch.where(valid, nll, torch.zeros_like(nll)).sum()
    if cfg.recon_reduce_mean:
        # A batch without any valid bin contributes 0 rather than 0 / 0.
        return total / max(int(valid.sum()), 1)
    return total / y.shape[0]


def _kl_ic(cfg, ic_mean, ic_std, prior_mean):
    """Analytic KL(N(ic_mean, ic_std^2) || N(prior_mean, ic_prior_var)).

    Args:
        ic_mean, ic_std: posterior [B, ic_dim]. prior_mean: [ic_dim].

    Returns:
        scalar: sum over dimensions, mean over batch.
    """
    prior_var = cfg.ic_prior_var
    kl = (
        0.5 * math.log(prior_var)
        - torch.log(ic_std)
        + (ic_std**2 + (ic_mean - prior_mean) ** 2) / (2.0 * prior_var)
        - 0.5
    )
    return kl.sum(dim=1).mean()


def _kl_co_ar1(co_mean, co_std, eps, logtau, lognvar):
    """One-sample KL of the inferred inputs against the AR(1) prior.

    Args:
        co_mean, co_std: posterior [B, T_r, U]. eps: the KL's own standard normal sample
            [B, T_r, U], or None (the sample is the posterior mean).
        logtau, lognvar: prior parameters [U].

    Returns:
        scalar: mean over batch of sum over (t, u) of log q(s) - log p(s), s = mean + std * eps.
    """
    s = co_mean if eps is None else co_mean + co_std * eps
    log_2pi = math.log(2.0 * math.pi)
    log_q = -0.5 * log_2pi - torch.log(co_std) - 0.5 * ((s - co_mean) / co_std) ** 2

    alpha = torch.exp(-1.0 / torch.exp(logtau))
    nvar = torch.exp(lognvar)
    first_var = nvar / (1.0 - alpha**2)  # stationary variance of the process
    resid = torch.cat([s[:, :1], s[:, 1:] - alpha * s[:, :-1]], dim=1)
    var = torch.cat([first_var.expand(1, -1), nvar.expand(s.shape[1] - 1, -1)], dim=0)
    log_p = -0.5 * (log_2pi + torch.log(var)) - resid**2 / (2.0 * var)
    return (log_q - log_p).sum(dim=(1, 2)).mean()


def _l2_penalty(p, cfg):
    """sum_k scale_k * 0.5 ||W_hh_k||^2 / (numel of the penalised W_hh + 1e-8)."""
    terms = [
        ("ic_enc_fwd_W_hh", cfg.l2_ic_enc_scale),
        ("ic_enc_bwd_W_hh", cfg.l2_ic_enc_scale),
        ("gen_W_hh", cfg.l2_gen_scale),
    ]
    if uses_controller(cfg):
        terms += [(f"ci_enc_{d}_W_hh", cfg.l2_ci_enc_scale) for d in _ci_directions(cfg)]
        terms += [("con_W_hh", cfg.l2_con_scale)]
    penalty = p["gen_W_hh"].new_zeros(())
    size = 0
    for name, scale in terms:
        if scale > 0:
            penalty = penalty + scale * 0.5 * (p[name] ** 2).sum()
            size += p[name].numel()
    return penalty / (size + 1e-8)
