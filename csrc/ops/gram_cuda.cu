// Gram family on CUDA: gram(G) = G G^T, cross_gram(A, B) = A B^T, cosine_matrix(G).
//
// Memory-bound for T <= 16: G must be read once, at streaming bandwidth, for all T^2
// products. Each thread walks columns grid-stride with vector loads and keeps the products
// of one R x R tile of row pairs in registers, so every loaded element is reused R times
// without shared memory. With T <= R (R up to 16) one tile covers the whole upper triangle
// and G is read exactly once. Larger T (or cross_gram) is split into 8 x 8 tile pairs; the
// blocks of all tile pairs of one column range are launched next to each other so that the
// repeated reads of a row hit L2.
//
// Each block writes its tile's sums to a per-column-group workspace in double; a one-block
// kernel adds the groups in a fixed order, so a result only depends on the device's SM count
// (which fixes the grid), never on scheduling.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "gram.h"

namespace pyxtask::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Vector loads per dtype: 16 bytes for 32/64-bit elements; 8 bytes (4 elements) for 16-bit
// ones, because 8 widened values per row would not fit next to a 16 x 16 triangle of
// accumulators in the register file.
template <typename In>
struct Vec;

template <>
struct Vec<float> {
  using Acc = float;
  using Raw = float4;
  static constexpr int kLanes = 4;
  __device__ static void widen(const Raw& r, Acc* x) {
    x[0] = r.x;
    x[1] = r.y;
    x[2] = r.z;
    x[3] = r.w;
  }
};

template <>
struct Vec<double> {
  using Acc = double;
  using Raw = double2;
  static constexpr int kLanes = 2;
  __device__ static void widen(const Raw& r, Acc* x) {
    x[0] = r.x;
    x[1] = r.y;
  }
};

