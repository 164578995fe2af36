"""ELBO kernels of lfads_fast._cpu: poisson_elbo, kl_ic, kl_co.

Gradients against float64 central finite differences on fresh random inputs; values against
torch; float32 against float64; bad arguments give errors that name them.
"""
import math
import zlib

import numpy as np
import pytest
from optional import OptionalModule

from lfads_fast._backend import cpu  # lfads_fast._cpu, imported after its BLAS is loaded

torch = OptionalModule("torch")  # tests that use it skip without torch

# Central differences in float64. Truncation error ~ FD_STEP^2 |f'''| / 6 ~ 1e-10; rounding
# ~ 1e-16 |loss| / FD_STEP ~ 1e-9 for losses of a few hundred: both far below the tolerances.
FD_STEP = 1e-5
FD_RTOL = 1e-6
FD_ATOL = 1e-7
# torch evaluates the same float64 formulas in another order: only rounding differs.
REF_RTOL = 1e-10
REF_ATOL = 1e-10
# float32 kernels against float64 ones, as the largest error relative to the largest value:
# float32 eps (6e-8) grown by exp and by sums over up to a few thousand bins.
F32_REL = 1e-4
# The same float64 computation on 1 and on 3 threads: only the summation order differs.
THREADS_RTOL = 1e-12


def fd_grad(f, x):
    """Central differences of the scalar f() with respect to every element of x (in place)."""
    g = np.empty_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + FD_STEP
        fp = f()
        flat[i] = old - FD_STEP
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * FD_STEP)
    return g


def assert_f32_close(x32, x64):
    x32, x64 = np.asarray(x32, np.float64), np.asarray(x64)
    assert np.abs(x32 - x64).max() <= F32_REL * max(np.abs(x64).max(), 1e-30)


# ---------------------------------------------------------------------------- Poisson


def poisson_inputs(rng, T, B, F, N, weight=False, mask=False, nan_frac=0.1):
    R = T * B
    factors = rng.standard_normal((R, F))
    W_ro = rng.standard_normal((N, F)) / math.sqrt(F)
    b_ro = 0.5 * rng.standard_normal(N)
    # Counts drawn away from the model's own rates so that the gradient is far from zero.
    counts = rng.poisson(1.7 * np.exp(factors @ W_ro.T + b_ro)).astype(np.float64)
    counts[rng.random((R, N)) < nan_frac] = np.nan
    return dict(
        factors=factors,
        W_ro=W_ro,
        b_ro=b_ro,
        counts=counts,
        loss_weight=rng.uniform(0.2, 2.0, (R, N)) if weight else None,
        grad_mask=(rng.random((R, N)) < 0.6).astype(np.float64) if mask else None,
        scale=0.37,
        T=T,
    )


def poisson(inp, dtype=np.float64, grads=True):
    """Runs cpu.poisson_elbo; outputs start as NaN so that unwritten entries show."""
    T = inp["T"]
    R, F = inp["factors"].shape
    N = inp["W_ro"].shape[0]

    def arr(name):
        x = inp[name]
        return None if x is None else np.ascontiguousarray(x, dtype)

    def out(*shape):
        return np.full(shape, np.nan, dtype)

    o = dict(loss=out(1), log_rates=out(R, N), nll_tn=out(T, N))
    o.update(
        dict(d_factors=out(R, F), d_W_ro=out(N, F), d_b_ro=out(N))
        if grads
        else dict(d_factors=None, d_W_ro=None, d_b_ro=None)
    )
    cpu.poisson_elbo(
        arr("factors"), arr("W_ro"), arr("b_ro"), arr("counts"), arr("loss_weight"),
        arr("grad_mask"), inp["scale"], T, **o,
    )
    return o


def poisson_torch(inp):
    """loss, log_rates, nll_tn of the same inputs from torch (float64)."""
    T = inp["T"]
    f, W, b, y = (torch.tensor(inp[k]) for k in ("factors", "W_ro", "b_ro", "counts"))
    x = f @ W.T + b
    valid = ~torch.isnan(y)
    y0 = torch.where(valid, y, torch.zeros_like(y))
    nll = torch.nn.functional.poisson_nll_loss(
        x, y0, log_input=True, full=False, reduction="none"
    ) + torch.lgamma(y0 + 1)
    if inp["loss_weight"] is not None:
        nll = nll * torch.tensor(inp["loss_weight"])
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    nll_tn = nll.reshape(T, -1, nll.shape[1]).sum(1)
    return inp["scale"] * nll.sum().item(), x.numpy(), nll_tn.numpy()


