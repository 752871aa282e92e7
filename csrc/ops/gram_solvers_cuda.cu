// gram_solvers on CUDA: the solvers of gram_solvers_solver.h run on the device, no host
// round-trip. Each block first copies M (at most 64 x 64 doubles, 32 KiB) into shared
// memory; each thread then solves one problem (one row of U for dual_cone_projection, the
// single problem for the other two) with its work arrays in a global scratch tensor, so a
// thread's stack holds only scalars. The iterates are the CPU's exactly, which matters more
// than parallelising a 64-wide solve.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "gram_solvers.h"

namespace pyxtask::cuda {
namespace {

constexpr int kRowsPerBlock = 32;

__device__ void load_gram(const double* __restrict__ M, int64_t T, double* shared) {
  for (int64_t i = threadIdx.x; i < T * T; i += blockDim.x) shared[i] = M[i];
  __syncthreads();
}

// M is not checked for NaN/Inf here: that would need a host sync. The CPU kernel checks.
__global__ void dual_cone_kernel(const double* __restrict__ M, int64_t T,
                                 const double* __restrict__ U, int64_t K, int64_t max_iter,
                                 double tol, double* __restrict__ V, double* __restrict__ res,
                                 double* __restrict__ dwork, int* __restrict__ iwork) {
  extern __shared__ double m[];
  load_gram(M, T, m);
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  res[k] = detail::dual_cone_solve(m, T, U + k * T, max_iter, tol, V + k * T,
                                   dwork + k * detail::dual_cone_dwork(T),
                                   iwork + k * detail::dual_cone_iwork(T));
}

__global__ void nash_kernel(const double* __restrict__ M, int64_t T,
                            const double* __restrict__ init, int64_t max_iter, double tol,
                            double* __restrict__ alpha, double* __restrict__ res,
                            double* __restrict__ dwork, int* __restrict__ iwork) {
  extern __shared__ double m[];
  load_gram(M, T, m);
  if (threadIdx.x != 0) return;
  *res = detail::nash_solve(m, T, init, max_iter, tol, alpha, dwork, iwork);
}

__global__ void cagrad_kernel(const double* __restrict__ M, int64_t T, double c, int64_t max_iter,
                              double tol, double* __restrict__ w, double* __restrict__ res,
                              double* __restrict__ dwork, int* __restrict__ iwork) {
  extern __shared__ double m[];
  load_gram(M, T, m);
  if (threadIdx.x != 0) return;
  *res = detail::cagrad_solve(m, T, c, max_iter, tol, w, dwork, iwork);
}

// M in double, contiguous and exactly symmetric, on the device.
at::Tensor gram_as_double(const at::Tensor& M) {
  const at::Tensor md = M.to(at::kDouble);
  return md.add(md.t()).mul_(0.5).contiguous();
}

size_t gram_bytes(int64_t T) { return static_cast<size_t>(T * T) * sizeof(double); }

std::tuple<at::Tensor, at::Tensor> dual_cone_projection_cuda(const at::Tensor& M,
                                                             const at::Tensor& U, int64_t max_iter,
                                                             double tol) {
  detail::check_dual_cone(M, U, max_iter, tol);
  const c10::cuda::CUDAGuard guard(M.device());
  const at::Tensor md = gram_as_double(M);
  const at::Tensor ud = U.to(at::kDouble).contiguous();
  const int64_t T = md.size(0);
  const int64_t K = ud.numel() / T;
  at::Tensor V = at::empty(ud.sizes(), ud.options());
  at::Tensor res = at::empty({K}, ud.options());
  if (K > 0) {
    at::Tensor dwork = at::empty({K * detail::dual_cone_dwork(T)}, ud.options());
    at::Tensor iwork = at::empty({K * detail::dual_cone_iwork(T)}, ud.options().dtype(at::kInt));
    const int threads = static_cast<int>(K < kRowsPerBlock ? K : kRowsPerBlock);
    const auto blocks = static_cast<unsigned>((K + threads - 1) / threads);
    dual_cone_kernel<<<blocks, threads, gram_bytes(T), c10::cuda::getCurrentCUDAStream()>>>(
        md.const_data_ptr<double>(), T, ud.const_data_ptr<double>(), K, max_iter, tol,
        V.data_ptr<double>(), res.data_ptr<double>(), dwork.data_ptr<double>(),
        iwork.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {V, U.dim() == 1 ? res.squeeze(0) : res};
}

std::tuple<at::Tensor, at::Tensor> nash_bargaining_cuda(const at::Tensor& M,
                                                        const std::optional<at::Tensor>& init,
                                                        int64_t max_iter, double tol) {
  detail::check_nash(M, init, max_iter, tol);
  const c10::cuda::CUDAGuard guard(M.device());
  const at::Tensor md = gram_as_double(M);
  const int64_t T = md.size(0);
  at::Tensor start;
  if (init.has_value()) start = init->to(at::kDouble).contiguous();
  at::Tensor alpha = at::empty({T}, md.options());
  at::Tensor res = at::empty({}, md.options());
  at::Tensor dwork = at::empty({detail::nash_dwork(T)}, md.options());
  at::Tensor iwork = at::empty({detail::nash_iwork(T)}, md.options().dtype(at::kInt));
  nash_kernel<<<1, 32, gram_bytes(T), c10::cuda::getCurrentCUDAStream()>>>(
      md.const_data_ptr<double>(), T, start.defined() ? start.const_data_ptr<double>() : nullptr,
      max_iter, tol, alpha.data_ptr<double>(), res.data_ptr<double>(), dwork.data_ptr<double>(),
      iwork.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {alpha, res};
}

std::tuple<at::Tensor, at::Tensor> cagrad_inner_cuda(const at::Tensor& M, double c,
                                                     int64_t max_iter, double tol) {
  detail::check_cagrad(M, c, max_iter, tol);
  const c10::cuda::CUDAGuard guard(M.device());
  const at::Tensor md = gram_as_double(M);
  const int64_t T = md.size(0);
  at::Tensor w = at::empty({T}, md.options());
  at::Tensor res = at::empty({}, md.options());
  at::Tensor dwork = at::empty({detail::cagrad_dwork(T)}, md.options());
  at::Tensor iwork = at::empty({detail::cagrad_iwork(T)}, md.options().dtype(at::kInt));
  cagrad_kernel<<<1, 32, gram_bytes(T), c10::cuda::getCurrentCUDAStream()>>>(
      md.const_data_ptr<double>(), T, c, max_iter, tol, w.data_ptr<double>(),
      res.data_ptr<double>(), dwork.data_ptr<double>(), iwork.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {w, res};
}

}  // namespace
}  // namespace pyxtask::cuda

TORCH_LIBRARY_IMPL(pyxtask, CUDA, m) {
  m.impl("dual_cone_projection", &pyxtask::cuda::dual_cone_projection_cuda);
  m.impl("nash_bargaining", &pyxtask::cuda::nash_bargaining_cuda);
  m.impl("cagrad_inner", &pyxtask::cuda::cagrad_inner_cuda);
}
