"""Spike-count datasets: reading, validating and writing LFADS input and output files.

Three input layouts are read by :func:`load_dataset`, which detects the layout from the keys:

- lfads-torch: ``{split}_encod_data``, ``{split}_recon_data`` and optionally
  ``{split}_ext_input``, ``{split}_truth``, ``{split}_inds`` for split in train, valid, test
  (test optional), plus ``conversion_factor`` when truth is present.
- TF1 LFADS: ``train_data``, ``valid_data`` (the encoder input is also the reconstruction
  target), optionally ``{split}_ext_input``, ``{split}_truth``, ``{split}_inds`` and
  ``conversion_factor``.
- NLB tensors (nlb_tools' make_*_tensors): ``{train,eval}_spikes_heldin``,
  ``{train,eval}_spikes_heldout`` and optionally ``*_spikes_heldin_forward``,
  ``*_spikes_heldout_forward``, ``{train,eval}_behavior``. NLB's eval split becomes the valid
  split here. Held-in neurons are the encoder input; held-in then held-out neurons (in that
  order) form the reconstruction target, and forward-prediction bins, when present, are
  appended in time to the target. Parts an eval file leaves out (held-out or forward spikes
  of the test phase) become NaN, i.e. missing bins.

Ground truth convention (TF1 LFADS, also followed by lfads-torch): a file stores
``truth = expected counts per bin * conversion_factor``. The TF1 synthetic-data generator
stored rates normalised to [0, 1] with ``conversion_factor = 1 / (max_firing_rate * dt)``, and
TF1 LFADS plotted ``model rates * conversion_factor`` against the truth. Reading therefore
divides by ``conversion_factor`` (1 when the key is absent), so ``Split.truth`` is always in
expected counts per bin, the unit of the model's ``output_params``.

Several sessions (stitching, docs/stitching.md): :func:`load_sessions` reads one such file per
session. Sessions may differ in neurons and trials but must agree in bins and external
inputs. A session file may carry the alignment of its neurons to the shared encoder inputs
(:func:`session_alignment`): lfads-torch's ``readin_weight`` [n_s, N_e] and ``readout_bias``
[n_s], or TF1 LFADS's ``alignment_matrix_cxf`` [n_s, N_e] and ``alignment_bias_c`` [n_s].

Missing data: NaN in encod_data or recon_data marks a missing bin (no input, no loss). Every
other value must be a non-negative integer count. A bin missing from the encoder input must
also be missing from the reconstruction target where the two overlap, since both describe the
same recording.
"""
from __future__ import annotations

import glob
import os
import tempfile
from dataclasses import dataclass, field

import h5py
import numpy as np

from .resources import check_memory
from .rundir import umask_mode

SPLITS = ("train", "valid", "test")

POSTERIOR_FIELDS = (
    "output_params",
    "factors",
    "ic_mean",
    "ic_std",
    "co_means",
    "co_stds",
    "gen_states",
    "gen_init",
    "gen_inputs",
    "con_states",
)

_SPLIT_FIELDS = ("encod_data", "recon_data", "ext_input", "truth", "inds")
# Splits that training reads: each needs observed counts.
_TRAINED_SPLITS = ("train", "valid")


@dataclass
class Split:
    """The trials of one split (train, valid or test).

    Attributes:
        encod_data: encoder input, spike counts per bin, float32 [B, T_e, N_e]; NaN = missing.
        recon_data: reconstruction target, spike counts per bin, float32 [B, T_r, N_r]
            (T_r >= T_e, N_r >= N_e; neurons N_e.. are held out, bins T_e.. are forward
            prediction); NaN = missing.
        ext_input: external inputs, float32 [B, T_e or T_r, E], or None.
        truth: true rates, expected spike counts per bin, float32 [B, T_r, N_r], or None.
        inds: trial indices into the original trial list, int64 [B].
        extra: other per-split arrays of the file (behavior, condition ids, ...), keyed by
            their name without the split prefix; not validated.
    """

    encod_data: np.ndarray
    recon_data: np.ndarray
    ext_input: np.ndarray | None = None
    truth: np.ndarray | None = None
    inds: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        if self.inds is None:
            self.inds = np.arange(len(self.encod_data), dtype=np.int64)

    @property
    def n_trials(self) -> int:
        """Number of trials B."""
        return int(self.encod_data.shape[0])


