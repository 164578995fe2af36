"""Refinement of the initial conditions (refine.refine_ic, refine.ic_objective): the objective
and its gradient against an independent PyTorch implementation (tests/torch_reference.py) and
float64 finite differences; what the optimiser achieves; argument errors; posterior outputs."""
import numpy as np
import pytest
from optional import OptionalModule

from lfads_fast import LFADS, LFADSConfig, metrics, posterior, refine

torch_reference = OptionalModule("torch_reference")  # tests that use it skip without torch

# float64 model vs float64 torch: same math, different summation order.
F64_RTOL = 1e-8
FD_STEP = 1e-6
FD_RTOL = 1e-6

BASE = dict(encod_data_dim=7, recon_data_dim=7, encod_seq_len=9, recon_seq_len=9, ext_input_dim=0,
            ic_enc_dim=6, ci_enc_dim=5, ci_lag=1, con_dim=5, co_dim=2, ic_dim=4, gen_dim=8,
            fac_dim=3, dropout_rate=0.2, kl_ic_scale=1e-2, kl_co_scale=1e-2, loss_scale=10.0)
NO_CON = dict(co_dim=0, con_dim=0, ci_enc_dim=0)
CASES = {
    "no_controller": NO_CON,
    "controller": {},
    "ext_inputs": dict(NO_CON, ext_input_dim=2),
    "held_out_and_forward": dict(recon_data_dim=10, recon_seq_len=12),
    "prior_var": dict(NO_CON, ic_prior_var=0.5),
    # The TF1 option: the forward pass divides the summed NLL by the trials, not the bins.
    "sum_reduction": dict(recon_reduce_mean=False),
}


def _model(case, rng, dtype=np.float64):
    cfg = LFADSConfig(**dict(BASE, **CASES[case]))
    model = LFADS(cfg, seed=int(rng.integers(1 << 30)), dtype=dtype)
    model.flat += (rng.normal(size=model.flat.shape) * 0.1).astype(dtype)
    model.params["ic_prior_mean"][...] = rng.normal(size=cfg.ic_dim) * 0.1
    return model


def _data(cfg, B, rng):
    encod = rng.poisson(1.5, size=(B, cfg.encod_seq_len, cfg.encod_data_dim)).astype(np.float64)
    encod[rng.random(encod.shape) < 0.05] = np.nan
    ext = rng.normal(size=(B, cfg.recon_seq_len, cfg.ext_input_dim)) if cfg.ext_input_dim else None
    return encod, ext


def _default_targets(cfg, encod):
    """What refine_ic fits when no recon_data is given: the encoder's spikes, NaN elsewhere."""
    B = encod.shape[0]
    targets = np.full((B, cfg.recon_seq_len, cfg.recon_data_dim), np.nan)
    targets[:, : cfg.encod_seq_len, : cfg.encod_data_dim] = encod
    return targets


@pytest.mark.parametrize("case, explicit", [(c, False) for c in CASES]
                         + [("held_out_and_forward", True), ("sum_reduction", True)])
def test_objective_and_gradient_match_torch_reference(rng, case, explicit):
    # explicit: targets given (all read-out neurons and bins, some missing) instead of the
    # encoder's spikes.
    model = _model(case, rng)
    cfg = model.config
    encod, ext = _data(cfg, 5, rng)
    targets = _default_targets(cfg, encod)
    if explicit:
        targets = rng.poisson(1.5, size=targets.shape).astype(np.float64)
        targets[rng.random(targets.shape) < 0.1] = np.nan
    ic = rng.normal(size=(5, cfg.ic_dim)) * 0.5
    obj, grad = refine.ic_objective(model, encod, ic, ext, recon_data=targets if explicit else None)
    ref_obj, ref_grad = torch_reference.reference_ic_objective(
        {k: v.copy() for k, v in model.params.items()}, cfg, encod, targets, ext, ic)
    np.testing.assert_allclose(obj, ref_obj, rtol=F64_RTOL)
    np.testing.assert_allclose(grad, ref_grad, rtol=F64_RTOL, atol=1e-10)


def _finite_differences(objective, ic):
    """Central differences of objective(ic) -> float, element by element."""
    fd = np.zeros_like(ic)
    for idx in np.ndindex(ic.shape):
        plus, minus = ic.copy(), ic.copy()
        plus[idx] += FD_STEP
        minus[idx] -= FD_STEP
        fd[idx] = (objective(plus) - objective(minus)) / (2 * FD_STEP)
    return fd


