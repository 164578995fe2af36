// CUDA entry points of the fused LFADS decoder; the contract is decoder.h's, in float32, with
// the differences written at each function. All pointers are device memory; every call only
// enqueues work on `stream` (no host synchronisation).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "decoder.h"

namespace lfads {

// Device workspace of decoder_forward_cuda: transposed copies of the weights in the layout the
// persistent kernel reads (recurrent_cuda.cuh): W_con_f^T [F, 3C], [W_con_hz; W_con_hr]^T
// [C, 2C], W_con_hn^T [C, C], W_co^T [C, 2U], W_gen_u^T [U, 3G], [W_gen_hz; W_gen_hr]^T [G, 2G],
// W_gen_hn^T [G, G], W_fac^T [G, F] float, each rounded up to 16 bytes.
size_t decoder_forward_cuda_workspace_size(const DecoderShape& s);

// One persistent kernel for all T steps. workspace: decoder_forward_cuda_workspace_size(s)
// bytes, aliasing nothing. Requires T >= 1.
void decoder_forward_cuda(const DecoderShape& s, const DecoderForwardArgs<float>& a,
                          void* workspace, cudaStream_t stream);

// Per-step values the backward kernel writes for the weight gradients, which the caller reduces
// over all T * B rows with one GEMM each (lfads_fast/weight_grads.py):
//   d_W_fac    = d_factors_total^T (gen_states * mask_g)
//   d_W_gen_hh = GRU weight gradient of (d_xgen, gen_states, g0, rh_gen)
//   d_W_gen_u  = d_xgen[:, :3G]^T u
//   d_W_co     = d_co^T con_states,   d_b_co = column sums of d_co
//   d_W_con_hh = GRU weight gradient of (d_xcon, con_states, c0, rh_con)
//   d_W_con_f  = d_xcon[:, :3C]^T (f_{t-1} * mask_f_t),  f_{-1} = f0
struct DecoderBackwardCudaWork {
  float* d_factors_total;  // [T, B, F]  out: total gradient on f_t (read-out + controller at t+1)
  float* d_co;             // [T, B, 2U] out: gradient on [co_mean_t, co_logvar_t]; unused if C == 0
  float* rh_gen;           // [T, B, G]  out: r_t * g_{t-1} of the generator
  float* rh_con;           // [T, B, C]  out: r_t * c_{t-1} of the controller; unused if C == 0
};

// One persistent kernel for the whole BPTT. Writes d_xcon, d_c0, d_xgen, d_g0, d_f0 and the
// `work` outputs; the weight-gradient fields of `a` (d_W_con_f, d_W_con_hh, d_W_co, d_b_co,
// d_W_gen_u, d_W_gen_hh, d_W_fac) must be nullptr. Needs no workspace: the weights are read in
// their own layout. Requires T >= 1.
void decoder_backward_cuda(const DecoderShape& s, const DecoderBackwardArgs<float>& a,
                           const DecoderBackwardCudaWork& work, cudaStream_t stream);

}  // namespace lfads
