// The one place where pyxtask's op schemas are declared. Kernels are registered per
// device next to their implementation (TORCH_LIBRARY_IMPL in each family's .cpp / .cu),
// autograd in gram_autograd.cpp. The C++ API below goes through the dispatcher so that C++
// callers get the same device dispatch and autograd as Python callers.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "pyxtask/ops.h"

TORCH_LIBRARY(pyxtask, m) {
  m.def("gram(Tensor G) -> Tensor");
  m.def("cross_gram(Tensor A, Tensor B) -> Tensor");
  m.def("cosine_matrix(Tensor G) -> Tensor");
  m.def("gather_flat(Tensor[] tensors, Tensor(a!) out) -> ()");
  m.def(
      "scatter_combination(Tensor G, Tensor weights, Tensor(a!)[] tensors, "
      "bool accumulate=False) -> ()");
  m.def("add_scaled_(Tensor(a!)[] tensors, Tensor[] vectors, float alpha) -> ()");
  m.def("mirror_descent_step(Tensor weights, Tensor grads, float lr) -> Tensor");
  m.def(
      "min_norm_point(Tensor M, int max_iter=10000, float tol=1e-12, str method=\"away\") "
      "-> Tensor");
  m.def(
      "dual_cone_projection(Tensor M, Tensor U, int max_iter=1000, float tol=1e-12) "
      "-> (Tensor, Tensor)");
  m.def(
      "nash_bargaining(Tensor M, Tensor? init=None, int max_iter=100, float tol=1e-12) "
      "-> (Tensor, Tensor)");
  m.def("cagrad_inner(Tensor M, float c, int max_iter=1000, float tol=1e-12) -> (Tensor, Tensor)");
  m.def("linear_sample_dots(Tensor a, Tensor d, Tensor v, Tensor? mask=None) -> Tensor");
  m.def(
      "linear_sample_sq_norms(Tensor a, Tensor d, Tensor? mask=None, str method=\"auto\") "
      "-> Tensor");
  m.def("embedding_sample_dots(Tensor ids, Tensor d, Tensor v, Tensor? mask=None) -> Tensor");
  m.def("embedding_sample_sq_norms(Tensor ids, Tensor d, Tensor? mask=None) -> Tensor");
}

namespace pyxtask {
namespace {
template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}
}  // namespace

at::Tensor gram(const at::Tensor& G) {
  static auto op = find_op<at::Tensor(const at::Tensor&)>("pyxtask::gram");
  return op.call(G);
}

at::Tensor cross_gram(const at::Tensor& A, const at::Tensor& B) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("pyxtask::cross_gram");
  return op.call(A, B);
}

at::Tensor cosine_matrix(const at::Tensor& G) {
  static auto op = find_op<at::Tensor(const at::Tensor&)>("pyxtask::cosine_matrix");
  return op.call(G);
}

void gather_flat(at::TensorList tensors, const at::Tensor& out) {
  static auto op = find_op<void(at::TensorList, const at::Tensor&)>("pyxtask::gather_flat");
  op.call(tensors, out);
}

void scatter_combination(const at::Tensor& G, const at::Tensor& weights, at::TensorList tensors,
                         bool accumulate) {
  static auto op = find_op<void(const at::Tensor&, const at::Tensor&, at::TensorList, bool)>(
      "pyxtask::scatter_combination");
  op.call(G, weights, tensors, accumulate);
}

void add_scaled_(at::TensorList tensors, at::TensorList vectors, double alpha) {
  static auto op = find_op<void(at::TensorList, at::TensorList, double)>("pyxtask::add_scaled_");
  op.call(tensors, vectors, alpha);
}

at::Tensor mirror_descent_step(const at::Tensor& weights, const at::Tensor& grads, double lr) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>(
      "pyxtask::mirror_descent_step");
  return op.call(weights, grads, lr);
}

at::Tensor min_norm_point(const at::Tensor& M, int64_t max_iter, double tol,
                          c10::string_view method) {
  static auto op = find_op<at::Tensor(const at::Tensor&, int64_t, double, c10::string_view)>(
      "pyxtask::min_norm_point");
  return op.call(M, max_iter, tol, method);
}

std::tuple<at::Tensor, at::Tensor> dual_cone_projection(const at::Tensor& M, const at::Tensor& U,
                                                        int64_t max_iter, double tol) {
  static auto op = find_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, int64_t, double)>("pyxtask::dual_cone_projection");
  return op.call(M, U, max_iter, tol);
}

std::tuple<at::Tensor, at::Tensor> nash_bargaining(const at::Tensor& M,
                                                   const std::optional<at::Tensor>& init,
                                                   int64_t max_iter, double tol) {
  static auto op = find_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double)>(
      "pyxtask::nash_bargaining");
  return op.call(M, init, max_iter, tol);
}

std::tuple<at::Tensor, at::Tensor> cagrad_inner(const at::Tensor& M, double c, int64_t max_iter,
                                                double tol) {
  static auto op =
      find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double, int64_t, double)>(
          "pyxtask::cagrad_inner");
  return op.call(M, c, max_iter, tol);
}

at::Tensor linear_sample_dots(const at::Tensor& a, const at::Tensor& d, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask) {
  static auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const std::optional<at::Tensor>&)>("pyxtask::linear_sample_dots");
  return op.call(a, d, v, mask);
}

at::Tensor linear_sample_sq_norms(const at::Tensor& a, const at::Tensor& d,
                                  const std::optional<at::Tensor>& mask, c10::string_view method) {
  static auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         c10::string_view)>("pyxtask::linear_sample_sq_norms");
  return op.call(a, d, mask, method);
}

at::Tensor embedding_sample_dots(const at::Tensor& ids, const at::Tensor& d, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask) {
  static auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const std::optional<at::Tensor>&)>("pyxtask::embedding_sample_dots");
  return op.call(ids, d, v, mask);
}

at::Tensor embedding_sample_sq_norms(const at::Tensor& ids, const at::Tensor& d,
                                     const std::optional<at::Tensor>& mask) {
  static auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>(
          "pyxtask::embedding_sample_sq_norms");
  return op.call(ids, d, mask);
}

}  // namespace pyxtask
