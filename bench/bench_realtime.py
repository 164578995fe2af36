"""Per-bin latency of real-time inference (liblfads_fast_realtime) on one pinned core, against
the same math in PyTorch eager at batch 1, measured in the same run.

For each size (the NLB 5 ms sizes and a 256-channel, gen 200 model) two models with random
weights (latency does not depend on training): a bidirectional one for window mode (W bins
re-run every bin) and a causal one (ic_enc_seq_len, ci_enc_causal) for streaming mode. The C
timings come from examples/stream_counts (built here with CMake against the installed
library), which times each lfrt_step with CLOCK_MONOTONIC and counts heap allocations inside
it; PyTorch runs batch 1, float32, one thread, no autograd: a streaming step (CI encoder,
controller, generator, read-out for one bin) and a window re-run (the whole forward over W
bins). Counts are Poisson(--rate) per bin, like 5 ms bins of motor cortex (the library skips
zero counts in the input projection).

    python bench/bench_realtime.py [--bins 100000] [--core 1] [--out bench/results/realtime_cpu.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from lfads_fast import LFADSConfig, realtime  # noqa: E402
from lfads_fast.export import export_model  # noqa: E402
from lfads_fast.model import LFADS  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import commit, cpu_name  # noqa: E402
sys.path.insert(0, str(HERE.parent / "tests"))
from local_redis import free_port, start_server  # noqa: E402

SIZES = {
    "NLB 5 ms": dict(encod_data_dim=182, ic_enc_dim=100, ci_enc_dim=80, con_dim=80, co_dim=4,
                     ic_dim=100, gen_dim=100, fac_dim=40),
    "256 ch, gen 200": dict(encod_data_dim=256, ic_enc_dim=100, ci_enc_dim=80, con_dim=80, co_dim=4,
                            ic_dim=100, gen_dim=200, fac_dim=40),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bins", type=int, default=100_000, help="bins per C measurement (default 100000)")
    ap.add_argument("--window", type=int, default=50, help="window W (default 50)")
    ap.add_argument("--ic-bins", type=int, default=10, help="ic_enc_seq_len of the streaming model")
    ap.add_argument("--rate", type=float, default=0.1, help="mean count per bin and channel")
    ap.add_argument("--torch-bins", type=int, default=3000, help="bins per PyTorch streaming measurement")
    ap.add_argument("--torch-windows", type=int, default=300, help="bins per PyTorch window measurement")
    ap.add_argument("--core", type=int, default=None, help="core to pin to (default: the last)")
    ap.add_argument("--redis-bins", type=int, default=20000,
                    help="bins sent through lfads-fast serve and Redis per mode (0: skip)")
    ap.add_argument("--redis-period-ms", type=float, default=5.0, help="time between sent bins")
    ap.add_argument("--parts", default="c,redis",
                    help="what to measure: c (the library and PyTorch per size and mode), redis (end to "
                         "end through lfads-fast serve); default both")
    ap.add_argument("--out", default=str(HERE / "results" / "realtime_cpu.md"))
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts or parts - {"c", "redis"}:
        ap.error(f"--parts: expected a comma-separated subset of c,redis, got {args.parts!r}")
    load_start = os.getloadavg()[0]

    all_cores = os.sched_getaffinity(0)
    core = args.core if args.core is not None else max(all_cores)
    os.sched_setaffinity(0, {core})  # this process and the C program it starts
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_rt_"))
    exe = build_example(tmp / "build") if "c" in parts else None
    rows = []
    for name, size in SIZES.items() if "c" in parts else ():
        for mode in ("streaming", "window"):
            causal = mode == "streaming"
            model, path = exported_model(size, mode, args, tmp)
            cfg = model.config
            X = rng.poisson(args.rate, (1000, cfg.encod_data_dim)).astype("<f4")
            X.tofile(tmp / "counts.f32")
            stats = run_c(exe, path, tmp / "counts.f32", mode, args.bins // 1000)
            tstats = torch_latency(model, X, mode, args.torch_bins if causal else args.torch_windows)
            rows.append((name, mode, stats, tstats))
            print(name, mode, stats, tstats, flush=True)
    redis_rows = []
    if args.redis_bins > 0 and "redis" in parts:
        for mode in ("streaming", "window"):
            path = exported_model(SIZES["NLB 5 ms"], mode, args, tmp)[1]
            redis_rows.append((mode, redis_latency(path, mode, args.redis_bins, args.redis_period_ms, rng,
                                                   core, all_cores)))
            print("redis", mode, redis_rows[-1][1], flush=True)
        redis_rows.append(("echo (no decoder)", redis_latency(None, "echo", args.redis_bins, args.redis_period_ms,
                                                             rng, core, all_cores)))
        print("redis echo", redis_rows[-1][1], flush=True)
    write(args, core, rows, redis_rows, load_start)
    shutil.rmtree(tmp, ignore_errors=True)


def exported_model(size: dict, mode: str, args, tmp: Path):
    """The benchmark's model of these sizes for a mode (streaming: causal), random weights
    (latency does not depend on training) from fixed seeds, and its export in tmp."""
    causal = mode == "streaming"
    cfg = LFADSConfig(encod_seq_len=args.window, **size,
                      **(dict(ic_enc_seq_len=args.ic_bins, ci_enc_causal=True) if causal else {}))
    model = LFADS(cfg, seed=1)
    model.flat += (np.random.default_rng(2).standard_normal(model.flat.size) * 0.02).astype(np.float32)
    path = tmp / f"{mode}_{cfg.encod_data_dim}.safetensors"
    if not path.exists():
        export_model(model, path)
    return model, path


# The floor of the Redis path: a node that reads each entry like `lfads-fast serve` (a blocking
# XREAD with redis-py) and answers at once with the same timestamps and no decoding.
ECHO_NODE = """
import signal, sys, time
import redis
r = redis.Redis(port=int(sys.argv[1]))
stop = []
signal.signal(signal.SIGINT, lambda *a: stop.append(1))
print("ready", flush=True)
last = "0-0"  # a new server: every entry is new
while not stop:
    for _, entries in r.xread({"spikes": last}, count=64, block=1000) or []:
        for eid, fields in entries:
            t = time.monotonic_ns()
            last = eid
            r.xadd("lfads", {"in_id": eid, "t_receive": t, "t_after": time.monotonic_ns()})
