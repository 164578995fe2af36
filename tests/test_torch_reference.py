"""Self-checks of the PyTorch reference model (tests/torch_reference.py).

The reference is what the compiled model is checked against, so it is itself checked here
against finite differences, against torch.distributions, and against the gradient formulas
written in docs/math.md. Sizes are tiny: the whole module runs in a few seconds on one core.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402  (needs torch)

# Central differences in float64 with step FD_STEP: truncation error ~ FD_STEP^2 * |f'''| and
# rounding error ~ 1e-16 * |loss| / FD_STEP ~ 1e-9 for losses of O(100); both well below these.
FD_STEP = 1e-5
FD_RTOL = 1e-5
FD_ATOL = 1e-7
# Two float64 evaluations of the same quantity by different formulas (rounding only).
EXACT_RTOL = 1e-10
EXACT_ATOL = 1e-12
# float32 against float64 on a tiny model: a few hundred float32 roundings accumulate.
FLOAT32_RTOL = 1e-4

# The full model: controller, external inputs given for T_e steps only, forward prediction
# (T_r > T_e), held-out neurons (N_r > N_e), a lag longer than one step, and a cell clip low
# enough that some states saturate.
FULL = dict(
    encod_seq_len=4, recon_seq_len=6, encod_data_dim=3, recon_data_dim=5, ext_input_dim=2,
    ci_lag=2, cell_clip=0.6,
)
NO_CON = dict(ci_enc_dim=0, encod_seq_len=4, recon_seq_len=5, recon_data_dim=6)
NO_CON_NO_EXT = dict(con_dim=0, co_dim=0)
EXT_FULL_LENGTH = dict(ext_input_dim=3, recon_seq_len=7)

B = 3


def _batch(cfg, seed, ext_steps=None):
    """Random spike counts and external inputs (batch-major numpy) for cfg."""
    rng = np.random.default_rng(seed)
    encod = rng.poisson(1.5, (B, cfg.encod_seq_len, cfg.encod_data_dim)).astype(float)
    recon = rng.poisson(1.5, (B, cfg.recon_seq_len, cfg.recon_data_dim)).astype(float)
    recon[:, : cfg.encod_seq_len, : cfg.encod_data_dim] = encod
    ext = None
    if cfg.ext_input_dim > 0:
        steps = cfg.encod_seq_len if ext_steps is None else ext_steps
        ext = rng.standard_normal((B, steps, cfg.ext_input_dim))
    return encod, recon, ext


def _perturbed_params(cfg, seed):
    """lfads-torch initialisation plus noise, so no gradient is zero by symmetry."""
    rng = np.random.default_rng(seed + 100)
    params = ref.init_params(cfg, seed)
    return {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}


def _loss(params, cfg, encod, recon, ext, noise, **kw):
    terms, _, _ = ref.reference_loss_and_grads(params, cfg, encod, recon, ext, noise, **kw)
    return terms["loss"]


@pytest.mark.parametrize("overrides", [FULL, NO_CON], ids=["full", "no_con"])
def test_gradients_match_finite_differences(overrides):
    cfg = ref.make_config(**overrides)
    params = _perturbed_params(cfg, 0)
    encod, recon, ext = _batch(cfg, 1)
    recon[0, 1, 0] = np.nan
    # Coordinated dropout off: its gradient mask deliberately makes the gradient differ from
    # the derivative of the loss value (tested on its own below).
    noise = ref.draw_noise(cfg, B, 2, cd=False)
    kw = dict(kl_ramp=0.8, l2_ramp=0.6)
    _, grads, outputs = ref.reference_loss_and_grads(params, cfg, encod, recon, ext, noise, **kw)
    if cfg.cell_clip < 1:
        assert np.any(np.abs(outputs["gen_states"]) == cfg.cell_clip), "clip never reached"

    rng = np.random.default_rng(3)
    for name in (n for n in params if params[n].size):  # one random entry of each
        idx = tuple(rng.integers(0, s) for s in params[name].shape)
        plus = {**params, name: params[name].copy()}
        minus = {**params, name: params[name].copy()}
        plus[name][idx] += FD_STEP
        minus[name][idx] -= FD_STEP
        numeric = (_loss(plus, cfg, encod, recon, ext, noise, **kw)
                   - _loss(minus, cfg, encod, recon, ext, noise, **kw)) / (2 * FD_STEP)
        assert grads[name][idx] == pytest.approx(numeric, rel=FD_RTOL, abs=FD_ATOL), name


def test_nan_bins_are_left_out():
    cfg = ref.make_config(cd_rate=0.0)
    params = _perturbed_params(cfg, 4)
    encod, recon, _ = _batch(cfg, 5)
    recon[:, :, 1] = np.nan  # neuron 1 never observed
    recon[0, 2, 3] = np.nan
    noise = ref.draw_noise(cfg, B, 6)
    terms, grads, outputs = ref.reference_loss_and_grads(params, cfg, encod, recon, noise=noise)

    assert all(np.all(np.isfinite(g)) for g in grads.values())
    assert grads["readout_b"][1] == 0.0
    assert np.all(grads["readout_W"][1] == 0.0)
    valid = ~np.isnan(recon)
    rates, y = outputs["output_params"][valid], recon[valid]
    lgamma = np.array([math.lgamma(v + 1) for v in y])
    expected = np.sum(rates - y * np.log(rates) + lgamma) / valid.sum()
    assert terms["recon"] == pytest.approx(expected, rel=EXACT_RTOL)
    # Any value in a NaN bin would have changed both.
    recon_filled = np.where(valid, recon, 7.0)
    terms_filled, _, _ = ref.reference_loss_and_grads(params, cfg, encod, recon_filled, noise=noise)
    assert terms_filled["recon"] != pytest.approx(terms["recon"])


def test_nan_in_encoder_input_enters_as_zero():
    cfg = ref.make_config()
    params = ref.init_params(cfg, 31)
    encod, recon, _ = _batch(cfg, 32)
    noise = ref.draw_noise(cfg, B, 33)
    encod_nan, encod_zero = encod.copy(), encod.copy()
    encod_nan[1, 2, :2], encod_zero[1, 2, :2] = np.nan, 0.0
    with_nan = ref.reference_loss_and_grads(params, cfg, encod_nan, recon, noise=noise)
    with_zero = ref.reference_loss_and_grads(params, cfg, encod_zero, recon, noise=noise)
    assert with_nan[0] == with_zero[0]
    for name in params:
        np.testing.assert_array_equal(with_nan[1][name], with_zero[1][name])


def test_recon_sum_reduction_divides_by_batch():
    cfg = ref.make_config(recon_reduce_mean=False)
    params = ref.init_params(cfg, 7)
    encod, recon, _ = _batch(cfg, 8)
    recon[1, 0, 0] = np.nan
    terms, _, outputs = ref.reference_loss_and_grads(params, cfg, encod, recon)
    valid = ~np.isnan(recon)
    rates, y = outputs["output_params"][valid], recon[valid]
    lgamma = np.array([math.lgamma(v + 1) for v in y])
    assert terms["recon"] == pytest.approx(np.sum(rates - y * np.log(rates) + lgamma) / B,
                                           rel=EXACT_RTOL)


def test_coordinated_dropout_blocks_gradients_of_kept_bins():
    cfg = ref.make_config(recon_data_dim=6)  # neurons 4, 5 are held out, never masked
    params = _perturbed_params(cfg, 9)
    encod, recon, _ = _batch(cfg, 10)
    keep = np.ones((cfg.encod_seq_len, B, cfg.encod_data_dim))
    keep[:, :, 0] = 0.0  # neuron 0 is dropped everywhere: its bins carry the gradient
    noise = {"cd_keep": keep}
    terms, grads, outputs = ref.reference_loss_and_grads(params, cfg, encod, recon, noise=noise)

    assert np.all(grads["readout_b"][1:4] == 0.0)
    assert np.all(grads["readout_W"][1:4] == 0.0)
    assert np.all(grads["readout_b"][[0, 4, 5]] != 0.0)
    # The value still counts every bin.
    rates = outputs["output_params"]
    lgamma = np.vectorize(math.lgamma)(recon + 1)
    expected = np.mean(rates - recon * np.log(rates) + lgamma)
    assert terms["recon"] == pytest.approx(expected, rel=EXACT_RTOL)


@pytest.mark.parametrize(
    "overrides, ext_steps",
    [(NO_CON, None), (NO_CON_NO_EXT, None), (EXT_FULL_LENGTH, 7), (FULL, None)],
    ids=["no_con", "no_con_no_ext", "ext_full_length", "full"],
)
def test_variants_run_with_expected_shapes(overrides, ext_steps):
    cfg = ref.make_config(**overrides)
    params = ref.init_params(cfg, 12)
    encod, recon, ext = _batch(cfg, 13, ext_steps)
    noise = ref.draw_noise(cfg, B, 14)
    terms, grads, outputs = ref.reference_loss_and_grads(params, cfg, encod, recon, ext, noise)

    has_con = ref.uses_controller(cfg)
    u = cfg.co_dim if has_con else 0
    t_r = cfg.recon_seq_len
    assert set(params) == set(ref.param_shapes(cfg))
    assert ("con_W_hh" in params) == has_con
    assert all(grads[k].shape == params[k].shape for k in params)
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    assert np.isfinite(terms["loss"]) and (terms["kl_co"] > 0) == has_con
    assert outputs["output_params"].shape == (B, t_r, cfg.recon_data_dim)
    assert outputs["factors"].shape == (B, t_r, cfg.fac_dim)
    assert outputs["gen_inputs"].shape == (B, t_r, u + cfg.ext_input_dim)
    assert outputs["co_means"].shape == (B, t_r, u)
    assert outputs["con_states"].shape == (B, t_r, cfg.con_dim if has_con else 0)
    if ext is not None:
        # External inputs reach the generator, dropped out, zero-padded past their end.
        drop = noise["drop_ext"].transpose(1, 0, 2)
        gen_ext = outputs["gen_inputs"][:, :, u:]
        steps = ext.shape[1]
        np.testing.assert_allclose(gen_ext[:, :steps], ext * drop[:, :steps], rtol=EXACT_RTOL)
        assert np.all(gen_ext[:, steps:] == 0.0)


def test_kl_co_matches_torch_distributions():
    cfg = ref.make_config(recon_seq_len=7, co_prior_tau=3.0)
    params = _perturbed_params(cfg, 15)
    encod, recon, _ = _batch(cfg, 16)
    noise = ref.draw_noise(cfg, B, 17)
    terms, _, outputs = ref.reference_loss_and_grads(params, cfg, encod, recon, noise=noise)

    mean = torch.tensor(outputs["co_means"])  # [B, T, U]
    std = torch.tensor(outputs["co_stds"])
    sample = mean + std * torch.tensor(noise["co_kl_eps"]).transpose(0, 1)
    log_q = torch.distributions.Independent(torch.distributions.Normal(mean, std), 2)
    log_p = _ar1_prior(torch.tensor(params["co_prior_logtau"]),
                       torch.tensor(params["co_prior_lognvar"]), cfg.recon_seq_len)
    kl = (log_q.log_prob(sample) - log_p.log_prob(sample.transpose(1, 2)).sum(-1)).mean()
    assert terms["kl_co"] == pytest.approx(kl.item(), rel=EXACT_RTOL)


def test_documented_kl_gradients():
    """The closed-form KL gradients of docs/math.md against autograd of torch.distributions."""
    rng = np.random.default_rng(18)
    b, t, u = 3, 5, 2

    def leaf(shape, scale=1.0, offset=0.0):
        return torch.tensor(offset + scale * rng.standard_normal(shape), requires_grad=True)

    # AR(1) KL, one sample.
    mean, logvar = leaf((b, t, u)), leaf((b, t, u), 0.3, -1.0)
    logtau, lognvar = leaf(u, 0.2, math.log(4.0)), leaf(u, 0.2, math.log(0.3))
    eps = torch.tensor(rng.standard_normal((b, t, u)))
    std = torch.exp(0.5 * logvar)
    sample = mean + std * eps
    log_q = torch.distributions.Independent(torch.distributions.Normal(mean, std), 2)
    log_p = _ar1_prior(logtau, lognvar, t).log_prob(sample.transpose(1, 2)).sum(-1)
    kl = (log_q.log_prob(sample) - log_p).mean()
    auto = torch.autograd.grad(kl, [mean, logvar, logtau, lognvar])

    s, e, sd = sample.detach().numpy(), eps.numpy(), std.detach().numpy()
    tau, nvar = np.exp(logtau.detach().numpy()), np.exp(lognvar.detach().numpy())
    a = np.exp(-1.0 / tau)
    pvar = nvar / (1 - a**2)
    r = np.concatenate([s[:, :1], s[:, 1:] - a * s[:, :-1]], axis=1)  # residuals r_t
    v = np.concatenate([np.broadcast_to(pvar, (b, 1, u)), np.broadcast_to(nvar, (b, t - 1, u))], 1)
    rv = r / v
    g = rv - a * np.concatenate([rv[:, 1:], np.zeros((b, 1, u))], axis=1)  # dKL_b / ds_t
    d_mean = g / b
    d_logvar = (-0.5 + 0.5 * g * sd * e) / b
    d_logtau = (a / tau) * (a * (1 - s[:, 0] ** 2 / pvar) / (1 - a**2)
                            - np.sum(r[:, 1:] * s[:, :-1], axis=1) / nvar)
    d_lognvar = t / 2 - 0.5 * np.sum(r**2 / v, axis=1)
    for got, want in zip(auto, [d_mean, d_logvar, d_logtau.mean(0), d_lognvar.mean(0)]):
        np.testing.assert_allclose(got.numpy(), want, rtol=EXACT_RTOL, atol=EXACT_ATOL)

    # IC KL, analytic.
    prior_var, var_min = 0.1, 1e-4
    ic_mean, ic_logvar, prior_mean = leaf((b, u)), leaf((b, u), 0.5, -2.0), leaf(u)
    ic_std = torch.sqrt(torch.exp(ic_logvar) + var_min)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(ic_mean, ic_std),
        torch.distributions.Normal(prior_mean, math.sqrt(prior_var)),
    ).sum(1).mean()
    auto = torch.autograd.grad(kl, [ic_mean, ic_logvar, prior_mean])
    m, mu = ic_mean.detach().numpy(), prior_mean.detach().numpy()
    ev = np.exp(ic_logvar.detach().numpy())
    d_m = (m - mu) / prior_var / b
    d_lv = 0.5 * ev * (1 / prior_var - 1 / (ev + var_min)) / b
    for got, want in zip(auto, [d_m, d_lv, -d_m.sum(0)]):
        np.testing.assert_allclose(got.numpy(), want, rtol=EXACT_RTOL, atol=EXACT_ATOL)


def test_kl_co_gradients_in_the_loss_follow_the_documented_formula():
    """d loss / d co_prior_* = loss_scale * kl_ramp * kl_co_scale * d kl_co / d co_prior_*."""
    cfg = ref.make_config(loss_scale=3.0)
    params = _perturbed_params(cfg, 19)
    encod, recon, _ = _batch(cfg, 20)
    noise = ref.draw_noise(cfg, B, 21)
    kl_ramp = 0.4
    _, grads, outputs = ref.reference_loss_and_grads(params, cfg, encod, recon, noise=noise,
                                                     kl_ramp=kl_ramp)
    s = outputs["co_means"] + outputs["co_stds"] * noise["co_kl_eps"].transpose(1, 0, 2)
    tau = np.exp(params["co_prior_logtau"])
    nvar = np.exp(params["co_prior_lognvar"])
    a = np.exp(-1.0 / tau)
    pvar = nvar / (1 - a**2)
    r = np.concatenate([s[:, :1], s[:, 1:] - a * s[:, :-1]], axis=1)
    v = np.concatenate([np.broadcast_to(pvar, s[:, :1].shape),
                        np.broadcast_to(nvar, s[:, 1:].shape)], axis=1)
    d_logtau = (a / tau) * (a * (1 - s[:, 0] ** 2 / pvar) / (1 - a**2)
                            - np.sum(r[:, 1:] * s[:, :-1], axis=1) / nvar)
    d_lognvar = s.shape[1] / 2 - 0.5 * np.sum(r**2 / v, axis=1)
    weight = cfg.loss_scale * kl_ramp * cfg.kl_co_scale
    np.testing.assert_allclose(grads["co_prior_logtau"], weight * d_logtau.mean(0), rtol=1e-9)
    np.testing.assert_allclose(grads["co_prior_lognvar"], weight * d_lognvar.mean(0), rtol=1e-9)


def test_noise_off_means_deterministic_posterior_means():
    cfg = ref.make_config()
    params = ref.init_params(cfg, 22)
    encod, recon, _ = _batch(cfg, 23)
    noise = ref.draw_noise(cfg, B, 24, dropout=False, cd=False, sample=False)
    assert all(v is None for v in noise.values())
    with_none = ref.reference_loss_and_grads(params, cfg, encod, recon, noise=noise)
    without = ref.reference_loss_and_grads(params, cfg, encod, recon)
    assert with_none[0] == without[0]
    # Without a sample, u_t is the posterior mean.
    outputs = without[2]
    np.testing.assert_array_equal(outputs["gen_inputs"], outputs["co_means"])


def test_float32_agrees_with_float64():
    cfg = ref.make_config(**FULL)
    params = ref.init_params(cfg, 28)
    encod, recon, ext = _batch(cfg, 29)
    noise = ref.draw_noise(cfg, B, 30)
    t64, g64, _ = ref.reference_loss_and_grads(params, cfg, encod, recon, ext, noise)
    t32, g32, _ = ref.reference_loss_and_grads(params, cfg, encod, recon, ext, noise,
                                               dtype=torch.float32)
    assert g32["gen_W_hh"].dtype == np.float32 and g64["gen_W_hh"].dtype == np.float64
    assert t32["loss"] == pytest.approx(t64["loss"], rel=FLOAT32_RTOL)
    for name in g64:
        np.testing.assert_allclose(g32[name], g64[name], rtol=FLOAT32_RTOL,
                                   atol=FLOAT32_RTOL * np.abs(g64[name]).max(), err_msg=name)


def test_init_params_follows_lfads_torch():
    cfg = ref.make_config(encod_data_dim=40, ic_enc_dim=60, gen_dim=64, fac_dim=30,
                          ci_enc_dim=8, con_dim=8, co_dim=4)
    params = ref.init_params(cfg, 25)
    assert all(v.dtype == np.float64 for v in params.values())
    assert params["ic_enc_fwd_W_hh"].std() == pytest.approx(1 / math.sqrt(100), rel=0.05)
    assert params["gen_W_hh"].std() == pytest.approx(1 / math.sqrt(64), rel=0.05)
    assert params["readout_W"].std() == pytest.approx(1 / math.sqrt(30), rel=0.1)
    np.testing.assert_array_equal(params["gen_b_ih"], np.repeat([1.0, 1.0, 0.0], 64))
    np.testing.assert_allclose(np.exp(params["co_prior_logtau"]), cfg.co_prior_tau)
    np.testing.assert_allclose(np.exp(params["co_prior_lognvar"]), cfg.co_prior_nvar)
    assert np.all(params["con_h0"] == 0) and np.all(params["ic_enc_h0"] == 0)


def test_bad_inputs_raise():
    cfg = ref.make_config()
    params = ref.init_params(cfg, 26)
    encod, recon, _ = _batch(cfg, 27)
    with pytest.raises(ValueError, match="missing"):
        ref.reference_loss_and_grads({k: v for k, v in params.items() if k != "fac_W"},
                                     cfg, encod, recon)
    with pytest.raises(ValueError, match="recon_data"):
        ref.reference_loss_and_grads(params, cfg, encod, recon[:, :-1])
    with pytest.raises(ValueError, match="drop_gen"):
        ref.reference_loss_and_grads(params, cfg, encod, recon,
                                     noise={"drop_gen": np.ones((2, 2, 2))})
    with pytest.raises(TypeError):
        ref.make_config(gen_size=3)


def _ar1_prior(logtau, lognvar, T):
    """AR(1) prior of each inferred-input channel as a Gaussian over its whole path.

    Stationary AR(1): Cov[s_i, s_j] = nvar / (1 - alpha^2) * alpha^|i - j|.

    Returns:
        MultivariateNormal with batch shape [U] and event shape [T].
    """
    alpha = torch.exp(-1.0 / torch.exp(logtau))
    pvar = torch.exp(lognvar) / (1 - alpha**2)
    lags = torch.arange(T, dtype=logtau.dtype)
    lags = (lags[:, None] - lags[None, :]).abs()
    cov = pvar[:, None, None] * alpha[:, None, None] ** lags
    return torch.distributions.MultivariateNormal(torch.zeros(T, dtype=logtau.dtype), cov)
