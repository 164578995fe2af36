"""What the whole-model tests share (test_model, test_causal, test_frameworks, test_stitching):
the small configuration (every part of the model present, sizes distinct so that a swapped
dimension fails, regularisation weights distinct and non-zero so that a swapped term changes
the loss), the finite-difference check of a model's flat gradient, and a record of the
products over nonzero counts that a pass runs."""
import numpy as np

BASE = dict(encod_data_dim=7, recon_data_dim=7, encod_seq_len=9, recon_seq_len=9, ext_input_dim=0,
            ic_enc_dim=6, ci_enc_dim=5, ci_lag=1, con_dim=5, co_dim=2, ic_dim=4, gen_dim=8,
            fac_dim=3, dropout_rate=0.2, cd_rate=0.0, l2_gen_scale=1e-2, l2_con_scale=2e-3,
            l2_ic_enc_scale=1e-3, l2_ci_enc_scale=5e-3, kl_ic_scale=1e-2, kl_co_scale=1e-2,
            loss_scale=10.0)


def check_flat_gradient(model, batch, noise, grad, indices, step, rtol):
    """Central finite differences of the model's loss against grad at the given entries of
    model.flat (float64 model): |numeric - grad| <= rtol * max(1, |numeric|)."""
    for i in indices:
        old = model.flat[i]
        model.flat[i] = old + step
        up = model.loss_and_grads(batch, noise, grads=False)[0]["loss"]
        model.flat[i] = old - step
        down = model.loss_and_grads(batch, noise, grads=False)[0]["loss"]
        model.flat[i] = old
        num = (up - down) / (2 * step)
        assert abs(num - grad[i]) <= rtol * max(1.0, abs(num)), (i, num, grad[i])


def record_sparse_products(monkeypatch, max_density=0.5) -> list:
    """While monkeypatch holds: every ops.matmul(..., sparse=...) call goes to the CPU
    binding, which says whether it multiplied only the nonzeros; the returned list gets
    (sparse, ran) per call. The switch-over is max_density."""
    from lfads_fast import ops

    ran = []
    dense = ops.matmul

    def recording(a, b, out=None, *, beta=0.0, sparse=None):
        if sparse is None:
            return dense(a, b, out, beta=beta)
        if out is None:
            out = np.empty((a.shape[0], b.shape[1]), a.dtype)
        ran.append((sparse, ops._module(a).matmul(a, b, out, beta, sparse, ops.SPARSE_MAX_DENSITY)))
        return out

    monkeypatch.setattr(ops, "matmul", recording)
    monkeypatch.setattr(ops, "SPARSE_MAX_DENSITY", max_density)
    return ran
