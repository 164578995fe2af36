"""lfads_fast against framework implementations of the same math, on the CPU, in one run.

Frameworks (each proven to compute the same loss and gradients as lfads_fast by
tests/test_frameworks.py and tests/test_model.py):
- ``torch``: the PyTorch reference (tests/torch_reference.py), eager, torch.optim.Adam;
- ``torch_compile``: the same with its clipped GRU cell compiled by torch.compile (the whole
  step unrolled over T steps takes minutes to compile at NLB sizes; compiling the cell is the
  documented way to compile a hand-written RNN);
- ``jax``: tests/jax_reference.py, lax.scan recurrences, the whole step (loss, gradients and
  Adam) one jax.jit program with donated buffers;
- ``lfads_fast``: model.loss_and_grads + ops.adam_step.

Workloads: ``step`` (one training step at the NLB-5ms and small sizes), ``sweep`` (the small
model's step over batch sizes and sequence lengths), ``posterior`` (posterior sampling: trial-
samples per second of the sampled forward pass, no gradients), ``neighbour`` (lfads_fast's
NLB-5ms step beside a busy-looping process at nice 19 on one core, against its idle time).

Every thread count runs in its own process pinned to that many cores (os.sched_setaffinity)
with every framework set to that many threads (torch.set_num_threads, XLA's intra-op pool,
ops.set_num_threads). Times are medians over --repeats steps after a warm-up; the spread is
the min-max of those steps. Compile time (first call minus a steady step) is reported apart.

    python bench/bench_frameworks.py [--threads 1,2] [--workloads step,sweep,posterior,neighbour]
        [--frameworks lfads_fast,torch,torch_compile,jax] [--repeats 3] [--quick]

Writes bench/results/frameworks_cpu.md and frameworks_cpu.png (speed-up against batch size and
sequence length).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# numpy's own BLAS single-threaded, as in make demo; set before bench_step imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(HERE))
from bench_step import CONFIGS, SPIKE_RATE, spikes  # noqa: E402  (the sizes of bench_step.py)
from machine import commit, cpu_name  # noqa: E402

FRAMEWORKS = ("lfads_fast", "torch", "torch_compile", "jax")
WORKLOADS = ("step", "sweep", "posterior", "neighbour")
SWEEP_BATCH = (16, 64, 256, 1024)
SWEEP_T = (50, 100, 200, 500)
POSTERIOR_BATCH = 256  # trial-samples per forward pass
AVG_SAMPLES = 16  # samples per trial of the sample_and_average row
DATA_RATE = SPIKE_RATE  # mean spike count per bin of the data (a child sets --rate)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default=",".join(sorted({"1", str(os.cpu_count() or 1)}, key=int)))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, default=SPIKE_RATE,
                    help="mean spike count per bin of the data (default: MC_Maze_Small's at 5 ms)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes and one repeat: checks that every path runs")
    ap.add_argument("--out", default=str(HERE / "results" / "frameworks_cpu.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    for name in args.frameworks.split(","):
        if name not in FRAMEWORKS:
            ap.error(f"--frameworks: unknown framework {name!r}; expected some of {FRAMEWORKS}")
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            ap.error(f"--workloads: unknown workload {name!r}; expected some of {WORKLOADS}")

    rows, meta = [], None
    for n in (int(t) for t in args.threads.split(",")):
        cmd = [sys.executable, __file__, "--child", str(n), "--workloads", args.workloads,
               "--frameworks", args.frameworks, "--repeats", str(args.repeats), "--rate", str(args.rate)]
        if args.quick:
            cmd.append("--quick")
        # Progress (stderr) shows as it happens; a child that dies names its thread count.
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            sys.exit(f"the {n}-thread run failed (exit code {out.returncode})")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        meta = meta or result["meta"]
        rows += result["rows"]
    text = report(rows, meta, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    png = Path(args.out).with_suffix(".png")
    if plot(rows, png):
        print(f"written to {args.out} and {png}")
    else:
        print(f"written to {args.out}")


# One thread count, in its own process


def child(args):
    n = int(args.child)
    cores = sorted(os.sched_getaffinity(0))[:n]
    os.sched_setaffinity(0, cores)
    os.environ["XLA_FLAGS"] = (f"--xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'} "
                               f"intra_op_parallelism_threads={n}")
    sys.path.insert(0, str(HERE.parent / "tests"))
    import numpy as np
    import torch

    from lfads_fast import ops

    torch.set_num_threads(n)
    ops.set_num_threads(n)
    frameworks = args.frameworks.split(",")
    workloads = args.workloads.split(",")
    repeats = 1 if args.quick else args.repeats
    rows = []
    global DATA_RATE
    DATA_RATE = args.rate

    def log(msg):
        print(f"[{n} thread{'s' if n > 1 else ''}] {msg}", file=sys.stderr, flush=True)

    configs = dict(CONFIGS)
    sweep_b, sweep_t = SWEEP_BATCH, SWEEP_T
    if args.quick:
        configs = {k: dict(v, batch=8, encod_seq_len=10, recon_seq_len=12) for k, v in CONFIGS.items()}
        sweep_b, sweep_t = (8, 16), (10, 20)
    if "step" in workloads:
        for name, spec in configs.items():
            for fw in frameworks:
                log(f"step {name} {fw}")
                rows.append(dict(workload="step", config=name, threads=n, framework=fw,
                                 batch=spec["batch"], T=spec["recon_seq_len"],
                                 **time_step(fw, spec, repeats)))
    if "sweep" in workloads:
        base = configs["small"]
        points = [dict(base, batch=b) for b in sweep_b]
        points += [dict(base, encod_seq_len=t, recon_seq_len=t) for t in sweep_t
                   if t != base["recon_seq_len"]]
        for spec in points:
            for fw in frameworks:
                log(f"sweep B={spec['batch']} T={spec['recon_seq_len']} {fw}")
                rows.append(dict(workload="sweep", config="small", threads=n, framework=fw,
                                 batch=spec["batch"], T=spec["recon_seq_len"],
                                 **time_step(fw, spec, repeats)))
    if "posterior" in workloads:
        # NLB-5ms: 256 trial-samples per pass; small: its training batch (16).
        for name, batch in (("nlb5ms", 8 if args.quick else POSTERIOR_BATCH),
                            ("small", configs["small"]["batch"])):
            spec = dict(configs[name], batch=batch)
            for fw in frameworks:
                log(f"posterior {name} {fw}")
                r = time_posterior(fw, spec, repeats)
                r["samples_per_s"] = spec["batch"] / r["median"]
                rows.append(dict(workload="posterior", config=name, threads=n, framework=fw,
                                 batch=spec["batch"], T=spec["recon_seq_len"], **r))
            if "lfads_fast" in frameworks:
                # As shipped: posterior.sample_and_average runs the encoders once per trial
                # and the rest of the pass per sample (the rows above run everything per row).
                log(f"posterior {name} sample_and_average lfads_fast")
                r = time_sample_and_average(spec, repeats)
                rows.append(dict(workload="posterior_avg", config=name, threads=n,
                                 framework="lfads_fast",
                                 batch=max(spec["batch"] // AVG_SAMPLES, 1) * AVG_SAMPLES,
                                 T=spec["recon_seq_len"], **r))
    if "neighbour" in workloads and "lfads_fast" in frameworks:
        spec = configs["nlb5ms"]
        log("neighbour: idle")
        idle = time_step("lfads_fast", spec, repeats)
        busy = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"])
        try:
            os.sched_setaffinity(busy.pid, cores[:1])
            log("neighbour: beside a nice-19 busy loop")
            loaded = time_step("lfads_fast", spec, repeats)
        finally:
            busy.kill()
            busy.wait()
        rows.append(dict(workload="neighbour", config="nlb5ms", threads=n, framework="lfads_fast",
                         batch=spec["batch"], T=spec["recon_seq_len"], **loaded,
                         idle_median=idle["median"]))
    meta = dict(cpu=cpu_name(), cores=os.cpu_count(), commit=commit(),
                python=platform.python_version(), numpy=np.__version__, torch=torch.__version__,
                jax=_version("jax"), repeats=repeats, quick=bool(args.quick), rate=args.rate,
                load=os.getloadavg()[0])
    print(json.dumps(dict(rows=rows, meta=meta)))


def time_step(fw, spec, repeats):
    """Median, min, max seconds of one training step (forward + backward + Adam), and the
    compile time (first call minus the median) for the compiling frameworks."""
    cfg, encod, recon, model, noise = _setup(spec)
    if fw == "lfads_fast":
        import numpy as np

        from lfads_fast import ops

        batch = model.make_batch(encod, recon)
        m, v = np.zeros_like(model.flat), np.zeros_like(model.flat)
        state = {"step": 0}

        def run():
            state["step"] += 1
            _, grad = model.loss_and_grads(batch, noise)
            ops.adam_step(model.flat, grad, m, v, lr=1e-3, step=state["step"], max_grad_norm=200.0)
    elif fw in ("torch", "torch_compile"):
        run = _torch_step(cfg, model, encod, recon, noise, compiled=fw == "torch_compile")
    else:
        run = _jax_step(cfg, model, encod, recon, noise)
    return _timed(run, repeats)


def time_posterior(fw, spec, repeats):
    """Seconds of one sampled forward pass over spec['batch'] trial-samples (no gradients)."""
    cfg, encod, recon, model, noise = _setup(spec, dropout=False)
    sample_noise = {k: noise[k] for k in ("ic_eps", "co_eps") if noise.get(k) is not None}
    if fw == "lfads_fast":
        def run():  # the rates, as the frameworks' passes return
            model.forward(encod, sample=True, seed=0, outputs="output_params")
    elif fw in ("torch", "torch_compile"):
        import torch

        import torch_reference as ref

        cell = ref._clipped_gru_cell
        if fw == "torch_compile":
            ref._clipped_gru_cell = _compiled(torch, cell)
        p = {k: torch.tensor(v) for k, v in model.params.items()}
        inputs = ref._prepare_inputs(cfg, encod, recon, None, sample_noise, torch.float32)

        def run():
            with torch.inference_mode():
                torch.exp(ref._forward(p, cfg, inputs)["log_rates"])
        try:
            return _timed(run, repeats)
        finally:
            ref._clipped_gru_cell = cell
    else:
        import jax
        import numpy as np

        import jax_reference as jref

        p, inputs = jref.device_inputs(dict(model.params), cfg, encod, recon, None, sample_noise,
                                       np.float32)
        forward = jref.make_forward(cfg)

        def run():
            jax.block_until_ready(forward(p, inputs)["output_params"])
    return _timed(run, repeats)


def time_sample_and_average(spec, repeats):
    """Seconds of posterior.sample_and_average over spec['batch'] trial-samples:
    AVG_SAMPLES samples of spec['batch'] / AVG_SAMPLES trials."""
    from lfads_fast import posterior

    cfg, encod, recon, model, noise = _setup(spec, dropout=False)
    trials = encod[: max(spec["batch"] // AVG_SAMPLES, 1)]
    r = _timed(lambda: posterior.sample_and_average(model, trials, n_samples=AVG_SAMPLES),
               repeats)
    r["samples_per_s"] = trials.shape[0] * AVG_SAMPLES / r["median"]
    return r


def _setup(spec, dropout=True, rate=None):
    import numpy as np

    from lfads_fast import LFADS, LFADSConfig

    spec = dict(spec)
    B = spec.pop("batch")
    cfg = LFADSConfig(**spec, dropout_rate=0.05 if dropout else 0.0, l2_gen_scale=1e-4,
                      l2_con_scale=1e-4)
    encod, recon = spikes(cfg, B, DATA_RATE if rate is None else rate, np.random.default_rng(0))
    model = LFADS(cfg, seed=0)
    noise = model.draw_noise(B, np.random.default_rng(1))
    return cfg, encod, recon, model, noise


def _compiled(torch, cell):
    """torch.compile of the GRU cell, one specialisation per (size, stride) variant: the
    model has up to seven GRUs and each sees a broadcast and a dense state, more variants
    than dynamo's default recompile limit of 8 (past it, calls silently run eager)."""
    torch._dynamo.config.recompile_limit = 64
    return torch.compile(cell, dynamic=False)


