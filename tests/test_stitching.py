"""Multi-session models (per-session read-in and read-out), PCR initialisation, session files
and the multi-session synthetic data."""
import os

import numpy as np
import pytest
from model_cases import check_flat_gradient, record_sparse_products
from optional import OptionalModule

from lfads_fast import LFADS, LFADSConfig, data, ops, stitching, synth

torch_reference = OptionalModule("torch_reference")  # tests that use it skip without torch

# float64 model vs float64 torch: same math, different summation order.
F64_RTOL = 1e-8
# float32 model vs float64 torch, norm-wise per parameter (as tests/test_model.py).
F32_GRAD_RTOL = 3e-3
F32_LOSS_RTOL = 1e-4
FD_STEP = 1e-6
FD_RTOL = 1e-5
# Sums of the same float64 terms in a different order.
COMBINE_RTOL = 1e-10
# PCR on exact linear views of shared latents: only the ridge term separates the recovered
# projection from the true one.
PCR_RTOL = 1e-4

BASE = dict(encod_data_dim=5, encod_seq_len=8, recon_seq_len=8, ext_input_dim=0, ic_enc_dim=6,
            ci_enc_dim=5, ci_lag=1, con_dim=5, co_dim=2, ic_dim=4, gen_dim=8, fac_dim=3,
            dropout_rate=0.2, cd_rate=0.0, l2_gen_scale=1e-2, l2_con_scale=2e-3,
            l2_ic_enc_scale=1e-3, l2_ci_enc_scale=5e-3, kl_ic_scale=1e-2, kl_co_scale=1e-2,
            loss_scale=10.0, session_neurons=[7, 4, 9], train_readin=True)

CASES = {
    "controller": {},
    "no_controller": dict(co_dim=0, con_dim=0, ci_enc_dim=0),
    "held_out_neurons": dict(session_recon_neurons=[9, 4, 11]),
    "forward_prediction_ext": dict(recon_seq_len=10, ext_input_dim=2),
    "coordinated_dropout": dict(cd_rate=0.3),
    "coordinated_dropout_pass": dict(cd_rate=0.3, cd_pass_rate=0.4),
    "sum_reduction": dict(recon_reduce_mean=False),
    "all_at_once": dict(session_recon_neurons=[8, 6, 9], recon_seq_len=10, ext_input_dim=2,
                        cd_rate=0.25, ci_lag=2),
}


def session_data(cfg, sessions, sizes, rng, nan_frac=0.05, rate=1.5):
    """[(session, encod [B_s, T_e, n_s], recon [B_s, T_r, n_recon_s])] and ext [B, T_r, E]."""
    parts = []
    for s, B in zip(sessions, sizes):
        n, n_r = cfg.session_neurons[s], cfg.session_recon_neurons[s]
        encod = rng.poisson(rate, size=(B, cfg.encod_seq_len, n)).astype(np.float64)
        recon = rng.poisson(rate, size=(B, cfg.recon_seq_len, n_r)).astype(np.float64)
        recon[:, : cfg.encod_seq_len, :n] = encod
        recon[rng.random(recon.shape) < nan_frac] = np.nan
        parts.append((s, encod, recon))
    ext = None
    if cfg.ext_input_dim:
        ext = rng.normal(size=(sum(sizes), cfg.recon_seq_len, cfg.ext_input_dim))
    return parts, ext


def with_ext(parts, ext):
    """make_session_batch parts: each session's rows of the batch's external inputs."""
    out, start = [], 0
    for s, encod, recon in parts:
        stop = start + encod.shape[0]
        out.append((s, encod, recon, None if ext is None else ext[start:stop]))
        start = stop
    return out


def perturbed_model(cfg, rng, dtype):
    model = LFADS(cfg, seed=int(rng.integers(1 << 30)), dtype=dtype)
    # Away from the initialisation, so that no gradient is trivially zero.
    model.flat += (rng.normal(size=model.flat.shape) * 0.1).astype(dtype)
    return model


def run_both(case, rng, dtype, sessions=(2, 0, 1), sizes=(3, 2, 4), rate=1.5):
    cfg = LFADSConfig(**dict(BASE, **CASES[case]))
    model = perturbed_model(cfg, rng, dtype)
    parts, ext = session_data(cfg, sessions, sizes, rng, rate=rate)
    batch = model.make_session_batch(with_ext(parts, ext))
    noise = model.draw_noise(batch, rng, train=True, sample=True)
    terms, grad = model.loss_and_grads(batch, noise, kl_ramp=0.7, l2_ramp=0.4)
    params64 = {k: v.astype(np.float64) for k, v in model.params.items()}
    noise64 = {k: ([a.astype(np.float64) for a in v] if isinstance(v, list) else v.astype(np.float64))
               for k, v in noise.items()}
    ref_terms, ref_grads, _ = torch_reference.reference_multisession_loss_and_grads(
        params64, cfg, parts, ext, noise64, kl_ramp=0.7, l2_ramp=0.4)
    return model, terms, model.views(grad), ref_terms, ref_grads


# ---------------------------------------------------------------------------------- model


@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_torch_reference(rng, case):
    model, terms, grads, ref_terms, ref_grads = run_both(case, rng, np.float64)
    for k in ("loss", "recon", "kl_ic", "kl_co", "l2"):
        np.testing.assert_allclose(terms[k], ref_terms[k], rtol=F64_RTOL, atol=1e-12, err_msg=k)
    assert set(ref_grads) == set(grads)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=F64_RTOL, atol=1e-10, err_msg=k)


