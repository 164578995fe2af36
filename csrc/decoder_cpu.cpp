// The fused LFADS decoder on the CPU. OpenMP threads own contiguous blocks of the batch and run
// them through all T steps of the coupled controller/generator recurrence; every per-step
// product is a single-threaded BLAS call on the block; weight gradients are large GEMMs after
// the loop over the per-step gradients the loop stored.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "decoder.h"
#include "gru.h"
#include "gru_cell.h"

namespace lfads {

namespace {

template <typename S>
void copy_rows(int rows, int cols, const S* src, int ld_src, S* dst, int ld_dst) {
  for (int i = 0; i < rows; ++i)
    std::memcpy(dst + static_cast<int64_t>(i) * ld_dst, src + static_cast<int64_t>(i) * ld_src,
                sizeof(S) * cols);
}

// dst = src * mask (mask may be null: plain copy), n elements.
template <typename S>
void masked(int64_t n, const S* src, const S* mask, S* dst) {
  if (mask) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * mask[i];
  } else {
    std::memcpy(dst, src, sizeof(S) * n);
  }
}

int threads_for(int B) { return threads_for_rows(B, omp_get_max_threads()); }

}  // namespace

// Forward

template <typename S>
void decoder_forward_cpu(const DecoderShape& s, const DecoderForwardArgs<S>& a) {
  const int T = s.T, B = s.B, C = s.C, U = s.U, G = s.G, F = s.F;
  const S clip = static_cast<S>(s.clip);
  const int nt = threads_for(B);
#pragma omp parallel num_threads(nt)
  {
    int b0, b1;
    split_rows(B, nt, omp_get_thread_num(), b0, b1);
    const int Bs = b1 - b0;
    if (Bs > 0) {
      std::vector<S> xin_c(static_cast<size_t>(Bs) * 3 * C), xin_g(static_cast<size_t>(Bs) * 3 * G);
      std::vector<S> fd(static_cast<size_t>(Bs) * F), gd(static_cast<size_t>(Bs) * G);
      std::vector<S> co(static_cast<size_t>(Bs) * 2 * U);
      std::vector<S> scratch(static_cast<size_t>(Bs) * 4 * std::max(C, G));
      for (int t = 0; t < T; ++t) {
        const int64_t row = static_cast<int64_t>(t) * B + b0;
        const int64_t prev = row - B;  // same block, step t-1
        if (C > 0) {
          const S* f_prev = t == 0 ? a.f0 + static_cast<int64_t>(b0) * F : a.factors + prev * F;
          const S* c_prev = t == 0 ? a.c0 + static_cast<int64_t>(b0) * C : a.con_states + prev * C;
          masked<S>(int64_t(Bs) * F, f_prev, a.mask_f ? a.mask_f + row * F : nullptr, fd.data());
          copy_rows<S>(Bs, 3 * C, a.xcon + row * s.ld_xc, s.ld_xc, xin_c.data(), 3 * C);
          gemm<S>(false, true, Bs, 3 * C, F, S(1), fd.data(), F, a.W_con_f, F, S(1), xin_c.data(), 3 * C);
          S* c_t = a.con_states + row * C;
          gru_step_forward_cpu<S>(Bs, C, xin_c.data(), 3 * C, a.W_con_hh, c_prev, clip, c_t,
                                  a.con_gates + row * 3 * C, scratch.data());
          gemm<S>(false, true, Bs, 2 * U, C, S(1), c_t, C, a.W_co, C, S(0), co.data(), 2 * U);
          for (int b = 0; b < Bs; ++b) {
            const int64_t o = (row + b) * U;
            for (int k = 0; k < U; ++k) {
              const S mean = co[b * 2 * U + k] + a.b_co[k];
              const S logvar = co[b * 2 * U + U + k] + a.b_co[U + k];
              a.co_mean[o + k] = mean;
              a.co_logvar[o + k] = logvar;
              a.u[o + k] = s.sample ? mean + lf_exp(S(0.5) * logvar) * a.eps[o + k] : mean;
            }
          }
        }
        const S* g_prev = t == 0 ? a.g0 + static_cast<int64_t>(b0) * G : a.gen_states + prev * G;
        copy_rows<S>(Bs, 3 * G, a.xgen + row * s.ld_xg, s.ld_xg, xin_g.data(), 3 * G);
        if (U > 0)
          gemm<S>(false, true, Bs, 3 * G, U, S(1), a.u + row * U, U, a.W_gen_u, U, S(1), xin_g.data(), 3 * G);
        S* g_t = a.gen_states + row * G;
        gru_step_forward_cpu<S>(Bs, G, xin_g.data(), 3 * G, a.W_gen_hh, g_prev, clip, g_t,
                                a.gen_gates + row * 3 * G, scratch.data());
        masked<S>(int64_t(Bs) * G, g_t, a.mask_g ? a.mask_g + row * G : nullptr, gd.data());
        gemm<S>(false, true, Bs, F, G, S(1), gd.data(), G, a.W_fac, G, S(0), a.factors + row * F, F);
      }
    }
  }
}