def _torch_step(cfg, model, encod, recon, noise, compiled):
    import torch

    import torch_reference as ref

    eager_cell = ref._clipped_gru_cell
    if compiled:
        ref._clipped_gru_cell = _compiled(torch, eager_cell)
    p = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    opt = torch.optim.Adam(list(p.values()), lr=1e-3)
    inputs = ref._prepare_inputs(cfg, encod, recon, None, noise, torch.float32)

    def run():
        opt.zero_grad(set_to_none=True)
        out = ref._forward(p, cfg, inputs)
        loss = cfg.loss_scale * (
            ref._recon_loss(cfg, out["log_rates"], inputs) + ref._l2_penalty(p, cfg)
            + cfg.kl_ic_scale * ref._kl_ic(cfg, out["ic_mean"], out["ic_std"], p["ic_prior_mean"])
            + cfg.kl_co_scale * ref._kl_co_ar1(out["co_means"], out["co_stds"],
                                               inputs["co_kl_eps"], p["co_prior_logtau"],
                                               p["co_prior_lognvar"]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), 200.0)
        opt.step()

    run.restore = lambda: setattr(ref, "_clipped_gru_cell", eager_cell)
    return run


def _jax_step(cfg, model, encod, recon, noise):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_reference as jref

    p, inputs = jref.device_inputs(dict(model.params), cfg, encod, recon, None, noise, np.float32)
    loss_and_grads = jref.make_loss_and_grads(cfg)

    def update(p, m, v, step, inputs):
        _, g = loss_and_grads(p, inputs)
        norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(g)))
        scale = jnp.minimum(1.0, 200.0 / (norm + 1e-6))
        b1, b2, lr, eps = 0.9, 0.999, 1e-3, 1e-8
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g * scale, m, g)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * (g * scale) ** 2, v, g)
        c1, c2 = 1 - b1**step, 1 - b2**step
        p = jax.tree_util.tree_map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps),
                                   p, m, v)
        return p, m, v

    update = jax.jit(update, donate_argnums=(0, 1, 2))
    state = {"p": p, "m": jax.tree_util.tree_map(jnp.zeros_like, p),
             "v": jax.tree_util.tree_map(jnp.zeros_like, p), "step": 0}

    def run():
        state["step"] += 1
        state["p"], state["m"], state["v"] = update(state["p"], state["m"], state["v"],
                                                    jnp.float32(state["step"]), inputs)
        jax.block_until_ready(state["p"])

    return run


