"""Metrics and baselines: R^2, bits per spike (NLB), smoothing and PCA."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lfads_fast import metrics, synth

# Sums of a few thousand float64 terms: agreement to rounding.
EXACT = 1e-10


@pytest.fixture
def rng():
    return np.random.default_rng(99)


@pytest.fixture(scope="module")
def rnn():
    return synth.chaotic_rnn(n_conditions=40, trials_per_condition=5, train_per_condition=4)


def _nlb_bits_per_spike(rates, spikes):
    """NLB's formula written out, with the log-factorial term kept."""
    rates, spikes = np.asarray(rates, float), np.asarray(spikes, float)
    keep = ~np.isnan(spikes)
    null = np.broadcast_to(np.nanmean(spikes, axis=(0, 1), keepdims=True), spikes.shape)

    def nll(r):
        r = np.where(r[keep] == 0, 1e-9, r[keep])
        y = spikes[keep]
        return np.sum(r - y * np.log(r) + np.vectorize(math.lgamma)(y + 1))

    return (nll(null) - nll(rates)) / np.nansum(spikes) / math.log(2)


# R^2 ---------------------------------------------------------------------------------------


def test_r2_of_truth_is_one_and_of_the_mean_is_zero(rnn):
    truth = rnn.valid.rates
    assert metrics.r2(truth, truth) == pytest.approx(1.0)
    assert metrics.r2(truth, truth, per_neuron=True) == pytest.approx(1.0)
    grand_mean = np.full_like(truth, truth.mean(dtype=np.float64))
    assert metrics.r2(grand_mean, truth) == pytest.approx(0.0, abs=1e-6)
    neuron_means = np.broadcast_to(truth.mean(axis=(0, 1), dtype=np.float64), truth.shape)
    assert metrics.r2(neuron_means, truth, per_neuron=True) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(metrics.r2_per_neuron(neuron_means, truth), 0.0, atol=1e-6)


def test_r2_known_values_and_pooling():
    target = np.array([[[0.0, 10.0], [2.0, 20.0]]])  # [1, 2, 2]
    pred = np.array([[[1.0, 10.0], [1.0, 30.0]]])
    # Neuron 0: residuals 1, 1 against a spread of 2; neuron 1: residuals 0, 100 against 50.
    np.testing.assert_allclose(metrics.r2_per_neuron(pred, target), [0.0, -1.0])
    assert metrics.r2(pred, target, per_neuron=True) == pytest.approx(-0.5)
    pooled = 1 - (1 + 0 + 1 + 100) / np.sum((target - target.mean()) ** 2)
    assert metrics.r2(pred, target) == pytest.approx(pooled, rel=EXACT)


def test_r2_skips_missing_targets_and_constant_neurons(rng):
    target = rng.uniform(size=(3, 8, 4))
    pred = target + 0.1 * rng.standard_normal(target.shape)
    holey = target.copy()
    holey[0, :4] = np.nan
    pred_garbage = pred.copy()
    pred_garbage[0, :4] = 1e6
    keep = ~np.isnan(holey)
    expected = 1 - np.sum((pred - target)[keep] ** 2) / np.sum(
        (target[keep] - target[keep].mean()) ** 2)
    assert metrics.r2(pred_garbage, holey) == pytest.approx(expected, rel=EXACT)
    target[..., 2] = 3.0
    per = metrics.r2_per_neuron(pred, target)
    assert np.isnan(per[2]) and np.isfinite(per[[0, 1, 3]]).all()
    assert metrics.r2(pred, target, per_neuron=True) == pytest.approx(per[[0, 1, 3]].mean())
    assert np.isnan(metrics.r2(pred, np.ones_like(pred)))


def test_r2_errors():
    with pytest.raises(ValueError, match=r"pred has shape \(2, 3\) but target has \(3, 2\)"):
        metrics.r2(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="pred has NaN at bins where target is observed"):
        metrics.r2(np.array([np.nan, 1.0]), np.array([1.0, 2.0]))


# Bits per spike ----------------------------------------------------------------------------


