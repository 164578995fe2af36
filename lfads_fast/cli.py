"""The lfads-fast command line.

    lfads-fast train DATA.h5 [DATA.h5 ...] --out DIR [--config cfg.yaml] [--set key=value ...]
                     [--resume] [--time-budget S] [--samples 50]
    lfads-fast infer CHECKPOINT DATA.h5 [DATA.h5 ...] --out OUT [--samples 50]
    lfads-fast demo [--minutes 5] [--out demo_out] [--burn-in BINS] [--set key=value ...]
    lfads-fast fixed-points CHECKPOINT DATA.h5 --out DIR [--n-init 1000] [--noise 0.01]
                     [--method newton|adam] [--inputs zero|mean] [--split valid] [--session S]
    lfads-fast nlb-eval POSTERIOR.h5 DATA.h5 [--out DIR] [--conditions KEY]
    lfads-fast nlb-eval --kfold K DATA.h5 --out DIR [--config cfg.yaml] [--set key=value ...]
    lfads-fast nlb-submission POSTERIOR.h5 DATA.h5 --dataset NAME [--bin-size 5] --out SUB.h5
    lfads-fast import-lfads-torch MODEL.yaml [--datamodule DM.yaml] [--trainer T.yaml]
                     [--checkpoint CKPT] --out DIR
    lfads-fast tune DATA.h5 [DATA.h5 ...] --out DIR [--config cfg.yaml] [--population 20]
                     [--mode pbt|random] [--address auto] [--cpus-per-trial N]
                     [--gpus-per-trial F] [--time-budget S] [--generations G]
                     [--resume | --overwrite]

A config file is YAML with up to two sections, ``model`` (LFADSConfig fields) and ``train``
(TrainConfig fields); DIR/config.yaml, written by every training run, is one. A third,
``tune``, holds the settings and search space of ``lfads-fast tune`` (lfads_fast.tune,
docs/tune.md); the other commands ignore it. ``--set``
overrides one field: ``--set model.gen_dim=64``, ``--set train.lr_init=1e-3``, or without
the section when the name is unambiguous (``--set gen_dim=64``). Data sizes come from the
data file.

Several data files (or a quoted glob pattern, its matches in sorted order) are several
sessions of one stitched model (docs/stitching.md): the config is built with
stitching.config_for_sessions, ``encod_data_dim`` is the shared read-in dimension
(default: stitching.default_shared_dim, i.e. the files' alignment matrices' dimension, else
fac_dim capped at the sessions' neurons together), read-ins and read-outs are initialised by
stitching.init_session_layers (PCR, or the files' alignment matrices), and the posteriors go
to DIR/lfads_output_<data file name>, one per session. ``infer`` with a multi-session
checkpoint takes one file per session, in the training order, and writes into the directory
--out.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import traceback
from pathlib import Path

import yaml

from . import readout, rundir
from .config import LFADSConfig, read_yaml
from .errors import MissingOptionalPart
from .posterior import REFINE_LR, REFINE_STEPS
from .presets import PRESETS, get_preset
from .train import NonFiniteLossError, TrainConfig

__all__ = ["main", "load_config"]

_SECTIONS = {"model": LFADSConfig, "train": TrainConfig}


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0: success).

    The one error boundary of the command line: an expected failure (a bad file, option or
    value, a damaged checkpoint, a locked or unwritable output, not enough memory, a run
    stopped by non-finite losses) prints one line naming the thing and returns 2; anything
    else prints its traceback, says that it is a bug, and returns 3.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            from . import ops

            ops.set_num_threads(args.threads)
        return args.func(args)
    except NonFiniteLossError as e:
        print(f"lfads-fast {args.command}: error: {e}", file=sys.stderr)
        result = getattr(e, "result", None)
        if result is not None:
            print(f"Epochs completed: {result.epochs}. Checkpoints kept: best (epoch "
                  f"{result.best_epoch}) {result.best_checkpoint}, last {result.last_checkpoint} "
                  "(written at the end of an epoch; --resume goes on from it).", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        detail = f": {e}" if str(e) else ""  # a search says how to resume it
        print(f"lfads-fast {args.command}: interrupted{detail}", file=sys.stderr)
        return 130
    except (ValueError, OSError, rundir.RunLockedError, MemoryError, MissingOptionalPart) as e:
        # MissingOptionalPart: an extra package or the real-time library is missing, and the
        # message says how to get it; any other ImportError is a bug.
        print(f"lfads-fast {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print(f"lfads-fast {args.command}: internal error: this is a bug in lfads-fast; please "
              "report it with the traceback above", file=sys.stderr)
        return 3


def load_config(path: str | os.PathLike | None, overrides: list[str] = (),
                preset: str | None = None) -> tuple[dict, dict]:
    """Reads a YAML config and applies key=value overrides.

    Args:
        path: YAML file with optional sections ``model`` and ``train``, or None.
        overrides: strings ``[section.]field=value``; values are read as YAML scalars.
        preset: a name of lfads_fast.presets.PRESETS whose fields come first (the file and
            the overrides win over them), or None.

    Returns:
        (model fields, train fields), each a dict with values converted to the fields' types.

    Raises:
        FileNotFoundError: path does not exist.
        ValueError: unknown section or field, or a value of the wrong type.
    """
    sections = {"model": {}, "train": {}}
    if preset is not None:
        chosen = get_preset(preset)
        for name, values in (("model", chosen.model), ("train", chosen.train)):
            for key, value in values.items():
                sections[name][key] = _coerce(name, key, value, where=f"preset {preset}")
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} does not exist")
        raw = read_yaml(path)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping with sections 'model' and 'train'")
        for name, values in raw.items():
            if name == "tune":  # read by lfads_fast.tune.load_search_settings
                continue
            if name not in _SECTIONS:
                raise ValueError(f"{path}: unknown section {name!r}; expected 'model' and/or "
                                 "'train'")
            if not isinstance(values, dict):
                raise ValueError(f"{path}: section {name!r} must be a mapping of fields")
            for key, value in values.items():
                sections[name][key] = _coerce(name, key, value, where=path)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        section, field = _resolve(key.strip())
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item}: the value is not valid YAML ({' '.join(str(e).split())})") from None
        sections[section][field] = _coerce(section, field, value, where="--set")
    return sections["model"], sections["train"]


# ---------------------------------------------------------------------- commands


def _train(args) -> int:
    _check_device(args.device)
    out = rundir.check_writable_dir(args.out)
    with rundir.run_lock(out, what="training"):
        return _train_locked(args, out)


def _train_locked(args, out: Path) -> int:
    from . import posterior, stitching
    from .model import LFADS
    from .train import Trainer, check_training_memory, load_model

    config_path = args.config
    if config_path is None and args.resume and (out / "config.yaml").exists():
        config_path = out / "config.yaml"
    model_fields, train_fields = load_config(config_path, args.set, args.preset)
    if args.time_budget is not None:
        train_fields["time_budget"] = args.time_budget
    files = _data_files(args.data)
    dataset, model_cfg = _data_and_model_config(files, model_fields)
    train_cfg = TrainConfig.from_dict(train_fields)
    last = out / "checkpoints" / "last.h5"
    if last.exists() and not (args.resume or args.overwrite):
        raise FileExistsError(f"{out} already holds a training run; pass --resume to continue it, "
                              "--overwrite to start over, or choose another --out")
    check_training_memory(model_cfg, train_cfg.batch_size)
    model = LFADS(model_cfg, seed=train_cfg.seed)
    if model_cfg.multisession and not (args.resume and last.exists()):
        layers = stitching.init_session_layers(model, dataset)
        print(f"{len(files)} sessions, shared read-in dimension {model_cfg.encod_data_dim}; "
              f"read-ins from {_READIN_SOURCES[layers.method]}")
    trainer = Trainer(model, dataset, train_cfg, out, progress=not args.quiet, device=args.device)
    result = trainer.fit(resume=args.resume)
    print(f"trained {result.epochs} epochs ({result.epochs_this_call} now, "
          f"{result.train_seconds:.1f} s; stopped by {result.stop_reason}); best epoch "
          f"{result.best_epoch}, valid_recon_smth {result.best_valid_recon_smth:.5f}")
    print(f"checkpoints: {result.best_checkpoint}, {result.last_checkpoint}")
    if model_cfg.multisession:
        print(f"session factors: {out / 'session_factors.png'}")
    if args.samples > 0:
        best = load_model(result.best_checkpoint).to(args.device)
        if model_cfg.multisession:
            paths = stitching.write_session_posteriors(best, dataset, out, n_samples=args.samples,
                                                       seed=train_cfg.seed)
            print(f"posteriors ({args.samples} samples, best checkpoint): {', '.join(paths)}")
        else:
            path = out / "posterior.h5"
            posterior.write_posterior(path, best, dataset, n_samples=args.samples,
                                      seed=train_cfg.seed)
            print(f"posterior ({args.samples} samples, best checkpoint): {path}")
    return 0


def _infer(args) -> int:
    from .train import load_model

    _check_device(args.device)
    model = load_model(_existing(args.checkpoint, "checkpoint")).to(args.device)
    files = _data_files(args.data)
    splits = None if args.splits is None else tuple(s.strip() for s in args.splits.split(","))
    cfg = model.config
    # Checked before any work: a directory of per-session files, or one file.
    if cfg.multisession:
        rundir.check_writable_dir(args.out)
    else:
        rundir.check_writable_file(args.out)
    with rundir.run_lock(args.out, is_dir=cfg.multisession, what="inference"):
        return _infer_locked(args, model, files, splits)


def _infer_locked(args, model, files, splits) -> int:
    from . import data, posterior, stitching
    from .train import check_sizes

    cfg = model.config
    if len(files) != cfg.n_sessions:
        raise ValueError(f"the checkpoint's model has {cfg.n_sessions} session"
                         f"{'s' if cfg.n_sessions > 1 else ''} but {len(files)} data "
                         f"{'files were' if len(files) > 1 else 'file was'} given"
                         + (" (one per session, in the order of training)" if cfg.multisession else ""))
    refine = {"refine_steps": args.refine_ic, "refine_lr": args.refine_lr}
    what = f"{args.samples} samples"
    if args.refine_ic:
        what += f", initial conditions refined by {args.refine_ic} steps"
    if cfg.multisession:
        sessions = data.load_sessions(files)  # session_posteriors checks them per model
        _check_infer_memory(model, sessions, len(args.ensemble) + 1)
        kwargs = dict(n_samples=args.samples, seed=args.seed, splits=splits, **refine)
        if args.ensemble:
            models = [model] + [_ensemble_member(path, cfg, args.device) for path in args.ensemble]
            outputs = stitching.ensemble_session_posteriors(models, sessions, **kwargs)
            paths = stitching.write_session_outputs(sessions, args.out, outputs)
            print(f"ensemble of {len(models)} models, rates averaged ({what}): {', '.join(paths)}")
            return 0
        paths = stitching.write_session_posteriors(model, sessions, args.out, **kwargs)
        print(f"posteriors ({what}): {', '.join(paths)}")
        return 0
    dataset = data.load_dataset(files[0])
    check_sizes(cfg, dataset, owner="the checkpoint's model", hint="")
    _check_infer_memory(model, [dataset], len(args.ensemble) + 1)
    if args.ensemble:
        return _infer_ensemble(args, model, dataset, splits, refine, what)
    posterior.write_posterior(args.out, model, dataset, n_samples=args.samples, seed=args.seed,
                              splits=splits, **refine)
    print(f"posterior ({what}): {args.out}")
    return 0


def _ensemble_member(path: str, cfg, device: str = "cpu"):
    """Loads an --ensemble checkpoint and checks that its model has the sessions of the first
    checkpoint's model, one or several (the data files are checked against each model later)."""
    from .train import load_model

    def sessions(c):
        return (f"{c.n_sessions} sessions of {c.session_neurons} neurons" if c.multisession
                else "one session")

    m = load_model(_existing(path, "checkpoint")).to(device)
    if m.config.session_neurons != cfg.session_neurons:
        raise ValueError(f"--ensemble: the model of {path} has {sessions(m.config)} but the first "
                         f"checkpoint's model {sessions(cfg)}")
    return m


