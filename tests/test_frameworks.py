"""The framework implementations timed by bench/bench_frameworks.py compute the same loss and
gradients as lfads_fast on shared parameters, data and noise: the JAX one (tests/
jax_reference.py) and torch.compile of the PyTorch reference (tests/torch_reference.py). So
the benchmark times the same math."""
import numpy as np
import pytest

from lfads_fast import LFADS, LFADSConfig
from model_cases import BASE

jax_reference = pytest.importorskip("jax_reference", reason="jax is not installed (test extra)")

# float64 JAX vs float64 compiled model: same math, other summation order.
F64_RTOL = 1e-8
# float32 against float64 (per-parameter norm-wise gradient error), as in tests/test_model.py.
F32_GRAD_RTOL = 3e-3
F32_LOSS_RTOL = 1e-4

CASES = {
    "controller": {},
    "no_controller": dict(co_dim=0, con_dim=0, ci_enc_dim=0),
    # Held-out neurons, forward prediction, external inputs, coordinated dropout, a lag of 2
    # and a clip the states reach.
    "all_at_once": dict(ext_input_dim=3, recon_data_dim=9, recon_seq_len=11, ci_lag=2,
                        cd_rate=0.25, cell_clip=0.7),
}


def _case(case, dtype, seed):
    rng = np.random.default_rng(seed)
    cfg = LFADSConfig(**dict(BASE, **CASES[case]))
    model = LFADS(cfg, seed=seed, dtype=dtype)
    model.flat += (rng.normal(size=model.flat.shape) * 0.1).astype(dtype)
    B = 5
    encod = rng.poisson(1.5, (B, cfg.encod_seq_len, cfg.encod_data_dim)).astype(np.float64)
    recon = rng.poisson(1.5, (B, cfg.recon_seq_len, cfg.recon_data_dim)).astype(np.float64)
    recon[:, : cfg.encod_seq_len, : cfg.encod_data_dim] = encod
    recon[rng.random(recon.shape) < 0.05] = np.nan
    ext = rng.normal(size=(B, cfg.recon_seq_len, cfg.ext_input_dim)) if cfg.ext_input_dim else None
    noise = model.draw_noise(B, rng, train=True)
    terms, grad = model.loss_and_grads(model.make_batch(encod, recon, ext), noise,
                                       kl_ramp=0.7, l2_ramp=0.4)
    return cfg, model, (encod, recon, ext, noise), terms, model.views(grad)


@pytest.mark.parametrize("case", list(CASES))
def test_jax_float64_matches_lfads_fast(case):
    cfg, model, (encod, recon, ext, noise), terms, grads = _case(case, np.float64, 11)
    if case == "all_at_once":
        out = model.forward(encod, ext)
        assert np.any(np.abs(out["gen_states"]) >= cfg.cell_clip), "clip never reached"
    j_terms, j_grads = jax_reference.loss_and_grads(
        dict(model.params), cfg, encod, recon, ext, noise, kl_ramp=0.7, l2_ramp=0.4)
    for k in jax_reference.TERMS:
        np.testing.assert_allclose(j_terms[k], terms[k], rtol=F64_RTOL, atol=1e-12, err_msg=k)
    assert set(j_grads) == set(grads)
    for k in grads:
        np.testing.assert_allclose(j_grads[k], grads[k], rtol=F64_RTOL, atol=1e-10, err_msg=k)


@pytest.mark.parametrize("case", ["controller", "all_at_once"])
def test_jax_float32_matches_lfads_fast_float64(case):
    cfg, model, (encod, recon, ext, noise), terms, grads = _case(case, np.float64, 12)
    j_terms, j_grads = jax_reference.loss_and_grads(
        {k: v.astype(np.float32) for k, v in model.params.items()}, cfg, encod, recon, ext,
        noise, kl_ramp=0.7, l2_ramp=0.4, dtype=np.float32)
    np.testing.assert_allclose(j_terms["loss"], terms["loss"], rtol=F32_LOSS_RTOL)
    for k in grads:
        err = np.linalg.norm(j_grads[k] - grads[k]) / max(np.linalg.norm(grads[k]), 1e-6)
        assert err < F32_GRAD_RTOL, (k, err)


def test_jax_forward_outputs_match_lfads_fast():
    cfg, model, (encod, recon, ext, _), _, _ = _case("all_at_once", np.float64, 13)
    out = model.forward(encod, ext)
    p, inputs = jax_reference.device_inputs(dict(model.params), cfg, encod, recon, ext, None,
                                            np.float64)
    j_out = jax_reference.make_forward(cfg)(p, inputs)
    for k in ("output_params", "factors", "gen_states", "gen_init", "gen_inputs", "con_states",
              "co_means", "co_stds", "ic_mean", "ic_std"):
        np.testing.assert_allclose(np.asarray(j_out[k]), out[k], rtol=1e-8, atol=1e-12, err_msg=k)


def test_torch_compile_matches_eager():
    """torch.compile of the reference's GRU cell (how bench_frameworks compiles it) gives the
    eager reference's loss and gradients."""
    torch = pytest.importorskip("torch")
    torch_reference = pytest.importorskip("torch_reference")
    cfg, model, (encod, recon, ext, noise), terms, grads = _case("controller", np.float64, 14)
    params = dict(model.params)
    eager_terms, eager_grads, _ = torch_reference.reference_loss_and_grads(
        params, cfg, encod, recon, ext, noise, kl_ramp=0.7, l2_ramp=0.4)
    eager_cell = torch_reference._clipped_gru_cell
    try:
        torch_reference._clipped_gru_cell = torch.compile(eager_cell, dynamic=False)
        c_terms, c_grads, _ = torch_reference.reference_loss_and_grads(
            params, cfg, encod, recon, ext, noise, kl_ramp=0.7, l2_ramp=0.4)
    finally:
        torch_reference._clipped_gru_cell = eager_cell
    np.testing.assert_allclose(c_terms["loss"], eager_terms["loss"], rtol=1e-12)
    np.testing.assert_allclose(c_terms["loss"], terms["loss"], rtol=F64_RTOL)
    for k in grads:
        np.testing.assert_allclose(c_grads[k], grads[k], rtol=F64_RTOL, atol=1e-10, err_msg=k)
