// Row-major matrix products for the SA attention CPU kernel.
//
// Two implementations behind one call:
//  * "blas": the Fortran BLAS symbols sgemm_/dgemm_ that torch's MKL build exports from libtorch_cpu. They are
//    declared weak, so a torch build without them still loads this extension (the pointers are then null), and a
//    self-test at load time (gemm_self_test) checks that they compute what they should with 32-bit dimensions.
//    Inside an OpenMP parallel region MKL runs single-threaded, which is what the kernel wants.
//  * "aten": at::addmm_ / at::mm_out on from_blob views; works with every torch build, a few microseconds slower
//    per call (dispatcher).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <string>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace sa_cpu {

enum class GemmImpl : int { Blas = 0, Aten = 1 };

inline std::atomic<int>& gemm_impl_flag() {
  static std::atomic<int> flag{static_cast<int>(GemmImpl::Aten)};
  return flag;
}

inline bool blas_symbols_present() { return sgemm_ != nullptr && dgemm_ != nullptr; }

template <class T>
inline void blas_gemm(char ta, char tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb,
                      T beta, T* c, int ldc) {
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  } else {
    dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  }
}

template <class T>
inline at::Tensor blob(const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // the stored matrix is (rows x cols) row-major with leading dimension ld; trans -> its transpose (a view)
  auto t = at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opts);
  return trans ? t.t() : t;
}

// C (m x n, row-major, ldc) = alpha * op(A) * op(B) + beta * C, with op(A) m x k and op(B) k x n. A is stored
// m x k (or k x m when ta), B is stored k x n (or n x k when tb), both row-major with leading dimensions lda, ldb.
// beta == 0 means C is not read.
template <class T>
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B,
                 int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  if (gemm_impl_flag().load(std::memory_order_relaxed) == static_cast<int>(GemmImpl::Blas)) {
    // row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T: swap the operands, keep the flags
    blas_gemm<T>(tb ? 'T' : 'N', ta ? 'T' : 'N', static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
                 alpha, B, static_cast<int>(ldb), A, static_cast<int>(lda), beta, C, static_cast<int>(ldc));
    return;
  }
  at::Tensor a = ta ? blob(A, k, m, lda, true) : blob(A, m, k, lda, false);
  at::Tensor b = tb ? blob(B, n, k, ldb, true) : blob(B, k, n, ldb, false);
  at::Tensor c = blob(static_cast<const T*>(C), m, n, ldc, false);
  if (beta == T(0)) {
    at::mm_out(c, a, b);
    if (alpha != T(1)) c.mul_(alpha);
  } else {
    c.addmm_(a, b, beta, alpha);
  }
}

// Checks the BLAS path on small products with every transpose combination and leading dimensions larger than the
// matrices; returns an empty string if it matches a naive loop, else what went wrong.
template <class T>
inline std::string gemm_self_test_typed() {
  const int64_t m = 5, n = 7, k = 3, pad = 2;
  for (int ta = 0; ta < 2; ++ta) {
    for (int tb = 0; tb < 2; ++tb) {
      const int64_t lda = (ta ? m : k) + pad, ldb = (tb ? k : n) + pad, ldc = n + pad;
      std::vector<T> A((ta ? k : m) * lda), B((tb ? n : k) * ldb), C(m * ldc, T(1)), want(m * ldc, T(1));
      for (size_t i = 0; i < A.size(); ++i) A[i] = T(0.25) * T(int64_t(i % 7) - 3);
      for (size_t i = 0; i < B.size(); ++i) B[i] = T(0.5) * T(int64_t(i % 5) - 2);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          T acc = 0;
          for (int64_t p = 0; p < k; ++p) {
            T av = ta ? A[p * lda + i] : A[i * lda + p];
            T bv = tb ? B[j * ldb + p] : B[p * ldb + j];
            acc += av * bv;
          }
          want[i * ldc + j] = T(2) * acc + T(0.5) * want[i * ldc + j];
        }
      }
      blas_gemm<T>(tb ? 'T' : 'N', ta ? 'T' : 'N', int(n), int(m), int(k), T(2), B.data(), int(ldb), A.data(),
                   int(lda), T(0.5), C.data(), int(ldc));
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j)
          if (std::abs(double(C[i * ldc + j] - want[i * ldc + j])) > 1e-5)
            return "the BLAS gemm symbol gave a wrong product (transa=" + std::to_string(tb) +
                   ", transb=" + std::to_string(ta) + ")";
    }
  }
  return "";
}

// Selects the BLAS path if its symbols exist and pass the self-test; returns the name of the implementation in use
// and, if BLAS was not taken, why.
inline std::string select_gemm(const std::string& wanted) {
  if (wanted == "aten") {
    gemm_impl_flag().store(static_cast<int>(GemmImpl::Aten));
    return "aten";
  }
  if (!blas_symbols_present()) {
    gemm_impl_flag().store(static_cast<int>(GemmImpl::Aten));
    return "aten (sgemm_/dgemm_ are not exported by this torch build)";
  }
  std::string err = gemm_self_test_typed<float>();
  if (err.empty()) err = gemm_self_test_typed<double>();
  if (!err.empty()) {
    gemm_impl_flag().store(static_cast<int>(GemmImpl::Aten));
    return "aten (" + err + ")";
  }
  gemm_impl_flag().store(static_cast<int>(GemmImpl::Blas));
  return "blas";
}

}  // namespace sa_cpu
