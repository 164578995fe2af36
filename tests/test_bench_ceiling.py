"""The sampler behind bench/demo_ceiling.py's Bayes-optimal estimate: on a Gaussian target
with known moments, the draws it reports must have that target's mean and covariance."""
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from demo_ceiling import hmc_posterior_mean  # noqa: E402


def test_hmc_draws_have_the_targets_moments():
    torch.set_default_dtype(torch.float64)
    try:
        rng = np.random.default_rng(0)
        # Per chain a 3-dimensional Gaussian with its own mean and an anisotropic covariance.
        B, D = 400, 3
        a = rng.standard_normal((D, D))
        cov = 0.01 * (a @ a.T + 0.1 * np.eye(D))  # about the scale of the real posteriors
        prec = torch.tensor(np.linalg.inv(cov))
        means = torch.tensor(rng.standard_normal((B, D)))

        def objective(x):
            d = x - means
            return 0.5 * ((d @ prec) * d).sum(1)

        start = means + torch.tensor(rng.standard_normal((B, D)) @ np.linalg.cholesky(cov).T)
        draws = []
        accept = hmc_posterior_mean(objective, start, 300, 50, 5, 1,
                                    lambda it, x, acc: draws.append((x - means).numpy()))
        assert len(draws) == 250
        assert 0.4 < float(accept.mean()) < 0.95
        d = np.concatenate(draws)  # deviations from each chain's own mean
        np.testing.assert_allclose(d.mean(0), 0, atol=0.005)  # draws std 0.07-0.18
        np.testing.assert_allclose(np.cov(d.T), cov, rtol=0.1, atol=0.05 * np.abs(cov).max())
        # A wrong sampler (here: one that never moves) fails the same check.
        frozen = []
        hmc_posterior_mean(lambda x: objective(x) * 1e12, start, 60, 50, 5, 1,
                           lambda it, x, acc: frozen.append((x - means).numpy()))
        assert np.abs(np.cov(np.concatenate(frozen).T) - cov).max() > 0.05 * np.abs(cov).max()
    finally:
        torch.set_default_dtype(torch.float32)
