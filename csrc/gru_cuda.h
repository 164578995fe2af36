// CUDA entry points of the clipped-GRU sequence op; the contract is gru.h's, in float32, with
// the differences written at each function. All pointers are device memory; every call only
// enqueues work on `stream` (no host synchronisation).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "gru.h"

namespace lfads {

// Device workspace of gru_forward_cuda: a transposed copy of W_hh in the layout the persistent
// kernel reads (recurrent_cuda.cuh), as [W_hz; W_hr]^T [H, 2H] and W_hn^T [H, H] float, each
// rounded up to 16 bytes: about 12 * H * H bytes.
size_t gru_forward_cuda_workspace_size(const GruShape& s);

// Writes hs and gates. workspace: gru_forward_cuda_workspace_size(s) bytes, aliasing nothing.
void gru_forward_cuda(const GruShape& s, const GruForwardArgs<float>& a, void* workspace,
                      cudaStream_t stream);

// Writes d_xproj (first 3H columns of each row), d_h0 and a.work = r * h_prev of every step
// ([T, B, H], the right operand of the W_hn gradient). a.d_W_hh must be nullptr: the weight
// gradient is a large reduction over T * B rows that the caller does with one GEMM per gate
// group (cuBLAS through CuPy; lfads_fast/weight_grads.py has the formula, the same as
// gru_weight_grad_cpu).
void gru_backward_cuda(const GruShape& s, const GruBackwardArgs<float>& a, cudaStream_t stream);

}  // namespace lfads