__device__ inline float half_bits_to_float(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

template <>
struct Vec<c10::Half> {
  using Acc = float;
  using Raw = uint2;
  static constexpr int kLanes = 4;
  // Little-endian: the element at the lower address is in the low half of each word.
  __device__ static void widen(const Raw& r, Acc* x) {
    x[0] = half_bits_to_float(r.x & 0xffffu);
    x[1] = half_bits_to_float(r.x >> 16);
    x[2] = half_bits_to_float(r.y & 0xffffu);
    x[3] = half_bits_to_float(r.y >> 16);
  }
};

template <>
struct Vec<c10::BFloat16> {
  using Acc = float;
  using Raw = uint2;
  static constexpr int kLanes = 4;
  // bfloat16 is the top half of a float32: widening is exact and just a shift.
  __device__ static void widen(const Raw& r, Acc* x) {
    x[0] = __uint_as_float(r.x << 16);
    x[1] = __uint_as_float(r.x & 0xffff0000u);
    x[2] = __uint_as_float(r.y << 16);
    x[3] = __uint_as_float(r.y & 0xffff0000u);
  }
};

struct GramArgs {
  const void* a;
  int64_t lda;  // row stride of a, in elements
  int ta;
  const void* b;  // == a for the symmetric products
  int64_t ldb;
  int tb;
  int64_t p;
  int n_tiles_a;  // row tiles of a and of b
  int n_tiles_b;
  int n_pairs;     // tile pairs handled per column group
  bool symmetric;  // tile pairs are (I, J) with I <= J, and b == a
  double* ws;      // [n_groups][ta * tb] partial sums
};

// Which rows of a and b tile pair k covers.
__device__ inline void tile_pair(const GramArgs& args, int k, int& ti, int& tj) {
  if (args.symmetric) {
    ti = 0;
    while (k >= args.n_tiles_a - ti) {
      k -= args.n_tiles_a - ti;
      ++ti;
    }
    tj = ti + k;
  } else {
    ti = k / args.n_tiles_b;
    tj = k % args.n_tiles_b;
  }
}

// kUpper: a single diagonal tile (T <= R, symmetric); only j >= i is computed, so a 16-row G
// costs 136 accumulators instead of 256. kVector: rows are aligned for Vec<In>::Raw loads.
template <typename In, int R, bool kUpper, bool kVector>
__global__ void __launch_bounds__(kThreads) gram_tiles_kernel(const GramArgs args) {
  using V = Vec<In>;
  using Acc = typename V::Acc;
  constexpr int W = kVector ? V::kLanes : 1;

  const int pair = blockIdx.x % args.n_pairs;
  const int group = blockIdx.x / args.n_pairs;
  const int n_groups = gridDim.x / args.n_pairs;
  int ti = 0, tj = 0;
  if (!kUpper) tile_pair(args, pair, ti, tj);
  const int row_a = ti * R, row_b = tj * R;
  const int na = min(R, args.ta - row_a);
  const int nb = min(R, args.tb - row_b);
  // Row addresses are recomputed from one base and the stride rather than kept in 2R
  // pointer registers, which the accumulators need more.
  const In* a0 = static_cast<const In*>(args.a) + row_a * args.lda;
  const In* b0 = static_cast<const In*>(args.b) + row_b * args.ldb;
  const int64_t lda = args.lda, ldb = args.ldb;

  Acc acc[R][R];
#pragma unroll
  for (int i = 0; i < R; ++i) {
#pragma unroll
    for (int j = 0; j < R; ++j) acc[i][j] = Acc(0);
  }

  const int64_t tid = static_cast<int64_t>(group) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(n_groups) * kThreads;
  const int64_t n_vec = args.p / W;
  for (int64_t v = tid; v < n_vec; v += stride) {
    Acc x[R][W];
    Acc y[kUpper ? 1 : R][W];
    // All loads are issued before any product so that R row segments are in flight at once.
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (kVector) {
        typename V::Raw raw{};
        if (r < na) raw = reinterpret_cast<const typename V::Raw*>(a0 + r * lda)[v];
        V::widen(raw, x[r]);
      } else {
        x[r][0] = r < na ? static_cast<Acc>(a0[r * lda + v]) : Acc(0);
      }
    }
    if (!kUpper) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (kVector) {
          typename V::Raw raw{};
          if (r < nb) raw = reinterpret_cast<const typename V::Raw*>(b0 + r * ldb)[v];
          V::widen(raw, y[r]);
        } else {
          y[r][0] = r < nb ? static_cast<Acc>(b0[r * ldb + v]) : Acc(0);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int j = kUpper ? i : 0; j < R; ++j) {
#pragma unroll
        for (int l = 0; l < W; ++l) acc[i][j] += x[i][l] * (kUpper ? x[j][l] : y[j][l]);
      }
    }
  }
  // The ragged end (fewer than W columns) goes element by element.
  for (int64_t c = n_vec * W + tid; c < args.p; c += stride) {
    Acc x[R], y[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      x[r] = r < na ? static_cast<Acc>(a0[r * lda + c]) : Acc(0);
      if (!kUpper) y[r] = r < nb ? static_cast<Acc>(b0[r * ldb + c]) : Acc(0);
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int j = kUpper ? i : 0; j < R; ++j) acc[i][j] += x[i] * (kUpper ? x[j] : y[j]);
    }
  }

  // Block sums in double: fp32 rounding stays confined to one thread's columns.
  __shared__ double red[kWarps][R * R];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < R; ++i) {
#pragma unroll
    for (int j = kUpper ? i : 0; j < R; ++j) {
      double s = static_cast<double>(acc[i][j]);
#pragma unroll
      for (int off = 16; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
      if (lane == 0) red[warp][i * R + j] = s;
    }
  }
  __syncthreads();
  double* ws = args.ws + static_cast<int64_t>(group) * args.ta * args.tb;
  for (int e = threadIdx.x; e < R * R; e += kThreads) {
    const int i = e / R, j = e % R;
    if (i >= na || j >= nb || (kUpper && j < i)) continue;
    double s = 0;
    for (int w = 0; w < kWarps; ++w) s += red[w][e];
    ws[(row_a + i) * args.tb + (row_b + j)] = s;
  }
}

