// Flat-buffer family (gather_flat, scatter_combination, add_scaled_): argument checks shared
// by the CPU, CUDA and Meta kernels, and the split of a tensor list into the tensors a fused
// kernel can take directly and the ones it hands to ATen (non-contiguous or another dtype).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <vector>

#include "pyxtask/checks.h"

namespace pyxtask::detail {

// Symbolic-size safe (these checks also run in the Meta kernels under torch.compile).
inline c10::SymInt total_numel(at::TensorList tensors) {
  c10::SymInt n = 0;
  for (const auto& t : tensors) n += t.sym_numel();
  return n;
}

inline void check_tensor_list(const char* op, const char* name, at::TensorList tensors,
                              const at::Tensor& anchor, const char* anchor_name) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    PYX_CHECK(t.defined(), op, name, "[", i, "] is undefined (a missing .grad?)");
    PYX_CHECK(is_supported_float(t.scalar_type()), op, name, "[", i,
              "] must be a floating-point tensor, got ", t.scalar_type());
    PYX_CHECK(t.device() == anchor.device(), op, name, "[", i, "] is on ", t.device(), " but ",
              anchor_name, " is on ", anchor.device(), "; move both to one device");
  }
}

inline void check_flat_vector(const char* op, const char* name, const at::Tensor& v) {
  PYX_CHECK(v.dim() == 1, op, name, " must be 1-D, got shape ", v.sym_sizes());
  check_float(op, name, v);
  PYX_CHECK(v.sym_numel() <= 1 || v.sym_stride(0) == 1, op, name,
            " must be contiguous (a row of a T x P buffer is); got stride ", v.sym_stride(0));
}

inline void check_gather_flat(at::TensorList tensors, const at::Tensor& out) {
  constexpr const char* op = "gather_flat";
  check_flat_vector(op, "out", out);
  check_tensor_list(op, "tensors", tensors, out, "out");
  const c10::SymInt n = total_numel(tensors);
  PYX_CHECK(n == out.sym_numel(), op, "the tensors hold ", n, " elements but out has ",
            out.sym_numel());
}

inline void check_scatter_combination(const at::Tensor& G, const at::Tensor& weights,
                                      at::TensorList tensors) {
  constexpr const char* op = "scatter_combination";
  check_task_matrix(op, "G", G);
  PYX_CHECK(weights.dim() == 1 && weights.sym_size(0) == G.sym_size(0), op,
            "weights must be a 1-D tensor with one entry per row of G (", G.sym_size(0),
            "), got shape ", weights.sym_sizes());
  check_float(op, "weights", weights);
  check_same_device(op, G, "G", weights, "weights");
  check_tensor_list(op, "tensors", tensors, G, "G");
  const c10::SymInt n = total_numel(tensors);
  PYX_CHECK(n == G.sym_size(1), op, "the tensors hold ", n, " elements but G has ", G.sym_size(1),
            " columns");
}

inline void check_add_scaled(at::TensorList tensors, at::TensorList vectors, double alpha) {
  constexpr const char* op = "add_scaled_";
  PYX_CHECK(tensors.size() == vectors.size(), op, "got ", tensors.size(), " tensors but ",
            vectors.size(), " vectors");
  PYX_CHECK(std::isfinite(alpha), op, "alpha must be finite, got ", alpha);
  if (tensors.empty()) return;
  check_tensor_list(op, "tensors", tensors, tensors[0], "tensors[0]");
  check_tensor_list(op, "vectors", vectors, tensors[0], "tensors[0]");
  for (size_t i = 0; i < tensors.size(); ++i) {
    PYX_CHECK(tensors[i].sym_sizes() == vectors[i].sym_sizes(), op, "tensors[", i, "] has shape ",
              tensors[i].sym_sizes(), " but vectors[", i, "] has shape ", vectors[i].sym_sizes());
  }
}

// scatter_combination's destinations: tensors a fused kernel can't address flat
// (non-contiguous) get a contiguous twin to write, copied (or added) back afterwards.
struct StagedTargets {
  std::vector<at::Tensor> targets;
  std::vector<bool> staged;

  explicit StagedTargets(at::TensorList tensors) {
    targets.reserve(tensors.size());
    for (const auto& t : tensors) {
      const bool direct = t.is_contiguous();
      targets.push_back(direct ? t : at::empty(t.sizes(), t.options()));
      staged.push_back(!direct);
    }
  }

  // Whether the kernel should add into target i (staged twins start empty: written, then
  // added back by write_back).
  bool accumulate_into(size_t i, bool accumulate) const { return accumulate && !staged[i]; }

  void write_back(at::TensorList tensors, bool accumulate) const {
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (!staged[i]) continue;
      if (accumulate) {
        tensors[i].add_(targets[i]);
      } else {
        tensors[i].copy_(targets[i]);
      }
    }
  }
};

// Whether a fused kernel can address t as a flat array of `dtype`.
inline bool is_flat(const at::Tensor& t, at::ScalarType dtype) {
  return t.is_contiguous() && t.scalar_type() == dtype;
}

}  // namespace pyxtask::detail
