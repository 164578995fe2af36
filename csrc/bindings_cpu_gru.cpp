// Bindings of the clipped-GRU sequence op.
#include "bindings_util.h"
#include "gru.h"

namespace lfads {
namespace {

template <typename S>
void forward(py::object xproj, int x_offset, py::object W_hh, py::object h0, py::object hs,
             py::object gates, bool reverse, double clip) {
  const int64_t T = dim(hs, "hs", 0), B = dim(hs, "hs", 1), H = dim(hs, "hs", 2);
  const int64_t LD = dim(xproj, "xproj", 2);
  require(x_offset >= 0 && x_offset + 3 * H <= LD,
          "x_offset must leave 3H columns of xproj, got x_offset=" + std::to_string(x_offset) +
              " with xproj width " + std::to_string(LD) + " and H=" + std::to_string(H));
  GruShape s{int(T), int(B), int(H), int(LD), reverse, clip};
  GruForwardArgs<S> a{checked<S>(xproj, "xproj", {T, B, LD}) + x_offset,
                      checked<S>(W_hh, "W_hh", {3 * H, H}), checked<S>(h0, "h0", {B, H}),
                      checked<S>(hs, "hs", {T, B, H}, true),
                      checked<S>(gates, "gates", {T, B, 3 * H}, true)};
  py::gil_scoped_release nogil;
  gru_forward_cpu<S>(s, a);
}

template <typename S>
void backward(py::object W_hh, py::object h0, py::object hs, py::object gates, py::object d_hs,
              py::object d_hT, py::object d_xproj, int x_offset, py::object d_W_hh,
              py::object d_h0, py::object work, bool reverse, double clip) {
  const int64_t T = dim(hs, "hs", 0), B = dim(hs, "hs", 1), H = dim(hs, "hs", 2);
  const int64_t LD = dim(d_xproj, "d_xproj", 2);
  require(x_offset >= 0 && x_offset + 3 * H <= LD,
          "x_offset must leave 3H columns of d_xproj, got x_offset=" + std::to_string(x_offset));
  GruShape s{int(T), int(B), int(H), int(LD), reverse, clip};
  GruBackwardArgs<S> a{checked<S>(W_hh, "W_hh", {3 * H, H}),
                       checked<S>(h0, "h0", {B, H}),
                       checked<S>(hs, "hs", {T, B, H}),
                       checked<S>(gates, "gates", {T, B, 3 * H}),
                       checked_or_null<S>(d_hs, "d_hs", {T, B, H}),
                       checked_or_null<S>(d_hT, "d_hT", {B, H}),
                       checked<S>(d_xproj, "d_xproj", {T, B, LD}, true) + x_offset,
                       checked<S>(d_W_hh, "d_W_hh", {3 * H, H}, true),
                       checked<S>(d_h0, "d_h0", {B, H}, true),
                       checked<S>(work, "work", {T, B, H}, true)};
  py::gil_scoped_release nogil;
  gru_backward_cpu<S>(s, a);
}

}  // namespace

void register_gru(py::module_& m) {
  m.def(
      "gru_forward",
      [](py::object xproj, int x_offset, py::object W_hh, py::object h0, py::object hs,
         py::object gates, bool reverse, double clip) {
        if (is_double(hs, "hs"))
          forward<double>(xproj, x_offset, W_hh, h0, hs, gates, reverse, clip);
        else
          forward<float>(xproj, x_offset, W_hh, h0, hs, gates, reverse, clip);
      },
      py::arg("xproj"), py::arg("x_offset"), py::arg("W_hh"), py::arg("h0"), py::arg("hs"),
      py::arg("gates"), py::arg("reverse"), py::arg("clip"),
      "Clipped-GRU sequence forward; writes hs [T,B,H] and gates [T,B,3H].");
  m.def(
      "gru_backward",
      [](py::object W_hh, py::object h0, py::object hs, py::object gates, py::object d_hs,
         py::object d_hT, py::object d_xproj, int x_offset, py::object d_W_hh, py::object d_h0,
         py::object work, bool reverse, double clip) {
        if (is_double(hs, "hs"))
          backward<double>(W_hh, h0, hs, gates, d_hs, d_hT, d_xproj, x_offset, d_W_hh, d_h0, work,
                           reverse, clip);
        else
          backward<float>(W_hh, h0, hs, gates, d_hs, d_hT, d_xproj, x_offset, d_W_hh, d_h0, work,
                          reverse, clip);
      },
      py::arg("W_hh"), py::arg("h0"), py::arg("hs"), py::arg("gates"), py::arg("d_hs"),
      py::arg("d_hT"), py::arg("d_xproj"), py::arg("x_offset"), py::arg("d_W_hh"),
      py::arg("d_h0"), py::arg("work"), py::arg("reverse"), py::arg("clip"),
      "Clipped-GRU sequence backward (BPTT); writes d_xproj, d_W_hh, d_h0.");
}

}  // namespace lfads
