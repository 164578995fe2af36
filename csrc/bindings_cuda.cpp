// The lfads_fast._cuda module: device queries and one register_<op>_cuda call per op.
// Importing it needs no GPU; device_count() says whether one is usable.
#include "bindings_cuda_util.h"

PYBIND11_MODULE(_cuda, m) {
  m.doc() =
      "lfads_fast CUDA kernels (float32). Arrays are passed as CuPy (__cuda_array_interface__) "
      "arrays, each checked for dtype, shape, contiguity and device; the "
      "stream as an int. Call through lfads_fast.ops.";
  m.def("device_count", &lfads::cuda_device_count,
        "Number of CUDA devices this module can use (0 without a driver or device).");
  m.def("device_name", &lfads::cuda_device_name, pybind11::arg("i"), "Name of device i.");
  lfads::register_gru_cuda(m);
  lfads::register_decoder_cuda(m);
  lfads::register_elbo_cuda(m);
  lfads::register_adam_cuda(m);
}
