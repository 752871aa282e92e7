// Flat-buffer family on CUDA: gather_flat, scatter_combination, add_scaled_.
//
// A model has hundreds of parameter tensors, most of them small: one launch per tensor would
// be launch-bound. Up to kMaxSegments tensors go into one kernel argument struct (the
// multi-tensor-apply scheme of apex); the grid covers the chunks of all of them, and each
// block finds its tensor by a binary search over the chunk prefix sums. Tensors a kernel
// can't address flat go through ATen, exactly as in flat.cpp.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "flat.h"

namespace pyxtask::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxSegments = 48;
constexpr int64_t kChunk = 8192;  // elements per block
// Fewer chunks than that in one launch keeps gridDim.x far from its limit.
constexpr int64_t kMaxChunksPerLaunch = int64_t{1} << 30;

struct Segment {
  void* dst;
  const void* src;
  int64_t numel;
  int64_t offset;  // position in the flat buffer (gather: out; scatter: columns of G)
};

// Passed by value as a kernel argument: 48 * 32 + 49 * 8 bytes, within the 4 KiB that every
// CUDA version accepts.
struct Batch {
  Segment seg[kMaxSegments];
  int64_t chunk_begin[kMaxSegments + 1];
  int count;
};

struct Piece {
  Segment seg;
  int64_t begin, end;  // element range of seg handled by this block
};

__device__ inline Piece block_piece(const Batch& batch) {
  const int64_t chunk = blockIdx.x;
  int lo = 0, hi = batch.count;  // chunk_begin[lo] <= chunk < chunk_begin[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (batch.chunk_begin[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const Segment s = batch.seg[lo];
  const int64_t begin = (chunk - batch.chunk_begin[lo]) * kChunk;
  return {s, begin, min(s.numel, begin + kChunk)};
}

// Groups the segments into batches and launches fn(batch, n_chunks) for each.
template <typename Fn>
void for_each_batch(const std::vector<Segment>& segments, Fn fn) {
  Batch batch{};
  batch.chunk_begin[0] = 0;
  for (const Segment& s : segments) {
    if (s.numel == 0) continue;
    const int64_t chunks = (s.numel + kChunk - 1) / kChunk;
    if (batch.count == kMaxSegments ||
        (batch.count > 0 && batch.chunk_begin[batch.count] + chunks > kMaxChunksPerLaunch)) {
      fn(batch, batch.chunk_begin[batch.count]);
      batch.count = 0;
    }
    batch.seg[batch.count] = s;
    batch.chunk_begin[batch.count + 1] = batch.chunk_begin[batch.count] + chunks;
    ++batch.count;
  }
  if (batch.count > 0) fn(batch, batch.chunk_begin[batch.count]);
}

// gather_flat moves bits: E is an unsigned integer of the element size. Source and
// destination never overlap (a gradient is not a slice of the buffer it is gathered into):
// __restrict__ lets the loads of an unrolled loop run ahead of its stores.
template <typename E>
__global__ void __launch_bounds__(kThreads) gather_kernel(const Batch batch) {
  const Piece piece = block_piece(batch);
  const E* __restrict__ src = static_cast<const E*>(piece.seg.src);
  E* __restrict__ dst = static_cast<E*>(piece.seg.dst) + piece.seg.offset;
  const int64_t begin = piece.begin, end = piece.end;
  constexpr int kLanes = sizeof(uint4) / sizeof(E);
  // Chunks start at multiples of kChunk elements, so aligned bases keep every chunk aligned.
  if ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) % sizeof(uint4) == 0) {
    const int64_t v_begin = begin / kLanes;
    const int64_t v_end = end / kLanes;
    const uint4* __restrict__ s4 = reinterpret_cast<const uint4*>(src);
    uint4* __restrict__ d4 = reinterpret_cast<uint4*>(dst);
    for (int64_t v = v_begin + threadIdx.x; v < v_end; v += kThreads) d4[v] = s4[v];
    for (int64_t k = v_end * kLanes + threadIdx.x; k < end; k += kThreads) dst[k] = src[k];
  } else {
    for (int64_t k = begin + threadIdx.x; k < end; k += kThreads) dst[k] = src[k];
  }
}

