// Gram family on CUDA: gram(G) = G G^T, cross_gram(A, B) = A B^T, cosine_matrix(G).
//
// Memory-bound for T <= 16: G must be read once, at streaming bandwidth, for all T^2
// products. Each thread walks columns with vector loads and keeps the products of one
// R x R tile of row pairs in registers, so every loaded element is reused R times without
// shared memory. With T <= R (R up to 16) one tile covers the whole upper triangle and G is
// read exactly once. Larger T (or cross_gram) is split into 8 x 8 tile pairs; the blocks of
// all tile pairs of one column slice are launched next to each other so that the repeated
// reads of a row hit L2.
//
// The columns are cut into slices whose length depends on P and T only (launch_tiles). One
// block computes one tile pair over one slice, each thread's fp32 sums going to double
// after at most kSliceProducts products (the CPU kernel's bound), and writes the slice's
// sums to a workspace in double; the slices are then added in a fixed order. Nothing
// depends on the device's SM count or on scheduling: a result has the same bits on every
// card and in every run.
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
  int64_t steps;  // vector steps per thread in one slice
  int n_tiles_a;  // row tiles of a and of b
  int n_tiles_b;
  int n_pairs;     // tile pairs per slice
  bool symmetric;  // tile pairs are (I, J) with I <= J, and b == a
  double* ws;      // [n_slices][ta * tb] partial sums
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

// The accumulators of an R x R tile, packed: all R * R products, or for kUpper only those
// with j >= i (row by row), so that a 16-row triangle costs 136 registers instead of 256.
template <int R, bool kUpper>
struct TileShape {
  static constexpr int kEntries = kUpper ? R * (R + 1) / 2 : R * R;
  // Padded to a multiple of the warp size for warp_transpose_sum.
  static constexpr int kPadded = (kEntries + 31) / 32 * 32;
  __host__ __device__ static constexpr int index(int i, int j) {
    return kUpper ? i * R - i * (i - 1) / 2 + (j - i) : i * R + j;
  }
  // The inverse of index(), at run time.
  __device__ static void row_col(int e, int& i, int& j) {
    if (kUpper) {
      i = 0;
      while (e >= R - i) {
        e -= R - i;
        ++i;
      }
      j = i + e;
    } else {
      i = e / R;
      j = e % R;
    }
  }
};

// One level of warp_transpose_sum: lanes that differ in bit `off` each keep one half of
// h[0 .. kLen), receive the partner's copy of it and add, leaving kLen / 2 values.
template <int kLen, int N>
__device__ inline void transpose_level(double (&h)[N], unsigned lane, unsigned off) {
  const bool upper = lane & off;
#pragma unroll
  for (int i = 0; i < kLen / 2; ++i) {
    const double lo = h[i], hi = h[i + kLen / 2];
    h[i] = (upper ? hi : lo) + __shfl_xor_sync(0xffffffffu, upper ? lo : hi, off);
  }
}

// Sums N values (N a multiple of 32) over the 32 lanes of a warp, in double, by recursive
// halving: at each of the 5 levels a lane keeps half of its values and sends the other
// half to the lane that keeps those, so the reduction costs N - N / 32 shuffles instead of
// 5 N. On return lane l holds in out[m] the warp's sum of value l * (N / 32) + m. The
// additions form a fixed tree: the result does not depend on timing.
template <int N, typename Acc>
__device__ inline void warp_transpose_sum(const Acc (&v)[N], double (&out)[N / 32]) {
  static_assert(N % 32 == 0, "pad the values to a multiple of the warp size");
  const unsigned lane = threadIdx.x % 32;
  double h[N / 2];
  {
    // The first level converts to double as it goes: the fp32 values and their double
    // sums are never all live at once.
    const bool upper = lane & 16u;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const double lo = static_cast<double>(v[i]);
      const double hi = static_cast<double>(v[i + N / 2]);
      h[i] = (upper ? hi : lo) + __shfl_xor_sync(0xffffffffu, upper ? lo : hi, 16);
    }
  }
  transpose_level<N / 2>(h, lane, 8);
  transpose_level<N / 4>(h, lane, 4);
  transpose_level<N / 8>(h, lane, 2);
  transpose_level<N / 16>(h, lane, 1);