@dataclass
class Dataset:
    """One session's trials, split into train, valid and (optionally) test.

    Attributes:
        train: the training split.
        valid: the validation split.
        test: the test split, or None.
        source: where the data came from (a file path, or "<arrays>"); used in messages.
        layout: "lfads_torch", "tf1", "nlb" or "arrays".
        other: arrays of the file that belong to no split (conversion_factor, dt,
            readin_weight, readout_bias, ...), not validated.
    """

    train: Split
    valid: Split
    test: Split | None = None
    source: str = "<arrays>"
    layout: str = "arrays"
    other: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def splits(self) -> dict[str, Split]:
        """The splits present, by name, in the order train, valid, test."""
        present = {"train": self.train, "valid": self.valid, "test": self.test}
        return {name: s for name, s in present.items() if s is not None}

    @property
    def encod_data_dim(self) -> int:
        """Neurons seen by the encoders, N_e."""
        return int(self.train.encod_data.shape[2])

    @property
    def recon_data_dim(self) -> int:
        """Neurons reconstructed, N_r (neurons N_e.. are held out)."""
        return int(self.train.recon_data.shape[2])

    @property
    def encod_seq_len(self) -> int:
        """Bins seen by the encoders, T_e."""
        return int(self.train.encod_data.shape[1])

    @property
    def recon_seq_len(self) -> int:
        """Bins reconstructed, T_r (bins T_e.. are forward prediction)."""
        return int(self.train.recon_data.shape[1])

    @property
    def ext_input_dim(self) -> int:
        """External input dimensions E (0 when there are none)."""
        ext = self.train.ext_input
        return 0 if ext is None else int(ext.shape[2])

    @property
    def heldout_neurons(self) -> np.ndarray:
        """Indices of the held-out neurons in recon_data, int64 [N_r - N_e]."""
        return np.arange(self.encod_data_dim, self.recon_data_dim, dtype=np.int64)

    @property
    def has_truth(self) -> bool:
        """Whether every split carries true rates."""
        return all(s.truth is not None for s in self.splits.values())


def load_dataset(path: str | os.PathLike, group: str | None = None) -> Dataset:
    """Reads and validates one session's HDF5 file, detecting its layout.

    Args:
        path: the HDF5 file.
        group: the HDF5 group holding the arrays. None: the root, or the only group when the
            root holds groups and no arrays (as in NLB evaluation files).

    Returns:
        The dataset, arrays float32 (inds int64), truth in expected counts per bin.

    Raises:
        ValueError: the layout is not recognised, a required key is missing, or the data fail
            validation; the message names the file, the key and the problem.
    """
    source = os.fspath(path)
    arrays = _read_h5(source, group)
    if "train_encod_data" in arrays:
        return _from_lfads_torch(source, arrays, layout="lfads_torch")
    if "train_spikes_heldin" in arrays:
        return _from_nlb(source, arrays)
    if "train_data" in arrays:
        return _from_tf1(source, arrays)
    raise ValueError(
        f"{source}: unknown layout; expected train_encod_data (lfads-torch), train_data (TF1) "
        f"or train_spikes_heldin (NLB), found keys {sorted(arrays)}"
    )


