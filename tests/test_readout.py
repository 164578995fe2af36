"""The read-outs of lfads_fast.readout (lfads-fast fit-decoder): ridge and the optimal linear
estimator (OLE)."""
import numpy as np
import pytest

from lfads_fast.nlb import r2_uniform
from lfads_fast.readout import fit_ole, fit_readout, fit_ridge, lagged_pairs

# The OLE's map estimated from ~2000 bins against the map of the true encoding model, largest
# error over the largest weight: about 0.02 typically, at most 0.045 over 20 seeds.
OLE_MAP_RTOL = 0.08


def test_recovers_lag_and_weights(rng):
    A, c = rng.standard_normal((3, 6)), rng.standard_normal(3)
    feats, behs = [], []
    for _ in range(30):
        f = rng.standard_normal((40, 6))
        y = np.full((40, 3), np.nan)
        y[3:] = f[:-3] @ A.T + c + 0.01 * rng.standard_normal((37, 3))
        feats.append(f)
        behs.append(y)
    fit = fit_ridge(feats, behs, lags=[0, 1, 3, 5], alphas=[1e-3, 1.0, 1e3], folds=5)
    assert fit.lag == 3 and fit.alpha < 1e3
    assert fit.cv_r2 > 0.99
    np.testing.assert_allclose(fit.W, A, atol=0.01)
    np.testing.assert_allclose(fit.b, c, atol=0.01)
    assert fit.scores[(0, 1.0)] < 0.5


def test_lagged_pairs_drop_missing_bins():
    f = [np.array([[1.0], [np.nan], [3.0], [4.0]])]
    y = [np.array([[0.0], [10.0], [20.0], [np.nan]])]
    X, Y, trial = lagged_pairs(f, y, 1)
    np.testing.assert_array_equal(X[:, 0], [1.0])
    np.testing.assert_array_equal(Y[:, 0], [10.0])


def test_bad_arguments(rng):
    f = [rng.standard_normal((5, 2))] * 3
    with pytest.raises(ValueError, match="folds must be in 2 .. number of trials"):
        fit_ridge(f, f, folds=4)
    with pytest.raises(ValueError, match="lags must be integers >= 0"):
        fit_ridge(f, f, lags=[-1], folds=2)
    for bad in ([-1.0], [float("nan")], [1.0, float("inf")], []):
        with pytest.raises(ValueError, match=r"alphas \(the ridge penalties alpha\) must be finite"):
            fit_ridge(f, f, alphas=bad, folds=2)
    with pytest.raises(ValueError, match=r"alphas \(the OLE penalties lambda\) must be finite"):
        fit_ole(f, f, alphas=[float("nan")], folds=2)


def encoding_trials(rng, B, noise_sd, *, lag, n_trials, T=40):
    """Features made from behaviour by a linear encoding model, f_{t - lag} = f0 + B v_t + e.

    Returns (features, behaviour, f0): per trial [T, F] and [T, D] (behaviour NaN in the first
    lag bins, which no feature precedes), f0 [F].
    """
    F, D = B.shape
    f0 = rng.standard_normal(F)
    feats, behs = [], []
    for _ in range(n_trials):
        v = rng.standard_normal((T, D))
        f = np.empty((T, F))
        f[: T - lag] = f0 + v[lag:] @ B.T + noise_sd * rng.standard_normal((T - lag, F))
        f[T - lag :] = f0 + noise_sd * rng.standard_normal((lag, F))
        v[:lag] = np.nan
        feats.append(f)
        behs.append(v)
    return feats, behs, f0