POISSON_SHAPES = [  # T, B, F, N: general, T=1, B=1, scalar, a step wider than one row block
    (3, 5, 7, 11),
    (1, 4, 3, 9),
    (6, 1, 5, 13),
    (1, 1, 1, 1),
    (2, 67, 3, 5),
]


@pytest.mark.parametrize("shape", POISSON_SHAPES)
@pytest.mark.parametrize("opts", ["plain", "weight", "weight+mask"])
def test_poisson_gradients_match_finite_differences(shape, opts):
    rng = np.random.default_rng(zlib.crc32(repr((shape, opts)).encode()))
    inp = poisson_inputs(rng, *shape, weight="weight" in opts, mask="mask" in opts)
    got = poisson(inp)
    # A bin masked out of the gradient still counts in the loss, so the gradient is that of the
    # loss in which each bin is weighted by weight * grad_mask.
    fd_inp = dict(inp, grad_mask=None)
    if inp["grad_mask"] is not None:
        fd_inp["loss_weight"] = inp["loss_weight"] * inp["grad_mask"]
        assert got["loss"][0] == pytest.approx(
            poisson(dict(inp, grad_mask=None), grads=False)["loss"][0], rel=1e-14
        )

    def loss():
        return poisson(fd_inp, grads=False)["loss"][0]

    for name, d_name in (("factors", "d_factors"), ("W_ro", "d_W_ro"), ("b_ro", "d_b_ro")):
        np.testing.assert_allclose(
            got[d_name], fd_grad(loss, fd_inp[name]), rtol=FD_RTOL, atol=FD_ATOL, err_msg=d_name
        )


def test_poisson_values_match_torch():
    rng = np.random.default_rng(1)
    inp = poisson_inputs(rng, 4, 6, 5, 10, weight=True)
    # Counts at and past the end of the log-factorial table, and non-integer counts, take the
    # lgamma path.
    inp["counts"][0, :4] = [1023.0, 1024.0, 2500.0, 3.5]
    inp["counts"][1, 0] = 0.25
    got = poisson(inp)
    loss, log_rates, nll_tn = poisson_torch(inp)
    assert got["loss"][0] == pytest.approx(loss, rel=REF_RTOL)
    np.testing.assert_allclose(got["log_rates"], log_rates, rtol=REF_RTOL, atol=REF_ATOL)
    np.testing.assert_allclose(got["nll_tn"], nll_tn, rtol=REF_RTOL, atol=REF_ATOL)


def test_poisson_nan_bins_and_grad_mask_block_gradients():
    rng = np.random.default_rng(2)
    T, B, F, N = 3, 4, 5, 6
    inp = poisson_inputs(rng, T, B, F, N, weight=True)
    inp["counts"][:, 2] = np.nan  # neuron 2 never observed
    inp["counts"][7, :] = np.nan  # row 7 (t=1, b=3) entirely missing
    got = poisson(inp)
    assert np.all(got["d_W_ro"][2] == 0) and got["d_b_ro"][2] == 0
    assert np.all(got["d_factors"][7] == 0)
    assert np.all(got["nll_tn"][:, 2] == 0)
    assert np.isfinite(got["loss"][0])
    # Missing bins still get their log-rate.
    np.testing.assert_allclose(got["log_rates"], inp["factors"] @ inp["W_ro"].T + inp["b_ro"])

    blocked = poisson(dict(inp, grad_mask=np.zeros((T * B, N))))
    assert blocked["loss"][0] == got["loss"][0]
    for d_name in ("d_factors", "d_W_ro", "d_b_ro"):
        assert np.all(blocked[d_name] == 0), d_name


def test_poisson_loss_only_and_optional_outputs():
    rng = np.random.default_rng(3)
    inp = poisson_inputs(rng, 2, 3, 4, 5, weight=True, mask=True)
    full = poisson(inp)
    loss_only = poisson(inp, grads=False)
    assert loss_only["loss"][0] == full["loss"][0]
    np.testing.assert_array_equal(loss_only["nll_tn"], full["nll_tn"])
    loss = np.zeros(1)
    cpu.poisson_elbo(
        inp["factors"], inp["W_ro"], inp["b_ro"], inp["counts"], None, None, inp["scale"], 2,
        loss, None, None, None, None, None,
    )
    assert loss[0] == pytest.approx(poisson(dict(inp, loss_weight=None), grads=False)["loss"][0])


def test_poisson_float32_matches_float64():
    rng = np.random.default_rng(4)
    inp = poisson_inputs(rng, 5, 9, 6, 17, weight=True, mask=True)
    g64, g32 = poisson(inp), poisson(inp, np.float32)
    for k in g64:
        assert g32[k].dtype == np.float32
        assert_f32_close(g32[k], g64[k])


