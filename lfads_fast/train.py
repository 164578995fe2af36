"""Training LFADS: Adam over epochs, KL and L2 ramps, learning-rate decay on plateaus, early
stopping, atomic checkpoints that resume bit for bit, a guard against non-finite steps, and
per-epoch logs.

The semantics follow lfads-torch's LightningModule and its default callbacks:

- ramps: ``ramp(epoch) = clamp((epoch + 1 - start) / (increase + 1), 0, 1)`` for the KL and L2
  terms; weight decay is ramped with the L2 ramp;
- AdamW with global gradient-norm clipping (``max_grad_norm``, lfads-torch's
  ``gradient_clip_val``);
- the validation reconstruction ``valid_recon`` is averaged over the validation trials and
  exponentially smoothed across epochs, ``smth = coef * smth_prev + (1 - coef) * current``
  (``recon_smth_coef`` = 0.3, lfads-torch's ``valid/recon_smth``); it drives the learning-rate
  schedule (ReduceLROnPlateau: mode min, threshold 0, factor ``lr_decay``, patience
  ``lr_patience``, floor ``lr_stop``), early stopping (patience ``early_stopping_patience``)
  and the choice of the best checkpoint;
- validation runs without dropout and with sampled posteriors;
- sample validation (``sv_rate`` > 0): a fixed random fraction of each trial's bins (drawn
  from ``sv_seed``) is hidden from the encoders and left out of the reconstruction loss; the
  loss on those bins is logged as ``valid_recon_sv``.

Several sessions (a model with ``session_neurons``, docs/stitching.md) train the same way on
a list of datasets, one per session: every step holds up to ``batch_size`` trials of every
session (stitching.session_batches), the read-ins stay frozen unless the config has
``train_readin`` (LFADS.trainable_mask), and each validation quantity is the mean over the
sessions of that session's value, as the model's training loss is (``valid_recon`` drives
the schedules as with one session); the per-session values are logged too
(``valid_recon_s{k}``, ``valid_bps_s{k}``, ``valid_r2_s{k}`` where the data have true rates,
...).

Out directory layout::

    out_dir/config.yaml                 model and training configuration (human readable)
    out_dir/checkpoints/last.h5         state after the last completed epoch
    out_dir/checkpoints/best.h5         state at the best smoothed validation reconstruction
    out_dir/log.csv, out_dir/log.json   one row per epoch
    out_dir/training_curves.png         written when fit() returns
    out_dir/session_factors.png         several sessions: their condition-averaged factors
                                        (best checkpoint) in shared principal components

Checkpoints are HDF5 files of plain arrays (parameters, Adam moments) and one JSON string
(configs, counters, scheduler state, random-generator state, log history), each with a
SHA-256 verified on load; nothing is pickled. Each is written to a temporary file and renamed
into place, so a killed run leaves either the old or the new checkpoint, never a torn one;
last.h5 is the one commit point of an epoch (Trainer._commit), so best.h5, last.h5 and the
logs agree after a kill and resume. fit() holds the output directory's run lock
(lfads_fast.rundir) while it runs. docs/reliability.md lists these guarantees.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import yaml
from tqdm.auto import tqdm

from . import data as data_mod
from . import metrics, nlb, ops, resources, rundir, stitching
from .config import LFADSConfig
from .model import LFADS, param_layout

__all__ = [
    "TrainConfig",
    "Trainer",
    "FitResult",
    "NonFiniteLossError",
    "Checkpoint",
    "PERTURBABLE_FIELDS",
    "load_checkpoint",
    "load_model",
    "save_model",
    "config_for_data",
    "check_sizes",
    "check_training_memory",
    "ramp",
    "temporal_shift",
    "draw_temporal_shifts",
]

CHECKPOINT_FORMAT = "lfads_fast.checkpoint"
# Version 2 adds a SHA-256 per array ("checksums"); version 1 files, without them, are still
# read (unverified).
CHECKPOINT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
# A state JSON larger than this is not one the trainer wrote (its history grows ~1 KB/epoch).
_MAX_STATE_BYTES = 256 * 2**20
# Validation metrics computed per session; with several sessions the logged value is their mean.
_SESSION_METRICS = ("recon_sv", "r2", "bps", "co_bps", "fp_bps")
# Training-config fields that may change when a run is resumed: they decide when the run
# stops or how often it saves, not what a step computes.
RESUMABLE_FIELDS = ("max_epochs", "time_budget", "time_budget_lr_factor", "checkpoint_every",
                    "early_stopping_patience", "vel_r2_every")
# Hyperparameters that Trainer.perturb changes in a run's state, and the config each belongs
# to: regularisation and the learning rate (AutoLFADS's search space), which change what the
# next steps do but neither the parameters' layout nor the data.
PERTURBABLE_FIELDS = {"lr_init": "train", "weight_decay": "train", "dropout_rate": "model",
                      "cd_rate": "model", "kl_ic_scale": "model", "kl_co_scale": "model",
                      "l2_gen_scale": "model", "l2_con_scale": "model",
                      "l2_ic_enc_scale": "model", "l2_ci_enc_scale": "model"}
# The final phase of a time budget (see TrainConfig.time_budget_lr_factor), as a fraction.
BUDGET_FINAL_FRACTION = 0.05
# After this many consecutive non-finite steps the learning rate is multiplied by
# NONFINITE_LR_FACTOR (again after each further run of that length).
NONFINITE_LR_EVERY = 3
NONFINITE_LR_FACTOR = 0.5
# Validation runs the model on at most this many trials at a time (bounds its memory).
VALID_CHUNK = 1024
_LOSS_TERMS = ("loss", "recon", "kl_ic", "kl_co", "l2")
_TERM_PARTS = ("recon", "kl_ic", "kl_co", "l2")
# Independent random streams derived from TrainConfig.seed (sv masks from sv_seed).
_TRAIN_STREAM, _VALID_STREAM, _SV_STREAM = 0, 1, 2
_TIME_BAR = "{desc} {percentage:3.0f}%|{bar}| {elapsed} of {total:.0f} s{postfix}"
# Columns of the log drawn in training_curves.png (train_/valid_ prefixes share a panel).
_CURVES = ("loss", "recon", "recon_smth", "recon_sv", "kl_ic", "kl_co", "r2", "bps", "co_bps",
           "fp_bps", "vel_r2")


@dataclass
class TrainConfig:
    """Training hyperparameters (names as in lfads-torch where it has them).

    Attributes:
        batch_size: trials per step (the last batch of an epoch may be smaller); with
            sessions, trials of each session per step.
        max_epochs: stop after this many epochs in total.
        lr_init: initial learning rate.
        lr_stop: the learning rate never decays below this.
        lr_decay: factor applied to the learning rate on a plateau.
        lr_patience: epochs without improvement of valid_recon_smth before a decay.
        lr_scheduler: decay the learning rate on plateaus (else it stays at lr_init).
        lr_adam_beta1, lr_adam_beta2: Adam's moment decay rates.
        lr_adam_epsilon: Adam's epsilon (1e-8 as lfads-torch; TF1 LFADS used 0.1).
        weight_decay: decoupled (AdamW) weight decay, ramped with the L2 ramp.
        max_grad_norm: clip the global gradient norm to this (<= 0: no clipping).
        kl_start_epoch, kl_increase_epoch: the KL ramp (see ``ramp``).
        l2_start_epoch, l2_increase_epoch: the L2 ramp.
        recon_smth_coef: weight of the previous value in the smoothed validation
            reconstruction.
        early_stopping: stop when valid_recon_smth has not improved for
            early_stopping_patience epochs after the burn-in.
        early_stopping_patience: see early_stopping.
        early_stopping_burn_in: epochs before early stopping and best-checkpoint selection
            start; None: until both ramps have reached 1. During the burn-in the best
            checkpoint is simply the latest one.
        sv_rate: fraction of bins held out for sample validation (0: off).
        sv_seed: seed of the sample-validation masks.
        temporal_shift_std: lfads-torch's TemporalShift augmentation of the training
            batches (0: off): every channel of every trial is shifted in time by its own
            number of bins, drawn from Normal(0, temporal_shift_std), rounded and clamped to
            +-temporal_shift_max, with the edge values repeated (``temporal_shift``). The
            encoder data and the reconstruction data get independent shifts, also where they
            are the same counts; validation and inference never shift.
        temporal_shift_max: see temporal_shift_std.
        seed: seed of the batch order, posterior samples, dropout masks and temporal shifts.
        time_budget: wall-clock seconds one fit() call may train for (None: no limit); an
            epoch is not started when the previous one's duration would overrun the budget.
        time_budget_lr_factor: epochs that start in the last 5% of the time budget, and the
            epochs expected to be the last two that fit in it (from the previous epoch's
            duration), train with the learning rate multiplied by this factor (1: off). A
            budgeted run ends wherever the budget does, usually before the plateau schedule
            has lowered the rate far; a short phase at a lower rate settles the parameters (on the demo data
            one epoch at a quarter of the rate raised the validation R^2 by about 0.003).
        checkpoint_every: write the last checkpoint every this many epochs (and always when
            training stops).
        max_nonfinite_steps: stop with NonFiniteLossError after this many consecutive steps
            whose loss or gradient was not finite (such steps never change the parameters).
        divergence_factor: a step whose reconstruction cost (per bin and neuron) exceeds this
            multiple of the lowest epoch mean so far is a divergence: its update is dropped,
            the parameters and Adam's moments return to the best checkpoint's and the
            learning rate is multiplied by divergence_lr_factor (None: no check). A finite
            blow-up (log-rates driven far out, GRU units pinned at the clip where no gradient
            passes) does not recover by itself.
        divergence_lr_factor: see divergence_factor.
        max_divergences: after this many divergences training stops (stop_reason
            "diverged") with the best checkpoint's parameters.
        vel_r2_every: every this many epochs, log valid_vel_r2: NLB's velocity decoder
            (nlb.epoch_metrics) fitted on the training trials' rates, scored on the validation
            trials'; needs behaviour in both splits (0: off).
    """

    batch_size: int = 128
    max_epochs: int = 1000
    lr_init: float = 4e-3
    lr_stop: float = 1e-5
    lr_decay: float = 0.95
    lr_patience: int = 6
    lr_scheduler: bool = True
    lr_adam_beta1: float = 0.9
    lr_adam_beta2: float = 0.999
    lr_adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 200.0
    kl_start_epoch: int = 0
    kl_increase_epoch: int = 80
    l2_start_epoch: int = 0
    l2_increase_epoch: int = 80
    recon_smth_coef: float = 0.3
    early_stopping: bool = True
    early_stopping_patience: int = 200
    early_stopping_burn_in: int | None = None
    sv_rate: float = 0.0
    sv_seed: int = 0
    temporal_shift_std: float = 0.0
    temporal_shift_max: int = 6
    seed: int = 0
    time_budget: float | None = None
    time_budget_lr_factor: float = 1.0
    checkpoint_every: int = 1
    max_nonfinite_steps: int = 10
    divergence_factor: float | None = 3.0
    divergence_lr_factor: float = 0.5
    max_divergences: int = 5
    vel_r2_every: int = 0

    def __post_init__(self):
        for name in ("batch_size", "max_epochs", "checkpoint_every", "max_nonfinite_steps"):
            _check_int(self, name, 1)
        _check_int(self, "max_divergences", 0)
        _check_int(self, "vel_r2_every", 0)
        if self.divergence_factor is not None:
            _check_float(self, "divergence_factor", low=1.0, low_open=True)
        _check_float(self, "divergence_lr_factor", low=0.0, high=1.0, low_open=True)
        for name in ("lr_patience", "kl_start_epoch", "kl_increase_epoch", "l2_start_epoch",
                     "l2_increase_epoch", "early_stopping_patience", "sv_seed", "seed"):
            _check_int(self, name, 0)
        if self.early_stopping_burn_in is not None:
            _check_int(self, "early_stopping_burn_in", 0)
        for name in ("lr_init", "lr_stop", "lr_adam_epsilon"):
            _check_float(self, name, low=0.0, low_open=True)
        if self.lr_stop > self.lr_init:
            raise ValueError(f"lr_stop ({self.lr_stop}) must be <= lr_init ({self.lr_init})")
        for name in ("lr_decay", "lr_adam_beta1", "lr_adam_beta2", "recon_smth_coef"):
            _check_float(self, name, low=0.0, high=1.0, high_open=True)
        if self.lr_decay == 0.0:
            raise ValueError("lr_decay must be in (0, 1), got 0")
        _check_float(self, "sv_rate", low=0.0, high=1.0, high_open=True)
        _check_float(self, "temporal_shift_std", low=0.0)
        _check_int(self, "temporal_shift_max", 0)
        for name in ("weight_decay", "max_grad_norm"):
            _check_float(self, name, low=None)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.time_budget is not None:
            _check_float(self, "time_budget", low=0.0, low_open=True)
        _check_float(self, "time_budget_lr_factor", low=0.0, high=1.0, low_open=True)
        for name in ("lr_scheduler", "early_stopping"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
            setattr(self, name, bool(getattr(self, name)))

    @property
    def burn_in(self) -> int:
        """Epochs before early stopping and best-checkpoint selection start."""
        if self.early_stopping_burn_in is not None:
            return self.early_stopping_burn_in
        return max(self.kl_start_epoch + self.kl_increase_epoch,
                   self.l2_start_epoch + self.l2_increase_epoch)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        return cls(**d)


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient too many steps in a row.

    Attributes:
        result: raised by Trainer.fit: what the run had done before (a FitResult with
            stop_reason "nonfinite" and the message as stop_message; its checkpoints are the
            last ones written, at the end of completed epochs, so --resume goes on exactly),
            or None when no epoch had completed (no checkpoint to go on from).
    """

    result: "FitResult | None" = None


