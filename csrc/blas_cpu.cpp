// BLAS through the OpenBLAS of the scipy-openblas32 wheel, and the kernels' thread count.
#include <omp.h>

#include <algorithm>

#include "cblas.h"
#include "common.h"

namespace lfads {

namespace {
CBLAS_TRANSPOSE tr(bool t) { return t ? CblasTrans : CblasNoTrans; }
}  // namespace

template <>
void gemm<float>(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda,
                 const float* B, int ldb, float beta, float* C, int ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // BLAS leaves C untouched for K == 0 only when beta == 1
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  scipy_cblas_sgemm(CblasRowMajor, tr(ta), tr(tb), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

template <>
void gemm<double>(bool ta, bool tb, int M, int N, int K, double alpha, const double* A, int lda,
                  const double* B, int ldb, double beta, double* C, int ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) C[i * ldc + j] = beta == 0. ? 0. : beta * C[i * ldc + j];
    return;
  }
  scipy_cblas_dgemm(CblasRowMajor, tr(ta), tr(tb), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

template <typename S>
void par_gemm(bool ta, bool tb, int M, int N, int K, S alpha, const S* A, int lda, const S* B,
              int ldb, S beta, S* C, int ldc) {
  // Split the larger of M and N; tiny products stay on one thread.
  const double flops = 2.0 * M * N * std::max(K, 1);
  const bool split_m = M >= N;
  const int nt = flops < 2e5 ? 1 : threads_for_rows(split_m ? M : N, omp_get_max_threads());
  if (nt <= 1) {
    gemm<S>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    int b, e;
    split_rows(split_m ? M : N, nt, omp_get_thread_num(), b, e);
    if (e > b) {
      if (split_m) {
        const S* Ap = ta ? A + b : A + static_cast<int64_t>(b) * lda;
        gemm<S>(ta, tb, e - b, N, K, alpha, Ap, lda, B, ldb, beta, C + static_cast<int64_t>(b) * ldc, ldc);
      } else {
        const S* Bp = tb ? B + static_cast<int64_t>(b) * ldb : B + b;
        gemm<S>(ta, tb, M, e - b, K, alpha, A, lda, Bp, ldb, beta, C + b, ldc);
      }
    }
  }
}

template void par_gemm<float>(bool, bool, int, int, int, float, const float*, int, const float*,
                              int, float, float*, int);
template void par_gemm<double>(bool, bool, int, int, int, double, const double*, int,
                               const double*, int, double, double*, int);

void set_num_threads(int n) {
  if (n > 0) omp_set_num_threads(n);
}
int get_num_threads() { return omp_get_max_threads(); }

void blas_init() { scipy_openblas_set_num_threads(1); }

}  // namespace lfads