void gather_flat_cuda(at::TensorList tensors, const at::Tensor& out) {
  detail::check_gather_flat(tensors, out);
  c10::cuda::CUDAGuard guard(out.device());
  const auto dtype = out.scalar_type();
  std::vector<Segment> segments;
  int64_t offset = 0;
  for (const auto& t : tensors) {
    if (detail::is_flat(t, dtype)) {
      segments.push_back({out.data_ptr(), t.const_data_ptr(), t.numel(), offset});
    } else if (t.numel() > 0) {
      out.narrow(0, offset, t.numel()).view(t.sizes()).copy_(t);
    }
    offset += t.numel();
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  for_each_batch(segments, [&](const Batch& batch, int64_t n_chunks) {
    const auto grid = static_cast<unsigned>(n_chunks);
    switch (out.element_size()) {
      case 2:
        gather_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(batch);
        break;
      case 4:
        gather_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(batch);
        break;
      default:
        gather_kernel<uint64_t><<<grid, kThreads, 0, stream>>>(batch);
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// dst[k] (=|+=) sum_t w[t] * G[t, offset + k] in Acc precision, t in order as on the CPU.
template <typename GT, typename DT, typename Acc>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const Batch batch, const GT* __restrict__ g, int64_t ldg,
                   const Acc* __restrict__ w, int t_count, bool accumulate) {
  __shared__ Acc ws[kMaxTasks];
  for (int t = threadIdx.x; t < t_count; t += kThreads) ws[t] = w[t];
  __syncthreads();
  const Piece piece = block_piece(batch);
  // g is __restrict__ already: the destinations are not rows of G.
  DT* __restrict__ dst = static_cast<DT*>(piece.seg.dst);
  const GT* __restrict__ gp = g + piece.seg.offset;
  const int64_t end = piece.end;
  // Several elements per thread keep several loads of each row in flight.
  constexpr int kPer = 4;
  for (int64_t k0 = piece.begin + threadIdx.x; k0 < end; k0 += kThreads * kPer) {
    Acc acc[kPer];
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int64_t k = k0 + e * kThreads;
      acc[e] = (accumulate && k < end) ? static_cast<Acc>(dst[k]) : Acc(0);
    }
    for (int t = 0; t < t_count; ++t) {
      const GT* row = gp + t * ldg;
      const Acc wt = ws[t];
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        const int64_t k = k0 + e * kThreads;
        if (k < end) acc[e] += wt * static_cast<Acc>(row[k]);
      }
    }
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int64_t k = k0 + e * kThreads;
      if (k < end) dst[k] = static_cast<DT>(acc[e]);
    }
  }
}

void scatter_combination_cuda(const at::Tensor& G_in, const at::Tensor& weights,
                              at::TensorList tensors, bool accumulate) {
  detail::check_scatter_combination(G_in, weights, tensors);
  c10::cuda::CUDAGuard guard(G_in.device());
  const at::Tensor G = with_unit_column_stride(G_in);
  const int64_t t_count = G.size(0);
  const detail::StagedTargets staging(tensors);
  const std::vector<at::Tensor>& targets = staging.targets;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, G.scalar_type(), "pyxtask_combine_cuda", [&] {
        using GT = scalar_t;
        using Acc = std::conditional_t<std::is_same_v<GT, double>, double, float>;
        // Converted on the device: the weights never visit the host.
        const at::Tensor w =
            weights.to(std::is_same_v<Acc, double> ? at::kDouble : at::kFloat).contiguous();
        // One pass per destination dtype, since a launch writes one dtype.
        for (const at::ScalarType dt : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
          for (const bool acc : {false, true}) {
            std::vector<Segment> segments;
            int64_t offset = 0;
            for (size_t i = 0; i < targets.size(); ++i) {
              const bool seg_acc = staging.accumulate_into(i, accumulate);
              if (targets[i].scalar_type() == dt && seg_acc == acc)
                segments.push_back({targets[i].data_ptr(), nullptr, targets[i].numel(), offset});
              offset += targets[i].numel();
            }
            if (segments.empty()) continue;
            AT_DISPATCH_FLOATING_TYPES_AND2(
                at::kHalf, at::kBFloat16, dt, "pyxtask_combine_dst_cuda", [&] {
                  for_each_batch(segments, [&](const Batch& batch, int64_t n_chunks) {
                    combine_kernel<GT, scalar_t, Acc>
                        <<<static_cast<unsigned>(n_chunks), kThreads, 0, stream>>>(
                            batch, G.const_data_ptr<GT>(), G.stride(0), w.const_data_ptr<Acc>(),
                            static_cast<int>(t_count), acc);
                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                  });
                });
          }
        }
      });
  staging.write_back(tensors, accumulate);
}

