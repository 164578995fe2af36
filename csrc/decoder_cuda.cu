// The fused LFADS decoder on the GPU: one persistent kernel runs the coupled controller /
// sampling / generator / factor recurrence for all T steps (forward), one runs its BPTT
// (backward). Each block owns BB batch rows and keeps the weights that fit in shared memory
// (largest first); see recurrent_cuda.cuh for the scheme. Per step the forward has six
// dependent phases (controller z/r, controller n, controller output and sample, generator z/r,
// generator n, factors), the backward six as well (three without a controller).
#define LFADS_CUDA_OP "decoder"
#include "cuda_check.h"
#include "decoder_cuda.h"
#include "gru_cell.h"
#include "recurrent_cuda.cuh"

namespace lfads {

namespace {

using rnn_cuda::align4;
using rnn_cuda::dot_cols;
using rnn_cuda::kMaxSlots;
using rnn_cuda::kMaxThreads;
using rnn_cuda::kNumTiles;
using rnn_cuda::WeightSlots;

// Weight slots, the same index in both passes (forward: transposed; backward: as given). Each
// recurrent matrix is two slots, its z, r rows and its n rows, so that two thirds of it can stay
// on chip when all of it can't.
enum Slot { kConF = 0, kConZR, kConN, kCo, kGenU, kGenZR, kGenN, kFac, kNumSlots };

// Each slot as given: rows [row0, row0 + rows) of a [*, cols] matrix.
struct SlotSource {
  const float* base;
  int row0, rows, cols;
};

void slot_sources(const DecoderShape& s, const DecoderForwardArgs<float>& a,
                  SlotSource out[kNumSlots]) {
  const int C = s.C, U = s.U, G = s.G, F = s.F;
  out[kConF] = {a.W_con_f, 0, 3 * C, F};
  out[kConZR] = {a.W_con_hh, 0, 2 * C, C};
  out[kConN] = {a.W_con_hh, 2 * C, C, C};
  out[kCo] = {a.W_co, 0, 2 * U, C};
  out[kGenU] = {a.W_gen_u, 0, 3 * G, U};
  out[kGenZR] = {a.W_gen_hh, 0, 2 * G, G};
  out[kGenN] = {a.W_gen_hh, 2 * G, G, G};
  out[kFac] = {a.W_fac, 0, F, G};
}

const float* slot_pointer(const SlotSource& src) {
  return src.base ? src.base + static_cast<int64_t>(src.row0) * src.cols : nullptr;
}

void check_shape(const DecoderShape& s) {
  LFADS_CUDA_REQUIRE(s.T >= 1 && s.B >= 0, "T must be >= 1 and B >= 0");
  LFADS_CUDA_REQUIRE(s.C >= 0 && s.U >= 0 && s.G >= 1 && s.F >= 1,
                     "C, U must be >= 0 and G, F >= 1");
  LFADS_CUDA_REQUIRE(s.C > 0 || s.U == 0, "U must be 0 when there is no controller (C == 0)");
  LFADS_CUDA_REQUIRE(s.C == 0 || s.ld_xc >= 3 * s.C, "ld_xc must be >= 3C");
  LFADS_CUDA_REQUIRE(s.ld_xg >= 3 * s.G, "ld_xg must be >= 3G");
}

// Forward

struct DecoderForwardParams {
  int T, B, C, U, G, F, ld_xc, ld_xg;
  float clip;
  bool sample;
  const float* xcon;    // [T, B, ld_xc]
  const float* c0;      // [B, C]
  const float* b_co;    // [2U]
  const float* eps;     // [T, B, U]
  const float* mask_f;  // [T, B, F] or nullptr
  const float* xgen;    // [T, B, ld_xg]
  const float* g0;      // [B, G]
  const float* f0;      // [B, F]
  const float* mask_g;  // [T, B, G] or nullptr
  float* con_states;    // [T, B, C]
  float* con_gates;     // [T, B, 3C]
  float* co_mean;       // [T, B, U]
  float* co_logvar;     // [T, B, U]
  float* u;             // [T, B, U]
  float* gen_states;    // [T, B, G]
  float* gen_gates;     // [T, B, 3G]
  float* factors;       // [T, B, F]
  WeightSlots w;        // the transposed weights (Slot order)
};

// Per-row state: c, r*c, z_c, xn_c, masked f_{t-1}, u, g, r*g, z_g, xn_g, masked g.
int forward_state_floats(int bb, const DecoderShape& s) {
  return bb * (4 * s.C + s.F + s.U + 5 * s.G);
}

template <int BB>
__global__ void __launch_bounds__(kMaxThreads, 1) decoder_forward_kernel(DecoderForwardParams p) {
  extern __shared__ __align__(16) float smem[];
  const int C = p.C, U = p.U, G = p.G, F = p.F;
  const int C2 = 2 * C, C3 = 3 * C, G2 = 2 * G, G3 = 3 * G, U2 = 2 * U;
  float* s_c = smem;             // [BB, C] controller state
  float* s_rc = s_c + BB * C;    // [BB, C] r * c_{t-1}
  float* s_zc = s_rc + BB * C;   // [BB, C] controller update gate
  float* s_xnc = s_zc + BB * C;  // [BB, C] controller n input pre-activation
  float* s_fd = s_xnc + BB * C;  // [BB, F] mask_f_t * f_{t-1}
  float* s_u = s_fd + BB * F;    // [BB, U] inferred input
  float* s_g = s_u + BB * U;     // [BB, G] generator state
  float* s_rg = s_g + BB * G;    // [BB, G] r * g_{t-1}
  float* s_zg = s_rg + BB * G;   // [BB, G] generator update gate
  float* s_xng = s_zg + BB * G;  // [BB, G] generator n input pre-activation
  float* s_gd = s_xng + BB * G;  // [BB, G] mask_g_t * g_t
  const int b0 = blockIdx.x * BB;
  const int nb = min(BB, p.B - b0);

  const float* W[kMaxSlots];
  rnn_cuda::load_weights(p.w, smem, W);
  for (int i = threadIdx.x; i < BB * G; i += blockDim.x) {
    const int b = i / G;
    s_g[i] = b < nb ? p.g0[static_cast<int64_t>(b0 + b) * G + i % G] : 0.f;
  }
  for (int i = threadIdx.x; i < BB * C; i += blockDim.x) {
    const int b = i / C;
    s_c[i] = b < nb ? p.c0[static_cast<int64_t>(b0 + b) * C + i % C] : 0.f;
  }
  if (C > 0) {
    for (int i = threadIdx.x; i < BB * F; i += blockDim.x) {
      const int b = i / F;
      const int64_t e = static_cast<int64_t>(b0 + b) * F + i % F;  // row b0 + b of step 0
      s_fd[i] = b < nb ? p.f0[e] * (p.mask_f ? p.mask_f[e] : 1.f) : 0.f;
    }
  }
  __syncthreads();

  for (int t = 0; t < p.T; ++t) {
    const int64_t row0 = static_cast<int64_t>(t) * p.B + b0;
    if (C > 0) {
      // Phase 1: controller input (xcon + W_con_f fd) and its z, r gates.
      for (int o = threadIdx.x; o < C3; o += blockDim.x) {
        float x[BB], ah[BB];
#pragma unroll
        for (int b = 0; b < BB; ++b) {
          x[b] = b < nb ? __ldg(p.xcon + (row0 + b) * p.ld_xc + o) : 0.f;
          ah[b] = 0.f;
        }
        dot_cols<BB>(W[kConF], C3, o, s_fd, F, F, x);
        if (o < C2) dot_cols<BB>(W[kConZR], C2, o, s_c, C, C, ah);
#pragma unroll
        for (int b = 0; b < BB; ++b) {
          if (o < C2) {
            const float g = gru_gate(x[b], ah[b]);
            if (o < C) s_zc[b * C + o] = g;
            else s_rc[b * C + o - C] = g * s_c[b * C + o - C];
            if (b < nb) p.con_gates[(row0 + b) * C3 + o] = g;
          } else {
            s_xnc[b * C + o - C2] = x[b];
          }
        }
      }
      __syncthreads();
      // Phase 2: controller candidate and new state.
      for (int o = threadIdx.x; o < C; o += blockDim.x) {
        float acc[BB];
#pragma unroll
        for (int b = 0; b < BB; ++b) acc[b] = 0.f;
        dot_cols<BB>(W[kConN], C, o, s_rc, C, C, acc);
#pragma unroll
        for (int b = 0; b < BB; ++b) {
          float n;
          const float c = gru_update(s_zc[b * C + o], s_xnc[b * C + o], acc[b], s_c[b * C + o],
                                     p.clip, &n);
          s_c[b * C + o] = c;
          if (b < nb) {
            p.con_states[(row0 + b) * C + o] = c;
            p.con_gates[(row0 + b) * C3 + C2 + o] = n;
          }
        }
      }
      __syncthreads();
      // Phase 3: controller output distribution and the inferred input u.
      for (int o = threadIdx.x; o < U; o += blockDim.x) {
        float mean[BB], logvar[BB];
#pragma unroll
        for (int b = 0; b < BB; ++b) {
          mean[b] = p.b_co[o];
          logvar[b] = p.b_co[U + o];
        }
        dot_cols<BB>(W[kCo], U2, o, s_c, C, C, mean);
        dot_cols<BB>(W[kCo], U2, U + o, s_c, C, C, logvar);
#pragma unroll
        for (int b = 0; b < BB; ++b) {
          float u = mean[b];
          if (b < nb) {
            const int64_t e = (row0 + b) * U + o;
            if (p.sample) u = mean[b] + lf_exp(0.5f * logvar[b]) * p.eps[e];
            p.co_mean[e] = mean[b];
            p.co_logvar[e] = logvar[b];
            p.u[e] = u;
          }
          s_u[b * U + o] = u;
        }
      }
      __syncthreads();
    }
    // Phase 4: generator input (xgen + W_gen_u u) and its z, r gates.
    for (int o = threadIdx.x; o < G3; o += blockDim.x) {
      float x[BB], ah[BB];
#pragma unroll
      for (int b = 0; b < BB; ++b) {
        x[b] = b < nb ? __ldg(p.xgen + (row0 + b) * p.ld_xg + o) : 0.f;
        ah[b] = 0.f;
      }
      dot_cols<BB>(W[kGenU], G3, o, s_u, U, U, x);
      if (o < G2) dot_cols<BB>(W[kGenZR], G2, o, s_g, G, G, ah);
#pragma unroll
      for (int b = 0; b < BB; ++b) {
        if (o < G2) {
          const float g = gru_gate(x[b], ah[b]);
          if (o < G) s_zg[b * G + o] = g;
          else s_rg[b * G + o - G] = g * s_g[b * G + o - G];
          if (b < nb) p.gen_gates[(row0 + b) * G3 + o] = g;
        } else {
          s_xng[b * G + o - G2] = x[b];
        }
      }
    }
    __syncthreads();
    // Phase 5: generator candidate, new state, dropout before the factors.
    for (int o = threadIdx.x; o < G; o += blockDim.x) {
      float acc[BB];
#pragma unroll
      for (int b = 0; b < BB; ++b) acc[b] = 0.f;
      dot_cols<BB>(W[kGenN], G, o, s_rg, G, G, acc);
#pragma unroll
      for (int b = 0; b < BB; ++b) {
        float n;
        const float g =
            gru_update(s_zg[b * G + o], s_xng[b * G + o], acc[b], s_g[b * G + o], p.clip, &n);
        s_g[b * G + o] = g;
        float gd = g;
        if (b < nb) {
          const int64_t e = (row0 + b) * G + o;
          p.gen_states[e] = g;
          p.gen_gates[(row0 + b) * G3 + G2 + o] = n;
          if (p.mask_g) gd = g * p.mask_g[e];
        }
        s_gd[b * G + o] = gd;
      }
    }
    __syncthreads();
    // Phase 6: factors, and the next step's (masked) controller input.
    for (int o = threadIdx.x; o < F; o += blockDim.x) {
      float acc[BB];
#pragma unroll
      for (int b = 0; b < BB; ++b) acc[b] = 0.f;
      dot_cols<BB>(W[kFac], F, o, s_gd, G, G, acc);
#pragma unroll
      for (int b = 0; b < BB; ++b) {
        float fd = acc[b];
        if (b < nb) {
          p.factors[(row0 + b) * F + o] = acc[b];
          if (p.mask_f && t + 1 < p.T) fd = acc[b] * p.mask_f[(row0 + p.B + b) * F + o];
        }
        if (C > 0) s_fd[b * F + o] = fd;
      }
    }
    __syncthreads();
  }
}

using ForwardKernel = void (*)(DecoderForwardParams);
constexpr ForwardKernel kForwardKernels[kNumTiles] = {
    decoder_forward_kernel<1>, decoder_forward_kernel<2>, decoder_forward_kernel<4>,
    decoder_forward_kernel<8>};

// Backward

struct DecoderBackwardParams {
  int T, B, C, U, G, F, ld_xc, ld_xg;
  float clip;
  bool sample;
  const float* c0;           // [B, C]
  const float* eps;          // [T, B, U]
  const float* co_logvar;    // [T, B, U]
  const float* mask_f;       // [T, B, F] or nullptr
  const float* g0;           // [B, G]
  const float* mask_g;       // [T, B, G] or nullptr
  const float* con_states;   // [T, B, C]
  const float* con_gates;    // [T, B, 3C]
  const float* gen_states;   // [T, B, G]
  const float* gen_gates;    // [T, B, 3G]
  const float* d_factors;    // [T, B, F] or nullptr
  const float* d_co_mean;    // [T, B, U] or nullptr
  const float* d_co_logvar;  // [T, B, U] or nullptr
  float* d_xcon;             // [T, B, ld_xc]
  float* d_c0;               // [B, C]
  float* d_xgen;             // [T, B, ld_xg]
  float* d_g0;               // [B, G]
  float* d_f0;               // [B, F]
  float* d_ftot;             // [T, B, F]
  float* d_co;               // [T, B, 2U]
  float* rh_gen;             // [T, B, G]
  float* rh_con;             // [T, B, C]
  WeightSlots w;             // the weights as given (Slot order)
};

// Per-row state: generator dg, g_prev, r, partial dg_prev, d(z, r, n) (3G); total df; d_co (2U);
// controller dc, c_prev, r, partial dc_prev, d(z, r, n) (3C).
int backward_state_floats(int bb, const DecoderShape& s) {
  return bb * (7 * s.G + s.F + 2 * s.U + 7 * s.C);
}

template <int BB>
__global__ void __launch_bounds__(kMaxThreads, 1) decoder_backward_kernel(DecoderBackwardParams p) {
  extern __shared__ __align__(16) float smem[];
  const int C = p.C, U = p.U, G = p.G, F = p.F;
  const int C2 = 2 * C, C3 = 3 * C, G2 = 2 * G, G3 = 3 * G, U2 = 2 * U;
  float* s_dg = smem;             // [BB, G]  gradient on g_t (carried from t+1)
  float* s_gp = s_dg + BB * G;    // [BB, G]  g_{t-1}
  float* s_rg = s_gp + BB * G;    // [BB, G]  generator reset gate
  float* s_dhg = s_rg + BB * G;   // [BB, G]  dg_{t-1} from the direct and reset paths
  float* s_dgen = s_dhg + BB * G; // [BB, 3G] generator pre-activation gradients (z, r, n)
  float* s_dft = s_dgen + BB * G3;// [BB, F]  total gradient on f_t
  float* s_dco = s_dft + BB * F;  // [BB, 2U] gradient on [co_mean_t, co_logvar_t]
  float* s_dc = s_dco + BB * U2;  // [BB, C]  gradient on c_t
  float* s_cp = s_dc + BB * C;    // [BB, C]  c_{t-1}
  float* s_rc = s_cp + BB * C;    // [BB, C]  controller reset gate
  float* s_dhc = s_rc + BB * C;   // [BB, C]  dc_{t-1} from the direct and reset paths
  float* s_dcon = s_dhc + BB * C; // [BB, 3C] controller pre-activation gradients (z, r, n)
  const int b0 = blockIdx.x * BB;
  const int nb = min(BB, p.B - b0);

  const float* W[kMaxSlots];
  rnn_cuda::load_weights(p.w, smem, W);
  for (int i = threadIdx.x; i < BB * G; i += blockDim.x) s_dg[i] = 0.f;
  for (int i = threadIdx.x; i < BB * C; i += blockDim.x) s_dc[i] = 0.f;
  {
    const int64_t last = static_cast<int64_t>(p.T - 1) * p.B + b0;
    for (int i = threadIdx.x; i < BB * F; i += blockDim.x) {
      const int b = i / F;
      float v = 0.f;
      if (b < nb) {
        const int64_t e = (last + b) * F + i % F;
        v = p.d_factors ? p.d_factors[e] : 0.f;
        p.d_ftot[e] = v;
      }
      s_dft[i] = v;
    }
  }
  __syncthreads();

  for (int t = p.T - 1; t >= 0; --t) {
    const int64_t row0 = static_cast<int64_t>(t) * p.B + b0;
    const int64_t prow0 = row0 - p.B;  // the same rows at t - 1
    // Phase A: factors -> g_t, then the generator's element-wise backward.
    for (int o = threadIdx.x; o < G; o += blockDim.x) {
      float acc[BB];
#pragma unroll
      for (int b = 0; b < BB; ++b) acc[b] = 0.f;
      dot_cols<BB>(W[kFac], G, o, s_dft, F, F, acc);
#pragma unroll
      for (int b = 0; b < BB; ++b) {
        float dz = 0.f, dn = 0.f, dhd = 0.f, gp = 0.f, r = 0.f;
        if (b < nb) {
          const int64_t row = row0 + b;
          const float dg =
              s_dg[b * G + o] + acc[b] * (p.mask_g ? p.mask_g[row * G + o] : 1.f);
          gp = t == 0 ? p.g0[static_cast<int64_t>(b0 + b) * G + o]
                      : p.gen_states[(prow0 + b) * G + o];
          const float* gg = p.gen_gates + row * G3;
          r = gg[G + o];
          gru_backward_update(dg, gg[o], gg[G2 + o], gp, p.clip, &dz, &dn, &dhd);
          p.d_xgen[row * p.ld_xg + o] = dz;
          p.d_xgen[row * p.ld_xg + G2 + o] = dn;
          p.rh_gen[row * G + o] = r * gp;
        }
        s_gp[b * G + o] = gp;
        s_rg[b * G + o] = r;
        s_dhg[b * G + o] = dhd;
        s_dgen[b * G3 + o] = dz;
        s_dgen[b * G3 + G2 + o] = dn;
      }
    }
    __syncthreads();
    // Phase B: generator reset path.
    for (int o = threadIdx.x; o < G; o += blockDim.x) {
      float acc[BB];
#pragma unroll
      for (int b = 0; b < BB; ++b) acc[b] = 0.f;
      dot_cols<BB>(W[kGenN], G, o, s_dgen + G2, G3, G, acc);
#pragma unroll
      for (int b = 0; b < BB; ++b) {
        float dr, dhr;
        gru_backward_reset(acc[b], s_rg[b * G + o], s_gp[b * G + o], &dr, &dhr);
        s_dgen[b * G3 + G + o] = dr;
        s_dhg[b * G + o] += dhr;
        if (b < nb) p.d_xgen[(row0 + b) * p.ld_xg + G + o] = dr;
      }
    }
    __syncthreads();
    // Phase C: dg_{t-1}; the gradient on u and on the controller output distribution; without
    // a controller, the total factor gradient of step t-1.
    const int outs_c = G + U + (C == 0 ? F : 0);
    for (int o = threadIdx.x; o < outs_c; o += blockDim.x) {
      float acc[BB];
      if (o < G) {
#pragma unroll
        for (int b = 0; b < BB; ++b) acc[b] = s_dhg[b * G + o];
        dot_cols<BB>(W[kGenZR], G, o, s_dgen, G3, G2, acc);
#pragma unroll
        for (int b = 0; b < BB; ++b) s_dg[b * G + o] = acc[b];
      } else if (o < G + U) {
        const int k = o - G;
#pragma unroll
        for (int b = 0; b < BB; ++b) acc[b] = 0.f;
        dot_cols<BB>(W[kGenU], U, k, s_dgen, G3, G3, acc);
#pragma unroll
        for (int b = 0; b < BB; ++b) {
          float dm = acc[b], dl = 0.f;
          if (b < nb) {
            const int64_t e = (row0 + b) * U + k;
            if (p.sample) dl = acc[b] * p.eps[e] * 0.5f * lf_exp(0.5f * p.co_logvar[e]);
            if (p.d_co_mean) dm += p.d_co_mean[e];
            if (p.d_co_logvar) dl += p.d_co_logvar[e];
            p.d_co[(row0 + b) * U2 + k] = dm;
            p.d_co[(row0 + b) * U2 + U + k] = dl;
          } else {
            dm = 0.f;
          }
          s_dco[b * U2 + k] = dm;
          s_dco[b * U2 + U + k] = dl;
        }
      } else {
        const int k = o - G - U;
#pragma unroll
        for (int b = 0; b < BB; ++b) {
          float v = 0.f;
          if (b < nb) {
            if (t > 0) {
              v = p.d_factors ? p.d_factors[(prow0 + b) * F + k] : 0.f;
              p.d_ftot[(prow0 + b) * F + k] = v;
            } else {
              p.d_f0[static_cast<int64_t>(b0 + b) * F + k] = 0.f;
            }
          }
          s_dft[b * F + k] = v;
        }
      }
    }
    __syncthreads();
    if (C > 0) {
      // Phase D: controller output -> c_t, then the controller's element-wise backward.
      for (int o = threadIdx.x; o < C; o += blockDim.x) {
        float acc[BB];
#pragma unroll
        for (int b = 0; b < BB; ++b) acc[b] = s_dc[b * C + o];
        dot_cols<BB>(W[kCo], C, o, s_dco, U2, U2, acc);
#pragma unroll
        for (int b = 0; b < BB; ++b) {
          float dz = 0.f, dn = 0.f, dhd = 0.f, cp = 0.f, r = 0.f;
          if (b < nb) {
            const int64_t row = row0 + b;
            cp = t == 0 ? p.c0[static_cast<int64_t>(b0 + b) * C + o]
                        : p.con_states[(prow0 + b) * C + o];
            const float* cg = p.con_gates + row * C3;
            r = cg[C + o];
            gru_backward_update(acc[b], cg[o], cg[C2 + o], cp, p.clip, &dz, &dn, &dhd);
            p.d_xcon[row * p.ld_xc + o] = dz;
            p.d_xcon[row * p.ld_xc + C2 + o] = dn;
            p.rh_con[row * C + o] = r * cp;
          }
          s_cp[b * C + o] = cp;
          s_rc[b * C + o] = r;
          s_dhc[b * C + o] = dhd;
          s_dcon[b * C3 + o] = dz;
          s_dcon[b * C3 + C2 + o] = dn;
        }
      }
      __syncthreads();
      // Phase E: controller reset path.
      for (int o = threadIdx.x; o < C; o += blockDim.x) {
        float acc[BB];
#pragma unroll
        for (int b = 0; b < BB; ++b) acc[b] = 0.f;
        dot_cols<BB>(W[kConN], C, o, s_dcon + C2, C3, C, acc);
#pragma unroll
        for (int b = 0; b < BB; ++b) {
          float dr, dhr;
          gru_backward_reset(acc[b], s_rc[b * C + o], s_cp[b * C + o], &dr, &dhr);
          s_dcon[b * C3 + C + o] = dr;
          s_dhc[b * C + o] += dhr;
          if (b < nb) p.d_xcon[(row0 + b) * p.ld_xc + C + o] = dr;
        }
      }
      __syncthreads();
      // Phase F: dc_{t-1}, and the controller input's gradient on f_{t-1}.
      for (int o = threadIdx.x; o < C + F; o += blockDim.x) {
        float acc[BB];
        if (o < C) {
#pragma unroll
          for (int b = 0; b < BB; ++b) acc[b] = s_dhc[b * C + o];
          dot_cols<BB>(W[kConZR], C, o, s_dcon, C3, C2, acc);
#pragma unroll
          for (int b = 0; b < BB; ++b) s_dc[b * C + o] = acc[b];
        } else {
          const int k = o - C;
#pragma unroll
          for (int b = 0; b < BB; ++b) acc[b] = 0.f;
          dot_cols<BB>(W[kConF], F, k, s_dcon, C3, C3, acc);
#pragma unroll
          for (int b = 0; b < BB; ++b) {
            float v = 0.f;
            if (b < nb) {
              const float dfp = acc[b] * (p.mask_f ? p.mask_f[(row0 + b) * F + k] : 1.f);
              if (t > 0) {
                v = dfp + (p.d_factors ? p.d_factors[(prow0 + b) * F + k] : 0.f);
                p.d_ftot[(prow0 + b) * F + k] = v;
              } else {
                p.d_f0[static_cast<int64_t>(b0 + b) * F + k] = dfp;
              }
            }
            s_dft[b * F + k] = v;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < nb * G; i += blockDim.x)
    p.d_g0[static_cast<int64_t>(b0) * G + i] = s_dg[i];
  for (int i = threadIdx.x; i < nb * C; i += blockDim.x)
    p.d_c0[static_cast<int64_t>(b0) * C + i] = s_dc[i];
}

using BackwardKernel = void (*)(DecoderBackwardParams);
constexpr BackwardKernel kBackwardKernels[kNumTiles] = {
    decoder_backward_kernel<1>, decoder_backward_kernel<2>, decoder_backward_kernel<4>,
    decoder_backward_kernel<8>};

}  // namespace

// Forward

size_t decoder_forward_cuda_workspace_size(const DecoderShape& s) {
  SlotSource src[kNumSlots];
  slot_sources(s, DecoderForwardArgs<float>{}, src);
  size_t floats = 0;
  for (int i = 0; i < kNumSlots; ++i) floats += align4(src[i].rows * src[i].cols);
  return floats * sizeof(float);
}

void decoder_forward_cuda(const DecoderShape& s, const DecoderForwardArgs<float>& a,
                          void* workspace, cudaStream_t stream) {
  check_shape(s);
  if (s.B == 0) return;
  LFADS_CUDA_REQUIRE(a.xgen && a.W_gen_hh && a.g0 && a.f0 && a.W_fac && a.gen_states &&
                         a.gen_gates && a.factors && workspace,
                     "decoder_forward_cuda: a required generator pointer is null");
  LFADS_CUDA_REQUIRE(s.C == 0 || (a.xcon && a.W_con_f && a.W_con_hh && a.c0 && a.con_states &&
                                  a.con_gates),
                     "decoder_forward_cuda: a required controller pointer is null");
  LFADS_CUDA_REQUIRE(s.U == 0 || (a.W_co && a.b_co && a.W_gen_u && a.co_mean && a.co_logvar &&
                                  a.u && (!s.sample || a.eps)),
                     "decoder_forward_cuda: a required controller-output pointer is null");
  SlotSource src[kNumSlots];
  slot_sources(s, a, src);
  rnn_cuda::TransposeJobs jobs{};
  DecoderForwardParams p{s.T,      s.B,      s.C,     s.U,    s.G,
                         s.F,      s.ld_xc,  s.ld_xg, static_cast<float>(s.clip),
                         s.sample, a.xcon,   a.c0,    a.b_co, a.eps,
                         a.mask_f, a.xgen,   a.g0,    a.f0,   a.mask_g,
                         a.con_states, a.con_gates, a.co_mean, a.co_logvar, a.u,
                         a.gen_states, a.gen_gates, a.factors, WeightSlots{}};
  float* dst = static_cast<float*>(workspace);
  for (int i = 0; i < kNumSlots; ++i) {
    const int n = src[i].rows * src[i].cols;
    jobs.src[i] = slot_pointer(src[i]);
    jobs.dst[i] = dst;
    jobs.rows[i] = n > 0 ? src[i].rows : 0;
    jobs.cols[i] = n > 0 ? src[i].cols : 0;
    p.w.global[i] = dst;
    p.w.floats[i] = n;
    dst += align4(n);
  }
  jobs.count = kNumSlots;
  p.w.count = kNumSlots;
  rnn_cuda::transpose_all(jobs, stream);
  const int outputs = std::max({3 * s.C, 3 * s.G, s.F, s.U});
  const rnn_cuda::LaunchPlan plan =
      rnn_cuda::plan_launch(kForwardKernels, s.B, rnn_cuda::round_threads(outputs), p.w,
                            [&s](int bb) { return forward_state_floats(bb, s); });
  p.w = plan.slots;
  kForwardKernels[plan.tile]<<<plan.blocks, plan.threads, plan.smem, stream>>>(p);
  LFADS_CUDA_CHECK(cudaGetLastError());
}

// Backward

void decoder_backward_cuda(const DecoderShape& s, const DecoderBackwardArgs<float>& a,
                           const DecoderBackwardCudaWork& work, cudaStream_t stream) {
  check_shape(s);
  LFADS_CUDA_REQUIRE(!a.d_W_con_f && !a.d_W_con_hh && !a.d_W_co && !a.d_b_co && !a.d_W_gen_u &&
                         !a.d_W_gen_hh && !a.d_W_fac,
                     "decoder_backward_cuda does not compute weight gradients (pass nullptr; the "
                     "caller reduces them from the DecoderBackwardCudaWork outputs)");
  if (s.B == 0) return;
  const DecoderForwardArgs<float>& f = a.fwd;
  LFADS_CUDA_REQUIRE(f.W_gen_hh && f.g0 && f.W_fac && f.gen_states && f.gen_gates && a.d_xgen &&
                         a.d_g0 && a.d_f0 && work.d_factors_total && work.rh_gen,
                     "decoder_backward_cuda: a required generator pointer is null");
  LFADS_CUDA_REQUIRE(s.C == 0 || (f.W_con_f && f.W_con_hh && f.c0 && f.con_states &&
                                  f.con_gates && a.d_xcon && a.d_c0 && work.rh_con),
                     "decoder_backward_cuda: a required controller pointer is null");
  LFADS_CUDA_REQUIRE(s.U == 0 || (f.W_co && f.W_gen_u && work.d_co &&
                                  (!s.sample || (f.eps && f.co_logvar))),
                     "decoder_backward_cuda: a required controller-output pointer is null");
  SlotSource src[kNumSlots];
  slot_sources(s, f, src);
  DecoderBackwardParams p{s.T,           s.B,          s.C,           s.U,
                          s.G,           s.F,          s.ld_xc,       s.ld_xg,
                          static_cast<float>(s.clip),  s.sample,      f.c0,
                          f.eps,         f.co_logvar,  f.mask_f,      f.g0,
                          f.mask_g,      f.con_states, f.con_gates,   f.gen_states,
                          f.gen_gates,   a.d_factors,  a.d_co_mean,   a.d_co_logvar,
                          a.d_xcon,      a.d_c0,       a.d_xgen,      a.d_g0,
                          a.d_f0,        work.d_factors_total, work.d_co, work.rh_gen,
                          work.rh_con,   WeightSlots{}};
  for (int i = 0; i < kNumSlots; ++i) {
    p.w.global[i] = slot_pointer(src[i]);
    p.w.floats[i] = src[i].rows * src[i].cols;
  }
  p.w.count = kNumSlots;
  int outputs = std::max({s.G + s.U, s.C + s.F, s.G});
  if (s.C == 0) outputs = std::max(outputs, s.G + s.F);
  const rnn_cuda::LaunchPlan plan =
      rnn_cuda::plan_launch(kBackwardKernels, s.B, rnn_cuda::round_threads(outputs), p.w,
                            [&s](int bb) { return backward_state_floats(bb, s); });
  p.w = plan.slots;
  kBackwardKernels[plan.tile]<<<plan.blocks, plan.threads, plan.smem, stream>>>(p);
  LFADS_CUDA_CHECK(cudaGetLastError());
}

}  // namespace lfads
