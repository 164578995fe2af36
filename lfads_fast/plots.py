"""Figures of data and model outputs, written as PNG files.

Figures are built as ``matplotlib.figure.Figure`` objects and saved through the Agg renderer,
never through pyplot: importing this module switches no global backend, opens no window and
leaves no figure alive in pyplot's registry, so it is safe in scripts, notebooks and servers.

Rates are expected spike counts per bin, as everywhere in lfads_fast; given dt (seconds per
bin), plots show time in seconds and rates in Hz.
"""
from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

_TRUE_COLOR = "black"
_INFERRED_COLOR = "tab:red"


def plot_example_trials(
    path: str | os.PathLike,
    spikes: np.ndarray,
    true_rates: np.ndarray | None = None,
    inferred_rates: np.ndarray | None = None,
    trials: Sequence[int] = (0, 1, 2),
    neurons: Sequence[int] = (0, 1, 2, 3),
    dt: float | None = None,
) -> str:
    """Spike counts, true and inferred rates of a few trials.

    One row per trial: left, the counts of all neurons as an image; right, the rates of the
    chosen neurons stacked with offsets (truth black, inferred red) with their spikes as ticks.

    Args:
        path: the PNG file to write.
        spikes: counts, [B, T, N].
        true_rates: true expected counts per bin, [B, T, N], or None.
        inferred_rates: inferred expected counts per bin, [B, T, N] (e.g. output_params), or
            None.
        trials: trials to show.
        neurons: neurons whose rates to show.
        dt: bin width in seconds; None: time in bins and rates in counts per bin.

    Returns:
        The path written, as a string.
    """
    spikes = np.asarray(spikes)
    trials, neurons = list(trials), list(neurons)
    n_bins = spikes.shape[1]
    time = np.arange(n_bins) * (dt or 1.0)
    scale = 1.0 / dt if dt else 1.0
    fig = Figure(figsize=(11, 2.4 * len(trials)), layout="constrained")
    axes = fig.subplots(len(trials), 2, squeeze=False, width_ratios=(1, 1.4))
    for row, trial in enumerate(trials):
        image_ax, rate_ax = axes[row]
        image_ax.imshow(spikes[trial].T, aspect="auto", origin="lower", cmap="Greys",
                        interpolation="nearest", extent=(time[0], time[-1] + (dt or 1.0),
                                                         -0.5, spikes.shape[2] - 0.5))
        image_ax.set_ylabel(f"trial {trial}\nneuron")
        shown = [np.asarray(a)[trial][:, neurons] for a in (true_rates, inferred_rates)
                 if a is not None]
        peak = max((float(np.nanmax(a)) for a in shown), default=0.0) * scale
        offset = 1.2 * peak if peak > 0 else 1.0
        for k, n in enumerate(neurons):
            base = k * offset
            if true_rates is not None:
                rate_ax.plot(time, base + scale * np.asarray(true_rates)[trial, :, n],
                             color=_TRUE_COLOR, lw=1.2, label="true" if k == 0 else None)
            if inferred_rates is not None:
                rate_ax.plot(time, base + scale * np.asarray(inferred_rates)[trial, :, n],
                             color=_INFERRED_COLOR, lw=1.2,
                             label="inferred" if k == 0 else None)
            fired = np.nonzero(np.nan_to_num(spikes[trial, :, n]) > 0)[0]
            rate_ax.plot(time[fired], np.full(fired.size, base), "|", color="tab:blue",
                         ms=6, label="spikes" if k == 0 else None)
        rate_ax.set_yticks([k * offset for k in range(len(neurons))],
                           [f"n{n}" for n in neurons])
        rate_ax.set_ylabel("rate (Hz)" if dt else "rate (counts/bin)")
        if row == 0:
            rate_ax.legend(loc="upper right", fontsize="small")
    for ax in axes[-1]:
        ax.set_xlabel("time (s)" if dt else "bin")
    return _save(fig, path)


