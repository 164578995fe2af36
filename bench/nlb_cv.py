"""K-fold cross-validation of LFADS configurations on NLB tensors (lfads_fast.nlb.cross_validate),
with NLB's smoothing baseline in the same folds; one configuration per call.

    python bench/nlb_cv.py DATA.h5 --name defaults --out runs/cv [--kfold 5] [--epochs 500]
        [--set model.dropout_rate=0.1 ...] [--preset lfads_torch_mc_maze_small] [--folds 0,1]
    python bench/nlb_cv.py DATA.h5 --name pbt --out runs/cv --search pbt --population 8
        --search-seconds 720 [--interval 25] [--cpus-per-trial 1] [--preset nlb]

With --search, each fold's model is the best member of a hyperparameter search
(lfads_fast.tune: AutoLFADS's population-based training or random search, Ray Tune) run on
the fold's training and validation trials for --search-seconds; --epochs is then each
member's max_epochs.

Writes OUT/NAME/cv.json (per fold and mean/std of co-bps, fp-bps, velocity R^2 for LFADS and
smoothing, epochs, best epoch, divergences, train seconds) and prints one summary line.
Budgeted by epochs (--epochs), not wall time, so that runs on a shared machine compare.
"""
import argparse
import os
import sys
import time

from lfads_fast import nlb, ops
from lfads_fast.cli import load_config
from lfads_fast.presets import PRESETS

def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kfold", type=int, default=5)
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--folds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--search", choices=("pbt", "random"))
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--search-seconds", type=float, help="per fold")
    p.add_argument("--interval", type=int, default=25)
    p.add_argument("--cpus-per-trial", type=int, default=1)
    p.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--reuse", action="store_true",
                   help="score the finished searches already in the folds' directories")
    args = p.parse_args(argv)
    ops.set_num_threads(args.threads)
    model_fields, train_fields = load_config(None, args.set, args.preset)
    train_fields.setdefault("max_epochs", args.epochs)
    tensors = nlb.read_nlb_tensors(args.data)["train"]
    folds = None if args.folds is None else [int(f) for f in args.folds.split(",")]
    fit = None
    if args.search:
        from lfads_fast import tune

        if args.ray_cpus:
            import ray

            # A Ray instance of its own ("local"), so that runs side by side do not share one.
            ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False,
                     configure_logging=False)
        fit = tune.cv_fit(tune.SearchSettings(
            mode=args.search, population=args.population, perturbation_interval=args.interval,
            cpus_per_trial=args.cpus_per_trial, time_budget=args.search_seconds,
            seed=args.seed), reuse=args.reuse)
    start = time.perf_counter()
    out = os.path.join(args.out, args.name)
    summary = nlb.cross_validate(tensors, args.kfold, out, model_fields=model_fields,
                                 train_fields=train_fields, seed=args.seed,
                                 n_samples=args.samples, folds=folds, fit_fold=fit)
    summary["config"] = {"preset": args.preset, "overrides": args.set, "epochs": args.epochs, "kfold": args.kfold,
                         "seed": args.seed, "samples": args.samples, "threads": args.threads,
                         "search": None if not args.search else {
                             "mode": args.search, "population": args.population,
                             "seconds_per_fold": args.search_seconds,
                             "interval": args.interval, "cpus_per_trial": args.cpus_per_trial},
                         "wall_seconds": time.perf_counter() - start}
    nlb.write_json(os.path.join(out, "cv.json"), summary)
    m = summary["mean"]
    print(args.name, " ".join(f"{k}: co-bps {v['co_bps']:.4f} vel R2 {v['vel_r2']:.4f} "
                              f"fp-bps {v['fp_bps']:.4f}" for k, v in m.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
