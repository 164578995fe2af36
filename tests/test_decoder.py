"""Fused decoder kernels: float64 finite differences of every input, controller on and off."""
import numpy as np
import pytest

from lfads_fast import ops

FD_STEP = 1e-6  # central differences in float64: error ~1e-9 relative
FD_RTOL = 1e-6
F32_RTOL = 5e-4  # float32 vs float64 over a coupled two-GRU recurrence of ~20 steps


def make_inputs(rng, T, B, C, U, G, F, E=0, scale=1.0, dtype=np.float64, masks=True):
    def n(*shape, s=1.0):
        return np.ascontiguousarray(rng.normal(size=shape) * s, dtype=dtype)

    def mask(*shape):
        return np.ascontiguousarray((rng.random(shape) > 0.3) / 0.7, dtype=dtype)

    W_fac = n(F, G)
    W_fac /= np.linalg.norm(W_fac, axis=1, keepdims=True)
    inp = {
        "xgen": n(T, B, 3 * G, s=scale),
        "W_gen_hh": n(3 * G, G, s=scale / np.sqrt(G)),
        "g0": n(B, G, s=0.5),
        "f0": n(B, F, s=0.5),
        "W_fac": W_fac,
        "mask_g": mask(T, B, G) if masks else None,
    }
    if C > 0:
        inp.update({
            "xcon": n(T, B, 3 * C, s=scale),
            "W_con_f": n(3 * C, F, s=scale / np.sqrt(F)),
            "W_con_hh": n(3 * C, C, s=scale / np.sqrt(C)),
            "c0": n(B, C, s=0.5),
            "W_co": n(2 * U, C, s=1 / np.sqrt(C)),
            "b_co": n(2 * U, s=0.3),
            "eps": n(T, B, U),
            "mask_f": mask(T, B, F) if masks else None,
            "W_gen_u": n(3 * G, U, s=scale / np.sqrt(U)),
        })
    return inp


def run(inp, R, clip, sample):
    T = R["factors"].shape[0]
    out = ops.decoder_forward(inp, T, clip=clip, sample=sample)
    loss = sum(float(np.sum(R[k] * out[k])) for k in R)
    return loss, out


@pytest.mark.parametrize("C,U,sample,clip,scale,min_clamped", [
    (5, 2, True, 5.0, 1.0, 0.0),    # controller, sampled inputs
    (5, 2, False, 5.0, 1.0, 0.0),   # controller, posterior means
    (0, 0, False, 5.0, 1.0, 0.0),   # no controller: generator only
    (4, 3, True, 0.5, 2.5, 0.2),    # many states held at the clip
])
@pytest.mark.parametrize("T,B", [(4, 3), (1, 1)])
def test_backward_finite_differences(rng, C, U, sample, clip, scale, min_clamped, T, B):
    G, F = 6, 3
    inp = make_inputs(rng, T, B, C, U, G, F, scale=scale)
    R = {"factors": rng.normal(size=(T, B, F))}
    if C > 0:
        R["co_mean"] = rng.normal(size=(T, B, U))
        R["co_logvar"] = rng.normal(size=(T, B, U))
    _, out = run(inp, R, clip, sample)
    g = ops.decoder_backward(inp, out, R["factors"], R.get("co_mean"), R.get("co_logvar"),
                             clip=clip, sample=sample)
    pairs = {"xgen": "d_xgen", "W_gen_hh": "d_W_gen_hh", "g0": "d_g0", "f0": "d_f0", "W_fac": "d_W_fac"}
    if C > 0:
        pairs.update({"xcon": "d_xcon", "W_con_f": "d_W_con_f", "W_con_hh": "d_W_con_hh",
                      "c0": "d_c0", "W_co": "d_W_co", "b_co": "d_b_co", "W_gen_u": "d_W_gen_u"})
    clamped = clamped_states(out, clip)
    if T * B > 1:
        assert clamped.mean() >= min_clamped
    compared = total = 0
    for name, gname in pairs.items():
        flat, grad = inp[name].reshape(-1), g[gname].reshape(-1)
        idx = rng.choice(flat.size, size=min(flat.size, 25), replace=False)
        for i in idx:
            total += 1
            old = flat[i]
            flat[i] = old + FD_STEP
            up, out_up = run(inp, R, clip, sample)
            flat[i] = old - FD_STEP
            down, out_down = run(inp, R, clip, sample)
            flat[i] = old
            # Central differences hold where both steps keep every state on the same side of
            # the clip; the clamped states (zero gradient through their update) included.
            if not (np.array_equal(clamped_states(out_up, clip), clamped)
                    and np.array_equal(clamped_states(out_down, clip), clamped)):
                continue
            num = (up - down) / (2 * FD_STEP)
            assert abs(num - grad[i]) <= FD_RTOL * max(1.0, abs(num)), (name, i, num, grad[i])
            compared += 1
    assert compared >= 0.95 * total


