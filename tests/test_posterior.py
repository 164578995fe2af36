"""Posterior sampling and averaging: one wide batch per chunk, per-trial averages, the HDF5
round trip with lfads-torch's keys."""
import numpy as np
import pytest

from lfads_fast import LFADS, LFADSConfig, data, posterior, synth

CFG = dict(encod_data_dim=12, recon_data_dim=12, encod_seq_len=15, recon_seq_len=15,
           ic_enc_dim=8, ci_enc_dim=6, con_dim=6, co_dim=2, ic_dim=5, gen_dim=10, fac_dim=4,
           dropout_rate=0.1)
# Averaging n independent samples divides the variance by n; with 16 samples and 12 repeats
# the measured ratio stays well below this bound.
VARIANCE_RATIO_MAX = 0.25


@pytest.fixture(scope="module")
def model():
    m = LFADS(LFADSConfig(**CFG), seed=2)
    # Larger posterior variances than at initialisation, so that samples differ visibly.
    m.params["ic_linear_b"][CFG["ic_dim"]:] = 0.5
    m.params["co_linear_b"][CFG["co_dim"]:] = 0.5
    return m


@pytest.fixture(scope="module")
def spikes():
    return np.random.default_rng(0).poisson(1.0, size=(9, 15, 12)).astype(np.float32)


def test_shapes_and_names(model, spikes):
    out = posterior.sample_and_average(model, spikes, n_samples=4)
    assert set(out) == set(data.POSTERIOR_FIELDS)
    B, T, c = 9, 15, model.config
    expected = {"output_params": (B, T, 12), "factors": (B, T, c.fac_dim),
                "ic_mean": (B, c.ic_dim), "ic_std": (B, c.ic_dim), "co_means": (B, T, c.co_dim),
                "co_stds": (B, T, c.co_dim), "gen_states": (B, T, c.gen_dim),
                "gen_init": (B, c.gen_dim), "gen_inputs": (B, T, c.co_dim),
                "con_states": (B, T, c.con_dim)}
    assert {k: v.shape for k, v in out.items()} == expected
    assert all(v.dtype == np.float32 for v in out.values())


def test_zero_samples_is_the_posterior_mean(model, spikes):
    out = posterior.sample_and_average(model, spikes, n_samples=0, max_rows=4)
    ref = model.forward(spikes, sample=False)
    for k in data.POSTERIOR_FIELDS:
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_each_trial_gets_its_own_samples(model, spikes):
    # With a nearly deterministic posterior every sample is close to the trial's mean output,
    # so any mix-up of rows between trials would show.
    m = LFADS(model.config, seed=2)
    m.flat[...] = model.flat
    ic, co = m.config.ic_dim, m.config.co_dim
    m.params["ic_linear_W"][ic:] = 0.0
    m.params["ic_linear_b"][ic:] = -30.0
    m.params["co_linear_W"][co:] = 0.0
    m.params["co_linear_b"][co:] = -30.0
    out = posterior.sample_and_average(m, spikes, n_samples=5, max_rows=7)
    ref = m.forward(spikes, sample=False)
    np.testing.assert_allclose(out["output_params"], ref["output_params"], rtol=0.05)
    np.testing.assert_allclose(out["ic_mean"], ref["ic_mean"], rtol=1e-5, atol=1e-6)


def test_averaging_reduces_variance(model, spikes):
    def spread(n):
        runs = np.stack([posterior.sample_and_average(model, spikes, n_samples=n, seed=s)
                         ["output_params"] for s in range(12)])
        return runs.var(axis=0).mean()

    one, many = spread(1), spread(16)
    assert one > 0
    assert many < VARIANCE_RATIO_MAX * one


def test_seed_and_chunking(model, spikes):
    a = posterior.sample_and_average(model, spikes, n_samples=3, seed=1)
    b = posterior.sample_and_average(model, spikes, n_samples=3, seed=1)
    c = posterior.sample_and_average(model, spikes, n_samples=3, seed=2)
    np.testing.assert_array_equal(a["factors"], b["factors"])
    assert not np.array_equal(a["factors"], c["factors"])
    # Chunks of one trial (3 rows) give other samples but the same kind of result.
    d = posterior.sample_and_average(model, spikes, n_samples=3, seed=1, max_rows=3)
    assert d["factors"].shape == a["factors"].shape and np.all(np.isfinite(d["factors"]))


