"""The whole model: loss terms and every parameter gradient against an independent PyTorch
implementation of docs/math.md (tests/torch_reference.py), and float64 finite differences."""
import numpy as np
import pytest
from optional import OptionalModule

from lfads_fast import LFADS, LFADSConfig
from model_cases import BASE, check_flat_gradient, record_sparse_products

torch_reference = OptionalModule("torch_reference")  # tests that use it skip without torch

# float64 model vs float64 torch: same math, different summation order -> ~1e-12 relative.
F64_RTOL = 1e-8
# float32 model vs float64 torch: per-parameter relative error of the gradient (norm-wise);
# float32 accumulation over T * B rows and BPTT through ~20 steps of two coupled GRUs.
F32_GRAD_RTOL = 3e-3
F32_LOSS_RTOL = 1e-4
FD_STEP = 1e-6
FD_RTOL = 1e-5

CASES = {
    "controller": {},
    "no_controller": dict(co_dim=0, con_dim=0, ci_enc_dim=0),
    "ci_lag_3": dict(ci_lag=3),
    "ext_inputs": dict(ext_input_dim=2),
    "co_smoothing": dict(recon_data_dim=10),
    "forward_prediction": dict(recon_seq_len=12),
    "coordinated_dropout": dict(cd_rate=0.3),
    "coordinated_dropout_pass": dict(cd_rate=0.3, cd_pass_rate=0.4),
    "sum_reduction": dict(recon_reduce_mean=False),
    "all_at_once": dict(ext_input_dim=3, recon_data_dim=9, recon_seq_len=11, ci_lag=2, cd_rate=0.25,
                        cd_pass_rate=0.3),
}


def make_data(cfg, B, rng, nan_frac=0.05, rate=1.5):
    encod = rng.poisson(rate, size=(B, cfg.encod_seq_len, cfg.encod_data_dim)).astype(np.float64)
    recon = rng.poisson(rate, size=(B, cfg.recon_seq_len, cfg.recon_data_dim)).astype(np.float64)
    recon[:, : cfg.encod_seq_len, : cfg.encod_data_dim] = encod
    recon[rng.random(recon.shape) < nan_frac] = np.nan
    ext = rng.normal(size=(B, cfg.recon_seq_len, cfg.ext_input_dim)) if cfg.ext_input_dim else None
    return encod, recon, ext


def run_both(case, rng, dtype, B=5, sample=True, rate=1.5):
    cfg = LFADSConfig(**dict(BASE, **CASES[case]))
    model = LFADS(cfg, seed=int(rng.integers(1 << 30)), dtype=dtype)
    # Perturb away from the initialisation so that no gradient is trivially zero.
    model.flat += (rng.normal(size=model.flat.shape) * 0.1).astype(dtype)
    encod, recon, ext = make_data(cfg, B, rng, rate=rate)
    batch = model.make_batch(encod, recon, ext)
    noise = model.draw_noise(B, rng, train=True, sample=sample)
    terms, grad = model.loss_and_grads(batch, noise, kl_ramp=0.7, l2_ramp=0.4)
    params64 = {k: v.astype(np.float64) for k, v in model.params.items()}
    noise64 = {k: v.astype(np.float64) for k, v in noise.items()}
    ref_terms, ref_grads, _ = torch_reference.reference_loss_and_grads(
        params64, cfg, encod, recon, ext, noise64, kl_ramp=0.7, l2_ramp=0.4)
    return model, terms, model.views(grad), ref_terms, ref_grads


@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_torch_reference(rng, case):
    model, terms, grads, ref_terms, ref_grads = run_both(case, rng, np.float64)
    for k in ("loss", "recon", "kl_ic", "kl_co", "l2"):
        np.testing.assert_allclose(terms[k], ref_terms[k], rtol=F64_RTOL, atol=1e-12, err_msg=k)
    assert set(ref_grads) == set(grads)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=F64_RTOL, atol=1e-10, err_msg=k)


