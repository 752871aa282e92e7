// Argument checks shared by every op: each message starts with the op's name so that a
// user who sees the error knows which call to fix.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#include "pyxtask/ops.h"

#define PYX_CHECK(cond, op, ...) TORCH_CHECK((cond), "pyxtask.", op, ": ", __VA_ARGS__)

namespace pyxtask {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Accumulation/result dtype of the Gram family: fp64 stays fp64, everything else is fp32.
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  PYX_CHECK(is_supported_float(t.scalar_type()), op, name,
            " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_task_matrix(const char* op, const char* name, const at::Tensor& t) {
  PYX_CHECK(t.dim() == 2, op, name, " must be a 2-D (tasks x parameters) matrix, got a ", t.dim(),
            "-D tensor of shape ", t.sym_sizes());
  check_float(op, name, t);
  PYX_CHECK(t.sym_size(0) <= kMaxTasks, op, name, " has ", t.sym_size(0), " rows; at most ",
            kMaxTasks, " tasks are supported");
}

// The T x T Gram matrix every solver takes (min-norm, dual cone, Nash, CAGrad).
inline void check_gram_square(const char* op, const at::Tensor& M) {
  PYX_CHECK(M.dim() == 2 && M.sym_size(0) == M.sym_size(1), op,
            "M must be a square T x T Gram matrix, got shape ", M.sym_sizes());
  check_float(op, "M", M);
  PYX_CHECK(M.sym_size(0) >= 1, op, "M must have at least one row");
  PYX_CHECK(M.sym_size(0) <= kMaxTasks, op, "M has ", M.sym_size(0), " rows; at most ", kMaxTasks,
            " tasks are supported");
}

inline void check_iterations(const char* op, int64_t max_iter, double tol) {
  PYX_CHECK(max_iter >= 0, op, "max_iter must be >= 0, got ", max_iter);
  PYX_CHECK(tol >= 0 && std::isfinite(tol), op, "tol must be finite and >= 0, got ", tol);
}

// Rows of a T x P task matrix need unit stride along P; any row stride (a slice of a bigger
// buffer) is read in place, anything else is copied once.
inline at::Tensor with_unit_column_stride(const at::Tensor& m) {
  return (m.size(1) <= 1 || m.stride(1) == 1) ? m : m.contiguous();
}

inline void check_same_device(const char* op, const at::Tensor& a, const char* an,
                              const at::Tensor& b, const char* bn) {
  PYX_CHECK(a.device() == b.device(), op, an, " is on ", a.device(), " but ", bn, " is on ",
            b.device(), "; move both to one device");
}

}  // namespace pyxtask
