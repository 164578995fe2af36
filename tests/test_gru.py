"""Clipped-GRU sequence kernels: float64 finite differences, float32 agreement, bad input."""
import numpy as np
import pytest

from lfads_fast import ops

# Central differences in float64 with step 1e-6 have truncation + rounding error ~1e-9 relative.
FD_STEP = 1e-6
FD_RTOL = 1e-6
# float32 against float64 over a few dozen steps of a contracting recurrence.
F32_RTOL = 2e-4


def gru_reference(xproj, W_hh, h0, clip, reverse):
    """Plain numpy clipped GRU (the equations of docs/math.md), for forward checks."""
    T, B, _ = xproj.shape
    H = h0.shape[1]
    h = h0.copy()
    hs = np.empty((T, B, H))
    for k in range(T):
        t = T - 1 - k if reverse else k
        x = xproj[t]
        hz = h @ W_hh[: 2 * H].T
        z = 1 / (1 + np.exp(-(x[:, :H] + hz[:, :H])))
        r = 1 / (1 + np.exp(-(x[:, H : 2 * H] + hz[:, H:])))
        n = np.tanh(x[:, 2 * H : 3 * H] + (r * h) @ W_hh[2 * H :].T)
        h = np.clip(z * h + (1 - z) * n, -clip, clip)
        hs[t] = h
    return hs


def make_inputs(rng, T, B, H, LD=None, scale=1.0, dtype=np.float64):
    LD = LD or 3 * H
    xproj = rng.normal(size=(T, B, LD)) * scale
    W_hh = rng.normal(size=(3 * H, H)) * scale / np.sqrt(H)
    h0 = rng.normal(size=(B, H)) * 0.5
    return [np.ascontiguousarray(a, dtype=dtype) for a in (xproj, W_hh, h0)]


def loss_and_grads(xproj, off, W_hh, h0, R, RT, clip, reverse):
    hs, gates = ops.gru_forward(xproj, off, W_hh, h0, reverse=reverse, clip=clip)
    final = hs[0] if reverse else hs[-1]
    loss = float(np.sum(R * hs) + np.sum(RT * final))
    d_x = np.zeros_like(xproj)
    d_W, d_h0 = ops.gru_backward(W_hh, h0, hs, gates, R, RT, d_x, off, reverse=reverse, clip=clip)
    return loss, d_x, d_W, d_h0


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B,H,clip", [(5, 3, 7, 5.0), (1, 1, 5, 5.0), (6, 4, 9, 0.4)])
def test_forward_matches_numpy(rng, reverse, T, B, H, clip):
    xproj, W_hh, h0 = make_inputs(rng, T, B, H, scale=2.0)
    hs, _ = ops.gru_forward(xproj, 0, W_hh, h0, reverse=reverse, clip=clip)
    np.testing.assert_allclose(hs, gru_reference(xproj, W_hh, h0, clip, reverse), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B,H,clip,scale,min_clamped", [
    (5, 3, 7, 5.0, 1.0, 0.0),    # interior
    (1, 1, 5, 5.0, 1.0, 0.0),    # edge shapes
    (6, 4, 9, 0.4, 2.5, 0.25),   # many states held at the clip
])
def test_backward_finite_differences(rng, reverse, T, B, H, clip, scale, min_clamped):
    off, LD = 2, 3 * H + 5  # a shared, wider projection buffer
    xproj, W_hh, h0 = make_inputs(rng, T, B, H, LD=LD, scale=scale)
    R = rng.normal(size=(T, B, H))
    RT = rng.normal(size=(B, H))
    _, d_x, d_W, d_h0 = loss_and_grads(xproj, off, W_hh, h0, R, RT, clip, reverse)
    assert np.all(d_x[..., :off] == 0) and np.all(d_x[..., off + 3 * H :] == 0)
    clamped = clamped_states(xproj, off, W_hh, h0, clip, reverse)
    assert clamped.mean() >= min_clamped

    def f():
        return loss_and_grads(xproj, off, W_hh, h0, R, RT, clip, reverse)[0]

    compared = 0
    for arr, grad in ((xproj, d_x), (W_hh, d_W), (h0, d_h0)):
        flat, g = arr.reshape(-1), grad.reshape(-1)
        idx = rng.choice(flat.size, size=min(flat.size, 40), replace=False)
        for i in idx:
            old = flat[i]
            flat[i] = old + FD_STEP
            up, up_clamped = f(), clamped_states(xproj, off, W_hh, h0, clip, reverse)
            flat[i] = old - FD_STEP
            down, down_clamped = f(), clamped_states(xproj, off, W_hh, h0, clip, reverse)
            flat[i] = old
            # Central differences hold where both steps keep every state on the same side
            # of the clip (the loss is smooth there); with the clamped states included.
            if not (np.array_equal(up_clamped, clamped) and np.array_equal(down_clamped, clamped)):
                continue
            num = (up - down) / (2 * FD_STEP)
            assert abs(num - g[i]) <= FD_RTOL * max(1.0, abs(num)), (i, num, g[i])
            compared += 1
    assert compared >= 0.95 * sum(min(a.size, 40) for a in (xproj, W_hh, h0))