def test_poisson_thread_count_does_not_change_the_result():
    rng = np.random.default_rng(5)
    inp = poisson_inputs(rng, 8, 70, 6, 40, weight=True, mask=True)  # enough bins for threads
    before = cpu.get_num_threads()
    try:
        cpu.set_num_threads(1)
        one = poisson(inp)
        cpu.set_num_threads(3)
        three = poisson(inp)
    finally:
        cpu.set_num_threads(before)
    for k in one:
        np.testing.assert_allclose(three[k], one[k], rtol=THREADS_RTOL, atol=1e-14, err_msg=k)


# ---------------------------------------------------------------------------- KL, initial condition

IC_VAR_MIN = 1e-4


def kl_ic_inputs(rng, B, D):
    return dict(
        mean=rng.standard_normal((B, D)),
        logvar=rng.uniform(-3.0, 1.0, (B, D)),
        prior_mean=0.3 * rng.standard_normal(D),
        prior_logvar=rng.uniform(-2.5, 0.0, D),
        var_min=IC_VAR_MIN,
        scale=0.8,
    )


def kl_ic(inp, dtype=np.float64, grads=True):
    B, D = inp["mean"].shape
    arrs = [np.ascontiguousarray(inp[k], dtype) for k in ("mean", "logvar", "prior_mean", "prior_logvar")]
    o = dict(kl=np.full(1, np.nan, dtype))
    o.update(
        dict(
            d_mean=np.full((B, D), np.nan, dtype),
            d_logvar=np.full((B, D), np.nan, dtype),
            d_prior_mean=np.full(D, np.nan, dtype),
        )
        if grads
        else dict(d_mean=None, d_logvar=None, d_prior_mean=None)
    )
    cpu.kl_ic(*arrs, inp["var_min"], inp["scale"], **o)
    return o


KL_IC_SHAPES = [(6, 5), (1, 3), (4, 1), (1, 1), (33, 9)]


@pytest.mark.parametrize("B,D", KL_IC_SHAPES)
def test_kl_ic_value_matches_torch(B, D):
    inp = kl_ic_inputs(np.random.default_rng(10 + B * D), B, D)
    t = {k: torch.tensor(v) for k, v in inp.items() if isinstance(v, np.ndarray)}
    post = torch.distributions.Normal(t["mean"], torch.sqrt(torch.exp(t["logvar"]) + inp["var_min"]))
    prior = torch.distributions.Normal(t["prior_mean"], torch.exp(0.5 * t["prior_logvar"]))
    want = inp["scale"] * torch.distributions.kl_divergence(post, prior).sum(-1).mean().item()
    assert kl_ic(inp)["kl"][0] == pytest.approx(want, rel=REF_RTOL)


@pytest.mark.parametrize("B,D", KL_IC_SHAPES)
def test_kl_ic_gradients_match_finite_differences(B, D):
    inp = kl_ic_inputs(np.random.default_rng(20 + B * D), B, D)
    got = kl_ic(inp)

    def loss():
        return kl_ic(inp, grads=False)["kl"][0]

    for name in ("mean", "logvar", "prior_mean"):
        np.testing.assert_allclose(
            got["d_" + name], fd_grad(loss, inp[name]), rtol=FD_RTOL, atol=FD_ATOL, err_msg=name
        )


def test_kl_ic_float32_matches_float64():
    inp = kl_ic_inputs(np.random.default_rng(30), 300, 64)  # wide enough for several threads
    g64, g32 = kl_ic(inp), kl_ic(inp, np.float32)
    for k in g64:
        assert_f32_close(g32[k], g64[k])


# ---------------------------------------------------------------------------- KL, inferred inputs


def kl_co_inputs(rng, T, B, U):
    return dict(
        mean=0.5 * rng.standard_normal((T, B, U)),
        logvar=rng.uniform(-2.0, 0.5, (T, B, U)),
        eps=rng.standard_normal((T, B, U)),
        logtau=np.log(rng.uniform(1.5, 20.0, U)),
        lognvar=np.log(rng.uniform(0.05, 0.5, U)),
        scale=0.6,
    )


KL_CO_ARRAYS = ("mean", "logvar", "eps", "logtau", "lognvar")


