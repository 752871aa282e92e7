// Public C++ API of the pyxtask op library. Every function dispatches through the
// PyTorch dispatcher (torch.ops.pyxtask.*), so the same call works on CPU and CUDA
// tensors, under autograd, TorchScript and torch.compile.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace pyxtask {

// Largest number of rows (tasks) a Gram-family op or the min-norm solver accepts.
// The kernels keep a T x T accumulator per thread/block in registers or shared memory.
constexpr int64_t kMaxTasks = 64;

// G @ G.T for a T x P matrix, accumulated in fp32 (fp64 for fp64 input); returns fp32/fp64.
at::Tensor gram(const at::Tensor& G);
// A @ B.T for T x P and S x P matrices.
at::Tensor cross_gram(const at::Tensor& A, const at::Tensor& B);
// Cosine similarity of the rows of G; a zero row has cosine 0 with every row (itself included).
at::Tensor cosine_matrix(const at::Tensor& G);

// Writes the tensors back to back into the 1-D tensor `out` (numel must add up).
void gather_flat(at::TensorList tensors, const at::Tensor& out);
// tensors[i] (=|+=) sum_t weights[t] * G[t, offset_i : offset_i + numel_i].view_as(tensors[i]).
void scatter_combination(const at::Tensor& G, const at::Tensor& weights, at::TensorList tensors,
                         bool accumulate);
// tensors[i] += alpha * vectors[i], for all i, in few launches.
void add_scaled_(at::TensorList tensors, at::TensorList vectors, double alpha);

// w * exp(-lr * g) / sum(w * exp(-lr * g)), evaluated in the log domain.
at::Tensor mirror_descent_step(const at::Tensor& weights, const at::Tensor& grads, double lr);

// argmin over the probability simplex of lambda^T M lambda. method: "away" (away-step
// Frank-Wolfe, the default), "pairwise" or "plain" (MetaWeighting Alg. 2).
at::Tensor min_norm_point(const at::Tensor& M, int64_t max_iter, double tol,
                          c10::string_view method);

// Solvers on a T x T Gram matrix M = J J^T of per-task gradients (gram_solvers). Each takes
// float32/64 (or half) input and returns float64 results plus a float64 residual, so that a
// caller can tell an answer from an approximation; none of them syncs with the host.
//
// For each row u of U (K x T, or a vector of T): argmin_v v^T M v s.t. v >= u, i.e. the
// weights of the projection of J^T u onto the dual cone of the rows of J (UPGrad, DualProj).
// Returns V (U's shape) and, per row, the relative KKT residual.
std::tuple<at::Tensor, at::Tensor> dual_cone_projection(const at::Tensor& M, const at::Tensor& U,
                                                        int64_t max_iter, double tol);
// Nash-MTL's bargaining solution: alpha > 0 with M alpha = 1 / alpha, by damped Newton from
// init (or 1 / sqrt(diag M)). Returns alpha and max_i |alpha_i (M alpha)_i - 1|; when no
// solution exists (a non-negative combination of the gradients is zero) alpha solves a
// slightly ridged system and the residual is of order one.
std::tuple<at::Tensor, at::Tensor> nash_bargaining(const at::Tensor& M,
                                                   const std::optional<at::Tensor>& init,
                                                   int64_t max_iter, double tol);
// CAGrad's inner problem: argmin over the simplex of w^T M b + c sqrt(b^T M b) sqrt(w^T M w),
// b = 1 / T. Returns w and its relative KKT residual.
std::tuple<at::Tensor, at::Tensor> cagrad_inner(const at::Tensor& M, double c, int64_t max_iter,
                                                double tol);

// Per-sample gradient products of one layer, for a batch whose loss is a sum of per-sample
// losses, without per-sample gradients. a [B, L, I]: the layer's inputs; d [B, L, O]: the
// gradients of its outputs; mask [B, L] (nonzero = a real position; none: all real). The
// gradient of sample b's loss w.r.t. a linear layer's weight is G_b = sum_k d_bk a_bk^T.
// Results are [B], float32 (float64 for float64 inputs).
//
// <G_b, v> for v [O, I].
at::Tensor linear_sample_dots(const at::Tensor& a, const at::Tensor& d, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask);
// ||G_b||^2, by "gram" (sum_{k,l} (d_k . d_l)(a_k . a_l)), "materialize" (G_b formed per
// sample) or "auto" (the one with fewer multiply-adds at the sample's length).
at::Tensor linear_sample_sq_norms(const at::Tensor& a, const at::Tensor& d,
                                  const std::optional<at::Tensor>& mask, c10::string_view method);
// For an embedding with indices ids [B, L] and output gradients d [B, L, H]: sample b's
// gradient row r is the sum of d_bk over its real positions with ids_bk = r.
// <G_b, v> for v [num_embeddings, H].
at::Tensor embedding_sample_dots(const at::Tensor& ids, const at::Tensor& d, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask);
// ||G_b||^2.
at::Tensor embedding_sample_sq_norms(const at::Tensor& ids, const at::Tensor& d,
                                     const std::optional<at::Tensor>& mask);

}  // namespace pyxtask
