// CUDA bindings of the clipped-GRU sequence op. Same argument order as the CPU bindings
// (bindings_cpu_gru.cpp), minus d_W_hh (reduced by the caller: lfads_fast/weight_grads.py),
// then the sizes and the stream as keywords. Arrays are CuPy (or other
// __cuda_array_interface__) arrays, checked against the sizes.
#include "bindings_cuda_util.h"
#include "gru_cuda.h"

namespace lfads {

void register_gru_cuda(py::module_& m) {
  m.def(
      "gru_forward_workspace_size",
      [](int64_t H) {
        GruShape s{1, 1, positive(H, "H"), int(3 * H), false, 0.0};
        return gru_forward_cuda_workspace_size(s);
      },
      py::arg("H"), "Bytes of device workspace gru_forward needs.");
  m.def(
      "gru_forward",
      [](py::object xproj, int64_t x_offset, py::object W_hh, py::object h0, py::object hs,
         py::object gates, bool reverse, double clip, int64_t T, int64_t B, int64_t H,
         int64_t ldx, py::object workspace, size_t workspace_bytes, uintptr_t stream) {
        GruShape s{positive(T, "T", 0), positive(B, "B", 0), positive(H, "H"),
                   positive(ldx, "ldx"), reverse, clip};
        if (x_offset < 0 || x_offset + 3 * H > ldx)
          throw py::value_error("x_offset must leave 3H columns of xproj, got x_offset=" +
                                std::to_string(x_offset) + " with ldx=" + std::to_string(ldx) +
                                " and H=" + std::to_string(H));
        check_workspace(workspace_bytes, gru_forward_cuda_workspace_size(s), "gru_forward");
        DevicePointers d;
        GruForwardArgs<float> a{d.get(xproj, "xproj", {T, B, ldx}) + x_offset,
                                d.get(W_hh, "W_hh", {3 * H, H}), d.get(h0, "h0", {B, H}),
                                d.get(hs, "hs", {T, B, H}), d.get(gates, "gates", {T, B, 3 * H})};
        void* ws = d.workspace(workspace, workspace_bytes);
        py::gil_scoped_release nogil;
        d.activate();
        gru_forward_cuda(s, a, ws, stream_of(stream));
      },
      py::arg("xproj"), py::arg("x_offset"), py::arg("W_hh"), py::arg("h0"), py::arg("hs"),
      py::arg("gates"), py::arg("reverse"), py::arg("clip"), py::kw_only(), py::arg("T"),
      py::arg("B"), py::arg("H"), py::arg("ldx"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("stream"),
      "Clipped-GRU sequence forward (float32 device arrays): xproj [T,B,ldx] (columns "
      "x_offset..x_offset+3H used), W_hh [3H,H], h0 [B,H]; writes hs [T,B,H], gates [T,B,3H].");
  m.def(
      "gru_backward",
      [](py::object W_hh, py::object h0, py::object hs, py::object gates, py::object d_hs,
         py::object d_hT, py::object d_xproj, int64_t x_offset, py::object d_h0, py::object work,
         bool reverse, double clip, int64_t T, int64_t B, int64_t H, int64_t ldx,
         uintptr_t stream) {
        GruShape s{positive(T, "T", 0), positive(B, "B", 0), positive(H, "H"),
                   positive(ldx, "ldx"), reverse, clip};
        if (x_offset < 0 || x_offset + 3 * H > ldx)
          throw py::value_error("x_offset must leave 3H columns of d_xproj, got x_offset=" +
                                std::to_string(x_offset));
        DevicePointers d;
        const bool steps = T > 0;
        float* dx = d.get(d_xproj, "d_xproj", {T, B, ldx}, steps);
        GruBackwardArgs<float> a{d.get(W_hh, "W_hh", {3 * H, H}),
                                 d.get(h0, "h0", {B, H}),
                                 d.get(hs, "hs", {T, B, H}, steps),
                                 d.get(gates, "gates", {T, B, 3 * H}, steps),
                                 d.get(d_hs, "d_hs", {T, B, H}, false),
                                 d.get(d_hT, "d_hT", {B, H}, false),
                                 dx ? dx + x_offset : nullptr,
                                 nullptr,
                                 d.get(d_h0, "d_h0", {B, H}),
                                 d.get(work, "work", {T, B, H}, steps)};
        py::gil_scoped_release nogil;
        d.activate();
        gru_backward_cuda(s, a, stream_of(stream));
      },
      py::arg("W_hh"), py::arg("h0"), py::arg("hs"), py::arg("gates"), py::arg("d_hs"),
      py::arg("d_hT"), py::arg("d_xproj"), py::arg("x_offset"), py::arg("d_h0"), py::arg("work"),
      py::arg("reverse"), py::arg("clip"), py::kw_only(), py::arg("T"), py::arg("B"),
      py::arg("H"), py::arg("ldx"), py::arg("stream"),
      "Clipped-GRU sequence backward (BPTT): writes d_xproj (3H columns from x_offset), d_h0 "
      "[B,H] and work [T,B,H] = r * h_prev. d_W_hh is left to the caller "
      "(lfads_fast.weight_grads.gru_weight_grad).");
}

}  // namespace lfads
