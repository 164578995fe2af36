"""Real-time LFADS inference from Python, over the C library liblfads_fast_realtime.

    dec = Decoder("model.safetensors", mode="streaming")   # or mode="window", window=50
    for counts in acquisition():                            # one bin: [n_in] spike counts
        out = dec.step(counts)                              # None until enough bins arrived
        if out is not None:
            use(out.rates, out.factors, out.decoded)

The same compiled step as the C API (include/lfads_fast/realtime.h, docs/realtime.md): one bin
at batch 1, float32, no allocation inside the step. A bin with the wrong channel count, a NaN,
negative or huge count raises RealtimeError and leaves the decoder's state as it was.

`python -m lfads_fast.realtime --prefix` prints the install prefix of the library, for
`cmake -DCMAKE_PREFIX_PATH=...` or `PKG_CONFIG_PATH=<prefix>/lib/pkgconfig`.
"""
from __future__ import annotations

import ctypes
import inspect
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MissingOptionalPart

__all__ = ["Decoder", "RealtimeError", "StepOutput", "library_path", "prefix"]

_STATUS = {0: "ok", 1: "argument", 2: "io", 3: "format", 4: "version", 5: "unsupported",
           6: "channels", 7: "nan", 8: "negative", 9: "huge", 10: "memory"}
_MODES = {"window": 0, "streaming": 1}