def load_sessions(paths, group: str | None = None) -> list[Dataset]:
    """Reads one HDF5 file per session and checks that the sessions fit one model.

    Args:
        paths: a glob pattern (its matches in sorted order are the sessions 0, 1, ...), or a
            list of paths (in the order given; entries may be patterns too).
        group: as in load_dataset, for every file.

    Returns:
        One Dataset per session.

    Raises:
        ValueError: no file matches, a file fails load_dataset (a split with zero trials
            among other problems), the sessions disagree in encod_seq_len, recon_seq_len or
            ext_input_dim, or an alignment matrix does not fit its session's neurons or the
            other sessions' matrices.
    """
    files = expand_paths(paths, "session file")
    if not files:
        raise ValueError("no session files given")
    sessions = [load_dataset(f, group) for f in files]
    first = sessions[0]
    for ds in sessions[1:]:
        for name in ("encod_seq_len", "recon_seq_len", "ext_input_dim"):
            got, want = getattr(ds, name), getattr(first, name)
            if got != want:
                raise ValueError(f"{ds.source}: {name} is {got} but {first.source} has {want}; "
                                 "all sessions of one model need the same bins and inputs")
    dims = {}
    for ds in sessions:
        a = session_alignment(ds)
        if a is not None:
            dims.setdefault(a[0].shape[1], ds.source)
    if len(dims) > 1:
        detail = ", ".join(f"{src}: {k}" for k, src in dims.items())
        raise ValueError(f"the sessions' alignment matrices map to different dimensions ({detail})")
    return sessions


