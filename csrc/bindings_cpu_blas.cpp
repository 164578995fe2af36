// Binding of the threaded matrix product (par_gemm) for the large products the Python layer
// does outside the kernels: the input projections of all time steps and their gradients.
#include "bindings_util.h"
#include "common.h"
#include "sparse.h"

namespace lfads {
namespace {

// How BLAS sees a 2-D view: transposed or not, and its leading dimension. A view qualifies
// when one of its axes has unit stride (a C-contiguous array, a slice of its columns, or the
// transpose of either).
struct Layout {
  bool trans;
  int64_t ld;
};

Layout layout(const py::array& a, const char* name, bool output) {
  const int64_t s = a.itemsize(), rows = a.shape(0), cols = a.shape(1);
  const int64_t st0 = a.strides(0), st1 = a.strides(1);
  if (rows == 0 || cols == 0) return {false, std::max<int64_t>(cols, 1)};  // never read
  const bool row_major = cols <= 1 || st1 == s;
  const bool col_major = rows <= 1 || st0 == s;
  if (row_major && (rows <= 1 || (st0 > 0 && st0 % s == 0 && st0 / s >= cols)))
    return {false, rows <= 1 ? std::max<int64_t>(cols, 1) : st0 / s};
  if (!output && col_major && (cols <= 1 || (st1 > 0 && st1 % s == 0 && st1 / s >= rows)))
    return {true, cols <= 1 ? std::max<int64_t>(rows, 1) : st1 / s};
  throw py::value_error(std::string(name) +
                        (output ? " must have unit stride along its last axis (a C-contiguous "
                                  "array or a slice of its columns), got "
                                : " must have unit stride along one axis (C-contiguous, a slice "
                                  "of columns, or a transpose of either), got ") +
                        got_str(a));
}

py::array as_matrix(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be a numpy array, got " +
                         py::str(py::type::of(obj)).cast<std::string>());
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (a.ndim() != 2) throw py::value_error(std::string(name) + " must be 2-D, got " + got_str(a));
  return a;
}

template <typename S>
bool matmul(const py::array& a, const py::array& b, py::array& out, double beta, const std::string& sparse,
            double max_density) {
  for (auto [arr, name] : {std::pair{a, "a"}, std::pair{b, "b"}, std::pair{out, "out"}})
    if (!arr.dtype().equal(py::dtype::of<S>()))
      throw py::value_error(std::string(name) + " must be " + dtype_name<S>() + " like out, got " +
                            got_str(arr));
  const int64_t M = a.shape(0), K = a.shape(1), N = b.shape(1);
  require(b.shape(0) == K, "b must have " + std::to_string(K) + " rows (the columns of a), got " +
                               got_str(b));
  require(out.shape(0) == M && out.shape(1) == N,
          "out must be [" + std::to_string(M) + ", " + std::to_string(N) + "], got " + got_str(out));
  require(out.writeable(), "out must be writeable");
  const Layout la = layout(a, "a", false), lb = layout(b, "b", false), lc = layout(out, "out", true);
  const S* A = static_cast<const S*>(a.data());
  const S* B = static_cast<const S*>(b.data());
  S* C = static_cast<S*>(out.mutable_data());
  py::gil_scoped_release nogil;
  // A sparse operand is gathered when its layout suits and it is sparse enough; otherwise
  // (and for an empty one) the dense product runs.
  if (sparse == "a" && !la.trans &&
      sparse_a_gemm<S>(int(M), int(N), int(K), A, int(la.ld), lb.trans, B, int(lb.ld), S(beta), C,
                       int(lc.ld), max_density))
    return true;
  if (sparse == "b" && la.trans && !lb.trans &&
      sparse_b_gemm_at<S>(int(M), int(N), int(K), A, int(la.ld), B, int(lb.ld), S(beta), C,
                          int(lc.ld), max_density))
    return true;
  par_gemm<S>(la.trans, lb.trans, int(M), int(N), int(K), S(1), A, int(la.ld), B, int(lb.ld),
              S(beta), C, int(lc.ld));
  return false;
}

}  // namespace

void register_blas(py::module_& m) {
  m.def(
      "matmul",
      [](py::object a, py::object b, py::object out, double beta, const std::string& sparse,
         double max_density) {
        if (sparse != "" && sparse != "a" && sparse != "b")
          throw py::value_error("sparse must be '', 'a' or 'b', got '" + sparse + "'");
        if (!(max_density >= 0.0 && max_density <= 1.0))
          throw py::value_error("max_density must be in [0, 1], got " + std::to_string(max_density));
        py::array A = as_matrix(a, "a"), Bm = as_matrix(b, "b"), C = as_matrix(out, "out");
        return is_double(out, "out") ? matmul<double>(A, Bm, C, beta, sparse, max_density)
                                     : matmul<float>(A, Bm, C, beta, sparse, max_density);
      },
      py::arg("a"), py::arg("b"), py::arg("out"), py::arg("beta") = 0.0, py::arg("sparse") = "",
      py::arg("max_density") = 0.0,
      "out = a @ b + beta * out on the kernels' threads; a and b may be transposed views. "
      "sparse='a' or 'b': that operand is mostly zeros, and when at most max_density of its "
      "entries are nonzero (and a row-major a, or a transposed a with a row-major b, for 'b') "
      "only its nonzeros are multiplied. Returns whether they were (the sparse product ran).");
}

}  // namespace lfads
