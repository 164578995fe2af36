// Products with a mostly-zero matrix held densely (see sparse.h).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "sparse.h"

namespace lfads {
namespace {

// Compressed rows of a dense [rows, cols] matrix (leading dimension ld). The buffers belong
// to the calling thread and are reused from call to call.
template <typename S>
struct Csr {
  std::vector<int64_t> ptr;  // rows + 1
  std::vector<int32_t> idx;
  std::vector<S> val;
};

template <typename S>
Csr<S>& scratch_csr() {
  thread_local Csr<S> c;
  return c;
}

template <typename S>
std::vector<S>& scratch_buffer() {
  thread_local std::vector<S> v;
  return v;
}

// Gathers the nonzeros of X; false (and the CSR left unspecified) when they are more than
// max_density of the entries.
// Threads for a product of `flops` over `rows` rows: one for tiny products (as par_gemm).
inline int threads_for(int rows, double flops) {
  return flops < 2e5 ? 1 : threads_for_rows(rows, omp_get_max_threads());
}

template <typename S>
bool gather(int rows, int cols, const S* X, int64_t ld, double max_density, Csr<S>& out) {
  const int nt = threads_for(rows, 2.0 * rows * cols);
  std::vector<int64_t> counts(static_cast<size_t>(nt) + 1, 0);
  out.ptr.resize(static_cast<size_t>(rows) + 1);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    int b, e;
    split_rows(rows, nt, t, b, e);
    int64_t n = 0;
    for (int r = b; r < e; ++r) {
      const S* x = X + static_cast<int64_t>(r) * ld;
      int c = 0;
#pragma omp simd reduction(+ : c)
      for (int k = 0; k < cols; ++k) c += x[k] != S(0);
      out.ptr[static_cast<size_t>(r) + 1] = c;
      n += c;
    }
    counts[static_cast<size_t>(t) + 1] = n;
  }
  for (int t = 0; t < nt; ++t) counts[t + 1] += counts[t];
  const int64_t nnz = counts[nt];
  if (static_cast<double>(nnz) > max_density * static_cast<double>(rows) * cols) return false;
  out.idx.resize(static_cast<size_t>(std::max<int64_t>(nnz, 1)));
  out.val.resize(static_cast<size_t>(std::max<int64_t>(nnz, 1)));
  out.ptr[0] = 0;
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    int b, e;
    split_rows(rows, nt, t, b, e);
    int64_t p = counts[t];
    for (int r = b; r < e; ++r) {
      const S* x = X + static_cast<int64_t>(r) * ld;
      for (int k = 0; k < cols; ++k)
        if (x[k] != S(0)) {
          out.idx[p] = k;
          out.val[p] = x[k];
          ++p;
        }
      out.ptr[static_cast<size_t>(r) + 1] = p;
    }
  }
  return true;
}

}  // namespace

template <typename S>
bool sparse_a_gemm(int M, int N, int K, const S* A, int lda, bool trans_b, const S* B, int ldb,
                   S beta, S* C, int ldc, double max_density) {
  if (M <= 0 || N <= 0 || K <= 0) return false;
  Csr<S>& a = scratch_csr<S>();
  if (!gather(M, K, A, lda, max_density, a)) return false;
  // The rows of op(B) must be contiguous: a transposed B is copied to [K, N].
  const S* Bk = B;
  int64_t ldk = ldb;
  if (trans_b) {
    std::vector<S>& t = scratch_buffer<S>();
    t.resize(static_cast<size_t>(K) * N);
    for (int n = 0; n < N; ++n)
      for (int k = 0; k < K; ++k) t[static_cast<size_t>(k) * N + n] = B[static_cast<int64_t>(n) * ldb + k];
    Bk = t.data();
    ldk = N;
  }
  const int nt = threads_for(M, 2.0 * static_cast<double>(a.ptr[M]) * N);
#pragma omp parallel num_threads(nt)
  {
    int b, e;
    split_rows(M, nt, omp_get_thread_num(), b, e);
    for (int r = b; r < e; ++r) {
      S* c = C + static_cast<int64_t>(r) * ldc;
      if (beta == S(0)) {
#pragma omp simd
        for (int j = 0; j < N; ++j) c[j] = S(0);
      } else if (beta != S(1)) {
#pragma omp simd
        for (int j = 0; j < N; ++j) c[j] *= beta;
      }
      for (int64_t p = a.ptr[r]; p < a.ptr[r + 1]; ++p) {
        const S v = a.val[p];
        const S* w = Bk + static_cast<int64_t>(a.idx[p]) * ldk;
#pragma omp simd
        for (int j = 0; j < N; ++j) c[j] += v * w[j];
      }
    }
  }
  return true;
}

template <typename S>
bool sparse_b_gemm_at(int M, int N, int K, const S* A, int lda, const S* B, int ldb, S beta,
                      S* C, int ldc, double max_density) {
  if (M <= 0 || N <= 0 || K <= 0) return false;
  Csr<S>& bs = scratch_csr<S>();
  if (!gather(K, N, B, ldb, max_density, bs)) return false;
  // Each thread owns a block of C's rows (A's columns) and sums over all K rows in order:
  // acc[n][i - i0] += B[k, n] * A[k, i], then C[i, n] = acc[n][i - i0] (+ beta C).
  const int nt = threads_for(M, 2.0 * static_cast<double>(bs.ptr[K]) * M);
#pragma omp parallel num_threads(nt)
  {
    int i0, i1;
    split_rows(M, nt, omp_get_thread_num(), i0, i1);
    const int w = i1 - i0;
    if (w > 0) {
      std::vector<S> acc(static_cast<size_t>(N) * w, S(0));
      for (int k = 0; k < K; ++k) {
        const S* ak = A + static_cast<int64_t>(k) * lda + i0;
        for (int64_t p = bs.ptr[k]; p < bs.ptr[k + 1]; ++p) {
          const S v = bs.val[p];
          S* row = acc.data() + static_cast<int64_t>(bs.idx[p]) * w;
#pragma omp simd
          for (int i = 0; i < w; ++i) row[i] += v * ak[i];
        }
      }
      for (int i = 0; i < w; ++i) {
        S* c = C + static_cast<int64_t>(i0 + i) * ldc;
        for (int n = 0; n < N; ++n) {
          const S s = acc[static_cast<size_t>(n) * w + i];
          c[n] = beta == S(0) ? s : beta * c[n] + s;
        }
      }
    }
  }
  return true;
}

template bool sparse_a_gemm<float>(int, int, int, const float*, int, bool, const float*, int, float,
                                   float*, int, double);
template bool sparse_a_gemm<double>(int, int, int, const double*, int, bool, const double*, int,
                                    double, double*, int, double);
template bool sparse_b_gemm_at<float>(int, int, int, const float*, int, const float*, int, float,
                                      float*, int, double);
template bool sparse_b_gemm_at<double>(int, int, int, const double*, int, const double*, int,
                                       double, double*, int, double);

}  // namespace lfads
