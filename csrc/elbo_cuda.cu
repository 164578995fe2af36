// The ELBO terms on the GPU: the Poisson reconstruction through the read-out (a tiled GEMM whose
// epilogue computes exp, the NLL and its gradient, so log-rates never make a round trip through
// device memory before the loss), the initial-condition KL and the inferred-input KL against
// the AR(1) prior. Reductions are two-stage and in a fixed order, accumulated in double.
#define LFADS_CUDA_OP "elbo"
#include <cmath>

#include "cuda_check.h"
#include "elbo_cuda.h"

namespace lfads {

namespace {

constexpr int kFinalThreads = 1024;

// Sum over the block of one double per thread; the result is valid in thread 0.
__device__ double block_sum(double v, double* s_warp /* [32] */) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();  // s_warp may still be read from a previous call
  if (lane == 0) s_warp[warp] = v;
  __syncthreads();
  v = 0.0;
  if (warp == 0) {
    v = lane < nwarps ? s_warp[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

// Poisson reconstruction

// One block: rows b0 .. b0+31 of one time step t (so its column sums are sums over the batch
// at t) and columns n0 .. n0+63. 128 threads as 32 x 4; thread (tx, ty) computes rows
// ty*8 .. ty*8+7 and columns tx, tx+32.
constexpr int kRowsTile = 32, kColsTile = 64, kKTile = 32;

struct ElboParams {
  int T, B, F, N, row_blocks;
  float scale;
  const float* factors;      // [R, F]
  const float* W_ro;         // [N, F]
  const float* b_ro;         // [N]
  const float* counts;       // [R, N]
  const float* loss_weight;  // [R, N] or nullptr
  const float* grad_mask;    // [R, N] or nullptr
  float* log_rates;          // [R, N] or nullptr
  float* d_log_rates;        // [R, N] or nullptr
  float* part_nll;           // [T, row_blocks, N]
  float* part_d;             // [T, row_blocks, N]
};

__global__ void __launch_bounds__(128) poisson_elbo_kernel(ElboParams p) {
  // factors^T and W_ro^T chunks, k-major. Pitch 36 keeps each row 16-byte aligned for the
  // float4 broadcast reads; pitch 65 makes the transposing stores conflict-free.
  __shared__ __align__(16) float s_f[kKTile][kRowsTile + 4];
  __shared__ float s_w[kKTile][kColsTile + 1];
  __shared__ float s_red[2][4][kColsTile];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 32 + tx;
  const int t = blockIdx.z, b0 = blockIdx.y * kRowsTile, n0 = blockIdx.x * kColsTile;
  const int64_t rowbase = static_cast<int64_t>(t) * p.B;

  float acc[8][2];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = 0.f;
  for (int k0 = 0; k0 < p.F; k0 += kKTile) {
    for (int i = tid; i < kRowsTile * kKTile; i += 128) {
      const int r = i / kKTile, k = i % kKTile;
      s_f[k][r] = (b0 + r < p.B && k0 + k < p.F)
                      ? p.factors[(rowbase + b0 + r) * p.F + k0 + k] : 0.f;
    }
    for (int i = tid; i < kColsTile * kKTile; i += 128) {
      const int c = i / kKTile, k = i % kKTile;
      s_w[k][c] = (n0 + c < p.N && k0 + k < p.F)
                      ? p.W_ro[static_cast<int64_t>(n0 + c) * p.F + k0 + k] : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kKTile; ++k) {
      const float4 fa = *reinterpret_cast<const float4*>(&s_f[k][ty * 8]);
      const float4 fb = *reinterpret_cast<const float4*>(&s_f[k][ty * 8 + 4]);
      const float f[8] = {fa.x, fa.y, fa.z, fa.w, fb.x, fb.y, fb.z, fb.w};
      const float w0 = s_w[k][tx], w1 = s_w[k][tx + 32];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        acc[i][0] = fmaf(f[i], w0, acc[i][0]);
        acc[i][1] = fmaf(f[i], w1, acc[i][1]);
      }
    }
    __syncthreads();
  }

  float col_nll[2] = {0.f, 0.f}, col_d[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int n = n0 + tx + 32 * j;
    if (n >= p.N) continue;
    const float bias = p.b_ro[n];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int b = b0 + ty * 8 + i;
      if (b >= p.B) continue;
      const int64_t e = (rowbase + b) * p.N + n;
      const float x = acc[i][j] + bias;
      const float y = p.counts[e];
      float nll = 0.f, d = 0.f;
      if (!isnan(y)) {
        const float w = p.loss_weight ? p.loss_weight[e] : 1.f;
        const float rate = expf(x);
        nll = w * (rate - y * x + lgammaf(y + 1.f));
        d = p.scale * w * (p.grad_mask ? p.grad_mask[e] : 1.f) * (rate - y);
      }
      if (p.log_rates) p.log_rates[e] = x;
      if (p.d_log_rates) p.d_log_rates[e] = d;
      col_nll[j] += nll;
      col_d[j] += d;
    }
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    s_red[0][ty][tx + 32 * j] = col_nll[j];
    s_red[1][ty][tx + 32 * j] = col_d[j];
  }
  __syncthreads();
  if (tid < kColsTile && n0 + tid < p.N) {
    const int64_t o = (static_cast<int64_t>(t) * p.row_blocks + blockIdx.y) * p.N + n0 + tid;
    p.part_nll[o] = s_red[0][0][tid] + s_red[0][1][tid] + s_red[0][2][tid] + s_red[0][3][tid];
    p.part_d[o] = s_red[1][0][tid] + s_red[1][1][tid] + s_red[1][2][tid] + s_red[1][3][tid];
  }
}

// Sums the row-block partials: tn_*[t, n] = sum over row blocks.
__global__ void elbo_reduce_tn_kernel(int T, int N, int row_blocks, const float* part_nll,
                                      const float* part_d, float* tn_nll, float* tn_d) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(T) * N) return;
  const int64_t t = i / N, n = i % N;
  float s_nll = 0.f, s_d = 0.f;
  for (int j = 0; j < row_blocks; ++j) {
    const int64_t o = (t * row_blocks + j) * N + n;
    s_nll += part_nll[o];
    s_d += part_d[o];
  }
  tn_nll[i] = s_nll;
  tn_d[i] = s_d;
}

