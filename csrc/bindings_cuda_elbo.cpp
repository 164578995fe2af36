// CUDA bindings of the ELBO terms. Arrays in the field order of ElboArgs / KlIcArgs / KlCoArgs
// (elbo.h), then the sizes, the workspace and the stream as keywords. The read-out gradient is
// returned as d_log_rates; d_factors and d_W_ro are the caller's two GEMMs on it.
#include "bindings_cuda_util.h"
#include "elbo_cuda.h"

namespace lfads {

namespace {
using O = py::object;
}  // namespace

void register_elbo_cuda(py::module_& m) {
  m.def(
      "poisson_elbo_workspace_size",
      [](int64_t T, int64_t B, int64_t N) {
        return poisson_elbo_cuda_workspace_size(
            ElboShape{positive(T, "T"), positive(B, "B"), 1, positive(N, "N")});
      },
      py::arg("T"), py::arg("B"), py::arg("N"), "Bytes of device workspace poisson_elbo needs.");
  m.def(
      "poisson_elbo",
      [](O factors, O W_ro, O b_ro, O counts, O loss_weight, O grad_mask, double scale, O loss,
         O log_rates, O nll_tn, O d_log_rates, O d_b_ro, int64_t T, int64_t B, int64_t F,
         int64_t N, O workspace, size_t workspace_bytes, uintptr_t stream) {
        const ElboShape s{positive(T, "T"), positive(B, "B"), positive(F, "F"),
                          positive(N, "N")};
        check_workspace(workspace_bytes, poisson_elbo_cuda_workspace_size(s), "poisson_elbo");
        DevicePointers d;
        ElboArgs<float> a{};
        a.factors = d.get(factors, "factors", {T * B, F});
        a.W_ro = d.get(W_ro, "W_ro", {N, F});
        a.b_ro = d.get(b_ro, "b_ro", {N});
        a.counts = d.get(counts, "counts", {T * B, N});
        a.loss_weight = d.get(loss_weight, "loss_weight", {T * B, N}, false);
        a.grad_mask = d.get(grad_mask, "grad_mask", {T * B, N}, false);
        a.scale = static_cast<float>(scale);
        a.loss = d.get(loss, "loss", {1});
        a.log_rates = d.get(log_rates, "log_rates", {T * B, N}, false);
        a.nll_tn = d.get(nll_tn, "nll_tn", {T, N}, false);
        float* d_lr = d.get(d_log_rates, "d_log_rates", {T * B, N}, false);
        a.d_b_ro = d.get(d_b_ro, "d_b_ro", {N}, d_lr != nullptr);
        void* ws = d.workspace(workspace, workspace_bytes);
        py::gil_scoped_release nogil;
        d.activate();
        poisson_elbo_cuda(s, a, d_lr, ws, stream_of(stream));
      },
      py::arg("factors"), py::arg("W_ro"), py::arg("b_ro"), py::arg("counts"),
      py::arg("loss_weight"), py::arg("grad_mask"), py::arg("scale"), py::arg("loss"),
      py::arg("log_rates"), py::arg("nll_tn"), py::arg("d_log_rates"), py::arg("d_b_ro"),
      py::kw_only(), py::arg("T"), py::arg("B"), py::arg("F"), py::arg("N"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "Poisson reconstruction through the read-out: factors [R,F], W_ro [N,F], b_ro [N], counts "
      "[R,N] (NaN = missing), loss_weight / grad_mask [R,N] or None; writes loss [1], and "
      "log_rates [R,N], nll_tn [T,N], d_log_rates [R,N] + d_b_ro [N] where given. R = T*B.");
  m.def(
      "kl_ic_workspace_size",
      [](int64_t B, int64_t D) {
        return kl_ic_cuda_workspace_size(KlIcShape{positive(B, "B"), positive(D, "D")});
      },
      py::arg("B"), py::arg("D"), "Bytes of device workspace kl_ic needs.");
  m.def(
      "kl_ic",
      [](O mean, O logvar, O prior_mean, O prior_logvar, double var_min, double scale, O kl,
         O d_mean, O d_logvar, O d_prior_mean, int64_t B, int64_t D, O workspace,
         size_t workspace_bytes, uintptr_t stream) {
        const KlIcShape s{positive(B, "B"), positive(D, "D")};
        check_workspace(workspace_bytes, kl_ic_cuda_workspace_size(s), "kl_ic");
        DevicePointers d;
        KlIcArgs<float> a{};
        a.mean = d.get(mean, "mean", {B, D});
        a.logvar = d.get(logvar, "logvar", {B, D});
        a.prior_mean = d.get(prior_mean, "prior_mean", {D});
        a.prior_logvar = d.get(prior_logvar, "prior_logvar", {D});
        a.var_min = static_cast<float>(var_min);
        a.scale = static_cast<float>(scale);
        a.kl = d.get(kl, "kl", {1});
        a.d_mean = d.get(d_mean, "d_mean", {B, D}, false);
        a.d_logvar = d.get(d_logvar, "d_logvar", {B, D}, a.d_mean != nullptr);
        a.d_prior_mean = d.get(d_prior_mean, "d_prior_mean", {D}, a.d_mean != nullptr);
        void* ws = d.workspace(workspace, workspace_bytes);
        py::gil_scoped_release nogil;
        d.activate();
        kl_ic_cuda(s, a, ws, stream_of(stream));
      },
      py::arg("mean"), py::arg("logvar"), py::arg("prior_mean"), py::arg("prior_logvar"),
      py::arg("var_min"), py::arg("scale"), py::arg("kl"), py::arg("d_mean"),
      py::arg("d_logvar"), py::arg("d_prior_mean"), py::kw_only(), py::arg("B"), py::arg("D"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "Initial-condition KL: mean, logvar [B,D], prior_mean, prior_logvar [D]; writes kl [1] "
      "and, when d_mean is given, d_mean, d_logvar [B,D], d_prior_mean [D].");
  m.def(
      "kl_co_workspace_size",
      [](int64_t B, int64_t U) {
        return kl_co_cuda_workspace_size(KlCoShape{1, positive(B, "B"), positive(U, "U")});
      },
      py::arg("B"), py::arg("U"), "Bytes of device workspace kl_co needs.");
  m.def(
      "kl_co",
      [](O mean, O logvar, O eps, O logtau, O lognvar, double scale, O kl, O d_mean, O d_logvar,
         O d_logtau, O d_lognvar, int64_t T, int64_t B, int64_t U, O workspace,
         size_t workspace_bytes, uintptr_t stream) {
        const KlCoShape s{positive(T, "T"), positive(B, "B"), positive(U, "U")};
        check_workspace(workspace_bytes, kl_co_cuda_workspace_size(s), "kl_co");
        DevicePointers d;
        KlCoArgs<float> a{};
        a.mean = d.get(mean, "mean", {T, B, U});
        a.logvar = d.get(logvar, "logvar", {T, B, U});
        a.eps = d.get(eps, "eps", {T, B, U});
        a.logtau = d.get(logtau, "logtau", {U});
        a.lognvar = d.get(lognvar, "lognvar", {U});
        a.scale = static_cast<float>(scale);
        a.kl = d.get(kl, "kl", {1});
        a.d_mean = d.get(d_mean, "d_mean", {T, B, U}, false);
        const bool g = a.d_mean != nullptr;
        a.d_logvar = d.get(d_logvar, "d_logvar", {T, B, U}, g);
        a.d_logtau = d.get(d_logtau, "d_logtau", {U}, g);
        a.d_lognvar = d.get(d_lognvar, "d_lognvar", {U}, g);
        void* ws = d.workspace(workspace, workspace_bytes);
        py::gil_scoped_release nogil;
        d.activate();
        kl_co_cuda(s, a, ws, stream_of(stream));
      },
      py::arg("mean"), py::arg("logvar"), py::arg("eps"), py::arg("logtau"), py::arg("lognvar"),
      py::arg("scale"), py::arg("kl"), py::arg("d_mean"), py::arg("d_logvar"),
      py::arg("d_logtau"), py::arg("d_lognvar"), py::kw_only(), py::arg("T"), py::arg("B"),
      py::arg("U"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "Inferred-input KL against the AR(1) prior: mean, logvar, eps [T,B,U], logtau, lognvar "
      "[U]; writes kl [1] and, when d_mean is given, d_mean, d_logvar [T,B,U], d_logtau, "
      "d_lognvar [U].");
}

}  // namespace lfads
