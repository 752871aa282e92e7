// Per-sample gradient products of a layer ("ghost" products): checks and helpers shared by
// the CPU, CUDA and Meta kernels of linear_sample_dots, linear_sample_sq_norms,
// embedding_sample_dots and embedding_sample_sq_norms.
//
// Shapes: a [B, L, I] (layer inputs), d [B, L, O] (gradients of the layer outputs),
// ids [B, L] (embedding indices), v [O, I] or [num_embeddings, H], mask [B, L] (nonzero =
// a real position). Results are [B], in float32 (float64 for float64 inputs).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

#include "pyxtask/checks.h"

namespace pyxtask::detail {

// How linear_sample_sq_norms reduces a sample: the L x L Grams of its inputs and output
// gradients (sum_{k,l} (d_k . d_l)(a_k . a_l), ~L^2 (I + O) multiply-adds) or its
// materialised I x O gradient (sum_k d_k a_k^T, ~L I O). "auto" takes the cheaper one.
enum class NormMethod { kAuto, kGram, kMaterialize };

inline NormMethod parse_norm_method(c10::string_view method) {
  if (method == "auto") return NormMethod::kAuto;
  if (method == "gram") return NormMethod::kGram;
  if (method == "materialize") return NormMethod::kMaterialize;
  PYX_CHECK(false, "linear_sample_sq_norms", "method must be \"auto\", \"gram\" or ",
            "\"materialize\", got \"", std::string(method), "\"");
  return NormMethod::kAuto;
}

// The Gram path for a sample (or layer) with `rows` real positions.
inline bool use_gram(NormMethod method, int64_t rows, int64_t in, int64_t out) {
  if (method != NormMethod::kAuto) return method == NormMethod::kGram;
  return rows * (in + out) <= in * out;
}

inline void check_mask(const char* op, const std::optional<at::Tensor>& mask, const at::Tensor& x) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  PYX_CHECK(m.dim() == 2 && m.sym_size(0) == x.sym_size(0) && m.sym_size(1) == x.sym_size(1), op,
            "mask must be [B, L] = [", x.sym_size(0), ", ", x.sym_size(1), "], got shape ",
            m.sym_sizes());
  PYX_CHECK(m.scalar_type() == at::kBool || at::isIntegralType(m.scalar_type(), false) ||
                at::isFloatingType(m.scalar_type()),
            op, "mask must be bool, integer or float, got ", m.scalar_type());
  check_same_device(op, x, "the inputs", m, "mask");
}

// a [B, L, I], d [B, L, O]; v (when given) [O, I].
inline void check_linear(const char* op, const at::Tensor& a, const at::Tensor& d,
                         const at::Tensor* v, const std::optional<at::Tensor>& mask) {
  PYX_CHECK(a.dim() == 3, op, "a must be [B, L, I] (layer inputs), got shape ", a.sym_sizes());
  PYX_CHECK(d.dim() == 3, op, "d must be [B, L, O] (output gradients), got shape ", d.sym_sizes());
  PYX_CHECK(a.sym_size(0) == d.sym_size(0) && a.sym_size(1) == d.sym_size(1), op, "a has shape ",
            a.sym_sizes(), " but d has shape ", d.sym_sizes(), "; their [B, L] must match");
  check_float(op, "a", a);
  check_float(op, "d", d);
  PYX_CHECK(a.scalar_type() == d.scalar_type(), op, "a is ", a.scalar_type(), " but d is ",
            d.scalar_type(), "; give both in one dtype");
  check_same_device(op, a, "a", d, "d");
  if (v != nullptr) {
    PYX_CHECK(v->dim() == 2 && v->sym_size(0) == d.sym_size(2) && v->sym_size(1) == a.sym_size(2),
              op, "v must be [O, I] = [", d.sym_size(2), ", ", a.sym_size(2), "], got shape ",
              v->sym_sizes());
    check_float(op, "v", *v);
    check_same_device(op, a, "a", *v, "v");
  }
  check_mask(op, mask, a);
}

// ids [B, L] integer, d [B, L, H]; v (when given) [num_embeddings, H].
inline void check_embedding(const char* op, const at::Tensor& ids, const at::Tensor& d,
                            const at::Tensor* v, const std::optional<at::Tensor>& mask) {
  PYX_CHECK(ids.dim() == 2, op, "ids must be [B, L], got shape ", ids.sym_sizes());
  PYX_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
            "ids must be int64 or int32, got ", ids.scalar_type());
  PYX_CHECK(d.dim() == 3 && d.sym_size(0) == ids.sym_size(0) && d.sym_size(1) == ids.sym_size(1),
            op, "d must be [B, L, H] with [B, L] = ", ids.sym_sizes(), ", got shape ",
            d.sym_sizes());
  check_float(op, "d", d);
  check_same_device(op, ids, "ids", d, "d");
  if (v != nullptr) {
    PYX_CHECK(v->dim() == 2 && v->sym_size(1) == d.sym_size(2), op,
              "v must be [num_embeddings, H] with H = ", d.sym_size(2), ", got shape ",
              v->sym_sizes());
    check_float(op, "v", *v);
    check_same_device(op, d, "d", *v, "v");
  }
  check_mask(op, mask, ids);
}

}  // namespace pyxtask::detail