// One block: loss = scale * sum of tn_nll (in double); d_b_ro[n] = sum over t of tn_d[t, n].
__global__ void __launch_bounds__(kFinalThreads)
    elbo_final_kernel(int T, int N, float scale, const float* tn_nll, const float* tn_d,
                      float* loss, float* d_b_ro) {
  __shared__ double s_warp[32];
  double s = 0.0;
  const int64_t total = static_cast<int64_t>(T) * N;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) s += tn_nll[i];
  s = block_sum(s, s_warp);
  if (threadIdx.x == 0) *loss = static_cast<float>(scale * s);
  if (d_b_ro) {
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
      double d = 0.0;
      for (int t = 0; t < T; ++t) d += tn_d[static_cast<int64_t>(t) * N + n];
      d_b_ro[n] = static_cast<float>(d);
    }
  }
}

int row_blocks(const ElboShape& s) { return (s.B + kRowsTile - 1) / kRowsTile; }

// Initial-condition KL

constexpr int kKlIcRows = 8;

// One block: 32 columns d, all rows b (8 threads per column stride over b).
__global__ void kl_ic_kernel(KlIcShape s, KlIcArgs<float> a, double* col_kl) {
  __shared__ double s_red[2][kKlIcRows][32];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int d = blockIdx.x * 32 + tx;
  const float c = a.scale / static_cast<float>(s.B);
  double kl = 0.0, dpm = 0.0;
  if (d < s.D) {
    const float pm = a.prior_mean[d], plv = a.prior_logvar[d];
    const float pv = expf(plv);
    for (int b = ty; b < s.B; b += kKlIcRows) {
      const int64_t e = static_cast<int64_t>(b) * s.D + d;
      const float m = a.mean[e], lv = a.logvar[e];
      const float elv = expf(lv);
      const float v = elv + a.var_min;
      const float diff = m - pm;
      kl += 0.5f * (plv - logf(v)) + (v + diff * diff) / (2.f * pv) - 0.5f;
      if (a.d_mean) {
        const float dm = c * diff / pv;
        a.d_mean[e] = dm;
        a.d_logvar[e] = c * (0.5f / pv - 0.5f / v) * elv;
        dpm -= dm;
      }
    }
  }
  s_red[0][ty][tx] = kl;
  s_red[1][ty][tx] = dpm;
  __syncthreads();
  if (ty == 0 && d < s.D) {
    double k = 0.0, g = 0.0;
    for (int j = 0; j < kKlIcRows; ++j) {
      k += s_red[0][j][tx];
      g += s_red[1][j][tx];
    }
    col_kl[d] = k;
    if (a.d_prior_mean) a.d_prior_mean[d] = static_cast<float>(g);
  }
}

