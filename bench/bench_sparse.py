"""The encoders' input projection and its weight gradient at the NLB-5ms size, through the
products over the nonzero counts (ops.matmul(sparse=...)) and the dense ones, against the
fraction of nonzero entries: where the dense product catches up (ops.SPARSE_MAX_DENSITY).

Shapes: x [35840, 138] (256 trials x 140 bins, 137 neurons and the column of ones that carries
the bias), W [1080, 138] (the four encoder GRUs' input weights), d [35840, 1080]. Counts are
Poisson of the given means; MC_Maze_Small at 5 ms has 2.2% of its bins nonzero (0.022 spikes
per bin), 4.2% at 10 ms and 9.8% at 25 ms. Each thread count runs in its own process pinned
to that many cores.

    python bench/bench_sparse.py [--threads 1,2] [--repeats 5] [--out bench/results/sparse_cpu.md]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import commit, cpu_name  # noqa: E402

RATES = (0.022, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
M, K, N = 35840, 138, 1080


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "results" / "sparse_cpu.md"))
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeats)))
        return
    results = {}
    for n in (int(t) for t in args.threads.split(",")):
        cmd = [sys.executable, __file__, "--child", str(n), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            sys.exit(f"the {n}-thread run failed (exit code {out.returncode})")
        results[n] = json.loads(out.stdout.strip().splitlines()[-1])
    meta = next(iter(results.values()))["meta"]
    lines = [
        "# Sparse encoder input: products over the nonzero counts against dense ones (CPU)",
        "",
        f"- machine: {meta['cpu']}, {meta['cores']} cores; each thread count in its own process "
        "pinned to that many cores",
        f"- commit: {meta['commit']}; python {meta['python']}, numpy {meta['numpy']}",
        f"- x [{M}, {K}] (Poisson counts and a column of ones), W [{N}, {K}], d [{M}, {N}]; float32; "
        f"median of {args.repeats} calls after one warm-up",
        f"- ops.SPARSE_MAX_DENSITY (the switch-over) at this commit: {meta['switch']}",
        f"- command: `python bench/bench_sparse.py --threads {args.threads} --repeats {args.repeats}`",
        "",
        "| threads | mean count | nonzero fraction | x W^T sparse (ms) | x W^T dense (ms) | ratio "
        "| d^T x sparse (ms) | d^T x dense (ms) | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in results.items():
        for row in r["rows"]:
            lines.append(f"| {n} | {row['rate']} | {row['density']:.3f} | {row['fwd_sparse']:.1f} | "
                         f"{row['fwd_dense']:.1f} | {row['fwd_dense'] / row['fwd_sparse']:.2f}x | "
                         f"{row['grad_sparse']:.1f} | {row['grad_dense']:.1f} | "
                         f"{row['grad_dense'] / row['grad_sparse']:.2f}x |")
    lines += ["", "ratio: dense time over sparse time (above 1: the product over the nonzeros wins).", ""]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    print(f"written to {args.out}")


def child(n: int, repeats: int) -> dict:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
    import numpy as np

    from lfads_fast import ops

    ops.set_num_threads(n)
    rng = np.random.default_rng(0)
    W = rng.standard_normal((N, K), dtype=np.float32)
    d = rng.standard_normal((M, N), dtype=np.float32)
    out = np.empty((M, N), np.float32)
    dW = np.empty((N, K), np.float32)
    switch = ops.SPARSE_MAX_DENSITY

    def timed(fn, sparse: bool) -> float:
        fn = functools.partial(fn, "a" if sparse else None)  # None: the dense product alone
        ops.SPARSE_MAX_DENSITY = 1.0
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times)) * 1e3

    rows = []
    for rate in RATES:
        x = rng.poisson(rate, (M, K)).astype(np.float32)
        x[:, -1] = 1

        def fwd(sparse):
            ops.matmul(x, W.T, out=out, sparse=sparse)

        def grad(sparse):
            ops.matmul(d.T, x, out=dW, sparse=sparse and "b")

        rows.append(dict(rate=rate, density=float((x != 0).mean()),
                         fwd_sparse=timed(fwd, True), fwd_dense=timed(fwd, False),
                         grad_sparse=timed(grad, True), grad_dense=timed(grad, False)))
        print(f"[{n} thr] rate {rate} done", file=sys.stderr, flush=True)
    ops.SPARSE_MAX_DENSITY = switch
    meta = dict(cpu=cpu_name(), cores=os.cpu_count(), commit=commit(), python=platform.python_version(),
                numpy=np.__version__, switch=switch)
    return dict(rows=rows, meta=meta)


if __name__ == "__main__":
    main()
