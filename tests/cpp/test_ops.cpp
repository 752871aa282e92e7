// C++ tests of the pyxtask op library through its public C++ API (pyxtask/ops.h), i.e.
// through the PyTorch dispatcher, against ATen references computed in double.
// Self-contained: plain main(), no test framework. Each failed CHECK prints file:line and
// what was compared; the program ends with "N passed, M failed" and exits 1 if M > 0.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "pyxtask/ops.h"

namespace {

int g_passed = 0;
int g_failed = 0;

void report(bool ok, const char* file, int line, const std::string& what) {
  if (ok) {
    ++g_passed;
    return;
  }
  ++g_failed;
  std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", file, line, what.c_str());
}

// c10/util/Logging.h defines a glog-style CHECK; this file uses its own.
#undef CHECK
#define CHECK(cond) report(static_cast<bool>(cond), __FILE__, __LINE__, #cond)

// CHECK with a message built by streaming: CHECK_MSG(x < tol, "x=" << x << " tol=" << tol).
#define CHECK_MSG(cond, msg)                              \
  do {                                                    \
    const bool pyx_ok_ = static_cast<bool>(cond);         \
    std::ostringstream pyx_os_;                           \
    if (!pyx_ok_) pyx_os_ << #cond << " [" << msg << "]"; \
    report(pyx_ok_, __FILE__, __LINE__, pyx_os_.str());   \
  } while (0)

// Expects fn() to throw a c10::Error whose what() contains `needle`.
#define CHECK_THROWS_WITH(stmt, needle)                                                           \
  do {                                                                                            \
    std::string pyx_msg_;                                                                         \
    bool pyx_threw_ = false;                                                                      \
    try {                                                                                         \
      stmt;                                                                                       \
    } catch (const c10::Error& e) {                                                               \
      pyx_threw_ = true;                                                                          \
      pyx_msg_ = e.what();                                                                        \
    } catch (const std::exception& e) {                                                           \
      pyx_msg_ = std::string("non-c10 exception: ") + e.what();                                   \
    }                                                                                             \
    const bool pyx_ok_ = pyx_threw_ && pyx_msg_.find(needle) != std::string::npos;                \
    report(pyx_ok_, __FILE__, __LINE__,                                                           \
           std::string(#stmt " should throw c10::Error containing \"") + (needle) + "\"; got: " + \
               (pyx_msg_.empty() ? std::string("no exception") : pyx_msg_).substr(0, 400));       \
  } while (0)

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

at::Tensor dbl(const at::Tensor& t) { return t.to(at::kDouble); }

// max_ij |got - ref| / scale, all in double; NaN if got holds a NaN.
double max_scaled_err(const at::Tensor& got, const at::Tensor& ref, const at::Tensor& scale) {
  const at::Tensor err = (dbl(got) - ref).abs() / scale.clamp_min(1e-300);
  if (err.numel() == 0) return 0.0;
  if (err.isnan().any().item<bool>()) return std::nan("");
  return err.max().item<double>();
}

double tol_for(at::ScalarType t) { return t == at::kDouble ? 1e-10 : 1e-5; }
at::ScalarType result_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---------------------------------------------------------------------------------------
// Gram family

// got vs A B^T for inputs already in their kernel dtype; the reference uses those exact
// values (so bf16 inputs are compared against the product of the bf16-rounded numbers).
void check_product(const char* what, const at::Tensor& got, const at::Tensor& A,
                   const at::Tensor& B, const std::string& ctx, const char* file, int line) {
  const at::ScalarType in = A.scalar_type();
  bool ok = got.scalar_type() == result_type(in) && got.dim() == 2 && got.size(0) == A.size(0) &&
            got.size(1) == B.size(0);
  std::ostringstream os;
  if (!ok) {
    os << what << " " << ctx << ": bad result dtype/shape " << got.scalar_type() << " "
       << got.sizes();
    report(false, file, line, os.str());
    return;
  }
  const at::Tensor ref = at::mm(dbl(A), dbl(B).t());
  const at::Tensor scale = at::mm(dbl(A).abs(), dbl(B).abs().t());
  const double err = max_scaled_err(got, ref, scale);
  ok = err <= tol_for(in);
  if (!ok)
    os << what << " " << ctx << ": max |got-ref|/sum|a||b| = " << err << " > " << tol_for(in);
  report(ok, file, line, os.str());
}

void test_gram() {
  const std::vector<at::ScalarType> dtypes{at::kFloat, at::kDouble, at::kBFloat16};
  const std::vector<int64_t> Ts{1, 3, 5, 16, 64};
  const std::vector<int64_t> Ps{1, 17, 1001, 100003};
  for (auto dt : dtypes) {
    for (int64_t T : Ts) {
      for (int64_t P : Ps) {
        std::ostringstream ctx;
        ctx << dtype_name(dt) << " T=" << T << " P=" << P;
        // Contiguous input.
        const at::Tensor G = at::randn({T, P}, at::kDouble).to(dt);
        check_product("gram", pyxtask::gram(G), G, G, ctx.str(), __FILE__, __LINE__);
        // Rows of a wider buffer: row stride P + 10, unit column stride, offset 3.
        const at::Tensor big = at::randn({T, P + 10}, at::kDouble).to(dt);
        const at::Tensor S = big.narrow(1, 3, P);
        CHECK(P == 1 || T == 1 || !S.is_contiguous());  // a 1-row slice is contiguous
        check_product("gram(narrow)", pyxtask::gram(S), S, S, ctx.str(), __FILE__, __LINE__);
      }
    }
    // Column-strided (transposed) input, and P = 0.
    for (int64_t T : {3, 16}) {
      const at::Tensor Gt = at::randn({777, T}, at::kDouble).to(dt).t();
      check_product("gram(transposed)", pyxtask::gram(Gt), Gt, Gt, dtype_name(dt), __FILE__,
                    __LINE__);
    }
    const at::Tensor E = at::empty({4, 0}, at::TensorOptions().dtype(dt));
    const at::Tensor ME = pyxtask::gram(E);
    CHECK(ME.sizes() == at::IntArrayRef({4, 4}) && ME.abs().sum().item<double>() == 0.0);
  }
  // Half is accepted too.
  const at::Tensor H = at::randn({5, 3001}, at::kDouble).to(at::kHalf);
  check_product("gram", pyxtask::gram(H), H, H, "half T=5 P=3001", __FILE__, __LINE__);
  // Result is symmetric exactly.
  const at::Tensor G = at::randn({7, 12345});
  const at::Tensor M = pyxtask::gram(G);
  CHECK(at::equal(M, M.t()));
}

void test_gram_autograd() {
  const at::Tensor G = at::randn({4, 301}, at::kDouble).requires_grad_(true);
  const at::Tensor W = at::randn({4, 4}, at::kDouble);
  (pyxtask::gram(G) * W).sum().backward();
  const at::Tensor expected = at::mm(W + W.t(), G.detach());
  CHECK(G.grad().defined());
  if (G.grad().defined()) {
    const double err = (G.grad() - expected).abs().max().item<double>();
    CHECK_MSG(err < 1e-10, "gram backward err " << err);
  }
}

void test_cross_gram() {
  const std::vector<at::ScalarType> dtypes{at::kFloat, at::kDouble, at::kBFloat16};
  const std::vector<std::pair<int64_t, int64_t>> TS{{1, 1}, {3, 5}, {16, 2}, {64, 64}, {7, 64}};
  for (auto dt : dtypes) {
    for (auto [T, S] : TS) {
      for (int64_t P : {1, 17, 1001, 100003}) {
        std::ostringstream ctx;
        ctx << dtype_name(dt) << " T=" << T << " S=" << S << " P=" << P;
        const at::Tensor A = at::randn({T, P}, at::kDouble).to(dt);
        const at::Tensor B = at::randn({S, P + 5}, at::kDouble).to(dt).narrow(1, 2, P);
        check_product("cross_gram", pyxtask::cross_gram(A, B), A, B, ctx.str(), __FILE__, __LINE__);
      }
    }
  }
  // cross_gram(G, G) == gram(G) numerically.
  const at::Tensor G = at::randn({6, 5003}, at::kDouble);
  CHECK((pyxtask::cross_gram(G, G) - pyxtask::gram(G)).abs().max().item<double>() < 1e-9);
}

void test_cosine_matrix() {
  for (auto dt : {at::kFloat, at::kDouble, at::kBFloat16}) {
    for (int64_t P : {1, 33, 20001}) {
      const int64_t T = 6;
      at::Tensor G = at::randn({T, P}, at::kDouble).to(dt);
      G[2].zero_();                // a zero row
      if (P > 1) G[4] = G[1] * 3;  // parallel rows: cosine 1
      const at::Tensor C = pyxtask::cosine_matrix(G);
      std::ostringstream ctx;
      ctx << dtype_name(dt) << " P=" << P;
      CHECK_MSG(C.scalar_type() == result_type(dt) && C.sizes() == at::IntArrayRef({T, T}),
                ctx.str() << " dtype " << C.scalar_type() << " shape " << C.sizes());
      const at::Tensor Cd = dbl(C);
      CHECK_MSG(!Cd.isnan().any().item<bool>(), ctx.str() << " NaN in cosine_matrix: " << Cd);
      // Zero row and column are exactly 0, the diagonal of nonzero rows is 1.
      CHECK_MSG(Cd[2].abs().max().item<double>() == 0.0, ctx.str() << " row 2 = " << Cd[2]);
      CHECK_MSG(Cd.select(1, 2).abs().max().item<double>() == 0.0,
                ctx.str() << " col 2 = " << Cd.select(1, 2));
      for (int64_t i = 0; i < T; ++i) {
        if (i == 2) continue;
        CHECK_MSG(Cd[i][i].item<double>() == 1.0,
                  ctx.str() << " C[" << i << "," << i << "] = " << Cd[i][i].item<double>());
      }
      CHECK_MSG(Cd.abs().max().item<double>() <= 1.0, ctx.str() << " |cos| > 1: " << Cd);
      // Off-diagonal entries against the double reference from the same (rounded) inputs.
      const at::Tensor Gd = dbl(G);
      const at::Tensor n = Gd.norm(2, {1});
      const at::Tensor inv = at::where(n > 0, 1.0 / n, at::zeros_like(n));
      const at::Tensor ref = at::mm(Gd, Gd.t()) * inv.unsqueeze(1) * inv.unsqueeze(0);
      const at::Tensor scale =
          (at::mm(Gd.abs(), Gd.abs().t()) * inv.unsqueeze(1) * inv.unsqueeze(0)).clamp_min(1.0);
      const at::Tensor off = 1 - at::eye(T, at::kDouble);
      const double err = max_scaled_err(Cd * off, ref * off, scale);
      CHECK_MSG(err <= tol_for(dt), ctx.str() << " cosine err " << err);
      if (P > 1) {
        CHECK_MSG(std::abs(Cd[1][4].item<double>() - 1.0) <= 1e-5,
                  ctx.str() << " parallel rows cos = " << Cd[1][4].item<double>());
      }
    }
  }
  // All-zero G: all zeros.
  const at::Tensor Z = pyxtask::cosine_matrix(at::zeros({3, 10}));
  CHECK(!Z.isnan().any().item<bool>() && Z.abs().max().item<double>() == 0.0);
}

// ---------------------------------------------------------------------------------------
// Flat-buffer family

std::vector<at::Tensor> make_params(at::ScalarType dt) {
  const auto o = at::TensorOptions().dtype(dt);
  std::vector<at::Tensor> ts;
  ts.push_back(at::randn({3, 4}, o));
  ts.push_back(at::randn({5, 7}, o).t());  // non-contiguous, shape {7, 5}
  ts.push_back(at::randn({1}, o));
  ts.push_back(at::randn({0}, o));                      // empty
  ts.push_back(at::randn({50000}, o));                  // spans several parallel grains
  ts.push_back(at::randn({9, 11}, o).narrow(1, 2, 6));  // non-contiguous slice {9, 6}
  ts.push_back(at::randn({2, 3, 4}, o));
  return ts;
}

at::Tensor flatten_ref(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> flat;
  for (const auto& t : ts) flat.push_back(dbl(t).reshape({-1}));
  return at::cat(flat);
}

int64_t numel_of(const std::vector<at::Tensor>& ts) {
  int64_t n = 0;
  for (const auto& t : ts) n += t.numel();
  return n;
}

void test_gather_scatter() {
  for (auto dt : {at::kFloat, at::kDouble}) {
    const std::string ctx = dtype_name(dt);
    const int64_t T = 3;
    std::vector<std::vector<at::Tensor>> sets;
    for (int64_t t = 0; t < T; ++t) sets.push_back(make_params(dt));
    CHECK(!sets[0][1].is_contiguous() && !sets[0][5].is_contiguous());
    const int64_t P = numel_of(sets[0]);

    // gather_flat each set into a row of a T x P buffer: exact copy.
    at::Tensor G = at::full({T, P}, std::nan(""), at::TensorOptions().dtype(dt));
    for (int64_t t = 0; t < T; ++t) pyxtask::gather_flat(sets[t], G[t]);
    for (int64_t t = 0; t < T; ++t) {
      CHECK_MSG(at::equal(dbl(G[t]), flatten_ref(sets[t])), ctx << " gather_flat row " << t);
    }

    // Round trip: scatter row 1 with weights e_1 restores set 1 exactly.
    {
      std::vector<at::Tensor> out;
      for (const auto& p : sets[1]) out.push_back(at::full_like(p, 123.0));
      out[1] = at::full({5, 7}, 123.0, at::TensorOptions().dtype(dt))
                   .t();  // keep the non-contiguous layout
      const at::Tensor w = at::tensor({0.0, 1.0, 0.0}, at::kDouble).to(dt);
      pyxtask::scatter_combination(G, w, out, /*accumulate=*/false);
      for (size_t i = 0; i < out.size(); ++i) {
        CHECK_MSG(at::equal(out[i], sets[1][i]), ctx << " round trip tensor " << i);
      }
      CHECK(!out[1].is_contiguous());
    }

    // Weighted combination, assign and accumulate, against a double reference.
    const at::Tensor w = at::tensor({0.5, -1.25, 2.0}, at::kDouble);
    const at::Tensor combo = at::mv(dbl(G).t(), w);  // P
    at::Tensor scale = at::mv(dbl(G).abs().t(), w.abs());
    for (bool accumulate : {false, true}) {
      std::vector<at::Tensor> out = make_params(dt);
      const at::Tensor before = flatten_ref(out);
      pyxtask::scatter_combination(G, w.to(dt), out, accumulate);
      const at::Tensor ref = accumulate ? before + combo : combo;
      const at::Tensor sc = accumulate ? scale + before.abs() : scale;
      const double err = max_scaled_err(flatten_ref(out), ref, sc.clamp_min(1e-30));
      CHECK_MSG(err <= tol_for(dt),
                ctx << " scatter_combination accumulate=" << accumulate << " err " << err);
    }

    // A row of a wider buffer as G (row stride > P); weights given in fp32 for fp64 G.
    {
      at::Tensor Gw = at::randn({T, P + 9}, at::TensorOptions().dtype(dt)).narrow(1, 4, P);
      std::vector<at::Tensor> out = make_params(dt);
      const at::Tensor wf = at::tensor({1.0, 2.0, -0.5}, at::kFloat);
      pyxtask::scatter_combination(Gw, wf, out, false);
      const at::Tensor ref = at::mv(dbl(Gw).t(), dbl(wf));
      const at::Tensor sc = at::mv(dbl(Gw).abs().t(), dbl(wf).abs());
      const double err = max_scaled_err(flatten_ref(out), ref, sc.clamp_min(1e-30));
      CHECK_MSG(err <= tol_for(dt), ctx << " scatter_combination(narrowed G) err " << err);
    }
  }

  // gather_flat with a tensor of another dtype than out (goes through ATen's copy).
  {
    std::vector<at::Tensor> ts{at::randn({10}, at::kFloat), at::randn({4, 4}, at::kDouble)};
    at::Tensor out = at::empty({26}, at::kDouble);
    pyxtask::gather_flat(ts, out);
    CHECK(at::equal(out, flatten_ref(ts)));
  }
  CHECK_THROWS_WITH(pyxtask::gather_flat({at::randn({3})}, at::empty({4})), "pyxtask.gather_flat");
  CHECK_THROWS_WITH(
      pyxtask::scatter_combination(at::randn({2, 5}), at::ones({3}), {at::empty({5})}, false),
      "pyxtask.scatter_combination");
}

void test_add_scaled() {
  for (auto dt : {at::kFloat, at::kDouble}) {
    const std::string ctx = dtype_name(dt);
    std::vector<at::Tensor> ts = make_params(dt);
    std::vector<at::Tensor> vs = make_params(dt);
    vs[2] = vs[2].to(dt == at::kFloat ? at::kDouble : at::kFloat);  // other dtype
    const at::Tensor t0 = flatten_ref(ts);
    const at::Tensor v0 = flatten_ref(vs);
    const double alpha = -0.375;
    pyxtask::add_scaled_(ts, vs, alpha);
    const at::Tensor ref = t0 + alpha * v0;
    const at::Tensor sc = t0.abs() + std::abs(alpha) * v0.abs();
    const double err = max_scaled_err(flatten_ref(ts), ref, sc.clamp_min(1e-30));
    CHECK_MSG(err <= (dt == at::kDouble ? 1e-15 : 1e-6), ctx << " add_scaled_ err " << err);
    CHECK(!ts[1].is_contiguous());  // updated in place, layout kept
  }
  CHECK_THROWS_WITH(pyxtask::add_scaled_({at::zeros({3})}, {at::zeros({4})}, 1.0),
                    "pyxtask.add_scaled_");
  CHECK_THROWS_WITH(pyxtask::add_scaled_({at::zeros({3})}, {at::zeros({3})}, INFINITY),
                    "pyxtask.add_scaled_");
}

// ---------------------------------------------------------------------------------------
// mirror_descent_step

at::Tensor md_ref(const at::Tensor& w, const at::Tensor& g, double lr) {
  const at::Tensor wd = dbl(w), gd = dbl(g);
  const at::Tensor logit = at::where(wd > 0, wd.log() - lr * gd,
                                     at::full_like(wd, -std::numeric_limits<double>::infinity()));
  return at::softmax(logit, 0);
}

void test_mirror_descent() {
  for (auto dt : {at::kFloat, at::kDouble}) {
    const std::string ctx = dtype_name(dt);
    const double tol = dt == at::kDouble ? 1e-12 : 1e-6;
    for (int64_t n : {1, 2, 7, 100000}) {
      at::Tensor w = at::rand({n}, at::kDouble) + 0.01;
      if (n > 2) {
        w[1] = 0.0;
        w[n - 1] = 0.0;
      }
      w = (w / w.sum()).to(dt);
      const at::Tensor g = at::randn({n}, at::kDouble).to(dt);
      for (double lr : {0.0, 0.1, 3.0}) {
        const at::Tensor out = pyxtask::mirror_descent_step(w, g, lr);
        CHECK_MSG(out.scalar_type() == dt && out.sizes() == w.sizes(),
                  ctx << " dtype/shape " << out.scalar_type() << " " << out.sizes());
        const at::Tensor od = dbl(out);
        CHECK_MSG(od.isfinite().all().item<bool>() && od.min().item<double>() >= 0.0,
                  ctx << " n=" << n << " lr=" << lr << " not a finite nonnegative vector");
        CHECK_MSG(std::abs(od.sum().item<double>() - 1.0) <= (dt == at::kDouble ? 1e-12 : 1e-4),
                  ctx << " n=" << n << " sum " << od.sum().item<double>());
        if (n > 2) {
          CHECK_MSG(od[1].item<double>() == 0.0 && od[n - 1].item<double>() == 0.0,
                    ctx << " zero weight became " << od[1].item<double>());
        }
        const double err = (od - md_ref(w, g, lr)).abs().max().item<double>();
        CHECK_MSG(err <= tol, ctx << " n=" << n << " lr=" << lr << " err " << err);
      }
    }
    // lr * g = 1e4 in magnitude: a naive exp overflows/underflows; the result must not.
    {
      const at::Tensor w = at::tensor({0.25, 0.25, 0.0, 0.5}, at::kDouble).to(dt);
      const at::Tensor g = at::tensor({1e4, -1e4, -1e4, 0.0}, at::kDouble).to(dt);
      const at::Tensor out = dbl(pyxtask::mirror_descent_step(w, g, 1.0));
      CHECK_MSG(out.isfinite().all().item<bool>(), ctx << " lr*g=1e4 gives " << out);
      CHECK_MSG(std::abs(out[1].item<double>() - 1.0) <= 1e-12 && out[2].item<double>() == 0.0 &&
                    out[0].item<double>() == 0.0 && out[3].item<double>() == 0.0,
                ctx << " lr*g=1e4 gives " << out);
      // All gradients huge and equal: no change.
      const at::Tensor g2 = at::full({4}, 1e4, at::kDouble).to(dt);
      const at::Tensor out2 = dbl(pyxtask::mirror_descent_step(w, g2, 1.0));
      CHECK_MSG((out2 - dbl(w)).abs().max().item<double>() <= 1e-7, ctx << " got " << out2);
    }
  }
  CHECK_THROWS_WITH(pyxtask::mirror_descent_step(at::tensor({0.5, -0.1}), at::zeros({2}), 1.0),
                    "pyxtask.mirror_descent_step");
  CHECK_THROWS_WITH(pyxtask::mirror_descent_step(at::zeros({3}), at::zeros({3}), 1.0),
                    "pyxtask.mirror_descent_step");
  CHECK_THROWS_WITH(pyxtask::mirror_descent_step(at::ones({3}), at::zeros({4}), 1.0),
                    "pyxtask.mirror_descent_step");
}

// ---------------------------------------------------------------------------------------
// min_norm_point

// KKT of argmin_{lam in simplex} lam^T M lam: (M lam)_i >= lam^T M lam - eps for every i.
void check_kkt(const at::Tensor& M_in, const at::Tensor& lam_in, double rel_tol,
               const std::string& ctx, const char* file, int line) {
  const at::Tensor M = dbl(M_in), lam = dbl(lam_in);
  const double scale = std::max(at::diagonal(M).max().item<double>(), 1e-300);
  std::ostringstream os;
  bool ok = lam.dim() == 1 && lam.size(0) == M.size(0) && lam.isfinite().all().item<bool>();
  if (ok) {
    const double mn = lam.min().item<double>();
    const double s = lam.sum().item<double>();
    // The sum is 1 up to rounding in lambda's own dtype.
    const double sum_tol = lam_in.scalar_type() == at::kDouble ? 1e-12 : 1e-6;
    ok = mn >= 0.0 && std::abs(s - 1.0) <= sum_tol;
    if (!ok) os << ctx << ": lambda not on the simplex (min " << mn << ", sum " << s << ")";
  } else {
    os << ctx << ": bad lambda " << lam_in;
  }
  if (ok) {
    const at::Tensor u = at::mv(M, lam);
    const double f = at::dot(lam, u).item<double>();
    const double worst = (f - u).max().item<double>();  // must be <= eps
    ok = worst <= rel_tol * scale;
    if (!ok)
      os << ctx << ": KKT violated: max_i (f - (M lam)_i) = " << worst << " > " << rel_tol << " * "
         << scale << "; lambda = " << lam;
  }
  report(ok, file, line, os.str());
}

void test_min_norm_point() {
  for (int seed = 0; seed < 5; ++seed) {
    at::manual_seed(1000 + seed);
    for (int64_t P : {50, 3, 10}) {  // full rank, rank 3 (optimum 0 or on a face), square
      const at::Tensor G = at::randn({10, P}, at::kDouble) + (seed % 2 ? 0.5 : 0.0);
      const at::Tensor M = at::mm(G, G.t());
      for (const char* method : {"away", "pairwise"}) {
        std::ostringstream ctx;
        ctx << "min_norm_point " << method << " seed " << seed << " P=" << P;
        const at::Tensor lam = pyxtask::min_norm_point(M, 10000, 1e-12, method);
        CHECK_MSG(lam.scalar_type() == at::kDouble, ctx.str() << " dtype " << lam.scalar_type());
        check_kkt(M, lam, 1e-9, ctx.str(), __FILE__, __LINE__);
      }
      // "plain" is sublinear: only ask for a point of the simplex no better than the optimum.
      const at::Tensor lp = dbl(pyxtask::min_norm_point(M, 10000, 1e-12, "plain"));
      const at::Tensor la = dbl(pyxtask::min_norm_point(M, 10000, 1e-12, "away"));
      CHECK(lp.min().item<double>() >= 0 && std::abs(lp.sum().item<double>() - 1) <= 1e-12);
      const double fp = at::dot(lp, at::mv(M, lp)).item<double>();
      const double fa = at::dot(la, at::mv(M, la)).item<double>();
      const double sc = at::diagonal(M).max().item<double>();
      CHECK_MSG(fp >= fa - 1e-9 * sc, "plain f " << fp << " < away f " << fa);
      // fp32 M gives an fp32 lambda of the same problem.
      const at::Tensor l32 = pyxtask::min_norm_point(M.to(at::kFloat), 10000, 1e-12, "away");
      CHECK(l32.scalar_type() == at::kFloat);
      check_kkt(M.to(at::kFloat), l32, 1e-5, "fp32 M", __FILE__, __LINE__);
    }
  }
  // Small cases: T = 1, T = 2 closed form, M = 0.
  CHECK(pyxtask::min_norm_point(at::ones({1, 1}, at::kDouble), 100, 1e-12, "away")
            .equal(at::ones({1}, at::kDouble)));
  {
    const at::Tensor M = at::tensor({4.0, 1.0, 1.0, 2.0}, at::kDouble).view({2, 2});
    const at::Tensor lam = pyxtask::min_norm_point(M, 100, 1e-12, "away");
    // f(g) = 4g^2 + 2g(1-g) + 2(1-g)^2 -> g = 1/4.
    CHECK_MSG(std::abs(lam[0].item<double>() - 0.25) < 1e-14, lam);
  }
  {
    const at::Tensor lam =
        pyxtask::min_norm_point(at::zeros({4, 4}, at::kDouble), 100, 1e-12, "away");
    CHECK(lam.isfinite().all().item<bool>() && std::abs(lam.sum().item<double>() - 1) < 1e-12);
  }
  // 64 tasks, the maximum.
  {
    const at::Tensor G = at::randn({64, 200}, at::kDouble);
    const at::Tensor M = at::mm(G, G.t());
    check_kkt(M, pyxtask::min_norm_point(M, 100000, 1e-12, "away"), 1e-9, "T=64", __FILE__,
              __LINE__);
  }
  CHECK_THROWS_WITH(pyxtask::min_norm_point(at::eye(3), 10, 1e-12, "bogus"),
                    "pyxtask.min_norm_point");
  CHECK_THROWS_WITH(pyxtask::min_norm_point(at::ones({2, 3}), 10, 1e-12, "away"),
                    "pyxtask.min_norm_point");
  CHECK_THROWS_WITH(pyxtask::min_norm_point(at::eye(65), 10, 1e-12, "away"),
                    "pyxtask.min_norm_point");
  at::Tensor bad = at::eye(3, at::kDouble);
  bad[0][1] = std::nan("");
  CHECK_THROWS_WITH(pyxtask::min_norm_point(bad, 10, 1e-12, "away"), "pyxtask.min_norm_point");
}

// ---------------------------------------------------------------------------------------
// Input validation of the Gram family

// ---------------------------------------------------------------------------------------
// Per-sample gradient products, against per-sample gradients materialised in double

void test_sample_products() {
  const int64_t B = 4, L = 6, I = 5, O = 7, rows = 4;
  // Sample 0 right-padded, 1 full, 2 with holes, 3 empty: every path of the row packing.
  const at::Tensor mask =
      at::tensor({1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0}, at::kInt)
          .view({B, L});
  const at::Tensor m = dbl(mask);
  const at::Tensor ids = at::randint(0, rows, {B, L}, at::kLong);
  for (auto dt : {at::kFloat, at::kDouble}) {
    const std::string ctx = dtype_name(dt);
    const at::Tensor a = at::randn({B, L, I}, at::kDouble).to(dt);
    const at::Tensor d = at::randn({B, L, O}, at::kDouble).to(dt);
    const at::Tensor v = at::randn({O, I}, at::kDouble).to(dt);
    // G_b = sum_k m_bk d_bk a_bk^T.
    const at::Tensor G = at::einsum("blo,bli,bl->boi", {dbl(d), dbl(a), m});
    const at::Tensor dots = pyxtask::linear_sample_dots(a, d, v, mask);
    CHECK_MSG(dots.scalar_type() == result_type(dt) && dots.sizes() == at::IntArrayRef({B}),
              ctx << " dots dtype/shape " << dots.scalar_type() << " " << dots.sizes());
    const at::Tensor ref_dots = (G * dbl(v)).sum({1, 2});
    const at::Tensor dot_scale = (G.abs() * dbl(v).abs()).sum({1, 2}) + 1.0;
    CHECK_MSG(max_scaled_err(dots, ref_dots, dot_scale) <= tol_for(dt), ctx << " dots " << dots);
    const at::Tensor ref_sq = G.square().sum({1, 2});
    for (const char* method : {"gram", "materialize", "auto"}) {
      const at::Tensor sq = pyxtask::linear_sample_sq_norms(a, d, mask, method);
      CHECK_MSG(max_scaled_err(sq, ref_sq, ref_sq + 1.0) <= tol_for(dt), ctx << " " << method);
    }
    CHECK_MSG(dbl(pyxtask::linear_sample_sq_norms(a, d, mask, "auto"))[3].item<double>() == 0.0,
              ctx << " a sample with no real position has a nonzero norm");
    // Embedding: G_b[r] = sum_{k: ids_bk = r} m_bk d_bk.
    const at::Tensor table = at::randn({rows, O}, at::kDouble).to(dt);
    const at::Tensor onehot = at::one_hot(ids, rows).to(at::kDouble);  // [B, L, rows]
    const at::Tensor E = at::einsum("blr,blh,bl->brh", {onehot, dbl(d), m});
    const at::Tensor edots = pyxtask::embedding_sample_dots(ids, d, table, mask);
    const at::Tensor esq = pyxtask::embedding_sample_sq_norms(ids, d, mask);
    const at::Tensor ref_edots = (E * dbl(table)).sum({1, 2});
    const at::Tensor ref_esq = E.square().sum({1, 2});
    CHECK_MSG(max_scaled_err(edots, ref_edots, (E.abs() * dbl(table).abs()).sum({1, 2}) + 1.0) <=
                  tol_for(dt),
              ctx << " embedding dots " << edots);
    CHECK_MSG(max_scaled_err(esq, ref_esq, ref_esq + 1.0) <= tol_for(dt),
              ctx << " embedding sq norms " << esq);
  }
  CHECK_THROWS_WITH(pyxtask::linear_sample_dots(at::randn({2, 3}), at::randn({2, 3, 4}),
                                                at::randn({4, 3}), std::nullopt),
                    "pyxtask.linear_sample_dots");
  CHECK_THROWS_WITH(pyxtask::linear_sample_sq_norms(at::randn({2, 3, 4}), at::randn({2, 3, 4}),
                                                    std::nullopt, "fastest"),
                    "pyxtask.linear_sample_sq_norms");
  CHECK_THROWS_WITH(
      pyxtask::embedding_sample_dots(at::full({1, 2}, 5, at::kLong), at::randn({1, 2, 3}),
                                     at::randn({4, 3}), std::nullopt),
      "is not a row of v");
}

void test_bad_inputs() {
  CHECK_THROWS_WITH(pyxtask::gram(at::randn({65, 10})), "pyxtask.gram");
  CHECK_THROWS_WITH(pyxtask::gram(at::ones({3, 10}, at::kInt)), "pyxtask.gram");
  CHECK_THROWS_WITH(pyxtask::gram(at::randn({10})), "pyxtask.gram");
  CHECK_THROWS_WITH(pyxtask::gram(at::randn({2, 3, 4})), "pyxtask.gram");
  at::Tensor nan_g = at::randn({3, 100});
  nan_g[1][50] = std::nan("");
  CHECK_THROWS_WITH(pyxtask::gram(nan_g), "pyxtask.gram");
  CHECK_THROWS_WITH(pyxtask::cross_gram(at::randn({3, 10}), at::randn({3, 11})),
                    "pyxtask.cross_gram");
  CHECK_THROWS_WITH(pyxtask::cross_gram(at::randn({3, 10}), at::randn({3, 10}, at::kDouble)),
                    "pyxtask.cross_gram");
  CHECK_THROWS_WITH(pyxtask::cross_gram(at::randn({65, 10}), at::randn({3, 10})),
                    "pyxtask.cross_gram");
  CHECK_THROWS_WITH(pyxtask::cosine_matrix(at::ones({3, 10}, at::kLong)), "pyxtask.cosine_matrix");
  CHECK_THROWS_WITH(pyxtask::cosine_matrix(at::randn({65, 3})), "pyxtask.cosine_matrix");
}

void run(const char* name, const std::function<void()>& fn) {
  const int before = g_failed;
  try {
    fn();
  } catch (const std::exception& e) {
    ++g_failed;
    std::fprintf(stderr, "%s: unexpected exception: %s\n", name, e.what());
  }
  std::printf("[%s] %s\n", g_failed == before ? " OK " : "FAIL", name);
  std::fflush(stdout);
}

}  // namespace

int main() {
  at::manual_seed(0);
  run("gram", test_gram);
  run("gram_autograd", test_gram_autograd);
  run("cross_gram", test_cross_gram);
  run("cosine_matrix", test_cosine_matrix);
  run("gather_flat/scatter_combination", test_gather_scatter);
  run("add_scaled_", test_add_scaled);
  run("mirror_descent_step", test_mirror_descent);
  run("min_norm_point", test_min_norm_point);
  run("sample_products", test_sample_products);
  run("bad_inputs", test_bad_inputs);
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
