"""The causal training options (ic_enc_seq_len, ci_enc_causal): loss terms and every
parameter gradient against the PyTorch reference (tests/torch_reference.py) and float64
finite differences; the layout and the config checks."""
import numpy as np
import pytest

from lfads_fast import LFADS, LFADSConfig
from model_cases import BASE, check_flat_gradient
from optional import OptionalModule

torch_reference = OptionalModule("torch_reference")  # tests that use it skip without torch

# float64 model vs float64 torch: same math, different summation order.
F64_RTOL = 1e-8
FD_STEP = 1e-6
FD_RTOL = 1e-5

CASES = {
    "causal_ci": dict(ci_enc_causal=True),
    "ic_first_bins": dict(ic_enc_seq_len=3),
    "streamable": dict(ic_enc_seq_len=3, ci_enc_causal=True, ci_lag=2),
    "streamable_long_lag": dict(ic_enc_seq_len=4, ci_enc_causal=True, ci_lag=6),
    "no_controller_ic_bins": dict(co_dim=0, con_dim=0, ci_enc_dim=0, ic_enc_seq_len=9),
    "everything": dict(ic_enc_seq_len=2, ci_enc_causal=True, ext_input_dim=2, recon_seq_len=11,
                       recon_data_dim=9, cd_rate=0.25),
}


def _data(cfg, B, rng):
    encod = rng.poisson(1.5, size=(B, cfg.encod_seq_len, cfg.encod_data_dim)).astype(np.float64)
    recon = rng.poisson(1.5, size=(B, cfg.recon_seq_len, cfg.recon_data_dim)).astype(np.float64)
    recon[:, : cfg.encod_seq_len, : cfg.encod_data_dim] = encod
    ext = rng.normal(size=(B, cfg.recon_seq_len, cfg.ext_input_dim)) if cfg.ext_input_dim else None
    return encod, recon, ext


def _model(case, rng, dtype=np.float64):
    cfg = LFADSConfig(**dict(BASE, **CASES[case]))
    model = LFADS(cfg, seed=int(rng.integers(1 << 30)), dtype=dtype)
    model.flat += (rng.normal(size=model.flat.shape) * 0.1).astype(dtype)
    return cfg, model


@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_torch_reference(rng, case):
    cfg, model = _model(case, rng)
    B = 4
    encod, recon, ext = _data(cfg, B, rng)
    batch = model.make_batch(encod, recon, ext)
    noise = model.draw_noise(batch, rng, train=True, sample=True)
    terms, grad = model.loss_and_grads(batch, noise, kl_ramp=0.7, l2_ramp=0.4)
    grads = model.views(grad)
    params64 = {k: v.astype(np.float64) for k, v in model.params.items()}
    ref_terms, ref_grads, _ = torch_reference.reference_loss_and_grads(
        params64, cfg, encod, recon, ext, noise, kl_ramp=0.7, l2_ramp=0.4)
    for k in ("loss", "recon", "kl_ic", "kl_co", "l2"):
        np.testing.assert_allclose(terms[k], ref_terms[k], rtol=F64_RTOL, atol=1e-12, err_msg=k)
    assert set(ref_grads) == set(grads)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=F64_RTOL, atol=1e-10, err_msg=k)


@pytest.mark.parametrize("case", ["streamable", "ic_first_bins"])
def test_gradient_finite_differences(rng, case):
    cfg, model = _model(case, rng)
    encod, recon, ext = _data(cfg, 3, rng)
    batch = model.make_batch(encod, recon, ext)
    noise = model.draw_noise(batch, rng, train=True, sample=True)
    _, grad = model.loss_and_grads(batch, noise)
    # Every encoder and controller weight block gets a probe, plus random entries.
    idx = set(rng.choice(model.flat.size, 40, replace=False).tolist())
    offset = 0
    for name, shape in model.layout:
        n = int(np.prod(shape))
        if n:
            idx.add(offset + int(rng.integers(n)))
        offset += n
    check_flat_gradient(model, batch, noise, grad, sorted(idx), FD_STEP, FD_RTOL)


def test_causal_layout_has_no_backward_ci_encoder():
    cfg = LFADSConfig(**dict(BASE, ci_enc_causal=True))
    shapes = dict(LFADS(cfg).layout)
    assert "ci_enc_bwd_W_hh" not in shapes
    assert shapes["ci_enc_h0"] == (1, 5)
    assert shapes["con_W_ih"] == (3 * 5, 5 + 3)


def test_causal_outputs_ignore_the_future(rng):
    """With both options, the outputs up to bin t depend only on bins <= t (after the IC bins)."""
    cfg, model = _model("streamable", rng, np.float32)
    encod, _, _ = _data(cfg, 2, rng)
    out = model.forward(encod)
    changed = encod.copy()
    changed[:, 6:] = rng.poisson(4.0, size=changed[:, 6:].shape)
    out2 = model.forward(changed)
    np.testing.assert_array_equal(out["output_params"][:, :6], out2["output_params"][:, :6])
    assert not np.allclose(out["output_params"][:, 6:], out2["output_params"][:, 6:])


def test_bidirectional_outputs_see_the_future(rng):
    cfg, model = _model("ic_first_bins", rng, np.float32)
    encod, _, _ = _data(cfg, 2, rng)
    changed = encod.copy()
    changed[:, 6:] += 3
    assert not np.allclose(model.forward(encod)["output_params"][:, :6],
                           model.forward(changed)["output_params"][:, :6])


@pytest.mark.parametrize("bad, match", [
    (dict(ic_enc_seq_len=-1), "ic_enc_seq_len must be an integer >= 0"),
    (dict(ic_enc_seq_len=9), r"ic_enc_seq_len must be <= 8"),
    (dict(ci_enc_causal="yes"), "ci_enc_causal must be true or false"),
])
def test_config_checks(bad, match):
    with pytest.raises(ValueError, match=match):
        LFADSConfig(**dict(BASE, **bad))