def _timed(run, repeats):
    import statistics

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    if hasattr(run, "restore"):
        run.restore()
    med = statistics.median(times)
    return dict(median=med, min=min(times), max=max(times), compile=max(first - med, 0.0))


# Report


def report(rows, meta, args) -> str:
    lines = [
        "# lfads_fast against framework implementations of the same math (CPU)",
        "",
        f"- machine: {meta['cpu']}, {meta['cores']} cores; each thread count in its own process "
        "pinned to that many cores, every framework on that many threads",
        f"- commit: {meta['commit']}; python {meta['python']}, numpy {meta['numpy']}, "
        f"torch {meta['torch']}, jax {meta['jax']}",
        f"- data: Poisson spike counts, mean {meta.get('rate', 0.3)} per bin (MC_Maze_Small at 5 ms: 0.022)",
        f"- float32; median of {meta['repeats']} timed calls after one warm-up call (spread: "
        "min-max); compile = first call minus the median",
        f"- 1-minute load average at the end of the last process: {meta['load']:.2f} (it counts the "
        "benchmark's own busy threads, up to the thread count; more means other work shared the cores)",
        f"- command: `python bench/bench_frameworks.py {' '.join(_cli_args(args))}`".rstrip(),
        "",
    ]
    by = {}
    for r in rows:
        by.setdefault((r["workload"], r["config"], r["threads"], r["batch"], r["T"]), {})[r["framework"]] = r
    fws = [f for f in FRAMEWORKS if any(r["framework"] == f for r in rows)]
    others = [f for f in fws if f != "lfads_fast"]
    for workload, title, unit in (("step", "Training step (forward + backward + Adam)", "ms"),
                                  ("sweep", "Training step, small model: batch and sequence length", "ms"),
                                  ("posterior", "Posterior sampling (sampled forward pass, no gradients)", "ms")):
        keys = [k for k in by if k[0] == workload]
        if not keys:
            continue
        lines += [f"## {title}", "",
                  "| config | threads | batch | T | " + " | ".join(f"{f} ({unit})" for f in fws)
                  + " | " + " | ".join(f"vs {f}" for f in others) + " |",
                  "|---" * (4 + len(fws) + len(others)) + "|"]
        for k in keys:
            cells = by[k]
            row = f"| {k[1]} | {k[2]} | {k[3]} | {k[4]} | "
            row += " | ".join(_cell(cells.get(f)) for f in fws)
            ours = cells.get("lfads_fast")
            row += " | " + " | ".join(
                f"{cells[f]['median'] / ours['median']:.1f}x" if ours and f in cells else "-"
                for f in others) + " |"
            lines.append(row)
        if workload == "posterior":
            lines += ["", "Trial-samples per second: " + "; ".join(
                f"{r['config']} {r['framework']} {r['threads']} thr {r['samples_per_s']:.0f}"
                for r in rows if r["workload"] == "posterior")]
            lines += ["", f"lfads_fast as shipped, posterior.sample_and_average ({AVG_SAMPLES} "
                      "samples per trial, the encoders run once per trial and the rest per "
                      "sample; the rows above run everything per row, as the frameworks' "
                      "implementations do): " + "; ".join(
                          f"{r['config']} {r['threads']} thr {r['median'] * 1e3:.1f} ms per "
                          f"{r['batch']} trial-samples, {r['samples_per_s']:.0f} trial-samples/s"
                          for r in rows if r["workload"] == "posterior_avg")]
        lines.append("")
    comp = [r for r in rows if r["framework"] in ("torch_compile", "jax") and r["workload"] == "step"]
    if comp:
        lines += ["## Compile times (first call minus a steady call)", "",
                  "| workload | config | threads | framework | compile (s) |", "|---|---|---|---|---|"]
        lines += [f"| {r['workload']} | {r['config']} | {r['threads']} | {r['framework']} | "
                  f"{r['compile']:.1f} |" for r in comp]
        lines.append("")
    nb = [r for r in rows if r["workload"] == "neighbour"]
    if nb:
        lines += ["## Beside a busy neighbour (a nice-19 busy loop pinned to one of the cores)", "",
                  "| config | threads | idle (ms) | with neighbour (ms) | slowdown |", "|---|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['threads']} | {r['idle_median'] * 1e3:.1f} | "
                  f"{r['median'] * 1e3:.1f} | {r['median'] / r['idle_median']:.2f}x |" for r in nb]
        lines.append("")
    return "\n".join(lines)


