// gram_solvers on the CPU: the solvers of gram_solvers_solver.h in double precision, with
// workspaces on the heap. The rows of dual_cone_projection's U are independent problems and
// run in parallel.
#include "gram_solvers.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace pyxtask::cpu {
namespace {

// M in double, contiguous and exactly symmetric (solvers read both triangles), after
// refusing NaN/Inf with the entry named.
at::Tensor gram_as_double(const char* op, const at::Tensor& M) {
  at::Tensor md = M.to(at::kDouble).contiguous();
  const int64_t T = md.size(0);
  const double* m = md.const_data_ptr<double>();
  for (int64_t i = 0; i < T * T; ++i) {
    PYX_CHECK(std::isfinite(m[i]), op, "M[", i / T, ", ", i % T, "] = ", m[i], " is not finite");
  }
  return md.add(md.t()).mul_(0.5);
}

at::Tensor finite_double(const char* op, const char* name, const at::Tensor& t) {
  at::Tensor d = t.to(at::kDouble).contiguous();
  const double* p = d.const_data_ptr<double>();
  for (int64_t i = 0; i < d.numel(); ++i) {
    PYX_CHECK(std::isfinite(p[i]), op, name, " has a non-finite entry ", p[i], " at ", i);
  }
  return d;
}

std::tuple<at::Tensor, at::Tensor> dual_cone_projection_cpu(const at::Tensor& M,
                                                            const at::Tensor& U, int64_t max_iter,
                                                            double tol) {
  constexpr const char* op = "dual_cone_projection";
  detail::check_dual_cone(M, U, max_iter, tol);
  const at::Tensor md = gram_as_double(op, M);
  const at::Tensor ud = finite_double(op, "U", U);
  const int64_t T = md.size(0);
  const int64_t K = ud.numel() / T;
  at::Tensor V = at::empty(ud.sizes(), ud.options());
  at::Tensor res = at::empty({K}, ud.options());
  const double* m = md.const_data_ptr<double>();
  const double* u = ud.const_data_ptr<double>();
  double* v = V.data_ptr<double>();
  double* r = res.data_ptr<double>();
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> dwork(detail::dual_cone_dwork(T));
    std::vector<int> iwork(detail::dual_cone_iwork(T));
    for (int64_t k = begin; k < end; ++k) {
      r[k] = detail::dual_cone_solve(m, T, u + k * T, max_iter, tol, v + k * T, dwork.data(),
                                     iwork.data());
    }
  });
  return {V, U.dim() == 1 ? res.squeeze(0) : res};
}

std::tuple<at::Tensor, at::Tensor> nash_bargaining_cpu(const at::Tensor& M,
                                                       const std::optional<at::Tensor>& init,
                                                       int64_t max_iter, double tol) {
  constexpr const char* op = "nash_bargaining";
  detail::check_nash(M, init, max_iter, tol);
  const at::Tensor md = gram_as_double(op, M);
  const int64_t T = md.size(0);
  at::Tensor start;
  if (init.has_value()) start = finite_double(op, "init", *init);
  at::Tensor alpha = at::empty({T}, md.options());
  std::vector<double> dwork(detail::nash_dwork(T));
  std::vector<int> iwork(detail::nash_iwork(T));
  const double res = detail::nash_solve(
      md.const_data_ptr<double>(), T, start.defined() ? start.const_data_ptr<double>() : nullptr,
      max_iter, tol, alpha.data_ptr<double>(), dwork.data(), iwork.data());
  return {alpha, at::scalar_tensor(res, md.options())};
}

std::tuple<at::Tensor, at::Tensor> cagrad_inner_cpu(const at::Tensor& M, double c, int64_t max_iter,
                                                    double tol) {
  detail::check_cagrad(M, c, max_iter, tol);
  const at::Tensor md = gram_as_double("cagrad_inner", M);
  const int64_t T = md.size(0);
  at::Tensor w = at::empty({T}, md.options());
  std::vector<double> dwork(detail::cagrad_dwork(T));
  std::vector<int> iwork(detail::cagrad_iwork(T));
  const double res = detail::cagrad_solve(md.const_data_ptr<double>(), T, c, max_iter, tol,
                                          w.data_ptr<double>(), dwork.data(), iwork.data());
  return {w, at::scalar_tensor(res, md.options())};
}

at::TensorOptions result_options(const at::Tensor& M) { return M.options().dtype(at::kDouble); }

std::tuple<at::Tensor, at::Tensor> dual_cone_projection_meta(const at::Tensor& M,
                                                             const at::Tensor& U, int64_t max_iter,
                                                             double tol) {
  detail::check_dual_cone(M, U, max_iter, tol);
  at::Tensor V = at::empty_symint(U.sym_sizes(), result_options(M));
  if (U.dim() == 1) return {V, at::empty({}, result_options(M))};
  return {V, at::empty_symint({U.sym_size(0)}, result_options(M))};
}

std::tuple<at::Tensor, at::Tensor> nash_bargaining_meta(const at::Tensor& M,
                                                        const std::optional<at::Tensor>& init,
                                                        int64_t max_iter, double tol) {
  detail::check_nash(M, init, max_iter, tol);
  return {at::empty_symint({M.sym_size(0)}, result_options(M)), at::empty({}, result_options(M))};
}

std::tuple<at::Tensor, at::Tensor> cagrad_inner_meta(const at::Tensor& M, double c,
                                                     int64_t max_iter, double tol) {
  detail::check_cagrad(M, c, max_iter, tol);
  return {at::empty_symint({M.sym_size(0)}, result_options(M)), at::empty({}, result_options(M))};
}

}  // namespace
}  // namespace pyxtask::cpu

TORCH_LIBRARY_IMPL(pyxtask, CPU, m) {
  m.impl("dual_cone_projection", &pyxtask::cpu::dual_cone_projection_cpu);
  m.impl("nash_bargaining", &pyxtask::cpu::nash_bargaining_cpu);
  m.impl("cagrad_inner", &pyxtask::cpu::cagrad_inner_cpu);
}

TORCH_LIBRARY_IMPL(pyxtask, Meta, m) {
  m.impl("dual_cone_projection", &pyxtask::cpu::dual_cone_projection_meta);
  m.impl("nash_bargaining", &pyxtask::cpu::nash_bargaining_meta);
  m.impl("cagrad_inner", &pyxtask::cpu::cagrad_inner_meta);
}
