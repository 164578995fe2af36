"""Posterior sampling and averaging (lfads-torch's run_posterior_sampling).

Each trial is run n_samples times with independent posterior samples (initial condition and
inferred inputs; no dropout) and every output is averaged per trial. The samples of many
trials go through the model together as one wide batch: trial i is repeated n_samples times
along the batch axis, in chunks of at most max_rows rows so that memory stays bounded.
"""
from __future__ import annotations

import os

import numpy as np

from . import data as data_mod
from .model import LFADS
from .refine import refine_ic

__all__ = ["DEFAULT_SAMPLES", "REFINE_STEPS", "REFINE_LR", "average_rates", "RateSum", "ensemble_average", "ensemble_outputs", "sample_and_average", "posterior_outputs", "write_posterior"]

DEFAULT_SAMPLES = 50
# Refinement of the initial conditions (refine.refine_ic): default steps and Adam step size
# when it is asked for (docs/refine_ic.md: converged on the demo's model by about 50 steps).
REFINE_STEPS = 50
REFINE_LR = 0.05
# Activation memory one chunk of rows may take (estimated with _row_bytes).
_CHUNK_BYTES = 512 * 2**20


def sample_and_average(model: LFADS, encod_data: np.ndarray, ext_input: np.ndarray | None = None,
                       *, n_samples: int = DEFAULT_SAMPLES, seed: int = 0,
                       max_rows: int | None = None, session: int | None = None,
                       refine_steps: int = 0, refine_lr: float = REFINE_LR
                       ) -> dict[str, np.ndarray]:
    """Posterior-averaged outputs of some trials.

    Args:
        model: a trained model.
        encod_data: spike counts [B, encod_seq_len, encod_data_dim] (NaN = missing).
        ext_input: external inputs [B, T, ext_input_dim], or None.
        n_samples: posterior samples per trial; 0 runs once with the posterior means.
        seed: seed of the samples. The samples depend on it and on max_rows.
        max_rows: rows (trials x samples) per model call; None sizes chunks to about 512 MiB
            of activations.
        session: the session of the trials, for a model with sessions (else None).
        refine_steps: > 0 refines each trial's initial condition by that many steps
            (refine.refine_ic, on the trial's own spikes) and runs the generator from it
            instead of from posterior samples; only the controller's outputs are then
            sampled (without a controller each trial is run once). 0: plain sampling.
        refine_lr: refine_ic's lr.

    Returns:
        lfads-torch's output names (data.POSTERIOR_FIELDS), batch-major, averaged over the
        samples: output_params (expected counts per bin) [B, T_r, N_r], factors [B, T_r, F],
        ic_mean, ic_std [B, ic_dim], co_means, co_stds [B, T_r, U], gen_states [B, T_r, G],
        gen_init [B, G], gen_inputs [B, T_r, U + E], con_states [B, T_r, C]. With
        refinement, ic_mean holds the refined initial conditions (ic_std stays the
        encoder's).
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 0:
        raise ValueError(f"n_samples must be an integer >= 0, got {n_samples!r}")
    if (isinstance(refine_steps, bool) or not isinstance(refine_steps, (int, np.integer))
            or refine_steps < 0):
        raise ValueError(f"refine_steps must be an integer >= 0, got {refine_steps!r}")
    encod_data = np.asarray(encod_data)
    if encod_data.ndim != 3:
        raise ValueError(f"encod_data must be [trials, bins, neurons], got shape {encod_data.shape}")
    n_trials = encod_data.shape[0]
    reps = max(int(n_samples), 1)
    if refine_steps > 0 and not model.config.use_con:
        reps = 1  # the generator is deterministic given the initial condition
    if max_rows is None:
        max_rows = max(_CHUNK_BYTES // _row_bytes(model), 1)
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    trials_per_chunk = max(max_rows // reps, 1)
    chunks = []
    for c, start in enumerate(range(0, n_trials, trials_per_chunk)):
        sl = slice(start, start + trials_per_chunk)
        x = encod_data[sl]
        ext = None if ext_input is None else np.asarray(ext_input)[sl]
        chunk_seed = int(np.random.SeedSequence([seed, c]).generate_state(1)[0])
        ic = None
        if refine_steps > 0:
            ext_c = None if ext_input is None else np.asarray(ext_input)[sl]
            ic = refine_ic(model, encod_data[sl], ext_c, session=session, steps=int(refine_steps),
                           lr=refine_lr)["ic"]
            ic = np.repeat(ic, reps, axis=0)
        # Each trial's samples share one run of the encoders (repeats) and are averaged
        # before the outputs are made batch-major (average).
        out = model.forward(x, ext, sample=n_samples > 0, seed=chunk_seed, session=session, ic=ic,
                            repeats=reps, average=True)
        chunks.append({k: out[k] for k in data_mod.POSTERIOR_FIELDS})
    if not chunks:
        raise ValueError("encod_data has no trials")
    return {k: np.concatenate([c[k] for c in chunks], axis=0) for k in data_mod.POSTERIOR_FIELDS}


def ensemble_average(models: list[LFADS], encod_data: np.ndarray, ext_input: np.ndarray | None = None,
                     *, n_samples: int = DEFAULT_SAMPLES, seed: int = 0, max_rows: int | None = None,
                     session: int | None = None, refine_steps: int = 0,
                     refine_lr: float = REFINE_LR) -> dict[str, np.ndarray]:
    """Rates averaged over an ensemble: several models trained on the same data (different
    seeds or settings), each run with sample_and_average, their output_params averaged.

    Only the rates are averaged: factors, states and initial conditions are each model's own
    coordinates and have no common meaning across models.

    Args:
        models: the trained models; all must read and reconstruct the same neurons and bins.
        encod_data, ext_input, n_samples, seed, max_rows, session, refine_steps, refine_lr:
            as in sample_and_average (every model gets the same seed).

    Returns:
        output_params: the mean over the models of their posterior-averaged rates
        [B, T_r, N_r]; members: a list with each model's [B, T_r, N_r].
    """
    models = list(models)
    if not models:
        raise ValueError("models is empty: an ensemble needs at least one model")
    first = models[0].config
    for i, m in enumerate(models[1:], start=1):
        c = m.config
        got = (c.encod_seq_len, c.recon_seq_len, c.encod_data_dim, c.recon_data_dim, c.ext_input_dim,
               c.session_neurons, c.session_recon_neurons)
        want = (first.encod_seq_len, first.recon_seq_len, first.encod_data_dim, first.recon_data_dim,
                first.ext_input_dim, first.session_neurons, first.session_recon_neurons)
        if got != want:
            raise ValueError(f"models[{i}] has data sizes (encod_seq_len, recon_seq_len, encod_data_dim, "
                             f"recon_data_dim, ext_input_dim, session_neurons, session_recon_neurons) "
                             f"= {got}, but models[0] has {want}")
    members = [sample_and_average(m, encod_data, ext_input, n_samples=n_samples, seed=seed,
                                  max_rows=max_rows, session=session, refine_steps=refine_steps,
                                  refine_lr=refine_lr)["output_params"] for m in models]
    return {"output_params": average_rates(members), "members": members}


def average_rates(rates) -> np.ndarray:
    """The mean of several models' rates of the same trials (an ensemble's output_params),
    accumulated in float64 and returned in the members' dtype.

    Args:
        rates: the models' rates, each [B, T_r, N_r]; any iterable: a generator keeps only one
            model's rates in memory beside the float64 sum.

    Raises:
        ValueError: no rates, or rates of different shapes.
    """
    total = RateSum()
    for r in rates:
        total.add(r)
    return total.mean()


class RateSum:
    """A running float64 sum of rates of the same trials, for averaging models one at a time
    (what average_rates does for a list or generator)."""

    def __init__(self):
        self.sum = None
        self.n = 0
        self.dtype = None

    def add(self, rates: np.ndarray) -> None:
        """Adds one model's rates; ValueError if their shape differs from the first's."""
        rates = np.asarray(rates)
        if self.sum is None:
            self.sum = rates.astype(np.float64)
            self.dtype = rates.dtype
        elif rates.shape != self.sum.shape:
            raise ValueError(f"rates of different shapes cannot be averaged: "
                             f"{sorted({self.sum.shape, rates.shape})}")
        else:
            self.sum += rates
        self.n += 1

    def mean(self) -> np.ndarray:
        """The mean of the rates added, in the first one's dtype; ValueError if none was."""
        if self.n == 0:
            raise ValueError("rates is empty: an average needs at least one model's rates")
        return (self.sum / self.n).astype(self.dtype)


