"""The Neural Latents Benchmark's evaluation: co-bps, fp-bps, velocity R^2 and PSTH R^2, on a
chosen split or by K-fold cross-validation over training trials, and NLB's smoothing baseline.

Every metric follows nlb_tools.evaluation (Pei et al. 2021), computed here with numpy alone:

- co-bps: bits per spike of the held-out neurons' rates over the encoder bins;
  fp-bps: bits per spike of all neurons over the forward-prediction bins
  (metrics.bits_per_spike; the null model is each neuron's mean count).
- velocity R^2: a ridge regression from the rates of held-in and held-out neurons at bin t to
  the behaviour at bin t, fitted on the training trials, scored on the evaluation trials
  (R^2 averaged over the behaviour's columns). Its penalty is chosen among ALPHAS by a
  5-fold cross-validation over the training rows, the folds contiguous and in order
  (scikit-learn's GridSearchCV(Ridge(), {'alpha': ALPHAS}) as nlb_tools runs it), and the
  model refitted on all rows with the best one. Rows whose behaviour is NaN are left out.
  NLB's tensors store the behaviour already shifted by the dataset's lag (120 ms for the
  maze datasets), so the rates at bin t are regressed on the stored behaviour at bin t;
  ``lag_bins`` shifts unshifted behaviour the same way.
- PSTH R^2: the rates averaged over each condition's trials against the condition's PSTH,
  R^2 per neuron over all conditions and bins, averaged over neurons
  (nlb_tools.evaluation.eval_psth). NLB's targets are its own PSTHs; from condition ids,
  condition_psths builds them as the mean over the condition's trials of Gaussian-smoothed
  counts.

Shapes: rates and spikes [B, T, N], expected counts per bin and counts; behaviour [B, T, D].
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import h5py
import numpy as np

from . import metrics

__all__ = [
    "ALPHAS", "INNER_FOLDS", "SMOOTHING_KERN_SD_MS", "SMOOTHING_ALPHA", "DATASETS",
    "RidgeFit", "NLBTensors", "FoldResult", "Scores",
    "ridge_cv", "velocity_r2", "psth_r2", "condition_psths", "kfold_indices",
    "smoothing_rates", "poisson_glm", "gaussian_window_smooth",
    "read_nlb_tensors", "score", "score_posterior", "write_submission", "fold_dataset",
    "cross_validate", "smoothing_scores", "evaluate_files", "epoch_metrics", "check_epoch_eval",
]

# nlb_tools.evaluation.fit_and_eval_decoder's grid of ridge penalties and its inner folds.
ALPHAS = np.logspace(-4, 0, 9)
INNER_FOLDS = 5
# NLB's smoothing baseline for mc_maze_small (examples/baselines/smoothing): a Gaussian kernel
# of 60 ms standard deviation, 6 standard deviations wide, and a Poisson GLM with L2 penalty
# 0.1 from log(smoothed held-in counts + 1e-4) to each held-out neuron.
SMOOTHING_KERN_SD_MS = 60.0
SMOOTHING_ALPHA = 0.1
SMOOTHING_LOG_OFFSET = 1e-4
# Datasets of the benchmark (EvalAI's group names) and the bin sizes it scores.
DATASETS = ("mc_maze", "mc_rtt", "area2_bump", "dmfc_rsg", "mc_maze_large", "mc_maze_medium",
            "mc_maze_small")
BIN_SIZES_MS = (5, 20)
# Newton iterations of the Poisson GLM stop when the largest step falls below this.
_GLM_TOL = 1e-8
_GLM_MAX_ITER = 100


@dataclass
class RidgeFit:
    """A ridge regression chosen by inner cross-validation.

    Attributes:
        r2: R^2 on the evaluation rows, averaged over the outputs.
        alpha: the penalty chosen.
        cv_r2: mean inner-validation R^2 of every penalty tried, [len(alphas)].
        coef: weights [D, N]; intercept [D].
        pred: predictions for the evaluation rows that were scored, [M, D].
    """

    r2: float
    alpha: float
    cv_r2: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    pred: np.ndarray


@dataclass
class Scores:
    """NLB's metrics of one set of evaluation rates (NaN where the data lack what one needs).

    Attributes:
        co_bps: held-out neurons, encoder bins.
        fp_bps: all neurons, forward-prediction bins.
        vel_r2: velocity decoding R^2 (ridge fitted on the training rates).
        psth_r2: rates against their condition's PSTH.
        bps: held-in neurons, encoder bins (not an NLB metric; how well the input is fit).
        alpha: the ridge penalty the velocity decoder chose.
    """

    co_bps: float = float("nan")
    fp_bps: float = float("nan")
    vel_r2: float = float("nan")
    psth_r2: float = float("nan")
    bps: float = float("nan")
    alpha: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class NLBTensors:
    """NLB's tensors of one split (nlb_tools' make_*_tensors layout), float32.

    Attributes:
        heldin: [B, T, N_in]; heldout: [B, T, N_out] or None (test phase).
        heldin_forward, heldout_forward: [B, T_f, N_in], [B, T_f, N_out] or None.
        behavior: [B, T, D] or None; conditions: condition id per trial [B] or None.
    """

    heldin: np.ndarray
    heldout: np.ndarray | None = None
    heldin_forward: np.ndarray | None = None
    heldout_forward: np.ndarray | None = None
    behavior: np.ndarray | None = None
    conditions: np.ndarray | None = None

    @property
    def n_trials(self) -> int:
        return int(self.heldin.shape[0])

    def take(self, idx) -> "NLBTensors":
        """The trials idx (an index array), same fields."""
        return NLBTensors(**{k: None if v is None else v[idx] for k, v in self.__dict__.items()})

    def recon(self) -> np.ndarray:
        """Held-in then held-out neurons, encoder then forward bins: [B, T + T_f, N_in + N_out]
        (the reconstruction target of lfads_fast's NLB layout)."""
        if self.heldout is None:
            raise ValueError("held-out spikes are missing (key *_spikes_heldout)")
        x = np.concatenate([self.heldin, self.heldout], axis=2)
        if self.heldin_forward is not None:
            x = np.concatenate([x, np.concatenate([self.heldin_forward, self.heldout_forward],
                                                  axis=2)], axis=1)
        return x


@dataclass
class FoldResult:
    """One fold of a cross-validation: its test trials and the scores of each method."""

    fold: int
    test_trials: list
    scores: dict = field(default_factory=dict)  # method -> Scores.to_dict()


# ---------------------------------------------------------------------- metrics


def ridge_cv(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, eval_y: np.ndarray,
             alphas=ALPHAS, n_folds: int = INNER_FOLDS) -> RidgeFit:
    """nlb_tools' decoder: ridge regression, penalty by inner K-fold CV, refit, R^2 on eval.

    Args:
        train_x, eval_x: inputs [M, N] (rows are bins of all trials, trial-major).
        train_y, eval_y: targets [M, D].
        alphas: penalties tried; n_folds: inner folds (contiguous, in order, the first
            M % n_folds of them one row longer).

    Returns:
        The fit (see RidgeFit); ties between penalties go to the first.
    """
    train_x, train_y, eval_x, eval_y = (np.asarray(a, dtype=np.float64)
                                        for a in (train_x, train_y, eval_x, eval_y))
    n = train_x.shape[0]
    if n < n_folds:
        raise ValueError(f"the decoder needs at least {n_folds} training rows, got {n}")
    bounds = np.cumsum([0] + [n // n_folds + (1 if i < n % n_folds else 0)
                              for i in range(n_folds)])
    cv = np.zeros(len(alphas))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        keep = np.ones(n, bool)
        keep[lo:hi] = False
        for a, alpha in enumerate(alphas):
            w, b = ridge(train_x[keep], train_y[keep], alpha)
            cv[a] += r2_uniform(train_y[lo:hi], train_x[lo:hi] @ w.T + b) / n_folds
    best = int(np.argmax(cv))
    w, b = ridge(train_x, train_y, alphas[best])
    pred = eval_x @ w.T + b
    return RidgeFit(r2_uniform(eval_y, pred), float(alphas[best]), cv, w, b, pred)


def velocity_r2(train_rates: np.ndarray, train_behavior: np.ndarray, eval_rates: np.ndarray,
                eval_behavior: np.ndarray, lag_bins: int = 0, alphas=ALPHAS) -> RidgeFit:
    """Velocity decoding R^2 as NLB scores it (see the module docstring).

    Args:
        train_rates, eval_rates: rates of held-in and held-out neurons [B, T, N].
        train_behavior, eval_behavior: behaviour [B, T, D] (NaN rows left out), already
            lagged as NLB's tensors are, unless lag_bins > 0: then rates at bin t are paired
            with the behaviour at bin t + lag_bins (the last lag_bins bins of each trial drop).

    Raises:
        ValueError: shapes differ (the message names the argument), or NaN rates at bins
            whose behaviour is scored.
    """
    pairs = (("train_rates", train_rates, "train_behavior", train_behavior),
             ("eval_rates", eval_rates, "eval_behavior", eval_behavior))
    flat = []
    for rname, r, bname, b in pairs:
        r, b = np.asarray(r, np.float64), np.asarray(b, np.float64)
        if r.ndim != 3 or b.ndim != 3 or r.shape[:2] != b.shape[:2]:
            raise ValueError(f"{rname} [trials, bins, neurons] and {bname} [trials, bins, dims] "
                             f"must agree in trials and bins, got {r.shape} and {b.shape}")
        if lag_bins:
            r, b = r[:, :-lag_bins], b[:, lag_bins:]
        r, b = r.reshape(-1, r.shape[2]), b.reshape(-1, b.shape[2])
        rows = ~np.isnan(b[:, 0])
        r, b = r[rows], b[rows]
        if np.isnan(r).any():
            raise ValueError(f"{rname} has NaN at bins whose behaviour is scored")
        flat += [r, b]
    if flat[0].shape[1] != flat[2].shape[1]:
        raise ValueError(f"train_rates has {flat[0].shape[1]} neurons but eval_rates "
                         f"{flat[2].shape[1]}")
    return ridge_cv(flat[0], flat[1], flat[2], flat[3], alphas)


def psth_r2(psth: np.ndarray, eval_rates: np.ndarray, cond_idx) -> float:
    """R^2 of condition-averaged rates against PSTHs (nlb_tools.evaluation.eval_psth, without
    jitter): the rates of each condition's trials are averaged, bins where the condition's
    PSTH is NaN (first neuron) left out, all conditions stacked, and R^2 taken per neuron and
    averaged over neurons.

    Args:
        psth: true PSTHs [C, T, N]; eval_rates: [B, T, N];
        cond_idx: C index arrays, the trials of each condition (empty ones are skipped).
    """
    psth = np.asarray(psth, np.float64)
    rates = np.asarray(eval_rates, np.float64)
    if psth.ndim != 3 or rates.ndim != 3 or psth.shape[1:] != rates.shape[1:]:
        raise ValueError(f"psth [conditions, bins, neurons] and eval_rates [trials, bins, "
                         f"neurons] must agree in bins and neurons, got {psth.shape} and "
                         f"{rates.shape}")
    if len(cond_idx) != psth.shape[0]:
        raise ValueError(f"cond_idx has {len(cond_idx)} conditions but psth {psth.shape[0]}")
    true, pred = [], []
    for c, idx in enumerate(cond_idx):
        idx = np.asarray(idx)
        if idx.size == 0:
            continue
        rows = ~np.isnan(psth[c, :, 0])
        mean = rates[idx].mean(axis=0)[rows]
        if np.isnan(mean).any():
            raise ValueError(f"eval_rates has NaN at bins the PSTH of condition {c} scores")
        true.append(psth[c][rows])
        pred.append(mean)
    if not true:
        raise ValueError("no condition has trials to score")
    return r2_uniform(np.vstack(true), np.vstack(pred))


def condition_psths(spikes: np.ndarray, conditions: np.ndarray, sigma_bins: float
                    ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """PSTHs from condition ids: per condition, the mean over its trials of Gaussian-smoothed
    counts (metrics.gaussian_smooth; NLB smooths the continuous recording before binning,
    which these tensors no longer hold).

    Args:
        spikes: counts [B, T, N]; conditions: condition id per trial [B].

    Returns:
        (psth float64 [C, T, N], the trials of each condition [C arrays], the ids [C]).
    """
    spikes = np.asarray(spikes)
    conditions = np.asarray(conditions).reshape(-1)
    if conditions.shape[0] != spikes.shape[0]:
        raise ValueError(f"conditions has {conditions.shape[0]} entries but spikes "
                         f"{spikes.shape[0]} trials")
    smooth = metrics.gaussian_smooth(spikes.astype(np.float64), sigma_bins, axis=1)
    ids = np.unique(conditions)
    idx = [np.nonzero(conditions == c)[0] for c in ids]
    return np.stack([np.nanmean(smooth[i], axis=0) for i in idx]), idx, ids


def kfold_indices(n_trials: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """Test trials of each of k folds: a seeded permutation cut into k near-equal parts."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= n_trials:
        raise ValueError(f"k must be an integer in [2, {n_trials}] (the trials), got {k!r}")
    perm = np.random.default_rng(seed).permutation(n_trials)
    return [np.sort(part) for part in np.array_split(perm, k)]


def score(rates: np.ndarray, data: NLBTensors, *, train_rates: np.ndarray | None = None,
          train_data: NLBTensors | None = None, psth: np.ndarray | None = None,
          lag_bins: int = 0) -> tuple[Scores, RidgeFit | None]:
    """NLB's metrics of evaluation rates.

    Args:
        rates: rates of the evaluation trials [B, T (+ T_f), N_in + N_out] (held-in then
            held-out neurons; forward bins after the encoder bins when present).
        data: the evaluation trials' tensors (held-out spikes for co-bps, forward spikes for
            fp-bps, behaviour for velocity R^2).
        train_rates, train_data: the same for the decoder's training trials (velocity R^2 is
            computed when both carry behaviour).
        psth: (PSTHs [C, T, N_in + N_out], the evaluation trials of each condition), e.g.
            from condition_psths; None: no PSTH R^2.
        lag_bins: see velocity_r2.

    Returns:
        (scores, the velocity decoder's fit or None).
    """
    rates = np.asarray(rates)
    n_in, T = data.heldin.shape[2], data.heldin.shape[1]
    _expect(rates, "rates", (data.n_trials, None, None), "the evaluation trials")
    if rates.shape[1] < T:
        raise ValueError(f"rates has {rates.shape[1]} bins but the data {T}")
    s = Scores()
    s.bps = metrics.bits_per_spike(rates[:, :T, :n_in], data.heldin)
    if data.heldout is not None:
        _expect(rates, "rates", (None, None, n_in + data.heldout.shape[2]),
                "held-in + held-out neurons")
        s.co_bps = metrics.bits_per_spike(rates[:, :T, n_in:], data.heldout)
    if data.heldin_forward is not None and data.heldout_forward is not None \
            and rates.shape[1] > T:
        fwd = np.concatenate([data.heldin_forward, data.heldout_forward], axis=2)
        _expect(rates, "rates", (None, T + fwd.shape[1], None), "encoder + forward bins")
        s.fp_bps = metrics.bits_per_spike(rates[:, T:], fwd)
    fit = None
    if train_rates is not None and train_data is not None and data.behavior is not None \
            and train_data.behavior is not None:
        fit = velocity_r2(np.asarray(train_rates)[:, :T], train_data.behavior, rates[:, :T],
                          data.behavior, lag_bins)
        s.vel_r2, s.alpha = fit.r2, fit.alpha
    if psth is not None:
        s.psth_r2 = psth_r2(psth[0], rates[:, :T], psth[1])
    return s, fit


def fold_dataset(tensors: NLBTensors, test: np.ndarray, valid_fraction: float = 0.2,
                 seed: int = 0):
    """The lfads_fast Dataset of one cross-validation fold.

    The fold's test trials form the test split (whole reconstruction target, never trained on
    or used for model selection); of the other trials, a seeded valid_fraction (at least one)
    is the validation split (learning-rate schedule, early stopping, best checkpoint), the
    rest the training split. Behaviour lands in each split's extra["behavior"].

    Returns:
        (dataset, train trial indices, valid trial indices), indices into tensors' trials.
    """
    from . import data as data_mod

    n = tensors.n_trials
    test = np.asarray(test)
    rest = np.setdiff1d(np.arange(n), test)
    n_valid = max(1, int(round(valid_fraction * rest.size)))
    if n_valid >= rest.size:
        raise ValueError(f"{rest.size} trials outside the test fold leave none for training")
    perm = np.random.default_rng(seed).permutation(rest)
    valid, train = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])
    recon = tensors.recon()
    extra = {}
    if tensors.behavior is not None:
        extra = {f"{s}_behavior": tensors.behavior[i] for s, i in
                 (("train", train), ("valid", valid), ("test", test))}
    ds = data_mod.from_arrays(tensors.heldin[train], tensors.heldin[valid],
                              train_recon_data=recon[train], valid_recon_data=recon[valid],
                              test_encod_data=tensors.heldin[test], test_recon_data=recon[test],
                              train_inds=train, valid_inds=valid, test_inds=test, extra=extra)
    return ds, train, valid


def cross_validate(tensors: NLBTensors, k: int, out_dir: str | os.PathLike, *,
                   model_fields: dict | None = None, train_fields: dict | None = None,
                   seed: int = 0, n_samples: int = 50, smoothing: bool = True,
                   valid_fraction: float = 0.2, psth_sigma_bins: float | None = None,
                   folds: list[int] | None = None, progress: bool = False,
                   log=print, fit_fold=None) -> dict:
    """K-fold cross-validation over trials: one LFADS model per fold, trained by the package
    (Trainer), scored on the fold's test trials with NLB's metrics; NLB's smoothing baseline
    in the same folds.

    The velocity decoder of a fold is fitted on the rates of its non-test trials (the model's
    posterior means over n_samples samples, or the baseline's rates) and scored on its test
    trials; PSTHs (with condition ids and psth_sigma_bins) come from the test trials.

    Args:
        tensors: the trials (NLBTensors with held-out spikes).
        k: folds; the test trials of fold i are kfold_indices(B, k, seed)[i].
        out_dir: fold i trains in out_dir/fold{i}; out_dir/cv.json gets the results.
        model_fields, train_fields: LFADSConfig / TrainConfig fields (data sizes come from
            the data).
        folds: which folds to run (None: all).
        fit_fold: how a fold's model is found: fit_fold(dataset, model_config, train_config, run_dir)
            returns an object with the attributes of train.FitResult that are scored here
            (best_checkpoint, epochs, best_epoch, stop_reason, divergences, train_seconds)
            and may carry more in its ``extra`` dict (stored with the fold's scores). None:
            one Trainer run (Trainer(...).fit()). A search (tune.cv_fit) is another.

    Returns:
        {"folds": [FoldResult as dict], "mean": {method: {metric: mean}}, "std": ...}.
    """
    from .model import LFADS
    from .posterior import sample_and_average
    from .train import Trainer, TrainConfig, config_for_data, load_model

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tests = kfold_indices(tensors.n_trials, k, seed)
    results = []
    for i in (range(k) if folds is None else folds):
        test = tests[i]
        ds, train, valid = fold_dataset(tensors, test, valid_fraction, seed + i)
        fit_idx = np.sort(np.concatenate([train, valid]))
        psth = None
        test_data, fit_data = tensors.take(test), tensors.take(fit_idx)
        if psth_sigma_bins is not None and tensors.conditions is not None:
            psth = condition_psths(np.concatenate([test_data.heldin, test_data.heldout], 2),
                                   test_data.conditions, psth_sigma_bins)[:2]
        fold = FoldResult(i, test.tolist())
        cfg = config_for_data(ds, **(model_fields or {}))
        tcfg = TrainConfig.from_dict({"seed": seed + i, **(train_fields or {})})
        run_dir = os.path.join(out_dir, f"fold{i}")
        if fit_fold is None:
            res = Trainer(LFADS(cfg, seed=tcfg.seed), ds, tcfg, run_dir,
                          progress=progress).fit()
        else:
            res = fit_fold(ds, cfg, tcfg, run_dir)
        model = load_model(res.best_checkpoint)
        rates = {name: sample_and_average(model, tensors.heldin[idx], n_samples=n_samples,
                                          seed=seed + i)["output_params"]
                 for name, idx in (("test", test), ("fit", fit_idx))}
        s, fit = score(rates["test"], test_data, train_rates=rates["fit"], train_data=fit_data,
                       psth=psth)
        if fit is not None and not results:
            from . import plots

            plots.plot_decoded_velocity(
                os.path.join(out_dir, "velocity.png"), *_decoded_trials(test_data.behavior, fit),
                title=f"fold {i}: LFADS velocity R^2 {s.vel_r2:.3f} (test trials)")
        fold.scores["lfads"] = {**s.to_dict(), "epochs": res.epochs,
                                "best_epoch": res.best_epoch, "stop_reason": res.stop_reason,
                                "divergences": res.divergences,
                                "train_seconds": res.train_seconds,
                                **dict(getattr(res, "extra", None) or {})}
        if smoothing:
            fold.scores["smoothing"] = smoothing_scores(fit_data, test_data, psth).to_dict()
        results.append(fold)
        log(f"fold {i}: " + "; ".join(
            f"{m} co-bps {v['co_bps']:.4f} vel R2 {v['vel_r2']:.4f} fp-bps {v['fp_bps']:.4f}"
            for m, v in fold.scores.items()))
    summary = _summarise(results)
    write_json(os.path.join(out_dir, "cv.json"), summary)
    return summary


def smoothing_scores(fit_data: NLBTensors, test_data: NLBTensors, psth=None, **kwargs) -> Scores:
    """NLB's metrics of the smoothing baseline (smoothing_rates, fitted on fit_data's trials)
    on test_data's trials; kwargs go to smoothing_rates."""
    fit_rates, test_rates = smoothing_rates(fit_data, test_data, **kwargs)
    return score(test_rates, test_data, train_rates=fit_rates, train_data=fit_data, psth=psth)[0]


def _summarise(results: list[FoldResult]) -> dict:
    methods = sorted({m for r in results for m in r.scores})
    mean, std = {}, {}
    for m in methods:
        rows = [r.scores[m] for r in results if m in r.scores]
        keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and k != "stop_reason"]
        mean[m], std[m] = {}, {}
        for k in keys:
            values = np.array([row[k] for row in rows], np.float64)
            values = values[np.isfinite(values)]  # fp-bps of the baseline: none
            mean[m][k] = float(values.mean()) if values.size else float("nan")
            std[m][k] = float(values.std()) if values.size else float("nan")
    return {"folds": [asdict(r) for r in results], "mean": mean, "std": std}


def check_epoch_eval(dataset, key: str = "behavior") -> None:
    """Checks that a dataset supports epoch_metrics (Trainer with vel_r2_every > 0).

    Raises:
        ValueError: a split lacks extra[key] (the file's {train,valid}_behavior, NLB's
            {train,eval}_behavior), or its shape is not [trials, encoder bins, dims].
    """
    for name in ("train", "valid"):
        split = dataset.splits[name]
        b = split.extra.get(key)
        prefix = "eval" if getattr(dataset, "layout", "") == "nlb" and name == "valid" else name
        if b is None:
            raise ValueError(f"vel_r2_every needs behaviour in both splits: {prefix}_{key} is "
                             f"missing from {dataset.source}")
        want = split.encod_data.shape[:2]
        if np.ndim(b) != 3 or np.shape(b)[:2] != want:
            raise ValueError(f"{prefix}_{key} has shape {np.shape(b)}, expected ({want[0]}, "
                             f"{want[1]}, dims) (trials and encoder bins of the spikes)")


def epoch_metrics(model, dataset, key: str = "behavior", chunk: int = 512) -> dict:
    """The velocity R^2 of the validation split that Trainer logs every vel_r2_every epochs:
    NLB's ridge decoder fitted on the training trials' rates and scored on the validation
    trials' (posterior means, encoder bins, held-in and held-out neurons).

    Returns:
        {"valid_vel_r2": R^2, "vel_alpha": the penalty chosen}.
    """
    T = model.config.encod_seq_len
    rates = []
    for split in (dataset.train, dataset.valid):
        parts = []
        for start in range(0, split.n_trials, chunk):
            sl = slice(start, start + chunk)
            ext = None if split.ext_input is None else split.ext_input[sl]
            parts.append(model.forward(split.encod_data[sl], ext,
                                       outputs="output_params")["output_params"][:, :T])
        rates.append(np.concatenate(parts))
    fit = velocity_r2(rates[0], dataset.train.extra[key], rates[1], dataset.valid.extra[key])
    return {"valid_vel_r2": fit.r2, "vel_alpha": fit.alpha}


# ---------------------------------------------------------------------- smoothing baseline


def gaussian_window_smooth(spikes: np.ndarray, kern_sd_bins: float) -> np.ndarray:
    """NLB's smoothing: np.convolve 'same' along time with a normalised Gaussian window of
    int(6 sd) points (zero beyond the trial's edges, as in nlb_tools' baseline)."""
    sd = int(kern_sd_bins)
    if sd < 1:
        raise ValueError(f"kern_sd_bins must be >= 1, got {kern_sd_bins}")
    n = int(6 * kern_sd_bins)
    t = np.arange(n) - (n - 1) / 2.0
    window = np.exp(-0.5 * (t / sd) ** 2)
    window /= window.sum()
    x = np.asarray(spikes, np.float64)
    # 'same' keeps the centre of the full convolution: output bin i is full bin i + (n-1)//2.
    T = x.shape[1]
    full = np.zeros((x.shape[0], T + n - 1, x.shape[2]))
    for j, w in enumerate(window):
        full[:, j:j + T] += w * x
    start = (n - 1) // 2
    return full[:, start:start + T]


def poisson_glm(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """L2-penalised Poisson regression with a log link, one output per column of y, by
    Newton's method: minimises mean(mu - y log mu) + alpha / 2 |w|^2 (the intercept is not
    penalised; scikit-learn's PoissonRegressor objective).

    Args:
        x: inputs [M, P]; y: counts [M, K].

    Returns:
        (weights [K, P], intercepts [K]).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    m, p = x.shape
    xa = np.concatenate([x, np.ones((m, 1))], axis=1)
    penalty = np.full(p + 1, alpha)
    penalty[-1] = 0.0
    coefs = np.zeros((y.shape[1], p + 1))
    for k in range(y.shape[1]):
        beta = np.zeros(p + 1)
        beta[-1] = np.log(max(y[:, k].mean(), 1e-10))
        for _ in range(_GLM_MAX_ITER):
            mu = np.exp(np.clip(xa @ beta, -50, 50))
            grad = xa.T @ (mu - y[:, k]) / m + penalty * beta
            hess = (xa * mu[:, None]).T @ xa / m + np.diag(penalty)
            step = np.linalg.solve(hess, grad)
            beta -= step
            if np.max(np.abs(step)) < _GLM_TOL:
                break
        coefs[k] = beta
    return coefs[:, :-1], coefs[:, -1]


def smoothing_rates(train: NLBTensors, test: NLBTensors, bin_ms: float = 5.0,
                    kern_sd_ms: float = SMOOTHING_KERN_SD_MS,
                    alpha: float = SMOOTHING_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """NLB's smoothing baseline: held-in rates are the smoothed held-in counts; held-out rates
    a Poisson GLM (fitted on the training trials) of log(smoothed held-in + 1e-4).

    Returns:
        (train rates, test rates), each [B, T, N_in + N_out], clipped to [1e-9, 1e20] as NLB.
    """
    if train.heldout is None:
        raise ValueError("the smoothing baseline needs the training trials' held-out spikes")
    sd = kern_sd_ms / bin_ms
    out = []
    smoothed = [gaussian_window_smooth(d.heldin, sd) for d in (train, test)]
    n_in = train.heldin.shape[2]
    w, b = poisson_glm(np.log(smoothed[0].reshape(-1, n_in) + SMOOTHING_LOG_OFFSET),
                       train.heldout.reshape(-1, train.heldout.shape[2]), alpha)
    for s in smoothed:
        logs = np.log(s.reshape(-1, n_in) + SMOOTHING_LOG_OFFSET)
        heldout = np.clip(np.exp(logs @ w.T + b), 1e-9, 1e20).reshape(s.shape[:2] + (-1,))
        out.append(np.concatenate([s, heldout], axis=2))
    return out[0], out[1]


# ---------------------------------------------------------------------- files


def read_nlb_tensors(path: str | os.PathLike, conditions_key: str | None = None
                     ) -> dict[str, NLBTensors]:
    """Reads an NLB tensor file: its train and (when present) eval splits.

    Args:
        path: HDF5 with {train,eval}_spikes_heldin, *_spikes_heldout, *_spikes_held{in,out}_
            forward, *_behavior (nlb_tools' make_*_tensors keys), at the top or in one group
            named after the dataset.
        conditions_key: the name (without the split prefix) of a per-trial condition-id array,
            e.g. "condition" for train_condition; None: none.

    Returns:
        {"train": NLBTensors, "eval": NLBTensors (if present)}.

    Raises:
        ValueError: train_spikes_heldin missing, or shapes that disagree (naming the key).
    """
    path = os.fspath(path)
    with h5py.File(path, "r") as f:
        group = f
        if "train_spikes_heldin" not in f and len(f.keys()) == 1:
            group = f[next(iter(f.keys()))]
        arrays = {k: group[k][()] for k in group.keys() if isinstance(group[k], h5py.Dataset)}
    if "train_spikes_heldin" not in arrays:
        raise ValueError(f"{path}: required key train_spikes_heldin is missing (found "
                         f"{sorted(arrays)})")
    out = {}
    for prefix in ("train", "eval"):
        if f"{prefix}_spikes_heldin" not in arrays:
            continue

        def get(name, prefix=prefix):
            v = arrays.get(f"{prefix}_{name}")
            return None if v is None else np.asarray(v, np.float32)

        t = NLBTensors(get("spikes_heldin"), get("spikes_heldout"), get("spikes_heldin_forward"),
                       get("spikes_heldout_forward"), get("behavior"))
        if conditions_key is not None:
            key = f"{prefix}_{conditions_key}"
            if key not in arrays:
                raise ValueError(f"{path}: condition ids {key} are missing (found {sorted(arrays)})")
            t.conditions = np.asarray(arrays[key]).reshape(-1)
        _check_tensors(path, prefix, t)
        out[prefix] = t
    return out


def score_posterior(posterior: dict, tensors: dict[str, NLBTensors], *, eval_split: str = "valid",
                    fit_split: str = "train", psth_sigma_bins: float | None = None,
                    lag_bins: int = 0) -> tuple[Scores, RidgeFit | None, np.ndarray | None]:
    """NLB's metrics of a posterior file's rates against the data's tensors.

    Args:
        posterior: read_posterior_h5's dict ({split}_output_params ...).
        tensors: read_nlb_tensors' dict; NLB's "eval" split is lfads_fast's "valid".
        eval_split, fit_split: posterior splits scored and used to fit the velocity decoder.
        psth_sigma_bins: with condition ids in the data, the smoothing of condition_psths
            (None: no PSTH R^2).

    Returns:
        (scores, velocity fit or None, the PSTH targets or None).

    Raises:
        ValueError: a split or key is missing, or shapes disagree (naming the key).
    """
    by_name = {"train": "train", "valid": "eval", "eval": "eval", "test": "eval"}

    def pair(split):
        key = f"{split}_output_params"
        if key not in posterior:
            raise ValueError(f"the posterior has no {key} (found {sorted(posterior)})")
        which = by_name.get(split)
        if which not in tensors:
            raise ValueError(f"the data have no {which}_spikes_heldin for the posterior's "
                             f"{split} split")
        rates, data = np.asarray(posterior[key]), tensors[which]
        # NLB's eval inputs of the test phase lack the held-out and forward pieces: their
        # sizes are the train split's.
        sized = data if data.heldout is not None else tensors.get("train", data)
        n_out = 0 if sized.heldout is None else sized.heldout.shape[2]
        n_fwd = 0 if sized.heldin_forward is None else sized.heldin_forward.shape[1]
        want = (data.n_trials, data.heldin.shape[1], data.heldin.shape[2] + n_out)
        if rates.shape[0] != want[0] or rates.shape[2] != want[2] \
                or rates.shape[1] not in (want[1], want[1] + n_fwd):
            raise ValueError(f"{key} has shape {rates.shape} but the data's {which} split needs "
                             f"({want[0]}, {want[1]} or {want[1] + n_fwd}, {want[2]}) "
                             f"(trials, bins, held-in + held-out neurons)")
        return rates, data

    rates, data = pair(eval_split)
    train_rates = train_data = None
    if fit_split != eval_split:
        train_rates, train_data = pair(fit_split)
    psth = None
    if psth_sigma_bins is not None:
        if data.conditions is None:
            raise ValueError("PSTH R^2 needs condition ids (--conditions KEY)")
        psth = condition_psths(np.concatenate([data.heldin, data.heldout], axis=2),
                               data.conditions, psth_sigma_bins)[:2]
    s, fit = score(rates, data, train_rates=train_rates, train_data=train_data, psth=psth,
                   lag_bins=lag_bins)
    return s, fit, psth


def evaluate_files(posterior_path: str | os.PathLike, data_path: str | os.PathLike,
                   out_dir: str | os.PathLike | None = None, *, eval_split: str = "valid",
                   fit_split: str = "train", conditions_key: str | None = None,
                   psth_sigma_bins: float = 10.0, lag_bins: int = 0,
                   dt: float | None = None) -> dict:
    """nlb-eval on files: NLB's metrics of a posterior file against an NLB tensor file, with
    out_dir/nlb_eval.json and the figures velocity.png (decoded against true velocity) and,
    with condition ids, psth.png (condition-averaged rates against PSTHs).

    Returns:
        The metrics (Scores.to_dict()) plus the files written.
    """
    from . import data as data_mod
    from . import plots

    posterior = data_mod.read_posterior_h5(posterior_path)
    tensors = read_nlb_tensors(data_path, conditions_key)
    s, fit, psth = score_posterior(posterior, tensors, eval_split=eval_split,
                                   fit_split=fit_split,
                                   psth_sigma_bins=psth_sigma_bins if conditions_key else None,
                                   lag_bins=lag_bins)
    result = {**s.to_dict(), "eval_split": eval_split, "fit_split": fit_split, "files": []}
    if out_dir is None:
        return result
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    data = tensors["eval" if eval_split != "train" else "train"]
    rates = np.asarray(posterior[f"{eval_split}_output_params"])
    if fit is not None:
        result["files"].append(plots.plot_decoded_velocity(
            os.path.join(out_dir, "velocity.png"), *_decoded_trials(data.behavior, fit, lag_bins),
            dt=dt, title=f"velocity R^2 {s.vel_r2:.3f} ({eval_split} trials)"))
    if psth is not None:
        result["files"].append(plots.plot_condition_rates(
            os.path.join(out_dir, "psth.png"), psth[0], rates[:, :data.heldin.shape[1]], psth[1],
            dt=dt, title=f"PSTH R^2 {s.psth_r2:.3f}: condition-averaged rates (solid), PSTHs "
            "(dashed)"))
    path = os.path.join(out_dir, "nlb_eval.json")
    result["files"].append(path)
    write_json(path, result)
    return result


def _decoded_trials(behavior: np.ndarray, fit: RidgeFit, lag_bins: int = 0):
    """(true, decoded) behaviour [B, T', D] from a velocity fit, NaN where it was not scored."""
    b = np.asarray(behavior, np.float64)
    if lag_bins:
        b = b[:, lag_bins:]
    decoded = np.full(b.shape, np.nan)
    flat = decoded.reshape(-1, b.shape[2])
    flat[~np.isnan(b.reshape(-1, b.shape[2])[:, 0])] = fit.pred
    return b, flat.reshape(b.shape)


def write_submission(path: str | os.PathLike, posterior: dict, n_heldin: int, dataset_name: str,
                     bin_size_ms: int = 5, n_encod_bins: int | None = None,
                     eval_split: str = "valid") -> str:
    """Writes the EvalAI submission file of a posterior (nlb_tools' layout).

    One group per dataset, named dataset_name plus '_20' for 20 ms bins, holding
    train_rates_heldin, train_rates_heldout, eval_rates_heldin, eval_rates_heldout and, when
    the posterior has forward-prediction bins, eval_rates_heldin_forward and
    eval_rates_heldout_forward: expected counts per bin, float32. An existing file gains or
    replaces that group (one file holds several datasets' submissions).

    Args:
        posterior: read_posterior_h5's dict with train_output_params and
            {eval_split}_output_params, [B, T (+ T_f), N_in + N_out].
        n_heldin: held-in neurons N_in (the first N_in columns of the rates).
        n_encod_bins: T; None: all bins of the rates are encoder bins.
    """
    if dataset_name not in DATASETS:
        raise ValueError(f"dataset_name must be one of {', '.join(DATASETS)}, got {dataset_name!r}")
    if bin_size_ms not in BIN_SIZES_MS:
        raise ValueError(f"bin_size_ms must be 5 or 20, got {bin_size_ms!r}")
    group = dataset_name + ("" if bin_size_ms == 5 else f"_{bin_size_ms}")
    out = {}
    for prefix, split in (("train", "train"), ("eval", eval_split)):
        key = f"{split}_output_params"
        if key not in posterior:
            raise ValueError(f"the posterior has no {key} (found {sorted(posterior)})")
        r = np.asarray(posterior[key], np.float32)
        if r.ndim != 3 or not 0 < n_heldin < r.shape[2]:
            raise ValueError(f"{key} has shape {r.shape}: expected [trials, bins, neurons] with "
                             f"more than n_heldin = {n_heldin} neurons")
        T = r.shape[1] if n_encod_bins is None else n_encod_bins
        if not 0 < T <= r.shape[1]:
            raise ValueError(f"n_encod_bins = {T} but {key} has {r.shape[1]} bins")
        out[f"{prefix}_rates_heldin"] = r[:, :T, :n_heldin]
        out[f"{prefix}_rates_heldout"] = r[:, :T, n_heldin:]
        if prefix == "eval" and r.shape[1] > T:
            out["eval_rates_heldin_forward"] = r[:, T:, :n_heldin]
            out["eval_rates_heldout_forward"] = r[:, T:, n_heldin:]
    path = os.fspath(path)
    with h5py.File(path, "a") as f:
        if group in f:
            del f[group]
        g = f.create_group(group)
        for k, v in out.items():
            g.create_dataset(k, data=np.ascontiguousarray(v))
    return path


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """JSON with NaN written as null."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (float, np.floating)):
            return None if not np.isfinite(v) else float(v)
        if isinstance(v, np.integer):
            return int(v)
        return v
    with open(path, "w") as f:
        json.dump(clean(payload), f, indent=2)


# ---------------------------------------------------------------------- helpers


def ridge(x, y, alpha):
    """Ridge with an unpenalised intercept (centred data, normal equations; least squares, so
    alpha = 0 on collinear features still gives the minimum-norm solution), in float64:
    W [D, F], b [D]."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xm, ym = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - xm, y - ym
    gram = xc.T @ xc
    gram[np.diag_indices_from(gram)] += alpha
    w = np.linalg.lstsq(gram, xc.T @ yc, rcond=None)[0].T
    return w, ym - xm @ w.T


def r2_uniform(y, pred) -> float:
    """R^2 of each column, averaged (scikit-learn's r2_score, multioutput uniform_average)."""
    ss_res = ((y - pred) ** 2).sum(axis=0)
    ss_tot = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.where(ss_res == 0, 1.0, 0.0))
    return float(r2.mean())


def _expect(a, name, shape, what):
    for got, want in zip(a.shape, shape):
        if want is not None and got != want:
            raise ValueError(f"{name} has shape {a.shape}; expected {shape} ({what}; None: any)")
    if a.ndim != len(shape):
        raise ValueError(f"{name} must have {len(shape)} dimensions, got shape {a.shape}")


def _check_tensors(path, prefix, t: NLBTensors) -> None:
    B, T, n_in = t.heldin.shape
    checks = {"spikes_heldout": (t.heldout, (B, T, None)),
              "spikes_heldin_forward": (t.heldin_forward, (B, None, n_in)),
              "behavior": (t.behavior, (B, T, None))}
    if t.heldout is not None:
        tf = None if t.heldin_forward is None else t.heldin_forward.shape[1]
        checks["spikes_heldout_forward"] = (t.heldout_forward, (B, tf, t.heldout.shape[2]))
    for name, (a, want) in checks.items():
        if a is None:
            continue
        if a.ndim != 3 or any(w is not None and g != w for g, w in zip(a.shape, want)):
            raise ValueError(f"{path}: {prefix}_{name} has shape {a.shape}, expected "
                             f"{tuple('*' if w is None else w for w in want)} to match "
                             f"{prefix}_spikes_heldin {t.heldin.shape}")
    if (t.heldin_forward is None) != (t.heldout_forward is None) and t.heldout is not None:
        raise ValueError(f"{path}: {prefix}_spikes_heldin_forward and "
                         f"{prefix}_spikes_heldout_forward go together")
    if t.conditions is not None and t.conditions.shape[0] != B:
        raise ValueError(f"{path}: the condition ids have {t.conditions.shape[0]} entries but "
                         f"{prefix}_spikes_heldin {B} trials")