def _infer_ensemble(args, model, dataset, splits, refine: dict, what: str) -> int:
    from . import data, posterior
    from .train import check_sizes

    models = [model]
    for path in args.ensemble:
        m = _ensemble_member(path, model.config, args.device)
        check_sizes(m.config, dataset, owner=f"the model of {path}", hint="")
        models.append(m)
    outputs = posterior.ensemble_outputs(models, dataset, n_samples=args.samples, seed=args.seed,
                                         splits=splits, **refine)
    data.write_posterior_h5(args.out, outputs, {n: dataset.splits[n].inds for n in outputs})
    print(f"ensemble of {len(models)} models, rates averaged ({what}): {args.out}")
    return 0


def _demo(args) -> int:
    model_fields, train_fields = load_config(None, args.set)
    if "time_budget" in train_fields:
        raise ValueError("--set time_budget: the demo's budget is --minutes")
    out = rundir.check_writable_dir(args.out)
    with rundir.run_lock(out, what="demo"):
        return _demo_locked(args, model_fields, train_fields)


def _demo_locked(args, model_fields: dict, train_fields: dict) -> int:
    from .demo import run_demo

    r = run_demo(args.out, args.minutes, n_samples=args.samples, quick=args.quick,
                 seed=args.seed, progress=not args.quiet, model_overrides=model_fields,
                 train_overrides=train_fields, burn_in_bins=args.burn_in,
                 refine_steps=args.refine_ic, ensemble=args.ensemble)
    refined = "" if r.r2_refined is None else f" ({r.r2_refined:.3f} with refined initial conditions)"
    ens = ""
    if r.r2_ensemble is not None:
        ens = f", ensemble of {args.ensemble} {r.r2_ensemble:.3f}"
        if r.r2_ensemble_refined is not None:
            ens += f" ({r.r2_ensemble_refined:.3f} refined)"
    print(f"valid R^2: LFADS {r.r2_lfads:.3f}{refined}{ens}, smoothing {r.r2_smoothing:.3f}, "
          f"smoothing + PCA {r.r2_pca:.3f} ({r.total_seconds / 60:.1f} min in all)")
    return 0


