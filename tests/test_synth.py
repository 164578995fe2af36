"""Synthetic datasets: shapes, splits, ground truth, dynamics and reproducibility."""
import inspect

import h5py
import numpy as np
import pytest

from lfads_fast import synth

# Small sizes keep each generator call to a few milliseconds.
SMALL = dict(n_conditions=12, trials_per_condition=5, train_per_condition=4)
# Relative error allowed between truth written to a file and the rates (float32 scaling).
FILE_TRUTH_RTOL = 1e-6


def _rnn_latents(system, g, alpha, n_bins, x0):
    """Independent Euler integration of dx = alpha (-x + g W tanh(x)); tanh(x) per step."""
    x, out = x0.copy(), []
    for _ in range(n_bins):
        x = x + alpha * (-x + g * np.tanh(x) @ system["weights"].T)
        out.append(np.tanh(x))
    return np.stack(out, axis=1)


def test_chaotic_rnn_defaults_match_the_lfads_paper():
    defaults = {k: p.default for k, p in inspect.signature(synth.chaotic_rnn).parameters.items()}
    assert defaults["n_conditions"] == 400 and defaults["trials_per_condition"] == 10
    assert defaults["train_per_condition"] == 8 and defaults["n_units"] == 50
    assert defaults["g"] == 1.5 and defaults["tau"] == 0.025 and defaults["dt"] == 0.01
    assert defaults["n_bins"] == 100 and defaults["max_firing_rate"] == 30.0
    pulse = inspect.signature(synth.input_pulse).parameters
    assert pulse["g"].default == 2.5


