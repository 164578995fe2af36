"""The ridge read-out of lfads_fast.readout (lfads-fast fit-decoder)."""
import numpy as np
import pytest

from lfads_fast.readout import fit_ridge, lagged_pairs, variance_weighted_r2


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


def test_r2_matches_sklearn_definition():
    y = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 33.0]])
    p = np.array([[1.5, 11.0], [2.0, 19.0], [2.0, 30.0]])
    ss_res = ((y - p) ** 2).sum()
    ss_tot = ((y - y.mean(0)) ** 2).sum()
    assert variance_weighted_r2(p, y) == pytest.approx(1 - ss_res / ss_tot)


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