def test_error_by_time_locates_the_error_and_averages_to_one_minus_r2(rng):
    truth = rng.random((6, 7, 4))
    pred = truth.copy()
    pred[:, :2] += 0.5  # error only in the first two bins: segments [0, 2), [2, 4), [4, 7)
    seg = metrics.error_by_time(pred, truth, 3)
    var = truth.var()
    np.testing.assert_allclose(seg, [0.25 / var, 0.0, 0.0])
    noisy = truth + 0.1 * rng.standard_normal(truth.shape)
    seg = metrics.error_by_time(noisy, truth, 3)
    lengths = np.array([2, 2, 3])
    assert np.sum(seg * lengths) / 7 == pytest.approx(1 - metrics.r2(noisy, truth))
    assert metrics.error_by_time(noisy, truth, 1)[0] == pytest.approx(1 - metrics.r2(noisy, truth))
    assert metrics.error_by_time(noisy, truth, 7).shape == (7,)


def test_error_by_time_leaves_out_missing_targets(rng):
    truth = rng.random((5, 6, 3))
    pred = truth + 0.2
    truth[:, 3:] = np.nan  # the second segment has no observed entry
    truth[0, 0, 0] = np.nan
    pred[0, 0, 0] = 100.0  # not observed: not counted
    seg = metrics.error_by_time(pred, truth, 2)
    observed = truth[~np.isnan(truth)]
    assert seg[0] == pytest.approx(0.04 / observed.var())
    assert np.isnan(seg[1])


def test_error_by_time_errors(rng):
    x = rng.random((2, 5, 3))
    for bad in (0, 6, True, 2.0):
        with pytest.raises(ValueError, match="n_segments"):
            metrics.error_by_time(x, x, bad)
    with pytest.raises(ValueError, match=r"\[trials, bins, neurons\]"):
        metrics.error_by_time(x[0], x[0])
    with pytest.raises(ValueError, match="shape"):
        metrics.error_by_time(x, x[:, :4])


def test_bits_per_spike_of_truth_is_positive_and_of_the_mean_rate_model_zero(rnn):
    spikes, truth = rnn.valid.spikes, rnn.valid.rates
    assert metrics.bits_per_spike(truth, spikes) > 0.2
    mean_rates = np.broadcast_to(spikes.mean(axis=(0, 1), dtype=np.float64), spikes.shape)
    assert metrics.bits_per_spike(mean_rates, spikes) == pytest.approx(0.0, abs=EXACT)
    # A worse-than-constant prediction scores below zero.
    assert metrics.bits_per_spike(truth[::-1], spikes) < 0


def test_bits_per_spike_matches_the_nlb_formula(rng):
    rates = rng.gamma(2.0, 0.5, size=(5, 20, 6))
    spikes = rng.poisson(rates).astype(float)
    rates[0, 0, 0] = 0.0  # NLB replaces zero rates by 1e-9
    spikes[1, :3, 2] = np.nan
    assert metrics.bits_per_spike(rates, spikes) == pytest.approx(
        _nlb_bits_per_spike(rates, spikes), rel=1e-9)


def test_bits_per_spike_ignores_missing_bins(rng):
    rates = rng.gamma(2.0, 0.5, size=(4, 10, 3))
    spikes = rng.poisson(rates).astype(float)
    score = metrics.bits_per_spike(rates, spikes)
    padded_rates = np.concatenate([rates, np.full((4, 5, 3), np.nan)], axis=1)
    padded_spikes = np.concatenate([spikes, np.full((4, 5, 3), np.nan)], axis=1)
    assert metrics.bits_per_spike(padded_rates, padded_spikes) == pytest.approx(score, rel=EXACT)


def test_bits_per_spike_errors_and_no_spikes():
    spikes = np.ones((1, 2, 2))
    with pytest.raises(ValueError, match="rates are negative"):
        metrics.bits_per_spike(-spikes, spikes)
    with pytest.raises(ValueError, match="rates has NaN at bins where spikes is observed"):
        metrics.bits_per_spike(np.full_like(spikes, np.nan), spikes)
    with pytest.raises(ValueError, match="shape"):
        metrics.bits_per_spike(spikes[0], spikes)
    assert np.isnan(metrics.bits_per_spike(spikes, np.zeros_like(spikes)))


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.float64, (3, 4, 2), elements=st.floats(0.05, 5.0)),
       st.permutations(range(3)))
