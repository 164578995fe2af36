"""Synthetic spike-count datasets with known ground truth.

- :func:`chaotic_rnn`: the data of the original LFADS paper (Pandarinath et al. 2018; Sussillo
  et al. 2016): trajectories of a chaotic rate RNN, one initial state per condition, observed
  as Poisson spike counts.
- :func:`input_pulse`: the same RNN with stronger coupling (g = 2.5), kicked by one input pulse
  per trial at a random time; the pulse times are the ground truth for inferred inputs.
- :func:`lorenz`: Lorenz-system latents read out through a random log-linear map.
- :func:`chaotic_rnn_sessions`: one chaotic RNN recorded in several sessions, each seeing its
  own random subset (or random projection) of the units, for stitching.

Every generator is seeded and draws its parts (initial states, pulse times, readout, spikes)
from independent streams of one ``np.random.SeedSequence``, so changing, say, the number of
trials leaves the initial states of the first conditions unchanged. The RNN's weights come
from their own ``network_seed``: at N = 50 units the dynamics depend strongly on the draw
(finite-size effects; about a third of N(0, g^2/N) networks with g = 1.5 decay to a fixed
point, most others settle on a limit cycle), so the defaults name draws whose activity is
chaotic (positive largest Lyapunov exponent, about 0.6 /s for chaotic_rnn and 3 /s for
input_pulse). Rates are expected spike counts per bin.
Trials are numbered condition-major (trial i belongs to condition i // trials_per_condition);
the first ``train_per_condition`` trials of each condition go to train, the rest to valid.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import data

LAYOUTS = ("lfads_torch", "tf1")
# Mean standard deviation over time of tanh(x) in the second half of the trials below which
# the network counts as dead (a live N = 50, g = 1.5 network stays around 0.3 to 0.5).
_DEAD_ACTIVITY_STD = 0.05


@dataclass
class SynthSplit:
    """One split of a synthetic dataset.

    Attributes:
        spikes: spike counts per bin, float32 [B, T, N].
        rates: true rates, expected spike counts per bin, float32 [B, T, N].
        conditions: condition id of each trial, int64 [B].
        inds: trial index in the full, condition-major trial list, int64 [B].
        latents: the generating system's state, float32 [B, T, L] (RNN: tanh of the unit
            activations, L = n_units; Lorenz: the z-scored coordinates, L = 3).
        inputs: the input signal into the RNN, float32 [B, T, 1] (the pulse magnitude at the
            pulse bin, 0 elsewhere), or None when there are no inputs.
        pulse_times: the bin of each trial's pulse, int64 [B], or None.
    """

    spikes: np.ndarray
    rates: np.ndarray
    conditions: np.ndarray
    inds: np.ndarray
    latents: np.ndarray
    inputs: np.ndarray | None = None
    pulse_times: np.ndarray | None = None


@dataclass
class SynthDataset:
    """A synthetic dataset with ground truth.

    Attributes:
        name: "chaotic_rnn", "input_pulse" or "lorenz".
        train: the training split.
        valid: the validation split.
        dt: bin width in seconds.
        conversion_factor: what files store as truth per expected count (TF1 convention,
            truth = rates * conversion_factor): 1 / (max_firing_rate * dt) for the RNN data
            (truth normalised to [0, 1], as the TF1 generator wrote it), 1 / dt for Lorenz
            (truth in Hz).
        params: the generator's arguments, for provenance.
        system: the generating system's parameters. RNN: ``weights`` W [n_units, n_units]
            (before the gain g), ``b_in`` [n_units], ``x0`` [C, n_units] and ``projection``
            [N, n_units] (absent when the units are observed directly). Lorenz: ``x0``
            [C, 3] (before burn-in), ``readout`` [N, 3], ``offset`` (log counts per bin),
            ``latent_mean`` [3] and ``latent_std`` [3] (the z-scoring).
    """

    name: str
    train: SynthSplit
    valid: SynthSplit
    dt: float
    conversion_factor: float
    params: dict = field(default_factory=dict)
    system: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dataset(self, ext_input: bool = False) -> data.Dataset:
        """The spikes as a validated :class:`lfads_fast.data.Dataset`.

        Args:
            ext_input: give the true input signal to the model as external input (only for
                data with inputs).

        Returns:
            The dataset: encod_data = recon_data = spikes, truth = rates, inds; conditions,
            latents and (if any) inputs and pulse_times in ``Split.extra``.
        """
        arrays = _split_arrays(self, ext_input)
        core = ("encod_data", "ext_input", "truth", "inds")
        kwargs = {f"{s}_{k}": arrays.pop(f"{s}_{k}", None)
                  for s in ("train", "valid") for k in core}
        return data.from_arrays(**kwargs, extra=arrays)


def chaotic_rnn(
    *,
    n_conditions: int = 400,
    trials_per_condition: int = 10,
    train_per_condition: int = 8,
    n_units: int = 50,
    n_neurons: int | None = None,
    g: float = 1.5,
    tau: float = 0.025,
    dt: float = 0.01,
    n_bins: int = 100,
    x0_std: float = 1.0,
    max_firing_rate: float = 30.0,
    input_magnitude: float = 0.0,
    seed: int = 0,
    network_seed: int = 14,
    burn_in_bins: int = 0,
) -> SynthDataset:
    """Spikes from a chaotic rate RNN, the synthetic data of the original LFADS paper.

    The network is ``dx/dt = (-x + g W tanh(x) + b_in u(t)) / tau`` with W ~ N(0, 1/N),
    b_in ~ N(0, 1), integrated with Euler steps of dt; the state after each step is one bin.
    Each condition has its own initial state x0 ~ N(0, x0_std^2), shared by its trials. The
    observed channels are the units' tanh(x) (n_neurons None, as the original code) or a
    random projection of them; each trial's channels are min-max normalised to [0, 1] over
    time and scaled to max_firing_rate, and the counts are Poisson(rate * dt).

    Args:
        n_conditions: number of conditions C (initial states).
        trials_per_condition: trials per condition R.
        train_per_condition: trials per condition that go to train (the rest: valid).
        n_units: RNN units.
        n_neurons: observed neurons; None: the units themselves.
        g: recurrent gain (> 1: chaotic).
        tau: unit time constant in seconds.
        dt: Euler step and bin width in seconds.
        n_bins: bins per trial T.
        x0_std: standard deviation of the initial states.
        max_firing_rate: firing rate in Hz of a normalised rate of 1.
        input_magnitude: pulse amplitude; > 0 gives each trial one pulse at a random bin in
            [T/4, 3T/4) (then trials of one condition differ).
        seed: seed of the SeedSequence the initial states, pulse times, readout and spikes
            are drawn from.
        network_seed: seed of W and b_in (see the module docstring).
        burn_in_bins: Euler steps run from x0 before the first bin, unobserved. 0 (the
            original code) starts every trial with the fast transient from the random x0
            toward the network's attractor, which the first bins observe with few spikes;
            a burn-in starts the trials on the attractor.

    Returns:
        The dataset, C * R trials of T bins; latents are the units' tanh(x), [B, T, n_units].

    Warns:
        RuntimeWarning: the network's activity dies out (another network_seed or a larger g
            gives richer dynamics).
    """
    params = dict(locals())
    _check_trials(n_conditions, trials_per_condition, train_per_condition, n_bins)
    cond, pulse, readout, noise = _streams(seed)
    net = np.random.default_rng(network_seed)
    weights = net.standard_normal((n_units, n_units)) / np.sqrt(n_units)
    b_in = net.standard_normal(n_units)
    x0 = x0_std * cond.standard_normal((n_conditions, n_units))
    if not (isinstance(burn_in_bins, (int, np.integer)) and burn_in_bins >= 0):
        raise ValueError(f"burn_in_bins must be a non-negative integer, got {burn_in_bins!r}")
    x0 = _advance_rnn(x0, weights, g, dt / tau, int(burn_in_bins))
    system = {"weights": weights, "b_in": b_in, "x0": x0}
    n_trials = n_conditions * trials_per_condition
    pulse_times = inputs = None
    if input_magnitude > 0:
        pulse_times = pulse.integers(n_bins // 4, n_bins // 4 + n_bins // 2, size=n_trials)
        states = _run_rnn(np.repeat(x0, trials_per_condition, axis=0), weights, b_in, g,
                          dt / tau, n_bins, input_magnitude, pulse_times)
        inputs = np.zeros((n_trials, n_bins, 1))
        inputs[np.arange(n_trials), pulse_times, 0] = input_magnitude
    else:
        # Without inputs all trials of a condition follow one trajectory: simulate it once.
        states = _run_rnn(x0, weights, b_in, g, dt / tau, n_bins, 0.0, None)
        states = np.repeat(states, trials_per_condition, axis=0)
    late = states[:, n_bins // 2:]
    if late.std(axis=1).mean() < _DEAD_ACTIVITY_STD:
        warnings.warn(f"the RNN's activity dies out (network_seed={network_seed}, g={g}); "
                      "its rates barely change over the trial", RuntimeWarning, stacklevel=2)
    observed = states
    if n_neurons is not None:
        projection = readout.standard_normal((n_neurons, n_units)) / np.sqrt(n_units)
        system["projection"] = projection
        observed = states @ projection.T
    low = observed.min(axis=1, keepdims=True)
    span = observed.max(axis=1, keepdims=True) - low
    normalised = np.divide(observed - low, span, out=np.zeros_like(observed), where=span > 0)
    rates = normalised * (max_firing_rate * dt)
    name = "input_pulse" if input_magnitude > 0 else "chaotic_rnn"
    return _assemble(name, rates, states, trials_per_condition, train_per_condition, noise,
                     dt, 1.0 / (max_firing_rate * dt), params, system, inputs, pulse_times)


def input_pulse(
    *, g: float = 2.5, input_magnitude: float = 20.0, network_seed: int = 9, **kwargs
) -> SynthDataset:
    """The chaotic RNN driven by one input pulse per trial at a random time.

    The LFADS paper's inferred-input benchmark: g = 2.5 and a pulse of amplitude 20 (the TF1
    generator's value) into the units along a random direction, at a bin drawn uniformly from
    [T/4, 3T/4) per trial. The pulse times are in ``SynthSplit.pulse_times`` and the input
    signal in ``SynthSplit.inputs``.

    Args:
        g: recurrent gain.
        input_magnitude: pulse amplitude (> 0).
        network_seed: seed of W and b_in (a chaotic draw at g = 2.5).
        **kwargs: any other argument of :func:`chaotic_rnn`.

    Returns:
        The dataset, name "input_pulse".
    """
    if input_magnitude <= 0:
        raise ValueError(f"input_magnitude must be > 0, got {input_magnitude}")
    return chaotic_rnn(g=g, input_magnitude=input_magnitude, network_seed=network_seed,
                       **kwargs)


def lorenz(
    *,
    n_conditions: int = 100,
    trials_per_condition: int = 10,
    train_per_condition: int = 8,
    n_neurons: int = 30,
    n_bins: int = 100,
    dt: float = 0.01,
    sigma: float = 10.0,
    rho: float = 28.0,
    beta: float = 8.0 / 3.0,
    integration_step: float = 0.0025,
    subsample: int = 4,
    burn_in_steps: int = 1000,
    base_rate: float = 10.0,
    readout_scale: float = 0.7,
    seed: int = 0,
) -> SynthDataset:
    """Spikes from Lorenz-system latents through a random log-linear readout.

    The Lorenz system (sigma, rho, beta) is integrated with RK4 steps of integration_step
    (Lorenz time units) from a random initial state per condition; burn_in_steps steps bring
    it onto the attractor, then every subsample-th step is one bin. The three coordinates are
    z-scored over all conditions and bins, and
    ``log rate = W z + log(base_rate * dt)``, each row of W a random direction of length
    readout_scale, so each neuron's log rate varies with a standard deviation of about
    readout_scale around the base rate. Counts are Poisson(rate).

    Args:
        n_conditions: number of conditions C (initial states).
        trials_per_condition: trials per condition R.
        train_per_condition: trials per condition that go to train (the rest: valid).
        n_neurons: observed neurons N.
        n_bins: bins per trial T.
        dt: bin width in seconds (sets the counts per bin of a rate in Hz).
        sigma, rho, beta: Lorenz parameters.
        integration_step: RK4 step in Lorenz time units.
        subsample: integration steps per bin.
        burn_in_steps: integration steps discarded before the first bin.
        base_rate: firing rate in Hz at the latents' mean.
        readout_scale: length of each neuron's readout direction (about the standard
            deviation of its log rate).
        seed: seed of the SeedSequence all randomness is drawn from.

    Returns:
        The dataset; latents are the z-scored coordinates, [B, T, 3].
    """
    params = dict(locals())
    _check_trials(n_conditions, trials_per_condition, train_per_condition, n_bins)
    cond, _, readout, noise = _streams(seed)
    x0 = cond.standard_normal((n_conditions, 3)) * 10.0 + np.array([0.0, 0.0, 25.0])
    state = x0
    coefficients = (sigma, rho, beta)
    for _ in range(burn_in_steps):
        state = _rk4_lorenz(state, integration_step, coefficients)
    latents = np.empty((n_conditions, n_bins, 3))
    for t in range(n_bins):
        for _ in range(subsample):
            state = _rk4_lorenz(state, integration_step, coefficients)
        latents[:, t] = state
    mean, std = latents.mean(axis=(0, 1)), latents.std(axis=(0, 1))
    latents = (latents - mean) / std
    weights = readout.standard_normal((n_neurons, 3))
    weights *= readout_scale / np.linalg.norm(weights, axis=1, keepdims=True)
    offset = np.log(base_rate * dt)
    rates = np.exp(latents @ weights.T + offset)
    rates = np.repeat(rates, trials_per_condition, axis=0)
    latents = np.repeat(latents, trials_per_condition, axis=0)
    system = {"x0": x0, "readout": weights, "offset": np.float64(offset),
              "latent_mean": mean, "latent_std": std}
    return _assemble("lorenz", rates, latents, trials_per_condition, train_per_condition,
                     noise, dt, 1.0 / dt, params, system)


def chaotic_rnn_sessions(
    *,
    n_sessions: int = 5,
    neurons_per_session: int | list[int] = 30,
    trials_per_condition: int | list[int] = 10,
    train_per_condition: int | list[int] = 8,
    n_conditions: int = 50,
    n_units: int = 100,
    observe: str = "subset",
    g: float = 1.5,
    tau: float = 0.025,
    dt: float = 0.01,
    n_bins: int = 100,
    x0_std: float = 1.0,
    max_firing_rate: float = 30.0,
    seed: int = 0,
    network_seed: int = 3,
) -> list[SynthDataset]:
    """Several recording sessions of one chaotic rate RNN, for stitching.

    The network and its dynamics are those of :func:`chaotic_rnn` (``dx/dt = (-x + g W
    tanh(x)) / tau``, one initial state per condition); the conditions, and so the latent
    trajectories, are the same in every session. Session s observes n_s channels: a random
    subset of the units' tanh(x) (``observe="subset"``, drawn without replacement per
    session, so sessions may share units) or a random projection P_s tanh(x) with
    P_s ~ N(0, 1/n_units) (``observe="projection"``). Each channel is min-max normalised over
    all conditions and bins (not per trial as in chaotic_rnn, so that a session's rates are
    one affine map of the latents in every condition) and scaled to max_firing_rate; counts
    are Poisson(rate * dt).

    Args:
        n_sessions: number of sessions S.
        neurons_per_session: observed channels n_s, one number for all sessions or one per
            session.
        trials_per_condition: trials per condition in each session (one number or one per
            session).
        train_per_condition: of those, the trials that go to train (the rest: valid).
        n_conditions: conditions C, shared by all sessions.
        n_units: RNN units.
        observe: "subset" or "projection".
        g, tau, dt, n_bins, x0_std, max_firing_rate: as in chaotic_rnn.
        seed: seed of the initial states and, per session, of its observation and spikes.
        network_seed: seed of W. At 100 units and g = 1.5 many draws still decay; the
            default one is chaotic (a perturbation grows about 1.3 /s).

    Returns:
        One SynthDataset per session, name "chaotic_rnn_sessions"; ``system`` holds the shared
        ``weights``, ``x0`` and the session's ``units`` [n_s] (subset) or ``projection``
        [n_s, n_units]; latents are the units' tanh(x), [B, T, n_units], identical across
        sessions for the same condition.

    Warns:
        RuntimeWarning: the network's activity dies out.
    """
    params = dict(locals())
    if not isinstance(n_sessions, int) or n_sessions < 1:
        raise ValueError(f"n_sessions must be an integer >= 1, got {n_sessions!r}")
    if observe not in ("subset", "projection"):
        raise ValueError(f"observe must be 'subset' or 'projection', got {observe!r}")
    per_session = {}
    for name in ("neurons_per_session", "trials_per_condition", "train_per_condition"):
        value = params[name]
        value = [value] * n_sessions if np.ndim(value) == 0 else list(value)
        if len(value) != n_sessions:
            raise ValueError(f"{name} has {len(value)} entries for {n_sessions} sessions")
        per_session[name] = [int(v) for v in value]
    for s in range(n_sessions):
        _check_trials(n_conditions, per_session["trials_per_condition"][s],
                      per_session["train_per_condition"][s], n_bins)
        n_s = per_session["neurons_per_session"][s]
        if n_s < 1 or (observe == "subset" and n_s > n_units):
            raise ValueError(f"session {s}: neurons_per_session must be in [1, n_units = {n_units}] "
                             f"for observe='subset', got {n_s}")
    # Child 0: the shared initial states; then per session its observation and its spikes.
    # Spawned children depend only on their index, so adding sessions changes none before.
    children = np.random.SeedSequence(seed).spawn(1 + 2 * n_sessions)
    net = np.random.default_rng(network_seed)
    weights = net.standard_normal((n_units, n_units)) / np.sqrt(n_units)
    x0 = x0_std * np.random.default_rng(children[0]).standard_normal((n_conditions, n_units))
    states = _run_rnn(x0, weights, np.zeros(n_units), g, dt / tau, n_bins, 0.0, None)
    if states[:, n_bins // 2:].std(axis=1).mean() < _DEAD_ACTIVITY_STD:
        warnings.warn(f"the RNN's activity dies out (network_seed={network_seed}, g={g}); "
                      "its rates barely change over the trial", RuntimeWarning, stacklevel=2)
    sessions = []
    for s in range(n_sessions):
        observation = np.random.default_rng(children[1 + 2 * s])
        noise = np.random.default_rng(children[2 + 2 * s])
        n_s = per_session["neurons_per_session"][s]
        system = {"weights": weights, "x0": x0}
        if observe == "subset":
            units = np.sort(observation.choice(n_units, size=n_s, replace=False))
            system["units"] = units
            observed = states[:, :, units]
        else:
            projection = observation.standard_normal((n_s, n_units)) / np.sqrt(n_units)
            system["projection"] = projection
            observed = states @ projection.T
        low = observed.min(axis=(0, 1))
        span = observed.max(axis=(0, 1)) - low
        normalised = np.divide(observed - low, span, out=np.zeros_like(observed), where=span > 0)
        rates = normalised * (max_firing_rate * dt)
        reps = per_session["trials_per_condition"][s]
        session_params = dict(params, session=s)
        sessions.append(_assemble("chaotic_rnn_sessions", np.repeat(rates, reps, axis=0),
                                  np.repeat(states, reps, axis=0), reps,
                                  per_session["train_per_condition"][s], noise, dt,
                                  1.0 / (max_firing_rate * dt), session_params, system))
    return sessions


def save_sessions_h5(
    sessions: list[SynthDataset],
    directory: str | os.PathLike,
    layout: str = "lfads_torch",
    prefix: str = "session",
) -> list[str]:
    """Writes each session of chaotic_rnn_sessions as its own LFADS input file.

    Args:
        sessions: the sessions.
        directory: where the files go (created if needed).
        layout: as in save_h5.
        prefix: file names are ``{prefix}_{s:02d}.h5``, so a sorted glob lists them in order.

    Returns:
        The paths written, in session order.
    """
    os.makedirs(directory, exist_ok=True)
    return [save_h5(d, os.path.join(os.fspath(directory), f"{prefix}_{s:02d}.h5"), layout)
            for s, d in enumerate(sessions)]


def save_h5(
    dataset: SynthDataset,
    path: str | os.PathLike,
    layout: str = "lfads_torch",
    ext_input: bool = False,
) -> str:
    """Writes a synthetic dataset as an LFADS input file, atomically.

    Layouts:
        "lfads_torch": train_encod_data, train_recon_data (both the spikes), valid_*,
            train_truth, valid_truth, train_inds, valid_inds, conversion_factor.
        "tf1": train_data, valid_data, train_truth, valid_truth, train_inds, valid_inds,
            conversion_factor.
    Both also get dt, {split}_conditions, {split}_latents and, for data with inputs,
    {split}_inputs and {split}_pulse_times; with ext_input, {split}_ext_input (the input
    signal). Truth is written as rates * conversion_factor (see data's module docstring), so
    load_dataset returns it in expected counts per bin.

    Args:
        dataset: the synthetic dataset.
        path: the output HDF5 file.
        layout: "lfads_torch" or "tf1".
        ext_input: also write the true input signal as external input.

    Returns:
        The path written, as a string.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    arrays = _split_arrays(dataset, ext_input)
    for split in ("train", "valid"):
        spikes = arrays.pop(f"{split}_encod_data")
        arrays[f"{split}_truth"] = arrays[f"{split}_truth"] * np.float32(
            dataset.conversion_factor)
        if layout == "lfads_torch":
            arrays[f"{split}_encod_data"] = arrays[f"{split}_recon_data"] = spikes
        else:
            arrays[f"{split}_data"] = spikes
    arrays["conversion_factor"] = np.float64(dataset.conversion_factor)
    arrays["dt"] = np.float64(dataset.dt)
    return data.write_h5_atomic(path, arrays)


# Helpers ----------------------------------------------------------------------------------


def _split_arrays(dataset: SynthDataset, ext_input: bool) -> dict[str, np.ndarray]:
    """Both splits as lfads-torch-named arrays (encod_data = spikes, truth in counts)."""
    if ext_input and dataset.train.inputs is None:
        raise ValueError(f"{dataset.name} has no inputs to use as ext_input")
    arrays = {}
    for name in ("train", "valid"):
        s = getattr(dataset, name)
        arrays[f"{name}_encod_data"] = s.spikes
        arrays[f"{name}_truth"] = s.rates
        arrays[f"{name}_inds"] = s.inds
        arrays[f"{name}_conditions"] = s.conditions
        arrays[f"{name}_latents"] = s.latents
        if s.inputs is not None:
            arrays[f"{name}_inputs"] = s.inputs
            arrays[f"{name}_pulse_times"] = s.pulse_times
            if ext_input:
                arrays[f"{name}_ext_input"] = s.inputs
    return arrays


def _check_trials(n_conditions, trials_per_condition, train_per_condition, n_bins):
    if n_conditions < 1 or n_bins < 1:
        raise ValueError(f"need n_conditions >= 1 and n_bins >= 1, got {n_conditions}, "
                         f"{n_bins}")
    if not 1 <= train_per_condition < trials_per_condition:
        raise ValueError("need 1 <= train_per_condition < trials_per_condition (both splits "
                         f"non-empty), got {train_per_condition} of {trials_per_condition}")


def _streams(seed):
    """Independent generators: conditions, pulses, readout, spikes."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]


def _advance_rnn(x0, weights, g, alpha, n_steps):
    """The state x after n_steps Euler steps without input (as _run_rnn takes them)."""
    x = x0.copy()
    recurrent = (alpha * g) * weights.T
    for _ in range(n_steps):
        x = (1.0 - alpha) * x + np.tanh(x) @ recurrent
    return x


def _run_rnn(x0, weights, b_in, g, alpha, n_bins, magnitude, pulse_times):
    """Euler steps of the rate RNN; returns tanh(x) after each step, [M, T, n_units]."""
    x = x0.copy()
    r = np.tanh(x)
    recurrent = (alpha * g) * weights.T
    out = np.empty((x0.shape[0], n_bins, x0.shape[1]))
    for t in range(n_bins):
        x = (1.0 - alpha) * x + r @ recurrent
        if pulse_times is not None:
            x[pulse_times == t] += (alpha * magnitude) * b_in
        r = np.tanh(x)
        out[:, t] = r
    return out


def _rk4_lorenz(state, h, coefficients):
    k1 = _lorenz_derivative(state, coefficients)
    k2 = _lorenz_derivative(state + 0.5 * h * k1, coefficients)
    k3 = _lorenz_derivative(state + 0.5 * h * k2, coefficients)
    k4 = _lorenz_derivative(state + h * k3, coefficients)
    return state + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def _lorenz_derivative(state, coefficients):
    sigma, rho, beta = coefficients
    x, y, z = state[:, 0], state[:, 1], state[:, 2]
    return np.stack([sigma * (y - x), x * (rho - z) - y, x * y - beta * z], axis=1)


def _assemble(name, rates, latents, trials_per_condition, train_per_condition, noise, dt,
              conversion_factor, params, system, inputs=None,
              pulse_times=None) -> SynthDataset:
    """Draws the spikes of all trials [E, T, N] and splits them into train and valid."""
    n_trials = rates.shape[0]
    spikes = noise.poisson(rates)
    trial = np.arange(n_trials, dtype=np.int64)
    is_train = trial % trials_per_condition < train_per_condition

    def split(mask):
        return SynthSplit(
            spikes=spikes[mask].astype(np.float32),
            rates=rates[mask].astype(np.float32),
            conditions=trial[mask] // trials_per_condition,
            inds=trial[mask],
            latents=latents[mask].astype(np.float32),
            inputs=None if inputs is None else inputs[mask].astype(np.float32),
            pulse_times=None if pulse_times is None else pulse_times[mask].astype(np.int64),
        )

    return SynthDataset(name, split(is_train), split(~is_train), dt, conversion_factor, params,
                        system)
