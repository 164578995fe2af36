"""What the whole-model tests share (test_model, test_causal, test_frameworks, test_stitching):
the small configuration (every part of the model present, sizes distinct so that a swapped
dimension fails, regularisation weights distinct and non-zero so that a swapped term changes
the loss) and the finite-difference check of a model's flat gradient."""

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
