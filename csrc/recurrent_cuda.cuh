// Building blocks of the persistent recurrent kernels (gru_cuda.cu, decoder_cuda.cu).
//
// Scheme: one thread block owns BB consecutive batch rows and runs them through all T steps, so
// no step needs a grid-wide barrier. The recurrent weights are copied into shared memory once,
// at the start, whenever they fit; a matrix that does not fit is read on every step from device
// memory, where it stays in L2 (and partly L1). A step is a few dependent matrix-vector
// products separated by __syncthreads(); in each product a thread owns one output o and keeps
// BB accumulators, one per batch row, so every weight it loads feeds BB FMAs.
//
// Every matrix is read in the layout "element (k, o) at W[k * ldw + o]", k the summed index and
// o the output: consecutive threads then load consecutive words (conflict-free shared memory,
// coalesced device memory), while the input vector x[b][k] is the same word for the whole warp
// (a shared-memory broadcast). The forward pass needs W^T in that layout and gets it from a
// transposed copy in its workspace; the backward pass multiplies by W^T and reads W as it is.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <utility>

#include "cuda_check.h"

namespace lfads {
namespace rnn_cuda {

// Threads per block never exceed this. The kernels declare __launch_bounds__(kMaxThreads, 1):
// one resident block per SM is the design (the weights fill shared memory), so the compiler may
// use up to 128 registers per thread; without the 1 it chose 64 for one sm_80 instantiation
// and spilled.
constexpr int kMaxThreads = 512;
// The batch-tile sizes BB the kernels are instantiated for (index i holds 1 << i).
constexpr int kNumTiles = 4;
constexpr int kMaxSlots = 8;

inline int align4(int n) { return (n + 3) & ~3; }

// Weight matrices of one kernel, and where each one lives.
struct WeightSlots {
  const float* global[kMaxSlots];  // the matrix in device memory, in the layout the kernel reads
  int floats[kMaxSlots];           // its size
  int smem_offset[kMaxSlots];      // float offset of its copy in shared memory, or -1: read global
  int count;
};

// acc[b] += sum_{k < K} W[k * ldw + o] * x[b * ldx + k] for the BB rows of a block.
template <int BB>
__device__ __forceinline__ void dot_cols(const float* __restrict__ W, int ldw, int o,
                                         const float* __restrict__ x, int ldx, int K,
                                         float (&acc)[BB]) {
  const float* w = W + o;
#pragma unroll 4
  for (int k = 0; k < K; ++k) {
    const float wk = w[k * ldw];
#pragma unroll
    for (int b = 0; b < BB; ++b) acc[b] = fmaf(wk, x[b * ldx + k], acc[b]);
  }
}

// Copies the slots placed in shared memory and returns, per slot, the pointer to read from
// (generic pointers: shared or device memory). The caller synchronises before the first use.
__device__ __forceinline__ void load_weights(const WeightSlots& ws, float* smem,
                                             const float* (&ptr)[kMaxSlots]) {
#pragma unroll
  for (int i = 0; i < kMaxSlots; ++i) {
    if (i >= ws.count) break;
    if (ws.smem_offset[i] >= 0) {
      float* dst = smem + ws.smem_offset[i];
      const float* src = ws.global[i];
      for (int j = threadIdx.x; j < ws.floats[i]; j += blockDim.x) dst[j] = src[j];
      ptr[i] = dst;
    } else {
      ptr[i] = ws.global[i];
    }
  }
}

// Places matrices in shared memory after `state_floats` of per-block state, largest first,
// skipping any that would exceed `limit_bytes`. Returns the dynamic shared memory in bytes, or
// 0 when not even the state fits.
inline size_t plan_weights(WeightSlots& ws, int state_floats, size_t limit_bytes) {
  size_t used = static_cast<size_t>(align4(state_floats));
  if (used * sizeof(float) > limit_bytes) return 0;
  int order[kMaxSlots];
  for (int i = 0; i < ws.count; ++i) order[i] = i;
  std::sort(order, order + ws.count, [&](int a, int b) { return ws.floats[a] > ws.floats[b]; });
  for (int j = 0; j < ws.count; ++j) {
    const int i = order[j];
    ws.smem_offset[i] = -1;
    if (ws.floats[i] == 0) continue;
    const size_t need = static_cast<size_t>(align4(ws.floats[i]));
    if ((used + need) * sizeof(float) <= limit_bytes) {
      ws.smem_offset[i] = static_cast<int>(used);
      used += need;
    }
  }
  return used * sizeof(float);
}

// How a persistent kernel is launched: tile BB = 1 << tile rows per block.
struct LaunchPlan {
  int tile = 0;      // index into the instantiations: BB = 1 << tile
  int blocks = 0;
  int threads = 0;
  size_t smem = 0;   // dynamic shared memory bytes
  WeightSlots slots;
};

// The batch tile forced by the environment variable LFADS_FAST_CUDA_TILE (1, 2, 4 or 8), for
// tests and benchmarks of every instantiation; 0 when unset.
inline int forced_tile() {
  const char* v = std::getenv("LFADS_FAST_CUDA_TILE");
  if (!v || !*v) return 0;
  const int bb = std::atoi(v);
  LFADS_CUDA_REQUIRE(bb == 1 || bb == 2 || bb == 4 || bb == 8,
                     std::string("LFADS_FAST_CUDA_TILE must be 1, 2, 4 or 8, got '") + v + "'");
  return bb;
}

// Chooses the smallest batch tile whose blocks are all resident at once (a persistent kernel
// whose blocks ran in several waves would take several times as long); with more rows than
// that even at the largest tile, the largest tile. `state_floats(bb)` is the per-block state of
// a tile of bb rows.
// Multiprocessor count and per-block shared-memory limit of a device, queried once: planning
// runs on every call and should cost microseconds, not driver round trips.
struct DeviceLimits {
  int sms = 0, smem_optin = 0;
};

inline DeviceLimits device_limits(int device) {
  static std::mutex mu;
  static std::map<int, DeviceLimits> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceLimits l;
  LFADS_CUDA_CHECK(cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, device));
  LFADS_CUDA_CHECK(
      cudaDeviceGetAttribute(&l.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cache[device] = l;
  return l;
}

// Raises a kernel's dynamic shared-memory limit to the device's maximum, once per device (the
// attribute belongs to the kernel in that device's context).
template <typename Kernel>
void allow_max_smem(Kernel kernel, int device, int bytes) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  if (done.count(key)) return;
  LFADS_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.insert(key);
}

template <typename Kernel, typename StateFloats>
LaunchPlan plan_launch(const Kernel (&kernels)[kNumTiles], int B, int threads,
                       const WeightSlots& slots, StateFloats state_floats) {
  const int forced = forced_tile();
  int device = 0;
  LFADS_CUDA_CHECK(cudaGetDevice(&device));
  const DeviceLimits lim = device_limits(device);
  const int sms = lim.sms, optin = lim.smem_optin;
  LaunchPlan best;
  bool have = false;
  for (int i = 0; i < kNumTiles; ++i) {
    const int bb = 1 << i;
    if (forced && bb != forced) continue;
    LaunchPlan p;
    p.tile = i;
    p.threads = threads;
    p.blocks = (B + bb - 1) / bb;
    p.slots = slots;
    p.smem = plan_weights(p.slots, state_floats(bb), static_cast<size_t>(optin));
    if (p.smem == 0) break;  // larger tiles need even more state
    allow_max_smem(kernels[i], device, optin);
    int per_sm = 0;
    LFADS_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernels[i], threads, p.smem));
    if (per_sm == 0) continue;
    best = p;
    have = true;
    if (p.blocks <= per_sm * sms) break;
  }
  LFADS_CUDA_REQUIRE(have, "no launch configuration fits this device (sizes too large)");
  return best;
}

