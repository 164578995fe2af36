"""Per-op profile of one lfads_fast training step on 1 and 2 threads: where the second thread
gains and where it does not.

The step is bench_step.py's (model.loss_and_grads + ops.adam_step, float32, same data, noise
and sizes). The model layer reaches the compiled kernels only through the module-level
functions of lfads_fast.ops, looked up as ``ops.<name>`` at every call; this script replaces
those functions (KERNEL_OPS) by timing wrappers while a step runs. Per op it reports calls per
step, the median milliseconds per step, the share of the step, GFLOP/s where the op is made of
matrix products (FLOPs from the arguments' shapes), the cores busy during the op (process CPU
time / wall time; idle OpenMP threads sleep under OMP_WAIT_POLICY=PASSIVE, so 2.0 means both
threads worked throughout), and the 2-thread speed-up. "Python layer" is the step's wall time
minus the timed calls: the model layer's own numpy work, on one thread.

Every thread count runs in its own process pinned to that many cores (os.sched_setaffinity),
as in bench_frameworks.py. Wrapped and unwrapped steps alternate after the warm-up, so the
wrappers' cost shows as the difference of the two medians.

    python bench/profile_step.py [--config nlb5ms|small] [--threads 1,2] [--steps 5]
        [--warmup 1] [--out bench/results/profile_step_cpu.md]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# bench_frameworks sets numpy's own BLAS single-threaded (as make demo does) before numpy loads.
from bench_frameworks import _setup  # noqa: E402
from bench_step import CONFIGS, SPIKE_RATE, measure_sgemm_gflops, step_gflop  # noqa: E402
from machine import commit, cpu_name  # noqa: E402

# The functions of lfads_fast.ops that call the compiled kernels.
KERNEL_OPS = ("matmul", "gru_forward", "gru_backward", "decoder_forward", "decoder_backward",
              "poisson_elbo", "kl_ic", "kl_co", "adam_step")
REST = "Python layer (rest of the step)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="nlb5ms", choices=sorted(CONFIGS))
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (each wrapped and unwrapped)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rate", type=float, default=SPIKE_RATE,
                    help="mean spike count per bin of the data (default: MC_Maze_Small's at 5 ms)")
    ap.add_argument("--out", default=str(HERE / "results" / "profile_step_cpu.md"))
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.config, args.steps, args.warmup, args.rate)))
        return
    env = {k: os.environ.get(k, "(unset)") for k in ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS")}
    results = {}
    for n in (int(t) for t in args.threads.split(",")):
        print(f"[{n} thread{'s' if n > 1 else ''}] profiling {args.config}", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--child", str(n), "--config", args.config,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--rate", str(args.rate)]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            sys.exit(f"the {n}-thread run failed (exit code {out.returncode})")
        results[n] = json.loads(out.stdout.strip().splitlines()[-1])
    text = report(results, args, env)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    print(f"written to {args.out}")


# One thread count, in its own process


def child(n: int, config: str, steps: int, warmup: int, rate: float) -> dict:
    cores = sorted(os.sched_getaffinity(0))[:n]
    os.sched_setaffinity(0, cores)
    load_at_start = os.getloadavg()
    import numpy as np

    from lfads_fast import ops

    ops.set_num_threads(n)
    spec = CONFIGS[config]
    _, encod, recon, model, noise = _setup(spec, rate=rate)
    batch = model.make_batch(encod, recon)
    m, v = np.zeros_like(model.flat), np.zeros_like(model.flat)
    count = {"step": 0}

    def step():
        count["step"] += 1
        t0 = time.perf_counter()
        _, grad = model.loss_and_grads(batch, noise)
        ops.adam_step(model.flat, grad, m, v, lr=1e-3, step=count["step"], max_grad_norm=200.0)
        return time.perf_counter() - t0

    timer = OpTimer(ops)
    for _ in range(warmup):
        step()
        with timer:
            step()
    plain, wrapped, per_step, skipped = [], [], [], []
    for _ in range(steps):
        plain.append(step())
        timer.calls.clear()
        with timer:
            wall = step()
        wrapped.append(wall)
        per_step.append(timer.summary(wall))
        skipped.append(timer.skipped)
    keys = {k for s in per_step for k in s}
    ops_summary = {k: {f: statistics.median(s.get(k, {}).get(f, 0.0) for s in per_step)
                       for f in ("calls", "wall", "cpu", "flop")} for k in keys}
    return dict(threads=n, cores=cores, load_at_start=load_at_start, load_at_end=os.getloadavg(),
                plain=statistics.median(plain), wrapped=statistics.median(wrapped),
                wrapped_range=(min(wrapped), max(wrapped)), ops=ops_summary,
                sgemm_gflops=measure_sgemm_gflops(),
                step_gflop=step_gflop(model.config, spec["batch"]),
                done_gflop=step_gflop(model.config, spec["batch"]) - statistics.median(skipped) / 1e9,
                meta=dict(cpu=cpu_name(), ncpu=os.cpu_count(), commit=commit(),
                          python=platform.python_version(), numpy=np.__version__))


class OpTimer:
    """While entered (``with timer:``), every call of the KERNEL_OPS functions of module
    `ops` is timed (wall and process CPU time) and recorded in ``calls`` with its FLOPs."""

    def __init__(self, ops):
        self.ops = ops
        self.originals = {name: getattr(ops, name) for name in KERNEL_OPS}
        self.calls: list[tuple[str, str, float, float, float]] = []  # op, label, wall, cpu, flop
        self.skipped = 0.0  # FLOPs of the dense math that sparse products did not do

    def __enter__(self):
        for name, fn in self.originals.items():
            setattr(self.ops, name, self._timed(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(self.ops, name, fn)

    def _timed(self, name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            c0, t0 = time.process_time(), time.perf_counter()
            result = fn(*args, **kwargs)
            t1, c1 = time.perf_counter(), time.process_time()
            if name == "matmul" and kwargs.get("sparse"):
                # Counting the nonzeros is left to summary(), outside the step's time (the
                # operand is a workspace buffer that no later call of the step overwrites).
                flop = functools.partial(_matmul_flop, *args, **kwargs)
            else:
                flop = FLOP[name](*args, **kwargs)
            self.calls.append((name, _label(name, args, sys._getframe(1)), t1 - t0, c1 - c0, flop))
            return result

        return timed

    def summary(self, step_wall: float) -> dict:
        """Per op (and per matmul call site): calls, wall and CPU seconds, FLOPs of the
        recorded calls; REST gets the step's wall time not spent in them."""
        out: dict = {}
        self.skipped = 0.0
        for name, label, wall, cpu, flop in self.calls:
            if callable(flop):  # a sparse product: the FLOPs it skipped of the dense ones
                counted = flop()
                self.skipped += _matmul_flop(*flop.args[:2]) - counted
                flop = counted
            for key in {name, label}:
                s = out.setdefault(key, dict(calls=0, wall=0.0, cpu=0.0, flop=0.0))
                s["calls"] += 1
                s["wall"] += wall
                s["cpu"] += cpu
                s["flop"] += flop
        timed = sum(c[2] for c in self.calls)
        out[REST] = dict(calls=0, wall=step_wall - timed, cpu=float("nan"), flop=0.0)
        return out


