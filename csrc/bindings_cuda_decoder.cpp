// CUDA bindings of the fused decoder. Arrays in the field order of DecoderForwardArgs /
// DecoderBackwardArgs (decoder.h), then the sizes, the flags and the stream as keywords.
// Controller arrays may be None when C == 0, controller-output arrays when U == 0, masks and
// incoming gradients when absent.
#include "bindings_cuda_util.h"
#include "decoder_cuda.h"

namespace lfads {

namespace {

using O = py::object;

DecoderShape shape(int64_t T, int64_t B, int64_t C, int64_t U, int64_t G, int64_t F,
                   int64_t ld_xc, int64_t ld_xg, double clip, bool sample) {
  return DecoderShape{positive(T, "T"),           positive(B, "B", 0),     positive(C, "C", 0),
                      positive(U, "U", 0),        positive(G, "G"),        positive(F, "F"),
                      positive(ld_xc, "ld_xc", 0), positive(ld_xg, "ld_xg"), clip,
                      sample};
}

// The forward's arrays, in DecoderForwardArgs order.
DecoderForwardArgs<float> forward_args(DevicePointers& d, const DecoderShape& s, O xcon, O W_con_f,
                                       O W_con_hh, O c0, O W_co, O b_co, O eps, O mask_f, O xgen,
                                       O W_gen_u, O W_gen_hh, O g0, O f0, O W_fac, O mask_g,
                                       O con_states, O con_gates, O co_mean, O co_logvar, O u,
                                       O gen_states, O gen_gates, O factors) {
  const bool con = s.C > 0, co = s.U > 0;
  const int64_t T = s.T, B = s.B, C = s.C, U = s.U, G = s.G, F = s.F;
  return DecoderForwardArgs<float>{
      d.get(xcon, "xcon", {T, B, s.ld_xc}, con),
      d.get(W_con_f, "W_con_f", {3 * C, F}, con),
      d.get(W_con_hh, "W_con_hh", {3 * C, C}, con),
      d.get(c0, "c0", {B, C}, con),
      d.get(W_co, "W_co", {2 * U, C}, co),
      d.get(b_co, "b_co", {2 * U}, co),
      d.get(eps, "eps", {T, B, U}, co && s.sample),
      d.get(mask_f, "mask_f", {T, B, F}, false),
      d.get(xgen, "xgen", {T, B, s.ld_xg}),
      d.get(W_gen_u, "W_gen_u", {3 * G, U}, co),
      d.get(W_gen_hh, "W_gen_hh", {3 * G, G}),
      d.get(g0, "g0", {B, G}),
      d.get(f0, "f0", {B, F}),
      d.get(W_fac, "W_fac", {F, G}),
      d.get(mask_g, "mask_g", {T, B, G}, false),
      d.get(con_states, "con_states", {T, B, C}, con),
      d.get(con_gates, "con_gates", {T, B, 3 * C}, con),
      d.get(co_mean, "co_mean", {T, B, U}, co),
      d.get(co_logvar, "co_logvar", {T, B, U}, co),
      d.get(u, "u", {T, B, U}, co),
      d.get(gen_states, "gen_states", {T, B, G}),
      d.get(gen_gates, "gen_gates", {T, B, 3 * G}),
      d.get(factors, "factors", {T, B, F})};
}

}  // namespace

void register_decoder_cuda(py::module_& m) {
  m.def(
      "decoder_forward_workspace_size",
      [](int64_t C, int64_t U, int64_t G, int64_t F) {
        return decoder_forward_cuda_workspace_size(
            shape(1, 1, C, U, G, F, 3 * C, 3 * G, 0.0, false));
      },
      py::arg("C"), py::arg("U"), py::arg("G"), py::arg("F"),
      "Bytes of device workspace decoder_forward needs.");
  m.def(
      "decoder_forward",
      [](O xcon, O W_con_f, O W_con_hh, O c0, O W_co, O b_co, O eps, O mask_f, O xgen, O W_gen_u,
         O W_gen_hh, O g0, O f0, O W_fac, O mask_g, O con_states, O con_gates, O co_mean,
         O co_logvar, O u, O gen_states, O gen_gates, O factors, int64_t T, int64_t B, int64_t C,
         int64_t U, int64_t G, int64_t F, int64_t ld_xc, int64_t ld_xg, double clip, bool sample,
         O workspace, size_t workspace_bytes,
         uintptr_t stream) {
        const DecoderShape s = shape(T, B, C, U, G, F, ld_xc, ld_xg, clip, sample);
        check_workspace(workspace_bytes, decoder_forward_cuda_workspace_size(s),
                        "decoder_forward");
        DevicePointers d;
        const DecoderForwardArgs<float> a = forward_args(d, s, xcon, W_con_f, W_con_hh, c0, W_co,
                                                         b_co, eps, mask_f, xgen, W_gen_u,
                                                         W_gen_hh, g0, f0, W_fac, mask_g,
                                                         con_states, con_gates, co_mean, co_logvar,
                                                         u, gen_states, gen_gates, factors);
        void* ws = d.workspace(workspace, workspace_bytes);
        py::gil_scoped_release nogil;
        d.activate();
        decoder_forward_cuda(s, a, ws, stream_of(stream));
      },
      py::arg("xcon"), py::arg("W_con_f"), py::arg("W_con_hh"), py::arg("c0"), py::arg("W_co"),
      py::arg("b_co"), py::arg("eps"), py::arg("mask_f"), py::arg("xgen"), py::arg("W_gen_u"),
      py::arg("W_gen_hh"), py::arg("g0"), py::arg("f0"), py::arg("W_fac"), py::arg("mask_g"),
      py::arg("con_states"), py::arg("con_gates"), py::arg("co_mean"), py::arg("co_logvar"),
      py::arg("u"), py::arg("gen_states"), py::arg("gen_gates"), py::arg("factors"),
      py::kw_only(), py::arg("T"), py::arg("B"), py::arg("C"), py::arg("U"), py::arg("G"),
      py::arg("F"), py::arg("ld_xc"), py::arg("ld_xg"), py::arg("clip"), py::arg("sample"),
      py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("stream"),
      "Fused decoder forward over all T steps (float32 device arrays, shapes as in "
      "decoder.h).");
  m.def(
      "decoder_backward",
      [](O xcon, O W_con_f, O W_con_hh, O c0, O W_co, O b_co, O eps, O mask_f, O xgen, O W_gen_u,
         O W_gen_hh, O g0, O f0, O W_fac, O mask_g, O con_states, O con_gates, O co_mean,
         O co_logvar, O u, O gen_states, O gen_gates, O factors, O d_factors, O d_co_mean,
         O d_co_logvar, O d_xcon, O d_c0, O d_xgen, O d_g0, O d_f0, O d_factors_total, O d_co,
         O rh_gen, O rh_con, int64_t T, int64_t B, int64_t C, int64_t U, int64_t G, int64_t F,
         int64_t ld_xc, int64_t ld_xg, double clip, bool sample,
         uintptr_t stream) {
        const DecoderShape s = shape(T, B, C, U, G, F, ld_xc, ld_xg, clip, sample);
        const bool con = s.C > 0, co = s.U > 0;
        DevicePointers d;
        DecoderBackwardArgs<float> a{};
        a.fwd = forward_args(d, s, xcon, W_con_f, W_con_hh, c0, W_co, b_co, eps, mask_f, xgen,
                             W_gen_u, W_gen_hh, g0, f0, W_fac, mask_g, con_states, con_gates,
                             co_mean, co_logvar, u, gen_states, gen_gates, factors);
        a.d_factors = d.get(d_factors, "d_factors", {T, B, F}, false);
        a.d_co_mean = d.get(d_co_mean, "d_co_mean", {T, B, U}, false);
        a.d_co_logvar = d.get(d_co_logvar, "d_co_logvar", {T, B, U}, false);
        a.d_xcon = d.get(d_xcon, "d_xcon", {T, B, s.ld_xc}, con);
        a.d_c0 = d.get(d_c0, "d_c0", {B, C}, con);
        a.d_xgen = d.get(d_xgen, "d_xgen", {T, B, s.ld_xg});
        a.d_g0 = d.get(d_g0, "d_g0", {B, G});
        a.d_f0 = d.get(d_f0, "d_f0", {B, F});
        const DecoderBackwardCudaWork w{d.get(d_factors_total, "d_factors_total", {T, B, F}),
                                        d.get(d_co, "d_co", {T, B, 2 * U}, co),
                                        d.get(rh_gen, "rh_gen", {T, B, G}),
                                        d.get(rh_con, "rh_con", {T, B, C}, con)};
        py::gil_scoped_release nogil;
        d.activate();
        decoder_backward_cuda(s, a, w, stream_of(stream));
      },
      py::arg("xcon"), py::arg("W_con_f"), py::arg("W_con_hh"), py::arg("c0"), py::arg("W_co"),
      py::arg("b_co"), py::arg("eps"), py::arg("mask_f"), py::arg("xgen"), py::arg("W_gen_u"),
      py::arg("W_gen_hh"), py::arg("g0"), py::arg("f0"), py::arg("W_fac"), py::arg("mask_g"),
      py::arg("con_states"), py::arg("con_gates"), py::arg("co_mean"), py::arg("co_logvar"),
      py::arg("u"), py::arg("gen_states"), py::arg("gen_gates"), py::arg("factors"),
      py::arg("d_factors"), py::arg("d_co_mean"), py::arg("d_co_logvar"), py::arg("d_xcon"),
      py::arg("d_c0"), py::arg("d_xgen"), py::arg("d_g0"), py::arg("d_f0"),
      py::arg("d_factors_total"), py::arg("d_co"), py::arg("rh_gen"), py::arg("rh_con"),
      py::kw_only(), py::arg("T"), py::arg("B"), py::arg("C"), py::arg("U"), py::arg("G"),
      py::arg("F"), py::arg("ld_xc"), py::arg("ld_xg"), py::arg("clip"), py::arg("sample"),
      py::arg("stream"),
      "Fused decoder BPTT. Writes d_xcon, d_c0, d_xgen, d_g0, d_f0 and the per-step "
      "d_factors_total [T,B,F], d_co [T,B,2U], rh_gen [T,B,G], rh_con [T,B,C] from which the "
      "caller reduces the weight gradients (lfads_fast.weight_grads.decoder_weight_grads).");
}

}  // namespace lfads
