// Argument checks shared by the pybind11 bindings. Every message names the argument and the
// expected shape and dtype, e.g. "W_hh must be [300, 100] float32 C-contiguous, got (300, 99) float32".
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <sstream>
#include <string>
#include <vector>

namespace lfads {
namespace py = pybind11;

template <typename S>
inline const char* dtype_name() {
  return sizeof(S) == 4 ? "float32" : "float64";
}

// Masks (Adam's frozen-parameter mask) are uint8.
template <>
inline const char* dtype_name<uint8_t>() {
  return "uint8";
}

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < shape.size(); ++i) o << (i ? ", " : "") << shape[i];
  o << "]";
  return o.str();
}

inline std::string got_str(const py::array& a) {
  std::ostringstream o;
  o << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) o << (i ? ", " : "") << a.shape(i);
  if (a.ndim() == 1) o << ",";
  o << ") " << py::str(a.dtype()).cast<std::string>();
  if (!(a.flags() & py::array::c_style)) o << " non-contiguous";
  return o.str();
}

// Checks dtype S, C-contiguity, exact shape (-1 = any size along that axis) and, for outputs,
// writeability; returns the data pointer.
template <typename S>
S* checked(const py::handle& obj, const char* name, const std::vector<int64_t>& shape,
           bool output = false) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be a numpy array " + shape_str(shape) + " " +
                         dtype_name<S>() + ", got " + py::str(py::type::of(obj)).cast<std::string>());
  py::array a = py::reinterpret_borrow<py::array>(obj);
  bool ok = a.dtype().equal(py::dtype::of<S>()) && (a.flags() & py::array::c_style) &&
            a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i)
    ok = shape[i] < 0 || a.shape(i) == shape[i];
  if (!ok)
    throw py::value_error(std::string(name) + " must be " + shape_str(shape) + " " +
                          dtype_name<S>() + " C-contiguous, got " + got_str(a));
  if (output && !a.writeable())
    throw py::value_error(std::string(name) + " must be writeable");
  // Inputs may be read-only views (e.g. broadcasts); only outputs need writeable memory.
  return static_cast<S*>(output ? a.mutable_data() : const_cast<void*>(a.data()));
}

// Like checked() but None gives nullptr.
template <typename S>
S* checked_or_null(const py::handle& obj, const char* name, const std::vector<int64_t>& shape,
                   bool output = false) {
  if (obj.is_none()) return nullptr;
  return checked<S>(obj, name, shape, output);
}

inline int64_t dim(const py::handle& obj, const char* name, int axis) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be a numpy array");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (axis >= a.ndim())
    throw py::value_error(std::string(name) + " must have at least " + std::to_string(axis + 1) +
                          " dimensions, got " + got_str(a));
  return a.shape(axis);
}

// True for float64, false for float32; anything else is an error naming the argument.
inline bool is_double(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be a numpy array of float32 or float64");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (a.dtype().equal(py::dtype::of<float>())) return false;
  if (a.dtype().equal(py::dtype::of<double>())) return true;
  throw py::value_error(std::string(name) + " must be float32 or float64, got " + got_str(a));
}

inline void require(bool cond, const std::string& msg) {
  if (!cond) throw py::value_error(msg);
}

// Op registration, one function per op (bindings_cpu_<op>.cpp).
void register_gru(py::module_& m);
void register_decoder(py::module_& m);
void register_elbo(py::module_& m);
void register_adam(py::module_& m);
void register_fixed_points(py::module_& m);
void register_blas(py::module_& m);

}  // namespace lfads