@pytest.mark.parametrize("sample", [True, False])
def test_repeats_encode_once_and_equal_the_repeated_data(model, spikes, sample):
    """forward(x, repeats=r) runs the encoders once per trial; its rows are those of
    forward(np.repeat(x, r, axis=0)) with the same seed (same samples, same outputs)."""
    a = model.forward(np.repeat(spikes, 3, axis=0), sample=sample, seed=4)
    b = model.forward(spikes, sample=sample, seed=4, repeats=3)
    for k in data.POSTERIOR_FIELDS:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    if sample:  # the repeats of a trial are different samples
        assert not np.allclose(b["factors"][0], b["factors"][1])
    assert b["terms"]["kl_ic"] == pytest.approx(a["terms"]["kl_ic"], rel=1e-5)
    # average=True: each trial's mean over its repeats, averaged before the outputs are made
    # batch-major.
    m = model.forward(spikes, sample=sample, seed=4, repeats=3, average=True)
    for k in data.POSTERIOR_FIELDS:
        expected = b[k].reshape((len(spikes), 3) + b[k].shape[1:]).mean(axis=1)
        assert m[k].shape == expected.shape and m[k].flags.c_contiguous, k
        np.testing.assert_allclose(m[k], expected, rtol=1e-5, atol=1e-6, err_msg=k)


def test_outputs_without_targets(model, spikes):
    """Without recon_data only the read-out runs: the same rates as with any targets, and
    no reconstruction term (NaN) instead of the likelihood of made-up zeros."""
    bare = model.forward(spikes, seed=1)
    full = model.forward(spikes, seed=1, recon_data=spikes)
    np.testing.assert_allclose(bare["output_params"], full["output_params"], rtol=1e-5)
    assert np.isnan(bare["terms"]["recon"]) and np.isfinite(full["terms"]["recon"])
    # The counts are still checked.
    with pytest.raises(ValueError, match="encod_data has negative spike counts"):
        model.forward(-spikes - 1)
    with pytest.raises(ValueError, match="encod_data has non-integer"):
        model.forward(spikes + 0.5, repeats=2)


def test_missing_bins_without_targets_read_as_zero(model, spikes):
    holes = spikes.copy()
    holes[0, 3, 2] = np.nan
    filled = spikes.copy()
    filled[0, 3, 2] = 0
    for repeats in (1, 2):
        a = model.forward(holes, seed=3, repeats=repeats)
        b = model.forward(filled, seed=3, repeats=repeats)
        np.testing.assert_array_equal(a["output_params"], b["output_params"])
    with pytest.raises(ValueError, match="encod_data has infinite values"):
        model.forward(np.where(np.isnan(holes), np.inf, holes))


@pytest.mark.parametrize("shape", [(1, 15, 12), (3, 15, 12)])
def test_the_callers_counts_are_left_as_they_were(model, spikes, shape):
    """A single trial of float32 counts is already time-major and contiguous: the batch must
    still copy it before writing NaN -> 0 and sample validation's scaling into it."""
    x = spikes[: shape[0]].copy()
    x[0, 2, 3] = np.nan
    before = x.copy()
    model.forward(x, seed=0)
    model.forward(x, seed=0, repeats=2)
    mask = np.ones(x.shape, bool)
    mask[0, 4, 5] = False
    model.make_batch(x, np.nan_to_num(x), sv_mask=mask, sv_rate=0.2)
    model.forward(x, recon_data=x, sv_mask=mask, sv_rate=0.2)
    model.make_batch(x, np.nan_to_num(x), check_counts=False)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("repeats", [1, 3])
def test_outputs_asked_for(model, spikes, repeats):
    """outputs= returns the outputs named (and the terms), equal to those of a full pass."""
    full = model.forward(spikes, sample=True, seed=5, repeats=repeats)
    some = model.forward(spikes, sample=True, seed=5, repeats=repeats, outputs=("factors", "ic_std"))
    assert set(some) == {"factors", "ic_std", "terms"}
    for k in ("factors", "ic_std"):
        np.testing.assert_array_equal(some[k], full[k])
    one = model.forward(spikes, sample=True, seed=5, repeats=repeats, outputs="output_params")
    assert set(one) == {"output_params", "terms"}
    np.testing.assert_array_equal(one["output_params"], full["output_params"])
    for bad in (("rates",), ()):
        with pytest.raises(ValueError, match="outputs must name some of"):
            model.forward(spikes, outputs=bad)


@pytest.mark.parametrize("repeats", [0, -1, 1.5, True])
def test_bad_repeats(model, spikes, repeats):
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        model.forward(spikes, repeats=repeats)


def test_repeats_refuse_targets(model, spikes):
    with pytest.raises(ValueError, match="repeats > 1 is for outputs"):
        model.forward(spikes, repeats=2, recon_data=spikes)


def test_bad_arguments(model, spikes):
    with pytest.raises(ValueError, match="n_samples"):
        posterior.sample_and_average(model, spikes, n_samples=-1)
    with pytest.raises(ValueError, match="max_rows"):
        posterior.sample_and_average(model, spikes, max_rows=0)
    with pytest.raises(ValueError, match="trials, bins, neurons"):
        posterior.sample_and_average(model, spikes[0])


