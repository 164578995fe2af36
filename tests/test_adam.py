"""Fused Adam(W) step of lfads_fast._cpu (adam_step) against torch.optim.AdamW with
torch.nn.utils.clip_grad_norm_, over several steps."""
import numpy as np
import pytest
from optional import OptionalModule

from lfads_fast._backend import cpu  # lfads_fast._cpu, imported after its BLAS is loaded

torch = OptionalModule("torch")  # tests that use it skip without torch

# float64 against torch's float64 AdamW: the same operations up to their order (torch divides
# sqrt(v) by sqrt(bias correction), the kernel multiplies by its inverse), so only rounding.
REF_RTOL = 1e-12
REF_ATOL = 1e-14
# float32 kernel against the float64 one after a few steps, relative to the largest value:
# float32 eps (6e-8) through m / (sqrt(v) + eps), which amplifies it a few times per step.
F32_REL = 1e-5

LR, BETA1, BETA2, EPS = 1e-2, 0.9, 0.999, 1e-8
SHAPES = [(7, 5), (13,), (3, 4, 2)]  # 72 parameters in all, no size a multiple of 8
GRAD_SCALES = [0.1, 3.0, 0.5, 10.0, 1.0]  # one per step; norms ~ 8.5 * scale


def adam(params, grads, m, v, mask=None, weight_decay=0.0, max_grad_norm=0.0, step=1):
    grad_norm = np.full(1, np.nan, params.dtype)
    cpu.adam_step(params, grads, m, v, mask, LR, BETA1, BETA2, EPS, weight_decay, max_grad_norm,
                  step, grad_norm)
    return grad_norm[0]


