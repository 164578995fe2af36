// The evidence lower bound's terms: Poisson reconstruction through the read-out (fused GEMM,
// exp, NLL and gradient), the initial-condition KL, the inferred-input KL against the AR(1)
// prior. Rows R = T * B are time-major (row = t * B + b).
#pragma once

#include "common.h"

namespace lfads {

struct ElboShape {
  int T, B;  // R = T * B rows
  int F, N;  // factors, neurons
};

template <typename S>
struct ElboArgs {
  const S* factors;      // [R, F]
  const S* W_ro;         // [N, F]
  const S* b_ro;         // [N]
  const S* counts;       // [R, N]  spike counts; NaN = missing bin (no loss, no gradient)
  const S* loss_weight;  // [R, N]  multiplies each bin's NLL and its gradient, or nullptr
  const S* grad_mask;    // [R, N]  0 blocks a bin's gradient while its loss still counts, or nullptr
  S scale;               // loss = scale * sum over bins of weight * nll
  // outputs
  S* loss;               // [1]
  S* log_rates;          // [R, N] or nullptr (written for missing bins too)
  S* nll_tn;             // [T, N] sum over the batch of weight * nll (unscaled), or nullptr
  S* d_factors;          // [R, F] or nullptr: no gradients at all when nullptr
  S* d_W_ro;             // [N, F]  overwritten, not accumulated (as every gradient output here)
  S* d_b_ro;             // [N]
};

// nll = exp(x) - y * x + lgamma(y + 1), x the log-rate.
template <typename S>
void poisson_elbo_cpu(const ElboShape& s, const ElboArgs<S>& a);

struct KlIcShape {
  int B, D;  // batch (>= 1: the KL is a mean over it), ic_dim
};

template <typename S>
struct KlIcArgs {
  const S* mean;          // [B, D] posterior mean
  const S* logvar;        // [B, D] posterior log-variance before the floor
  const S* prior_mean;    // [D]
  const S* prior_logvar;  // [D]
  S var_min;              // posterior variance = exp(logvar) + var_min
  S scale;                // kl = scale * mean over b of sum over d of KL
  S* kl;                  // [1] out
  S* d_mean;              // [B, D] out, or nullptr (no gradients)
  S* d_logvar;            // [B, D] out
  S* d_prior_mean;        // [D] out
};
template <typename S>
void kl_ic_cpu(const KlIcShape& s, const KlIcArgs<S>& a);

struct KlCoShape {
  int T, B, U;  // B >= 1
};

template <typename S>
struct KlCoArgs {
  const S* mean;     // [T, B, U] posterior means of the inferred inputs
  const S* logvar;   // [T, B, U] posterior log-variances
  const S* eps;      // [T, B, U] noise of the KL's own sample x = mean + exp(logvar/2) * eps
  const S* logtau;   // [U] AR(1) prior: alpha = exp(-1 / exp(logtau))
  const S* lognvar;  // [U] AR(1) process noise log-variance
  S scale;           // kl = scale * mean over b of sum over t, u of (log q(x) - log p(x))
  S* kl;             // [1] out
  S* d_mean;         // [T, B, U] out, or nullptr (no gradients)
  S* d_logvar;       // [T, B, U] out
  S* d_logtau;       // [U] out
  S* d_lognvar;      // [U] out
};
template <typename S>
void kl_co_cpu(const KlCoShape& s, const KlCoArgs<S>& a);

}  // namespace lfads
