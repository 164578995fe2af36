"""Property-based tests (hypothesis) through the public API and the command line: random
configs, shapes, dtypes, values and damaged files. Every outcome is a result or a clear
ValueError/TypeError (on the command line: one error line and exit status 2), never a crash or
another exception type. Derandomised and bounded for CI (docs/reliability.md gives the
example counts)."""
import contextlib
import dataclasses
import os
from unittest import mock

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lfads_fast import LFADS, LFADSConfig, cli, data, ops, synth
from lfads_fast.train import Trainer, TrainConfig, config_for_data, load_checkpoint

# Same examples on every run (reproducible), no example database, no per-example deadline.
FUZZ = dict(derandomize=True, database=None, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                   HealthCheck.data_too_large])
CLEAR = (ValueError, TypeError)
TINY = dict(encod_data_dim=5, encod_seq_len=6, ic_enc_dim=4, ci_enc_dim=3, con_dim=3, co_dim=2,
            ic_dim=3, gen_dim=5, fac_dim=3)

# Any value a config file or a caller might pass.
values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.integers(-5, 300).map(np.int64), st.floats(-1e3, 1e3).map(np.float32),
    st.lists(st.integers(-3, 20), max_size=3), st.just(1j),
)


def field_dicts(cls):
    names = [f.name for f in dataclasses.fields(cls)]
    return st.dictionaries(st.sampled_from(names + ["no_such_field"]), values, max_size=4)


@settings(max_examples=200, **FUZZ)
@given(field_dicts(LFADSConfig))
def test_model_config(fields):
    try:
        cfg = LFADSConfig.from_dict(fields)
    except CLEAR:
        return
    LFADSConfig.from_dict(cfg.to_dict())  # a valid config round-trips
    cfg.to_json()


@settings(max_examples=200, **FUZZ)
@given(field_dicts(TrainConfig))
def test_train_config(fields):
    try:
        cfg = TrainConfig.from_dict(fields)
    except CLEAR:
        return
    TrainConfig.from_dict(cfg.to_dict())


@pytest.fixture(scope="module")
def model():
    return LFADS(LFADSConfig(**TINY, dropout_rate=0.1), seed=0)


arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int32, np.uint8, np.complex64, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7),
    elements=None)


@settings(max_examples=120, **FUZZ)
@given(encod=arrays, recon=st.one_of(st.none(), arrays), sample=st.booleans(),
       seed=st.one_of(st.none(), st.integers(0, 2**32)))
def test_forward_with_random_arrays(model, encod, recon, sample, seed):
    try:
        out = model.forward(encod, sample=sample, seed=seed, recon_data=recon)
    except CLEAR:
        return
    assert out["output_params"].shape == (encod.shape[0], 6, 5)
    assert np.all(np.isfinite(out["output_params"]))


@settings(max_examples=80, **FUZZ)
@given(B=st.integers(1, 4), nan_frac=st.floats(0, 1), counts=st.integers(0, 50),
       kl_ramp=st.floats(0, 1),
       seed=st.integers(0, 2**32 - 1))
def test_loss_and_grads_on_random_counts(model, B, nan_frac, counts, kl_ramp, seed):
    rng = np.random.default_rng(seed)
    x = rng.poisson(counts, (B, 6, 5)).astype(np.float32)
    x[rng.random(x.shape) < nan_frac] = np.nan
    try:
        batch = model.make_batch(x)
        noise = model.draw_noise(batch, rng)
        terms, grad = model.loss_and_grads(batch, noise, kl_ramp=kl_ramp)
    except CLEAR:
        return
    assert grad.shape == model.flat.shape and set(terms) >= {"loss", "recon"}


@settings(max_examples=120, **FUZZ)
@given(train=arrays, valid=arrays)
def test_from_arrays(train, valid):
    try:
        ds = data.from_arrays(train, valid)
    except CLEAR:
        return
    assert ds.train.encod_data.dtype == np.float32 and ds.train.encod_data.ndim == 3


_KEYS = ["train_encod_data", "valid_encod_data", "train_recon_data", "valid_recon_data",
         "train_data", "valid_data", "train_ext_input", "train_truth", "conversion_factor",
         "train_inds", "train_spikes_heldin", "train_spikes_heldout", "eval_spikes_heldin"]


@settings(max_examples=60, **FUZZ)
@given(st.dictionaries(st.sampled_from(_KEYS), arrays, min_size=1, max_size=5))
def test_load_dataset_from_random_files(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "f.h5"
    with h5py.File(path, "w") as f:
        for k, v in content.items():
            f.create_dataset(k, data=v)
    try:
        data.load_dataset(path)
    except CLEAR:
        pass


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    ds = synth.chaotic_rnn(n_conditions=6, trials_per_condition=3, train_per_condition=2,
                           n_bins=8, n_neurons=6, seed=1).to_dataset()
    out = tmp_path_factory.mktemp("ckpt")
    cfg = config_for_data(ds, ic_enc_dim=4, ic_dim=3, gen_dim=5, fac_dim=3, co_dim=0,
                          ci_enc_dim=0, con_dim=0)
    Trainer(LFADS(cfg), ds, TrainConfig(batch_size=6, max_epochs=1), out, progress=False).fit()
    return (out / "checkpoints" / "last.h5").read_bytes()


@settings(max_examples=150, **FUZZ)
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                      min_size=1, max_size=40),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_damaged_checkpoints(tmp_path_factory, checkpoint_bytes, edits, cut):
    blob = bytearray(checkpoint_bytes)
    for where, xor in edits:
        blob[int(where * len(blob))] ^= xor
    if cut is not None:
        blob = blob[: int(cut * len(blob))]
    path = tmp_path_factory.mktemp("damaged") / "c.h5"
    path.write_bytes(bytes(blob))
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    good_path = path.with_name("good.h5")
    good_path.write_bytes(checkpoint_bytes)
    good = load_checkpoint(good_path)
    assert np.array_equal(ckpt.flat, good.flat) and ckpt.state == good.state