@dataclass
class FitResult:
    """What Trainer.fit() did.

    Attributes:
        epochs: epochs completed in total (including those of resumed runs).
        epochs_this_call: epochs completed by this call.
        stop_reason: "max_epochs", "early_stopping", "time_budget" or "diverged" (more than
            max_divergences divergences; the parameters are the best checkpoint's); "nonfinite"
            only in the result a NonFiniteLossError carries.
        best_epoch: the epoch of the best checkpoint (0-based).
        best_valid_recon_smth: its smoothed validation reconstruction.
        train_seconds: wall-clock seconds spent in this call.
        skipped_steps: steps skipped for a non-finite loss or gradient, in total.
        out_dir: the output directory.
        best_checkpoint, last_checkpoint: paths of the checkpoints.
        history: one dict per epoch (the rows of log.csv).
        divergences: divergences (see TrainConfig.divergence_factor) recovered from, in total.
        stop_message: why the run stopped, for the reader, when that was an error (the
            NonFiniteLossError's message); "" otherwise.
    """

    epochs: int
    epochs_this_call: int
    stop_reason: str
    best_epoch: int
    best_valid_recon_smth: float
    train_seconds: float
    skipped_steps: int
    out_dir: str
    best_checkpoint: str
    last_checkpoint: str
    history: list = field(default_factory=list)
    divergences: int = 0
    stop_message: str = ""


@dataclass
class Checkpoint:
    """The contents of a checkpoint file.

    Attributes:
        model_config: the model's hyperparameters.
        train_config: the training hyperparameters.
        flat: all parameters, [num_params] (float32 or float64).
        adam_m, adam_v: Adam's first and second moments, same shape.
        state: counters and schedules (epoch = epochs completed, step, lr, scheduler,
            early stopping, smoothing, best metric, RNG state, history, ...).
    """

    model_config: LFADSConfig
    train_config: TrainConfig
    flat: np.ndarray
    adam_m: np.ndarray
    adam_v: np.ndarray
    state: dict

    @property
    def epoch(self) -> int:
        """Epochs completed when the checkpoint was written."""
        return int(self.state["epoch"])


def ramp(epoch: int, start: int, increase: int) -> float:
    """lfads-torch's ramp coefficient of an epoch (0-based): rises linearly from 0 to 1.

    Returns:
        clamp((epoch + 1 - start) / (increase + 1), 0, 1).
    """
    return float(min(max((epoch + 1 - start) / (increase + 1), 0.0), 1.0))