def _cell(r):
    if r is None:
        return "-"
    return f"{r['median'] * 1e3:.1f} ({r['min'] * 1e3:.0f}-{r['max'] * 1e3:.0f})"


def _cli_args(args):
    out = [f"--threads {args.threads}", f"--repeats {args.repeats}"]
    if args.workloads != ",".join(WORKLOADS):
        out.append(f"--workloads {args.workloads}")
    if args.frameworks != ",".join(FRAMEWORKS):
        out.append(f"--frameworks {args.frameworks}")
    if args.rate != SPIKE_RATE:
        out.append(f"--rate {args.rate}")
    if args.quick:
        out.append("--quick")
    return out


def plot(rows, path) -> bool:
    """Speed-up of lfads_fast over each framework against batch size and sequence length."""
    sweep = [r for r in rows if r["workload"] == "sweep"]
    if not sweep:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    T0 = min(r["T"] for r in sweep if r["batch"] == min(x["batch"] for x in sweep))
    B0 = min(r["batch"] for r in sweep)
    threads = sorted({r["threads"] for r in sweep})
    for ax, axis, fixed, label in ((axes[0], "batch", ("T", None), "batch size"),
                                   (axes[1], "T", ("batch", B0), "sequence length T")):
        for n in threads:
            ours = {(r["batch"], r["T"]): r["median"] for r in sweep
                    if r["threads"] == n and r["framework"] == "lfads_fast"}
            for fw in sorted({r["framework"] for r in sweep} - {"lfads_fast"}):
                pts = sorted((r[axis], r["median"] / ours[(r["batch"], r["T"])])
                             for r in sweep if r["threads"] == n and r["framework"] == fw
                             and (r["batch"], r["T"]) in ours
                             and (r["T"] == T0 if axis == "batch" else r["batch"] == fixed[1]))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"vs {fw}, {n} thread{'s' if n > 1 else ''}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("lfads_fast speed-up (framework time / lfads_fast time)")
    axes[0].set_title(f"small model, T = {T0}")
    axes[1].set_title(f"small model, batch {B0}")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


if __name__ == "__main__":
    main()
