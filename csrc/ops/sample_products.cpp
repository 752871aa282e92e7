// Per-sample gradient products on the CPU (see sample_products.h for the shapes).
//
// Padding costs no multiply-adds: each sample's real rows are read in place when they are
// one run (right padding), packed once otherwise. Samples run in parallel, each with
// single-threaded GEMMs on its own rows:
//   linear_sample_dots:      X_b = D_b V (or A_b V^T, whichever leaves fewer columns), then
//                            sum_k X_bk . A_bk (or . D_bk);
//   linear_sample_sq_norms:  per sample (in parallel), the L x L Grams A A^T and D D^T and
//                            their Frobenius product, or the materialised D^T A and its
//                            squared norm, whichever costs fewer multiply-adds at that
//                            sample's length;
//   embedding_sample_dots:   per sample sum_k d_k . v[ids_k], rows read in place;
//   embedding_sample_sq_norms: per sample, positions sorted by id; each group's rows summed
//                            (in double) and its squared norm added.
// Dot products run in the compute dtype (float, double for double inputs; half and
// bfloat16 are widened to float), sums over rows and samples in double.
#include "sample_products.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace pyxtask::cpu {
namespace {

using detail::check_embedding;
using detail::check_linear;

template <typename T>
double dot(const T* x, const T* y, int64_t n) {
  if (n == 0) return 0.0;
  return static_cast<double>(at::vec::map2_reduce_all<T>(
      [](auto p, auto q) { return p * q; }, [](auto p, auto q) { return p + q; }, x, y, n));
}

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Where each sample's real rows are: sample b's rows are rows start[b] ... start[b] + count[b]
// - 1 of a [R, K] matrix, which is the input's [B * L, K] view when every sample's real
// positions are one run (right padding: no copy), or the real rows packed otherwise.
struct Rows {
  at::Tensor index;  // flat positions of the real rows when they are packed; else undefined
  std::vector<int64_t> start, count;
};

Rows real_rows(const std::optional<at::Tensor>& mask, int64_t B, int64_t L) {
  Rows rows;
  rows.start.resize(B);
  rows.count.assign(B, L);
  if (!mask.has_value()) {
    for (int64_t b = 0; b < B; ++b) rows.start[b] = b * L;
    return rows;
  }
  const at::Tensor m = mask->ne(0).contiguous();
  const bool* mp = m.const_data_ptr<bool>();
  bool runs = true;
  std::vector<int64_t> index;
  index.reserve(B * L);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t first = static_cast<int64_t>(index.size());
    for (int64_t k = 0; k < L; ++k)
      if (mp[b * L + k]) index.push_back(b * L + k);
    rows.count[b] = static_cast<int64_t>(index.size()) - first;
    rows.start[b] = rows.count[b] ? index[first] : b * L;
    runs = runs && (rows.count[b] == 0 || index.back() - index[first] + 1 == rows.count[b]);
  }
  if (!runs) {
    rows.index = at::tensor(index, at::TensorOptions().dtype(at::kLong));
    int64_t at = 0;
    for (int64_t b = 0; b < B; ++b) {
      rows.start[b] = at;
      at += rows.count[b];
    }
  }
  return rows;
}

// x [B, L, K] as the [R, K] matrix `rows` indexes, contiguous, in dtype `type`.
at::Tensor take_rows(const at::Tensor& x, const Rows& rows, at::ScalarType type) {
  const at::Tensor flat = x.to(type).contiguous().view({x.size(0) * x.size(1), x.size(2)});
  return rows.index.defined() ? at::index_select(flat, 0, rows.index) : flat;
}

at::Tensor result_like(const at::Tensor& x, int64_t B) {
  return at::zeros({B}, x.options().dtype(accumulate_type(x.scalar_type())));
}

// sum over the rows r of two [n, K] contiguous matrices of X_r . Y_r.
template <typename T>
double row_dots(const at::Tensor& X, const at::Tensor& Y) {
  const int64_t n = X.size(0), K = X.size(1);
  const T* xp = X.const_data_ptr<T>();
  const T* yp = Y.const_data_ptr<T>();
  double s = 0;
  for (int64_t r = 0; r < n; ++r) s += dot(xp + r * K, yp + r * K, K);
  return s;
}

// out[b] = fn(b) for every sample, in parallel over samples; fn returns a double.
template <typename Fn>
void per_sample(at::Tensor& out, const Fn& fn) {
  const int64_t B = out.size(0);
  std::vector<double> sums(B, 0.0);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) sums[b] = fn(b);
  });
  out.copy_(at::tensor(sums, at::TensorOptions().dtype(at::kDouble)));
}