def test_bits_per_spike_does_not_depend_on_trial_order(rates, order):
    spikes = np.random.default_rng(0).poisson(rates).astype(float)
    assume(spikes.sum() > 0)
    order = list(order)
    assert metrics.bits_per_spike(rates[order], spikes[order]) == pytest.approx(
        metrics.bits_per_spike(rates, spikes), rel=1e-9, abs=1e-12)


def test_co_bps_and_fp_bps_score_the_right_block(rng):
    rates = rng.gamma(2.0, 0.5, size=(6, 15, 8))
    spikes = rng.poisson(rates).astype(float)
    heldout = np.array([5, 6, 7])
    assert metrics.co_bps(rates, spikes, heldout, encod_seq_len=12) == pytest.approx(
        metrics.bits_per_spike(rates[:, :12, 5:], spikes[:, :12, 5:]), rel=EXACT)
    assert metrics.co_bps(rates, spikes, heldout) == pytest.approx(
        metrics.bits_per_spike(rates[..., 5:], spikes[..., 5:]), rel=EXACT)
    assert metrics.fp_bps(rates, spikes, 12) == pytest.approx(
        metrics.bits_per_spike(rates[:, 12:], spikes[:, 12:]), rel=EXACT)


# Smoothing ---------------------------------------------------------------------------------


def test_gaussian_smooth_zero_width_is_the_identity(rng):
    x = rng.poisson(1.0, (2, 9, 3)).astype(np.float32)
    out = metrics.gaussian_smooth(x, 0)
    np.testing.assert_array_equal(out, x)
    assert out.dtype == np.float32 and out is not x


def test_gaussian_smooth_matches_np_convolve_away_from_edges(rng):
    x = rng.poisson(2.0, (1, 80, 2)).astype(float)
    sigma = 2.5
    taps = np.arange(-10, 11)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    out = metrics.gaussian_smooth(x, sigma)
    for n in range(2):
        reference = np.convolve(x[0, :, n], kernel, mode="same")
        np.testing.assert_allclose(out[0, 10:-10, n], reference[10:-10], rtol=1e-12)


def test_gaussian_smooth_keeps_constants_at_edges_and_fills_missing_bins():
    x = np.full((2, 30, 3), 4.0)
    x[0, 10:13, 1] = np.nan
    out = metrics.gaussian_smooth(x, 3.0)
    np.testing.assert_allclose(out, 4.0, rtol=1e-12)
    assert metrics.gaussian_smooth(np.full((1, 5, 1), np.nan), 1.0).shape == (1, 5, 1)
    assert np.isnan(metrics.gaussian_smooth(np.full((1, 5, 1), np.nan), 1.0)).all()


def test_gaussian_smooth_along_another_axis(rng):
    x = rng.poisson(1.0, (5, 12, 3)).astype(float)
    moved = metrics.gaussian_smooth(np.moveaxis(x, 1, 2), 2.0, axis=-1)
    np.testing.assert_allclose(np.moveaxis(moved, 2, 1), metrics.gaussian_smooth(x, 2.0))
    with pytest.raises(ValueError, match="sigma_bins"):
        metrics.gaussian_smooth(x, -1.0)


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 25),
                                        st.integers(1, 3)),
                  elements=st.floats(0, 20)),
       st.floats(0.3, 10.0))
def test_gaussian_smooth_is_a_local_average(x, sigma):
    out = metrics.gaussian_smooth(x, sigma)
    # Each output is a weighted mean of inputs of its own trace: within their range.
    assert np.all(out >= x.min(axis=1, keepdims=True) - 1e-9)
    assert np.all(out <= x.max(axis=1, keepdims=True) + 1e-9)


