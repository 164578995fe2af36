// Fixed points of a trained clipped GRU (the generator): batched solvers for F(h, u) = h.
//
// For K points at once (K initial states, each with its own constant input u_k):
//   F(h)  = one clipped-GRU step from h (gru_cell.h) with input projection x_k = W_ih u_k + b_ih
//   res   = F(h) - h,     q = 1/2 ||res||^2,     grad q = (J - I)^T res,     J = dF/dh
// Contract (shapes use the names of common.h; K = points, H = hidden units):
//   The input projection xproj = u @ W_ih^T + b_ih is computed outside (one GEMM), as for the
//   GRU sequence op; these kernels see only W_hh and xproj.
//   Analytic Jacobian, per unit i (m_i = 1 where -clip <= pre_i <= clip, else 0):
//     J = diag(m z) + diag(m a) W_hz + diag(m b) W_hn P,      P = d(r * h)/dh = diag(r) + diag(c) W_hr
//     a = (h - n) z (1 - z),   b = (1 - z)(1 - n^2),   c = h r (1 - r)
//   The W_hn P product makes a Jacobian O(H^3) per point; everything else is O(H^2).
//   Where clip >= 1 every fixed point lies in the open cube (-1, 1)^H: pre = h forces n = h
//   (z < 1), and |n| < 1, so no unit can sit at the clip.
//
// Solvers (each point independent; OpenMP over points; a point that stops costs no more work):
//   Newton: per point, damped Newton on res with the analytic Jacobian, (J - I)^T factored by a
//     small dense LU with partial pivoting. A factorisation is reused, with Broyden updates,
//     while quasi-Newton steps cut q by at least 20% (two misses allowed); otherwise the
//     Jacobian is rebuilt and a backtracking line search (Armijo on q, at most 4 halvings)
//     damps the Newton step. Where J - I is singular or the line search fails,
//     Levenberg-Marquardt steps ((J-I)^T (J-I) + mu I) d = -(J-I)^T res take over until one
//     cuts q 4x. Iterates stay in the cube [-b, b]^H, b = min(1, clip), which holds every
//     fixed point.
//     Converged: q <= tol_q, or a Newton step below tol_step * (1 + ||h||_inf) in every unit
//     (the point is a root to working precision). Stopped unconverged: max_iters; q not
//     halved over 6 steps (3 in Levenberg-Marquardt): no regular root nearby, typically a
//     slow point; no mu of Levenberg-Marquardt lowers q (a local minimum of q above tol_q).
//   Adam: FixedPointFinder's optimiser (Golub & Sussillo 2018) with the objective of each point
//     on its own, as its 'sequential' method does (so the result does not depend on K): TF1
//     Adam (epsilon applied to sqrt(v) before bias correction, default 0.01), a per-point
//     adaptive learning rate (x decrease_factor when q is worse than each of the last
//     n_decrease values, x increase_factor after n_increase strictly decreasing values, at
//     most one change per window), and per-point gradient-norm clipping at a percentile of the
//     last clip_window gradient norms. Iteration k evaluates q_k at the current h, then
//     stops converged if k > 1 and (|q_k - q_{k-1}| < tol_dq * lr or q_k < tol_q), stops
//     unconverged after max_iters updates, and otherwise updates h.
//   iterations reports the updates applied to h; the reported q belongs to the reported h.
#pragma once

#include <cstdint>

#include "common.h"

namespace lfads {

struct FixedPointShape {
  int K;        // points
  int H;        // hidden units
  double clip;  // cell clip (+inf for none)
};

// Evaluation of F, q and grad q at K states.
template <typename S>
struct FixedPointEvalArgs {
  const S* W_hh;   // [3H, H]  recurrent weights, rows z, r, n
  const S* xproj;  // [K, 3H]  input projection incl. b_ih, one row per point
  const S* h;      // [K, H]
  S* F;            // [K, H]   out: one step from h, or nullptr
  S* q;            // [K]      out
  S* grad;         // [K, H]   out: gradient of q, or nullptr
};

template <typename S>
struct FixedPointJacobianArgs {
  const S* W_hh;   // [3H, H]
  const S* xproj;  // [K, 3H]
  const S* h;      // [K, H]
  S* J;            // [K, H, H]  out: J[k, i, j] = dF_i / dh_j at h[k]
};

struct NewtonOptions {
  double tol_q;     // converged when q <= tol_q
  double tol_step;  // converged when every |step_i| <= tol_step * (1 + ||h||_inf)
  int max_iters;    // accepted steps per point at most
};

struct AdamOptions {
  double tol_q, tol_dq;
  int max_iters;
  double beta1, beta2, eps;          // Adam (TF1 form)
  double initial_rate;               // adaptive learning rate
  double decrease_factor, increase_factor;
  int n_decrease, n_increase;        // window lengths (min steps per decrease / increase)
  int clip_window;                   // adaptive gradient-norm clip: window of norms
  double clip_percentile;            // 0..100, linear interpolation as numpy.percentile
  double clip_initial, clip_max;     // clip value before any norm is seen; ceiling
};

// Solver state per point: h in (initial states) and out (final states).
template <typename S>
struct FixedPointSolveArgs {
  const S* W_hh;        // [3H, H]
  const S* xproj;       // [K, 3H]
  S* h;                 // [K, H]  in: initial states; out: final states
  S* q;                 // [K]     out: q at the final states
  int32_t* iterations;  // [K]     out: updates applied
  uint8_t* converged;   // [K]     out: 1 where the stopping rule above says converged
};

template <typename S>
void fixed_point_eval_cpu(const FixedPointShape& s, const FixedPointEvalArgs<S>& a);
template <typename S>
void fixed_point_jacobian_cpu(const FixedPointShape& s, const FixedPointJacobianArgs<S>& a);
template <typename S>
void fixed_points_newton_cpu(const FixedPointShape& s, const NewtonOptions& o,
                             const FixedPointSolveArgs<S>& a);
template <typename S>
void fixed_points_adam_cpu(const FixedPointShape& s, const AdamOptions& o,
                           const FixedPointSolveArgs<S>& a);

}  // namespace lfads