at::Tensor linear_sample_dots_cpu(const at::Tensor& a, const at::Tensor& d, const at::Tensor& v,
                                  const std::optional<at::Tensor>& mask) {
  check_linear("linear_sample_dots", a, d, &v, mask);
  const int64_t B = a.size(0), L = a.size(1), I = a.size(2), O = d.size(2);
  at::Tensor out = result_like(a, B);
  if (B * L == 0 || I == 0 || O == 0) return out;
  const auto type = compute_type(a);
  const Rows rows = real_rows(mask, B, L);
  const at::Tensor A = take_rows(a, rows, type), D = take_rows(d, rows, type);
  const at::Tensor V = v.to(type).contiguous();
  const at::Tensor Vt = V.t();
  AT_DISPATCH_FLOATING_TYPES(type, "pyxtask_linear_dots", [&] {
    // sum_k d_k . (V a_k) = sum_k (V^T d_k) . a_k: multiply on the side with fewer columns.
    per_sample(out, [&](int64_t b) {
      const int64_t n = rows.count[b];
      if (n == 0) return 0.0;
      const at::Tensor Ab = A.narrow(0, rows.start[b], n), Db = D.narrow(0, rows.start[b], n);
      return I <= O ? row_dots<scalar_t>(at::mm(Db, V), Ab)
                    : row_dots<scalar_t>(at::mm(Ab, Vt), Db);
    });
  });
  return out;
}

at::Tensor linear_sample_sq_norms_cpu(const at::Tensor& a, const at::Tensor& d,
                                      const std::optional<at::Tensor>& mask,
                                      c10::string_view method) {
  check_linear("linear_sample_sq_norms", a, d, nullptr, mask);
  const detail::NormMethod how = detail::parse_norm_method(method);
  const int64_t B = a.size(0), L = a.size(1), I = a.size(2), O = d.size(2);
  at::Tensor out = result_like(a, B);
  if (B * L == 0 || I == 0 || O == 0) return out;
  const auto type = compute_type(a);
  const Rows rows = real_rows(mask, B, L);
  const at::Tensor A = take_rows(a, rows, type), D = take_rows(d, rows, type);
  AT_DISPATCH_FLOATING_TYPES(type, "pyxtask_linear_sq_norms", [&] {
    per_sample(out, [&](int64_t b) {
      const int64_t n = rows.count[b];
      if (n == 0) return 0.0;
      const at::Tensor Ab = A.narrow(0, rows.start[b], n), Db = D.narrow(0, rows.start[b], n);
      if (detail::use_gram(how, n, I, O)) {
        const at::Tensor Ga = at::mm(Ab, Ab.t()), Gd = at::mm(Db, Db.t());
        return dot(Ga.const_data_ptr<scalar_t>(), Gd.const_data_ptr<scalar_t>(), n * n);
      }
      const at::Tensor G = at::mm(Db.t(), Ab);
      return dot(G.const_data_ptr<scalar_t>(), G.const_data_ptr<scalar_t>(), O * I);
    });
  });
  return out;
}

// ids as int64 and the real-position flags, contiguous; checks every real id is a row of v.
std::pair<at::Tensor, at::Tensor> embedding_inputs(const at::Tensor& ids,
                                                   const std::optional<at::Tensor>& mask,
                                                   const int64_t* num_rows, const char* op) {
  const at::Tensor id = ids.to(at::kLong).contiguous();
  const at::Tensor real = mask.has_value() ? mask->ne(0).contiguous()
                                           : at::ones(ids.sizes(), ids.options().dtype(at::kBool));
  if (num_rows != nullptr) {
    const int64_t* ip = id.const_data_ptr<int64_t>();
    const bool* rp = real.const_data_ptr<bool>();
    for (int64_t i = 0; i < id.numel(); ++i)
      PYX_CHECK(!rp[i] || (ip[i] >= 0 && ip[i] < *num_rows), op, "ids[", i / ids.size(1), ", ",
                i % ids.size(1), "] = ", ip[i], " is not a row of v (", *num_rows, " rows)");
  }
  return {id, real};
}

at::Tensor embedding_sample_dots_cpu(const at::Tensor& ids, const at::Tensor& d,
                                     const at::Tensor& v, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "embedding_sample_dots";
  check_embedding(op, ids, d, &v, mask);
  const int64_t B = d.size(0), L = d.size(1), H = d.size(2), rows_v = v.size(0);
  at::Tensor out = result_like(d, B);
  if (B * L == 0 || H == 0) return out;
  const auto [id, real] = embedding_inputs(ids, mask, &rows_v, op);
  const auto type = compute_type(d);
  const at::Tensor D = d.to(type).contiguous(), V = v.to(type).contiguous();
  AT_DISPATCH_FLOATING_TYPES(type, "pyxtask_embedding_dots", [&] {
    const scalar_t* dp = D.const_data_ptr<scalar_t>();
    const scalar_t* vp = V.const_data_ptr<scalar_t>();
    const int64_t* ip = id.const_data_ptr<int64_t>();
    const bool* rp = real.const_data_ptr<bool>();
    per_sample(out, [&](int64_t b) {
      double s = 0;
      for (int64_t k = b * L; k < (b + 1) * L; ++k)
        if (rp[k]) s += dot(dp + k * H, vp + ip[k] * H, H);
      return s;
    });
  });
  return out;
}