def kl_co(inp, dtype=np.float64, grads=True):
    T, B, U = inp["mean"].shape
    arrs = [np.ascontiguousarray(inp[k], dtype) for k in KL_CO_ARRAYS]
    o = dict(kl=np.full(1, np.nan, dtype))
    o.update(
        dict(
            d_mean=np.full((T, B, U), np.nan, dtype),
            d_logvar=np.full((T, B, U), np.nan, dtype),
            d_logtau=np.full(U, np.nan, dtype),
            d_lognvar=np.full(U, np.nan, dtype),
        )
        if grads
        else dict(d_mean=None, d_logvar=None, d_logtau=None, d_lognvar=None)
    )
    cpu.kl_co(*arrs, inp["scale"], **o)
    return o


def kl_co_torch(inp):
    """The KL and its autograd gradients, with the AR(1) log-density written out in torch."""
    t = {k: torch.tensor(inp[k], requires_grad=k != "eps") for k in KL_CO_ARRAYS}
    B = inp["mean"].shape[1]
    sd = torch.exp(0.5 * t["logvar"])
    x = t["mean"] + sd * t["eps"]
    log_q = torch.distributions.Normal(t["mean"], sd).log_prob(x).sum()
    alpha = torch.exp(-1.0 / torch.exp(t["logtau"]))
    nvar = torch.exp(t["lognvar"])
    var0 = nvar / (1 - alpha**2)
    log_p = torch.distributions.Normal(torch.zeros_like(x[0]), torch.sqrt(var0)).log_prob(x[0]).sum()
    if x.shape[0] > 1:
        log_p = log_p + torch.distributions.Normal(alpha * x[:-1], torch.sqrt(nvar)).log_prob(x[1:]).sum()
    kl = inp["scale"] * (log_q - log_p) / B
    kl.backward()
    return kl.item(), {"d_" + k: t[k].grad.numpy() for k in KL_CO_ARRAYS if k != "eps"}


KL_CO_SHAPES = [(5, 4, 3), (1, 3, 2), (6, 1, 4), (1, 1, 1), (9, 7, 5)]


@pytest.mark.parametrize("T,B,U", KL_CO_SHAPES + [(50, 100, 4)])  # the last one is threaded
def test_kl_co_matches_torch(T, B, U):
    inp = kl_co_inputs(np.random.default_rng(40 + T * B * U), T, B, U)
    got = kl_co(inp)
    want, grads = kl_co_torch(inp)
    assert got["kl"][0] == pytest.approx(want, rel=REF_RTOL, abs=REF_ATOL)
    for k, g in grads.items():
        np.testing.assert_allclose(got[k], g, rtol=REF_RTOL, atol=REF_ATOL, err_msg=k)


@pytest.mark.parametrize("T,B,U", KL_CO_SHAPES)
def test_kl_co_gradients_match_finite_differences(T, B, U):
    inp = kl_co_inputs(np.random.default_rng(50 + T * B * U), T, B, U)
    got = kl_co(inp)

    def loss():
        return kl_co(inp, grads=False)["kl"][0]

    for name in ("mean", "logvar", "logtau", "lognvar"):
        np.testing.assert_allclose(
            got["d_" + name], fd_grad(loss, inp[name]), rtol=FD_RTOL, atol=FD_ATOL, err_msg=name
        )


def test_kl_co_float32_matches_float64_and_threads_agree():
    inp = kl_co_inputs(np.random.default_rng(60), 40, 90, 5)
    g64, g32 = kl_co(inp), kl_co(inp, np.float32)
    for k in g64:
        assert_f32_close(g32[k], g64[k])
    before = cpu.get_num_threads()
    try:
        cpu.set_num_threads(1)
        one = kl_co(inp)
    finally:
        cpu.set_num_threads(before)
    for k in one:
        np.testing.assert_allclose(g64[k], one[k], rtol=THREADS_RTOL, atol=1e-15, err_msg=k)


# ---------------------------------------------------------------------------- bad arguments


def _poisson_args(dtype=np.float64):
    T, B, F, N = 2, 3, 4, 5
    R = T * B
    rng = np.random.default_rng(70)
    z = lambda *s: np.zeros(s, dtype)  # noqa: E731
    return dict(
        factors=rng.standard_normal((R, F)).astype(dtype), W_ro=z(N, F), b_ro=z(N),
        counts=z(R, N), loss_weight=None, grad_mask=None, scale=1.0, T=T, loss=z(1),
        log_rates=z(R, N), nll_tn=z(T, N), d_factors=z(R, F), d_W_ro=z(N, F), d_b_ro=z(N),
    )


def _readonly(x):
    x.setflags(write=False)
    return x