@pytest.mark.parametrize("case", ["controller", "all_at_once"])
def test_sparse_counts_take_the_sparse_read_in_products(rng, monkeypatch, case):
    """Counts as sparse as recordings': each session's read-in and its weight gradient
    multiply only the nonzeros (the encoders' input is then the read-ins' dense output);
    same loss and gradients as the reference."""
    ran = record_sparse_products(monkeypatch)
    model, terms, grads, ref_terms, ref_grads = run_both(case, rng, np.float64, rate=0.1)
    monkeypatch.undo()
    assert ran == [("a", True)] * 3 + [("b", True)] * 3  # three sessions in the batch
    for k in ("loss", "recon", "kl_ic", "kl_co", "l2"):
        np.testing.assert_allclose(terms[k], ref_terms[k], rtol=F64_RTOL, atol=1e-12, err_msg=k)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=F64_RTOL, atol=1e-10, err_msg=k)


def test_float32_matches_torch_reference(rng):
    model, terms, grads, ref_terms, ref_grads = run_both("all_at_once", rng, np.float32)
    np.testing.assert_allclose(terms["loss"], ref_terms["loss"], rtol=F32_LOSS_RTOL)
    for k in grads:
        ref = ref_grads[k]
        err = np.linalg.norm(grads[k] - ref) / max(np.linalg.norm(ref), 1e-6)
        assert err < F32_GRAD_RTOL, (k, err)


def test_session_absent_from_batch_gets_zero_gradient(rng):
    model, terms, grads, ref_terms, ref_grads = run_both("controller", rng, np.float64,
                                                         sessions=(2,), sizes=(4,))
    for s in (0, 1):
        for name in ("readin_W", "readin_b", "readout_W", "readout_b"):
            assert not np.any(grads[f"{name}_{s}"]), (name, s)
    np.testing.assert_allclose(grads["readout_W_2"], ref_grads["readout_W_2"], rtol=F64_RTOL)


def test_session_layers_finite_differences(rng):
    """Read-in and read-out gradients (and some shared ones) against central differences of
    the model's own float64 loss."""
    cfg = LFADSConfig(**dict(BASE, session_recon_neurons=[9, 5, 9], recon_seq_len=10,
                             ext_input_dim=1))
    model = perturbed_model(cfg, rng, np.float64)
    parts, ext = session_data(cfg, (1, 0, 2), (2, 3, 2), rng)
    batch = model.make_session_batch(with_ext(parts, ext))
    noise = model.draw_noise(batch, rng)
    _, grad = model.loss_and_grads(batch, noise)
    offsets, i = {}, 0
    for name, shape in model.layout:
        offsets[name] = (i, i + int(np.prod(shape)))
        i = offsets[name][1]
    idx = []
    for s in range(3):
        for name in ("readin_W", "readin_b", "readout_W", "readout_b"):
            lo, hi = offsets[f"{name}_{s}"]
            idx += list(rng.choice(np.arange(lo, hi), size=min(4, hi - lo), replace=False))
    idx += list(rng.choice(offsets["readin_W_0"][0], size=10, replace=False))
    check_flat_gradient(model, batch, noise, grad, idx, FD_STEP, FD_RTOL)


def test_mixed_batch_is_the_session_weighted_combination(rng):
    """Reconstruction: the mean over sessions of each session's mean; KL: the mean over all
    trials. Gradients combine the same way."""
    cfg = LFADSConfig(**dict(BASE, dropout_rate=0.0, session_recon_neurons=[8, 4, 10]))
    model = perturbed_model(cfg, rng, np.float64)
    sizes = (2, 5, 3)
    parts, _ = session_data(cfg, (0, 1, 2), sizes, rng)
    S, B = len(parts), sum(sizes)
    # Posterior means; the inferred-input KL's own sample is shared by row.
    eps = rng.standard_normal((cfg.recon_seq_len, B, cfg.co_dim))
    bounds = np.cumsum((0,) + sizes)
    own = [{"co_kl_eps": np.ascontiguousarray(eps[:, a:b])} for a, b in zip(bounds, bounds[1:])]
    mixed_terms, mixed_grad = model.loss_and_grads(model.make_session_batch(parts),
                                                   {"co_kl_eps": eps}, kl_ramp=0.5, l2_ramp=1.0)
    alone = [model.loss_and_grads(model.make_batch(e, r, session=s), nz, kl_ramp=0.5)
             for (s, e, r), nz in zip(parts, own)]
    recon = sum(t["recon"] for t, _ in alone) / S
    kl_ic = sum(b * t["kl_ic"] for b, (t, _) in zip(sizes, alone)) / B
    kl_co = sum(b * t["kl_co"] for b, (t, _) in zip(sizes, alone)) / B
    np.testing.assert_allclose(mixed_terms["recon"], recon, rtol=COMBINE_RTOL)
    np.testing.assert_allclose(mixed_terms["kl_ic"], kl_ic, rtol=COMBINE_RTOL)
    np.testing.assert_allclose(mixed_terms["kl_co"], kl_co, rtol=COMBINE_RTOL)
    # Gradient of the total: (1/S) sum of the recon parts + (B_s/B) sum of the KL parts + L2.
    # Each single-session gradient is recon_s + KL_s + L2, so take it apart with kl off.
    def grad_of(i, kl_ramp, l2_ramp):
        s, e, r = parts[i]
        return model.loss_and_grads(model.make_batch(e, r, session=s), own[i], kl_ramp=kl_ramp,
                                    l2_ramp=l2_ramp)[1]

    expect = grad_of(0, 0.0, 1.0) - grad_of(0, 0.0, 0.0)
    for i, b in enumerate(sizes):
        g_recon = grad_of(i, 0.0, 0.0)
        expect += g_recon / S + (grad_of(i, 0.5, 0.0) - g_recon) * (b / B)
    np.testing.assert_allclose(mixed_grad, expect, rtol=1e-8, atol=1e-10)


