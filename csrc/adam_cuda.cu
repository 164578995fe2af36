// Fused multi-tensor Adam(W) on one flat parameter vector. Two launches: the first writes one
// partial sum of squares per block; the second has every block add those partials up again (a
// few hundred doubles, cheaper than a third launch or a grid-wide barrier), so that all blocks
// agree on the norm, skip the step together when it is not finite, and otherwise update their
// grid-stride share of the elements. The order of the sums is fixed: results are deterministic.
#define LFADS_CUDA_OP "adam"
#include <cmath>

#include "adam_cuda.h"
#include "cuda_check.h"

namespace lfads {

namespace {

constexpr int kThreads = 256;

int norm_blocks(int64_t n) {
  int device = 0, sms = 0;
  LFADS_CUDA_CHECK(cudaGetDevice(&device));
  LFADS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t needed = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, 2 * sms)));
}

__device__ double block_sum(double v, double* s_warp /* [32] */) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) s_warp[warp] = v;
  __syncthreads();
  v = 0.0;
  if (warp == 0) {
    v = lane < (kThreads / 32) ? s_warp[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

__global__ void __launch_bounds__(kThreads)
    adam_norm_kernel(int64_t n, const float* __restrict__ grads, double* partial) {
  __shared__ double s_warp[32];
  double s = 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const double g = grads[i];
    s += g * g;
  }
  s = block_sum(s, s_warp);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

struct AdamParams {
  int64_t n;
  int partials;
  float* params;
  const float* grads;
  float* m;
  float* v;
  const uint8_t* mask;
  float lr, beta1, beta2, eps, weight_decay, max_grad_norm;
  float bias1, bias2;  // 1 - beta^step, computed in double on the host
  float* grad_norm;
  const double* partial;
};

__global__ void __launch_bounds__(kThreads) adam_update_kernel(AdamParams p) {
  __shared__ double s_warp[32];
  __shared__ float s_norm;
  double s = 0.0;
  for (int i = threadIdx.x; i < p.partials; i += kThreads) s += p.partial[i];
  s = block_sum(s, s_warp);
  if (threadIdx.x == 0) {
    s_norm = static_cast<float>(sqrt(s));
    if (blockIdx.x == 0) *p.grad_norm = s_norm;
  }
  __syncthreads();
  const float norm = s_norm;
  if (!isfinite(norm)) return;  // the whole grid skips the step
  const float clip =
      p.max_grad_norm > 0.f ? fminf(1.f, p.max_grad_norm / (norm + 1e-6f)) : 1.f;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    if (p.mask && p.mask[i] == 0) continue;
    const float g = clip * p.grads[i];
    float w = p.params[i];
    w -= p.lr * p.weight_decay * w;
    const float m = p.beta1 * p.m[i] + (1.f - p.beta1) * g;
    const float v = p.beta2 * p.v[i] + (1.f - p.beta2) * g * g;
    w -= p.lr * (m / p.bias1) / (sqrtf(v / p.bias2) + p.eps);
    p.m[i] = m;
    p.v[i] = v;
    p.params[i] = w;
  }
}

}  // namespace

size_t adam_cuda_workspace_size(const AdamShape& s) {
  return static_cast<size_t>(norm_blocks(s.n)) * sizeof(double);
}

void adam_step_cuda(const AdamShape& s, const AdamArgs<float>& a, void* workspace,
                    cudaStream_t stream) {
  LFADS_CUDA_REQUIRE(s.n >= 0, "n must be >= 0");
  LFADS_CUDA_REQUIRE(a.step >= 1, "step must be >= 1 (it counts this step)");
  LFADS_CUDA_REQUIRE(a.params && a.grads && a.m && a.v && a.grad_norm && workspace,
                     "adam_step_cuda: a required pointer is null");
  const int blocks = norm_blocks(s.n);
  double* partial = static_cast<double*>(workspace);
  adam_norm_kernel<<<blocks, kThreads, 0, stream>>>(s.n, a.grads, partial);
  LFADS_CUDA_CHECK(cudaGetLastError());
  const double bias1 = 1.0 - std::pow(a.beta1, static_cast<double>(a.step));
  const double bias2 = 1.0 - std::pow(a.beta2, static_cast<double>(a.step));
  AdamParams p{s.n,
               blocks,
               a.params,
               a.grads,
               a.m,
               a.v,
               a.mask,
               static_cast<float>(a.lr),
               static_cast<float>(a.beta1),
               static_cast<float>(a.beta2),
               static_cast<float>(a.eps),
               static_cast<float>(a.weight_decay),
               static_cast<float>(a.max_grad_norm),
               static_cast<float>(bias1),
               static_cast<float>(bias2),
               a.grad_norm,
               partial};
  adam_update_kernel<<<blocks, kThreads, 0, stream>>>(p);
  LFADS_CUDA_CHECK(cudaGetLastError());
}

}  // namespace lfads