#pragma unroll
  for (int m = 0; m < N / 32; ++m) out[m] = h[m];
}

// One block computes one tile pair over one slice of columns: args.steps vector steps per
// thread, thread t taking vectors slice * kThreads * steps + k * kThreads + t (k < steps),
// so a warp reads contiguous memory. steps is at most kSliceProducts / W, so every fp32
// accumulator adds at most kSliceProducts products (one more from the ragged end) before
// its sum goes to double, as in the CPU kernel (one 16-lane register over a 4096-column
// chunk): the same error bound. The block's sums go to the slice's row of the workspace.
// kUpper: a single diagonal tile (T <= R, symmetric); only j >= i is computed. kVector:
// rows are aligned for Vec<In>::Raw loads.
template <typename In, int R, bool kUpper, bool kVector>
__global__ void __launch_bounds__(kThreads) gram_tiles_kernel(const GramArgs args) {
  using V = Vec<In>;
  using Acc = typename V::Acc;
  using Shape = TileShape<R, kUpper>;
  constexpr int W = kVector ? V::kLanes : 1;
  constexpr int E = Shape::kEntries, EP = Shape::kPadded;

  const int pair = blockIdx.x % args.n_pairs;
  const int64_t slice = blockIdx.x / args.n_pairs;
  int ti = 0, tj = 0;
  if (!kUpper) tile_pair(args, pair, ti, tj);
  const int row_a = ti * R, row_b = tj * R;
  const int na = min(R, args.ta - row_a);
  const int nb = min(R, args.tb - row_b);
  // Row addresses are recomputed from one base and the stride rather than kept in 2R
  // pointer registers, which the accumulators need more.
  const In* __restrict__ a0 = static_cast<const In*>(args.a) + row_a * args.lda;
  const In* __restrict__ b0 = static_cast<const In*>(args.b) + row_b * args.ldb;
  const int64_t lda = args.lda, ldb = args.ldb;

  Acc acc[EP];  // the kEntries products, then zeros up to the warp-size multiple
#pragma unroll
  for (int e = 0; e < EP; ++e) acc[e] = Acc(0);

  const int64_t n_vec = args.p / W;
  const int64_t span = static_cast<int64_t>(kThreads) * args.steps;
  const int64_t v_end = min(n_vec, (slice + 1) * span);
  for (int64_t v = slice * span + threadIdx.x; v < v_end; v += kThreads) {
    if constexpr (kVector) {
      typename V::Raw xr[R];
      typename V::Raw yr[kUpper ? 1 : R];
      // All loads are issued before any product so that R (2R) row segments are in flight.
#pragma unroll
      for (int r = 0; r < R; ++r) {
        xr[r] = {};
        if (r < na) xr[r] = reinterpret_cast<const typename V::Raw*>(a0 + r * lda)[v];
      }
      if constexpr (!kUpper) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          yr[r] = {};
          if (r < nb) yr[r] = reinterpret_cast<const typename V::Raw*>(b0 + r * ldb)[v];
        }
      }
      // Widened one lane at a time: the 16-bit types then need R (2R) widened registers
      // next to the raw ones instead of W R (2 W R), which a 16-row triangle can't spare.
      // Each accumulator still adds its W products in lane order.
#pragma unroll
      for (int l = 0; l < W; ++l) {
        Acc x[R], y[kUpper ? 1 : R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          Acc lanes[W];
          V::widen(xr[r], lanes);
          x[r] = lanes[l];
          if constexpr (!kUpper) {
            V::widen(yr[r], lanes);
            y[r] = lanes[l];
          }
        }
#pragma unroll
        for (int i = 0; i < R; ++i) {
#pragma unroll
          for (int j = kUpper ? i : 0; j < R; ++j)
            acc[Shape::index(i, j)] += x[i] * (kUpper ? x[j] : y[j]);
        }
      }
    } else {
      Acc x[R], y[kUpper ? 1 : R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        x[r] = r < na ? static_cast<Acc>(a0[r * lda + v]) : Acc(0);
        if (!kUpper) y[r] = r < nb ? static_cast<Acc>(b0[r * ldb + v]) : Acc(0);
      }
#pragma unroll
      for (int i = 0; i < R; ++i) {
#pragma unroll
        for (int j = kUpper ? i : 0; j < R; ++j)
          acc[Shape::index(i, j)] += x[i] * (kUpper ? x[j] : y[j]);
      }
    }
  }
  // The ragged end (fewer than W columns) goes to the first slice, one column per thread.
  const int64_t c = n_vec * W + threadIdx.x;
  if (kVector && slice == 0 && c < args.p) {
    Acc x[R], y[kUpper ? 1 : R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      x[r] = r < na ? static_cast<Acc>(a0[r * lda + c]) : Acc(0);
      if (!kUpper) y[r] = r < nb ? static_cast<Acc>(b0[r * ldb + c]) : Acc(0);
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int j = kUpper ? i : 0; j < R; ++j)
        acc[Shape::index(i, j)] += x[i] * (kUpper ? x[j] : y[j]);
    }
  }

  // Block sums in double: fp32 rounding stays confined to one thread's columns.
  __shared__ double red[kWarps][EP];
  {
    double mine[EP / 32];
    warp_transpose_sum<EP>(acc, mine);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int m = 0; m < EP / 32; ++m) red[warp][lane * (EP / 32) + m] = mine[m];
  }
  __syncthreads();
  double* ws = args.ws + slice * args.ta * args.tb;
  for (int e = threadIdx.x; e < E; e += kThreads) {
    int i = 0, j = 0;
    Shape::row_col(e, i, j);
    if (i >= na || j >= nb) continue;
    double s = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[w][e];
    ws[(row_a + i) * args.tb + (row_b + j)] = s;
  }
}

