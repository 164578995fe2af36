"""Fixed-point solvers of the clipped GRU (csrc/fixed_points.h, lfads_fast/fixed_points.py).

Ground truth comes from outside the code under test: float64 finite differences and a numpy
GRU step for the kernels, 1-D root finding for a GRU of independent units, a dense grid search
polished by a numpy Newton for a small dense GRU, and a trained 3-bit flip-flop network.
"""
import os

import numpy as np
import pytest

from lfads_fast import fixed_points as fp
from lfads_fast._backend import cpu

# Central differences in float64 with step 1e-6: truncation ~1e-12, rounding ~1e-10 per entry.
FD_STEP = 1e-6
FD_TOL = 1e-7
# Kernel F, q, grad against the numpy step in float64: only rounding differs.
EXACT_TOL = 1e-12
# Two solves of the same fixed point agree to this (solver tolerance plus float32 rounding).
SAME_POINT_TOL = 1e-4
# States closer than this to the clip kink make finite differences straddle it.
KINK_MARGIN = 1e-3


# ---------------------------------------------------------------------------- references


def sigmoid(v):
    return 0.5 * (1.0 + np.tanh(0.5 * v))  # no overflow for large |v|


def gru_step(W_hh, xproj, h, clip):
    """numpy clipped-GRU step: h [K, H], xproj [K, 3H] -> (F [K, H], pre [K, H])."""
    H = h.shape[1]
    z = sigmoid(xproj[:, :H] + h @ W_hh[:H].T)
    r = sigmoid(xproj[:, H:2 * H] + h @ W_hh[H:2 * H].T)
    n = np.tanh(xproj[:, 2 * H:] + (r * h) @ W_hh[2 * H:].T)
    pre = z * h + (1 - z) * n
    return np.clip(pre, -clip, clip), pre


def fd_jacobian(W_hh, xproj, h, clip):
    """[K, H, H] central-difference Jacobian of gru_step in float64."""
    K, H = h.shape
    J = np.empty((K, H, H))
    for j in range(H):
        e = np.zeros(H)
        e[j] = FD_STEP
        J[:, :, j] = (gru_step(W_hh, xproj, h + e, clip)[0] - gru_step(W_hh, xproj, h - e, clip)[0]) / (2 * FD_STEP)
    return J


def numpy_newton(W_hh, xproj_row, h, clip, iters=50):
    """Plain float64 Newton with the finite-difference Jacobian, independent of the kernels."""
    H = h.size
    x = xproj_row[None]
    for _ in range(iters):
        F, _ = gru_step(W_hh, x, h[None], clip)
        res = F[0] - h
        if 0.5 * res @ res < 1e-28:
            break
        J = fd_jacobian(W_hh, x, h[None], clip)[0]
        h = h - np.linalg.solve(J - np.eye(H), res)
    F, _ = gru_step(W_hh, x, h[None], clip)
    return h, 0.5 * np.sum((F[0] - h) ** 2)


def random_gru(rng, H, I=0, gain=1.0):
    W_hh = gain * rng.normal(0, 1 / np.sqrt(H), (3 * H, H))
    W_ih = rng.normal(0, 1 / np.sqrt(max(I, 1)), (3 * H, I))
    b_ih = np.concatenate([np.ones(2 * H), rng.normal(0, 0.1, H)])
    return W_ih, b_ih, W_hh


def match(a, b, tol):
    """For each row of a, whether some row of b is within tol (max-abs)."""
    if len(b) == 0:
        return np.zeros(len(a), bool)
    return np.array([np.abs(b - x).max(axis=1).min() <= tol for x in a])


# ---------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("H,K", [(7, 5), (1, 3), (33, 1)])
def test_eval_matches_numpy_step(H, K):
    rng = np.random.default_rng(0)
    _, _, W_hh = random_gru(rng, H, gain=1.5)
    xproj = rng.normal(size=(K, 3 * H))
    h = rng.normal(size=(K, H))
    F, q, grad = np.empty((K, H)), np.empty(K), np.empty((K, H))
    cpu.fixed_point_eval(W_hh, xproj, h, 5.0, F, q, grad)
    F_ref, _ = gru_step(W_hh, xproj, h, 5.0)
    res = F_ref - h
    np.testing.assert_allclose(F, F_ref, atol=EXACT_TOL)
    np.testing.assert_allclose(q, 0.5 * (res**2).sum(1), atol=EXACT_TOL)
    J = fd_jacobian(W_hh, xproj, h, 5.0)
    grad_ref = np.einsum("kij,ki->kj", J, res) - res
    np.testing.assert_allclose(grad, grad_ref, atol=FD_TOL * 10)


