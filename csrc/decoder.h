// The LFADS decoder: controller, controller-output sampling, generator and factors, coupled
// step by step, forward and full BPTT backward in one call each.
//
// Step t (t = 0 .. T-1), f_{-1} = f0, c_{-1} = c0, g_{-1} = g0:
//   c_t = GRU_con(xcon_t + W_con_f (mask_f_t * f_{t-1}), c_{t-1})      (skipped when C == 0)
//   [co_mean_t, co_logvar_t] = W_co c_t + b_co
//   u_t = co_mean_t + exp(co_logvar_t / 2) * eps_t                    (u_t = co_mean_t if !sample)
//   g_t = GRU_gen(xgen_t + W_gen_u u_t, g_{t-1})
//   f_t = W_fac (mask_g_t * g_t)                                       (W_fac rows unit-norm)
// xcon_t is the controller-input projection of the (dropped-out) CI-encoder outputs plus the
// controller's b_ih; xgen_t is the generator-input projection of the external inputs plus the
// generator's b_ih. Both are computed outside by one large GEMM each, as are their gradients.
#pragma once

#include "common.h"

namespace lfads {

struct DecoderShape {
  int T, B;
  int C;       // controller units; 0 = no controller (then U must be 0)
  int U;       // controller outputs (inferred inputs)
  int G, F;    // generator units, factors
  int ld_xc;   // row stride of xcon / d_xcon (>= 3C)
  int ld_xg;   // row stride of xgen / d_xgen (>= 3G)
  double clip;
  bool sample;  // draw u from the posterior (else u = co_mean)
};

template <typename S>
struct DecoderForwardArgs {
  const S* xcon;      // [T, B, ld_xc]  or nullptr when C == 0
  const S* W_con_f;   // [3C, F]   controller input weights acting on the factors
  const S* W_con_hh;  // [3C, C]
  const S* c0;        // [B, C]
  const S* W_co;      // [2U, C]   rows: U means, then U log-variances
  const S* b_co;      // [2U]
  const S* eps;       // [T, B, U] standard normal noise (read only if sample)
  const S* mask_f;    // [T, B, F] dropout multiplier on f_{t-1} in the controller input, or nullptr
  const S* xgen;      // [T, B, ld_xg]
  const S* W_gen_u;   // [3G, U]   generator input weights acting on u
  const S* W_gen_hh;  // [3G, G]
  const S* g0;        // [B, G]
  const S* f0;        // [B, F]
  const S* W_fac;     // [F, G]    row-normalised
  const S* mask_g;    // [T, B, G] dropout multiplier on g_t before the factors, or nullptr
  // outputs
  S* con_states;      // [T, B, C]
  S* con_gates;       // [T, B, 3C]
  S* co_mean;         // [T, B, U]
  S* co_logvar;       // [T, B, U]
  S* u;               // [T, B, U]
  S* gen_states;      // [T, B, G]
  S* gen_gates;       // [T, B, 3G]
  S* factors;         // [T, B, F]
};

template <typename S>
struct DecoderBackwardArgs {
  DecoderForwardArgs<S> fwd;  // the forward's inputs and outputs
  const S* d_factors;    // [T, B, F] gradient on the factors from the read-out, or nullptr
  const S* d_co_mean;    // [T, B, U] gradient on co_mean from the KL term, or nullptr
  const S* d_co_logvar;  // [T, B, U] gradient on co_logvar from the KL term, or nullptr
  // outputs (overwritten)
  S* d_xcon;      // [T, B, ld_xc] gradient of the controller pre-activations (first 3C columns)
  S* d_W_con_f;   // [3C, F]
  S* d_W_con_hh;  // [3C, C]
  S* d_c0;        // [B, C]
  S* d_W_co;      // [2U, C]
  S* d_b_co;      // [2U]
  S* d_xgen;      // [T, B, ld_xg] gradient of the generator pre-activations (first 3G columns)
  S* d_W_gen_u;   // [3G, U]
  S* d_W_gen_hh;  // [3G, G]
  S* d_g0;        // [B, G]
  S* d_f0;        // [B, F]
  S* d_W_fac;     // [F, G]  gradient on the row-normalised W_fac
  S* work;        // [T, B, 2F + 2G + 2U + C] scratch: per-step values for the weight gradients
};

template <typename S>
void decoder_forward_cpu(const DecoderShape& s, const DecoderForwardArgs<S>& a);
template <typename S>
void decoder_backward_cpu(const DecoderShape& s, const DecoderBackwardArgs<S>& a);

}  // namespace lfads
