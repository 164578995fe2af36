"""What streaming costs in accuracy: models trained with the causal options against the
bidirectional model, the same data and the same training time, scored by the valid R^2 of
their posterior-mean rates against the true rates (the demo's synthetic chaotic-RNN data).

Variants (all with the demo's model and training settings, lfads_fast/demo.py):
  bidirectional   IC from all bins (window mode only)
  ic_first_K      IC from the first K bins (streamable: no controller)
  ic_first_K_con  IC from the first K bins + a causal controller (ci_enc_causal), co_dim 4

    python bench/bench_causal_cost.py [--minutes 4] [--ic-bins 10] [--variants a,b,c]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from lfads_fast import data, metrics, ops, synth  # noqa: E402
from lfads_fast.demo import DEMO_MODEL, DEMO_TRAIN  # noqa: E402
from lfads_fast.model import LFADS  # noqa: E402
from lfads_fast.train import Trainer, TrainConfig, config_for_data, load_model  # noqa: E402


def variants(K):
    return {
        "bidirectional": {},
        f"ic_first_{K}": dict(ic_enc_seq_len=K),
        f"ic_first_{K}_con": dict(ic_enc_seq_len=K, ci_enc_causal=True, co_dim=4, ci_enc_dim=32,
                                  con_dim=32),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=4.0, help="training time per variant")
    ap.add_argument("--ic-bins", type=int, default=10, help="ic_enc_seq_len of the causal variants")
    ap.add_argument("--variants", default=None, help="comma-separated subset (default all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "causal_cost_cpu.md"))
    args = ap.parse_args()
    ops.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="causal_cost_"))
    sd = synth.chaotic_rnn(seed=args.seed)
    ds = data.load_dataset(synth.save_h5(sd, tmp / "data.h5"))
    all_v = variants(args.ic_bins)
    chosen = args.variants.split(",") if args.variants else list(all_v)
    K = args.ic_bins
    rows = []
    for name in chosen:
        cfg = config_for_data(ds, **{**DEMO_MODEL, **all_v[name]})
        model = LFADS(cfg, seed=args.seed)
        tc = TrainConfig(**{**DEMO_TRAIN, "seed": args.seed, "time_budget": 60.0 * args.minutes})
        fit = Trainer(model, ds, tc, tmp / name, progress=False).fit()
        best = load_model(fit.best_checkpoint)
        rates = best.forward(ds.valid.encod_data)["output_params"]
        truth = ds.valid.truth
        row = (name, fit.epochs, metrics.r2(rates, truth), metrics.r2(rates[:, :K], truth[:, :K]),
               metrics.r2(rates[:, K:], truth[:, K:]))
        rows.append(row)
        print(row, flush=True)
    lines = [
        "# What causality costs (synthetic chaotic-RNN data)",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} thread(s); shared with other "
        "engineers' work during the run (epochs reached in the budget vary with the load)",
        f"- commit: {commit()}; data: synth.chaotic_rnn(seed={args.seed}) ({ds.train.n_trials} train / "
        f"{ds.valid.n_trials} valid trials, {ds.encod_seq_len} bins x {ds.encod_data_dim} neurons)",
        f"- model and training: lfads_fast.demo's (gen 100, fac 40, ic_enc 32, ic_dim 32, dropout 0.1), "
        f"{args.minutes:g} min each; R^2 of the posterior-mean rates (LFADS.forward, which the "
        "real-time library reproduces) against the true rates, valid trials",
        "",
        f"| variant | epochs | R^2 all bins | R^2 first {K} bins | R^2 after bin {K} |",
        "|---|---|---|---|---|",
    ]
    for name, ep, a, b, c in rows:
        lines.append(f"| {name} | {ep} | {a:.4f} | {b:.4f} | {c:.4f} |")
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
