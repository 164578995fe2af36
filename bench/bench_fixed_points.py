"""Fixed points of a 100-unit clipped GRU from 10,000 initial states: lfads_fast's batched
Newton solver against an Adam loop in PyTorch and the same loop compiled by JAX, each to
q < tol on every point it can.

The GRU: LFADS's initialisation for the z and r weights, and n weights with a rank-3 "memory"
part (three random +-1 patterns, gain beta) plus random weights (gain g), which gives a
handful of attractors and the saddles between them, as a trained generator has. Initial
states: visited states of 200 trials of 50 steps from random starts, plus Gaussian noise,
as FixedPointFinder samples them.

    python bench/bench_fixed_points.py [--units 100] [--points 10000] [--tol 1e-6]

Prints a header and a table, and writes them to bench/results/fixed_points_cpu.md.
"""
import os

# numpy's own OpenBLAS threads would keep spinning beside the kernels' OpenMP threads after
# each numpy product; on a 2-core machine they take a core from the timed solver.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from lfads_fast import fixed_points as fp  # noqa: E402
from lfads_fast._backend import cpu  # noqa: E402

CLIP = 5.0


def make_gru(H, rng, beta=2.0, g=0.5):
    """W_ih [3H, 0], b_ih [3H], W_hh [3H, H] (float32) of the benchmark GRU (no inputs)."""
    patterns = np.sign(rng.standard_normal((3, H)))
    W_hn = beta / H * patterns.T @ patterns + g * rng.normal(0, 1 / np.sqrt(H), (H, H))
    W_hz = rng.normal(0, 1 / np.sqrt(H), (H, H))
    W_hr = rng.normal(0, 1 / np.sqrt(H), (H, H))
    W_hh = np.concatenate([W_hz, W_hr, W_hn]).astype(np.float32)
    b_ih = np.concatenate([np.ones(2 * H), np.zeros(H)]).astype(np.float32)
    return np.zeros((3 * H, 0), np.float32), b_ih, W_hh


def simulate(W_hh, b_ih, h0, T):
    """[B, T + 1, H] states of the GRU (numpy) from h0 [B, H]."""
    H = W_hh.shape[1]
    sig = lambda v: 0.5 * (1 + np.tanh(0.5 * v))  # noqa: E731
    hs, h = [h0], h0
    for _ in range(T):
        z = sig(b_ih[:H] + h @ W_hh[:H].T)
        r = sig(b_ih[H:2 * H] + h @ W_hh[H:2 * H].T)
        n = np.tanh(b_ih[2 * H:] + (r * h) @ W_hh[2 * H:].T)
        h = np.clip(z * h + (1 - z) * n, -CLIP, CLIP)
        hs.append(h)
    return np.stack(hs, axis=1)


def newton(W_ih, b_ih, W_hh, h0, tol):
    return fp.find_fixed_points(W_ih, b_ih, W_hh, CLIP, h0, tol_q=tol, unique=False,
                                compute_jacobians=False)


def torch_adam(W_hh, b_ih, h0, tol, lr, max_iters, threads):
    """Adam on q summed over the points (so each point's gradient is its own), batched over
    the points not yet at q < tol; a point leaves the batch when it gets there. Returns
    (seconds, fraction converged, loop iterations, mean iterations per converged point)."""
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # tiny Adam moments would otherwise run at denormal speed
    H = W_hh.shape[1]
    W = torch.from_numpy(W_hh)
    x_proj = torch.from_numpy(b_ih)
    x = torch.from_numpy(np.array(h0, np.float32))
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    active = torch.arange(len(x))
    iters_at = torch.full((len(x),), -1)
    t0 = time.perf_counter()
    it = 0
    for it in range(1, max_iters + 1):
        h = x[active].requires_grad_(True)
        zr = torch.sigmoid(x_proj[: 2 * H] + h @ W[: 2 * H].T)
        z, r = zr[:, :H], zr[:, H:]
        n = torch.tanh(x_proj[2 * H:] + (r * h) @ W[2 * H:].T)
        q = 0.5 * ((torch.clamp(z * h + (1 - z) * n, -CLIP, CLIP) - h) ** 2).sum(1)
        (g,) = torch.autograd.grad(q.sum(), h)
        with torch.no_grad():
            done = q < tol
            iters_at[active[done]] = it - 1
            keep = ~done
            active, g = active[keep], g[keep]
            if len(active) == 0:
                break
            m[active] = 0.9 * m[active] + 0.1 * g
            v[active] = 0.999 * v[active] + 0.001 * g * g
            m_hat = m[active] / (1 - 0.9**it)
            v_hat = v[active] / (1 - 0.999**it)
            x[active] -= lr * m_hat / (v_hat.sqrt() + 1e-8)
    seconds = time.perf_counter() - t0
    conv = iters_at >= 0
    return seconds, conv.float().mean().item(), it, iters_at[conv].float().mean().item()


