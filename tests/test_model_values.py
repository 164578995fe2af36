"""The model checked by value where the loss-and-gradient parity tests cannot see: the noise
(keep rates, scaling, independence), the initialisation against lfads-torch's scheme, forward
outputs against the PyTorch reference, the loss and gradients where the cell clip holds many
states, and posterior averaging against explicit samples."""
import dataclasses

import numpy as np
import pytest
from optional import OptionalModule

from lfads_fast import LFADS, LFADSConfig, posterior

torch_reference = OptionalModule("torch_reference")  # tests that use it skip without torch

# Statistical checks allow Z standard errors (probability of a false alarm < 1e-6 each).
Z = 5.0
F64_RTOL = 1e-8  # float64 model vs float64 torch: summation order only

SMALL = dict(encod_data_dim=7, recon_data_dim=9, encod_seq_len=9, recon_seq_len=12,
             ext_input_dim=2, ic_enc_dim=6, ci_enc_dim=5, ci_lag=2, con_dim=5, co_dim=2,
             ic_dim=4, gen_dim=8, fac_dim=3, dropout_rate=0.2, l2_gen_scale=1e-2,
             l2_con_scale=2e-3, kl_ic_scale=1e-2, kl_co_scale=1e-2, loss_scale=10.0)


def counts(rng, cfg, B):
    encod = rng.poisson(1.5, (B, cfg.encod_seq_len, cfg.encod_data_dim)).astype(np.float64)
    recon = rng.poisson(1.5, (B, cfg.recon_seq_len, cfg.recon_data_dim)).astype(np.float64)
    recon[:, : cfg.encod_seq_len, : cfg.encod_data_dim] = encod
    return encod, recon


# ------------------------------------------------------------------ noise


@pytest.mark.parametrize("p, cd", [(0.3, 0.2), (0.05, 0.5)])
def test_dropout_masks_keep_1_minus_p_scaled_by_its_inverse(p, cd):
    cfg = LFADSConfig(**dict(SMALL, dropout_rate=p, cd_rate=cd))
    model = LFADS(cfg, dtype=np.float64)
    noise = model.draw_noise(400, np.random.default_rng(1), train=True, sample=True)
    drops = [k for k in noise if k.startswith("drop_")]
    assert sorted(drops) == sorted(["drop_data", "drop_ic_hn", "drop_ci", "drop_fac_in", "drop_g0",
                                    "drop_gen", "drop_ext"])
    for key in drops:
        m = noise[key]
        kept = m != 0
        assert set(np.unique(m)) <= {0.0, 1.0 / (1.0 - p)}, key
        np.testing.assert_allclose(m[kept], 1.0 / (1.0 - p), rtol=1e-15)
        se = np.sqrt(p * (1 - p) / m.size)
        assert abs(kept.mean() - (1 - p)) < Z * se, (key, kept.mean())
        assert abs(m.mean() - 1.0) < Z * se / (1 - p), key  # unbiased: E[mask] = 1
    keep = noise["cd_keep"]
    assert set(np.unique(keep)) == {0.0, 1.0}
    assert abs(keep.mean() - (1 - cd)) < Z * np.sqrt(cd * (1 - cd) / keep.size)


def test_sample_noise_is_standard_normal_and_draws_are_independent():
    cfg = LFADSConfig(**dict(SMALL, cd_rate=0.3))
    model = LFADS(cfg, dtype=np.float64)
    rng = np.random.default_rng(2)
    a = model.draw_noise(300, rng)
    b = model.draw_noise(300, rng)
    for key in ("ic_eps", "co_eps", "co_kl_eps"):
        x = a[key].ravel()
        assert abs(x.mean()) < Z / np.sqrt(x.size), key
        assert abs(x.std() - 1.0) < Z / np.sqrt(2 * x.size), key
        assert abs(np.mean(np.abs(x) < 1) - 0.6827) < Z * np.sqrt(0.22 / x.size), key
    # Independent between consecutive draws, and between the arrays of one draw.
    pairs = [(a[k], b[k]) for k in ("co_eps", "drop_gen", "cd_keep", "co_kl_eps")]
    pairs += [(a["co_eps"], a["co_kl_eps"]), (a["drop_gen"][:, :, :2], a["drop_fac_in"][:, :, :2])]
    for x, y in pairs:
        r = np.corrcoef(x.ravel(), y.ravel())[0, 1]
        assert abs(r) < Z / np.sqrt(x.size), r
    assert not np.array_equal(a["drop_data"], b["drop_data"])


