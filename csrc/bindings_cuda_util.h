// Argument handling shared by the CUDA bindings. Arrays arrive as objects exposing
// __cuda_array_interface__ (CuPy arrays, and any other library's device arrays); each is checked
// against what the op expects, as strictly as the CPU bindings check numpy arrays: dtype
// (float32; uint8 for masks and workspaces), exact shape, C-contiguity, no mask, device memory,
// all on one device, which is made current before the launch. The stream comes as an int
// (cupy.cuda.get_current_stream().ptr) and the sizes as ints. Messages name the argument and
// what was expected: "h0 must be [3, 4] float32, got (3, 4) float64".
#pragma once

#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_device.h"

namespace lfads {
namespace py = pybind11;

using Shape = std::vector<int64_t>;

template <typename T>
struct ElementType;  // typestr without the byte order, and the name in messages
template <>
struct ElementType<float> {
  static constexpr const char* code = "f4";
  static constexpr const char* name = "float32";
};
template <>
struct ElementType<uint8_t> {
  static constexpr const char* code = "u1";
  static constexpr const char* name = "uint8";
};

inline std::string shape_text(const Shape& shape, const char* open = "[", const char* close = "]") {
  std::ostringstream o;
  o << open;
  for (size_t i = 0; i < shape.size(); ++i) o << (i ? ", " : "") << shape[i];
  if (shape.size() == 1 && open[0] == '(') o << ",";
  o << close;
  return o.str();
}

inline std::string dtype_text(const std::string& typestr) {
  const std::string code = typestr.size() > 1 ? typestr.substr(1) : typestr;
  static const char* const known[][2] = {{"f2", "float16"}, {"f4", "float32"}, {"f8", "float64"},
                                         {"i1", "int8"},    {"i2", "int16"},   {"i4", "int32"},
                                         {"i8", "int64"},   {"u1", "uint8"},   {"b1", "bool"}};
  for (const auto& k : known)
    if (code == k[0]) return k[1];
  return typestr;
}

class DevicePointers {
 public:
  // The device pointer of array `obj` after checking it against `shape` and T's dtype. None
  // gives nullptr, an error if `required`. Zero-size arrays are not dereferenced by the ops
  // and skip the device check.
  template <typename T = float>
  T* get(const py::handle& obj, const char* name, const Shape& shape, bool required = true) {
    using E = ElementType<std::remove_const_t<T>>;
    const std::string expected = std::string(name) + " must be " + shape_text(shape) + " " + E::name;
    if (obj.is_none()) {
      if (required) throw py::value_error(expected + " (it is required; got None)");
      return nullptr;
    }
    const Array a = parse(obj, name, expected);
    const std::string got = ", got " + shape_text(a.shape, "(", ")") + " " + dtype_text(a.typestr);
    const bool order_ok = a.typestr.size() == 3 && (a.typestr[0] == '<' || a.typestr[0] == '|' ||
                                                    a.typestr[0] == '=');
    if (!order_ok || a.typestr.substr(1) != E::code || a.shape != shape)
      throw py::value_error(expected + got);
    check_contiguous(a, sizeof(std::remove_const_t<T>), expected);
    if (a.size == 0) return reinterpret_cast<T*>(a.ptr);
    check_device(a.ptr, name);
    return reinterpret_cast<T*>(a.ptr);
  }

  // A uint8 workspace array of at least `bytes` bytes (workspace_bytes, itself checked against
  // the op's <op>_workspace_size by check_workspace).
  void* workspace(const py::handle& obj, size_t bytes) {
    const std::string expected =
        "workspace must be a contiguous uint8 device array of >= " + std::to_string(bytes) + " bytes";
    if (obj.is_none()) throw py::value_error(expected + " (got None)");
    const Array a = parse(obj, "workspace", expected);
    if (a.typestr.substr(1) != "u1" || a.shape.size() != 1 || static_cast<size_t>(a.size) < bytes)
      throw py::value_error(expected + ", got " + shape_text(a.shape, "(", ")") + " " +
                            dtype_text(a.typestr));
    check_contiguous(a, 1, expected);
    if (bytes == 0) return reinterpret_cast<void*>(a.ptr);
    check_device(a.ptr, "workspace");
    return reinterpret_cast<void*>(a.ptr);
  }

  // Makes the arguments' device current for this thread (CuPy's current device may differ
  // from this runtime's).
  void activate() const {
    if (device_ >= 0) cuda_set_device(device_);
  }

 private:
  struct Array {
    uintptr_t ptr = 0;
    Shape shape;
    std::string typestr;
    py::object strides;
    int64_t size = 1;
  };

  static Array parse(const py::handle& obj, const char* name, const std::string& expected) {
    if (!py::hasattr(obj, "__cuda_array_interface__"))
      throw py::type_error(expected + " on the GPU (an array with __cuda_array_interface__, e.g. "
                           "CuPy), got " + py::str(py::type::of(obj)).cast<std::string>());
    const py::dict iface = obj.attr("__cuda_array_interface__").cast<py::dict>();
    Array a;
    a.typestr = iface["typestr"].cast<std::string>();
    for (const auto& d : iface["shape"].cast<py::tuple>()) {
      a.shape.push_back(d.cast<int64_t>());
      a.size *= a.shape.back();
    }
    a.ptr = iface["data"].cast<py::tuple>()[0].cast<uintptr_t>();
    a.strides = iface.contains("strides") ? py::object(iface["strides"]) : py::object(py::none());
    if (iface.contains("mask") && !iface["mask"].is_none())
      throw py::value_error(std::string(name) + ": masked arrays are not supported");
    return a;
  }

  // Strides None means C-contiguous; otherwise every axis longer than 1 must have the
  // row-major stride.
  static void check_contiguous(const Array& a, size_t itemsize, const std::string& expected) {
    if (a.strides.is_none()) return;
    const auto strides = a.strides.cast<std::vector<int64_t>>();
    int64_t want = static_cast<int64_t>(itemsize);
    for (size_t i = a.shape.size(); i-- > 0;) {
      if (a.shape[i] > 1 && strides[i] != want)
        throw py::value_error(expected + " and C-contiguous, got strides " +
                              shape_text(strides, "(", ")") + " (make it contiguous first)");
      want *= a.shape[i];
    }
  }

  void check_device(uintptr_t v, const char* name) {
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
  }

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
