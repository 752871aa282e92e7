// gram_solvers (dual_cone_projection, nash_bargaining, cagrad_inner): argument checks shared
// by the CPU, CUDA and Meta kernels; the solvers are in gram_solvers_solver.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>

#include "gram_solvers_solver.h"
#include "pyxtask/checks.h"

namespace pyxtask::detail {

static_assert(kGramSolverMaxTasks == kMaxTasks);

inline void check_dual_cone(const at::Tensor& M, const at::Tensor& U, int64_t max_iter,
                            double tol) {
  constexpr const char* op = "dual_cone_projection";
  check_gram_square(op, M);
  PYX_CHECK(U.dim() == 1 || U.dim() == 2, op, "U must be a vector of T weights or a K x T matrix, ",
            "got shape ", U.sym_sizes());
  check_float(op, "U", U);
  PYX_CHECK(U.sym_size(-1) == M.sym_size(0), op, "U has ", U.sym_size(-1), " columns but M is for ",
            M.sym_size(0), " tasks");
  check_same_device(op, M, "M", U, "U");
  check_iterations(op, max_iter, tol);
}

inline void check_nash(const at::Tensor& M, const std::optional<at::Tensor>& init, int64_t max_iter,
                       double tol) {
  constexpr const char* op = "nash_bargaining";
  check_gram_square(op, M);
  if (init.has_value()) {
    PYX_CHECK(init->dim() == 1 && init->sym_size(0) == M.sym_size(0), op,
              "init must be a vector of ", M.sym_size(0), " weights, got shape ",
              init->sym_sizes());
    check_float(op, "init", *init);
    check_same_device(op, M, "M", *init, "init");
  }
  check_iterations(op, max_iter, tol);
}

inline void check_cagrad(const at::Tensor& M, double c, int64_t max_iter, double tol) {
  constexpr const char* op = "cagrad_inner";
  check_gram_square(op, M);
  PYX_CHECK(c >= 0 && std::isfinite(c), op, "c must be finite and >= 0, got ", c);
  check_iterations(op, max_iter, tol);
}

}  // namespace pyxtask::detail
