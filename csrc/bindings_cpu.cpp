// The lfads_fast._cpu module: one register_<op> call per op.
#include "bindings_util.h"
#include "common.h"

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "lfads_fast CPU kernels (C++/OpenMP/OpenBLAS). Call through lfads_fast.ops.";
  lfads::blas_init();
  m.def("set_num_threads", &lfads::set_num_threads, "Threads used by the CPU kernels.");
  m.def("get_num_threads", &lfads::get_num_threads);
  m.attr("x86_v3") =
#ifdef LFADS_X86_V3
      true;
#else
      false;
#endif
  lfads::register_gru(m);
  lfads::register_decoder(m);
  lfads::register_elbo(m);
  lfads::register_adam(m);
  lfads::register_fixed_points(m);
  lfads::register_blas(m);
}