@pytest.mark.parametrize("clip", [5.0, 0.6])
def test_jacobian_matches_finite_differences(clip):
    """Includes states near and beyond the clip (clip = 0.6 clips many units of N(0, 1) states)."""
    rng = np.random.default_rng(1)
    H, K = 9, 40
    _, _, W_hh = random_gru(rng, H, gain=1.5)
    xproj = rng.normal(size=(K, 3 * H))
    h = rng.normal(0, 1.5 if clip < 1 else 1.0, size=(K, H))
    _, pre = gru_step(W_hh, xproj, h, clip)
    keep = (np.abs(np.abs(pre) - clip) > KINK_MARGIN).all(axis=1)
    h, xproj = h[keep], xproj[keep]
    if clip < 1:
        assert (np.abs(pre[keep]) > clip).mean() > 0.2, "the test must exercise clipped units"
    J = np.empty((len(h), H, H))
    cpu.fixed_point_jacobian(W_hh, xproj, h, clip, J)
    np.testing.assert_allclose(J, fd_jacobian(W_hh, xproj, h, clip), atol=FD_TOL)


def test_float32_kernels_match_float64():
    rng = np.random.default_rng(2)
    H, K = 20, 8
    _, _, W_hh = random_gru(rng, H)
    xproj, h = rng.normal(size=(K, 3 * H)), rng.normal(size=(K, H))
    J64, J32 = np.empty((K, H, H)), np.empty((K, H, H), np.float32)
    cpu.fixed_point_jacobian(W_hh, xproj, h, 5.0, J64)
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    cpu.fixed_point_jacobian(f32(W_hh), f32(xproj), f32(h), 5.0, J32)
    np.testing.assert_allclose(J32, J64, atol=1e-5)


# ---------------------------------------------------------------------------- known fixed points


def independent_units_gru():
    """A GRU whose units do not interact: W_hz = W_hr = 0 and W_hn diagonal, so each unit's
    fixed points are the roots of h = tanh(b + w r h) (r = sigmoid of the r bias), and the
    network's are all their combinations. Units 0-2 are bistable (3 roots), unit 3 is not:
    27 fixed points, 8 of them stable. The input carries the n biases, to exercise W_ih."""
    H, I = 4, 2
    w = np.array([2.5, 3.0, 2.2, 0.5])
    b_n = np.array([0.05, -0.1, 0.02, 0.3])
    W_hh = np.zeros((3 * H, H))
    W_hh[2 * H:] = np.diag(w)
    W_ih = np.zeros((3 * H, I))
    W_ih[2 * H:, 0] = b_n  # input u = [1, 0] supplies the n bias
    b_ih = np.concatenate([np.full(H, 0.5), np.full(H, 2.0), np.zeros(H)])
    u = np.array([1.0, 0.0])
    r = sigmoid(2.0)
    roots = []
    for i in range(H):
        g = np.linspace(-1, 1, 20001)
        f = np.tanh(b_n[i] + w[i] * r * g) - g
        idx = np.flatnonzero(np.sign(f[:-1]) != np.sign(f[1:]))
        unit = []
        for j in idx:  # bisection to float64 precision
            lo, hi = g[j], g[j + 1]
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                same = np.sign(np.tanh(b_n[i] + w[i] * r * mid) - mid) == np.sign(np.tanh(b_n[i] + w[i] * r * lo) - lo)
                lo, hi = (mid, hi) if same else (lo, mid)
            unit.append(0.5 * (lo + hi))
        roots.append(unit)
    grids = np.meshgrid(*roots, indexing="ij")
    points = np.stack([g.ravel() for g in grids], axis=1)
    z = sigmoid(0.5)
    # Diagonal Jacobian at a fixed point (h = n there): z + (1 - z)(1 - h^2) w r.
    lam = z + (1 - z) * (1 - points**2) * w * r
    stable = (np.abs(lam) < 1).all(axis=1)
    return W_ih, b_ih, W_hh, u, points, stable