def test_hdf5_round_trip_with_lfads_torch_keys(tmp_path):
    sd = synth.chaotic_rnn(n_conditions=6, trials_per_condition=3, train_per_condition=2,
                           n_bins=15, n_neurons=12)
    ds = sd.to_dataset()
    m = LFADS(LFADSConfig(**CFG), seed=0)
    path = tmp_path / "posterior.h5"
    written = posterior.write_posterior(path, m, ds, n_samples=3)
    back = data.read_posterior_h5(path)
    expected = {f"{s}_{k}" for s in ("train", "valid") for k in data.POSTERIOR_FIELDS}
    assert set(back) == expected | {"train_inds", "valid_inds"}
    for split in ("train", "valid"):
        np.testing.assert_array_equal(back[f"{split}_inds"], ds.splits[split].inds)
        for k in data.POSTERIOR_FIELDS:
            np.testing.assert_array_equal(back[f"{split}_{k}"], written[split][k])
    assert back["train_output_params"].shape == (12, 15, 12)
    assert back["valid_factors"].shape == (6, 15, CFG["fac_dim"])
    only_valid = posterior.posterior_outputs(m, ds, n_samples=0, splits=("valid",))
    assert list(only_valid) == ["valid"]
    with pytest.raises(ValueError, match="not in the data"):
        posterior.posterior_outputs(m, ds, splits=("test",))


def test_ensemble_averages_the_members_rates(model, spikes):
    other = LFADS(model.config, seed=123)
    ens = posterior.ensemble_average([model, other], spikes, n_samples=3, seed=5)
    a = posterior.sample_and_average(model, spikes, n_samples=3, seed=5)["output_params"]
    b = posterior.sample_and_average(other, spikes, n_samples=3, seed=5)["output_params"]
    np.testing.assert_array_equal(ens["members"][0], a)
    np.testing.assert_array_equal(ens["members"][1], b)
    np.testing.assert_allclose(ens["output_params"], (a.astype(np.float64) + b) / 2, rtol=1e-6)
    assert not np.allclose(a, b)  # two different models
    refined = posterior.ensemble_average([model, other], spikes, refine_steps=3)
    expect = posterior.sample_and_average(other, spikes, refine_steps=3)["output_params"]
    np.testing.assert_array_equal(refined["members"][1], expect)


def test_average_rates(rng):
    a = rng.random((3, 4, 2)).astype(np.float32)
    b = rng.random((3, 4, 2)).astype(np.float32)
    mean = posterior.average_rates([a, b])
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean, (a.astype(np.float64) + b) / 2, rtol=1e-7)
    np.testing.assert_array_equal(posterior.average_rates([a]), a)
    with pytest.raises(ValueError, match="rates is empty"):
        posterior.average_rates([])
    with pytest.raises(ValueError, match="different shapes"):
        posterior.average_rates([a, b[:2]])
    # A generator is consumed one model at a time; the running sum leaves the inputs alone.
    c = rng.random((3, 4, 2)).astype(np.float32)
    kept = a.copy()
    lazy = posterior.average_rates(x for x in (a, b, c))
    np.testing.assert_allclose(lazy, (a.astype(np.float64) + b + c) / 3, rtol=1e-7)
    np.testing.assert_array_equal(a, kept)
    with pytest.raises(ValueError, match="rates is empty"):
        posterior.average_rates(iter(()))
    total = posterior.RateSum()
    with pytest.raises(ValueError, match="rates is empty"):
        total.mean()
    total.add(a.astype(np.float64))
    total.add(b)
    assert total.n == 2 and total.mean().dtype == np.float64
    np.testing.assert_allclose(total.mean(), (a.astype(np.float64) + b) / 2, rtol=1e-12)


def test_ensemble_outputs_average_each_split(model, spikes):
    other = LFADS(model.config, seed=7)
    ds = data.from_arrays(train_encod_data=spikes[:6], valid_encod_data=spikes[6:])
    got = posterior.ensemble_outputs([model, other], ds, n_samples=2, seed=3)
    alone = [posterior.posterior_outputs(m, ds, n_samples=2, seed=3) for m in (model, other)]
    for split in ("train", "valid"):
        assert set(got[split]) == {"output_params"}
        a, b = (x[split]["output_params"] for x in alone)
        assert not np.allclose(a, b)
        np.testing.assert_allclose(got[split]["output_params"], (a.astype(np.float64) + b) / 2,
                                   rtol=1e-6)
    with pytest.raises(ValueError, match="models: an ensemble needs at least one model"):
        posterior.ensemble_outputs([], ds)


def test_ensemble_errors(model, spikes):
    with pytest.raises(ValueError, match="models is empty"):
        posterior.ensemble_average([], spikes)
    wider = LFADS(LFADSConfig(**{**CFG, "recon_data_dim": CFG["recon_data_dim"] + 2}))
    with pytest.raises(ValueError, match=r"models\[1\] has data sizes"):
        posterior.ensemble_average([model, wider], spikes)