"""


def redis_latency(model_path, mode, n, period_ms, rng, core, all_cores) -> dict:
    """End to end through Redis on loopback: a sender adds one bin every period_ms to the
    input stream (with its send time), `lfads-fast serve` answers on the output stream, and a
    reader here takes each answer; latency = read time - send time (CLOCK_MONOTONIC). The node
    is pinned to `core`; redis-server and this process run on the other cores."""
    import threading

    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found (apt-get install redis-server), or pass --redis-bins 0")
    others = (set(all_cores) - {core}) or {core}
    os.sched_setaffinity(0, others)
    port = free_port()
    server = start_server(exe, port)
    node = None
    try:
        client = redis.Redis(port=port)
        cmd = ([sys.executable, "-c", ECHO_NODE, str(port)] if mode == "echo" else
               [sys.executable, "-c", "import sys; from lfads_fast.cli import main; sys.exit(main(sys.argv[1:]))",
                "serve", str(model_path), "--port", str(port), "--mode", mode, "--block-ms", "1000"])
        node = subprocess.Popen(cmd,
                                stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(HERE.parent)),
                                preexec_fn=lambda: os.sched_setaffinity(0, {core}))
        assert node.stdout.readline().startswith("ready")
        sent, got = {}, {}
        reader = redis.Redis(port=port)

        def read():
            last = "0"
            while len(got) < n:
                for _, entries in reader.xread({"lfads": last}, block=1000) or []:
                    t = time.monotonic_ns()
                    for eid, fields in entries:
                        got[fields[b"in_id"]] = (t, int(fields[b"t_receive"]), int(fields[b"t_after"]))
                        last = eid

        th = threading.Thread(target=read, daemon=True)
        th.start()
        X = rng.poisson(0.1, (n, 182)).astype("<f4")
        t_next = time.monotonic()
        for x in X:
            t_next += period_ms / 1000
            time.sleep(max(0.0, t_next - time.monotonic()))
            t = time.monotonic_ns()
            sent[client.xadd("spikes", {"counts": x.tobytes()})] = t
        th.join(timeout=60)
        e2e = np.array([got[k][0] - t for k, t in sent.items() if k in got]) / 1e3
        inter = np.array([got[k][1] - t for k, t in sent.items() if k in got]) / 1e3
        node_t = np.array([got[k][2] - got[k][1] for k in sent if k in got]) / 1e3
        res = {"bins": len(e2e)}
        for name, a in (("e2e", e2e), ("to_node", inter), ("in_node", node_t)):
            res.update({f"{name}_p50_us": float(np.median(a)), f"{name}_p99_us": float(np.percentile(a, 99)),
                        f"{name}_max_us": float(a.max())})
        return res
    finally:
        if node is not None:
            node.send_signal(2)
            node.wait(timeout=30)
        server.terminate()
        server.wait(timeout=10)
        os.sched_setaffinity(0, {core})


def _redis_versions() -> str:
    import redis
    from redis.utils import HIREDIS_AVAILABLE

    server = subprocess.run([shutil.which("redis-server") or "redis-server", "--version"], capture_output=True,
                            text=True).stdout.split()
    version = next((w.split("=")[1] for w in server if w.startswith("v=")), "?")
    return f"redis-server {version}, redis-py {redis.__version__}, reply parser " + \
        ("hiredis" if HIREDIS_AVAILABLE else "pure Python")


def build_example(build: Path) -> Path:
    cmake = shutil.which("cmake") or str(Path(sys.executable).parent / "cmake")
    subprocess.run([cmake, "-S", str(HERE.parent / "examples"), "-B", str(build),
                    f"-DCMAKE_PREFIX_PATH={realtime.prefix()}", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(build)], check=True, capture_output=True)
    return build / "stream_counts"


def run_c(exe, model, counts, mode, repeat) -> dict:
    p = subprocess.run([str(exe), str(model), str(counts), "--mode", mode, "--repeat", str(repeat), "--quiet"],
                       check=True, capture_output=True, text=True)
    f = p.stderr.split()
    return {k: float(v) for k, v in zip(f[::2], f[1::2])}


# ---------------------------------------------------------------------------- PyTorch eager


def _cell(x, h, W_ih, b_ih, W_hh, clip):
    H = h.shape[-1]
    xz, xr, xn = (x @ W_ih.T + b_ih).split(H, -1)
    hz, hr = (h @ W_hh[: 2 * H].T).split(H, -1)
    z, r = torch.sigmoid(xz + hz), torch.sigmoid(xr + hr)
    n = torch.tanh(xn + (r * h) @ W_hh[2 * H :].T)
    return torch.clamp(z * h + (1 - z) * n, -clip, clip)


class TorchModel:
    """The model's inference math (posterior means) in PyTorch eager, batch 1."""

    def __init__(self, model: LFADS):
        self.cfg = model.config
        self.p = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in model.params.items()}
        self.W_fac = self.p["fac_W"] / torch.linalg.vector_norm(self.p["fac_W"], dim=1, keepdim=True)

    def gru(self, name, x, h):
        p = self.p
        return _cell(x, h, p[f"{name}_W_ih"], p[f"{name}_b_ih"], p[f"{name}_W_hh"], self.cfg.cell_clip)

    def initial(self, x):  # x [K, N]
        p, cfg = self.p, self.cfg
        hf, hb = p["ic_enc_h0"][0:1], p["ic_enc_h0"][1:2]
        for t in range(x.shape[0]):
            hf = self.gru("ic_enc_fwd", x[t : t + 1], hf)
        for t in reversed(range(x.shape[0])):
            hb = self.gru("ic_enc_bwd", x[t : t + 1], hb)
        ic = (torch.cat([hf, hb], 1) @ p["ic_linear_W"].T + p["ic_linear_b"])[:, : cfg.ic_dim]
        g = ic @ p["ic_to_g0_W"].T + p["ic_to_g0_b"]
        return g, g @ self.W_fac.T, p["con_h0"][None]

    def decoder_step(self, ci, f, c, g):
        p, U = self.p, self.cfg.co_dim
        c = self.gru("con", torch.cat([ci, f], 1), c)
        u = (c @ p["co_linear_W"].T + p["co_linear_b"])[:, :U]
        g = self.gru("gen", u, g)
        f = g @ self.W_fac.T
        return f, c, g, torch.exp(f @ p["readout_W"].T + p["readout_b"])

    def window(self, x):  # the whole forward over W bins, the last bin's rates
        p, cfg = self.p, self.cfg
        g, f, c = self.initial(x)
        Hc, lag, W = cfg.ci_enc_dim, cfg.ci_lag, x.shape[0]
        cf, cb = [], [None] * W
        h = p["ci_enc_h0"][0:1]
        for t in range(W):
            h = self.gru("ci_enc_fwd", x[t : t + 1], h)
            cf.append(h)
        h = p["ci_enc_h0"][1:2]
        for t in reversed(range(W)):
            h = self.gru("ci_enc_bwd", x[t : t + 1], h)
            cb[t] = h
        zero = torch.zeros(1, Hc)
        for t in range(W):
            ci = torch.cat([cf[t - lag] if t >= lag else zero, cb[t + lag] if t + lag < W else zero], 1)
            f, c, g, rates = self.decoder_step(ci, f, c, g)
        return rates