def test_noise_switches():
    cfg = LFADSConfig(**SMALL)
    model = LFADS(cfg)
    rng = np.random.default_rng(3)
    assert set(model.draw_noise(4, rng, train=False, sample=False)) == {"co_kl_eps"}
    assert set(model.draw_noise(4, rng, train=False, sample=True)) == {"ic_eps", "co_eps",
                                                                       "co_kl_eps"}
    same = [LFADS(cfg).draw_noise(5, np.random.default_rng(9)) for _ in range(2)]
    for k in same[0]:
        np.testing.assert_array_equal(same[0][k], same[1][k])  # seeded: reproducible


# Coordinated dropout with a pass-through fraction (cd_pass_rate).
CD_PASS = dict(SMALL, cd_rate=0.3, cd_pass_rate=0.25)


def test_cd_pass_mask_rate_shape_and_draw_order():
    cfg = LFADSConfig(**CD_PASS)
    noise = LFADS(cfg, dtype=np.float64).draw_noise(400, np.random.default_rng(4))
    keep, passed = noise["cd_keep"], noise["cd_pass"]
    assert passed.shape == keep.shape
    assert set(np.unique(passed)) == {0.0, 1.0}
    p = cfg.cd_pass_rate
    assert abs(passed.mean() - p) < Z * np.sqrt(p * (1 - p) / passed.size)
    r = np.corrcoef(keep.ravel(), passed.ravel())[0, 1]
    assert abs(r) < Z / np.sqrt(keep.size), r
    # Drawn last: every other array is the one drawn without a pass mask, so cd_pass_rate = 0
    # leaves a run's noise as it was.
    plain_cfg = LFADSConfig(**dict(CD_PASS, cd_pass_rate=0.0))
    plain = LFADS(plain_cfg, dtype=np.float64).draw_noise(400, np.random.default_rng(4))
    assert set(noise) - set(plain) == {"cd_pass"}
    for k, v in plain.items():
        np.testing.assert_array_equal(noise[k], v, err_msg=k)


def test_cd_pass_only_with_coordinated_dropout_in_training():
    rng = np.random.default_rng(5)
    without_cd = LFADS(LFADSConfig(**dict(CD_PASS, cd_rate=0.0)))
    assert "cd_pass" not in without_cd.draw_noise(4, rng)
    model = LFADS(LFADSConfig(**CD_PASS))
    assert "cd_pass" in model.draw_noise(4, rng)
    assert "cd_pass" not in model.draw_noise(4, rng, train=False)


def test_cd_pass_gradient_is_the_combined_mask(rng):
    """The gradient with cd_keep and cd_pass is the one whose reconstruction bins are
    weighted by 1 - cd_keep (1 - cd_pass): the same gradient comes from an encoder input
    masked by hand and that mask as the per-bin loss weight, without coordinated dropout."""
    cfg = LFADSConfig(**CD_PASS)
    model = LFADS(cfg, seed=6, dtype=np.float64)
    model.flat += rng.normal(size=model.flat.shape) * 0.1
    B, Te, Ne = 5, cfg.encod_seq_len, cfg.encod_data_dim
    encod, recon = counts(rng, cfg, B)
    ext = rng.normal(size=(B, cfg.recon_seq_len, cfg.ext_input_dim))
    noise = model.draw_noise(B, rng)
    keep, passed = noise["cd_keep"], noise["cd_pass"]
    assert 0 < passed[keep == 1].mean() < 1  # some kept bins pass, some do not
    terms, grad = model.loss_and_grads(model.make_batch(encod, recon, ext), noise)

    masked = encod * keep.transpose(1, 0, 2) / (1.0 - cfg.cd_rate)
    weight = np.ones((cfg.recon_seq_len, B, cfg.recon_data_dim))
    weight[:Te, :, :Ne] = np.where((keep == 1) & (passed == 0), 0.0, 1.0)
    by_hand = dataclasses.replace(model.make_batch(masked, recon, ext, check_counts=False),
                                  recon_weight=weight)
    rest = {k: v for k, v in noise.items() if k not in ("cd_keep", "cd_pass")}
    _, expected = model.loss_and_grads(by_hand, rest)
    np.testing.assert_allclose(grad, expected, rtol=F64_RTOL, atol=1e-12)

    # The pass mask changes the gradient, not the loss; an all-zero one changes nothing.
    no_pass = {k: v for k, v in noise.items() if k != "cd_pass"}
    terms0, grad0 = model.loss_and_grads(model.make_batch(encod, recon, ext), no_pass)
    assert terms0["loss"] == terms["loss"]
    assert np.abs(grad - grad0).max() > 1e-3 * np.abs(grad0).max()
    zeros = dict(noise, cd_pass=np.zeros_like(passed))
    terms_z, grad_z = model.loss_and_grads(model.make_batch(encod, recon, ext), zeros)
    assert terms_z == terms0
    np.testing.assert_array_equal(grad_z, grad0)


