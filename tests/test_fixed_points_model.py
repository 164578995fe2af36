"""Fixed points of a model's generator: fixed_points.find and `lfads-fast fixed-points`.

The reference is a numpy float64 clipped-GRU step built from the model's generator weights,
itself checked against the generator states model.forward returns, so a found point is
checked against the map the model actually runs.
"""

import h5py
import numpy as np
import pytest

from lfads_fast import LFADS, LFADSConfig, cli, data, fixed_points, synth
from lfads_fast.fixed_points import FixedPoints
from lfads_fast.train import load_model, save_model

# The numpy step against the model's float32 forward: float32 rounding over a few steps.
FORWARD_TOL = 1e-5
# |F(h*) - h*| of a float32 solve (q <= 1e-12, i.e. |residual| <= 1.4e-6) recomputed in float64
# from the float32 point: float32 rounding of h* and of the weights adds ~1e-6.
RESIDUAL_TOL = 1e-5
# The solver's float32 q against the float64 q of the same point: relative float32 rounding
# where q is large, absolute rounding of the residual (~1e-7 per unit) where it is tiny.
Q_RTOL = 1e-2
Q_ATOL = 1e-12
# A point of one input counts as "not a fixed point" of another input above this residual.
MOVED_TOL = 1e-3
# Central differences for the Jacobian in float64 (truncation ~1e-12).
FD_STEP = 1e-6
# Spectral radii this close to 1 are left out of the stability comparison.
RADIUS_MARGIN = 1e-3
# Gain on the generator's recurrent weights of the random models: enough for several fixed
# points (at gain 1 a fresh model has one stable point).
GAIN = 2.5


# ---------------------------------------------------------------------------- references


def sigmoid(v):
    return 0.5 * (1.0 + np.tanh(0.5 * v))


def gen_step(model, h, v):
    """The generator's clipped GRU step in float64: h [..., G], v [..., U + E] -> [..., G]."""
    p = {k: model.params[k].astype(np.float64) for k in ("gen_W_ih", "gen_b_ih", "gen_W_hh")}
    G = h.shape[-1]
    W = p["gen_W_hh"]
    x = v @ p["gen_W_ih"].T + p["gen_b_ih"]
    z = sigmoid(x[..., :G] + h @ W[:G].T)
    r = sigmoid(x[..., G:2 * G] + h @ W[G:2 * G].T)
    n = np.tanh(x[..., 2 * G:] + (r * h) @ W[2 * G:].T)
    clip = model.config.cell_clip
    return np.clip(z * h + (1 - z) * n, -clip, clip)


def residuals(model, fps, inputs=None):
    """max |F(h*, v) - h*| per point, v = fps.inputs unless given."""
    h = fps.xstar.astype(np.float64)
    v = fps.inputs.astype(np.float64) if inputs is None else inputs
    return np.abs(gen_step(model, h, v) - h).max(axis=1)


def spectral_radius_fd(model, h, v):
    G = h.size
    J = np.empty((G, G))
    for j in range(G):
        e = np.zeros(G)
        e[j] = FD_STEP
        J[:, j] = (gen_step(model, h + e, v) - gen_step(model, h - e, v)) / (2 * FD_STEP)
    return np.abs(np.linalg.eigvals(J)).max()


def small_model(seed=1, gain=GAIN, **overrides):
    fields = dict(encod_data_dim=7, encod_seq_len=9, recon_seq_len=11, ext_input_dim=2, co_dim=3,
                  con_dim=5, ci_enc_dim=4, ic_enc_dim=6, ic_dim=3, gen_dim=8, fac_dim=4)
    fields.update(overrides)
    model = LFADS(LFADSConfig(**fields), seed=seed)
    model.params["gen_W_hh"] *= gain
    return model


def trials(rng, model, B=6):
    cfg = model.config
    n = cfg.session_neurons[0] if cfg.multisession else cfg.encod_data_dim
    x = rng.poisson(1.0, (B, cfg.encod_seq_len, n)).astype(np.float32)
    ext = rng.normal(size=(B, cfg.encod_seq_len, cfg.ext_input_dim)) if cfg.ext_input_dim else None
    return x, ext