def test_ole_recovers_the_optimal_map(rng):
    """With features = f0 + B v + e (e of variances S), the behaviour is a known linear function
    of the features plus noise, v = W* (f - f0) - W* e with W* = (B^T S^-1 B)^-1 B^T S^-1; the
    OLE picks the lag and recovers W* and its bias."""
    F, D, lag = 12, 2, 2
    B = rng.standard_normal((F, D))
    sd = rng.uniform(0.05, 0.3, F)
    feats, behs, f0 = encoding_trials(rng, B, sd, lag=lag, n_trials=60)
    fit = fit_ole(feats, behs, lags=[0, 1, 2, 4], alphas=[1e-6, 1e-2, 1.0, 1e4], folds=5)
    Si = 1.0 / sd**2
    W_star = np.linalg.solve(B.T * Si @ B, B.T * Si)
    assert fit.method == "ole" and fit.lag == lag and fit.alpha < 1e4
    assert fit.cv_r2 > 0.98
    np.testing.assert_allclose(fit.W, W_star, rtol=0, atol=OLE_MAP_RTOL * np.abs(W_star).max())
    # At the true f0 the decoder gives minus the mean noise of the n training bins through the
    # map, of standard errors sqrt(diag((B^T S^-1 B)^-1) / n): 0 within 4 of them.
    n = len(lagged_pairs(feats, behs, lag)[0])
    se = np.sqrt(np.diag(np.linalg.inv(B.T * Si @ B)) / n)
    assert np.all(np.abs(fit.W @ f0 + fit.b) <= 4 * se)
    assert max(fit.scores[(0, a)] for a in (1e-6, 1e-2, 1.0, 1e4)) < 0.1  # the wrong lag explains nothing


def test_ole_noise_weighting_beats_the_unweighted_inversion(rng):
    """Half the channels 20x noisier than the others: weighting by the estimated noise keeps the
    quiet channels' information; the inversion with Sigma = I mixes in the noisy ones."""
    F, D = 20, 2
    B = rng.standard_normal((F, D))
    sd = np.where(rng.permutation(F) < F // 2, 0.25, 5.0)
    feats, behs, _ = encoding_trials(rng, B, sd, lag=0, n_trials=40)
    train, test = slice(0, 30), slice(30, 40)
    X_test, Y_test, _ = lagged_pairs(feats[test], behs[test], 0)
    r2 = {}
    for noise in ("diagonal", "identity"):
        fit = fit_ole(feats[train], behs[train], alphas=[1e-4, 1e-2, 1.0], folds=5, noise=noise)
        r2[noise] = r2_uniform(Y_test, X_test @ fit.W.T + fit.b)
    assert r2["diagonal"] > 0.9
    assert r2["diagonal"] > r2["identity"] + 0.2, r2


def test_fit_readout_dispatches_and_refuses_unknown_methods(rng):
    A = rng.standard_normal((2, 5))
    feats = [rng.standard_normal((20, 5)) for _ in range(6)]
    behs = [f @ A.T for f in feats]
    ridge = fit_readout(feats, behs, method="ridge", folds=3)
    assert ridge.method == "ridge"
    np.testing.assert_allclose(ridge.W, fit_ridge(feats, behs, folds=3).W)
    assert fit_readout(feats, behs, method="ole", folds=3).method == "ole"
    with pytest.raises(ValueError, match="method must be one of ridge, ole, got 'foo'"):
        fit_readout(feats, behs, method="foo")
    with pytest.raises(ValueError, match="noise must be one of diagonal, identity, got 'full'"):
        fit_ole(feats, behs, folds=3, noise="full")


def test_ole_needs_more_bins_than_behaviour_outputs(rng):
    # 3 trials of 2 bins, 6 behaviour outputs: each training fold has 4 bins, all fits 6.
    feats = [rng.standard_normal((2, 4)) for _ in range(3)]
    behs = [rng.standard_normal((2, 6)) for _ in range(3)]
    with pytest.raises(ValueError, match=r"method ole needs more training bins than behaviour "
                       r"outputs \+ 1 \(D \+ 1 = 7\) .* got 4 bins"):
        fit_ole(feats, behs, folds=3)
    fit_ridge(feats, behs, folds=3)  # ridge has no encoding model to fit