def clamped_states(out, clip):
    """Where a generator or controller state sits at the clip."""
    return np.concatenate([np.abs(out["gen_states"]).ravel() == clip,
                           np.abs(out["con_states"]).ravel() == clip])


def test_clamped_generator_states_pass_no_gradient_to_their_gates(rng):
    # As for the encoder GRUs (tests/test_gru.py): a unit held at the clip at step t gives its
    # update gate and candidate at t exactly zero gradient.
    T, B, C, U, G, F, clip = 6, 4, 4, 2, 6, 3, 0.4
    inp = make_inputs(rng, T, B, C, U, G, F, scale=3.0, masks=False)  # no dropped state
    R = {"factors": rng.normal(size=(T, B, F))}
    _, out = run(inp, R, clip, True)
    g = ops.decoder_backward(inp, out, R["factors"], None, None, clip=clip, sample=True)
    held = np.abs(out["gen_states"]) == clip
    assert 0.2 < held.mean() < 0.95
    d_x = g["d_xgen"]
    assert np.all(d_x[..., :G][held] == 0) and np.all(d_x[..., 2 * G :][held] == 0)
    assert np.all(d_x[..., :G][~held] != 0) and np.all(d_x[..., 2 * G :][~held] != 0)


def test_without_masks_and_float32(rng):
    T, B, C, U, G, F = 20, 6, 9, 3, 13, 5
    inp64 = make_inputs(rng, T, B, C, U, G, F, masks=False)
    out64 = ops.decoder_forward(inp64, T, sample=True)
    inp32 = {k: (None if v is None else v.astype(np.float32)) for k, v in inp64.items()}
    out32 = ops.decoder_forward(inp32, T, sample=True)
    for k in ("factors", "gen_states", "con_states", "co_mean"):
        err = np.linalg.norm(out32[k] - out64[k]) / np.linalg.norm(out64[k])
        assert err < F32_RTOL, (k, err)


def test_sampling_uses_eps(rng):
    T, B, C, U, G, F = 3, 2, 4, 2, 5, 3
    inp = make_inputs(rng, T, B, C, U, G, F)
    out = ops.decoder_forward(inp, T, sample=True)
    expect = out["co_mean"] + np.exp(out["co_logvar"] / 2) * inp["eps"]
    np.testing.assert_allclose(out["u"], expect, rtol=1e-12)
    out_mean = ops.decoder_forward(inp, T, sample=False)
    np.testing.assert_array_equal(out_mean["u"], out_mean["co_mean"])


def test_bad_input_names_the_argument(rng):
    T, B, C, U, G, F = 3, 2, 4, 2, 5, 3
    inp = make_inputs(rng, T, B, C, U, G, F)
    bad = dict(inp, W_co=np.ones((2 * U, C + 1)))
    with pytest.raises(ValueError, match="W_co must be"):
        ops.decoder_forward(bad, T)
    bad = dict(inp, mask_g=inp["mask_g"].astype(np.float32))
    with pytest.raises(ValueError, match="mask_g must be.*float64"):
        ops.decoder_forward(bad, T)
    bad = dict(inp, eps=None)
    with pytest.raises(ValueError, match="eps is needed"):
        ops.decoder_forward(bad, T, sample=True)
