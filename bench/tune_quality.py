"""Population-based training (lfads-fast tune) against the fixed demo configuration, for the
same compute time, on the demo's chaotic-RNN data.

    python bench/tune_quality.py --minutes 12 --population 8 [--interval 5] [--out DIR]
    # or each arm on a core of its own, side by side, then the report:
    taskset -c 1 python bench/tune_quality.py --arms fixed --threads 1 --minutes 45 --out DIR &
    taskset -c 0 python bench/tune_quality.py --arms pbt --ray-cpus 1 --minutes 45 --out DIR
    python bench/tune_quality.py --report --out DIR

Arm "fixed" trains the demo's model and training configuration (lfads_fast.demo DEMO_MODEL,
DEMO_TRAIN) for the time budget on --threads threads. Arm "pbt" runs lfads-fast tune's
population-based training with AutoLFADS's default search space on the same model sizes for
the same wall-clock time (Ray's start included; one thread per member; --ray-cpus members at
a time, default all cores). Each arm's best checkpoint is scored on the validation trials:
valid_recon_smth (the metric PBT selects by), and the R^2 of posterior-averaged rates (20
samples) against the true rates. Each arm writes DIR/arm_<name>.json; once both are there,
bench/results/tune_quality_cpu.md is written.
"""
from __future__ import annotations

import argparse
import json
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
    return {"r2": float(metrics.r2(out["output_params"], ds.valid.truth)),
            "recon_smth": float(ckpt.state["early_stopping"]["best"]),
            "epochs": ckpt.epoch}


def run_fixed(ds, model_cfg, budget: float, threads: int, out: Path) -> dict:
    ops.set_num_threads(threads)
    t0 = time.perf_counter()
    trainer = Trainer(LFADS(model_cfg, seed=0), ds,
                      TrainConfig(**dict(DEMO_TRAIN, time_budget=budget)), out / "fixed",
                      progress=False)
    res = trainer.fit()
    return {"wall_s": time.perf_counter() - t0, "threads": threads,
            "epochs_trained": res.epochs, "stop_reason": res.stop_reason,
            **score(trainer.best_checkpoint, ds)}


def run_pbt(ds, model_cfg, budget: float, population: int, interval: int, ray_cpus: int | None,
            out: Path, resume: bool = False) -> dict:
    if ray_cpus:
        import ray

        ray.init(address="local", num_cpus=ray_cpus, include_dashboard=False,
                 configure_logging=False)
    t0 = time.perf_counter()
    train = {k: v for k, v in DEMO_TRAIN.items() if k != "time_budget_lr_factor"}
    result = run_search(ds, model_cfg, TrainConfig(**train), out / "pbt",
                        SearchSettings(population=population, time_budget=budget,
                                       perturbation_interval=interval, burn_in=None),
                        n_samples=0, verbose=0, resume=resume)
    return {"wall_s": time.perf_counter() - t0, "resumed": resume, "ray_cpus": ray_cpus or os.cpu_count(),
            "population": population, "interval": interval,
            "generations": len(result.generations), "exploits": len(result.exploits),
            "member_epochs": sum(t["epochs"] for t in result.trials),
            "stop_reason": result.stop_reason, "best_values": result.best_values,
            **score(out / "pbt" / "checkpoints" / "best.h5", ds)}


def report(out: Path) -> None:
    arms = {name: json.loads((out / f"arm_{name}.json").read_text()) for name in ("fixed", "pbt")}
    fixed, pbt = arms["fixed"], arms["pbt"]
    ds = data.load_dataset(out / "data.h5")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    lines = [
        "# PBT (lfads-fast tune) vs the fixed demo configuration, same compute time",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"commit {commit}",
        f"- data: synth.chaotic_rnn(seed=0), {ds.train.n_trials} train + {ds.valid.n_trials} "
        f"valid trials, {ds.encod_seq_len} bins x {ds.encod_data_dim} neurons",
        f"- model: DEMO_MODEL ({', '.join(f'{k}={v}' for k, v in DEMO_MODEL.items())})",
        f"- budget: {fixed['minutes']:g} min per arm; fixed: DEMO_TRAIN on {fixed['threads']} "
        f"thread(s); PBT: population {pbt['population']}, {pbt['interval']} epochs per "
        "generation, AutoLFADS's default space (no controller: lr_init, dropout_rate, cd_rate, "
        f"kl_ic_scale, l2_gen_scale), 1 thread per member, {pbt['ray_cpus']} member(s) at a "
        "time, Ray's start included",
        f"- R^2: posterior-averaged rates ({SAMPLES} samples) of the best checkpoint against the "
        "true rates, validation trials",
        "",
        "| arm | wall s | epochs trained | epochs (best ckpt) | best valid_recon_smth | "
        "valid R^2 |",
        "|---|---|---|---|---|---|",
        f"| fixed demo config | {fixed['wall_s']:.0f} | {fixed['epochs_trained']} | "
        f"{fixed['epochs']} | {fixed['recon_smth']:.5f} | {fixed['r2']:.4f} |",
        f"| PBT x{pbt['population']} | {pbt['wall_s']:.0f} | {pbt['member_epochs']} (all "
        f"members) | {pbt['epochs']} | {pbt['recon_smth']:.5f} | {pbt['r2']:.4f} |",
        "",
        f"PBT: {pbt['generations']} generations, {pbt['exploits']} exploits, stopped by "
        f"{pbt['stop_reason']}; best values "
        + ", ".join(f"{k}={v:.3g}" for k, v in pbt["best_values"].items()),
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=12.0)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--arms", default="fixed,pbt")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="fixed arm")
    p.add_argument("--ray-cpus", type=int, help="PBT arm: CPUs of its own Ray instance")
    p.add_argument("--report", action="store_true", help="only write the report")
    p.add_argument("--resume", action="store_true",
                   help="PBT arm: go on with an interrupted search in DIR/pbt")
    p.add_argument("--out", default="tune_quality_out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        path = out / "data.h5"
        if not path.exists():
            synth.save_h5(synth.chaotic_rnn(seed=0), path)
        ds = data.load_dataset(path)
        budget = args.minutes * 60
        model_cfg = config_for_data(ds, **DEMO_MODEL)
        for arm in args.arms.split(","):
            if arm == "fixed":
                r = run_fixed(ds, model_cfg, budget, args.threads, out)
            elif arm == "pbt":
                r = run_pbt(ds, model_cfg, budget, args.population, args.interval,
                            args.ray_cpus, out, resume=args.resume)
            else:
                raise SystemExit(f"--arms: fixed or pbt, got {arm!r}")
            (out / f"arm_{arm}.json").write_text(json.dumps(dict(r, minutes=args.minutes),
                                                            indent=1))
    if all((out / f"arm_{a}.json").exists() for a in ("fixed", "pbt")):
        report(out)


if __name__ == "__main__":
    main()
