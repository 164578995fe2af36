"""Batches: batch-major data checked and turned into the time-major arrays of one step.

Validation runs on the host with numpy (counts, shapes, sample-validation masks); the
finished arrays are then put where the model lives (numpy, or cupy on a device).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

__all__ = ["Batch", "Segment", "BatchMaker", "as_array", "expect_shape", "given_ic", "session_index"]

@dataclass
class Segment:
    """The trials of one session inside a multi-session batch (rows start..stop-1).

    Attributes:
        session: the session's index.
        start, stop: its rows along the batch axis.
        encod: encoder input counts of the session's own neurons, [T_e, B_s, n_s]; missing
            bins are 0.
        recon: reconstruction targets [T_r, B_s, n_recon_s]; NaN = missing bin.
        n_valid: number of non-missing bins of recon.
        recon_weight: per-bin weights of its reconstruction loss [T_r, B_s, n_recon_s], or
            None (all 1); set by sample validation.
    """

    session: int
    start: int
    stop: int
    encod: np.ndarray
    recon: np.ndarray
    n_valid: int
    recon_weight: np.ndarray | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class Batch:
    """One batch, time-major, validated.

    Attributes:
        encod: encoder input counts, [T_e, B, N_e]; missing bins are 0. None with sessions.
        recon: reconstruction target counts, [T_r, B, N_r]; NaN = missing bin. None with
            sessions.
        ext: external inputs [T_r, B, E] (zero-padded after T_e if shorter), or None.
        n_valid: number of non-missing bins of recon (of all segments).
        segments: with sessions, the session-contiguous blocks of trials in batch order, each
            with its own counts; None for a single-session model.
        recon_weight: per-bin weights of the reconstruction loss and its gradient
            [T_r, B, N_r], or None (all 1); set by sample validation.
    """

    encod: np.ndarray | None
    recon: np.ndarray | None
    ext: np.ndarray | None
    n_valid: int
    segments: list[Segment] | None = None
    recon_weight: np.ndarray | None = None

    @property
    def size(self) -> int:
        if self.segments is not None:
            return self.segments[-1].stop
        return self.encod.shape[1]



class BatchMaker:
    """Builds the Batches of one configuration (LFADS.make_batch and make_session_batch).

    Args:
        config: the model's LFADSConfig.
        dtype: the model's dtype.
        xp: the model's array module; the batch's arrays are moved to it.
    """

    def __init__(self, config, dtype, xp=np):
        self.config, self.dtype, self.xp = config, np.dtype(dtype), xp

    def make_batch(self, encod_data, recon_data=None, ext_input=None, *, session: int | None = None,
                   check_counts=True, sv_mask=None, sv_rate: float = 0.0) -> Batch:
        """Validates batch-major data and turns it into a time-major Batch.

        Args:
            encod_data: spike counts [B, encod_seq_len, encod_data_dim]; NaN = missing bin.
                With sessions: [B, encod_seq_len, session_neurons[session]].
            recon_data: spike counts [B, recon_seq_len, recon_data_dim] (with sessions:
                session_recon_neurons[session]); NaN = missing bin. None uses encod_data (only
                when the two sizes agree).
            ext_input: external inputs [B, recon_seq_len or encod_seq_len, ext_input_dim].
            session: the session the trials come from; required with sessions, else None.
                make_session_batch mixes sessions.
            check_counts: check that counts are non-negative integers (off for speed when
                the data were validated on load).
            sv_mask: sample validation (lfads-torch's SampleValidation), 0/1 or bool
                [B, encod_seq_len, encod_data_dim], 1 = bin kept, 0 = bin held out; or None.
                Held-out bins are zeroed in the encoder input and left out of the
                reconstruction loss; kept bins are scaled by 1 / (1 - sv_rate) in both, so
                input sums and loss means stay comparable. Forward-prediction bins and
                held-out neurons keep weight 1. With sessions: [B, encod_seq_len,
                session_neurons[session]].
            sv_rate: the expected fraction of held-out bins, in (0, 1); required with sv_mask.
        """
        cfg = self.config
        if self._session_of(session) is not None:
            return self.make_session_batch([(session, encod_data, recon_data, ext_input)],
                                            check_counts=check_counts,
                                            sv_masks=None if sv_mask is None else [sv_mask],
                                            sv_rate=sv_rate)
        encod_data = as_array("encod_data", encod_data, 3)
        B = encod_data.shape[0]
        encod, recon, n_valid = self._time_major_counts("", encod_data, recon_data, cfg.encod_data_dim,
                                                        cfg.recon_data_dim, check_counts)
        recon_weight = self._apply_sv("", sv_mask, sv_rate, encod, recon)
        return self._placed(Batch(encod, recon, self._time_major_ext("ext_input", ext_input, B),
                                  n_valid, recon_weight=recon_weight))

    def make_inputs_batch(self, encod_data, ext_input=None, *, session: int | None = None) -> Batch:
        """A batch of encoder inputs without reconstruction targets (recon None, n_valid 0),
        for passes that only compute outputs: the counts are checked (NaN = missing bin)."""
        cfg = self.config
        s = self._session_of(session)
        encod_data = as_array("encod_data", encod_data, 3)
        B = encod_data.shape[0]
        n_e = cfg.encod_data_dim if s is None else cfg.session_neurons[s]
        if B == 0:
            raise ValueError("encod_data has no trials")
        expect_shape("encod_data", encod_data, (B, cfg.encod_seq_len, n_e))
        check_spike_counts("encod_data", encod_data)
        encod = self._time_major_encod(encod_data)
        ext = self._time_major_ext("ext_input", ext_input, B)
        if s is not None:
            return self._placed(Batch(None, None, ext, 0, [Segment(s, 0, B, encod, None, 0)]))
        return self._placed(Batch(encod, None, ext, 0))

    def _session_of(self, session) -> int | None:
        """The index of `session` for a batch of one session; None for a single-session
        model. Raises when the one is given without the other."""
        cfg = self.config
        if cfg.multisession:
            if session is None:
                raise ValueError(f"session= is required: the model has {cfg.n_sessions} sessions "
                                 "(make_session_batch mixes several)")
            return session_index(cfg, session)
        if session is not None:
            raise ValueError("session= needs a config with session_neurons")
        return None

    def _time_major_encod(self, encod_data: np.ndarray) -> np.ndarray:
        """encod_data [B, T, n] as a time-major copy [T, B, n] of the model's dtype, NaN -> 0
        (counts are checked, here or when the data were loaded, so there is no infinity to
        replace)."""
        # Always a copy: a [1, T, n] (or [B, 1, n]) array of the model's dtype is already
        # time-major and contiguous, and the batch's counts are written to (NaN -> 0 here,
        # sample validation's mask in _apply_sv).
        encod = np.array(encod_data.transpose(1, 0, 2), dtype=self.dtype, order="C")
        if encod_data.dtype.kind == "f":
            np.copyto(encod, 0, where=np.isnan(encod))
        return encod

    def make_session_batch(self, parts, *, check_counts=True, sv_masks=None,
                           sv_rate: float = 0.0) -> Batch:
        """A batch mixing the trials of several sessions (a model with session_neurons).

        The trials are stacked along the batch axis in the order given, each session's trials
        contiguous; the encoders and the decoder then run once over the whole batch.

        Args:
            parts: a sequence of (session, encod_data, recon_data, ext_input) tuples, each
                session at most once: encod_data [B_s, encod_seq_len, session_neurons[s]],
                recon_data [B_s, recon_seq_len, session_recon_neurons[s]] or None (as in
                make_batch), ext_input [B_s, T, ext_input_dim] or None. The last two may be
                left out of the tuple.
            check_counts: as in make_batch.
            sv_masks: sample validation, one mask per part (as make_batch's sv_mask, each
                [B_s, encod_seq_len, session_neurons[s]]), or None.
            sv_rate: as in make_batch; required with sv_masks.

        Returns:
            The batch, with one Segment per part.
        """
        cfg = self.config
        if not cfg.multisession:
            raise ValueError("make_session_batch needs a config with session_neurons")
        parts = [tuple(p) for p in parts]
        if not parts:
            raise ValueError("parts is empty: a batch needs the trials of at least one session")
        if sv_masks is not None and len(sv_masks) != len(parts):
            raise ValueError(f"sv_masks has {len(sv_masks)} entries for {len(parts)} parts (one per part)")
        segments, exts, seen, start = [], [], set(), 0
        for i, part in enumerate(parts):
            if not 2 <= len(part) <= 4:
                raise ValueError("each part must be (session, encod_data[, recon_data[, ext_input]]), "
                                 f"got a tuple of {len(part)}")
            s, encod_data, recon_data, ext_input = part + (None,) * (4 - len(part))
            s = session_index(self.config, s)
            if s in seen:
                raise ValueError(f"session {s} appears twice in one batch; concatenate its trials")
            seen.add(s)
            label = f"session {s} "
            encod_data = as_array(label + "encod_data", encod_data, 3)
            B_s = encod_data.shape[0]
            if B_s == 0:
                raise ValueError(f"{label}encod_data has no trials")
            encod, recon, n_valid = self._time_major_counts(
                label, encod_data, recon_data, cfg.session_neurons[s], cfg.session_recon_neurons[s],
                check_counts)
            weight = None if sv_masks is None else self._apply_sv(label, sv_masks[i], sv_rate, encod, recon)
            segments.append(Segment(s, start, start + B_s, encod, recon, n_valid, weight))
            exts.append(self._time_major_ext(label + "ext_input", ext_input, B_s))
            start += B_s
        ext = None if cfg.ext_input_dim == 0 else np.ascontiguousarray(np.concatenate(exts, axis=1))
        return self._placed(Batch(None, None, ext, sum(seg.n_valid for seg in segments), segments))

    def _placed(self, batch: Batch) -> Batch:
        """The batch with its arrays on the model's device (the same batch on the host)."""
        xp = self.xp
        if xp is np:
            return batch

        def dev(a):
            return None if a is None else xp.asarray(a)

        segments = None if batch.segments is None else [
            replace(seg, encod=dev(seg.encod), recon=dev(seg.recon), recon_weight=dev(seg.recon_weight))
            for seg in batch.segments]
        return replace(batch, encod=dev(batch.encod), recon=dev(batch.recon), ext=dev(batch.ext),
                       recon_weight=dev(batch.recon_weight), segments=segments)

    def _apply_sv(self, label: str, sv_mask, sv_rate: float, encod: np.ndarray,
                  recon: np.ndarray) -> np.ndarray | None:
        """Sample validation on time-major counts: scales encod [T_e, B, n_e] in place by the
        mask (kept bins 1 / (1 - sv_rate), held-out bins 0) and returns the reconstruction
        weights [T_r, B, n_r] (the same on the encoder bins and neurons, 1 elsewhere); None
        without a mask."""
        if sv_mask is None:
            return None
        if isinstance(sv_rate, bool) or not isinstance(sv_rate, (int, float)) or not 0.0 < sv_rate < 1.0:
            raise ValueError(f"sv_rate must be in (0, 1) when sv_mask is given, got {sv_rate!r}")
        Te, B, n_e = encod.shape
        sv_mask = np.asarray(sv_mask)
        expect_shape(label + "sv_mask", sv_mask, (B, Te, n_e))
        if sv_mask.dtype != np.bool_ and not np.all((sv_mask == 0) | (sv_mask == 1)):
            raise ValueError(f"{label}sv_mask must hold only 0 and 1 (1 = bin kept)")
        keep = sv_mask.transpose(1, 0, 2).astype(self.dtype) * self.dtype.type(1.0 / (1.0 - sv_rate))
        encod *= keep
        weight = np.ones_like(recon)
        weight[:Te, :, :n_e] = keep
        return weight

    def _time_major_counts(self, label: str, encod_data: np.ndarray, recon_data, n_e: int, n_r: int,
                           check_counts: bool):
        """Checked time-major (encod [T_e, B, n_e] with NaN -> 0, recon [T_r, B, n_r], n_valid)."""
        cfg = self.config
        B = encod_data.shape[0]
        expect_shape(label + "encod_data", encod_data, (B, cfg.encod_seq_len, n_e))
        if recon_data is None:
            if (cfg.recon_seq_len, n_r) != (cfg.encod_seq_len, n_e):
                raise ValueError(f"{label}recon_data is required when its bins or neurons differ from "
                                 "those of encod_data")
            recon_data = encod_data
        recon_data = as_array(label + "recon_data", recon_data, 3)
        expect_shape(label + "recon_data", recon_data, (B, cfg.recon_seq_len, n_r))
        if check_counts:
            check_spike_counts(label + "encod_data", encod_data)
            check_spike_counts(label + "recon_data", recon_data)
        encod = self._time_major_encod(encod_data)
        recon = np.ascontiguousarray(recon_data.transpose(1, 0, 2), dtype=self.dtype)
        n_valid = int(np.count_nonzero(~np.isnan(recon)))
        if n_valid == 0:
            raise ValueError(f"{label}recon_data has no valid (non-NaN) bins")
        return encod, recon, n_valid

    def _time_major_ext(self, name: str, ext_input, B: int):
        """Checked external inputs [T_r, B, E] (zero-padded after T_e), or None when E = 0."""
        cfg = self.config
        if cfg.ext_input_dim == 0:
            if ext_input is not None and np.asarray(ext_input).size > 0:
                raise ValueError(f"{name} was given but the config has ext_input_dim = 0")
            return None
        if ext_input is None:
            raise ValueError(f"{name} is required: ext_input_dim is {cfg.ext_input_dim}")
        ext_input = as_array(name, ext_input, 3)
        if ext_input.shape[0] != B or ext_input.shape[2] != cfg.ext_input_dim or \
                ext_input.shape[1] not in (cfg.encod_seq_len, cfg.recon_seq_len):
            raise ValueError(f"{name} must be [{B}, {cfg.recon_seq_len} (or {cfg.encod_seq_len}), "
                             f"{cfg.ext_input_dim}], got {ext_input.shape}")
        if not np.all(np.isfinite(ext_input)):
            raise ValueError(f"{name} must be finite (no NaN or inf)")
        ext = np.zeros((cfg.recon_seq_len, B, cfg.ext_input_dim), dtype=self.dtype)
        ext[: ext_input.shape[1]] = ext_input.transpose(1, 0, 2)
        return ext


def given_ic(cfg, dtype, xp, ic, B: int, name: str = "ic"):
    """Checked initial conditions [B, ic_dim] of the model's dtype and module, or None."""
    if ic is None:
        return None
    ic = as_array(name, ic, 2)
    if ic.shape != (B, cfg.ic_dim):
        raise ValueError(f"{name} must have shape [{B}, {cfg.ic_dim}] [trials, ic_dim], "
                         f"got {list(ic.shape)}")
    if not np.all(np.isfinite(ic)):
        raise ValueError(f"{name} has non-finite values")
    return xp.ascontiguousarray(xp.asarray(ic), dtype=dtype)


def session_index(cfg, session) -> int:
    """A checked session index of a model with sessions."""
    n = cfg.n_sessions
    if isinstance(session, bool) or not isinstance(session, (int, np.integer)) or not 0 <= session < n:
        raise ValueError(f"session must be an integer in [0, {n}), got {session!r}")
    return int(session)


def as_array(name: str, a, ndim: int) -> np.ndarray:
    """`a` as a host numpy array of `ndim` numeric dimensions (device arrays are copied)."""
    if hasattr(a, "__cuda_array_interface__") and hasattr(a, "get"):
        a = a.get()
    try:
        a = np.asarray(a)
    except Exception as e:  # ragged lists and the like
        raise TypeError(f"{name} must be an array, got {type(a).__name__}") from e
    if a.dtype.kind not in "fiu" or a.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-d numeric array, got shape {a.shape} dtype {a.dtype}")
    return a


def expect_shape(name: str, a: np.ndarray, shape: tuple) -> None:
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {list(shape)} [batch, time, neurons] for this config, "
                         f"got {list(a.shape)}")


def check_spike_counts(name: str, a: np.ndarray) -> None:
    """Raises ValueError naming `name` unless a holds spike counts: integers >= 0 (NaN marks
    a missing bin)."""
    if a.dtype.kind in "iu":
        if a.size and a.min() < 0:
            raise ValueError(f"{name} has negative spike counts")
        return
    nan = np.isnan(a)
    finite = a[~nan] if nan.any() else a  # no copy in the usual case, no NaN
    if not finite.size:
        return
    lo, hi = finite.min(), finite.max()
    if np.isinf(lo) or np.isinf(hi):
        raise ValueError(f"{name} has infinite values")
    if lo < 0:
        raise ValueError(f"{name} has negative spike counts (min {lo})")
    if not np.array_equal(finite, np.rint(finite)):
        raise ValueError(f"{name} has non-integer spike counts")