def clamped_states(xproj, off, W_hh, h0, clip, reverse):
    """Where a state sits at the clip: its update gradient must be exactly zero."""
    hs, _ = ops.gru_forward(xproj, off, W_hh, h0, reverse=reverse, clip=clip)
    return np.abs(hs) == clip


@pytest.mark.parametrize("reverse", [False, True])
def test_clamped_states_pass_no_gradient_to_their_gates(rng, reverse):
    # h_t = clip(z h + (1 - z) n): where the clip holds h_t, the update gate z and the
    # candidate n of that unit at that step cannot change h_t, so their pre-activations get
    # exactly zero gradient (the reset gate r still acts on other units through W_hn).
    T, B, H, clip = 8, 5, 6, 0.3
    xproj, W_hh, h0 = make_inputs(rng, T, B, H, scale=3.0)
    R = rng.normal(size=(T, B, H))
    RT = rng.normal(size=(B, H))
    _, d_x, _, _ = loss_and_grads(xproj, 0, W_hh, h0, R, RT, clip, reverse)
    held = clamped_states(xproj, 0, W_hh, h0, clip, reverse)
    assert 0.2 < held.mean() < 0.95
    assert np.all(d_x[..., :H][held] == 0) and np.all(d_x[..., 2 * H :][held] == 0)
    assert np.all(d_x[..., :H][~held] != 0) and np.all(d_x[..., 2 * H :][~held] != 0)


def test_float32_agrees_with_float64(rng):
    x64, W64, h64 = make_inputs(rng, 30, 8, 33)
    hs64, _ = ops.gru_forward(x64, 0, W64, h64)
    hs32, _ = ops.gru_forward(*(a.astype(np.float32) for a in (x64,)), 0, W64.astype(np.float32),
                              h64.astype(np.float32))
    assert np.linalg.norm(hs32 - hs64) / np.linalg.norm(hs64) < F32_RTOL


@pytest.mark.parametrize("B", [5, 21, 40])
def test_threads_do_not_change_results(rng, B):
    # Rows are split between threads in whole blocks, so in float64 the thread count must not
    # change a single bit of the states or of the gradients. (float32 is not asserted: some
    # CPUs' single-precision BLAS kernels round a row differently with the call's row count.)
    xproj, W_hh, h0 = make_inputs(rng, 7, B, 11)
    R = rng.normal(size=(7, B, 11))
    RT = rng.normal(size=(B, 11))
    results = []
    try:
        for n in (1, 2, 3):
            ops.set_num_threads(n)
            results.append(loss_and_grads(xproj, 0, W_hh, h0, R, RT, 5.0, False)[1:])
    finally:
        ops.set_num_threads(2)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_bad_input_names_the_argument(rng):
    xproj, W_hh, h0 = make_inputs(rng, 4, 2, 5, dtype=np.float32)
    with pytest.raises(ValueError, match="W_hh must be"):
        ops.gru_forward(xproj, 0, W_hh[:, :4].copy(), h0)
    with pytest.raises(ValueError, match="W_hh must be.*float32"):
        ops.gru_forward(xproj, 0, W_hh.astype(np.float64), h0)
    with pytest.raises(ValueError, match="h0 must be.*non-contiguous"):
        ops.gru_forward(xproj, 0, W_hh, np.asfortranarray(np.ones((2, 5), np.float32)))
    with pytest.raises(ValueError, match="x_offset"):
        ops.gru_forward(xproj, 3, W_hh, h0)
    with pytest.raises(ValueError, match="float32 or float64"):
        ops.gru_forward(xproj.astype(np.int64), 0, W_hh, h0)
