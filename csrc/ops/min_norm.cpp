// min_norm_point on the CPU: the solver of min_norm.h in double precision. T <= 64, so one
// solve is microseconds; its cost is dominated by getting M into double and back.
#include "min_norm.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

namespace pyxtask::cpu {
namespace {

at::Tensor min_norm_point_cpu(const at::Tensor& M, int64_t max_iter, double tol,
                              c10::string_view method) {
  detail::check_min_norm(M, max_iter, tol, method);
  const at::Tensor md = M.to(at::kDouble).contiguous();
  const int64_t T = md.size(0);
  const double* m = md.const_data_ptr<double>();
  for (int64_t i = 0; i < T * T; ++i) {
    PYX_CHECK(std::isfinite(m[i]), "min_norm_point", "M[", i / T, ", ", i % T, "] = ", m[i],
              " is not finite");
  }
  at::Tensor lam = at::empty({T}, md.options());
  detail::MinNormScratch ws;  // 36 KB
  detail::solve_min_norm(m, T, max_iter, tol, detail::parse_min_norm_method(method),
                         lam.data_ptr<double>(), ws);
  return lam.to(accumulate_type(M.scalar_type()));
}

at::Tensor min_norm_point_meta(const at::Tensor& M, int64_t max_iter, double tol,
                               c10::string_view method) {
  detail::check_min_norm(M, max_iter, tol, method);
  return at::empty_symint({M.sym_size(0)}, M.options().dtype(accumulate_type(M.scalar_type())));
}

}  // namespace
}  // namespace pyxtask::cpu

TORCH_LIBRARY_IMPL(pyxtask, CPU, m) { m.impl("min_norm_point", &pyxtask::cpu::min_norm_point_cpu); }

TORCH_LIBRARY_IMPL(pyxtask, Meta, m) {
  m.impl("min_norm_point", &pyxtask::cpu::min_norm_point_meta);
}