def test_chaotic_rnn_shapes_splits_and_dtypes():
    d = synth.chaotic_rnn(**SMALL, n_bins=40)
    assert d.name == "chaotic_rnn" and d.dt == 0.01
    assert d.train.spikes.shape == (48, 40, 50) and d.valid.spikes.shape == (12, 40, 50)
    for s in (d.train, d.valid):
        assert s.spikes.dtype == np.float32 and s.rates.dtype == np.float32
        assert s.latents.shape == s.spikes.shape
        assert np.array_equal(s.spikes, np.round(s.spikes)) and s.spikes.min() >= 0
        assert np.array_equal(s.conditions, s.inds // 5)
        assert s.inputs is None and s.pulse_times is None
    assert np.array_equal(d.train.inds % 5, np.tile(np.arange(4), 12))
    assert np.array_equal(d.valid.inds % 5, np.full(12, 4))
    assert np.array_equal(np.sort(np.concatenate([d.train.inds, d.valid.inds])), np.arange(60))


def test_chaotic_rnn_rates_are_min_max_normalised_to_the_max_rate():
    d = synth.chaotic_rnn(**SMALL, max_firing_rate=40.0)
    rates = d.train.rates
    np.testing.assert_allclose(rates.min(axis=1), 0.0, atol=1e-7)
    np.testing.assert_allclose(rates.max(axis=1), 40.0 * 0.01, rtol=1e-6)
    assert d.conversion_factor == pytest.approx(1.0 / 0.4)


def test_chaotic_rnn_latents_follow_the_stated_equation():
    d = synth.chaotic_rnn(**SMALL, n_bins=30)
    x0 = d.system["x0"][d.train.conditions]
    expected = _rnn_latents(d.system, 1.5, 0.01 / 0.025, 30, x0)
    np.testing.assert_allclose(d.train.latents, expected, atol=1e-5)


def test_burn_in_starts_the_trials_later_on_the_same_trajectory():
    long = synth.chaotic_rnn(n_conditions=6, trials_per_condition=2, train_per_condition=1,
                             n_bins=40, seed=3)
    late = synth.chaotic_rnn(n_conditions=6, trials_per_condition=2, train_per_condition=1,
                             n_bins=30, seed=3, burn_in_bins=10)
    np.testing.assert_allclose(late.train.latents, long.train.latents[:, 10:], atol=1e-6)
    # The rates are normalised over the observed bins only, so they span [0, max] again.
    r = late.train.rates / late.train.rates.max(axis=1, keepdims=True)
    np.testing.assert_allclose(r.min(axis=1), 0, atol=1e-6)
    with pytest.raises(ValueError, match="burn_in_bins must be a non-negative integer"):
        synth.chaotic_rnn(n_conditions=2, burn_in_bins=-1)


def test_chaotic_rnn_is_chaotic():
    # Nearby initial states of the default network separate: the largest Lyapunov exponent
    # is positive (a decaying or periodic network would keep them at most as close).
    d = synth.chaotic_rnn(**SMALL)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((16, 50))
    warm = _rnn_latents(d.system, 1.5, 0.4, 200, x0)
    start = np.arctanh(warm[:, -1])
    nudge = 1e-6 * rng.standard_normal(start.shape)
    a = _rnn_latents(d.system, 1.5, 0.4, 800, start)
    b = _rnn_latents(d.system, 1.5, 0.4, 800, start + nudge)
    growth = np.linalg.norm(a[:, -1] - b[:, -1], axis=1) / np.linalg.norm(nudge, axis=1)
    assert np.median(growth) > 10.0


def test_chaotic_rnn_rates_vary_over_trials_and_between_conditions():
    d = synth.chaotic_rnn(**SMALL)
    rates = d.train.rates / (30.0 * 0.01)  # normalised to [0, 1]
    # Each neuron's rate changes substantially within a trial, also late in the trial.
    assert rates.std(axis=1).mean() > 0.15
    assert rates[:, 50:].std(axis=1).mean() > 0.1
    # Trials of one condition share their rates; different conditions do not.
    np.testing.assert_array_equal(rates[0], rates[1])
    per_condition = rates[::4]
    diffs = [np.abs(per_condition[i] - per_condition[j]).mean()
             for i in range(12) for j in range(i + 1, 12)]
    assert np.mean(diffs) > 0.2 and min(diffs) > 0.03
    # ... but their spikes do differ.
    assert not np.array_equal(d.train.spikes[0], d.train.spikes[1])


def test_spike_counts_are_poisson_with_the_true_rates():
    d = synth.chaotic_rnn(n_conditions=20, trials_per_condition=50, train_per_condition=40)
    spikes, rates = d.train.spikes, d.train.rates
    # Over 80,000 bins per neuron the mean count matches the mean rate to a few percent.
    np.testing.assert_allclose(spikes.mean(), rates.mean(), rtol=0.02)
    # Poisson: the variance around the rate equals the rate.
    np.testing.assert_allclose(((spikes - rates) ** 2).mean(), rates.mean(), rtol=0.03)


def test_generators_are_reproducible_and_seeded():
    for make in (synth.chaotic_rnn, synth.input_pulse, synth.lorenz):
        a, b, c = make(**SMALL, seed=3), make(**SMALL, seed=3), make(**SMALL, seed=4)
        for name in ("spikes", "rates", "latents"):
            np.testing.assert_array_equal(getattr(a.train, name), getattr(b.train, name))
        assert not np.array_equal(a.train.spikes, c.train.spikes)


def test_network_does_not_depend_on_the_trial_counts():
    a = synth.chaotic_rnn(**SMALL)
    b = synth.chaotic_rnn(n_conditions=3, trials_per_condition=2, train_per_condition=1)
    np.testing.assert_array_equal(a.system["weights"], b.system["weights"])
    np.testing.assert_array_equal(a.system["x0"][:3], b.system["x0"])


def test_random_readout_observes_a_projection():
    d = synth.chaotic_rnn(**SMALL, n_neurons=30)
    assert d.train.spikes.shape[2] == 30 and d.system["projection"].shape == (30, 50)
    assert d.train.latents.shape[2] == 50


def test_input_pulse_times_inputs_and_effect():
    d = synth.input_pulse(**SMALL)
    assert d.name == "input_pulse"
    for s in (d.train, d.valid):
        assert s.pulse_times.dtype == np.int64
        assert s.pulse_times.min() >= 25 and s.pulse_times.max() < 75
        expected = np.zeros_like(s.inputs)
        expected[np.arange(len(s.pulse_times)), s.pulse_times, 0] = 20.0
        np.testing.assert_array_equal(s.inputs, expected)
    # Two trials of one condition share their state until the earlier pulse, then differ.
    lat, times = d.train.latents, d.train.pulse_times
    a, b = 0, int(np.nonzero(times[:4] != times[0])[0][0])
    first = min(times[a], times[b])
    np.testing.assert_array_equal(lat[a, :first], lat[b, :first])
    assert np.abs(lat[a, first + 5:] - lat[b, first + 5:]).mean() > 0.05


def test_dead_network_warns():
    with pytest.warns(RuntimeWarning, match="dies out"):
        synth.chaotic_rnn(**SMALL, g=0.5)


def test_lorenz_latents_rates_and_conditions():
    d = synth.lorenz(**SMALL, n_neurons=20, n_bins=60)
    s = d.train
    assert s.spikes.shape == (48, 60, 20) and s.latents.shape == (48, 60, 3)
    assert d.conversion_factor == pytest.approx(100.0)
    # z-scored over conditions and bins (each condition appears equally often).
    np.testing.assert_allclose(s.latents.mean(axis=(0, 1)), 0.0, atol=1e-5)
    np.testing.assert_allclose(s.latents.std(axis=(0, 1)), 1.0, rtol=1e-5)
    log_rates = s.latents @ d.system["readout"].T + d.system["offset"]
    np.testing.assert_allclose(s.rates, np.exp(log_rates), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(d.system["readout"], axis=1), 0.7)
    # The latents move over the trial and conditions sit at different places.
    assert s.latents.std(axis=1).mean() > 0.5
    assert np.abs(s.latents[0] - s.latents[4]).mean() > 0.3
    np.testing.assert_array_equal(s.rates[0], s.rates[1])


def test_lorenz_latents_follow_the_lorenz_equations():
    d = synth.lorenz(**SMALL, n_bins=20)
    z = d.train.latents[::4].astype(np.float64) * d.system["latent_std"] + d.system[
        "latent_mean"]
    x, y, w = z[..., 0], z[..., 1], z[..., 2]
    h = 0.0025 * 4  # Lorenz time per bin
    # Central differences approximate the vector field to O(h^2).
    dx = (x[:, 2:] - x[:, :-2]) / (2 * h)
    dz = (w[:, 2:] - w[:, :-2]) / (2 * h)
    np.testing.assert_allclose(dx, 10.0 * (y - x)[:, 1:-1], atol=3.0)
    np.testing.assert_allclose(dz, (x * y - 8.0 / 3.0 * w)[:, 1:-1], atol=6.0)


@pytest.mark.parametrize("kwargs", [
    dict(trials_per_condition=5, train_per_condition=5),
    dict(trials_per_condition=5, train_per_condition=0),
    dict(n_conditions=0),
    dict(n_bins=0),
])
def test_invalid_sizes_raise(kwargs):
    with pytest.raises(ValueError):
        synth.chaotic_rnn(**{**SMALL, **kwargs})


def test_input_pulse_needs_a_positive_magnitude():
    with pytest.raises(ValueError, match="input_magnitude"):
        synth.input_pulse(**SMALL, input_magnitude=0.0)


@pytest.mark.parametrize("layout", ["lfads_torch", "tf1"])
def test_save_h5_writes_every_key(tmp_path, layout):
    d = synth.input_pulse(**SMALL, n_bins=30)
    path = synth.save_h5(d, tmp_path / "d.h5", layout=layout, ext_input=True)
    assert path == str(tmp_path / "d.h5")
    with h5py.File(path, "r") as f:
        data_keys = (["train_encod_data", "train_recon_data", "valid_encod_data",
                      "valid_recon_data"] if layout == "lfads_torch"
                     else ["train_data", "valid_data"])
        expected = set(data_keys) | {"conversion_factor", "dt"} | {
            f"{s}_{k}" for s in ("train", "valid")
            for k in ("truth", "inds", "conditions", "latents", "inputs", "pulse_times",
                      "ext_input")}
        assert set(f) == expected
        for split in ("train", "valid"):
            s = getattr(d, split)
            for key in data_keys:
                if key.startswith(split):
                    np.testing.assert_array_equal(f[key][()], s.spikes)
            np.testing.assert_allclose(f[f"{split}_truth"][()] / f["conversion_factor"][()],
                                       s.rates, rtol=FILE_TRUTH_RTOL)
            np.testing.assert_array_equal(f[f"{split}_inds"][()], s.inds)
            np.testing.assert_array_equal(f[f"{split}_pulse_times"][()], s.pulse_times)
            np.testing.assert_array_equal(f[f"{split}_ext_input"][()], s.inputs)
        # TF1 convention: the RNN's truth is the normalised rate, in [0, 1].
        assert f["train_truth"][()].max() == pytest.approx(1.0)
    assert not list(tmp_path.glob(".tmp_*"))


def test_save_h5_rejects_bad_requests(tmp_path):
    d = synth.chaotic_rnn(**SMALL, n_bins=10)
    with pytest.raises(ValueError, match="layout"):
        synth.save_h5(d, tmp_path / "x.h5", layout="nwb")
    with pytest.raises(ValueError, match="no inputs"):
        synth.save_h5(d, tmp_path / "x.h5", ext_input=True)


def test_to_dataset_carries_truth_and_extras():
    d = synth.input_pulse(**SMALL, n_bins=30)
    ds = d.to_dataset(ext_input=True)
    np.testing.assert_array_equal(ds.train.encod_data, d.train.spikes)
    np.testing.assert_array_equal(ds.valid.truth, d.valid.rates)
    np.testing.assert_array_equal(ds.train.ext_input, d.train.inputs)
    np.testing.assert_array_equal(ds.valid.extra["pulse_times"], d.valid.pulse_times)
    np.testing.assert_array_equal(ds.train.extra["conditions"], d.train.conditions)
    assert ds.ext_input_dim == 1 and ds.encod_data_dim == 50 and ds.recon_seq_len == 30
    assert synth.chaotic_rnn(**SMALL, n_bins=10).to_dataset().ext_input_dim == 0