# ---------------------------------------------------------------------------- Python API


def test_numpy_step_is_the_models_generator(rng):
    model = small_model()
    x, ext = trials(rng, model)
    out = model.forward(x, ext)
    prev = np.concatenate([out["gen_init"][:, None], out["gen_states"][:, :-1]], axis=1)
    np.testing.assert_allclose(gen_step(model, prev, out["gen_inputs"]), out["gen_states"],
                               atol=FORWARD_TOL)


@pytest.mark.parametrize("method", ["newton", "adam"])
def test_found_points_are_fixed_points_of_the_generator(rng, method):
    model = small_model()
    x, ext = trials(rng, model)
    fps = fixed_points.find(model, x, ext, n_init=300, noise_scale=0.05, method=method, seed=3)
    assert len(fps) >= 2, "the gain must give the generator several fixed points"
    assert fps.converged.all()
    # The reported q is that of the model's map at the point.
    h = fps.xstar.astype(np.float64)
    q = 0.5 * np.sum((gen_step(model, h, fps.inputs.astype(np.float64)) - h) ** 2, axis=1)
    np.testing.assert_allclose(fps.q, q, rtol=Q_RTOL, atol=Q_ATOL)
    # Newton's points are roots; Adam (FixedPointFinder's rules) also stops at slow points
    # whose q stopped decreasing, so only its points at q <= tol_q are roots.
    roots = fps if method == "newton" else fps[fps.q <= fps.info["tol_q"]]
    assert len(roots) >= 1
    assert (residuals(model, roots) < RESIDUAL_TOL).all()
    np.testing.assert_array_equal(fps.inputs, 0)
    # Stability from the eigenvalues of the compiled Jacobian = from a numpy Jacobian.
    radii = np.array([spectral_radius_fd(model, h.astype(np.float64), v.astype(np.float64))
                      for h, v in zip(fps.xstar, fps.inputs)])
    clear = np.abs(radii - 1) > RADIUS_MARGIN
    np.testing.assert_array_equal(fps.is_stable[clear], radii[clear] < 1)
    # The trajectories are the model's generator states on these trials.
    np.testing.assert_allclose(fps.trajectories, model.forward(x, ext)["gen_states"])
    assert fps.info["method"] == method and fps.info["n_trials"] == 6
    assert fps.info["n_initial_states"] == 300 and fps.info["inputs"] == "zero"


def test_mean_inputs_are_the_mean_controller_output(rng):
    model = small_model()
    x, ext = trials(rng, model)
    zero = fixed_points.find(model, x, ext, n_init=200, seed=1)
    mean = fixed_points.find(model, x, ext, n_init=200, seed=1, inputs="mean", ext_inputs="mean")
    out = model.forward(x, ext)
    u_mean = out["co_means"].astype(np.float64).mean(axis=(0, 1))
    ext_mean = ext.mean(axis=(0, 1))
    assert np.abs(u_mean).max() > 0.01, "the controller must output something"
    np.testing.assert_allclose(mean.inputs, np.broadcast_to(np.r_[u_mean, ext_mean], mean.inputs.shape),
                               atol=1e-6)
    assert (residuals(model, mean) < RESIDUAL_TOL).all()
    # The input moves the fixed points: those of the mean input are not fixed points without it.
    assert (residuals(model, mean, np.zeros_like(mean.inputs)) > MOVED_TOL).all()
    assert (residuals(model, zero, mean.inputs[:1].astype(np.float64)) > MOVED_TOL).all()
    assert mean.info["inputs"] == "mean" and mean.info["ext_inputs"] == "mean"


