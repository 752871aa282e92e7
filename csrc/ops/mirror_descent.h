// mirror_descent_step: checks shared by the CPU, CUDA and Meta kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>

#include "pyxtask/checks.h"

namespace pyxtask::detail {

inline void check_mirror_descent(const at::Tensor& weights, const at::Tensor& grads, double lr) {
  constexpr const char* op = "mirror_descent_step";
  PYX_CHECK(weights.dim() == 1, op, "weights must be 1-D, got shape ", weights.sym_sizes());
  PYX_CHECK(weights.sym_size(0) >= 1, op, "weights must hold at least one entry");
  check_float(op, "weights", weights);
  check_float(op, "grads", grads);
  check_same_device(op, weights, "weights", grads, "grads");
  PYX_CHECK(grads.sym_sizes() == weights.sym_sizes(), op, "grads has shape ", grads.sym_sizes(),
            " but weights has shape ", weights.sym_sizes());
  PYX_CHECK(std::isfinite(lr), op, "lr must be finite, got ", lr);
}

}  // namespace pyxtask::detail