// dst[c][r] = src[r][c] for up to kMaxSlots matrices in one launch (the forward kernels' W^T).
struct TransposeJobs {
  const float* src[kMaxSlots];  // [rows, cols]
  float* dst[kMaxSlots];        // [cols, rows]
  int rows[kMaxSlots], cols[kMaxSlots];
  int count;
};

constexpr int kTransposeTile = 32;

static __global__ void transpose_kernel(TransposeJobs jobs) {
  __shared__ float tile[kTransposeTile][kTransposeTile + 1];  // +1: no bank conflicts
  const int j = blockIdx.z;
  const int rows = jobs.rows[j], cols = jobs.cols[j];
  const int c0 = blockIdx.x * kTransposeTile, r0 = blockIdx.y * kTransposeTile;
  if (r0 >= rows || c0 >= cols) return;  // whole block leaves: the grid covers the largest job
  for (int dy = threadIdx.y; dy < kTransposeTile; dy += blockDim.y) {
    const int r = r0 + dy, c = c0 + threadIdx.x;
    if (r < rows && c < cols)
      tile[dy][threadIdx.x] = jobs.src[j][static_cast<int64_t>(r) * cols + c];
  }
  __syncthreads();
  for (int dy = threadIdx.y; dy < kTransposeTile; dy += blockDim.y) {
    const int c = c0 + dy, r = r0 + threadIdx.x;
    if (r < rows && c < cols)
      jobs.dst[j][static_cast<int64_t>(c) * rows + r] = tile[threadIdx.x][dy];
  }
}

inline void transpose_all(const TransposeJobs& jobs, cudaStream_t stream) {
  int max_r = 0, max_c = 0;
  for (int j = 0; j < jobs.count; ++j) {
    max_r = std::max(max_r, jobs.rows[j]);
    max_c = std::max(max_c, jobs.cols[j]);
  }
  if (jobs.count == 0 || max_r == 0 || max_c == 0) return;
  const dim3 grid((max_c + kTransposeTile - 1) / kTransposeTile,
                  (max_r + kTransposeTile - 1) / kTransposeTile, jobs.count);
  transpose_kernel<<<grid, dim3(kTransposeTile, 8), 0, stream>>>(jobs);
  LFADS_CUDA_CHECK(cudaGetLastError());
}

inline int round_threads(int outputs) {
  const int t = (outputs + 31) / 32 * 32;
  return std::max(64, std::min(kMaxThreads, t));
}

}  // namespace rnn_cuda
}  // namespace lfads