def test_given_inputs_per_point_and_broadcast(rng):
    model = small_model()
    x, ext = trials(rng, model)
    u = np.array([0.3, -0.2, 0.1])
    one = fixed_points.find(model, x, ext, n_init=100, inputs=u, ext_inputs=[[0.5, -0.5]], unique=False)
    np.testing.assert_allclose(one.inputs, np.broadcast_to([0.3, -0.2, 0.1, 0.5, -0.5], (100, 5)),
                               atol=1e-7)
    per_point = np.zeros((100, 3))
    per_point[50:] = u  # half the solves with u, half without
    both = fixed_points.find(model, x, ext, n_init=100, inputs=per_point, unique=False)
    assert both.info["inputs"] == "given" and both.info["ext_inputs"] == "zero"
    np.testing.assert_array_equal(both.inputs[:50], 0)
    np.testing.assert_allclose(both.inputs[50:, :3], np.broadcast_to(u, (50, 3)), atol=1e-7)
    ok = both.converged
    # Some starts end in a local minimum of q (a slow point, q ~ 1e-3) rather than a fixed
    # point: 1-13% on these random models depending on the data drawn.
    assert ok.mean() > 0.75
    assert (residuals(model, both[ok]) < RESIDUAL_TOL).all()


def test_without_controller_zero_and_mean_agree(rng):
    model = small_model(co_dim=0, con_dim=0, ci_enc_dim=0, ext_input_dim=0)
    x, _ = trials(rng, model)
    a = fixed_points.find(model, x, n_init=200)
    b = fixed_points.find(model, x, n_init=200, inputs="mean")
    assert a.inputs.shape[1] == 0 and len(a) >= 1
    np.testing.assert_array_equal(a.xstar, b.xstar)
    assert (residuals(model, a) < RESIDUAL_TOL).all()
    with pytest.raises(ValueError, match=r"inputs must be \[200 \(n_init\) or 1, 0\] \(co_dim = 0\)"):
        fixed_points.find(model, x, n_init=200, inputs=[0.1, 0.2])


def test_missing_bins_are_treated_as_in_forward(rng):
    model = small_model()
    x, ext = trials(rng, model)
    holes = x.copy()
    holes[0, 2:5] = np.nan
    zeros = np.nan_to_num(holes)
    a = fixed_points.find(model, holes, ext, n_init=100)
    b = fixed_points.find(model, zeros, ext, n_init=100)
    np.testing.assert_array_equal(a.xstar, b.xstar)
    np.testing.assert_array_equal(a.trajectories, b.trajectories)
    assert not np.array_equal(a.trajectories, fixed_points.find(model, x, ext, n_init=100).trajectories)


def test_seed_and_noise_set_the_initial_states(rng):
    model = small_model()
    x, ext = trials(rng, model)
    a = fixed_points.find(model, x, ext, n_init=50, seed=4, noise_scale=0.0, unique=False)
    b = fixed_points.find(model, x, ext, n_init=50, seed=4, noise_scale=0.0, unique=False)
    np.testing.assert_array_equal(a.initial_states, b.initial_states)
    pool = a.trajectories.reshape(-1, a.trajectories.shape[-1]).astype(np.float64)
    dist = np.abs(a.initial_states[:, None].astype(np.float64) - pool[None]).max(axis=2).min(axis=1)
    assert dist.max() < 1e-6, "without noise every initial state is a visited state"
    noisy = fixed_points.find(model, x, ext, n_init=50, seed=4, noise_scale=0.1, unique=False)
    assert 0.05 < np.std(noisy.initial_states - a.initial_states) < 0.2


def test_multisession_model(rng):
    model = small_model(session_neurons=[7, 5], ext_input_dim=0)
    x = rng.poisson(1.0, (4, 9, 5)).astype(np.float32)
    fps = fixed_points.find(model, x, session=1, n_init=100)
    np.testing.assert_allclose(fps.trajectories, model.forward(x, session=1)["gen_states"])
    assert fps.info["session"] == 1 and len(fps) >= 1
    assert (residuals(model, fps) < RESIDUAL_TOL).all()
    with pytest.raises(ValueError, match="session= is required"):
        fixed_points.find(model, x, n_init=10)