@pytest.mark.parametrize("case", ["no_controller", "controller"])
def test_gradient_matches_finite_differences(rng, case):
    model = _model(case, rng)
    cfg = model.config
    encod, ext = _data(cfg, 3, rng)
    ic = rng.normal(size=(3, cfg.ic_dim)) * 0.5
    _, grad = refine.ic_objective(model, encod, ic, ext)
    fd = _finite_differences(lambda a: refine.ic_objective(model, encod, a, ext, grads=False)[0], ic)
    np.testing.assert_allclose(grad, fd, rtol=FD_RTOL, atol=1e-7)


def test_each_trial_depends_on_its_own_initial_condition(rng):
    model = _model("controller", rng)
    cfg = model.config
    encod, _ = _data(cfg, 4, rng)
    ic = rng.normal(size=(4, cfg.ic_dim)) * 0.5
    _, grad = refine.ic_objective(model, encod, ic)
    moved = ic.copy()
    moved[2] += 0.3
    _, grad_moved = refine.ic_objective(model, encod, moved)
    np.testing.assert_allclose(np.delete(grad_moved, 2, axis=0), np.delete(grad, 2, axis=0),
                               rtol=1e-12, atol=1e-14)
    assert not np.allclose(grad_moved[2], grad[2])


def _generated_trials(rng, B=40):
    """A model and spikes drawn from its own generator at known initial conditions."""
    cfg = LFADSConfig(**dict(BASE, **NO_CON, encod_data_dim=20, recon_data_dim=20,
                             encod_seq_len=30, recon_seq_len=30, ic_dim=6, gen_dim=16, fac_dim=6))
    model = LFADS(cfg, seed=int(rng.integers(1 << 30)))
    model.params["ic_to_g0_W"][...] *= 4.0  # initial conditions that matter
    model.params["readout_b"][...] = np.log(2.0)  # about 2 spikes per bin: informative
    ic_true = rng.normal(size=(B, cfg.ic_dim)) * np.sqrt(cfg.ic_prior_var)
    dummy = np.zeros((B, cfg.encod_seq_len, cfg.encod_data_dim))
    rates = model.forward(dummy, ic=ic_true)["output_params"]
    spikes = rng.poisson(rates).astype(np.float64)
    return model, spikes, rates, ic_true


def test_refinement_recovers_the_rates_of_a_known_generator(rng):
    # Started at the prior mean (the untrained encoder's guesses are far off), the refined
    # initial conditions must find rates close to the true ones from the spikes alone, at
    # an objective no higher than the true initial conditions'.
    model, spikes, rates, ic_true = _generated_trials(rng)
    start = np.broadcast_to(model.params["ic_prior_mean"], ic_true.shape)
    out = refine.refine_ic(model, spikes, steps=200, lr=0.1, ic_init=start)
    before = model.forward(spikes, ic=out["ic_init"])["output_params"]
    after = model.forward(spikes, ic=out["ic"])["output_params"]
    r2_before, r2_after = metrics.r2(before, rates), metrics.r2(after, rates)
    assert r2_after > 0.9 and r2_after > r2_before + 0.2, (r2_before, r2_after)
    assert out["objective"][-1] < out["objective"][0]
    assert out["objective"][-1] <= refine.ic_objective(model, spikes, ic_true, grads=False)[0]
    assert out["objective"].shape == (201,)
    # The reported objective is ic_objective's at the start and at the end.
    assert out["objective"][0] == pytest.approx(refine.ic_objective(model, spikes, out["ic_init"])[0], rel=1e-12)
    assert out["objective"][-1] == pytest.approx(refine.ic_objective(model, spikes, out["ic"])[0], rel=1e-12)


def test_refinement_starts_at_the_posterior_mean_and_zero_steps_keep_it(rng):
    model = _model("controller", rng, dtype=np.float32)
    encod, _ = _data(model.config, 6, rng)
    mean = model.forward(encod)["ic_mean"]
    out = refine.refine_ic(model, encod, steps=0)
    np.testing.assert_array_equal(out["ic"], mean)
    np.testing.assert_array_equal(out["ic_init"], mean)
    assert out["ic"].dtype == np.float32 and out["objective"].shape == (1,)
    out = refine.refine_ic(model, encod, steps=30, lr=0.05)
    assert out["objective"][-1] < out["objective"][0]
    # The steps reuse one encoding of the trials; a fresh pass at the result agrees.
    assert out["objective"][-1] == pytest.approx(refine.ic_objective(model, encod, out["ic"])[0], rel=1e-6)
    given = refine.refine_ic(model, encod, steps=0, ic_init=out["ic"])
    np.testing.assert_array_equal(given["ic"], out["ic"])


