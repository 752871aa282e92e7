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

}  // namespace pyxtask