def _tune(args) -> int:
    from . import tune

    tune.require_ray()
    out = rundir.check_writable_dir(args.out)
    with rundir.run_lock(out, what="search"):
        return _tune_locked(args, out, tune)


def _tune_locked(args, out: Path, tune) -> int:
    if not args.resume and not args.overwrite:
        if (out / "search.json").exists():
            raise FileExistsError(f"{out} already holds a search; pass --overwrite to start "
                                  "over, or choose another --out")
        if (out / tune.SETUP_FILE).exists():
            raise FileExistsError(f"{out} holds a search that did not finish; pass --resume to "
                                  "go on with it (the same command and options), --overwrite to "
                                  "start over, or choose another --out")
    if args.config is not None:
        _existing(args.config, "config file")
    model_fields, train_fields = load_config(args.config, args.set, args.preset)
    settings = tune.load_search_settings(
        args.config, mode=args.mode, population=args.population, address=args.address,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
        time_budget=args.time_budget, max_generations=args.generations,
        perturbation_interval=args.interval, storage=args.storage, seed=args.seed)
    dataset, model_cfg = _data_and_model_config(_data_files(args.data), model_fields)
    train_cfg = TrainConfig.from_dict(train_fields)
    r = tune.run_search(dataset, model_cfg, train_cfg, out, settings, n_samples=args.samples,
                        verbose=0 if args.quiet else 1, resume=args.resume)
    print(f"{settings.mode}: {len(r.trials)} members, {len(r.exploits)} exploits, "
          f"{len(r.generations)} generations, {r.seconds:.0f} s (stopped: {r.stop_reason}); "
          f"best member {r.best_trial}, valid_recon_smth {r.best_metric:.5f}")
    print("best values: " + ", ".join(f"{k} {v:.3g}" for k, v in r.best_values.items()))
    print(f"wrote {out / 'checkpoints'}, {out / 'search_trials.md'}, {out / 'search.png'}")
    return 0


def _fixed_points(args) -> int:
    import time

    from . import data, fixed_points
    from .train import load_model

    _check_device(args.device)
    model = load_model(_existing(args.checkpoint, "checkpoint")).to(args.device)
    dataset = data.load_dataset(_existing(args.data, "data file"))
    cfg = model.config
    if cfg.multisession and args.session is None:
        raise ValueError(f"the checkpoint's model has {cfg.n_sessions} sessions: pass --session S "
                         "with that session's data file")
    if args.session is not None and not cfg.multisession:
        raise ValueError("--session is for checkpoints of several sessions; this one has one")
    if args.session is not None and args.session >= cfg.n_sessions:
        raise ValueError(f"--session {args.session}: the checkpoint's model has sessions 0.."
                         f"{cfg.n_sessions - 1}")
    neurons = cfg.session_neurons[args.session] if cfg.multisession else cfg.encod_data_dim
    expected = {"encod_data_dim": neurons, "encod_seq_len": cfg.encod_seq_len,
                "ext_input_dim": cfg.ext_input_dim}
    found = {name: getattr(dataset, name) for name in expected}
    if found != expected:
        which = "" if args.session is None else f" (session {args.session})"
        raise ValueError(f"{args.data} does not fit the checkpoint's model{which}: it has "
                         f"{found}, the model expects {expected}")
    if args.split not in dataset.splits:
        raise ValueError(f"--split {args.split}: {args.data} has the splits "
                         f"{', '.join(dataset.splits)}")
    split = dataset.splits[args.split]

    start = time.perf_counter()
    fps = fixed_points.find(model, split.encod_data, split.ext_input, session=args.session,
                            inputs=args.inputs, ext_inputs=args.ext_inputs,
                            n_init=args.n_init, noise_scale=args.noise, method=args.method,
                            seed=args.seed)
    seconds = time.perf_counter() - start
    fps.info.update(checkpoint=os.path.abspath(args.checkpoint),
                    data=os.path.abspath(args.data), split=args.split)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fps.save_h5(out / "fixed_points.h5")
    fps.plot(out / "fixed_points.png")
    n_stable = int(fps.is_stable.sum())
    print(f"fixed points: {len(fps)} ({n_stable} stable, {len(fps) - n_stable} unstable) from "
          f"{args.n_init} initial states on {split.n_trials} {args.split} trials "
          f"({args.method}, inputs {args.inputs}), {seconds:.1f} s")
    print(f"wrote {out / 'fixed_points.h5'} and {out / 'fixed_points.png'}")
    return 0


