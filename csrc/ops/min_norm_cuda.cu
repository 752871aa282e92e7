// min_norm_point on CUDA: the solver of min_norm_solver.h, run by one device thread in one
// launch. T <= 64 makes each Frank-Wolfe iteration 64 multiply-adds, and the affine step a
// 65 x 65 elimination: a single thread does them in microseconds, the loop never returns
// to the host (no sync), and the iterates are the CPU's exactly (no FMA contraction, see
// min_norm_solver.h) -- a 64-thread version would need a block-wide argmin per iteration
// for little gain at this size. The solver's 36 KB of work arrays are the block's static
// shared memory, not the thread's stack: a stack frame that size makes the driver reserve
// local memory for every thread the device can hold.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "min_norm.h"

namespace pyxtask::cuda {
namespace {

// M is not checked for NaN/Inf here: that would need a host sync. The CPU kernel checks.
__global__ void min_norm_kernel(const double* __restrict__ M, int64_t T, int64_t max_iter,
                                double tol, int method, double* __restrict__ lam) {
  __shared__ detail::MinNormScratch ws;
  detail::solve_min_norm(M, T, max_iter, tol, static_cast<detail::MinNormMethod>(method), lam, ws);
}

at::Tensor min_norm_point_cuda(const at::Tensor& M, int64_t max_iter, double tol,
                               c10::string_view method) {
  detail::check_min_norm(M, max_iter, tol, method);
  const c10::cuda::CUDAGuard guard(M.device());
  const at::Tensor md = M.to(at::kDouble).contiguous();
  const int64_t T = md.size(0);
  at::Tensor lam = at::empty({T}, md.options());
  min_norm_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(
      md.const_data_ptr<double>(), T, max_iter, tol,
      static_cast<int>(detail::parse_min_norm_method(method)), lam.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return lam.to(accumulate_type(M.scalar_type()));
}

}  // namespace
}  // namespace pyxtask::cuda

TORCH_LIBRARY_IMPL(pyxtask, CUDA, m) {
  m.impl("min_norm_point", &pyxtask::cuda::min_norm_point_cuda);
}