def test_forward_with_given_initial_conditions(rng):
    model = _model("no_controller", rng)
    encod, _ = _data(model.config, 5, rng)
    base = model.forward(encod)
    same = model.forward(encod, ic=base["ic_mean"])
    np.testing.assert_allclose(same["output_params"], base["output_params"], rtol=1e-12)
    ic = base["ic_mean"] + 0.5
    moved = model.forward(encod, ic=ic)
    np.testing.assert_array_equal(moved["ic_mean"], ic)
    np.testing.assert_array_equal(moved["ic_std"], base["ic_std"])
    assert not np.allclose(moved["output_params"], base["output_params"])
    # Sampling the posterior does not move given initial conditions (no controller).
    sampled = model.forward(encod, ic=ic, sample=True, seed=3)
    np.testing.assert_allclose(sampled["output_params"], moved["output_params"], rtol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=-1), "steps must be an integer >= 0"),
    (dict(steps=2.5), "steps must be an integer >= 0"),
    (dict(lr=0.0), "lr must be a finite number > 0"),
    (dict(lr=float("nan")), "lr must be a finite number > 0"),
    (dict(ic_init=np.zeros((5, 3))), r"ic_init must have shape \[5, 4\]"),
    (dict(ic_init=np.full((5, 4), np.inf)), "ic_init has non-finite values"),
    (dict(recon_data=np.zeros((5, 9, 6))), "recon_data must have shape"),
])
def test_refine_ic_argument_errors(rng, kwargs, message):
    model = _model("no_controller", rng)
    encod, _ = _data(model.config, 5, rng)
    with pytest.raises(ValueError, match=message):
        refine.refine_ic(model, encod, **kwargs)


def test_forward_rejects_a_wrong_ic(rng):
    model = _model("no_controller", rng)
    encod, _ = _data(model.config, 5, rng)
    with pytest.raises(ValueError, match=r"ic must have shape \[5, 4\]"):
        model.forward(encod, ic=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="ic has non-finite values"):
        refine.ic_objective(model, encod, np.full((5, 4), np.nan))


def test_posterior_with_refinement(rng):
    model, spikes, rates, _ = _generated_trials(rng, B=12)
    refined = refine.refine_ic(model, spikes, steps=40, lr=0.1)
    out = posterior.sample_and_average(model, spikes, n_samples=5, refine_steps=40, refine_lr=0.1,
                                       max_rows=20)
    np.testing.assert_allclose(out["ic_mean"], refined["ic"], rtol=1e-10, atol=1e-12)
    direct = model.forward(spikes, ic=refined["ic"])
    np.testing.assert_allclose(out["output_params"], direct["output_params"], rtol=1e-9)
    plain = posterior.sample_and_average(model, spikes, n_samples=5)
    assert metrics.r2(out["output_params"], rates) > metrics.r2(plain["output_params"], rates)
    with pytest.raises(ValueError, match="refine_steps must be an integer >= 0"):
        posterior.sample_and_average(model, spikes, refine_steps=-2)


def test_sessions(rng):
    # A stitched model: each session's own read-in and read-out (held-out neurons in one).
    fields = dict(BASE, **NO_CON, encod_data_dim=5, session_neurons=[7, 4],
                  session_recon_neurons=[9, 4])
    del fields["recon_data_dim"]
    cfg = LFADSConfig(**fields)
    model = LFADS(cfg, seed=3, dtype=np.float64)
    model.flat += rng.normal(size=model.flat.shape) * 0.1
    encod = rng.poisson(1.5, size=(3, cfg.encod_seq_len, 7)).astype(np.float64)
    ic = rng.normal(size=(3, cfg.ic_dim)) * 0.5
    obj, grad = refine.ic_objective(model, encod, ic, session=0)
    fd = _finite_differences(lambda a: refine.ic_objective(model, encod, a, session=0, grads=False)[0], ic)
    np.testing.assert_allclose(grad, fd, rtol=FD_RTOL, atol=1e-7)
    # The held-out neurons are not fitted: changing their read-out leaves the objective.
    model.params["readout_W_0"][7:] += 1.0
    assert refine.ic_objective(model, encod, ic, session=0, grads=False)[0] == pytest.approx(obj, rel=1e-12)
    out = refine.refine_ic(model, encod, session=0, steps=20)
    assert out["objective"][-1] < out["objective"][0]
    with pytest.raises(ValueError, match="session= is required"):
        refine.refine_ic(model, encod)
    with pytest.raises(ValueError, match="encod_data must have shape"):
        refine.refine_ic(model, encod, session=1)
