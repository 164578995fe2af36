"""The demo: LFADS on the chaotic-RNN data of the original paper, against two baselines.

run_demo generates the data (synth.chaotic_rnn with its defaults: 400 conditions x 10 trials,
50 neurons, 100 bins of 10 ms), trains LFADS for a fixed wall-clock budget, averages 50
posterior samples per trial, and compares the inferred rates of the validation trials with
the true rates (pooled R^2) next to the best Gaussian smoothing of the spikes and smoothing
followed by PCA. It writes the data, the checkpoints and logs, the posterior file, figures
and report.md into one directory.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from . import data, metrics, ops, plots, posterior, synth
from .model import LFADS
from .train import NonFiniteLossError, Trainer, TrainConfig, config_for_data, load_model

__all__ = ["DEMO_MODEL", "DEMO_TRAIN", "DemoResult", "run_demo"]

# The chaotic RNN's rates depend on the initial condition alone (no inputs), so the demo
# model has no controller. Sizes, regularisation and learning rate give the best validation
# R^2 after five minutes on two shared CPU cores among the settings tried (docs/demo.md): a
# 100-unit generator learns more per epoch than a 64-unit one at about the same R^2 per
# second, dropout 0.1 generalises better than 0 or 0.05, and a 32-unit encoder costs half
# of a 64-unit one for the same result.
DEMO_MODEL = dict(
    ic_enc_dim=32,
    ic_dim=32,
    gen_dim=100,
    fac_dim=40,
    co_dim=0,
    ci_enc_dim=0,
    con_dim=0,
    dropout_rate=0.1,
    kl_ic_scale=3e-5,
)
DEMO_TRAIN = dict(
    batch_size=100,
    lr_init=1e-2,
    lr_patience=3,
    lr_decay=0.7,
    kl_increase_epoch=5,
    l2_increase_epoch=5,
    max_epochs=100_000,
    time_budget_lr_factor=0.25,
)
# Smoothing widths (bins) and numbers of principal components tried by the smoothing + PCA
# baseline, and the stride of the training trials its choices are made on.
PCA_SIGMAS = (3.0, 4.0, 6.0, 8.0)
PCA_COMPONENTS = (4, 6, 8, 10, 12)
SELECTION_STRIDE = 8
# --quick: a small dataset for smoke tests.
QUICK_DATA = dict(n_conditions=24, trials_per_condition=5, train_per_condition=4)


@dataclass
class DemoResult:
    """What run_demo measured.

    Attributes:
        r2_lfads: pooled R^2 of LFADS's posterior-averaged rates on the validation trials.
        r2_smoothing: pooled R^2 of the best Gaussian smoothing (width chosen on train).
        r2_pca: pooled R^2 of smoothing + PCA (width and components chosen on train).
        r2_refined: pooled R^2 of LFADS's rates from initial conditions refined per trial
            (refine.refine_ic), or None when refinement was off.
        r2_ensemble: pooled R^2 of the rates averaged over the ensemble's models (each
            model's posterior average), or None without an ensemble.
        r2_ensemble_refined: the same from each model's refined initial conditions, or None.
        members: per model of the ensemble (the first is the one above): seed, epochs,
            best_epoch, stop_reason, r2 and r2_refined (None when refinement was off).
        sigma_bins: the smoothing width of the smoothing baseline, in bins.
        pca_sigma_bins, pca_components: the choices of the PCA baseline.
        error_by_time: per estimate of the validation rates ("LFADS", "LFADS, refined",
            "ensemble", "ensemble, refined", "smoothing + PCA", those computed), the squared
            error in each tenth of the trial as a fraction of the rates' variance
            (metrics.error_by_time).
        epochs: training epochs completed.
        train_seconds: wall-clock seconds of training.
        posterior_seconds: wall-clock seconds of posterior sampling.
        total_seconds: wall-clock seconds of the whole demo.
        out_dir: where everything was written.
    """

    r2_lfads: float
    r2_smoothing: float
    r2_pca: float
    r2_refined: float | None
    r2_ensemble: float | None
    r2_ensemble_refined: float | None
    members: list
    sigma_bins: float
    pca_sigma_bins: float
    pca_components: int
    error_by_time: dict
    epochs: int
    train_seconds: float
    posterior_seconds: float
    total_seconds: float
    out_dir: str


def run_demo(out_dir: str | os.PathLike = "demo_out", minutes: float = 5.0, *,
             n_samples: int = posterior.DEFAULT_SAMPLES, quick: bool = False, seed: int = 0,
             progress: bool = True, log=print, model_overrides: dict | None = None,
             train_overrides: dict | None = None, burn_in_bins: int = 0,
             refine_steps: int = posterior.REFINE_STEPS, ensemble: int = 1) -> DemoResult:
    """Runs the demo (see the module docstring).

    Args:
        out_dir: output directory; earlier demo outputs in it are replaced.
        minutes: wall-clock training budget in minutes.
        n_samples: posterior samples per trial.
        quick: a small dataset (24 conditions x 5 trials), for smoke tests.
        seed: seed of the data, the initialisation and training.
        progress: show the training progress bar.
        log: called with each progress message (a string).
        model_overrides: LFADSConfig fields that replace DEMO_MODEL's (e.g. {"gen_dim": 200}).
        train_overrides: TrainConfig fields that replace DEMO_TRAIN's; time_budget comes from
            minutes.
        burn_in_bins: synth.chaotic_rnn's burn_in_bins: 0 (the original data) starts every
            trial with the transient from a random state; > 0 starts trials on the network's
            attractor (docs/demo.md: where the error of the original data sits).
        refine_steps: also score the validation rates from initial conditions refined by
            this many steps per trial (refine.refine_ic; written to posterior_refined.h5);
            0: off.
        ensemble: number of models trained one after the other (seeds seed, seed + 1, ...,
            each for `minutes`), whose rates are averaged (posterior.average_rates);
            the first model's outputs are the ones written to posterior.h5.

    Returns:
        The measurements (also written to out_dir/report.md).
    """
    if not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1:
        raise ValueError(f"ensemble must be an integer >= 1, got {ensemble!r}")
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    t0 = time.perf_counter()
    sd = synth.chaotic_rnn(seed=seed, burn_in_bins=burn_in_bins, **(QUICK_DATA if quick else {}))
    data_path = synth.save_h5(sd, out / "data.h5")
    ds = data.load_dataset(data_path)
    timings["data"] = time.perf_counter() - t0
    log(f"data: {ds.train.n_trials} train + {ds.valid.n_trials} valid trials, "
        f"{ds.encod_seq_len} bins x {ds.encod_data_dim} neurons -> {data_path}")

    t0 = time.perf_counter()
    base = _baselines(ds)
    timings["baselines"] = time.perf_counter() - t0
    log(f"baselines (valid R^2): smoothing {base['r2_smoothing']:.3f}, "
        f"smoothing + PCA {base['r2_pca']:.3f}")

    model_cfg = config_for_data(ds, **{**DEMO_MODEL, **(model_overrides or {})})
    train_fields = {**DEMO_TRAIN, "seed": seed, **(train_overrides or {})}
    train_cfg = TrainConfig(**{**train_fields, "time_budget": 60.0 * minutes})
    model = LFADS(model_cfg, seed=seed)
    log(f"training LFADS ({model.num_params} parameters, {ops.get_num_threads()} threads) "
        f"for {minutes:g} min" + (f" (model 1 of {ensemble})" if ensemble > 1 else ""))
    fit = _fit(Trainer(model, ds, train_cfg, out / "train", progress=progress), log)
    timings["train"] = fit.train_seconds

    t0 = time.perf_counter()
    best = load_model(fit.best_checkpoint)
    outputs = posterior.write_posterior(out / "posterior.h5", best, ds, n_samples=n_samples,
                                        seed=seed)
    timings["posterior"] = time.perf_counter() - t0
    rates = outputs["valid"]["output_params"]
    r2_lfads = metrics.r2(rates, ds.valid.truth)
    log(f"LFADS valid R^2 {r2_lfads:.3f} after {fit.epochs} epochs")

    errors = {"LFADS": rates}
    r2_refined = None
    if refine_steps > 0:
        t0 = time.perf_counter()
        refined = posterior.sample_and_average(best, ds.valid.encod_data, ds.valid.ext_input,
                                               refine_steps=refine_steps)
        data.write_posterior_h5(out / "posterior_refined.h5", {"valid": refined},
                                {"valid": ds.valid.inds})
        r2_refined = metrics.r2(refined["output_params"], ds.valid.truth)
        errors["LFADS, refined"] = refined["output_params"]
        timings["refine"] = time.perf_counter() - t0
        log(f"LFADS valid R^2 with refined initial conditions ({refine_steps} steps) "
            f"{r2_refined:.3f}")
    members = [{"seed": seed, "epochs": fit.epochs, "best_epoch": fit.best_epoch, "r2": r2_lfads,
                "r2_refined": r2_refined, "stop_reason": fit.stop_reason}]
    r2_ens = r2_ens_refined = None
    if ensemble > 1:
        first = {"plain": rates, "refined": None if refine_steps == 0 else refined["output_params"]}
        r2_ens, r2_ens_refined = _ensemble(out, ds, model_cfg, train_fields, minutes, ensemble, seed,
                                           first, n_samples, refine_steps, progress, log, members,
                                           timings, errors)

    t0 = time.perf_counter()
    dt = float(ds.other.get("dt", sd.dt))
    figures = _figures(out, ds, outputs, dt, fit.history)
    timings["figures"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    errors["smoothing + PCA"] = base["pca_rates"]
    result = DemoResult(
        r2_lfads=r2_lfads, r2_smoothing=base["r2_smoothing"], r2_pca=base["r2_pca"],
        r2_refined=r2_refined, r2_ensemble=r2_ens, r2_ensemble_refined=r2_ens_refined,
        members=members,
        sigma_bins=base["sigma"], pca_sigma_bins=base["pca_sigma"],
        pca_components=base["pca_k"],
        error_by_time={k: metrics.error_by_time(r, ds.valid.truth, 10).tolist()
                       for k, r in errors.items()},
        epochs=fit.epochs, train_seconds=fit.train_seconds,
        posterior_seconds=timings["posterior"], total_seconds=timings["total"],
        out_dir=str(out))
    _write_report(out / "report.md", result, ds, model, train_cfg, fit, timings, figures,
                  n_samples, minutes, quick, burn_in_bins, refine_steps)
    log(f"report: {out / 'report.md'}")
    return result


def _fit(trainer: Trainer, log):
    """trainer.fit(); a run stopped by the non-finite guard after at least one epoch goes on
    with its best checkpoint (the message is logged; the FitResult's stop_message has it for
    the report); one stopped before any epoch re-raises."""
    try:
        return trainer.fit()
    except NonFiniteLossError as e:
        if e.result is None:
            raise
        log(f"{e}\nThe demo goes on with the best checkpoint (epoch {e.result.best_epoch}).")
        return e.result


def _ensemble(out: Path, ds: data.Dataset, model_cfg, train_fields: dict, minutes: float,
              ensemble: int, seed: int, first: dict, n_samples: int, refine_steps: int,
              progress: bool, log, members: list, timings: dict, errors: dict):
    """Trains models 2..ensemble (out/train_<i>) and scores the ensemble's averaged rates, the
    first model's valid rates (plain and refined) given in `first`; appends each new model to
    members, the averaged rates to errors, and writes ensemble.h5 (and ensemble_refined.h5)."""
    checkpoints = []
    for i in range(1, ensemble):
        model = LFADS(model_cfg, seed=seed + i)
        cfg = TrainConfig(**{**train_fields, "seed": seed + i, "time_budget": 60.0 * minutes})
        log(f"training LFADS for {minutes:g} min (model {i + 1} of {ensemble})")
        fit = _fit(Trainer(model, ds, cfg, out / f"train_{i}", progress=progress), log)
        timings["train"] += fit.train_seconds
        checkpoints.append(fit.best_checkpoint)
        members.append({"seed": seed + i, "epochs": fit.epochs, "best_epoch": fit.best_epoch,
                        "stop_reason": fit.stop_reason})
    t0 = time.perf_counter()
    models = [load_model(c) for c in checkpoints]
    v = ds.valid
    kinds = [("plain", "ensemble.h5", {"n_samples": n_samples}, "r2")]
    if refine_steps > 0:
        kinds.append(("refined", "ensemble_refined.h5", {"refine_steps": refine_steps}, "r2_refined"))
    scores = {"plain": None, "refined": None}
    for kind, file_name, options, key in kinds:
        rates = [first[kind]] + [posterior.sample_and_average(m, v.encod_data, v.ext_input, seed=seed,
                                                              **options)["output_params"]
                                 for m in models]
        for m, r in zip(members, rates):
            m[key] = metrics.r2(r, v.truth)
        mean = posterior.average_rates(rates)
        scores[kind] = metrics.r2(mean, v.truth)
        errors["ensemble" if kind == "plain" else "ensemble, refined"] = mean
        data.write_posterior_h5(out / file_name, {"valid": {"output_params": mean}}, {"valid": v.inds})
        log(f"ensemble of {ensemble}{', refined initial conditions' if kind == 'refined' else ''}: "
            f"valid R^2 {scores[kind]:.3f}")
    for m in members:
        m.setdefault("r2_refined", None)
    timings["ensemble"] = time.perf_counter() - t0
    return scores["plain"], scores["refined"]


def _baselines(ds: data.Dataset) -> dict:
    """Smoothing and smoothing + PCA, hyperparameters chosen on train, scored on valid.

    The choices are made on every SELECTION_STRIDE-th training trial (all conditions, less
    time); the PCA is then fitted on all training trials.
    """
    train, valid = ds.train, ds.valid
    spikes, truth = train.recon_data[::SELECTION_STRIDE], train.truth[::SELECTION_STRIDE]
    smooth = metrics.best_smoothing_r2(spikes, truth, eval_spikes=valid.recon_data,
                                       eval_truth=valid.truth)
    # PCA denoises across neurons, so it does best with less smoothing in time than smoothing
    # alone: width and number of components are chosen together.
    scores = {(sigma, k): metrics.r2(metrics.pca_of_smoothed(spikes, sigma, k).rates, truth)
              for sigma in PCA_SIGMAS for k in PCA_COMPONENTS if k <= ds.recon_data_dim}
    sigma, k = max(scores, key=scores.get)
    pca = metrics.pca_of_smoothed(valid.recon_data, sigma, k, fit_spikes=train.recon_data)
    return {"r2_smoothing": smooth.r2, "sigma": smooth.sigma_bins,
            "r2_pca": metrics.r2(pca.rates, valid.truth), "pca_sigma": sigma, "pca_k": k,
            "pca_rates": pca.rates}


def _figures(out: Path, ds: data.Dataset, outputs: dict, dt: float, history: list) -> list[str]:
    valid = ds.valid
    paths = [
        plots.plot_example_trials(out / "example_trials.png", valid.recon_data, valid.truth,
                                  outputs["valid"]["output_params"], trials=(0, 1, 2),
                                  neurons=(0, 1, 2, 3), dt=dt),
        plots.plot_factor_trajectories(out / "factor_trajectories.png",
                                       outputs["valid"]["factors"],
                                       conditions=valid.extra.get("conditions")),
    ]
    curves = out / "train" / "training_curves.png"
    if curves.exists():
        paths.append(str(curves))
    return [os.path.relpath(p, out) for p in paths]


def _error_lines(r: DemoResult, n_bins: int) -> list[str]:
    edges = [i * n_bins // 10 for i in range(11)]
    lines = ["## Where the error sits", "",
             "Squared error in each tenth of the trial, as a fraction of the true rates' variance "
             "(the values average to 1 - R^2; `metrics.error_by_time`):", "",
             "| rates | " + " | ".join(f"bins {edges[i]}-{edges[i + 1] - 1}" for i in range(10))
             + " |", "|---" * 11 + "|"]
    for name, errs in r.error_by_time.items():
        lines.append(f"| {name} | " + " | ".join(f"{e:.3f}" for e in errs) + " |")
    return lines + [""]


def _member_lines(r: DemoResult) -> list[str]:
    if len(r.members) < 2:
        return []
    lines = ["## Ensemble", "",
             f"{len(r.members)} models of the same configuration, trained one after the other "
             "with different seeds, each for the training budget (`train/`, `train_1/`, ...):", "",
             "| model | seed | epochs | stopped by | best epoch | valid R^2 | refined |",
             "|---|---|---|---|---|---|---|"]
    for i, m in enumerate(r.members):
        refined = "-" if m.get("r2_refined") is None else f"{m['r2_refined']:.4f}"
        lines.append(f"| {i + 1} | {m['seed']} | {m['epochs']} | {m['stop_reason']} "
                     f"| {m['best_epoch']} | {m['r2']:.4f} | {refined} |")
    return lines + [""]


def _write_report(path: Path, r: DemoResult, ds: data.Dataset, model: LFADS, train_cfg,
                  fit, timings: dict, figures: list[str], n_samples: int, minutes: float,
                  quick: bool, burn_in_bins: int = 0, refine_steps: int = 0) -> None:
    mc = model.config
    per_epoch = fit.train_seconds / max(fit.epochs_this_call, 1)
    steps = fit.epochs * -(-ds.train.n_trials // train_cfg.batch_size)
    lines = [
        "# lfads_fast demo: chaotic RNN",
        "",
        f"Data: synth.chaotic_rnn{' (quick: small dataset)' if quick else ''}"
        f"{f' with burn_in_bins={burn_in_bins} (trials start on the attractor)' if burn_in_bins else ''}, "
        f"{ds.train.n_trials} train and {ds.valid.n_trials} valid trials, "
        f"{ds.encod_seq_len} bins x {ds.encod_data_dim} neurons (`data.h5`).",
        "",
        "Rates of the validation trials against the true rates (R^2 pooled over trials, bins "
        "and neurons; hyperparameters of the baselines chosen on the training trials):",
        "",
        "| method | valid R^2 |",
        "|---|---|",
        f"| LFADS ({n_samples} posterior samples averaged) | {r.r2_lfads:.4f} |",
    ]
    if r.r2_refined is not None:
        lines.append(f"| LFADS, initial conditions refined per trial ({refine_steps} steps, "
                     f"`posterior_refined.h5`) | {r.r2_refined:.4f} |")
    K = len(r.members)
    if r.r2_ensemble is not None:
        lines.append(f"| ensemble of {K} LFADS models, rates averaged (`ensemble.h5`) "
                     f"| {r.r2_ensemble:.4f} |")
    if r.r2_ensemble_refined is not None:
        lines.append(f"| ensemble of {K}, each with refined initial conditions "
                     f"(`ensemble_refined.h5`) | {r.r2_ensemble_refined:.4f} |")
    lines += [
        f"| best Gaussian smoothing (sigma = {r.sigma_bins:g} bins) | {r.r2_smoothing:.4f} |",
        f"| smoothing (sigma = {r.pca_sigma_bins:g} bins) + PCA ({r.pca_components} components) "
        f"| {r.r2_pca:.4f} |",
        "",
        "## Timing",
        "",
        "| stage | seconds |",
        "|---|---|",
        f"| data generation | {timings['data']:.1f} |",
        f"| baselines | {timings['baselines']:.1f} |",
        f"| training ({f'{len(r.members)} models; model 1: ' if len(r.members) > 1 else ''}"
        f"{fit.epochs} epochs, {steps} steps, {per_epoch:.2f} s/epoch; "
        f"stopped by {fit.stop_reason}) | {timings['train']:.1f} |",
        f"| posterior sampling ({n_samples} samples x {ds.train.n_trials + ds.valid.n_trials} "
        f"trials) | {timings['posterior']:.1f} |",
    ]
    if "refine" in timings:
        lines.append(f"| refinement of the initial conditions ({refine_steps} steps x "
                     f"{ds.valid.n_trials} valid trials) | {timings['refine']:.1f} |")
    if "ensemble" in timings:
        lines.append(f"| valid posteriors of the ensemble's models 2-{K}"
                     f"{', plain and refined' if refine_steps else ''} | {timings['ensemble']:.1f} |")
    lines += [
        f"| figures | {timings['figures']:.1f} |",
        f"| total | {timings['total']:.1f} |",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"{ops.get_num_threads()} kernel threads; Python {platform.python_version()}.",
        f"Training budget: {minutes:g} min. Best checkpoint: epoch {fit.best_epoch}.",
        "",
        *([f"Training stopped early: {fit.stop_message}", ""] if fit.stop_message else []),
        *_error_lines(r, ds.recon_seq_len),
        *_member_lines(r),
        "## Model",
        "",
        f"{model.num_params} parameters: ic_enc_dim {mc.ic_enc_dim}, ic_dim {mc.ic_dim}, "
        f"gen_dim {mc.gen_dim}, fac_dim {mc.fac_dim}, "
        f"{'no controller (co_dim 0)' if not mc.use_con else f'controller (co_dim {mc.co_dim})'}, dropout "
        f"{mc.dropout_rate}. Training: batch {train_cfg.batch_size}, lr {train_cfg.lr_init:g} "
        f"(x{train_cfg.lr_decay} after {train_cfg.lr_patience} epochs without improvement), "
        f"KL ramp over {train_cfg.kl_increase_epoch} epochs. Full configuration: "
        "`train/config.yaml`.",
        "",
        "## Files",
        "",
        "- `data.h5`: spikes and true rates (lfads-torch layout)",
        "- `posterior.h5`: posterior-averaged outputs of train and valid trials "
        "(lfads-torch keys, e.g. `valid_output_params`, `valid_factors`)",
    ]
    if r.r2_refined is not None:
        lines.append("- `posterior_refined.h5`: the valid trials' outputs from refined initial "
                     "conditions (`valid_ic_mean` holds them; docs/refine_ic.md)")
    lines += [
        "- `train/`: checkpoints (`checkpoints/best.h5`, `checkpoints/last.h5`), "
        "`log.csv`, `log.json`, `config.yaml`",
    ]
    lines += [f"- `{f}`" for f in figures]
    lines += [
        "",
        "Train on your own data: `lfads-fast train DATA.h5 --out run --config config.yaml`; "
        "posterior of a checkpoint: `lfads-fast infer run/checkpoints/best.h5 DATA.h5 --out "
        "posterior.h5`.",
        "",
    ]
    path.write_text("\n".join(lines))
