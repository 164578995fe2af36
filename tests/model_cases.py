"""The small configuration that the whole-model parity tests share (test_model, test_causal,
test_frameworks): every part of the model present, sizes distinct so that a swapped dimension
fails, regularisation weights distinct and non-zero so that a swapped term changes the loss."""

BASE = dict(encod_data_dim=7, recon_data_dim=7, encod_seq_len=9, recon_seq_len=9, ext_input_dim=0,
            ic_enc_dim=6, ci_enc_dim=5, ci_lag=1, con_dim=5, co_dim=2, ic_dim=4, gen_dim=8,
            fac_dim=3, dropout_rate=0.2, cd_rate=0.0, l2_gen_scale=1e-2, l2_con_scale=2e-3,
            l2_ic_enc_scale=1e-3, l2_ci_enc_scale=5e-3, kl_ic_scale=1e-2, kl_co_scale=1e-2,
            loss_scale=10.0)
