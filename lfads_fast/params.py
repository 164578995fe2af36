"""The parameters of an LFADS model as data: their layout, lfads-torch's initialisation, and
one flat vector with named views.

All parameters live in one flat vector (``Params.flat``) of which ``Params.views`` are named
reshaped views, so the optimizer updates them with one fused call and gradients come back as
one flat vector of the same layout. The vector is a numpy or cupy array; everything here
works on either (docs/math.md, 'Initialisation', gives the scheme).
"""
from __future__ import annotations

import numpy as np

from . import ops
from .config import LFADSConfig

__all__ = ["Params", "param_layout", "encoders", "encoder_bins", "l2_terms", "init_params"]


def param_layout(cfg: LFADSConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the parameters, in the order of the flat vector.

    The input weights (and biases) of the encoder GRUs are adjacent, so together they form
    one [3 * (2 ic_enc_dim + ci_enc_dirs ci_enc_dim), encod_data_dim] matrix for a single GEMM
    (ci_enc_dirs = 1 with ci_enc_causal: no backward CI encoder).
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


def encoders(cfg: LFADSConfig) -> list[tuple[str, int, int, bool, str, int]]:
    """The encoder GRUs: (name, H, column offset in the shared projection, reverse, h0
    parameter, h0 row)."""
    Hi, Hc = cfg.ic_enc_dim, cfg.ci_enc_dim
    encs = [("ic_enc_fwd", Hi, 0, False, "ic_enc_h0", 0),
            ("ic_enc_bwd", Hi, 3 * Hi, True, "ic_enc_h0", 1)]
    if cfg.use_con:
        encs += [("ci_enc_fwd", Hc, 6 * Hi, False, "ci_enc_h0", 0)]
        if not cfg.ci_enc_causal:
            encs += [("ci_enc_bwd", Hc, 6 * Hi + 3 * Hc, True, "ci_enc_h0", 1)]
    return encs


def encoder_bins(cfg: LFADSConfig, name: str) -> tuple[int, int]:
    """The encoder bins [t0, t1) an encoder GRU runs over: with ic_enc_seq_len = K > 0 the
    IC encoders see bins 0 .. K-1 and the CI encoders K .. T_e-1 (lfads-torch); else all."""
    Te, K = cfg.encod_seq_len, cfg.ic_enc_seq_len
    if K == 0:
        return 0, Te
    return (0, K) if name.startswith("ic_") else (K, Te)


def l2_terms(cfg: LFADSConfig) -> list[tuple[str, float]]:
    """The recurrent weights under the L2 penalty, with their scales."""
    terms = [("ic_enc_fwd_W_hh", cfg.l2_ic_enc_scale), ("ic_enc_bwd_W_hh", cfg.l2_ic_enc_scale),
             ("gen_W_hh", cfg.l2_gen_scale)]
    if cfg.use_con:
        terms += [(f"{name}_W_hh", cfg.l2_ci_enc_scale) for name, *_ in encoders(cfg)[2:]]
        terms += [("con_W_hh", cfg.l2_con_scale)]
    return terms


class Params:
    """The flat parameter vector of one configuration and its named views.

    Args:
        config: the hyperparameters.
        flat: the vector [num_params] (numpy or cupy, float32 or float64); its views are
            taken, not copied.
    """

    def __init__(self, config: LFADSConfig, flat):
        self.config = config
        self.layout = param_layout(config)
        n = sum(int(np.prod(s)) for _, s in self.layout)
        if flat.shape != (n,):
            raise ValueError(f"flat must have shape ({n},) for this config, got {flat.shape}")
        self.flat = flat
        self.views = self.views_of(flat)

    @property
    def xp(self):
        """numpy or cupy: the module of the vector."""
        return ops.array_module(self.flat)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.flat.dtype)

    def views_of(self, flat) -> dict:
        """Named views into any vector of this layout (e.g. a gradient)."""
        views, i = {}, 0
        for name, shape in self.layout:
            n = int(np.prod(shape))
            views[name] = flat[i : i + n].reshape(shape)
            i += n
        return views

    def enc_input_weights(self, flat=None):
        """The encoders' stacked input weights [3 * sum(H), N_e] and biases: views of `flat`
        (default: the parameters), which param_layout puts first."""
        flat = self.flat if flat is None else flat
        rows = sum(3 * H for _, H, *_ in encoders(self.config))
        n = rows * self.config.encod_data_dim
        return flat[:n].reshape(rows, -1), flat[n : n + rows]

    def trainable_mask(self):
        """uint8 [num_params], on the vector's device: 0 on the session read-ins unless the
        config has train_readin, 1 elsewhere."""
        mask = self.xp.ones(self.flat.shape, dtype=np.uint8)
        cfg = self.config
        if cfg.multisession and not cfg.train_readin:
            views = self.views_of(mask)
            for s in range(cfg.n_sessions):
                views[f"readin_W_{s}"][...] = 0
                views[f"readin_b_{s}"][...] = 0
        return mask


def init_params(cfg: LFADSConfig, seed: int, dtype) -> np.ndarray:
    """A flat host vector initialised with lfads-torch's scheme (docs/math.md,
    'Initialisation'), drawn from numpy's Generator of `seed` so that every device starts
    from the same numbers."""
    layout = param_layout(cfg)
    flat = np.zeros(sum(int(np.prod(s)) for _, s in layout), dtype=dtype)
    p = Params(cfg, flat).views
    rng = np.random.default_rng(seed)

    def normal(name, std):
        p[name][...] = rng.standard_normal(p[name].shape) * std

    Ne = cfg.encod_data_dim
    for name, H, *_ in encoders(cfg):
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
    return flat