// t and v never share memory here: add_scaled_cuda sends a vector that overlaps its
// tensor (t += alpha * t, say) through ATen.
template <typename T>
__global__ void __launch_bounds__(kThreads) add_scaled_kernel(const Batch batch, double alpha) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const Piece piece = block_piece(batch);
  T* __restrict__ t = static_cast<T*>(piece.seg.dst);
  const T* __restrict__ v = static_cast<const T*>(piece.seg.src);
  const int64_t end = piece.end;
  const Acc a = static_cast<Acc>(alpha);
  for (int64_t k = piece.begin + threadIdx.x; k < end; k += kThreads)
    t[k] = static_cast<T>(static_cast<Acc>(t[k]) + a * static_cast<Acc>(v[k]));
}

// Whether the element ranges of two flat tensors overlap.
bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto a0 = reinterpret_cast<uintptr_t>(a.const_data_ptr());
  const auto b0 = reinterpret_cast<uintptr_t>(b.const_data_ptr());
  const auto a1 = a0 + static_cast<uintptr_t>(a.numel() * a.element_size());
  const auto b1 = b0 + static_cast<uintptr_t>(b.numel() * b.element_size());
  return a0 < b1 && b0 < a1;
}

void add_scaled_cuda(at::TensorList tensors, at::TensorList vectors, double alpha) {
  detail::check_add_scaled(tensors, vectors, alpha);
  if (tensors.empty()) return;
  c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<size_t> fused;
  for (size_t i = 0; i < tensors.size(); ++i) {
    // A vector that overlaps its tensor would break the kernel's __restrict__: ATen takes it.
    if (tensors[i].is_contiguous() && detail::is_flat(vectors[i], tensors[i].scalar_type()) &&
        !shares_memory(tensors[i], vectors[i])) {
      fused.push_back(i);
    } else {
      // As on the CPU: in the accumulation dtype, then one rounding.
      const auto acc = accumulate_type(tensors[i].scalar_type());
      tensors[i].copy_(at::add(tensors[i].to(acc), vectors[i].to(acc), alpha));
    }
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const at::ScalarType dt : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    std::vector<Segment> segments;
    for (const size_t i : fused) {
      if (tensors[i].scalar_type() != dt) continue;
      segments.push_back(
          {tensors[i].data_ptr(), vectors[i].const_data_ptr(), tensors[i].numel(), 0});
    }
    if (segments.empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "pyxtask_add_scaled_cuda", [&] {
      for_each_batch(segments, [&](const Batch& batch, int64_t n_chunks) {
        add_scaled_kernel<scalar_t>
            <<<static_cast<unsigned>(n_chunks), kThreads, 0, stream>>>(batch, alpha);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
}

}  // namespace
}  // namespace pyxtask::cuda

TORCH_LIBRARY_IMPL(pyxtask, CUDA, m) {
  m.impl("gather_flat", &pyxtask::cuda::gather_flat_cuda);
  m.impl("scatter_combination", &pyxtask::cuda::scatter_combination_cuda);
  m.impl("add_scaled_", &pyxtask::cuda::add_scaled_cuda);
}