def _label(name: str, args: tuple, caller) -> str:
    """matmul calls are told apart by shape and call site; other ops by name."""
    if name != "matmul":
        return name
    (M, K), N = args[0].shape, args[1].shape[1]
    site = f"{Path(caller.f_code.co_filename).stem}.{caller.f_code.co_name}"
    return f"matmul [{M}x{K}]·[{K}x{N}] ({site})"


# FLOPs of the matrix products of each op (0 for the elementwise ones), from the arguments'
# shapes; backward = 2x forward (input and weight gradients).

def _matmul_flop(a, b, *_, sparse=None, **__):
    """A product over the nonzeros of its sparse operand (ops.matmul(sparse=...), taken when
    at most SPARSE_MAX_DENSITY of the operand's entries are nonzero, as the kernel decides)
    counts the FLOPs it does: 2 per nonzero and output column."""
    dense = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    if sparse is None:
        return dense
    import numpy as np

    from lfads_fast import ops

    x = a if sparse == "a" else b
    frac = float(np.count_nonzero(x)) / max(x.size, 1)
    return dense * frac if frac <= ops.SPARSE_MAX_DENSITY else dense


def _gru_forward_flop(xproj, x_offset, W_hh, *_, **__):
    T, B = xproj.shape[:2]
    return 2.0 * T * B * W_hh.size


