"""What refining the initial conditions per trial (refine.refine_ic) gains on demo runs, and
what it costs.

For each `lfads-fast demo --out DIR` run given, on its validation trials (DIR/data.h5, true
rates known): R^2 of the posterior-averaged rates (posterior.sample_and_average, 50 samples,
what `lfads-fast infer` writes by default) and of the rates from initial conditions refined
by each number of steps asked for (one pass per setting, timed, in this process), with the
squared error per tenth of the trial as a fraction of the rates' variance. A run made with
`--ensemble K` counts as its K models (DIR/train, DIR/train_1, ...). With several models of the
same data, also the ensembles: the rates averaged over each run's models and over all models,
from the posterior averages and from the refined initial conditions (the largest number of
steps).

    python bench/bench_refine_ic.py DIR [DIR ...] [--steps 10,20,50,100] [--lr 0.05]

Writes bench/results/refine_ic_cpu.md (or --out).
"""
import argparse
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import yaml

from lfads_fast import data, metrics, ops, posterior
from lfads_fast.train import load_model

RUN_FIELDS = ("ic_enc_dim", "ic_dim", "gen_dim", "fac_dim", "co_dim", "dropout_rate", "kl_ic_scale")


def tenths(pred, truth):
    return metrics.error_by_time(pred, truth, 10).tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", metavar="DIR", help="lfads-fast demo output directories")
    ap.add_argument("--steps", default="10,20,50,100", help="refinement steps to try")
    ap.add_argument("--lr", type=float, default=posterior.REFINE_LR)
    ap.add_argument("--samples", type=int, default=posterior.DEFAULT_SAMPLES)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "refine_ic_cpu.md"))
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]

    rows, runs = [], []
    plain, refined, truth = {}, {}, None  # run -> one array per model
    members = []
    for run in map(Path, args.runs):
        ds = data.load_dataset(run / "data.h5")
        if truth is not None and not np.array_equal(truth, ds.valid.truth):
            raise SystemExit(f"{run}: other validation trials than {args.runs[0]} (same data needed)")
        truth = ds.valid.truth
        train_dirs = [run / "train"] + sorted(run.glob("train_[0-9]*"), key=lambda p: int(p.name[6:]))
        members += [(run, d, ds.valid) for d in train_dirs]
    for run, train_dir, v in members:
        model = load_model(train_dir / "checkpoints" / "best.h5")
        name = run.name if train_dir.name == "train" else f"{run.name}/{train_dir.name}"
        settings = yaml.safe_load((train_dir / "config.yaml").read_text())
        with open(train_dir / "log.csv") as f:
            epochs = sum(1 for _ in f) - 1
        runs.append(f"- `{name}`: " + ", ".join(f"{k} {val}" for k, val in settings["model"].items()
                                                 if k in RUN_FIELDS)
                    + f"; lr_patience {settings['train']['lr_patience']}, batch "
                    f"{settings['train']['batch_size']}, seed {settings['train']['seed']}; "
                    f"{epochs} epochs")
        t0 = time.perf_counter()
        out = posterior.sample_and_average(model, v.encod_data, v.ext_input, n_samples=args.samples)
        secs = time.perf_counter() - t0
        rows.append((name, f"{args.samples} posterior samples averaged", secs,
                     metrics.r2(out["output_params"], v.truth), tenths(out["output_params"], v.truth)))
        plain.setdefault(run.name, []).append(out["output_params"])
        print(rows[-1][:4], flush=True)
        for k in steps:
            t0 = time.perf_counter()
            out = posterior.sample_and_average(model, v.encod_data, v.ext_input, refine_steps=k,
                                               refine_lr=args.lr)
            secs = time.perf_counter() - t0
            rows.append((name, f"refined, {k} steps (lr {args.lr:g})", secs,
                         metrics.r2(out["output_params"], v.truth),
                         tenths(out["output_params"], v.truth)))
            print(rows[-1][:4], flush=True)
        refined.setdefault(run.name, []).append(out["output_params"])

    groups = [(f"ensemble of `{r}`'s {len(plain[r])}", [r]) for r in plain if len(plain[r]) > 1]
    if len(plain) > 1:
        groups.append((f"ensemble of all {len(members)}", list(plain)))
    for label, names in groups:
        for what, by_run in ((f"{args.samples} posterior samples averaged", plain),
                             (f"refined, {steps[-1]} steps (lr {args.lr:g})", refined)):
            rates = np.mean([a for r in names for a in by_run[r]], axis=0, dtype=np.float64)
            rows.append((label, what, float("nan"), metrics.r2(rates, truth), tenths(rates, truth)))
            print(rows[-1][:4], flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    n_valid = truth.shape[0]
    lines = [
        "# Refining the initial conditions per trial",
        "",
        f"Validation trials of each run ({n_valid} trials x {truth.shape[1]} bins x "
        f"{truth.shape[2]} neurons). Commit {commit}, {platform.machine()}, "
        f"{ops.get_num_threads()} kernel threads.",
        "",
        "Squared error per tenth of the trial, as a fraction of the rates' variance; seconds "
        f"for all {n_valid} trials:",
        "",
        "| run | rates | seconds | valid R^2 | " + " | ".join(f"{i + 1}/10" for i in range(10)) + " |",
        "|---|---|---|---|" + "---|" * 10,
    ]
    for name, what, secs, r2, prof in rows:
        name = name if name.startswith("ensemble of") else f"`{name}`"
        secs = "-" if np.isnan(secs) else f"{secs:.1f}"
        lines.append(f"| {name} | {what} | {secs} | {r2:.4f} | "
                     + " | ".join(f"{e:.3f}" for e in prof) + " |")
    lines += ["", "Runs (`lfads-fast demo --out NAME`):", ""] + runs
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