// Backward

template <typename S>
void decoder_backward_cpu(const DecoderShape& s, const DecoderBackwardArgs<S>& a) {
  const DecoderForwardArgs<S>& f = a.fwd;
  const int T = s.T, B = s.B, C = s.C, U = s.U, G = s.G, F = s.F;
  const int64_t R = static_cast<int64_t>(T) * B;
  const S clip = static_cast<S>(s.clip);
  // Per-step values kept for the weight gradients after the loop, carved out of a.work.
  S* d_ftot = a.work;            // [R, F]  total gradient on f_t
  S* gd_all = d_ftot + R * F;    // [R, G]  mask_g * g_t
  S* rh_g = gd_all + R * G;      // [R, G]  r * g_{t-1} of the generator
  S* d_co = rh_g + R * G;        // [R, 2U] gradient on [co_mean, co_logvar]
  S* rh_c = d_co + R * 2 * U;    // [R, C]  r * c_{t-1} of the controller
  S* fd_all = rh_c + R * C;      // [R, F]  mask_f * f_{t-1}
  const int nt = threads_for(B);
#pragma omp parallel num_threads(nt)
  {
    int b0, b1;
    split_rows(B, nt, omp_get_thread_num(), b0, b1);
    const int Bs = b1 - b0;
    if (Bs > 0) {
      std::vector<S> df_carry(static_cast<size_t>(Bs) * F, S(0)), tmp_g(static_cast<size_t>(Bs) * G);
      std::vector<S> du(static_cast<size_t>(Bs) * U), dfd(static_cast<size_t>(Bs) * F);
      std::vector<S> scratch(static_cast<size_t>(Bs) * 2 * std::max(C, G));
      S* dg = a.d_g0 + static_cast<int64_t>(b0) * G;  // carried gradients live in the d_*0 rows
      S* dc = C > 0 ? a.d_c0 + static_cast<int64_t>(b0) * C : nullptr;
      std::fill(dg, dg + Bs * G, S(0));
      if (C > 0) std::fill(dc, dc + Bs * C, S(0));
      for (int t = T - 1; t >= 0; --t) {
        const int64_t row = static_cast<int64_t>(t) * B + b0;
        const int64_t prev = row - B;
        // factors -> generator state
        S* dft = d_ftot + row * F;
        for (int i = 0; i < Bs * F; ++i) dft[i] = df_carry[i] + (a.d_factors ? a.d_factors[row * F + i] : S(0));
        gemm<S>(false, false, Bs, G, F, S(1), dft, F, f.W_fac, G, S(0), tmp_g.data(), G);
        const S* mg = f.mask_g ? f.mask_g + row * G : nullptr;
        const S* g_t = f.gen_states + row * G;
        S* gd = gd_all + row * G;
        for (int i = 0; i < Bs * G; ++i) {
          dg[i] += mg ? tmp_g[i] * mg[i] : tmp_g[i];
          gd[i] = mg ? g_t[i] * mg[i] : g_t[i];
        }
        // generator GRU
        const S* g_prev = t == 0 ? f.g0 + static_cast<int64_t>(b0) * G : f.gen_states + prev * G;
        const S* gg = f.gen_gates + row * 3 * G;
        S* rg = rh_g + row * G;
        for (int b = 0; b < Bs; ++b)
          for (int j = 0; j < G; ++j) rg[b * G + j] = gg[b * 3 * G + G + j] * g_prev[b * G + j];
        S* dxg = a.d_xgen + row * s.ld_xg;
        gru_step_backward_cpu<S>(Bs, G, f.W_gen_hh, g_prev, gg, clip, dg, dxg, s.ld_xg, scratch.data());
        if (C > 0) {
          // inferred input -> controller output distribution -> controller state
          gemm<S>(false, false, Bs, U, 3 * G, S(1), dxg, s.ld_xg, f.W_gen_u, U, S(0), du.data(), U);
          S* dco = d_co + row * 2 * U;
          for (int b = 0; b < Bs; ++b) {
            const int64_t o = (row + b) * U;
            for (int k = 0; k < U; ++k) {
              S dm = du[b * U + k], dl = S(0);
              if (s.sample) dl = du[b * U + k] * f.eps[o + k] * S(0.5) * lf_exp(S(0.5) * f.co_logvar[o + k]);
              if (a.d_co_mean) dm += a.d_co_mean[o + k];
              if (a.d_co_logvar) dl += a.d_co_logvar[o + k];
              dco[b * 2 * U + k] = dm;
              dco[b * 2 * U + U + k] = dl;
            }
          }
          gemm<S>(false, false, Bs, C, 2 * U, S(1), dco, 2 * U, f.W_co, C, S(1), dc, C);
          // controller GRU
          const S* c_prev = t == 0 ? f.c0 + static_cast<int64_t>(b0) * C : f.con_states + prev * C;
          const S* cg = f.con_gates + row * 3 * C;
          S* rc = rh_c + row * C;
          for (int b = 0; b < Bs; ++b)
            for (int j = 0; j < C; ++j) rc[b * C + j] = cg[b * 3 * C + C + j] * c_prev[b * C + j];
          S* dxc = a.d_xcon + row * s.ld_xc;
          gru_step_backward_cpu<S>(Bs, C, f.W_con_hh, c_prev, cg, clip, dc, dxc, s.ld_xc, scratch.data());
          // controller input -> previous factors
          gemm<S>(false, false, Bs, F, 3 * C, S(1), dxc, s.ld_xc, f.W_con_f, F, S(0), dfd.data(), F);
          const S* mf = f.mask_f ? f.mask_f + row * F : nullptr;
          const S* f_prev = t == 0 ? f.f0 + static_cast<int64_t>(b0) * F : f.factors + prev * F;
          S* fdp = fd_all + row * F;
          for (int i = 0; i < Bs * F; ++i) {
            df_carry[i] = mf ? dfd[i] * mf[i] : dfd[i];
            fdp[i] = mf ? f_prev[i] * mf[i] : f_prev[i];
          }
        }
      }
      std::memcpy(a.d_f0 + static_cast<int64_t>(b0) * F, df_carry.data(), sizeof(S) * Bs * F);
    }
  }
  // Weight gradients: one large product per weight over all T * B rows.
  par_gemm<S>(true, false, F, G, int(R), S(1), d_ftot, F, gd_all, G, S(0), a.d_W_fac, G);
  gru_weight_grad_cpu<S>(T, B, G, a.d_xgen, s.ld_xg, f.gen_states, f.g0, rh_g, false, a.d_W_gen_hh);
  if (C > 0) {
    par_gemm<S>(true, false, 3 * G, U, int(R), S(1), a.d_xgen, s.ld_xg, f.u, U, S(0), a.d_W_gen_u, U);
    par_gemm<S>(true, false, 2 * U, C, int(R), S(1), d_co, 2 * U, f.con_states, C, S(0), a.d_W_co, C);
    for (int k = 0; k < 2 * U; ++k) a.d_b_co[k] = S(0);
    for (int64_t r = 0; r < R; ++r)
      for (int k = 0; k < 2 * U; ++k) a.d_b_co[k] += d_co[r * 2 * U + k];
    gru_weight_grad_cpu<S>(T, B, C, a.d_xcon, s.ld_xc, f.con_states, f.c0, rh_c, false, a.d_W_con_hh);
    par_gemm<S>(true, false, 3 * C, F, int(R), S(1), a.d_xcon, s.ld_xc, fd_all, F, S(0), a.d_W_con_f, F);
  }
}

template void decoder_forward_cpu<float>(const DecoderShape&, const DecoderForwardArgs<float>&);
template void decoder_forward_cpu<double>(const DecoderShape&, const DecoderForwardArgs<double>&);
template void decoder_backward_cpu<float>(const DecoderShape&, const DecoderBackwardArgs<float>&);
template void decoder_backward_cpu<double>(const DecoderShape&, const DecoderBackwardArgs<double>&);

}  // namespace lfads
