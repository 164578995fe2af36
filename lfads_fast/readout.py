"""Linear read-out of behaviour from inferred rates or factors (lfads-fast fit-decoder).

NLB's procedure (nlb_tools' velocity decoding): ridge regression from the model's outputs to
the behaviour, the behaviour at bin t predicted from the features at bin t - lag, the ridge
penalty alpha (and here, optionally, the lag) chosen by K-fold cross-validation over trials,
scored by variance-weighted R^2. The fitted map is stored with the export and applied inside
the real-time step (docs/realtime.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["RidgeFit", "fit_ridge", "lagged_pairs", "variance_weighted_r2"]

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-4, 4, 9))


@dataclass
class RidgeFit:
    """A fitted read-out: behaviour_t ~ W features_{t - lag} + b.

    Attributes:
        W: [D, features]; b: [D].
        alpha, lag: the chosen penalty and lag (bins).
        cv_r2: mean cross-validated variance-weighted R^2 of the chosen (alpha, lag).
        scores: {(lag, alpha): cv R^2} of every candidate.
    """

    W: np.ndarray
    b: np.ndarray
    alpha: float
    lag: int
    cv_r2: float
    scores: dict = field(default_factory=dict)


def variance_weighted_r2(pred: np.ndarray, target: np.ndarray) -> float:
    """sklearn's r2_score(multioutput='variance_weighted') of [n, D] arrays (NLB's score)."""
    ss_res = np.sum((target - pred) ** 2)
    ss_tot = np.sum((target - target.mean(axis=0)) ** 2)
    return float(1.0 - ss_res / ss_tot) if ss_tot > 0 else float("nan")


def lagged_pairs(features: list[np.ndarray], behaviour: list[np.ndarray], lag: int):
    """Stacks (features_{t - lag}, behaviour_t) over the bins of each trial.

    Args:
        features: per trial, [T_i, F] (NaN rows = no output at that bin, left out).
        behaviour: per trial, [T_i, D] (NaN rows left out).
        lag: bins >= 0.

    Returns:
        (X [n, F], Y [n, D], trial [n]): the pairs and the trial each came from.
    """
    xs, ys, ids = [], [], []
    for i, (f, y) in enumerate(zip(features, behaviour)):
        T = min(len(f), len(y))
        x_part, y_part = f[: T - lag], y[lag:T]
        ok = np.all(np.isfinite(x_part), axis=1) & np.all(np.isfinite(y_part), axis=1)
        xs.append(x_part[ok])
        ys.append(y_part[ok])
        ids.append(np.full(int(ok.sum()), i))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ids)


def fit_ridge(features: list[np.ndarray], behaviour: list[np.ndarray], *, lags=(0,),
              alphas=DEFAULT_ALPHAS, folds: int = 5, seed: int = 0) -> RidgeFit:
    """Ridge read-out with (lag, alpha) chosen by K-fold cross-validation over trials.

    Args:
        features: per trial [T_i, F] (e.g. the real-time decoder's rates of each bin).
        behaviour: per trial [T_i, D] (e.g. hand velocity).
        lags: candidate lags in bins (behaviour_t from features_{t - lag}).
        alphas: candidate ridge penalties (on the centred problem; the intercept is free).
        folds: K of the cross-validation (whole trials per fold).
        seed: seed of the assignment of trials to folds.

    Returns:
        The RidgeFit refitted on all trials with the best (lag, alpha).

    Raises:
        ValueError: fewer trials than folds, no valid pairs, or bad candidates.
    """
    n_trials = len(features)
    if len(behaviour) != n_trials:
        raise ValueError(f"{n_trials} trials of features but {len(behaviour)} of behaviour")
    if not 2 <= folds <= n_trials:
        raise ValueError(f"folds must be in 2 .. number of trials ({n_trials}), got {folds}")
    lags = [int(lag) for lag in lags]
    if not lags or min(lags) < 0:
        raise ValueError(f"lags must be integers >= 0, got {lags}")
    alphas = [float(a) for a in alphas]
    if not alphas or min(alphas) < 0:
        raise ValueError(f"alphas must be numbers >= 0, got {alphas}")
    fold_of = np.random.default_rng(seed).permutation(n_trials) % folds
    scores = {}
    for lag in lags:
        X, Y, trial = lagged_pairs(features, behaviour, lag)
        if len(X) == 0:
            raise ValueError(f"no bins with both features and behaviour at lag {lag}")
        for alpha in alphas:
            preds = np.empty_like(Y)
            for k in range(folds):
                test = fold_of[trial] == k
                W, b = _ridge(X[~test], Y[~test], alpha)
                preds[test] = X[test] @ W.T + b
            scores[(lag, alpha)] = variance_weighted_r2(preds, Y)
    lag, alpha = max(scores, key=lambda k: -np.inf if np.isnan(scores[k]) else scores[k])
    X, Y, _ = lagged_pairs(features, behaviour, lag)
    W, b = _ridge(X, Y, alpha)
    return RidgeFit(W, b, alpha, lag, scores[(lag, alpha)], scores)


def _ridge(X, Y, alpha):
    """Ridge with a free intercept: W [D, F], b [D] (float64 normal equations)."""
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    mx, my = X.mean(axis=0), Y.mean(axis=0)
    Xc, Yc = X - mx, Y - my
    A = Xc.T @ Xc + alpha * np.eye(X.shape[1])
    W = np.linalg.lstsq(A, Xc.T @ Yc, rcond=None)[0].T
    return W, my - W @ mx