def test_best_smoothing_finds_the_right_width_on_known_signals(rng):
    t = np.arange(200)
    # A constant rate: more smoothing is always better.
    flat = np.full((50, 200, 2), 0.5)
    res = metrics.best_smoothing_r2(rng.poisson(flat).astype(float),
                                    flat + 0.01 * np.sin(t)[None, :, None])
    assert res.sigma_bins == max(metrics.DEFAULT_SIGMAS)
    # Noise-free counts: any smoothing only blurs.
    steps = np.repeat(np.where((t // 20) % 2 == 0, 1.0, 6.0)[None, :, None], 4, axis=0)
    assert metrics.best_smoothing_r2(steps, steps).sigma_bins == 0.0
    # A sinusoid under Poisson noise: the bias-variance optimum lies inside the grid. For
    # rate 5 + 4 sin(2 pi t / 50) the mean squared error (1 - a)^2 * 8 + 5 / (2 sigma
    # sqrt(pi)), with attenuation a = exp(-(2 pi sigma / 50)^2 / 2), is smallest at
    # sigma = 3.8 bins, between the grid's 3 and 4.
    wave = 5 + 4 * np.sin(2 * np.pi * t / 50)
    truth = np.broadcast_to(wave[None, :, None], (100, 200, 3))
    res = metrics.best_smoothing_r2(rng.poisson(truth).astype(float), truth)
    assert res.sigma_bins in (3.0, 4.0)
    assert res.r2_by_sigma[0.0] < res.r2 and res.r2_by_sigma[16.0] < res.r2


def test_best_smoothing_reports_on_the_evaluation_split(rnn):
    res = metrics.best_smoothing_r2(rnn.train.spikes, rnn.train.rates, sigmas=(1.0, 4.0, 16.0),
                                    eval_spikes=rnn.valid.spikes, eval_truth=rnn.valid.rates)
    expected = metrics.r2(metrics.gaussian_smooth(rnn.valid.spikes, res.sigma_bins),
                          rnn.valid.rates)
    assert res.r2 == pytest.approx(expected)
    assert res.r2_by_sigma[res.sigma_bins] == max(res.r2_by_sigma.values())
    with pytest.raises(ValueError, match="eval_spikes and eval_truth go together"):
        metrics.best_smoothing_r2(rnn.train.spikes, rnn.train.rates,
                                  eval_spikes=rnn.valid.spikes)
    with pytest.raises(ValueError, match="empty"):
        metrics.best_smoothing_r2(rnn.train.spikes, rnn.train.rates, sigmas=())


# PCA ---------------------------------------------------------------------------------------


def test_pca_recovers_low_rank_rates(rng):
    latents = rng.standard_normal((20, 30, 2))
    loading = rng.standard_normal((2, 6))
    rates = np.exp(0.3 * latents) @ np.abs(loading) + 1.0  # rank 3 with the mean, positive
    res = metrics.pca_of_smoothed(rates, 0.0, 3)
    np.testing.assert_allclose(res.rates, rates, rtol=1e-9)
    assert res.latents.shape == (20, 30, 3) and res.components.shape == (3, 6)
    np.testing.assert_allclose(res.components @ res.components.T, np.eye(3), atol=1e-12)
    assert res.explained_variance_ratio.sum() == pytest.approx(1.0)
    assert np.all(np.diff(res.explained_variance_ratio) <= 0)


def test_pca_baseline_beats_raw_spikes_and_clips_rates(rnn):
    res = metrics.pca_of_smoothed(rnn.valid.spikes, 4.0, 10, fit_spikes=rnn.train.spikes)
    assert res.rates.min() >= metrics.ZERO_RATE
    assert res.rates.shape == rnn.valid.spikes.shape
    assert metrics.r2(res.rates, rnn.valid.rates) > metrics.r2(rnn.valid.spikes,
                                                               rnn.valid.rates)
    assert metrics.bits_per_spike(res.rates, rnn.valid.spikes) > 0
    with pytest.raises(ValueError, match="n_components"):
        metrics.pca_of_smoothed(rnn.valid.spikes, 4.0, 51)


def test_pca_handles_missing_bins(rng):
    spikes = rng.poisson(1.0, (4, 10, 3)).astype(float)
    spikes[:, :, 0] = np.nan
    res = metrics.pca_of_smoothed(spikes, 1.0, 2)
    assert np.isfinite(res.rates).all()
