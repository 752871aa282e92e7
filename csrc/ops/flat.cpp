// Flat-buffer family on the CPU. A training step moves every shared parameter's gradient
// into a row of the T x P buffer (gather_flat) and the combined gradient back into .grad
// (scatter_combination); finite-difference HVPs move the parameters (add_scaled_). Each is
// one parallel pass over the concatenated elements, not a loop of per-tensor ATen calls:
// a BERT has ~200 parameter tensors, most of them small. Tensors that are not contiguous
// (or not of the buffer's dtype) go through ATen's strided copy instead.
#include "flat.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace pyxtask::cpu {
namespace {

// Elements [begin, end) of the concatenation of segments with the given prefix offsets,
// visited as (segment index, offset in segment, count) pieces.
template <typename Fn>
void for_each_piece(const std::vector<int64_t>& offsets, int64_t begin, int64_t end, Fn fn) {
  auto it = std::upper_bound(offsets.begin(), offsets.end(), begin);
  size_t seg = static_cast<size_t>(it - offsets.begin()) - 1;
  int64_t pos = begin;
  while (pos < end && seg + 1 < offsets.size()) {
    const int64_t seg_end = std::min(end, offsets[seg + 1]);
    if (seg_end > pos) fn(seg, pos - offsets[seg], seg_end - pos);
    pos = seg_end;
    ++seg;
  }
}

constexpr int64_t kGrain = 1 << 15;

void gather_flat_cpu(at::TensorList tensors, const at::Tensor& out) {
  detail::check_gather_flat(tensors, out);
  const auto dtype = out.scalar_type();
  std::vector<const at::Tensor*> fused;
  std::vector<int64_t> src_offsets{0}, dst_offsets;
  int64_t offset = 0;
  for (const auto& t : tensors) {
    if (detail::is_flat(t, dtype)) {
      fused.push_back(&t);
      dst_offsets.push_back(offset);
      src_offsets.push_back(src_offsets.back() + t.numel());
    } else if (t.numel() > 0) {
      out.narrow(0, offset, t.numel()).view(t.sizes()).copy_(t);
    }
    offset += t.numel();
  }
  if (fused.empty()) return;
  const int64_t elem = out.element_size();
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, src_offsets.back(), kGrain, [&](int64_t begin, int64_t end) {
    for_each_piece(src_offsets, begin, end, [&](size_t seg, int64_t pos, int64_t n) {
      std::memcpy(dst + (dst_offsets[seg] + pos) * elem,
                  static_cast<const char*>(fused[seg]->const_data_ptr()) + pos * elem, n * elem);
    });
  });
}

// dst[k] (=|+=) sum_t w[t] * G[t, k], for n elements, in Acc precision.
template <typename GT, typename DT, typename Acc>
void combine(const GT* g, int64_t ldg, const Acc* w, int64_t t_count, DT* dst, int64_t n,
             bool accumulate) {
  constexpr int64_t kBlock = 512;
  Acc acc[kBlock];
  for (int64_t k0 = 0; k0 < n; k0 += kBlock) {
    const int64_t len = std::min(kBlock, n - k0);
    for (int64_t k = 0; k < len; ++k) acc[k] = accumulate ? static_cast<Acc>(dst[k0 + k]) : Acc(0);
    for (int64_t t = 0; t < t_count; ++t) {
      const GT* row = g + t * ldg + k0;
      const Acc wt = w[t];
      for (int64_t k = 0; k < len; ++k) acc[k] += wt * static_cast<Acc>(row[k]);
    }
    for (int64_t k = 0; k < len; ++k) dst[k0 + k] = static_cast<DT>(acc[k]);
  }
}

