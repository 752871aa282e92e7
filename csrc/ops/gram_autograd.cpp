// Autograd for the Gram family, registered apart from the device kernels (which know
// nothing of autograd). The backward formulas use ATen matmuls: they run once per
// backward, off the per-step hot path.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "pyxtask/ops.h"

namespace pyxtask {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// grad of a product result w.r.t. an operand, returned in the operand's dtype.
at::Tensor matmul_in(const at::Tensor& dM, const at::Tensor& X) {
  return at::matmul(dM.to(at::promote_types(dM.scalar_type(), X.scalar_type())),
                    X.to(at::promote_types(dM.scalar_type(), X.scalar_type())))
      .to(X.scalar_type());
}

class GramFunction : public torch::autograd::Function<GramFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& G) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({G});
    return pyxtask::gram(G);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor G = ctx->get_saved_variables()[0];
    const at::Tensor& dM = grads[0];
    return {matmul_in(dM + dM.transpose(0, 1), G)};
  }
};

class CrossGramFunction : public torch::autograd::Function<CrossGramFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& A, const at::Tensor& B) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({A, B});
    return pyxtask::cross_gram(A, B);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& dM = grads[0];
    return {matmul_in(dM, saved[1]), matmul_in(dM.transpose(0, 1), saved[0])};
  }
};

// C = Gn Gn^T with Gn the row-normalised G and a constant diagonal; a zero row has no
// direction and gets a zero gradient.
class CosineMatrixFunction : public torch::autograd::Function<CosineMatrixFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& G) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({G});
    return pyxtask::cosine_matrix(G);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor G = ctx->get_saved_variables()[0];
    const auto acc = G.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor Gf = G.to(acc);
    const at::Tensor norms = Gf.norm(2, {1}, /*keepdim=*/true);
    const at::Tensor inv = at::where(norms > 0, 1.0 / norms, at::zeros_like(norms));
    const at::Tensor Gn = Gf * inv;
    at::Tensor dC = grads[0].to(acc);
    dC = dC - at::diag_embed(at::diagonal(dC));
    const at::Tensor dGn = at::matmul(dC + dC.transpose(0, 1), Gn);
    const at::Tensor radial = (dGn * Gn).sum(1, /*keepdim=*/true);
    return {((dGn - radial * Gn) * inv).to(G.scalar_type())};
  }
};

at::Tensor gram_autograd(const at::Tensor& G) { return GramFunction::apply(G); }
at::Tensor cross_gram_autograd(const at::Tensor& A, const at::Tensor& B) {
  return CrossGramFunction::apply(A, B);
}
at::Tensor cosine_matrix_autograd(const at::Tensor& G) { return CosineMatrixFunction::apply(G); }

}  // namespace
}  // namespace pyxtask

TORCH_LIBRARY_IMPL(pyxtask, Autograd, m) {
  m.impl("gram", &pyxtask::gram_autograd);
  m.impl("cross_gram", &pyxtask::cross_gram_autograd);
  m.impl("cosine_matrix", &pyxtask::cosine_matrix_autograd);
}
