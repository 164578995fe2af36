"""Plots: each writes a non-empty PNG and returns its path."""
import csv
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from lfads_fast import metrics, plots, synth

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A figure with axes and lines compresses to well over this; a blank canvas to less.
MIN_PNG_BYTES = 5000


@pytest.fixture(scope="module")
def pulses():
    return synth.input_pulse(n_conditions=6, trials_per_condition=5, train_per_condition=4,
                             n_bins=40)


def _check_png(path, expected):
    assert path == str(expected)
    content = expected.read_bytes()
    assert content.startswith(PNG_SIGNATURE) and len(content) > MIN_PNG_BYTES
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # not a blank canvas


def test_example_trials(tmp_path, pulses):
    s = pulses.train
    inferred = metrics.gaussian_smooth(s.spikes, 2.0)
    path = plots.plot_example_trials(tmp_path / "trials.png", s.spikes, s.rates, inferred,
                                     trials=(0, 5), neurons=(1, 2, 3), dt=pulses.dt)
    _check_png(path, tmp_path / "trials.png")
    spikes_only = plots.plot_example_trials(tmp_path / "spikes.png", s.spikes)
    _check_png(spikes_only, tmp_path / "spikes.png")


def test_factor_trajectories(tmp_path, pulses):
    s = pulses.train
    path = plots.plot_factor_trajectories(tmp_path / "f.png", s.latents, s.conditions)
    _check_png(path, tmp_path / "f.png")
    path = plots.plot_factor_trajectories(tmp_path / "g.png", s.latents[:, :, :2],
                                          max_trajectories=3)
    _check_png(path, tmp_path / "g.png")


def test_session_factors_share_one_projection(tmp_path, rng):
    """Sessions with the same trajectories get the same projection; the components are those
    of all sessions together, so a session alone would be projected differently."""
    base = rng.standard_normal((5, 12, 6)).cumsum(axis=1)
    other = base[:, :, ::-1] * 3.0
    (a, b, c), explained = plots.project_session_factors([base, base, other], n_pcs=3)
    assert a.shape == (5, 12, 3)
    np.testing.assert_allclose(a, b)
    (alone,), _ = plots.project_session_factors([base], n_pcs=3)
    assert not np.allclose(np.abs(alone), np.abs(a))
    assert np.all(np.diff(explained) <= 0) and 0 < explained.sum() <= 1 + 1e-12
    # Rank 1 trajectories: one component carries everything.
    line = np.linspace(0, 1, 12)[None, :, None] * np.ones((1, 1, 6))
    (p,), explained = plots.project_session_factors([line], n_pcs=3)
    np.testing.assert_allclose(p[..., 1:], 0.0, atol=1e-12)
    assert explained[0] == pytest.approx(1.0)
    (p,), _ = plots.project_session_factors([base[:, :, :2]], n_pcs=3)  # two factors
    assert np.all(p[..., 2] == 0) and np.all(p[..., 1] != 0)


def test_session_factors_plot(tmp_path, rng):
    averages = [rng.standard_normal((4, 15, 5)).cumsum(axis=1) for _ in range(3)]
    path = plots.plot_session_factors(tmp_path / "s.png", averages, conditions=np.arange(4),
                                      session_names=["a", "b", "c"])
    _check_png(path, tmp_path / "s.png")
    path = plots.plot_session_factors(tmp_path / "t.png", [a[:1] for a in averages], n_pcs=2)
    _check_png(path, tmp_path / "t.png")
    with pytest.raises(ValueError, match=r"session 1: trajectories must be \[conditions, 15 bins"):
        plots.plot_session_factors(tmp_path / "u.png", [averages[0], averages[1][:, :3]])
    with pytest.raises(ValueError, match="2 session names for 3 sessions"):
        plots.plot_session_factors(tmp_path / "u.png", averages, session_names=["a", "b"])
    with pytest.raises(ValueError, match="n_pcs must be 2 or 3"):
        plots.plot_session_factors(tmp_path / "u.png", averages, n_pcs=4)
    assert not (tmp_path / "u.png").exists()


def test_inferred_inputs(tmp_path, pulses):
    s = pulses.train
    noisy = s.inputs + np.random.default_rng(0).standard_normal(s.inputs.shape)
    path = plots.plot_inferred_inputs(tmp_path / "u.png", np.concatenate([noisy, -noisy], 2),
                                      s.pulse_times, trials=(0, 1), dt=pulses.dt)
    _check_png(path, tmp_path / "u.png")
    path = plots.plot_inferred_inputs(tmp_path / "v.png", noisy)
    _check_png(path, tmp_path / "v.png")


def _log(n_epochs=25):
    return [{"epoch": e, "train_loss": 50 * np.exp(-e / 4) + 1.0,
             "valid_loss": 60 * np.exp(-e / 4) + 2.0, "train/kl_ic": 0.1 * e,
             "valid/kl_ic": 0.12 * e, "lr": 1e-3, "note": "ok"} for e in range(n_epochs)]


def test_training_curves_from_dicts_and_csv(tmp_path):
    log = _log()
    _check_png(plots.plot_training_curves(tmp_path / "a.png", log), tmp_path / "a.png")
    csv_path = tmp_path / "log.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(log[0]))
        writer.writeheader()
        writer.writerows(log[:-1] + [{**log[-1], "valid_loss": ""}])
    path = plots.plot_training_curves(tmp_path / "b.png", str(csv_path), metrics=["loss"])
    _check_png(path, tmp_path / "b.png")


def test_training_curves_errors(tmp_path):
    with pytest.raises(ValueError, match=r"metrics \['recon'\] not in the log"):
        plots.plot_training_curves(tmp_path / "a.png", _log(), metrics=["recon"])
    with pytest.raises(ValueError, match="no numeric columns"):
        plots.plot_training_curves(tmp_path / "a.png", [{"note": "x"}])
    assert not list(tmp_path.iterdir())


def test_plotting_leaves_pyplot_alone(tmp_path):
    plots.plot_training_curves(tmp_path / "a.png", _log(3))
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or not pyplot.get_fignums()