@pytest.mark.parametrize("method", ["newton", "adam"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finds_all_fixed_points_of_independent_units(method, dtype):
    W_ih, b_ih, W_hh, u, truth, stable = independent_units_gru()
    assert len(truth) == 27 and stable.sum() == 8
    rng = np.random.default_rng(3)
    h0 = rng.uniform(-1, 1, (3000 if method == "newton" else 1500, 4))
    fps = fp.find_fixed_points(W_ih, b_ih, W_hh, 5.0, h0, u, method=method, dtype=dtype)
    if method == "adam":  # Adam also stops at slow points by tol_dq; keep the fixed points
        fps = fps[fps.q < 1e-10]
    assert len(fps) == 27
    assert match(fps.xstar, truth, SAME_POINT_TOL).all(), "a spurious point"
    assert match(truth, fps.xstar, SAME_POINT_TOL).all(), "a missed point"
    order = [int(np.abs(truth - x).max(axis=1).argmin()) for x in fps.xstar]
    np.testing.assert_array_equal(fps.is_stable, stable[order])
    np.testing.assert_allclose(fps.inputs, np.broadcast_to(u, fps.inputs.shape))


def dense_search_fixed_points(W_ih, b_ih, W_hh, clip):
    """All fixed points of a 3-unit GRU without inputs: q on a 41^3 grid of [-1, 1]^3 (which
    holds every fixed point), its grid-local minima polished by numpy_newton."""
    H = W_hh.shape[1]
    g = np.linspace(-1, 1, 41)
    grid = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, H)
    xproj = np.broadcast_to(b_ih, (len(grid), 3 * H))
    F, _ = gru_step(W_hh, xproj, grid, clip)
    q = (0.5 * ((F - grid) ** 2).sum(1)).reshape(41, 41, 41)
    padded = np.pad(q, 1, constant_values=np.inf)
    is_min = np.ones_like(q, bool)
    for d in np.ndindex(3, 3, 3):
        if d != (1, 1, 1):
            is_min &= q <= padded[d[0]:d[0] + 41, d[1]:d[1] + 41, d[2]:d[2] + 41]
    found = []
    for start in grid[is_min.ravel()]:
        x, qx = numpy_newton(W_hh, b_ih, start, clip)
        if qx < 1e-24 and not match(x[None], np.array(found).reshape(-1, H), 1e-8).any():
            found.append(x)
    return np.array(found)


def test_dense_gru_matches_dense_search():
    rng = np.random.default_rng(3)
    W_ih, b_ih, W_hh = random_gru(rng, 3, gain=4.0)
    truth = dense_search_fixed_points(W_ih, b_ih, W_hh, 5.0)
    assert len(truth) >= 3, "the test network must have several fixed points"
    h0 = rng.uniform(-1, 1, (2000, 3))
    fps = fp.find_fixed_points(W_ih, b_ih, W_hh, 5.0, h0, dtype=np.float64, tol_q=1e-28)
    assert match(fps.xstar, truth, 1e-8).all(), "a spurious point"
    assert match(truth, fps.xstar, 1e-8).all(), "a missed point"
    assert (fps.q < 1e-24).all()


def test_stability_matches_finite_difference_eigenvalues():
    rng = np.random.default_rng(3)
    W_ih, b_ih, W_hh = random_gru(rng, 12, gain=3.0)
    fps = fp.find_fixed_points(W_ih, b_ih, W_hh, 5.0, rng.uniform(-1, 1, (500, 12)), dtype=np.float64)
    assert len(fps) >= 2 and fps.is_stable.any() and not fps.is_stable.all()
    xproj = np.broadcast_to(b_ih, (len(fps), 36))
    J = fd_jacobian(W_hh, xproj, fps.xstar, 5.0)
    np.testing.assert_allclose(fps.jacobians, J, atol=FD_TOL)
    lam = np.linalg.eigvals(J)
    np.testing.assert_array_equal(fps.is_stable, np.abs(lam).max(axis=1) < 1)
    np.testing.assert_allclose(np.abs(fps.eigenvalues), -np.sort(-np.abs(lam), axis=1), atol=1e-6)
    # Eigenvectors: J v = lambda v column by column.
    for Jk, lk, Vk in zip(fps.jacobians, fps.eigenvalues, fps.eigenvectors):
        np.testing.assert_allclose(Jk @ Vk, Vk * lk, atol=1e-9)


def test_adam_and_newton_agree():
    rng = np.random.default_rng(6)
    W_ih, b_ih, W_hh = random_gru(rng, 6, gain=3.0)
    h0 = rng.uniform(-1, 1, (400, 6))
    newton = fp.find_fixed_points(W_ih, b_ih, W_hh, 5.0, h0, dtype=np.float64)
    adam = fp.find_fixed_points(W_ih, b_ih, W_hh, 5.0, h0, method="adam", dtype=np.float64)
    adam = adam[adam.q < 1e-12]  # without the slow points where tol_dq stopped Adam
    assert adam.is_stable.any()
    # Every fixed point Adam finds, Newton finds too, with the same stability. (On the GRU of
    # independent units both find all 27: test_finds_all_fixed_points_of_independent_units.)
    assert match(adam.xstar, newton.xstar, SAME_POINT_TOL).all()
    order = [int(np.abs(newton.xstar - x).max(axis=1).argmin()) for x in adam.xstar]
    np.testing.assert_array_equal(adam.is_stable, newton.is_stable[order])


def test_newton_reports_iterations_and_convergence():
    W_ih, b_ih, W_hh, u, truth, _ = independent_units_gru()
    h0 = truth + 0.01
    fps = fp.find_fixed_points(W_ih, b_ih, W_hh, 5.0, h0, u, unique=False, dtype=np.float64,
                               compute_jacobians=False)
    assert len(fps) == len(h0) and fps.converged.all()
    assert (fps.iterations >= 1).all() and (fps.iterations <= 10).all()
    np.testing.assert_array_equal(fps.initial_states, h0)
    # One maximum-iteration step leaves the points unconverged but improved.
    one = fp.find_fixed_points(W_ih, b_ih, W_hh, 5.0, h0 + 0.2, u, unique=False, max_iters=1,
                               compute_jacobians=False)
    assert (one.iterations <= 1).all() and not one.converged.all()


# ---------------------------------------------------------------------------- flip-flop


def flipflop_batch(rng, T, B, bits=3, p=0.05):
    """Inputs [T, B, bits] (sparse +-1 pulses) and targets (the last pulse of each channel)."""
    pulses = rng.random((T, B, bits)) < p
    signs = np.where(rng.random((T, B, bits)) < 0.5, -1.0, 1.0)
    x = pulses * signs
    y = np.zeros_like(x)
    state = np.zeros((B, bits))
    for t in range(T):
        state = np.where(pulses[t], signs[t], state)
        y[t] = state
    return x, y


def train_flipflop(H=24, steps=1200, T=128, B=32, clip=5.0, noise=0.2, lr=1e-2, seed=0):
    """A clipped GRU trained on the 3-bit flip-flop with the package's sequence kernels and a
    numpy Adam. Input noise makes memories that drift fail, so the network learns attractors."""
    rng = np.random.default_rng(seed)
    I = O = 3
    P = {"W_ih": rng.normal(0, 1 / np.sqrt(I), (3 * H, I)),
         "b_ih": np.concatenate([np.ones(2 * H), np.zeros(H)]),
         "W_hh": rng.normal(0, 1 / np.sqrt(H), (3 * H, H)),
         "W_out": rng.normal(0, 1 / np.sqrt(H), (O, H)), "b_out": np.zeros(O)}
    P = {k: v.astype(np.float32) for k, v in P.items()}
    m = {k: np.zeros_like(v) for k, v in P.items()}
    v = {k: np.zeros_like(v) for k, v in P.items()}
    h0 = np.zeros((B, H), np.float32)
    hs, gates = np.empty((T, B, H), np.float32), np.empty((T, B, 3 * H), np.float32)
    d_x, work = np.empty((T, B, 3 * H), np.float32), np.empty((T, B, H), np.float32)
    d_W_hh, d_h0 = np.empty((3 * H, H), np.float32), np.empty((B, H), np.float32)
    for step in range(1, steps + 1):
        x, y = flipflop_batch(rng, T, B)
        x = (x + noise * rng.standard_normal(x.shape)).astype(np.float32)
        xproj = np.ascontiguousarray(x @ P["W_ih"].T + P["b_ih"], dtype=np.float32)
        cpu.gru_forward(xproj, 0, P["W_hh"], h0, hs, gates, False, clip)
        err = hs @ P["W_out"].T + P["b_out"] - y
        d_out = (2 / err.size * err).astype(np.float32)
        d_hs = np.ascontiguousarray(d_out @ P["W_out"], dtype=np.float32)
        cpu.gru_backward(P["W_hh"], h0, hs, gates, d_hs, None, d_x, 0, d_W_hh, d_h0, work, False, clip)
        grads = {"W_ih": d_x.reshape(-1, 3 * H).T @ x.reshape(-1, I), "b_ih": d_x.sum((0, 1)),
                 "W_hh": d_W_hh, "W_out": d_out.reshape(-1, O).T @ hs.reshape(-1, H),
                 "b_out": d_out.sum((0, 1))}
        for k in P:
            m[k] = 0.9 * m[k] + 0.1 * grads[k]
            v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
            step_size = lr * np.sqrt(1 - 0.999**step) / (1 - 0.9**step)
            P[k] -= (step_size * m[k] / (np.sqrt(v[k]) + 1e-8)).astype(np.float32)
    # Trajectories on fresh noiseless data, [B, T, H], for sampling and plotting.
    x, _ = flipflop_batch(rng, 256, 64)
    xproj = np.ascontiguousarray(x @ P["W_ih"].T + P["b_ih"], dtype=np.float32)
    hs, gates = np.empty((256, 64, H), np.float32), np.empty((256, 64, 3 * H), np.float32)
    cpu.gru_forward(xproj, 0, P["W_hh"], np.zeros((64, H), np.float32), hs, gates, False, clip)
    return P, hs.transpose(1, 0, 2)


@pytest.fixture(scope="module")
def flipflop():
    threads = cpu.get_num_threads()
    cpu.set_num_threads(1)  # tiny batches: one thread is faster, and the run is reproducible
    try:
        return train_flipflop()
    finally:
        cpu.set_num_threads(threads)


def test_flipflop_has_eight_stable_corners_and_saddles(flipflop, tmp_path):
    P, traj = flipflop
    states = fp.sample_initial_states(traj, 1024, noise_scale=0.05, rng=0)
    params = {"gen_W_ih": P["W_ih"], "gen_b_ih": P["b_ih"], "gen_W_hh": P["W_hh"]}
    cfg = type("Config", (), {"cell_clip": 5.0})()
    fps = fp.from_generator(params, cfg, states)
    stable = fps[fps.is_stable]
    assert len(stable) == 8
    readout = stable.xstar @ P["W_out"].T + P["b_out"]
    assert (np.abs(readout) > 0.5).all(), "stable points must encode definite bits"
    assert len({tuple(s) for s in np.sign(readout).astype(int)}) == 8, "all 8 bit patterns"
    saddles = fps[~fps.is_stable]
    assert len(saddles) >= 6
    # Saddles between corners: few unstable directions.
    assert (np.sum(np.abs(saddles.eigenvalues) > 1, axis=1) <= 3).all()
    fps.plot(tmp_path / "flipflop.png", traj)
    assert (tmp_path / "flipflop.png").stat().st_size > 0


# ---------------------------------------------------------------------------- API


def test_unique_keeps_lowest_q_and_outliers_are_removed():
    x = np.array([[0.0, 0.0], [0.0004, 0.0], [0.5, 0.5], [0.5003, 0.5], [9.0, 9.0]])
    pts = fp.FixedPoints(xstar=x, q=np.array([3e-13, 1e-13, 1e-14, 2e-14, 1e-13]),
                         iterations=np.ones(5, np.int32), converged=np.ones(5, bool),
                         inputs=np.zeros((5, 0)), initial_states=x)
    u = pts.unique(1e-3)
    np.testing.assert_array_equal(u.xstar, x[[2, 1, 4]])
    h0 = np.random.default_rng(0).uniform(-1, 1, (100, 2))
    kept = u.exclude_outliers(10.0, h0)
    assert len(kept) == 2 and not match(np.array([[9.0, 9.0]]), kept.xstar, 1e-9).any()
    near = pts.unique(1e-3).exclude_outliers(2.0, rule="nearest")
    assert not match(np.array([[9.0, 9.0]]), near.xstar, 1e-9).any()


def test_save_load_roundtrip(tmp_path):
    W_ih, b_ih, W_hh, u, _, _ = independent_units_gru()
    fps = fp.find_fixed_points(W_ih, b_ih, W_hh, 5.0, np.random.default_rng(0).uniform(-1, 1, (300, 4)), u)
    path = tmp_path / "fps.h5"
    fps.save_h5(path)
    assert os.listdir(tmp_path) == ["fps.h5"], "no temp file left behind"
    back = fp.FixedPoints.load_h5(path)
    for name in ("xstar", "q", "iterations", "converged", "inputs", "initial_states", "jacobians",
                 "eigenvalues", "eigenvectors"):
        np.testing.assert_array_equal(getattr(back, name), getattr(fps, name))
    assert back.info == fps.info
    np.testing.assert_array_equal(back.is_stable, fps.is_stable)


def test_sample_initial_states_layouts():
    traj = np.random.default_rng(0).normal(size=(4, 5, 3))
    a = fp.sample_initial_states(traj, 50, rng=1)
    b = fp.sample_initial_states(traj.reshape(-1, 3), 50, rng=1)
    np.testing.assert_array_equal(a, b)
    assert match(a, traj.reshape(-1, 3), 0).all()
    noisy = fp.sample_initial_states(traj, 2000, noise_scale=0.1, rng=2)
    assert 0.05 < np.std(noisy - fp.sample_initial_states(traj, 2000, rng=2)) < 0.2
    traj[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fp.sample_initial_states(traj, 5)


def test_bad_inputs_have_clear_errors():
    W_ih, b_ih, W_hh, u, _, _ = independent_units_gru()
    h0 = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"initial_states must be \[K, 4\]"):
        fp.find_fixed_points(W_ih, b_ih, W_hh, 5.0, np.zeros((3, 5)), u)
    bad = h0.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="initial_states contains NaN"):
        fp.find_fixed_points(W_ih, b_ih, W_hh, 5.0, bad, u)
    with pytest.raises(ValueError, match=r"inputs must be \[3, 2\]"):
        fp.find_fixed_points(W_ih, b_ih, W_hh, 5.0, h0, np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"W_hh must be \[3G, G\]"):
        fp.find_fixed_points(W_ih, b_ih, W_hh[:, :3], 5.0, h0, u)
    with pytest.raises(ValueError, match=r"b_ih must be \[12\]"):
        fp.find_fixed_points(W_ih, b_ih[:5], W_hh, 5.0, h0, u)
    with pytest.raises(ValueError, match="method"):
        fp.find_fixed_points(W_ih, b_ih, W_hh, 5.0, h0, u, method="lbfgs")
    with pytest.raises(ValueError, match="clip"):
        fp.find_fixed_points(W_ih, b_ih, W_hh, 0.0, h0, u)
    with pytest.raises(ValueError, match="unknown adam_options"):
        fp.find_fixed_points(W_ih, b_ih, W_hh, 5.0, h0, u, method="adam", adam_options={"lr": 1})
    with pytest.raises(KeyError, match="gen_W_hh"):
        fp.from_generator({"gen_W_ih": W_ih, "gen_b_ih": b_ih}, {"cell_clip": 5.0}, h0)
    # The bindings name the argument, the expected shape and dtype.
    q, it, cv = np.empty(3, np.float32), np.empty(3, np.int32), np.empty(3, np.uint8)
    h32, x32 = np.zeros((3, 4), np.float32), np.zeros((3, 12), np.float32)
    with pytest.raises(ValueError, match=r"W_hh must be \[12, 4\] float32"):
        cpu.fixed_points_newton(W_hh, x32, h32, 5.0, q, it, cv, 1e-12, 1e-6, 10)
    with pytest.raises(ValueError, match=r"xproj must be \[3, 12\] float32 C-contiguous"):
        cpu.fixed_points_newton(W_hh.astype(np.float32), np.zeros((12, 3), np.float32).T, h32,
                                5.0, q, it, cv, 1e-12, 1e-6, 10)
    with pytest.raises(ValueError, match=r"iterations must be a writeable \[3\] int32"):
        cpu.fixed_points_newton(W_hh.astype(np.float32), x32, h32, 5.0, q, np.empty(3), cv,
                                1e-12, 1e-6, 10)
