// Products with a matrix that is held densely but is mostly zeros: the encoders' input, spike
// counts (2% of the bins of MC_Maze hold a spike at 5 ms) with a column of ones. Its
// nonzeros are gathered once per call (compressed rows), and the product touches only them.
// Each function returns false, having done nothing, when the matrix is denser than
// max_density (a fraction of its entries) or its layout does not suit: the caller then runs
// the dense product. Every output element sums its terms in the same order whatever the
// thread count (no reduction across threads). Unlike the dense product, a NaN or infinity of
// the other operand only reaches the outputs of the nonzeros it meets (0 * inf and 0 * NaN
// terms are skipped, not NaN).
#pragma once

namespace lfads {

// C[M,N] = A[M,K] @ op(B)[K,N] + beta * C with A sparse, row-major (leading dimension lda);
// op(B) = B ([K, N], ldb) or, with trans_b, the transpose of B ([N, K], ldb).
template <typename S>
bool sparse_a_gemm(int M, int N, int K, const S* A, int lda, bool trans_b, const S* B, int ldb,
                   S beta, S* C, int ldc, double max_density);

// C[M,N] = A^T @ B + beta * C with B[K,N] sparse, row-major (ldb), and A stored as [K, M]
// row-major (lda): the weight gradient of a product whose input B is sparse.
template <typename S>
bool sparse_b_gemm_at(int M, int N, int K, const S* A, int lda, const S* B, int ldb, S beta,
                      S* C, int ldc, double max_density);

}  // namespace lfads
