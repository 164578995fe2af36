// Fused Adam(W) step on the CPU, two passes over the flat vector: the global gradient norm
// (summed in double so that float32 gradients of millions of parameters do not lose it), then
// the elementwise update with the clipping factor folded in. Both passes are OpenMP loops; small
// vectors stay on one thread, where starting the team would cost more than the work.
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "adam.h"

namespace lfads {

namespace {

constexpr int64_t kParallelMin = 1 << 15;  // elements below which one thread does it all

template <typename S>
struct Coefficients {
  S clip, decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, inv_sqrt_bc2, eps;
};

// The update of every element (Masked = false) or of those with mask[i] != 0. Frozen entries
// keep their values through a select rather than a branch, and the arrays are local restrict
// pointers, so that the loop vectorises.
template <typename S, bool Masked>
void update(int64_t n, int nt, const Coefficients<S>& k, S* __restrict params,
            const S* __restrict grads, S* __restrict m, S* __restrict v,
            const uint8_t* __restrict mask) {
#pragma omp parallel for simd num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const S g = k.clip * grads[i];
    const S m_new = k.beta1 * m[i] + k.one_minus_beta1 * g;
    const S v_new = k.beta2 * v[i] + k.one_minus_beta2 * g * g;
    const S p_new =
        params[i] * k.decay - k.step_size * m_new / (std::sqrt(v_new) * k.inv_sqrt_bc2 + k.eps);
    if (Masked) {
      const bool train = mask[i] != 0;
      m[i] = train ? m_new : m[i];
      v[i] = train ? v_new : v[i];
      params[i] = train ? p_new : params[i];
    } else {
      m[i] = m_new;
      v[i] = v_new;
      params[i] = p_new;
    }
  }
}

}  // namespace

template <typename S>
void adam_step_cpu(const AdamShape& s, const AdamArgs<S>& a) {
  const int64_t n = s.n;
  const int nt = n < kParallelMin ? 1 : omp_get_max_threads();

  const S* grads = a.grads;
  double sumsq = 0;
#pragma omp parallel for simd num_threads(nt) reduction(+ : sumsq) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const double g = grads[i];
    sumsq += g * g;
  }
  const double norm = std::sqrt(sumsq);
  *a.grad_norm = S(norm);
  if (!std::isfinite(norm)) return;  // a NaN/inf gradient: the step is skipped, state untouched

  const double clip = a.max_grad_norm > 0 ? std::min(1.0, a.max_grad_norm / (norm + 1e-6)) : 1.0;
  const double bc1 = 1.0 - std::pow(a.beta1, static_cast<double>(a.step));
  const double bc2 = 1.0 - std::pow(a.beta2, static_cast<double>(a.step));
  const Coefficients<S> k{S(clip),
                          S(1.0 - a.lr * a.weight_decay),
                          S(a.beta1),
                          S(a.beta2),
                          S(1.0 - a.beta1),
                          S(1.0 - a.beta2),
                          S(a.lr / bc1),
                          S(1.0 / std::sqrt(bc2)),
                          S(a.eps)};
  if (a.mask)
    update<S, true>(n, nt, k, a.params, grads, a.m, a.v, a.mask);
  else
    update<S, false>(n, nt, k, a.params, grads, a.m, a.v, nullptr);
}

template void adam_step_cpu<float>(const AdamShape&, const AdamArgs<float>&);
template void adam_step_cpu<double>(const AdamShape&, const AdamArgs<double>&);

}  // namespace lfads