// Adds many slices of the workspace in a fixed order: block b takes entries 32 b .. 32 b +
// 31, its warp w the slices w, w + 8, ...; the 8 partial sums are added in warp order.
// Only the upper triangle of a symmetric product.
__global__ void __launch_bounds__(kThreads)
    gram_slices_kernel(const double* __restrict__ ws, int64_t n_slices, int ta, int tb,
                       bool symmetric, double* __restrict__ sum) {
  __shared__ double part[kWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int e = blockIdx.x * 32 + lane;
  const int n = ta * tb;
  const bool live = e < n && !(symmetric && e % tb < e / tb);
  double s = 0;
  if (live) {
#pragma unroll 8
    for (int64_t g = warp; g < n_slices; g += kWarps) s += ws[g * n + e];
  }
  part[warp][lane] = s;
  __syncthreads();
  if (warp == 0 && live) {
    double t = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) t += part[w][lane];
    sum[e] = t;
  }
}

// Adds the (few) slices in order, mirrors the upper triangle of symmetric products, and
// for cosine_matrix turns the sums into cosines exactly as detail::gram_to_cosine does.
template <typename Out>
__global__ void __launch_bounds__(kThreads)
    gram_finish_kernel(const double* __restrict__ ws, int n_slices, int ta, int tb, bool symmetric,
                       bool cosine, Out* __restrict__ out) {
  __shared__ double m[kMaxTasks * kMaxTasks];
  __shared__ double inv[kMaxTasks];
  const int n = ta * tb;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int i = e / tb, j = e % tb;
    if (symmetric && j < i) continue;
    double s = 0;
    for (int g = 0; g < n_slices; ++g) s += ws[static_cast<int64_t>(g) * n + e];
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

// Products per fp32 accumulator before its sum goes to double: 256, as in the CPU kernel's
// 4096-column chunk over 16 lanes (AVX-512).
constexpr int64_t kSliceProducts = 256;
// Slices no shorter than this many steps, so that a block's loads outweigh its epilogue.
constexpr int64_t kMinSteps = 8;
// Blocks a launch aims for: about 8 waves of the 16-row triangle (one block per SM) on a
// 132-SM card, one wave of the 4-row kernels. A constant rather than the device's SM count
// (and no occupancy query): the slices, hence the rounding, are the same on every card.
constexpr int64_t kTargetBlocks = 1024;
// Up to this many slices the finishing block adds them itself; beyond, gram_slices_kernel
// adds them first with more threads.
constexpr int64_t kFinishSlices = 8;

// Cuts the columns into slices of args.steps vector steps per thread and launches one
// block per (slice, tile pair). Returns the number of slices.
template <typename In, int R, bool kUpper, bool kVector>
int64_t launch_tiles(GramArgs args, const at::TensorOptions& opts, at::Tensor& ws) {
  const int64_t lanes = kVector ? Vec<In>::kLanes : 1;
  const int64_t n_vec = args.p / lanes;
  const int64_t max_steps = kSliceProducts / lanes;
  const int64_t target = std::max<int64_t>(1, kTargetBlocks / args.n_pairs);
  const int64_t per_slice = (n_vec + kThreads * target - 1) / (kThreads * target);
  args.steps = std::clamp<int64_t>(per_slice, std::min(kMinSteps, max_steps), max_steps);
  const int64_t span = kThreads * args.steps;
  // At least one slice: it also takes the ragged end when P < lanes.
  const int64_t n_slices = std::max<int64_t>(1, (n_vec + span - 1) / span);
  ws = at::empty({n_slices * args.ta * args.tb}, opts.dtype(at::kDouble));
  args.ws = ws.data_ptr<double>();
  gram_tiles_kernel<In, R, kUpper, kVector>
      <<<static_cast<unsigned>(n_slices * args.n_pairs), kThreads, 0,
         c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return n_slices;
}

template <typename In, bool kVector>
int64_t launch_for_shape(GramArgs& args, const at::TensorOptions& opts, at::Tensor& ws) {
  constexpr int kTile = 8;
  // fp64 accumulators take two registers each: a 16-row triangle would spill.
  constexpr int kMaxUpper = std::is_same_v<In, double> ? 8 : 16;
  const int tmax = std::max(args.ta, args.tb);
  if (args.symmetric && kVector && args.ta <= kMaxUpper) {
    args.n_tiles_a = args.n_tiles_b = 1;
    args.n_pairs = 1;
    if (args.ta <= 4) return launch_tiles<In, 4, true, true>(args, opts, ws);
    if (args.ta <= 8) return launch_tiles<In, 8, true, true>(args, opts, ws);
    return launch_tiles<In, kMaxUpper, true, true>(args, opts, ws);
  }
  // Small cross products need no 8 x 8 tile: with T = 1 its zero rows would cost more
  // arithmetic than the loads.
  if (kVector && tmax <= 4) {
    args.n_tiles_a = args.n_tiles_b = 1;
    args.n_pairs = 1;
    return launch_tiles<In, 4, false, true>(args, opts, ws);
  }
  args.n_tiles_a = (args.ta + kTile - 1) / kTile;
  args.n_tiles_b = (args.tb + kTile - 1) / kTile;
  args.n_pairs =
      args.symmetric ? args.n_tiles_a * (args.n_tiles_a + 1) / 2 : args.n_tiles_a * args.n_tiles_b;
  return launch_tiles<In, kTile, false, kVector>(args, opts, ws);
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
  int64_t n_slices = 0;
  at::Tensor ws;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.scalar_type(), "pyxtask_gram_cuda", [&] {
        if (vector_aligned<scalar_t>(a) && vector_aligned<scalar_t>(b)) {
          n_slices = launch_for_shape<scalar_t, true>(args, a.options(), ws);
        } else {
          n_slices = launch_for_shape<scalar_t, false>(args, a.options(), ws);
        }
      });
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (n_slices > kFinishSlices) {
    const int n = args.ta * args.tb;
    at::Tensor sum = at::empty({n}, ws.options());
    gram_slices_kernel<<<static_cast<unsigned>((n + 31) / 32), kThreads, 0, stream>>>(
        ws.const_data_ptr<double>(), n_slices, args.ta, args.tb, args.symmetric,
        sum.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ws = sum;
    n_slices = 1;
  }
  if (out_type == at::kDouble) {
    gram_finish_kernel<double><<<1, kThreads, 0, stream>>>(
        ws.const_data_ptr<double>(), static_cast<int>(n_slices), args.ta, args.tb, args.symmetric,
        cosine, out.data_ptr<double>());
  } else {
    gram_finish_kernel<float><<<1, kThreads, 0, stream>>>(
        ws.const_data_ptr<double>(), static_cast<int>(n_slices), args.ta, args.tb, args.symmetric,
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