def posterior_outputs(model: LFADS, dataset: data_mod.Dataset, *,
                      n_samples: int = DEFAULT_SAMPLES, seed: int = 0,
                      splits: tuple[str, ...] | None = None,
                      max_rows: int | None = None, session: int | None = None,
                      refine_steps: int = 0, refine_lr: float = REFINE_LR
                      ) -> dict[str, dict[str, np.ndarray]]:
    """sample_and_average for each split of a dataset.

    Args:
        model, n_samples, max_rows, session, refine_steps, refine_lr: as in
            sample_and_average.
        dataset: the data.
        seed: seed of the samples (each split draws from its own stream).
        splits: names of the splits to run (None: all present).

    Returns:
        split name -> output name -> array.
    """
    present = dataset.splits
    names = tuple(present) if splits is None else tuple(splits)
    unknown = [s for s in names if s not in present]
    if unknown:
        raise ValueError(f"split(s) {unknown} not in the data (found {list(present)})")
    return {name: sample_and_average(model, present[name].encod_data, present[name].ext_input,
                                     n_samples=n_samples,
                                     seed=int(np.random.SeedSequence([seed, i]).generate_state(1)[0]),
                                     max_rows=max_rows, session=session,
                                     refine_steps=refine_steps, refine_lr=refine_lr)
            for i, name in enumerate(names)}