def test_cd_pass_needs_cd_keep():
    model = LFADS(LFADSConfig(**CD_PASS))
    with pytest.raises(ValueError, match=r"noise\['cd_pass'\] is given without noise\['cd_keep'\]"):
        model.loss_and_grads(model.make_batch(np.zeros((2, 9, 7)), np.zeros((2, 12, 9)),
                                              np.zeros((2, 12, 2))),
                             {"cd_pass": np.zeros((9, 2, 7), np.float32)})


# ------------------------------------------------------------------ initialisation


def test_initialisation_follows_lfads_torch():
    # lfads-torch (modules/initializers.py): encoder GRUs N(0, 1/(in + hidden)) for both
    # weight matrices, decoder GRUs N(0, 1/in) and N(0, 1/hidden), b_ih 1 on the z and r rows
    # and 0 on n, linear layers N(0, 1/in) with zero bias, zero initial states; the priors'
    # parameters from the config. tests/torch_reference.py's init_params draws that scheme.
    cfg = LFADSConfig(**dict(SMALL, encod_data_dim=40, ic_enc_dim=64, ci_enc_dim=48, con_dim=64,
                             co_dim=4, ic_dim=32, gen_dim=96, fac_dim=24, recon_data_dim=40,
                             ic_prior_mean=0.3, co_prior_tau=7.0, co_prior_nvar=0.2))
    model = LFADS(cfg, seed=4, dtype=np.float64)
    ref = torch_reference.init_params(cfg, seed=5)
    assert set(ref) == set(model.params)
    for name, want in ref.items():
        got = model.params[name]
        assert got.shape == want.shape, name
        if np.all(want == want.ravel()[0]) or name.endswith("_b_ih") or name.endswith("_b"):
            # Constants: biases, initial states, priors. b_ih is exact too.
            np.testing.assert_array_equal(got, want, err_msg=name)
            continue
        n = got.size
        sd = want.std()  # the scheme's scale, as drawn by the reference
        assert abs(got.mean()) < Z * sd / np.sqrt(n), name
        assert abs(got.std() / sd - 1.0) < Z * np.sqrt(2.0 / n), (name, got.std(), sd)
        kurt = np.mean((got - got.mean()) ** 4) / got.var() ** 2
        assert abs(kurt - 3.0) < Z * np.sqrt(24.0 / n), (name, kurt)  # Gaussian, not uniform


# ------------------------------------------------------------------ forward by value


@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("ext_bins", ["encod", "recon"])
def test_forward_outputs_match_the_reference(sample, ext_bins):
    cfg = LFADSConfig(**SMALL)
    rng = np.random.default_rng(6)
    model = LFADS(cfg, seed=2, dtype=np.float64)
    model.flat += rng.normal(size=model.flat.shape) * 0.1
    B = 5
    encod, recon = counts(rng, cfg, B)
    T_ext = cfg.encod_seq_len if ext_bins == "encod" else cfg.recon_seq_len
    ext = rng.normal(size=(B, T_ext, cfg.ext_input_dim))  # zero-padded to T_r when shorter
    out = model.forward(encod, ext, sample=sample, seed=11, recon_data=recon)
    # The same noise the model draws (no dropout in forward), given to the reference.
    noise = model.draw_noise(B, np.random.default_rng(11), train=False, sample=sample)
    _, _, ref = torch_reference.reference_loss_and_grads(dict(model.params), cfg, encod, recon,
                                                         ext, noise)
    assert set(ref) <= set(out)
    for key, want in ref.items():
        np.testing.assert_allclose(out[key], want, rtol=F64_RTOL, atol=1e-12, err_msg=key)
    assert np.all(out["co_stds"] > 0) and np.all(out["ic_std"] > 0)