def expand_paths(paths, what: str = "file") -> list[str]:
    """Paths with each glob pattern replaced by its matches, in sorted order.

    Args:
        paths: a path or pattern, or a list of them (kept in the order given).
        what: what a path names, for the message.

    Raises:
        ValueError: a pattern matches no file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in map(os.fspath, paths):
        if glob.has_magic(p):
            matches = sorted(glob.glob(p))
            if not matches:
                raise ValueError(f"no {what} matches {p!r}")
            files += matches
        else:
            files.append(p)
    return files


def session_alignment(dataset: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """The alignment of a session's neurons to the shared encoder inputs, if its file has one.

    The shared input of a bin with counts x [n_s] is ``(x - bias) @ weight``.

    Args:
        dataset: one session.

    Returns:
        (weight [n_s, N_e], bias [n_s]) as float64 from lfads-torch's readin_weight and
        readout_bias or TF1's alignment_matrix_cxf and alignment_bias_c (bias 0 when the file
        has the matrix only), or None when the file has neither matrix.

    Raises:
        ValueError: the matrix is not 2-D, its rows are not the session's encoder neurons,
            it is not finite, or the bias does not have one entry per neuron.
    """
    keys = (("readin_weight", "readout_bias"), ("alignment_matrix_cxf", "alignment_bias_c"))
    for w_key, b_key in keys:
        if w_key not in dataset.other:
            continue
        weight = np.asarray(dataset.other[w_key], dtype=np.float64)
        n = dataset.encod_data_dim
        if weight.ndim != 2 or weight.shape[0] != n:
            raise ValueError(f"{dataset.source}: {w_key} has shape {weight.shape} but the session has "
                             f"{n} encoder neurons; expected [{n}, encod_data_dim]")
        bias = np.asarray(dataset.other.get(b_key, np.zeros(n)), dtype=np.float64).reshape(-1)
        if bias.shape != (n,):
            raise ValueError(f"{dataset.source}: {b_key} has {bias.size} entries but the session has "
                             f"{n} encoder neurons")
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise ValueError(f"{dataset.source}: {w_key} or {b_key} has NaN or infinite values")
        return weight, bias
    return None


def from_arrays(
    train_encod_data: np.ndarray,
    valid_encod_data: np.ndarray,
    *,
    train_recon_data: np.ndarray | None = None,
    valid_recon_data: np.ndarray | None = None,
    train_ext_input: np.ndarray | None = None,
    valid_ext_input: np.ndarray | None = None,
    train_truth: np.ndarray | None = None,
    valid_truth: np.ndarray | None = None,
    train_inds: np.ndarray | None = None,
    valid_inds: np.ndarray | None = None,
    test_encod_data: np.ndarray | None = None,
    test_recon_data: np.ndarray | None = None,
    test_ext_input: np.ndarray | None = None,
    test_truth: np.ndarray | None = None,
    test_inds: np.ndarray | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Dataset:
    """Builds and validates a dataset from numpy arrays (lfads-torch names and shapes).

    Args:
        train_encod_data: spike counts [B, T_e, N_e] (NaN = missing), any real dtype.
        valid_encod_data: spike counts [B_v, T_e, N_e].
        train_recon_data, valid_recon_data: reconstruction targets [B, T_r, N_r]; None: the
            encoder input.
        train_ext_input, valid_ext_input: external inputs [B, T_e or T_r, E], or None.
        train_truth, valid_truth: true rates, expected counts per bin [B, T_r, N_r], or None.
        train_inds, valid_inds: trial indices [B]; None: 0..B-1.
        test_*: the same for an optional test split (present when test_encod_data is given;
            test_recon_data None: the encoder input).
        extra: further per-split arrays named ``{split}_{name}`` (e.g. train_behavior); each
            lands in ``Split.extra[name]``.

    Returns:
        The dataset, layout "arrays".

    Raises:
        ValueError: the arrays fail validation (the message uses the argument names).
    """
    arrays = {
        "train_encod_data": train_encod_data,
        "valid_encod_data": valid_encod_data,
        "train_recon_data": train_encod_data if train_recon_data is None else train_recon_data,
        "valid_recon_data": valid_encod_data if valid_recon_data is None else valid_recon_data,
        "train_ext_input": train_ext_input,
        "valid_ext_input": valid_ext_input,
        "train_truth": train_truth,
        "valid_truth": valid_truth,
        "train_inds": train_inds,
        "valid_inds": valid_inds,
        "test_encod_data": test_encod_data,
        "test_recon_data": test_encod_data if test_recon_data is None else test_recon_data,
        "test_ext_input": test_ext_input,
        "test_truth": test_truth,
        "test_inds": test_inds,
    }
    for key, value in (extra or {}).items():
        if key in arrays or not key.startswith(tuple(f"{s}_" for s in SPLITS)):
            raise ValueError(f"extra array name {key!r} must be '<split>_<name>' and new")
        arrays[key] = value
    arrays = {k: v for k, v in arrays.items() if v is not None}
    return _from_lfads_torch("<arrays>", arrays, layout="arrays")


def write_posterior_h5(
    path: str | os.PathLike,
    outputs_by_split: dict[str, dict[str, np.ndarray]],
    inds_by_split: dict[str, np.ndarray] | None = None,
) -> str:
    """Writes model outputs with lfads-torch's posterior keys, atomically.

    Keys written: ``{split}_{name}`` for each output name, and ``{split}_inds``. The file
    appears complete or not at all: it is written to a temporary file in the same directory
    and renamed over ``path``.

    Args:
        path: the output HDF5 file.
        outputs_by_split: split name (train, valid, test) -> output name (one of
            POSTERIOR_FIELDS: output_params [B, T_r, N_r] expected counts per bin,
            factors [B, T_r, F], ic_mean [B, ic_dim], ic_std [B, ic_dim],
            co_means [B, T_r, U], co_stds [B, T_r, U], gen_states [B, T_r, G],
            gen_init [B, G], gen_inputs [B, T_r, U + E], con_states [B, T_r, C]) -> array.
        inds_by_split: split name -> trial indices [B]; None or a missing split: 0..B-1.

    Returns:
        The path written, as a string.

    Raises:
        ValueError: unknown split or output name, or arrays of one split disagree on B.
    """
    path = os.fspath(path)
    arrays: dict[str, np.ndarray] = {}
    for split, outputs in outputs_by_split.items():
        if split not in SPLITS:
            raise ValueError(f"{path}: unknown split {split!r}; expected one of {SPLITS}")
        n_trials = None
        for name, value in outputs.items():
            if name not in POSTERIOR_FIELDS:
                raise ValueError(
                    f"{path}: unknown output {name!r} for {split}; expected one of "
                    f"{POSTERIOR_FIELDS}"
                )
            value = np.asarray(value)
            if n_trials is not None and value.shape[:1] != (n_trials,):
                raise ValueError(
                    f"{path}: {split}_{name} has shape {value.shape}, expected {n_trials} "
                    f"trials like the other {split} outputs"
                )
            n_trials = value.shape[0]
            arrays[f"{split}_{name}"] = value
        inds = (inds_by_split or {}).get(split)
        inds = np.arange(n_trials or 0) if inds is None else np.asarray(inds)
        if n_trials is not None and inds.shape != (n_trials,):
            raise ValueError(
                f"{path}: {split}_inds has shape {inds.shape}, expected ({n_trials},)"
            )
        arrays[f"{split}_inds"] = inds.astype(np.int64)
    write_h5_atomic(path, arrays)
    return path


def read_posterior_h5(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every array of a posterior file (as written by write_posterior_h5).

    Returns:
        Key -> array, e.g. "valid_output_params" -> float32 [B, T_r, N_r].
    """
    return _read_h5(os.fspath(path), None)