def torch_latency(model: LFADS, X, mode: str, n: int) -> dict:
    tm = TorchModel(model)
    X = torch.from_numpy(np.asarray(X, np.float32))
    cfg = model.config
    lat = []
    with torch.no_grad():
        if mode == "window":
            W = cfg.encod_seq_len
            for k in range(n + 5):
                t = W + k % (X.shape[0] - W)
                t0 = time.perf_counter()
                tm.window(X[t - W : t])
                lat.append(time.perf_counter() - t0)
        else:
            K, lag, Hc = cfg.ic_enc_seq_len, cfg.ci_lag, cfg.ci_enc_dim
            g, f, c = tm.initial(X[:K])
            h = tm.p["ci_enc_h0"][0:1]
            ring = [torch.zeros(1, Hc)] * (lag + 1)
            for k in range(n + 50):
                x = X[K + k % (X.shape[0] - K)][None]
                t0 = time.perf_counter()
                h = tm.gru("ci_enc_fwd", x, h)
                ring = ring[1:] + [h]
                f, c, g, rates = tm.decoder_step(ring[0], f, c, g)
                lat.append(time.perf_counter() - t0)
    lat = np.array(lat[50 if mode != "window" else 5 :]) * 1e6
    return {"bins": len(lat), "p50_us": float(np.median(lat)), "p99_us": float(np.percentile(lat, 99)),
            "max_us": float(lat.max())}


