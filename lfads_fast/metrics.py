"""Metrics of inferred rates, and the smoothing and PCA baselines they are compared with.

Shapes: rates and spikes are [..., T, N] (usually [B, T, N]); rates are expected spike counts
per bin, spikes are counts with NaN marking missing bins. Everything is computed in float64.

Bits per spike follows the Neural Latents Benchmark (nlb_tools.evaluation): the Poisson
log-likelihood of the spikes under the rates minus that under a per-neuron constant rate
(each neuron's mean count over the bins evaluated), divided by the number of spikes, in bits.
Zero rates are replaced by 1e-9 as NLB does; NaN or negative rates at observed bins are an
error. co-bps scores held-out neurons, fp-bps forward-prediction bins (all neurons).

Smoothing and PCA use numpy only: a truncated Gaussian kernel applied as banded matrix
products along time, and np.linalg.svd.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# NLB's replacement for zero rate predictions (nlb_tools.evaluation.neg_log_likelihood).
ZERO_RATE = 1e-9
# Gaussian kernels are cut where the weight falls below exp(-8), 4 standard deviations out.
KERNEL_HALF_WIDTH_SIGMAS = 4.0
# Output bins smoothed per matrix product in gaussian_smooth.
_SMOOTH_BLOCK = 512
# Smoothing widths (standard deviations, in bins) searched by best_smoothing_r2.
DEFAULT_SIGMAS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)


@dataclass
class SmoothingResult:
    """The best Gaussian smoothing of spikes as an estimate of the true rates.

    Attributes:
        sigma_bins: the kernel standard deviation chosen, in bins.
        r2: R^2 against the truth at that width, on the evaluation split.
        r2_by_sigma: R^2 on the selection split for every width tried.
    """

    sigma_bins: float
    r2: float
    r2_by_sigma: dict[float, float]


@dataclass
class PCAResult:
    """Smoothed spikes reduced to their top principal components.

    Attributes:
        rates: reconstruction from the components, clipped to >= ZERO_RATE, expected counts
            per bin, [..., T, N].
        latents: projections on the components, [..., T, k].
        components: principal axes, rows of unit length, [k, N].
        mean: the smoothed counts' mean per neuron, [N].
        explained_variance_ratio: variance fraction of each component, [k].
    """

    rates: np.ndarray
    latents: np.ndarray
    components: np.ndarray
    mean: np.ndarray
    explained_variance_ratio: np.ndarray


def r2(pred: np.ndarray, target: np.ndarray, per_neuron: bool = False) -> float:
    """Coefficient of determination of predicted against true values.

    Args:
        pred: predictions, e.g. inferred rates, [..., N].
        target: true values, e.g. true rates, [..., N]; NaN entries are left out.
        per_neuron: False: one R^2 pooled over all bins and neurons (residuals against the
            grand mean). True: the mean over neurons of each neuron's R^2 (lfads-torch's
            r2_score), skipping neurons whose target is constant.

    Returns:
        R^2 (1: perfect; 0: no better than the mean); NaN when the target has no variance.
    """
    if per_neuron:
        values = r2_per_neuron(pred, target)
        defined = values[np.isfinite(values)]
        return float(defined.mean()) if defined.size else float("nan")
    p, t, observed = _paired(pred, target, "pred", "target")
    p, t = p[observed], t[observed]
    ss_tot = np.sum((t - t.mean()) ** 2) if t.size else 0.0
    if ss_tot == 0:
        return float("nan")
    return float(1.0 - np.sum((t - p) ** 2) / ss_tot)


def error_by_time(pred: np.ndarray, target: np.ndarray, n_segments: int = 10) -> np.ndarray:
    """Where in the trial the error sits: squared error per stretch of bins, as a fraction of
    the target's variance.

    The bins are split into n_segments consecutive stretches of (nearly) equal length; for
    each, the mean squared error over its trials, bins and neurons divided by the target's
    variance over everything (the pooled R^2's denominator), so that a segment's value is
    what it would make of 1 - R^2 if the whole trial erred as it does; the mean of the
    values, weighted by the stretches' observed entries, is 1 - r2(pred, target).

    Args:
        pred: predictions [B, T, N].
        target: true values [B, T, N]; NaN entries are left out.
        n_segments: number of stretches, 1 <= n_segments <= T.

    Returns:
        float64 [n_segments]; NaN for a stretch with no observed entry.
    """
    p, t, observed = _paired(pred, target, "pred", "target")
    if t.ndim != 3:
        raise ValueError(f"pred and target must be [trials, bins, neurons], got shape {t.shape}")
    n_bins = t.shape[1]
    if isinstance(n_segments, bool) or not isinstance(n_segments, (int, np.integer)) \
            or not 1 <= n_segments <= n_bins:
        raise ValueError(f"n_segments must be an integer in [1, {n_bins}] (the bins), "
                         f"got {n_segments!r}")
    mean = t[observed].mean() if observed.any() else np.nan
    var = ((t[observed] - mean) ** 2).mean() if observed.any() else np.nan
    sq = np.where(observed, (t - p) ** 2, 0.0).sum(axis=(0, 2))
    count = observed.sum(axis=(0, 2))
    edges = [i * n_bins // n_segments for i in range(n_segments + 1)]
    out = np.full(n_segments, np.nan)
    for i in range(n_segments):
        c = count[edges[i]:edges[i + 1]].sum()
        if c and var > 0:
            out[i] = sq[edges[i]:edges[i + 1]].sum() / c / var
    return out


def r2_per_neuron(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """R^2 of each neuron (last axis) over all its bins.

    Args:
        pred: predictions [..., N].
        target: true values [..., N]; NaN entries are left out.

    Returns:
        float64 [N]; NaN for neurons whose target is constant or missing.
    """
    p, t, observed = _paired(pred, target, "pred", "target")
    n_neurons = t.shape[-1]
    p, t, observed = (a.reshape(-1, n_neurons) for a in (p, t, observed))
    mean = np.where(observed, t, 0.0).sum(axis=0) / np.maximum(observed.sum(axis=0), 1)
    ss_tot = np.where(observed, (t - mean) ** 2, 0.0).sum(axis=0)
    ss_res = np.where(observed, (t - p) ** 2, 0.0).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.nan)


def bits_per_spike(rates: np.ndarray, spikes: np.ndarray) -> float:
    """Log-likelihood improvement over a per-neuron mean-rate model, in bits per spike (NLB).

    Args:
        rates: predicted expected counts per bin, [..., T, N], >= 0.
        spikes: observed counts, [..., T, N]; NaN bins are left out.

    Returns:
        bits per spike; 0 for the mean-rate model itself, NaN when no spike is observed.

    Raises:
        ValueError: shapes differ, or rates are NaN or negative at observed bins.
    """
    r, y, observed = _paired(rates, spikes, "rates", "spikes")
    if np.any(r[observed] < 0):
        raise ValueError("rates are negative at observed bins")
    count = observed.reshape(-1, y.shape[-1]).sum(axis=0)
    total = np.where(observed, y, 0.0).reshape(-1, y.shape[-1]).sum(axis=0)
    null = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    n_spikes = total.sum()
    if n_spikes == 0:
        return float("nan")
    null = np.broadcast_to(null, y.shape)[observed]
    gain = _poisson_log_likelihood(r[observed], y[observed]) - _poisson_log_likelihood(
        null, y[observed])
    return float(gain / n_spikes / np.log(2.0))


def co_bps(
    rates: np.ndarray,
    spikes: np.ndarray,
    heldout_neurons: np.ndarray,
    encod_seq_len: int | None = None,
) -> float:
    """Co-smoothing bits per spike: bits_per_spike on the held-out neurons only (NLB co-bps).

    Args:
        rates: predicted expected counts per bin, [B, T_r, N_r].
        spikes: observed counts, [B, T_r, N_r] (NaN = missing).
        heldout_neurons: indices of the held-out neurons along the last axis.
        encod_seq_len: score only bins before this one (leaving out forward-prediction bins,
            as NLB does); None: all bins.

    Returns:
        bits per spike of the held-out neurons.
    """
    bins = slice(None, encod_seq_len)
    cols = np.asarray(heldout_neurons)
    return bits_per_spike(np.asarray(rates)[:, bins][..., cols],
                          np.asarray(spikes)[:, bins][..., cols])


def fp_bps(rates: np.ndarray, spikes: np.ndarray, encod_seq_len: int) -> float:
    """Forward-prediction bits per spike: bits_per_spike on bins from encod_seq_len on, over
    held-in and held-out neurons together (NLB fp-bps).

    Args:
        rates: predicted expected counts per bin, [B, T_r, N_r].
        spikes: observed counts, [B, T_r, N_r] (NaN = missing).
        encod_seq_len: the first forward-prediction bin, T_e.

    Returns:
        bits per spike of the forward-prediction bins.
    """
    return bits_per_spike(np.asarray(rates)[:, encod_seq_len:],
                          np.asarray(spikes)[:, encod_seq_len:])


def gaussian_smooth(spikes: np.ndarray, sigma_bins: float, axis: int = -2) -> np.ndarray:
    """Smooths counts along time with a normalised Gaussian kernel.

    The kernel (standard deviation sigma_bins, cut at 4 standard deviations) is renormalised
    at every bin over the bins that exist and are observed, so the edges of a trial and NaN
    (missing) bins do not pull the estimate towards zero; the result estimates the expected
    count per bin.

    Args:
        spikes: counts, any shape, NaN = missing; time along ``axis``.
        sigma_bins: kernel standard deviation in bins; 0 returns the counts unchanged.
        axis: the time axis (default -2: [..., T, N]).

    Returns:
        Smoothed counts, same shape, float64 (float32 for float32 input); NaN where no
        observed bin lies within the kernel.
    """
    x = np.asarray(spikes)
    dtype = np.float32 if x.dtype == np.float32 else np.float64
    if sigma_bins < 0:
        raise ValueError(f"sigma_bins must be >= 0, got {sigma_bins}")
    if sigma_bins == 0:
        return x.astype(dtype, copy=True)
    x = np.moveaxis(x.astype(np.float64), axis, 0)
    shape = x.shape
    x = x.reshape(shape[0], -1)
    observed = ~np.isnan(x)
    filled = np.where(observed, x, 0.0)
    observed = observed.astype(np.float64)
    n_bins = shape[0]
    half = int(np.ceil(KERNEL_HALF_WIDTH_SIGMAS * sigma_bins))
    total = np.empty_like(filled)
    weight_sum = np.empty_like(filled)
    # Each block of output bins is one matrix product with the kernel weights of the input
    # bins it can reach, so the work runs in BLAS and memory stays bounded for long traces.
    for start in range(0, n_bins, _SMOOTH_BLOCK):
        stop = min(start + _SMOOTH_BLOCK, n_bins)
        lo, hi = max(start - half, 0), min(stop + half, n_bins)
        lag = np.arange(start, stop)[:, None] - np.arange(lo, hi)[None, :]
        kernel = np.where(np.abs(lag) <= half, np.exp(-0.5 * (lag / sigma_bins) ** 2), 0.0)
        total[start:stop] = kernel @ filled[lo:hi]
        weight_sum[start:stop] = kernel @ observed[lo:hi]
    out = np.full(filled.shape, np.nan)
    np.divide(total, weight_sum, out=out, where=weight_sum > 0)
    return np.moveaxis(out.reshape(shape), 0, axis).astype(dtype, copy=False)


def best_smoothing_r2(
    spikes: np.ndarray,
    truth: np.ndarray,
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS,
    eval_spikes: np.ndarray | None = None,
    eval_truth: np.ndarray | None = None,
    per_neuron: bool = False,
) -> SmoothingResult:
    """The Gaussian-smoothing baseline: the kernel width whose smoothed spikes best match the
    true rates on one split, scored on another.

    Args:
        spikes: counts of the selection split, [B, T, N].
        truth: true expected counts per bin of the selection split, [B, T, N].
        sigmas: kernel standard deviations to try, in bins.
        eval_spikes, eval_truth: the split to report R^2 on; None: the selection split.
        per_neuron: use the mean per-neuron R^2 instead of the pooled one (see r2).

    Returns:
        The chosen width, its R^2 on the evaluation split, and every width's R^2 on the
        selection split.
    """
    if not sigmas:
        raise ValueError("sigmas is empty")
    if (eval_spikes is None) != (eval_truth is None):
        raise ValueError("eval_spikes and eval_truth go together")
    scores = {float(s): r2(gaussian_smooth(spikes, s), truth, per_neuron) for s in sigmas}
    best = max(scores, key=lambda s: np.nan_to_num(scores[s], nan=-np.inf))
    if eval_spikes is None:
        return SmoothingResult(best, scores[best], scores)
    return SmoothingResult(best, r2(gaussian_smooth(eval_spikes, best), eval_truth,
                                    per_neuron), scores)


def pca_of_smoothed(
    spikes: np.ndarray,
    sigma_bins: float,
    n_components: int,
    fit_spikes: np.ndarray | None = None,
) -> PCAResult:
    """The PCA baseline: smooth, keep the top principal components, project back to rates.

    Args:
        spikes: counts to reduce, [..., T, N] (NaN = missing).
        sigma_bins: Gaussian smoothing width in bins (see gaussian_smooth).
        n_components: principal components kept, k <= N.
        fit_spikes: counts to find the components on, [..., T', N]; None: spikes.

    Returns:
        Rates reconstructed from k components (clipped to >= ZERO_RATE), the latents, the
        components, the mean and the explained variance ratios. Bins still missing after
        smoothing take their neuron's mean before projection.
    """
    spikes = np.asarray(spikes)
    n_neurons = spikes.shape[-1]
    if not 1 <= n_components <= n_neurons:
        raise ValueError(f"n_components must be in [1, {n_neurons}], got {n_components}")
    smoothed = _filled_rows(gaussian_smooth(spikes, sigma_bins).astype(np.float64))
    if fit_spikes is None:
        fit = smoothed
    else:
        fit = _filled_rows(gaussian_smooth(fit_spikes, sigma_bins).astype(np.float64))
    mean = fit.mean(axis=0)
    _, singular, vt = np.linalg.svd(fit - mean, full_matrices=False)
    components = vt[:n_components]
    variance = singular**2
    ratio = variance[:n_components] / variance.sum() if variance.sum() > 0 else np.zeros(
        n_components)
    latents = (smoothed - mean) @ components.T
    rates = np.maximum(latents @ components + mean, ZERO_RATE)
    lead = spikes.shape[:-1]
    return PCAResult(rates.reshape(lead + (n_neurons,)),
                     latents.reshape(lead + (n_components,)), components, mean, ratio)


# Helpers ----------------------------------------------------------------------------------


def _paired(pred, target, pred_name, target_name):
    """float64 copies of both, and where target is observed; checks shapes and NaNs."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"{pred_name} has shape {p.shape} but {target_name} has {t.shape}")
    observed = ~np.isnan(t)
    if np.isnan(p[observed]).any():
        raise ValueError(f"{pred_name} has NaN at bins where {target_name} is observed")
    return p, t, observed


def _poisson_log_likelihood(rates, counts):
    # The log(counts!) term is left out: it is the same for every model of the same counts
    # and cancels in bits_per_spike's difference.
    rates = np.where(rates == 0, ZERO_RATE, rates)
    return np.sum(counts * np.log(rates) - rates)


def _filled_rows(x):
    """[..., N] -> [M, N] with NaN entries replaced by their column's mean."""
    rows = x.reshape(-1, x.shape[-1])
    missing = np.isnan(rows)
    if missing.any():
        count = np.maximum((~missing).sum(axis=0), 1)
        column_mean = np.where(missing, 0.0, rows).sum(axis=0) / count
        rows = np.where(missing, column_mean, rows)
    return rows