def jax_adam(W_hh, b_ih, h0, tol, lr, max_iters):
    """The same Adam loop in JAX, compiled whole (jit of a lax.while_loop): fixed shapes, so
    converged points stay in the batch and are masked out of the update instead of leaving
    it. Returns (seconds of a compiled run, compile seconds, fraction converged, loop
    iterations, mean iterations per converged point)."""
    import jax
    import jax.numpy as jnp

    H = W_hh.shape[1]
    W, x_proj = jnp.asarray(W_hh), jnp.asarray(b_ih)

    def q_of(h):
        zr = jax.nn.sigmoid(x_proj[: 2 * H] + h @ W[: 2 * H].T)
        z, r = zr[:, :H], zr[:, H:]
        n = jnp.tanh(x_proj[2 * H:] + (r * h) @ W[2 * H:].T)
        return 0.5 * ((jnp.clip(z * h + (1 - z) * n, -CLIP, CLIP) - h) ** 2).sum(1)

    def cond(state):
        it, _, _, _, iters_at = state
        return (it <= max_iters) & jnp.any(iters_at < 0)

    def body(state):
        it, x, m, v, iters_at = state
        q, vjp = jax.vjp(q_of, x)
        (g,) = vjp(jnp.ones_like(q))
        iters_at = jnp.where((q < tol) & (iters_at < 0), it - 1, iters_at)
        active = (iters_at < 0)[:, None]
        m = jnp.where(active, 0.9 * m + 0.1 * g, m)
        v = jnp.where(active, 0.999 * v + 0.001 * g * g, v)
        t = it.astype(x.dtype)
        step = lr * (m / (1 - 0.9**t)) / (jnp.sqrt(v / (1 - 0.999**t)) + 1e-8)
        return it + 1, jnp.where(active, x - step, x), m, v, iters_at

    @jax.jit
    def solve(x):
        init = (jnp.int32(1), x, jnp.zeros_like(x), jnp.zeros_like(x),
                jnp.full(x.shape[0], -1, jnp.int32))
        return jax.lax.while_loop(cond, body, init)

    x0 = jnp.asarray(np.array(h0, np.float32))
    t0 = time.perf_counter()
    jax.block_until_ready(solve(x0))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    it, _, _, _, iters_at = jax.block_until_ready(solve(x0))
    seconds = time.perf_counter() - t0
    iters_at = np.asarray(iters_at)
    conv = iters_at >= 0
    return (seconds, max(first - seconds, 0.0), conv.mean(), int(it) - 1,
            iters_at[conv].mean() if conv.any() else float("nan"))


def header(args):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load = "%.2f" % os.getloadavg()[0]
    except OSError:
        load = "n/a"
    import torch

    return [
        "# Fixed points: batched Newton (lfads_fast) vs Adam (PyTorch, JAX), CPU",
        "",
        f"- machine: {cpu_name}, {os.cpu_count()} cores, {args.threads} threads used; "
        f"load average at start {load}",
        f"- commit: {commit}; numpy {np.__version__}, torch {torch.__version__}"
        + (f", jax {args.jax_version}" if args.jax else ""),
        f"- dtype float32; GRU units H = {args.units}, clip {CLIP}; initial states K = "
        f"{args.points} (noise {args.noise}); tolerance q < {args.tol}",
        f"- timing: median of {args.repeats} runs after one warm-up (Newton: find_fixed_points "
        f"with unique=False, compute_jacobians=False); one run (Adam, lr {args.lr}, at most "
        f"{args.adam_iters} iterations)",
        "",
    ]