def temporal_shift(data: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Shifts every channel of every trial in time, repeating the edge values (lfads-torch's
    TemporalShift).

    Args:
        data: time-major [T, B, N] (counts; NaN bins move with their values).
        shifts: integer [B, N], bins each channel moves later (negative: earlier).

    Returns:
        a new [T, B, N] array, out[t, b, n] = data[clamp(t - shifts[b, n], 0, T - 1), b, n].
    """
    T = data.shape[0]
    if shifts.shape != data.shape[1:]:
        raise ValueError(f"shifts must have shape {list(data.shape[1:])} (trials, channels), "
                         f"got {list(shifts.shape)}")
    source = np.clip(np.arange(T)[:, None, None] - shifts[None], 0, T - 1)
    return np.take_along_axis(data, source, axis=0)


def draw_temporal_shifts(rng: np.random.Generator, shape: tuple, std: float, max_shift: int) -> np.ndarray:
    """Shifts for temporal_shift: Normal(0, std) rounded to whole bins, clamped to
    [-max_shift, max_shift]; int64 of the given shape ([B, N])."""
    return np.clip(np.rint(rng.normal(0.0, std, size=shape)), -max_shift, max_shift).astype(np.int64)


def config_for_data(dataset: data_mod.Dataset, **hparams) -> LFADSConfig:
    """An LFADSConfig whose data sizes are those of a dataset.

    Args:
        dataset: the data the model will see.
        **hparams: other LFADSConfig fields. Data sizes given here must agree with the data.

    Returns:
        The config.

    Raises:
        ValueError: a given data size disagrees with the data, or an unknown field.
    """
    sizes = {
        "encod_data_dim": dataset.encod_data_dim,
        "recon_data_dim": dataset.recon_data_dim,
        "encod_seq_len": dataset.encod_seq_len,
        "recon_seq_len": dataset.recon_seq_len,
        "ext_input_dim": dataset.ext_input_dim,
    }
    for name, value in sizes.items():
        given = hparams.get(name)
        if given is not None and given != value:
            raise ValueError(f"{name} = {given} in the config, but the data ({dataset.source}) "
                             f"have {value}")
    return LFADSConfig.from_dict({**hparams, **sizes})


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads a checkpoint written by Trainer and verifies every array against its checksum.

    Sizes are checked before the arrays are read: a file whose config declares more
    parameters than its arrays hold, or than fit in memory, is refused up front.

    Raises:
        ValueError: the file is not a readable lfads_fast checkpoint, or it is damaged (the
            message names the array whose checksum does not match).
    """
    path = os.fspath(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: cannot open as a checkpoint (HDF5) file ({e})") from e
    try:
        with f:
            return _read_checkpoint(path, f)
    except (OSError, KeyError, TypeError, AttributeError, RuntimeError, UnicodeDecodeError,
            json.JSONDecodeError) as e:
        # Damaged HDF5 metadata or JSON surfaces as any of these from h5py and json.
        raise ValueError(f"{path}: damaged checkpoint, cannot be read ({type(e).__name__}: "
                         f"{e})") from e


def _read_checkpoint(path: str, f: h5py.File) -> Checkpoint:
    missing = [k for k in ("flat", "adam_m", "adam_v", "state_json") if k not in f]
    if missing:
        raise ValueError(f"{path}: not an lfads_fast checkpoint (missing {', '.join(missing)})")
    if f["state_json"].size * max(f["state_json"].dtype.itemsize, 1) > _MAX_STATE_BYTES:
        raise ValueError(f"{path}: damaged checkpoint (state_json declares an implausible size)")
    state_bytes = _as_bytes(f["state_json"][()])
    sums = None
    if "checksums" in f:
        sums = json.loads(_as_bytes(f["checksums"][()]).decode())
        if not isinstance(sums, dict):
            raise ValueError(f"{path}: damaged checkpoint (checksums entry is not a mapping)")
        _verify(path, "state_json", state_bytes, sums)
    state = json.loads(state_bytes.decode())
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else None
        raise ValueError(f"{path}: not an lfads_fast checkpoint (format {fmt!r})")
    if state.get("version") not in _READABLE_VERSIONS:
        raise ValueError(f"{path}: checkpoint version {state.get('version')} is not supported "
                         f"(this lfads_fast reads versions {', '.join(map(str, _READABLE_VERSIONS))})")
    if state["version"] >= 2 and sums is None:
        raise ValueError(f"{path}: damaged checkpoint (its checksums are missing)")
    try:
        model_config = LFADSConfig.from_dict(state.pop("model_config"))
        train_config = TrainConfig.from_dict(state.pop("train_config"))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: the checkpoint's configuration is invalid ({e})") from e
    n = sum(int(np.prod(shape)) for _, shape in param_layout(model_config))
    for key in ("flat", "adam_m", "adam_v"):
        d = f[key]
        if d.shape != (n,) or d.dtype not in (np.float32, np.float64):
            raise ValueError(f"{path}: {key} has shape {d.shape} dtype {d.dtype}: "
                             f"{d.size} parameters stored, but its config needs {n} "
                             "(float32 or float64)")
    resources.check_memory(resources.model_bytes(n, f["flat"].dtype.itemsize, 4),
                           f"{path} (a model of {n:,} parameters)")
    arrays = {key: f[key][()] for key in ("flat", "adam_m", "adam_v")}
    if sums is not None:
        for key, a in arrays.items():
            _verify(path, key, a, sums)
        if "step" in f:
            _verify(path, "step", np.asarray(f["step"][()]), sums)
    return Checkpoint(model_config, train_config, arrays["flat"], arrays["adam_m"],
                      arrays["adam_v"], state)


def _as_bytes(raw) -> bytes:
    return raw if isinstance(raw, bytes) else str(raw).encode()


def _checksum(value) -> str:
    """SHA-256 of an array's dtype, shape and bytes (or of a string's UTF-8 bytes)."""
    h = hashlib.sha256()
    if isinstance(value, (bytes, str)):
        h.update(value.encode() if isinstance(value, str) else value)
    else:
        a = np.ascontiguousarray(value)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _verify(path: str, key: str, value, sums: dict) -> None:
    if sums.get(key) != _checksum(value):
        raise ValueError(f"{path}: damaged checkpoint: array '{key}' does not match its "
                         "checksum")


def load_model(path: str | os.PathLike) -> LFADS:
    """The model stored in a checkpoint, ready for inference."""
    ckpt = load_checkpoint(path)
    model = LFADS(ckpt.model_config, seed=0, dtype=ckpt.flat.dtype)
    if model.flat.shape != ckpt.flat.shape:
        raise ValueError(f"{os.fspath(path)}: {ckpt.flat.size} parameters stored, but its config "
                         f"needs {model.flat.size}")
    model.flat[...] = ckpt.flat
    return model


def save_model(path: str | os.PathLike, model: LFADS,
               train_config: TrainConfig | None = None, **info) -> str:
    """Writes a checkpoint of a model that Trainer did not train (epoch 0, zero Adam moments),
    readable by load_model and the command line; returns the path. ``info`` (JSON values,
    e.g. imported_from=...) is stored in the checkpoint's state."""
    state = {**info, "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
             "model_config": model.config.to_dict(),
             "train_config": (train_config or TrainConfig()).to_dict(),
             "dtype": str(model.dtype), "epoch": 0}
    flat = ops.to_host(model.flat)
    zeros = np.zeros_like(flat)
    _write_checkpoint(path, flat, zeros, zeros, 0, state)
    return os.fspath(path)


def _write_checkpoint(path, flat, adam_m, adam_v, step: int, state: dict) -> None:
    """The checkpoint file: arrays, the JSON state and a SHA-256 of each, written atomically."""
    arrays = {"flat": flat, "adam_m": adam_m, "adam_v": adam_v, "step": np.int64(step),
              "state_json": json.dumps(state)}
    sums = {k: _checksum(v if k == "state_json" else np.asarray(v)) for k, v in arrays.items()}
    data_mod.write_h5_atomic(path, dict(arrays, checksums=json.dumps(sums)))


def check_training_memory(cfg: LFADSConfig, batch_size: int, dtype=np.float32,
                          what: str = "training this model") -> None:
    """Refuses (InsufficientMemoryError, a ValueError) a model and batch size whose training
    clearly needs more memory than the machine has: parameters, gradient and Adam's moments,
    one training step's activations and one validation chunk's."""
    n = sum(int(np.prod(shape)) for _, shape in param_layout(cfg))
    itemsize = np.dtype(dtype).itemsize
    needed = (resources.model_bytes(n, itemsize, 5) + resources.step_bytes(cfg, batch_size, itemsize)
              + resources.step_bytes(cfg, VALID_CHUNK, itemsize) // 2)
    resources.check_memory(needed, f"{what} ({n:,} parameters, batch {batch_size})")


class Trainer:
    """Trains an LFADS model on one dataset, or a multi-session model on several.

    Args:
        model: the model; its parameters are trained in place.
        data: one session: a Dataset, an HDF5 path (read with data.load_dataset), or a dict of
            data.from_arrays arguments (train_encod_data, valid_encod_data, ...). A model with
            session_neurons: a list with one Dataset (or HDF5 path) per session in the model's
            session order, or a glob pattern (data.load_sessions: sorted matches).
        config: training hyperparameters (None: the defaults).
        out_dir: where checkpoints and logs go (created if needed).
        progress: show a progress bar (tqdm, on stderr).
        device: "cpu", "cuda" or "cuda:N": moves the model there first (model.to); None
            trains where the model is. Optimizer state and noise live on the same device;
            checkpoints are written from the host and resume on any device.
    """

    def __init__(self, model: LFADS, data, config: TrainConfig | None = None,
                 out_dir: str | os.PathLike = "lfads_out", *, progress: bool = True,
                 device: str | None = None):
        if not isinstance(model, LFADS):
            raise TypeError(f"model must be an LFADS, got {type(model).__name__}")
        if device is not None:
            model.to(device)
        self.model = model
        self.config = config if config is not None else TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        self.out_dir = Path(out_dir)
        self.progress = progress
        if model.config.multisession:
            self.sessions = _as_sessions(data)
            stitching.check_sessions(model.config, self.sessions)
            self.data = self.sessions
            self._fingerprint = [_data_fingerprint(ds) for ds in self.sessions]
        else:
            if isinstance(data, (list, tuple)):
                raise ValueError("a list of datasets is several sessions: build the model's config "
                                 "with stitching.config_for_sessions (docs/stitching.md)")
            self.data = _as_dataset(data)
            check_sizes(model.config, self.data)
            self.sessions = [self.data]
            self._fingerprint = _data_fingerprint(self.data)
        check_training_memory(model.config, self.config.batch_size, model.dtype)
        mask = model.trainable_mask()
        self._adam_mask = None if mask.all() else mask
        # The training counts are kept time-major, so a batch is one gather along the trial
        # axis, and make_batch's own time-major copies become views.
        self._train_time_major = [
            (np.ascontiguousarray(t.encod_data.transpose(1, 0, 2)),
             None if t.recon_data is t.encod_data else np.ascontiguousarray(t.recon_data.transpose(1, 0, 2)))
            for t in (ds.train for ds in self.sessions)]
        self._sv_masks = self._make_sv_masks()
        if self.config.vel_r2_every:
            if model.config.multisession:
                raise ValueError("vel_r2_every is for one session")
            nlb.check_epoch_eval(self.data)
        self._reset_state()

    # ------------------------------------------------------------------ public API

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / "checkpoints" / "best.h5"

    @property
    def last_checkpoint(self) -> Path:
        return self.out_dir / "checkpoints" / "last.h5"

    @property
    def _pending_best(self) -> Path:
        """The best checkpoint of an epoch not yet committed (see _commit)."""
        return self.out_dir / "checkpoints" / "best.next.h5"

    def fit(self, resume: bool = False) -> FitResult:
        """Trains until max_epochs, early stopping or the time budget.

        Args:
            resume: continue from out_dir/checkpoints/last.h5 when it exists (exactly where
                it was written: the same batches, noise and updates follow as in a run that
                was never interrupted). False starts afresh and overwrites earlier outputs.

        Returns:
            What happened (see FitResult).

        Raises:
            NonFiniteLossError: max_nonfinite_steps consecutive steps were non-finite, or
                every step of this call was skipped as non-finite.
            ValueError: resume found a checkpoint of another model, data or configuration,
                or both checkpoints are damaged; out_dir cannot be written.
            rundir.RunLockedError: another process is training in out_dir.
        """
        rundir.check_writable_dir(self.out_dir, "out_dir")
        with rundir.run_lock(self.out_dir, what="training"):
            return self._fit(resume)

    def _fit(self, resume: bool) -> FitResult:
        cfg = self.config
        t_start = _now()
        (self.out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self._recover_directory(resume)
        if resume and (self.last_checkpoint.exists() or self.best_checkpoint.exists()):
            ckpt, best_lost = self._resume_checkpoint()
            self._restore(ckpt)
            if best_lost:
                self._restart_best()
        else:
            self._reset_state()
        steps_at_start, skipped_at_start = self.step, self.skipped_steps
        self._write_config_yaml()
        # With a time budget the bar measures the budget; otherwise epochs out of max_epochs.
        by_time = cfg.time_budget is not None
        bar = tqdm(total=cfg.time_budget if by_time else cfg.max_epochs,
                   initial=0 if by_time else min(self.epoch, cfg.max_epochs),
                   unit="s" if by_time else "epoch", desc="LFADS", disable=not self.progress,
                   dynamic_ncols=True, leave=True, bar_format=_TIME_BAR if by_time else None)
        # last_s: the previous pass of the loop, the epoch with its checkpoint and logs (the
        # log files are rewritten whole, so on small data they can outlast the epoch),
        # measured from the start of one pass to the start of the next.
        epochs_this_call, last_s, saved_epoch, final = 0, 0.0, None, False
        failure = None
        pass_start = None
        stop_reason = self._stop_reason()
        try:
            while stop_reason is None:
                now = _now()
                elapsed = now - t_start
                if pass_start is not None:
                    last_s = now - pass_start
                pass_start = now
                if (cfg.time_budget is not None and epochs_this_call > 0
                        and elapsed + last_s > cfg.time_budget):
                    stop_reason = "time_budget"
                    break
                # The final phase: the last 5% of the budget, or the epochs expected to be the
                # last two that fit (epochs longer than 5% of the budget would skip it; two,
                # so that a pass slower than the one before cannot skip it either).
                final = final or (cfg.time_budget is not None and (
                    elapsed >= (1.0 - BUDGET_FINAL_FRACTION) * cfg.time_budget
                    or (epochs_this_call > 0 and elapsed + 3.0 * last_s > cfg.time_budget)))
                try:
                    row = self._run_epoch(cfg.time_budget_lr_factor if final else 1.0)
                except NonFiniteLossError as e:
                    # The checkpoints stay the last ones written, at the end of an epoch (one
                    # written in the middle of an epoch could not be resumed exactly).
                    stop_reason, failure = "nonfinite", e
                    break
                epochs_this_call += 1
                stop_reason = self._stop_reason()
                if self.epoch % cfg.checkpoint_every == 0:
                    self._commit()
                    saved_epoch = self.epoch
                else:
                    self._write_logs()
                bar.set_postfix_str(f"epoch {self.epoch}, {_postfix(row)}", refresh=False)
                if by_time:
                    bar.update(min(_now() - t_start, cfg.time_budget) - bar.n)
                else:
                    bar.update(1)
        finally:
            bar.close()
        if failure is None:
            if saved_epoch != self.epoch and (epochs_this_call > 0
                                              or not self.last_checkpoint.exists()):
                self._commit()
            if not self.best_checkpoint.exists():
                self._save(self.best_checkpoint)
            if self.step == steps_at_start and self.skipped_steps > skipped_at_start:
                failure = NonFiniteLossError(
                    f"LFADS training applied no step: all {self.skipped_steps - skipped_at_start} "
                    "steps of this run had a non-finite loss or gradient and were skipped, so the "
                    "parameters are those it started from. Check the data for extreme counts, or "
                    "lower lr_init or max_grad_norm.")
        else:
            # An uncommitted best (checkpoint_every > 1) belongs to an epoch last.h5 lacks.
            self._pending_best.unlink(missing_ok=True)
        self._write_logs()
        self._plot_curves()
        self._plot_session_factors()
        result = FitResult(
            epochs=self.epoch, epochs_this_call=epochs_this_call, stop_reason=stop_reason,
            best_epoch=self.best_epoch, best_valid_recon_smth=_none_to_nan(self.best_value),
            train_seconds=_now() - t_start, skipped_steps=self.skipped_steps,
            out_dir=str(self.out_dir), best_checkpoint=str(self.best_checkpoint),
            last_checkpoint=str(self.last_checkpoint), history=list(self.history),
            divergences=self.divergences, stop_message="" if failure is None else str(failure))
        if failure is not None:
            failure.result = result if self.best_epoch >= 0 else None
            raise failure
        return result

    def perturb(self, changes: dict, *, reseed: int | None = None) -> dict:
        """Changes hyperparameters of the run at its last checkpoint (population-based
        training's explore step; tune.py drives it).

        Loads out_dir/checkpoints/last.h5 with the checks of fit(resume=True) (this trainer's
        model, data and configuration must be the checkpoint's), applies changes to the
        model's configuration (dropout and coordinated-dropout rates, KL and L2 scales) and to
        the training configuration (lr_init, weight_decay), and writes the result back as the
        last and the best checkpoint. fit(resume=True) then goes on from the same parameters,
        Adam moments, step count, ramps and smoothed metric with the new values. A new
        lr_init becomes the current learning rate (a plateau schedule, if on, goes on from
        it). The best-checkpoint record restarts at this state: earlier best states were
        trained with other values.

        Args:
            changes: {field: new value} for fields of PERTURBABLE_FIELDS.
            reseed: draw the training random stream (batch order, dropout masks, posterior
                samples) afresh from (seed, reseed) instead of going on with the
                checkpoint's, so that a copy of another member of a population does not
                repeat its noise; None goes on with it.

        Returns:
            {field: (old value, new value)} for the fields whose value changed.

        Raises:
            ValueError: a field that is not perturbable, an invalid value, no checkpoint, or a
                checkpoint of another model, data or configuration.
        """
        unknown = sorted(set(changes) - set(PERTURBABLE_FIELDS))
        if unknown:
            raise ValueError(f"perturb: {', '.join(unknown)} cannot change in a running "
                             f"training; perturbable: {', '.join(PERTURBABLE_FIELDS)}")
        if reseed is not None and (isinstance(reseed, bool) or not isinstance(reseed, int)
                                   or reseed < 0):
            raise ValueError(f"reseed must be None or an integer >= 0, got {reseed!r}")
        if not self.last_checkpoint.exists():
            raise ValueError(f"perturb: {self.last_checkpoint} does not exist (train, or put a "
                             "checkpoint there, first)")
        self._restore(load_checkpoint(self.last_checkpoint))
        parts = {section: {k: v for k, v in changes.items() if PERTURBABLE_FIELDS[k] == section}
                 for section in ("model", "train")}
        model_cfg = dataclasses.replace(self.model.config, **parts["model"])
        train_cfg = dataclasses.replace(self.config, **parts["train"])
        old = {**self.model.config.to_dict(), **self.config.to_dict()}
        new = {**model_cfg.to_dict(), **train_cfg.to_dict()}
        self.model.config, self.config = model_cfg, train_cfg
        if "lr_init" in changes:
            self.lr = train_cfg.lr_init
        self.sched_best, self.sched_bad = None, 0
        self.best_value, self.best_epoch, self.es_wait = self.recon_smth, self.epoch - 1, 0
        if reseed is not None:
            self.rng = np.random.default_rng(
                np.random.SeedSequence([train_cfg.seed, _TRAIN_STREAM, reseed]))
        self._save(self.last_checkpoint)
        self._save(self.best_checkpoint)
        self._write_config_yaml()
        return {k: (old[k], new[k]) for k in changes if old[k] != new[k]}

    # ------------------------------------------------------------------ one epoch

    def _run_epoch(self, lr_factor: float = 1.0) -> dict:
        cfg, model = self.config, self.model
        epoch = self.epoch
        kl_ramp = ramp(epoch, cfg.kl_start_epoch, cfg.kl_increase_epoch)
        l2_ramp = ramp(epoch, cfg.l2_start_epoch, cfg.l2_increase_epoch)
        lr = self.lr * lr_factor
        t0 = _now()
        steps = self._epoch_steps()
        n_batches = len(steps)
        sums = dict.fromkeys(_LOSS_TERMS, 0.0)
        n_used, norms, skipped, diverged = 0, [], 0, 0
        # The reference of the divergence check: the lowest epoch mean so far; only once this
        # run has a best checkpoint to return to.
        floor = min((row["train_recon"] for row in self.history
                     if math.isfinite(row["train_recon"])), default=None)
        if cfg.divergence_factor is None or self.best_epoch < 0:
            floor = None
        shift_rng = self.rng if cfg.temporal_shift_std > 0 else None
        for b, step in enumerate(steps):
            batch = self._batch(step, shift_rng)
            noise = model.draw_noise(batch, self.rng, train=True, sample=True)
            terms, grad = model.loss_and_grads(batch, noise, kl_ramp=kl_ramp, l2_ramp=l2_ramp)
            # The parts first, so that the message names the term that broke.
            bad = next((k for k in _TERM_PARTS + ("loss",) if not math.isfinite(terms[k])), None)
            if bad is None and floor is not None and terms["recon"] > cfg.divergence_factor * floor:
                diverged += 1
                self._roll_back(terms["recon"], floor, self.divergences + diverged, b, n_batches)
                if self.divergences + diverged > cfg.max_divergences:
                    break
                continue
            norm = float("nan")
            if bad is None:
                norm = ops.adam_step(model.flat, grad, self.adam_m, self.adam_v,
                                     lr=self.lr * lr_factor,
                                     beta1=cfg.lr_adam_beta1, beta2=cfg.lr_adam_beta2,
                                     eps=cfg.lr_adam_epsilon,
                                     weight_decay=cfg.weight_decay * l2_ramp,
                                     max_grad_norm=cfg.max_grad_norm, step=self.step + 1,
                                     mask=self._adam_mask)
                if not math.isfinite(norm):
                    bad = "gradient"
            if bad is not None:
                skipped += 1
                self._nonfinite_step(bad, terms, norm, b, n_batches, step, kl_ramp, l2_ramp)
                continue
            self.step += 1
            self.bad_streak = 0
            for k in _LOSS_TERMS:
                sums[k] += terms[k] * batch.size
            n_used += batch.size
            norms.append(norm)
        train_s = _now() - t0
        valid = self._validate(epoch, kl_ramp, l2_ramp)
        self._update_schedules(valid["valid_recon_smth"])
        self.epoch += 1
        row = {"epoch": epoch, "lr": lr, "kl_ramp": kl_ramp, "l2_ramp": l2_ramp}
        for k in _LOSS_TERMS:
            row[f"train_{k}"] = float(sums[k]) / n_used if n_used else float("nan")
        row.update(valid)
        if cfg.vel_r2_every and (epoch + 1) % cfg.vel_r2_every == 0:
            row.update(nlb.epoch_metrics(model, self.data))
        row["grad_norm"] = float(np.mean(norms)) if norms else float("nan")
        row["skipped_steps"] = skipped
        row["divergences"] = diverged
        row["train_s"] = train_s
        row["epoch_s"] = _now() - t0
        self.train_seconds += row["epoch_s"]
        row["time_s"] = self.train_seconds
        self.history.append(row)
        if row["epoch"] == self.best_epoch:
            # Made the best checkpoint by _commit, together with last.h5 and the logs.
            self._save(self._pending_best)
        return row

    @property
    def divergences(self) -> int:
        """Divergences rolled back in the epochs completed (see TrainConfig)."""
        return sum(row.get("divergences", 0) for row in self.history)

    def _roll_back(self, recon: float, floor: float, count: int, b: int, n_batches: int) -> None:
        """Divergence number count: drop the step, return to the best checkpoint, lower the
        rate."""
        cfg = self.config
        self.lr = max(self.lr * cfg.divergence_lr_factor, cfg.lr_stop)
        pending = self._pending_best
        best = load_checkpoint(pending if pending.exists() else self.best_checkpoint)
        self.model.flat = best.flat
        self.adam_m[...], self.adam_v[...] = (ops.to_device(a, self.model.device)
                                              for a in (best.adam_m, best.adam_v))
        last = count > cfg.max_divergences
        warnings.warn(
            f"LFADS training diverged at epoch {self.epoch}, batch {b} of {n_batches}: the "
            f"reconstruction cost {recon:.6g} is {recon / floor:.3g} times the lowest epoch "
            f"mean so far ({floor:.6g}); parameters and Adam's moments restored from the best "
            f"checkpoint (epoch {self.best_epoch})"
            + (f"; that was divergence {count} (max_divergences "
               f"{cfg.max_divergences}): training stops." if last else
               f", learning rate lowered to {self.lr:.3g}."), RuntimeWarning, stacklevel=4)

    def _validate(self, epoch: int, kl_ramp: float, l2_ramp: float) -> dict:
        """Validation loss terms (posteriors sampled, no dropout), smoothed recon, R^2, bps;
        with several sessions, means over the sessions and each session's own values."""
        cfg, mcfg = self.config, self.model.config
        per_session = [self._validate_session(s, epoch) for s in range(len(self.sessions))]
        terms = {k: sum(t[k] for t, _ in per_session) / len(per_session) for k in _TERM_PARTS}
        terms["loss"] = mcfg.loss_scale * (terms["recon"] + l2_ramp * terms["l2"] + kl_ramp * (
            mcfg.kl_ic_scale * terms["kl_ic"] + mcfg.kl_co_scale * terms["kl_co"]))
        current = terms["recon"]
        if self.recon_smth is None or not math.isfinite(self.recon_smth):
            self.recon_smth = current
        else:
            self.recon_smth = cfg.recon_smth_coef * self.recon_smth + (
                1 - cfg.recon_smth_coef) * current
        row = {f"valid_{k}": terms[k] for k in _LOSS_TERMS}
        row["valid_recon_smth"] = self.recon_smth
        for name in _SESSION_METRICS:
            values = [m[name] for _, m in per_session if name in m]
            if values:
                row[f"valid_{name}"] = sum(values) / len(values)
        if mcfg.multisession:
            for s, (t, m) in enumerate(per_session):
                row[f"valid_recon_s{s}"] = t["recon"]
                row.update({f"valid_{name}_s{s}": m[name] for name in _SESSION_METRICS if name in m})
        return row

    def _validate_session(self, s: int, epoch: int) -> tuple[dict, dict]:
        """One session's validation: (loss terms averaged over its trials, metrics)."""
        cfg, mcfg = self.config, self.model.config
        valid = self.sessions[s].valid
        sv = self._sv_masks[s].get("valid")
        n = valid.n_trials
        sums = dict.fromkeys(_TERM_PARTS, 0.0)
        rates = []
        for c, start in enumerate(range(0, n, VALID_CHUNK)):
            sl = slice(start, start + VALID_CHUNK)
            ext = None if valid.ext_input is None else valid.ext_input[sl]
            keys = (epoch, s, c) if mcfg.multisession else (epoch, c)
            out = self.model.forward(
                valid.encod_data[sl], ext, sample=True,
                seed=_derived_seed(cfg.seed, _VALID_STREAM, *keys),
                recon_data=valid.recon_data[sl], session=s if mcfg.multisession else None,
                sv_mask=None if sv is None else sv[sl], sv_rate=cfg.sv_rate, outputs="output_params")
            w = out["output_params"].shape[0]
            for k in sums:
                sums[k] += out["terms"][k] * w
            rates.append(out["output_params"])
        terms = {k: v / n for k, v in sums.items()}
        rates = np.concatenate(rates, axis=0)
        found = {}
        if sv is not None:
            found["recon_sv"] = _sv_heldout_nll(rates, valid.recon_data, sv, cfg.sv_rate)
        if valid.truth is not None:
            found["r2"] = _pooled_r2(rates, valid.truth)
        Te = mcfg.encod_seq_len
        Ne = mcfg.session_neurons[s] if mcfg.multisession else mcfg.encod_data_dim
        y = valid.recon_data
        found["bps"] = _bits_per_spike(rates[:, :Te, :Ne], y[:, :Te, :Ne])
        if rates.shape[2] > Ne:  # held-out neurons (co-bps)
            found["co_bps"] = _bits_per_spike(rates[:, :Te, Ne:], y[:, :Te, Ne:])
        if mcfg.recon_seq_len > Te:  # forward prediction (fp-bps)
            found["fp_bps"] = _bits_per_spike(rates[:, Te:], y[:, Te:])
        return terms, found

    def _update_schedules(self, smth: float) -> None:
        """Learning-rate plateau schedule, early stopping and the best checkpoint."""
        cfg = self.config
        epoch = self.epoch
        improved = math.isfinite(smth) and (self.sched_best is None or smth < self.sched_best)
        if improved:
            self.sched_best, self.sched_bad = smth, 0
        else:
            self.sched_bad += 1
        if cfg.lr_scheduler and self.sched_bad > cfg.lr_patience:
            self.lr = max(self.lr * cfg.lr_decay, cfg.lr_stop)
            self.sched_bad = 0
        if epoch < cfg.burn_in:
            # The ramps still change what the loss measures: the latest model is the best.
            self.best_value, self.best_epoch, self.es_wait = _nan_to_none(smth), epoch, 0
        elif math.isfinite(smth) and (self.best_value is None or epoch == cfg.burn_in
                                      or smth < self.best_value):
            self.best_value, self.best_epoch, self.es_wait = smth, epoch, 0
        else:
            self.es_wait += 1

    def _stop_reason(self) -> str | None:
        cfg = self.config
        if self.divergences > cfg.max_divergences:
            return "diverged"
        if cfg.early_stopping and self.epoch > cfg.burn_in and \
                self.es_wait >= cfg.early_stopping_patience:
            return "early_stopping"
        if self.epoch >= cfg.max_epochs:
            return "max_epochs"
        return None

    def _nonfinite_step(self, bad: str, terms: dict, norm: float, b: int, n_batches: int,
                        step: list, kl_ramp: float, l2_ramp: float) -> None:
        cfg = self.config
        self.skipped_steps += 1
        self.bad_streak += 1
        if self.bad_streak % NONFINITE_LR_EVERY == 0:
            self.lr = max(self.lr * NONFINITE_LR_FACTOR, cfg.lr_stop)
        if self.bad_streak < cfg.max_nonfinite_steps:
            return
        values = ", ".join(f"{k}={terms[k]:.6g}" for k in _LOSS_TERMS)
        what = (f"the gradient is not finite (norm {norm}) although the loss terms are"
                if bad == "gradient" else f"loss term '{bad}' = {terms[bad]}")
        detail = ""
        if self.model.config.multisession:
            trials = "train trials of " + "; ".join(
                f"session {s}: {_shown(self.sessions[s].train.inds[idx])}" for s, idx in step)
            failing = self._failing_sessions(step, kl_ramp, l2_ramp)
            culprits = (", ".join(f"session {s} ({self.sessions[s].source})" for s in failing)
                        if failing else "none")
            detail = (" Sessions whose trials of this batch alone give a non-finite loss or "
                      f"gradient (posterior means, no dropout): {culprits}.")
        else:
            trials = "train trials " + _shown(self.data.train.inds[step[0][1]])
        raise NonFiniteLossError(
            f"LFADS training stopped: {self.bad_streak} consecutive steps had a non-finite loss "
            f"or gradient; none of them changed the parameters. Last: epoch {self.epoch}, batch "
            f"{b} of {n_batches} ({trials}): {what} ({values}).{detail} The learning rate "
            f"was lowered to {self.lr:.3g} on the way. Check these trials for extreme counts, "
            f"or lower lr_init or max_grad_norm.")

    def _failing_sessions(self, step: list, kl_ramp: float, l2_ramp: float) -> list[int]:
        """The sessions of a step whose trials alone give a non-finite loss or gradient."""
        failing = []
        for s, idx in step:
            batch = self._batch([(s, idx)])
            # Posterior means and no dropout; the inferred-input KL still needs its own sample,
            # drawn from a generator of its own so that training's stream is left as it was.
            noise = self.model.draw_noise(batch, np.random.default_rng(self.config.seed),
                                          train=False, sample=False)
            terms, grad = self.model.loss_and_grads(batch, noise, kl_ramp=kl_ramp, l2_ramp=l2_ramp)
            if not (all(math.isfinite(terms[k]) for k in _LOSS_TERMS) and np.isfinite(grad).all()):
                failing.append(s)
        return failing

    # ------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        cfg = self.config
        self.epoch = 0
        self.step = 0
        self.lr = cfg.lr_init
        with ops.device_scope(self.model.flat):
            self.adam_m = self.model.xp.zeros_like(self.model.flat)
            self.adam_v = self.model.xp.zeros_like(self.model.flat)
        self.rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _TRAIN_STREAM]))
        self.sched_best, self.sched_bad = None, 0
        self.best_value, self.best_epoch, self.es_wait = None, -1, 0
        self.recon_smth = None
        self.skipped_steps, self.bad_streak = 0, 0
        self.train_seconds = 0.0
        self.history: list[dict] = []

    def _state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model_config": self.model.config.to_dict(),
            "train_config": self.config.to_dict(),
            "dtype": str(self.model.dtype),
            "epoch": self.epoch,
            "step": self.step,
            "lr": self.lr,
            "scheduler": {"best": self.sched_best, "num_bad_epochs": self.sched_bad},
            "early_stopping": {"best": self.best_value, "best_epoch": self.best_epoch,
                               "wait": self.es_wait},
            "recon_smth": _nan_to_none(self.recon_smth),
            "rng": self.rng.bit_generator.state,
            "skipped_steps": self.skipped_steps,
            "bad_streak": self.bad_streak,
            "train_seconds": self.train_seconds,
            "data": self._fingerprint,
            "history": [{k: _nan_to_none(v) for k, v in row.items()} for row in self.history],
        }

    def _restore(self, ckpt: Checkpoint) -> None:
        path = self.last_checkpoint
        if ckpt.model_config != self.model.config:
            diff = _dict_diff(ckpt.model_config.to_dict(), self.model.config.to_dict())
            raise ValueError(f"{path}: the checkpoint's model differs from this one ({diff})")
        old = {k: v for k, v in ckpt.train_config.to_dict().items() if k not in RESUMABLE_FIELDS}
        new = {k: v for k, v in self.config.to_dict().items() if k not in RESUMABLE_FIELDS}
        if old != new:
            raise ValueError(f"{path}: the checkpoint was trained with other settings "
                             f"({_dict_diff(old, new)}); only {', '.join(RESUMABLE_FIELDS)} may "
                             "change on resume")
        if ckpt.state["data"] != self._fingerprint:
            raise ValueError(f"{path}: the checkpoint was trained on other data "
                             f"({_fingerprint_diff(ckpt.state['data'], self._fingerprint, self.sessions)})")
        if ckpt.flat.dtype != self.model.flat.dtype:
            raise ValueError(f"{path}: the checkpoint is {ckpt.flat.dtype}, the model "
                             f"{self.model.flat.dtype}")
        s = ckpt.state
        self.model.flat = ckpt.flat
        self.adam_m, self.adam_v = (ops.to_device(a.copy(), self.model.device)
                                    for a in (ckpt.adam_m, ckpt.adam_v))
        self.epoch, self.step, self.lr = int(s["epoch"]), int(s["step"]), float(s["lr"])
        self.sched_best = s["scheduler"]["best"]
        self.sched_bad = int(s["scheduler"]["num_bad_epochs"])
        es = s["early_stopping"]
        self.best_value, self.best_epoch, self.es_wait = es["best"], int(es["best_epoch"]), int(es["wait"])
        self.recon_smth = s["recon_smth"]
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = s["rng"]
        self.skipped_steps, self.bad_streak = int(s["skipped_steps"]), int(s["bad_streak"])
        self.train_seconds = float(s["train_seconds"])
        self.history = [{k: _none_to_nan(v) for k, v in row.items()} for row in s["history"]]

    def _save(self, path: Path) -> None:
        _write_checkpoint(path, ops.to_host(self.model.flat), ops.to_host(self.adam_m),
                          ops.to_host(self.adam_v), self.step, self._state())

    def _commit(self) -> None:
        """The commit point of an epoch: last.h5 is replaced (one rename); then the epoch's
        pending best checkpoint becomes best.h5 and the logs are rewritten. A run killed
        before the rename leaves the previous epoch's files; one killed after it is completed
        by _recover_directory on resume, so best.h5, last.h5 and the logs always agree."""
        self._save(self.last_checkpoint)
        if self._pending_best.exists():
            os.replace(self._pending_best, self.best_checkpoint)
        self._write_logs()

    def _restart_best(self) -> None:
        """best.h5 was lost: the restored state becomes the best so far."""
        self.best_value, self.best_epoch, self.es_wait = _nan_to_none(self.recon_smth), self.epoch - 1, 0
        self._save(self.best_checkpoint)

    def _recover_directory(self, resume: bool) -> None:
        """Run under the lock at the start of fit: removes temporary files a killed run left;
        on resume completes or drops a pending best checkpoint; a fresh start removes the
        previous run's checkpoints and logs (so a killed fresh run never leaves them beside
        its own config)."""
        ckpts = self.out_dir / "checkpoints"
        for directory in (self.out_dir, ckpts):
            rundir.remove_stale_temp_files(directory)
        if not resume:
            for p in (self.last_checkpoint, self.best_checkpoint, self._pending_best,
                      self.out_dir / "log.csv", self.out_dir / "log.json"):
                p.unlink(missing_ok=True)
            return
        pending = self._pending_best
        if not pending.exists():
            return
        try:
            p_epoch = load_checkpoint(pending).epoch
            last = load_checkpoint(self.last_checkpoint).state if self.last_checkpoint.exists() else None
        except ValueError:
            last = None
        if last is not None and p_epoch <= int(last["epoch"]) \
                and p_epoch == int(last["early_stopping"]["best_epoch"]) + 1:
            os.replace(pending, self.best_checkpoint)  # killed between last.h5 and best.h5
        else:
            pending.unlink()  # its epoch was never committed: the resumed run redoes it

    def _resume_checkpoint(self) -> tuple[Checkpoint, bool]:
        """(last.h5, or best.h5 when last.h5 is damaged or missing (a warning says so); True
        when best.h5 was damaged). A damaged file is renamed to NAME.damaged so that nothing
        reads it again."""
        last, best = self.last_checkpoint, self.best_checkpoint
        problems = {}
        for path in (last, best):
            if not path.exists():
                continue
            try:
                ckpt = load_checkpoint(path)
            except ValueError as e:
                problems[path] = str(e)
                os.replace(path, path.with_name(path.name + ".damaged"))
                continue
            if path == best and last in problems:
                warnings.warn(f"{last} is damaged ({problems[last]}; kept as {last.name}.damaged); "
                              f"resuming from {best} (epoch {ckpt.epoch}) instead", RuntimeWarning,
                              stacklevel=4)
            elif path == last and best.exists():
                try:
                    load_checkpoint(best)
                except ValueError as e:
                    os.replace(best, best.with_name(best.name + ".damaged"))
                    warnings.warn(f"{best} is damaged ({e}; kept as {best.name}.damaged); "
                                  f"resuming from {last}; the best checkpoint restarts from this "
                                  "epoch", RuntimeWarning, stacklevel=4)
                    return ckpt, True
            return ckpt, False
        raise ValueError("cannot resume: " + "; ".join(problems.values()))

    # ------------------------------------------------------------------ helpers

    def _epoch_steps(self) -> list[list[tuple[int, np.ndarray]]]:
        """The batches of one epoch, drawn from self.rng: per step, (session, train trial
        indices) pairs (one pair without sessions; with sessions, stitching's mix)."""
        cfg = self.config
        if not self.model.config.multisession:
            n = self.data.train.n_trials
            perm = self.rng.permutation(n)
            return [[(0, perm[start : start + cfg.batch_size])] for start in range(0, n, cfg.batch_size)]
        n_trials = [ds.train.n_trials for ds in self.sessions]
        return [list(enumerate(indices))
                for indices in stitching.session_batch_indices(n_trials, cfg.batch_size, self.rng)]

    def _batch(self, step: list[tuple[int, np.ndarray]], shift_rng: np.random.Generator | None = None):
        """The Batch of (session, train trial indices) pairs, with their sample-validation
        masks; shift_rng: draw the temporal shifts from it (training steps only)."""
        cfg = self.config
        pieces = []
        for s, idx in step:
            encod, recon = self._train_time_major[s]
            encod = encod[:, idx]
            recon = encod if recon is None else recon[:, idx]
            if shift_rng is not None:
                # Independent shifts for the two, as lfads-torch (also when recon is encod).
                encod, recon = self._shifted(encod, shift_rng), self._shifted(recon, shift_rng)
            encod, recon = encod.transpose(1, 0, 2), recon.transpose(1, 0, 2)
            ext = self.sessions[s].train.ext_input
            sv = self._sv_masks[s].get("train")
            pieces.append((s, encod, recon, None if ext is None else ext[idx], None if sv is None else sv[idx]))
        if not self.model.config.multisession:
            _, encod, recon, ext, sv = pieces[0]
            return self.model.make_batch(encod, recon, ext, check_counts=False, sv_mask=sv,
                                         sv_rate=cfg.sv_rate)
        return self.model.make_session_batch([p[:4] for p in pieces], check_counts=False,
                                             sv_masks=None if cfg.sv_rate == 0 else [p[4] for p in pieces],
                                             sv_rate=cfg.sv_rate)

    def _shifted(self, data: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """data [T, B, N] with a temporal shift per trial and channel drawn from rng."""
        cfg = self.config
        shifts = draw_temporal_shifts(rng, data.shape[1:], cfg.temporal_shift_std, cfg.temporal_shift_max)
        return temporal_shift(data, shifts)

    def _make_sv_masks(self) -> list[dict]:
        """Fixed sample-validation masks per session and split (True = bin kept), drawn from
        sv_seed."""
        cfg = self.config
        if cfg.sv_rate == 0:
            return [{} for _ in self.sessions]
        rng = np.random.default_rng(np.random.SeedSequence([cfg.sv_seed, _SV_STREAM]))
        return [{name: rng.random(ds.splits[name].encod_data.shape) >= cfg.sv_rate
                 for name in ("train", "valid")} for ds in self.sessions]

    def _write_config_yaml(self) -> None:
        text = yaml.safe_dump({"model": self.model.config.to_dict(),
                               "train": self.config.to_dict()}, sort_keys=False)
        _write_text_atomic(self.out_dir / "config.yaml", text)

    def _write_logs(self) -> None:
        columns: list[str] = []
        for row in self.history:
            columns += [k for k in row if k not in columns]
        lines = [",".join(columns)]
        for row in self.history:
            lines.append(",".join(_csv_value(row.get(k, float("nan"))) for k in columns))
        _write_text_atomic(self.out_dir / "log.csv", "\n".join(lines) + "\n")
        rows = [{k: _nan_to_none(v) for k, v in row.items()} for row in self.history]
        _write_text_atomic(self.out_dir / "log.json", json.dumps(rows, indent=1) + "\n")

    def _plot_curves(self) -> None:
        if not self.history:
            return
        from . import plots  # matplotlib is imported only when a figure is drawn

        wanted = {"epoch", "lr"} | {f"{s}_{m}" for s in ("train", "valid") for m in _CURVES}
        rows = [{k: v for k, v in row.items() if k in wanted} for row in self.history]
        plots.plot_training_curves(self.out_dir / "training_curves.png", rows)

    def _plot_session_factors(self) -> None:
        if not self.model.config.multisession or not self.history:
            return
        from . import plots

        averages, labels = stitching.session_factor_averages(load_model(self.best_checkpoint),
                                                             self.sessions)
        names = [f"session {s}" + (f": {os.path.basename(ds.source)}" if os.path.isfile(ds.source) else "")
                 for s, ds in enumerate(self.sessions)]
        plots.plot_session_factors(self.out_dir / "session_factors.png", averages,
                                   session_names=names, conditions=labels)


# ---------------------------------------------------------------------- module helpers


def _as_dataset(data) -> data_mod.Dataset:
    if isinstance(data, data_mod.Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return data_mod.load_dataset(data)
    if isinstance(data, dict):
        return data_mod.from_arrays(**data)
    raise TypeError("data must be a Dataset, an HDF5 path or a dict of from_arrays arguments, "
                    f"got {type(data).__name__}")


def _as_sessions(data) -> list[data_mod.Dataset]:
    if isinstance(data, (str, os.PathLike)):
        return data_mod.load_sessions(data)
    if isinstance(data, (list, tuple)) and data:
        if all(isinstance(d, (str, os.PathLike)) for d in data):
            return data_mod.load_sessions(list(data))
        return [_as_dataset(d) for d in data]
    raise TypeError("data of a model with sessions must be a list with one Dataset or HDF5 path per "
                    f"session, or a glob pattern, got {type(data).__name__}")


def _fingerprint_diff(old, new, sessions) -> str:
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return "; ".join(f"session {s} ({sessions[s].source}): {a} vs {b}"
                         for s, (a, b) in enumerate(zip(old, new)) if a != b)
    return f"{old} vs {new}"


def _data_fingerprint(ds: data_mod.Dataset) -> dict:
    """Trial numbers and spike totals: enough to notice a resume on other data."""
    t, v = ds.train, ds.valid
    return {"n_train": t.n_trials, "n_valid": v.n_trials,
            "train_count_sum": float(np.nansum(t.recon_data, dtype=np.float64)),
            "valid_count_sum": float(np.nansum(v.recon_data, dtype=np.float64))}


def check_sizes(cfg: LFADSConfig, ds: data_mod.Dataset, owner: str = "the model",
                hint: str = "; build the config with train.config_for_data(dataset, ...)"
                ) -> None:
    """Raise ValueError naming the first size (neurons, bins, external inputs) in which the
    model of cfg and the dataset ds differ; owner names the model in the message."""
    for name in ("encod_data_dim", "recon_data_dim", "encod_seq_len", "recon_seq_len",
                 "ext_input_dim"):
        if getattr(cfg, name) != getattr(ds, name):
            raise ValueError(f"{owner} has {name} = {getattr(cfg, name)} but the data "
                             f"({ds.source}) have {getattr(ds, name)}{hint}")


# The validation metrics are logged every epoch, where metrics.r2 and
# metrics.bits_per_spike (general: any NaN pattern, float64 copies of every bin) would take
# about a tenth of an epoch; these two compute the same quantities in a few passes over the
# arrays (tests/test_train.py checks that they agree).


def _now() -> float:
    """The trainer's clock: every duration and the time budget are measured with it (tests
    replace it with a simulated one)."""
    return time.perf_counter()


def _pooled_r2(pred: np.ndarray, truth: np.ndarray) -> float:
    """metrics.r2 (pooled) for a truth without missing values (as data validation ensures)."""
    t = truth.ravel().astype(np.float64)
    d = pred.ravel().astype(np.float64) - t
    t -= t.mean()
    ss_tot = float(np.dot(t, t))
    return 1.0 - float(np.dot(d, d)) / ss_tot if ss_tot > 0 else float("nan")


def _bits_per_spike(rates: np.ndarray, spikes: np.ndarray) -> float:
    """metrics.bits_per_spike: Poisson log-likelihood gain over each neuron's mean rate, in
    bits per spike; rates [..., N] > 0 (the model's are exp of a log-rate), spikes [..., N]
    with NaN = missing."""
    n = spikes.shape[-1]
    y = spikes.reshape(-1, n)
    observed = ~np.isnan(y)
    y = np.where(observed, y, 0)
    r = rates.reshape(-1, n)
    total = y.sum(axis=0, dtype=np.float64)
    count = observed.sum(axis=0)
    if total.sum() == 0:
        return float("nan")
    # Per-bin terms in the rates' precision, sums in float64.
    ll = float(np.sum(y * np.log(np.maximum(r, r.dtype.type(metrics.ZERO_RATE))), dtype=np.float64)
               - np.sum(np.where(observed, r, 0), dtype=np.float64))
    null = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    ll_null = float(np.sum(total * np.log(np.maximum(null, metrics.ZERO_RATE)) - null * count))
    return (ll - ll_null) / float(total.sum()) / math.log(2.0)


def _shown(trials: np.ndarray) -> str:
    return ", ".join(str(int(t)) for t in trials[:8]) + (", ..." if len(trials) > 8 else "")


def _derived_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _sv_heldout_nll(rates, recon, sv_keep, sv_rate) -> float:
    """Mean Poisson NLL over the encoder bins, held-out bins weighted 1 / sv_rate and kept bins
    0 (lfads-torch's recon/sv), NaN bins left out; the same normalisation as valid_recon."""
    T, N = sv_keep.shape[1:]
    y = recon[:, :T, :N].astype(np.float64)
    r = rates[:, :T, :N].astype(np.float64)
    observed = ~np.isnan(y)
    counts = np.where(observed, y, 0.0).astype(np.int64)
    # Counts are validated integers, so log(y!) comes from a table.
    log_factorial = np.array([math.lgamma(k + 1.0) for k in range(int(counts.max()) + 1)])
    nll = r - counts * np.log(np.maximum(r, 1e-30)) + log_factorial[counts]
    w = np.where(observed & ~sv_keep, 1.0 / sv_rate, 0.0)
    return float(np.sum(w * nll) / max(int(observed.sum()), 1))


def _postfix(row: dict) -> str:
    parts = [f"loss {row['train_loss']:.4g}", f"recon {row['train_recon']:.4f}",
             f"val {row['valid_recon']:.4f}"]
    if "valid_r2" in row:
        parts.append(f"R2 {row['valid_r2']:.3f}")
    parts += [f"lr {row['lr']:.2g}", f"{row['epoch_s']:.1f}s/ep"]
    if row["skipped_steps"]:
        parts.append(f"skipped {row['skipped_steps']}")
    if row.get("divergences"):
        parts.append(f"rolled back {row['divergences']}")
    return ", ".join(parts)


def _csv_value(v) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else "nan"
    return str(v)


def _nan_to_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _none_to_nan(v):
    return float("nan") if v is None else v


def _dict_diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp_{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_int(cfg, name: str, low: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    setattr(cfg, name, int(v))  # numpy integers too, stored as Python ints (JSON, YAML)


def _check_float(cfg, name: str, *, low=None, high=None, low_open=False, high_open=False) -> None:
    v = getattr(cfg, name)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    v = float(v)
    setattr(cfg, name, v)
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v!r}")