@pytest.mark.parametrize("case", ["controller", "no_controller", "all_at_once"])
def test_float32_matches_torch_reference(rng, case):
    model, terms, grads, ref_terms, ref_grads = run_both(case, rng, np.float32)
    np.testing.assert_allclose(terms["loss"], ref_terms["loss"], rtol=F32_LOSS_RTOL)
    for k in grads:
        ref = ref_grads[k]
        err = np.linalg.norm(grads[k] - ref) / max(np.linalg.norm(ref), 1e-6)
        assert err < F32_GRAD_RTOL, (k, err)


@pytest.mark.parametrize("case", ["controller", "all_at_once"])
def test_sparse_counts_take_the_sparse_products_and_match_the_reference(rng, monkeypatch, case):
    """Counts as sparse as real recordings' (a few % of bins hold a spike): the encoder
    input's projection and its weight gradient multiply only the nonzeros; same loss and
    gradients as the reference."""
    ran = record_sparse_products(monkeypatch)
    model, terms, grads, ref_terms, ref_grads = run_both(case, rng, np.float64, B=6, rate=0.1)
    monkeypatch.undo()
    assert ran == [("a", True), ("b", True)]
    for k in ("loss", "recon", "kl_ic", "kl_co", "l2"):
        np.testing.assert_allclose(terms[k], ref_terms[k], rtol=F64_RTOL, atol=1e-12, err_msg=k)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=F64_RTOL, atol=1e-10, err_msg=k)


def test_posterior_means_match_reference(rng):
    model, terms, grads, ref_terms, ref_grads = run_both("controller", rng, np.float64, sample=False)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=F64_RTOL, atol=1e-10, err_msg=k)


def test_edge_shapes_B1_T1(rng):
    cfg = LFADSConfig(**dict(BASE, encod_seq_len=1, recon_seq_len=1, ci_lag=1))
    model = LFADS(cfg, seed=3, dtype=np.float64)
    encod, recon, _ = make_data(cfg, 1, rng, nan_frac=0)
    noise = model.draw_noise(1, rng)
    terms, grad = model.loss_and_grads(model.make_batch(encod, recon), noise)
    ref_terms, ref_grads, _ = torch_reference.reference_loss_and_grads(
        dict(model.params), cfg, encod, recon, None, noise)
    np.testing.assert_allclose(terms["loss"], ref_terms["loss"], rtol=F64_RTOL)
    for k, v in model.views(grad).items():
        np.testing.assert_allclose(v, ref_grads[k], rtol=F64_RTOL, atol=1e-10, err_msg=k)


def test_gradient_finite_differences(rng):
    """The model's own float64 gradient against central differences of its loss. (No
    coordinated dropout here: its gradient mask is a deliberate stop-gradient.)"""
    cfg = LFADSConfig(**dict(BASE, ext_input_dim=2, recon_data_dim=9, recon_seq_len=11))
    model = LFADS(cfg, seed=1, dtype=np.float64)
    encod, recon, ext = make_data(cfg, 3, rng)
    batch = model.make_batch(encod, recon, ext)
    noise = model.draw_noise(3, rng)
    _, grad = model.loss_and_grads(batch, noise)
    idx = rng.choice(model.num_params, size=60, replace=False)
    check_flat_gradient(model, batch, noise, grad, idx, FD_STEP, FD_RTOL)