def _nlb_eval(args) -> int:
    from . import nlb

    if args.kfold is not None:
        if len(args.files) != 1:
            raise ValueError("nlb-eval --kfold K takes one file, DATA.h5 (a model is trained per "
                             f"fold), got {len(args.files)}")
        if args.out is None:
            raise ValueError("nlb-eval --kfold K needs --out DIR (the folds' training runs)")
        model_fields, train_fields = load_config(args.config, args.set, args.preset)
        tensors = nlb.read_nlb_tensors(_existing(args.files[0], "data file"), args.conditions)
        folds = None if args.folds is None else [int(f) for f in args.folds.split(",")]
        summary = nlb.cross_validate(
            tensors["train"], args.kfold, args.out, model_fields=model_fields,
            train_fields=train_fields, seed=args.seed, n_samples=args.samples,
            smoothing=not args.no_smoothing, folds=folds, progress=not args.quiet,
            psth_sigma_bins=args.psth_sigma if args.conditions else None)
        for method, m in summary["mean"].items():
            sd = summary["std"][method]
            print(f"{method}: " + ", ".join(
                f"{name} {m[key]:.4f} +- {sd[key]:.4f}" for key, name in _NLB_METRICS
                if key in m and math.isfinite(m[key])))
        print(f"wrote {os.path.join(args.out, 'cv.json')}")
        return 0
    if len(args.files) != 2:
        raise ValueError(f"nlb-eval takes POSTERIOR.h5 DATA.h5 (or --kfold K DATA.h5), got "
                         f"{len(args.files)} file(s)")
    posterior, data_file = (_existing(f, what) for f, what in zip(args.files, ("posterior", "data file")))
    r = nlb.evaluate_files(posterior, data_file, args.out, eval_split=args.split,
                           fit_split=args.fit_split, conditions_key=args.conditions,
                           psth_sigma_bins=args.psth_sigma, lag_bins=args.lag_bins, dt=args.dt)
    print(", ".join(f"{name} {r[key]:.4f}" for key, name in _NLB_METRICS if math.isfinite(r[key])))
    if r["files"]:
        print(f"wrote {', '.join(r['files'])}")
    return 0


def _nlb_submission(args) -> int:
    from . import data, nlb

    posterior = data.read_posterior_h5(_existing(args.posterior, "posterior"))
    tensors = nlb.read_nlb_tensors(_existing(args.data, "data file"))["train"]
    path = nlb.write_submission(args.out, posterior, tensors.heldin.shape[2], args.dataset,
                                args.bin_size, n_encod_bins=tensors.heldin.shape[1],
                                eval_split=args.split)
    group = args.dataset + ("" if args.bin_size == 5 else f"_{args.bin_size}")
    print(f"wrote {group} into {path}")
    return 0


def _import_lfads_torch(args) -> int:
    from . import lfads_torch

    model_fields, train_fields, notes = lfads_torch.read_config(
        _existing(args.model, "model config"),
        None if args.datamodule is None else _existing(args.datamodule, "datamodule config"),
        None if args.trainer is None else _existing(args.trainer, "trainer config"),
        strict=not args.lenient)
    set_model, set_train = load_config(None, args.set)
    model_fields.update(set_model)
    train_fields.update(set_train)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is not None:
        cfg = LFADSConfig.from_dict(model_fields)
        model = lfads_torch.import_checkpoint(_existing(args.checkpoint, "checkpoint"), cfg)
        model_fields = model.config.to_dict()
        path = lfads_torch.write_checkpoint(out / "model.h5", model, train_fields,
                                            source=os.path.abspath(args.checkpoint))
        print(f"wrote {path} ({model.num_params} parameters from {args.checkpoint})")
    path = lfads_torch.write_config_yaml(out / "config.yaml", model_fields, train_fields, notes)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {path}")
    return 0


# NLB metrics printed by nlb-eval: (key, name).
_NLB_METRICS = (("co_bps", "co-bps"), ("vel_r2", "vel R2"), ("psth_r2", "psth R2"),
                ("fp_bps", "fp-bps"), ("bps", "held-in bps"))