class RealtimeError(ValueError):
    """An error status of the C library; `code` is its name (e.g. 'channels', 'version')."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class StepOutput:
    """The outputs of one bin.

    Attributes:
        bin: index since the last reset of the bin these outputs belong to (in window mode
            with look-ahead L, the newest bin minus L).
        rates: expected spike counts per bin, float32 [n_out].
        factors: float32 [n_factors].
        decoded: the fitted decoder's outputs, float32 [n_decoded] (empty without one; NaN
            until its lag is filled).
    """

    bin: int
    rates: np.ndarray
    factors: np.ndarray
    decoded: np.ndarray


class _Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("n_in", "n_out", "n_factors", "n_decoded", "seq_len",
                                               "ic_enc_seq_len", "streaming", "format_version")]


class _Options(ctypes.Structure):
    _fields_ = [("mode", ctypes.c_int32), ("window", ctypes.c_int32), ("lookahead", ctypes.c_int32),
                ("max_count", ctypes.c_float)]


class _Output(ctypes.Structure):
    _fields_ = [("rates", ctypes.c_void_p), ("factors", ctypes.c_void_p), ("decoded", ctypes.c_void_p),
                ("bin", ctypes.c_int64), ("ready", ctypes.c_int32)]


def prefix() -> Path:
    """The install prefix of the library: <prefix>/lib/liblfads_fast_realtime.so,
    <prefix>/include/lfads_fast/realtime.h, <prefix>/lib/cmake, <prefix>/lib/pkgconfig."""
    return Path(__file__).resolve().parent


def library_path() -> Path:
    """The shared library (LFADS_FAST_REALTIME_LIB overrides)."""
    env = os.environ.get("LFADS_FAST_REALTIME_LIB")
    return Path(env) if env else prefix() / "lib" / "liblfads_fast_realtime.so"


_lib = None


def _library():
    global _lib
    if _lib is None:
        path = library_path()
        if not path.exists():
            raise MissingOptionalPart(f"{path} not found: build lfads_fast (pip install . or make inplace)")
        lib = ctypes.CDLL(str(path))
        P, S = ctypes.c_void_p, ctypes.c_size_t
        lib.lfrt_status_string.restype = ctypes.c_char_p
        lib.lfrt_status_string.argtypes = [ctypes.c_int]
        lib.lfrt_model_load.argtypes = [ctypes.c_char_p, ctypes.POINTER(P), ctypes.c_char_p, S]
        lib.lfrt_model_free.argtypes = [P]
        lib.lfrt_model_free.restype = None
        lib.lfrt_model_get_info.argtypes = [P, ctypes.POINTER(_Info)]
        lib.lfrt_model_config_json.argtypes = [P]
        lib.lfrt_model_config_json.restype = ctypes.c_char_p
        lib.lfrt_state_size.argtypes = [P, ctypes.POINTER(_Options), ctypes.c_char_p, S]
        lib.lfrt_state_size.restype = S
        lib.lfrt_state_init.argtypes = [P, ctypes.POINTER(_Options), P, S, ctypes.POINTER(P)]
        lib.lfrt_reset.argtypes = [P]
        lib.lfrt_step.argtypes = [P, P, ctypes.c_int32, ctypes.POINTER(_Output)]
        lib.lfrt_state_error.argtypes = [P]
        lib.lfrt_state_error.restype = ctypes.c_char_p
        _lib = lib
    return _lib


class Decoder:
    """One stream of real-time inference on an exported model.

    Args:
        path: a file of `lfads-fast export`.
        mode: "window" (re-run the offline forward over the last `window` bins every bin;
            exact parity with LFADS.forward) or "streaming" (O(1) per bin; needs a model
            trained with ic_enc_seq_len and, with a controller, ci_enc_causal); None:
            streaming when the model can, else window.
        window: bins per forward pass in window mode (None: the model's encod_seq_len).
        lookahead: window mode: report bin t - lookahead.
        max_count: counts above this are refused (default 1000).

    Raises:
        RealtimeError: unreadable, foreign, truncated or newer-version file ('io', 'format',
            'version'), a model or mode the library cannot run ('unsupported'), bad options
            ('argument').
    """

    def __init__(self, path: str | os.PathLike, *, mode: str | None = "window", window: int | None = None,
                 lookahead: int = 0, max_count: float = 1000.0):
        lib = _library()
        self._lib = lib
        self._model = None
        if mode is not None and mode not in _MODES:
            raise ValueError(f"mode must be 'window', 'streaming' or None, got {mode!r}")
        err = ctypes.create_string_buffer(512)
        handle = ctypes.c_void_p()
        st = lib.lfrt_model_load(os.fsencode(os.fspath(path)), ctypes.byref(handle), err, len(err))
        if st != 0:
            raise RealtimeError(_STATUS.get(st, str(st)), err.value.decode(errors="replace"))
        self._model = handle
        info = _Info()
        lib.lfrt_model_get_info(handle, ctypes.byref(info))
        self.n_in, self.n_out, self.n_factors = info.n_in, info.n_out, info.n_factors
        self.n_decoded, self.seq_len = info.n_decoded, info.seq_len
        self.ic_enc_seq_len, self.can_stream = info.ic_enc_seq_len, bool(info.streaming)
        self.format_version = info.format_version
        if mode is None:
            mode = "streaming" if self.can_stream else "window"
        if mode == "streaming" and (window is not None or lookahead):
            raise ValueError("window and lookahead belong to window mode")
        self.mode = mode
        self._opts = _Options(_MODES[mode], 0 if window is None else int(window), int(lookahead),
                              float(max_count))
        size = lib.lfrt_state_size(handle, ctypes.byref(self._opts), err, len(err))
        if size == 0:
            raise RealtimeError("argument", err.value.decode(errors="replace"))
        # Caller-owned state: one numpy buffer, aligned as the library asks.
        self._mem = np.zeros(size + 64, dtype=np.uint8)
        addr = self._mem.ctypes.data
        aligned = (addr + 63) // 64 * 64
        self._state = ctypes.c_void_p()
        _check(lib, None, lib.lfrt_state_init(handle, ctypes.byref(self._opts), ctypes.c_void_p(aligned),
                                                size, ctypes.byref(self._state)))
        self.window = self._opts.window or (info.seq_len if mode == "window" else 0)
        self._rates = np.zeros(self.n_out, np.float32)
        self._factors = np.zeros(self.n_factors, np.float32)
        self._decoded = np.zeros(self.n_decoded, np.float32)
        self._out = _Output(self._rates.ctypes.data, self._factors.ctypes.data,
                            self._decoded.ctypes.data if self.n_decoded else None, 0, 0)

    @property
    def config_json(self) -> str:
        """The model's config (JSON) as stored in the file."""
        return self._lib.lfrt_model_config_json(self._model).decode()

    def reset(self) -> None:
        """Forgets all bins: the next bin is bin 0 of a new trial."""
        self._lib.lfrt_reset(self._state)

    def step(self, counts) -> StepOutput | None:
        """Feeds one bin of counts [n_in]; returns its outputs, or None while too few bins
        have arrived (window mode: fewer than `window`; streaming: fewer than ic_enc_seq_len).

        Raises:
            RealtimeError: code 'channels', 'nan', 'negative' or 'huge'; the state is unchanged.
        """
        if not self._step(counts):
            return None
        return StepOutput(int(self._out.bin), self._rates.copy(), self._factors.copy(), self._decoded.copy())

    def _step(self, counts) -> bool:
        """step into the decoder's own output buffers; True when they hold a bin's outputs."""
        counts = np.asarray(counts)
        if counts.ndim != 1:
            raise RealtimeError("channels", f"counts must be one bin [{self.n_in}], got shape {counts.shape}")
        if counts.dtype != np.float32 or not counts.flags.c_contiguous:
            counts = np.ascontiguousarray(counts, dtype=np.float32)
        _check(self._lib, self._state,
               self._lib.lfrt_step(self._state, counts.ctypes.data, counts.shape[0], ctypes.byref(self._out)))
        return bool(self._out.ready)

    def run(self, counts) -> dict:
        """Steps through a recording [T, n_in] from the current state.

        Returns:
            dict with bin [K] (the bins that produced outputs), rates [K, n_out],
            factors [K, n_factors], decoded [K, n_decoded].
        """
        counts = np.ascontiguousarray(counts, dtype=np.float32)
        if counts.ndim != 2:
            raise ValueError(f"counts must be [T, {self.n_in}], got shape {counts.shape}")
        outs = [o for o in (self.step(c) for c in counts) if o is not None]
        stack = {"rates": self.n_out, "factors": self.n_factors, "decoded": self.n_decoded}
        res = {"bin": np.array([o.bin for o in outs], dtype=np.int64)}
        for name, n in stack.items():
            res[name] = np.zeros((len(outs), n), np.float32)
            for i, o in enumerate(outs):
                res[name][i] = getattr(o, name)
        return res

    def __del__(self):
        if getattr(self, "_model", None) is not None:
            self._lib.lfrt_model_free(self._model)
            self._model = None


# ---------------------------------------------------------------------------- Redis node

def serve(model_path, *, host="127.0.0.1", port=6379, in_stream="spikes", out_stream="lfads",
          field="counts", mode=None, window=None, lookahead=0, max_count=1000.0, start_id="$",
          block_ms=100, maxlen=100000, stop=None, log=print) -> dict:
    """A BRAND-style node: spike counts from one Redis stream in, outputs to another.

    Input entries: `field` (default "counts") = the bin's counts as little-endian float32
    bytes [n_in] (as numpy's tobytes()); an entry with a field "reset" instead starts a new
    trial (the decoder forgets all bins). Output entries, one per input entry, in order:
    in_id (the input entry's id), bin, rates / factors / decoded (float32 bytes), and the
    times t_receive (entry read), t_before and t_after (around the step), in nanoseconds of
    CLOCK_MONOTONIC (time.monotonic_ns(), the same clock in every process of the host); no
    outputs yet (warm-up) gives bin -1 and empty arrays. A malformed entry (missing field,
    wrong byte count, NaN / negative / huge counts) gives an entry with `error` (a code) and
    `message` instead, and the node goes on with the state unchanged.

    Args:
        model_path: a file of lfads-fast export.
        host, port: the Redis server.
        in_stream, out_stream: stream keys; field: the counts field.
        mode, window, lookahead, max_count: as Decoder (mode None: streaming when the model
            can, else window).
        start_id: read entries after this id ("$": only new ones; "0": from the start).
        block_ms: longest wait per read, so that `stop` is checked that often.
        maxlen: approximate cap of the output stream's length (0: none).
        stop: a callable returning True to end the loop (serve's CLI sets it on SIGINT).
        log: where status lines go.

    Returns:
        counts of entries: {"bins": ..., "outputs": ..., "errors": ..., "resets": ...}.
    """
    try:
        import redis
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingOptionalPart("serve needs the redis package: pip install 'lfads_fast[realtime]'") from e

    dec = Decoder(model_path, mode=mode, window=window, lookahead=lookahead, max_count=max_count)
    r = redis.Redis(host=host, port=port)
    try:
        return _serve_loop(r, dec, dec.mode, host, port, in_stream, out_stream, field, start_id, block_ms,
                           maxlen, stop, log)
    except redis.ConnectionError as e:
        raise ValueError(f"Redis at {host}:{port}: {e}") from e


# serve's options and their defaults (what a serve config file may set).
SERVE_DEFAULTS = {name: p.default for name, p in inspect.signature(serve).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("stop", "log")}


def _serve_loop(r, dec, mode, host, port, in_stream, out_stream, field, start_id, block_ms, maxlen,
                stop, log) -> dict:
    r.ping()
    key = field.encode()
    last = start_id
    if last == "$":  # resolve now, so that entries added after "ready" are not missed
        info = r.xinfo_stream(in_stream) if r.exists(in_stream) else None
        last = info["last-generated-id"].decode() if info else "0-0"
    stats = {"bins": 0, "outputs": 0, "errors": 0, "resets": 0}
    add = {"maxlen": maxlen, "approximate": True} if maxlen else {}
    log(f"ready: {mode} mode, {dec.n_in} channels from {in_stream} -> {out_stream} on {host}:{port}")
    stop = stop or (lambda: False)
    while not stop():
        got = r.xread({in_stream: last}, count=64, block=block_ms)
        # The answers to one read go out in one round trip (under a backlog, reads grow).
        pipe = r.pipeline(transaction=False)
        for _, entries in got or []:
            for entry_id, fields in entries:
                last = entry_id
                pipe.xadd(out_stream, _answer(dec, entry_id, fields, key, field, stats), **add)
        if len(pipe):
            pipe.execute()
    log(f"stopped: {stats['bins']} bins, {stats['outputs']} outputs, {stats['errors']} refused entries, "
        f"{stats['resets']} resets")
    return stats


def _answer(dec, entry_id, fields, key, field, stats) -> dict:
    """The output entry for one input entry (see serve)."""
    t_recv = time.monotonic_ns()
    out = {"in_id": entry_id}
    if b"reset" in fields:
        dec.reset()
        stats["resets"] += 1
        out.update(reset=1, t_receive=t_recv)
        return out
    raw = fields.get(key)
    try:
        if raw is None:
            raise RealtimeError("format", f"entry has no '{field}' field (fields: "
                                f"{', '.join(k.decode(errors='replace') for k in fields)})")
        if len(raw) != 4 * dec.n_in:
            raise RealtimeError("channels", f"'{field}' has {len(raw)} bytes, expected "
                                f"{4 * dec.n_in} ({dec.n_in} float32 counts)")
        counts = np.frombuffer(raw, dtype="<f4")
        t0 = time.monotonic_ns()
        ready = dec._step(counts)
        t1 = time.monotonic_ns()
    except RealtimeError as e:
        stats["errors"] += 1
        out.update(error=e.code, message=str(e), t_receive=t_recv)
        return out
    stats["bins"] += 1
    if not ready:
        out.update(bin=-1, rates=b"", factors=b"", decoded=b"")
    else:  # the bytes are the one copy of the decoder's buffers
        stats["outputs"] += 1
        out.update(bin=int(dec._out.bin), rates=dec._rates.tobytes(), factors=dec._factors.tobytes(),
                   decoded=dec._decoded.tobytes())
    out.update(t_receive=t_recv, t_before=t0, t_after=t1)
    return out


def _check(lib, state, status: int) -> None:
    if status == 0:
        return
    detail = lib.lfrt_state_error(state).decode(errors="replace") if state is not None else ""
    msg = lib.lfrt_status_string(status).decode()
    raise RealtimeError(_STATUS.get(status, str(status)), f"{msg}: {detail}" if detail else msg)


if __name__ == "__main__":  # python -m lfads_fast.realtime --prefix | --lib
    if sys.argv[1:] == ["--prefix"]:
        print(prefix())
    elif sys.argv[1:] == ["--lib"]:
        print(library_path())
    else:
        sys.exit("usage: python -m lfads_fast.realtime --prefix | --lib")
