// ELBO terms on the CPU.
// Poisson reconstruction: OpenMP threads own contiguous ranges of time steps, so each row of
// nll_tn has a single writer. A step's rows go in blocks through the read-out GEMM, exp, NLL
// and its gradient, then d_factors is a second GEMM on the block while d_W_ro and d_b_ro
// accumulate per thread. Per-thread partial sums are reduced in thread order at the end, so the
// result does not depend on which thread finished first.
// KL terms: elementwise and small; threads split the batch. Problems too small to repay
// starting a thread team stay on one thread.
// Losses and bias gradients are summed in double whatever S is: they add up T * B * N terms.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "elbo.h"
#include "gru_cell.h"  // lf_exp

namespace lfads {

namespace {

constexpr int kRowBlock = 64;           // rows per read-out block: its [rows, N] logits stay in L2
constexpr int kLogFactorialSize = 1024;  // counts below this use the table
constexpr int64_t kParallelMin = 1 << 14;  // bins or KL elements below which one thread does all

// log(k!) for k < kLogFactorialSize: spike counts are almost always small integers, and a table
// read is far cheaper than lgamma. Built once, thread-safely (function-local static).
const double* log_factorial_table() {
  static const std::vector<double> table = [] {
    std::vector<double> t(kLogFactorialSize);
    for (int k = 0; k < kLogFactorialSize; ++k) t[k] = std::lgamma(k + 1.0);
    return t;
  }();
  return table.data();
}

// lgamma(y + 1) for a count y (not NaN).
inline double log_factorial(double y, const double* table) {
  if (y >= 0 && y < kLogFactorialSize && y == std::floor(y)) return table[static_cast<int>(y)];
  return std::lgamma(y + 1.0);
}

int threads_for(int parallel_items, int64_t elements) {
  if (elements < kParallelMin) return 1;
  return std::max(1, std::min(omp_get_max_threads(), parallel_items));
}

}  // namespace

// Poisson reconstruction

template <typename S>
void poisson_elbo_cpu(const ElboShape& s, const ElboArgs<S>& a) {
  const int T = s.T, B = s.B, F = s.F, N = s.N;
  const bool grads = a.d_factors != nullptr;
  const double* lfact = log_factorial_table();
  const int nt = threads_for(T, static_cast<int64_t>(T) * B * N);
  const int64_t NF = static_cast<int64_t>(N) * F;
  std::vector<double> loss_part(nt, 0.0);                             // [nt]
  std::vector<S> dW_part(grads ? static_cast<size_t>(nt * NF) : 0);   // [nt, N, F]
  std::vector<double> db_part(grads ? static_cast<size_t>(nt) * N : 0);  // [nt, N]
#pragma omp parallel num_threads(nt)
  {
    const int p = omp_get_thread_num();
    int t0, t1;
    split_range(T, nt, p, t0, t1);
    const int rb = std::max(1, std::min(B, kRowBlock));
    std::vector<S> x(static_cast<size_t>(rb) * N);  // [rb, N] log-rates, then their gradient
    std::vector<double> nll_t(N);                   // [N] this step's sum over the batch
    std::vector<S> rates(N);                        // [N] exp of one row's log-rates
    S* dW = grads ? dW_part.data() + p * NF : nullptr;
    double* db = grads ? db_part.data() + static_cast<int64_t>(p) * N : nullptr;
    if (grads) std::fill(dW, dW + NF, S(0));
    double loss = 0;
    for (int t = t0; t < t1; ++t) {
      std::fill(nll_t.begin(), nll_t.end(), 0.0);
      for (int b0 = 0; b0 < B; b0 += rb) {
        const int Bs = std::min(rb, B - b0);
        const int64_t row = static_cast<int64_t>(t) * B + b0;
        const S* f = a.factors + row * F;  // [Bs, F]
        for (int i = 0; i < Bs; ++i) std::copy(a.b_ro, a.b_ro + N, x.data() + i * N);
        gemm<S>(false, true, Bs, N, F, S(1), f, F, a.W_ro, F, S(1), x.data(), N);
        if (a.log_rates) std::copy(x.data(), x.data() + Bs * N, a.log_rates + row * N);
        for (int i = 0; i < Bs; ++i) {
          const int64_t o = (row + i) * N;
          S* xi = x.data() + i * N;
          // exp in its own loop so that it vectorises (lf_exp<float> is branch-free).
#pragma omp simd
          for (int n = 0; n < N; ++n) rates[n] = lf_exp(xi[n]);
          for (int n = 0; n < N; ++n) {
            const S y = a.counts[o + n];
            S g = 0;
            if (!std::isnan(y)) {
              const S rate = rates[n];
              const S w = a.loss_weight ? a.loss_weight[o + n] : S(1);
              nll_t[n] += static_cast<double>(w) *
                          (static_cast<double>(rate) - static_cast<double>(y) * xi[n] +
                           log_factorial(y, lfact));
              g = a.scale * w * (rate - y);
              if (a.grad_mask) g *= a.grad_mask[o + n];
            }
            xi[n] = g;
          }
        }
        if (grads) {
          for (int i = 0; i < Bs; ++i)
            for (int n = 0; n < N; ++n) db[n] += x[i * N + n];
          gemm<S>(false, false, Bs, F, N, S(1), x.data(), N, a.W_ro, F, S(0),
                  a.d_factors + row * F, F);
          gemm<S>(true, false, N, F, Bs, S(1), x.data(), N, f, F, S(1), dW, F);
        }
      }
      for (int n = 0; n < N; ++n) loss += nll_t[n];
      if (a.nll_tn)
        for (int n = 0; n < N; ++n) a.nll_tn[static_cast<int64_t>(t) * N + n] = S(nll_t[n]);
    }
    loss_part[p] = loss;
    if (grads) {
#pragma omp barrier
      // Every thread sums its slice of the weight gradient over all the partials.
      int e0, e1;
      split_range(static_cast<int>(NF), nt, p, e0, e1);
      for (int e = e0; e < e1; ++e) {
        double acc = 0;
        for (int q = 0; q < nt; ++q) acc += dW_part[q * NF + e];
        a.d_W_ro[e] = S(acc);
      }
      split_range(N, nt, p, e0, e1);
      for (int n = e0; n < e1; ++n) {
        double acc = 0;
        for (int q = 0; q < nt; ++q) acc += db_part[static_cast<int64_t>(q) * N + n];
        a.d_b_ro[n] = S(acc);
      }
    }
  }
  double total = 0;
  for (int q = 0; q < nt; ++q) total += loss_part[q];
  *a.loss = S(static_cast<double>(a.scale) * total);
}

// Initial-condition KL

template <typename S>
void kl_ic_cpu(const KlIcShape& s, const KlIcArgs<S>& a) {
  const int B = s.B, D = s.D;
  const double c = static_cast<double>(a.scale) / B;  // scale times the mean over the batch
  const double var_min = a.var_min;
  double kl = 0;
  const int nt = threads_for(B, static_cast<int64_t>(B) * D);
#pragma omp parallel for num_threads(nt) reduction(+ : kl) schedule(static)
  for (int b = 0; b < B; ++b) {
    for (int d = 0; d < D; ++d) {
      const int64_t i = static_cast<int64_t>(b) * D + d;
      const double prior_lv = a.prior_logvar[d];
      const double prior_var = std::exp(prior_lv);
      const double ev = std::exp(static_cast<double>(a.logvar[i]));
      const double var = ev + var_min;
      const double diff = static_cast<double>(a.mean[i]) - a.prior_mean[d];
      kl += 0.5 * (prior_lv - std::log(var) + (var + diff * diff) / prior_var - 1.0);
      if (a.d_mean) {
        a.d_mean[i] = S(c * diff / prior_var);
        a.d_logvar[i] = S(c * 0.5 * (1.0 / prior_var - 1.0 / var) * ev);
      }
    }
  }
  *a.kl = S(c * kl);
  if (a.d_mean) {
    // d/d prior_mean = -sum over the batch of d/d mean.
    for (int d = 0; d < D; ++d) {
      double acc = 0;
      for (int b = 0; b < B; ++b) acc += a.d_mean[static_cast<int64_t>(b) * D + d];
      a.d_prior_mean[d] = S(-acc);
    }
  }
}

// Inferred-input KL against the AR(1) prior
//
// Per (b, u), with x_t = mean_t + sd_t eps_t, sd_t = exp(logvar_t / 2):
//   log q(x) - log p(x) = sum_t [-logvar_t/2 - eps_t^2/2]
//                       - [-log(v_0)/2 - e_0^2 / (2 v_0)] - sum_{t>=1} [-log(nvar)/2 - e_t^2 / (2 nvar)]
//   (the log(2 pi) terms cancel), e_0 = x_0, v_0 = nvar / (1 - alpha^2), e_t = x_t - alpha x_{t-1}.
// log q does not depend on mean through x (its derivatives via x and via the mean cancel), so
// d/d mean_t = gx_t and d/d logvar_t = -1/2 + gx_t sd_t eps_t / 2 with
//   gx_t = dKL/dx_t = e_t / v_t - alpha e_{t+1} / nvar   (the second term for t < T-1).
// Both variances scale with nvar: d/d lognvar of each t term is 1/2 - e_t^2 / (2 v_t).
// d alpha / d logtau = alpha / tau, and d log p / d alpha is
//   -alpha / (1 - alpha^2) + alpha x_0^2 / nvar  (t = 0),   e_t x_{t-1} / nvar  (t >= 1).

template <typename S>
void kl_co_cpu(const KlCoShape& s, const KlCoArgs<S>& a) {
  const int T = s.T, B = s.B, U = s.U;
  const bool grads = a.d_mean != nullptr;
  const double c = static_cast<double>(a.scale) / B;
  std::vector<double> alpha(U), nvar(U), var0(U), tau(U);  // [U] each
  for (int u = 0; u < U; ++u) {
    tau[u] = std::exp(static_cast<double>(a.logtau[u]));
    alpha[u] = std::exp(-1.0 / tau[u]);
    nvar[u] = std::exp(static_cast<double>(a.lognvar[u]));
    var0[u] = nvar[u] / (1.0 - alpha[u] * alpha[u]);
  }
  const int nt = threads_for(B, static_cast<int64_t>(T) * B * U);
  const int W = 1 + 2 * U;  // partial sums of one thread: kl, dlogp/dalpha [U], dKL/dlognvar [U]
  std::vector<double> part(static_cast<size_t>(nt) * W, 0.0);  // [nt, W]
#pragma omp parallel num_threads(nt)
  {
    const int p = omp_get_thread_num();
    int b0, b1;
    split_range(B, nt, p, b0, b1);
    double* kl = part.data() + static_cast<int64_t>(p) * W;
    double* dlogp_dalpha = kl + 1;   // [U]
    double* dkl_dlognvar = kl + 1 + U;  // [U]
    // State carried from step t-1 to t, per u.
    std::vector<double> x_prev(U), gx_prev(U), dx_prev(U);  // dx: dx/dlogvar = sd eps / 2
    for (int b = b0; b < b1; ++b) {
      for (int t = 0; t < T; ++t) {
        const int64_t row = (static_cast<int64_t>(t) * B + b) * U;
        const int64_t row_prev = row - static_cast<int64_t>(B) * U;
        for (int u = 0; u < U; ++u) {
          const double lv = a.logvar[row + u], ep = a.eps[row + u];
          const double sd = std::exp(0.5 * lv);
          const double x = a.mean[row + u] + sd * ep;
          const double e = t == 0 ? x : x - alpha[u] * x_prev[u];
          const double v = t == 0 ? var0[u] : nvar[u];
          kl[0] += -0.5 * lv - 0.5 * ep * ep + 0.5 * std::log(v) + 0.5 * e * e / v;
          dkl_dlognvar[u] += 0.5 - 0.5 * e * e / v;
          if (t == 0) {
            const double al = alpha[u];
            dlogp_dalpha[u] += -al / (1.0 - al * al) + al * x * x / nvar[u];
          } else {
            dlogp_dalpha[u] += e * x_prev[u] / nvar[u];
          }
          if (grads) {
            if (t > 0) {  // x_{t-1}'s gradient is complete once e_t is known
              const double g = gx_prev[u] - alpha[u] * e / nvar[u];
              a.d_mean[row_prev + u] = S(c * g);
              a.d_logvar[row_prev + u] = S(c * (-0.5 + g * dx_prev[u]));
            }
            gx_prev[u] = e / v;
            dx_prev[u] = 0.5 * sd * ep;
          }
          x_prev[u] = x;
        }
      }
      if (grads && T > 0) {
        const int64_t row_last = (static_cast<int64_t>(T - 1) * B + b) * U;
        for (int u = 0; u < U; ++u) {
          a.d_mean[row_last + u] = S(c * gx_prev[u]);
          a.d_logvar[row_last + u] = S(c * (-0.5 + gx_prev[u] * dx_prev[u]));
        }
      }
    }
  }
  std::vector<double> total(W, 0.0);  // [W]
  for (int q = 0; q < nt; ++q)
    for (int k = 0; k < W; ++k) total[k] += part[static_cast<int64_t>(q) * W + k];
  *a.kl = S(c * total[0]);
  if (grads) {
    for (int u = 0; u < U; ++u) {
      a.d_logtau[u] = S(-c * (alpha[u] / tau[u]) * total[1 + u]);
      a.d_lognvar[u] = S(c * total[1 + U + u]);
    }
  }
}

template void poisson_elbo_cpu<float>(const ElboShape&, const ElboArgs<float>&);
template void poisson_elbo_cpu<double>(const ElboShape&, const ElboArgs<double>&);
template void kl_ic_cpu<float>(const KlIcShape&, const KlIcArgs<float>&);
template void kl_ic_cpu<double>(const KlIcShape&, const KlIcArgs<double>&);
template void kl_co_cpu<float>(const KlCoShape&, const KlCoArgs<float>&);
template void kl_co_cpu<double>(const KlCoShape&, const KlCoArgs<double>&);

}  // namespace lfads
