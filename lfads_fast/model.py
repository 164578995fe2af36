"""The LFADS model: parameters, forward pass and gradients over the compiled kernels.

Inside, everything is time-major ([T, B, ...]); the public methods take and return the
batch-major arrays of the data files ([B, T, ...]). All parameters live in one flat vector
(`LFADS.flat`) of which `LFADS.params` holds named views, so the optimizer updates them with
one fused call and gradients come back as one flat vector of the same layout.
docs/math.md writes down every equation implemented here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ops
from .config import LFADSConfig

__all__ = ["LFADS", "Batch", "Segment", "param_layout"]


def param_layout(cfg: LFADSConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the parameters, in the order of the flat vector.

    The input weights (and biases) of the four encoder GRUs are adjacent, so together they
    form one [3 * (2 ic_enc_dim + 2 ci_enc_dim), encod_data_dim] matrix for a single GEMM.
    With several sessions, the single read-out is replaced by readin_W_{s} [N_e, n_s],
    readin_b_{s} [N_e], readout_W_{s} [n_recon_s, F] and readout_b_{s} [n_recon_s] per session
    s, at the end of the vector.
    """
    Ne, Nr = cfg.encod_data_dim, cfg.recon_data_dim
    Hi, Hc = cfg.ic_enc_dim, cfg.ci_enc_dim
    C, U, G, F, E = cfg.con_dim, cfg.co_dim, cfg.gen_dim, cfg.fac_dim, cfg.ext_input_dim
    encs = [("ic_enc_fwd", Hi), ("ic_enc_bwd", Hi)]
    if cfg.use_con:
        encs += [("ci_enc_fwd", Hc)] + ([] if cfg.ci_enc_causal else [("ci_enc_bwd", Hc)])
    layout = [(f"{e}_W_ih", (3 * h, Ne)) for e, h in encs]
    layout += [(f"{e}_b_ih", (3 * h,)) for e, h in encs]
    layout += [(f"{e}_W_hh", (3 * h, h)) for e, h in encs]
    layout += [("ic_enc_h0", (2, Hi))]
    if cfg.use_con:
        layout += [("ci_enc_h0", (cfg.ci_enc_dirs, Hc))]
    layout += [("ic_linear_W", (2 * cfg.ic_dim, 2 * Hi)), ("ic_linear_b", (2 * cfg.ic_dim,))]
    if cfg.use_con:
        layout += [
            ("con_W_ih", (3 * C, cfg.ci_enc_dirs * Hc + F)),
            ("con_b_ih", (3 * C,)),
            ("con_W_hh", (3 * C, C)),
            ("con_h0", (C,)),
            ("co_linear_W", (2 * U, C)),
            ("co_linear_b", (2 * U,)),
        ]
    Ug = U if cfg.use_con else 0
    layout += [
        ("gen_W_ih", (3 * G, Ug + E)),
        ("gen_b_ih", (3 * G,)),
        ("gen_W_hh", (3 * G, G)),
        ("ic_to_g0_W", (G, cfg.ic_dim)),
        ("ic_to_g0_b", (G,)),
        ("fac_W", (F, G)),
    ]
    if not cfg.multisession:
        layout += [("readout_W", (Nr, F)), ("readout_b", (Nr,))]
    layout += [("ic_prior_mean", (cfg.ic_dim,))]
    if cfg.use_con:
        layout += [("co_prior_logtau", (U,)), ("co_prior_lognvar", (U,))]
    if cfg.multisession:
        # Read-ins together, then read-outs: the frozen read-ins form one block of the mask.
        for s, n in enumerate(cfg.session_neurons):
            layout += [(f"readin_W_{s}", (Ne, n)), (f"readin_b_{s}", (Ne,))]
        for s, n in enumerate(cfg.session_recon_neurons):
            layout += [(f"readout_W_{s}", (n, F)), (f"readout_b_{s}", (n,))]
    return layout


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