def plot_factor_trajectories(
    path: str | os.PathLike,
    factors: np.ndarray,
    conditions: np.ndarray | None = None,
    max_trajectories: int = 24,
) -> str:
    """Factor trajectories in the space of their top three principal components.

    Args:
        path: the PNG file to write.
        factors: [B, T, F].
        conditions: condition id per trial, [B]; given, trials are averaged per condition
            first and one trajectory per condition is drawn.
        max_trajectories: at most this many trajectories are drawn (all enter the PCA).

    Returns:
        The path written, as a string.
    """
    factors = np.asarray(factors, dtype=np.float64)
    title = "single trials"
    if conditions is not None:
        conditions = np.asarray(conditions)
        labels = np.unique(conditions)
        factors = np.stack([factors[conditions == c].mean(axis=0) for c in labels])
        title = "condition averages"
    n_traj, n_bins, n_factors = factors.shape
    n_pcs = min(3, n_traj * n_bins, n_factors)
    (projected,), explained = project_session_factors([factors], 3)

    fig = Figure(figsize=(6.5, 6), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    colors = _colors(min(n_traj, max_trajectories))
    for i, color in enumerate(colors):
        x, y, z = projected[i].T
        ax.plot(x, y, z, color=color, lw=1.0)
        ax.scatter(x[:1], y[:1], z[:1], color=color, s=12)
    for axis_label, k in zip(("x", "y", "z"), range(3)):
        text = f"PC{k + 1} ({explained[k]:.0%})" if k < n_pcs else f"PC{k + 1}"
        getattr(ax, f"set_{axis_label}label")(text)
    ax.set_title(f"factors, top PCs ({title}; dots: start)")
    return _save(fig, path)


def project_session_factors(averages: Sequence[np.ndarray], n_pcs: int = 3):
    """Projects several sessions' factor trajectories onto their common principal components.

    The components are those of all sessions' trajectories together (centred on their joint
    mean), so a session's projection is comparable with every other's: where the sessions
    share their dynamics, the same condition traces the same path in every session.

    Args:
        averages: per session, trajectories [C_s, T, F] (e.g. condition averages; all with
            the same T and F).
        n_pcs: components to keep (fewer when the trajectories have lower rank).

    Returns:
        (projected, explained): per session [C_s, T, n_pcs] (columns past the number of
            factors, or of points, are 0),
        and the variance fraction of each component [n_pcs].
    """
    averages = [np.asarray(a, dtype=np.float64) for a in averages]
    if not averages:
        raise ValueError("averages is empty: need the trajectories of at least one session")
    shape = averages[0].shape[1:]
    for s, a in enumerate(averages):
        if a.ndim != 3 or a.shape[1:] != shape or a.shape[0] == 0:
            raise ValueError(f"session {s}: trajectories must be [conditions, {shape[0]} bins, "
                             f"{shape[1]} factors], got {a.shape}")
    points = np.concatenate([a.reshape(-1, shape[1]) for a in averages])
    centre = points.mean(axis=0)
    _, singular, vt = np.linalg.svd(points - centre, full_matrices=False)
    k = min(n_pcs, vt.shape[0])
    variance = singular**2
    explained = np.zeros(n_pcs)
    explained[:k] = variance[:k] / max(variance.sum(), np.finfo(float).tiny)
    projected = []
    for a in averages:
        p = np.zeros(a.shape[:2] + (n_pcs,))
        p[..., :k] = (a - centre) @ vt[:k].T
        projected.append(p)
    return projected, explained


def plot_session_factors(
    path: str | os.PathLike,
    averages: Sequence[np.ndarray],
    session_names: Sequence[str] | None = None,
    conditions: np.ndarray | None = None,
    n_pcs: int = 3,
) -> str:
    """Condition-averaged factor trajectories of several sessions in shared principal components.

    All sessions' trajectories are projected onto the top components of all of them together
    (project_session_factors); each session gets a panel with the same axis limits, and
    condition c has the same colour in every panel, so a model whose sessions share their
    dynamics shows the same picture in every panel.

    Args:
        path: the PNG file to write.
        averages: per session, trajectories [C, T, F] with row c the same condition in every
            session (stitching.session_factor_averages); C = 1 for trial averages.
        session_names: panel titles (None: "session s").
        conditions: the condition labels of the rows [C], or None (trial averages: noted in
            the title).
        n_pcs: 3 (3-D panels) or 2.

    Returns:
        The path written, as a string.
    """
    if n_pcs not in (2, 3):
        raise ValueError(f"n_pcs must be 2 or 3, got {n_pcs!r}")
    projected, explained = project_session_factors(averages, n_pcs)
    n_sessions = len(projected)
    names = list(session_names) if session_names is not None else [f"session {s}" for s in range(n_sessions)]
    if len(names) != n_sessions:
        raise ValueError(f"{len(names)} session names for {n_sessions} sessions")
    stacked = np.concatenate([p.reshape(-1, n_pcs) for p in projected])
    low, high = stacked.min(axis=0), stacked.max(axis=0)
    pad = 0.05 * np.maximum(high - low, np.finfo(float).eps)
    limits = list(zip(low - pad, high + pad))
    n_cols = min(4, n_sessions)
    n_rows = -(-n_sessions // n_cols)
    fig = Figure(figsize=(3.8 * n_cols, 3.4 * n_rows + 0.6), layout="constrained")
    colors = _colors(max(p.shape[0] for p in projected))
    for s, p in enumerate(projected):
        kw = {"projection": "3d"} if n_pcs == 3 else {}
        ax = fig.add_subplot(n_rows, n_cols, s + 1, **kw)
        if n_pcs == 3:
            ax.set_box_aspect(None, zoom=0.8)  # room for the third axis label
        for c in range(p.shape[0]):
            ax.plot(*p[c].T, color=colors[c], lw=1.0)
            ax.scatter(*p[c, :1].T, color=colors[c], s=10)
        for axis, k in zip("xyz", range(n_pcs)):
            getattr(ax, f"set_{axis}lim")(*limits[k])
            getattr(ax, f"set_{axis}label")(f"PC{k + 1} ({explained[k]:.0%})", fontsize="small")
        ax.tick_params(labelsize="x-small")
        ax.set_title(names[s], fontsize="small")
    what = ("condition averages" if conditions is not None
            else "trial averages (no condition labels)")
    fig.suptitle(f"factors of every session in shared PCs ({what}; dots: start)")
    return _save(fig, path)


def plot_inferred_inputs(
    path: str | os.PathLike,
    inputs: np.ndarray,
    pulse_times: np.ndarray | None = None,
    trials: Sequence[int] = (0, 1, 2, 3),
    dt: float | None = None,
) -> str:
    """Inferred inputs (e.g. co_means or gen_inputs) of a few trials against true pulse times.

    One panel per trial with every input dimension and a dashed line at the true pulse; with
    pulse times, a last panel shows the mean absolute input of all trials aligned to their
    pulse, which peaks at lag 0 when the pulses are inferred at the right time.

    Args:
        path: the PNG file to write.
        inputs: [B, T, U].
        pulse_times: bin of the true pulse per trial, [B], or None.
        trials: trials to show.
        dt: bin width in seconds; None: time in bins.

    Returns:
        The path written, as a string.
    """
    inputs = np.asarray(inputs, dtype=np.float64)
    trials = list(trials)
    n_trials, n_bins, n_inputs = inputs.shape
    step = dt or 1.0
    time = np.arange(n_bins) * step
    n_panels = len(trials) + (pulse_times is not None)
    fig = Figure(figsize=(8, 1.8 * n_panels), layout="constrained")
    axes = fig.subplots(n_panels, 1, squeeze=False)[:, 0]
    colors = _colors(n_inputs)
    for ax, trial in zip(axes, trials):
        for u in range(n_inputs):
            ax.plot(time, inputs[trial, :, u], color=colors[u], lw=1.0, label=f"input {u}")
        if pulse_times is not None:
            ax.axvline(pulse_times[trial] * step, color=_TRUE_COLOR, ls="--", lw=1.0,
                       label="true pulse")
        ax.set_ylabel(f"trial {trial}")
    axes[0].legend(loc="upper right", fontsize="small", ncols=min(n_inputs + 1, 5))
    axes[len(trials) - 1].set_xlabel("time (s)" if dt else "bin")
    if pulse_times is not None:
        lags = np.arange(-n_bins + 1, n_bins)
        magnitude = np.abs(inputs).sum(axis=2)
        total = np.zeros(lags.size)
        count = np.zeros(lags.size)
        for trial in range(n_trials):
            index = np.arange(n_bins) - pulse_times[trial] + n_bins - 1
            total[index] += magnitude[trial]
            count[index] += 1
        seen = count > 0
        ax = axes[-1]
        ax.plot(lags[seen] * step, total[seen] / count[seen], color=_INFERRED_COLOR)
        ax.axvline(0.0, color=_TRUE_COLOR, ls="--", lw=1.0)
        ax.set_xlabel("time from true pulse (s)" if dt else "bins from true pulse")
        ax.set_ylabel("mean |input|")
    return _save(fig, path)


def plot_training_curves(
    path: str | os.PathLike,
    log: Sequence[dict] | str | os.PathLike,
    metrics: Sequence[str] | None = None,
) -> str:
    """Training curves from a per-epoch log.

    Columns named ``train_<m>`` / ``valid_<m>`` (or ``train/<m>``, ``valid/<m>``) share one
    panel per metric m; other numeric columns get a panel each. The x axis is the ``epoch``
    column when present, else the row number. Panels of positive values spanning more than
    two decades use a log scale.

    Args:
        path: the PNG file to write.
        log: one dict per epoch (column -> number), or a CSV file with a header row.
        metrics: panel names to draw (after prefix grouping); None: all.

    Returns:
        The path written, as a string.
    """
    rows = _read_csv(log) if isinstance(log, (str, os.PathLike)) else list(log)
    columns = _numeric_columns(rows)
    epochs = columns.pop("epoch", np.arange(len(rows), dtype=np.float64))
    panels: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name, values in columns.items():
        match = re.fullmatch(r"(train|valid)[_/](.+)", name)
        panel, label = (match.group(2), match.group(1)) if match else (name, name)
        panels.setdefault(panel, []).append((label, values))
    if metrics is not None:
        unknown = [m for m in metrics if m not in panels]
        if unknown:
            raise ValueError(f"metrics {unknown} not in the log (found {sorted(panels)})")
        panels = {m: panels[m] for m in metrics}
    if not panels:
        raise ValueError("the log has no numeric columns to plot")
    n_cols = min(3, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig = Figure(figsize=(4.2 * n_cols, 3.0 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, (panel, series) in zip(axes, panels.items()):
        for label, values in series:
            # Metrics evaluated every few epochs leave NaN between: draw the points they have.
            ok = np.isfinite(values)
            ax.plot(epochs[ok], values[ok], label=label, lw=1.2,
                    marker=None if ok.all() else ".")
        finite = np.concatenate([v[np.isfinite(v)] for _, v in series])
        if finite.size and finite.min() > 0 and finite.max() > 100 * finite.min():
            ax.set_yscale("log")
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        if len(series) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_decoded_velocity(
    path: str | os.PathLike,
    true: np.ndarray,
    decoded: np.ndarray,
    trials: Sequence[int] = (0, 1, 2, 3),
    dt: float | None = None,
    title: str = "",
) -> str:
    """Decoded against true hand velocity: one row of panels per behaviour dimension (x, y),
    a few trials side by side, and a scatter of all bins.

    Args:
        path: the PNG file to write.
        true, decoded: behaviour [B, T, D] (NaN bins are not drawn).
        trials: trials drawn over time.
        dt: seconds per bin (None: time in bins).
    """
    true, decoded = np.asarray(true, float), np.asarray(decoded, float)
    if true.shape != decoded.shape or true.ndim != 3:
        raise ValueError(f"true and decoded must both be [trials, bins, dims], got {true.shape} "
                         f"and {decoded.shape}")
    trials = [t for t in trials if t < true.shape[0]]
    n_dims = true.shape[2]
    fig = Figure(figsize=(3.0 * (len(trials) + 1), 2.4 * n_dims), layout="constrained")
    axes = fig.subplots(n_dims, len(trials) + 1, squeeze=False)
    x = np.arange(true.shape[1]) * (dt or 1.0)
    names = "xyz" if n_dims <= 3 else [str(i) for i in range(n_dims)]
    for d in range(n_dims):
        for j, t in enumerate(trials):
            ax = axes[d, j]
            ax.plot(x, true[t, :, d], color=_TRUE_COLOR, lw=1.2, label="true")
            ax.plot(x, decoded[t, :, d], color=_INFERRED_COLOR, lw=1.2, label="decoded")
            ax.set_title(f"trial {t}, velocity {names[d]}", fontsize="small")
            ax.set_xlabel("time (s)" if dt else "bin")
        ax = axes[d, -1]
        ok = np.isfinite(true[..., d]) & np.isfinite(decoded[..., d])
        ax.scatter(true[..., d][ok], decoded[..., d][ok], s=2, alpha=0.3, color=_INFERRED_COLOR)
        lim = [np.nanmin(true[..., d]), np.nanmax(true[..., d])]
        ax.plot(lim, lim, color=_TRUE_COLOR, lw=0.8)
        ax.set_xlabel(f"true {names[d]}")
        ax.set_ylabel(f"decoded {names[d]}")
    axes[0, 0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_condition_rates(
    path: str | os.PathLike,
    psth: np.ndarray,
    rates: np.ndarray,
    cond_idx: Sequence[np.ndarray],
    neurons: Sequence[int] = (0, 1, 2, 3),
    conditions: Sequence[int] = (0, 1, 2, 3),
    dt: float | None = None,
    title: str = "",
) -> str:
    """Condition-averaged rates against PSTHs: one panel per neuron, one colour per condition
    (PSTH dashed, averaged rates solid).

    Args:
        path: the PNG file to write.
        psth: PSTHs [C, T, N]; rates: [B, T, N]; cond_idx: the trials of each condition.
        neurons, conditions: which to draw.
    """
    psth, rates = np.asarray(psth, float), np.asarray(rates, float)
    neurons = [n for n in neurons if n < psth.shape[2]]
    conditions = [c for c in conditions if c < psth.shape[0] and len(cond_idx[c])]
    fig = Figure(figsize=(3.2 * len(neurons), 2.6), layout="constrained")
    axes = fig.subplots(1, len(neurons), squeeze=False)[0]
    colors = _colors(len(conditions))
    x = np.arange(psth.shape[1]) * (dt or 1.0)
    scale = 1.0 / dt if dt else 1.0
    for ax, n in zip(axes, neurons):
        for color, c in zip(colors, conditions):
            ax.plot(x, psth[c, :, n] * scale, color=color, ls="--", lw=1.0)
            ax.plot(x, rates[cond_idx[c]].mean(axis=0)[:, n] * scale, color=color, lw=1.2,
                    label=f"condition {c}")
        ax.set_title(f"neuron {n}", fontsize="small")
        ax.set_xlabel("time (s)" if dt else "bin")
        ax.set_ylabel("rate (Hz)" if dt else "count / bin")
    axes[0].legend(fontsize="x-small")
    fig.suptitle(title or "condition-averaged rates (solid) and PSTHs (dashed)")
    return _save(fig, path)


def plot_search(
    path: str | os.PathLike,
    members: Sequence[dict],
    log_scale: dict,
    generations: Sequence[dict] = (),
    metric: str = "valid_recon_smth",
) -> str:
    """A hyperparameter search: each searched value's trajectory per member over the epochs
    (a jump is an exploit: the member copied another and perturbed its values), and the
    metric per generation.

    Args:
        path: the PNG file to write.
        members: per member: name, epoch [E] (epochs completed at each report), values
            ({hyperparameter: [E]}), metric [E].
        log_scale: {hyperparameter: True for a log axis}; its keys are the panels drawn.
        generations: per generation: epoch (its end) and best, median, worst metric of the
            population; empty for a search without generations.
        metric: the metric's name, for the labels.

    Returns:
        The path written, as a string.
    """
    names = list(log_scale)
    n_panels = len(names) + 1
    n_cols = min(3, n_panels)
    n_rows = -(-n_panels // n_cols)
    fig = Figure(figsize=(4.4 * n_cols, 3.0 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    colors = _colors(len(members))
    for ax, name in zip(axes, names):
        for m, color in zip(members, colors):
            ax.step(m["epoch"], m["values"][name], where="pre", color=color, lw=1.0, alpha=0.8)
        if log_scale[name]:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("epoch")
    ax = axes[len(names)]
    for m, color in zip(members, colors):
        ax.plot(m["epoch"], m["metric"], color=color, lw=0.6, alpha=0.35)
    if generations:
        epochs = [g["epoch"] for g in generations]
        ax.plot(epochs, [g["best"] for g in generations], "k-o", ms=3, lw=1.5, label="best")
        ax.plot(epochs, [g["median"] for g in generations], "k--", lw=1.0, label="median")
        ax.legend(fontsize="small")
    ax.set_title(metric)
    ax.set_xlabel("epoch")
    finite = np.concatenate([m["metric"][np.isfinite(m["metric"])] for m in members] or [np.zeros(0)])
    if finite.size:
        low, high = np.percentile(finite, [0, 90])
        ax.set_ylim(low - 0.05 * (high - low + 1e-12), high + 0.05 * (high - low + 1e-12))
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return _save(fig, path)


# Helpers ----------------------------------------------------------------------------------


def _save(fig: Figure, path) -> str:
    path = os.fspath(path)
    fig.savefig(path, format="png", dpi=100)
    return path


def _colors(n: int) -> list:
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["viridis"](i / (n - 1)) for i in range(n)]


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _numeric_columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Columns whose entries all parse as numbers (blank or None: NaN), float64 [epochs]."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    columns = {}
    for name in names:
        values = []
        for row in rows:
            value = row.get(name)
            if value is None or value == "":
                values.append(np.nan)
                continue
            try:
                values.append(float(value))
            except (TypeError, ValueError):
                break
        else:
            columns[name] = np.asarray(values, dtype=np.float64)
    return columns