def write_h5_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> str:
    """Writes arrays as root datasets of an HDF5 file, atomically.

    The data go to a temporary file in the destination's directory (so the rename stays on
    one file system), which then replaces ``path``; readers never see a partial file.

    Args:
        path: the destination.
        arrays: key -> array (or scalar).

    Returns:
        The path written, as a string.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".h5", dir=directory)
    os.close(fd)
    # mkstemp creates the file 0600; a lab's group should read outputs as the umask allows.
    os.chmod(tmp, umask_mode(0o666))
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in arrays.items():
                f.create_dataset(key, data=value)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


# Layouts ----------------------------------------------------------------------------------


def _from_lfads_torch(source: str, arrays: dict, layout: str) -> Dataset:
    _require(source, arrays, ("train_encod_data", "train_recon_data",
                              "valid_encod_data", "valid_recon_data"))
    factor = _conversion_factor(source, arrays)
    splits, names = {}, {}
    for split in SPLITS:
        if f"{split}_encod_data" not in arrays:
            continue
        if split == "test" and "test_recon_data" not in arrays:
            arrays = _missing_test_recon(arrays)
        _require(source, arrays, (f"{split}_recon_data",))
        names[split] = {f: f"{split}_{f}" for f in _SPLIT_FIELDS}
        splits[split] = _split_from_keys(source, arrays, split, names[split], factor)
    return _finish(source, layout, arrays, splits, names)


def _missing_test_recon(arrays: dict) -> dict:
    """A test split given without recon_data (lfads-torch's files for hidden test trials):
    its target is all NaN (missing), train_recon_data's bins and neurons, so outputs can be
    inferred and nothing is scored."""
    n_trials = np.shape(arrays["test_encod_data"])[0]
    shape = (n_trials,) + tuple(np.shape(arrays["train_recon_data"])[1:])
    return {**arrays, "test_recon_data": np.full(shape, np.nan, np.float32)}


def _from_tf1(source: str, arrays: dict) -> Dataset:
    _require(source, arrays, ("train_data", "valid_data"))
    factor = _conversion_factor(source, arrays)
    splits, names = {}, {}
    for split in ("train", "valid"):
        names[split] = {f: f"{split}_{f}" for f in _SPLIT_FIELDS}
        names[split]["encod_data"] = names[split]["recon_data"] = f"{split}_data"
        splits[split] = _split_from_keys(source, arrays, split, names[split], factor)
    return _finish(source, "tf1", arrays, splits, names)


def _from_nlb(source: str, arrays: dict) -> Dataset:
    _require(source, arrays, ("train_spikes_heldin", "train_spikes_heldout",
                              "eval_spikes_heldin"))
    forward = {p: f"train_spikes_held{p}_forward" in arrays for p in ("in", "out")}
    if forward["in"] != forward["out"]:
        missing = "out" if forward["in"] else "in"
        raise ValueError(f"{source}: train_spikes_held{missing}_forward is missing; forward "
                         "spikes need both held-in and held-out neurons")
    if not forward["in"]:
        for p in ("in", "out"):
            if f"eval_spikes_held{p}_forward" in arrays:
                raise ValueError(f"{source}: eval_spikes_held{p}_forward is present but "
                                 f"train_spikes_held{p}_forward is missing")
    splits, names = {}, {}
    n_heldout = n_forward = None
    for split, prefix in (("train", "train"), ("valid", "eval")):
        encod, recon, recon_name = _nlb_recon(source, arrays, prefix, n_heldout, n_forward)
        n_heldout = recon.shape[2] - encod.shape[2]
        n_forward = recon.shape[1] - encod.shape[1]
        names[split] = {"encod_data": f"{prefix}_spikes_heldin", "recon_data": recon_name,
                        "ext_input": "", "truth": "", "inds": ""}
        consumed = {f"{prefix}_spikes_held{p}{s}" for p in ("in", "out")
                    for s in ("", "_forward")}
        splits[split] = Split(encod, recon, extra=_extras(arrays, prefix, consumed))
    return _finish(source, "nlb", arrays, splits, names)


def _nlb_recon(source, arrays, prefix, n_heldout, n_forward):
    """Assembles NLB pieces into encod [B, T, Ni], recon [B, T + Tf, Ni + No] and a name.

    n_heldout and n_forward size the NaN placeholders of pieces the file leaves out; the
    train split (which has every piece) passes None.
    """
    heldin_key = f"{prefix}_spikes_heldin"
    heldin = _check_counts(source, heldin_key, arrays[heldin_key])
    n_trials, n_bins, n_heldin = heldin.shape

    def piece(key, steps, width):
        """One more block of counts; steps, width: (size, the key it must match) or None."""
        if key not in arrays:
            return np.full((n_trials, steps[0], width[0]), np.nan, np.float32)
        x = _check_counts(source, key, arrays[key])
        _same_shape(source, key, x, ((n_trials, heldin_key), steps, width))
        return x

    # Eval pieces must match the train split's held-out neurons and forward bins.
    heldout = piece(f"{prefix}_spikes_heldout", (n_bins, heldin_key),
                    None if n_heldout is None else (n_heldout, "train_spikes_heldout"))
    recon = np.concatenate([heldin, heldout], axis=2)
    name = f"{heldin_key}+heldout"
    forward_key = f"{prefix}_spikes_heldin_forward"
    # The train split decides whether there are forward bins; eval follows it.
    has_forward = forward_key in arrays if n_forward is None else n_forward > 0
    if has_forward:
        fwd_in = piece(forward_key,
                       None if n_forward is None else (n_forward, "train_spikes_heldin_forward"),
                       (n_heldin, heldin_key))
        fwd_out = piece(f"{prefix}_spikes_heldout_forward", (fwd_in.shape[1], forward_key),
                        (heldout.shape[2], f"{prefix}_spikes_heldout"))
        recon = np.concatenate([recon, np.concatenate([fwd_in, fwd_out], axis=2)], axis=1)
        name += "+forward"
    return heldin, recon, name


def _split_from_keys(source, arrays, split, names, factor) -> Split:
    encod = _check_counts(source, names["encod_data"], arrays[names["encod_data"]])
    recon = encod
    if names["recon_data"] != names["encod_data"]:  # TF1 files hold one array for both
        recon = _check_counts(source, names["recon_data"], arrays[names["recon_data"]])
    ext = arrays.get(names["ext_input"])
    if ext is not None:
        ext = _check_real(source, names["ext_input"], ext, allow_negative=True)
    truth = arrays.get(names["truth"])
    if truth is not None:
        truth = _check_real(source, names["truth"], truth, allow_negative=False) / factor
    inds = arrays.get(names["inds"])
    if inds is not None:
        inds = _check_inds(source, names["inds"], inds)
    consumed = {names[f] for f in _SPLIT_FIELDS}
    return Split(encod, recon, ext, truth, inds, _extras(arrays, split, consumed))


def _finish(source, layout, arrays, splits, names) -> Dataset:
    for split, s in splits.items():
        _check_split(source, split, s, names[split])
    _check_across_splits(source, splits, names)
    prefixes = ("train_", "valid_", "test_", "eval_")
    other = {k: v for k, v in arrays.items() if not k.startswith(prefixes)}
    return Dataset(splits["train"], splits["valid"], splits.get("test"), source, layout, other)


def _extras(arrays, prefix, consumed) -> dict[str, np.ndarray]:
    start = f"{prefix}_"
    return {k[len(start):]: v for k, v in arrays.items()
            if k.startswith(start) and k not in consumed}


def _conversion_factor(source, arrays) -> float:
    if "conversion_factor" not in arrays:
        return 1.0
    factor = np.asarray(arrays["conversion_factor"])
    if not (np.issubdtype(factor.dtype, np.integer) or np.issubdtype(factor.dtype, np.floating)):
        raise ValueError(f"{source}: conversion_factor must be one positive number, "
                         f"got dtype {factor.dtype}")
    factor = factor.astype(np.float64)
    if factor.size != 1 or not np.isfinite(factor).all() or float(factor.ravel()[0]) <= 0:
        raise ValueError(f"{source}: conversion_factor must be one positive number, "
                         f"got {arrays['conversion_factor']!r}")
    return float(factor.ravel()[0])


# Validation -------------------------------------------------------------------------------


def _require(source, arrays, keys):
    for key in keys:
        if key not in arrays:
            raise ValueError(f"{source}: required key {key} is missing "
                             f"(found {sorted(arrays)})")


def _check_counts(source, key, value) -> np.ndarray:
    """Spike counts: 3-D, numeric, NaN or non-negative integers; returns float32."""
    x = _as_3d_float(source, key, value)
    _report(source, key, np.isinf(x), "infinite values")
    with np.errstate(invalid="ignore"):
        _report(source, key, x < 0, "negative counts")
        _report(source, key, np.isfinite(x) & (x != np.round(x)), "non-integer counts")
    return x.astype(np.float32, copy=False)


def _check_real(source, key, value, allow_negative) -> np.ndarray:
    """External inputs or truth: 3-D, finite (never missing); returns float32."""
    x = _as_3d_float(source, key, value)
    channel = "input" if allow_negative else "neuron"
    _report(source, key, ~np.isfinite(x), "NaN or infinite values (cannot be missing)", channel)
    if not allow_negative:
        _report(source, key, x < 0, "negative rates")
    return x.astype(np.float32, copy=False)


def _check_inds(source, key, value) -> np.ndarray:
    inds = np.asarray(value)
    if inds.ndim != 1 or not np.issubdtype(inds.dtype, np.integer):
        raise ValueError(f"{source}: {key} must be 1-D integers, got shape {inds.shape} "
                         f"dtype {inds.dtype}")
    return inds.astype(np.int64, copy=False)


def _as_3d_float(source, key, value) -> np.ndarray:
    x = np.asarray(value)
    if x.ndim != 3:
        raise ValueError(f"{source}: {key} must be 3-D [trials, bins, channels], got shape "
                         f"{x.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(f"{source}: {key} must be numeric, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{source}: {key} must be real, got complex dtype {x.dtype}")
    return x.astype(np.float64, copy=False) if x.dtype != np.float32 else x


def _report(source, key, bad, problem, channel="neuron"):
    count = int(np.count_nonzero(bad))
    if count:
        trial, step, index = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{source}: {key} has {problem} at {count} "
                         f"bin{'s' if count > 1 else ''} (first at trial {trial}, bin {step}, "
                         f"{channel} {index})")


def _same_shape(source, key, x, expected):
    """Checks x's (trials, bins, neurons) against (size, key it comes from) or None each."""
    labels = ("trials", "bins", "neurons")
    for axis, want in enumerate(expected):
        if want is not None and x.shape[axis] != want[0]:
            raise ValueError(f"{source}: {key} has {x.shape[axis]} {labels[axis]} but "
                             f"{want[1]} has {want[0]}")


def _check_split(source, split: str, s: Split, names: dict[str, str]):
    encod, recon = s.encod_data, s.recon_data
    n_e, n_r = names["encod_data"], names["recon_data"]
    if s.n_trials == 0:
        raise ValueError(f"{source}: {n_e} has no trials")
    if split in _TRAINED_SPLITS and np.isnan(recon).all():
        raise ValueError(f"{source}: {n_r} has no observed bins (all NaN); the {split} "
                         "split needs counts to fit or validate on")
    _same_shape(source, n_r, recon, ((s.n_trials, n_e), None, None))
    if recon.shape[1] < encod.shape[1]:
        raise ValueError(f"{source}: {n_r} has {recon.shape[1]} bins, fewer than the "
                         f"{encod.shape[1]} of {n_e} (forward-prediction bins come after)")
    if recon.shape[2] < encod.shape[2]:
        raise ValueError(f"{source}: {n_r} has {recon.shape[2]} neurons, fewer than the "
                         f"{encod.shape[2]} of {n_e} (held-out neurons come after the "
                         "held-in ones)")
    t_e, c_e = encod.shape[1:]
    overlap = recon[:, :t_e, :c_e]
    _report(source, n_r, np.isnan(encod) & ~np.isnan(overlap),
            f"counts where {n_e} is NaN (missing)")
    if s.ext_input is not None:
        _same_shape(source, names["ext_input"], s.ext_input, ((s.n_trials, n_e), None, None))
        if s.ext_input.shape[1] not in (t_e, recon.shape[1]):
            raise ValueError(f"{source}: {names['ext_input']} has {s.ext_input.shape[1]} "
                             f"bins; expected {t_e} (as {n_e}) or {recon.shape[1]} (as {n_r})")
    if s.truth is not None and s.truth.shape != recon.shape:
        raise ValueError(f"{source}: {names['truth']} has shape {s.truth.shape} but {n_r} "
                         f"has {recon.shape}")
    if s.inds.shape != (s.n_trials,):
        raise ValueError(f"{source}: {names['inds']} has {s.inds.shape[0]} entries but "
                         f"{n_e} has {s.n_trials} trials")


def _check_across_splits(source, splits: dict[str, Split], names):
    ref, ref_names = splits["train"], names["train"]
    for split, s in splits.items():
        if split == "train":
            continue
        for fld in ("encod_data", "recon_data"):
            for axis, label in ((1, "bins"), (2, "neurons")):
                got, want = getattr(s, fld).shape[axis], getattr(ref, fld).shape[axis]
                if got != want:
                    raise ValueError(f"{source}: {names[split][fld]} has {got} {label} but "
                                     f"{ref_names[fld]} has {want}")
        if (s.ext_input is None) != (ref.ext_input is None):
            present, absent = ((names[split], ref_names) if ref.ext_input is None
                               else (ref_names, names[split]))
            raise ValueError(f"{source}: {absent['ext_input']} is missing but "
                             f"{present['ext_input']} is present")
        if s.ext_input is not None and s.ext_input.shape[1:] != ref.ext_input.shape[1:]:
            raise ValueError(f"{source}: {names[split]['ext_input']} has shape "
                             f"{s.ext_input.shape} but {ref_names['ext_input']} has "
                             f"{ref.ext_input.shape}")


# HDF5 -------------------------------------------------------------------------------------


def _read_h5(source: str, group: str | None) -> dict[str, np.ndarray]:
    try:
        f = h5py.File(source, "r")
    except OSError as e:
        raise ValueError(f"{source}: cannot open as HDF5 ({e})") from e
    with f:
        node = f
        if group is not None:
            if group not in f:
                raise ValueError(f"{source}: group {group!r} not found (found {sorted(f)})")
            node = f[group]
        else:
            groups = [k for k, v in f.items() if isinstance(v, h5py.Group)]
            has_arrays = any(isinstance(v, h5py.Dataset) for v in f.values())
            if not has_arrays and len(groups) == 1:
                node = f[groups[0]]
            elif not has_arrays and groups:
                raise ValueError(f"{source}: arrays are in several groups {groups}; "
                                 "pass group=")
        datasets = {k: v for k, v in node.items() if isinstance(v, h5py.Dataset)}
        _check_declared_size(source, datasets)
        try:
            return {k: v[()] for k, v in datasets.items()}
        except (OSError, KeyError, TypeError) as e:  # damaged chunks, unreadable filters
            raise ValueError(f"{source}: cannot read its arrays ({e})") from e


def _check_declared_size(source: str, datasets: dict) -> None:
    """Refuses a file whose arrays, as declared (compressed files may be small on disk),
    would not fit in memory once read and converted to float (up to 3 copies)."""
    declared = sum(int(d.size or 0) * max(d.dtype.itemsize, 1) for d in datasets.values())
    check_memory(3 * declared, f"{source} (its arrays declare {declared:,} bytes)")
