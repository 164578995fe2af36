// Clipped-GRU sequence on the GPU: persistent kernels (recurrent_cuda.cuh). Each block keeps
// W_hh on chip and runs BB batch rows through all T steps; two dependent products per step in
// the forward (z, r from h; n from r * h), three in the backward.
#define LFADS_CUDA_OP "gru"
#include "cuda_check.h"
#include "gru_cell.h"
#include "gru_cuda.h"
#include "recurrent_cuda.cuh"

namespace lfads {

namespace {

using rnn_cuda::dot_cols;
using rnn_cuda::kMaxSlots;
using rnn_cuda::kMaxThreads;
using rnn_cuda::kNumTiles;
using rnn_cuda::WeightSlots;

// Forward

struct GruForwardParams {
  int T, B, H, ldx;
  bool reverse;
  float clip;
  const float* xproj;  // [T, B, ldx]
  const float* h0;     // [B, H]
  float* hs;           // [T, B, H]
  float* gates;        // [T, B, 3H]
  WeightSlots w;       // slot 0: [W_hz; W_hr]^T [H, 2H], slot 1: W_hn^T [H, H]
};

// Per-row state: h, r * h, z.
int forward_state_floats(int bb, int H) { return bb * 3 * H; }

template <int BB>
__global__ void __launch_bounds__(kMaxThreads, 1) gru_forward_kernel(GruForwardParams p) {
  extern __shared__ __align__(16) float smem[];
  const int H = p.H, H2 = 2 * H, H3 = 3 * H;
  float* s_h = smem;           // [BB, H] state h_{t-1}, then h_t
  float* s_rh = s_h + BB * H;  // [BB, H] r * h_{t-1}
  float* s_z = s_rh + BB * H;  // [BB, H] update gate
  const int b0 = blockIdx.x * BB;
  const int nb = min(BB, p.B - b0);  // valid rows; the others compute on zeros, store nothing

  const float* ptr[kMaxSlots];
  rnn_cuda::load_weights(p.w, smem, ptr);
  const float* Wt_zr = ptr[0];  // element (k, o) = W_hh[o, k], o < 2H
  const float* Wt_n = ptr[1];   // element (k, o) = W_hh[2H + o, k]
  for (int i = threadIdx.x; i < BB * H; i += blockDim.x) {
    const int b = i / H;
    s_h[i] = b < nb ? p.h0[static_cast<int64_t>(b0 + b) * H + i % H] : 0.f;
  }
  __syncthreads();

  for (int step = 0; step < p.T; ++step) {
    const int t = p.reverse ? p.T - 1 - step : step;
    const int64_t row0 = static_cast<int64_t>(t) * p.B + b0;
    // Phase 1: z and r from h.
    for (int o = threadIdx.x; o < H2; o += blockDim.x) {
      float x[BB], acc[BB];
#pragma unroll
      for (int b = 0; b < BB; ++b) {  // issued before the product so the loads overlap it
        x[b] = b < nb ? __ldg(p.xproj + (row0 + b) * p.ldx + o) : 0.f;
        acc[b] = 0.f;
      }
      dot_cols<BB>(Wt_zr, H2, o, s_h, H, H, acc);
#pragma unroll
      for (int b = 0; b < BB; ++b) {
        const float g = gru_gate(x[b], acc[b]);
        if (o < H) s_z[b * H + o] = g;
        else s_rh[b * H + o - H] = g * s_h[b * H + o - H];
        if (b < nb) p.gates[(row0 + b) * H3 + o] = g;
      }
    }
    __syncthreads();
    // Phase 2: n from r * h, then the new state.
    for (int o = threadIdx.x; o < H; o += blockDim.x) {
      float x[BB], acc[BB];
#pragma unroll
      for (int b = 0; b < BB; ++b) {
        x[b] = b < nb ? __ldg(p.xproj + (row0 + b) * p.ldx + H2 + o) : 0.f;
        acc[b] = 0.f;
      }
      dot_cols<BB>(Wt_n, H, o, s_rh, H, H, acc);
#pragma unroll
      for (int b = 0; b < BB; ++b) {
        float n;
        const float h = gru_update(s_z[b * H + o], x[b], acc[b], s_h[b * H + o], p.clip, &n);
        s_h[b * H + o] = h;  // only this thread reads h[b, o] in this phase
        if (b < nb) {
          p.hs[(row0 + b) * H + o] = h;
          p.gates[(row0 + b) * H3 + H2 + o] = n;
        }
      }
    }
    __syncthreads();
  }
}

using ForwardKernel = void (*)(GruForwardParams);
constexpr ForwardKernel kForwardKernels[kNumTiles] = {gru_forward_kernel<1>, gru_forward_kernel<2>,
                                                      gru_forward_kernel<4>, gru_forward_kernel<8>};

// Backward

struct GruBackwardParams {
  int T, B, H, ldx;
  bool reverse;
  float clip;
  const float* h0;     // [B, H]
  const float* hs;     // [T, B, H]
  const float* gates;  // [T, B, 3H]
  const float* d_hs;   // [T, B, H] or nullptr
  const float* d_hT;   // [B, H] or nullptr
  float* d_xproj;      // [T, B, ldx]
  float* d_h0;         // [B, H]
  float* work;         // [T, B, H] r * h_prev
  WeightSlots w;       // W_hh as given: slot 0 its rows z, r [2H, H]; slot 1 rows n [H, H]
};

// Per-row state: carried dh, h_prev, r, the partial dh, and the three pre-activation gradients.
int backward_state_floats(int bb, int H) { return bb * 7 * H; }

template <int BB>
__global__ void __launch_bounds__(kMaxThreads, 1) gru_backward_kernel(GruBackwardParams p) {
  extern __shared__ __align__(16) float smem[];
  const int H = p.H, H2 = 2 * H, H3 = 3 * H;
  float* s_dh = smem;            // [BB, H]  gradient on the state after this step
  float* s_hp = s_dh + BB * H;   // [BB, H]  the state before this step
  float* s_r = s_hp + BB * H;    // [BB, H]  reset gate
  float* s_dhd = s_r + BB * H;   // [BB, H]  dh_prev from the direct and reset paths
  float* s_d = s_dhd + BB * H;   // [BB, 3H] gradients of the z, r, n pre-activations
  const int b0 = blockIdx.x * BB;
  const int nb = min(BB, p.B - b0);

  const float* ptr[kMaxSlots];
  rnn_cuda::load_weights(p.w, smem, ptr);
  const float* W_zr = ptr[0];  // element (i, k) = W_hh[i, k]: products with W^T, outputs k
  const float* W_n = ptr[1];   // element (i, k) = W_hh[2H + i, k]
  for (int i = threadIdx.x; i < BB * H; i += blockDim.x) {
    const int b = i / H;
    s_dh[i] = (b < nb && p.d_hT) ? p.d_hT[static_cast<int64_t>(b0 + b) * H + i % H] : 0.f;
  }
  __syncthreads();

  for (int step = p.T - 1; step >= 0; --step) {
    const int t = p.reverse ? p.T - 1 - step : step;
    const int tp = p.reverse ? t + 1 : t - 1;  // time index of the previous state
    const int64_t row0 = static_cast<int64_t>(t) * p.B + b0;
    // Phase A, element-wise: gradients through z * h and n; r * h_prev for the weight gradient.
    for (int i = threadIdx.x; i < BB * H; i += blockDim.x) {
      const int b = i / H, j = i % H;
      float dz = 0.f, dn = 0.f, dhd = 0.f, hp = 0.f, r = 0.f;
      if (b < nb) {
        const int64_t row = row0 + b;
        const float* g = p.gates + row * H3;
        hp = step == 0 ? p.h0[static_cast<int64_t>(b0 + b) * H + j]
                       : p.hs[(static_cast<int64_t>(tp) * p.B + b0 + b) * H + j];
        r = g[H + j];
        const float dh = s_dh[i] + (p.d_hs ? p.d_hs[row * H + j] : 0.f);
        gru_backward_update(dh, g[j], g[H2 + j], hp, p.clip, &dz, &dn, &dhd);
        p.d_xproj[row * p.ldx + j] = dz;
        p.d_xproj[row * p.ldx + H2 + j] = dn;
        p.work[row * H + j] = r * hp;
      }
      s_hp[i] = hp;
      s_r[i] = r;
      s_dhd[i] = dhd;
      s_d[b * H3 + j] = dz;
      s_d[b * H3 + H2 + j] = dn;
    }
    __syncthreads();
    // Phase B: gradient on r * h = W_hn^T dn, then through the reset gate.
    for (int k = threadIdx.x; k < H; k += blockDim.x) {
      float acc[BB];
#pragma unroll
      for (int b = 0; b < BB; ++b) acc[b] = 0.f;
      dot_cols<BB>(W_n, H, k, s_d + H2, H3, H, acc);
#pragma unroll
      for (int b = 0; b < BB; ++b) {
        float dr, dhr;
        gru_backward_reset(acc[b], s_r[b * H + k], s_hp[b * H + k], &dr, &dhr);
        s_d[b * H3 + H + k] = dr;
        s_dhd[b * H + k] += dhr;
        if (b < nb) p.d_xproj[(row0 + b) * p.ldx + H + k] = dr;
      }
    }
    __syncthreads();
    // Phase C: dh_prev = direct + reset paths + W_hz^T dz + W_hr^T dr.
    for (int k = threadIdx.x; k < H; k += blockDim.x) {
      float acc[BB];
#pragma unroll
      for (int b = 0; b < BB; ++b) acc[b] = s_dhd[b * H + k];
      dot_cols<BB>(W_zr, H, k, s_d, H3, H2, acc);
#pragma unroll
      for (int b = 0; b < BB; ++b) s_dh[b * H + k] = acc[b];
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < nb * H; i += blockDim.x)
    p.d_h0[static_cast<int64_t>(b0) * H + i] = s_dh[i];
}

using BackwardKernel = void (*)(GruBackwardParams);
constexpr BackwardKernel kBackwardKernels[kNumTiles] = {
    gru_backward_kernel<1>, gru_backward_kernel<2>, gru_backward_kernel<4>, gru_backward_kernel<8>};

void check_shape(const GruShape& s) {
  LFADS_CUDA_REQUIRE(s.T >= 0 && s.B >= 0 && s.H >= 1, "T, B must be >= 0 and H >= 1");
  LFADS_CUDA_REQUIRE(s.ldx >= 3 * s.H, "ldx must be >= 3H");
}

}  // namespace

// Forward

size_t gru_forward_cuda_workspace_size(const GruShape& s) {
  const size_t floats = rnn_cuda::align4(2 * s.H * s.H) + rnn_cuda::align4(s.H * s.H);
  return floats * sizeof(float);
}

void gru_forward_cuda(const GruShape& s, const GruForwardArgs<float>& a, void* workspace,
                      cudaStream_t stream) {
  check_shape(s);
  if (s.B == 0 || s.T == 0) return;
  LFADS_CUDA_REQUIRE(a.xproj && a.W_hh && a.h0 && a.hs && a.gates && workspace,
                     "gru_forward_cuda: a required pointer is null");
  const int H = s.H;
  // W^T in two parts, so that the z, r part (two thirds) can stay on chip when all of it can't.
  float* Wt_zr = static_cast<float*>(workspace);        // [H, 2H]
  float* Wt_n = Wt_zr + rnn_cuda::align4(2 * H * H);   // [H, H]
  rnn_cuda::TransposeJobs jobs{};
  jobs.src[0] = a.W_hh;
  jobs.dst[0] = Wt_zr;
  jobs.rows[0] = 2 * H;
  jobs.cols[0] = H;
  jobs.src[1] = a.W_hh + 2 * H * H;
  jobs.dst[1] = Wt_n;
  jobs.rows[1] = H;
  jobs.cols[1] = H;
  jobs.count = 2;
  rnn_cuda::transpose_all(jobs, stream);

  GruForwardParams p{s.T, s.B, H, s.ldx, s.reverse, static_cast<float>(s.clip),
                     a.xproj, a.h0, a.hs, a.gates, WeightSlots{}};
  p.w.global[0] = Wt_zr;
  p.w.floats[0] = 2 * H * H;
  p.w.global[1] = Wt_n;
  p.w.floats[1] = H * H;
  p.w.count = 2;
  const rnn_cuda::LaunchPlan plan =
      rnn_cuda::plan_launch(kForwardKernels, s.B, rnn_cuda::round_threads(2 * H), p.w,
                            [H](int bb) { return forward_state_floats(bb, H); });
  p.w = plan.slots;
  kForwardKernels[plan.tile]<<<plan.blocks, plan.threads, plan.smem, stream>>>(p);
  LFADS_CUDA_CHECK(cudaGetLastError());
}

// Backward

void gru_backward_cuda(const GruShape& s, const GruBackwardArgs<float>& a, cudaStream_t stream) {
  check_shape(s);
  LFADS_CUDA_REQUIRE(a.d_W_hh == nullptr,
                     "gru_backward_cuda does not compute d_W_hh (pass nullptr; the caller "
                     "reduces it from d_xproj, hs, h0 and work with one GEMM per gate group)");
  if (s.B == 0) return;
  LFADS_CUDA_REQUIRE(
      a.W_hh && a.h0 && a.d_h0 && (s.T == 0 || (a.hs && a.gates && a.d_xproj && a.work)),
      "gru_backward_cuda: a required pointer is null");
  const int H = s.H;
  GruBackwardParams p{s.T, s.B, H, s.ldx, s.reverse, static_cast<float>(s.clip), a.h0, a.hs,
                      a.gates, a.d_hs, a.d_hT, a.d_xproj, a.d_h0, a.work, WeightSlots{}};
  p.w.global[0] = a.W_hh;
  p.w.floats[0] = 2 * H * H;
  p.w.global[1] = a.W_hh + 2 * H * H;
  p.w.floats[1] = H * H;
  p.w.count = 2;
  const rnn_cuda::LaunchPlan plan =
      rnn_cuda::plan_launch(kBackwardKernels, s.B, rnn_cuda::round_threads(H), p.w,
                            [H](int bb) { return backward_state_floats(bb, H); });
  p.w = plan.slots;
  kBackwardKernels[plan.tile]<<<plan.blocks, plan.threads, plan.smem, stream>>>(p);
  LFADS_CUDA_CHECK(cudaGetLastError());
}

}  // namespace lfads