@pytest.mark.parametrize("weight_decay,max_grad_norm", [(0.0, 0.0), (0.05, 5.0), (0.01, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("frozen", [False, True])
def test_matches_torch_adamw(weight_decay, max_grad_norm, frozen):
    rng = np.random.default_rng(int(weight_decay * 100 + max_grad_norm * 10 + frozen))
    tensors = [torch.tensor(rng.standard_normal(s)) for s in SHAPES]
    sizes = [t.numel() for t in tensors]
    offsets = np.cumsum([0] + sizes)
    # Frozen: the second tensor is left out of torch's optimizer and masked in the kernel.
    trained = [0, 2] if frozen else [0, 1, 2]
    for i in trained:
        tensors[i].requires_grad_(True)
    opt = torch.optim.AdamW([tensors[i] for i in trained], lr=LR, betas=(BETA1, BETA2), eps=EPS,
                            weight_decay=weight_decay)

    params = np.concatenate([t.detach().numpy().ravel() for t in tensors])
    m, v = np.zeros_like(params), np.zeros_like(params)
    mask = np.ones(params.size, np.uint8)
    if frozen:
        mask[offsets[1]:offsets[2]] = 0

    for step, gs in enumerate(GRAD_SCALES, start=1):
        grads = gs * rng.standard_normal(params.size)
        if frozen:  # torch has no gradient for a frozen tensor, so none enters the norm
            grads[offsets[1]:offsets[2]] = 0
        for i in trained:
            tensors[i].grad = torch.tensor(grads[offsets[i]:offsets[i + 1]].reshape(SHAPES[i]))
        group = [tensors[i] for i in trained]
        if max_grad_norm > 0:
            want_norm = torch.nn.utils.clip_grad_norm_(group, max_grad_norm).item()
        else:
            want_norm = torch.linalg.vector_norm(torch.cat([t.grad.ravel() for t in group])).item()
        opt.step()

        norm = adam(params, grads, m, v, mask if frozen else None, weight_decay, max_grad_norm,
                    step)
        assert norm == pytest.approx(want_norm, rel=REF_RTOL)
        for i in range(len(tensors)):
            sl = slice(offsets[i], offsets[i + 1])
            np.testing.assert_allclose(params[sl], tensors[i].detach().numpy().ravel(),
                                       rtol=REF_RTOL, atol=REF_ATOL, err_msg=f"params, step {step}")
            if i in trained:
                st = opt.state[tensors[i]]
                np.testing.assert_allclose(m[sl], st["exp_avg"].numpy().ravel(), rtol=REF_RTOL,
                                           atol=REF_ATOL, err_msg=f"m, step {step}")
                np.testing.assert_allclose(v[sl], st["exp_avg_sq"].numpy().ravel(),
                                           rtol=REF_RTOL, atol=REF_ATOL, err_msg=f"v, step {step}")
            else:
                assert np.all(m[sl] == 0) and np.all(v[sl] == 0)


def test_large_vector_matches_torch():
    """Long enough for the threaded loops."""
    rng = np.random.default_rng(7)
    n = 100_003
    p = torch.tensor(rng.standard_normal(n), requires_grad=True)
    opt = torch.optim.AdamW([p], lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=0.02)
    params = p.detach().numpy().copy()
    m, v = np.zeros(n), np.zeros(n)
    for step in range(1, 4):
        grads = rng.standard_normal(n)
        p.grad = torch.tensor(grads)
        want_norm = torch.nn.utils.clip_grad_norm_([p], 200.0).item()
        opt.step()
        assert adam(params, grads, m, v, None, 0.02, 200.0, step) == pytest.approx(want_norm,
                                                                                   rel=REF_RTOL)
        np.testing.assert_allclose(params, p.detach().numpy(), rtol=REF_RTOL, atol=REF_ATOL)
        np.testing.assert_allclose(v, opt.state[p]["exp_avg_sq"].numpy(), rtol=REF_RTOL,
                                   atol=REF_ATOL)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_frozen_entries_untouched_even_with_gradient_and_decay(dtype):
    rng = np.random.default_rng(8)
    n = 37
    params = rng.standard_normal(n).astype(dtype)
    m = (0.1 * rng.standard_normal(n)).astype(dtype)
    v = rng.uniform(0.01, 0.1, n).astype(dtype)
    mask = (rng.random(n) < 0.5).astype(np.uint8)
    before = [x.copy() for x in (params, m, v)]
    adam(params, rng.standard_normal(n).astype(dtype), m, v, mask, 0.1, 1.0, step=3)
    frozen = mask == 0
    for x, x0 in zip((params, m, v), before):
        np.testing.assert_array_equal(x[frozen], x0[frozen])
        assert np.all(x[~frozen] != x0[~frozen])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("n", [19, 70_001])
def test_non_finite_gradient_skips_the_step(dtype, bad, n):
    rng = np.random.default_rng(9)
    params = rng.standard_normal(n).astype(dtype)
    m = (0.1 * rng.standard_normal(n)).astype(dtype)
    v = rng.uniform(0.01, 0.1, n).astype(dtype)
    grads = rng.standard_normal(n).astype(dtype)
    grads[n // 3] = bad
    before = [x.copy() for x in (params, m, v)]
    norm = adam(params, grads, m, v, None, 0.01, 1.0, step=2)
    assert not np.isfinite(norm)
    for x, x0 in zip((params, m, v), before):
        np.testing.assert_array_equal(x, x0)


def test_float32_matches_float64():
    rng = np.random.default_rng(10)
    n = 1001
    p64 = rng.standard_normal(n)
    m64, v64 = np.zeros(n), np.zeros(n)
    p32, m32, v32 = p64.astype(np.float32), m64.astype(np.float32), v64.astype(np.float32)
    for step, gs in enumerate(GRAD_SCALES, start=1):
        g = gs * rng.standard_normal(n)
        n64 = adam(p64, g, m64, v64, None, 0.01, 20.0, step)
        n32 = adam(p32, g.astype(np.float32), m32, v32, None, 0.01, 20.0, step)
        assert n32 == pytest.approx(n64, rel=1e-6)
    for x32, x64 in ((p32, p64), (m32, m64), (v32, v64)):
        assert np.abs(x32 - x64).max() <= F32_REL * np.abs(x64).max()


def _adam_args(dtype=np.float64):
    n = 10
    return dict(params=np.zeros(n, dtype), grads=np.zeros(n, dtype), m=np.zeros(n, dtype),
                v=np.zeros(n, dtype), mask=np.ones(n, np.uint8), lr=1e-3, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0, step=1,
                grad_norm=np.zeros(1, dtype))


def _readonly(x):
    x.setflags(write=False)
    return x


ADAM_BAD = [
    ("params", np.zeros(10, np.int32)),
    ("params", np.zeros((10, 1))),
    ("params", _readonly(np.zeros(10))),
    ("grads", np.zeros(10, np.float32)),
    ("grads", np.zeros(20)[::2]),
    ("m", np.zeros(11)),
    ("v", [0.0] * 10),
    ("mask", np.ones(10, np.float64)),
    ("mask", np.ones(10, bool)),
    ("mask", np.ones(9, np.uint8)),
    ("grad_norm", np.zeros(2)),
]


@pytest.mark.parametrize("name,bad", ADAM_BAD)
def test_bad_argument_is_named(name, bad):
    with pytest.raises((ValueError, TypeError), match=rf"^{name} must"):
        cpu.adam_step(**dict(_adam_args(), **{name: bad}))


def test_bad_step_and_uint8_in_message():
    with pytest.raises(ValueError, match=r"^step must be >= 1"):
        cpu.adam_step(**dict(_adam_args(), step=0))
    with pytest.raises(ValueError, match=r"mask must be \[10\] uint8"):
        cpu.adam_step(**dict(_adam_args(), mask=np.ones(10, np.int8)))
