"""Hyperparameter search on Ray Tune: AutoLFADS's population-based training, or random search.

AutoLFADS (Keshtkaran et al. 2022) trains a population of LFADS models at once. Every
``perturbation_interval`` epochs (one generation) the members are ranked by the smoothed
validation reconstruction (``valid_recon_smth``, as the trainer computes it); each member of
the worst quantile copies the state (parameters, Adam moments, counters) of a random member
of the best quantile and goes on with that member's hyperparameters multiplied by random
factors (the explore step). Ray Tune runs it: ``tune.Tuner`` with the stock synchronous
``PopulationBasedTraining`` scheduler, whose ``custom_explore_fn`` is AutoLFADS's explore
(``explore``); each member is a Trainer run as a Tune function trainable
(``tune.with_resources``, one ``tune.report`` per epoch, the package's own HDF5 checkpoints
wrapped in ``tune.Checkpoint`` at every generation boundary). A copy that continues another
member's checkpoint gets its new values through ``Trainer.perturb``.

The search stops at ``max_generations``, at the time budget, or when the population's best
metric improved by less than ``min_improvement_ratio`` (relative) over the last ``patience``
generations (``ImprovementRatioStopper``). ``mode="random"`` instead trains ``population``
independent models with values drawn from the same ranges, each with the trainer's own
schedules (plateau decay, early stopping).

Outputs in out_dir, as ``lfads-fast train`` writes them for the best member (lowest
``valid_recon_smth`` of its best checkpoint): ``config.yaml``, ``checkpoints/best.h5``,
``checkpoints/last.h5``, ``log.csv``, ``log.json``, ``training_curves.png`` and the posterior
(``posterior.h5``, or ``lfads_output_<file>`` per session); and for the search:
``search_trials.csv`` / ``search_trials.md`` (every member's final metric and values),
``search.png`` (the values' trajectories and the metric per generation), ``search.json``
(settings, members, their lineage, every exploit) and Ray's own results under ``ray/``.

An interrupted search (Ctrl-C, the driver killed, a node lost) goes on with
``run_search(..., resume=True)``: Ray Tune's ``Tuner.restore`` continues the experiment, after
the data, configuration and settings have been checked against those the search started with
(``search_setup.json``, written when it starts).

Ray is imported only here and only when a search runs: ``pip install 'lfads_fast[tune]'``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from . import ops, posterior, stitching
from .config import LFADSConfig, read_yaml
from .errors import MissingOptionalPart
from .model import LFADS
from .train import (PERTURBABLE_FIELDS, Trainer, TrainConfig, _checksum, check_sizes,
                    load_checkpoint, load_model)

__all__ = [
    "METRIC",
    "HyperParam",
    "SearchSettings",
    "SearchResult",
    "DEFAULT_SPACE",
    "explore",
    "ImprovementRatioStopper",
    "SearchInterrupted",
    "SETUP_FILE",
    "cv_fit",
    "search_fit_result",
    "load_search_settings",
    "require_ray",
    "run_search",
]

# The metric the population is ranked by (lower is better).
METRIC = "valid_recon_smth"
SAMPLES = ("uniform", "loguniform")
# Hard limits of the values, whatever the search space says: dropout rates below 1
# (lfads-torch's AutoLFADS clips them at 0.99), scales >= 0, a positive learning rate.
_RATE_MAX = 0.99
# The controller's terms: searching them without a controller searches nothing.
_CONTROLLER_FIELDS = ("kl_co_scale", "l2_con_scale", "l2_ci_enc_scale")
# Files of a member's run that its Tune checkpoint carries (besides member.json).
_RUN_FILES = ("checkpoints/last.h5", "checkpoints/best.h5", "log.csv", "log.json",
              "training_curves.png")
_MEMBER_FILE = "member.json"
# What a search started with (settings, configurations, the data's checksum, Ray's experiment
# path): written into out_dir before Ray starts; resume=True checks against it.
SETUP_FILE = "search_setup.json"
# Settings a resumed search may change: where Ray runs (a new cluster after one was lost).
_RESUMABLE_SETTINGS = ("address",)


@dataclass
class HyperParam:
    """One searched hyperparameter (AutoLFADS's HyperParam).

    Attributes:
        low, high: the range initial values are drawn from (low < high).
        init: the initial value of every member (None: drawn from the range).
        sample: "loguniform" or "uniform", how initial (and resampled) values are drawn.
        explore_weight: the explore step multiplies the value by 1 + p, p drawn uniformly
            from [0.002 w, w] with a random sign (w: this weight; 0 < w < 1).
        enforce_bounds: perturbed values stay in [low, high]; otherwise only in the field's
            own limits (>= 0, rates <= 0.99), so PBT can leave the initial range.
    """

    low: float
    high: float
    init: float | None = None
    sample: str = "loguniform"
    explore_weight: float = 0.2
    enforce_bounds: bool = False

    def check(self, name: str) -> None:
        """Raises ValueError naming the field when the values are inconsistent."""
        for attr in ("low", "high", "explore_weight"):
            v = getattr(self, attr)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"search space {name}.{attr} must be a finite number, got {v!r}")
        if not self.low < self.high:
            raise ValueError(f"search space {name}: low ({self.low}) must be below high "
                             f"({self.high}); are the bounds the wrong way round?")
        if self.sample not in SAMPLES:
            raise ValueError(f"search space {name}.sample must be one of {', '.join(SAMPLES)}, "
                             f"got {self.sample!r}")
        if self.sample == "loguniform" and self.low <= 0:
            raise ValueError(f"search space {name}: a loguniform range needs low > 0, got "
                             f"{self.low}")
        if not 0 < self.explore_weight < 1:
            raise ValueError(f"search space {name}.explore_weight must be in (0, 1), got "
                             f"{self.explore_weight}")
        if not isinstance(self.enforce_bounds, bool):
            raise ValueError(f"search space {name}.enforce_bounds must be true or false, got "
                             f"{self.enforce_bounds!r}")
        if self.init is not None and not (isinstance(self.init, (int, float))
                                          and self.low <= self.init <= self.high):
            raise ValueError(f"search space {name}.init ({self.init!r}) must lie in [low, high] "
                             f"= [{self.low}, {self.high}]")

    def draw(self, rng: random.Random) -> float:
        """A value drawn from the range."""
        if self.sample == "uniform":
            return rng.uniform(self.low, self.high)
        return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))


# AutoLFADS's search space as lfads-torch's PBT scripts give it: ranges, initial values and
# explore weights; the rates and the learning rate stay in their ranges.
DEFAULT_SPACE = {
    "lr_init": HyperParam(1e-5, 5e-3, init=4e-3, explore_weight=0.3, enforce_bounds=True),
    "dropout_rate": HyperParam(0.0, 0.6, sample="uniform", explore_weight=0.3,
                               enforce_bounds=True),
    "cd_rate": HyperParam(0.01, 0.7, init=0.5, sample="uniform", explore_weight=0.3,
                          enforce_bounds=True),
    "kl_co_scale": HyperParam(1e-6, 1e-4, explore_weight=0.8),
    "kl_ic_scale": HyperParam(1e-6, 1e-3, explore_weight=0.8),
    "l2_gen_scale": HyperParam(1e-4, 1.0, explore_weight=0.8),
    "l2_con_scale": HyperParam(1e-4, 1.0, explore_weight=0.8),
}


@dataclass
class SearchSettings:
    """How the search runs (the ``tune`` section of a config file; the CLI's flags override).

    Attributes:
        mode: "pbt" (population-based training) or "random" (random search).
        population: members trained (PBT: at once, in generations).
        perturbation_interval: epochs per generation (PBT); random search reports a
            checkpoint this often.
        burn_in: epochs before the first generation ends (None: until the KL and L2 ramps
            are complete, TrainConfig.burn_in; at least one interval).
        max_generations: PBT stops after this many generations (None: no limit).
        quantile_fraction: the fraction of the population that copies the best as many.
        resample_probability: chance that an explored value is drawn afresh from its range
            instead of perturbed (0, as AutoLFADS).
        patience, min_improvement_ratio: stop when the population's best metric improved by
            at most this ratio over the last patience generations (AutoLFADS: 4, 5e-4).
        cpus_per_trial, gpus_per_trial: Ray resources of one member; the kernels use
            cpus_per_trial threads.
        time_budget: seconds the whole search may take (None: no limit).
        address: the Ray cluster to join ("auto", "host:port"); None starts Ray here.
        storage: where Ray keeps results and checkpoints (None: out_dir/ray); on a cluster
            a path every node sees, or a URI such as s3://bucket/path.
        seed: seed of the initial values, the explore steps and the members' models.
        space: the searched hyperparameters (fields of train.PERTURBABLE_FIELDS).
    """

    mode: str = "pbt"
    population: int = 20
    perturbation_interval: int = 25
    burn_in: int | None = None
    max_generations: int | None = None
    quantile_fraction: float = 0.25
    resample_probability: float = 0.0
    patience: int = 4
    min_improvement_ratio: float = 5e-4
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0.0
    time_budget: float | None = None
    address: str | None = None
    storage: str | None = None
    seed: int = 0
    space: dict = field(default_factory=lambda: dict(DEFAULT_SPACE))

    def __post_init__(self):
        if self.mode not in ("pbt", "random"):
            raise ValueError(f"mode must be pbt or random, got {self.mode!r}")
        for name, low in (("population", 1), ("perturbation_interval", 1), ("patience", 1),
                          ("cpus_per_trial", 1), ("seed", 0)):
            _check_int(name, getattr(self, name), low)
        for name in ("burn_in", "max_generations"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0 if name == "burn_in" else 1)
        if self.mode == "pbt" and self.population < 2:
            raise ValueError(f"population must be >= 2 for population-based training (a member "
                             f"copies another), got {self.population}")
        _check_number("quantile_fraction", self.quantile_fraction, 0.0, 0.5)
        if self.quantile_fraction == 0:
            raise ValueError("quantile_fraction must be > 0 (0 would never copy a member)")
        _check_number("resample_probability", self.resample_probability, 0.0, 1.0)
        _check_number("min_improvement_ratio", self.min_improvement_ratio, 0.0, None)
        _check_number("gpus_per_trial", self.gpus_per_trial, 0.0, None)
        if self.time_budget is not None:
            _check_number("time_budget", self.time_budget, 0.0, None)
            if self.time_budget == 0:
                raise ValueError("time_budget must be > 0 seconds")
        if not isinstance(self.space, dict) or not self.space:
            raise ValueError("the search space must name at least one hyperparameter")
        space = {}
        for name, hp in self.space.items():
            if isinstance(hp, dict):
                try:
                    hp = HyperParam(**hp)
                except TypeError as e:
                    raise ValueError(f"search space {name}: {e} (fields: low, high, init, "
                                     "sample, explore_weight, enforce_bounds)") from None
            if not isinstance(hp, HyperParam):
                raise ValueError(f"search space {name} must be a mapping (low, high, ...), got "
                                 f"{hp!r}")
            if name not in PERTURBABLE_FIELDS:
                raise ValueError(f"search space: unknown hyperparameter {name!r}; searchable: "
                                 f"{', '.join(PERTURBABLE_FIELDS)}")
            hp.check(name)
            space[name] = hp
        self.space = space

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown tune settings: {', '.join(unknown)} (known: "
                             f"{', '.join(sorted(known))})")
        return cls(**d)


@dataclass
class SearchResult:
    """What run_search did.

    Attributes:
        best_trial: the Tune trial id of the best member.
        best_metric: its best valid_recon_smth.
        best_values: its hyperparameters at the end.
        trials: one dict per member: trial, status, epochs, metric (last valid_recon_smth),
            best_metric, exploits, values, lineage (list of segments: trial, epoch, source,
            values).
        exploits: every exploit seen: epoch, trial, source (the member copied), changes
            ({name: [source's value, new value]}).
        generations: per generation (PBT) the epoch it ended and the population's best,
            median and worst valid_recon_smth.
        stop_reason: "max_generations", "improvement_ratio", "time_budget" or "finished".
        seconds: wall-clock seconds of the search.
        out_dir: the output directory.
    """

    best_trial: str
    best_metric: float
    best_values: dict
    trials: list
    exploits: list
    generations: list
    stop_reason: str
    seconds: float
    out_dir: str


class SearchInterrupted(KeyboardInterrupt):
    """The search stopped before it finished (Ctrl-C); Ray kept its state, and
    run_search(..., resume=True) (``lfads-fast tune ... --resume``) goes on from it."""


def require_ray():
    """Imports Ray Tune; raises ImportError naming the extra to install when it is missing."""
    try:
        import ray
        from ray import tune
    except ImportError as e:
        raise MissingOptionalPart("lfads-fast tune needs Ray Tune, which is not installed: "
                          "pip install 'lfads_fast[tune]' (or pip install 'ray[tune]')"
                          f" [{e}]") from e
    return ray, tune


def load_search_settings(path: str | os.PathLike | None, **overrides) -> SearchSettings:
    """The ``tune`` section of a YAML config file (if any) with overrides (None ignored).

    Raises:
        ValueError: unknown settings, a search space with unknown names or bad ranges.
    """
    section = {}
    if path is not None:
        raw = read_yaml(path)
        section = raw.get("tune") or {} if isinstance(raw, dict) else {}
        if not isinstance(section, dict):
            raise ValueError(f"{path}: section 'tune' must be a mapping of settings")
        section = dict(section)
        if "space" in section:
            space = section["space"]
            if not isinstance(space, dict):
                raise ValueError(f"{path}: tune.space must map hyperparameter names to ranges")
            section["space"] = {k: (_floats(v) if isinstance(v, dict) else v)
                                for k, v in space.items()}
        for key in ("min_improvement_ratio", "time_budget", "gpus_per_trial"):
            if isinstance(section.get(key), str):
                section[key] = _to_float(section[key], f"tune.{key}")
    section.update({k: v for k, v in overrides.items() if v is not None})
    return SearchSettings.from_dict(section)


def explore(values: dict, space: dict, rng: random.Random, *, resample_probability: float = 0.0,
            lr_floor: float = 0.0) -> dict:
    """AutoLFADS's explore step: every searched value times 1 + p, p uniform in
    [0.002 w, w] with a random sign (w: the value's explore_weight), drawn again until the
    result lies within the bounds (100 tries, then clipped to them).

    Args:
        values: {name: value}, the values of the member copied.
        space: {name: HyperParam}.
        rng: the random source.
        resample_probability: chance of drawing a value afresh from its range instead.
        lr_floor: the learning rate never goes below this.

    Returns:
        The new {name: value}.
    """
    new = dict(values)
    for name, hp in space.items():
        low, high = _bounds(name, hp, lr_floor)
        if rng.random() < resample_probability:
            new[name] = min(max(hp.draw(rng), low), high)
            continue
        w = hp.explore_weight
        for _ in range(100):
            candidate = values[name] * (1.0 + rng.choice((-1.0, 1.0)) * rng.uniform(0.002 * w, w))
            if low <= candidate <= high:
                break
        else:
            candidate = min(max(candidate, low), high)
        new[name] = float(candidate)
    return new


def run_search(data, model_config: LFADSConfig, train_config: TrainConfig,
               out_dir: str | os.PathLike, settings: SearchSettings | None = None, *,
               n_samples: int = 50, verbose: int = 1, resume: bool = False) -> SearchResult:
    """Runs the search and writes its outputs (see the module's docstring).

    Args:
        data: a Dataset, or for a model with sessions a list of Datasets (one per session).
        model_config: the members' model (the searched fields are overwritten per member).
        train_config: the members' training configuration. PBT turns off the plateau
            schedule, early stopping and the time-budget phase (the population takes their
            place) and lowers lr_stop to the lowest learning rate the search may reach.
        out_dir: where the outputs go (created).
        settings: the search (None: AutoLFADS's defaults).
        n_samples: posterior samples for the best member's posterior (0: none).
        verbose: Ray Tune's verbosity (0 silent, 1 a status table, 2 more).
        resume: continue the interrupted search in out_dir (Ray Tune's Tuner.restore) instead
            of starting one. data, model_config, train_config and settings must be those it
            started with, except settings.address (the Ray cluster may be another one).

    Returns:
        What happened (SearchResult), for all members, those trained before an interruption
        included.

    Raises:
        ImportError: Ray Tune is not installed.
        ValueError: bad settings, a population the data and cluster cannot hold; with
            resume, no search in out_dir or one that differs from these arguments (the
            message names each difference).
        SearchInterrupted: the search was interrupted (Ctrl-C); resume=True goes on with it.
    """
    ray, tune = require_ray()
    settings = settings if settings is not None else SearchSettings()
    sessions = list(data) if isinstance(data, (list, tuple)) else [data]
    if model_config.multisession:
        stitching.check_sessions(model_config, sessions)
    elif len(sessions) != 1:
        raise ValueError("several datasets are several sessions: build the model's config with "
                         "stitching.config_for_sessions")
    else:
        check_sizes(model_config, sessions[0])
    space = _check_space(settings.space, model_config)
    out = Path(out_dir)
    storage = settings.storage or str((out / "ray").resolve())
    setup = {"settings": _settings_dict(settings), "model": model_config.to_dict(),
             "train": train_config.to_dict(), "data": _data_summary(sessions),
             "experiment": storage.rstrip("/") + "/search", "resumes": 0}
    if resume:
        setup["resumes"] = _check_resume(out, setup, tune) + 1
    train_config = _member_train_config(train_config, settings)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=settings.address, include_dashboard=False,
                 log_to_driver=verbose > 1, configure_logging=verbose > 0)
    _check_population(ray, settings, model_config, train_config, sessions)
    _write_text(out / SETUP_FILE, json.dumps(_plain(setup), indent=1) + "\n")
    plan = dataclasses.replace(_Plan.of(settings, train_config), session=setup["resumes"],
                               scratch=str(_scratch_root(storage)))

    def trainable(plan: _Plan, sessions: list):
        return tune.with_resources(
            tune.with_parameters(_member, sessions=sessions, model_config=model_config,
                                 train_config=train_config, plan=plan),
            {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial})

    if resume:
        if settings.mode == "pbt":
            # Ray Tune restores PBT's scheduler as it was created (it keeps no state across a
            # restore): the members report their time from the population's next generation
            # boundary on as the scheduler's first one.
            restored = tune.Tuner.restore(setup["experiment"], trainable=trainable(plan, []))
            next_boundary = plan.next_stop(min(_resuming_epochs(restored.get_results(), plan),
                                               default=0))
            plan = dataclasses.replace(plan, time_offset=max(0, next_boundary - plan.first))
        tuner = tune.Tuner.restore(setup["experiment"], trainable=trainable(plan, sessions),
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(tune, trainable(plan, sessions), settings, space, train_config, plan,
                           storage, verbose)
    grid, interrupted = _fit_noting_interrupt(tuner)
    seconds = time.perf_counter() - t0
    if interrupted or grid.num_terminated + grid.num_errors < len(grid):
        raise SearchInterrupted(f"the search in {out} was interrupted; its state is kept in "
                                f"{setup['experiment']}: resume it with lfads-fast tune ... "
                                "--resume (run_search(..., resume=True))")
    trials = _collect(grid, space)
    shutil.rmtree(plan.scratch, ignore_errors=True)  # runs a stopped member left on this node
    finished = [t for t in trials
                if t["checkpoint"] is not None and math.isfinite(t["best_metric"])]
    if not finished:
        errors = "; ".join(f"{t['trial']}: {t['error']}" for t in trials if t["error"])
        if not errors and settings.time_budget is not None:
            raise RuntimeError(
                f"the time budget ({settings.time_budget:g} s) ran out before any member "
                f"reported its first checkpoint (after {plan.first} epochs): give the search "
                "more time, or fewer epochs before its first report (burn_in, "
                "perturbation_interval)")
        raise RuntimeError(f"no member of the search finished an epoch (errors: "
                           f"{errors or 'none'})")
    best = min(finished, key=lambda t: t["best_metric"])
    _write_best(best, sessions, model_config, out, n_samples)
    exploits = _exploits(trials)
    generations = _generations(trials, plan) if settings.mode == "pbt" else []
    result = SearchResult(best_trial=best["trial"], best_metric=best["best_metric"],
                          best_values=best["values"],
                          trials=[{k: v for k, v in t.items() if k not in ("checkpoint", "rows")}
                                  for t in trials],
                          exploits=exploits, generations=generations,
                          stop_reason=_stop_reason(trials, settings, plan, seconds),
                          seconds=seconds, out_dir=str(out))
    _write_tables(out, trials, space)
    _write_figure(out / "search.png", trials, space, generations)
    summary = {"settings": _settings_dict(settings), "model": model_config.to_dict(),
               "train": train_config.to_dict(), **dataclasses.asdict(result)}
    _write_text(out / "search.json", json.dumps(_plain(summary), indent=1) + "\n")
    return result


@dataclass
class _SearchFit:
    """A search's result in the form nlb.cross_validate scores (train.FitResult's fields)."""

    best_checkpoint: str
    epochs: int
    best_epoch: int
    stop_reason: str
    divergences: int
    train_seconds: float
    extra: dict


def cv_fit(settings: SearchSettings | None = None, *, verbose: int = 0, reuse: bool = False):
    """A search as the way nlb.cross_validate fits each fold (its ``fit_fold`` argument).

    Each fold runs run_search on the fold's training and validation trials (ranked by the
    validation split; the fold's test trials are never seen) into the fold's run directory,
    with no posterior written; the fold is scored with the best member's best checkpoint.
    The fold's scores carry the search's seconds, members, exploits, generations and the best
    member's values. reuse=True scores the finished search already in a fold's directory
    (its search.json) instead of running one.
    """

    def fit(dataset, model_config: LFADSConfig, train_config: TrainConfig, run_dir: str):
        if not (reuse and (Path(run_dir) / "search.json").is_file()):
            run_search(dataset, model_config, train_config, run_dir, settings, n_samples=0,
                       verbose=verbose)
        return search_fit_result(run_dir)

    return fit


def search_fit_result(out_dir: str | os.PathLike) -> _SearchFit:
    """A finished search's outcome (its search.json and best checkpoint in out_dir) with the
    fields of train.FitResult that nlb.cross_validate scores."""
    res = json.loads((Path(out_dir) / "search.json").read_text())
    best = Path(out_dir) / "checkpoints" / "best.h5"
    ckpt = load_checkpoint(best)
    member = next(t for t in res["trials"] if t["trial"] == res["best_trial"])
    extra = {"search_members": len(res["trials"]), "search_exploits": len(res["exploits"]),
             "search_generations": len(res["generations"]),
             "member_epochs": sum(int(t["epochs"]) for t in res["trials"]),
             **{f"best_{k}": float(v) for k, v in res["best_values"].items()}}
    divergences = sum(int(row.get("divergences", 0) or 0) for row in ckpt.state.get("history", []))
    return _SearchFit(str(best), int(member["epochs"]), ckpt.epoch - 1, res["stop_reason"],
                      divergences, float(res["seconds"]), extra)


def _new_tuner(tune, trainable, settings: SearchSettings, space: dict, train_config: TrainConfig,
               plan: _Plan, storage: str, verbose: int):
    members = [{"index": k, "values": _initial_values(space, rng)}
               for rng in [random.Random(settings.seed)] for k in range(settings.population)]
    scheduler = stop = None
    if settings.mode == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        scheduler = PopulationBasedTraining(
            time_attr="pbt_time", perturbation_interval=settings.perturbation_interval,
            burn_in_period=plan.first, quantile_fraction=settings.quantile_fraction,
            custom_explore_fn=_Explorer(space, settings.seed, settings.resample_probability,
                                        train_config.lr_stop),
            log_config=True, require_attrs=True, synch=True)
        stop = _as_tune_stopper(tune, _stopping_rule(settings, plan))
    return tune.Tuner(
        trainable,
        param_space={"member": tune.grid_search(members)},
        tune_config=tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler,
                                    num_samples=1, time_budget_s=settings.time_budget,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name="search", storage_path=storage, stop=stop, verbose=verbose,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
            # A member whose worker died (a lost node, the memory monitor) restarts from its
            # last checkpoint.
            failure_config=tune.FailureConfig(max_failures=3)))


def _check_resume(out: Path, setup: dict, tune) -> int:
    """Checks that out holds an interrupted search started with this setup; returns how
    often it was resumed before.

    Raises:
        ValueError: no search in out, a finished one, one Ray cannot restore, or one started
            with other data, configurations or settings (each difference named).
    """
    path = out / SETUP_FILE
    if not path.is_file():
        raise ValueError(f"{out} holds no search to resume ({SETUP_FILE} is missing); start one "
                         "without --resume")
    if (out / "search.json").exists():
        raise ValueError(f"the search in {out} has finished (search.json); there is nothing to "
                         "resume")
    stored = json.loads(path.read_text())
    differences = _differences(stored, json.loads(json.dumps(_plain(setup))))
    if differences:
        raise ValueError(f"--resume: the search in {out} was started with other values; "
                         f"{'; '.join(differences)}. A resumed search keeps its data, "
                         "configuration and settings (only --address may change)")
    if not tune.Tuner.can_restore(setup["experiment"]):
        raise ValueError(f"the search in {out} stopped before Ray Tune saved its state in "
                         f"{setup['experiment']}; start it over with --overwrite")
    return int(stored.get("resumes", 0))


def _differences(stored: dict, given: dict) -> list[str]:
    """'key: stored -> given' for every value that differs, nested keys joined by dots;
    what a resumed search may change is left out."""
    ignore = {"experiment", "resumes"} | {f"settings.{k}" for k in _RESUMABLE_SETTINGS}
    flat_stored, flat_given = _flatten(stored), _flatten(given)
    out = []
    for key in sorted(set(flat_stored) | set(flat_given)):
        if key in ignore:
            continue
        old, new = flat_stored.get(key, "(none)"), flat_given.get(key, "(none)")
        if old != new:
            out.append(f"{key}: {old!r} then, {new!r} now")
    return out


def _flatten(d: dict | list, prefix: str = "") -> dict:
    flat = {}
    for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
        if isinstance(v, (dict, list)) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _data_summary(sessions: list) -> list[dict]:
    """Per session the data's shapes and a checksum of their values (the same data on
    resume)."""
    summary = []
    for ds in sessions:
        arrays = _arrays(ds)
        summary.append({"shapes": {name: list(a.shape) for name, a in arrays},
                        "sha256": _checksum("".join(
                            name + _checksum(repr(a.tolist()) if a.dtype.hasobject else a)
                            for name, a in arrays))})
    return summary


def _arrays(obj, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    """The arrays of a dataset (dataclasses, dicts of arrays) with their dotted names."""
    if isinstance(obj, np.ndarray):
        return [(prefix.rstrip("."), obj)]
    items = []
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: str(kv[0]))
    return [x for k, v in items for x in _arrays(v, f"{prefix}{k}.")]


def _resuming_epochs(grid, plan: _Plan) -> list[int]:
    """The epoch of the latest checkpoint (0: none yet) of each member that will train again:
    not those at max_epochs, nor those whose trainer stopped for good (diverged, non-finite),
    whose reports end where they stopped and would pull the population's boundary back."""
    epochs = []
    for r in grid:
        meta = {"epoch": 0}
        if r.checkpoint is not None:
            with r.checkpoint.as_directory() as d:
                meta = json.loads((Path(d) / _MEMBER_FILE).read_text())
        if int(meta["epoch"]) < plan.max_epochs and meta.get("stop_reason") in (None, "max_epochs"):
            epochs.append(int(meta["epoch"]))
    return epochs


def _fit_noting_interrupt(tuner):
    """tuner.fit(), and whether a Ctrl-C ended it. Ray Tune ends a run on SIGINT gracefully:
    its members may all stop cleanly before the loop ends, so their states alone do not say
    that the search was cut short. Its handler, installed in the main thread for the run,
    puts back the handler it replaced when it catches the signal and otherwise stays; the
    replaced handler is put back here in both cases, so that a later Ctrl-C in the caller's
    program is not swallowed by a finished run's handler."""
    main = threading.current_thread() is threading.main_thread()
    catches = main and not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0"))
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        grid = tuner.fit()
        interrupted = catches and signal.getsignal(signal.SIGINT) is before
    finally:
        if main:
            signal.signal(signal.SIGINT, before)
    return grid, interrupted


def _stopping_rule(settings: SearchSettings, plan: _Plan) -> "ImprovementRatioStopper":
    return ImprovementRatioStopper(settings.population, plan.first, settings.perturbation_interval,
                                   settings.patience, settings.min_improvement_ratio,
                                   settings.max_generations)


def _stop_reason(trials: list, settings: SearchSettings, plan: _Plan, seconds: float) -> str:
    """Why the search ended. For PBT the stopping rule is replayed on the members' reports:
    the stopper Ray Tune ran is its own copy (restored with the experiment on resume)."""
    if settings.mode == "pbt":
        rule = _stopping_rule(settings, plan)
        rows = sorted(((row, t["trial"]) for t in trials for row in t["rows"]),
                      key=lambda rt: rt[0]["epoch"])
        for row, trial in rows:
            rule(trial, row)
        if rule.stopped_by:
            return rule.stopped_by
        if settings.time_budget is not None and any(t["epochs"] < plan.max_epochs
                                                    for t in trials):
            return "time_budget"
    elif settings.time_budget is not None and (
            seconds >= settings.time_budget
            or any(t["stop_reason"] == "time_budget" for t in trials)):
        # A member's trainer stops at its share of the budget; the search's own seconds count
        # only since its last start (resume).
        return "time_budget"
    return "finished"


class ImprovementRatioStopper:
    """Stops the search when the population's best metric improved by at most
    min_improvement_ratio, relative to the mean magnitude of the recorded bests, over the
    last patience generations (AutoLFADS's stopping rule); also after max_generations.

    It has ray.tune.Stopper's interface (__call__(trial_id, result): stop this trial;
    stop_all(): stop everything) and is handed to Tune wrapped in a Stopper subclass (Ray is
    imported only when a search runs); results are one per member and epoch, carrying
    "epoch" (epochs completed) and METRIC.
    """

    def __init__(self, population: int, first: int, interval: int, patience: int = 4,
                 min_improvement_ratio: float = 5e-4, max_generations: int | None = None):
        self.population, self.first, self.interval = population, first, interval
        self.patience, self.min_improvement_ratio = patience, min_improvement_ratio
        self.max_generations = max_generations
        self.best_per_generation: list[float] = []
        self.stopped_by = ""
        self._scores: dict[int, dict[str, float]] = {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        epoch = int(result["epoch"])
        if epoch < self.first or (epoch - self.first) % self.interval:
            return False
        generation = (epoch - self.first) // self.interval + 1
        scores = self._scores.setdefault(generation, {})
        scores[trial_id] = float(result[METRIC])
        if len(scores) == self.population and generation == len(self.best_per_generation) + 1:
            finite = [s for s in scores.values() if math.isfinite(s)]
            self.best_per_generation.append(min(finite) if finite else float("nan"))
            del self._scores[generation]
            if not self.stopped_by and self._plateau():
                self.stopped_by = "improvement_ratio"
        if self.max_generations is not None and generation >= self.max_generations:
            self.stopped_by = self.stopped_by or "max_generations"
            return True
        return False

    def stop_all(self) -> bool:
        return self.stopped_by == "improvement_ratio"

    def _plateau(self) -> bool:
        recent = self.best_per_generation[-self.patience:]
        if len(self.best_per_generation) < self.patience or not all(map(math.isfinite, recent)):
            return False
        ratio = (recent[0] - min(recent)) / float(np.mean(np.abs(recent)))
        return ratio <= self.min_improvement_ratio


def _as_tune_stopper(tune, rule: ImprovementRatioStopper):
    """rule as a ray.tune.Stopper (Tune accepts only its subclasses)."""

    class _Stopper(tune.Stopper):
        def __call__(self, trial_id, result):
            return rule(trial_id, result)

        def stop_all(self):
            return rule.stop_all()

    return _Stopper()


# ---------------------------------------------------------------------- the members


@dataclass(frozen=True)
class _Plan:
    """When a member reports a checkpoint (the generation boundaries) and stops.

    session counts the runs of the search (0, then one more per resume); time_offset is
    subtracted from the epoch in the time PBT's scheduler sees (pbt_time), so that a scheduler
    restored without its state (Ray Tune's on resume) takes the population's next generation
    boundary for its first one.
    """

    mode: str
    first: int
    interval: int
    max_epochs: int
    threads: int
    gpus: float
    member_budget: float | None
    session: int = 0
    time_offset: int = 0
    scratch: str = ""

    @classmethod
    def of(cls, settings: SearchSettings, train_config: TrainConfig) -> "_Plan":
        interval = settings.perturbation_interval
        burn_in = train_config.burn_in if settings.burn_in is None else settings.burn_in
        first = max(interval, burn_in) if settings.mode == "pbt" else interval
        max_epochs = train_config.max_epochs
        if settings.mode == "pbt" and settings.max_generations is not None:
            max_epochs = min(max_epochs, first + (settings.max_generations - 1) * interval)
        budget = None
        if settings.mode == "random" and settings.time_budget is not None:
            # Members run a few at a time: each gets its share of the budget.
            budget = settings.time_budget / settings.population
        return cls(settings.mode, first, interval, max_epochs, settings.cpus_per_trial,
                   settings.gpus_per_trial, budget)

    def next_stop(self, epoch: int) -> int:
        """The first boundary after epoch (epochs completed), capped at max_epochs."""
        stop = self.first if epoch < self.first else \
            self.first + ((epoch - self.first) // self.interval + 1) * self.interval
        return min(stop, self.max_epochs)

    def generation(self, epoch: int) -> int:
        """Generations completed after epoch epochs (0 in the burn-in)."""
        return 0 if epoch < self.first else (epoch - self.first) // self.interval + 1


def _member(config: dict, *, sessions, model_config, train_config, plan: _Plan) -> None:
    """One member of the population, run by Ray Tune: trains a generation at a time (one
    Trainer.fit call up to the generation's last epoch), then sends one tune.report per epoch
    of it, the last with a tune.Checkpoint of its run; restarted from a checkpoint (its own,
    or after an exploit another member's with new values) it goes on from there."""
    from ray import tune

    ops.set_num_threads(plan.threads)
    ctx = tune.get_context()
    trial = ctx.get_trial_id()
    values = dict(config["member"]["values"])
    # The run lives outside the trial's directory: Ray uploads that directory to the
    # experiment's storage while the member trains, and would copy checkpoint files
    # half-written or renamed under it. The checkpoints Ray keeps are the tune.Checkpoint
    # copies (_report); this directory is scratch, one per trial, removed when it stops.
    run = Path(plan.scratch) / trial / "lfads"
    if run.exists():
        shutil.rmtree(run)
    try:
        _train_member(run, config, trial, values, sessions=sessions, model_config=model_config,
                      train_config=train_config, plan=plan)
    finally:
        shutil.rmtree(run.parent, ignore_errors=True)


def _scratch_root(storage: str) -> Path:
    """Where this search's members keep their runs on a node: the node's temporary
    directory (TMPDIR), per user and per experiment (storage)."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    digest = hashlib.sha256(storage.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"lfads_fast-{user}" / f"search-{digest}"


def _train_member(run: Path, config: dict, trial: str, values: dict, *, sessions, model_config,
                  train_config, plan: _Plan) -> None:
    from ray import tune

    sessions = [_own_arrays(ds) for ds in sessions]
    data = sessions if model_config.multisession else sessions[0]
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        model_cfg, train_cfg = _with_values(model_config, train_config, values)
        model = LFADS(model_cfg, seed=train_cfg.seed + int(config["member"]["index"]))
        if model_cfg.multisession:
            stitching.init_session_layers(model, sessions)
        trainer = Trainer(model, data, train_cfg, run, progress=False, **_device(plan))
        lineage = [{"trial": trial, "epoch": 0, "source": None, "values": values}]
        resume, epoch = False, 0
    else:
        with checkpoint.as_directory() as d:
            _copy_run_files(Path(d), run)
            meta = json.loads((Path(d) / _MEMBER_FILE).read_text())
        saved = load_checkpoint(run / "checkpoints" / "last.h5")
        trainer = Trainer(LFADS(saved.model_config, seed=0, dtype=saved.flat.dtype), data,
                          saved.train_config, run, progress=False, **_device(plan))
        lineage = meta["lineage"]
        changes = {k: v for k, v in values.items() if v != meta["values"][k]}
        if changes or meta["trial"] != trial:
            # An exploit: this member copies another's state and goes on with new values
            # and its own noise.
            trainer.perturb(changes, reseed=_trial_number(trial) * 1_000_003 + saved.epoch)
            changed = {k: [meta["values"][k], v] for k, v in changes.items()}
            lineage = lineage + [{"trial": trial, "epoch": saved.epoch, "source": meta["trial"],
                                  "values": values, "changes": changed}]
        resume, epoch = True, saved.epoch
        if plan.mode == "pbt" and meta.get("session", 0) != plan.session \
                and saved.epoch - plan.time_offset >= plan.first:
            # The search was resumed and this member is at the population's next generation
            # boundary already: the restored scheduler has not seen it there.
            _report(run, {**meta, "trial": trial, "values": values, "lineage": lineage,
                          "session": plan.session},
                    _metrics(meta["row"], values, plan, lineage))
    spent = 0.0
    while True:
        target = plan.next_stop(epoch)
        budget = None if plan.member_budget is None else plan.member_budget - spent
        if target <= epoch or (budget is not None and budget <= 0):
            break
        trainer.config = dataclasses.replace(trainer.config, max_epochs=target, time_budget=budget)
        result = trainer.fit(resume=resume)
        resume, epoch = True, result.epochs
        spent += result.train_seconds
        if result.epochs_this_call == 0:
            break
        rows = result.history[len(result.history) - result.epochs_this_call:]
        for row in rows[:-1]:
            tune.report(_metrics(row, values, plan, lineage))
        _report(run, {"trial": trial, "values": values, "epoch": result.epochs,
                      "best_metric": result.best_valid_recon_smth, "best_epoch": result.best_epoch,
                      "stop_reason": result.stop_reason,
                      "lineage": lineage, "session": plan.session, "row": rows[-1]},
                _metrics(rows[-1], values, plan, lineage))
        if result.stop_reason != "max_epochs":
            break


def _report(run: Path, meta: dict, metrics: dict) -> None:
    """One tune.report with a checkpoint: the run's files and meta (member.json)."""
    from ray import tune

    with tempfile.TemporaryDirectory() as d:
        _copy_run_files(run, Path(d))
        (Path(d) / _MEMBER_FILE).write_text(json.dumps(_plain(meta)))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _copy_run_files(src: Path, dst: Path) -> None:
    """The files of a member's run (checkpoints, logs) that exist in src, copied into dst."""
    for name in _RUN_FILES:
        if (src / name).exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)


def _metrics(row: dict, values: dict, plan: _Plan, lineage: list) -> dict:
    epochs = int(row["epoch"]) + 1
    m = {"epoch": epochs, "pbt_time": epochs - plan.time_offset,
         "generation": plan.generation(epochs),
         "source": lineage[-1]["source"] or "", "exploits": len(lineage) - 1}
    for k, v in row.items():
        if k.startswith(("valid_", "train_")) or k in ("lr", "epoch_s"):
            m[k] = float(v)
    m.update({f"hp_{k}": float(v) for k, v in values.items()})
    return m


class _Explorer:
    """PopulationBasedTraining's custom_explore_fn: explore() on the member's values, with a
    random stream of its own (the scheduler runs in the driver)."""

    def __init__(self, space: dict, seed: int, resample_probability: float, lr_floor: float):
        self.space, self.resample_probability, self.lr_floor = space, resample_probability, lr_floor
        self.rng = random.Random(seed + 1)

    def __call__(self, config: dict) -> dict:
        member = dict(config["member"])
        member["values"] = explore(member["values"], self.space, self.rng,
                                   resample_probability=self.resample_probability,
                                   lr_floor=self.lr_floor)
        return {**config, "member": member}


# ---------------------------------------------------------------------- checks


def _check_space(space: dict, model_config: LFADSConfig) -> dict:
    """The space to search for this model: AutoLFADS's default space leaves out the
    controller's terms for a model without controller; a space of one's own that names them
    is an error there."""
    if model_config.use_con:
        return space
    useless = [name for name in space if name in _CONTROLLER_FIELDS]
    if useless and set(space) != set(DEFAULT_SPACE):
        raise ValueError(f"search space: {', '.join(useless)} act on the controller, but the "
                         "model has none (co_dim = 0)")
    return {k: v for k, v in space.items() if k not in _CONTROLLER_FIELDS}


def _member_train_config(train_config: TrainConfig, settings: SearchSettings) -> TrainConfig:
    changes = {}
    if settings.mode == "pbt":
        changes = dict(lr_scheduler=False, early_stopping=False, time_budget=None,
                       time_budget_lr_factor=1.0)
    hp = settings.space.get("lr_init")
    if hp is not None:
        low = hp.low if hp.enforce_bounds else hp.low * 1e-3
        changes["lr_stop"] = min(train_config.lr_stop, low)
    return dataclasses.replace(train_config, **changes)


def _check_population(ray, settings: SearchSettings, model_config: LFADSConfig,
                      train_config: TrainConfig, sessions: list) -> None:
    """The members that run at once (the cluster's CPUs over cpus_per_trial, at most the
    population) each hold a working copy of the data and the model's step memory: together
    they must fit in the memory Ray has for tasks."""
    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    if cpus < settings.cpus_per_trial:
        raise ValueError(f"cpus_per_trial = {settings.cpus_per_trial} but the Ray cluster has "
                         f"{cpus} CPUs")
    if settings.gpus_per_trial > resources.get("GPU", 0):
        raise ValueError(f"gpus_per_trial = {settings.gpus_per_trial} but the Ray cluster has "
                         f"{resources.get('GPU', 0)} GPUs")
    at_once = min(settings.population, cpus // settings.cpus_per_trial)
    need = member_bytes(model_config, train_config, sessions)
    have = _task_memory(ray)
    if have and at_once * need > have:
        raise ValueError(
            f"population {settings.population}: {at_once} members run at once ({cpus} CPUs / "
            f"cpus_per_trial {settings.cpus_per_trial}), each needs about {need / 2**30:.2f} GiB "
            f"for these data and this model, {at_once * need / 2**30:.1f} GiB together, but Ray "
            f"has {have / 2**30:.1f} GiB for tasks; raise cpus_per_trial (fewer members at "
            "once), lower batch_size, or add nodes")


def member_bytes(model_config: LFADSConfig, train_config: TrainConfig, sessions: list) -> int:
    """A generous estimate of one member's memory: its copies of the data (float32 counts,
    time-major training copies, sample-validation masks), the model's parameters and Adam
    moments, and the activations of a training batch and a validation chunk."""
    from .train import VALID_CHUNK

    data = 0
    for ds in sessions:
        for split in ds.splits.values():
            data += 3 * split.encod_data.nbytes + 2 * split.recon_data.nbytes
    c = model_config
    per_bin = (6 * (c.ic_enc_dim + c.ci_enc_dim) + 8 * (c.gen_dim + c.con_dim) + 2 * c.fac_dim
               + 6 * (c.recon_data_dim + c.encod_data_dim) + 4 * c.co_dim)
    T = c.recon_seq_len
    rows = train_config.batch_size * c.n_sessions + min(VALID_CHUNK, max(
        ds.valid.n_trials for ds in sessions))
    activations = 4 * 4 * per_bin * T * rows
    params = 4 * LFADS(c, seed=0).num_params * 8
    return int(data + activations + params + 256 * 2**20)  # + the interpreter and libraries


def _task_memory(ray) -> float:
    return float(ray.cluster_resources().get("memory", 0.0))


# ---------------------------------------------------------------------- results


def _collect(grid, space: dict) -> list[dict]:
    trials = []
    for r in grid:
        rows = _member_rows(r)
        trial = (r.metrics or {}).get("trial_id") or (rows[-1].get("trial_id") if rows else None) \
            or os.path.basename(str(r.path))
        meta = None
        if r.checkpoint is not None:
            with r.checkpoint.as_directory() as d:
                meta = json.loads((Path(d) / _MEMBER_FILE).read_text())
        values = meta["values"] if meta else dict(((r.config or {}).get("member") or {})
                                                  .get("values") or {})
        last = rows[-1] if rows else {}
        trials.append({
            "trial": trial, "status": "error" if r.error else "done",
            "error": "" if r.error is None else str(r.error).splitlines()[0][:300],
            "epochs": int(last.get("epoch", 0)),
            "metric": float(last.get(METRIC, float("nan"))),
            "best_metric": float(meta["best_metric"]) if meta and meta["best_metric"] is not None
            else float("nan"),
            "valid_r2": float(last.get("valid_r2", float("nan"))),
            "valid_bps": float(last.get("valid_bps", float("nan"))),
            "exploits": len(meta["lineage"]) - 1 if meta else 0,
            "values": {k: float(values[k]) for k in space if k in values},
            "lineage": meta["lineage"] if meta else [],
            "stop_reason": (meta or {}).get("stop_reason") or "",
            "checkpoint": r.checkpoint, "rows": rows})
    trials.sort(key=lambda t: (not math.isfinite(t["best_metric"]), t["best_metric"]))
    return trials


def _member_rows(result) -> list[dict]:
    """A member's reports, oldest first. Ray builds Result.metrics_dataframe from the trial's
    result.json, which loses rows when a restored search restarts its members (the JSON logger
    copies the file back from storage at each restart); the trial's progress.csv keeps every
    row, so the longer of the two is used."""
    df = result.metrics_dataframe
    rows = [] if df is None else df.to_dict("records")
    fs = getattr(result, "filesystem", None)
    if fs is None:
        return rows
    import pandas as pd

    try:
        with fs.open_input_stream(f"{result.path.rstrip('/')}/progress.csv") as f:
            text = f.readall().decode("utf-8")
        csv = pd.read_csv(io.StringIO(text), dtype={"trial_id": str, "source": str},
                          keep_default_na=False, na_values=["nan", "NaN"]).to_dict("records")
    except (OSError, ValueError, pd.errors.ParserError):
        return rows
    return csv if len(csv) > len(rows) else rows


def _exploits(trials: list) -> list[dict]:
    seen = {}
    for t in trials:
        for seg in t["lineage"]:
            if seg.get("source"):
                seen[(seg["trial"], seg["epoch"])] = {"epoch": seg["epoch"], "trial": seg["trial"],
                                                      "source": seg["source"],
                                                      "changes": seg.get("changes", {})}
        # A member's own reports show exploits that later ones overwrote in its lineage.
        previous = None
        for row in t["rows"]:
            src, n = row.get("source", ""), row.get("exploits", 0)
            if src and (previous is None or n != previous):
                epoch = int(row["epoch"]) - 1
                seen.setdefault((t["trial"], epoch), {"epoch": epoch, "trial": t["trial"],
                                                      "source": src, "changes": {}})
            previous = n
    return sorted(seen.values(), key=lambda e: (e["epoch"], e["trial"]))


def _generations(trials: list, plan: _Plan) -> list[dict]:
    by_epoch: dict[int, list[float]] = {}
    for t in trials:
        for row in t["rows"]:
            epoch = int(row["epoch"])
            if epoch >= plan.first and (epoch - plan.first) % plan.interval == 0:
                by_epoch.setdefault(epoch, {})[t["trial"]] = float(row[METRIC])
    out = []
    for g, epoch in enumerate(sorted(by_epoch), start=1):
        scores = np.array([s for s in by_epoch[epoch].values() if math.isfinite(s)])
        if scores.size:
            out.append({"generation": g, "epoch": epoch, "members": int(scores.size),
                        "best": float(scores.min()), "median": float(np.median(scores)),
                        "worst": float(scores.max())})
    return out


def _write_best(best: dict, sessions: list, model_config: LFADSConfig, out: Path,
                n_samples: int) -> None:
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    with best["checkpoint"].as_directory() as d:
        for name in _RUN_FILES:
            if (Path(d) / name).exists():
                tmp = out / (name + ".tmp")
                shutil.copyfile(Path(d) / name, tmp)
                os.replace(tmp, out / name)
    ckpt = load_checkpoint(out / "checkpoints" / "best.h5")
    _write_text(out / "config.yaml", yaml.safe_dump(
        {"model": ckpt.model_config.to_dict(), "train": ckpt.train_config.to_dict()},
        sort_keys=False))
    if n_samples > 0:
        model = load_model(out / "checkpoints" / "best.h5")
        if model_config.multisession:
            stitching.write_session_posteriors(model, sessions, out, n_samples=n_samples)
        else:
            posterior.write_posterior(out / "posterior.h5", model, sessions[0],
                                      n_samples=n_samples)


def _write_tables(out: Path, trials: list, space: dict) -> None:
    names = list(space)
    head = ["rank", "trial", "status", "epochs", "best_" + METRIC, METRIC, "valid_r2", "valid_bps",
            "exploits"] + names
    lines, md = [",".join(head)], ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, t in enumerate(trials, start=1):
        cells = [str(rank), t["trial"], t["status"], str(t["epochs"]), _num(t["best_metric"]),
                 _num(t["metric"]), _num(t["valid_r2"]), _num(t["valid_bps"]), str(t["exploits"])]
        cells += [_num(t["values"].get(k, float("nan"))) for k in names]
        lines.append(",".join(cells))
        md.append("| " + " | ".join(cells) + " |")
    _write_text(out / "search_trials.csv", "\n".join(lines) + "\n")
    _write_text(out / "search_trials.md", "\n".join(md) + "\n")


def _write_figure(path: Path, trials: list, space: dict, generations: list) -> None:
    from . import plots  # matplotlib only when a figure is drawn

    series = []
    for t in trials:
        rows = sorted(t["rows"], key=lambda r: r["epoch"])
        series.append({"name": t["trial"],
                       "epoch": np.array([r["epoch"] for r in rows], dtype=np.float64),
                       "values": {k: np.array([r.get(f"hp_{k}", np.nan) for r in rows],
                                              dtype=np.float64) for k in space},
                       "metric": np.array([r.get(METRIC, np.nan) for r in rows], dtype=np.float64)})
    plots.plot_search(path, series, {k: hp.sample == "loguniform" for k, hp in space.items()},
                      generations, METRIC)


# ---------------------------------------------------------------------- helpers


def _own_arrays(obj, memo: dict | None = None):
    """obj (dataclasses, dicts, lists of arrays) with its arrays copied under NumPy's
    canonical dtypes, an array that appears twice copied once. Arrays that come out of Ray's
    object store are read-only and carry dtype objects equal to but not the same as NumPy's
    own, which the compiled kernels' argument checks (dtype identity) refuse."""
    memo = {} if memo is None else memo
    if isinstance(obj, np.ndarray):
        if id(obj) not in memo:
            own = np.empty(obj.shape, dtype=np.dtype(obj.dtype.str) if obj.dtype.fields is None
                           else obj.dtype)
            own[...] = obj
            memo[id(obj)] = own
        return memo[id(obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _own_arrays(getattr(obj, f.name), memo)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: _own_arrays(v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_own_arrays(v, memo) for v in obj)
    return obj


def _initial_values(space: dict, rng: random.Random) -> dict:
    return {name: float(hp.init) if hp.init is not None else float(hp.draw(rng))
            for name, hp in space.items()}


def _with_values(model_config: LFADSConfig, train_config: TrainConfig, values: dict):
    model = {k: v for k, v in values.items() if PERTURBABLE_FIELDS[k] == "model"}
    train = {k: v for k, v in values.items() if PERTURBABLE_FIELDS[k] == "train"}
    return dataclasses.replace(model_config, **model), dataclasses.replace(train_config, **train)


def _bounds(name: str, hp: HyperParam, lr_floor: float) -> tuple[float, float]:
    low, high = (hp.low, hp.high) if hp.enforce_bounds else (0.0, math.inf)
    if name.endswith("_rate"):
        high = min(high, _RATE_MAX)
    if name == "lr_init":
        low = max(low, lr_floor)
    return low, high


def _device(plan: _Plan) -> dict:
    """Trainer arguments that put a member on the GPU Ray gave it (Ray sets the member's
    CUDA_VISIBLE_DEVICES, so its GPU is device 0)."""
    return {"device": "cuda"} if plan.gpus > 0 else {}


def _trial_number(trial_id: str) -> int:
    """The number Tune gives a trial in its experiment (the id's suffix), else a hash."""
    m = re.search(r"_(\d+)$", trial_id)
    return int(m.group(1)) if m else zlib.crc32(trial_id.encode())


def _settings_dict(settings: SearchSettings) -> dict:
    d = dataclasses.asdict(settings)
    d["space"] = {k: dataclasses.asdict(v) for k, v in settings.space.items()}
    return d


def _floats(d: dict) -> dict:
    """YAML reads 1e-3 as a string: numbers of a range entry as floats."""
    out = {}
    for k, v in d.items():
        out[k] = _to_float(v, k) if isinstance(v, str) and k in ("low", "high", "init",
                                                                  "explore_weight") else v
    return out


def _to_float(v: str, what: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {v!r}") from None


def _num(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.6g}"


def _plain(v):
    """v with NumPy scalars as Python numbers and non-finite floats as None (strict JSON)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp_{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_int(name: str, v, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")


def _check_number(name: str, v, low: float, high: float | None) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < low or (high is not None and v > high):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a number {rng}, got {v!r}")

