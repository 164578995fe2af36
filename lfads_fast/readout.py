"""Linear read-out of behaviour from inferred rates or factors (lfads-fast fit-decoder).

Two estimators of the same kind of map, behaviour_t ~ W features_{t - lag} + b:

- ridge (fit_ridge), NLB's procedure (nlb_tools' velocity decoding): ridge regression from
  the model's outputs to the behaviour.
- ole (fit_ole), the optimal linear estimator of intracortical BCIs (Salinas & Abbott 1994;
  the "indirect OLE" of Collinger et al. 2013 and Wodlinger et al. 2015): an encoding model of
  each feature from the behaviour, inverted with the features weighted by their noise.

Both choose the penalty (and here, optionally, the lag) by K-fold cross-validation over
trials, scored by NLB's R^2 (nlb.r2_uniform: per output, averaged). The fitted map is stored with the export and applied
inside the real-time step (docs/realtime.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .nlb import r2_uniform, ridge

__all__ = ["LinearFit", "METHODS", "fit_readout", "fit_ridge", "fit_ole", "lagged_pairs",
           "r2_uniform"]

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-4, 4, 9))
METHODS = ("ridge", "ole")
OLE_NOISE = ("diagonal", "identity")
# Floor of a channel's noise variance, relative to the mean over channels: a channel that the
# encoding model explains exactly (e.g. a constant rate) would otherwise get an infinite weight.
NOISE_FLOOR = 1e-6


@dataclass
class LinearFit:
    """A fitted read-out: behaviour_t ~ W features_{t - lag} + b.

    Attributes:
        W: [D, features]; b: [D].
        alpha: the chosen penalty (ridge: alpha of the centred problem; ole: lambda, on the
            behaviour in units of its standard deviation).
        lag: the chosen lag (bins).
        cv_r2: cross-validated R^2 (nlb.r2_uniform) of the chosen (alpha, lag).
        method: "ridge" or "ole".
        scores: {(lag, alpha): cv R^2} of every candidate.
    """

    W: np.ndarray
    b: np.ndarray
    alpha: float
    lag: int
    cv_r2: float
    method: str = "ridge"
    scores: dict = field(default_factory=dict)


def fit_readout(features: list[np.ndarray], behaviour: list[np.ndarray], *, method: str = "ridge",
                **kwargs) -> LinearFit:
    """fit_ridge or fit_ole by name (method: one of METHODS); kwargs go to that function."""
    if method == "ridge":
        return fit_ridge(features, behaviour, **kwargs)
    if method == "ole":
        return fit_ole(features, behaviour, **kwargs)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


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
              alphas=DEFAULT_ALPHAS, folds: int = 5, seed: int = 0) -> LinearFit:
    """Ridge read-out with (lag, alpha) chosen by K-fold cross-validation over trials.

    Args:
        features: per trial [T_i, F] (e.g. the real-time decoder's rates of each bin).
        behaviour: per trial [T_i, D] (e.g. hand velocity).
        lags: candidate lags in bins (behaviour_t from features_{t - lag}).
        alphas: candidate ridge penalties (on the centred problem; the intercept is free).
        folds: K of the cross-validation (whole trials per fold).
        seed: seed of the assignment of trials to folds.

    Returns:
        The LinearFit refitted on all trials with the best (lag, alpha).

    Raises:
        ValueError: fewer trials than folds, no valid pairs, or bad candidates.
    """
    return _cross_validated(features, behaviour, ridge, "ridge", lags, alphas, folds, seed)


def fit_ole(features: list[np.ndarray], behaviour: list[np.ndarray], *, lags=(0,),
            alphas=DEFAULT_ALPHAS, folds: int = 5, seed: int = 0, noise: str = "diagonal") -> LinearFit:
    """Optimal linear estimator (indirect OLE) with (lag, lambda) chosen by K-fold CV over trials.

    With v the behaviour at bin t and f the features at bin t - lag (means v0, f0 and standard
    deviations S = diag(s) over the training bins; u = S^-1 (v - v0), the behaviour in units of
    its standard deviation):

    1. encoding model, one least-squares regression per feature channel:
       f = f0 + B u + e, B [F, D];
    2. noise: Sigma = diag of the residuals' variances (noise="diagonal"), or the identity
       (noise="identity": the unweighted inversion, for comparison);
    3. inversion: v = v0 + W (f - f0) with W = S (B^T Sigma^-1 B + lambda I)^-1 B^T Sigma^-1.
       lambda has no units: W (f - f0) is the posterior mean of v under the Gaussian prior
       u ~ N(0, I / lambda) (lambda = 1: the behaviour's own variance; lambda -> 0: the plain
       OLE), pulled towards v0 as the ridge's penalty pulls it.

    The residual covariance is kept diagonal: an LFADS model's rates are smooth functions of a
    few factors, so the full covariance of N channels is close to singular and poorly
    estimated from a few trials, and its inverse would amplify exactly those errors.

    Args:
        features, behaviour, lags, folds, seed: as fit_ridge.
        alphas: candidate lambda (>= 0, as above).
        noise: "diagonal" or "identity".

    Returns:
        The LinearFit (method "ole", alpha = the chosen lambda) refitted on all trials.

    Raises:
        ValueError: as fit_ridge; an unknown noise; as many training bins as behaviour
            outputs + 1 or fewer (the encoding model has no residual left to weigh).
    """
    if noise not in OLE_NOISE:
        raise ValueError(f"noise must be one of {', '.join(OLE_NOISE)}, got {noise!r}")

    def solve(X, Y, lam):
        return _ole(X, Y, lam, weighted=noise == "diagonal")

    return _cross_validated(features, behaviour, solve, "ole", lags, alphas, folds, seed)


def _cross_validated(features, behaviour, solve, method, lags, alphas, folds, seed) -> LinearFit:
    """The (lag, penalty) of best K-fold CV R^2 over trials, refitted on all of them.

    solve(X [n, F], Y [n, D], penalty) -> (W [D, F], b [D]).
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
    if not alphas or not all(math.isfinite(a) and a >= 0 for a in alphas):
        penalty = "ridge penalties alpha" if method == "ridge" else "OLE penalties lambda"
        raise ValueError(f"alphas (the {penalty}) must be finite numbers >= 0, got {alphas}")
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
                W, b = solve(X[~test], Y[~test], alpha)
                preds[test] = X[test] @ W.T + b
            scores[(lag, alpha)] = r2_uniform(Y, preds)
    lag, alpha = max(scores, key=lambda k: -np.inf if np.isnan(scores[k]) else scores[k])
    X, Y, _ = lagged_pairs(features, behaviour, lag)
    W, b = solve(X, Y, alpha)
    return LinearFit(W, b, alpha, lag, scores[(lag, alpha)], method, scores)


def _ole(X, Y, lam, weighted):
    """Indirect OLE (fit_ole's steps 1-3): W [D, F], b [D] (float64)."""
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    n, D = Y.shape
    if n <= D + 1:
        raise ValueError(f"method ole needs more training bins than behaviour outputs + 1 "
                         f"(D + 1 = {D + 1}) to fit its encoding model, got {n} bins")
    mx, my = X.mean(axis=0), Y.mean(axis=0)
    sy = Y.std(axis=0)
    sy[sy == 0] = 1.0
    Xc, Ys = X - mx, (Y - my) / sy
    B = np.linalg.lstsq(Ys, Xc, rcond=None)[0].T                    # [F, D]
    if weighted:
        var = np.sum((Xc - Ys @ B.T) ** 2, axis=0) / (n - D - 1)    # unbiased, per channel
        var = np.maximum(var, NOISE_FLOOR * (var.mean() or 1.0))
    else:
        var = np.ones(X.shape[1])
    BtSi = B.T / var                                                 # B^T Sigma^-1 [D, F]
    W = sy[:, None] * np.linalg.lstsq(BtSi @ B + lam * np.eye(D), BtSi, rcond=None)[0]
    return W, my - W @ mx