def _add_nlb_commands(sub) -> None:
    p = sub.add_parser("nlb-eval", help="Neural Latents Benchmark metrics of a posterior, or "
                       "K-fold cross-validation", description="co-bps, fp-bps, velocity R^2 "
                       "(nlb_tools' ridge decoder) and PSTH R^2 of POSTERIOR.h5's rates against "
                       "the NLB tensors of DATA.h5; with --kfold K, train one model per fold on "
                       "DATA.h5's training trials and score each on its test trials, beside NLB's "
                       "smoothing baseline (docs/real_data.md).")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="POSTERIOR.h5 DATA.h5, or with --kfold only DATA.h5")
    p.add_argument("--out", metavar="DIR", help="write nlb_eval.json (cv.json with --kfold) and "
                   "the figures velocity.png, psth.png here")
    p.add_argument("--split", default="valid", help="posterior split scored (default valid: "
                   "NLB's eval trials)")
    p.add_argument("--fit-split", default="train", help="posterior split the velocity decoder "
                   "is fitted on (default train)")
    p.add_argument("--conditions", metavar="KEY", help="per-trial condition ids in DATA.h5 "
                   "({train,eval}_KEY): adds PSTH R^2")
    p.add_argument("--psth-sigma", type=_positive_float, default=10.0, metavar="BINS",
                   help="Gaussian smoothing of the PSTHs, in bins (default 10)")
    p.add_argument("--lag-bins", type=_non_negative_int, default=0, metavar="BINS",
                   help="pair rates at bin t with behaviour at t + BINS (default 0: the "
                   "behaviour is already lagged, as in NLB's tensors)")
    p.add_argument("--dt", type=_positive_float, metavar="S", help="seconds per bin, for the "
                   "figures' axes")
    p.add_argument("--kfold", type=_positive_int, metavar="K",
                   help="cross-validate over DATA.h5's training trials with K folds")
    p.add_argument("--config", metavar="CFG.yaml", help="--kfold: model/train config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="--kfold: override one config field (repeatable)")
    _add_preset_option(p, "--kfold: ")
    p.add_argument("--samples", type=_non_negative_int, default=50,
                   help="--kfold: posterior samples per trial (default 50)")
    p.add_argument("--seed", type=_non_negative_int, default=0,
                   help="--kfold: seed of the folds, models and samples (default 0)")
    p.add_argument("--folds", metavar="I,J", help="--kfold: run only these folds")
    p.add_argument("--no-smoothing", action="store_true",
                   help="--kfold: skip the smoothing baseline")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_nlb_eval)

    p = sub.add_parser("nlb-submission", help="write an EvalAI submission file",
                       description="Write the rates of POSTERIOR.h5 (train and eval trials) in "
                       "the Neural Latents Benchmark's submission layout: group DATASET (with "
                       "_20 for 20 ms bins), {train,eval}_rates_held{in,out}[_forward].")
    p.add_argument("posterior", metavar="POSTERIOR.h5")
    p.add_argument("data", metavar="DATA.h5", help="the NLB tensors the posterior was made from "
                   "(sizes held-in neurons and encoder bins)")
    p.add_argument("--dataset", required=True, help="NLB dataset name, e.g. mc_maze_small")
    p.add_argument("--bin-size", type=int, choices=(5, 20), default=5, help="bin size in ms")
    p.add_argument("--split", default="valid", help="posterior split of the eval trials "
                   "(default valid)")
    p.add_argument("--out", required=True, metavar="SUBMISSION.h5",
                   help="submission file (an existing one gains or replaces this group)")
    p.set_defaults(func=_nlb_submission)

    p = sub.add_parser("import-lfads-torch", help="convert lfads-torch configs and checkpoints",
                       description="Read lfads-torch's Hydra model YAML (and its datamodule and "
                       "trainer YAMLs) into OUT/config.yaml for `train --config`; with "
                       "--checkpoint, also convert its Lightning checkpoint's weights into "
                       "OUT/model.h5 for `infer` (needs torch). Keys without counterpart are "
                       "errors naming them (--lenient: notes in config.yaml).")
    p.add_argument("model", metavar="MODEL.yaml", help="lfads-torch configs/model/*.yaml, or a "
                   "composed config with a model section")
    p.add_argument("--datamodule", metavar="DM.yaml", help="lfads-torch configs/datamodule/*.yaml")
    p.add_argument("--trainer", metavar="TRAINER.yaml", help="lfads-torch configs/trainer/*.yaml")
    p.add_argument("--checkpoint", metavar="CKPT", help="a Lightning checkpoint of that model")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a converted field, e.g. model.encod_data_dim=107 (repeatable)")
    p.add_argument("--lenient", action="store_true",
                   help="keys without counterpart become notes instead of errors")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=_import_lfads_torch)


# ---------------------------------------------------------------------- helpers

# What init_session_layers built the read-ins from (PCRResult.method), in words.
_READIN_SOURCES = {"conditions": "PCR on condition averages",
                   "trial_average": "PCR on trial averages (no condition labels; consider "
                                    "--set train_readin=true)",
                   "file": "the files' alignment matrices"}
# Model fields that a multi-session config takes from the data files.
_SESSION_SIZE_FIELDS = ("encod_seq_len", "recon_seq_len", "ext_input_dim", "recon_data_dim",
                        "session_neurons", "session_recon_neurons")


def _one_line(e: BaseException) -> str:
    """An expected error as one line naming the thing: OSErrors by their file and reason."""
    if isinstance(e, MemoryError):
        return (f"out of memory ({e})" if str(e) else "out of memory") + \
            "; try a smaller batch size, model or data file"
    if isinstance(e, OSError) and e.strerror:
        names = " -> ".join(str(n) for n in (e.filename, e.filename2) if n is not None)
        return f"{names}: {e.strerror}" if names else e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def _check_infer_memory(model, datasets, n_models: int) -> None:
    """Refuses, before sampling, posteriors whose outputs (every field, every split, float32)
    and model chunks clearly need more memory than the machine has."""
    from . import posterior, resources

    c = model.config
    per_bin = (max(c.recon_data_dim, max(c.session_recon_neurons or [0])) + c.fac_dim + c.gen_dim
               + c.con_dim + 3 * c.co_dim + c.ext_input_dim)
    trials = sum(s.n_trials for ds in datasets for s in ds.splits.values())
    needed = (4 * trials * (c.recon_seq_len * per_bin + 3 * c.ic_dim + c.gen_dim)
              + posterior._CHUNK_BYTES + n_models * model.flat.nbytes)
    resources.check_memory(needed, f"posterior outputs of {trials:,} trials")


def _data_files(entries: list[str]) -> list[str]:
    """Data file arguments with glob patterns expanded (sorted matches), each checked to exist."""
    from . import data

    return [_existing(path, "data file") for path in data.expand_paths(entries, "data file")]


def _data_and_model_config(files: list[str], model_fields: dict):
    """(dataset, config) of one data file; (list of datasets, multi-session config) of several."""
    from . import data
    from .train import config_for_data

    if len(files) == 1:
        given = [name for name in ("session_neurons", "session_recon_neurons")
                 if model_fields.get(name) is not None]
        if given:
            raise ValueError(f"{given[0]} is for several sessions (one data file per session), "
                             "but one data file was given")
        dataset = data.load_dataset(files[0])
        return dataset, config_for_data(dataset, **model_fields)
    sessions = data.load_sessions(files)
    return sessions, _session_config(sessions, model_fields)


def _session_config(sessions, model_fields: dict) -> LFADSConfig:
    """The multi-session config of the sessions; data sizes given (a resumed run's
    config.yaml has them all) must agree with the files."""
    from . import stitching

    fields = dict(model_fields)
    given = {name: fields.pop(name) for name in _SESSION_SIZE_FIELDS if name in fields}
    dim = fields.pop("encod_data_dim", None)
    if dim is None:
        dim = stitching.default_shared_dim(sessions, fields.get("fac_dim", LFADSConfig.fac_dim))
    cfg = stitching.config_for_sessions(sessions, dim, **fields)
    for name, value in given.items():
        if value is not None and getattr(cfg, name) != value:
            raise ValueError(f"{name} = {value} in the config, but the data files give "
                             f"{getattr(cfg, name)}")
    return cfg


def _add_device_option(p) -> None:
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="where the model runs: cpu (default), cuda or cuda:N (needs the gpu "
                   "extra, pip install 'lfads_fast[gpu]', and a build with the CUDA kernels)")


