// CUDA entry point of the fused Adam(W) step; the contract is adam.h's, in float32. All pointers
// are device memory; the call only enqueues work on `stream`: the gradient norm is reduced and
// tested on the device, so a skipped (non-finite) step needs no host synchronisation.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "adam.h"

namespace lfads {

// Workspace: one double per block of the norm kernel (adam_cuda_workspace_size bytes; the grid
// size depends on the current device's multiprocessor count).
size_t adam_cuda_workspace_size(const AdamShape& s);

void adam_step_cuda(const AdamShape& s, const AdamArgs<float>& a, void* workspace,
                    cudaStream_t stream);

}  // namespace lfads
