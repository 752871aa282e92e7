// mirror_descent_step on the CPU: w' = w * exp(-lr * g) / sum(w * exp(-lr * g)).
// Computed as softmax(log w - lr * g) over the entries with w > 0, so lr * g of any finite
// size neither overflows nor underflows the whole vector to zero, and zero weights stay
// exactly zero. Reductions run in double, per thread, combined in thread order.
#include "mirror_descent.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace pyxtask::cpu {
namespace {

constexpr int64_t kGrain = 1 << 14;

struct Scan {
  double max_logit = -std::numeric_limits<double>::infinity();
  int64_t bad_weight = -1;  // first negative or non-finite weight
  int64_t bad_grad = -1;    // first non-finite gradient
};

at::Tensor mirror_descent_step_cpu(const at::Tensor& weights_in, const at::Tensor& grads_in,
                                   double lr) {
  detail::check_mirror_descent(weights_in, grads_in, lr);
  constexpr const char* op = "mirror_descent_step";
  const at::Tensor w = weights_in.contiguous();
  const at::Tensor g = grads_in.to(w.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(w);
  const int64_t n = w.numel();
  const int64_t n_threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "pyxtask_md", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    auto logit = [&](int64_t i) {
      const double wi = static_cast<double>(wp[i]);
      return wi > 0 ? std::log(wi) - lr * static_cast<double>(gp[i])
                    : -std::numeric_limits<double>::infinity();
    };
    std::vector<Scan> scans(n_threads);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      Scan& s = scans[at::get_thread_num()];
      for (int64_t i = begin; i < end; ++i) {
        const double wi = static_cast<double>(wp[i]);
        const double gi = static_cast<double>(gp[i]);
        if (!(wi >= 0) || !std::isfinite(wi)) {
          if (s.bad_weight < 0) s.bad_weight = i;
          continue;
        }
        if (!std::isfinite(gi)) {
          if (s.bad_grad < 0) s.bad_grad = i;
          continue;
        }
        if (wi > 0) s.max_logit = std::max(s.max_logit, logit(i));
      }
    });
    double max_logit = -std::numeric_limits<double>::infinity();
    for (const Scan& s : scans) {
      PYX_CHECK(s.bad_weight < 0, op, "weights[", s.bad_weight,
                "] = ", static_cast<double>(wp[s.bad_weight]),
                "; weights must be finite and non-negative");
      PYX_CHECK(s.bad_grad < 0, op, "grads[", s.bad_grad,
                "] = ", static_cast<double>(gp[s.bad_grad]), " is not finite");
      max_logit = std::max(max_logit, s.max_logit);
    }
    PYX_CHECK(std::isfinite(max_logit), op, "all weights are zero; there is nothing to reweight");
    std::vector<double> sums(n_threads, 0.0);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      double s = 0;
      for (int64_t i = begin; i < end; ++i) s += std::exp(logit(i) - max_logit);
      sums[at::get_thread_num()] += s;
    });
    double total = 0;
    for (double s : sums) total += s;
    const double log_total = std::log(total);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        op_[i] = static_cast<scalar_t>(std::exp(logit(i) - max_logit - log_total));
    });
  });
  return out;
}

at::Tensor mirror_descent_step_meta(const at::Tensor& weights, const at::Tensor& grads, double lr) {
  detail::check_mirror_descent(weights, grads, lr);
  return at::empty_like(weights, weights.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace
}  // namespace pyxtask::cpu

TORCH_LIBRARY_IMPL(pyxtask, CPU, m) {
  m.impl("mirror_descent_step", &pyxtask::cpu::mirror_descent_step_cpu);
}

TORCH_LIBRARY_IMPL(pyxtask, Meta, m) {
  m.impl("mirror_descent_step", &pyxtask::cpu::mirror_descent_step_meta);
}