// Adds the column groups in order, mirrors the upper triangle of symmetric products, and
// for cosine_matrix turns the sums into cosines exactly as detail::gram_to_cosine does.
template <typename Out>
__global__ void __launch_bounds__(kThreads)
    gram_finish_kernel(const double* ws, int n_groups, int ta, int tb, bool symmetric, bool cosine,
                       Out* out) {
  __shared__ double m[kMaxTasks * kMaxTasks];
  __shared__ double inv[kMaxTasks];
  const int n = ta * tb;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int i = e / tb, j = e % tb;
    if (symmetric && j < i) continue;
    double s = 0;
    for (int g = 0; g < n_groups; ++g) s += ws[static_cast<int64_t>(g) * n + e];
    m[e] = s;
  }
  __syncthreads();
  if (symmetric) {
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
      const int i = e / tb, j = e % tb;
      if (j < i) m[e] = m[j * tb + i];
    }
    __syncthreads();
  }
  if (cosine) {
    for (int i = threadIdx.x; i < ta; i += blockDim.x) {
      const double d = m[i * ta + i];
      inv[i] = d > 0.0 ? 1.0 / sqrt(d) : 0.0;
    }
    __syncthreads();
  }
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    double v = m[e];
    if (cosine) {
      const int i = e / tb, j = e % tb;
      // Same association as gram_to_cosine, and no contraction into an FMA, so that the
      // result is what the CPU computes from the same sums.
      double c = __dmul_rn(__dmul_rn(v, inv[i]), inv[j]);
      c = c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c);
      v = (i == j) ? (inv[i] > 0.0 ? 1.0 : 0.0) : c;
    }
    out[e] = static_cast<Out>(v);
  }
}

template <typename In>
bool vector_aligned(const at::Tensor& m) {
  constexpr int64_t bytes = sizeof(typename Vec<In>::Raw);
  const auto addr = reinterpret_cast<uintptr_t>(m.const_data_ptr());
  return addr % bytes == 0 && (m.size(0) <= 1 || (m.stride(0) * m.element_size()) % bytes == 0);
}

template <typename In, int R, bool kUpper, bool kVector>
void launch_tiles(GramArgs args, int64_t& n_groups_out, const at::TensorOptions& opts,
                  at::Tensor& ws) {
  auto kernel = gram_tiles_kernel<In, R, kUpper, kVector>;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // One full wave: every block then loops over the same number of columns.
  const int64_t wave = sms * std::max(per_sm, 1);
  const int64_t lanes = kVector ? Vec<In>::kLanes : 1;
  const int64_t work = (args.p / lanes + kThreads - 1) / kThreads;
  const int64_t n_groups = std::max<int64_t>(1, std::min(wave / args.n_pairs, work));
  ws = at::empty({n_groups * args.ta * args.tb}, opts.dtype(at::kDouble));
  args.ws = ws.data_ptr<double>();
  kernel<<<static_cast<unsigned>(n_groups * args.n_pairs), kThreads, 0,
           c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  n_groups_out = n_groups;
}

