// Fixed-point solvers on the CPU. The cell math comes from gru_cell.h (gate, update and backward
// helpers, shared with the GRU kernels), so F, its gradient and the Jacobian cannot drift from
// the GRU the model trains.
//
// Parallelism: Newton and the Jacobians run one point per task (dynamic schedule: points
// converge after very different numbers of steps). Evaluation and Adam run chunks of points
// per task, packed so that the active rows of a chunk stay contiguous for the recurrent GEMMs;
// a point that stops is swapped out of its chunk and costs nothing more.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "fixed_points.h"
#include "gru.h"
#include "gru_cell.h"

#include "cblas.h"

namespace lfads {

namespace {

// Rows of xproj per point.
inline int64_t xrow(int64_t k, int H) { return k * 3 * H; }

// ---------------------------------------------------------------------------- single point

// BLAS level 2 for the one-point step (OpenBLAS's gemm with one row is several times slower).
inline void gemv(int M, int N, const float* A, const float* x, float* y) {
  scipy_cblas_sgemv(CblasRowMajor, CblasNoTrans, M, N, 1.f, A, N, x, 1, 0.f, y, 1);
}
inline void gemv(int M, int N, const double* A, const double* x, double* y) {
  scipy_cblas_dgemv(CblasRowMajor, CblasNoTrans, M, N, 1.0, A, N, x, 1, 0.0, y, 1);
}

// One step from h [H] with input projection x [3H]: F [H], res = F - h [H], gates [3H] (z, r,
// n at h), as gru_step_forward_cpu for one row. scratch: [3H]. Returns q = 1/2 ||res||^2.
template <typename S>
S step_residual(int H, const S* W_hh, const S* x, const S* h, S clip, S* F, S* res, S* gates,
                S* scratch) {
  S* hzr = scratch;         // [2H]
  S* hn = scratch + 2 * H;  // [H]
  S* rh = res;              // r * h, until res is written
  gemv(2 * H, H, W_hh, h, hzr);
#pragma omp simd
  for (int j = 0; j < H; ++j) {
    gates[j] = gru_gate(x[j], hzr[j]);
    gates[H + j] = gru_gate(x[H + j], hzr[H + j]);
    rh[j] = gates[H + j] * h[j];
  }
  gemv(H, H, W_hh + 2 * H * H, rh, hn);
  S q = 0;
#pragma omp simd reduction(+ : q)
  for (int j = 0; j < H; ++j) {
    S n;
    F[j] = gru_update(gates[j], x[2 * H + j], hn[j], h[j], clip, &n);
    gates[2 * H + j] = n;
    res[j] = F[j] - h[j];
    q += res[j] * res[j];
  }
  return q / 2;
}

// Jacobian, transposed: Jt [H, ldj] = (dF/dh)^T at h [H], from the gates [3H] of the step at h.
// W_hz_t: [H, H] W_hz transposed. P: [H, H] scratch; coef: [3H] scratch.
// Transposed because the Newton solver factors (J - I)^T (see lu_solve_transposed).
template <typename S>
void build_jacobian_t(int H, const S* W_hh, const S* W_hz_t, const S* h, const S* gates, S clip,
                      S* Jt, int ldj, S* P, S* coef) {
  const S* W_hr = W_hh + H * H;
  const S* W_hn = W_hh + 2 * H * H;
  const S* z = gates;
  const S* r = gates + H;
  const S* n = gates + 2 * H;
  // P = d(r * h)/dh = diag(r) + diag(c) W_hr; the backward helper with unit upstream gradient
  // gives c = dr_pre and r = dh_reset.
  for (int k = 0; k < H; ++k) {
    S c, rk;
    gru_backward_reset(S(1), r[k], h[k], &c, &rk);
    const S* w = W_hr + k * H;
    S* p = P + k * H;
#pragma omp simd
    for (int j = 0; j < H; ++j) p[j] = c * w[j];
    p[k] += rk;
  }
  // J = diag(a) W_hz + diag(b) W_hn P + diag(d), clip mask folded into a, b, d by the helper.
  S* a = coef;
  S* b = coef + H;
  S* d = coef + 2 * H;
  for (int i = 0; i < H; ++i) gru_backward_update(S(1), z[i], n[i], h[i], clip, &a[i], &b[i], &d[i]);
  gemm<S>(true, true, H, H, H, S(1), P, H, W_hn, H, S(0), Jt, ldj);  // (W_hn P)^T
  for (int j = 0; j < H; ++j) {
    S* row = Jt + int64_t(j) * ldj;
    const S* w = W_hz_t + j * H;
#pragma omp simd
    for (int i = 0; i < H; ++i) row[i] = a[i] * w[i] + b[i] * row[i];
    row[j] += d[j];
  }
}

// W_hz^T [H, H] from W_hh [3H, H], shared read-only by the threads.
template <typename S>
std::vector<S> transpose_hz(int H, const S* W_hh) {
  std::vector<S> t(size_t(H) * H);
  for (int i = 0; i < H; ++i)
    for (int j = 0; j < H; ++j) t[size_t(j) * H + i] = W_hh[size_t(i) * H + j];
  return t;
}

template <typename S>
S max_abs(int n, const S* v) {
  S m = 0;
  for (int i = 0; i < n; ++i) m = std::max(m, std::abs(v[i]));
  return m;
}

template <typename S>
S dot(int n, const S* a, const S* b) {
  S s = 0;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// ---------------------------------------------------------------------------- small LU
// Dense LU with partial pivoting for one n x n system (n up to a few hundred), written for the
// hot loop of the Newton solver: LAPACK's getrf/getrs spend most of their time in call and
// blocking overhead at these sizes. Rows are padded to ld, a multiple of kLuAlign elements
// (zero padding), and L is kept apart from U, so that row updates run over whole vectors from
// an aligned column; what they leave below the diagonal of U is never read. Each panel of
// kLuPanel columns is factored in a contiguous copy and then applied to the trailing rows in
// one pass (a rank-kLuPanel update per row: one store per kLuPanel multiply-adds).

template <typename S>
constexpr int kLuAlign = 64 / int(sizeof(S));  // one cache line
constexpr int kLuPanel = 8;

inline int lu_ld(int n, int align) { return (n + align - 1) / align * align; }

// A [n, ld]: in, the matrix (zero beyond column n); out, U on and above the diagonal. L [n, ld]:
// in, zeros; out, the unit lower factor's multipliers below the diagonal. perm [n]: the row
// swapped with row k at step k (P A = L U, P the swaps in order). panel: [kLuPanel, ld] scratch.
// Returns 0, or k + 1 if pivot k is exactly zero.
template <typename S>
int lu_factor(int n, int ld, S* A, S* L, int* perm, S* panel) {
  constexpr int V = kLuAlign<S>;
  for (int k0 = 0; k0 < n; k0 += kLuPanel) {
    const int k1 = std::min(n, k0 + kLuPanel), nb = k1 - k0;
    // The panel's columns, rows k0..n-1, gathered contiguous: panel[c][i] = A[i][k0 + c].
    for (int i = k0; i < n; ++i)
      for (int c = 0; c < nb; ++c) panel[c * ld + i] = A[int64_t(i) * ld + k0 + c];
    for (int k = k0; k < k1; ++k) {
      S* col = panel + (k - k0) * ld;
      S best = 0;  // the largest |entry| first (vectorised), then its first row
#pragma omp simd reduction(max : best)
      for (int i = k; i < n; ++i) best = std::max(best, std::abs(col[i]));
      int p = k;
      while (p < n - 1 && std::abs(col[p]) != best) ++p;
      perm[k] = p;
      if (best == 0) return k + 1;
      if (p != k) {
        std::swap_ranges(A + int64_t(k) * ld, A + int64_t(k + 1) * ld, A + int64_t(p) * ld);
        std::swap_ranges(L + int64_t(k) * ld, L + int64_t(k) * ld + k0, L + int64_t(p) * ld);
        for (int c = 0; c < nb; ++c) std::swap(panel[c * ld + k], panel[c * ld + p]);
      }
      const S inv = S(1) / col[k];
#pragma omp simd
      for (int i = k + 1; i < n; ++i) col[i] *= inv;  // the multipliers
      for (int c = k - k0 + 1; c < nb; ++c) {
        S* other = panel + c * ld;
        const S u = other[k];
#pragma omp simd
        for (int i = k + 1; i < n; ++i) other[i] -= col[i] * u;
      }
    }
    // Back from the panel: U on and above the diagonal, multipliers below it into L.
    for (int i = k0; i < k1; ++i)
      for (int c = 0; c < nb; ++c)
        (c < i - k0 ? L : A)[int64_t(i) * ld + k0 + c] = panel[c * ld + i];
    for (int i = k1; i < n; ++i)
      for (int c = 0; c < nb; ++c) L[int64_t(i) * ld + k0 + c] = panel[c * ld + i];
    if (k1 == n) break;
    // Rows k0 .. k1-1 right of the panel: solve with the panel's unit lower triangle.
    for (int r = k0 + 1; r < k1; ++r) {
      S* ar = A + int64_t(r) * ld;
      for (int c = k0; c < r; ++c) {
        const S l = L[int64_t(r) * ld + c];
        const S* ac = A + int64_t(c) * ld;
#pragma omp simd
        for (int j = k1; j < ld; ++j) ar[j] -= l * ac[j];
      }
    }
    // Trailing rows: one pass each, from the aligned column at or left of k1.
    const int j0 = k1 / V * V;
    const S* u0 = A + int64_t(k0) * ld;
    if (nb == kLuPanel) {  // written out so that the eight rows of U stay in registers
      static_assert(kLuPanel == 8, "the unrolled update below is for panels of 8");
      const S *u1 = u0 + ld, *u2 = u1 + ld, *u3 = u2 + ld, *u4 = u3 + ld, *u5 = u4 + ld,
              *u6 = u5 + ld, *u7 = u6 + ld;
      for (int i = k1; i < n; ++i) {
        S* ai = A + int64_t(i) * ld;
        const S* l = L + int64_t(i) * ld + k0;
        const S l0 = l[0], l1 = l[1], l2 = l[2], l3 = l[3], l4 = l[4], l5 = l[5], l6 = l[6],
                l7 = l[7];
#pragma omp simd
        for (int j = j0; j < ld; ++j)
          ai[j] -= (l0 * u0[j] + l1 * u1[j] + l2 * u2[j] + l3 * u3[j]) +
                   (l4 * u4[j] + l5 * u5[j] + l6 * u6[j] + l7 * u7[j]);
      }
    } else {
      for (int i = k1; i < n; ++i) {
        S* ai = A + int64_t(i) * ld;
        for (int c = k0; c < k1; ++c) {
          const S l = L[int64_t(i) * ld + c];
          const S* ac = A + int64_t(c) * ld;
#pragma omp simd
          for (int j = j0; j < ld; ++j) ai[j] -= l * ac[j];
        }
      }
    }
  }
  return 0;
}

// Solves A^T x = b with the factors of lu_factor(A): A^T = U^T L^T P, so U^T z = b, L^T w = z,
// x = P^T w. Both triangular solves sweep rows of U and L (axpy form: no reductions, contiguous).
// x [ld]: in, b in the first n entries; out, the solution. z: [ld] scratch.
template <typename S>
void lu_solve_transposed(int n, int ld, const S* U, const S* L, const int* perm, S* x, S* z) {
  constexpr int V = kLuAlign<S>;
  // U^T z = b: z_i from b_i, then b_j -= U[i][j] z_i for j > i (from the aligned column: the
  // entries of b it touches at j <= i are spent).
  for (int i = 0; i < n; ++i) {
    const S* ui = U + int64_t(i) * ld;
    const S zi = x[i] / ui[i];
    z[i] = zi;
#pragma omp simd
    for (int j = i / V * V; j < ld; ++j) x[j] -= ui[j] * zi;
  }
  // L^T w = z in place: w_i = z_i, then z_j -= L[i][j] w_i for j < i (L[i][j] = 0 for j >= i).
  for (int i = n - 1; i > 0; --i) {
    const S* li = L + int64_t(i) * ld;
    const S wi = z[i];
    const int je = (i + V - 1) / V * V;
#pragma omp simd
    for (int j = 0; j < je; ++j) z[j] -= li[j] * wi;
  }
  for (int k = n - 1; k >= 0; --k)
    if (perm[k] != k) std::swap(z[k], z[perm[k]]);
  std::copy(z, z + n, x);
}

// ---------------------------------------------------------------------------- Newton

// Tuning constants of the Newton solver, with the reasons for their values.
// A quasi-Newton step (factorisation reused, Broyden-corrected) is kept when it cuts q at
// least this much: a Jacobian with its factorisation costs as much as several such steps.
constexpr double kQuasiRatio = 0.8;
// Broyden updates kept per factorisation (each costs two O(H) passes per solve).
constexpr int kMaxBroyden = 16;
// Rejected quasi-Newton trials (each still updates the Broyden matrix) before the Jacobian
// is rebuilt.
constexpr int kQuasiRetries = 2;
// Armijo constant of the backtracking line search on q (sufficient decrease).
constexpr double kArmijo = 1e-4;
// Halvings of the step before the line search gives up and Levenberg-Marquardt takes over:
// a Newton direction that fails at 1/16 of its (capped) length is a poor one, and shorter
// trials cost more evaluations than they save (measured with bench/bench_fixed_points.py).
constexpr int kMaxHalvings = 4;
// Largest first trial step in any unit. Every fixed point lies in [-1, 1]^H (fixed_points.h);
// full Newton steps longer than a quarter of that width rarely pass the line search (measured
// with bench/bench_fixed_points.py: starting longer costs trials and convergence).
constexpr double kMaxStep = 0.5;
// A point whose q has not halved over this many accepted steps is not near a regular root
// (Newton cuts q by orders of magnitude per step there): it is stopped, unconverged. Within
// Levenberg-Marquardt (entered where Newton steps fail) the window is shorter: those points
// mostly descend into a local minimum of q above zero (a slow point).
constexpr int kStallSteps = 6, kLmStallSteps = 3;
constexpr double kStallRatio = 0.5;
// Levenberg-Marquardt damping: initial mu relative to the largest diagonal entry of
// (J-I)^T (J-I), factors on failure / success, and tries before the point is declared stuck
// (mu then spans 10 decades, down to gradient steps of any useful length). Newton steps
// resume after an LM step that leaves q below kLmExit times its value before.
constexpr double kLmInit = 1e-3, kLmUp = 10.0, kLmDown = 0.3, kLmExit = 0.25;
constexpr int kLmTries = 10;

// Per-thread buffers of the Newton solver, one point at a time.
template <typename S>
struct NewtonWork {
  int H, ld;
  std::vector<S> mats;  // Jrt, U, L: [3, H, ld]; P, A: [2, H, H]; panel [kLuPanel, ld]
  std::vector<S> vecs;
  std::vector<S> bro;   // Broyden pairs: a, s [2, kMaxBroyden, H]
  std::vector<int> perm;
  S *Jrt, *U, *L, *P, *A, *panel;  // Jrt = (J - I)^T
  S *h, *h1, *F, *F1, *res, *res1, *g, *gates, *gates1, *scratch;
  S *d, *y, *w;  // [ld] each: solve right-hand sides / solutions and the solver's scratch
  int n_bro = 0;

  explicit NewtonWork(int H_)
      : H(H_), ld(lu_ld(H_, kLuAlign<S>)),
        mats(size_t(3 * H_ + kLuPanel) * ld + size_t(2) * H_ * H_),
        vecs(size_t(16) * H_ + size_t(3) * ld), bro(size_t(2) * kMaxBroyden * H_), perm(H_) {
    Jrt = mats.data();
    U = Jrt + size_t(H) * ld;
    L = U + size_t(H) * ld;
    P = L + size_t(H) * ld;
    A = P + size_t(H) * H;
    panel = A + size_t(H) * H;
    S* v = vecs.data();
    for (S** p : {&h, &h1, &F, &F1, &res, &res1, &g}) {
      *p = v;
      v += H;
    }
    gates = v;
    gates1 = v + 3 * H;
    scratch = v + 6 * H;
    d = v + 9 * H;
    y = d + ld;
    w = y + ld;
  }
  // The trial point becomes the current one.
  void accept() {
    std::swap(h, h1);
    std::swap(F, F1);
    std::swap(res, res1);
    std::swap(gates, gates1);
  }
  // Factors the transpose of the n x n matrix B, given as Bt [n, ldm] = B^T (copied into U), so
  // that apply_inverse solves with B. Returns false if B is singular.
  bool factor_transposed(const S* Bt, int ldm, int n) {
    for (int i = 0; i < n; ++i) {
      std::copy(Bt + int64_t(i) * ldm, Bt + int64_t(i) * ldm + n, U + int64_t(i) * ld);
      std::fill(U + int64_t(i) * ld + n, U + int64_t(i + 1) * ld, S(0));
    }
    std::fill(L, L + size_t(n) * ld, S(0));
    n_bro = 0;
    return lu_factor(n, ld, U, L, perm.data(), panel) == 0;
  }
  // v [ld] (first H entries set) <- B^{-1} v, B = the factored J - I with the Broyden updates:
  // B_k^{-1} = (I + a_{k-1} s_{k-1}^T) ... (I + a_0 s_0^T) B_0^{-1}.
  void apply_inverse(S* v) {
    std::fill(v + H, v + ld, S(0));
    lu_solve_transposed(H, ld, U, L, perm.data(), v, y);
    for (int i = 0; i < n_bro; ++i) {
      const S* a = bro.data() + size_t(i) * H;
      const S* s = bro.data() + size_t(kMaxBroyden + i) * H;
      const S c = dot(H, s, v);
#pragma omp simd
      for (int j = 0; j < H; ++j) v[j] += c * a[j];
    }
  }
  // Good Broyden update after the step s = h1 - h with residual change res1 - res (before
  // accept()): B^{-1} <- B^{-1} + (s - B^{-1} y) s^T B^{-1} / (s^T B^{-1} y).
  void broyden_update() {
    if (n_bro == kMaxBroyden) return;
    S* s = bro.data() + size_t(kMaxBroyden + n_bro) * H;
    for (int j = 0; j < H; ++j) {
      s[j] = h1[j] - h[j];
      w[j] = res1[j] - res[j];
    }
    apply_inverse(w);
    const S den = dot(H, s, w);
    const S scale = std::sqrt(dot(H, s, s) * dot(H, w, w));
    if (!(std::abs(den) > S(1e-6) * scale)) return;  // nearly orthogonal: the update would blow up
    S* a = bro.data() + size_t(n_bro) * H;
    for (int j = 0; j < H; ++j) a[j] = (s[j] - w[j]) / den;
    ++n_bro;
  }
};

// Iterates stay in the cube [-bound, bound]^H, bound = min(1, clip), which holds every fixed
// point: outside it the clip flattens F, and q has spurious minima at the clip boundary.
template <typename S>
void newton_point(int H, const S* W_hh, const S* W_hz_t, const S* x, S clip,
                  const NewtonOptions& o, S* h_io, S* q_out, int32_t* it_out, uint8_t* conv_out,
                  NewtonWork<S>& w) {
  const S bound = std::min(S(1), clip);
  auto box = [&](S v) { return std::min(bound, std::max(-bound, v)); };
  for (int j = 0; j < H; ++j) w.h[j] = box(h_io[j]);
  S q = step_residual(H, W_hh, x, w.h, clip, w.F, w.res, w.gates, w.scratch);
  auto trial = [&](S alpha) {  // h1 = h + alpha d, kept in the cube; returns q(h1)
    for (int j = 0; j < H; ++j) w.h1[j] = box(w.h[j] + alpha * w.d[j]);
    return step_residual(H, W_hh, x, w.h1, clip, w.F1, w.res1, w.gates1, w.scratch);
  };

  // Levenberg-Marquardt step at h from the fresh (J - I)^T in w.Jrt:
  // ((J-I)^T (J-I) + mu I) d = -(J-I)^T res, by the same LU (the matrix is SPD). mu adapts
  // across calls. Returns false when no mu lowers q: h is at a local minimum of q.
  S mu = 0;
  auto lm_step = [&]() {
    gemm<S>(false, true, H, H, H, S(1), w.Jrt, w.ld, w.Jrt, w.ld, S(0), w.A, H);
    for (int i = 0; i < H; ++i) w.g[i] = dot(H, w.Jrt + int64_t(i) * w.ld, w.res);
    if (mu == 0) {
      S diag = 0;
      for (int i = 0; i < H; ++i) diag = std::max(diag, w.A[i * H + i]);
      mu = S(kLmInit) * (diag > 0 ? diag : S(1));
    }
    for (int t = 0; t < kLmTries; ++t, mu *= S(kLmUp)) {
      for (int i = 0; i < H; ++i) w.A[i * H + i] += mu;
      const bool ok = w.factor_transposed(w.A, H, H);  // symmetric
      for (int i = 0; i < H; ++i) w.A[i * H + i] -= mu;
      if (!ok) continue;
      for (int j = 0; j < H; ++j) w.d[j] = -w.g[j];
      w.apply_inverse(w.d);
      const S q1 = trial(S(1));
      if (q1 < q) {
        w.accept();
        q = q1;
        mu *= S(kLmDown);
        return true;
      }
    }
    return false;
  };

  int it = 0, it_mark = 0, lm_steps = 0, retries = 0;
  S q_mark = q, q_lm = 0;
  bool converged = false, have_lu = false, fresh = false, lm_mode = false;
  while (std::isfinite(q)) {
    if (q <= S(o.tol_q)) {
      converged = true;
      break;
    }
    if (it >= o.max_iters) break;
    if (it - it_mark >= kStallSteps) {
      if (q > S(kStallRatio) * q_mark) break;
      q_mark = q;
      it_mark = it;
    }
    if (!have_lu || lm_mode) {
      build_jacobian_t(H, W_hh, W_hz_t, w.h, w.gates, clip, w.Jrt, w.ld, w.P, w.scratch);
      for (int i = 0; i < H; ++i) w.Jrt[int64_t(i) * w.ld + i] -= S(1);
      have_lu = fresh = false;
      if (!lm_mode) {
        have_lu = fresh = w.factor_transposed(w.Jrt, w.ld, H);
        lm_mode = !have_lu;  // J - I singular
      }
    }
    if (!lm_mode) {
      for (int j = 0; j < H; ++j) w.d[j] = -w.res[j];
      w.apply_inverse(w.d);
      const S dmax = max_abs(H, w.d);
      if (!std::isfinite(dmax)) {  // a reused factorisation gone bad, or a useless fresh one
        lm_mode = fresh;
        have_lu = false;
        continue;
      }
      if (dmax <= S(o.tol_step) * (S(1) + max_abs(H, w.h))) {
        // A root to working precision: keep the last step only if it did not hurt.
        const S q1 = trial(S(1));
        if (q1 <= q) {
          w.accept();
          q = q1;
          ++it;
        }
        converged = true;
        break;
      }
      if (!fresh) {  // quasi-Newton step on the reused factorisation
        const S q1 = trial(S(1));
        w.broyden_update();  // a rejected trial still measures the residual's change
        if (q1 <= S(kQuasiRatio) * q) {
          w.accept();
          q = q1;
          ++it;
          retries = 0;
        } else if (++retries > kQuasiRetries) {
          have_lu = false;
          retries = 0;
        }
        continue;
      }
      // Fresh Jacobian: backtracking line search on the Newton step.
      S alpha = std::min(S(1), S(kMaxStep) / dmax);
      for (int ls = 0; ls < kMaxHalvings && fresh; ++ls, alpha /= 2) {
        const S q1 = trial(alpha);
        if (q1 <= (S(1) - S(2 * kArmijo) * alpha) * q) {
          w.broyden_update();
          w.accept();
          q = q1;
          ++it;
          fresh = false;
        }
      }
      if (!fresh) continue;
      lm_mode = true;  // the Newton step does not descend: J - I is (nearly) singular here
    }
    // Levenberg-Marquardt, with the fresh J - I, until a step cuts q enough for Newton.
    if (lm_steps == 0) q_lm = q;
    const S q0 = q;
    if (!lm_step()) break;  // a local minimum of q above tol_q: a slow point
    ++it;
    have_lu = false;
    lm_mode = q > S(kLmExit) * q0;
    lm_steps = lm_mode ? lm_steps + 1 : 0;
    if (lm_steps >= kLmStallSteps) {
      if (q > S(kStallRatio) * q_lm) break;
      lm_steps = 0;
    }
  }
  std::copy(w.h, w.h + H, h_io);
  *q_out = q;
  *it_out = it;
  *conv_out = converged ? 1 : 0;
}

// ---------------------------------------------------------------------------- Adam

// Points per packed chunk of the Adam and evaluation loops: large enough for efficient
// recurrent GEMMs, small enough that a chunk's state stays in L2.
constexpr int kChunk = 64;

// FixedPointFinder's adaptive learning rate for one point (no warm-up, as its default).
struct AdaptiveRate {
  double rate;
  int step = 0, last_update = -1;
  int head = -1;              // ring slot of the newest loss
  std::vector<double> ring;   // the last max(n_decrease, n_increase) + 1 losses

  void reset(const AdamOptions& o) {
    rate = o.initial_rate;
    step = 0;
    last_update = -1;
    head = -1;
    ring.assign(std::max(o.n_decrease, o.n_increase) + 1, 0.0);
  }
  double age(int a) const {  // loss of a steps ago
    const int R = int(ring.size());
    return ring[((head - a) % R + R) % R];
  }
  void update(double loss, const AdamOptions& o) {
    head = (head + 1) % int(ring.size());
    ring[head] = loss;
    if (step == 0) {
      last_update = 0;
    } else if (step >= last_update + o.n_decrease && worse_than_window(o.n_decrease)) {
      rate *= o.decrease_factor;
      last_update = step;
    } else if (step >= last_update + o.n_increase && decreasing_window(o.n_increase)) {
      rate *= o.increase_factor;
      last_update = step;
    }
    ++step;
  }
  bool worse_than_window(int n) const {
    for (int a = 1; a <= n; ++a)
      if (!(age(0) > age(a))) return false;
    return true;
  }
  bool decreasing_window(int n) const {
    for (int a = 0; a < n; ++a)
      if (!(age(a) < age(a + 1))) return false;
    return true;
  }
};

// FixedPointFinder's adaptive gradient-norm clip for one point.
struct AdaptiveClip {
  double value;
  int step = 0;
  std::vector<double> window, sorted;

  void reset(const AdamOptions& o) {
    value = o.clip_initial;
    step = 0;
    window.assign(o.clip_window, 0.0);
    sorted.resize(o.clip_window);
  }
  void update(double norm, const AdamOptions& o) {
    const int W = int(window.size());
    window[step % W] = norm;
    ++step;
    const int n = std::min(step, W);
    // numpy.percentile's default (linear interpolation between the two nearest ranks).
    std::copy(window.begin(), window.begin() + n, sorted.begin());
    const double pos = (n - 1) * o.clip_percentile / 100.0;
    const int lo = int(pos);
    std::nth_element(sorted.begin(), sorted.begin() + lo, sorted.begin() + n);
    double v = sorted[lo];
    if (lo + 1 < n) {
      const double next = *std::min_element(sorted.begin() + lo + 1, sorted.begin() + n);
      v += (pos - lo) * (next - v);
    }
    value = std::min(v, o.clip_max);
  }
};

// Rows of a chunk of points, packed: F, its residual and the vector-Jacobian product J^T res.
template <typename S>
struct Packed {
  int H;
  std::vector<S> h, x, F, res, gates, dh, dx, scratch;  // [kChunk, H or 3H or 4H]

  explicit Packed(int H_)
      : H(H_), h(size_t(kChunk) * H_), x(size_t(kChunk) * 3 * H_), F(h.size()), res(h.size()),
        gates(x.size()), dh(h.size()), dx(x.size()), scratch(size_t(kChunk) * 4 * H_) {}

  // Rows [0, n): F, res = F - h, q [n] and dh = J^T res at h.
  void residual_grad(int n, const S* W_hh, S clip, S* q) {
    gru_step_forward_cpu<S>(n, H, x.data(), 3 * H, W_hh, h.data(), clip, F.data(), gates.data(),
                            scratch.data());
    for (int64_t i = 0; i < n; ++i) {
      S acc = 0;
      for (int64_t j = i * H; j < (i + 1) * H; ++j) {
        res[j] = F[j] - h[j];
        acc += res[j] * res[j];
      }
      q[i] = acc / 2;
    }
    std::copy(res.begin(), res.begin() + int64_t(n) * H, dh.begin());
    gru_step_backward_cpu<S>(n, H, W_hh, h.data(), gates.data(), clip, dh.data(), dx.data(),
                             3 * H, scratch.data());
  }
};

// A chunk of points under Adam: slot i holds point idx[i]; slots [0, n) are active.
template <typename S>
struct AdamChunk : Packed<S> {
  int n = 0;
  std::vector<S> m, v;  // [kChunk, H] Adam moments
  std::vector<int64_t> idx;
  std::vector<double> q_prev;
  std::vector<AdaptiveRate> alr;
  std::vector<AdaptiveClip> agnc;

  explicit AdamChunk(int H_)
      : Packed<S>(H_), m(this->h.size()), v(this->h.size()), idx(kChunk), q_prev(kChunk),
        alr(kChunk), agnc(kChunk) {}

  // Moves slot `from` into slot `to`; the optimiser state travels with the point.
  void move(int from, int to) {
    const int H = this->H;
    auto mv = [&](std::vector<S>& a, int w) {
      std::copy(a.begin() + int64_t(from) * w, a.begin() + int64_t(from + 1) * w,
                a.begin() + int64_t(to) * w);
    };
    mv(this->h, H);
    mv(this->x, 3 * H);
    mv(m, H);
    mv(v, H);
    idx[to] = idx[from];
    q_prev[to] = q_prev[from];
    std::swap(alr[to], alr[from]);
    std::swap(agnc[to], agnc[from]);
  }
};

}  // namespace

// Evaluation

template <typename S>
void fixed_point_eval_cpu(const FixedPointShape& s, const FixedPointEvalArgs<S>& a) {
  const int K = s.K, H = s.H;
  const S clip = static_cast<S>(s.clip);
  const int n_chunks = (K + kChunk - 1) / kChunk;
  const int nt = std::max(1, std::min(omp_get_max_threads(), n_chunks));
#pragma omp parallel num_threads(nt)
  {
    Packed<S> c(H);
    std::vector<S> q(kChunk);
#pragma omp for schedule(dynamic, 1)
    for (int ch = 0; ch < n_chunks; ++ch) {
      const int k0 = ch * kChunk, n = std::min(kChunk, K - k0);
      std::copy(a.h + int64_t(k0) * H, a.h + int64_t(k0 + n) * H, c.h.begin());
      std::copy(a.xproj + xrow(k0, H), a.xproj + xrow(k0 + n, H), c.x.begin());
      c.residual_grad(n, a.W_hh, clip, q.data());
      std::copy(q.begin(), q.begin() + n, a.q + k0);
      const int64_t o = int64_t(k0) * H;
      if (a.F) std::copy(c.F.begin(), c.F.begin() + int64_t(n) * H, a.F + o);
      if (a.grad)
        for (int64_t j = 0; j < int64_t(n) * H; ++j) a.grad[o + j] = c.dh[j] - c.res[j];
    }
  }
}

template <typename S>
void fixed_point_jacobian_cpu(const FixedPointShape& s, const FixedPointJacobianArgs<S>& a) {
  const int K = s.K, H = s.H;
  const S clip = static_cast<S>(s.clip);
  const int nt = std::max(1, std::min(omp_get_max_threads(), K));
  const std::vector<S> W_hz_t = transpose_hz(H, a.W_hh);
#pragma omp parallel num_threads(nt)
  {
    NewtonWork<S> w(H);
#pragma omp for schedule(dynamic, 1)
    for (int k = 0; k < K; ++k) {
      const S* h = a.h + int64_t(k) * H;
      step_residual(H, a.W_hh, a.xproj + xrow(k, H), h, clip, w.F, w.res, w.gates, w.scratch);
      build_jacobian_t(H, a.W_hh, W_hz_t.data(), h, w.gates, clip, w.Jrt, w.ld, w.P, w.scratch);
      S* J = a.J + int64_t(k) * H * H;
      for (int i = 0; i < H; ++i)
        for (int j = 0; j < H; ++j) J[int64_t(i) * H + j] = w.Jrt[int64_t(j) * w.ld + i];
    }
  }
}

// Newton

template <typename S>
void fixed_points_newton_cpu(const FixedPointShape& s, const NewtonOptions& o,
                             const FixedPointSolveArgs<S>& a) {
  const int K = s.K, H = s.H;
  const S clip = static_cast<S>(s.clip);
  const int nt = std::max(1, std::min(omp_get_max_threads(), K));
  const std::vector<S> W_hz_t = transpose_hz(H, a.W_hh);
#pragma omp parallel num_threads(nt)
  {
    NewtonWork<S> w(H);
#pragma omp for schedule(dynamic, 1)
    for (int k = 0; k < K; ++k)
      newton_point<S>(H, a.W_hh, W_hz_t.data(), a.xproj + xrow(k, H), clip, o,
                      a.h + int64_t(k) * H, a.q + k, a.iterations + k, a.converged + k, w);
  }
}

// Adam

template <typename S>
void fixed_points_adam_cpu(const FixedPointShape& s, const AdamOptions& o,
                           const FixedPointSolveArgs<S>& a) {
  const int K = s.K, H = s.H;
  const S clip = static_cast<S>(s.clip);
  const int n_chunks = (K + kChunk - 1) / kChunk;
  const int nt = std::max(1, std::min(omp_get_max_threads(), n_chunks));
#pragma omp parallel num_threads(nt)
  {
    AdamChunk<S> c(H);
    std::vector<S> q(kChunk);
#pragma omp for schedule(dynamic, 1)
    for (int ch = 0; ch < n_chunks; ++ch) {
      const int k0 = ch * kChunk;
      c.n = std::min(kChunk, K - k0);
      std::copy(a.h + int64_t(k0) * H, a.h + int64_t(k0 + c.n) * H, c.h.begin());
      std::copy(a.xproj + xrow(k0, H), a.xproj + xrow(k0 + c.n, H), c.x.begin());
      std::fill(c.m.begin(), c.m.end(), S(0));
      std::fill(c.v.begin(), c.v.end(), S(0));
      for (int i = 0; i < c.n; ++i) {
        c.idx[i] = k0 + i;
        c.alr[i].reset(o);
        c.agnc[i].reset(o);
      }
      double b1t = 1, b2t = 1;  // beta^t of the bias corrections
      // Iteration k evaluates q at the current h; its update is Adam step t = k.
      for (int k = 1; c.n > 0; ++k) {
        c.residual_grad(c.n, a.W_hh, clip, q.data());
        b1t *= o.beta1;
        b2t *= o.beta2;
        const double bias = std::sqrt(1 - b2t) / (1 - b1t);
        // Descending, so that the slot swapped into i on a stop has been handled already.
        for (int i = c.n - 1; i >= 0; --i) {
          S* h = c.h.data() + int64_t(i) * H;
          S* g = c.dh.data() + int64_t(i) * H;
          const S* res = c.res.data() + int64_t(i) * H;
          const double qi = q[i];
          const double lr = c.alr[i].rate;
          const bool conv =
              k > 1 && (std::abs(qi - c.q_prev[i]) < o.tol_dq * lr || qi < o.tol_q);
          if (conv || k - 1 >= o.max_iters || !std::isfinite(qi)) {
            const int64_t p = c.idx[i];
            std::copy(h, h + H, a.h + p * H);
            a.q[p] = S(qi);
            a.iterations[p] = k - 1;
            a.converged[p] = conv ? 1 : 0;
            if (i != c.n - 1) c.move(c.n - 1, i);
            --c.n;
            continue;
          }
          double norm2 = 0;
          for (int j = 0; j < H; ++j) {
            g[j] -= res[j];  // grad q = J^T res - res
            norm2 += double(g[j]) * g[j];
          }
          const double norm = std::sqrt(norm2);
          const S scale = S(norm > c.agnc[i].value ? c.agnc[i].value / norm : 1.0);
          const S step = S(lr * bias), b1 = S(o.beta1), b2 = S(o.beta2), eps = S(o.eps);
          S* m = c.m.data() + int64_t(i) * H;
          S* v = c.v.data() + int64_t(i) * H;
#pragma omp simd
          for (int j = 0; j < H; ++j) {
            const S gj = g[j] * scale;
            m[j] = b1 * m[j] + (S(1) - b1) * gj;
            v[j] = b2 * v[j] + (S(1) - b2) * gj * gj;
            h[j] -= step * m[j] / (std::sqrt(v[j]) + eps);
          }
          c.q_prev[i] = qi;
          c.alr[i].update(qi, o);
          c.agnc[i].update(norm, o);
        }
      }
    }
  }
}

template void fixed_point_eval_cpu<float>(const FixedPointShape&, const FixedPointEvalArgs<float>&);
template void fixed_point_eval_cpu<double>(const FixedPointShape&,
                                           const FixedPointEvalArgs<double>&);
template void fixed_point_jacobian_cpu<float>(const FixedPointShape&,
                                              const FixedPointJacobianArgs<float>&);
template void fixed_point_jacobian_cpu<double>(const FixedPointShape&,
                                               const FixedPointJacobianArgs<double>&);
template void fixed_points_newton_cpu<float>(const FixedPointShape&, const NewtonOptions&,
                                             const FixedPointSolveArgs<float>&);
template void fixed_points_newton_cpu<double>(const FixedPointShape&, const NewtonOptions&,
                                              const FixedPointSolveArgs<double>&);
template void fixed_points_adam_cpu<float>(const FixedPointShape&, const AdamOptions&,
                                           const FixedPointSolveArgs<float>&);
template void fixed_points_adam_cpu<double>(const FixedPointShape&, const AdamOptions&,
                                            const FixedPointSolveArgs<double>&);

}  // namespace lfads
