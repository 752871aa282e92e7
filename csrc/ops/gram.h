// The Gram family (gram, cross_gram, cosine_matrix): argument checks and output shapes shared
// by the CPU, CUDA and Meta kernels, so that every device rejects the same inputs with the
// same message.
#pragma once

#include <ATen/core/Tensor.h>

#include "pyxtask/checks.h"

namespace pyxtask::detail {

inline void check_gram_input(const char* op, const at::Tensor& G) { check_task_matrix(op, "G", G); }

inline void check_cross_gram_inputs(const at::Tensor& A, const at::Tensor& B) {
  constexpr const char* op = "cross_gram";
  check_task_matrix(op, "A", A);
  check_task_matrix(op, "B", B);
  check_same_device(op, A, "A", B, "B");
  PYX_CHECK(A.scalar_type() == B.scalar_type(), op, "A is ", A.scalar_type(), " but B is ",
            B.scalar_type(), "; pass both in one dtype");
  PYX_CHECK(A.sym_size(1) == B.sym_size(1), op,
            "A and B must have the same number of columns P, got ", A.sym_sizes(), " and ",
            B.sym_sizes());
}

// Turns an accumulated Gram matrix into cosines in place. A zero (or non-positive, from
// rounding) diagonal entry marks a zero row: its cosines are 0, never NaN.
template <typename T>
void gram_to_cosine(T* m, int64_t n) {
  std::vector<T> inv(n);
  for (int64_t i = 0; i < n; ++i) {
    const T d = m[i * n + i];
    inv[i] = d > T(0) ? T(1) / std::sqrt(d) : T(0);
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T c = m[i * n + j] * inv[i] * inv[j];
      c = c > T(1) ? T(1) : (c < T(-1) ? T(-1) : c);
      m[i * n + j] = (i == j) ? (inv[i] > T(0) ? T(1) : T(0)) : c;
    }
  }
}

}  // namespace pyxtask::detail