def run(args, seed):
    """Table rows for the GRU and initial states drawn with `seed`."""
    rng = np.random.default_rng(seed)
    W_ih, b_ih, W_hh = make_gru(args.units, rng)
    traj = simulate(W_hh, b_ih, rng.uniform(-1, 1, (200, args.units)), 50)
    h0 = fp.sample_initial_states(traj, args.points, noise_scale=args.noise, rng=rng).astype(np.float32)

    newton(W_ih, b_ih, W_hh, h0, args.tol)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = newton(W_ih, b_ih, W_hh, h0, args.tol)
        times.append(time.perf_counter() - t0)
    t_newton = statistics.median(times)
    conv = res.converged & (res.q < args.tol)
    t0 = time.perf_counter()
    unique = fp.find_fixed_points(W_ih, b_ih, W_hh, CLIP, h0)  # default tol_q (1e-12)
    t_full = time.perf_counter() - t0
    t_adam, frac_adam, loop_adam, it_adam = torch_adam(W_hh, b_ih, h0, args.tol, args.lr,
                                                       args.adam_iters, args.threads)
    ratio = t_adam / t_newton
    rows = [
        f"| {seed} | Newton (lfads_fast, C++) | {t_newton:.3f} | {conv.mean():.4f} | "
        f"{res.iterations[conv].mean():.2f} (max {res.iterations[conv].max()}) | - | 1 |",
        f"| {seed} | Adam (PyTorch, batched) | {t_adam:.2f} | {frac_adam:.4f} | {it_adam:.0f} | "
        f"{loop_adam} | {ratio:.1f}{'+' if frac_adam < 1 else ''} |",
    ]
    jax_note = []
    if args.jax:
        t_jax, compile_jax, frac_jax, loop_jax, it_jax = jax_adam(W_hh, b_ih, h0, args.tol,
                                                                  args.lr, args.adam_iters)
        rows.append(f"| {seed} | Adam (JAX, jit + while_loop) | {t_jax:.2f} | {frac_jax:.4f} | "
                    f"{it_jax:.0f} | {loop_jax} | {t_jax / t_newton:.1f}"
                    f"{'+' if frac_jax < 1 else ''} |")
        jax_note = [f"- seed {seed}: JAX compile {compile_jax:.1f} s (first call minus a "
                    "compiled one), not in its time; JAX runs on XLA's own thread pool (all "
                    f"{os.cpu_count()} cores), not limited by --threads"]
    notes = [
        f"- seed {seed}: Newton runs {', '.join('%.3f' % t for t in times)} s; full "
        f"find_fixed_points at its default tol_q 1e-12 (solve, unique points, Jacobians, "
        f"eigen-decompositions) {t_full:.3f} s: {int(unique.is_stable.sum())} stable and "
        f"{int((~unique.is_stable).sum())} unstable fixed points",
    ] + jax_note
    return rows, notes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--units", type=int, default=100)
    ap.add_argument("--points", type=int, default=10000)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                    help="one GRU and set of initial states per seed")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.01, help="PyTorch Adam learning rate")
    ap.add_argument("--adam-iters", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-jax", dest="jax", action="store_false",
                    help="leave out the JAX Adam loop (run when jax is installed)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "fixed_points_cpu.md"))
    args = ap.parse_args()
    if args.jax:
        try:
            import jax

            args.jax_version = jax.__version__
        except ImportError:
            args.jax = False
    cpu.set_num_threads(args.threads)

    lines = header(args) + [
        "| seed | solver | time (s) | converged (q < tol) | iterations per converged point "
        "| loop iterations | time / Newton |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    notes = [""]
    for seed in args.seeds:
        rows, seed_notes = run(args, seed)
        print("\n".join(rows), flush=True)
        lines += rows
        notes += seed_notes
    notes += [
        "- converged: fraction of the initial states whose solve ended at q < tol. Newton "
        "stops a point early when no root is near (q not halving: a slow point); Adam keeps "
        "every unconverged point until its iteration cap, so '+' marks a ratio that is a lower "
        "bound.",
    ]
    print("\n".join(notes))
    lines += notes
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