def single_and_identity_session(single_kw, multi_kw):
    """A single-session model (5 encoder, 7 recon neurons) and a multi-session model whose
    session 0 has the same parameters and an identity read-in."""
    shared = {k: v for k, v in BASE.items() if k not in ("session_neurons", "train_readin")}
    single = LFADS(LFADSConfig(**dict(shared, recon_data_dim=7, **single_kw)), seed=4, dtype=np.float64)
    multi = LFADS(LFADSConfig(**dict(BASE, **multi_kw)), seed=4, dtype=np.float64)
    for name, value in single.params.items():
        multi.params[f"{name}_0" if name.startswith("readout") else name][...] = value
    multi.params["readin_W_0"][...] = np.eye(5)
    multi.params["readin_b_0"][...] = 0.0
    return single, multi


def assert_same_as_single(single, multi, single_result, multi_result):
    (t1, g1), (t2, g2) = single_result, multi_result
    for k in t1:
        np.testing.assert_allclose(t2[k], t1[k], rtol=1e-12, err_msg=k)
    v1, v2 = single.views(g1), multi.views(g2)
    for name in v1:
        other = name + "_0" if name.startswith("readout") else name
        np.testing.assert_allclose(v2[other], v1[name], rtol=1e-10, atol=1e-12, err_msg=name)


def poisson_pair(rng, B=4):
    """Encoder counts [B, 8, 5] and recon counts [B, 8, 7] that contain them."""
    encod = rng.poisson(1.0, size=(B, 8, 5)).astype(np.float64)
    recon = rng.poisson(1.0, size=(B, 8, 7)).astype(np.float64)
    recon[:, :, :5] = encod
    return encod, recon


def test_one_session_with_identity_readin_is_the_single_session_model(rng):
    single, multi = single_and_identity_session(
        dict(cd_rate=0.3), dict(session_neurons=[5], session_recon_neurons=[7], cd_rate=0.3))
    encod, recon = poisson_pair(rng)
    noise = single.draw_noise(4, rng)
    noise2 = dict(noise, cd_keep=[noise["cd_keep"]])
    assert_same_as_single(single, multi, single.loss_and_grads(single.make_batch(encod, recon), noise),
                          multi.loss_and_grads(multi.make_batch(encod, recon, session=0), noise2))


def test_cd_pass_masks_with_sessions(rng):
    """Each segment gets its own pass mask, shaped like its keep mask, at cd_pass_rate."""
    cfg = LFADSConfig(**dict(BASE, cd_rate=0.3, cd_pass_rate=0.25))
    model = LFADS(cfg)
    parts, _ = session_data(cfg, (2, 0), (300, 200), rng, nan_frac=0.0)
    noise = model.draw_noise(model.make_session_batch(parts), np.random.default_rng(6))
    keep, passed = noise["cd_keep"], noise["cd_pass"]
    assert [a.shape for a in passed] == [a.shape for a in keep] == [(8, 300, 9), (8, 200, 7)]
    flat = np.concatenate([a.ravel() for a in passed])
    assert set(np.unique(flat)) == {0.0, 1.0}
    # Z = 5 standard errors around the rate; the seed is fixed.
    assert abs(flat.mean() - 0.25) < 5.0 * np.sqrt(0.25 * 0.75 / flat.size)


def test_sample_validation_with_sessions(rng):
    """One session with an identity read-in and a sample-validation mask is the single-session
    model with that mask; in a mixed batch each session is weighted by its own mask."""
    single, multi = single_and_identity_session(
        dict(dropout_rate=0.0), dict(session_neurons=[5, 6], session_recon_neurons=[7, 6], dropout_rate=0.0))
    encod, recon = poisson_pair(rng)
    keep = rng.random(encod.shape) >= 0.3
    noise = {"ic_eps": rng.standard_normal((4, BASE["ic_dim"])),
             "co_kl_eps": rng.standard_normal((8, 4, BASE["co_dim"]))}
    assert_same_as_single(
        single, multi, single.loss_and_grads(single.make_batch(encod, recon, sv_mask=keep, sv_rate=0.3), noise),
        multi.loss_and_grads(multi.make_batch(encod, recon, session=0, sv_mask=keep, sv_rate=0.3), noise))
    plain = multi.loss_and_grads(multi.make_batch(encod, recon, session=0), noise, grads=False)[0]
    masked = multi.loss_and_grads(multi.make_batch(encod, recon, session=0, sv_mask=keep, sv_rate=0.3),
                                  noise, grads=False)[0]
    assert abs(plain["recon"] - masked["recon"]) > 1e-3 * abs(plain["recon"])  # the mask matters

    other = rng.poisson(1.0, size=(3, 8, 6)).astype(np.float64)
    keep_other = rng.random(other.shape) >= 0.3
    parts = [(0, encod, recon), (1, other, other)]
    mixed = multi.make_session_batch(parts, sv_masks=[keep, keep_other], sv_rate=0.3)
    means = {"co_kl_eps": np.zeros((8, 7, BASE["co_dim"]))}
    recon_mixed = multi.loss_and_grads(mixed, means, grads=False)[0]["recon"]
    alone = [multi.loss_and_grads(multi.make_batch(e, r, session=s, sv_mask=m, sv_rate=0.3),
                                  {"co_kl_eps": np.zeros((8, e.shape[0], BASE["co_dim"]))},
                                  grads=False)[0]["recon"]
             for (s, e, r), m in zip(parts, (keep, keep_other))]
    np.testing.assert_allclose(recon_mixed, sum(alone) / 2, rtol=COMBINE_RTOL)
    with pytest.raises(ValueError, match="sv_masks has 1 entries for 2 parts"):
        multi.make_session_batch(parts, sv_masks=[keep], sv_rate=0.3)
    with pytest.raises(ValueError, match=r"session 1 sv_mask must have shape \[3, 8, 6\]"):
        multi.make_session_batch(parts, sv_masks=[keep, keep], sv_rate=0.3)