def test_results_round_trip_with_trajectories(rng, tmp_path):
    model = small_model()
    x, ext = trials(rng, model)
    fps = fixed_points.find(model, x, ext, n_init=100, inputs="mean")
    fps.save_h5(tmp_path / "fps.h5")
    back = FixedPoints.load_h5(tmp_path / "fps.h5")
    np.testing.assert_array_equal(back.trajectories, fps.trajectories)
    np.testing.assert_array_equal(back.xstar, fps.xstar)
    assert back.info == fps.info
    back.plot(tmp_path / "fps.png")  # uses the stored trajectories
    assert (tmp_path / "fps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("change, message", [
    (dict(x=np.zeros((6, 9, 8))), r"encod_data must have shape \[6, 9, 7\]"),
    (dict(x=np.zeros((0, 9, 7))), "B >= 1 trials"),
    (dict(x=np.full((6, 9, 7), np.nan)), "no observed bins"),
    (dict(ext=None), "ext_input is required"),
    (dict(ext=np.zeros((5, 9, 2))), r"ext_input must be \[6, T, ext_input_dim\]"),
    (dict(ext=np.full((6, 9, 2), np.nan)), "ext_input must be finite"),
    (dict(n_init=0), "n_init must be an integer >= 1"),
    (dict(n_init=2.5), "n_init must be an integer"),
    (dict(noise_scale=-0.1), "noise_scale must be a finite number >= 0"),
    (dict(noise_scale=np.nan), "noise_scale must be a finite number"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(method="lbfgs"), "method must be 'newton' or 'adam'"),
    (dict(inputs="avg"), "inputs must be one of 'zero', 'mean'"),
    (dict(inputs=np.zeros((7, 3))), r"inputs must be \[50 \(n_init\) or 1, 3\] \(co_dim = 3\)"),
    (dict(inputs=[0.1, np.nan, 0.0]), "inputs contains NaN"),
    (dict(ext_inputs=np.zeros(3)), r"ext_inputs must be \[50 \(n_init\) or 1, 2\]"),
    (dict(max_iters=0), "max_iters must be an integer >= 1"),
    (dict(tol_q=-1.0), "tol_q must be a finite number >= 0"),
    (dict(tol_unique=0.0), "tol_unique must be a finite number > 0"),
    (dict(session=0), "session= needs a config with session_neurons"),
])
def test_bad_arguments_have_clear_errors(rng, change, message):
    model = small_model()
    x, ext = trials(rng, model)
    args = dict(x=x, ext=ext, n_init=50)
    args.update(change)
    x, ext = args.pop("x"), args.pop("ext")
    with pytest.raises(ValueError, match=message):
        fixed_points.find(model, x, ext, **args)


def test_non_finite_model_is_refused(rng):
    model = small_model()
    x, ext = trials(rng, model)
    model.params["gen_W_hh"][0, 0] = np.nan
    with pytest.raises(ValueError, match="parameters contain NaN or inf"):
        fixed_points.find(model, x, ext)


# ---------------------------------------------------------------------------- command line

