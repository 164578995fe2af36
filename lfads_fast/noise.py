"""The randomness of one step: posterior samples and dropout / coordinated-dropout masks
(docs/math.md, 'Noise').

The arrays are drawn by the generator's own module, so they live where the model does: a
numpy Generator gives host arrays, a cupy Generator device arrays (ops.generator derives
one for the device from a host Generator, which keeps a run reproducible from its seed and
resumable from a checkpointed host state).
"""
from __future__ import annotations

import numpy as np

from .batch import Batch

__all__ = ["draw_noise", "NoiseReader", "KEYS"]

KEYS = ("ic_eps", "co_eps", "co_kl_eps", "cd_keep", "cd_pass", "drop_data", "drop_ic_hn", "drop_ci",
        "drop_fac_in", "drop_g0", "drop_gen", "drop_ext")


def draw_noise(cfg, dtype, batch_size, rng, *, train: bool = True, sample: bool = True) -> dict:
    """Draws the sampling noise and dropout masks of one step.

    Args:
        cfg: the model's LFADSConfig.
        dtype: float32 or float64 (the model's).
        batch_size: B, or the Batch itself. A model with sessions and cd_rate > 0 needs the
            Batch: its coordinated-dropout masks are lists with one [T_e, B_s, n_s] array per
            segment (each session's own neurons).
        rng: a numpy or cupy Generator; the arrays are of its module.
        train: draw dropout and coordinated-dropout masks (else none).
        sample: draw posterior samples (else the posterior means are used).

    Returns:
        dict of the arrays named in KEYS that apply: ic_eps [B, ic_dim], co_eps and co_kl_eps
        [T_r, B, co_dim], dropout masks scaled by 1 / (1 - dropout_rate), cd_keep 0/1 and,
        with cd_pass_rate > 0, cd_pass 0/1 (1 with probability cd_pass_rate) of cd_keep's
        shape. cd_pass is drawn last, so the other arrays are those drawn without it.
    """
    dt = np.dtype(dtype)
    batch = batch_size if isinstance(batch_size, Batch) else None
    B = batch.size if batch is not None else int(batch_size)
    Te, Tr = cfg.encod_seq_len, cfg.recon_seq_len
    noise: dict = {}
    if sample:
        noise["ic_eps"] = rng.standard_normal((B, cfg.ic_dim), dtype=dt)
        if cfg.use_con:
            noise["co_eps"] = rng.standard_normal((Tr, B, cfg.co_dim), dtype=dt)
    if cfg.use_con:
        noise["co_kl_eps"] = rng.standard_normal((Tr, B, cfg.co_dim), dtype=dt)
    if train and cfg.dropout_rate > 0:
        p = cfg.dropout_rate

        def drop(*shape):
            return (rng.random(shape, dtype=dt) >= p).astype(dt) * dt.type(1.0 / (1.0 - p))

        noise["drop_data"] = drop(Te, B, cfg.encod_data_dim)
        noise["drop_ic_hn"] = drop(B, 2 * cfg.ic_enc_dim)
        noise["drop_g0"] = drop(B, cfg.gen_dim)
        noise["drop_gen"] = drop(Tr, B, cfg.gen_dim)
        if cfg.use_con:
            noise["drop_ci"] = drop(Tr, B, cfg.ci_enc_dirs * cfg.ci_enc_dim)
            noise["drop_fac_in"] = drop(Tr, B, cfg.fac_dim)
        if cfg.ext_input_dim > 0:
            noise["drop_ext"] = drop(Tr, B, cfg.ext_input_dim)
    if train and cfg.cd_rate > 0:
        if not cfg.multisession:
            shapes = [(Te, B, cfg.encod_data_dim)]
        elif batch is None:
            raise ValueError("coordinated dropout with sessions masks each session's own neurons: "
                             "pass the Batch to draw_noise instead of its size")
        else:
            shapes = [(Te, seg.size, cfg.session_neurons[seg.session]) for seg in batch.segments]
        # keep: 1 with probability 1 - cd_rate; pass: 1 with probability cd_pass_rate.
        masks = {"cd_keep": [(rng.random(s, dtype=dt) >= cfg.cd_rate).astype(dt) for s in shapes]}
        if cfg.cd_pass_rate > 0:
            masks["cd_pass"] = [(rng.random(s, dtype=dt) < cfg.cd_pass_rate).astype(dt) for s in shapes]
        for key, arrays in masks.items():
            noise[key] = arrays if cfg.multisession else arrays[0]
    return noise


class NoiseReader:
    """Checks a noise dict and hands out its arrays as contiguous arrays of the model's
    module and dtype (unknown keys are an error; host arrays given to a device model are
    copied to the device).

    Args:
        noise: from draw_noise, or hand-made with some of the KEYS.
        dtype: the model's dtype.
        xp: the model's array module (numpy or cupy).
    """

    KEYS = KEYS

    def __init__(self, noise: dict, dtype, xp=np):
        unknown = sorted(set(noise) - set(KEYS))
        if unknown:
            raise ValueError(f"unknown noise entries: {', '.join(unknown)} (expected some of {', '.join(KEYS)})")
        self.noise, self.dtype, self.xp = noise, dtype, xp

    def get(self, key: str, shape: tuple):
        a = self.noise.get(key)
        if a is None:
            return None
        return self._checked(a, shape, f"noise['{key}']")

    def get_segments(self, key: str, shapes: list[tuple]):
        """A per-segment list of arrays (coordinated dropout with sessions), or None."""
        a = self.noise.get(key)
        if a is None:
            return None
        if not isinstance(a, (list, tuple)) or len(a) != len(shapes):
            raise ValueError(f"noise['{key}'] must be a list of {len(shapes)} arrays, one per session "
                             "segment of the batch")
        return [self._checked(ai, shape, f"noise['{key}'][{i}]")
                for i, (ai, shape) in enumerate(zip(a, shapes))]

    def require(self, key: str, shape: tuple):
        a = self.get(key, shape)
        if a is None:
            raise ValueError(f"noise['{key}'] is required (the inferred-input KL needs its own sample)")
        return a

    def _checked(self, a, shape: tuple, label: str):
        a = self.xp.asarray(a)
        if a.shape != tuple(shape):
            raise ValueError(f"{label} must have shape {list(shape)}, got {list(a.shape)}")
        return self.xp.ascontiguousarray(a, dtype=self.dtype)