template <typename In, bool kVector>
void launch_for_shape(GramArgs& args, int64_t& n_groups, const at::TensorOptions& opts,
                      at::Tensor& ws) {
  constexpr int kTile = 8;
  // fp64 accumulators take two registers each: a 16-row triangle would spill.
  constexpr int kMaxUpper = std::is_same_v<In, double> ? 8 : 16;
  const int tmax = std::max(args.ta, args.tb);
  if (args.symmetric && kVector && args.ta <= kMaxUpper) {
    args.n_tiles_a = args.n_tiles_b = 1;
    args.n_pairs = 1;
    if (args.ta <= 4) return launch_tiles<In, 4, true, true>(args, n_groups, opts, ws);
    if (args.ta <= 8) return launch_tiles<In, 8, true, true>(args, n_groups, opts, ws);
    return launch_tiles<In, kMaxUpper, true, true>(args, n_groups, opts, ws);
  }
  // Small cross products need no 8 x 8 tile: with T = 1 its zero rows would cost more
  // arithmetic than the loads.
  if (kVector && tmax <= 4) {
    args.n_tiles_a = args.n_tiles_b = 1;
    args.n_pairs = 1;
    return launch_tiles<In, 4, false, true>(args, n_groups, opts, ws);
  }
  args.n_tiles_a = (args.ta + kTile - 1) / kTile;
  args.n_tiles_b = (args.tb + kTile - 1) / kTile;
  args.n_pairs =
      args.symmetric ? args.n_tiles_a * (args.n_tiles_a + 1) / 2 : args.n_tiles_a * args.n_tiles_b;
  launch_tiles<In, kTile, false, kVector>(args, n_groups, opts, ws);
}

// Products of the rows of a with the rows of b (b == nullptr: of a with itself), in the
// result dtype; cosine turns a symmetric product into cosines.
at::Tensor gram_product(const at::Tensor& a_in, const at::Tensor* b_in, bool cosine) {
  c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = with_unit_column_stride(a_in);
  const at::Tensor b = b_in ? with_unit_column_stride(*b_in) : a;
  const int64_t ta = a.size(0), tb = b.size(0), p = a.size(1);
  const at::ScalarType out_type = accumulate_type(a.scalar_type());
  if (ta == 0 || tb == 0 || p == 0) return at::zeros({ta, tb}, a.options().dtype(out_type));
  at::Tensor out = at::empty({ta, tb}, a.options().dtype(out_type));

  GramArgs args{};
  args.a = a.const_data_ptr();
  args.lda = a.stride(0);
  args.ta = static_cast<int>(ta);
  args.b = b.const_data_ptr();
  args.ldb = b.stride(0);
  args.tb = static_cast<int>(tb);
  args.p = p;
  args.symmetric = b_in == nullptr;
  int64_t n_groups = 0;
  at::Tensor ws;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.scalar_type(), "pyxtask_gram_cuda", [&] {
        if (vector_aligned<scalar_t>(a) && vector_aligned<scalar_t>(b)) {
          launch_for_shape<scalar_t, true>(args, n_groups, a.options(), ws);
        } else {
          launch_for_shape<scalar_t, false>(args, n_groups, a.options(), ws);
        }
      });
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (out_type == at::kDouble) {
    gram_finish_kernel<double><<<1, kThreads, 0, stream>>>(
        ws.const_data_ptr<double>(), static_cast<int>(n_groups), args.ta, args.tb, args.symmetric,
        cosine, out.data_ptr<double>());
  } else {
    gram_finish_kernel<float><<<1, kThreads, 0, stream>>>(
        ws.const_data_ptr<double>(), static_cast<int>(n_groups), args.ta, args.tb, args.symmetric,
        cosine, out.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Unlike the CPU kernels there is no NaN/Inf check of the result here: reading it back
  // would synchronize the host with the stream on every call.
  return out;
}

at::Tensor gram_cuda(const at::Tensor& G) {
  detail::check_gram_input("gram", G);
  return gram_product(G, nullptr, false);
}

at::Tensor cross_gram_cuda(const at::Tensor& A, const at::Tensor& B) {
  detail::check_cross_gram_inputs(A, B);
  return gram_product(A, &B, false);
}

at::Tensor cosine_matrix_cuda(const at::Tensor& G) {
  detail::check_gram_input("cosine_matrix", G);
  return gram_product(G, nullptr, true);
}

}  // namespace
}  // namespace pyxtask::cuda

TORCH_LIBRARY_IMPL(pyxtask, CUDA, m) {
  m.impl("gram", &pyxtask::cuda::gram_cuda);
  m.impl("cross_gram", &pyxtask::cuda::cross_gram_cuda);
  m.impl("cosine_matrix", &pyxtask::cuda::cosine_matrix_cuda);
}