__global__ void __launch_bounds__(kFinalThreads)
    kl_final_kernel(int n, double factor, const double* part, float* out) {
  __shared__ double s_warp[32];
  double s = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += part[i];
  s = block_sum(s, s_warp);
  if (threadIdx.x == 0) *out = static_cast<float>(factor * s);
}

// Inferred-input KL against the AR(1) prior

// One thread per (b, u) chain, sequential over t. kl_bu = sum_t log q(s_t) - log p(s_t | s_{t-1})
// with s_t = mean + exp(logvar / 2) eps; log q has no total derivative in mean and -1/2 in
// logvar (the reparameterised sample moves with them), the rest flows through s_t.
__global__ void kl_co_kernel(KlCoShape s, KlCoArgs<float> a, double* part /* [3, B, U] */) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  const int BU = s.B * s.U;
  if (idx >= BU) return;
  const int u = idx % s.U;
  const float kLog2Pi = 1.8378770664093453f;
  const float tau = expf(a.logtau[u]);
  const float alpha = expf(-1.f / tau);
  const float nvar = expf(a.lognvar[u]);
  const float one_m_a2 = 1.f - alpha * alpha;
  const float var0 = nvar / one_m_a2;
  const float c = a.scale / static_cast<float>(s.B);
  double kl = 0.0, d_alpha = 0.0, d_nvar = 0.0;  // of -log p (and kl), per chain

  float m = a.mean[idx], lv = a.logvar[idx], e = a.eps[idx];
  float sd = expf(0.5f * lv);
  float x = m + sd * e, x_prev = 0.f;
  for (int t = 0; t < s.T; ++t) {
    const int64_t o = static_cast<int64_t>(t) * BU + idx;
    float m_n = 0.f, lv_n = 0.f, e_n = 0.f, sd_n = 0.f, x_n = 0.f;
    const bool has_next = t + 1 < s.T;
    if (has_next) {
      m_n = a.mean[o + BU];
      lv_n = a.logvar[o + BU];
      e_n = a.eps[o + BU];
      sd_n = expf(0.5f * lv_n);
      x_n = m_n + sd_n * e_n;
    }
    const float var = t == 0 ? var0 : nvar;
    const float resid = t == 0 ? x : x - alpha * x_prev;
    const float log_q = -0.5f * e * e - 0.5f * kLog2Pi - 0.5f * lv;
    const float log_p = -0.5f * (kLog2Pi + logf(var)) - resid * resid / (2.f * var);
    kl += log_q - log_p;
    if (a.d_mean) {
      const float gx = resid / var - (has_next ? alpha * (x_n - alpha * x) / nvar : 0.f);
      a.d_mean[o] = c * gx;
      a.d_logvar[o] = c * (gx * 0.5f * sd * e - 0.5f);
    }
    if (t == 0) {
      d_alpha += alpha / one_m_a2 - x * x * alpha / nvar;
      d_nvar += 0.5f / nvar - x * x * one_m_a2 / (2.f * nvar * nvar);
    } else {
      d_alpha += -resid * x_prev / nvar;
      d_nvar += 0.5f / nvar - resid * resid / (2.f * nvar * nvar);
    }
    x_prev = x;
    x = x_n;
    e = e_n;
    lv = lv_n;
    sd = sd_n;
  }
  part[idx] = kl;
  part[BU + idx] = d_alpha * alpha / tau;  // d alpha / d logtau = alpha / tau
  part[2 * BU + idx] = d_nvar * nvar;      // d nvar / d lognvar = nvar
}