void scatter_combination_cpu(const at::Tensor& G_in, const at::Tensor& weights,
                             at::TensorList tensors, bool accumulate) {
  detail::check_scatter_combination(G_in, weights, tensors);
  const at::Tensor G = with_unit_column_stride(G_in);
  const int64_t t_count = G.size(0);
  const detail::StagedTargets staging(tensors);
  const std::vector<at::Tensor>& targets = staging.targets;
  std::vector<int64_t> offsets{0};
  for (const auto& t : targets) offsets.push_back(offsets.back() + t.numel());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, G.scalar_type(), "pyxtask_combine", [&] {
        using GT = scalar_t;
        using Acc = std::conditional_t<std::is_same_v<GT, double>, double, float>;
        const at::Tensor w =
            weights.to(std::is_same_v<Acc, double> ? at::kDouble : at::kFloat).contiguous();
        const Acc* wp = w.const_data_ptr<Acc>();
        const GT* gp = G.const_data_ptr<GT>();
        const int64_t ldg = G.stride(0);
        at::parallel_for(0, offsets.back(), kGrain, [&](int64_t begin, int64_t end) {
          for_each_piece(offsets, begin, end, [&](size_t seg, int64_t pos, int64_t n) {
            const at::Tensor& dst = targets[seg];
            const bool acc = staging.accumulate_into(seg, accumulate);
            AT_DISPATCH_FLOATING_TYPES_AND2(
                at::kHalf, at::kBFloat16, dst.scalar_type(), "pyxtask_combine_dst", [&] {
                  combine<GT, scalar_t, Acc>(gp + offsets[seg] + pos, ldg, wp, t_count,
                                             dst.data_ptr<scalar_t>() + pos, n, acc);
                });
          });
        });
      });
  staging.write_back(tensors, accumulate);
}

void add_scaled_cpu(at::TensorList tensors, at::TensorList vectors, double alpha) {
  detail::check_add_scaled(tensors, vectors, alpha);
  std::vector<size_t> fused;
  std::vector<int64_t> offsets{0};
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].is_contiguous() && detail::is_flat(vectors[i], tensors[i].scalar_type())) {
      fused.push_back(i);
      offsets.push_back(offsets.back() + tensors[i].numel());
    } else {
      // In the accumulation dtype, then one rounding: ATen's reduced-precision add_ rounds
      // alpha * v first, which the fused path doesn't.
      const auto acc = accumulate_type(tensors[i].scalar_type());
      tensors[i].copy_(at::add(tensors[i].to(acc), vectors[i].to(acc), alpha));
    }
  }
  at::parallel_for(0, offsets.back(), kGrain, [&](int64_t begin, int64_t end) {
    for_each_piece(offsets, begin, end, [&](size_t seg, int64_t pos, int64_t n) {
      const at::Tensor& t = tensors[fused[seg]];
      const at::Tensor& v = vectors[fused[seg]];
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, t.scalar_type(), "pyxtask_add_scaled", [&] {
            using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
            scalar_t* tp = t.data_ptr<scalar_t>() + pos;
            const scalar_t* vp = v.const_data_ptr<scalar_t>() + pos;
            const Acc a = static_cast<Acc>(alpha);
            for (int64_t k = 0; k < n; ++k)
              tp[k] = static_cast<scalar_t>(static_cast<Acc>(tp[k]) + a * static_cast<Acc>(vp[k]));
          });
    });
  });
}

void gather_flat_meta(at::TensorList tensors, const at::Tensor& out) {
  detail::check_gather_flat(tensors, out);
}

void scatter_combination_meta(const at::Tensor& G, const at::Tensor& weights,
                              at::TensorList tensors, bool /*accumulate*/) {
  detail::check_scatter_combination(G, weights, tensors);
}

void add_scaled_meta(at::TensorList tensors, at::TensorList vectors, double alpha) {
  detail::check_add_scaled(tensors, vectors, alpha);
}

}  // namespace
}  // namespace pyxtask::cpu

TORCH_LIBRARY_IMPL(pyxtask, CPU, m) {
  m.impl("gather_flat", &pyxtask::cpu::gather_flat_cpu);
  m.impl("scatter_combination", &pyxtask::cpu::scatter_combination_cpu);
  m.impl("add_scaled_", &pyxtask::cpu::add_scaled_cpu);
}

TORCH_LIBRARY_IMPL(pyxtask, Meta, m) {
  m.impl("gather_flat", &pyxtask::cpu::gather_flat_meta);
  m.impl("scatter_combination", &pyxtask::cpu::scatter_combination_meta);
  m.impl("add_scaled_", &pyxtask::cpu::add_scaled_meta);
}
