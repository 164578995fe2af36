// Bindings of the fused Adam(W) step.
#include "bindings_util.h"
#include "adam.h"

namespace lfads {
namespace {

template <typename S>
void adam(py::object params, py::object grads, py::object m, py::object v, py::object mask,
          double lr, double beta1, double beta2, double eps, double weight_decay,
          double max_grad_norm, int64_t step, py::object grad_norm) {
  const int64_t n = dim(params, "params", 0);
  require(step >= 1, "step must be >= 1 (1-based, counting this step), got " + std::to_string(step));
  AdamShape s{n};
  AdamArgs<S> a{checked<S>(params, "params", {n}, true),
                checked<S>(grads, "grads", {n}),
                checked<S>(m, "m", {n}, true),
                checked<S>(v, "v", {n}, true),
                checked_or_null<uint8_t>(mask, "mask", {n}),
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                max_grad_norm,
                step,
                checked<S>(grad_norm, "grad_norm", {1}, true)};
  py::gil_scoped_release nogil;
  adam_step_cpu<S>(s, a);
}

}  // namespace

void register_adam(py::module_& m) {
  m.def(
      "adam_step",
      [](py::object params, py::object grads, py::object m, py::object v, py::object mask,
         double lr, double beta1, double beta2, double eps, double weight_decay,
         double max_grad_norm, int64_t step, py::object grad_norm) {
        auto run = is_double(params, "params") ? adam<double> : adam<float>;
        run(params, grads, m, v, mask, lr, beta1, beta2, eps, weight_decay, max_grad_norm, step,
            grad_norm);
      },
      py::arg("params"), py::arg("grads"), py::arg("m"), py::arg("v"), py::arg("mask"),
      py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("max_grad_norm"), py::arg("step"), py::arg("grad_norm"),
      "One AdamW step (torch.optim.AdamW semantics) on the flat vector params [n], in place with\n"
      "m, v [n]; gradients clipped to global norm max_grad_norm when > 0 (as\n"
      "torch.nn.utils.clip_grad_norm_). mask [n] uint8 (0 = frozen) or None. grad_norm [1]\n"
      "receives the norm before clipping; when it is not finite nothing else changes.");
}

}  // namespace lfads
