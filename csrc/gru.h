// Clipped-GRU sequence op: a whole sequence in one call, either direction.
//
// Contract (shapes use the names of common.h):
//   The input projection for every step, xproj = x @ W_ih^T + b_ih, is computed OUTSIDE the
//   recurrence by one large GEMM; this op runs only the recurrence. Rows of xproj and d_xproj
//   are ldx elements apart (ldx >= 3H) so that several GRUs can share one projection buffer.
//   reverse = true processes t = T-1 ... 0; outputs stay at their original time index, so the
//   final state of a reverse pass is hs[0].
//   Forward saves the gates (z, r, n) of every step; backward recomputes r * h and the clip
//   pre-activation from them instead of redoing the recurrent products.
#pragma once

#include "common.h"

namespace lfads {

struct GruShape {
  int T, B, H;
  int ldx;       // row stride of xproj / d_xproj, >= 3H
  bool reverse;  // run from t = T-1 down to 0
  double clip;   // cell clip (+inf for none)
};

template <typename S>
struct GruForwardArgs {
  const S* xproj;  // [T, B, ldx]  input projection incl. b_ih (first 3H columns used)
  const S* W_hh;   // [3H, H]      recurrent weights, rows z, r, n
  const S* h0;     // [B, H]       initial state
  S* hs;           // [T, B, H]    out: state after step t, at index t
  S* gates;        // [T, B, 3H]   out: z, r, n of step t, saved for backward
};

template <typename S>
struct GruBackwardArgs {
  const S* W_hh;   // [3H, H]
  const S* h0;     // [B, H]
  const S* hs;     // [T, B, H]    from forward
  const S* gates;  // [T, B, 3H]   from forward
  const S* d_hs;   // [T, B, H]    gradient on every output state, or nullptr
  const S* d_hT;   // [B, H]       gradient on the final state (hs[T-1], or hs[0] if reverse), or nullptr
  S* d_xproj;      // [T, B, ldx]  out: gradient of the z, r, n pre-activations (= of xproj), first 3H columns
  S* d_W_hh;       // [3H, H]      out (overwritten)
  S* d_h0;         // [B, H]       out
  S* work;         // [T, B, H]    scratch (r * h of every step)
};

template <typename S>
void gru_forward_cpu(const GruShape& s, const GruForwardArgs<S>& a);
template <typename S>
void gru_backward_cpu(const GruShape& s, const GruBackwardArgs<S>& a);

// One step on a block of Bs rows, shared by the sequence op, the decoder and the fixed-point
// solver. h, h_new: [Bs, H]; xin: [Bs, ldx]; gates: [Bs, 3H]; scratch: [Bs, 4H].
template <typename S>
void gru_step_forward_cpu(int Bs, int H, const S* xin, int ldx, const S* W_hh, const S* h,
                          S clip, S* h_new, S* gates, S* scratch);
// dh: [Bs, H], in: gradient on h_new, out: gradient on h. d_xin: [Bs, ldd], out: gradient of
// the z, r, n pre-activations. scratch: [Bs, 2H].
template <typename S>
void gru_step_backward_cpu(int Bs, int H, const S* W_hh, const S* h, const S* gates, S clip,
                           S* dh, S* d_xin, int ldd, S* scratch);

// Recurrent-weight gradient of a whole sequence, one large GEMM per gate group:
//   d_W_hh[z,r] = sum_t d_x[t][z,r]^T h_prev[t],   d_W_hh[n] = sum_t d_x[t][n]^T rh[t]
// h_prev[t] is hs[t-1] (hs[t+1] if reverse) and h0 for the first step. d_x: [T, B, ldx];
// hs, rh: [T, B, H]; h0: [B, H]; d_W_hh: [3H, H] overwritten. Not inside a parallel region.
template <typename S>
void gru_weight_grad_cpu(int T, int B, int H, const S* d_x, int ldx, const S* hs, const S* h0,
                         const S* rh, bool reverse, S* d_W_hh);

}  // namespace lfads