def _gru_backward_flop(W_hh, h0, hs, *_, **__):
    T, B = hs.shape[:2]
    return 2 * 2.0 * T * B * W_hh.size


def _decoder_forward_flop(inputs, T, *_, **__):
    B = inputs["g0"].shape[0]
    per_row = inputs["W_gen_hh"].size + inputs["W_fac"].size + (
        inputs["W_gen_u"].size + inputs["W_con_f"].size + inputs["W_con_hh"].size + inputs["W_co"].size
        if inputs.get("W_con_hh") is not None else 0)
    return 2.0 * T * B * per_row


def _decoder_backward_flop(inputs, outputs, *_, **__):
    return 2 * _decoder_forward_flop(inputs, outputs["gen_states"].shape[0])


def _poisson_elbo_flop(factors, W_ro, *_, grads=True, **__):
    return (3 if grads else 1) * 2.0 * factors.shape[0] * W_ro.size


def _no_flop(*_, **__):
    return 0.0


FLOP = dict(matmul=_matmul_flop, gru_forward=_gru_forward_flop, gru_backward=_gru_backward_flop,
            decoder_forward=_decoder_forward_flop, decoder_backward=_decoder_backward_flop,
            poisson_elbo=_poisson_elbo_flop, kl_ic=_no_flop, kl_co=_no_flop, adam_step=_no_flop)


# Report


