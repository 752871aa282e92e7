// Per-sample gradient products on CUDA (see sample_products.h for the shapes).
//
// The GEMMs are cuBLAS's (at::matmul / at::bmm over the padded batch, padding rows zeroed
// or weighted by the mask, so that nothing waits on the host); the per-sample reductions
// are the kernels below, one block per sample, each block's sum taken in double in a fixed
// order, so that a result depends only on the input and the device. half and bfloat16 are
// widened to float first, as on the CPU.
//   linear_sample_dots:     X = D V (or A V^T), then segment_dot over each sample's rows,
//                           each row weighted by its mask entry;
//   linear_sample_sq_norms: the whole batch's L x L Grams (two bmm) and segment_dot of the
//                           pair, or, when L (I + O) > I O, the per-sample gradients
//                           D_b^T A_b, a chunk of samples at a time, and their squared norms;
//   embedding_sample_dots:  rows of v gathered inside the kernel;
//   embedding_sample_sq_norms: a warp per position k pairs it with every l >= k of the same
//                           id: ||sum_k d_k||^2 = sum_k ||d_k||^2 + 2 sum_{k<l} d_k . d_l.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "sample_products.h"

namespace pyxtask::cuda {
namespace {

using detail::check_embedding;
using detail::check_linear;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Largest per-sample-gradient chunk the materialising norm path allocates (elements).
constexpr int64_t kChunkElements = int64_t{1} << 24;

__device__ double block_sum(double v, double* smem) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double r = 0;
  for (int w = 0; w < kWarps; ++w) r += smem[w];
  return r;
}

// out[s] = sum over the rows r of sample s (rows s * rows ... (s + 1) * rows - 1) of
// weight[r] * (x_r . y_r); x, y: contiguous rows of K entries; weight may be null (all 1).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    segment_dot_kernel(const T* __restrict__ x, const T* __restrict__ y,
                       const float* __restrict__ weight, int64_t rows, int64_t K, T* out) {
  __shared__ double smem[kWarps];
  const int64_t s = blockIdx.x;
  const int64_t n = rows * K;
  const T* xs = x + s * n;
  const T* ys = y + s * n;
  T acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    T p = xs[i] * ys[i];
    if (weight != nullptr) p *= static_cast<T>(weight[s * rows + i / K]);
    acc += p;
  }
  const double total = block_sum(static_cast<double>(acc), smem);
  if (threadIdx.x == 0) out[s] = static_cast<T>(total);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    embedding_dot_kernel(const int64_t* __restrict__ ids, const T* __restrict__ d,
                         const T* __restrict__ v, const bool* __restrict__ real, int64_t L,
                         int64_t H, T* out) {
  __shared__ double smem[kWarps];
  const int64_t s = blockIdx.x;
  T acc = 0;
  for (int64_t i = threadIdx.x; i < L * H; i += kThreads) {
    const int64_t pos = s * L + i / H, h = i % H;
    if (real == nullptr || real[pos]) acc += d[pos * H + h] * v[ids[pos] * H + h];
  }
  const double total = block_sum(static_cast<double>(acc), smem);
  if (threadIdx.x == 0) out[s] = static_cast<T>(total);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    embedding_sq_kernel(const int64_t* __restrict__ ids, const T* __restrict__ d,
                        const bool* __restrict__ real, int64_t L, int64_t H, T* out) {
  __shared__ double smem[kWarps];
  const int64_t s = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double acc = 0;
  for (int64_t k = warp; k < L; k += kWarps) {
    const int64_t pk = s * L + k;
    if (real != nullptr && !real[pk]) continue;
    for (int64_t l = k; l < L; ++l) {  // the same branch for the whole warp
      const int64_t pl = s * L + l;
      if ((real != nullptr && !real[pl]) || ids[pl] != ids[pk]) continue;
      T part = 0;
      for (int64_t h = lane; h < H; h += 32) part += d[pk * H + h] * d[pl * H + h];
      acc += (l == k ? 1.0 : 2.0) * static_cast<double>(part);
    }
  }
  const double total = block_sum(acc, smem);
  if (threadIdx.x == 0) out[s] = static_cast<T>(total);
}

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// out[s] (s < out.numel()) = sum of weight_r x_r . y_r over sample s's `rows` rows of K.
void segment_dots(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight, int64_t rows,
                  int64_t K, at::Tensor out) {
  const int64_t samples = out.numel();
  if (samples == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pyxtask_segment_dots_cuda", [&] {
    segment_dot_kernel<scalar_t><<<static_cast<unsigned>(samples), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
        weight.defined() ? weight.const_data_ptr<float>() : nullptr, rows, K,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The [B] result, in the compute dtype, which is also the accumulation dtype of the inputs.
at::Tensor result(const at::Tensor& x, int64_t B) {
  return at::zeros({B}, x.options().dtype(compute_type(x)));
}

at::Tensor linear_sample_dots_cuda(const at::Tensor& a, const at::Tensor& d, const at::Tensor& v,
                                   const std::optional<at::Tensor>& mask) {
  check_linear("linear_sample_dots", a, d, &v, mask);
  c10::cuda::CUDAGuard guard(a.device());
  const int64_t B = a.size(0), L = a.size(1), I = a.size(2), O = d.size(2);
  at::Tensor out = result(a, B);
  if (B * L == 0 || I == 0 || O == 0) return out;
  const auto type = compute_type(a);
  const at::Tensor A = a.to(type).contiguous(), D = d.to(type).contiguous(), V = v.to(type);
  const at::Tensor weight =
      mask.has_value() ? mask->ne(0).to(at::kFloat).contiguous() : at::Tensor();
  if (I <= O)
    segment_dots(at::matmul(D, V).contiguous(), A, weight, L, I, out);
  else
    segment_dots(at::matmul(A, V.t()).contiguous(), D, weight, L, O, out);
  return out;
}

at::Tensor linear_sample_sq_norms_cuda(const at::Tensor& a, const at::Tensor& d,
                                       const std::optional<at::Tensor>& mask,
                                       c10::string_view method) {
  check_linear("linear_sample_sq_norms", a, d, nullptr, mask);
  const detail::NormMethod how = detail::parse_norm_method(method);
  c10::cuda::CUDAGuard guard(a.device());
  const int64_t B = a.size(0), L = a.size(1), I = a.size(2), O = d.size(2);
  at::Tensor out = result(a, B);
  if (B * L == 0 || I == 0 || O == 0) return out;
  const auto type = compute_type(a);
  at::Tensor A = a.to(type);
  if (mask.has_value()) A = A * mask->ne(0).to(type).unsqueeze(-1);  // padding rows: zero
  A = A.contiguous();
  const at::Tensor D = d.to(type).contiguous();
  if (detail::use_gram(how, L, I, O)) {
    const at::Tensor Ga = at::bmm(A, A.transpose(1, 2)).contiguous();
    const at::Tensor Gd = at::bmm(D, D.transpose(1, 2)).contiguous();
    segment_dots(Ga, Gd, at::Tensor(), 1, L * L, out);
    return out;
  }
  const int64_t chunk = std::max<int64_t>(1, kChunkElements / (I * O));
  for (int64_t start = 0; start < B; start += chunk) {
    const int64_t n = std::min(chunk, B - start);
    const at::Tensor G =
        at::bmm(D.narrow(0, start, n).transpose(1, 2), A.narrow(0, start, n)).contiguous();
    segment_dots(G, G, at::Tensor(), 1, O * I, out.narrow(0, start, n));
  }
  return out;
}

at::Tensor embedding_sample_dots_cuda(const at::Tensor& ids, const at::Tensor& d,
                                      const at::Tensor& v, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "embedding_sample_dots";
  check_embedding(op, ids, d, &v, mask);
  c10::cuda::CUDAGuard guard(d.device());
  const int64_t B = d.size(0), L = d.size(1), H = d.size(2), rows_v = v.size(0);
  at::Tensor out = result(d, B);
  if (B * L == 0 || H == 0) return out;
  const at::Tensor id = ids.to(at::kLong).contiguous();
  const at::Tensor real = mask.has_value() ? mask->ne(0).contiguous() : at::Tensor();
  // The one host sync of the op: an id outside v would read out of bounds.
  at::Tensor bad = (id < 0) | (id >= rows_v);
  if (real.defined()) bad = bad & real;
  if (bad.any().item<bool>()) {
    const at::Tensor where = bad.nonzero()[0].cpu();
    const int64_t b = where[0].item<int64_t>(), k = where[1].item<int64_t>();
    PYX_CHECK(false, op, "ids[", b, ", ", k, "] = ", id[b][k].item<int64_t>(),
              " is not a row of v (", rows_v, " rows)");
  }
  const auto type = compute_type(d);
  const at::Tensor D = d.to(type).contiguous(), V = v.to(type).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(type, "pyxtask_embedding_dots_cuda", [&] {
    embedding_dot_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        id.const_data_ptr<int64_t>(), D.const_data_ptr<scalar_t>(), V.const_data_ptr<scalar_t>(),
        real.defined() ? real.const_data_ptr<bool>() : nullptr, L, H, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor embedding_sample_sq_norms_cuda(const at::Tensor& ids, const at::Tensor& d,
                                          const std::optional<at::Tensor>& mask) {
  check_embedding("embedding_sample_sq_norms", ids, d, nullptr, mask);
  c10::cuda::CUDAGuard guard(d.device());
  const int64_t B = d.size(0), L = d.size(1), H = d.size(2);
  at::Tensor out = result(d, B);
  if (B * L == 0 || H == 0) return out;
  const at::Tensor id = ids.to(at::kLong).contiguous();
  const at::Tensor real = mask.has_value() ? mask->ne(0).contiguous() : at::Tensor();
  const auto type = compute_type(d);
  const at::Tensor D = d.to(type).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(type, "pyxtask_embedding_sq_norms_cuda", [&] {
    embedding_sq_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        id.const_data_ptr<int64_t>(), D.const_data_ptr<scalar_t>(),
        real.defined() ? real.const_data_ptr<bool>() : nullptr, L, H, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace pyxtask::cuda

TORCH_LIBRARY_IMPL(pyxtask, CUDA, m) {
  m.impl("linear_sample_dots", &pyxtask::cuda::linear_sample_dots_cuda);
  m.impl("linear_sample_sq_norms", &pyxtask::cuda::linear_sample_sq_norms_cuda);
  m.impl("embedding_sample_dots", &pyxtask::cuda::embedding_sample_dots_cuda);
  m.impl("embedding_sample_sq_norms", &pyxtask::cuda::embedding_sample_sq_norms_cuda);
}
