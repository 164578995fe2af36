"""Fixed points of a trained LFADS generator (a clipped GRU).

For the generator step F(h, u) (the clipped GRU of the model, input u = [controller output,
external inputs]) a fixed point is a state h* with F(h*, u) = h*. Following Sussillo & Barak
(2013) and Golub & Sussillo's FixedPointFinder, the solvers minimise q(h) = 1/2 ||F(h, u) - h||^2
from many initial states at once (typically states visited by the trained network, plus
noise), then keep one point per cluster and characterise each by the eigenvalues of the
Jacobian dF/dh: a fixed point of the map is stable when every |eigenvalue| < 1.

Two solvers run entirely in the compiled core (csrc/fixed_points.h):

- ``"newton"``: damped Newton / Levenberg-Marquardt on F(h) - h with the analytic Jacobian;
  converges in a handful of steps and finds unstable points (saddles) as readily as stable ones.
- ``"adam"``: FixedPointFinder's optimiser (Adam with its adaptive learning rate and adaptive
  gradient-norm clipping, stopping rules tol_q and tol_dq), each point on its own.

Typical use on a trained model (find runs the model on data, samples the initial states from
the generator states it visits and calls from_generator)::

    fps = fixed_points.find(model, dataset.valid.encod_data, n_init=1000, noise_scale=0.01)
    fps.plot("fixed_points.png")        # in the PC space of the generator trajectories
    fps.save_h5("fixed_points.h5")

or, on any generator parameters::

    states = sample_initial_states(gen_states, 1024, noise_scale=0.01, rng=0)
    fps = from_generator(params, cfg, states)

docs/fixed_points.md describes both, and the command line.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._backend import cpu
from .posterior import sample_and_average

# Constant generator inputs find() can derive from the data itself.
INPUT_MODES = ("zero", "mean")

# FixedPointFinder's defaults for its optimiser (TF1 Adam with epsilon 0.01,
# AdaptiveLearningRate, AdaptiveGradNormClip).
ADAM_DEFAULTS: dict[str, float] = {
    "beta1": 0.9,
    "beta2": 0.999,
    "eps": 0.01,
    "initial_rate": 1.0,
    "decrease_factor": 0.95,
    "increase_factor": 1.0 / 0.95,
    "n_decrease": 5,
    "n_increase": 5,
    "clip_window": 128,
    "clip_percentile": 95.0,
    "clip_initial": 1e12,
    "clip_max": 1e12,
}
# Default iteration caps: FixedPointFinder's for Adam; Newton needs far fewer steps and stops
# stalled points itself.
MAX_ITERS = {"newton": 100, "adam": 5000}
# Newton's step tolerance in units of the dtype's machine epsilon: a step this small relative
# to the state is rounding noise, so the point is a root to working precision.
TOL_STEP_EPS = 32
_H5_FORMAT = "lfads_fast.fixed_points/1"


def find_fixed_points(
    W_ih,
    b_ih,
    W_hh,
    clip: float,
    initial_states,
    inputs=None,
    *,
    method: str = "newton",
    tol_q: float = 1e-12,
    tol_dq: float = 1e-20,
    max_iters: int | None = None,
    tol_unique: float = 1e-3,
    outlier_scale: float | None = 10.0,
    outlier_rule: str = "centroid",
    unique: bool = True,
    compute_jacobians: bool = True,
    dtype=np.float32,
    tol_step: float | None = None,
    adam_options: Mapping[str, float] | None = None,
) -> FixedPoints:
    """Finds fixed points of the clipped GRU h' = F(h, u) from K initial states at once.

    Args:
        W_ih: input weights, [3G, I] (rows z, r, n; I = 0 for a GRU without inputs).
        b_ih: input bias, [3G].
        W_hh: recurrent weights, [3G, G].
        clip: cell clip (> 0; ``np.inf`` for none).
        initial_states: states to start from, [K, G], no NaN.
        inputs: constant input of each point, [K, I], or one input for all, [I]; None = zeros.
        method: ``"newton"`` or ``"adam"``.
        tol_q: a point has converged when q <= tol_q (Newton) or q < tol_q (Adam).
        tol_dq: Adam also stops a point when |q_k - q_{k-1}| < tol_dq * learning rate.
        max_iters: updates per point at most; None = 100 (Newton) or 5000 (Adam).
        tol_unique: two points are one when no coordinate of [xstar, inputs] differs by more.
        outlier_scale: points farther than this from the initial states are dropped (see
            ``outlier_rule``); None keeps all.
        outlier_rule: ``"centroid"`` (FixedPointFinder's: distance to the centroid of the
            initial states, in units of their mean distance to it) or ``"nearest"`` (distance
            to the nearest other fixed point, in units of the median of those distances).
        unique: True: the converged points, one per cluster (lowest q), outliers removed.
            False: one entry per initial state, in order, nothing removed.
        compute_jacobians: compute the Jacobians and their eigen-decompositions.
        dtype: float32 (the model's) or float64 (slower, polishes to ~1e-30).
        tol_step: Newton also converges when every |step_i| <= tol_step * (1 + max_i |h_i|);
            None = 32 machine epsilons of dtype.
        adam_options: overrides of ``ADAM_DEFAULTS`` (FixedPointFinder's hyperparameters).

    Returns:
        FixedPoints with xstar [N, G], q [N], iterations [N], converged [N], inputs [N, I],
        initial_states [N, G] and, if computed, jacobians [N, G, G], eigenvalues [N, G] and
        eigenvectors [N, G, G] (columns, sorted by decreasing |eigenvalue|).

    Raises:
        ValueError: bad shapes, NaN states or inputs, unknown method or options.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if method not in MAX_ITERS:
        raise ValueError(f"method must be 'newton' or 'adam', got {method!r}")
    if outlier_rule not in ("centroid", "nearest"):
        raise ValueError(f"outlier_rule must be 'centroid' or 'nearest', got {outlier_rule!r}")
    W_ih, b_ih, W_hh = _check_weights(W_ih, b_ih, W_hh, dtype)
    G, I = W_hh.shape[1], W_ih.shape[1]
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    h0 = _check_states(initial_states, G, "initial_states")
    K = h0.shape[0]
    u = _check_inputs(inputs, K, I)
    max_iters = _check_int("max_iters", MAX_ITERS[method] if max_iters is None else max_iters, 1)
    for name, value in (("tol_q", tol_q), ("tol_dq", tol_dq)):
        _check_number(name, value, low=0.0)
    _check_number("tol_unique", tol_unique, low=0.0, low_open=True)
    if outlier_scale is not None:
        _check_number("outlier_scale", outlier_scale, low=0.0, low_open=True)

    # Input projection once for all points (the op contract of the GRU kernels).
    xproj = np.ascontiguousarray((u.astype(np.float64) @ W_ih.astype(np.float64).T + b_ih).astype(dtype))
    h = np.array(h0, dtype=dtype)  # a copy: the solver updates it in place
    q = np.empty(K, dtype)
    iterations = np.empty(K, np.int32)
    converged = np.empty(K, np.uint8)
    if method == "newton":
        if tol_step is None:
            tol_step = TOL_STEP_EPS * float(np.finfo(dtype).eps)
        cpu.fixed_points_newton(W_hh, xproj, h, float(clip), q, iterations, converged,
                                tol_q=float(tol_q), tol_step=float(tol_step), max_iters=max_iters)
    else:
        options = dict(ADAM_DEFAULTS)
        unknown = set(adam_options or {}) - set(options)
        if unknown:
            raise ValueError(f"unknown adam_options {sorted(unknown)}; known: {sorted(options)}")
        options.update(adam_options or {})
        cpu.fixed_points_adam(W_hh, xproj, h, float(clip), q, iterations, converged,
                              tol_q=float(tol_q), tol_dq=float(tol_dq), max_iters=max_iters,
                              **options)

    fps = FixedPoints(
        xstar=h, q=q, iterations=iterations, converged=converged.astype(bool), inputs=u.astype(dtype),
        initial_states=h0.astype(dtype),
        info={"method": method, "tol_q": tol_q, "tol_dq": tol_dq, "max_iters": max_iters,
              "tol_unique": tol_unique, "clip": float(clip), "n_initial_states": K},
    )
    if unique:
        fps = fps[fps.converged].unique(tol_unique)
        if outlier_scale is not None:
            fps = fps.exclude_outliers(outlier_scale, h0, rule=outlier_rule)
    if compute_jacobians:
        fps.compute_jacobians(W_ih, b_ih, W_hh, clip)
    return fps


def from_generator(params: Mapping[str, Any], cfg, initial_states, inputs=None, **kwargs) -> FixedPoints:
    """Fixed points of an LFADS generator: ``find_fixed_points`` on its parameters.

    Args:
        params: parameter arrays by name; uses gen_W_ih [3G, U+E], gen_b_ih [3G] and
            gen_W_hh [3G, G] (numpy, or device arrays with ``.get()``).
        cfg: the model configuration: an object with attribute ``cell_clip`` or a mapping with
            that key.
        initial_states: [K, G] generator states to start from (see sample_initial_states).
        inputs: generator inputs [u, ext], [K, U+E] or [U+E]; None = zeros (autonomous
            dynamics).
        **kwargs: passed on to find_fixed_points.

    Returns:
        FixedPoints.
    """
    missing = [k for k in ("gen_W_ih", "gen_b_ih", "gen_W_hh") if k not in params]
    if missing:
        raise KeyError(f"params lacks {missing}; the generator parameters are gen_W_ih, "
                       f"gen_b_ih and gen_W_hh")
    clip = cfg["cell_clip"] if isinstance(cfg, Mapping) else getattr(cfg, "cell_clip")
    return find_fixed_points(_host(params["gen_W_ih"]), _host(params["gen_b_ih"]),
                             _host(params["gen_W_hh"]), float(clip), initial_states, inputs,
                             **kwargs)


def sample_initial_states(trajectories, n: int, noise_scale: float = 0.0, rng=None) -> np.ndarray:
    """Draws initial states for the solvers from states the network visited.

    Args:
        trajectories: hidden states, [B, T, G] or [T, B, G] (all B*T states are pooled, so the
            order of the two leading axes does not matter), or already pooled, [N, G].
        n: number of states to draw (with replacement, as FixedPointFinder).
        noise_scale: standard deviation of i.i.d. Gaussian noise added to each state.
        rng: numpy Generator, seed, or None.

    Returns:
        [n, G] float64 states.
    """
    traj = np.asarray(_host(trajectories), dtype=np.float64)
    if traj.ndim not in (2, 3) or traj.shape[-1] == 0 or traj.size == 0:
        raise ValueError(f"trajectories must be [B, T, G], [T, B, G] or [N, G] with G > 0, "
                         f"got shape {traj.shape}")
    pool = traj.reshape(-1, traj.shape[-1])
    if np.isnan(pool).any():
        raise ValueError("trajectories contain NaN")
    n = _check_int("n", n, 1)
    _check_number("noise_scale", noise_scale, low=0.0)
    rng = np.random.default_rng(rng)
    states = pool[rng.integers(0, len(pool), size=n)]
    if noise_scale > 0:
        states = states + noise_scale * rng.standard_normal(states.shape)
    return states


@dataclass
class FixedPoints:
    """A set of fixed points and what is known about them.

    Attributes:
        xstar: the states, [N, G].
        q: 1/2 ||F(xstar) - xstar||^2, [N].
        iterations: solver updates per point, [N] int32.
        converged: whether the solver's stopping rule called the point converged, [N] bool.
        inputs: the constant input of each point, [N, I].
        initial_states: where each point's solve started, [N, G].
        jacobians: dF/dh at xstar, [N, G, G], or None.
        eigenvalues: of each Jacobian, [N, G] complex, by decreasing modulus, or None.
        eigenvectors: matching unit eigenvectors as columns, [N, G, G] complex, or None.
        trajectories: the generator states the initial states were sampled from, [B, T, G]
            (trials, time steps, units), or None; plot draws the points in their
            principal-component space. Kept whole by indexing.
        info: solver settings (method, tolerances, clip, ...).
    """

    xstar: np.ndarray
    q: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    inputs: np.ndarray
    initial_states: np.ndarray
    jacobians: np.ndarray | None = None
    eigenvalues: np.ndarray | None = None
    eigenvectors: np.ndarray | None = None
    trajectories: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.xstar.shape[0]

    def __getitem__(self, index) -> FixedPoints:
        """The subset at an integer array, boolean mask or slice."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]

        def take(a):
            return None if a is None else a[index]

        return FixedPoints(
            xstar=self.xstar[index], q=self.q[index], iterations=self.iterations[index],
            converged=self.converged[index], inputs=self.inputs[index],
            initial_states=self.initial_states[index], jacobians=take(self.jacobians),
            eigenvalues=take(self.eigenvalues), eigenvectors=take(self.eigenvectors),
            trajectories=self.trajectories, info=dict(self.info),
        )

    @property
    def is_stable(self) -> np.ndarray:
        """[N] bool: every eigenvalue of the Jacobian inside the unit circle."""
        if self.eigenvalues is None:
            raise ValueError("no eigenvalues: call compute_jacobians first")
        if len(self) == 0:
            return np.zeros(0, bool)
        return np.abs(self.eigenvalues).max(axis=1) < 1.0

    def unique(self, tol: float = 1e-3) -> FixedPoints:
        """One point per cluster, the one with the lowest q.

        Two points match when no coordinate of [xstar, inputs] differs by more than ``tol``
        (FixedPointFinder's rule). Taken in order of increasing q, a point is dropped when it
        matches a kept point or shares a cell of the tol-grid with a better one, and kept
        otherwise. Result in order of increasing q.
        """
        if len(self) == 0:
            return self[np.zeros(0, int)]
        data = np.concatenate([self.xstar, self.inputs], axis=1).astype(np.float64)
        order = np.argsort(self.q, kind="stable")
        # Points in the same cell of a tol-grid are within tol of each other, so the greedy pass
        # below needs only the best point of each occupied cell.
        _, first = np.unique(np.floor(data[order] / tol), axis=0, return_index=True)
        candidates = order[np.sort(first)]
        kept: list[int] = []
        for i in candidates:
            if not kept or np.abs(data[kept] - data[i]).max(axis=1).min() > tol:
                kept.append(int(i))
        return self[np.asarray(kept, int)]

    def exclude_outliers(self, scale: float, initial_states=None, rule: str = "centroid") -> FixedPoints:
        """Drops points far from the rest.

        Args:
            scale: distance threshold in the rule's unit.
            initial_states: [K, G]; for the "centroid" rule (default: self.initial_states).
            rule: "centroid": ||xstar - c|| > scale * mean ||h0_k - c||, c the centroid of the
                initial states (FixedPointFinder's rule). "nearest": the distance to the
                nearest other point > scale * the median of those distances.
        """
        if len(self) == 0:
            return self
        if rule == "centroid":
            h0 = self.initial_states if initial_states is None else np.asarray(initial_states)
            c = h0.mean(axis=0)
            unit = np.linalg.norm(h0 - c, axis=1).mean()
            dist = np.linalg.norm(self.xstar - c, axis=1)
        elif rule == "nearest":
            if len(self) < 3:
                return self
            x = self.xstar.astype(np.float64)
            d2 = np.maximum((x * x).sum(1)[:, None] + (x * x).sum(1)[None] - 2 * x @ x.T, 0)
            np.fill_diagonal(d2, np.inf)
            dist = np.sqrt(d2.min(axis=1))
            unit = np.median(dist)
        else:
            raise ValueError(f"rule must be 'centroid' or 'nearest', got {rule!r}")
        if unit == 0:
            return self
        return self[dist <= scale * unit]

    def compute_jacobians(self, W_ih, b_ih, W_hh, clip: float) -> None:
        """Fills jacobians, eigenvalues and eigenvectors from the GRU's weights (shapes as in
        find_fixed_points)."""
        dtype = self.xstar.dtype
        W_ih, b_ih, W_hh = _check_weights(W_ih, b_ih, W_hh, dtype)
        G = W_hh.shape[1]
        N = len(self)
        J = np.empty((N, G, G), dtype)
        if N:
            xproj = np.ascontiguousarray((self.inputs.astype(np.float64) @ W_ih.astype(np.float64).T
                                          + b_ih).astype(dtype))
            cpu.fixed_point_jacobian(W_hh, xproj, np.ascontiguousarray(self.xstar), float(clip), J)
        self.jacobians = J
        evals, evecs = np.linalg.eig(J.astype(np.float64)) if N else (
            np.zeros((0, G), complex), np.zeros((0, G, G), complex))
        order = np.argsort(-np.abs(evals), axis=1, kind="stable")
        self.eigenvalues = np.take_along_axis(evals, order, axis=1)
        self.eigenvectors = np.take_along_axis(evecs, order[:, None, :], axis=2)

    def save_h5(self, path) -> None:
        """Writes all arrays and info to an HDF5 file, atomically (temp file + rename)."""
        import h5py

        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fixed_points.", suffix=".h5.tmp")
        os.close(fd)
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["format"] = _H5_FORMAT
                for name in _ARRAYS:
                    value = getattr(self, name)
                    if value is not None:
                        f.create_dataset(name, data=value.astype(np.uint8) if name == "converged" else value)
                for k, v in self.info.items():
                    f.attrs["info." + k] = v
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load_h5(cls, path) -> FixedPoints:
        """Reads a file written by save_h5."""
        import h5py

        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != _H5_FORMAT:
                raise ValueError(f"{path} is not a fixed-points file (format attribute "
                                 f"{f.attrs.get('format')!r}, expected {_H5_FORMAT!r})")
            arrays = {name: f[name][()] for name in _ARRAYS if name in f}
            info = {k[len("info."):]: _plain(v) for k, v in f.attrs.items() if k.startswith("info.")}
        arrays["converged"] = arrays["converged"].astype(bool)
        return cls(**arrays, info=info)

    def plot(self, path, trajectories=None, *, time_major: bool = False, n_components: int = 3,
             mode_scale: float = 0.25, max_modes: int = 2, max_trajectories: int = 64) -> None:
        """Draws the points in the principal-component space of the trajectories.

        Stable points are filled black dots, unstable ones red crosses with their leading
        unstable modes (|eigenvalue| > 1, real part of the eigenvector) as short red lines
        through the point.

        Args:
            path: image file to write (format from the extension).
            trajectories: hidden states [B, T, G] (or [T, B, G] with time_major) drawn as grey
                lines and used for the PCA; None = self.trajectories, or when there are none
                the PCA of the points themselves.
            time_major: trajectories are [T, B, G].
            n_components: 2 or 3 (a 3-D plot).
            mode_scale: half-length of the mode lines, in state units.
            max_modes: unstable modes drawn per point at most (the largest |eigenvalue| first).
            max_trajectories: trials drawn at most.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if n_components not in (2, 3):
            raise ValueError(f"n_components must be 2 or 3, got {n_components}")
        if trajectories is None and self.trajectories is not None:
            trajectories, time_major = self.trajectories, False
        traj = None
        if trajectories is not None:
            traj = np.asarray(_host(trajectories), dtype=np.float64)
            if traj.ndim != 3 or traj.shape[-1] != self.xstar.shape[1]:
                raise ValueError(f"trajectories must be [B, T, {self.xstar.shape[1]}], got "
                                 f"shape {traj.shape}")
            if time_major:
                traj = traj.transpose(1, 0, 2)
        basis_data = traj.reshape(-1, traj.shape[-1]) if traj is not None else self.xstar
        mean = basis_data.mean(axis=0)
        _, _, vt = np.linalg.svd(basis_data - mean, full_matrices=False)
        pcs = np.zeros((basis_data.shape[1], n_components))
        pcs[:, : min(n_components, vt.shape[0])] = vt[:n_components].T

        def project(x):
            return (np.asarray(x, np.float64) - mean) @ pcs

        fig = Figure(figsize=(6, 6))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(projection="3d" if n_components == 3 else None)
        if traj is not None:
            for trial in traj[:max_trajectories]:
                ax.plot(*project(trial).T, color="0.7", lw=0.6)
        stable = self.is_stable if self.eigenvalues is not None else np.zeros(len(self), bool)
        for i in range(len(self)):
            p = project(self.xstar[i])
            if stable[i]:
                ax.scatter(*p, color="k", s=25, zorder=3)
                continue
            ax.scatter(*p, color="r", marker="x", s=30, zorder=3)
            if self.eigenvalues is None:
                continue
            for j in np.flatnonzero(np.abs(self.eigenvalues[i]) > 1)[:max_modes]:
                v = np.real(self.eigenvectors[i][:, j])
                v = v / (np.linalg.norm(v) or 1.0)
                ends = project(np.stack([self.xstar[i] - mode_scale * v, self.xstar[i] + mode_scale * v]))
                ax.plot(*ends.T, color="r", lw=1.2)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
        if n_components == 3:
            ax.set_zlabel("PC3")
        ax.set_title(f"{int(stable.sum())} stable, {len(self) - int(stable.sum())} unstable fixed points")
        fig.savefig(os.fspath(path), dpi=120)


_ARRAYS = ("xstar", "q", "iterations", "converged", "inputs", "initial_states", "jacobians",
           "eigenvalues", "eigenvectors", "trajectories")


def _host(a):
    """numpy view of a numpy or device (cupy) array."""
    return a.get() if hasattr(a, "get") and not isinstance(a, (np.ndarray, Mapping)) else a


def _plain(v):
    """HDF5 attribute value as a plain Python value."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _check_weights(W_ih, b_ih, W_hh, dtype):
    W_hh = np.asarray(_host(W_hh))
    if W_hh.ndim != 2 or W_hh.shape[0] != 3 * W_hh.shape[1] or W_hh.shape[1] == 0:
        raise ValueError(f"W_hh must be [3G, G], got shape {W_hh.shape}")
    G = W_hh.shape[1]
    W_ih = np.asarray(_host(W_ih))
    if W_ih.ndim != 2 or W_ih.shape[0] != 3 * G:
        raise ValueError(f"W_ih must be [{3 * G}, I] (3G rows for G = {G}), got shape {W_ih.shape}")
    b_ih = np.asarray(_host(b_ih))
    if b_ih.shape != (3 * G,):
        raise ValueError(f"b_ih must be [{3 * G}] (3G for G = {G}), got shape {b_ih.shape}")
    for name, a in (("W_ih", W_ih), ("b_ih", b_ih), ("W_hh", W_hh)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf")
    return (np.ascontiguousarray(W_ih, dtype), np.ascontiguousarray(b_ih, dtype),
            np.ascontiguousarray(W_hh, dtype))


def _check_states(states, G: int, name: str) -> np.ndarray:
    states = np.asarray(_host(states))
    if states.ndim != 2 or states.shape[1] != G or states.shape[0] == 0:
        raise ValueError(f"{name} must be [K, {G}] (K >= 1 states of the {G} hidden units), "
                         f"got shape {states.shape}")
    bad = ~np.isfinite(states).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} contains NaN or inf (rows {np.flatnonzero(bad)[:5].tolist()}...)")
    return states.astype(np.float64)


def _check_inputs(inputs, K: int, I: int) -> np.ndarray:
    if inputs is None:
        return np.zeros((K, I))
    u = np.asarray(_host(inputs), dtype=np.float64)
    if u.ndim == 1 and u.shape == (I,):
        u = np.broadcast_to(u, (K, I))
    if u.shape != (K, I):
        raise ValueError(f"inputs must be [{K}, {I}] (one input per initial state) or [{I}], "
                         f"got shape {u.shape}")
    if not np.isfinite(u).all():
        raise ValueError("inputs contain NaN or inf")
    return np.ascontiguousarray(u)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_number(name: str, value, *, low: float, low_open: bool = False) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
          and np.isfinite(value) and (value > low if low_open else value >= low))
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if low_open else '>='} {low}, "
                         f"got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------- LFADS models


def find(model, encod_data, ext_input=None, *, session: int | None = None, inputs="zero",
         ext_inputs="zero", n_init: int = 1000, noise_scale: float = 0.01, method: str = "newton",
         seed: int = 0, **solver_options) -> FixedPoints:
    """Fixed points of a model's generator, started from the states it visits on some trials.

    Runs the model on the trials (posterior means, no dropout), draws n_init initial states
    from the generator states of all trials and time steps plus Gaussian noise
    (fixed_points.sample_initial_states), and solves F(h, v) = h for the generator's GRU
    step F with one constant input v = [u, ext] (fixed_points.from_generator).
    docs/fixed_points.md explains the choices.

    Args:
        model: a trained LFADS (on any device: the trajectories come back to the host,
            where the solver runs).
        encod_data: spike counts [B, encod_seq_len, encod_data_dim] (with sessions:
            session_neurons[session] neurons); NaN = missing bin, as in forward.
        ext_input: external inputs [B, T, ext_input_dim], or None (required when
            ext_input_dim > 0: the trajectories depend on them).
        session: the session of the trials; required with sessions, else None.
        inputs: the controller output u held constant, [co_dim]: "zero" (default: the
            generator's autonomous dynamics), "mean" (the mean of the posterior-mean
            controller outputs co_means over all trials and time steps), or an array
            [n_init or 1, co_dim] (or [co_dim]). Without a controller (co_dim = 0) u is
            empty and "zero" and "mean" are the same.
        ext_inputs: the external input held constant, [ext_input_dim]: "zero" (default),
            "mean" (the mean of ext_input over trials and its time steps), or an array
            [n_init or 1, ext_input_dim]. Empty when ext_input_dim = 0.
        n_init: number of initial states.
        noise_scale: standard deviation of the noise added to each initial state, in
            state units.
        method: "newton" (damped Newton / Levenberg-Marquardt) or "adam"
            (FixedPointFinder's optimiser).
        seed: seed of the initial-state draw and its noise.
        **solver_options: passed on to fixed_points.find_fixed_points (tol_q, tol_dq,
            max_iters, tol_unique, outlier_scale, outlier_rule, unique, dtype (default:
            the model's), adam_options, ...).

    Returns:
        fixed_points.FixedPoints: the unique converged points with their Jacobians and
        eigenvalues; inputs [N, co_dim + ext_input_dim] (u then ext); trajectories the
        generator states [B, recon_seq_len, gen_dim] that plot() draws; info with the
        settings (inputs, ext_inputs: "zero", "mean" or "given"; noise_scale, seed,
        n_trials, session).

    Raises:
        ValueError: bad shapes or option values (the message names the argument), data
            with no observed bin, non-finite parameters or generator states.
    """
    cfg = model.config
    n_init = _check_int("n_init", n_init, 1)
    noise_scale = _check_number("noise_scale", noise_scale, low=0.0)
    seed = _check_int("seed", seed, 0)
    if method not in MAX_ITERS:
        raise ValueError(f"method must be 'newton' or 'adam', got {method!r}")
    if not np.isfinite(_host(model.flat)).all():
        raise ValueError("the model's parameters contain NaN or inf")
    encod_data = np.asarray(encod_data)
    if encod_data.ndim != 3 or encod_data.shape[0] == 0:
        raise ValueError(f"encod_data must be [B, T, N] spike counts with B >= 1 trials, got shape "
                         f"{encod_data.shape}")
    if encod_data.dtype.kind == "f" and np.isnan(encod_data).all():
        raise ValueError("encod_data has no observed bins (all NaN)")
    B = encod_data.shape[0]
    if ext_input is not None:
        ext_input = np.asarray(ext_input)
        if ext_input.ndim != 3 or ext_input.shape[0] != B:
            raise ValueError(f"ext_input must be [{B}, T, ext_input_dim] (one row per trial of "
                             f"encod_data), got shape {ext_input.shape}")

    gen_states, co_mean = _generator_states(model, encod_data, ext_input, session)
    if not np.isfinite(gen_states).all():
        raise ValueError("the generator states of these trials are not finite")
    U = cfg.co_dim if cfg.use_con else 0
    E = cfg.ext_input_dim
    ext_mean = np.zeros(E) if ext_input is None or E == 0 else \
        ext_input.astype(np.float64).mean(axis=(0, 1))
    u = _input_block("inputs", inputs, co_mean, n_init, U, "co_dim")
    ext = _input_block("ext_inputs", ext_inputs, ext_mean, n_init, E, "ext_input_dim")

    states = sample_initial_states(gen_states, n_init, noise_scale, rng=seed)
    solver_options.setdefault("dtype", model.dtype)
    fps = from_generator(model.params, cfg, states, np.concatenate([u, ext], axis=1),
                         method=method, **solver_options)
    fps.trajectories = gen_states
    fps.info.update(inputs=_mode(inputs), ext_inputs=_mode(ext_inputs), noise_scale=noise_scale,
                    seed=seed, n_trials=B)
    if session is not None:
        fps.info["session"] = int(session)
    return fps


def _generator_states(model, encod_data, ext_input, session) -> tuple[np.ndarray, np.ndarray]:
    """Runs the model with the posterior means (posterior.sample_and_average, n_samples=0).

    Returns:
        (gen_states [B, T_r, G] in the model's dtype, mean controller output over trials and
        time steps [U] float64; [0] without a controller).
    """
    out = sample_and_average(model, encod_data, ext_input, n_samples=0, session=session)
    return out["gen_states"], out["co_means"].astype(np.float64).mean(axis=(0, 1))


def _input_block(name: str, spec, mean: np.ndarray, K: int, width: int, dim_name: str) -> np.ndarray:
    """One block of the generator input, [K, width], from 'zero', 'mean' or an array."""
    if spec is None or isinstance(spec, str):
        if spec is None or spec == "zero":
            return np.zeros((K, width))
        if spec == "mean":
            return np.broadcast_to(np.asarray(mean, np.float64), (K, width))
        raise ValueError(f"{name} must be one of {', '.join(map(repr, INPUT_MODES))} or an array "
                         f"[{K} or 1, {width}], got {spec!r}")
    a = np.asarray(_host(spec), dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] not in (1, K) or a.shape[1] != width:
        raise ValueError(f"{name} must be [{K} (n_init) or 1, {width}] ({dim_name} = {width}), "
                         f"got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return np.broadcast_to(a, (K, width))


def _mode(spec) -> str:
    """How an input block was chosen, for FixedPoints.info."""
    if spec is None:
        return "zero"
    return spec if isinstance(spec, str) else "given"
