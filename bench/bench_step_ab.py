"""The CPU training step of two checkouts of lfads_fast, interleaved in one sitting.

For a refactor that must cost nothing: each round runs a fresh process per checkout and
config (order alternating between rounds, so that drifting load on a shared machine falls on
both alike), one thread, and the medians over all steps of all rounds are compared.

    python bench/bench_step_ab.py BEFORE_DIR AFTER_DIR [--rounds 4]

BEFORE_DIR and AFTER_DIR are directories holding an importable lfads_fast (with its
compiled module), e.g. a `git worktree` of the earlier commit after `make inplace`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = [("small", 16, 20), ("nlb5ms", 32, 6)]  # config of bench_step.py, batch, steps per run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    trees = {"before": args.before, "after": args.after}
    times = {(name, tag): [] for name, _, _ in CASES for tag in trees}
    for rnd in range(args.rounds):
        for name, B, steps in CASES:
            for tag in (("before", "after") if rnd % 2 == 0 else ("after", "before")):
                env = dict(os.environ, PYTHONPATH=os.path.abspath(trees[tag]), OMP_NUM_THREADS="1",
                           OPENBLAS_NUM_THREADS="1")
                out = subprocess.check_output([sys.executable, __file__, "x", "x", "--child", name,
                                               str(B), str(steps)], env=env, cwd="/")
                times[(name, tag)] += json.loads(out)
    for name, B, _ in CASES:
        b, a = (statistics.median(times[(name, t)]) for t in ("before", "after"))
        print(f"{name} B={B}: before {b * 1e3:.1f} ms, after {a * 1e3:.1f} ms, after/before "
              f"{a / b:.3f} ({len(times[(name, 'before')])} steps each)")


def child(name: str, B: str, steps: str) -> None:
    import numpy as np

    sys.path.insert(0, str(HERE))
    from bench_step import CONFIGS

    from lfads_fast import LFADS, LFADSConfig, ops

    B, steps = int(B), int(steps)
    ops.set_num_threads(1)
    spec = dict(CONFIGS[name])
    spec.pop("batch")
    cfg = LFADSConfig(**spec, dropout_rate=0.05, l2_gen_scale=1e-4, l2_con_scale=1e-4)
    rng = np.random.default_rng(0)
    encod = rng.poisson(0.3, (B, cfg.encod_seq_len, cfg.encod_data_dim)).astype(np.float32)
    recon = rng.poisson(0.3, (B, cfg.recon_seq_len, cfg.recon_data_dim)).astype(np.float32)
    recon[:, : cfg.encod_seq_len, : cfg.encod_data_dim] = encod
    model = LFADS(cfg, seed=0)
    batch = model.make_batch(encod, recon)
    m, v = np.zeros_like(model.flat), np.zeros_like(model.flat)
    noise_rng = np.random.default_rng(1)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        noise = model.draw_noise(batch, noise_rng)
        _, grad = model.loss_and_grads(batch, noise)
        ops.adam_step(model.flat, grad, m, v, lr=1e-3, step=i + 1, max_grad_norm=200.0)
        times.append(time.perf_counter() - t0)
    print(json.dumps(times[1:]))


if __name__ == "__main__":
    main()
