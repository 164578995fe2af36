// The clipped GRU cell of LFADS, written once for host and device code.
//
// One step, per unit j (gate order z, r, n; xz, xr, xn include the input bias b_ih; the
// recurrent product has no bias):
//   z = sigmoid(xz + (W_hz h)_j)        r = sigmoid(xr + (W_hr h)_j)
//   n = tanh(xn + (W_hn (r * h))_j)     h'_j = clip(z h_j + (1 - z) n, -clip, clip)
// The reset gate multiplies h BEFORE the recurrent product, so a step is two dependent
// products: [z, r] from h, then n from r * h. The backward mirrors this in two phases.
// clip's derivative follows torch.clamp: the gradient passes where -clip <= pre <= clip.
#pragma once

#include <cmath>

#include "common.h"
#if !defined(__CUDA_ARCH__)
#include "fast_math.h"
#endif

namespace lfads {

template <typename S>
LFADS_HD inline S lf_exp(S x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return std::exp(x);
#endif
}

#if !defined(__CUDA_ARCH__)
// float on the CPU: the vectorisable exp (float32 training does not need glibc's last ulp);
// double keeps the library functions for the gradient checks.
template <>
inline float lf_exp<float>(float x) {
  return fast_expf(x);
}
#endif

template <typename S>
LFADS_HD inline S lf_tanh(S x) {
#if defined(__CUDA_ARCH__)
  return tanh(x);
#else
  return std::tanh(x);
#endif
}

#if !defined(__CUDA_ARCH__)
// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): absolute error ~1e-7.
template <>
inline float lf_tanh<float>(float x) {
  const float e = fast_expf(-2.0f * (x < 0 ? -x : x));
  const float t = (1.0f - e) / (1.0f + e);
  return x < 0 ? -t : t;
}
#endif

template <typename S>
LFADS_HD inline S sigmoid(S x) {
  return S(1) / (S(1) + lf_exp(-x));
}

// Forward, phase 1: a z or r gate from its two pre-activation parts.
template <typename S>
LFADS_HD inline S gru_gate(S x_part, S h_part) {
  return sigmoid(x_part + h_part);
}

// Forward, phase 2: candidate n and the new (clipped) state. Writes n, returns h'.
template <typename S>
LFADS_HD inline S gru_update(S z, S xn, S hn, S h, S clip, S* n_out) {
  const S n = lf_tanh(xn + hn);
  *n_out = n;
  const S pre = z * h + (S(1) - z) * n;
  return pre > clip ? clip : (pre < -clip ? -clip : pre);
}

// Backward, phase 1. dh_new: total gradient on h'. Gives the gradients of the z and n
// pre-activations and the part of dh that flows straight through z * h.
template <typename S>
LFADS_HD inline void gru_backward_update(S dh_new, S z, S n, S h, S clip, S* dz_pre, S* dn_pre,
                                         S* dh_direct) {
  const S pre = z * h + (S(1) - z) * n;
  const S g = (pre >= -clip && pre <= clip) ? dh_new : S(0);
  *dz_pre = g * (h - n) * z * (S(1) - z);
  *dn_pre = g * (S(1) - z) * (S(1) - n * n);
  *dh_direct = g * z;
}

// Backward, phase 2. d_rh: gradient on (r * h)_j, i.e. (W_hn^T dn_pre)_j. Gives the gradient
// of the r pre-activation and the part of dh that flows through r * h.
template <typename S>
LFADS_HD inline void gru_backward_reset(S d_rh, S r, S h, S* dr_pre, S* dh_reset) {
  *dr_pre = d_rh * h * r * (S(1) - r);
  *dh_reset = d_rh * r;
}

}  // namespace lfads