def report(results: dict, args, env: dict) -> str:
    threads = sorted(results)
    first = results[threads[0]]
    meta = first["meta"]
    spec = CONFIGS[args.config]
    lines = [
        f"# Per-op profile of one training step on the CPU ({args.config})",
        "",
        f"- machine: {meta['cpu']}, {meta['ncpu']} cores; each thread count in its own process "
        "pinned to that many cores",
        f"- commit: {meta['commit']}; python {meta['python']}, numpy {meta['numpy']}",
        "- environment at start: " + ", ".join(f"{k}={v}" for k, v in env.items())
        + " (numpy's BLAS single-threaded; import lfads_fast sets OMP_WAIT_POLICY=PASSIVE when unset)",
        "- load average (1 min) at the start of each run: "
        + ", ".join(f"{results[n]['load_at_start'][0]:.2f} ({n} thr)" for n in threads),
        "- dtype: float32; step = model.loss_and_grads + ops.adam_step (bench/bench_step.py's step)",
        "- sizes: " + ", ".join(f"{k}={v}" for k, v in spec.items()),
        f"- data: Poisson spike counts, mean {args.rate} per bin (MC_Maze_Small at 5 ms: 0.022)",
        f"- {args.warmup} warm-up step(s), then medians over {args.steps} steps per thread count; "
        f"command: `python bench/profile_step.py --config {args.config} --threads {args.threads} "
        f"--steps {args.steps} --warmup {args.warmup} --rate {args.rate}`",
        "- SGEMM rate (2048^3 through ops.matmul): " + ", ".join(
            f"{results[n]['sgemm_gflops']:.1f} GFLOP/s on {n} thr" for n in threads),
        "",
        "## Step",
        "",
        "| threads | step, unwrapped (ms) | step, wrapped (ms) | wrapped min-max (ms) | wrapper cost "
        "| GEMM GFLOP/step | fraction of SGEMM floor | GEMM GFLOP done | fraction of floor, FLOPs done |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in threads:
        r = results[n]
        floor = r["step_gflop"] / r["sgemm_gflops"]
        done = r.get("done_gflop", r["step_gflop"])
        lines.append(f"| {n} | {r['plain'] * 1e3:.1f} | {r['wrapped'] * 1e3:.1f} | "
                     f"{r['wrapped_range'][0] * 1e3:.1f}-{r['wrapped_range'][1] * 1e3:.1f} | "
                     f"{(r['wrapped'] / r['plain'] - 1) * 100:+.1f}% | {r['step_gflop']:.2f} | "
                     f"{floor / r['plain']:.2f} | {done:.2f} | "
                     f"{done / r['sgemm_gflops'] / r['plain']:.2f} |")
    lines += ["", "GEMM GFLOP/step counts the matrix products of the dense math (bench_step.step_gflop); "
              "GFLOP done counts the encoder input's products by their nonzero counts where the "
              "sparse products ran (ops.matmul(sparse=...))."]
    if len(threads) >= 2:
        a, b = results[threads[0]], results[threads[-1]]
        lines.append(f"\nStep speed-up {threads[0]} -> {threads[-1]} threads (unwrapped): "
                     f"{a['plain'] / b['plain']:.2f}x.")
    lines += ["", "## Per op", ""]
    cols = ["op", "calls/step"]
    for n in threads:
        cols += [f"{n} thr ms", f"{n} thr share", f"{n} thr GFLOP/s", f"{n} thr busy cores"]
    if len(threads) >= 2:
        cols += ["speed-up", "lost vs ideal (ms)"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lo, hi = threads[0], threads[-1]
    # Ops by their 1-thread time, then the matmul breakdown, then the Python layer.
    keys = sorted({k for n in threads for k in results[n]["ops"]},
                  key=lambda k: (k == REST, k.startswith("matmul "),
                                 -results[lo]["ops"].get(k, {}).get("wall", 0)))
    for key in keys:
        row = [f"&nbsp;&nbsp;{key}" if key.startswith("matmul ") else key,
               f"{results[lo]['ops'].get(key, {}).get('calls', 0):g}"]
        for n in threads:
            s = results[n]["ops"].get(key, dict(calls=0, wall=0.0, cpu=float("nan"), flop=0.0))
            wall = s["wall"]
            row += [f"{wall * 1e3:.1f}", f"{wall / results[n]['wrapped'] * 100:.1f}%",
                    f"{s['flop'] / wall / 1e9:.1f}" if s["flop"] and wall > 0 else "",
                    f"{s['cpu'] / wall:.2f}" if wall > 0 and s["cpu"] == s["cpu"] else ""]
        if len(threads) >= 2:
            w_lo = results[lo]["ops"].get(key, {}).get("wall", 0.0)
            w_hi = results[hi]["ops"].get(key, {}).get("wall", 0.0)
            row += [f"{w_lo / w_hi:.2f}x" if w_hi > 0 else "",
                    f"{(w_hi - w_lo * lo / hi) * 1e3:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "ms: median per step of the op's calls (wall); share: of the wrapped step. GFLOP/s counts",
        "the op's matrix products from its arguments' shapes (GRU: the recurrent products; decoder:",
        "every per-step product; read-out: forward, factor and weight gradients; backward ops 2x",
        "forward). Busy cores: the process's CPU time during the op over its wall time. Speed-up:",
        f"{lo}-thread time over {hi}-thread time. Lost vs ideal: {hi}-thread time minus "
        f"{lo}-thread time x {lo}/{hi},",
        "the milliseconds that perfect scaling would save (summed over the ops, about the step's).",
        "The indented rows break `matmul` down by shape and call site. Python layer: the wrapped",
        "step's wall time minus all timed calls (the model layer's numpy work, on one thread, and",
        "call overhead).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
