"""lfads_fast.nlb against nlb_tools' own functions on the same arrays, the smoothing
baseline's GLM against scikit-learn, the submission layout, and bad input."""
import importlib
import subprocess
import sys

import h5py
import numpy as np
import pytest

from lfads_fast import data, nlb

# nlb-eval promises agreement with nlb_tools to this (both float64; the solvers differ).
NLB_TOL = 1e-6
# Newton's method here against scikit-learn's L-BFGS (its own tolerance 1e-4 on the gradient).
GLM_RTOL = 2e-3


@pytest.fixture(scope="module")
def nlb_eval(tmp_path_factory):
    """nlb_tools.evaluation, installed without its pinned dependencies (pandas <= 1.3.4 does
    not build on this Python; evaluation.py needs only numpy, h5py, scipy and scikit-learn)."""
    pytest.importorskip("sklearn", reason="scikit-learn (the test extra) runs nlb_tools")
    pytest.importorskip("scipy", reason="scipy (scikit-learn's dependency) runs nlb_tools")
    try:
        return importlib.import_module("nlb_tools.evaluation")
    except ImportError:
        pass
    target = tmp_path_factory.mktemp("nlb_tools")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(target), "nlb-tools"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"nlb-tools could not be installed from the package index: {r.stderr[-300:]}")
    sys.path.insert(0, str(target))
    return importlib.import_module("nlb_tools.evaluation")


def _fake(rng, B=24, T=30, n_in=12, n_out=5, T_f=6):
    """Poisson counts from smooth latent rates, and a behaviour driven by the same latents."""
    t = np.linspace(0, 3, T + T_f)
    phase = rng.uniform(0, 2 * np.pi, size=(B, 1, 1))
    latents = np.stack([np.sin(t[None, :, None] + phase)[..., 0],
                        np.cos(2 * t[None, :, None] + phase)[..., 0]], axis=2)
    w = rng.normal(size=(2, n_in + n_out))
    rates = np.exp(-1.0 + 0.8 * latents @ w)
    spikes = rng.poisson(rates).astype(np.float32)
    behavior = (latents[:, :T] @ rng.normal(size=(2, 2)) + 0.3 * rng.normal(size=(B, T, 2)))
    tensors = nlb.NLBTensors(spikes[:, :T, :n_in], spikes[:, :T, n_in:], spikes[:, T:, :n_in],
                             spikes[:, T:, n_in:], behavior.astype(np.float32),
                             np.arange(B) % 4)
    return tensors, rates


def test_bits_per_spike_matches_nlb_tools(nlb_eval):
    rng = np.random.default_rng(0)
    tensors, rates = _fake(rng)
    noisy = rates * rng.uniform(0.7, 1.3, size=rates.shape)
    T, n_in = tensors.heldin.shape[1:]
    s, _ = nlb.score(noisy, tensors)
    assert s.co_bps == pytest.approx(
        nlb_eval.bits_per_spike(noisy[:, :T, n_in:].copy(), tensors.heldout.astype(float)),
        abs=NLB_TOL)
    fwd = np.concatenate([tensors.heldin_forward, tensors.heldout_forward], 2).astype(float)
    assert s.fp_bps == pytest.approx(nlb_eval.bits_per_spike(noisy[:, T:].copy(), fwd),
                                     abs=NLB_TOL)
    assert s.co_bps > 0 and s.fp_bps > 0  # near-true rates beat the mean-rate model


def test_velocity_r2_matches_nlb_tools(nlb_eval):
    rng = np.random.default_rng(1)
    tensors, rates = _fake(rng, B=40)
    T = tensors.heldin.shape[1]
    rates = rates[:, :T] * rng.uniform(0.8, 1.2, size=rates[:, :T].shape)
    behavior = tensors.behavior.astype(np.float64)
    behavior[3, :5] = np.nan  # NLB leaves out rows with missing behaviour
    tr, ev = np.arange(28), np.arange(28, 40)
    fit = nlb.velocity_r2(rates[tr], behavior[tr], rates[ev], behavior[ev])
    flat = lambda x: x.reshape(-1, x.shape[2])
    ref = nlb_eval.fit_and_eval_decoder(flat(rates[tr]), flat(behavior[tr]), flat(rates[ev]),
                                        flat(behavior[ev]))
    assert fit.r2 == pytest.approx(ref, abs=NLB_TOL)
    assert 0.2 < fit.r2 < 1.0  # the behaviour is decodable, not perfectly


