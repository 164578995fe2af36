// Bindings of the fused decoder op.
#include "bindings_util.h"
#include "decoder.h"

namespace lfads {
namespace {

struct Dims {
  int64_t T, B, C, U, G, F, LC, LG;
};

// Sizes come from the outputs the caller allocated: gen_states [T,B,G], factors [T,B,F],
// con_states [T,B,C], u [T,B,U]; xcon [T,B,LC], xgen [T,B,LG].
Dims dims_of(const py::object& gen_states, const py::object& factors, const py::object& con_states,
             const py::object& u, const py::object& xcon, const py::object& xgen) {
  Dims d;
  d.T = dim(gen_states, "gen_states", 0);
  d.B = dim(gen_states, "gen_states", 1);
  d.G = dim(gen_states, "gen_states", 2);
  d.F = dim(factors, "factors", 2);
  d.C = dim(con_states, "con_states", 2);
  d.U = dim(u, "u", 2);
  d.LG = dim(xgen, "xgen", 2);
  d.LC = d.C > 0 ? dim(xcon, "xcon", 2) : 0;
  require(d.C > 0 || d.U == 0, "co_dim must be 0 when con_dim is 0");
  require(d.LG >= 3 * d.G, "xgen must have at least 3*gen_dim columns");
  require(d.C == 0 || d.LC >= 3 * d.C, "xcon must have at least 3*con_dim columns");
  return d;
}

template <typename S>
DecoderForwardArgs<S> forward_args(const Dims& d, py::dict a) {
  const int64_t T = d.T, B = d.B, C = d.C, U = d.U, G = d.G, F = d.F;
  const bool con = C > 0;
  DecoderForwardArgs<S> f{};
  f.xcon = con ? checked<S>(a["xcon"], "xcon", {T, B, d.LC}) : nullptr;
  f.W_con_f = con ? checked<S>(a["W_con_f"], "W_con_f", {3 * C, F}) : nullptr;
  f.W_con_hh = con ? checked<S>(a["W_con_hh"], "W_con_hh", {3 * C, C}) : nullptr;
  f.c0 = con ? checked<S>(a["c0"], "c0", {B, C}) : nullptr;
  f.W_co = con ? checked<S>(a["W_co"], "W_co", {2 * U, C}) : nullptr;
  f.b_co = con ? checked<S>(a["b_co"], "b_co", {2 * U}) : nullptr;
  f.eps = con ? checked_or_null<S>(a["eps"], "eps", {T, B, U}) : nullptr;
  f.mask_f = con ? checked_or_null<S>(a["mask_f"], "mask_f", {T, B, F}) : nullptr;
  f.xgen = checked<S>(a["xgen"], "xgen", {T, B, d.LG});
  f.W_gen_u = con ? checked<S>(a["W_gen_u"], "W_gen_u", {3 * G, U}) : nullptr;
  f.W_gen_hh = checked<S>(a["W_gen_hh"], "W_gen_hh", {3 * G, G});
  f.g0 = checked<S>(a["g0"], "g0", {B, G});
  f.f0 = checked<S>(a["f0"], "f0", {B, F});
  f.W_fac = checked<S>(a["W_fac"], "W_fac", {F, G});
  f.mask_g = checked_or_null<S>(a["mask_g"], "mask_g", {T, B, G});
  f.con_states = checked<S>(a["con_states"], "con_states", {T, B, C}, true);
  f.con_gates = checked<S>(a["con_gates"], "con_gates", {T, B, 3 * C}, true);
  f.co_mean = checked<S>(a["co_mean"], "co_mean", {T, B, U}, true);
  f.co_logvar = checked<S>(a["co_logvar"], "co_logvar", {T, B, U}, true);
  f.u = checked<S>(a["u"], "u", {T, B, U}, true);
  f.gen_states = checked<S>(a["gen_states"], "gen_states", {T, B, G}, true);
  f.gen_gates = checked<S>(a["gen_gates"], "gen_gates", {T, B, 3 * G}, true);
  f.factors = checked<S>(a["factors"], "factors", {T, B, F}, true);
  return f;
}

DecoderShape shape_of(const Dims& d, double clip, bool sample) {
  return DecoderShape{int(d.T), int(d.B), int(d.C), int(d.U), int(d.G), int(d.F),
                      int(d.LC), int(d.LG), clip, sample};
}

template <typename S>
void forward(py::dict a, double clip, bool sample) {
  const Dims d = dims_of(a["gen_states"], a["factors"], a["con_states"], a["u"],
                         a.contains("xcon") ? py::object(a["xcon"]) : py::object(py::none()), a["xgen"]);
  const DecoderForwardArgs<S> f = forward_args<S>(d, a);
  require(!sample || d.U == 0 || f.eps != nullptr, "eps is needed when sample is true");
  const DecoderShape s = shape_of(d, clip, sample);
  py::gil_scoped_release nogil;
  decoder_forward_cpu<S>(s, f);
}

template <typename S>
void backward(py::dict a, py::dict g, double clip, bool sample) {
  const Dims d = dims_of(a["gen_states"], a["factors"], a["con_states"], a["u"],
                         a.contains("xcon") ? py::object(a["xcon"]) : py::object(py::none()), a["xgen"]);
  const int64_t T = d.T, B = d.B, C = d.C, U = d.U, G = d.G, F = d.F;
  const bool con = C > 0;
  DecoderBackwardArgs<S> b{};
  b.fwd = forward_args<S>(d, a);
  b.d_factors = checked_or_null<S>(g["d_factors"], "d_factors", {T, B, F});
  b.d_co_mean = con ? checked_or_null<S>(g["d_co_mean"], "d_co_mean", {T, B, U}) : nullptr;
  b.d_co_logvar = con ? checked_or_null<S>(g["d_co_logvar"], "d_co_logvar", {T, B, U}) : nullptr;
  b.d_xcon = con ? checked<S>(g["d_xcon"], "d_xcon", {T, B, d.LC}, true) : nullptr;
  b.d_W_con_f = con ? checked<S>(g["d_W_con_f"], "d_W_con_f", {3 * C, F}, true) : nullptr;
  b.d_W_con_hh = con ? checked<S>(g["d_W_con_hh"], "d_W_con_hh", {3 * C, C}, true) : nullptr;
  b.d_c0 = con ? checked<S>(g["d_c0"], "d_c0", {B, C}, true) : nullptr;
  b.d_W_co = con ? checked<S>(g["d_W_co"], "d_W_co", {2 * U, C}, true) : nullptr;
  b.d_b_co = con ? checked<S>(g["d_b_co"], "d_b_co", {2 * U}, true) : nullptr;
  b.d_xgen = checked<S>(g["d_xgen"], "d_xgen", {T, B, d.LG}, true);
  b.d_W_gen_u = con ? checked<S>(g["d_W_gen_u"], "d_W_gen_u", {3 * G, U}, true) : nullptr;
  b.d_W_gen_hh = checked<S>(g["d_W_gen_hh"], "d_W_gen_hh", {3 * G, G}, true);
  b.d_g0 = checked<S>(g["d_g0"], "d_g0", {B, G}, true);
  b.d_f0 = checked<S>(g["d_f0"], "d_f0", {B, F}, true);
  b.d_W_fac = checked<S>(g["d_W_fac"], "d_W_fac", {F, G}, true);
  b.work = checked<S>(g["work"], "work", {T, B, 2 * F + 2 * G + 2 * U + C}, true);
  const DecoderShape s = shape_of(d, clip, sample);
  py::gil_scoped_release nogil;
  decoder_backward_cpu<S>(s, b);
}

}  // namespace

void register_decoder(py::module_& m) {
  m.def(
      "decoder_forward",
      [](py::dict arrays, double clip, bool sample) {
        if (is_double(arrays["gen_states"], "gen_states"))
          forward<double>(arrays, clip, sample);
        else
          forward<float>(arrays, clip, sample);
      },
      py::arg("arrays"), py::arg("clip"), py::arg("sample"),
      "Fused decoder forward. `arrays` maps the names of DecoderForwardArgs (csrc/decoder.h) to "
      "numpy arrays, outputs preallocated; optional inputs may be None.");
  m.def(
      "decoder_backward",
      [](py::dict arrays, py::dict grads, double clip, bool sample) {
        if (is_double(arrays["gen_states"], "gen_states"))
          backward<double>(arrays, grads, clip, sample);
        else
          backward<float>(arrays, grads, clip, sample);
      },
      py::arg("arrays"), py::arg("grads"), py::arg("clip"), py::arg("sample"),
      "Fused decoder backward (BPTT). `grads` maps the names of DecoderBackwardArgs to arrays: "
      "incoming d_factors, d_co_mean, d_co_logvar (or None) and preallocated outputs.");
}

}  // namespace lfads