TINY = ["--set", "model.ic_enc_dim=8", "--set", "ic_dim=4", "--set", "gen_dim=12",
        "--set", "fac_dim=4", "--set", "co_dim=2", "--set", "ci_enc_dim=4", "--set", "con_dim=4",
        "--set", "train.batch_size=16", "--set", "max_epochs=2", "--set", "lr_init=1e-2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A data file and the best checkpoint of a two-epoch training run on it."""
    root = tmp_path_factory.mktemp("fp_cli")
    sd = synth.chaotic_rnn(n_conditions=10, trials_per_condition=4, train_per_condition=3,
                           n_bins=20, n_neurons=16)
    data_file = synth.save_h5(sd, root / "tiny.h5")
    assert cli.main(["train", data_file, "--out", str(root / "run"), "--samples", "0", "--quiet",
                     *TINY]) == 0
    return data_file, str(root / "run" / "checkpoints" / "best.h5")


def run(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_points_and_plot(trained, tmp_path, capsys):
    data_file, ckpt = trained
    out = tmp_path / "fp"
    code, stdout, err = run(["fixed-points", ckpt, data_file, "--out", str(out), "--n-init", "200",
                             "--inputs", "mean", "--seed", "2"], capsys)
    assert code == 0, err
    fps = FixedPoints.load_h5(out / "fixed_points.h5")
    assert (out / "fixed_points.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = load_model(ckpt)
    valid = data.load_dataset(data_file).valid
    G = model.config.gen_dim
    assert len(fps) >= 1 and fps.xstar.shape == (len(fps), G)
    assert fps.trajectories.shape == (valid.n_trials, 20, G)
    assert fps.eigenvalues.shape == (len(fps), G) and fps.converged.all()
    assert (residuals(model, fps) < RESIDUAL_TOL).all()
    u_mean = model.forward(valid.encod_data)["co_means"].astype(np.float64).mean(axis=(0, 1))
    np.testing.assert_allclose(fps.inputs, np.broadcast_to(u_mean, fps.inputs.shape), atol=1e-6)
    assert {k: fps.info[k] for k in ("inputs", "split", "method", "n_initial_states", "seed")} == \
        {"inputs": "mean", "split": "valid", "method": "newton", "n_initial_states": 200, "seed": 2}
    n_stable = int(fps.is_stable.sum())
    assert f"fixed points: {len(fps)} ({n_stable} stable, {len(fps) - n_stable} unstable)" in stdout


def write_checkpoint(path, model):
    """A checkpoint file as Trainer writes it (for a model Trainer does not train)."""
    return save_model(path, model)


def test_cli_multisession_checkpoint(tmp_path, capsys):
    sessions = synth.chaotic_rnn_sessions(n_sessions=2, neurons_per_session=[10, 6],
                                          n_conditions=6, trials_per_condition=3,
                                          train_per_condition=2, n_bins=15)
    files = synth.save_sessions_h5(sessions, tmp_path / "sessions")
    model = small_model(encod_data_dim=5, encod_seq_len=15, recon_seq_len=15, ext_input_dim=0,
                        session_neurons=[10, 6])
    ckpt = write_checkpoint(tmp_path / "multi.h5", model)
    out = tmp_path / "fp"
    code, stdout, err = run(["fixed-points", ckpt, files[1], "--out", str(out), "--session", "1",
                             "--n-init", "100"], capsys)
    assert code == 0, err
    fps = FixedPoints.load_h5(out / "fixed_points.h5")
    assert fps.info["session"] == 1 and fps.trajectories.shape == (6, 15, 8)
    assert (residuals(model, fps) < RESIDUAL_TOL).all()

    code, _, err = run(["fixed-points", ckpt, files[1], "--out", str(out)], capsys)
    assert code == 2 and "has 2 sessions: pass --session S" in err
    code, _, err = run(["fixed-points", ckpt, files[0], "--out", str(out), "--session", "1"], capsys)
    assert code == 2 and "does not fit the checkpoint's model (session 1)" in err
    code, _, err = run(["fixed-points", ckpt, files[1], "--out", str(out), "--session", "2"], capsys)
    assert code == 2 and "sessions 0..1" in err


def test_cli_clear_errors(trained, tmp_path, capsys):
    data_file, ckpt = trained
    out = str(tmp_path / "fp")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    truncated = tmp_path / "truncated.h5"
    with h5py.File(ckpt, "r") as src, h5py.File(truncated, "w") as dst:
        for key in src:
            value = src[key][()]
            dst[key] = value[:-5] if key in ("flat", "adam_m", "adam_v") else value
    other = synth.save_h5(synth.chaotic_rnn(n_conditions=4, trials_per_condition=2,
                                            train_per_condition=1, n_bins=20, n_neurons=9),
                          tmp_path / "other.h5")
    cases = [
        ([data_file, data_file], "not an lfads_fast checkpoint"),
        ([str(text), data_file], "cannot open as a checkpoint"),
        ([str(truncated), data_file], "parameters stored, but its config needs"),
        (["nope.h5", data_file], "checkpoint nope.h5 does not exist"),
        ([ckpt, "nope.h5"], "data file nope.h5 does not exist"),
        ([ckpt, other], "does not fit the checkpoint's model"),
        ([ckpt, data_file, "--split", "test"], "--split test: "),
        ([ckpt, data_file, "--session", "0"], "--session is for checkpoints of several sessions"),
    ]
    for args, message in cases:
        code, _, err = run(["fixed-points", *args, "--out", out], capsys)
        assert code == 2 and message in err, (args, err)
    assert not (tmp_path / "fp").exists(), "nothing is written on an error"
    for bad in (["--method", "lbfgs"], ["--inputs", "avg"], ["--noise", "-1"], ["--n-init", "0"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["fixed-points", ckpt, data_file, "--out", out, *bad])
        assert e.value.code == 2
        assert bad[0] in capsys.readouterr().err
