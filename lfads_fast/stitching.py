"""Dynamic neural stitching: one LFADS model fit to several recording sessions.

Every session s has its own neurons. A linear read-in maps its n_s neurons to the encod_data_dim
inputs that all sessions share, and a linear read-out maps the shared factors to its own
log-rates; encoders, controller and generator are common to all sessions (the model side lives
in lfads_fast.model, switched on by LFADSConfig.session_neurons). This module prepares such a
model and its data:

- :func:`config_for_sessions`: an LFADSConfig sized for a list of sessions
  (:func:`default_shared_dim`: a shared read-in dimension when none is chosen).
- :func:`init_session_layers`: read-ins from principal-component regression (PCR,
  Pandarinath et al. 2018; :func:`pcr_readins`) or from the alignment matrices stored in the
  session files, and read-outs consistent with them (:func:`pcr_readouts`).
- :func:`check_sessions`: whether datasets fit a model's sessions.
- :func:`session_batches` (and :func:`session_batch_indices` underneath): training batches
  that mix the sessions.
- :func:`session_posteriors` and :func:`write_session_posteriors`: outputs, one file per
  session.
- :func:`session_factor_averages`: condition-averaged factors of every session, for
  comparing the sessions' trajectories (plots.plot_session_factors).

PCR, step by step (docs/stitching.md has the reasoning):

1. Smooth each trial's spikes along time with a Gaussian kernel (metrics.gaussian_smooth).
2. Average the smoothed trials per condition, over the conditions that every session has
   ([C, T, n_s] per session). Without condition labels, the fallback is the average over all
   trials per time bin ([1, T, n_s], a PSTH aligned to trial start): it aligns only what is
   common to all trials, so the PCR read-in is then a rough start that train_readin=True
   should refine.
3. Concatenate all sessions' neurons ([C * T, sum n_s]), centre each neuron, and keep the top
   encod_data_dim principal components; their scores Z [C * T, encod_data_dim], scaled so
   that the first has unit standard deviation, are the shared latents.
4. For each session, ridge-regress Z on its own centred activity: W_s = argmin
   ||(M_s - mu_s) W^T - Z||^2 + lam ||W||^2, the read-in weight [encod_data_dim, n_s], with
   bias b_s = -W_s mu_s, so a bin of counts x maps to (x - mu_s) W_s^T. lam is ``ridge``
   times the mean variance of the session's neurons (so the penalty does not depend on
   units).
5. Read-out (when fac_dim equals encod_data_dim, so that factors can play the shared
   latents, each scaled to unit standard deviation): ridge-regress each session's averaged
   recon neurons, held-out ones included, on its read-in's scaled output, and linearise
   around each neuron's mean into log-rate units (pcr_readouts). Where a session sees the
   shared space exactly this is the read-in's pseudo-inverse (up to the scaling); the
   regression stays bounded where the pseudo-inverse of a ridge-shrunk read-in would not
   (read-out weights up to ~80 were seen, whose exp overflows). With another fac_dim only
   the biases are set, to the neurons' log mean counts per bin.

The read-ins stay frozen during training unless the config has train_readin (the trainer's
Adam mask is LFADS.trainable_mask()).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

from . import data as data_mod
from . import metrics, posterior
from .config import LFADSConfig
from .model import LFADS

__all__ = [
    "PCRResult",
    "config_for_sessions",
    "default_shared_dim",
    "pcr_readins",
    "pcr_readouts",
    "init_session_layers",
    "check_sessions",
    "session_batch_indices",
    "session_batches",
    "session_posteriors",
    "write_session_posteriors",
    "session_conditions",
    "session_factor_averages",
]

# Default Gaussian smoothing of the spikes before averaging, in bins.
DEFAULT_SIGMA_BINS = 2.0
# Default ridge penalty, relative to the mean variance of a session's neurons.
DEFAULT_RIDGE = 1e-3
# Floor of a neuron's mean count per bin where its logarithm or inverse is taken (a silent
# neuron would otherwise get an infinitely negative bias).
MIN_MEAN_COUNT = 1e-3
# Floor of a shared dimension's standard deviation, relative to the largest, where the
# read-out divides by it.
MIN_RELATIVE_SCALE = 1e-3
# Per-split arrays read as condition labels, in order of preference: the synthetic data's
# {split}_conditions, and {split}_cond_idx as some lfads-torch data files name them.
CONDITION_KEYS = ("conditions", "cond_idx")


@dataclass
class PCRResult:
    """Read-ins of several sessions to one shared space.

    Attributes:
        readin_W: per session, the read-in weight [dim, n_s].
        readin_b: per session, the read-in bias [dim].
        method: "conditions" (condition averages), "trial_average" (the fallback without
            conditions) or "file" (alignment matrices of the session files).
        explained_variance_ratio: variance fraction of each shared component [dim] (NaN for
            "file").
        latents: the shared latents Z the read-ins were fit to, [rows, dim] (None for "file").
        conditions: the condition labels averaged over, in row-block order (None otherwise).
    """

    readin_W: list[np.ndarray]
    readin_b: list[np.ndarray]
    method: str
    explained_variance_ratio: np.ndarray
    latents: np.ndarray | None = None
    conditions: np.ndarray | None = None


def config_for_sessions(sessions: list[data_mod.Dataset], encod_data_dim: int, **hparams) -> LFADSConfig:
    """An LFADSConfig whose data sizes are those of several sessions.

    Args:
        sessions: one Dataset per session (data.load_sessions checks they agree in bins and
            external inputs).
        encod_data_dim: the shared read-in dimension.
        **hparams: other LFADSConfig fields (not the data sizes).

    Returns:
        The config, with session_neurons and session_recon_neurons of the sessions.
    """
    sizes = {name: getattr(sessions[0], name) for name in ("encod_seq_len", "recon_seq_len", "ext_input_dim")}
    for ds in sessions[1:]:
        for name, want in sizes.items():
            if getattr(ds, name) != want:
                raise ValueError(f"{ds.source}: {name} is {getattr(ds, name)} but {sessions[0].source} has {want}")
    fixed = set(sizes) | {"session_neurons", "session_recon_neurons", "recon_data_dim"}
    clash = sorted(fixed & set(hparams))
    if clash:
        raise ValueError(f"{', '.join(clash)} come from the sessions; do not pass them")
    return LFADSConfig(encod_data_dim=encod_data_dim, **sizes,
                       session_neurons=[ds.encod_data_dim for ds in sessions],
                       session_recon_neurons=[ds.recon_data_dim for ds in sessions], **hparams)


def default_shared_dim(sessions: list[data_mod.Dataset], fac_dim: int) -> int:
    """A shared read-in dimension (encod_data_dim) for sessions when none is chosen.

    The dimension of the files' alignment matrices when they carry them; else fac_dim, so
    that the PCR read-outs apply (init_session_layers, step 5), but at most the sessions'
    neurons together, the most principal components PCR can find.
    """
    alignment = data_mod.session_alignment(sessions[0])
    if alignment is not None:
        return int(alignment[0].shape[1])
    return int(min(fac_dim, sum(ds.encod_data_dim for ds in sessions)))


def pcr_readins(spikes: list[np.ndarray], dim: int, *, conditions: list[np.ndarray] | None = None,
                sigma_bins: float = DEFAULT_SIGMA_BINS, ridge: float = DEFAULT_RIDGE) -> PCRResult:
    """Read-ins of several sessions into one shared space by principal-component regression.

    Args:
        spikes: per session, counts [B_s, T, n_s] (NaN = missing); T the same for all.
        dim: dimension of the shared space (the model's encod_data_dim).
        conditions: per session, the condition label of each trial [B_s]; None: the
            trial-average fallback (module docstring).
        sigma_bins: Gaussian smoothing width in bins (0: none).
        ridge: ridge penalty relative to the mean variance of a session's neurons (> 0).

    Returns:
        The read-ins, their neurons' mean counts and the shared latents.

    Raises:
        ValueError: sessions disagree in bins, a session has no trials, labels do not match
            the trials, or no condition is common to all sessions.
    """
    if not spikes:
        raise ValueError("spikes is empty: PCR needs at least one session")
    if not (isinstance(dim, (int, np.integer)) and dim >= 1):
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    spikes = [np.asarray(x, dtype=np.float64) for x in spikes]
    n_bins = spikes[0].shape[1] if spikes[0].ndim == 3 else None
    for s, x in enumerate(spikes):
        if x.ndim != 3 or x.shape[1] != n_bins:
            raise ValueError(f"session {s}: spikes must be [trials, {n_bins} bins, neurons], got {x.shape}")
        if x.shape[0] == 0:
            raise ValueError(f"session {s}: spikes has no trials")
    averages, labels, method = _averages(spikes, conditions, sigma_bins)
    blocks = [a.reshape(-1, a.shape[-1]) for a in averages]  # [rows, n_s]
    means = [b.mean(axis=0) for b in blocks]
    centred = np.concatenate([b - m for b, m in zip(blocks, means)], axis=1)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(dim, vt.shape[0])
    latents = np.zeros((centred.shape[0], dim))
    latents[:, :k] = centred @ vt[:k].T
    # Unit standard deviation of the first component: the read-in's output then has the scale
    # of the model's other activations whatever the firing rates.
    top = latents[:, 0].std()
    if top > 0:
        latents /= top
    variance = singular**2
    explained = np.zeros(dim)
    if variance.sum() > 0:
        explained[:k] = variance[:k] / variance.sum()
    rank = np.linalg.matrix_rank(centred)
    if rank < dim:
        warnings.warn(f"the averaged activity has rank {rank} < dim = {dim}: the extra shared inputs "
                      "get (near) zero read-in weights", RuntimeWarning, stacklevel=2)
    readin_W, readin_b = [], []
    for b, m in zip(blocks, means):
        W = _ridge(b - m, latents, ridge)  # [dim, n_s]
        readin_W.append(W)
        readin_b.append(-W @ m)
    return PCRResult(readin_W, readin_b, method, explained, latents, labels)


def pcr_readouts(readin_W: list[np.ndarray], readin_b: list[np.ndarray], encod_spikes: list[np.ndarray],
                 recon_spikes: list[np.ndarray], *, conditions: list[np.ndarray] | None = None,
                 sigma_bins: float = DEFAULT_SIGMA_BINS, ridge: float = DEFAULT_RIDGE):
    """Read-outs consistent with given read-ins, from factors to log-rates.

    The factor space is the read-ins' output space with each dimension divided by its
    standard deviation sigma [dim] (pooled over the sessions' averaged activity): factors
    start out of order one in every dimension, so a read-out fit to unscaled minor dimensions
    would turn them into huge log-rates. For each session, the smoothed and averaged recon
    neurons a [rows, n_recon_s] (held-out ones included) are ridge-regressed on
    f = readin(averaged encoder neurons) / sigma: a ~ mu + R (f - f_mean), mu the neurons'
    means. Linearised around the mean, log a ~ log mu + (R / mu) (f - f_mean), so the read-out
    is W = R / mu, b = log mu - W f_mean (mu floored at MIN_MEAN_COUNT). Where a session sees
    the shared space exactly, R diag(1 / sigma) is the read-in's pseudo-inverse; unlike the
    pseudo-inverse, R stays bounded along directions a ridge read-in has shrunk.

    Args:
        readin_W, readin_b: per session, [dim, n_s] and [dim].
        encod_spikes: per session, encoder counts [B_s, T_e, n_s].
        recon_spikes: per session, recon counts [B_s, T_r, n_recon_s] of the same trials; only
            the first T_e bins are used.
        conditions, sigma_bins, ridge: as in pcr_readins.

    Returns:
        (readouts, sigma): per session (W [n_recon_s, dim], b [n_recon_s]), and sigma [dim].
    """
    n_bins = np.shape(encod_spikes[0])[1]
    encod = _averages([np.asarray(x, dtype=np.float64) for x in encod_spikes], conditions, sigma_bins)[0]
    recon = _averages([np.asarray(x, dtype=np.float64)[:, :n_bins] for x in recon_spikes], conditions,
                      sigma_bins)[0]
    z = [e.reshape(-1, e.shape[-1]) @ W.T + b for W, b, e in zip(readin_W, readin_b, encod)]
    sigma = np.concatenate(z).std(axis=0)
    # A dimension the read-ins leave (nearly) empty must not be blown up to unit scale.
    sigma = np.maximum(sigma, MIN_RELATIVE_SCALE * sigma.max()) if sigma.max() > 0 else np.ones_like(sigma)
    readouts = []
    for z_s, r in zip(z, recon):
        f = z_s / sigma
        a = r.reshape(-1, r.shape[-1])
        f_mean, mu = f.mean(axis=0), a.mean(axis=0)
        R = _ridge(f - f_mean, a - mu, ridge)  # [n_recon_s, dim]
        scale = np.maximum(mu, MIN_MEAN_COUNT)
        W = R / scale[:, None]
        readouts.append((W, np.log(scale) - W @ f_mean))
    return readouts, sigma


def init_session_layers(model: LFADS, sessions: list[data_mod.Dataset], *, conditions="auto",
                        sigma_bins: float = DEFAULT_SIGMA_BINS, ridge: float = DEFAULT_RIDGE,
                        use_file_alignment: bool = True) -> PCRResult:
    """Sets a multi-session model's read-ins and read-outs from its sessions' data.

    The read-ins come from the alignment matrices of the session files when every file has
    one (data.session_alignment), else from PCR on the training trials (pcr_readins). The
    read-outs follow them (pcr_readouts; module docstring, step 5), using the same condition
    averages (or their fallback).

    Args:
        model: a model with session_neurons; its parameters are set in place.
        sessions: one Dataset per session, in the model's session order.
        conditions: "auto" (each train split's condition labels, session_conditions, when
            every session has them, else the trial-average fallback), None (the fallback), or per session an
            array of labels [B_s] of its train trials.
        sigma_bins, ridge: as in pcr_readins.
        use_file_alignment: use the files' alignment matrices when present.

    Returns:
        What the read-ins were built from (PCRResult).

    Raises:
        ValueError: the sessions do not fit the model (check_sessions), only some files have
            alignment matrices, or a matrix does not fit encod_data_dim.
    """
    cfg = model.config
    if not cfg.multisession:
        raise ValueError("init_session_layers needs a model whose config has session_neurons")
    check_sessions(cfg, sessions)
    if isinstance(conditions, str) and conditions == "auto":
        found = [session_conditions(ds) for ds in sessions]
        conditions = None if any(c is None for c in found) else found
    result = _file_alignment(sessions, cfg.encod_data_dim) if use_file_alignment else None
    if result is None:
        result = pcr_readins([ds.train.encod_data for ds in sessions], cfg.encod_data_dim,
                             conditions=conditions, sigma_bins=sigma_bins, ridge=ridge)
    p, dt = model.params, model.dtype
    readouts, _ = pcr_readouts(result.readin_W, result.readin_b, [ds.train.encod_data for ds in sessions],
                               [ds.train.recon_data for ds in sessions], conditions=conditions,
                               sigma_bins=sigma_bins, ridge=ridge)

    def put(name, value):  # host values into the parameters, on the model's device
        p[name][...] = model.xp.asarray(value.astype(dt))

    for s, (W_out, b_out) in enumerate(readouts):
        put(f"readin_W_{s}", result.readin_W[s])
        put(f"readin_b_{s}", result.readin_b[s])
        if cfg.fac_dim == cfg.encod_data_dim:
            put(f"readout_W_{s}", W_out)
            put(f"readout_b_{s}", b_out)
        else:  # the factors are not the read-in's space: only the mean rates carry over
            mean = _mean_counts(sessions[s].train.recon_data)
            put(f"readout_b_{s}", np.log(np.maximum(mean, MIN_MEAN_COUNT)))
    return result


def check_sessions(cfg: LFADSConfig, sessions: list[data_mod.Dataset]) -> None:
    """Checks that datasets fit a multi-session config, one per session in its order.

    Raises:
        ValueError: the config has no sessions, the number of datasets differs from its
            sessions, or a dataset's neurons, bins or external inputs differ from the config's
            (the message names the session and its file).
    """
    if not cfg.multisession:
        raise ValueError("the model has one session (no session_neurons); give it one dataset")
    if len(sessions) != cfg.n_sessions:
        raise ValueError(f"the model has {cfg.n_sessions} sessions, got {len(sessions)} datasets")
    for s, ds in enumerate(sessions):
        want = {"encod_data_dim": cfg.session_neurons[s], "recon_data_dim": cfg.session_recon_neurons[s],
                "encod_seq_len": cfg.encod_seq_len, "recon_seq_len": cfg.recon_seq_len,
                "ext_input_dim": cfg.ext_input_dim}
        for name, value in want.items():
            if getattr(ds, name) != value:
                raise ValueError(f"session {s} ({ds.source}) has {name} = {getattr(ds, name)} but the model "
                                 f"expects {value}")


def session_batch_indices(n_trials: list[int], batch_size: int, rng: np.random.Generator):
    """The trial indices of one epoch of session_batches.

    Args:
        n_trials: per session, its number of trials (> 0).
        batch_size: trials per session per batch.
        rng: the batch order.

    Yields:
        Per batch, one int64 index array per session (up to batch_size trials each).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_batches = max(-(-n // batch_size) for n in n_trials)
    orders = [rng.permutation(n) for n in n_trials]
    positions = [0] * len(n_trials)
    for _ in range(n_batches):
        batch = []
        for s, n in enumerate(n_trials):
            if positions[s] >= n:  # this session's pass is used up: a new one
                orders[s] = rng.permutation(n)
                positions[s] = 0
            idx = orders[s][positions[s] : positions[s] + batch_size]
            positions[s] += idx.size
            batch.append(idx)
        yield batch


def session_batches(sessions: list[data_mod.Dataset], batch_size: int, rng: np.random.Generator, *,
                    split: str = "train"):
    """One epoch of training batches that mix the sessions.

    Every batch holds up to batch_size trials of every session, as lfads-torch cycles its
    per-session loaders: the epoch ends when the session with the most batches has used all
    its trials once, and a session that runs out earlier starts another random pass (the
    last batch of a pass may be smaller). Each session thus weighs the same in every step,
    matching the model's session-mean reconstruction loss.

    Args:
        sessions: one Dataset per session.
        batch_size: trials per session per batch.
        rng: the batch order.
        split: the split to draw from.

    Yields:
        Parts for LFADS.make_session_batch: lists of (session, encod_data, recon_data,
        ext_input) tuples, batch-major arrays.
    """
    splits = [ds.splits[split] for ds in sessions]
    for indices in session_batch_indices([sp.n_trials for sp in splits], batch_size, rng):
        parts = []
        for s, (sp, idx) in enumerate(zip(splits, indices)):
            ext = None if sp.ext_input is None else sp.ext_input[idx]
            parts.append((s, sp.encod_data[idx], sp.recon_data[idx], ext))
        yield parts


def session_posteriors(model: LFADS, sessions: list[data_mod.Dataset], *, n_samples: int = 0,
                       seed: int = 0, splits: tuple[str, ...] | None = None,
                       refine_steps: int = 0, refine_lr: float = posterior.REFINE_LR) -> list[dict]:
    """The model's outputs for every trial of every session.

    Args:
        model: a trained multi-session model.
        sessions: one Dataset per session, in the model's order.
        n_samples: posterior samples averaged per trial (posterior.sample_and_average: one
            wide batch of trials x samples per chunk); 0 runs once with the posterior means.
        seed: seed of the samples (each session draws from its own stream).
        splits: the splits to run (None: all present).
        refine_steps, refine_lr: refinement of the initial conditions, as in
            posterior.sample_and_average (0: none).

    Returns:
        Per session: split name -> output name (data.POSTERIOR_FIELDS) -> batch-major array,
        e.g. output_params [B_s, T_r, n_recon_s] in expected counts per bin.
    """
    check_sessions(model.config, sessions)
    return [posterior.posterior_outputs(model, ds, n_samples=n_samples, splits=splits, session=s,
                                        seed=_session_seed(seed, s), refine_steps=refine_steps,
                                        refine_lr=refine_lr)
            for s, ds in enumerate(sessions)]


def _session_seed(seed: int, session: int) -> int:
    """The seed of session s's posterior samples: each session draws from its own stream."""
    return int(np.random.SeedSequence([seed, session]).generate_state(1)[0])


def write_session_posteriors(model: LFADS, sessions: list[data_mod.Dataset], out_dir: str | os.PathLike,
                             **kwargs) -> list[str]:
    """Runs session_posteriors and writes one lfads-torch posterior file per session.

    Args:
        model, sessions: as in session_posteriors.
        out_dir: the directory (created if needed); session s goes to
            ``lfads_output_{name}`` with name the base name of its source file (or
            ``session_{s:02d}.h5`` for data not read from a file; ``session_{s:02d}_{name}``
            when two sessions' files share a base name).
        **kwargs: n_samples, seed, splits, refine_steps, refine_lr as in
            session_posteriors.

    Returns:
        The paths written, in session order.
    """
    return write_session_outputs(sessions, out_dir, session_posteriors(model, sessions, **kwargs))


def ensemble_session_posteriors(models: list[LFADS], sessions: list[data_mod.Dataset], *,
                                n_samples: int = 0, seed: int = 0,
                                splits: tuple[str, ...] | None = None, refine_steps: int = 0,
                                refine_lr: float = posterior.REFINE_LR) -> list[dict]:
    """Rates of every session averaged over an ensemble of multi-session models.

    Each model runs as session_posteriors runs it alone (same samples' seeds, splits and
    refinement); posterior.ensemble_outputs averages each session's rates.

    Args:
        models: trained multi-session models of the same sessions (same neurons per session,
            in the same order); they may differ in anything else.
        sessions: one Dataset per session, in the models' order.
        n_samples, seed, splits, refine_steps, refine_lr: as in session_posteriors.

    Returns:
        Per session: split name -> {"output_params": the averaged rates [B_s, T_r, n_recon_s]}.
    """
    if not models:
        raise ValueError("models: an ensemble needs at least one model, got none")
    for m in models:
        check_sessions(m.config, sessions)
    return [posterior.ensemble_outputs(models, ds, n_samples=n_samples, seed=_session_seed(seed, s),
                                       splits=splits, session=s, refine_steps=refine_steps,
                                       refine_lr=refine_lr)
            for s, ds in enumerate(sessions)]


def write_session_outputs(sessions: list[data_mod.Dataset], out_dir: str | os.PathLike,
                          outputs: list[dict]) -> list[str]:
    """Writes one posterior file per session (names as in write_session_posteriors).

    Args:
        sessions: one Dataset per session (their sources name the files, their splits' inds
            are written beside the outputs).
        out_dir: the directory (created if needed).
        outputs: per session, split name -> output name -> array, as session_posteriors or
            ensemble_session_posteriors return.

    Returns:
        The paths written, in session order.
    """
    if len(outputs) != len(sessions):
        raise ValueError(f"outputs: one entry per session expected ({len(sessions)}), "
                         f"got {len(outputs)}")
    os.makedirs(out_dir, exist_ok=True)
    names = [os.path.basename(ds.source) if os.path.isfile(ds.source) else f"session_{s:02d}.h5"
             for s, ds in enumerate(sessions)]
    if len(set(names)) < len(names):
        names = [name if name.startswith("session_") else f"session_{s:02d}_{name}"
                 for s, name in enumerate(names)]
    paths = []
    for name, ds, out in zip(names, sessions, outputs):
        path = os.path.join(os.fspath(out_dir), f"lfads_output_{name}")
        inds = {split: ds.splits[split].inds for split in out}
        paths.append(data_mod.write_posterior_h5(path, out, inds))
    return paths


def session_conditions(dataset: data_mod.Dataset, split: str = "train") -> np.ndarray | None:
    """A split's condition labels [B] (the first of CONDITION_KEYS in Split.extra), or None."""
    extra = dataset.splits[split].extra
    for key in CONDITION_KEYS:
        if key in extra:
            labels = np.asarray(extra[key]).reshape(-1)
            if labels.size != dataset.splits[split].n_trials:
                raise ValueError(f"{dataset.source}: {split}_{key} has {labels.size} labels for "
                                 f"{dataset.splits[split].n_trials} trials")
            return labels
    return None


def session_factor_averages(model: LFADS, sessions: list[data_mod.Dataset], *,
                            splits: tuple[str, ...] = ("train", "valid")):
    """Condition-averaged factors of every session (posterior means).

    Trials of the given splits are averaged per condition label, over the labels that every
    session has (session_conditions), so that row c of every session is the same condition.
    Without labels in some split of some session, each session's trials are averaged into
    one trajectory.

    Args:
        model: a trained multi-session model.
        sessions: one Dataset per session, in the model's order.
        splits: the splits whose trials are averaged.

    Returns:
        (averages, labels): per session the factors [C, T_r, fac_dim] (C = 1 without labels),
        and the labels [C] (None without labels).
    """
    outputs = session_posteriors(model, sessions, splits=splits)
    factors = [np.concatenate([out[name]["factors"] for name in splits]) for out in outputs]
    labels = [[session_conditions(ds, name) for name in splits] for ds in sessions]
    if any(c is None for per_split in labels for c in per_split):
        conditions = None
    else:
        conditions = [np.concatenate(per_split) for per_split in labels]
    averages, common, _ = _averages(factors, conditions, sigma_bins=0)
    return averages, common


# Helpers ----------------------------------------------------------------------------------


def _averages(spikes, conditions, sigma_bins):
    """Smoothed averages per session [C, T, n_s], the labels (or None) and the method."""
    smoothed = [metrics.gaussian_smooth(x, sigma_bins) if sigma_bins > 0 else x for x in spikes]
    if conditions is None:
        averages = [_nanmean_filled([x]) for x in smoothed]
        return averages, None, "trial_average"
    if len(conditions) != len(spikes):
        raise ValueError(f"conditions has {len(conditions)} entries for {len(spikes)} sessions")
    conditions = [np.asarray(c).reshape(-1) for c in conditions]
    for s, (c, x) in enumerate(zip(conditions, spikes)):
        if c.shape != (x.shape[0],):
            raise ValueError(f"session {s}: {c.size} condition labels for {x.shape[0]} trials")
    common = conditions[0]
    for c in conditions[1:]:
        common = np.intersect1d(common, c)
    common = np.unique(common)
    if common.size == 0:
        raise ValueError("no condition is shared by all sessions; PCR needs common conditions "
                         "(or conditions=None for the trial-average fallback)")
    averages = [_nanmean_filled([x[c == label] for label in common])
                for x, c in zip(smoothed, conditions)]
    return averages, common, "conditions"


def _nanmean_filled(groups):
    """Mean over the trials of each group [trials, T, n] -> [groups, T, n]; bins no trial
    observed take the neuron's mean (NaN survives smoothing only where a whole kernel width
    was missing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        avg = np.stack([np.nanmean(g, axis=0) for g in groups])
        fill = np.nanmean(avg, axis=(0, 1))
    fill = np.nan_to_num(fill, nan=0.0)
    return np.where(np.isnan(avg), fill, avg)


def _mean_counts(x):
    """Each neuron's mean count per bin over its observed bins, [n] (0 if it has none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nan_to_num(np.nanmean(np.asarray(x, dtype=np.float64), axis=(0, 1)), nan=0.0)


def _ridge(x, y, ridge):
    """B [y columns, x columns] minimising ||x B^T - y||^2 + lam ||B||^2, with lam = ridge
    times the mean variance (per row) of x's columns, so the penalty does not depend on units."""
    gram = x.T @ x
    lam = ridge * max(np.trace(gram) / gram.shape[0], np.finfo(float).tiny)
    return np.linalg.solve(gram + lam * np.eye(gram.shape[0]), x.T @ y).T


def _file_alignment(sessions, dim):
    """PCRResult from the files' alignment matrices, or None when no file has one."""
    found = [data_mod.session_alignment(ds) for ds in sessions]
    have = [s for s, a in enumerate(found) if a is not None]
    if not have:
        return None
    if len(have) < len(sessions):
        missing = [s for s, a in enumerate(found) if a is None]
        raise ValueError(f"sessions {have} have alignment matrices but sessions {missing} do not; give "
                         "every session one, or pass use_file_alignment=False for PCR")
    readin_W, readin_b = [], []
    for ds, (weight, bias) in zip(sessions, found):
        if weight.shape[1] != dim:
            raise ValueError(f"{ds.source}: the alignment matrix maps to {weight.shape[1]} dimensions but "
                             f"the model's encod_data_dim is {dim}")
        readin_W.append(weight.T)
        readin_b.append(-bias @ weight)
    return PCRResult(readin_W, readin_b, "file", np.full(dim, np.nan))