at::Tensor embedding_sample_sq_norms_cpu(const at::Tensor& ids, const at::Tensor& d,
                                         const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "embedding_sample_sq_norms";
  check_embedding(op, ids, d, nullptr, mask);
  const int64_t B = d.size(0), L = d.size(1), H = d.size(2);
  at::Tensor out = result_like(d, B);
  if (B * L == 0 || H == 0) return out;
  const auto [id, real] = embedding_inputs(ids, mask, nullptr, op);
  const at::Tensor D = d.to(compute_type(d)).contiguous();
  AT_DISPATCH_FLOATING_TYPES(D.scalar_type(), "pyxtask_embedding_sq_norms", [&] {
    const scalar_t* dp = D.const_data_ptr<scalar_t>();
    const int64_t* ip = id.const_data_ptr<int64_t>();
    const bool* rp = real.const_data_ptr<bool>();
    per_sample(out, [&](int64_t b) {
      std::vector<std::pair<int64_t, int64_t>> order;  // (id, position) of the real positions
      for (int64_t k = b * L; k < (b + 1) * L; ++k)
        if (rp[k]) order.emplace_back(ip[k], k);
      std::sort(order.begin(), order.end());
      std::vector<double> row;
      double s = 0;
      for (size_t g = 0; g < order.size();) {
        size_t e = g + 1;
        while (e < order.size() && order[e].first == order[g].first) ++e;
        const scalar_t* first = dp + order[g].second * H;
        if (e == g + 1) {  // a token seen once: its row's norm
          s += dot(first, first, H);
        } else {  // a repeated token's gradient row is the sum of its positions' rows
          row.assign(H, 0.0);
          for (size_t j = g; j < e; ++j) {
            const scalar_t* r = dp + order[j].second * H;
            for (int64_t h = 0; h < H; ++h) row[h] += static_cast<double>(r[h]);
          }
          for (int64_t h = 0; h < H; ++h) s += row[h] * row[h];
        }
        g = e;
      }
      return s;
    });
  });
  return out;
}

// Meta kernels: the checks and a [B] result.
at::Tensor meta_result(const at::Tensor& x) {
  return at::empty_symint({x.sym_size(0)}, x.options().dtype(accumulate_type(x.scalar_type())));
}

at::Tensor linear_sample_dots_meta(const at::Tensor& a, const at::Tensor& d, const at::Tensor& v,
                                   const std::optional<at::Tensor>& mask) {
  check_linear("linear_sample_dots", a, d, &v, mask);
  return meta_result(a);
}

at::Tensor linear_sample_sq_norms_meta(const at::Tensor& a, const at::Tensor& d,
                                       const std::optional<at::Tensor>& mask,
                                       c10::string_view method) {
  check_linear("linear_sample_sq_norms", a, d, nullptr, mask);
  detail::parse_norm_method(method);
  return meta_result(a);
}

at::Tensor embedding_sample_dots_meta(const at::Tensor& ids, const at::Tensor& d,
                                      const at::Tensor& v, const std::optional<at::Tensor>& mask) {
  check_embedding("embedding_sample_dots", ids, d, &v, mask);
  return meta_result(d);
}

at::Tensor embedding_sample_sq_norms_meta(const at::Tensor& ids, const at::Tensor& d,
                                          const std::optional<at::Tensor>& mask) {
  check_embedding("embedding_sample_sq_norms", ids, d, nullptr, mask);
  return meta_result(d);
}

}  // namespace
}  // namespace pyxtask::cpu

TORCH_LIBRARY_IMPL(pyxtask, CPU, m) {
  m.impl("linear_sample_dots", &pyxtask::cpu::linear_sample_dots_cpu);
  m.impl("linear_sample_sq_norms", &pyxtask::cpu::linear_sample_sq_norms_cpu);
  m.impl("embedding_sample_dots", &pyxtask::cpu::embedding_sample_dots_cpu);
  m.impl("embedding_sample_sq_norms", &pyxtask::cpu::embedding_sample_sq_norms_cpu);
}

TORCH_LIBRARY_IMPL(pyxtask, Meta, m) {
  m.impl("linear_sample_dots", &pyxtask::cpu::linear_sample_dots_meta);
  m.impl("linear_sample_sq_norms", &pyxtask::cpu::linear_sample_sq_norms_meta);
  m.impl("embedding_sample_dots", &pyxtask::cpu::embedding_sample_dots_meta);
  m.impl("embedding_sample_sq_norms", &pyxtask::cpu::embedding_sample_sq_norms_meta);
}
