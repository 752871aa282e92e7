// Public C++ API of the pyxtask op library. Every function dispatches through the
// PyTorch dispatcher (torch.ops.pyxtask.*), so the same call works on CPU and CUDA
// tensors, under autograd, TorchScript and torch.compile.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
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

}  // namespace pyxtask
