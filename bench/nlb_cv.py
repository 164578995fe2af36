"""K-fold cross-validation of LFADS configurations on NLB tensors (lfads_fast.nlb.cross_validate),
with NLB's smoothing baseline in the same folds; one configuration per call.

    python bench/nlb_cv.py DATA.h5 --name defaults --out runs/cv [--kfold 5] [--epochs 500]
        [--set model.dropout_rate=0.1 ...] [--preset lfads_torch_mc_maze_small] [--folds 0,1]

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
    args = p.parse_args(argv)
    ops.set_num_threads(args.threads)
    model_fields, train_fields = load_config(None, args.set, args.preset)
    train_fields.setdefault("max_epochs", args.epochs)
    tensors = nlb.read_nlb_tensors(args.data)["train"]
    folds = None if args.folds is None else [int(f) for f in args.folds.split(",")]
    start = time.perf_counter()
    out = os.path.join(args.out, args.name)
    summary = nlb.cross_validate(tensors, args.kfold, out, model_fields=model_fields,
                                 train_fields=train_fields, seed=args.seed,
                                 n_samples=args.samples, folds=folds)
    summary["config"] = {"preset": args.preset, "overrides": args.set, "epochs": args.epochs, "kfold": args.kfold,
                         "seed": args.seed, "samples": args.samples, "threads": args.threads,
                         "wall_seconds": time.perf_counter() - start}
    nlb.write_json(os.path.join(out, "cv.json"), summary)
    m = summary["mean"]
    print(args.name, " ".join(f"{k}: co-bps {v['co_bps']:.4f} vel R2 {v['vel_r2']:.4f} "
                              f"fp-bps {v['fp_bps']:.4f}" for k, v in m.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