// One block: kl = c * sum of the chain KLs; d_logtau[u], d_lognvar[u] = c * sums over b.
__global__ void __launch_bounds__(kFinalThreads)
    kl_co_final_kernel(int B, int U, double c, const double* part, float* kl, float* d_logtau,
                       float* d_lognvar) {
  __shared__ double s_warp[32];
  const int BU = B * U;
  double s = 0.0;
  for (int i = threadIdx.x; i < BU; i += blockDim.x) s += part[i];
  s = block_sum(s, s_warp);
  if (threadIdx.x == 0) *kl = static_cast<float>(c * s);
  if (d_logtau) {
    for (int u = threadIdx.x; u < U; u += blockDim.x) {
      double gt = 0.0, gn = 0.0;
      for (int b = 0; b < B; ++b) {
        gt += part[BU + b * U + u];
        gn += part[2 * BU + b * U + u];
      }
      d_logtau[u] = static_cast<float>(c * gt);
      d_lognvar[u] = static_cast<float>(c * gn);
    }
  }
}

}  // namespace

// Poisson reconstruction

size_t poisson_elbo_cuda_workspace_size(const ElboShape& s) {
  const size_t tn = static_cast<size_t>(s.T) * s.N;
  return (2 * tn * row_blocks(s) + 2 * tn) * sizeof(float);
}

void poisson_elbo_cuda(const ElboShape& s, const ElboArgs<float>& a, float* d_log_rates,
                       void* workspace, cudaStream_t stream) {
  LFADS_CUDA_REQUIRE(s.T >= 1 && s.B >= 1 && s.F >= 1 && s.N >= 1, "T, B, F, N must be >= 1");
  LFADS_CUDA_REQUIRE(s.T <= 65535, "T must be <= 65535 (one grid dimension per time step)");
  LFADS_CUDA_REQUIRE(a.factors && a.W_ro && a.b_ro && a.counts && a.loss && workspace,
                     "poisson_elbo_cuda: a required pointer is null");
  LFADS_CUDA_REQUIRE(!a.d_factors && !a.d_W_ro,
                     "poisson_elbo_cuda does not compute d_factors or d_W_ro (pass nullptr; "
                     "the caller multiplies d_log_rates by W_ro and by factors)");
  LFADS_CUDA_REQUIRE(!d_log_rates || a.d_b_ro, "d_b_ro is required with d_log_rates");
  const int rb = row_blocks(s);
  const size_t tn = static_cast<size_t>(s.T) * s.N;
  float* part_nll = static_cast<float*>(workspace);
  float* part_d = part_nll + tn * rb;
  float* tn_nll = part_d + tn * rb;
  float* tn_d = tn_nll + tn;
  ElboParams p{s.T,      s.B,           s.F,         s.N,          rb,
               static_cast<float>(a.scale), a.factors, a.W_ro,     a.b_ro,
               a.counts, a.loss_weight, a.grad_mask, a.log_rates,  d_log_rates,
               part_nll, part_d};
  const dim3 grid((s.N + kColsTile - 1) / kColsTile, rb, s.T);
  poisson_elbo_kernel<<<grid, dim3(32, 4), 0, stream>>>(p);
  LFADS_CUDA_CHECK(cudaGetLastError());
  float* out_tn = a.nll_tn ? a.nll_tn : tn_nll;
  const int threads = 256;
  const int blocks = static_cast<int>((tn + threads - 1) / threads);
  elbo_reduce_tn_kernel<<<blocks, threads, 0, stream>>>(s.T, s.N, rb, part_nll, part_d, out_tn,
                                                        tn_d);
  LFADS_CUDA_CHECK(cudaGetLastError());
  elbo_final_kernel<<<1, kFinalThreads, 0, stream>>>(s.T, s.N, static_cast<float>(a.scale),
                                                     out_tn, tn_d, a.loss,
                                                     d_log_rates ? a.d_b_ro : nullptr);
  LFADS_CUDA_CHECK(cudaGetLastError());
}

