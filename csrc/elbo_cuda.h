// CUDA entry points of the ELBO terms; the contracts are elbo.h's, in float32, with the
// differences written at each function. All pointers are device memory; every call only
// enqueues work on `stream` (no host synchronisation). Sums are reduced in a fixed order
// (per-block partials, then one final block, in double), so results are deterministic.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "elbo.h"

namespace lfads {

// Workspace of poisson_elbo_cuda: per-block column partials of the NLL and of the log-rate
// gradient, [T, ceil(B/32), N] float each, and their sums over the batch, [T, N] float each.
size_t poisson_elbo_cuda_workspace_size(const ElboShape& s);

// Read-out GEMM (log_rates = factors W_ro^T + b_ro) with the exp, the Poisson NLL and its
// gradient in the epilogue. Writes loss, and log_rates / nll_tn where not nullptr. Gradients
// are requested by a non-null d_log_rates ([R, N]: d loss / d log_rate, i.e.
// scale * weight * grad_mask * (rate - count), 0 on missing bins); then d_b_ro is written too.
// a.d_factors and a.d_W_ro must be nullptr: they are the products d_log_rates W_ro and
// d_log_rates^T factors, which the caller does with cuBLAS (lfads_fast/weight_grads.py).
void poisson_elbo_cuda(const ElboShape& s, const ElboArgs<float>& a, float* d_log_rates,
                       void* workspace, cudaStream_t stream);

// Workspace of kl_ic_cuda: per-column KL sums, [D] double.
size_t kl_ic_cuda_workspace_size(const KlIcShape& s);
void kl_ic_cuda(const KlIcShape& s, const KlIcArgs<float>& a, void* workspace,
                cudaStream_t stream);

// Workspace of kl_co_cuda: per-(b, u) sums of the KL and of the two prior gradients,
// [3, B, U] double.
size_t kl_co_cuda_workspace_size(const KlCoShape& s);
void kl_co_cuda(const KlCoShape& s, const KlCoArgs<float>& a, void* workspace,
                cudaStream_t stream);

}  // namespace lfads