# ---------------------------------------------------------------------------- report


def write(args, core, rows, redis_rows, load_start):
    load_end = os.getloadavg()[0]
    lines = [
        "# Real-time inference latency (CPU, one pinned core)",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores; pinned to core {core} "
        f"(os.sched_setaffinity); load average {load_start:.1f} at the start and {load_end:.1f} at the end "
        "(the 1-minute average counts this benchmark's own busy thread, about 1; more means other "
        "work shared the cores, and the tails (p99, max) include it)",
        f"- commit: {commit()}; Python {platform.python_version()}, torch {torch.__version__} "
        "(1 thread, no autograd)",
        f"- float32; batch 1; window W = {args.window}; streaming models: ic_enc_seq_len = {args.ic_bins}, "
        f"ci_enc_causal; counts Poisson({args.rate}) per bin",
        "- lfads_fast: examples/stream_counts timing each lfrt_step (CLOCK_MONOTONIC), "
        f"{args.bins} bins per row; allocations: heap allocations counted inside lfrt_step by "
        "malloc-family wrappers in that program",
        f"- PyTorch eager: the same math, {args.torch_bins} bins (streaming) / {args.torch_windows} "
        "windows per row",
        "",
    ]
    if rows:
        lines += ["| sizes | mode | lfads_fast p50 (us) | p99 | max | allocs in step | PyTorch p50 (us) | p99 | "
                  "speed-up p50 | speed-up p99 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, mode, c, t in rows:
        lines.append(f"| {name} | {mode} | {c['p50_us']:.2f} | {c['p99_us']:.2f} | {c['max_us']:.0f} | "
                     f"{int(c['allocs_in_step'])} | {t['p50_us']:.0f} | {t['p99_us']:.0f} | "
                     f"{t['p50_us'] / c['p50_us']:.0f}x | {t['p99_us'] / c['p99_us']:.0f}x |")
    if redis_rows:
        lines += ["", f"End to end through Redis on loopback (NLB 5 ms sizes; `lfads-fast serve` pinned to the "
                  f"benchmark's core, redis-server and the sender/reader on the other core(s); one bin every {args.redis_period_ms} ms; {args.redis_bins} bins; "
                  "send = XADD by the sender, read = the output entry read back by the sender process; "
                  f"{_redis_versions()}):", "",
                  "| mode | send -> read p50 (us) | p99 | max | send -> node receive p50 | p99 | "
                  "node receive -> after step p50 | p99 |", "|---|---|---|---|---|---|---|---|"]
        for mode, r in redis_rows:
            lines.append(f"| {mode} | {r['e2e_p50_us']:.0f} | {r['e2e_p99_us']:.0f} | {r['e2e_max_us']:.0f} | "
                         f"{r['to_node_p50_us']:.0f} | {r['to_node_p99_us']:.0f} | {r['in_node_p50_us']:.0f} | "
                         f"{r['in_node_p99_us']:.0f} |")
    lines += ["", "Sizes:", ""]
    for name, size in SIZES.items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in size.items()))
    lines += ["", "Targets: streaming p99 <= 20 us at NLB 5 ms sizes, window (W = 50) p99 <= 1 ms, "
              ">= 20x PyTorch batch 1, zero allocations in the step, Redis end to end p99 < 1 ms.", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
