"""ops.matmul: the threaded product the Python layer uses for the large projections."""
import numpy as np
import pytest

from lfads_fast import ops


def views(rng, rows, cols, dtype):
    """The same matrix as a C-contiguous array, a column slice, and a transposed view."""
    m = rng.normal(size=(rows, cols)).astype(dtype)
    wide = np.zeros((rows, cols + 5), dtype)
    wide[:, 2 : 2 + cols] = m
    tall_t = np.ascontiguousarray(m.T)
    return m, {"contiguous": m, "column slice": wide[:, 2 : 2 + cols], "transposed": tall_t.T}


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("M,K,N", [(37, 11, 23), (300, 64, 130), (1, 5, 1), (3, 1, 4)])
def test_every_layout_matches_numpy(rng, dtype, tol, M, K, N):
    a, a_views = views(rng, M, K, dtype)
    b, b_views = views(rng, K, N, dtype)
    want = a.astype(np.float64) @ b.astype(np.float64)
    for an, av in a_views.items():
        for bn, bv in b_views.items():
            got = ops.matmul(av, bv)
            assert got.shape == (M, N) and got.dtype == dtype
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.sqrt(K), err_msg=f"{an} @ {bn}")


def test_out_slice_and_beta(rng):
    a = rng.normal(size=(50, 20))
    b = rng.normal(size=(20, 30))
    big = rng.normal(size=(50, 40))
    before = big.copy()
    ops.matmul(a, b, out=big[:, 5:35], beta=0.5)
    np.testing.assert_allclose(big[:, 5:35], a @ b + 0.5 * before[:, 5:35], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(big[:, :5], before[:, :5])     # nothing outside the slice
    np.testing.assert_array_equal(big[:, 35:], before[:, 35:])


def test_empty_inner_dimension_gives_beta_times_out():
    out = np.full((3, 4), 2.0)
    ops.matmul(np.zeros((3, 0)), np.zeros((0, 4)), out=out, beta=0.5)
    np.testing.assert_array_equal(out, np.ones((3, 4)))


def test_threads_split_large_products_without_changing_them(rng):
    a = rng.normal(size=(1000, 64))
    b = rng.normal(size=(64, 300))
    try:
        ops.set_num_threads(1)
        one = ops.matmul(a, b)
        ops.set_num_threads(2)
        two = ops.matmul(a, b)
    finally:
        ops.set_num_threads(2)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("args,match", [
    ((np.zeros((3, 4), np.float32), np.zeros((5, 2), np.float32)), "b must have 4 rows"),
    ((np.zeros((3, 4), np.float32), np.zeros((4, 2), np.float64)), "b must be float32"),
    ((np.zeros((3, 4, 1)), np.zeros((4, 2))), "a must have 2 dimensions"),
    ((np.zeros((6, 8))[::2, ::2], np.zeros((4, 2))), "a must have unit stride along one axis"),
    ((np.zeros((3, 4), np.int64), np.zeros((4, 2), np.int64)), "float32 or float64"),
])
def test_bad_input_names_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        ops.matmul(*args)


def test_bad_out():
    a, b = np.zeros((3, 4)), np.zeros((4, 2))
    with pytest.raises(ValueError, match=r"out must be \[3, 2\]"):
        ops.matmul(a, b, out=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="out must have unit stride along its last axis"):
        ops.matmul(a, b, out=np.zeros((2, 3)).T)
    frozen = np.zeros((3, 2))
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        ops.matmul(a, b, out=frozen)
    with pytest.raises(ValueError, match="beta != 0 needs out"):
        ops.matmul(a, b, beta=1.0)
    with pytest.raises(TypeError, match="expected a numpy or cupy array"):
        ops.matmul([[1.0]], np.zeros((1, 1)), out=np.zeros((1, 1)))


def test_unpickled_arrays_are_accepted():
    # Arrays that went through pickle (multiprocessing, Ray's object store) carry a dtype
    # object equal to, but not the same as, NumPy's own; the kernels compare dtypes by value.
    import pickle

    rng = np.random.default_rng(5)
    a = pickle.loads(pickle.dumps(rng.standard_normal((6, 4)).astype(np.float32), protocol=5))
    b = pickle.loads(pickle.dumps(rng.standard_normal((4, 3)).astype(np.float32), protocol=5))
    assert a.dtype is not np.dtype(np.float32)
    np.testing.assert_allclose(ops.matmul(a, b), a @ b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="float32"):
        ops.matmul(a, b.astype(np.float64), out=np.empty((6, 3), np.float32))


def _spikes(rng, rows, cols, rate, dtype):
    """Counts-like matrix (mostly zeros) with a last column of ones, as the encoders' input."""
    x = rng.poisson(rate, (rows, cols)).astype(dtype)
    x[:, -1] = 1
    return x


def _run(a, b, out, beta, sparse):
    """The CPU binding itself: it says whether the product over the nonzeros ran."""
    return ops._module(a).matmul(a, b, out, beta, sparse, ops.SPARSE_MAX_DENSITY)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_sparse_a_matches_the_dense_product(rng, dtype, tol, beta):
    x = _spikes(rng, 203, 38, 0.05, dtype)
    W = rng.normal(size=(70, 38)).astype(dtype)
    for b, name in ((W.T, "transposed"), (np.ascontiguousarray(W.T), "contiguous")):
        before = rng.normal(size=(203, 70)).astype(dtype)
        out = before.copy()
        assert _run(x, b, out, beta, "a"), name
        want = x.astype(np.float64) @ b.astype(np.float64) + beta * before
        np.testing.assert_allclose(out, want, rtol=tol, atol=tol * 10, err_msg=name)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_sparse_b_weight_gradient_matches_the_dense_product(rng, dtype, tol, beta):
    x = _spikes(rng, 517, 38, 0.05, dtype)
    d = rng.normal(size=(517, 90)).astype(dtype)
    wide = np.zeros((90, 45), dtype)
    before = rng.normal(size=(90, 38)).astype(dtype)
    wide[:, 3:41] = before
    assert _run(d.T, x, wide[:, 3:41], beta, "b")
    want = d.T.astype(np.float64) @ x.astype(np.float64) + beta * before
    np.testing.assert_allclose(wide[:, 3:41], want, rtol=tol, atol=tol * 100)
    assert not wide[:, :3].any() and not wide[:, 41:].any()  # nothing outside the slice


def test_sparse_products_do_not_depend_on_the_thread_count(rng):
    x = _spikes(rng, 999, 40, 0.05, np.float64)
    W = rng.normal(size=(131, 40))
    d = rng.normal(size=(999, 131))
    got = {}
    before = ops.get_num_threads()
    try:
        for n in (1, 2, 3):
            ops.set_num_threads(n)
            y, g = np.empty((999, 131)), np.empty((131, 40))
            assert _run(x, W.T, y, 0.0, "a") and _run(d.T, x, g, 0.0, "b")
            got[n] = (y, g)
    finally:
        ops.set_num_threads(before)
    for n in (2, 3):
        for a, b in zip(got[1], got[n]):
            np.testing.assert_array_equal(a, b)


def test_sparse_products_take_strided_views(rng):
    """Leading dimensions: a column slice of the sparse operand, a column slice of the dense
    one, and a dense operand that is a transposed column slice."""
    wide = np.zeros((120, 50))
    wide[:, 3:43] = _spikes(rng, 120, 40, 0.05, np.float64)
    x = wide[:, 3:43]
    W = rng.normal(size=(70, 40))
    W_wide = np.zeros((70, 47))
    W_wide[:, 2:42] = W
    Wt_wide = np.zeros((40, 75))
    Wt_wide[:, 1:71] = W.T
    for b, name in ((W_wide[:, 2:42].T, "transposed column slice"), (Wt_wide[:, 1:71], "column slice")):
        out = np.empty((120, 70))
        assert _run(x, b, out, 0.0, "a"), name
        np.testing.assert_allclose(out, x @ W.T, rtol=1e-12, atol=1e-12, err_msg=name)
    d_wide = np.zeros((120, 80))
    d_wide[:, 5:75] = rng.normal(size=(120, 70))
    d = d_wide[:, 5:75]
    out = np.empty((70, 40))
    assert _run(d.T, x, out, 0.0, "b")
    np.testing.assert_allclose(out, d.T @ x, rtol=1e-12, atol=1e-12)


def test_sparse_falls_back_to_the_dense_product(rng):
    W = rng.normal(size=(20, 30))
    dense = rng.normal(size=(64, 30))
    out = np.empty((64, 20))
    assert not _run(dense, W.T, out, 0.0, "a")  # denser than SPARSE_MAX_DENSITY
    np.testing.assert_allclose(out, dense @ W.T, rtol=1e-12)
    x = _spikes(rng, 64, 30, 0.02, np.float64)
    assert _run(x, W.T, out, 0.0, "a")
    # Layouts the sparse products do not take run densely: a transposed a for "a", an
    # untransposed a for "b".
    xt = np.ascontiguousarray(x.T).T
    assert not _run(xt, W.T, out, 0.0, "a")
    np.testing.assert_allclose(out, x @ W.T, rtol=1e-12)
    d = rng.normal(size=(20, 64))
    out2 = np.empty((20, 30))
    assert not _run(d, x, out2, 0.0, "b")
    np.testing.assert_allclose(out2, d @ x, rtol=1e-12)
    # An all-zero input is as sparse as can be.
    z = np.zeros((64, 30))
    assert _run(z, W.T, out, 0.0, "a")
    assert not out.any()


def test_sparse_bad_argument():
    with pytest.raises(ValueError, match="sparse must be None, 'a' or 'b'"):
        ops.matmul(np.zeros((2, 2)), np.zeros((2, 2)), sparse="c")
