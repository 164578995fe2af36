// Bindings of the fixed-point op: evaluation, Jacobians and the two batched solvers.
#include "bindings_util.h"
#include "fixed_points.h"

namespace lfads {
namespace {

// A writeable [K] output of an integer type (checked<S>() names only float types).
template <typename T>
T* checked_counts(const py::object& obj, const char* name, int64_t K, const char* type_name) {
  const bool ok = py::isinstance<py::array>(obj) && [&] {
    py::array a = py::reinterpret_borrow<py::array>(obj);
    return a.dtype().equal(py::dtype::of<T>()) && (a.flags() & py::array::c_style) &&
           a.ndim() == 1 && a.shape(0) == K && a.writeable();
  }();
  if (!ok)
    throw py::value_error(std::string(name) + " must be a writeable [" + std::to_string(K) +
                          "] " + type_name + " array, got " +
                          (py::isinstance<py::array>(obj)
                               ? got_str(py::reinterpret_borrow<py::array>(obj))
                               : py::str(py::type::of(obj)).cast<std::string>()));
  return static_cast<T*>(py::reinterpret_borrow<py::array>(obj).mutable_data());
}

// K and H from h [K, H]; W_hh and xproj checked against them.
struct Dims {
  int64_t K, H;
};

template <typename S>
Dims model_dims(const py::object& W_hh, const py::object& xproj, const py::object& h,
                const S** W_hh_p, const S** xproj_p) {
  const int64_t K = dim(h, "h", 0), H = dim(h, "h", 1);
  *W_hh_p = checked<S>(W_hh, "W_hh", {3 * H, H});
  *xproj_p = checked<S>(xproj, "xproj", {K, 3 * H});
  return {K, H};
}

template <typename S>
void eval(py::object W_hh, py::object xproj, py::object h, double clip, py::object F,
          py::object q, py::object grad) {
  FixedPointEvalArgs<S> a{};
  const Dims d = model_dims<S>(W_hh, xproj, h, &a.W_hh, &a.xproj);
  a.h = checked<S>(h, "h", {d.K, d.H});
  a.F = checked_or_null<S>(F, "F", {d.K, d.H}, true);
  a.q = checked<S>(q, "q", {d.K}, true);
  a.grad = checked_or_null<S>(grad, "grad", {d.K, d.H}, true);
  const FixedPointShape s{int(d.K), int(d.H), clip};
  py::gil_scoped_release nogil;
  fixed_point_eval_cpu<S>(s, a);
}

template <typename S>
void jacobian(py::object W_hh, py::object xproj, py::object h, double clip, py::object J) {
  FixedPointJacobianArgs<S> a{};
  const Dims d = model_dims<S>(W_hh, xproj, h, &a.W_hh, &a.xproj);
  a.h = checked<S>(h, "h", {d.K, d.H});
  a.J = checked<S>(J, "J", {d.K, d.H, d.H}, true);
  const FixedPointShape s{int(d.K), int(d.H), clip};
  py::gil_scoped_release nogil;
  fixed_point_jacobian_cpu<S>(s, a);
}

template <typename S>
FixedPointSolveArgs<S> solve_args(const py::object& W_hh, const py::object& xproj,
                                  const py::object& h, const py::object& q,
                                  const py::object& iterations, const py::object& converged,
                                  Dims* d) {
  FixedPointSolveArgs<S> a{};
  *d = model_dims<S>(W_hh, xproj, h, &a.W_hh, &a.xproj);
  a.h = checked<S>(h, "h", {d->K, d->H}, true);
  a.q = checked<S>(q, "q", {d->K}, true);
  a.iterations = checked_counts<int32_t>(iterations, "iterations", d->K, "int32");
  a.converged = checked_counts<uint8_t>(converged, "converged", d->K, "uint8");
  return a;
}

template <typename S>
void newton(py::object W_hh, py::object xproj, py::object h, double clip, py::object q,
            py::object iterations, py::object converged, const NewtonOptions& o) {
  Dims d;
  const FixedPointSolveArgs<S> a = solve_args<S>(W_hh, xproj, h, q, iterations, converged, &d);
  const FixedPointShape s{int(d.K), int(d.H), clip};
  py::gil_scoped_release nogil;
  fixed_points_newton_cpu<S>(s, o, a);
}

template <typename S>
void adam(py::object W_hh, py::object xproj, py::object h, double clip, py::object q,
          py::object iterations, py::object converged, const AdamOptions& o) {
  Dims d;
  const FixedPointSolveArgs<S> a = solve_args<S>(W_hh, xproj, h, q, iterations, converged, &d);
  const FixedPointShape s{int(d.K), int(d.H), clip};
  py::gil_scoped_release nogil;
  fixed_points_adam_cpu<S>(s, o, a);
}

void check_common(double tol_q, int max_iters) {
  require(tol_q >= 0, "tol_q must be >= 0, got " + std::to_string(tol_q));
  require(max_iters >= 0, "max_iters must be >= 0, got " + std::to_string(max_iters));
}

}  // namespace

void register_fixed_points(py::module_& m) {
  m.def(
      "fixed_point_eval",
      [](py::object W_hh, py::object xproj, py::object h, double clip, py::object F,
         py::object q, py::object grad) {
        if (is_double(h, "h"))
          eval<double>(W_hh, xproj, h, clip, F, q, grad);
        else
          eval<float>(W_hh, xproj, h, clip, F, q, grad);
      },
      py::arg("W_hh"), py::arg("xproj"), py::arg("h"), py::arg("clip"), py::arg("F"),
      py::arg("q"), py::arg("grad"),
      "One GRU step F [K,H] (or None), q = |F - h|^2 / 2 [K] and its gradient [K,H] (or None) "
      "at the states h [K,H]; xproj [K,3H] is W_ih u + b_ih per point.");
  m.def(
      "fixed_point_jacobian",
      [](py::object W_hh, py::object xproj, py::object h, double clip, py::object J) {
        if (is_double(h, "h"))
          jacobian<double>(W_hh, xproj, h, clip, J);
        else
          jacobian<float>(W_hh, xproj, h, clip, J);
      },
      py::arg("W_hh"), py::arg("xproj"), py::arg("h"), py::arg("clip"), py::arg("J"),
      "Analytic Jacobian dF/dh [K,H,H] of one clipped-GRU step at the states h [K,H].");
  m.def(
      "fixed_points_newton",
      [](py::object W_hh, py::object xproj, py::object h, double clip, py::object q,
         py::object iterations, py::object converged, double tol_q, double tol_step,
         int max_iters) {
        check_common(tol_q, max_iters);
        require(tol_step >= 0, "tol_step must be >= 0, got " + std::to_string(tol_step));
        const NewtonOptions o{tol_q, tol_step, max_iters};
        if (is_double(h, "h"))
          newton<double>(W_hh, xproj, h, clip, q, iterations, converged, o);
        else
          newton<float>(W_hh, xproj, h, clip, q, iterations, converged, o);
      },
      py::arg("W_hh"), py::arg("xproj"), py::arg("h"), py::arg("clip"), py::arg("q"),
      py::arg("iterations"), py::arg("converged"), py::arg("tol_q"), py::arg("tol_step"),
      py::arg("max_iters"),
      "Damped Newton / Levenberg-Marquardt from the states h [K,H] (updated in place); writes "
      "q [K], iterations [K] int32, converged [K] uint8.");
  m.def(
      "fixed_points_adam",
      [](py::object W_hh, py::object xproj, py::object h, double clip, py::object q,
         py::object iterations, py::object converged, double tol_q, double tol_dq,
         int max_iters, double beta1, double beta2, double eps, double initial_rate,
         double decrease_factor, double increase_factor, int n_decrease, int n_increase,
         int clip_window, double clip_percentile, double clip_initial, double clip_max) {
        check_common(tol_q, max_iters);
        require(n_decrease >= 1 && n_increase >= 1,
                "n_decrease and n_increase must be >= 1, got " + std::to_string(n_decrease) +
                    " and " + std::to_string(n_increase));
        require(clip_window >= 1, "clip_window must be >= 1, got " + std::to_string(clip_window));
        require(clip_percentile >= 0 && clip_percentile <= 100,
                "clip_percentile must be in [0, 100], got " + std::to_string(clip_percentile));
        require(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1,
                "beta1 and beta2 must be in [0, 1)");
        const AdamOptions o{tol_q, tol_dq, max_iters, beta1, beta2, eps, initial_rate,
                            decrease_factor, increase_factor, n_decrease, n_increase,
                            clip_window, clip_percentile, clip_initial, clip_max};
        if (is_double(h, "h"))
          adam<double>(W_hh, xproj, h, clip, q, iterations, converged, o);
        else
          adam<float>(W_hh, xproj, h, clip, q, iterations, converged, o);
      },
      py::arg("W_hh"), py::arg("xproj"), py::arg("h"), py::arg("clip"), py::arg("q"),
      py::arg("iterations"), py::arg("converged"), py::arg("tol_q"), py::arg("tol_dq"),
      py::arg("max_iters"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
      py::arg("initial_rate"), py::arg("decrease_factor"), py::arg("increase_factor"),
      py::arg("n_decrease"), py::arg("n_increase"), py::arg("clip_window"),
      py::arg("clip_percentile"), py::arg("clip_initial"), py::arg("clip_max"),
      "FixedPointFinder's Adam (adaptive learning rate and gradient clipping) per point from "
      "the states h [K,H] (updated in place); writes q [K], iterations [K] int32, converged [K] "
      "uint8.");
}

}  // namespace lfads
