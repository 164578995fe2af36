// lfads_fast kernels: conventions shared by every op.
//
// Layout: time-major, row-major, contiguous unless a leading dimension (ld*) says otherwise.
// Dimension names used in every header:
//   T  time steps          B  batch (trials)        H  hidden units of one GRU
//   I  input features      N  neurons               F  factors
//   C  controller units    U  controller outputs    G  generator units
// Scalar type S is float or double (double exists for gradient checks on the CPU).
// Gate order inside every GRU weight/projection of 3H rows or columns: z, r, n.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LFADS_HD __host__ __device__
#else
#define LFADS_HD
#endif

namespace lfads {

// Row-major GEMM: C[M,N] = alpha * op(A)[M,K] @ op(B)[K,N] + beta * C, op = transpose when
// the flag is set. Single-threaded: callers parallelise (OpenBLAS runs with one thread so
// that calls from inside OpenMP regions never serialise on its thread pool).
template <typename S>
void gemm(bool trans_a, bool trans_b, int M, int N, int K, S alpha, const S* A, int lda,
          const S* B, int ldb, S beta, S* C, int ldc);

// The same product split over rows of C between the OpenMP threads (must not be called from
// inside a parallel region).
template <typename S>
void par_gemm(bool trans_a, bool trans_b, int M, int N, int K, S alpha, const S* A, int lda,
              const S* B, int ldb, S beta, S* C, int ldc);

// Threads used by the kernels (OpenMP); 0 leaves the OpenMP default.
void set_num_threads(int n);
int get_num_threads();
// Called once when the module loads.
void blas_init();

// Rows [begin, end) of n split evenly into `parts`; part p of them.
inline void split_range(int n, int parts, int p, int& begin, int& end) {
  const int base = n / parts, rem = n % parts;
  begin = p * base + (p < rem ? p : rem);
  end = begin + base + (p < rem ? 1 : 0);
}

// Batch rows are split between threads in whole blocks of kRowGrain rows (a multiple of the
// double-precision BLAS micro-tile sizes), so that in float64 every row meets the same GEMM
// code path and rounding whatever the thread count. (Single-precision OpenBLAS kernels on
// some CPUs round a row differently depending on the row count of the call, so float32
// results may differ in the last bit between thread counts.)
constexpr int kRowGrain = 8;

// Threads worth starting for n rows: at most one per block of kRowGrain rows.
inline int threads_for_rows(int n, int max_threads) {
  const int blocks = (n + kRowGrain - 1) / kRowGrain;
  return blocks < 1 ? 1 : (blocks < max_threads ? blocks : max_threads);
}

// Rows [begin, end) of n for part p of `parts`: whole blocks of kRowGrain rows, split evenly.
inline void split_rows(int n, int parts, int p, int& begin, int& end) {
  int b, e;
  split_range((n + kRowGrain - 1) / kRowGrain, parts, p, b, e);
  begin = b * kRowGrain < n ? b * kRowGrain : n;
  end = e * kRowGrain < n ? e * kRowGrain : n;
}

}  // namespace lfads
