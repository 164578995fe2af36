"""bench/profile_step.py's timing wrappers: while installed they see every kernel call of a
training step and change none of its results; afterwards lfads_fast.ops is as it was."""
import inspect
import os
import re
import sys
from pathlib import Path
from unittest import mock

import numpy as np

from lfads_fast import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
with mock.patch.dict(os.environ):  # the benchmark sets OPENBLAS_NUM_THREADS for its own runs
    from bench_frameworks import _setup
    from bench_step import CONFIGS
    from profile_step import KERNEL_OPS, REST, OpTimer, _matmul_flop

TINY = dict(CONFIGS["small"], batch=4, encod_seq_len=7, recon_seq_len=9)


def test_every_function_that_calls_the_kernels_is_wrapped():
    callers = {name for name in ops.__all__
               if re.search(r"(?<![\w.])_module\(", inspect.getsource(getattr(ops, name)))}
    assert callers == set(KERNEL_OPS)


def test_wrapped_step_gives_the_same_loss_gradient_and_update():
    results = []
    for wrap in (False, True):
        _, encod, recon, model, noise = _setup(TINY, rate=0.3)  # dense enough: dense products
        batch = model.make_batch(encod, recon)
        m, v = np.zeros_like(model.flat), np.zeros_like(model.flat)
        timer = OpTimer(ops)
        with timer if wrap else mock.MagicMock():
            terms, grad = model.loss_and_grads(batch, noise)
            norm = ops.adam_step(model.flat, grad, m, v, lr=1e-3, step=1, max_grad_norm=200.0)
        results.append((terms, grad, norm, model.flat.copy(), m, v, timer))
    (terms0, *arrays0, _), (terms1, *arrays1, timer) = results
    assert terms1 == terms0
    for a0, a1 in zip(arrays0, arrays1):
        np.testing.assert_array_equal(a1, a0)

    calls = {}
    for name, *_ in timer.calls:
        calls[name] = calls.get(name, 0) + 1
    # Four encoder GRUs; the projections: encoders and controller input forward, their weight
    # gradients and the controller input's gradient backward.
    assert calls == dict(matmul=5, gru_forward=4, gru_backward=4, decoder_forward=1,
                         decoder_backward=1, poisson_elbo=1, kl_ic=1, kl_co=1, adam_step=1)
    for name, fn in timer.originals.items():
        assert getattr(ops, name) is fn

    summary = timer.summary(step_wall=10.0)
    timed = sum(s["wall"] for k, s in summary.items() if k in KERNEL_OPS)
    assert summary[REST]["wall"] == 10.0 - timed
    B, Te, Ne = TINY["batch"], TINY["encod_seq_len"], TINY["encod_data_dim"]
    n_enc = 3 * 2 * (TINY["ic_enc_dim"] + TINY["ci_enc_dim"])
    # The input with a column of ones, times the weights with the bias as a last column.
    encoder_projection = f"matmul [{Te * B}x{Ne + 1}]·[{Ne + 1}x{n_enc}] (graph.encode)"
    assert summary[encoder_projection]["flop"] == 2 * Te * B * (Ne + 1) * n_enc


def test_sparse_products_count_the_flops_they_do():
    rng = np.random.default_rng(0)
    x = np.zeros((640, 20))
    x[:, :2] = 1.0  # 10% nonzero
    W = rng.normal(size=(30, 20))
    d = rng.normal(size=(640, 30))
    dense = 2.0 * 640 * 20 * 30
    assert _matmul_flop(x, W.T) == dense
    assert _matmul_flop(x, W.T, sparse="a") == dense * 0.1
    assert _matmul_flop(d.T, x, sparse="b") == dense * 0.1
    # Denser than the switch-over: the dense product runs and counts in full.
    x[:, :10] = 1.0
    assert _matmul_flop(x, W.T, sparse="a") == dense