small = hnp.arrays(dtype=st.sampled_from([np.float32, np.float64, np.int64]),
                   shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
                   elements=st.integers(-10, 10))


@settings(max_examples=150, **FUZZ)
@given(a=small, b=small, alias=st.sampled_from(["none", "a", "b"]), beta=st.floats(-2, 2),
       sparse=st.sampled_from([None, "a", "b"]), transpose=st.booleans())
def test_matmul(a, b, alias, beta, sparse, transpose):
    if transpose and a.ndim == 2:  # the layout the sparse weight gradient takes
        a = np.ascontiguousarray(a.T).T
    out = {"none": None, "a": a, "b": b}[alias]
    try:
        r = ops.matmul(a, b, out=out, beta=beta if out is not None else 0.0, sparse=sparse)
    except CLEAR:
        return
    if out is None:
        np.testing.assert_allclose(r, a @ b, rtol=1e-4, atol=1e-4)


@settings(max_examples=150, **FUZZ)
@given(n=st.integers(0, 6), dtype=st.sampled_from([np.float32, np.float64, np.int32]),
       lr=st.floats(allow_nan=True, allow_infinity=True), beta1=st.floats(-1, 2),
       eps=st.floats(-1, 1), step=st.integers(-2, 5), same=st.booleans())
def test_adam_step(n, dtype, lr, beta1, eps, step, same):
    rng = np.random.default_rng(n)
    p = rng.standard_normal(n).astype(dtype)
    g = p if same else rng.standard_normal(n).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    try:
        norm = ops.adam_step(p, g, m, v, lr=lr, beta1=beta1, eps=eps, step=step)
    except CLEAR:
        return
    assert np.all(np.isfinite(p)) and np.isfinite(norm)


class _Reached(BaseException):
    """Raised where the command would start its work: the arguments were accepted."""


_SET_KEYS = ["gen_dim", "model.gen_dim", "train.lr_init", "lr_init", "batch_size", "cell_clip",
             "ic_prior_mean", "recon_reduce_mean", "session_neurons", "train_readin", "seed",
             "max_epochs", "kl_co_scale", "co_dim", "nope", "model.", "train.x", ""]
_SET_VALUES = st.one_of(st.sampled_from(["1", "-1", "0", "1e400", "-1e400", ".nan", ".inf",
                                         "yes", "maybe", "[1, 2", "[3]", "{a: 1}", "null",
                                         "9" * 40, "1.5", "0x10", "'12'"]),
                        st.text(max_size=6))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    sd = synth.chaotic_rnn(n_conditions=6, trials_per_condition=3, train_per_condition=2,
                           n_bins=8, n_neurons=6, seed=2)
    return str(synth.save_h5(sd, tmp_path_factory.mktemp("cli") / "d.h5"))


@settings(max_examples=120, **FUZZ)
@given(sets=st.lists(st.tuples(st.sampled_from(_SET_KEYS), _SET_VALUES), max_size=3),
       threads=st.one_of(st.none(), st.integers(-2, 10**5).map(str), st.text(max_size=3)))
def test_cli_train_arguments(tmp_path_factory, capsys, data_file, sets, threads):
    out = tmp_path_factory.mktemp("run")
    argv = [] if threads is None else ["--threads", threads]
    argv += ["train", data_file, "--out", str(out), "--quiet"]
    for k, v in sets:
        argv += ["--set", f"{k}={v}"]
    old = ops.get_num_threads()
    capsys.readouterr()
    with mock.patch.object(Trainer, "fit", side_effect=_Reached), contextlib.suppress(_Reached):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse: usage line, status 2
            code = e.code
        finally:
            ops.set_num_threads(old)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert len([ln for ln in err.splitlines() if "error" in ln]) == 1, err


@settings(max_examples=40, **FUZZ)
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                      min_size=1, max_size=20),
       out_kind=st.sampled_from(["file", "dir", "under_file"]))
def test_cli_infer_with_damaged_checkpoints(tmp_path_factory, capsys, checkpoint_bytes,
                                           data_file, edits, out_kind):
    work = tmp_path_factory.mktemp("infer")
    blob = bytearray(checkpoint_bytes)
    for where, xor in edits:
        blob[int(where * len(blob))] ^= xor
    (work / "c.h5").write_bytes(bytes(blob))
    (work / "f").write_text("")
    out = {"file": work / "p.h5", "dir": work, "under_file": work / "f" / "p.h5"}[out_kind]
    code = cli.main(["infer", str(work / "c.h5"), data_file, "--out", str(out), "--samples", "1"])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err
    else:
        assert out_kind == "file" and os.path.isfile(out)