def test_frozen_readin_has_zero_gradient_and_stays_put(rng):
    cfg = LFADSConfig(**dict(BASE, train_readin=False))
    model = perturbed_model(cfg, rng, np.float32)
    parts, _ = session_data(cfg, (0, 1, 2), (2, 2, 2), rng)
    batch = model.make_session_batch(parts)
    _, grad = model.loss_and_grads(batch, model.draw_noise(batch, rng))
    mask = model.trainable_mask()
    assert mask.dtype == np.uint8 and mask.shape == model.flat.shape
    views, gviews = model.views(mask), model.views(grad)
    for s in range(3):
        for name in (f"readin_W_{s}", f"readin_b_{s}"):
            assert not views[name].any() and not gviews[name].any(), name
        assert views[f"readout_W_{s}"].all()
    assert mask.sum() == model.num_params - sum(5 * n + 5 for n in cfg.session_neurons)
    before = model.flat.copy()
    m, v = np.zeros_like(model.flat), np.zeros_like(model.flat)
    grad_noisy = grad + 1.0  # even a non-zero gradient must not move frozen entries
    ops.adam_step(model.flat, grad_noisy, m, v, lr=1e-2, weight_decay=0.1, step=1, mask=mask)
    frozen = mask == 0
    np.testing.assert_array_equal(model.flat[frozen], before[frozen])
    assert np.all(model.flat[~frozen] != before[~frozen])
    assert LFADS(LFADSConfig(**dict(BASE, train_readin=True))).trainable_mask().all()
    assert LFADS(LFADSConfig(encod_data_dim=4)).trainable_mask().all()


