// Fused Adam(W) step over one flat parameter vector, with global gradient-norm clipping.
//   norm = ||g||_2 over all n elements, frozen ones included (give them zero gradients to keep
//   them out of the norm);  if !isfinite(norm): nothing but grad_norm is changed (the caller
//   counts a skipped step).  c = min(1, max_grad_norm / (norm + 1e-6)) when max_grad_norm > 0.
//   For each i with mask[i] != 0 (all when mask is null):
//     p -= lr * weight_decay * p                      (decoupled, as torch.optim.AdamW)
//     m = beta1 m + (1 - beta1) c g;  v = beta2 v + (1 - beta2) (c g)^2
//     p -= lr * (m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps)
#pragma once

#include <cstdint>

#include "common.h"

namespace lfads {

struct AdamShape {
  int64_t n;
};

template <typename S>
struct AdamArgs {
  S* params;            // [n] updated in place
  const S* grads;       // [n]
  S* m;                 // [n] first moment
  S* v;                 // [n] second moment
  const uint8_t* mask;  // [n] 0 = frozen, or nullptr
  double lr, beta1, beta2, eps, weight_decay, max_grad_norm;
  int64_t step;         // 1-based count including this step
  S* grad_norm;         // [1] out: the norm before clipping
};

template <typename S>
void adam_step_cpu(const AdamShape& s, const AdamArgs<S>& a);

}  // namespace lfads
