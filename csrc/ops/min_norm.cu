// min_norm_point on CUDA: detail::solve_min_norm of min_norm.h run on the device in one
// launch of one block, so that a training step that computes M on the GPU never waits for
// the host. Thread i owns coordinate i of lambda and of u = M lambda, the O(T^2) parts (the
// u updates and refreshes) run in parallel, and thread 0 does the O(T) scans in index order.
//
// The scans are sequential on purpose: they then add f in the CPU's order and break ties
// exactly as the CPU loop does (s = first minimum of u, a = first maximum of u on the
// support). Every product is rounded on its own (__dmul_rn, never contracted into an FMA,
// which the CPU build does not form either), so for the same double M the iterates, the
// stopping iteration and the result are the CPU's bit for bit.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "min_norm.h"

namespace pyxtask::cuda {
namespace {

constexpr int kThreads = static_cast<int>(kMaxTasks);

enum Step : int { kStop = 0, kPairwiseStep = 1, kTowardStep = 2, kAwayStep = 3 };

__device__ inline double mul(double a, double b) { return __dmul_rn(a, b); }

// std::min / std::max / std::clamp semantics, NaN cases included.
__device__ inline double std_min(double a, double b) { return b < a ? b : a; }
__device__ inline double std_max(double a, double b) { return a < b ? b : a; }

// No finiteness check of M here, unlike the CPU kernel: it would need a host sync. A
// non-finite M gives a non-finite (or uniform) result on CUDA; keeping M finite is the
// caller's job.
__global__ void __launch_bounds__(kThreads)
    min_norm_kernel(const double* __restrict__ m_in, int T, int64_t max_iter, double tol,
                    int method_id, double* __restrict__ lam_out) {
  __shared__ double M[kMaxTasks * kMaxTasks];
  __shared__ double lam[kMaxTasks];
  __shared__ double u[kMaxTasks];
  __shared__ double step_g, step_gmax;
  __shared__ int step_s, step_a, step_kind;
  const auto method = static_cast<detail::MinNormMethod>(method_id);
  const int i = threadIdx.x;
  const bool own = i < T;
  for (int e = i; e < T * T; e += kThreads) M[e] = m_in[e];
  __syncthreads();

  if (T == 1) {
    if (i == 0) lam_out[0] = 1;
    return;
  }
  if (T == 2) {
    if (i == 0) {
      const double den = M[0] + M[3] - mul(2, M[1]);
      double g = 0.5;
      if (den > 0) {
        g = (M[3] - M[1]) / den;
        g = g < 0.0 ? 0.0 : (1.0 < g ? 1.0 : g);
      }
      lam_out[0] = g;
      lam_out[1] = 1 - g;
    }
    return;
  }
  // Every thread computes the same scale from the same shared values.
  double scale = 0;
  for (int j = 0; j < T; ++j) scale = std_max(scale, M[j * T + j]);
  if (own) lam[i] = 1.0 / static_cast<double>(T);
  if (!(scale > 0)) {  // M = 0: every point is optimal
    if (own) lam_out[i] = lam[i];
    return;
  }
  const double tol_abs = mul(tol, scale);

  const auto refresh = [&] {
    __syncthreads();
    double s = 0;
    for (int j = 0; j < T; ++j) s += lam[j];
    __syncthreads();  // every thread has read lam before it changes
    if (own) lam[i] /= s;
    __syncthreads();
    if (own) {
      double acc = 0;
      for (int j = 0; j < T; ++j) acc += mul(M[i * T + j], lam[j]);
      u[i] = acc;
    }
    __syncthreads();
  };

  refresh();
  for (int64_t it = 0; it < max_iter; ++it) {
    if (it % T == T - 1) refresh();
    if (i == 0) {
      double f = 0;
      int s = 0, a = -1;
      for (int j = 0; j < T; ++j) {
        f += mul(lam[j], u[j]);
        if (u[j] < u[s]) s = j;
        if (lam[j] > 0 && (a < 0 || u[j] > u[a])) a = j;
      }
      int kind = kStop;
      double g = 0, g_max = 0;
      // a < 0 needs a support with no positive entry, which only NaN iterates give; the CPU
      // would index u[-1] there.
      if (a >= 0) {
        const double fw_gap = f - u[s];
        const double away_gap = u[a] - f;
        const bool done =
            method == detail::MinNormMethod::kPlain ? fw_gap <= tol_abs : u[a] - u[s] <= tol_abs;
        if (!done) {
          if (method == detail::MinNormMethod::kPairwise) {
            kind = kPairwiseStep;
            const double slope = u[s] - u[a];
            const double curv = M[s * T + s] - mul(2, M[s * T + a]) + M[a * T + a];
            g_max = lam[a];
            g = curv > 0 ? std_min(g_max, -slope / curv) : g_max;
          } else if (method == detail::MinNormMethod::kPlain || fw_gap >= away_gap) {
            kind = kTowardStep;
            const double slope = u[s] - f;
            const double curv = M[s * T + s] - mul(2, u[s]) + f;
            g = curv > 0 ? std_min(1.0, -slope / curv) : 1.0;
          } else {
            kind = kAwayStep;
            const double slope = f - u[a];
            const double curv = f - mul(2, u[a]) + M[a * T + a];
            g_max = lam[a] / (1 - lam[a]);
            g = curv > 0 ? std_min(g_max, -slope / curv) : g_max;
          }
        }
      }
      step_kind = kind;
      step_s = s;
      step_a = a;
      step_g = g;
      step_gmax = g_max;
    }
    __syncthreads();
    const int kind = step_kind;
    if (kind == kStop) break;
    if (own) {
      const int s = step_s, a = step_a;
      const double g = step_g, g_max = step_gmax;
      double ui = u[i], li = lam[i];
      if (kind == kPairwiseStep) {
        ui += mul(g, M[s * T + i] - M[a * T + i]);
        if (i == s) li += g;
        if (i == a) li = g >= g_max ? 0.0 : li - g;
      } else if (kind == kTowardStep) {
        ui = mul(1 - g, ui) + mul(g, M[s * T + i]);
        li = mul(li, 1 - g);
        if (i == s) li += g;
      } else {
        ui = mul(1 + g, ui) - mul(g, M[a * T + i]);
        li = mul(li, 1 + g);
        if (i == a) li = g >= g_max ? 0.0 : li - g;
      }
      u[i] = ui;
      lam[i] = std_max(li, 0.0);
    }
    __syncthreads();  // thread 0 reads every coordinate next
  }
  refresh();
  if (own) lam_out[i] = lam[i];
}

at::Tensor min_norm_point_cuda(const at::Tensor& M, int64_t max_iter, double tol,
                               c10::string_view method) {
  detail::check_min_norm(M, max_iter, tol, method);
  c10::cuda::CUDAGuard guard(M.device());
  const at::Tensor md = M.to(at::kDouble).contiguous();
  const int64_t T = md.size(0);
  at::Tensor lam = at::empty({T}, md.options());
  min_norm_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      md.const_data_ptr<double>(), static_cast<int>(T), max_iter, tol,
      static_cast<int>(detail::parse_min_norm_method(method)), lam.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return lam.to(accumulate_type(M.scalar_type()));
}

}  // namespace
}  // namespace pyxtask::cuda

TORCH_LIBRARY_IMPL(pyxtask, CUDA, m) {
  m.impl("min_norm_point", &pyxtask::cuda::min_norm_point_cuda);
}
