"""The LFADS model: the user's handle on its parameters, batches, noise and step graph.

The public methods take and return the batch-major arrays of the data files ([B, T, ...]);
inside, everything is time-major. All parameters live in one flat vector (`LFADS.flat`) of
which `LFADS.params` holds named views (params.py), so the optimizer updates them with one
fused call and gradients come back as one flat vector of the same layout. The vector lives
on the host (numpy) or on a GPU (cupy): `LFADS(cfg, device="cuda")` or `model.to("cuda")`;
the same code runs on either (graph.py over ops.py). docs/math.md writes down every equation.

Analyses that need more than one pass (refine.refine_ic, fixed_points.find, posterior
sampling) are functions of a model in the modules above this one.
"""
from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np

from . import graph, noise as noise_mod, ops
from .batch import (Batch, BatchMaker, Segment, as_array, check_spike_counts, given_ic,
                    session_index)
from .config import LFADSConfig, check_batch
from .params import Params, init_params, param_layout

__all__ = ["LFADS", "Batch", "Segment", "param_layout"]


def _on_model_device(method):
    """Runs a method with the parameters' GPU current (arrays it makes go there)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with ops.device_scope(self.flat):
            return method(self, *args, **kwargs)
    return wrapper


class LFADS:
    """An LFADS model with its parameters.

    Args:
        config: the hyperparameters.
        seed: seed of the parameter initialisation (lfads-torch's scheme, docs/math.md); the
            same numbers on every device.
        dtype: float32 (default) or float64 (for gradient checks; CPU only).
        device: "cpu" (default), "cuda" or "cuda:N" (needs CuPy and the CUDA build).
    """

    def __init__(self, config: LFADSConfig, seed: int = 0, dtype=np.float32, device: str = "cpu"):
        if not isinstance(config, LFADSConfig):
            raise TypeError(f"config must be an LFADSConfig, got {type(config).__name__}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.config = config
        self.dtype = dtype
        self._place(ops.to_device(init_params(config, seed, dtype), device))

    # ------------------------------------------------------------------ parameters, device

    @property
    def parameters(self) -> Params:
        """The Params (flat vector, named views, layout) the step graph runs on."""
        return self._params

    @property
    def workspace(self) -> graph.Workspace:
        """The step graph's scratch arrays (one pass at a time)."""
        return self._workspace

    @property
    def flat(self):
        """All parameters, one vector [num_params] (numpy, or cupy on a GPU)."""
        return self._params.flat

    @flat.setter
    @_on_model_device
    def flat(self, value) -> None:
        # `model.flat += d` and `model.flat = v` write into the vector the views share (host
        # values are copied to the device).
        if value is not self._params.flat:
            self._params.flat[...] = ops.to_device(value, self.device)

    @property
    def params(self) -> dict:
        """Named views into `flat`."""
        return self._params.views

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        return self._params.layout

    @property
    def num_params(self) -> int:
        return self.flat.size

    @property
    def xp(self):
        """numpy or cupy: the module of the parameters (and of batches, noise, gradients)."""
        return self._params.xp

    @property
    def device(self) -> str:
        """"cpu" or "cuda:N", where the parameters live."""
        return ops.device_of(self.flat)

    def to(self, device: str) -> "LFADS":
        """Moves the parameters to `device` ("cpu", "cuda", "cuda:N"); returns the model.

        Views taken earlier (model.params[...], model.flat) keep pointing at the old copy.
        """
        flat = ops.to_device(self.flat, device)
        if flat is not self.flat:
            self._place(flat)
        return self

    def views(self, flat) -> dict:
        """Named views into a flat vector of this model's layout (e.g. a gradient)."""
        if flat.shape != self.flat.shape:
            raise ValueError(f"flat must have shape {self.flat.shape}, got {flat.shape}")
        return self._params.views_of(flat)

    @_on_model_device
    def trainable_mask(self):
        """Which parameters the optimizer may change, for ops.adam_step(mask=...).

        Returns:
            uint8 [num_params] of the flat layout, on the parameters' device: 0 on the session
            read-ins unless the config has train_readin, 1 elsewhere.
        """
        return self._params.trainable_mask()

    # ------------------------------------------------------------------ one step

    @_on_model_device
    def make_batch(self, encod_data, recon_data=None, ext_input=None, *, session: int | None = None,
                   check_counts=True, sv_mask=None, sv_rate: float = 0.0) -> Batch:
        """Validates batch-major data and turns it into a time-major Batch on the model's
        device (batch.BatchMaker.make_batch documents the arguments)."""
        return self._batches.make_batch(encod_data, recon_data, ext_input, session=session,
                                        check_counts=check_counts, sv_mask=sv_mask, sv_rate=sv_rate)

    @_on_model_device
    def make_session_batch(self, parts, *, check_counts=True, sv_masks=None,
                           sv_rate: float = 0.0) -> Batch:
        """A batch mixing the trials of several sessions (a model with session_neurons;
        batch.BatchMaker.make_session_batch documents the arguments)."""
        return self._batches.make_session_batch(parts, check_counts=check_counts, sv_masks=sv_masks,
                                                sv_rate=sv_rate)

    @_on_model_device
    def draw_noise(self, batch_size, rng, *, train: bool = True, sample: bool = True) -> dict:
        """Draws the sampling noise and dropout masks of one step (docs/math.md, 'Noise'), on
        the model's device.

        Args:
            batch_size: B, or the Batch itself. A model with sessions and cd_rate > 0 needs
                the Batch: its coordinated-dropout mask is a list with one [T_e, B_s, n_s]
                array per segment (each session's own neurons).
            rng: numpy Generator. On the CPU the noise is drawn from it; on a GPU from a device
                generator seeded by one draw of it (ops.generator), so the run stays
                reproducible from the seed and resumable from the host generator's state.
            train: draw dropout and coordinated-dropout masks (else none).
            sample: draw posterior samples (else the posterior means are used).
        """
        return noise_mod.draw_noise(self.config, self.dtype, batch_size, ops.generator(self.xp, rng),
                                    train=train, sample=sample)

    @_on_model_device
    def loss_and_grads(self, batch: Batch, noise: dict | None = None, *, kl_ramp: float = 1.0,
                       l2_ramp: float = 1.0, grads: bool = True):
        """All loss terms and the gradient of the total loss for one batch.

        Args:
            batch: from make_batch.
            noise: from draw_noise (None: posterior means, no dropout).
            kl_ramp, l2_ramp: ramp coefficients in [0, 1] of the KL and L2 terms.
            grads: compute the gradient.

        Returns:
            (terms, grad): terms is a dict (loss, recon, kl_ic, kl_co, l2) of floats on the
            CPU and of 0-d device arrays on a GPU (read them with float() when needed: each
            read waits for the device); grad is a flat vector of the parameters' layout on
            their device (None when grads is False).
        """
        check_batch(self.config, batch, self.dtype)
        for name, value in (("kl_ramp", kl_ramp), ("l2_ramp", l2_ramp)):
            if not 0.0 <= value <= 1.0:  # NaN fails too
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        cache = graph.forward(self._params, self._workspace, batch, noise or {}, grads=grads,
                              kl_ramp=kl_ramp, l2_ramp=l2_ramp, outputs=False)
        grad = graph.backward(self._params, self._workspace, cache) if grads else None
        return cache["terms"], grad

    @_on_model_device
    def forward(self, encod_data, ext_input=None, *, sample: bool = False, seed: int | None = None,
                recon_data=None, session: int | None = None, sv_mask=None,
                sv_rate: float = 0.0, ic=None, repeats: int = 1, average: bool = False,
                outputs=None) -> dict:
        """Runs the model on batch-major data without dropout.

        Args:
            encod_data: [B, encod_seq_len, encod_data_dim] spike counts (with sessions:
                session_neurons[session] neurons).
            ext_input: [B, T, ext_input_dim] or None.
            sample: sample the posteriors (seeded by `seed`) instead of using their means.
                The samples are drawn on the host, so a seed gives the same samples on every
                device.
            recon_data: optional targets [B, recon_seq_len, recon_data_dim] (with sessions:
                session_recon_neurons[session]), for the loss terms.
            session: the session of the trials; required with sessions, else None.
            sv_mask, sv_rate: sample validation, as in make_batch.
            ic: initial conditions [B, ic_dim] that replace the posterior's (its mean or
                sample) in the generator, e.g. from refine.refine_ic; the output ic_mean is
                then this array, ic_std stays the encoder's. None: the posterior's.
            repeats: runs each trial this many times (posterior samples): the outputs have
                B * repeats rows, trial 0's repeats first (as np.repeat(encod_data, repeats,
                axis=0) would give), ic has B * repeats rows. The encoders run once per
                trial, not per row; the results are those of the repeated data.
            average: with repeats, return each trial's mean over its repeats (B rows; the
                posterior average of sample_and_average) instead of every row.
            outputs: the names of the outputs to return (below), e.g. ("output_params",);
                None: all. Outputs not asked for are not copied out of the pass.

        Returns:
            dict of numpy arrays (whatever the device) with lfads-torch's output names,
            batch-major: output_params (rates, expected counts per bin) [B, T_r, N_r] (with
            sessions: that session's recon neurons), factors [B, T_r, F], gen_states
            [B, T_r, G], gen_init [B, G], gen_inputs [B, T_r, U + E], con_states [B, T_r, C],
            co_means, co_stds [B, T_r, U], ic_mean, ic_std [B, ic_dim]; and `terms` (loss
            terms as floats; without recon_data only the read-out runs, and recon and loss
            are NaN).
        """
        cfg = self.config
        encod_data = as_array("encod_data", encod_data, 3)
        keep = graph.output_names(outputs)
        if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
        if repeats > 1:
            if recon_data is not None or sv_mask is not None or sv_rate:
                raise ValueError("repeats > 1 is for outputs: recon_data and sample validation "
                                 "are not taken with it")
            return self._forward_repeated(encod_data, ext_input, repeats, sample=sample,
                                          seed=seed, session=session, ic=ic, average=average,
                                          keep=keep)
        targets = recon_data is not None
        if not targets and sv_mask is None:
            # No targets: the batch holds the encoder inputs only, and the pass runs the
            # read-out without the likelihood.
            batch = self._batches.make_inputs_batch(encod_data, ext_input, session=session)
        else:
            if not targets:  # sample validation masks the inputs; the targets are unused
                n_r = cfg.recon_data_dim
                if cfg.multisession and session is not None:
                    n_r = cfg.session_recon_neurons[session_index(cfg, session)]
                recon_data = np.zeros((encod_data.shape[0], cfg.recon_seq_len, n_r), np.float32)
            batch = self.make_batch(encod_data, recon_data, ext_input, session=session, sv_mask=sv_mask,
                                    sv_rate=sv_rate, check_counts=targets)
            if not targets:
                check_spike_counts("encod_data", encod_data)
        noise = noise_mod.draw_noise(cfg, self.dtype, batch, np.random.default_rng(seed), train=False,
                                     sample=sample)
        cache = graph.forward(self._params, self._workspace, batch, noise, grads=False, kl_ramp=1.0,
                              l2_ramp=1.0, outputs=True, recon=targets,
                              ic=given_ic(cfg, self.dtype, self.xp, ic, batch.size), keep=keep)
        return _host_outputs(cache["outputs"])

    def _forward_repeated(self, encod_data, ext_input, reps: int, *, sample: bool, seed, session,
                          ic, average: bool, keep: tuple) -> dict:
        """forward(..., repeats=reps): the trials encoded once, the rest of the pass on
        their repeats."""
        cfg = self.config
        trials = self._batches.make_inputs_batch(encod_data, ext_input, session=session)
        rows = _repeated(trials, reps)
        rng = np.random.default_rng(seed)
        noise = noise_mod.draw_noise(cfg, self.dtype, rows, rng, train=False, sample=sample)
        P, ws = self._params, self._workspace
        nz = noise_mod.NoiseReader(noise, self.dtype, self.xp)
        encoded = graph.repeat_encoded(P, graph.encode(P, ws, trials, noise_mod.NoiseReader(
            {}, self.dtype, self.xp)), reps, nz, rows.size)
        cache = graph.forward(P, ws, rows, noise, grads=False, kl_ramp=1.0, l2_ramp=1.0,
                              outputs=True, recon=False, encoded=encoded,
                              ic=given_ic(cfg, self.dtype, self.xp, ic, rows.size),
                              average=reps if average else 1, keep=keep)
        return _host_outputs(cache["outputs"])

    # ------------------------------------------------------------------ helpers

    def _place(self, flat) -> None:
        self._params = Params(self.config, flat)
        self._workspace = graph.Workspace(self._params.xp, self.dtype)
        self._batches = BatchMaker(self.config, self.dtype, self._params.xp)


def _repeated(batch: Batch, reps: int) -> Batch:
    """The rows of a repeated pass of `batch` (inputs only): each trial reps times in a row,
    for their count and sessions. The counts are zero-width placeholders and the external
    inputs are left out: the encoders and the inputs' projection read the trials' batch
    (graph.repeat_encoded repeats their results)."""
    xp = ops.array_module(batch.encod if batch.segments is None else batch.segments[0].encod)

    def placeholder(a):  # [T_e, rows, 0]: gives the row count; nothing reads the counts
        return xp.empty((a.shape[0], a.shape[1] * reps, 0), a.dtype)

    segments = None if batch.segments is None else [
        replace(seg, start=seg.start * reps, stop=seg.stop * reps, encod=placeholder(seg.encod))
        for seg in batch.segments]
    return replace(batch, encod=None if batch.encod is None else placeholder(batch.encod),
                   ext=None, segments=segments)


def _host_outputs(out: dict) -> dict:
    """graph's outputs as numpy arrays, the terms as floats."""
    host = {k: ops.to_host(v) for k, v in out.items() if k != "terms"}
    host["terms"] = {k: float(v) for k, v in out["terms"].items()}
    return host