class LFADS:
    """An LFADS model with its parameters.

    Args:
        config: the hyperparameters.
        seed: seed of the parameter initialisation (lfads-torch's scheme, docs/math.md).
        dtype: float32 (default) or float64 (for gradient checks).
    """

    def __init__(self, config: LFADSConfig, seed: int = 0, dtype=np.float32):
        if not isinstance(config, LFADSConfig):
            raise TypeError(f"config must be an LFADSConfig, got {type(config).__name__}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.config = config
        self.dtype = dtype
        self.layout = param_layout(config)
        self.flat = np.zeros(sum(int(np.prod(s)) for _, s in self.layout), dtype=dtype)
        self.params = self._views(self.flat)
        self._init_params(np.random.default_rng(seed))
        # Scratch reused from step to step: fresh multi-100-MB arrays cost more in page faults
        # than the kernels that fill them. A model is therefore not safe to use from two
        # threads at once.
        self._ws: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ public API

    @property
    def num_params(self) -> int:
        return self.flat.size

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Named views into a flat vector of this model's layout (e.g. a gradient)."""
        if flat.shape != self.flat.shape:
            raise ValueError(f"flat must have shape {self.flat.shape}, got {flat.shape}")
        return self._views(flat)

    def trainable_mask(self) -> np.ndarray:
        """Which parameters the optimizer may change, for ops.adam_step(mask=...).

        Returns:
            uint8 [num_params] of the flat layout: 0 on the session read-ins unless the
            config has train_readin, 1 elsewhere.
        """
        mask = np.ones(self.flat.shape, dtype=np.uint8)
        if self.config.multisession and not self.config.train_readin:
            views = self._views(mask)
            for s in range(self.config.n_sessions):
                views[f"readin_W_{s}"][...] = 0
                views[f"readin_b_{s}"][...] = 0
        return mask

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
        if cfg.multisession:
            if session is None:
                raise ValueError(f"session= is required: the model has {cfg.n_sessions} sessions "
                                 "(make_session_batch mixes several)")
            return self.make_session_batch([(session, encod_data, recon_data, ext_input)],
                                            check_counts=check_counts,
                                            sv_masks=None if sv_mask is None else [sv_mask],
                                            sv_rate=sv_rate)
        if session is not None:
            raise ValueError("session= needs a config with session_neurons")
        encod_data = _as_array("encod_data", encod_data, 3)
        B = encod_data.shape[0]
        encod, recon, n_valid = self._time_major_counts("", encod_data, recon_data, cfg.encod_data_dim,
                                                        cfg.recon_data_dim, check_counts)
        recon_weight = self._apply_sv("", sv_mask, sv_rate, encod, recon)
        return Batch(encod, recon, self._time_major_ext("ext_input", ext_input, B), n_valid,
                     recon_weight=recon_weight)

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
            s = self._session_index(s)
            if s in seen:
                raise ValueError(f"session {s} appears twice in one batch; concatenate its trials")
            seen.add(s)
            label = f"session {s} "
            encod_data = _as_array(label + "encod_data", encod_data, 3)
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
        return Batch(None, None, ext, sum(seg.n_valid for seg in segments), segments)

    def draw_noise(self, batch_size, rng: np.random.Generator, *, train: bool = True,
                   sample: bool = True) -> dict:
        """Draws the sampling noise and dropout masks of one step (docs/math.md, 'Noise').

        Args:
            batch_size: B, or the Batch itself. A model with sessions and cd_rate > 0 needs
                the Batch: its coordinated-dropout mask is a list with one [T_e, B_s, n_s]
                array per segment (each session's own neurons).
            rng: numpy Generator.
            train: draw dropout and coordinated-dropout masks (else none).
            sample: draw posterior samples (else the posterior means are used).
        """
        cfg, dt = self.config, self.dtype
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
            def keep(*shape):
                return (rng.random(shape, dtype=dt) >= cfg.cd_rate).astype(dt)

            if not cfg.multisession:
                noise["cd_keep"] = keep(Te, B, cfg.encod_data_dim)
            elif batch is None:
                raise ValueError("coordinated dropout with sessions masks each session's own neurons: "
                                 "pass the Batch to draw_noise instead of its size")
            else:
                noise["cd_keep"] = [keep(Te, seg.size, cfg.session_neurons[seg.session])
                                    for seg in batch.segments]
        return noise

    def loss_and_grads(self, batch: Batch, noise: dict | None = None, *, kl_ramp: float = 1.0,
                       l2_ramp: float = 1.0, grads: bool = True):
        """All loss terms and the gradient of the total loss for one batch.

        Args:
            batch: from make_batch.
            noise: from draw_noise (None: posterior means, no dropout).
            kl_ramp, l2_ramp: ramp coefficients in [0, 1] of the KL and L2 terms.
            grads: compute the gradient.

        Returns:
            (terms, grad): terms is a dict of floats (loss, recon, kl_ic, kl_co, l2); grad is a
            flat vector of the parameters' layout (None when grads is False).
        """
        cache = self._forward(batch, noise or {}, grads=grads, kl_ramp=kl_ramp, l2_ramp=l2_ramp,
                              outputs=False)
        grad = self._backward(cache) if grads else None
        return cache["terms"], grad

    def forward(self, encod_data, ext_input=None, *, sample: bool = False, seed: int | None = None,
                recon_data=None, session: int | None = None, sv_mask=None,
                sv_rate: float = 0.0, ic=None) -> dict:
        """Runs the model on batch-major data without dropout.

        Args:
            encod_data: [B, encod_seq_len, encod_data_dim] spike counts (with sessions:
                session_neurons[session] neurons).
            ext_input: [B, T, ext_input_dim] or None.
            sample: sample the posteriors (seeded by `seed`) instead of using their means.
            recon_data: optional targets [B, recon_seq_len, recon_data_dim] (with sessions:
                session_recon_neurons[session]), for the loss terms.
            session: the session of the trials; required with sessions, else None.
            sv_mask, sv_rate: sample validation, as in make_batch.
            ic: initial conditions [B, ic_dim] that replace the posterior's (its mean or
                sample) in the generator, e.g. from refine_ic; the output ic_mean is then
                this array, ic_std stays the encoder's. None: the posterior's.

        Returns:
            dict with lfads-torch's output names, batch-major: output_params (rates, expected
            counts per bin) [B, T_r, N_r] (with sessions: that session's recon neurons),
            factors [B, T_r, F], gen_states [B, T_r, G], gen_init [B, G],
            gen_inputs [B, T_r, U + E], con_states [B, T_r, C], co_means, co_stds [B, T_r, U],
            ic_mean, ic_std [B, ic_dim]; and `terms` (loss terms, meaningful when recon_data
            is given).
        """
        cfg = self.config
        encod_data = _as_array("encod_data", encod_data, 3)
        if recon_data is None:
            n_r = cfg.recon_data_dim
            if cfg.multisession and session is not None:
                n_r = cfg.session_recon_neurons[self._session_index(session)]
            recon_data = np.zeros((encod_data.shape[0], cfg.recon_seq_len, n_r), np.float32)
        batch = self.make_batch(encod_data, recon_data, ext_input, session=session, sv_mask=sv_mask,
                                sv_rate=sv_rate)
        noise = self.draw_noise(batch, np.random.default_rng(seed), train=False, sample=sample)
        cache = self._forward(batch, noise, grads=False, kl_ramp=1.0, l2_ramp=1.0, outputs=True,
                              ic=self._given_ic(ic, batch.size))
        return cache["outputs"]

    def refine_ic(self, encod_data, ext_input=None, *, session: int | None = None, recon_data=None,
                  steps: int = 50, lr: float = 0.05, ic_init=None) -> dict:
        """Semi-amortised inference: refines each trial's initial condition by gradient
        steps on its own negative log joint, starting from the encoder's posterior mean.

        The encoder's posterior mean is an amortised guess, one network for all trials; per
        trial, the initial condition that best explains that trial's spikes under the trained
        generator is the minimiser of

            sum over bins and neurons of Poisson NLL(spikes | rates(ic))
            + 0.5 * sum((ic - ic_prior_mean)^2) / ic_prior_var

        (the model's likelihood and its Gaussian prior of the initial condition; no dropout,
        the controller's outputs at their posterior means). Adam minimises it for every
        trial at once (the trials are independent, and Adam's steps are per element), its
        step decaying from lr to 0 over the steps on a cosine. docs/refine_ic.md shows what
        it gains and costs.

        Args:
            encod_data: spike counts [B, encod_seq_len, encod_data_dim] (with sessions:
                session_neurons[session] neurons); NaN = missing bin.
            ext_input: external inputs [B, T, ext_input_dim], or None.
            session: the session of the trials; required with sessions, else None.
            recon_data: the counts the objective fits, [B, recon_seq_len, recon_data_dim]
                (with sessions: session_recon_neurons[session]); NaN = not fitted. None fits
                the encoder's own spikes: the model's first encod_data_dim read-out neurons
                over the first encod_seq_len bins (held-in neurons come first, forward
                prediction bins last); the other read-out neurons and bins are not fitted.
            steps: Adam steps (0 returns the posterior means).
            lr: Adam's initial step size, in initial-condition units.
            ic_init: starting initial conditions [B, ic_dim]; None: the posterior means.

        Returns:
            dict: ic [B, ic_dim] (the model's dtype), ic_init [B, ic_dim] (the start),
            objective [steps + 1] (the objective above, summed over the trials, before each
            step and after the last).
        """
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if not (isinstance(lr, (int, float, np.floating)) and np.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        dt = self.dtype
        batch, noise = self._ic_batch(encod_data, ext_input, session, recon_data)
        # The encoders do not depend on the initial condition: encoded once for all steps.
        encoded = self._encode(batch, _NoiseReader(noise, dt))
        ic = self._given_ic(encoded["ic_mean"] if ic_init is None else ic_init, batch.size,
                            name="ic_init").copy()
        start = ic.copy()
        m = np.zeros_like(ic)
        v = np.zeros_like(ic)
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        objective = np.empty(steps + 1)
        for k in range(steps + 1):
            objective[k], grad = self._ic_objective(batch, noise, ic, grads=k < steps, encoded=encoded)
            if not np.isfinite(objective[k]):
                raise FloatingPointError(f"refine_ic: the objective became {objective[k]} at step {k}")
            if k == steps:
                break
            m = beta1 * m + (1 - beta1) * grad
            v = beta2 * v + (1 - beta2) * grad * grad
            step = lr * 0.5 * (1.0 + np.cos(np.pi * k / steps))
            m_hat = m / (1 - beta1 ** (k + 1))
            v_hat = v / (1 - beta2 ** (k + 1))
            ic -= (step * m_hat / (np.sqrt(v_hat) + eps)).astype(dt)
        return {"ic": ic, "ic_init": start, "objective": objective}

    def ic_objective(self, encod_data, ic, ext_input=None, *, session: int | None = None,
                     recon_data=None, grads: bool = True):
        """refine_ic's objective (its docstring) at given initial conditions, and its gradient.

        Args:
            encod_data, ext_input, session, recon_data: as in refine_ic.
            ic: initial conditions [B, ic_dim].
            grads: also compute the gradient.

        Returns:
            (objective, grad): the objective summed over the trials (float) and its gradient
            with respect to ic [B, ic_dim] (None when grads is False). Each trial's
            objective depends on its own row of ic only.
        """
        batch, noise = self._ic_batch(encod_data, ext_input, session, recon_data)
        return self._ic_objective(batch, noise, self._given_ic(ic, batch.size), grads=grads)

    def _ic_batch(self, encod_data, ext_input, session, recon_data):
        encod_data = _as_array("encod_data", encod_data, 3)
        if recon_data is None:
            recon_data = self._encoder_targets(encod_data, session)
        batch = self.make_batch(encod_data, recon_data, ext_input, session=session)
        # No dropout, posterior means of the controller (its KL noise is drawn but unused).
        return batch, self.draw_noise(batch, np.random.default_rng(0), train=False, sample=False)

    def _ic_objective(self, batch: Batch, noise: dict, ic: np.ndarray, *, grads: bool,
                      encoded: dict | None = None):
        cfg, dt = self.config, self.dtype
        c = self._forward(batch, noise, grads=grads, kl_ramp=0.0, l2_ramp=0.0, outputs=False, ic=ic,
                          encoded=encoded)
        diff = ic - self.params["ic_prior_mean"]
        inv_var = 1.0 / cfg.ic_prior_var
        # The forward pass reports the reconstruction as the sum divided by the number of valid
        # bins (recon_reduce_mean) or of trials; one session per batch here.
        to_sum = batch.n_valid if cfg.recon_reduce_mean else batch.size
        objective = c["terms"]["recon"] * to_sum + 0.5 * inv_var * float(np.vdot(diff, diff))
        if not grads:
            return objective, None
        d_recon = self._backward(c, ic_only=True)
        return objective, d_recon * dt.type(to_sum / cfg.loss_scale) + diff * dt.type(inv_var)

    def _encoder_targets(self, encod_data: np.ndarray, session) -> np.ndarray:
        """refine_ic's default targets: the encoder's spikes in the read-out's first neurons
        and bins, NaN (not fitted) elsewhere."""
        cfg = self.config
        n_e, n_r = cfg.encod_data_dim, cfg.recon_data_dim
        if cfg.multisession:
            if session is None:
                raise ValueError(f"session= is required: the model has {cfg.n_sessions} sessions")
            s = self._session_index(session)
            n_e, n_r = cfg.session_neurons[s], cfg.session_recon_neurons[s]
        B = encod_data.shape[0]
        _expect_shape("encod_data", encod_data, (B, cfg.encod_seq_len, n_e))
        if (cfg.recon_seq_len, n_r) == (cfg.encod_seq_len, n_e):
            return encod_data
        if n_r < n_e or cfg.recon_seq_len < cfg.encod_seq_len:
            raise ValueError("recon_data is required: the model's read-out has fewer neurons or bins "
                             f"({cfg.recon_seq_len} x {n_r}) than its encoder ({cfg.encod_seq_len} x {n_e})")
        targets = np.full((B, cfg.recon_seq_len, n_r), np.nan, np.float32)
        targets[:, : cfg.encod_seq_len, :n_e] = encod_data
        return targets

    def _given_ic(self, ic, B: int, name: str = "ic") -> np.ndarray | None:
        if ic is None:
            return None
        ic = _as_array(name, ic, 2)
        if ic.shape != (B, self.config.ic_dim):
            raise ValueError(f"{name} must have shape [{B}, {self.config.ic_dim}] [trials, ic_dim], "
                             f"got {list(ic.shape)}")
        if not np.all(np.isfinite(ic)):
            raise ValueError(f"{name} has non-finite values")
        return np.ascontiguousarray(ic, dtype=self.dtype)

    def fixed_points(self, encod_data, ext_input=None, *, session: int | None = None,
                     inputs="zero", ext_inputs="zero", n_init: int = 1000,
                     noise_scale: float = 0.01, method: str = "newton", seed: int = 0,
                     **solver_options):
        """Fixed points of the generator, started from the states it visits on some trials.

        Runs the model on the trials (posterior means, no dropout), draws n_init initial states
        from the generator states of all trials and time steps plus Gaussian noise
        (fixed_points.sample_initial_states), and solves F(h, v) = h for the generator's GRU
        step F with one constant input v = [u, ext] (fixed_points.from_generator).
        docs/fixed_points.md explains the choices.

        Args:
            encod_data: spike counts [B, encod_seq_len, encod_data_dim] (with sessions:
                session_neurons[session] neurons); NaN = missing bin, as in forward.
            ext_input: external inputs [B, T, ext_input_dim], or None (required when
                ext_input_dim > 0: the trajectories depend on them).
            session: the session of the trials; required with sessions, else None.
            inputs: the controller output u held constant, [co_dim]: "zero" (default: the
                generator's autonomous dynamics), "mean" (the mean of the posterior-mean
                controller outputs co_means over all trials and time steps), or an array
                [n_init or 1, co_dim] (or [co_dim]). Without a controller (co_dim = 0) u is
                empty and "zero" and "mean" are the same.
            ext_inputs: the external input held constant, [ext_input_dim]: "zero" (default),
                "mean" (the mean of ext_input over trials and its time steps), or an array
                [n_init or 1, ext_input_dim]. Empty when ext_input_dim = 0.
            n_init: number of initial states.
            noise_scale: standard deviation of the noise added to each initial state, in
                state units.
            method: "newton" (damped Newton / Levenberg-Marquardt) or "adam"
                (FixedPointFinder's optimiser).
            seed: seed of the initial-state draw and its noise.
            **solver_options: passed on to fixed_points.find_fixed_points (tol_q, tol_dq,
                max_iters, tol_unique, outlier_scale, outlier_rule, unique, dtype (default:
                the model's), adam_options, ...).

        Returns:
            fixed_points.FixedPoints: the unique converged points with their Jacobians and
            eigenvalues; inputs [N, co_dim + ext_input_dim] (u then ext); trajectories the
            generator states [B, recon_seq_len, gen_dim] that plot() draws; info with the
            settings (inputs, ext_inputs: "zero", "mean" or "given"; noise_scale, seed,
            n_trials, session).

        Raises:
            ValueError: bad shapes or option values (the message names the argument), data
                with no observed bin, non-finite parameters or generator states.
        """
        from .fixed_points import _from_model

        return _from_model(self, encod_data, ext_input, session=session, inputs=inputs,
                           ext_inputs=ext_inputs, n_init=n_init, noise_scale=noise_scale,
                           method=method, seed=seed, solver_options=solver_options)

    # ------------------------------------------------------------------ forward

    def _forward(self, batch: Batch, noise: dict, *, grads: bool, kl_ramp: float, l2_ramp: float,
                 outputs: bool, ic: np.ndarray | None = None, encoded: dict | None = None) -> dict:
        """One pass; ic replaces the posterior's sample (refine_ic); encoded is the _encode
        result of an earlier pass of the same batch and noise, reused instead of encoding
        again (its arrays live in this model's buffers, so no other pass may run between)."""
        cfg, p, dt = self.config, self.params, self.dtype
        Te, B = cfg.encod_seq_len, batch.size
        Tr, Nr = cfg.recon_seq_len, cfg.recon_data_dim
        G, F, U = cfg.gen_dim, cfg.fac_dim, cfg.co_dim
        con = cfg.use_con
        clip = cfg.cell_clip
        nz = _NoiseReader(noise, dt)
        c: dict = {"batch": batch, "nz": nz, "kl_ramp": kl_ramp, "l2_ramp": l2_ramp}
        c.update(self._encode(batch, nz) if encoded is None else encoded)
        cd_keep = c["cd_keep"]
        if ic is not None:  # given initial conditions replace the sample
            c.update(ic_samp=ic, ic_eps=None)
        else:
            ic_eps = c["ic_eps"]
            c["ic_samp"] = c["ic_mean"] + c["ic_std"] * ic_eps if ic_eps is not None else c["ic_mean"]
        c["ic_given"] = ic is not None
        ic_samp = c["ic_samp"]

        # Generator initial state and factors.
        g0 = np.ascontiguousarray(ic_samp @ p["ic_to_g0_W"].T + p["ic_to_g0_b"])
        fac_norm = np.linalg.norm(p["fac_W"], axis=1, keepdims=True)
        W_fac = np.ascontiguousarray(p["fac_W"] / fac_norm)
        drop_g0 = nz.get("drop_g0", (B, G))
        g0_d = g0 * drop_g0 if drop_g0 is not None else g0
        f0 = np.ascontiguousarray(g0_d @ W_fac.T)
        c.update(g0=g0, g0_d=g0_d, drop_g0=drop_g0, W_fac=W_fac, fac_norm=fac_norm)

        # Decoder inputs (their projections come from _encode).
        dec = {"g0": g0, "f0": f0, "W_fac": W_fac, "W_gen_hh": p["gen_W_hh"],
               "mask_g": nz.get("drop_gen", (Tr, B, G))}
        if con:
            Hc = cfg.ci_enc_dirs * cfg.ci_enc_dim
            dec.update(xcon=c["xcon"],
                       W_con_f=np.ascontiguousarray(p["con_W_ih"][:, Hc:]),
                       W_con_hh=p["con_W_hh"],
                       c0=np.ascontiguousarray(np.broadcast_to(p["con_h0"], (B, cfg.con_dim))),
                       W_co=p["co_linear_W"], b_co=p["co_linear_b"],
                       eps=nz.get("co_eps", (Tr, B, U)),
                       mask_f=nz.get("drop_fac_in", (Tr, B, F)),
                       W_gen_u=np.ascontiguousarray(p["gen_W_ih"][:, :U]))
        dec["xgen"] = c["xgen"]
        sample = con and dec.get("eps") is not None
        C = cfg.con_dim if con else 0
        dec_sizes = {"con_states": C, "con_gates": 3 * C, "co_mean": U if con else 0,
                     "co_logvar": U if con else 0, "u": U if con else 0, "gen_states": G,
                     "gen_gates": 3 * G, "factors": F}
        out = ops.decoder_forward(dec, Tr, clip=clip, sample=sample,
                                  out={k: self._buf(k, (Tr, B, n)) for k, n in dec_sizes.items()})
        c.update(dec=dec, dec_out=out, sample=sample)

        # Reconstruction (read-out + Poisson NLL, fused with its gradient) and the KL terms.
        terms = {}
        d_factors = self._buf("d_factors", (Tr, B, F)) if grads else None
        if batch.segments is None:
            recon_scale = 1.0 / (batch.n_valid if cfg.recon_reduce_mean else B)
            weight = None if batch.recon_weight is None else batch.recon_weight.reshape(Tr * B, Nr)
            elbo = ops.poisson_elbo(out["factors"].reshape(Tr * B, F), p["readout_W"], p["readout_b"],
                                    batch.recon.reshape(Tr * B, Nr), T=Tr, scale=cfg.loss_scale * recon_scale,
                                    loss_weight=weight,
                                    grad_mask=self._recon_grad_mask(cd_keep, B, Nr),
                                    grads=grads, log_rates=outputs,
                                    d_factors=None if d_factors is None else d_factors.reshape(Tr * B, F))
            elbos = [elbo]
        else:
            elbos = self._session_elbos(batch.segments, cd_keep, out["factors"], d_factors,
                                        grads=grads, log_rates=outputs)
        terms["recon"] = sum(e["loss"] for e in elbos) / cfg.loss_scale
        c.update(elbos=elbos, d_factors=d_factors)

        kl_ic_w = cfg.loss_scale * kl_ramp * cfg.kl_ic_scale
        kl = ops.kl_ic(c["ic_mean"], c["ic_logvar"], p["ic_prior_mean"],
                       np.full(cfg.ic_dim, np.log(cfg.ic_prior_var), dtype=dt),
                       var_min=cfg.ic_post_var_min, scale=1.0, grads=grads)
        terms["kl_ic"] = kl["kl"]
        c["kl_ic"] = kl
        c["kl_ic_w"] = kl_ic_w
        if con:
            kl_co_w = cfg.loss_scale * kl_ramp * cfg.kl_co_scale
            kl = ops.kl_co(out["co_mean"], out["co_logvar"], nz.require("co_kl_eps", (Tr, B, U)),
                           p["co_prior_logtau"], p["co_prior_lognvar"], scale=1.0, grads=grads)
            terms["kl_co"] = kl["kl"]
            c["kl_co"] = kl
            c["kl_co_w"] = kl_co_w
        else:
            terms["kl_co"] = 0.0

        l2, l2_denom = 0.0, 0.0
        for name, scale in self._l2_terms():
            if scale > 0:
                W = p[name]
                l2 += scale * 0.5 * float(np.vdot(W, W))
                l2_denom += W.size
        terms["l2"] = l2 / (l2_denom + 1e-8)
        c["l2_denom"] = l2_denom
        terms["loss"] = cfg.loss_scale * (terms["recon"] + l2_ramp * terms["l2"] + kl_ramp * (
            cfg.kl_ic_scale * terms["kl_ic"] + cfg.kl_co_scale * terms["kl_co"]))
        c["terms"] = terms
        if outputs:
            c["outputs"] = self._outputs(c, terms)
        return c

    def _encode(self, batch: Batch, nz) -> dict:
        """The part of a pass that does not depend on the initial condition: the encoders,
        the initial-condition posterior, the controller's input projection and the external
        inputs' projection (a dict of cache entries for _forward)."""
        cfg, p, dt = self.config, self.params, self.dtype
        Te, B, Ne = cfg.encod_seq_len, batch.size, cfg.encod_data_dim
        Tr, Hi, Hc, G, E = cfg.recon_seq_len, cfg.ic_enc_dim, cfg.ci_enc_dim, cfg.gen_dim, cfg.ext_input_dim
        clip = cfg.cell_clip
        con = cfg.use_con
        c: dict = {}
        # Encoder input: coordinated dropout (on the recorded neurons), the sessions' read-ins,
        # then dropout.
        x = self._buf("x", (Te, B, Ne))
        if batch.segments is None:
            x[...] = batch.encod
            cd_keep = nz.get("cd_keep", (Te, B, Ne))
            if cd_keep is not None:
                x *= cd_keep
                x *= dt.type(1.0 / (1.0 - cfg.cd_rate))
        else:
            cd_keep = nz.get_segments("cd_keep", [(Te, seg.size, cfg.session_neurons[seg.session])
                                                  for seg in batch.segments])
            c["readin_in"] = self._readin(batch.segments, cd_keep, x)
        drop_data = nz.get("drop_data", (Te, B, Ne))
        if drop_data is not None:
            x *= drop_data
        c.update(x=x, drop_data=drop_data)

        # One GEMM projects the input for all encoder GRUs.
        enc = self._encoders()
        W_enc, b_enc = self._enc_input_weights(self.flat)
        xproj = self._buf("xproj", (Te, B, W_enc.shape[0]))
        ops.matmul(x.reshape(Te * B, Ne), W_enc.T, out=xproj.reshape(Te * B, -1))
        xproj += b_enc
        c["xproj"] = xproj
        c["enc"] = {}
        for name, H, off, rev, h0_name, h0_row in enc:
            t0, t1 = self._encoder_bins(name)
            h0 = np.ascontiguousarray(np.broadcast_to(p[h0_name][h0_row], (B, H)))
            out = (self._buf(f"{name}_hs", (t1 - t0, B, H)), self._buf(f"{name}_gates", (t1 - t0, B, 3 * H)))
            hs, gates = ops.gru_forward(xproj[t0:t1], off, p[f"{name}_W_hh"], h0, reverse=rev, clip=clip,
                                        out=out)
            c["enc"][name] = (hs, gates, h0)

        # Initial-condition posterior.
        hs_f, hs_b = c["enc"]["ic_enc_fwd"][0], c["enc"]["ic_enc_bwd"][0]
        h_n = np.concatenate([hs_f[-1], hs_b[0]], axis=1)
        drop_ic = nz.get("drop_ic_hn", (B, 2 * Hi))
        h_n_d = h_n * drop_ic if drop_ic is not None else h_n
        ic_params = h_n_d @ p["ic_linear_W"].T + p["ic_linear_b"]
        ic_mean = np.ascontiguousarray(ic_params[:, : cfg.ic_dim])
        ic_logvar = np.ascontiguousarray(ic_params[:, cfg.ic_dim :])
        ic_std = np.sqrt(np.exp(ic_logvar) + dt.type(cfg.ic_post_var_min))
        c.update(h_n_d=h_n_d, drop_ic=drop_ic, ic_mean=ic_mean, ic_logvar=ic_logvar, ic_std=ic_std,
                 ic_eps=nz.get("ic_eps", (B, cfg.ic_dim)), cd_keep=cd_keep)

        # Controller input: the lagged CI, projected by one GEMM over all steps.
        if con:
            nci = cfg.ci_enc_dirs * Hc
            ci = self._buf("ci", (Tr, B, nci))
            ci[...] = 0
            lag = cfg.ci_lag
            t0, _ = self._encoder_bins("ci_enc_fwd")  # the CI encoder sees bins t0 .. Te-1
            n = Te - t0
            if lag < n:
                ci[t0 + lag : Te, :, :Hc] = c["enc"]["ci_enc_fwd"][0][: n - lag]
                if not cfg.ci_enc_causal:
                    ci[t0 : Te - lag, :, Hc:] = c["enc"]["ci_enc_bwd"][0][lag:]
            drop_ci = nz.get("drop_ci", (Tr, B, nci))
            if drop_ci is not None:
                ci *= drop_ci
            ci_d = ci
            xcon = self._buf("xcon", (Tr, B, 3 * cfg.con_dim))
            ops.matmul(ci_d.reshape(Tr * B, nci), p["con_W_ih"][:, :nci].T,
                       out=xcon.reshape(Tr * B, -1))
            xcon += p["con_b_ih"]
            c.update(ci_d=ci_d, drop_ci=drop_ci, xcon=xcon)

        # Generator input from the external inputs (one GEMM over all steps).
        Ug = cfg.co_dim if con else 0
        xgen = self._buf("xgen", (Tr, B, 3 * G))
        if E > 0:
            drop_ext = nz.get("drop_ext", (Tr, B, E))
            ext_d = batch.ext * drop_ext if drop_ext is not None else batch.ext
            ops.matmul(ext_d.reshape(Tr * B, E), p["gen_W_ih"][:, Ug:].T, out=xgen.reshape(Tr * B, -1))
            xgen += p["gen_b_ih"]
            c.update(ext_d=ext_d)
        else:
            xgen[...] = p["gen_b_ih"]
        c["xgen"] = xgen
        return c

    def _readin(self, segments: list[Segment], cd_keep: list | None, x: np.ndarray) -> list:
        """Writes each session's read-in of its counts into its rows of x [T_e, B, N_e], one
        GEMM per session over all its bins.

        Returns:
            The read-ins' inputs per segment, [T_e * B_s, n_s] (counts after coordinated
            dropout), which the read-in weight gradients need.
        """
        cfg, p, dt = self.config, self.params, self.dtype
        Te, Ne = cfg.encod_seq_len, cfg.encod_data_dim
        inputs = []
        for i, seg in enumerate(segments):
            counts = seg.encod
            if cd_keep is not None:
                counts = counts * cd_keep[i]
                counts *= dt.type(1.0 / (1.0 - cfg.cd_rate))
            counts = counts.reshape(Te * seg.size, -1)
            proj = ops.matmul(counts, p[f"readin_W_{seg.session}"].T)
            proj += p[f"readin_b_{seg.session}"]
            x[:, seg.start : seg.stop] = proj.reshape(Te, seg.size, Ne)
            inputs.append(counts)
        return inputs

    def _session_elbos(self, segments: list[Segment], cd_keep: list | None, factors: np.ndarray,
                       d_factors: np.ndarray | None, *, grads: bool, log_rates: bool) -> list:
        """One fused read-out + Poisson NLL per session, on that session's factor rows.

        Each session's reconstruction term is its own mean over its valid bins (or, with
        recon_reduce_mean off, its sum per trial), and the total is the mean over the sessions
        in the batch, so every session counts equally whatever its number of trials or
        neurons (lfads-torch's multi-session loss).

        Args:
            factors: [T_r, B, F] of the whole batch.
            d_factors: [T_r, B, F] receiving each segment's factor gradient, or None.

        Returns:
            The poisson_elbo results, one per segment.
        """
        cfg, p = self.config, self.params
        Tr, F = cfg.recon_seq_len, cfg.fac_dim
        elbos = []
        for i, seg in enumerate(segments):
            Bs, n_r = seg.size, seg.recon.shape[2]
            norm = seg.n_valid if cfg.recon_reduce_mean else Bs
            e = ops.poisson_elbo(np.ascontiguousarray(factors[:, seg.start : seg.stop]).reshape(Tr * Bs, F),
                                 p[f"readout_W_{seg.session}"], p[f"readout_b_{seg.session}"],
                                 seg.recon.reshape(Tr * Bs, n_r), T=Tr,
                                 scale=cfg.loss_scale / (len(segments) * norm),
                                 loss_weight=None if seg.recon_weight is None
                                 else seg.recon_weight.reshape(Tr * Bs, n_r),
                                 grad_mask=self._recon_grad_mask(None if cd_keep is None else cd_keep[i],
                                                                 Bs, n_r),
                                 grads=grads, log_rates=log_rates)
            if grads:
                d_factors[:, seg.start : seg.stop] = e["d_factors"].reshape(Tr, Bs, F)
            elbos.append(e)
        return elbos

    def _recon_grad_mask(self, cd_keep: np.ndarray | None, B: int, n_r: int) -> np.ndarray | None:
        """Coordinated dropout's gradient mask of the reconstruction, [T_r * B, n_r]: 0 where
        the encoder saw the bin (it may not learn to copy it), 1 elsewhere; None without."""
        if cd_keep is None:
            return None
        Te, n_e = cd_keep.shape[0], cd_keep.shape[2]
        Tr = self.config.recon_seq_len
        mask = self._buf("grad_mask", (Tr, B, n_r))
        mask[...] = 1.0
        np.subtract(1.0, cd_keep, out=mask[:Te, :, :n_e])
        return mask.reshape(Tr * B, n_r)

    def _outputs(self, c: dict, terms: dict) -> dict:
        cfg = self.config
        out = c["dec_out"]
        Tr, B = out["factors"].shape[:2]

        def bm(a):  # time-major -> batch-major
            return np.ascontiguousarray(a.transpose(1, 0, 2))

        # forward() runs one session at a time, so there is one read-out here.
        log_rates = c["elbos"][0]["log_rates"].reshape(Tr, B, -1)
        gen_inputs = [out["u"]] if cfg.use_con else []
        if cfg.ext_input_dim > 0:
            gen_inputs.append(c["ext_d"])
        gi = np.concatenate(gen_inputs, axis=2) if gen_inputs else np.zeros((Tr, B, 0), self.dtype)
        return {
            "output_params": bm(np.exp(log_rates)),
            "factors": bm(out["factors"]),
            "gen_states": bm(out["gen_states"]),
            "gen_init": c["g0"].copy(),
            "gen_inputs": bm(gi),
            "con_states": bm(out["con_states"]),
            "co_means": bm(out["co_mean"]),
            "co_stds": bm(np.exp(out["co_logvar"] / 2)),
            "ic_mean": c["ic_samp"].copy() if c["ic_given"] else c["ic_mean"].copy(),
            "ic_std": c["ic_std"].copy(),
            "terms": dict(terms),
        }

    # ------------------------------------------------------------------ backward

    def _backward(self, c: dict, ic_only: bool = False) -> np.ndarray:
        """The gradient of the total loss (flat, the parameters' layout); with ic_only, only
        the reconstruction term's gradient with respect to the initial-condition sample
        [B, ic_dim] (refine_ic), and no parameter gradients past the decoder."""
        cfg, p, dt = self.config, self.params, self.dtype
        grad = np.zeros_like(self.flat)
        g = self._views(grad)
        batch, nz = c["batch"], c["nz"]
        Te, B, Ne = cfg.encod_seq_len, batch.size, cfg.encod_data_dim
        Tr, F, G, U, E = cfg.recon_seq_len, cfg.fac_dim, cfg.gen_dim, cfg.co_dim, cfg.ext_input_dim
        Hi, Hc = cfg.ic_enc_dim, cfg.ci_enc_dim
        con = cfg.use_con
        clip = cfg.cell_clip
        dec, out = c["dec"], c["dec_out"]

        if batch.segments is None:
            g["readout_W"][...] = c["elbos"][0]["d_W_ro"]
            g["readout_b"][...] = c["elbos"][0]["d_b_ro"]
        else:
            for seg, e in zip(batch.segments, c["elbos"]):
                g[f"readout_W_{seg.session}"][...] = e["d_W_ro"]
                g[f"readout_b_{seg.session}"][...] = e["d_b_ro"]
        d_co_mean = d_co_logvar = None
        if con:
            w = dt.type(c["kl_co_w"])
            d_co_mean = c["kl_co"]["d_mean"] * w
            d_co_logvar = c["kl_co"]["d_logvar"] * w
            g["co_prior_logtau"][...] = c["kl_co"]["d_logtau"] * w
            g["co_prior_lognvar"][...] = c["kl_co"]["d_lognvar"] * w
        C = cfg.con_dim if con else 0
        Uc = U if con else 0
        ws = {"work": self._buf("dec_work", (Tr, B, 2 * F + 2 * G + 2 * Uc + C)),
              "d_xgen": self._buf("d_xgen", (Tr, B, 3 * G)),
              "d_xcon": self._buf("d_xcon", (Tr, B, 3 * C))}
        d = ops.decoder_backward(dec, out, c["d_factors"], d_co_mean, d_co_logvar,
                                 clip=clip, sample=c["sample"], workspace=ws)
        # The initial state's gradient: from the recurrence and from the factors f0 of g0.
        d_g0_d = d["d_f0"] @ c["W_fac"]
        d_g0 = d["d_g0"] + (d_g0_d * c["drop_g0"] if c["drop_g0"] is not None else d_g0_d)
        if ic_only:
            return d_g0 @ p["ic_to_g0_W"]
        g["gen_W_hh"][...] = d["d_W_gen_hh"]
        Ug = U if con else 0
        d_xgen = d["d_xgen"].reshape(Tr * B, 3 * G)
        g["gen_b_ih"][...] = d_xgen.sum(axis=0)
        if E > 0:
            ops.matmul(d_xgen.T, c["ext_d"].reshape(Tr * B, E), out=g["gen_W_ih"][:, Ug:])
        if con:
            g["gen_W_ih"][:, :U] = d["d_W_gen_u"]
            g["co_linear_W"][...] = d["d_W_co"]
            g["co_linear_b"][...] = d["d_b_co"]
            g["con_W_hh"][...] = d["d_W_con_hh"]
            g["con_h0"][...] = d["d_c0"].sum(axis=0)
            d_xcon = d["d_xcon"].reshape(Tr * B, -1)
            g["con_b_ih"][...] = d_xcon.sum(axis=0)
            nci = cfg.ci_enc_dirs * Hc
            g["con_W_ih"][:, nci:] = d["d_W_con_f"]
            ops.matmul(d_xcon.T, c["ci_d"].reshape(Tr * B, nci), out=g["con_W_ih"][:, :nci])
            d_ci = self._buf("d_ci", (Tr, B, nci))
            ops.matmul(d_xcon, p["con_W_ih"][:, :nci], out=d_ci.reshape(Tr * B, -1))
            if c["drop_ci"] is not None:
                d_ci *= c["drop_ci"]
            # Undo the lag: ci[t0 + q] = [cf[q - lag], cb[q + lag]] for the CI encoder's bins
            # t0 + q, q < n.
            lag = cfg.ci_lag
            t0, _ = self._encoder_bins("ci_enc_fwd")
            n = Te - t0
            d_cf = self._buf("d_cf", (n, B, Hc))
            d_cb = self._buf("d_cb", (n, B, Hc))
            d_cf[max(n - lag, 0) :] = 0
            d_cb[: min(lag, n)] = 0
            if lag < n:
                d_cf[: n - lag] = d_ci[t0 + lag : Te, :, :Hc]
                if not cfg.ci_enc_causal:
                    d_cb[lag:] = d_ci[t0 : Te - lag, :, Hc:]

        # Factors of the initial state, and the row normalisation of fac_W.
        d_W_fac = d["d_W_fac"] + d["d_f0"].T @ c["g0_d"]
        Wn = c["W_fac"]
        g["fac_W"][...] = (d_W_fac - Wn * np.sum(d_W_fac * Wn, axis=1, keepdims=True)) / c["fac_norm"]

        # Initial condition: g0 = W ic_samp + b; ic_samp = mean + std * eps; KL.
        g["ic_to_g0_W"][...] = d_g0.T @ c["ic_samp"]
        g["ic_to_g0_b"][...] = d_g0.sum(axis=0)
        d_samp = d_g0 @ p["ic_to_g0_W"]
        w = dt.type(c["kl_ic_w"])
        kl = c["kl_ic"]
        d_mean = d_samp + kl["d_mean"] * w
        d_logvar = kl["d_logvar"] * w
        if c["ic_eps"] is not None:
            d_std = d_samp * c["ic_eps"]
            d_logvar = d_logvar + d_std * np.exp(c["ic_logvar"]) / (2 * c["ic_std"])
        g["ic_prior_mean"][...] = kl["d_prior_mean"] * w
        d_params = np.concatenate([d_mean, d_logvar], axis=1)
        g["ic_linear_W"][...] = d_params.T @ c["h_n_d"]
        g["ic_linear_b"][...] = d_params.sum(axis=0)
        d_h_n = d_params @ p["ic_linear_W"]
        if c["drop_ic"] is not None:
            d_h_n *= c["drop_ic"]

        # Encoders: BPTT of each GRU into one shared projection-gradient buffer, then one GEMM.
        # Every column is written: each encoder's backward fills its own 3H columns.
        d_xproj = self._buf("d_xproj", c["xproj"].shape)
        if cfg.ic_enc_seq_len > 0:  # then the encoders cover different bins: zero the rest
            d_xproj[...] = 0
        d_final = {"ic_enc_fwd": np.ascontiguousarray(d_h_n[:, :Hi]),
                   "ic_enc_bwd": np.ascontiguousarray(d_h_n[:, Hi:])}
        d_seq = {"ci_enc_fwd": d_cf, "ci_enc_bwd": d_cb} if con else {}
        for name, H, off, rev, h0_name, h0_row in self._encoders():
            hs, gates, h0 = c["enc"][name]
            t0, t1 = self._encoder_bins(name)
            d_W_hh, d_h0 = ops.gru_backward(p[f"{name}_W_hh"], h0, hs, gates, d_seq.get(name),
                                            d_final.get(name), d_xproj[t0:t1], off, reverse=rev, clip=clip,
                                            work=self._buf("gru_work", hs.shape))
            g[f"{name}_W_hh"][...] = d_W_hh
            g[h0_name][h0_row] = d_h0.sum(axis=0)
        d_W_enc, d_b_enc = self._enc_input_weights(grad)
        d_xp = d_xproj.reshape(Te * B, -1)
        ops.matmul(d_xp.T, c["x"].reshape(Te * B, Ne), out=d_W_enc)
        d_b_enc[...] = d_xp.sum(axis=0)

        # Session read-ins (frozen ones keep a zero gradient): x = dropout(readin(counts)).
        if batch.segments is not None and cfg.train_readin:
            d_x = self._buf("d_x", (Te, B, Ne))
            W_enc = self._enc_input_weights(self.flat)[0]
            ops.matmul(d_xp, W_enc, out=d_x.reshape(Te * B, Ne))
            if c["drop_data"] is not None:
                d_x *= c["drop_data"]
            for seg, counts in zip(batch.segments, c["readin_in"]):
                d_x_s = np.ascontiguousarray(d_x[:, seg.start : seg.stop]).reshape(-1, Ne)
                ops.matmul(d_x_s.T, counts, out=g[f"readin_W_{seg.session}"])
                g[f"readin_b_{seg.session}"][...] = d_x_s.sum(axis=0)

        # L2 penalty on the recurrent weights.
        if c["l2_denom"] > 0:
            coef = cfg.loss_scale * c["l2_ramp"] / (c["l2_denom"] + 1e-8)
            for name, scale in self._l2_terms():
                if scale > 0:
                    g[name] += dt.type(coef * scale) * p[name]
        return grad

    # ------------------------------------------------------------------ helpers

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
        _expect_shape(label + "sv_mask", sv_mask, (B, Te, n_e))
        if sv_mask.dtype != np.bool_ and not np.all((sv_mask == 0) | (sv_mask == 1)):
            raise ValueError(f"{label}sv_mask must hold only 0 and 1 (1 = bin kept)")
        keep = sv_mask.transpose(1, 0, 2).astype(self.dtype) * self.dtype.type(1.0 / (1.0 - sv_rate))
        encod *= keep
        weight = np.ones_like(recon)
        weight[:Te, :, :n_e] = keep
        return weight

    def _session_index(self, session) -> int:
        n = self.config.n_sessions
        if isinstance(session, bool) or not isinstance(session, (int, np.integer)) or not 0 <= session < n:
            raise ValueError(f"session must be an integer in [0, {n}), got {session!r}")
        return int(session)

    def _time_major_counts(self, label: str, encod_data: np.ndarray, recon_data, n_e: int, n_r: int,
                           check_counts: bool):
        """Checked time-major (encod [T_e, B, n_e] with NaN -> 0, recon [T_r, B, n_r], n_valid)."""
        cfg = self.config
        B = encod_data.shape[0]
        _expect_shape(label + "encod_data", encod_data, (B, cfg.encod_seq_len, n_e))
        if recon_data is None:
            if (cfg.recon_seq_len, n_r) != (cfg.encod_seq_len, n_e):
                raise ValueError(f"{label}recon_data is required when its bins or neurons differ from "
                                 "those of encod_data")
            recon_data = encod_data
        recon_data = _as_array(label + "recon_data", recon_data, 3)
        _expect_shape(label + "recon_data", recon_data, (B, cfg.recon_seq_len, n_r))
        if check_counts:
            _check_counts(label + "encod_data", encod_data)
            _check_counts(label + "recon_data", recon_data)
        encod = np.ascontiguousarray(np.nan_to_num(encod_data, nan=0.0).transpose(1, 0, 2), dtype=self.dtype)
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
        ext_input = _as_array(name, ext_input, 3)
        if ext_input.shape[0] != B or ext_input.shape[2] != cfg.ext_input_dim or \
                ext_input.shape[1] not in (cfg.encod_seq_len, cfg.recon_seq_len):
            raise ValueError(f"{name} must be [{B}, {cfg.recon_seq_len} (or {cfg.encod_seq_len}), "
                             f"{cfg.ext_input_dim}], got {ext_input.shape}")
        if not np.all(np.isfinite(ext_input)):
            raise ValueError(f"{name} must be finite (no NaN or inf)")
        ext = np.zeros((cfg.recon_seq_len, B, cfg.ext_input_dim), dtype=self.dtype)
        ext[: ext_input.shape[1]] = ext_input.transpose(1, 0, 2)
        return ext

    def _buf(self, name: str, shape: tuple) -> np.ndarray:
        """Scratch array `name` of this shape, reusing the memory of earlier steps (it grows to
        the largest size asked for, so batches of different sizes share it)."""
        n = int(np.prod(shape))
        a = self._ws.get(name)
        if a is None or a.size < n:
            a = np.empty(n, dtype=self.dtype)
            self._ws[name] = a
        return a[:n].reshape(shape)

    def _views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        views, i = {}, 0
        for name, shape in self.layout:
            n = int(np.prod(shape))
            views[name] = flat[i : i + n].reshape(shape)
            i += n
        return views

    def _encoders(self):
        """(name, H, column offset in the shared projection, reverse, h0 param, h0 row)."""
        cfg = self.config
        Hi, Hc = cfg.ic_enc_dim, cfg.ci_enc_dim
        encs = [("ic_enc_fwd", Hi, 0, False, "ic_enc_h0", 0),
                ("ic_enc_bwd", Hi, 3 * Hi, True, "ic_enc_h0", 1)]
        if cfg.use_con:
            encs += [("ci_enc_fwd", Hc, 6 * Hi, False, "ci_enc_h0", 0)]
            if not cfg.ci_enc_causal:
                encs += [("ci_enc_bwd", Hc, 6 * Hi + 3 * Hc, True, "ci_enc_h0", 1)]
        return encs

    def _encoder_bins(self, name: str) -> tuple[int, int]:
        """The encoder bins [t0, t1) an encoder GRU runs over: with ic_enc_seq_len = K > 0 the
        IC encoders see bins 0 .. K-1 and the CI encoders K .. T_e-1 (lfads-torch); else all."""
        Te, K = self.config.encod_seq_len, self.config.ic_enc_seq_len
        if K == 0:
            return 0, Te
        return (0, K) if name.startswith("ic_") else (K, Te)

    def _enc_input_weights(self, flat: np.ndarray):
        """The encoders' stacked input weights [3 * sum(H), N_e] and biases: views of `flat`,
        which param_layout puts first."""
        rows = sum(3 * H for _, H, *_ in self._encoders())
        n = rows * self.config.encod_data_dim
        return flat[:n].reshape(rows, -1), flat[n : n + rows]

    def _l2_terms(self):
        cfg = self.config
        terms = [("ic_enc_fwd_W_hh", cfg.l2_ic_enc_scale), ("ic_enc_bwd_W_hh", cfg.l2_ic_enc_scale),
                 ("gen_W_hh", cfg.l2_gen_scale)]
        if cfg.use_con:
            terms += [(f"{name}_W_hh", cfg.l2_ci_enc_scale) for name, *_ in self._encoders()[2:]]
            terms += [("con_W_hh", cfg.l2_con_scale)]
        return terms

    def _init_params(self, rng: np.random.Generator) -> None:
        """lfads-torch's initialisation (docs/math.md, 'Initialisation')."""
        cfg, p = self.config, self.params

        def normal(name, std):
            p[name][...] = rng.standard_normal(p[name].shape) * std

        Ne = cfg.encod_data_dim
        for name, H, *_ in self._encoders():
            normal(f"{name}_W_ih", 1 / np.sqrt(Ne + H))
            normal(f"{name}_W_hh", 1 / np.sqrt(Ne + H))
            p[f"{name}_b_ih"][: 2 * H] = 1.0
        gru_cells = [("gen", cfg.gen_dim)] + ([("con", cfg.con_dim)] if cfg.use_con else [])
        for name, H in gru_cells:
            n_in = p[f"{name}_W_ih"].shape[1]
            if n_in > 0:
                normal(f"{name}_W_ih", 1 / np.sqrt(n_in))
            normal(f"{name}_W_hh", 1 / np.sqrt(H))
            p[f"{name}_b_ih"][: 2 * H] = 1.0
        linears = ["ic_linear_W", "ic_to_g0_W", "fac_W"]
        if not cfg.multisession:
            linears.append("readout_W")
        if cfg.use_con:
            linears.append("co_linear_W")
        for name in linears:
            normal(name, 1 / np.sqrt(p[name].shape[1]))
        p["ic_prior_mean"][...] = cfg.ic_prior_mean
        if cfg.use_con:
            p["co_prior_logtau"][...] = np.log(cfg.co_prior_tau)
            p["co_prior_lognvar"][...] = np.log(cfg.co_prior_nvar)
        # Session layers: lfads-torch's fan-in linear layers (lfads_fast.stitching replaces them
        # with the principal-component regression).
        for s in range(cfg.n_sessions if cfg.multisession else 0):
            normal(f"readin_W_{s}", 1 / np.sqrt(cfg.session_neurons[s]))
            normal(f"readout_W_{s}", 1 / np.sqrt(cfg.fac_dim))


class _NoiseReader:
    """Checks and casts the arrays of a noise dict (unknown keys are an error)."""

    KEYS = ("ic_eps", "co_eps", "co_kl_eps", "cd_keep", "drop_data", "drop_ic_hn", "drop_ci",
            "drop_fac_in", "drop_g0", "drop_gen", "drop_ext")

    def __init__(self, noise: dict, dtype):
        unknown = sorted(set(noise) - set(self.KEYS))
        if unknown:
            raise ValueError(f"unknown noise entries: {', '.join(unknown)} (expected some of {', '.join(self.KEYS)})")
        self.noise, self.dtype = noise, dtype

    def get(self, key: str, shape: tuple):
        a = self.noise.get(key)
        if a is None:
            return None
        a = np.asarray(a)
        if a.shape != tuple(shape):
            raise ValueError(f"noise['{key}'] must have shape {list(shape)}, got {list(a.shape)}")
        return np.ascontiguousarray(a, dtype=self.dtype)

    def get_segments(self, key: str, shapes: list[tuple]):
        """A per-segment list of arrays (coordinated dropout with sessions), or None."""
        a = self.noise.get(key)
        if a is None:
            return None
        if not isinstance(a, (list, tuple)) or len(a) != len(shapes):
            raise ValueError(f"noise['{key}'] must be a list of {len(shapes)} arrays, one per session "
                             "segment of the batch")
        out = []
        for i, (ai, shape) in enumerate(zip(a, shapes)):
            ai = np.asarray(ai)
            if ai.shape != tuple(shape):
                raise ValueError(f"noise['{key}'][{i}] must have shape {list(shape)}, got {list(ai.shape)}")
            out.append(np.ascontiguousarray(ai, dtype=self.dtype))
        return out

    def require(self, key: str, shape: tuple):
        a = self.get(key, shape)
        if a is None:
            raise ValueError(f"noise['{key}'] is required (the inferred-input KL needs its own sample)")
        return a


def _as_array(name: str, a, ndim: int) -> np.ndarray:
    try:
        a = np.asarray(a)
    except Exception as e:  # ragged lists and the like
        raise TypeError(f"{name} must be an array, got {type(a).__name__}") from e
    if a.dtype.kind not in "fiu" or a.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-d numeric array, got shape {a.shape} dtype {a.dtype}")
    return a


def _expect_shape(name: str, a: np.ndarray, shape: tuple) -> None:
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {list(shape)} [batch, time, neurons] for this config, "
                         f"got {list(a.shape)}")


def _check_counts(name: str, a: np.ndarray) -> None:
    if a.dtype.kind in "iu":
        if a.size and a.min() < 0:
            raise ValueError(f"{name} has negative spike counts")
        return
    finite = a[~np.isnan(a)]
    if np.isinf(finite).any():
        raise ValueError(f"{name} has infinite values")
    if finite.size and finite.min() < 0:
        raise ValueError(f"{name} has negative spike counts (min {finite.min()})")
    if not np.all(finite == np.round(finite)):
        raise ValueError(f"{name} has non-integer spike counts")
