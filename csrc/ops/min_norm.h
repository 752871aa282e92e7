// min_norm_point: argument checks shared by the CPU, CUDA and Meta kernels; the solver is
// in min_norm_solver.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>

#include "min_norm_solver.h"
#include "pyxtask/checks.h"

namespace pyxtask::detail {

static_assert(kMinNormMaxTasks == kMaxTasks);

inline MinNormMethod parse_min_norm_method(c10::string_view method) {
  if (method == "away") return MinNormMethod::kAway;
  if (method == "pairwise") return MinNormMethod::kPairwise;
  if (method == "plain") return MinNormMethod::kPlain;
  PYX_CHECK(false, "min_norm_point", "method must be 'away', 'pairwise' or 'plain', got '",
            std::string(method), "'");
  return MinNormMethod::kAway;
}

inline void check_min_norm(const at::Tensor& M, int64_t max_iter, double tol,
                           c10::string_view method) {
  constexpr const char* op = "min_norm_point";
  check_gram_square(op, M);
  check_iterations(op, max_iter, tol);
  parse_min_norm_method(method);
}

}  // namespace pyxtask::detail
