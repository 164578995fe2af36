"""One LFADS training step on a GPU: lfads_fast against PyTorch (same math), same run.

lfads_fast runs the model on the device (LFADS(cfg, device="cuda"): the CUDA kernels through
ops, noise drawn on the device, fused Adam); the baseline is the independent PyTorch
implementation of the same equations that the tests use (tests/torch_reference.py, eager, the
step-by-step recurrence of lfads-torch) with torch.optim.Adam on the same GPU, optionally also
under torch.compile (--compile; compile time is reported, not timed). Both get identical
parameters and data; lfads_fast draws its noise on the device every step, as in training (its
time includes that), the baseline reuses one draw. Times are medians over --repeats steps after --warmup, measured
with CUDA events around whole steps (the host waits for the device at the end of each).
Prints a header (device, driver, commit, sizes) and writes the table to --out.

    python bench/bench_step_gpu.py [--batches 16,...,1024] [--repeats 10] [--compile]

--device cpu runs the same script on the CPU (a smoke test of the script itself).
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from bench_step import CONFIGS, commit, step_gflop, torch_loss  # noqa: E402

GPU_CONFIGS = {
    "nlb5ms": CONFIGS["nlb5ms"],
    "nlb5ms_gen200": dict(CONFIGS["nlb5ms"], gen_dim=200),
    "small": CONFIGS["small"],
}
TORCH_BATCHES = (256,)  # the eager baseline is slow: measured at the reference batch only


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (smoke test)")
    ap.add_argument("--configs", default="nlb5ms,nlb5ms_gen200")
    ap.add_argument("--batches", default="16,32,64,128,256,512,1024")
    ap.add_argument("--torch-batches", default=",".join(map(str, TORCH_BATCHES)),
                    help="batches at which the PyTorch baselines run (empty: none)")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--out", default=str(HERE / "results" / "step_gpu.md"))
    args = ap.parse_args()

    import torch

    from lfads_fast import LFADS, LFADSConfig, ops

    ops.check_device(args.device)
    timer = Timer(args.device)
    header = [
        "# One training step on a GPU: lfads_fast vs PyTorch (same math)",
        "",
        f"- device: {timer.describe()}",
        f"- commit: {commit()}",
        f"- python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}"
        + timer.versions(),
        "- dtype: float32; step = forward + backward + Adam (gradient-norm clip 200); dropout "
        f"0.05; median of {args.repeats} steps after {args.warmup} warm-up, "
        + ("CUDA events" if timer.cuda else "perf_counter"),
        "",
        "| config | batch | lfads_fast (ms) | PyTorch eager (ms) | speed-up | torch.compile (ms) | "
        "speed-up | GEMM GFLOP/step | lfads_fast TFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    torch_batches = {int(b) for b in args.torch_batches.split(",") if b}
    rows = []
    for name in args.configs.split(","):
        spec = dict(GPU_CONFIGS[name])
        spec.pop("batch")
        cfg = LFADSConfig(**spec, dropout_rate=0.05, l2_gen_scale=1e-4, l2_con_scale=1e-4)
        for B in [int(b) for b in args.batches.split(",")]:
            rng = np.random.default_rng(0)
            encod = rng.poisson(0.3, (B, cfg.encod_seq_len, cfg.encod_data_dim)).astype(np.float32)
            recon = rng.poisson(0.3, (B, cfg.recon_seq_len, cfg.recon_data_dim)).astype(np.float32)
            recon[:, : cfg.encod_seq_len, : cfg.encod_data_dim] = encod
            model = LFADS(cfg, seed=0)
            noise = model.draw_noise(B, np.random.default_rng(1))
            host_params = {k: v.copy() for k, v in model.params.items()}
            model.to(args.device)
            t_fast = time_fast(model, model.make_batch(encod, recon), noise, timer, args)
            t_eager = t_comp = None
            if B in torch_batches:
                t_eager = time_torch(host_params, cfg, encod, recon, noise, timer, args, compiled=False)
                if args.compile:
                    t_comp = time_torch(host_params, cfg, encod, recon, noise, timer, args,
                                        compiled=True)
            gflop = step_gflop(cfg, B)
            row = (f"| {name} | {B} | {t_fast * 1e3:.2f} | {_ms(t_eager)} | {_ratio(t_eager, t_fast)} | "
                   f"{_ms(t_comp)} | {_ratio(t_comp, t_fast)} | {gflop:.2f} | "
                   f"{gflop / t_fast / 1e3:.1f} |")
            print(row, flush=True)
            rows.append(row)
            del model
            timer.free()
    notes = [
        "",
        "GEMM GFLOP/step counts the matrix products of forward and backward (bench_step.py's",
        "step_gflop); elementwise work is not counted. Targets on an H100: NLB-5ms",
        "batch 256 <= 5 ms (stretch 3 ms), >= 50x PyTorch eager.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(header + rows + notes) + "\n")
    print("\n".join(notes))
    print(f"written to {args.out}")


class Timer:
    """Wall time of a callable: CUDA events on a GPU (after a device sync), perf_counter on
    the CPU."""

    def __init__(self, device: str):
        self.cuda = device != "cpu"
        if self.cuda:
            import cupy

            self.cupy = cupy

    def __call__(self, fn) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        import torch

        cp = self.cupy
        torch.cuda.synchronize()
        cp.cuda.Device().synchronize()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        torch.cuda.synchronize()  # torch's work runs on its own stream
        stop.record()
        stop.synchronize()
        return cp.cuda.get_elapsed_time(start, stop) / 1e3

    def describe(self) -> str:
        if not self.cuda:
            return f"CPU ({platform.processor() or platform.machine()}), smoke test"
        try:
            return subprocess.check_output(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                 "--format=csv,noheader"], text=True).strip().splitlines()[0]
        except (OSError, subprocess.CalledProcessError):
            return self.cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()

    def versions(self) -> str:
        return f", cupy {self.cupy.__version__}" if self.cuda else ""

    def free(self) -> None:
        if self.cuda:
            import torch

            self.cupy.get_default_memory_pool().free_all_blocks()
            torch.cuda.empty_cache()


def time_fast(model, batch, noise, timer, args) -> float:
    from lfads_fast import ops

    m, v = model.xp.zeros_like(model.flat), model.xp.zeros_like(model.flat)
    rng = np.random.default_rng(2)

    def step(i):
        nz = model.draw_noise(batch, rng)
        _, grad = model.loss_and_grads(batch, nz)
        ops.adam_step(model.flat, grad, m, v, lr=1e-3, step=i + 1, max_grad_norm=200.0)

    times = [timer(lambda i=i: step(i)) for i in range(args.warmup + args.repeats)]
    return float(np.median(times[args.warmup:]))


def time_torch(host_params, cfg, encod, recon, noise, timer, args, *, compiled: bool) -> float | None:
    import torch

    import torch_reference as ref

    dev = "cpu" if not timer.cuda else "cuda"
    p = {k: torch.tensor(v, device=dev, requires_grad=True) for k, v in host_params.items()}
    opt = torch.optim.Adam(list(p.values()), lr=1e-3)
    inputs = {k: (v.to(dev) if torch.is_tensor(v) else v)
              for k, v in ref._prepare_inputs(cfg, encod, recon, None, noise, torch.float32).items()}

    def loss_fn():
        return torch_loss(p, cfg, inputs)

    fn = loss_fn
    if compiled:
        t0 = time.perf_counter()
        try:
            fn = torch.compile(loss_fn)
            fn()
        except Exception as e:  # a compile failure is a result to report, not a crash
            print(f"torch.compile failed: {type(e).__name__}: {e}", flush=True)
            return None
        print(f"torch.compile: first call {time.perf_counter() - t0:.1f} s", flush=True)

    def step():
        opt.zero_grad(set_to_none=True)
        fn().backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), 200.0)
        opt.step()

    times = [timer(step) for _ in range(args.warmup + args.repeats)]
    return float(np.median(times[args.warmup:]))


def _ms(t) -> str:
    return "-" if t is None else f"{t * 1e3:.1f}"


def _ratio(t, t_fast) -> str:
    return "-" if t is None else f"{t / t_fast:.1f}x"


if __name__ == "__main__":
    main()
