// Clipped-GRU sequence on the CPU: OpenMP threads own contiguous blocks of the batch and run
// them through all T steps (no synchronisation between steps); the recurrent products are
// single-threaded BLAS calls on each block; weight gradients are one large GEMM after the loop.
#include <omp.h>

#include <vector>

#include "gru.h"
#include "gru_cell.h"

namespace lfads {

// Forward

template <typename S>
void gru_step_forward_cpu(int Bs, int H, const S* xin, int ldx, const S* W_hh, const S* h,
                          S clip, S* h_new, S* gates, S* scratch) {
  S* hzr = scratch;              // [Bs, 2H]
  S* rh = scratch + Bs * 2 * H;  // [Bs, H]
  S* hn = rh + Bs * H;           // [Bs, H]
  gemm<S>(false, true, Bs, 2 * H, H, S(1), h, H, W_hh, H, S(0), hzr, 2 * H);
  for (int b = 0; b < Bs; ++b) {
    const S* x = xin + static_cast<int64_t>(b) * ldx;
    const S* hp = hzr + b * 2 * H;
    S* g = gates + b * 3 * H;
#pragma omp simd
    for (int j = 0; j < H; ++j) {
      g[j] = gru_gate(x[j], hp[j]);
      const S r = gru_gate(x[H + j], hp[H + j]);
      g[H + j] = r;
      rh[b * H + j] = r * h[b * H + j];
    }
  }
  gemm<S>(false, true, Bs, H, H, S(1), rh, H, W_hh + 2 * H * H, H, S(0), hn, H);
  for (int b = 0; b < Bs; ++b) {
    const S* x = xin + static_cast<int64_t>(b) * ldx;
    S* g = gates + b * 3 * H;
#pragma omp simd
    for (int j = 0; j < H; ++j) {
      S n;
      h_new[b * H + j] = gru_update(g[j], x[2 * H + j], hn[b * H + j], h[b * H + j], clip, &n);
      g[2 * H + j] = n;
    }
  }
}

template <typename S>
void gru_forward_cpu(const GruShape& s, const GruForwardArgs<S>& a) {
  const int T = s.T, B = s.B, H = s.H;
  const S clip = static_cast<S>(s.clip);
  const int nt = threads_for_rows(B, omp_get_max_threads());
#pragma omp parallel num_threads(nt)
  {
    int b0, b1;
    split_rows(B, nt, omp_get_thread_num(), b0, b1);
    const int Bs = b1 - b0;
    if (Bs > 0) {
      std::vector<S> scratch(static_cast<size_t>(Bs) * 4 * H);
      const S* h = a.h0 + static_cast<int64_t>(b0) * H;
      for (int k = 0; k < T; ++k) {
        const int t = s.reverse ? T - 1 - k : k;
        const int64_t row = static_cast<int64_t>(t) * B + b0;
        S* h_new = a.hs + row * H;
        gru_step_forward_cpu<S>(Bs, H, a.xproj + row * s.ldx, s.ldx, a.W_hh, h, clip, h_new,
                                a.gates + row * 3 * H, scratch.data());
        h = h_new;
      }
    }
  }
}

// Backward

template <typename S>
void gru_step_backward_cpu(int Bs, int H, const S* W_hh, const S* h, const S* gates, S clip,
                           S* dh, S* d_xin, int ldd, S* scratch) {
  S* dhd = scratch;         // [Bs, H] part of dh through z * h
  S* drh = scratch + Bs * H;  // [Bs, H] gradient on r * h
  for (int b = 0; b < Bs; ++b) {
    const S* g = gates + b * 3 * H;
    S* d = d_xin + static_cast<int64_t>(b) * ldd;
#pragma omp simd
    for (int j = 0; j < H; ++j)
      gru_backward_update(dh[b * H + j], g[j], g[2 * H + j], h[b * H + j], clip, &d[j],
                          &d[2 * H + j], &dhd[b * H + j]);
  }
  gemm<S>(false, false, Bs, H, H, S(1), d_xin + 2 * H, ldd, W_hh + 2 * H * H, H, S(0), drh, H);
  for (int b = 0; b < Bs; ++b) {
    const S* g = gates + b * 3 * H;
    S* d = d_xin + static_cast<int64_t>(b) * ldd;
#pragma omp simd
    for (int j = 0; j < H; ++j) {
      S dhr;
      gru_backward_reset(drh[b * H + j], g[H + j], h[b * H + j], &d[H + j], &dhr);
      dh[b * H + j] = dhd[b * H + j] + dhr;
    }
  }
  gemm<S>(false, false, Bs, H, 2 * H, S(1), d_xin, ldd, W_hh, H, S(1), dh, H);
}

template <typename S>
void gru_backward_cpu(const GruShape& s, const GruBackwardArgs<S>& a) {
  const int T = s.T, B = s.B, H = s.H;
  const S clip = static_cast<S>(s.clip);
  const int nt = threads_for_rows(B, omp_get_max_threads());
#pragma omp parallel num_threads(nt)
  {
    int b0, b1;
    split_rows(B, nt, omp_get_thread_num(), b0, b1);
    const int Bs = b1 - b0;
    if (Bs > 0) {
      std::vector<S> scratch(static_cast<size_t>(Bs) * 2 * H);
      S* dh = a.d_h0 + static_cast<int64_t>(b0) * H;  // carried gradient lives in d_h0's rows
      for (int i = 0; i < Bs * H; ++i) dh[i] = a.d_hT ? a.d_hT[b0 * H + i] : S(0);
      for (int k = T - 1; k >= 0; --k) {
        const int t = s.reverse ? T - 1 - k : k;
        const int64_t row = static_cast<int64_t>(t) * B + b0;
        if (a.d_hs) {
          const S* e = a.d_hs + row * H;
          for (int i = 0; i < Bs * H; ++i) dh[i] += e[i];
        }
        const int tp = s.reverse ? t + 1 : t - 1;  // time index of the previous state
        const S* hp = k == 0 ? a.h0 + static_cast<int64_t>(b0) * H
                             : a.hs + (static_cast<int64_t>(tp) * B + b0) * H;
        const S* g = a.gates + row * 3 * H;
        // r * h of this step, for the batched gradient of W_hn below.
        S* rh = a.work + row * H;
        for (int b = 0; b < Bs; ++b)
          for (int j = 0; j < H; ++j) rh[b * H + j] = g[b * 3 * H + H + j] * hp[b * H + j];
        gru_step_backward_cpu<S>(Bs, H, a.W_hh, hp, g, clip, dh, a.d_xproj + row * s.ldx, s.ldx,
                                 scratch.data());
      }
    }
  }
  gru_weight_grad_cpu<S>(T, B, H, a.d_xproj, s.ldx, a.hs, a.h0, a.work, s.reverse, a.d_W_hh);
}

template <typename S>
void gru_weight_grad_cpu(int T, int B, int H, const S* d_x, int ldx, const S* hs, const S* h0,
                         const S* rh, bool reverse, S* d_W_hh) {
  const int64_t first = reverse ? static_cast<int64_t>(T - 1) * B : 0;  // the step whose prev is h0
  const int64_t rest_d = reverse ? 0 : B;  // rows of the other steps in d_x
  const int64_t rest_h = reverse ? B : 0;  // rows of their previous states in hs
  par_gemm<S>(true, false, 2 * H, H, (T - 1) * B, S(1), d_x + rest_d * ldx, ldx, hs + rest_h * H,
              H, S(0), d_W_hh, H);
  par_gemm<S>(true, false, 2 * H, H, B, S(1), d_x + first * ldx, ldx, h0, H, S(1), d_W_hh, H);
  par_gemm<S>(true, false, H, H, T * B, S(1), d_x + 2 * H, ldx, rh, H, S(0), d_W_hh + 2 * H * H, H);
}

template void gru_forward_cpu<float>(const GruShape&, const GruForwardArgs<float>&);
template void gru_forward_cpu<double>(const GruShape&, const GruForwardArgs<double>&);
template void gru_backward_cpu<float>(const GruShape&, const GruBackwardArgs<float>&);
template void gru_backward_cpu<double>(const GruShape&, const GruBackwardArgs<double>&);
template void gru_weight_grad_cpu<float>(int, int, int, const float*, int, const float*,
                                         const float*, const float*, bool, float*);
template void gru_weight_grad_cpu<double>(int, int, int, const double*, int, const double*,
                                          const double*, const double*, bool, double*);
template void gru_step_forward_cpu<float>(int, int, const float*, int, const float*,
                                          const float*, float, float*, float*, float*);
template void gru_step_forward_cpu<double>(int, int, const double*, int, const double*,
                                           const double*, double, double*, double*, double*);
template void gru_step_backward_cpu<float>(int, int, const float*, const float*, const float*,
                                           float, float*, float*, int, float*);
template void gru_step_backward_cpu<double>(int, int, const double*, const double*,
                                            const double*, double, double*, double*, int,
                                            double*);

}  // namespace lfads
