"""Population-based training (lfads-fast tune) against the fixed demo configuration, for the
same wall-clock time, on the demo's chaotic-RNN data.

    python bench/tune_quality.py --minutes 12 --population 8 [--interval 5] [--out DIR]

Arm 1 trains the demo's model and training configuration (lfads_fast.demo DEMO_MODEL,
DEMO_TRAIN; both threads) for the time budget. Arm 2 runs lfads-fast tune's population-based
training with AutoLFADS's default search space on the same model sizes for the same
wall-clock time (Ray's start included; one thread per member). Each arm's best checkpoint is
scored on the validation trials: valid_recon_smth (the metric PBT selects by), and the R^2 of
posterior-averaged rates (20 samples) against the true rates. Writes
bench/results/tune_quality_cpu.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from pathlib import Path

from lfads_fast import data, metrics, ops, posterior, synth
from lfads_fast.demo import DEMO_MODEL, DEMO_TRAIN
from lfads_fast.model import LFADS
from lfads_fast.train import Trainer, TrainConfig, config_for_data, load_checkpoint, load_model
from lfads_fast.tune import SearchSettings, run_search

RESULTS = Path(__file__).resolve().parent / "results" / "tune_quality_cpu.md"
SAMPLES = 20


def score(checkpoint: Path, ds) -> dict:
    ckpt = load_checkpoint(checkpoint)
    model = load_model(checkpoint)
    out = posterior.sample_and_average(model, ds.valid.encod_data, n_samples=SAMPLES)
    return {"r2": metrics.r2(out["output_params"], ds.valid.truth),
            "recon_smth": float(ckpt.state["early_stopping"]["best"]),
            "epochs": ckpt.epoch}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=12.0)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--out", default="tune_quality_out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = data.load_dataset(synth.save_h5(synth.chaotic_rnn(seed=0), out / "data.h5"))
    budget = args.minutes * 60
    model_cfg = config_for_data(ds, **DEMO_MODEL)

    ops.set_num_threads(2)
    t0 = time.perf_counter()
    trainer = Trainer(LFADS(model_cfg, seed=0), ds,
                      TrainConfig(**dict(DEMO_TRAIN, time_budget=budget)), out / "fixed",
                      progress=False)
    trainer.fit()
    fixed_s = time.perf_counter() - t0
    fixed = score(trainer.best_checkpoint, ds)

    t0 = time.perf_counter()
    train = {k: v for k, v in DEMO_TRAIN.items() if k != "time_budget_lr_factor"}
    result = run_search(ds, model_cfg, TrainConfig(**train), out / "pbt",
                        SearchSettings(population=args.population, time_budget=budget,
                                       perturbation_interval=args.interval, burn_in=None),
                        n_samples=0, verbose=0)
    pbt_s = time.perf_counter() - t0
    pbt = score(out / "pbt" / "checkpoints" / "best.h5", ds)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    lines = [
        "# PBT (lfads-fast tune) vs the fixed demo configuration, same wall-clock time",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"shared with other work while measured; commit {commit}",
        f"- data: synth.chaotic_rnn(seed=0), {ds.train.n_trials} train + {ds.valid.n_trials} "
        f"valid trials, {ds.encod_seq_len} bins x {ds.encod_data_dim} neurons",
        f"- model: DEMO_MODEL ({', '.join(f'{k}={v}' for k, v in DEMO_MODEL.items())})",
        f"- budget: {args.minutes:g} min per arm; fixed: DEMO_TRAIN, 2 threads; PBT: population "
        f"{args.population}, {args.interval} epochs per generation, AutoLFADS's default space "
        "(no controller: lr_init, dropout_rate, cd_rate, kl_ic_scale, l2_gen_scale), 1 thread "
        "per member, 2 members at a time, Ray's start included",
        f"- R^2: posterior-averaged rates ({SAMPLES} samples) of the best checkpoint against the "
        "true rates, validation trials",
        "",
        "| arm | wall s | epochs (best ckpt) | best valid_recon_smth | valid R^2 |",
        "|---|---|---|---|---|",
        f"| fixed demo config | {fixed_s:.0f} | {fixed['epochs']} | {fixed['recon_smth']:.5f} | "
        f"{fixed['r2']:.4f} |",
        f"| PBT x{args.population} | {pbt_s:.0f} | {pbt['epochs']} | {pbt['recon_smth']:.5f} | "
        f"{pbt['r2']:.4f} |",
        "",
        f"PBT: {len(result.generations)} generations, {len(result.exploits)} exploits, stopped by "
        f"{result.stop_reason}; best values "
        + ", ".join(f"{k}={v:.3g}" for k, v in result.best_values.items()),
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
