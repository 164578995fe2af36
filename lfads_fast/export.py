"""Export of a trained model for real-time inference (docs/realtime.md).

The file is safetensors (written with the `safetensors` package, the `realtime` extra): every
parameter of the model's layout (lfads_fast.params.param_layout) as a float32 tensor under its
own name, and string metadata:

    format           "lfads_fast.realtime"
    format_version   "1" (FORMAT_VERSION); readers refuse newer versions
    config           the LFADSConfig as JSON
    decoder          (optional) JSON {"features": "rates" | "factors", "lag": bins,
                     "n_outputs": D, ...}: a linear read-out of behaviour stored as the tensors
                     decoder_W [D, features] and decoder_b [D] (lfads-fast fit-decoder, which
                     adds "method": "ridge" | "ole" and its penalty, "alpha" or "lambda")

The C library (include/lfads_fast/realtime.h) reads it without Python, HDF5 or a JSON library.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from . import ops
from .config import LFADSConfig
from .errors import MissingOptionalPart
from .model import LFADS

__all__ = ["FORMAT", "FORMAT_VERSION", "export_model", "export_checkpoint", "read_export"]

FORMAT = "lfads_fast.realtime"
FORMAT_VERSION = 1


def _safetensors():
    try:
        import safetensors.numpy as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingOptionalPart("exporting needs the safetensors package: pip install 'lfads_fast[realtime]'") from e
    return st


def export_model(model: LFADS, path: str | os.PathLike, *, decoder: dict | None = None) -> None:
    """Writes a model (and optionally a fitted behaviour decoder) to a real-time file.

    Args:
        model: the model; its parameters are written as float32.
        path: output file (written atomically: a temporary file, then a rename).
        decoder: None, or {"W": [D, features], "b": [D], "features": "rates" | "factors",
            "lag": int >= 0, and any JSON-serialisable extras (e.g. "alpha", "r2")}.

    Raises:
        ValueError: a model the real-time library cannot run (several sessions, external
            inputs) or a malformed decoder.
    """
    cfg = model.config
    if cfg.multisession:
        raise ValueError("export: models of several sessions (session_neurons) are not supported in real time")
    if cfg.ext_input_dim > 0:
        raise ValueError("export: models with external inputs (ext_input_dim > 0) are not supported in real time")
    tensors = {name: np.ascontiguousarray(ops.to_host(view), dtype=np.float32)
               for name, view in model.params.items()}  # a model on a GPU too
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": cfg.to_json()}
    if decoder is not None:
        meta, W, b = _check_decoder(cfg, decoder)
        tensors["decoder_W"], tensors["decoder_b"] = W, b
        metadata["decoder"] = json.dumps(meta, sort_keys=True)
    _atomic_save(tensors, metadata, path)


def export_checkpoint(checkpoint: str | os.PathLike, path: str | os.PathLike, *,
                      decoder: dict | None = None) -> None:
    """export_model of the model stored in a training checkpoint."""
    from .train import load_model

    export_model(load_model(checkpoint), path, decoder=decoder)


def read_export(path: str | os.PathLike) -> tuple[LFADS, dict | None]:
    """Reads an exported file back into a float32 model (and its decoder, or None).

    Raises:
        ValueError: not a readable real-time file, or one of a newer format version.
    """
    st = _safetensors()
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
        tensors = st.load_file(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not an lfads_fast real-time file (format {metadata.get('format')!r})")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise ValueError(f"{path}: format_version {metadata.get('format_version')!r} is not an integer") from None
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version} is newer than this lfads_fast reads "
                         f"({FORMAT_VERSION}); update lfads_fast")
    model = LFADS(LFADSConfig.from_dict(json.loads(metadata["config"])), dtype=np.float32)
    for name, view in model.params.items():
        if name not in tensors or tensors[name].shape != view.shape:
            raise ValueError(f"{path}: tensor {name} is missing or has the wrong shape")
        view[...] = tensors[name]
    decoder = None
    if "decoder" in metadata:
        decoder = json.loads(metadata["decoder"])
        decoder["W"], decoder["b"] = tensors["decoder_W"], tensors["decoder_b"]
    return model, decoder


def _check_decoder(cfg: LFADSConfig, decoder: dict):
    meta = {k: v for k, v in decoder.items() if k not in ("W", "b")}
    features = meta.get("features")
    if features not in ("rates", "factors"):
        raise ValueError(f"decoder['features'] must be 'rates' or 'factors', got {features!r}")
    lag = meta.get("lag", 0)
    if isinstance(lag, bool) or not isinstance(lag, (int, np.integer)) or lag < 0:
        raise ValueError(f"decoder['lag'] must be an integer >= 0, got {lag!r}")
    n_feat = cfg.recon_data_dim if features == "rates" else cfg.fac_dim
    W = np.ascontiguousarray(decoder["W"], dtype=np.float32)
    b = np.ascontiguousarray(decoder["b"], dtype=np.float32)
    if W.ndim != 2 or W.shape[1] != n_feat or W.shape[0] < 1 or b.shape != (W.shape[0],):
        raise ValueError(f"decoder W must be [D, {n_feat}] and b [D], got {W.shape} and {b.shape}")
    if not (np.all(np.isfinite(W)) and np.all(np.isfinite(b))):
        raise ValueError("decoder W and b must be finite")
    meta.update(lag=int(lag), n_outputs=int(W.shape[0]))
    return meta, W, b


def _atomic_save(tensors: dict, metadata: dict, path) -> None:
    st = _safetensors()
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".export-", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        st.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