def test_ridge_alpha_choice_matches_gridsearch(nlb_eval):
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV

    rng = np.random.default_rng(2)
    x = rng.normal(size=(203, 7))
    y = x @ rng.normal(size=(7, 3)) + 3.0 * rng.normal(size=(203, 3))
    g = GridSearchCV(Ridge(), {"alpha": np.logspace(2, 4, 9)}).fit(x[:150], y[:150])
    fit = nlb.ridge_cv(x[:150], y[:150], x[150:], y[150:], alphas=np.logspace(2, 4, 9))
    assert fit.alpha == g.best_params_["alpha"]
    np.testing.assert_allclose(fit.cv_r2, g.cv_results_["mean_test_score"], atol=NLB_TOL)
    assert fit.r2 == pytest.approx(g.score(x[150:], y[150:]), abs=NLB_TOL)


def test_psth_r2_matches_nlb_tools(nlb_eval):
    rng = np.random.default_rng(3)
    tensors, rates = _fake(rng)
    T = tensors.heldin.shape[1]
    spikes = np.concatenate([tensors.heldin, tensors.heldout], 2)
    psth, idx, ids = nlb.condition_psths(spikes, tensors.conditions, sigma_bins=2.0)
    assert psth.shape == (4,) + spikes.shape[1:] and ids.tolist() == [0, 1, 2, 3]
    psth[1, :3] = np.nan  # bins outside the scored window
    noisy = rates[:, :T] * rng.uniform(0.5, 1.5, size=rates[:, :T].shape)
    ours = nlb.psth_r2(psth, noisy, idx)
    ref = nlb_eval.eval_psth(psth, noisy.copy(), idx)
    assert ours == pytest.approx(ref, abs=NLB_TOL)
    assert 0 < ours < 1


def test_poisson_glm_matches_sklearn():
    sklearn_lm = pytest.importorskip("sklearn.linear_model", reason="scikit-learn: test extra")
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 6))
    y = rng.poisson(np.exp(0.3 * x @ rng.normal(size=(6, 2)) - 0.5))
    w, b = nlb.poisson_glm(x, y, alpha=0.1)
    for k in range(2):
        ref = sklearn_lm.PoissonRegressor(alpha=0.1, max_iter=1000, tol=1e-10).fit(x, y[:, k])
        np.testing.assert_allclose(w[k], ref.coef_, rtol=GLM_RTOL, atol=1e-5)
        assert b[k] == pytest.approx(ref.intercept_, rel=GLM_RTOL, abs=1e-5)


def test_gaussian_window_matches_numpy_convolve():
    rng = np.random.default_rng(5)
    x = rng.poisson(1.0, size=(3, 40, 4)).astype(float)
    sd = 3
    n = 6 * sd
    t = np.arange(n) - (n - 1) / 2
    win = np.exp(-0.5 * (t / sd) ** 2)
    win /= win.sum()
    ref = np.apply_along_axis(lambda v: np.convolve(v, win, "same"), 1, x)
    np.testing.assert_allclose(nlb.gaussian_window_smooth(x, sd), ref, atol=1e-12)


def test_smoothing_baseline_beats_mean_rates():
    rng = np.random.default_rng(6)
    tensors, _ = _fake(rng, B=60, T=40)
    tr, te = tensors.take(np.arange(45)), tensors.take(np.arange(45, 60))
    fit_rates, test_rates = nlb.smoothing_rates(tr, te, bin_ms=5.0, kern_sd_ms=15.0)
    s, _ = nlb.score(test_rates, te, train_rates=fit_rates, train_data=tr)
    assert s.co_bps > 0.02 and s.vel_r2 > 0.2