# ------------------------------------------------------------------ the clip in the whole model


def test_loss_and_gradients_match_the_reference_where_the_clip_holds():
    cfg = LFADSConfig(**dict(SMALL, cell_clip=0.5))
    rng = np.random.default_rng(7)
    model = LFADS(cfg, seed=3, dtype=np.float64)
    model.flat *= 3.0  # strong weights drive the states into the clip
    model.flat += rng.normal(size=model.flat.shape) * 0.1
    for name, H in (("con", cfg.con_dim), ("gen", cfg.gen_dim)):
        # A closed update gate (the state follows its candidate) and candidates pushed out.
        b = model.params[f"{name}_b_ih"]
        b[:H] = -2.0
        b[2 * H :] = rng.normal(size=H) * 1.5
    encod, recon = counts(rng, cfg, 6)
    ext = rng.normal(size=(6, cfg.recon_seq_len, cfg.ext_input_dim))
    noise = model.draw_noise(6, rng)
    terms, grad = model.loss_and_grads(model.make_batch(encod, recon, ext), noise,
                                       kl_ramp=0.7, l2_ramp=0.4)
    ref_terms, ref_grads, ref_out = torch_reference.reference_loss_and_grads(
        dict(model.params), cfg, encod, recon, ext, noise, kl_ramp=0.7, l2_ramp=0.4)
    for states in ("gen_states", "con_states"):
        held = np.abs(ref_out[states]) >= cfg.cell_clip * (1 - 1e-12)
        assert 0.2 < held.mean() < 0.98, (states, held.mean())
    for k in ("loss", "recon", "kl_ic", "kl_co", "l2"):
        np.testing.assert_allclose(terms[k], ref_terms[k], rtol=F64_RTOL, err_msg=k)
    for k, g in model.views(grad).items():
        np.testing.assert_allclose(g, ref_grads[k], rtol=F64_RTOL, atol=1e-10, err_msg=k)


# ------------------------------------------------------------------ posterior averaging


@pytest.fixture(scope="module")
def small_model():
    cfg = LFADSConfig(**dict(SMALL, ext_input_dim=0))
    model = LFADS(cfg, seed=8, dtype=np.float64)
    model.flat += np.random.default_rng(8).normal(size=model.flat.shape) * 0.2
    return model


def test_posterior_average_is_the_mean_of_its_samples(small_model):
    # One trial per chunk: its average is the mean over the rows of one sampled forward pass
    # with the chunk's seed, every output field.
    rng = np.random.default_rng(9)
    encod, _ = counts(rng, small_model.config, 3)
    reps = 16
    avg = posterior.sample_and_average(small_model, encod, n_samples=reps, seed=5, max_rows=reps)
    for j in range(3):
        chunk_seed = int(np.random.SeedSequence([5, j]).generate_state(1)[0])
        samples = small_model.forward(np.repeat(encod[j : j + 1], reps, axis=0), sample=True,
                                      seed=chunk_seed)
        for key, value in avg.items():
            np.testing.assert_allclose(value[j], samples[key].mean(axis=0), rtol=1e-12,
                                       atol=1e-14, err_msg=key)


def test_posterior_average_agrees_with_independent_samples(small_model):
    # Against samples drawn by separate calls with unrelated seeds: equal in expectation.
    rng = np.random.default_rng(10)
    encod, _ = counts(rng, small_model.config, 2)
    n = 300
    avg = posterior.sample_and_average(small_model, encod, n_samples=n, seed=1)
    draws = np.stack([small_model.forward(encod, sample=True, seed=1000 + k)["output_params"]
                      for k in range(n)])
    se = draws.std(axis=0) / np.sqrt(n)
    diff = np.abs(avg["output_params"] - draws.mean(axis=0))
    assert np.all(diff <= Z * np.sqrt(2) * se + 1e-12)
    means = small_model.forward(encod)["output_params"]
    assert np.abs(avg["output_params"] - means).max() > 10 * se.mean()  # sampling matters
