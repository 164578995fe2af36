// CUDA binding of the fused Adam(W) step. Arrays in the field order of AdamArgs (adam.h), then
// the hyperparameters, then the size, the workspace and the stream as keywords.
#include "adam_cuda.h"
#include "bindings_cuda_util.h"

namespace lfads {

void register_adam_cuda(py::module_& m) {
  m.def(
      "adam_workspace_size",
      [](int64_t n) { return adam_cuda_workspace_size(AdamShape{n}); }, py::arg("n"),
      "Bytes of device workspace adam_step needs (depends on the current device).");
  m.def(
      "adam_step",
      [](py::object params, py::object grads, py::object m_, py::object v, py::object mask,
         double lr, double beta1, double beta2, double eps, double weight_decay,
         double max_grad_norm, int64_t step, py::object grad_norm, int64_t n,
         py::object workspace, size_t workspace_bytes, uintptr_t stream) {
        if (n < 0) throw py::value_error("n must be >= 0, got " + std::to_string(n));
        if (step < 1) throw py::value_error("step must be >= 1, got " + std::to_string(step));
        const AdamShape s{n};
        check_workspace(workspace_bytes, adam_cuda_workspace_size(s), "adam");
        DevicePointers d;
        AdamArgs<float> a{};
        a.params = d.get(params, "params", {n});
        a.grads = d.get(grads, "grads", {n});
        a.m = d.get(m_, "m", {n});
        a.v = d.get(v, "v", {n});
        a.mask = d.get<const uint8_t>(mask, "mask", {n}, false);
        a.lr = lr;
        a.beta1 = beta1;
        a.beta2 = beta2;
        a.eps = eps;
        a.weight_decay = weight_decay;
        a.max_grad_norm = max_grad_norm;
        a.step = step;
        a.grad_norm = d.get(grad_norm, "grad_norm", {1});
        void* ws = d.workspace(workspace, workspace_bytes);
        py::gil_scoped_release nogil;
        d.activate();
        adam_step_cuda(s, a, ws, stream_of(stream));
      },
      py::arg("params"), py::arg("grads"), py::arg("m"), py::arg("v"), py::arg("mask"),
      py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("max_grad_norm"), py::arg("step"), py::arg("grad_norm"),
      py::kw_only(), py::arg("n"), py::arg("workspace"), py::arg("workspace_bytes"),
      py::arg("stream"),
      "Fused Adam(W) with global gradient-norm clipping on flat float32 vectors params, grads, "
      "m, v [n] (mask [n] uint8 or None: 0 = frozen). Writes grad_norm [1] (before clipping); "
      "a non-finite norm leaves params, m and v untouched.");
}

}  // namespace lfads
