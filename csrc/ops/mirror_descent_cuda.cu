// mirror_descent_step on CUDA: softmax(log w - lr * g) over the entries with w > 0, zero
// weights exactly 0, reductions in double as in mirror_descent.cpp.
//
// Three passes over the vector (max of the logits, sum of exponentials, output), each block
// writing one partial to a workspace that the next pass reduces in a fixed order: results
// depend on the grid, which depends only on N and the device, never on scheduling.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "mirror_descent.h"

namespace pyxtask::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBlocks = 1024;

// flags[0]: first negative or non-finite weight, flags[1]: first non-finite gradient (among
// entries with a valid weight), both INT64_MAX when there is none; flags[2]: 1 when the
// largest logit is not finite (all weights zero).
enum Flag : int { kBadWeight = 0, kBadGrad = 1, kNoMass = 2 };

template <bool kMax>
__device__ double block_reduce(double v, double* smem) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const double o = __shfl_down_sync(0xffffffffu, v, off);
    v = kMax ? fmax(v, o) : v + o;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // smem may still be read from a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double r = smem[0];
  for (int w = 1; w < kWarps; ++w) r = kMax ? fmax(r, smem[w]) : r + smem[w];
  return r;
}

// The same fixed-order reduction of the n per-block partials in every block.
template <bool kMax>
__device__ double reduce_partials(const double* part, int n, double* smem) {
  double v = kMax ? -INFINITY : 0.0;
  for (int i = threadIdx.x; i < n; i += kThreads) v = kMax ? fmax(v, part[i]) : v + part[i];
  return block_reduce<kMax>(v, smem);
}

template <typename T>
__device__ inline double logit(const T* w, const T* g, int64_t i, double lr) {
  const double wi = static_cast<double>(w[i]);
  return wi > 0 ? log(wi) - lr * static_cast<double>(g[i]) : -INFINITY;
}

// The largest logit is exact whatever the order, so fmax's NaN handling does not matter:
// logits are never NaN (log of a finite positive weight minus a product of finite values).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scan_kernel(const T* w, const T* g, int64_t n, double lr, double* block_max,
                unsigned long long* flags) {
  __shared__ double smem[kWarps];
  double mx = -INFINITY;
  long long bad_w = std::numeric_limits<long long>::max();
  long long bad_g = std::numeric_limits<long long>::max();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const double wi = static_cast<double>(w[i]);
    const double gi = static_cast<double>(g[i]);
    if (!(wi >= 0) || !isfinite(wi)) {
      bad_w = min(bad_w, static_cast<long long>(i));
      continue;
    }
    if (!isfinite(gi)) {
      bad_g = min(bad_g, static_cast<long long>(i));
      continue;
    }
    if (wi > 0) mx = fmax(mx, log(wi) - lr * gi);
  }
  // Only invalid input reaches the atomics.
  if (bad_w != std::numeric_limits<long long>::max())
    atomicMin(&flags[kBadWeight], static_cast<unsigned long long>(bad_w));
  if (bad_g != std::numeric_limits<long long>::max())
    atomicMin(&flags[kBadGrad], static_cast<unsigned long long>(bad_g));
  mx = block_reduce<true>(mx, smem);
  if (threadIdx.x == 0) block_max[blockIdx.x] = mx;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sum_kernel(const T* w, const T* g, int64_t n, double lr,
                                                       const double* block_max, double* block_sum) {
  __shared__ double smem[kWarps];
  const double mx = reduce_partials<true>(block_max, gridDim.x, smem);
  double s = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    s += exp(logit(w, g, i, lr) - mx);
  s = block_reduce<false>(s, smem);
  if (threadIdx.x == 0) block_sum[blockIdx.x] = s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    write_kernel(const T* w, const T* g, int64_t n, double lr, const double* block_max,
                 const double* block_sum, T* out, unsigned long long* flags) {
  __shared__ double smem[kWarps];
  const double mx = reduce_partials<true>(block_max, gridDim.x, smem);
  const double log_total = log(reduce_partials<false>(block_sum, gridDim.x, smem));
  if (blockIdx.x == 0 && threadIdx.x == 0 && !isfinite(mx)) flags[kNoMass] = 1;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    out[i] = static_cast<T>(exp(logit(w, g, i, lr) - mx - log_total));
}

at::Tensor mirror_descent_step_cuda(const at::Tensor& weights_in, const at::Tensor& grads_in,
                                    double lr) {
  detail::check_mirror_descent(weights_in, grads_in, lr);
  constexpr const char* op = "mirror_descent_step";
  c10::cuda::CUDAGuard guard(weights_in.device());
  const at::Tensor w = weights_in.contiguous();
  const at::Tensor g = grads_in.to(w.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(w);
  const int64_t n = w.numel();
  const int blocks =
      static_cast<int>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, kMaxBlocks));
  const auto opts = w.options();
  at::Tensor partials = at::empty({2 * blocks}, opts.dtype(at::kDouble));
  at::Tensor flags = at::full({3}, std::numeric_limits<int64_t>::max(), opts.dtype(at::kLong));
  flags.narrow(0, kNoMass, 1).zero_();
  double* block_max = partials.data_ptr<double>();
  double* block_sum = block_max + blocks;
  auto* fp = reinterpret_cast<unsigned long long*>(flags.data_ptr<int64_t>());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, w.scalar_type(), "pyxtask_md_cuda", [&] {
        const scalar_t* wp = w.const_data_ptr<scalar_t>();
        const scalar_t* gp = g.const_data_ptr<scalar_t>();
        scan_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(wp, gp, n, lr, block_max, fp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        sum_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(wp, gp, n, lr, block_max, block_sum);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        write_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(wp, gp, n, lr, block_max, block_sum,
                                                                out.data_ptr<scalar_t>(), fp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  // The one host sync of this op. It runs once per weight update, next to a backward pass
  // that costs far more, and invalid weights or gradients must raise, as on the CPU, rather
  // than silently turn the task weights into NaN. It comes after all three kernels so that
  // they run back to back; with invalid input their output is discarded.
  const at::Tensor host_flags = flags.cpu();
  const int64_t* hf = host_flags.const_data_ptr<int64_t>();
  // A bad weight is reported before a bad gradient, as the CPU kernel does on one thread.
  PYX_CHECK(hf[kBadWeight] == std::numeric_limits<int64_t>::max(), op, "weights[", hf[kBadWeight],
            "] = ", w[hf[kBadWeight]].item<double>(), "; weights must be finite and non-negative");
  PYX_CHECK(hf[kBadGrad] == std::numeric_limits<int64_t>::max(), op, "grads[", hf[kBadGrad],
            "] = ", g[hf[kBadGrad]].item<double>(), " is not finite");
  PYX_CHECK(hf[kNoMass] == 0, op, "all weights are zero; there is nothing to reweight");
  return out;
}

}  // namespace
}  // namespace pyxtask::cuda

TORCH_LIBRARY_IMPL(pyxtask, CUDA, m) {
  m.impl("mirror_descent_step", &pyxtask::cuda::mirror_descent_step_cuda);
}