def test_forward_outputs(rng):
    cfg = LFADSConfig(**dict(BASE, ext_input_dim=2, recon_data_dim=9, recon_seq_len=11))
    model = LFADS(cfg, seed=0)
    encod, recon, ext = make_data(cfg, 4, rng)
    out = model.forward(encod, ext, recon_data=recon)
    B, Tr = 4, cfg.recon_seq_len
    expect = {"output_params": (B, Tr, 9), "factors": (B, Tr, 3), "gen_states": (B, Tr, 8),
              "gen_init": (B, 8), "gen_inputs": (B, Tr, 4), "con_states": (B, Tr, 5),
              "co_means": (B, Tr, 2), "co_stds": (B, Tr, 2), "ic_mean": (B, 4), "ic_std": (B, 4)}
    for k, s in expect.items():
        assert out[k].shape == s, k
        assert np.all(np.isfinite(out[k])), k
    assert np.all(out["output_params"] > 0)
    # Posterior means are deterministic; samples differ by seed.
    again = model.forward(encod, ext)
    np.testing.assert_array_equal(out["output_params"], again["output_params"])
    s1 = model.forward(encod, ext, sample=True, seed=1)
    s2 = model.forward(encod, ext, sample=True, seed=2)
    assert not np.allclose(s1["output_params"], s2["output_params"])


@pytest.mark.parametrize("field,value,match", [
    ("encod_data_dim", 0, "encod_data_dim must be an integer >= 1"),
    ("recon_data_dim", 3, "recon_data_dim .* must be >= encod_data_dim"),
    ("recon_seq_len", 2, "recon_seq_len .* must be >= encod_seq_len"),
    ("dropout_rate", 1.0, "dropout_rate must be in"),
    ("con_dim", 0, "co_dim = 2 turns the controller on"),
    ("cell_clip", -1.0, "cell_clip must be a positive number"),
    ("gen_dim", 2.5, "gen_dim must be an integer"),
    ("cd_pass_rate", 1.5, r"cd_pass_rate must be in \[0, 1\], got 1.5"),
    ("cd_pass_rate", -0.1, r"cd_pass_rate must be in \[0, 1\], got -0.1"),
    ("cd_pass_rate", "0.2", "cd_pass_rate must be a finite number"),
    ("cd_pass_rate", float("nan"), "cd_pass_rate must be a finite number"),
])
def test_config_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        LFADSConfig(**dict(BASE, **{field: value}))


def test_bad_batches(rng):
    cfg = LFADSConfig(**BASE)
    model = LFADS(cfg)
    encod, recon, _ = make_data(cfg, 2, rng)
    with pytest.raises(ValueError, match="encod_data must have shape"):
        model.make_batch(encod[:, :-1], recon)
    bad = recon.copy()
    bad[0, 0, 0] = -1
    with pytest.raises(ValueError, match="recon_data has negative spike counts"):
        model.make_batch(encod, bad)
    bad = encod.copy()
    bad[0, 0, 0] = 0.5
    with pytest.raises(ValueError, match="encod_data has non-integer spike counts"):
        model.make_batch(bad, recon)
    with pytest.raises(ValueError, match="ext_input must be finite"):
        ext_model = LFADS(LFADSConfig(**dict(BASE, ext_input_dim=1)))
        ext = np.ones((2, 9, 1))
        ext[1, 2, 0] = np.nan
        ext_model.make_batch(encod, recon, ext)
    with pytest.raises(ValueError, match="ext_input was given"):
        model.make_batch(encod, recon, np.ones((2, 9, 1)))
    with pytest.raises(ValueError, match="must be a 3-d numeric array"):
        model.make_batch(np.array(["a"]), recon)
    batch = model.make_batch(encod, recon)
    with pytest.raises(ValueError, match=r"noise\['ic_eps'\] must have shape"):
        model.loss_and_grads(batch, {"ic_eps": np.zeros((3, 4))})
    with pytest.raises(ValueError, match="unknown noise entries: typo"):
        model.loss_and_grads(batch, {"typo": 1})


@pytest.mark.parametrize("name, value", [("kl_ramp", float("nan")), ("kl_ramp", 1.5),
                                         ("l2_ramp", -0.1)])
def test_bad_ramps_are_refused(rng, name, value):
    cfg = LFADSConfig(**BASE)
    model = LFADS(cfg, seed=1)
    encod, recon, _ = make_data(cfg, 2, rng)
    with pytest.raises(ValueError, match=f"{name} must be in \\[0, 1\\]"):
        model.loss_and_grads(model.make_batch(encod, recon), None, **{name: value})
