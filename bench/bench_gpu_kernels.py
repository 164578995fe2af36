"""Per-step latency of the persistent GRU and decoder CUDA kernels against batch size.

Sizes are NLB's MC_Maze 5 ms configuration (encod_data_dim 137, recon_data_dim 182,
encod_seq_len 140, recon_seq_len 180, ic_enc_dim 100, ci_enc_dim 80, con_dim 80, co_dim 4,
ic_dim 100, gen_dim 100, fac_dim 40), float32. Every number is the median over repeats of a
CUDA-event-timed call after warm-up, divided by the number of time steps. As a speed reference
only, cuDNN's nn.GRU of the same sizes through PyTorch when it is installed with CUDA: cuDNN
runs the standard GRU (reset gate after the recurrent product, recurrent bias), not LFADS's
clipped cell, and includes the input projection.

    python bench/bench_gpu_kernels.py [--batches 16,64,256,1024] [--repeats 20] [--out FILE]

Writes bench/results/gpu_kernels_<gpu>.md (header: GPU, driver, commit, sizes) and prints it.
Without cupy or a CUDA device it says so and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys

import numpy as np

SIZES = dict(encod_data_dim=137, recon_data_dim=182, encod_seq_len=140, recon_seq_len=180,
             ic_enc_dim=100, ci_enc_dim=80, con_dim=80, co_dim=4, ic_dim=100, gen_dim=100,
             fac_dim=40)
CLIP = 5.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="16,32,64,128,256,512,1024")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None, help="markdown file (default bench/results/...)")
    args = ap.parse_args()

    try:
        import cupy as cp
    except ImportError as e:
        print(f"bench_gpu_kernels: cupy is not installed ({e}); nothing to measure.")
        return 0
    try:
        if cp.cuda.runtime.getDeviceCount() == 0:
            raise RuntimeError("no device")
    except Exception as e:
        print(f"bench_gpu_kernels: no CUDA device ({e}); nothing to measure.")
        return 0
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    try:
        from lfads_fast._backend import cuda
        mod = cuda()
    except Exception as e:
        print(f"bench_gpu_kernels: lfads_fast._cuda unavailable ({e}); build it with "
              "LFADS_FAST_CUDA=ON make inplace.")
        return 0
    from lfads_fast import weight_grads as wg

    torch = _torch_cuda()
    batches = [int(b) for b in args.batches.split(",")]
    bench = Bench(cp, mod, wg, torch, args.repeats, args.warmup)
    rows = []
    for B in batches:
        row = {"B": B}
        for key, fn in (("gru", bench.gru), ("dec", bench.decoder), ("cudnn", bench.cudnn)):
            try:
                row.update(fn(B))
            except Exception as e:  # a failed size is reported, the others still run
                row[f"{key}_error"] = f"{type(e).__name__}: {e}"
            cp.get_default_memory_pool().free_all_blocks()
        rows.append(row)
        print(_row_text(row), flush=True)

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    text = _report(gpu, cp, torch, rows, args)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"gpu_kernels_{tag}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(text)
    print(f"written to {out}")
    return 0


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


class Bench:
    def __init__(self, cp, mod, wg, torch, repeats, warmup):
        self.cp, self.mod, self.wg, self.torch = cp, mod, wg, torch
        self.repeats, self.warmup = repeats, warmup
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.rng = np.random.default_rng()

    def randn(self, *shape, scale=1.0):
        return self.cp.asarray(self.rng.standard_normal(shape, dtype=np.float32) * scale)

    def time_us(self, fn):
        """Median microseconds of one call, CUDA events on the bench stream."""
        cp, st = self.cp, self.stream
        with st:
            for _ in range(self.warmup):
                fn()
            times = []
            for _ in range(self.repeats):
                a, b = cp.cuda.Event(), cp.cuda.Event()
                a.record(st)
                fn()
                b.record(st)
                b.synchronize()
                times.append(cp.cuda.get_elapsed_time(a, b) * 1e3)
        return float(np.median(times))

    # GRU: the IC encoder's forward direction (H = ic_enc_dim over encod_seq_len steps).
    def gru(self, B):
        cp, m, s = self.cp, self.mod, self.stream
        T, H, N = SIZES["encod_seq_len"], SIZES["ic_enc_dim"], SIZES["encod_data_dim"]
        with s:
            x = self.randn(T, B, N)
            W_ih = self.randn(3 * H, N, scale=1 / np.sqrt(N + H))
            W_hh = self.randn(3 * H, H, scale=1 / np.sqrt(N + H))
            h0 = self.randn(B, H)
            xproj = cp.empty((T, B, 3 * H), cp.float32)
            hs, gates = cp.empty((T, B, H), cp.float32), cp.empty((T, B, 3 * H), cp.float32)
            nbytes = m.gru_forward_workspace_size(H)
            ws = cp.empty(nbytes, cp.uint8)
            d_hs = self.randn(T, B, H)
            d_x, d_h0 = cp.empty((T, B, 3 * H), cp.float32), cp.empty((B, H), cp.float32)
            work = cp.empty((T, B, H), cp.float32)

        def proj():
            cp.matmul(x.reshape(T * B, N), W_ih.T, out=xproj.reshape(T * B, 3 * H))

        def fwd():
            m.gru_forward(xproj, 0, W_hh, h0, hs, gates, False, CLIP, T=T, B=B, H=H, ldx=3 * H,
                          workspace=ws, workspace_bytes=nbytes, stream=s.ptr)

        def bwd():
            m.gru_backward(W_hh, h0, hs, gates, d_hs, None, d_x, 0, d_h0, work, False, CLIP, T=T,
                           B=B, H=H, ldx=3 * H, stream=s.ptr)

        def bwd_full():
            bwd()
            self.wg.gru_weight_grad(d_x, hs, h0, work)
            d_x.reshape(T * B, 3 * H).T @ x.reshape(T * B, N)  # d_W_ih

        with s:
            proj()
            fwd()
        return {"gru_fwd": self.time_us(fwd) / T,
                "gru_proj_fwd": self.time_us(lambda: (proj(), fwd())) / T,
                "gru_bwd": self.time_us(bwd) / T,
                "gru_bwd_full": self.time_us(bwd_full) / T}

    # Decoder: controller + generator + factors over recon_seq_len steps.
    def decoder(self, B):
        cp, m, s = self.cp, self.mod, self.stream
        T, C, U = SIZES["recon_seq_len"], SIZES["con_dim"], SIZES["co_dim"]
        G, F = SIZES["gen_dim"], SIZES["fac_dim"]
        with s:
            a = dict(
                xcon=self.randn(T, B, 3 * C), W_con_f=self.randn(3 * C, F, scale=F**-0.5),
                W_con_hh=self.randn(3 * C, C, scale=C**-0.5), c0=self.randn(B, C),
                W_co=self.randn(2 * U, C, scale=C**-0.5), b_co=self.randn(2 * U),
                eps=self.randn(T, B, U), mask_f=None, xgen=self.randn(T, B, 3 * G),
                W_gen_u=self.randn(3 * G, U, scale=U**-0.5),
                W_gen_hh=self.randn(3 * G, G, scale=G**-0.5), g0=self.randn(B, G),
                f0=self.randn(B, F), W_fac=self.randn(F, G, scale=G**-0.5), mask_g=None)
            for k, shape in (("con_states", (T, B, C)), ("con_gates", (T, B, 3 * C)),
                             ("co_mean", (T, B, U)), ("co_logvar", (T, B, U)), ("u", (T, B, U)),
                             ("gen_states", (T, B, G)), ("gen_gates", (T, B, 3 * G)),
                             ("factors", (T, B, F))):
                a[k] = cp.empty(shape, cp.float32)
            g = dict(d_factors=self.randn(T, B, F), d_co_mean=self.randn(T, B, U),
                     d_co_logvar=self.randn(T, B, U))
            for k, shape in (("d_xcon", (T, B, 3 * C)), ("d_c0", (B, C)),
                             ("d_xgen", (T, B, 3 * G)), ("d_g0", (B, G)), ("d_f0", (B, F)),
                             ("d_factors_total", (T, B, F)), ("d_co", (T, B, 2 * U)),
                             ("rh_gen", (T, B, G)), ("rh_con", (T, B, C))):
                g[k] = cp.empty(shape, cp.float32)
            nbytes = m.decoder_forward_workspace_size(C, U, G, F)
            ws = cp.empty(nbytes, cp.uint8)
        names = ["xcon", "W_con_f", "W_con_hh", "c0", "W_co", "b_co", "eps", "mask_f", "xgen",
                 "W_gen_u", "W_gen_hh", "g0", "f0", "W_fac", "mask_g", "con_states",
                 "con_gates", "co_mean", "co_logvar", "u", "gen_states", "gen_gates", "factors"]
        bnames = ["d_factors", "d_co_mean", "d_co_logvar", "d_xcon", "d_c0", "d_xgen", "d_g0",
                  "d_f0", "d_factors_total", "d_co", "rh_gen", "rh_con"]

        kw = dict(T=T, B=B, C=C, U=U, G=G, F=F, ld_xc=3 * C, ld_xg=3 * G, clip=CLIP, sample=True)

        def fwd():
            m.decoder_forward(*[a[k] for k in names], workspace=ws,
                              workspace_bytes=nbytes, stream=s.ptr, **kw)

        def bwd():
            m.decoder_backward(*[a[k] for k in names], *[g[k] for k in bnames],
                               stream=s.ptr, **kw)

        def bwd_full():
            bwd()
            self.wg.decoder_weight_grads(
                d_xgen=g["d_xgen"], d_factors_total=g["d_factors_total"], rh_gen=g["rh_gen"],
                gen_states=a["gen_states"], g0=a["g0"], d_xcon=g["d_xcon"], d_co=g["d_co"],
                rh_con=g["rh_con"], con_states=a["con_states"], c0=a["c0"], u=a["u"],
                factors=a["factors"], f0=a["f0"])

        with s:
            fwd()
        return {"dec_fwd": self.time_us(fwd) / T, "dec_bwd": self.time_us(bwd) / T,
                "dec_bwd_full": self.time_us(bwd_full) / T}

    # cuDNN nn.GRU of the IC encoder's sizes (speed reference only).
    def cudnn(self, B):
        torch = self.torch
        if torch is None:
            return {}
        T, H, N = SIZES["encod_seq_len"], SIZES["ic_enc_dim"], SIZES["encod_data_dim"]
        dev = torch.device("cuda")
        gru = torch.nn.GRU(N, H).to(dev)
        x = torch.randn(T, B, N, device=dev, requires_grad=True)
        h0 = torch.randn(1, B, H, device=dev)
        d_out = torch.randn(T, B, H, device=dev)

        def fwd():
            with torch.no_grad():
                gru(x, h0)

        def fwd_bwd():
            out, _ = gru(x, h0)
            out.backward(d_out)

        return {"cudnn_fwd": self._torch_time_us(fwd) / T,
                "cudnn_fwd_bwd": self._torch_time_us(fwd_bwd) / T}

    def _torch_time_us(self, fn):
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        return float(np.median(times))


COLUMNS = [
    ("gru_fwd", "GRU fwd"), ("gru_proj_fwd", "GRU proj+fwd"), ("gru_bwd", "GRU bwd"),
    ("gru_bwd_full", "GRU bwd+wgrad"), ("dec_fwd", "decoder fwd"), ("dec_bwd", "decoder bwd"),
    ("dec_bwd_full", "decoder bwd+wgrad"), ("cudnn_fwd", "cuDNN GRU fwd"),
    ("cudnn_fwd_bwd", "cuDNN GRU fwd+bwd"),
]


def _row_text(row):
    parts = [f"B={row['B']:5d}"]
    for k, label in COLUMNS:
        if k in row:
            parts.append(f"{label} {row[k]:.2f}")
    parts += [f"{k}: {v}" for k, v in row.items() if k.endswith("_error")]
    return "  ".join(parts) + "  (us/step)"


def _report(gpu, cp, torch, rows, args):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        commit += " (uncommitted changes)" if dirty else ""
    except Exception:
        commit = "unknown"
    drv = cp.cuda.runtime.driverGetVersion()
    rt = cp.cuda.runtime.runtimeGetVersion()
    lines = [
        f"# GPU kernel latency: {gpu}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- GPU: {gpu}; driver API {drv // 1000}.{drv % 1000 // 10}; CuPy runtime "
        f"{rt // 1000}.{rt % 1000 // 10}; CuPy {cp.__version__}",
        "- torch: " + (f"{torch.__version__} (cuDNN {torch.backends.cudnn.version()})"
                       if torch else "not available"),
        f"- lfads_fast commit: {commit}",
        "- dtype float32; sizes: " + ", ".join(f"{k} {v}" for k, v in SIZES.items()),
        f"- median of {args.repeats} CUDA-event-timed calls after {args.warmup} warm-up calls; "
        "microseconds per time step (call time / T)",
        "- GRU: the IC encoder's forward direction (H = ic_enc_dim, T = encod_seq_len); "
        "'proj+fwd' adds the input-projection GEMM (cuBLAS via CuPy); 'bwd+wgrad' adds the "
        "W_hh and W_ih gradient GEMMs",
        "- decoder: controller + sampling + generator + factors (T = recon_seq_len); "
        "'bwd+wgrad' adds the weight-gradient GEMMs of lfads_fast.weight_grads",
        "- cuDNN: torch.nn.GRU(encod_data_dim, ic_enc_dim), T = encod_seq_len, input "
        "projection included; a standard GRU (different math), a speed reference only",
        "",
        "| B | " + " | ".join(label for _, label in COLUMNS) + " |",
        "|---:|" + "---:|" * len(COLUMNS),
    ]
    for row in rows:
        cells = [f"{row[k]:.2f}" if k in row else "-" for k, _ in COLUMNS]
        lines.append(f"| {row['B']} | " + " | ".join(cells) + " |")
    errors = [(row["B"], k, v) for row in rows for k, v in row.items() if k.endswith("_error")]
    if errors:
        lines += ["", "Errors:"] + [f"- B={b} {k[:-6]}: {v}" for b, k, v in errors]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
