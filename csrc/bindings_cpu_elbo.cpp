// Bindings of the ELBO terms: Poisson reconstruction through the read-out, and the two KLs.
#include <initializer_list>
#include <string>
#include <utility>

#include "bindings_util.h"
#include "elbo.h"

namespace lfads {
namespace {

// The gradient outputs of one op come all together or not at all.
void require_all_or_none(std::initializer_list<std::pair<const char*, const py::object*>> outs) {
  int given = 0;
  std::string names;
  for (const auto& [name, obj] : outs) {
    given += !obj->is_none();
    names += (names.empty() ? "" : ", ") + std::string(name);
  }
  require(given == 0 || given == static_cast<int>(outs.size()),
          names + " must all be arrays (gradients) or all be None (loss only)");
}

template <typename S>
void poisson(py::object factors, py::object W_ro, py::object b_ro, py::object counts,
             py::object loss_weight, py::object grad_mask, double scale, int T, py::object loss,
             py::object log_rates, py::object nll_tn, py::object d_factors, py::object d_W_ro,
             py::object d_b_ro) {
  const int64_t R = dim(factors, "factors", 0), F = dim(factors, "factors", 1);
  const int64_t N = dim(W_ro, "W_ro", 0);
  require(T >= 1 && R % T == 0, "T must divide the rows of factors (R = T * B), got T=" +
                                    std::to_string(T) + " and R=" + std::to_string(R));
  require_all_or_none({{"d_factors", &d_factors}, {"d_W_ro", &d_W_ro}, {"d_b_ro", &d_b_ro}});
  const int64_t B = R / T;
  ElboShape s{T, int(B), int(F), int(N)};
  ElboArgs<S> a{checked<S>(factors, "factors", {R, F}),
                checked<S>(W_ro, "W_ro", {N, F}),
                checked<S>(b_ro, "b_ro", {N}),
                checked<S>(counts, "counts", {R, N}),
                checked_or_null<S>(loss_weight, "loss_weight", {R, N}),
                checked_or_null<S>(grad_mask, "grad_mask", {R, N}),
                S(scale),
                checked<S>(loss, "loss", {1}, true),
                checked_or_null<S>(log_rates, "log_rates", {R, N}, true),
                checked_or_null<S>(nll_tn, "nll_tn", {T, N}, true),
                checked_or_null<S>(d_factors, "d_factors", {R, F}, true),
                checked_or_null<S>(d_W_ro, "d_W_ro", {N, F}, true),
                checked_or_null<S>(d_b_ro, "d_b_ro", {N}, true)};
  py::gil_scoped_release nogil;
  poisson_elbo_cpu<S>(s, a);
}

template <typename S>
void kl_ic(py::object mean, py::object logvar, py::object prior_mean, py::object prior_logvar,
           double var_min, double scale, py::object kl, py::object d_mean, py::object d_logvar,
           py::object d_prior_mean) {
  const int64_t B = dim(mean, "mean", 0), D = dim(mean, "mean", 1);
  require(B >= 1, "mean must have at least one row (the KL is a mean over the batch)");
  require_all_or_none(
      {{"d_mean", &d_mean}, {"d_logvar", &d_logvar}, {"d_prior_mean", &d_prior_mean}});
  KlIcShape s{int(B), int(D)};
  KlIcArgs<S> a{checked<S>(mean, "mean", {B, D}),
                checked<S>(logvar, "logvar", {B, D}),
                checked<S>(prior_mean, "prior_mean", {D}),
                checked<S>(prior_logvar, "prior_logvar", {D}),
                S(var_min),
                S(scale),
                checked<S>(kl, "kl", {1}, true),
                checked_or_null<S>(d_mean, "d_mean", {B, D}, true),
                checked_or_null<S>(d_logvar, "d_logvar", {B, D}, true),
                checked_or_null<S>(d_prior_mean, "d_prior_mean", {D}, true)};
  py::gil_scoped_release nogil;
  kl_ic_cpu<S>(s, a);
}

template <typename S>
void kl_co(py::object mean, py::object logvar, py::object eps, py::object logtau,
           py::object lognvar, double scale, py::object kl, py::object d_mean,
           py::object d_logvar, py::object d_logtau, py::object d_lognvar) {
  const int64_t T = dim(mean, "mean", 0), B = dim(mean, "mean", 1), U = dim(mean, "mean", 2);
  require(B >= 1, "mean must have at least one trial (the KL is a mean over the batch)");
  require_all_or_none({{"d_mean", &d_mean},
                       {"d_logvar", &d_logvar},
                       {"d_logtau", &d_logtau},
                       {"d_lognvar", &d_lognvar}});
  KlCoShape s{int(T), int(B), int(U)};
  KlCoArgs<S> a{checked<S>(mean, "mean", {T, B, U}),
                checked<S>(logvar, "logvar", {T, B, U}),
                checked<S>(eps, "eps", {T, B, U}),
                checked<S>(logtau, "logtau", {U}),
                checked<S>(lognvar, "lognvar", {U}),
                S(scale),
                checked<S>(kl, "kl", {1}, true),
                checked_or_null<S>(d_mean, "d_mean", {T, B, U}, true),
                checked_or_null<S>(d_logvar, "d_logvar", {T, B, U}, true),
                checked_or_null<S>(d_logtau, "d_logtau", {U}, true),
                checked_or_null<S>(d_lognvar, "d_lognvar", {U}, true)};
  py::gil_scoped_release nogil;
  kl_co_cpu<S>(s, a);
}

}  // namespace

void register_elbo(py::module_& m) {
  m.def(
      "poisson_elbo",
      [](py::object factors, py::object W_ro, py::object b_ro, py::object counts,
         py::object loss_weight, py::object grad_mask, double scale, int T, py::object loss,
         py::object log_rates, py::object nll_tn, py::object d_factors, py::object d_W_ro,
         py::object d_b_ro) {
        auto run = is_double(factors, "factors") ? poisson<double> : poisson<float>;
        run(factors, W_ro, b_ro, counts, loss_weight, grad_mask, scale, T, loss, log_rates,
            nll_tn, d_factors, d_W_ro, d_b_ro);
      },
      py::arg("factors"), py::arg("W_ro"), py::arg("b_ro"), py::arg("counts"),
      py::arg("loss_weight"), py::arg("grad_mask"), py::arg("scale"), py::arg("T"),
      py::arg("loss"), py::arg("log_rates"), py::arg("nll_tn"), py::arg("d_factors"),
      py::arg("d_W_ro"), py::arg("d_b_ro"),
      "Poisson NLL through the read-out: log_rates = factors @ W_ro^T + b_ro over R = T*B\n"
      "time-major rows; loss[0] = scale * sum of loss_weight * nll over non-NaN bins. Writes\n"
      "log_rates [R,N], nll_tn [T,N] (unscaled) and d_factors [R,F], d_W_ro [N,F], d_b_ro [N]\n"
      "(overwritten); any of these may be None (the three gradients together).");
  m.def(
      "kl_ic",
      [](py::object mean, py::object logvar, py::object prior_mean, py::object prior_logvar,
         double var_min, double scale, py::object kl, py::object d_mean, py::object d_logvar,
         py::object d_prior_mean) {
        auto run = is_double(mean, "mean") ? kl_ic<double> : kl_ic<float>;
        run(mean, logvar, prior_mean, prior_logvar, var_min, scale, kl, d_mean, d_logvar,
            d_prior_mean);
      },
      py::arg("mean"), py::arg("logvar"), py::arg("prior_mean"), py::arg("prior_logvar"),
      py::arg("var_min"), py::arg("scale"), py::arg("kl"), py::arg("d_mean"),
      py::arg("d_logvar"), py::arg("d_prior_mean"),
      "Initial-condition KL: kl[0] = scale * mean over b of sum over d of\n"
      "KL(N(mean, exp(logvar) + var_min) || N(prior_mean, exp(prior_logvar))), mean [B,D].\n"
      "Writes d_mean, d_logvar [B,D], d_prior_mean [D], or none of them (all None).");
  m.def(
      "kl_co",
      [](py::object mean, py::object logvar, py::object eps, py::object logtau,
         py::object lognvar, double scale, py::object kl, py::object d_mean, py::object d_logvar,
         py::object d_logtau, py::object d_lognvar) {
        auto run = is_double(mean, "mean") ? kl_co<double> : kl_co<float>;
        run(mean, logvar, eps, logtau, lognvar, scale, kl, d_mean, d_logvar, d_logtau,
            d_lognvar);
      },
      py::arg("mean"), py::arg("logvar"), py::arg("eps"), py::arg("logtau"), py::arg("lognvar"),
      py::arg("scale"), py::arg("kl"), py::arg("d_mean"), py::arg("d_logvar"),
      py::arg("d_logtau"), py::arg("d_lognvar"),
      "Inferred-input KL, one-sample Monte Carlo against the AR(1) prior: x = mean +\n"
      "exp(logvar/2) * eps, mean [T,B,U]; kl[0] = scale * mean over b of sum over t, u of\n"
      "log q(x) - log p(x). Writes d_mean, d_logvar [T,B,U], d_logtau, d_lognvar [U], or none.");
}

}  // namespace lfads
