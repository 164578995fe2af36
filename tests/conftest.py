"""Shared fixtures: seeded generators, the array-module fixture, and GPU skipping."""
import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    # A fresh seed per test, stable across runs and processes (str hashes are randomised per
    # process, so not hash()), so failures reproduce.
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


def _cupy_or_none():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # no cupy, no driver or no device
        return None
    return None


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """numpy always; cupy only when a CUDA device is present."""
    if request.param == "numpy":
        return np
    cp = _cupy_or_none()
    if cp is None:
        pytest.skip("no CUDA device / cupy")
    return cp