// Initial-condition KL

size_t kl_ic_cuda_workspace_size(const KlIcShape& s) {
  return static_cast<size_t>(s.D) * sizeof(double);
}

void kl_ic_cuda(const KlIcShape& s, const KlIcArgs<float>& a, void* workspace,
                cudaStream_t stream) {
  LFADS_CUDA_REQUIRE(s.B >= 1 && s.D >= 1, "B and D must be >= 1");
  LFADS_CUDA_REQUIRE(a.mean && a.logvar && a.prior_mean && a.prior_logvar && a.kl && workspace,
                     "kl_ic_cuda: a required pointer is null");
  LFADS_CUDA_REQUIRE(!a.d_mean || (a.d_logvar && a.d_prior_mean),
                     "kl_ic_cuda: d_logvar and d_prior_mean are required with d_mean");
  double* col_kl = static_cast<double*>(workspace);
  kl_ic_kernel<<<(s.D + 31) / 32, dim3(32, kKlIcRows), 0, stream>>>(s, a, col_kl);
  LFADS_CUDA_CHECK(cudaGetLastError());
  kl_final_kernel<<<1, kFinalThreads, 0, stream>>>(s.D, static_cast<double>(a.scale) / s.B,
                                                   col_kl, a.kl);
  LFADS_CUDA_CHECK(cudaGetLastError());
}

// Inferred-input KL

size_t kl_co_cuda_workspace_size(const KlCoShape& s) {
  return static_cast<size_t>(3) * s.B * s.U * sizeof(double);
}

void kl_co_cuda(const KlCoShape& s, const KlCoArgs<float>& a, void* workspace,
                cudaStream_t stream) {
  LFADS_CUDA_REQUIRE(s.T >= 1 && s.B >= 1 && s.U >= 1, "T, B and U must be >= 1");
  LFADS_CUDA_REQUIRE(a.mean && a.logvar && a.eps && a.logtau && a.lognvar && a.kl && workspace,
                     "kl_co_cuda: a required pointer is null");
  LFADS_CUDA_REQUIRE(!a.d_mean || (a.d_logvar && a.d_logtau && a.d_lognvar),
                     "kl_co_cuda: d_logvar, d_logtau and d_lognvar are required with d_mean");
  double* part = static_cast<double*>(workspace);
  const int BU = s.B * s.U, threads = 128;
  kl_co_kernel<<<(BU + threads - 1) / threads, threads, 0, stream>>>(s, a, part);
  LFADS_CUDA_CHECK(cudaGetLastError());
  kl_co_final_kernel<<<1, kFinalThreads, 0, stream>>>(
      s.B, s.U, static_cast<double>(a.scale) / s.B, part, a.kl, a.d_mean ? a.d_logtau : nullptr,
      a.d_mean ? a.d_lognvar : nullptr);
  LFADS_CUDA_CHECK(cudaGetLastError());
}

}  // namespace lfads
