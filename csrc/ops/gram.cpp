// Gram family on the CPU: gram(G) = G G^T, cross_gram(A, B) = A B^T, cosine_matrix(G).
//
// These are memory-bound for T <= 16: the goal is to read G once, at the machine's streaming
// bandwidth, for all T^2 products. Columns are split across threads; each thread walks its
// columns in L2-sized chunks and computes every tile pair of the chunk from cache (see
// cpu/gram_kernel.inc), accumulating into a private double T x T matrix. The per-thread
// matrices are summed in thread order, so results are deterministic for a given thread count.
#include "gram.h"

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

#if PYX_X86_MULTIVERSION
#include <immintrin.h>
#endif

namespace pyxtask::cpu {

// Row segments a tile prefetches while it computes (see dot_block). The round-robin deal
// gives each tile at most ceil(rows / tiles) <= 4 rows for 4-row tiles; 8 leaves room.
struct RowPrefetch {
  static constexpr int kMax = 8;
  const char* rows[kMax];
  int count = 0;
};

#if PYX_X86_MULTIVERSION
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
namespace avx512 {
#define PYX_VEC_BYTES 64
#include "cpu/gram_kernel.inc"
#undef PYX_VEC_BYTES
}  // namespace avx512
#pragma GCC pop_options

// bfloat16 on CPUs with AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs exactly and
// accumulates them in fp32, twice the products per instruction of the widened fp32 path
// and no widening pass, which is what bf16 needs to keep up with its halved bytes.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
namespace avx512bf16 {

constexpr int64_t kLanes = 32;  // bf16 per 512-bit register
constexpr int kTile = avx512::kTile;
using V = avx512::VecOf<float>::type;  // the fp32 accumulators, shared with the avx512 tiles

// As avx512::dot_tile, on bf16 pairs (see gram_kernel.inc for acc_io, pf and kUpper).
template <int RA, int RB, bool kUpper = false>
void dot_tile(const uint16_t* const* a, const uint16_t* const* b, int64_t n, V* acc_io,
              const RowPrefetch& pf) {
  __m512 acc[RA][RB];
#pragma GCC unroll 16
  for (int r = 0; r < RA; ++r) {
#pragma GCC unroll 16
    for (int s = 0; s < RB; ++s) acc[r][s] = acc_io[r * kTile + s];
  }
  for (int64_t k = 0; k < n; k += kLanes) {
    for (int p = 0; p < pf.count; ++p) __builtin_prefetch(pf.rows[p] + 2 * k, 0, 2);
    __m512bh va[RA];
    __m512bh vb[RB];
#pragma GCC unroll 16
    for (int r = 0; r < RA; ++r) va[r] = (__m512bh)_mm512_loadu_si512(a[r] + k);
#pragma GCC unroll 16
    for (int s = 0; s < RB; ++s) vb[s] = kUpper ? va[s] : (__m512bh)_mm512_loadu_si512(b[s] + k);
#pragma GCC unroll 16
    for (int r = 0; r < RA; ++r) {
#pragma GCC unroll 16
      for (int s = kUpper ? r : 0; s < RB; ++s)
        acc[r][s] = _mm512_dpbf16_ps(acc[r][s], va[r], vb[s]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RA; ++r) {
#pragma GCC unroll 16
    for (int s = kUpper ? r : 0; s < RB; ++s) acc_io[r * kTile + s] = acc[r][s];
  }
}

using TileFn = void (*)(const uint16_t* const*, const uint16_t* const*, int64_t, V*,
                        const RowPrefetch&);

TileFn tile_fn(int ra, int rb, bool upper) {
  static const TileFn table[4][4] = {
      {dot_tile<1, 1>, dot_tile<1, 2>, dot_tile<1, 3>, dot_tile<1, 4>},
      {dot_tile<2, 1>, dot_tile<2, 2>, dot_tile<2, 3>, dot_tile<2, 4>},
      {dot_tile<3, 1>, dot_tile<3, 2>, dot_tile<3, 3>, dot_tile<3, 4>},
      {dot_tile<4, 1>, dot_tile<4, 2>, dot_tile<4, 3>, dot_tile<4, 4>}};
  static const TileFn upper_table[4] = {dot_tile<1, 1, true>, dot_tile<2, 2, true>,
                                        dot_tile<3, 3, true>, dot_tile<4, 4, true>};
  return upper ? upper_table[ra - 1] : table[ra - 1][rb - 1];
}

// As avx512::gram_columns for bfloat16, reading the rows in place in L1-sized passes; each
// chunk's ragged end (fewer than 32 columns) goes through the widening path.
void gram_columns(const c10::BFloat16* const* a, int64_t ta, const c10::BFloat16* const* b,
                  int64_t tb, int64_t c0, int64_t c1, int64_t chunk, double* out,
                  std::vector<char>& scratch) {
  const bool symmetric = b == nullptr;
  const avx512::TileGrid grid{ta, symmetric ? ta : tb, symmetric};
  const int64_t rows = symmetric ? ta : ta + tb;
  const int64_t tiles = grid.tiles();
  constexpr int64_t pass = avx512::kPassBytes / sizeof(uint16_t);
  // Aligned by hand: std::vector<V> would drop the vector type's 64-byte alignment.
  std::vector<char> acc_mem(static_cast<size_t>(tiles * kTile * kTile) * sizeof(V) + 64);
  V* accs = reinterpret_cast<V*>((reinterpret_cast<uintptr_t>(acc_mem.data()) + 63) & ~63);
  for (int64_t q = 0; q < tiles * kTile * kTile; ++q) accs[q] = V{};
  std::vector<const uint16_t*> pa(ta), pb(grid.tb);
  for (int64_t c = c0; c < c1; c += chunk) {
    const int64_t len = std::min(chunk, c1 - c);
    const int64_t body = len / kLanes * kLanes;
    const bool next = c + chunk < c1;  // prefetch the next chunk, if this thread has one
    for (int64_t k = 0; k < body; k += pass) {
      const int64_t n = std::min(pass, body - k);
      for (int64_t i = 0; i < ta; ++i) pa[i] = reinterpret_cast<const uint16_t*>(a[i] + c + k);
      for (int64_t i = 0; i < grid.tb; ++i)
        pb[i] = symmetric ? pa[i] : reinterpret_cast<const uint16_t*>(b[i] + c + k);
      grid.for_each([&](int64_t q, int64_t i, int64_t j, int ra, int rb) {
        RowPrefetch pf;
        for (int64_t r = q; next && r < rows && pf.count < RowPrefetch::kMax; r += tiles) {
          const c10::BFloat16* row = r < ta ? a[r] : b[r - ta];
          pf.rows[pf.count++] = reinterpret_cast<const char*>(row + c + chunk + k);
        }
        tile_fn(ra, rb, symmetric && i == j)(pa.data() + i, pb.data() + j, n,
                                             accs + q * kTile * kTile, pf);
      });
    }
    avx512::reduce_block(grid, accs, out, grid.tb);
    if (body < len) {
      avx512::gram_columns<c10::BFloat16>(a, ta, b, tb, c + body, c + len, chunk, out, scratch);
    }
  }
}

}  // namespace avx512bf16
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
#if PYX_X86_MULTIVERSION
  if constexpr (std::is_same_v<In, c10::BFloat16>) {
    if (has_avx512_bf16()) {
      return avx512bf16::gram_columns(a, ta, b, tb, c0, c1, chunk, out, scratch);
    }
  }
#endif
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

// Double-precision products of the rows of a with the rows of b (or of a with itself).
at::Tensor gram_accumulate(const at::Tensor& a_in, const at::Tensor* b_in) {
  const at::Tensor a = with_unit_column_stride(a_in);
  const at::Tensor b = b_in ? with_unit_column_stride(*b_in) : at::Tensor();
  const int64_t ta = a.size(0);
  const int64_t tb = b_in ? b.size(0) : ta;
  const int64_t p = a.size(1);
  at::Tensor out = at::zeros({ta, tb}, a.options().dtype(at::kDouble));
  if (ta == 0 || tb == 0 || p == 0) return out;

  const int64_t rows = b_in ? ta + tb : ta;
  // 4096 columns per chunk: long enough that each tile's lane reductions (a few hundred
  // instructions) vanish next to its products, short enough that 64 fp32 rows (1 MiB) stay
  // in L2 while every tile pair reads them. Measured on Zen (2 cores, P = 1e7): 512 columns
  // gave T = 64 bf16 half the throughput of 4096; 16384 fell out of L2 at T = 64 fp32.
  constexpr int64_t chunk = 4096;
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
                                b_in ? reinterpret_cast<const In* const*>(pb.data()) : nullptr, tb,
                                begin * chunk, std::min(p, end * chunk), chunk, acc.data(),
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
