// Argument handling shared by the CUDA bindings. Arrays arrive as device pointers in Python ints
// (CuPy: arr.data.ptr) and the stream as an int (cupy.cuda.get_current_stream().ptr); sizes come
// as ints. Every pointer is checked to be device memory, all on one device, which is made
// current before the launch; messages name the argument.
#pragma once

#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>

#include "cuda_device.h"

namespace lfads {
namespace py = pybind11;

class DevicePointers {
 public:
  // None or 0 give nullptr; an error if `required`.
  template <typename T = float>
  T* get(const py::handle& obj, const char* name, bool required = true) {
    uintptr_t v = 0;
    if (!obj.is_none()) {
      if (!py::isinstance<py::int_>(obj))
        throw py::type_error(std::string(name) +
                             " must be a device pointer as an int (cupy: arr.data.ptr), got " +
                             py::str(py::type::of(obj)).cast<std::string>());
      v = obj.cast<uintptr_t>();
    }
    if (v == 0) {
      if (required) throw py::value_error(std::string(name) + " is required (got None or 0)");
      return nullptr;
    }
    const int dev = cuda_pointer_device(reinterpret_cast<const void*>(v));
    if (dev < 0) {
      std::ostringstream o;
      o << name << " must point to device memory, got 0x" << std::hex << v
        << " (a host address, or memory this process did not allocate)";
      throw py::value_error(o.str());
    }
    if (device_ >= 0 && dev != device_)
      throw py::value_error(std::string(name) + " is on device " + std::to_string(dev) +
                            ", earlier arguments on device " + std::to_string(device_));
    device_ = dev;
    return reinterpret_cast<T*>(v);
  }

  // Makes the arguments' device current for this thread (CuPy's current device may differ
  // from this runtime's).
  void activate() const {
    if (device_ >= 0) cuda_set_device(device_);
  }

 private:
  int device_ = -1;
};

inline cudaStream_t stream_of(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

inline int positive(int64_t v, const char* name, int64_t min = 1) {
  if (v < min || v > INT32_MAX)
    throw py::value_error(std::string(name) + " must be in [" + std::to_string(min) +
                          ", 2^31), got " + std::to_string(v));
  return static_cast<int>(v);
}

inline void check_workspace(size_t bytes, size_t needed, const char* op) {
  if (bytes < needed)
    throw py::value_error(std::string(op) + ": workspace_bytes must be >= " +
                          std::to_string(needed) + " (from " + op + "_workspace_size), got " +
                          std::to_string(bytes));
}

// Op registration, one function per op (bindings_cuda_<op>.cpp).
void register_gru_cuda(py::module_& m);
void register_decoder_cuda(py::module_& m);
void register_elbo_cuda(py::module_& m);
void register_adam_cuda(py::module_& m);

}  // namespace lfads