POISSON_BAD = [
    ("factors", lambda a: a["factors"].astype(np.int64)),
    ("factors", lambda a: a["factors"].astype(np.float16)),
    ("W_ro", lambda a: a["W_ro"].astype(np.float32)),
    ("W_ro", lambda a: np.zeros((5, 3))),
    ("b_ro", lambda a: np.zeros(4)),
    ("counts", lambda a: np.zeros((6, 10))[:, ::2]),
    ("counts", lambda a: [[0.0] * 5] * 6),
    ("loss_weight", lambda a: np.ones((6, 4))),
    ("grad_mask", lambda a: np.ones((6, 5), np.float32)),
    ("loss", lambda a: np.zeros(2)),
    ("loss", lambda a: _readonly(np.zeros(1))),
    ("log_rates", lambda a: np.zeros((5, 6))),
    ("nll_tn", lambda a: np.zeros((3, 5))),
    ("d_factors", lambda a: np.zeros((4, 6)).T),
    ("d_W_ro", lambda a: np.zeros((5, 4), np.float32)),
    ("d_b_ro", lambda a: np.zeros((5, 1))),
]


@pytest.mark.parametrize("name,bad", POISSON_BAD)
def test_poisson_bad_argument_is_named(name, bad):
    args = _poisson_args()
    args[name] = bad(args)
    with pytest.raises((ValueError, TypeError), match=rf"^{name} must"):
        cpu.poisson_elbo(**args)


def test_poisson_bad_T_and_partial_gradients():
    args = _poisson_args()
    with pytest.raises(ValueError, match=r"^T must divide"):
        cpu.poisson_elbo(**dict(args, T=4))
    with pytest.raises(ValueError, match=r"^T must divide"):
        cpu.poisson_elbo(**dict(args, T=0))
    with pytest.raises(ValueError, match=r"^d_factors, d_W_ro, d_b_ro must all be"):
        cpu.poisson_elbo(**dict(args, d_W_ro=None))


def test_kl_bad_arguments_are_named():
    B, D = 3, 2
    ic = dict(
        mean=np.ones((B, D)), logvar=np.ones((B, D)), prior_mean=np.ones(D),
        prior_logvar=np.ones(D), var_min=1e-4, scale=1.0, kl=np.zeros(1),
        d_mean=np.zeros((B, D)), d_logvar=np.zeros((B, D)), d_prior_mean=np.zeros(D),
    )
    cpu.kl_ic(**ic)
    for name, bad in [
        ("mean", np.ones((B, D), np.int32)),
        ("logvar", np.ones((B, D), np.float32)),
        ("prior_mean", np.ones(D + 1)),
        ("prior_logvar", np.ones((D, 2))[:, 0]),
        ("kl", np.zeros((1, 1))),
        ("d_logvar", np.zeros((D, B))),
    ]:
        with pytest.raises((ValueError, TypeError), match=rf"^{name} must"):
            cpu.kl_ic(**dict(ic, **{name: bad}))
    with pytest.raises(ValueError, match=r"^mean must have at least one row"):
        cpu.kl_ic(**dict(ic, mean=np.ones((0, D)), logvar=np.ones((0, D)),
                         d_mean=np.ones((0, D)), d_logvar=np.ones((0, D))))
    with pytest.raises(ValueError, match=r"^d_mean, d_logvar, d_prior_mean must all be"):
        cpu.kl_ic(**dict(ic, d_prior_mean=None))

    T, U = 4, 2
    co = dict(
        mean=np.ones((T, B, U)), logvar=np.ones((T, B, U)), eps=np.ones((T, B, U)),
        logtau=np.ones(U), lognvar=np.ones(U), scale=1.0, kl=np.zeros(1),
        d_mean=np.zeros((T, B, U)), d_logvar=np.zeros((T, B, U)), d_logtau=np.zeros(U),
        d_lognvar=np.zeros(U),
    )
    cpu.kl_co(**co)
    for name, bad in [
        ("mean", np.ones((T, B, U), np.float16)),
        ("mean", np.ones((T, B))),
        ("eps", np.ones((T, B, 2 * U))[:, :, ::2]),
        ("logtau", np.ones(U, np.float32)),
        ("lognvar", np.ones(U + 1)),
        ("d_mean", _readonly(np.zeros((T, B, U)))),
        ("d_lognvar", np.zeros(3)),
    ]:
        with pytest.raises((ValueError, TypeError), match=rf"^{name} must"):
            cpu.kl_co(**dict(co, **{name: bad}))
    with pytest.raises(ValueError, match=r"^d_mean, d_logvar, d_logtau, d_lognvar must all be"):
        cpu.kl_co(**dict(co, d_logtau=None))