def test_forward_per_session(rng):
    cfg = LFADSConfig(**dict(BASE, session_recon_neurons=[8, 4, 12], recon_seq_len=10))
    model = LFADS(cfg, seed=0)
    encod = rng.poisson(1.0, size=(3, 8, 9)).astype(np.float32)
    out = model.forward(encod, session=2)
    assert out["output_params"].shape == (3, 10, 12)
    assert out["factors"].shape == (3, 10, 3)
    assert np.all(np.isfinite(out["output_params"]))
    names = [n for n, _ in model.layout]
    assert "readout_W" not in names and "readin_W_2" in names
    assert model.params["readin_W_1"].shape == (5, 4)
    assert model.params["readout_W_2"].shape == (12, 3)
    # Posterior samples of a session's trials: the encoders once per trial (repeats), the
    # same rows as the repeated trials; with and without targets, the same rates.
    rep = model.forward(encod, session=2, sample=True, seed=3, repeats=2)
    ref = model.forward(np.repeat(encod, 2, axis=0), session=2, sample=True, seed=3)
    for k in ("output_params", "factors", "ic_mean", "co_means"):
        np.testing.assert_allclose(rep[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    with_targets = model.forward(encod, session=2, recon_data=rng.poisson(
        1.0, size=(3, 10, 12)).astype(np.float32))
    np.testing.assert_allclose(with_targets["output_params"], out["output_params"], rtol=1e-5)


def test_config_round_trip_and_errors():
    cfg = LFADSConfig(**BASE)
    again = LFADSConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.session_recon_neurons == [7, 4, 9] and again.n_sessions == 3
    assert LFADSConfig(encod_data_dim=3).n_sessions == 1
    for overrides, match in [
        (dict(session_neurons=[]), "at least one session"),
        (dict(session_neurons=[3, 0]), r"session_neurons\[1\] must be an integer >= 1"),
        (dict(session_recon_neurons=[7, 4]), "one per session"),
        (dict(session_recon_neurons=[7, 3, 9]), "session 1: session_recon_neurons"),
        (dict(recon_data_dim=9), "recon_data_dim = 9 has no meaning"),
        (dict(train_readin="yes"), "train_readin must be true or false"),
    ]:
        with pytest.raises(ValueError, match=match):
            LFADSConfig(**dict(BASE, **overrides))
    with pytest.raises(ValueError, match="session_recon_neurons .* needs session_neurons"):
        LFADSConfig(encod_data_dim=3, session_recon_neurons=[5])


def test_bad_session_batches(rng):
    cfg = LFADSConfig(**dict(BASE, cd_rate=0.2))
    model = LFADS(cfg)
    parts, _ = session_data(cfg, (0, 1), (2, 3), rng)
    with pytest.raises(ValueError, match="session= is required"):
        model.make_batch(parts[0][1], parts[0][2])
    with pytest.raises(ValueError, match="session 0 appears twice"):
        model.make_session_batch([parts[0], parts[0]])
    with pytest.raises(ValueError, match=r"session must be an integer in \[0, 3\)"):
        model.make_session_batch([(3, parts[0][1])])
    with pytest.raises(ValueError, match=r"session 1 encod_data must have shape \[3, 8, 4\]"):
        model.make_session_batch([(1, np.zeros((3, 8, 5)))])
    with pytest.raises(ValueError, match="session 0 encod_data has no trials"):
        model.make_session_batch([(0, np.zeros((0, 8, 7)))])
    with pytest.raises(ValueError, match="parts is empty"):
        model.make_session_batch([])
    with pytest.raises(ValueError, match="session= needs a config with session_neurons"):
        LFADS(LFADSConfig(encod_data_dim=7, encod_seq_len=8)).make_batch(parts[0][1], session=0)
    with pytest.raises(ValueError, match="pass the Batch to draw_noise"):
        model.draw_noise(5, rng)
    batch = model.make_session_batch(parts)
    with pytest.raises(ValueError, match=r"noise\['cd_keep'\] must be a list of 2 arrays"):
        model.loss_and_grads(batch, {"cd_keep": np.ones((8, 5, 7))})
    keep = [np.ones((8, 2, 7)), np.ones((8, 3, 4))]
    with pytest.raises(ValueError, match=r"noise\['cd_pass'\] must be a list of 2 arrays"):
        model.loss_and_grads(batch, {"cd_keep": keep, "cd_pass": np.ones((8, 5, 7))})


# ---------------------------------------------------------------------------------- PCR


def linear_views(rng, sizes=(6, 9, 4), dim=3, n_conditions=5, n_bins=12, reps=(3, 2, 4)):
    """Sessions that are exact affine views of shared latents: rates_s = L P_s^T + c_s, where
    every trial of a condition has the same latents L [T, dim]."""
    latents = rng.normal(size=(n_conditions, n_bins, dim))
    spikes, labels, views = [], [], []
    for n, r in zip(sizes, reps):
        P, c = rng.normal(size=(n, dim)), rng.uniform(1.0, 2.0, size=n)
        rates = latents @ P.T + c  # [C, T, n]
        order = rng.permutation(n_conditions * r)  # trials in no particular order
        cond = np.repeat(np.arange(n_conditions), r)[order]
        spikes.append(rates[cond])
        labels.append(cond + 10)  # labels need not start at 0
        views.append((P, c))
    return latents, spikes, labels, views


def test_pcr_maps_every_session_to_the_same_shared_latents(rng):
    latents, spikes, labels, views = linear_views(rng)
    res = stitching.pcr_readins(spikes, 3, conditions=labels, sigma_bins=0.0, ridge=1e-9)
    assert res.method == "conditions" and list(res.conditions) == [10, 11, 12, 13, 14]
    np.testing.assert_allclose(res.explained_variance_ratio.sum(), 1.0, rtol=1e-9)
    per_condition = []
    for s, (P, c) in enumerate(views):
        rates = latents @ P.T + c
        z = rates @ res.readin_W[s].T + res.readin_b[s]  # [C, T, dim]
        per_condition.append(z)
        np.testing.assert_allclose(z.reshape(-1, 3), res.latents, rtol=PCR_RTOL, atol=PCR_RTOL)
    assert np.isclose(res.latents[:, 0].std(), 1.0)
    # The shared space is the latents' space: an invertible affine map links them.
    flat = latents.reshape(-1, 3)
    design = np.concatenate([flat, np.ones((flat.shape[0], 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, res.latents, rcond=None)
    np.testing.assert_allclose(design @ coef, res.latents, atol=1e-6)
    assert abs(np.linalg.det(coef[:3])) > 1e-3


def test_pcr_readouts_invert_the_readins_on_exact_views(rng):
    """Held-in and held-out neurons that are affine in the latents are decoded exactly from
    the read-in's output by the linearised read-out: mu * (1 + W z + b - log mu) = rates."""
    latents, spikes, labels, views = linear_views(rng)
    held_out = [rng.normal(size=(2, 3)) for _ in views]
    recon = []
    for x, h, (P, c) in zip(spikes, held_out, views):
        extra = (x - c) @ np.linalg.pinv(P).T @ h.T + 3.0  # affine in the latents too
        recon.append(np.concatenate([x, extra], axis=2))
    res = stitching.pcr_readins(spikes, 3, conditions=labels, sigma_bins=0.0, ridge=1e-10)
    outs, sigma = stitching.pcr_readouts(res.readin_W, res.readin_b, spikes, recon,
                                         conditions=labels, sigma_bins=0.0, ridge=1e-10)
    # The factor space: the shared latents with unit standard deviation per dimension.
    np.testing.assert_allclose(sigma, res.latents.std(axis=0), rtol=1e-6)
    for s, (W, b) in enumerate(outs):
        assert W.shape == (recon[s].shape[2], 3)
        f = (spikes[s] @ res.readin_W[s].T + res.readin_b[s]) / sigma
        mu = recon[s].mean(axis=(0, 1))  # balanced conditions: the mean of the averages
        decoded = mu * (1.0 + f @ W.T + b - np.log(mu))
        np.testing.assert_allclose(decoded, recon[s], rtol=PCR_RTOL, atol=PCR_RTOL)
        n = spikes[s].shape[2]  # held-in rows: the read-in's pseudo-inverse, scaled
        np.testing.assert_allclose(W[:n] * mu[:n, None] / sigma, np.linalg.pinv(res.readin_W[s]),
                                   rtol=PCR_RTOL, atol=PCR_RTOL)


def test_pcr_trial_average_fallback(rng):
    latents, spikes, _, views = linear_views(rng, reps=(2, 2, 2))
    with pytest.warns(RuntimeWarning, match="rank"):  # one PSTH of 12 bins has rank <= 11 ...
        res = stitching.pcr_readins(spikes, 12, sigma_bins=1.0)
    assert res.method == "trial_average" and res.latents.shape == (12, 12)
    res = stitching.pcr_readins(spikes, 3, sigma_bins=0.0, ridge=1e-9)
    # ... and with dim 3 it recovers the trial-averaged latents exactly.
    for s, (P, c) in enumerate(views):
        mean_rates = spikes[s].mean(axis=0)
        np.testing.assert_allclose(mean_rates @ res.readin_W[s].T + res.readin_b[s], res.latents,
                                   rtol=PCR_RTOL, atol=PCR_RTOL)


def test_pcr_errors(rng):
    _, spikes, labels, _ = linear_views(rng)
    with pytest.raises(ValueError, match="no condition is shared by all sessions"):
        stitching.pcr_readins(spikes, 3, conditions=[labels[0], labels[1] + 100, labels[2]])
    with pytest.raises(ValueError, match="session 1: 3 condition labels for 10 trials"):
        stitching.pcr_readins(spikes, 3, conditions=[labels[0], labels[1][:3], labels[2]])
    with pytest.raises(ValueError, match=r"session 2: spikes must be \[trials, 12 bins"):
        stitching.pcr_readins(spikes[:2] + [spikes[2][:, :5]], 3)
    with pytest.raises(ValueError, match="session 0: spikes has no trials"):
        stitching.pcr_readins([spikes[0][:0]], 3)


def session_datasets(rng, sizes=(6, 9, 4), held_out=(0, 2, 1), alignment=None):
    """Datasets of linear-view sessions with Poisson counts and condition labels."""
    latents, rates, labels, _ = linear_views(rng, sizes=sizes, n_bins=8)
    out = []
    for s, (r, cond) in enumerate(zip(rates, labels)):
        r = np.concatenate([r, np.ones(r.shape[:2] + (held_out[s],))], axis=2)
        counts = rng.poisson(np.abs(r)).astype(np.float32)
        ds = data.from_arrays(counts[:, :, : sizes[s]], counts[:2, :, : sizes[s]],
                              train_recon_data=counts, valid_recon_data=counts[:2],
                              extra={"train_conditions": cond, "valid_conditions": cond[:2]})
        if alignment is not None:
            ds.other.update(alignment[s])
        out.append(ds)
    return out


def test_init_session_layers_from_data(rng):
    sessions = session_datasets(rng)
    cfg = stitching.config_for_sessions(sessions, 3, fac_dim=3, ic_enc_dim=4, ci_enc_dim=4,
                                        con_dim=4, co_dim=1, ic_dim=3, gen_dim=6)
    assert cfg.session_neurons == [6, 9, 4] and cfg.session_recon_neurons == [6, 11, 5]
    model = LFADS(cfg, seed=0, dtype=np.float64)
    res = stitching.init_session_layers(model, sessions)
    assert res.method == "conditions"
    encod = [ds.train.encod_data for ds in sessions]
    recon = [ds.train.recon_data for ds in sessions]
    labels = [ds.train.extra["conditions"] for ds in sessions]
    outs, _ = stitching.pcr_readouts(res.readin_W, res.readin_b, encod, recon, conditions=labels)
    for s, ds in enumerate(sessions):
        np.testing.assert_allclose(model.params[f"readin_W_{s}"], res.readin_W[s])
        np.testing.assert_allclose(model.params[f"readin_b_{s}"], res.readin_b[s])
        np.testing.assert_allclose(model.params[f"readout_W_{s}"], outs[s][0])
        np.testing.assert_allclose(model.params[f"readout_b_{s}"], outs[s][1])
    # Without labels (or with conditions=None) the fallback is used.
    assert stitching.init_session_layers(model, sessions, conditions=None).method == "trial_average"
    # Factors that are not the shared space: read-out weights untouched, biases log means.
    other = LFADS(stitching.config_for_sessions(sessions, 3, fac_dim=2), seed=0, dtype=np.float64)
    before = other.params["readout_W_1"].copy()
    stitching.init_session_layers(other, sessions)
    np.testing.assert_array_equal(other.params["readout_W_1"], before)
    mean = recon[1].astype(np.float64).mean(axis=(0, 1))
    np.testing.assert_allclose(other.params["readout_b_1"],
                               np.log(np.maximum(mean, stitching.MIN_MEAN_COUNT)), atol=1e-12)


def test_init_session_layers_from_file_alignment(rng):
    align = [{"readin_weight": rng.normal(size=(n, 3)), "readout_bias": rng.uniform(0.5, 1, n)}
             for n in (6, 9)] + [{"alignment_matrix_cxf": rng.normal(size=(4, 3)),
                                  "alignment_bias_c": rng.uniform(0.5, 1, 4)}]
    sessions = session_datasets(rng, alignment=align)
    cfg = stitching.config_for_sessions(sessions, 3, fac_dim=2)
    model = LFADS(cfg, seed=0, dtype=np.float64)
    res = stitching.init_session_layers(model, sessions)
    assert res.method == "file"
    for s, a in enumerate(align):
        weight, bias = list(a.values())
        x = rng.normal(size=(5, weight.shape[0]))
        np.testing.assert_allclose(x @ model.params[f"readin_W_{s}"].T + model.params[f"readin_b_{s}"],
                                   (x - bias) @ weight, rtol=1e-10)
    assert stitching.init_session_layers(model, sessions, use_file_alignment=False).method == "conditions"
    # Some sessions with, some without: refused.
    del sessions[1].other["readin_weight"]
    with pytest.raises(ValueError, match=r"sessions \[0, 2\] have alignment matrices but sessions \[1\]"):
        stitching.init_session_layers(model, sessions)
    bad = session_datasets(rng, alignment=[{"readin_weight": np.ones((6, 5))}] * 3)
    with pytest.raises(ValueError, match="readin_weight has shape \\(6, 5\\) but the session has 9"):
        stitching.init_session_layers(model, bad)
    bad = session_datasets(rng, alignment=[{"readin_weight": np.ones((n, 5))} for n in (6, 9, 4)])
    with pytest.raises(ValueError, match="maps to 5 dimensions but the model's encod_data_dim is 3"):
        stitching.init_session_layers(model, bad)
    with pytest.raises(ValueError, match="the model has 3 sessions, got 2 datasets"):
        stitching.init_session_layers(model, bad[:2])


def test_session_batches_mix_every_session(rng):
    sessions = session_datasets(rng)  # 15, 10 and 20 train trials
    batches = list(stitching.session_batches(sessions, 4, rng))
    assert len(batches) == 5
    seen = [[] for _ in sessions]
    for parts in batches:
        assert [p[0] for p in parts] == [0, 1, 2]
        for s, encod, recon, ext in parts:
            assert 1 <= encod.shape[0] <= 4 and recon.shape[0] == encod.shape[0] and ext is None
            seen[s].append(encod.shape[0])
    assert sum(seen[2]) == 20 and sum(seen[0]) >= 15 and sum(seen[1]) >= 10


# ---------------------------------------------------------------------------------- files


def test_session_files_round_trip_and_posteriors(rng, tmp_path):
    sessions = synth.chaotic_rnn_sessions(n_sessions=3, neurons_per_session=[5, 8, 6],
                                          trials_per_condition=[3, 2, 4],
                                          train_per_condition=[2, 1, 3], n_conditions=4,
                                          n_units=20, n_bins=10)
    paths = synth.save_sessions_h5(sessions, tmp_path / "data")
    loaded = data.load_sessions(str(tmp_path / "data" / "session_*.h5"))
    assert [ds.source for ds in loaded] == paths
    assert [ds.encod_data_dim for ds in loaded] == [5, 8, 6]
    assert [ds.train.n_trials for ds in loaded] == [8, 4, 12]
    np.testing.assert_allclose(loaded[1].train.truth, sessions[1].train.rates, rtol=1e-6)
    assert data.load_sessions(paths[::-1])[0].source == paths[2]
    cfg = stitching.config_for_sessions(loaded, 4, fac_dim=4, ic_enc_dim=4, ci_enc_dim=4,
                                        con_dim=4, co_dim=1, ic_dim=3, gen_dim=6)
    model = LFADS(cfg, seed=0)
    stitching.init_session_layers(model, loaded)
    out = stitching.write_session_posteriors(model, loaded, tmp_path / "out", splits=("valid",))
    assert [os.path.basename(p) for p in out] == [f"lfads_output_session_{s:02d}.h5" for s in range(3)]
    post = data.read_posterior_h5(out[2])
    assert post["valid_output_params"].shape == (4, 10, 6)
    np.testing.assert_array_equal(post["valid_inds"], loaded[2].valid.inds)
    direct = model.forward(loaded[2].valid.encod_data, session=2)
    np.testing.assert_allclose(post["valid_factors"], direct["factors"], rtol=1e-6)

    # An ensemble: per session and split the mean of the models' rates, written alike.
    other = LFADS(cfg, seed=1)
    stitching.init_session_layers(other, loaded)
    ens = stitching.ensemble_session_posteriors([model, other], loaded, n_samples=2, seed=3)
    for s in range(3):
        singles = [stitching.session_posteriors(m, loaded, n_samples=2, seed=3)[s]
                   for m in (model, other)]
        for split in ("train", "valid"):
            expect = (singles[0][split]["output_params"].astype(np.float64)
                      + singles[1][split]["output_params"]) / 2
            np.testing.assert_allclose(ens[s][split]["output_params"], expect, rtol=1e-6)
    paths = stitching.write_session_outputs(loaded, tmp_path / "ens", ens)
    back = data.read_posterior_h5(paths[1])
    assert set(back) == {f"{sp}_{k}" for sp in ("train", "valid") for k in ("output_params", "inds")}
    with pytest.raises(ValueError, match="models: an ensemble needs at least one model"):
        stitching.ensemble_session_posteriors([], loaded)
    with pytest.raises(ValueError, match=r"outputs: one entry per session expected \(3\), got 2"):
        stitching.write_session_outputs(loaded, tmp_path / "ens", ens[:2])


def test_session_factor_averages_and_conditions(rng):
    sessions = session_datasets(rng)
    cfg = stitching.config_for_sessions(sessions, 3, fac_dim=3, ic_enc_dim=4, ci_enc_dim=4,
                                        con_dim=4, co_dim=1, ic_dim=3, gen_dim=6)
    model = LFADS(cfg, seed=0, dtype=np.float64)
    averages, labels = stitching.session_factor_averages(model, sessions)
    common = np.intersect1d(np.intersect1d(*[stitching.session_conditions(ds) for ds in sessions[:2]]),
                            stitching.session_conditions(sessions[2]))
    np.testing.assert_array_equal(labels, common)
    outputs = stitching.session_posteriors(model, sessions)
    for ds, out, avg in zip(sessions, outputs, averages):
        assert avg.shape == (labels.size, 8, 3)
        factors = np.concatenate([out["train"]["factors"], out["valid"]["factors"]])
        cond = np.concatenate([stitching.session_conditions(ds, name) for name in ("train", "valid")])
        np.testing.assert_allclose(avg[-1], factors[cond == labels[-1]].mean(axis=0), rtol=1e-12)
    # lfads-torch files may name the labels cond_idx; without labels, one trial average.
    for ds in sessions:
        for split in ds.splits.values():
            split.extra["cond_idx"] = split.extra.pop("conditions")
    assert np.array_equal(stitching.session_factor_averages(model, sessions)[1], labels)
    del sessions[1].valid.extra["cond_idx"]
    averages, labels = stitching.session_factor_averages(model, sessions)
    assert labels is None and [a.shape for a in averages] == [(1, 8, 3)] * 3
    sessions[0].train.extra["cond_idx"] = np.zeros(3)
    with pytest.raises(ValueError, match="train_cond_idx has 3 labels for 15 trials"):
        stitching.session_conditions(sessions[0])


def test_default_shared_dim_and_check_sessions(rng):
    sessions = session_datasets(rng)  # 6, 9 and 4 neurons
    assert stitching.default_shared_dim(sessions, fac_dim=40) == 19
    assert stitching.default_shared_dim(sessions, fac_dim=8) == 8
    aligned = session_datasets(rng, alignment=[{"readin_weight": np.ones((n, 5))} for n in (6, 9, 4)])
    assert stitching.default_shared_dim(aligned, fac_dim=40) == 5
    cfg = stitching.config_for_sessions(sessions, 3)
    stitching.check_sessions(cfg, sessions)
    with pytest.raises(ValueError, match="the model has one session"):
        stitching.check_sessions(LFADSConfig(encod_data_dim=6, encod_seq_len=8), sessions)
    longer = LFADSConfig(**dict(cfg.to_dict(), encod_seq_len=9, recon_seq_len=9))
    with pytest.raises(ValueError, match=r"session 0 \(<arrays>\) has encod_seq_len = 8 but the model expects 9"):
        stitching.check_sessions(longer, sessions)


def test_posterior_files_of_sessions_with_one_file_name(rng, tmp_path):
    found = synth.chaotic_rnn_sessions(n_sessions=2, neurons_per_session=[4, 5], n_conditions=3,
                                       trials_per_condition=2, train_per_condition=1,
                                       n_units=10, n_bins=6)
    paths = []
    for d, name in zip(found, "ab"):
        (tmp_path / name).mkdir()
        paths.append(synth.save_h5(d, tmp_path / name / "rec.h5"))
    sessions = data.load_sessions(paths)
    model = LFADS(stitching.config_for_sessions(sessions, 3, fac_dim=3, co_dim=0, con_dim=0,
                                                ci_enc_dim=0, ic_enc_dim=4, ic_dim=2, gen_dim=4))
    out = stitching.write_session_posteriors(model, sessions, tmp_path / "out", splits=("valid",))
    assert [os.path.basename(p) for p in out] == ["lfads_output_session_00_rec.h5",
                                                  "lfads_output_session_01_rec.h5"]
    assert data.read_posterior_h5(out[1])["valid_output_params"].shape == (3, 6, 5)


def test_load_sessions_errors(rng, tmp_path):
    def write(name, n_bins=10, n_neurons=5, trials=3, **other):
        counts = rng.poisson(1.0, size=(trials, n_bins, n_neurons)).astype(np.float32)
        arrays = {"train_encod_data": counts, "train_recon_data": counts,
                  "valid_encod_data": counts[:1], "valid_recon_data": counts[:1], **other}
        return data.write_h5_atomic(tmp_path / name, arrays)

    a = write("a.h5")
    with pytest.raises(ValueError, match="no session file matches"):
        data.load_sessions(str(tmp_path / "missing_*.h5"))
    with pytest.raises(ValueError, match=r"b.h5: encod_seq_len is 12 but .*a.h5 has 10"):
        data.load_sessions([a, write("b.h5", n_bins=12)])
    with pytest.raises(ValueError, match="c.h5: train_encod_data has no trials"):
        data.load_sessions([a, write("c.h5", trials=0)])
    with pytest.raises(ValueError, match=r"d.h5: readin_weight has shape \(4, 3\) but the session has 5"):
        data.load_sessions([a, write("d.h5", readin_weight=np.ones((4, 3)))])
    with pytest.raises(ValueError, match="e.h5: alignment_bias_c has 4 entries but the session has 5"):
        data.load_sessions([write("e.h5", alignment_matrix_cxf=np.ones((5, 3)),
                                  alignment_bias_c=np.ones(4))])
    with pytest.raises(ValueError, match="alignment matrices map to different dimensions"):
        data.load_sessions([write("f.h5", readin_weight=np.ones((5, 3))),
                            write("g.h5", readin_weight=np.ones((5, 2)))])


# ---------------------------------------------------------------------------------- synthetic


def test_chaotic_rnn_sessions_share_latents_and_observe_them():
    kw = dict(n_sessions=3, neurons_per_session=[4, 6, 5], n_conditions=3,
              trials_per_condition=[3, 2, 4], train_per_condition=[2, 1, 3], n_units=12, n_bins=15)
    sub = synth.chaotic_rnn_sessions(**kw)
    for s, d in enumerate(sub):
        assert d.name == "chaotic_rnn_sessions" and d.params["session"] == s
        units = d.system["units"]
        assert len(units) == kw["neurons_per_session"][s]
        # Same condition, same latents in every session.
        first = sub[0].train.latents[sub[0].train.conditions == 0][0]
        np.testing.assert_array_equal(d.train.latents[d.train.conditions == 0][0], first)
        # Rates are one affine map of the observed units in every condition.
        x = d.train.latents[..., units].reshape(-1, len(units))
        r = d.train.rates.reshape(-1, len(units))
        slope = np.polyfit(x[:, 0], r[:, 0], 1)
        np.testing.assert_allclose(np.polyval(slope, x[:, 0]), r[:, 0], atol=1e-6)
        assert np.isclose(np.concatenate([d.train.rates, d.valid.rates]).max(), 0.3)
    proj = synth.chaotic_rnn_sessions(**kw, observe="projection")
    P = proj[1].system["projection"]
    lat = proj[1].train.latents.reshape(-1, 12) @ P.T
    r = proj[1].train.rates.reshape(-1, 6)
    np.testing.assert_allclose(np.corrcoef(lat[:, 2], r[:, 2])[0, 1], 1.0, atol=1e-9)
    again = synth.chaotic_rnn_sessions(**kw)
    np.testing.assert_array_equal(again[2].train.spikes, sub[2].train.spikes)
    with pytest.raises(ValueError, match="neurons_per_session has 2 entries for 3 sessions"):
        synth.chaotic_rnn_sessions(**dict(kw, neurons_per_session=[3, 4]))
    with pytest.raises(ValueError, match="session 1: neurons_per_session must be in"):
        synth.chaotic_rnn_sessions(**dict(kw, neurons_per_session=[3, 13, 4]))
