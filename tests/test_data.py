"""Reading, validating and writing datasets: every layout, every error path, posterior files."""
import h5py
import numpy as np
import pytest

from lfads_fast import data, synth

SMALL = dict(n_conditions=6, trials_per_condition=5, train_per_condition=4, n_bins=20)
# Truth goes through a float32 multiplication by the conversion factor and back.
TRUTH_RTOL = 1e-6


def _write(path, **arrays):
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
    return str(path)


def _counts(rng, shape, lam=1.0):
    return rng.poisson(lam, size=shape).astype(np.float32)


def _valid_arrays(rng, b=6, t_e=10, t_r=12, n_e=4, n_r=5, ext=0, truth=False):
    """A consistent lfads-torch dictionary with train and valid splits."""
    arrays = {}
    for split, n in (("train", b), ("valid", b // 2)):
        recon = _counts(rng, (n, t_r, n_r))
        arrays[f"{split}_encod_data"] = recon[:, :t_e, :n_e].copy()
        arrays[f"{split}_recon_data"] = recon
        if ext:
            arrays[f"{split}_ext_input"] = rng.standard_normal((n, t_r, ext)).astype(np.float32)
        if truth:
            arrays[f"{split}_truth"] = rng.uniform(0.1, 2.0, (n, t_r, n_r)).astype(np.float32)
    return arrays


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# Round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["lfads_torch", "tf1"])
def test_save_h5_then_load_dataset_round_trips_every_key(tmp_path, layout):
    d = synth.input_pulse(**SMALL)
    path = synth.save_h5(d, tmp_path / "d.h5", layout=layout, ext_input=True)
    ds = data.load_dataset(path)
    assert ds.layout == layout and ds.source == path and ds.test is None
    for name in ("train", "valid"):
        s, truth = getattr(ds, name), getattr(d, name)
        np.testing.assert_array_equal(s.encod_data, truth.spikes)
        np.testing.assert_array_equal(s.recon_data, truth.spikes)
        np.testing.assert_allclose(s.truth, truth.rates, rtol=TRUTH_RTOL)
        np.testing.assert_array_equal(s.ext_input, truth.inputs)
        np.testing.assert_array_equal(s.inds, truth.inds)
        assert s.encod_data.dtype == np.float32 and s.inds.dtype == np.int64
        assert set(s.extra) == {"conditions", "latents", "inputs", "pulse_times"}
        np.testing.assert_array_equal(s.extra["conditions"], truth.conditions)
        np.testing.assert_array_equal(s.extra["latents"], truth.latents)
        np.testing.assert_array_equal(s.extra["inputs"], truth.inputs)
        np.testing.assert_array_equal(s.extra["pulse_times"], truth.pulse_times)
    assert set(ds.other) == {"conversion_factor", "dt"}
    assert float(ds.other["dt"]) == d.dt
    assert (ds.encod_data_dim, ds.recon_data_dim, ds.encod_seq_len, ds.recon_seq_len,
            ds.ext_input_dim) == (50, 50, 20, 20, 1)


def test_tf1_truth_is_divided_by_the_conversion_factor(tmp_path, rng):
    # As the TF1 generator wrote it: truth = normalised rate in [0, 1],
    # conversion_factor = 1 / (max_firing_rate * dt), expected counts = truth * 30 Hz * 10 ms.
    truth = rng.uniform(0, 1, (4, 10, 3))
    spikes = rng.poisson(truth * 0.3).astype(np.int64)
    path = _write(tmp_path / "tf1.h5", train_data=spikes, valid_data=spikes[:2],
                  train_truth=truth, valid_truth=truth[:2], conversion_factor=1 / 0.3)
    ds = data.load_dataset(path)
    assert ds.layout == "tf1"
    np.testing.assert_allclose(ds.train.truth, truth * 0.3, rtol=1e-6)
    np.testing.assert_array_equal(ds.train.inds, np.arange(4))
    assert ds.train.encod_data is ds.train.recon_data


def test_lfads_torch_layout_with_test_split_heldout_and_forward(tmp_path, rng):
    arrays = _valid_arrays(rng, ext=2, truth=True)
    arrays["test_encod_data"] = _counts(rng, (3, 10, 4))
    arrays["test_recon_data"] = np.full((3, 12, 5), np.nan, np.float32)
    arrays["test_ext_input"] = np.zeros((3, 12, 2), np.float32)
    arrays["test_truth"] = np.ones((3, 12, 5), np.float32)
    arrays["train_inds"] = np.arange(6)[::-1]
    arrays["readout_bias"] = np.zeros(5)
    ds = data.load_dataset(_write(tmp_path / "d.h5", **arrays))
    assert ds.layout == "lfads_torch" and set(ds.splits) == {"train", "valid", "test"}
    assert (ds.encod_data_dim, ds.recon_data_dim) == (4, 5)
    assert (ds.encod_seq_len, ds.recon_seq_len, ds.ext_input_dim) == (10, 12, 2)
    np.testing.assert_array_equal(ds.heldout_neurons, [4])
    np.testing.assert_array_equal(ds.train.inds, np.arange(6)[::-1])
    np.testing.assert_array_equal(ds.valid.inds, np.arange(3))
    np.testing.assert_array_equal(ds.train.truth, arrays["train_truth"])  # no factor: 1
    assert ds.has_truth and set(ds.other) == {"readout_bias"}
    assert np.isnan(ds.test.recon_data).all()


def test_from_arrays_defaults_and_extras(rng):
    spikes = _counts(rng, (5, 8, 3))
    ds = data.from_arrays(spikes, spikes[:2], extra={"train_behavior": np.ones((5, 8, 2))})
    assert ds.layout == "arrays" and ds.source == "<arrays>"
    assert ds.train.recon_data is ds.train.encod_data
    assert ds.train.ext_input is None and ds.train.truth is None and not ds.has_truth
    np.testing.assert_array_equal(ds.valid.inds, [0, 1])
    assert ds.train.extra["behavior"].shape == (5, 8, 2) and ds.ext_input_dim == 0
    assert ds.train.n_trials == 5 and ds.test is None
    with_test = data.from_arrays(spikes, spikes[:2], test_encod_data=spikes[2:])
    assert with_test.test.recon_data is with_test.test.encod_data
    assert list(with_test.splits) == ["train", "valid", "test"]


def test_from_arrays_rejects_bad_extra_names(rng):
    spikes = _counts(rng, (5, 8, 3))
    with pytest.raises(ValueError, match="extra array name"):
        data.from_arrays(spikes, spikes, extra={"behavior": np.ones(5)})
    with pytest.raises(ValueError, match="extra array name"):
        data.from_arrays(spikes, spikes, extra={"train_truth": spikes})


def test_nan_marks_missing_bins(rng):
    arrays = _valid_arrays(rng)
    arrays["train_recon_data"][0, 3, 1] = np.nan  # a missing target alone is fine
    arrays["train_encod_data"][1, 2, 0] = np.nan  # missing in both is fine
    arrays["train_recon_data"][1, 2, 0] = np.nan
    ds = data.from_arrays(**arrays)
    assert np.isnan(ds.train.recon_data).sum() == 2


# NLB tensors -------------------------------------------------------------------------------


def _nlb_arrays(rng, forward=True, eval_heldout=True):
    arrays = {
        "train_spikes_heldin": rng.poisson(1, (6, 10, 4)).astype(np.int64),
        "train_spikes_heldout": rng.poisson(1, (6, 10, 2)).astype(np.int64),
        "eval_spikes_heldin": rng.poisson(1, (3, 10, 4)).astype(np.int64),
        "train_behavior": rng.standard_normal((6, 10, 2)),
        "eval_behavior": rng.standard_normal((3, 10, 2)),
    }
    if eval_heldout:
        arrays["eval_spikes_heldout"] = rng.poisson(1, (3, 10, 2)).astype(np.int64)
    if forward:
        arrays["train_spikes_heldin_forward"] = rng.poisson(1, (6, 3, 4))
        arrays["train_spikes_heldout_forward"] = rng.poisson(1, (6, 3, 2))
        if eval_heldout:
            arrays["eval_spikes_heldin_forward"] = rng.poisson(1, (3, 3, 4))
            arrays["eval_spikes_heldout_forward"] = rng.poisson(1, (3, 3, 2))
    return arrays


def test_nlb_tensors_become_encod_and_recon_data(tmp_path, rng):
    arrays = _nlb_arrays(rng)
    ds = data.load_dataset(_write(tmp_path / "nlb.h5", **arrays))
    assert ds.layout == "nlb"
    assert (ds.encod_data_dim, ds.recon_data_dim, ds.encod_seq_len, ds.recon_seq_len) == (
        4, 6, 10, 13)
    for split, prefix in (("train", "train"), ("valid", "eval")):
        s = getattr(ds, split)
        np.testing.assert_array_equal(s.encod_data, arrays[f"{prefix}_spikes_heldin"])
        np.testing.assert_array_equal(s.recon_data[:, :10, :4], s.encod_data)
        np.testing.assert_array_equal(s.recon_data[:, :10, 4:],
                                      arrays[f"{prefix}_spikes_heldout"])
        np.testing.assert_array_equal(s.recon_data[:, 10:, :4],
                                      arrays[f"{prefix}_spikes_heldin_forward"])
        np.testing.assert_array_equal(s.recon_data[:, 10:, 4:],
                                      arrays[f"{prefix}_spikes_heldout_forward"])
        np.testing.assert_array_equal(s.extra["behavior"], arrays[f"{prefix}_behavior"])
        assert set(s.extra) == {"behavior"}


def test_nlb_test_phase_targets_are_missing(tmp_path, rng):
    ds = data.load_dataset(_write(tmp_path / "nlb.h5", **_nlb_arrays(rng, eval_heldout=False)))
    recon = ds.valid.recon_data
    assert recon.shape == (3, 13, 6)
    np.testing.assert_array_equal(recon[:, :10, :4], ds.valid.encod_data)
    assert np.isnan(recon[:, :10, 4:]).all() and np.isnan(recon[:, 10:]).all()


def test_nlb_without_forward_bins(tmp_path, rng):
    ds = data.load_dataset(_write(tmp_path / "nlb.h5", **_nlb_arrays(rng, forward=False)))
    assert ds.recon_seq_len == ds.encod_seq_len == 10


def test_a_single_group_is_found_and_group_can_be_named(tmp_path, rng):
    path = tmp_path / "nested.h5"
    with h5py.File(path, "w") as f:
        for key, value in _nlb_arrays(rng).items():
            f.create_dataset(f"mc_maze/{key}", data=value)
    assert data.load_dataset(path).recon_data_dim == 6
    with h5py.File(path, "a") as f:
        for key, value in _nlb_arrays(rng, forward=False).items():
            f.create_dataset(f"area2/{key}", data=value)
    with pytest.raises(ValueError, match="several groups"):
        data.load_dataset(path)
    assert data.load_dataset(path, group="area2").recon_seq_len == 10
    with pytest.raises(ValueError, match="group 'rtt' not found"):
        data.load_dataset(path, group="rtt")


# Validation errors -------------------------------------------------------------------------


def _corrupt(arrays, key, edit):
    arrays = {k: v.copy() for k, v in arrays.items()}
    arrays[key] = edit(arrays[key])
    return arrays


def _set(index, value):
    def edit(x):
        x = x.astype(np.float64)
        x[index] = value
        return x
    return edit


LFADS_TORCH_ERRORS = [
    ("negative", "train_encod_data", _set((0, 5, 2), -1),
     r"train_encod_data has negative counts at 1 bin \(first at trial 0, bin 5, neuron 2\)"),
    ("non-integer", "valid_recon_data", _set((1, 2, 3), 0.5),
     r"valid_recon_data has non-integer counts at 1 bin \(first at trial 1, bin 2, neuron 3\)"),
    ("infinite", "train_recon_data", _set((0, 0, 0), np.inf),
     r"train_recon_data has infinite values"),
    ("not 3-D", "train_encod_data", lambda x: x[0],
     r"train_encod_data must be 3-D \[trials, bins, channels\], got shape \(10, 4\)"),
    ("not numeric", "train_encod_data", lambda x: np.full(x.shape, b"a"),
     r"train_encod_data must be numeric"),
    ("trial mismatch", "train_recon_data", lambda x: x[:5],
     r"train_recon_data has 5 trials but train_encod_data has 6"),
    ("fewer recon neurons", "train_recon_data", lambda x: x[..., :3],
     r"train_recon_data has 3 neurons, fewer than the 4 of train_encod_data"),
    ("fewer recon bins", "train_recon_data", lambda x: x[:, :8],
     r"train_recon_data has 8 bins, fewer than the 10 of train_encod_data"),
    ("valid neurons", "valid_encod_data", lambda x: x[..., :3],
     r"valid_encod_data has 3 neurons but train_encod_data has 4"),
    ("valid bins", "valid_encod_data", lambda x: x[:, :9],
     r"valid_encod_data has 9 bins but train_encod_data has 10"),
    ("NaN in encod only", "train_encod_data", _set((2, 4, 1), np.nan),
     r"train_recon_data has counts where train_encod_data is NaN \(missing\) at 1 bin "
     r"\(first at trial 2, bin 4, neuron 1\)"),
    ("ext trials", "train_ext_input", lambda x: x[:4],
     r"train_ext_input has 4 trials but train_encod_data has 6"),
    ("ext bins", "train_ext_input", lambda x: x[:, :11],
     r"train_ext_input has 11 bins; expected 10 \(as train_encod_data\) or 12"),
    ("ext NaN", "valid_ext_input", _set((0, 1, 0), np.nan),
     r"valid_ext_input has NaN or infinite values \(cannot be missing\) at 1 bin "
     r"\(first at trial 0, bin 1, input 0\)"),
    ("ext dims across splits", "valid_ext_input", lambda x: x[..., :1],
     r"valid_ext_input has shape \(3, 12, 1\) but train_ext_input has \(6, 12, 2\)"),
    ("truth shape", "train_truth", lambda x: x[:, :10],
     r"train_truth has shape \(6, 10, 5\) but train_recon_data has \(6, 12, 5\)"),
    ("truth negative", "valid_truth", _set((0, 0, 0), -0.1),
     r"valid_truth has negative rates at 1 bin"),
    ("inds length", "train_inds", lambda x: x[:4],
     r"train_inds has 4 entries but train_encod_data has 6 trials"),
    ("inds dtype", "train_inds", lambda x: x.astype(np.float64),
     r"train_inds must be 1-D integers"),
    ("no trials", "valid_encod_data", lambda x: x[:0],
     r"valid_encod_data has no trials"),
    ("conversion factor", "conversion_factor", lambda x: np.float64(-2.0),
     r"conversion_factor must be one positive number"),
]


@pytest.mark.parametrize("case, key, edit, message", LFADS_TORCH_ERRORS,
                         ids=[c[0] for c in LFADS_TORCH_ERRORS])
def test_validation_errors_name_file_key_and_problem(tmp_path, rng, case, key, edit, message):
    arrays = _valid_arrays(rng, ext=2, truth=True)
    arrays["train_inds"] = np.arange(6)
    arrays["conversion_factor"] = np.float64(1.0)
    if case == "no trials":
        arrays["valid_recon_data"] = arrays["valid_recon_data"][:0]
        arrays["valid_ext_input"] = arrays["valid_ext_input"][:0]
        arrays["valid_truth"] = arrays["valid_truth"][:0]
    path = _write(tmp_path / "data.h5", **_corrupt(arrays, key, edit))
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        data.load_dataset(path)


def test_message_names_the_file_as_given(tmp_path, rng, monkeypatch):
    arrays = _valid_arrays(rng)
    x = arrays["train_encod_data"]
    x[0, 5, 2] = x[1, 0, 0] = x[3, 9, 3] = -1
    monkeypatch.chdir(tmp_path)
    _write("data.h5", **arrays)
    with pytest.raises(ValueError) as info:
        data.load_dataset("data.h5")
    assert str(info.value) == ("data.h5: train_encod_data has negative counts at 3 bins "
                               "(first at trial 0, bin 5, neuron 2)")


def test_ext_input_in_one_split_only(tmp_path, rng):
    arrays = _valid_arrays(rng, ext=1)
    del arrays["valid_ext_input"]
    with pytest.raises(ValueError, match="valid_ext_input is missing but train_ext_input"):
        data.load_dataset(_write(tmp_path / "d.h5", **arrays))
    arrays = _valid_arrays(rng, ext=1)
    del arrays["train_ext_input"]
    with pytest.raises(ValueError, match="train_ext_input is missing but valid_ext_input"):
        data.load_dataset(_write(tmp_path / "d.h5", **arrays))


@pytest.mark.parametrize("missing", ["train_recon_data", "valid_encod_data"])
def test_missing_required_key(tmp_path, rng, missing):
    arrays = _valid_arrays(rng)
    del arrays[missing]
    with pytest.raises(ValueError, match=f"required key {missing} is missing"):
        data.load_dataset(_write(tmp_path / "d.h5", **arrays))


def test_test_split_without_recon_data_is_missing(tmp_path, rng):
    # lfads-torch's files for hidden test trials carry only their encoder input.
    arrays = _valid_arrays(rng)
    arrays["test_encod_data"] = arrays["valid_encod_data"]
    ds = data.load_dataset(_write(tmp_path / "d.h5", **arrays))
    assert ds.test.recon_data.shape == (len(arrays["valid_encod_data"]),) + ds.train.recon_data.shape[1:]
    assert np.isnan(ds.test.recon_data).all()


def test_unknown_layout_and_unreadable_file(tmp_path):
    with pytest.raises(ValueError, match="unknown layout.*found keys \\['spikes'\\]"):
        data.load_dataset(_write(tmp_path / "d.h5", spikes=np.zeros((2, 3, 4))))
    bad = tmp_path / "not.h5"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="cannot open as HDF5"):
        data.load_dataset(bad)


def test_tf1_errors_name_tf1_keys(tmp_path, rng):
    spikes = _counts(rng, (4, 10, 3))
    bad = spikes.copy()
    bad[1, 1, 1] = 2.5
    with pytest.raises(ValueError, match=r"valid_data has non-integer counts"):
        data.load_dataset(_write(tmp_path / "a.h5", train_data=spikes, valid_data=bad))
    with pytest.raises(ValueError, match=r"valid_data has 2 neurons but train_data has 3"):
        data.load_dataset(_write(tmp_path / "b.h5", train_data=spikes,
                                 valid_data=spikes[..., :2]))
    with pytest.raises(ValueError, match=r"train_truth has shape"):
        data.load_dataset(_write(tmp_path / "c.h5", train_data=spikes, valid_data=spikes,
                                 train_truth=spikes[:, :5], valid_truth=spikes))


NLB_ERRORS = [
    ("heldout trials", "train_spikes_heldout", lambda x: x[:5],
     r"train_spikes_heldout has 5 trials but train_spikes_heldin has 6"),
    ("heldout bins", "eval_spikes_heldout", lambda x: x[:, :9],
     r"eval_spikes_heldout has 9 bins but eval_spikes_heldin has 10"),
    ("heldout neurons across splits", "eval_spikes_heldout", lambda x: x[..., :1],
     r"eval_spikes_heldout has 1 neurons but train_spikes_heldout has 2"),
    ("forward width", "train_spikes_heldin_forward", lambda x: x[..., :3],
     r"train_spikes_heldin_forward has 3 neurons but train_spikes_heldin has 4"),
    ("eval forward bins", "eval_spikes_heldout_forward", lambda x: x[:, :2],
     r"eval_spikes_heldout_forward has 2 bins but eval_spikes_heldin_forward has 3"),
    ("eval forward across splits", "eval_spikes_heldin_forward", lambda x: x[:, :2],
     r"eval_spikes_heldin_forward has 2 bins but train_spikes_heldin_forward has 3"),
    ("negative", "eval_spikes_heldin_forward", _set((2, 1, 0), -3),
     r"eval_spikes_heldin_forward has negative counts at 1 bin \(first at trial 2, bin 1, "
     r"neuron 0\)"),
    ("eval heldin neurons", "eval_spikes_heldin", lambda x: x[..., :3],
     r"eval_spikes_heldin_forward has 4 neurons but eval_spikes_heldin has 3"),
    ("eval bins", "eval_spikes_heldin", lambda x: x[:, :9],
     r"eval_spikes_heldout has 10 bins but eval_spikes_heldin has 9"),
]


@pytest.mark.parametrize("case, key, edit, message", NLB_ERRORS,
                         ids=[c[0] for c in NLB_ERRORS])
def test_nlb_validation_errors(tmp_path, rng, case, key, edit, message):
    path = _write(tmp_path / "nlb.h5", **_corrupt(_nlb_arrays(rng), key, edit))
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        data.load_dataset(path)


def test_nlb_split_mismatch_without_forward_bins(tmp_path, rng):
    arrays = _nlb_arrays(rng, forward=False, eval_heldout=False)
    arrays["eval_spikes_heldin"] = arrays["eval_spikes_heldin"][..., :3]
    with pytest.raises(ValueError, match="eval_spikes_heldin has 3 neurons but "
                                         "train_spikes_heldin has 4"):
        data.load_dataset(_write(tmp_path / "a.h5", **arrays))


def test_nlb_forward_pieces_come_in_pairs(tmp_path, rng):
    arrays = _nlb_arrays(rng)
    del arrays["train_spikes_heldout_forward"]
    with pytest.raises(ValueError, match="train_spikes_heldout_forward is missing"):
        data.load_dataset(_write(tmp_path / "a.h5", **arrays))
    arrays = _nlb_arrays(rng)
    del arrays["train_spikes_heldin_forward"], arrays["train_spikes_heldout_forward"]
    with pytest.raises(ValueError, match="eval_spikes_heldin_forward is present but "
                                         "train_spikes_heldin_forward is missing"):
        data.load_dataset(_write(tmp_path / "b.h5", **arrays))


def test_from_arrays_errors_use_argument_names(rng):
    spikes = _counts(rng, (5, 8, 3))
    with pytest.raises(ValueError, match=r"^<arrays>: valid_truth has shape"):
        data.from_arrays(spikes, spikes, valid_truth=spikes[:, :4])


# Posterior files ---------------------------------------------------------------------------


def _outputs(rng, b, t=7, n=5, f=3, u=2, e=1, g=4, c=6, ic=3):
    shapes = {"output_params": (b, t, n), "factors": (b, t, f), "ic_mean": (b, ic),
              "ic_std": (b, ic), "co_means": (b, t, u), "co_stds": (b, t, u),
              "gen_states": (b, t, g), "gen_init": (b, g), "gen_inputs": (b, t, u + e),
              "con_states": (b, t, c)}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_posterior_round_trip_every_key(tmp_path, rng):
    outputs = {"train": _outputs(rng, 6), "valid": _outputs(rng, 3), "test": _outputs(rng, 2)}
    inds = {"train": np.arange(6)[::-1], "valid": np.array([7, 8, 9])}
    path = data.write_posterior_h5(tmp_path / "post.h5", outputs, inds)
    assert path == str(tmp_path / "post.h5")
    back = data.read_posterior_h5(path)
    expected = {f"{s}_{k}" for s in outputs for k in data.POSTERIOR_FIELDS} | {
        "train_inds", "valid_inds", "test_inds"}
    assert set(back) == expected
    for split, values in outputs.items():
        for key, value in values.items():
            np.testing.assert_array_equal(back[f"{split}_{key}"], value)
    np.testing.assert_array_equal(back["train_inds"], inds["train"])
    np.testing.assert_array_equal(back["test_inds"], [0, 1])
    assert not list(tmp_path.glob(".tmp_*"))


def test_posterior_write_replaces_atomically_and_cleans_up(tmp_path, rng):
    path = tmp_path / "post.h5"
    data.write_posterior_h5(path, {"train": _outputs(rng, 2)})
    before = data.read_posterior_h5(path)
    # h5py cannot store an object array: the write fails midway, the old file survives.
    with pytest.raises(TypeError):
        data.write_posterior_h5(path, {"train": {"factors": np.array([object()] * 2),
                                                 "ic_mean": np.zeros((2, 1))}})
    after = data.read_posterior_h5(path)
    assert set(after) == set(before)
    np.testing.assert_array_equal(after["train_factors"], before["train_factors"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["post.h5"]


@pytest.mark.parametrize("outputs, inds, message", [
    ({"eval": {}}, None, "unknown split 'eval'"),
    ({"train": {"rates": np.zeros((2, 3, 4))}}, None, "unknown output 'rates'"),
    ({"train": {"factors": np.zeros((2, 3, 4)), "ic_mean": np.zeros((3, 2))}}, None,
     r"train_ic_mean has shape \(3, 2\), expected 2 trials"),
    ({"train": {"factors": np.zeros((2, 3, 4))}}, {"train": np.arange(3)},
     r"train_inds has shape \(3,\), expected \(2,\)"),
])
def test_posterior_write_errors(tmp_path, outputs, inds, message):
    with pytest.raises(ValueError, match=message):
        data.write_posterior_h5(tmp_path / "p.h5", outputs, inds)
    assert not list(tmp_path.iterdir())
