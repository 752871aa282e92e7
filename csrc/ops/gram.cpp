// Gram family on the CPU: gram(G) = G G^T, cross_gram(A, B) = A B^T, cosine_matrix(G).
//
// These are memory-bound for T <= 16: the goal is to read G once, at the machine's streaming
// bandwidth, for all T^2 products. Columns are split across threads; each thread walks its
// columns in L2-sized chunks and computes every tile pair of the chunk from cache (see
// cpu/gram_kernel.inc), accumulating into a private double T x T matrix. The per-thread
// matrices are summed in thread order, so results are deterministic for a given thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"
#include "gram.h"

#if PYX_X86_MULTIVERSION
#include <immintrin.h>
#endif

namespace pyxtask::cpu {

#if PYX_X86_MULTIVERSION
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
namespace avx512 {
#define PYX_VEC_BYTES 64
#include "cpu/gram_kernel.inc"
#undef PYX_VEC_BYTES
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define PYX_VEC_BYTES 32
#include "cpu/gram_kernel.inc"
#undef PYX_VEC_BYTES
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace base {
#define PYX_VEC_BYTES 16
#include "cpu/gram_kernel.inc"
#undef PYX_VEC_BYTES
}  // namespace base

namespace {

template <typename In>
void gram_columns_dispatch(const In* const* a, int64_t ta, const In* const* b, int64_t tb,
                           int64_t c0, int64_t c1, int64_t chunk, double* out,
                           std::vector<char>& scratch) {
  switch (current_isa()) {
#if PYX_X86_MULTIVERSION
    case Isa::kAvx512:
      return avx512::gram_columns<In>(a, ta, b, tb, c0, c1, chunk, out, scratch);
    case Isa::kAvx2:
      return avx2::gram_columns<In>(a, ta, b, tb, c0, c1, chunk, out, scratch);
#endif
    default:
      return base::gram_columns<In>(a, ta, b, tb, c0, c1, chunk, out, scratch);
  }
}

std::vector<const void*> row_pointers(const at::Tensor& m) {
  std::vector<const void*> rows(m.size(0));
  const char* base_ptr = static_cast<const char*>(m.const_data_ptr());
  for (int64_t i = 0; i < m.size(0); ++i)
    rows[i] = base_ptr + i * m.stride(0) * static_cast<int64_t>(m.element_size());
  return rows;
}

// Rows only need unit stride along P; any row stride (a slice of a bigger buffer) is read
// in place.
at::Tensor unit_column_stride(const at::Tensor& m) {
  return (m.size(1) <= 1 || m.stride(1) == 1) ? m : m.contiguous();
}

// Double-precision products of the rows of a with the rows of b (or of a with itself).
at::Tensor gram_accumulate(const at::Tensor& a_in, const at::Tensor* b_in) {
  const at::Tensor a = unit_column_stride(a_in);
  const at::Tensor b = b_in ? unit_column_stride(*b_in) : at::Tensor();
  const int64_t ta = a.size(0);
  const int64_t tb = b_in ? b.size(0) : ta;
  const int64_t p = a.size(1);
  at::Tensor out = at::zeros({ta, tb}, a.options().dtype(at::kDouble));
  if (ta == 0 || tb == 0 || p == 0) return out;

  const int64_t rows = b_in ? ta + tb : ta;
  // About 128 KiB of fp32 rows per chunk: L2-resident on any current core, and long enough
  // that the per-chunk lane reductions are cheap next to the products.
  const int64_t chunk = std::clamp<int64_t>((32768 / rows) / 64 * 64, 256, 8192);
  const int64_t n_chunks = (p + chunk - 1) / chunk;
  // Small problems stay on one thread: a parallel region costs more than they do.
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / (rows * chunk));
  const int64_t n_threads = at::get_num_threads();
  std::vector<std::vector<double>> partial(n_threads);
  const std::vector<const void*> pa = row_pointers(a);
  const std::vector<const void*> pb = b_in ? row_pointers(b) : std::vector<const void*>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "pyxtask_gram", [&] {
    using In = scalar_t;
    at::parallel_for(0, n_chunks, grain, [&](int64_t begin, int64_t end) {
      std::vector<double>& acc = partial[at::get_thread_num()];
      acc.resize(ta * tb, 0.0);
      std::vector<char> scratch;
      gram_columns_dispatch<In>(reinterpret_cast<const In* const*>(pa.data()), ta,
                                b_in ? reinterpret_cast<const In* const*>(pb.data()) : nullptr,
                                tb, begin * chunk, std::min(p, end * chunk), chunk, acc.data(),
                                scratch);
    });
  });
  double* o = out.data_ptr<double>();
  for (const auto& acc : partial) {
    if (acc.empty()) continue;
    for (int64_t i = 0; i < ta * tb; ++i) o[i] += acc[i];
  }
  if (!b_in) {
    for (int64_t i = 0; i < ta; ++i)
      for (int64_t j = 0; j < i; ++j) o[i * ta + j] = o[j * ta + i];
  }
  return out;
}

void check_finite_gram(const char* op, const at::Tensor& m, bool symmetric) {
  const double* d = m.const_data_ptr<double>();
  const int64_t ta = m.size(0), tb = m.size(1);
  for (int64_t i = 0; i < ta; ++i) {
    for (int64_t j = 0; j < tb; ++j) {
      if (!std::isfinite(d[i * tb + j])) {
        if (symmetric) {
          const int64_t row = std::isfinite(d[i * tb + i]) ? j : i;
          PYX_CHECK(false, op, "G contains NaN or Inf (row ", row, ")");
        }
        PYX_CHECK(false, op, "A or B contains NaN or Inf (row ", i, " of A or row ", j, " of B)");
      }
    }
  }
}

at::Tensor gram_cpu(const at::Tensor& G) {
  detail::check_gram_input("gram", G);
  at::Tensor acc = gram_accumulate(G, nullptr);
  check_finite_gram("gram", acc, true);
  return acc.to(accumulate_type(G.scalar_type()));
}

at::Tensor cross_gram_cpu(const at::Tensor& A, const at::Tensor& B) {
  detail::check_cross_gram_inputs(A, B);
  at::Tensor acc = gram_accumulate(A, &B);
  check_finite_gram("cross_gram", acc, false);
  return acc.to(accumulate_type(A.scalar_type()));
}

at::Tensor cosine_matrix_cpu(const at::Tensor& G) {
  detail::check_gram_input("cosine_matrix", G);
  at::Tensor acc = gram_accumulate(G, nullptr);
  check_finite_gram("cosine_matrix", acc, true);
  detail::gram_to_cosine(acc.data_ptr<double>(), acc.size(0));
  return acc.to(accumulate_type(G.scalar_type()));
}

at::Tensor gram_meta(const at::Tensor& G) {
  detail::check_gram_input("gram", G);
  return at::empty_symint({G.sym_size(0), G.sym_size(0)},
                          G.options().dtype(accumulate_type(G.scalar_type())));
}

at::Tensor cross_gram_meta(const at::Tensor& A, const at::Tensor& B) {
  detail::check_cross_gram_inputs(A, B);
  return at::empty_symint({A.sym_size(0), B.sym_size(0)},
                          A.options().dtype(accumulate_type(A.scalar_type())));
}

at::Tensor cosine_matrix_meta(const at::Tensor& G) {
  detail::check_gram_input("cosine_matrix", G);
  return at::empty_symint({G.sym_size(0), G.sym_size(0)},
                          G.options().dtype(accumulate_type(G.scalar_type())));
}

}  // namespace
}  // namespace pyxtask::cpu

TORCH_LIBRARY_IMPL(pyxtask, CPU, m) {
  m.impl("gram", &pyxtask::cpu::gram_cpu);
  m.impl("cross_gram", &pyxtask::cpu::cross_gram_cpu);
  m.impl("cosine_matrix", &pyxtask::cpu::cosine_matrix_cpu);
}

TORCH_LIBRARY_IMPL(pyxtask, Meta, m) {
  m.impl("gram", &pyxtask::cpu::gram_meta);
  m.impl("cross_gram", &pyxtask::cpu::cross_gram_meta);
  m.impl("cosine_matrix", &pyxtask::cpu::cosine_matrix_meta);
}
