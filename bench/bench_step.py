"""One LFADS training step (forward + backward + Adam) of lfads_fast against PyTorch, same run.

The baseline is the independent PyTorch implementation of the same equations that the tests
use (tests/torch_reference.py: eager, step-by-step recurrence as in lfads-torch), float32,
with torch.optim.Adam, on the same number of threads. Both get identical parameters, data,
dropout masks and sampling noise. Prints a header (machine, commit, threads, sizes), the
median step times, the ratio, and the fraction of this machine's SGEMM rate reached by
lfads_fast; writes the table to bench/results/step_cpu.md.

    python bench/bench_step.py [--threads 1,2] [--repeats 5] [--configs nlb5ms,small]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

# As given to this process (import lfads_fast sets OMP_WAIT_POLICY=PASSIVE when it is unset;
# torch, imported first, reads the value given here).
ENV_AT_START = {k: os.environ.get(k, "(unset)") for k in ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS")}
# numpy's own BLAS single-threaded unless the caller chose, as make demo and
# bench_frameworks.py do: its idle threads otherwise spin beside the kernels' (a 2-thread
# NLB-5ms step took 789 ms against 616 ms with it set, on a 2-core host).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import commit, cpu_name  # noqa: E402

CONFIGS = {
    # The NLB MC_Maze 5 ms configuration (137 held-in + 45 held-out channels, 140 + 40 bins).
    "nlb5ms": dict(batch=256, encod_data_dim=137, recon_data_dim=182, encod_seq_len=140,
                   recon_seq_len=180, ic_enc_dim=100, ci_enc_dim=80, con_dim=80, co_dim=4,
                   ic_dim=100, gen_dim=100, fac_dim=40),
    "small": dict(batch=16, encod_data_dim=50, recon_data_dim=50, encod_seq_len=100,
                  recon_seq_len=100, ic_enc_dim=64, ci_enc_dim=64, con_dim=64, co_dim=4,
                  ic_dim=64, gen_dim=64, fac_dim=64),
}

# Mean spike count per bin of the benchmarks' data: that of MC_Maze_Small at 5 ms (0.022; 2.2%
# of its bins hold a spike), so that the encoders' input is as sparse as a recording's and
# takes the sparse input products (ops.matmul(sparse=...)). --rate 0.3 gives the denser data
# of earlier runs (26% of bins nonzero), which take the dense products.
SPIKE_RATE = 0.022


def spikes(cfg, B, rate, rng):
    """Poisson counts of the given mean per bin: encod [B, T_e, N_e] and recon [B, T_r, N_r]
    (its first bins and channels are encod's), float32."""
    encod = rng.poisson(rate, (B, cfg.encod_seq_len, cfg.encod_data_dim)).astype(np.float32)
    recon = rng.poisson(rate, (B, cfg.recon_seq_len, cfg.recon_data_dim)).astype(np.float32)
    recon[:, : cfg.encod_seq_len, : cfg.encod_data_dim] = encod
    return encod, recon


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default=",".join(sorted({"1", str(os.cpu_count() or 1)}, key=int)),
                    help="comma-separated thread counts, each used by both (default: 1 and all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs", default="nlb5ms,small")
    ap.add_argument("--rate", type=float, default=SPIKE_RATE,
                    help="mean spike count per bin of the data (default: MC_Maze_Small's at 5 ms)")
    ap.add_argument("--out", default=str(HERE / "results" / "step_cpu.md"))
    args = ap.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]

    import torch

    from lfads_fast import LFADS, LFADSConfig, ops

    rates = {}
    for n in thread_counts:
        ops.set_num_threads(n)
        rates[n] = measure_sgemm_gflops()
    header = [
        "# One training step on the CPU: lfads_fast vs PyTorch (same math)",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores; both run on the same thread count",
        f"- commit: {commit()}",
        f"- python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}",
        "- environment at start: " + ", ".join(f"{k}={v}" for k, v in ENV_AT_START.items())
        + " (OPENBLAS_NUM_THREADS=1 when unset)",
        "- dtype: float32; step = forward + backward + Adam; median of "
        f"{args.repeats} steps after 1 warm-up; data: Poisson counts, mean {args.rate} per bin",
        "- measured SGEMM rate (2048^3, the kernels' own OpenBLAS through ops.matmul): "
        + ", ".join(f"{rates[n]:.1f} GFLOP/s on {n} thread{'s' if n > 1 else ''}"
                    for n in thread_counts),
        "",
        "| config | batch | threads | lfads_fast (ms) | PyTorch eager (ms) | speed-up | GEMM GFLOP/step | floor (ms) | fraction of floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows = []
    for name in args.configs.split(","):
        spec = dict(CONFIGS[name])
        B = spec.pop("batch")
        cfg = LFADSConfig(**spec, dropout_rate=0.05, l2_gen_scale=1e-4, l2_con_scale=1e-4)
        encod, recon = spikes(cfg, B, args.rate, np.random.default_rng(0))
        for n in thread_counts:
            torch.set_num_threads(n)
            ops.set_num_threads(n)
            model = LFADS(cfg, seed=0)
            batch = model.make_batch(encod, recon)
            noise = model.draw_noise(B, np.random.default_rng(1))
            t_fast = time_fast(model, batch, noise, args.repeats)
            t_torch = time_torch(model, cfg, encod, recon, noise, args.repeats)
            gflop = step_gflop(cfg, B)
            floor = gflop / rates[n] * 1e3
            row = (f"| {name} | {B} | {n} | {t_fast * 1e3:.1f} | {t_torch * 1e3:.1f} | "
                   f"{t_torch / t_fast:.1f}x | {gflop:.2f} | {floor:.1f} | "
                   f"{floor / (t_fast * 1e3):.2f} |")
            print(row, flush=True)
            rows.append(row)
    notes = [
        "",
        "GEMM GFLOP/step counts the matrix products of forward and backward (backward = 2x",
        "forward: input and weight gradients); the floor is that count at the SGEMM rate",
        "measured on the same number of threads. Elementwise work (gates, exp, lgamma) is not",
        "counted.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(header + rows + notes) + "\n")
    print("\n".join(notes))
    print(f"written to {args.out}")


def time_fast(model, batch, noise, repeats):
    from lfads_fast import ops

    m = np.zeros_like(model.flat)
    v = np.zeros_like(model.flat)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        _, grad = model.loss_and_grads(batch, noise)
        ops.adam_step(model.flat, grad, m, v, lr=1e-3, step=i + 1, max_grad_norm=200.0)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def time_torch(model, cfg, encod, recon, noise, repeats):
    import torch

    import torch_reference as ref

    p = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    opt = torch.optim.Adam(list(p.values()), lr=1e-3)
    inputs = ref._prepare_inputs(cfg, encod, recon, None, noise, torch.float32)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch_loss(p, cfg, inputs).backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), 200.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def torch_loss(p, cfg, inputs):
    """The total loss of tests/torch_reference.py (full ramps) for parameters p and inputs."""
    import torch_reference as ref

    out = ref._forward(p, cfg, inputs)
    recon_loss = ref._recon_loss(cfg, out["log_rates"], inputs)
    kl_ic = ref._kl_ic(cfg, out["ic_mean"], out["ic_std"], p["ic_prior_mean"])
    kl_co = ref._kl_co_ar1(out["co_means"], out["co_stds"], inputs["co_kl_eps"],
                           p["co_prior_logtau"], p["co_prior_lognvar"])
    l2 = ref._l2_penalty(p, cfg)
    return cfg.loss_scale * (recon_loss + l2 + cfg.kl_ic_scale * kl_ic + cfg.kl_co_scale * kl_co)


def step_gflop(cfg, B) -> float:
    """Matrix-product GFLOP of one step (forward + backward = 3x forward)."""
    Te, Tr, Ne, Nr = cfg.encod_seq_len, cfg.recon_seq_len, cfg.encod_data_dim, cfg.recon_data_dim
    Hi, Hc, C, U, G, F = cfg.ic_enc_dim, cfg.ci_enc_dim, cfg.con_dim, cfg.co_dim, cfg.gen_dim, cfg.fac_dim
    per_te = 2 * (2 * 3 * Hi * (Ne + Hi)) + 2 * (2 * 3 * Hc * (Ne + Hc))
    per_tr = 2 * (3 * C * (2 * Hc + F + C) + 2 * U * C + 3 * G * (U + G) + F * G + Nr * F)
    return 3 * B * (Te * per_te + Tr * per_tr) / 1e9


def measure_sgemm_gflops() -> float:
    """SGEMM rate of the OpenBLAS the kernels call, on the kernels' current thread count."""
    from lfads_fast import ops

    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    c = np.empty_like(a)
    ops.matmul(a, a, out=c)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        ops.matmul(a, a, out=c)
        times.append(time.perf_counter() - t0)
    return 2 * 2048**3 / min(times) / 1e9


if __name__ == "__main__":
    main()