def _check_device(device: str) -> None:
    """A clear error before any work when --device cannot run here."""
    from . import ops

    try:
        ops.check_device(device)
    except ValueError as e:
        raise ValueError(f"--device {device}: {e}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lfads-fast", description="LFADS with a compiled core.")
    parser.add_argument("--threads", type=_thread_count, default=None,
                        help="CPU threads of the compiled kernels (default: all)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model on an HDF5 data file",
                       description="Train LFADS; writes checkpoints, logs and the posterior.")
    p.add_argument("data", metavar="DATA.h5", nargs="+",
                   help="input file (lfads-torch, TF1 or NLB layout); several files, or a quoted "
                   "glob pattern, are the sessions of one stitched model")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--config", metavar="CFG.yaml", help="YAML with sections model and train")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. model.gen_dim=64 (repeatable)")
    _add_preset_option(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from DIR/checkpoints/last.h5 (config from DIR/config.yaml "
                   "unless --config is given)")
    p.add_argument("--overwrite", action="store_true", help="start over in a used DIR")
    p.add_argument("--time-budget", type=_positive_float, metavar="S",
                   help="stop after about S seconds of training")
    p.add_argument("--samples", type=_non_negative_int, default=50,
                   help="posterior samples for DIR/posterior.h5, or with sessions "
                   "DIR/lfads_output_<file> (0: skip; default 50)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_device_option(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("infer", help="posterior-averaged outputs of a checkpoint",
                       description="Sample and average posteriors; write lfads-torch's keys.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .h5 checkpoint of lfads-fast train")
    p.add_argument("data", metavar="DATA.h5", nargs="+",
                   help="input file; for a multi-session checkpoint one per session, in the "
                   "order of training (or a quoted glob pattern)")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="output file; for a multi-session checkpoint a directory that receives "
                   "lfads_output_<file> per session")
    p.add_argument("--samples", type=_non_negative_int, default=50,
                   help="posterior samples per trial (0: posterior means; default 50)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the samples")
    p.add_argument("--splits", metavar="S1,S2", help="splits to run (default: all in the file)")
    p.add_argument("--refine-ic", type=_non_negative_int, default=0, metavar="STEPS",
                   help="refine each trial's initial condition by STEPS gradient steps on its "
                   "own spikes before running the generator (docs/refine_ic.md; "
                   f"{REFINE_STEPS} is a good start; default 0: off)")
    p.add_argument("--refine-lr", type=_positive_float, default=REFINE_LR, metavar="LR",
                   help=f"step size of the refinement (default {REFINE_LR})")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="CHECKPOINT",
                   help="more checkpoints of models trained on the same data: OUT (each "
                   "session's file of OUT for multi-session models) then holds only "
                   "{split}_output_params, the rates averaged over all the models")
    _add_device_option(p)
    p.set_defaults(func=_infer)

    p = sub.add_parser("demo", help="train on synthetic chaotic-RNN data and report",
                       description="Generate chaotic-RNN data, train LFADS for a time budget, "
                       "compare with smoothing and PCA; writes report.md and figures.")
    p.add_argument("--minutes", type=_positive_float, default=5.0,
                   help="training budget in minutes (default 5)")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output directory")
    p.add_argument("--samples", type=_non_negative_int, default=50,
                   help="posterior samples per trial (default 50)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of data and training")
    p.add_argument("--quick", action="store_true",
                   help="a small dataset, for a fast smoke test")
    p.add_argument("--burn-in", type=_non_negative_int, default=0, metavar="BINS",
                   help="simulate the network this many bins before each trial, so trials "
                   "start on its attractor (default 0: the original data, which start with "
                   "the transient from a random state)")
    p.add_argument("--refine-ic", type=_non_negative_int, default=REFINE_STEPS, metavar="STEPS",
                   help="also score the validation rates from initial conditions refined by "
                   f"STEPS gradient steps per trial (default {REFINE_STEPS}; 0: off)")
    p.add_argument("--ensemble", type=_positive_int, default=1, metavar="K",
                   help="train K models one after the other (seeds SEED, SEED+1, ...; each for "
                   "--minutes) and also score their averaged rates (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field of the demo's model or training configuration, "
                   "e.g. model.ic_dim=64 or train.lr_patience=10 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_demo)

    p = sub.add_parser("fixed-points", help="fixed points of a checkpoint's generator",
                       description="Find the fixed points of the generator from the states it "
                       "visits on one split of the data; writes DIR/fixed_points.h5 and "
                       "DIR/fixed_points.png (docs/fixed_points.md).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .h5 checkpoint of lfads-fast train")
    p.add_argument("data", metavar="DATA.h5",
                   help="input file (for several sessions: the file of --session)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--n-init", type=_positive_int, default=1000, metavar="N",
                   help="initial states drawn from the generator states (default 1000)")
    p.add_argument("--noise", type=_non_negative_float, default=0.01, metavar="SD",
                   help="standard deviation of the noise added to them (default 0.01)")
    p.add_argument("--method", choices=("newton", "adam"), default="newton",
                   help="solver (default newton)")
    p.add_argument("--inputs", choices=("zero", "mean"), default="zero",
                   help="constant controller output: zero, or the mean over trials and time "
                   "(default zero)")
    p.add_argument("--ext-inputs", choices=("zero", "mean"), default="zero",
                   help="constant external input, for models with external inputs (default zero)")
    p.add_argument("--split", default="valid", help="split whose trials are run (default valid)")
    p.add_argument("--session", type=_non_negative_int, metavar="S",
                   help="session of the data file (checkpoints of several sessions)")
    p.add_argument("--seed", type=_non_negative_int, default=0,
                   help="seed of the initial states (default 0)")
    _add_device_option(p)
    p.set_defaults(func=_fixed_points)

    p = sub.add_parser("tune", help="hyperparameter search: AutoLFADS population-based training",
                       description="Search the learning rate and regularisation with Ray Tune: "
                       "population-based training (AutoLFADS) or random search; writes the best "
                       "model as train does, a table and a figure of the search (docs/tune.md). "
                       "Needs the tune extra: pip install 'lfads_fast[tune]'.")
    p.add_argument("data", metavar="DATA.h5", nargs="+",
                   help="input file; several files (or a quoted glob pattern) are the sessions "
                   "of one stitched model")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--config", metavar="CFG.yaml",
                   help="YAML with sections model, train and tune (settings and search space)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one model or train field (repeatable)")
    _add_preset_option(p)
    p.add_argument("--mode", choices=("pbt", "random"), default=None,
                   help="population-based training (default) or random search")
    p.add_argument("--population", type=_positive_int, default=None, metavar="N",
                   help="members of the population (default 20)")
    p.add_argument("--generations", type=_positive_int, default=None, metavar="G",
                   help="stop PBT after G generations (default: no limit)")
    p.add_argument("--interval", type=_positive_int, default=None, metavar="EPOCHS",
                   help="epochs per generation (default 25)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="join a running Ray cluster ('auto' or host:port; default: start Ray "
                   "on this machine)")
    p.add_argument("--cpus-per-trial", type=_positive_int, default=None, metavar="N",
                   help="CPUs (kernel threads) of one member (default 1)")
    p.add_argument("--gpus-per-trial", type=_non_negative_float, default=None, metavar="F",
                   help="GPUs of one member, fractions share a GPU (default 0)")
    p.add_argument("--time-budget", type=_positive_float, default=None, metavar="S",
                   help="stop the search after S seconds")
    p.add_argument("--storage", default=None, metavar="PATH",
                   help="Ray's results and checkpoints (default DIR/ray; on a cluster a path "
                   "every node sees, or a URI such as s3://...)")
    p.add_argument("--seed", type=_non_negative_int, default=None,
                   help="seed of the initial values and the explore steps (default 0)")
    p.add_argument("--samples", type=_non_negative_int, default=50,
                   help="posterior samples for the best model's posterior (0: skip; default 50)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="go on with the interrupted search in DIR (the same data, config and "
                       "options; --address may change)")
    again.add_argument("--overwrite", action="store_true", help="start over in a used DIR")
    p.add_argument("--quiet", action="store_true", help="no status table")
    p.set_defaults(func=_tune)


    p = sub.add_parser("export", help="write a checkpoint's model for real-time inference",
                       description="Write the model of a checkpoint as a safetensors file that the "
                       "real-time C library (include/lfads_fast/realtime.h) and "
                       "lfads_fast.realtime.Decoder load (docs/realtime.md).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .h5 checkpoint of lfads-fast train")
    p.add_argument("--out", required=True, metavar="MODEL.safetensors", help="output file")
    p.set_defaults(func=_export)

    p = sub.add_parser("fit-decoder", help="fit a linear read-out of behaviour into an export",
                       description="Run the real-time decoder over the trials of a data file, fit "
                       "a linear map from its rates or factors to the behaviour (ridge regression, "
                       "NLB's procedure, or the optimal linear estimator of BCIs; lag and penalty "
                       "by cross-validation over trials) and write a copy of the export that also "
                       "holds it: the real-time step then returns the decoded output "
                       "(docs/realtime.md).")
    p.add_argument("model", metavar="MODEL.safetensors", help="a file of lfads-fast export")
    p.add_argument("data", metavar="DATA.h5", help="trials with {split}_<behavior> arrays [B, T, D]")
    p.add_argument("--out", required=True, metavar="OUT.safetensors", help="output file")
    p.add_argument("--behavior", default="behavior", metavar="NAME",
                   help="behaviour array of each split, without the split prefix (default behavior)")
    p.add_argument("--splits", default="train", metavar="S1,S2", help="splits to fit on (default train)")
    p.add_argument("--features", choices=("rates", "factors"), default="rates",
                   help="what the read-out reads (default rates)")
    p.add_argument("--mode", choices=("window", "streaming"), default=None,
                   help="real-time mode that makes the features (default: streaming when the "
                   "model can, else window)")
    p.add_argument("--window", type=_positive_int, default=None, metavar="W",
                   help="window mode: bins per window (default: the model's encod_seq_len)")
    p.add_argument("--lags", default="0", metavar="L1,L2",
                   help="candidate lags in bins, chosen by cross-validation (default 0)")
    p.add_argument("--method", choices=readout.METHODS, default="ridge",
                   help="ridge: ridge regression from the features to the behaviour (NLB's "
                   "decoder); ole: optimal linear estimator of BCIs, an encoding model f = f0 + "
                   "B u + e of each feature from the standardised behaviour u, inverted with the "
                   "noise variances Sigma of the channels: (B^T Sigma^-1 B + lambda I)^-1 "
                   "B^T Sigma^-1 (default ridge)")
    p.add_argument("--alphas", default=None, metavar="A1,A2",
                   help="candidate penalties: ridge alpha, or ole lambda (default 1e-4 .. 1e4, "
                   "9 values)")
    p.add_argument("--folds", type=_positive_int, default=5, help="cross-validation folds (default 5)")
    p.set_defaults(func=_fit_decoder)

    p = sub.add_parser("serve", help="real-time node: Redis stream of counts in, outputs out",
                       description="Read spike counts from a Redis stream, run the real-time "
                       "decoder bin by bin and write rates, factors and decoded outputs with "
                       "timestamps to another stream (docs/realtime.md). Stops cleanly on SIGINT "
                       "or SIGTERM.")
    p.add_argument("model", metavar="MODEL.safetensors", help="a file of lfads-fast export")
    p.add_argument("--config", metavar="SERVE.yaml",
                   help="YAML with any of the options below (underscores for dashes); the "
                   "command line overrides it")
    p.add_argument("--host", help="Redis host (default 127.0.0.1)")
    p.add_argument("--port", type=_positive_int, help="Redis port (default 6379)")
    p.add_argument("--in-stream", help="input stream (default spikes)")
    p.add_argument("--out-stream", help="output stream (default lfads)")
    p.add_argument("--field", help="field of the counts in input entries (default counts)")
    p.add_argument("--mode", choices=("window", "streaming"),
                   help="default: streaming when the model can, else window")
    p.add_argument("--window", type=_positive_int, help="window mode: bins per window")
    p.add_argument("--lookahead", type=_non_negative_int, help="window mode: look-ahead bins")
    p.add_argument("--max-count", type=_positive_float, help="largest accepted count (default 1000)")
    p.add_argument("--start-id", help="read entries after this id ('$': new ones only, the "
                   "default; '0': all)")
    p.add_argument("--block-ms", type=_positive_int, help="longest wait per read in ms (default 100)")
    p.add_argument("--maxlen", type=_non_negative_int,
                   help="approximate cap of the output stream (default 100000; 0: none)")
    p.set_defaults(func=_serve)

    _add_nlb_commands(sub)
    return parser


def _serve(args) -> int:
    import signal

    from .realtime import SERVE_DEFAULTS, serve

    options = dict(SERVE_DEFAULTS)
    if args.config:
        given = read_yaml(_existing(args.config, "config"))
        if not isinstance(given, dict):
            raise ValueError(f"{args.config} must hold a mapping of serve options")
        unknown = sorted(set(given) - set(options))
        if unknown:
            raise ValueError(f"{args.config}: unknown serve options {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(options))})")
        options.update(given)
    for name in options:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve(_existing(args.model, "model"), stop=lambda: bool(stopping),
              log=lambda m: print(m, flush=True), **options)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0


def _fit_decoder(args) -> int:
    import numpy as np

    from . import data
    from .export import export_model, read_export
    from .realtime import Decoder

    model, _ = read_export(_existing(args.model, "model"))
    dataset = data.load_dataset(_existing(args.data, "data file"))
    dec = Decoder(args.model, mode=args.mode, window=args.window)
    features, behaviour = [], []
    for name in [s.strip() for s in args.splits.split(",") if s.strip()]:
        split = getattr(dataset, name, None)
        if split is None:
            raise ValueError(f"{args.data} has no {name} split")
        if args.behavior not in split.extra:
            raise ValueError(f"{args.data} has no {name}_{args.behavior} array "
                             f"(per-split arrays: {', '.join(sorted(split.extra)) or 'none'})")
        beh = np.asarray(split.extra[args.behavior], np.float64)
        if beh.ndim == 2:
            beh = beh[..., None]
        if beh.ndim != 3 or beh.shape[0] != split.n_trials:
            raise ValueError(f"{name}_{args.behavior} must be [trials, bins, outputs], got {beh.shape}")
        for counts, b in zip(split.encod_data, beh):
            dec.reset()
            res = dec.run(np.nan_to_num(counts, nan=0.0))
            f = np.full((counts.shape[0], dec.n_out if args.features == "rates" else dec.n_factors), np.nan)
            f[res["bin"]] = res[args.features]
            features.append(f)
            behaviour.append(b)
    lags = _list_arg(args.lags, "--lags", int)
    alphas = readout.DEFAULT_ALPHAS if args.alphas is None else _list_arg(args.alphas, "--alphas", float)
    fit = readout.fit_readout(features, behaviour, method=args.method, lags=lags, alphas=alphas,
                              folds=args.folds)
    # The penalty under the name its method gives it: ridge's alpha, the OLE's lambda.
    penalty = "alpha" if fit.method == "ridge" else "lambda"
    export_model(model, args.out, decoder={"W": fit.W, "b": fit.b, "features": args.features,
                                           "lag": fit.lag, "method": fit.method, penalty: fit.alpha,
                                           "cv_r2": fit.cv_r2, "mode": dec.mode, "behavior": args.behavior})
    print(f"Wrote {args.out}: {fit.method} from {args.features} ({dec.mode} mode) to {fit.W.shape[0]} outputs "
          f"of {args.behavior}; lag {fit.lag} bins, {penalty} {fit.alpha:g}, cross-validated R^2 "
          f"{fit.cv_r2:.4f} ({args.folds} folds over {len(features)} trials).")
    return 0


def _list_arg(text: str, name: str, kind=int) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ValueError(f"{name} must be comma-separated {what}, got {text!r}") from None


def _export(args) -> int:
    from .export import export_checkpoint
    from .realtime import Decoder

    export_checkpoint(_existing(args.checkpoint, "checkpoint"), args.out)
    dec = Decoder(args.out)  # read back by the C library: the file is usable
    modes = "window and streaming" if dec.can_stream else "window mode (streaming needs ic_enc_seq_len and ci_enc_causal)"
    print(f"Wrote {args.out}: {dec.n_in} channels in, {dec.n_out} rates, {dec.n_factors} factors; "
          f"runs in {modes}.")
    return 0


def _resolve(key: str) -> tuple[str, str]:
    """'model.gen_dim' / 'gen_dim' -> ('model', 'gen_dim')."""
    fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in _SECTIONS.items()}
    if "." in key:
        section, field = key.split(".", 1)
        if section not in fields:
            raise ValueError(f"--set {key}: unknown section {section!r}; expected model or train")
        if field not in fields[section]:
            raise ValueError(f"--set {key}: {section} has no field {field!r}{_hint(field, fields[section])}")
        return section, field
    owners = [s for s, names in fields.items() if key in names]
    if not owners:
        raise ValueError(f"--set {key}: no such field{_hint(key, fields['model'] | fields['train'])}")
    return owners[0], key


def _coerce(section: str, key: str, value, *, where: str):
    """Converts a YAML value to the type of a config field (YAML reads 1e-3 as a string)."""
    cls = _SECTIONS[section]
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    if key not in types:
        raise ValueError(f"{where}: {section} has no field {key!r}{_hint(key, types)}")
    kind = str(types[key])
    optional = "None" in kind
    base = kind.split("|")[0].strip()
    bad = ValueError(f"{where}: {section}.{key} must be {'' if not optional else 'null or '}"
                     f"{'a' if base != 'int' else 'an'} {base}, got {value!r}")
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise bad
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise bad
    if isinstance(value, bool):
        raise bad
    if base in ("int", "float"):
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise bad from None
        if not isinstance(number, (int, float)):
            raise bad
        try:
            if base == "float":
                number = float(number)
                if not math.isfinite(number):
                    raise bad
                return number
            if not math.isfinite(number) or float(number) != int(number):
                raise bad
            return int(number)
        except OverflowError:  # an integer too large for a float
            raise bad from None
    return value


def _hint(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, sorted(candidates), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _existing(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def _add_preset_option(p, prefix: str = "") -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), metavar="NAME",
                   help=f"{prefix}start from a named configuration (the config file and --set "
                   "win over it): " + "; ".join(f"{k}: {v.description}" for k, v in sorted(PRESETS.items())))


def _positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def _thread_count(text: str) -> int:
    from .ops import MAX_THREADS

    return _number(text, int, lambda v: 1 <= v <= MAX_THREADS,
                   f"an integer from 1 to {MAX_THREADS} (this machine has {os.cpu_count()} CPUs)")


def _non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def _positive_float(text: str) -> float:
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a finite positive number")


def _non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")


def _number(text, kind, ok, what):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