def ensemble_outputs(models: list[LFADS], dataset: data_mod.Dataset, **kwargs
                     ) -> dict[str, dict[str, np.ndarray]]:
    """posterior_outputs of several models of the same data, their rates averaged per split.

    Each model runs as posterior_outputs runs it alone (same seeds, splits and refinement);
    only a running sum of the rates (RateSum) is kept between models.

    Args:
        models: the trained models (at least one); the caller checks that they fit the data.
        dataset: the data.
        **kwargs: n_samples, seed, splits, max_rows, session, refine_steps, refine_lr as in
            posterior_outputs.

    Returns:
        split name -> {"output_params": the averaged rates [B, T_r, N_r]}.
    """
    if not models:
        raise ValueError("models: an ensemble needs at least one model, got none")
    sums = {}
    for m in models:
        for name, out in posterior_outputs(m, dataset, **kwargs).items():
            sums.setdefault(name, RateSum()).add(out["output_params"])
    return {name: {"output_params": total.mean()} for name, total in sums.items()}


def write_posterior(path: str | os.PathLike, model: LFADS, dataset: data_mod.Dataset, *,
                    n_samples: int = DEFAULT_SAMPLES, seed: int = 0,
                    splits: tuple[str, ...] | None = None, max_rows: int | None = None,
                    refine_steps: int = 0, refine_lr: float = REFINE_LR
                    ) -> dict[str, dict[str, np.ndarray]]:
    """Runs posterior_outputs and writes the result with lfads-torch's keys
    ({split}_{output}, {split}_inds), atomically (data.write_posterior_h5).

    Returns:
        The outputs written (split name -> output name -> array).
    """
    outputs = posterior_outputs(model, dataset, n_samples=n_samples, seed=seed, splits=splits,
                                max_rows=max_rows, refine_steps=refine_steps, refine_lr=refine_lr)
    inds = {name: dataset.splits[name].inds for name in outputs}
    data_mod.write_posterior_h5(path, outputs, inds)
    return outputs


def _row_bytes(model: LFADS) -> int:
    """Rough activation memory of one row (trial sample) of a forward pass, in bytes."""
    c = model.config
    per_encod_bin = 12 * c.ic_enc_dim + 12 * c.ci_enc_dim + 2 * c.encod_data_dim
    per_recon_bin = (6 * c.gen_dim + 6 * c.con_dim + 3 * c.fac_dim + 3 * c.recon_data_dim
                     + 6 * c.co_dim + 2 * c.ext_input_dim + 4 * c.ci_enc_dim)
    floats = c.encod_seq_len * per_encod_bin + c.recon_seq_len * per_recon_bin
    return int(floats * model.dtype.itemsize)