def test_submission_layout(tmp_path):
    rng = np.random.default_rng(7)
    post = {"train_output_params": rng.uniform(0.1, 1, (5, 12, 9)).astype(np.float32),
            "valid_output_params": rng.uniform(0.1, 1, (3, 12, 9)).astype(np.float32)}
    path = nlb.write_submission(tmp_path / "sub.h5", post, n_heldin=6,
                                dataset_name="mc_maze_small", bin_size_ms=20, n_encod_bins=10)
    nlb.write_submission(path, post, n_heldin=6, dataset_name="mc_maze_large", n_encod_bins=10)
    with h5py.File(path) as f:
        assert sorted(f) == ["mc_maze_large", "mc_maze_small_20"]
        g = f["mc_maze_small_20"]
        assert sorted(g) == ["eval_rates_heldin", "eval_rates_heldin_forward",
                             "eval_rates_heldout", "eval_rates_heldout_forward",
                             "train_rates_heldin", "train_rates_heldout"]
        assert g["train_rates_heldin"].shape == (5, 10, 6)
        assert g["eval_rates_heldout_forward"].shape == (3, 2, 3)
        np.testing.assert_array_equal(g["eval_rates_heldout"][()],
                                      post["valid_output_params"][:, :10, 6:])


def test_submission_bad_input(tmp_path):
    post = {"train_output_params": np.ones((2, 4, 5), np.float32)}
    with pytest.raises(ValueError, match="valid_output_params"):
        nlb.write_submission(tmp_path / "s.h5", post, 3, "mc_maze_small")
    with pytest.raises(ValueError, match="dataset_name"):
        nlb.write_submission(tmp_path / "s.h5", post, 3, "mc_maze_tiny")
    with pytest.raises(ValueError, match="bin_size_ms"):
        nlb.write_submission(tmp_path / "s.h5", post, 3, "mc_maze_small", bin_size_ms=10)


def test_posterior_shape_mismatch_names_the_key():
    rng = np.random.default_rng(8)
    tensors, rates = _fake(rng)
    post = {"valid_output_params": rates[:-1], "train_output_params": rates}
    with pytest.raises(ValueError, match="valid_output_params has shape"):
        nlb.score_posterior(post, {"train": tensors, "eval": tensors})
    with pytest.raises(ValueError, match="no test_output_params"):
        nlb.score_posterior(post, {"train": tensors, "eval": tensors}, eval_split="test")
    with pytest.raises(ValueError, match="behaviour|behavior"):
        nlb.velocity_r2(rates, tensors.behavior[:, :5], rates, tensors.behavior)


def test_read_nlb_tensors_errors_name_the_key(tmp_path):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["train_spikes_heldin"] = np.zeros((4, 10, 3), np.float32)
        f["train_spikes_heldout"] = np.zeros((4, 9, 2), np.float32)
    with pytest.raises(ValueError, match="train_spikes_heldout has shape"):
        nlb.read_nlb_tensors(path)
    with h5py.File(path, "w") as f:
        f["train_spikes_heldin"] = np.zeros((4, 10, 3), np.float32)
    with pytest.raises(ValueError, match="train_condition"):
        nlb.read_nlb_tensors(path, conditions_key="condition")


def test_kfold_indices_partition():
    parts = nlb.kfold_indices(75, 5, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(75))
    assert [len(p) for p in parts] == [15] * 5
    with pytest.raises(ValueError, match="k must be"):
        nlb.kfold_indices(5, 6)


def test_fold_dataset_keeps_test_trials_out_of_training():
    rng = np.random.default_rng(9)
    tensors, _ = _fake(rng, B=20)
    test = np.array([0, 5, 9, 13])
    ds, train, valid = nlb.fold_dataset(tensors, test, valid_fraction=0.25)
    assert not set(test) & (set(train) | set(valid))
    assert len(valid) == 4 and len(train) == 12
    np.testing.assert_array_equal(ds.test.encod_data, tensors.heldin[test])
    np.testing.assert_array_equal(ds.test.extra["behavior"], tensors.behavior[test])
    assert ds.recon_data_dim == tensors.heldin.shape[2] + tensors.heldout.shape[2]


def _behavior_dataset(rng, B=30, n_valid=10):
    tensors, _ = _fake(rng, B=B, T=20, n_in=8, n_out=4, T_f=0)
    recon = np.concatenate([tensors.heldin, tensors.heldout], 2)
    tr, va = np.arange(B - n_valid), np.arange(B - n_valid, B)
    return data.from_arrays(tensors.heldin[tr], tensors.heldin[va], train_recon_data=recon[tr],
                            valid_recon_data=recon[va],
                            extra={"train_behavior": tensors.behavior[tr],
                                   "valid_behavior": tensors.behavior[va]})


