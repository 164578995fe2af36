"""LFADSConfig: the model's hyperparameters, with lfads-torch's names."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass

import numpy as np
import yaml


@dataclass
class LFADSConfig:
    """Hyperparameters of one LFADS model (names as in lfads-torch).

    Sizes of the data: encod_data_dim (neurons seen by the encoders), recon_data_dim (neurons
    reconstructed; the extra ones are held out for co-smoothing), encod_seq_len and
    recon_seq_len (bins seen / reconstructed; the extra ones are forward prediction),
    ext_input_dim (external inputs to the generator).

    The controller is on when co_dim > 0; it then needs ci_enc_dim > 0 and con_dim > 0.

    Several sessions (dynamic neural stitching, docs/stitching.md): session_neurons lists the
    encoder neurons of each session. Each session s then has its own linear read-in from its
    session_neurons[s] neurons to the encod_data_dim inputs shared by the encoders, and its own
    read-out from the factors to its session_recon_neurons[s] neurons (default: the same
    neurons; more means held-out neurons after the held-in ones). recon_data_dim has no role
    then. train_readin lets the read-ins learn; by default they stay as initialised (random,
    or the principal-component regression of lfads_fast.stitching).
    """

    encod_data_dim: int = 50
    recon_data_dim: int | None = None  # None: same as encod_data_dim
    encod_seq_len: int = 100
    recon_seq_len: int | None = None  # None: same as encod_seq_len
    ext_input_dim: int = 0
    ic_enc_dim: int = 64
    ci_enc_dim: int = 64
    ci_lag: int = 1
    con_dim: int = 64
    co_dim: int = 4
    ic_dim: int = 64
    gen_dim: int = 100
    fac_dim: int = 40
    dropout_rate: float = 0.05
    cd_rate: float = 0.0
    # Coordinated dropout's pass-through: a bin the encoder saw still passes its
    # reconstruction gradient with this probability (lfads-torch's cd_pass_rate).
    cd_pass_rate: float = 0.0
    cell_clip: float = 5.0
    ic_post_var_min: float = 1e-4
    ic_prior_mean: float = 0.0
    ic_prior_var: float = 0.1
    co_prior_tau: float = 10.0
    co_prior_nvar: float = 0.1
    loss_scale: float = 1e4
    recon_reduce_mean: bool = True
    l2_ic_enc_scale: float = 0.0
    l2_ci_enc_scale: float = 0.0
    l2_gen_scale: float = 0.0
    l2_con_scale: float = 0.0
    kl_ic_scale: float = 1e-4
    kl_co_scale: float = 1e-4
    session_neurons: list[int] | None = None
    session_recon_neurons: list[int] | None = None
    train_readin: bool = False
    # Causal options for streaming inference (docs/realtime.md): the initial condition from the
    # first ic_enc_seq_len bins only (0: all bins; lfads-torch's meaning: the controller-input
    # encoder then sees the remaining bins), and a forward-only controller-input encoder.
    ic_enc_seq_len: int = 0
    ci_enc_causal: bool = False

    def __post_init__(self):
        if self.session_neurons is not None:
            self._check_sessions()
        elif self.session_recon_neurons is not None:
            raise ValueError(f"session_recon_neurons ({self.session_recon_neurons!r}) is for models with "
                             "several sessions: it needs session_neurons")
        if self.recon_data_dim is None:
            self.recon_data_dim = self.encod_data_dim
        if self.recon_seq_len is None:
            self.recon_seq_len = self.encod_seq_len
        for name in ("encod_data_dim", "recon_data_dim", "encod_seq_len", "recon_seq_len",
                     "ic_enc_dim", "ic_dim", "gen_dim", "fac_dim"):
            _int_at_least(self, name, 1)
        for name in ("ext_input_dim", "ci_enc_dim", "ci_lag", "con_dim", "co_dim"):
            _int_at_least(self, name, 0)
        if self.recon_data_dim < self.encod_data_dim:
            raise ValueError(f"recon_data_dim ({self.recon_data_dim}) must be >= encod_data_dim "
                             f"({self.encod_data_dim}): the extra neurons are the held-out ones")
        if self.recon_seq_len < self.encod_seq_len:
            raise ValueError(f"recon_seq_len ({self.recon_seq_len}) must be >= encod_seq_len "
                             f"({self.encod_seq_len}): the extra bins are forward prediction")
        if self.co_dim > 0 and (self.con_dim < 1 or self.ci_enc_dim < 1):
            raise ValueError(f"co_dim = {self.co_dim} turns the controller on, which needs con_dim "
                             f">= 1 and ci_enc_dim >= 1, got con_dim = {self.con_dim}, ci_enc_dim = "
                             f"{self.ci_enc_dim}")
        self._check_causal()
        for name in ("dropout_rate", "cd_rate"):
            v = _real(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if not 0.0 <= _real(self, "cd_pass_rate") <= 1.0:
            raise ValueError(f"cd_pass_rate must be in [0, 1], got {self.cd_pass_rate!r}")
        for name in ("cell_clip", "ic_prior_var", "co_prior_tau", "co_prior_nvar", "loss_scale"):
            if not _real(self, name) > 0:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("ic_post_var_min", "l2_ic_enc_scale", "l2_ci_enc_scale", "l2_gen_scale",
                     "l2_con_scale", "kl_ic_scale", "kl_co_scale"):
            if not _real(self, name) >= 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        _real(self, "ic_prior_mean")
        for name in ("recon_reduce_mean", "train_readin", "ci_enc_causal"):
            _boolean(self, name)

    def _check_causal(self) -> None:
        _int_at_least(self, "ic_enc_seq_len", 0)
        limit = self.encod_seq_len - 1 if self.use_con else self.encod_seq_len
        if self.ic_enc_seq_len > limit:
            raise ValueError(f"ic_enc_seq_len must be <= {limit} (encod_seq_len"
                             f"{' - 1: the controller-input encoder needs the bins after it' if self.use_con else ''}"
                             f"), got {self.ic_enc_seq_len}")

    def _check_sessions(self) -> None:
        self.session_neurons = _int_list(self.session_neurons, "session_neurons")
        if self.session_recon_neurons is None:
            self.session_recon_neurons = list(self.session_neurons)
        self.session_recon_neurons = _int_list(self.session_recon_neurons, "session_recon_neurons")
        if len(self.session_recon_neurons) != len(self.session_neurons):
            raise ValueError(f"session_recon_neurons has {len(self.session_recon_neurons)} entries but "
                             f"session_neurons has {len(self.session_neurons)} (one per session)")
        for s, (n, nr) in enumerate(zip(self.session_neurons, self.session_recon_neurons)):
            if nr < n:
                raise ValueError(f"session {s}: session_recon_neurons ({nr}) must be >= session_neurons "
                                 f"({n}): the extra neurons are the held-out ones")
        if self.recon_data_dim not in (None, self.encod_data_dim):
            raise ValueError(f"recon_data_dim = {self.recon_data_dim} has no meaning with session_neurons: "
                             "each session reconstructs its session_recon_neurons; leave it unset")

    @property
    def n_sessions(self) -> int:
        """Number of sessions (1 without session_neurons)."""
        return 1 if self.session_neurons is None else len(self.session_neurons)

    @property
    def multisession(self) -> bool:
        """True when the model has per-session read-ins and read-outs (session_neurons set)."""
        return self.session_neurons is not None

    @property
    def use_con(self) -> bool:
        """True when the model has a controller (inferred inputs)."""
        return self.co_dim > 0

    @property
    def ci_enc_dirs(self) -> int:
        """Directions of the controller-input encoder: 1 when ci_enc_causal, else 2."""
        return 1 if self.ci_enc_causal else 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "LFADSConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LFADSConfig fields: {', '.join(unknown)}")
        return cls(**d)


def _int_list(values, name: str) -> list[int]:
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"{name} must be a list of neuron counts, one per session, got {values!r}") from None
    if not values:
        raise ValueError(f"{name} must name at least one session, got []")
    for s, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name}[{s}] must be an integer >= 1, got {v!r}")
    return [int(v) for v in values]


def _int_at_least(cfg, name: str, low: int) -> None:
    """Checks an integer field (numpy integers too) and stores it as a Python int."""
    v = getattr(cfg, name)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    setattr(cfg, name, int(v))


def _real(cfg, name: str) -> float:
    """Checks a finite real field (numpy numbers too), stores it as a Python float and
    returns it."""
    v = getattr(cfg, name)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    setattr(cfg, name, float(v))
    return float(v)


def _boolean(cfg, name: str) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false, got {v!r}")
    setattr(cfg, name, bool(v))


def check_batch(cfg: LFADSConfig, batch, dtype=None) -> None:
    """Checks that a Batch (model.make_batch / make_session_batch) was built for a model of
    this config (and parameter dtype), before its arrays reach the kernels.

    Raises:
        ValueError: the batch's sessions, bins, neurons, external inputs or dtype differ from
            the config's; the message names the array, its shape and the expected one.
    """
    segments = getattr(batch, "segments", None)
    if cfg.multisession != (segments is not None):
        built = "several sessions" if segments is not None else "one session"
        raise ValueError(f"the batch was built for a model with {built}, this model has "
                         f"{cfg.n_sessions} session{'s' if cfg.n_sessions > 1 else ''}; build it "
                         "with this model's make_batch")
    Te, Tr = cfg.encod_seq_len, cfg.recon_seq_len
    if segments is None:
        B = batch.encod.shape[1] if getattr(batch.encod, "ndim", 0) == 3 else -1
        parts = [("batch.encod", batch.encod, (Te, B, cfg.encod_data_dim)),
                 ("batch.recon", batch.recon, (Tr, B, cfg.recon_data_dim)),
                 ("batch.recon_weight", batch.recon_weight, (Tr, B, cfg.recon_data_dim))]
    else:
        parts, B = [], segments[-1].stop if segments else 0
        for i, seg in enumerate(segments):
            if not 0 <= seg.session < cfg.n_sessions:
                raise ValueError(f"batch segment {i} is of session {seg.session}, this model has "
                                 f"sessions 0..{cfg.n_sessions - 1}")
            n, nr = cfg.session_neurons[seg.session], cfg.session_recon_neurons[seg.session]
            name = f"batch segment {i} (session {seg.session})"
            parts += [(f"{name} encod", seg.encod, (Te, seg.size, n)),
                      (f"{name} recon", seg.recon, (Tr, seg.size, nr)),
                      (f"{name} recon_weight", seg.recon_weight, (Tr, seg.size, nr))]
    if cfg.ext_input_dim > 0 or batch.ext is not None:
        parts.append(("batch.ext", batch.ext, (Tr, B, cfg.ext_input_dim)))
    for name, a, shape in parts:
        if a is None and name.endswith("recon_weight"):
            continue
        got = getattr(a, "shape", None)
        if got != shape:
            raise ValueError(f"{name} has shape {None if got is None else list(got)} but this "
                             f"model expects {list(shape)} [time, trials, channels]; the batch "
                             "was built for another model")
        if dtype is not None and a.dtype != dtype:
            raise ValueError(f"{name} is {a.dtype} but this model's parameters are "
                             f"{dtype}; build the batch with this model's make_batch")


def read_yaml(path) -> object:
    """The contents of a YAML file ({} when empty).

    Raises:
        ValueError: the file is not valid YAML (the message names it).
    """
    with open(path) as f:
        try:
            return yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from e