def test_trainer_logs_velocity_r2_every_n_epochs(tmp_path):
    from lfads_fast.model import LFADS
    from lfads_fast.train import Trainer, TrainConfig, config_for_data

    ds = _behavior_dataset(np.random.default_rng(10))
    cfg = config_for_data(ds, ic_enc_dim=8, ci_enc_dim=4, con_dim=4, co_dim=1, ic_dim=4,
                          gen_dim=8, fac_dim=4)
    trainer = Trainer(LFADS(cfg, seed=0), ds, TrainConfig(max_epochs=4, vel_r2_every=2),
                      tmp_path, progress=False)
    result = trainer.fit()
    logged = [row.get("valid_vel_r2", np.nan) for row in result.history]
    assert np.isnan(logged[0]) and np.isnan(logged[2])
    assert np.isfinite(logged[1]) and np.isfinite(logged[3])
    # The last row is the decoder of the final parameters.
    assert logged[3] == pytest.approx(nlb.epoch_metrics(trainer.model, ds)["valid_vel_r2"],
                                      abs=1e-12)
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert "valid_vel_r2" in header
    assert (tmp_path / "training_curves.png").exists()


def test_trainer_velocity_r2_needs_behaviour(tmp_path):
    from lfads_fast.model import LFADS
    from lfads_fast.train import Trainer, TrainConfig, config_for_data

    ds = _behavior_dataset(np.random.default_rng(11))
    del ds.valid.extra["behavior"]
    cfg = config_for_data(ds, ic_enc_dim=8, ci_enc_dim=4, con_dim=4, co_dim=1, ic_dim=4,
                          gen_dim=8, fac_dim=4)
    with pytest.raises(ValueError, match="valid_behavior is missing"):
        Trainer(LFADS(cfg), ds, TrainConfig(vel_r2_every=5), tmp_path, progress=False)
    ds.valid.extra["behavior"] = np.zeros((10, 7, 2), np.float32)
    with pytest.raises(ValueError, match=r"valid_behavior has shape \(10, 7, 2\)"):
        Trainer(LFADS(cfg), ds, TrainConfig(vel_r2_every=5), tmp_path, progress=False)
    with pytest.raises(ValueError, match="vel_r2_every"):
        TrainConfig(vel_r2_every=-1)


REAL = __import__("pathlib").Path(__file__).parent / "data" / "mc_maze_small_train.h5"


@pytest.mark.skipif(not REAL.exists(), reason="tests/data/mc_maze_small_train.h5 not present")
def test_smoothing_baseline_on_real_data():
    """NLB's smoothing recipe on one fold of the 5-fold CV over MC_Maze_Small's 75 training
    trials (deterministic: no training involved; docs/real_data.md has all five folds)."""
    tensors = nlb.read_nlb_tensors(REAL)["train"]
    assert tensors.heldin.shape == (75, 140, 107) and tensors.behavior.shape == (75, 140, 2)
    test = nlb.kfold_indices(75, 5, seed=0)[0]
    fit = np.setdiff1d(np.arange(75), test)
    s = nlb.smoothing_scores(tensors.take(fit), tensors.take(test))
    # Smoothing explains the held-out neurons a little and the velocity moderately.
    assert 0.05 < s.co_bps < 0.25
    assert 0.2 < s.vel_r2 < 0.8


def test_score_posterior_test_phase_eval_inputs():
    """NLB's eval inputs of the test phase hold only held-in spikes: the posterior's rates
    (with held-out neurons and forward bins) are accepted, and only what can be scored is."""
    rng = np.random.default_rng(12)
    tensors, rates = _fake(rng)
    hidden = nlb.NLBTensors(tensors.heldin[:8])
    post = {"train_output_params": rates, "valid_output_params": rates[:8]}
    s, fit, _ = nlb.score_posterior(post, {"train": tensors, "eval": hidden})
    assert np.isfinite(s.bps) and fit is None
    assert np.isnan(s.co_bps) and np.isnan(s.fp_bps) and np.isnan(s.vel_r2)
    with pytest.raises(ValueError, match="valid_output_params has shape"):
        nlb.score_posterior({**post, "valid_output_params": rates[:8, :-1]},
                            {"train": tensors, "eval": hidden})
