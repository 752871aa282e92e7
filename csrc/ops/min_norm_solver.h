// min_norm_point: argmin over the probability simplex of lambda^T M lambda, for a T x T Gram
// matrix M (MGDA's min-norm element, MetaWeighting's Alg. 2).
//
// Methods:
//  - kPlain:    MetaWeighting Alg. 2 as printed: start at the simplex centre, move toward
//               the vertex with the smallest (M lambda)_i with exact line search. Sublinear:
//               it zig-zags near faces and stalls far from the optimum when the minimiser
//               lies inside a face.
//  - kAway:     the same plus away steps (Lacoste-Julien & Jaggi, 2015): when moving away
//               from the worst vertex of the support reduces the objective faster, do that,
//               possibly dropping the vertex. Converges linearly.
//  - kPairwise: mass moves from the worst support vertex to the best vertex directly.
// Away and pairwise also take, every T iterations and whenever the support has changed, an
// affine step on the support (Wolfe's 1976 "major cycle", see affine_support_step): Frank-
// Wolfe finds the support fast but converges slowly inside it, the affine step lands on the
// exact minimiser in one solve. T = 2 uses the closed form. Stopping rule: every coordinate
// satisfies the KKT conditions to within tol * max_i M_ii: (M lambda)_i >= lambda^T M lambda - tol'
// for all i, and (M lambda)_i <= lambda^T M lambda + tol' on the support (the latter not for
// kPlain, whose iterate keeps every vertex it ever touched).
#pragma once

// The min-norm solver itself, free of ATen so that the CPU kernel, the CUDA kernel (one
// device thread runs it: T <= 64, and identical iterates on both devices matter more than
// a parallel scan over 64 numbers) and the C++ tests share one implementation.
//
// Identical iterates need two things the compilers don't give by default:
//  - No contraction of a * b + c into an FMA (one rounding instead of two): nvcc contracts
//    by default (--fmad=true, and ptxas again on PTX's plain mul/add), GCC wherever the
//    target has FMA (-mfma, aarch64), clang within an expression. Every addition,
//    subtraction and multiplication goes through add_rn / sub_rn / mul_rn: __dadd_rn /
//    __dsub_rn / __dmul_rn on the device (PTX add.rn / sub.rn / mul.rn, which neither
//    compiler contracts, whatever the flags), plain operators on the host, where
//    contraction is switched off for this header below. Divisions (div.rn) and comparisons
//    are exact or correctly rounded on both.
//  - No per-thread arrays on the device: the 65 x 65 KKT matrix and the work vectors would
//    be a 36 KB stack frame, and the driver reserves local memory for every thread that can
//    be resident (about 10 GB on an H100) at the kernel's first launch. They live in a
//    MinNormScratch the caller provides: __shared__ in the CUDA kernel, the stack on the CPU.

#include <math.h>

#include <cstdint>

#ifdef __CUDACC__
#define PYX_HD __host__ __device__
#else
#define PYX_HD
#endif

// (Only for host compilers proper: under nvcc the solver's host copy never runs, and its
// front end does not know the GCC pragma.)
#if !defined(__CUDACC__)
#if defined(__clang__)
#pragma float_control(push)
#pragma clang fp contract(off)
#define PYX_MIN_NORM_POP_CLANG 1
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#define PYX_MIN_NORM_POP_GCC 1
#endif
#endif

namespace pyxtask::detail {

constexpr int64_t kMinNormMaxTasks = 64;

enum class MinNormMethod : int { kAway = 0, kPairwise = 1, kPlain = 2 };

// The solver's work arrays (36 KB): shared memory on the device, see above.
struct MinNormScratch {
  double A[(kMinNormMaxTasks + 1) * (kMinNormMaxTasks + 1)];  // the KKT system, row-major
  double x[kMinNormMaxTasks + 1];
  double u[kMinNormMaxTasks];  // M lam
  double before[kMinNormMaxTasks];
  double after[kMinNormMaxTasks];
  int64_t idx[kMinNormMaxTasks];  // the support
};

// Correctly rounded double operations that no compiler fuses into an FMA.
PYX_HD inline double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
PYX_HD inline double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
PYX_HD inline double sub_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

PYX_HD inline double min_of(double a, double b) { return b < a ? b : a; }
PYX_HD inline double max_of(double a, double b) { return a < b ? b : a; }
PYX_HD inline double clamp_of(double v, double lo, double hi) { return min_of(max_of(v, lo), hi); }
PYX_HD inline void swap_of(double& a, double& b) {
  const double t = a;
  a = b;
  b = t;
}

// Affine step on the support (Wolfe's "major cycle"): the minimiser of lam^T M lam over the
// affine hull of the support, from the KKT system [M_SS 1; 1^T 0][x; nu] = [0; 1], solved by
// Gaussian elimination with partial pivoting. Moving from lam toward x decreases the
// objective monotonically (it is convex along the segment with its minimum at x), so the
// step goes as far toward x as the simplex allows, dropping the first coordinate that hits
// zero when x itself is infeasible. Returns false when the system is numerically singular
// (affinely dependent support), leaving lam unchanged. Frank-Wolfe identifies the support
// quickly but converges slowly inside it; this step finishes the job exactly.
PYX_HD inline bool affine_support_step(const double* M, int64_t T, double scale, double* lam,
                                       MinNormScratch& ws) {
  int64_t* idx = ws.idx;
  int64_t k = 0;
  for (int64_t i = 0; i < T; ++i)
    if (lam[i] > 0) idx[k++] = i;
  if (k < 2) return false;
  const int64_t n = k + 1;
  double* A = ws.A;
  double* x = ws.x;
  for (int64_t r = 0; r < k; ++r) {
    for (int64_t c = 0; c < k; ++c) A[r * n + c] = M[idx[r] * T + idx[c]];
    // A support of more than rank(M) + 1 vertices is affinely dependent and M_SS singular;
    // a ridge of 1e-13 * scale makes the minimiser unique while moving the objective by at
    // most that much.
    A[r * n + r] = add_rn(A[r * n + r], mul_rn(1e-13, scale));
    A[r * n + k] = scale;  // the constraint rows are scaled like M for a balanced pivot
    A[k * n + r] = scale;
    x[r] = 0;
  }
  A[k * n + k] = 0;
  x[k] = scale;
  for (int64_t c = 0; c < n; ++c) {
    int64_t piv = c;
    for (int64_t r = c + 1; r < n; ++r)
      if (fabs(A[r * n + c]) > fabs(A[piv * n + c])) piv = r;
    if (!(fabs(A[piv * n + c]) > mul_rn(1e-13, scale))) return false;
    if (piv != c) {
      for (int64_t j = 0; j < n; ++j) swap_of(A[c * n + j], A[piv * n + j]);
      swap_of(x[c], x[piv]);
    }
    for (int64_t r = c + 1; r < n; ++r) {
      const double f = A[r * n + c] / A[c * n + c];
      if (f == 0) continue;
      for (int64_t j = c; j < n; ++j) A[r * n + j] = sub_rn(A[r * n + j], mul_rn(f, A[c * n + j]));
      x[r] = sub_rn(x[r], mul_rn(f, x[c]));
    }
  }
  for (int64_t r = n - 1; r >= 0; --r) {
    double acc = x[r];
    for (int64_t j = r + 1; j < n; ++j) acc = sub_rn(acc, mul_rn(A[r * n + j], x[j]));
    x[r] = acc / A[r * n + r];
  }
  // Largest step theta in (0, 1] along x - lam that keeps every coordinate >= 0.
  double theta = 1;
  int64_t drop = -1;
  for (int64_t r = 0; r < k; ++r) {
    const double from = lam[idx[r]];
    if (x[r] < 0 && from / sub_rn(from, x[r]) < theta) {
      theta = from / sub_rn(from, x[r]);
      drop = r;
    }
  }
  auto objective = [&](const double* l) {
    double f = 0;
    for (int64_t r = 0; r < k; ++r) {
      double row = 0;
      for (int64_t c = 0; c < k; ++c) row = add_rn(row, mul_rn(M[idx[r] * T + idx[c]], l[c]));
      f = add_rn(f, mul_rn(l[r], row));
    }
    return f;
  };
  double* before = ws.before;
  double* after = ws.after;
  double sum = 0;
  for (int64_t r = 0; r < k; ++r) {
    before[r] = lam[idx[r]];
    const double v = add_rn(before[r], mul_rn(theta, sub_rn(x[r], before[r])));
    after[r] = (r == drop || v < 0) ? 0.0 : v;
    sum = add_rn(sum, after[r]);
  }
  for (int64_t r = 0; r < k; ++r) after[r] /= sum;
  // The ridge (and rounding) can make the step a hair worse: keep it only if it helps.
  if (!(objective(after) < objective(before))) return false;
  for (int64_t r = 0; r < k; ++r) lam[idx[r]] = after[r];
  return true;
}

// The solver proper, on a row-major double matrix; lam receives the result, ws is the work
// space. Shared by the CPU and CUDA kernels and the C++ tests. Returns the number of
// iterations run.
PYX_HD inline int64_t solve_min_norm(const double* M, int64_t T, int64_t max_iter, double tol,
                                     MinNormMethod method, double* lam, MinNormScratch& ws) {
  if (T == 1) {
    lam[0] = 1;
    return 0;
  }
  if (T == 2) {
    // f(g) = g^2 (M00 + M11 - 2 M01) + 2 g (M01 - M11) + M11, minimised on [0, 1].
    const double den = sub_rn(add_rn(M[0], M[3]), mul_rn(2, M[1]));
    const double g = den > 0 ? clamp_of(sub_rn(M[3], M[1]) / den, 0.0, 1.0) : 0.5;
    lam[0] = g;
    lam[1] = sub_rn(1, g);
    return 0;
  }
  double scale = 0;
  for (int64_t i = 0; i < T; ++i) scale = max_of(scale, M[i * T + i]);
  for (int64_t i = 0; i < T; ++i) lam[i] = 1.0 / static_cast<double>(T);
  if (!(scale > 0)) return 0;  // M = 0: every point is optimal
  const double tol_abs = mul_rn(tol, scale);
  double* u = ws.u;  // u = M lam, updated incrementally, recomputed every T steps
  auto refresh = [&] {
    double s = 0;
    for (int64_t i = 0; i < T; ++i) s = add_rn(s, lam[i]);
    for (int64_t i = 0; i < T; ++i) lam[i] /= s;
    for (int64_t i = 0; i < T; ++i) {
      double acc = 0;
      for (int64_t j = 0; j < T; ++j) acc = add_rn(acc, mul_rn(M[i * T + j], lam[j]));
      u[i] = acc;
    }
  };
  refresh();
  // Support signature at the last affine step: no point repeating it on the same support.
  uint64_t polished = ~0ULL;
  const bool polish = method != MinNormMethod::kPlain;
  int64_t it = 0;
  for (; it < max_iter; ++it) {
    if (it % T == T - 1) {
      if (polish) {
        uint64_t support = 0;  // T <= 64: one bit per vertex
        for (int64_t i = 0; i < T; ++i)
          if (lam[i] > 0) support |= 1ULL << i;
        if (support != polished) {
          affine_support_step(M, T, scale, lam, ws);
          polished = support;
        }
      }
      refresh();
    }
    double f = 0;
    int64_t s = 0, a = -1;
    for (int64_t i = 0; i < T; ++i) {
      f = add_rn(f, mul_rn(lam[i], u[i]));
      if (u[i] < u[s]) s = i;
      if (lam[i] > 0 && (a < 0 || u[i] > u[a])) a = i;
    }
    const double fw_gap = sub_rn(f, u[s]);
    const double away_gap = sub_rn(u[a], f);
    if (a < 0) break;  // no positive coordinate: only reachable with non-finite M
    if (method == MinNormMethod::kPlain ? fw_gap <= tol_abs : sub_rn(u[a], u[s]) <= tol_abs) break;
    const double* Ms = M + s * T;
    const double* Ma = M + a * T;
    if (method == MinNormMethod::kPairwise) {
      // d = e_s - e_a
      const double slope = sub_rn(u[s], u[a]);
      const double curv = add_rn(sub_rn(M[s * T + s], mul_rn(2, M[s * T + a])), M[a * T + a]);
      const double g_max = lam[a];
      const double g = curv > 0 ? min_of(g_max, -slope / curv) : g_max;
      for (int64_t i = 0; i < T; ++i) u[i] = add_rn(u[i], mul_rn(g, sub_rn(Ms[i], Ma[i])));
      lam[s] = add_rn(lam[s], g);
      lam[a] = g >= g_max ? 0.0 : sub_rn(lam[a], g);
    } else if (method == MinNormMethod::kPlain || fw_gap >= away_gap) {
      // d = e_s - lam
      const double slope = sub_rn(u[s], f);
      const double curv = add_rn(sub_rn(M[s * T + s], mul_rn(2, u[s])), f);
      const double g = curv > 0 ? min_of(1.0, -slope / curv) : 1.0;
      for (int64_t i = 0; i < T; ++i) {
        u[i] = add_rn(mul_rn(sub_rn(1, g), u[i]), mul_rn(g, Ms[i]));
        lam[i] = mul_rn(lam[i], sub_rn(1, g));
      }
      lam[s] = add_rn(lam[s], g);
    } else {
      // d = lam - e_a; the step that empties vertex a is g_max.
      const double slope = sub_rn(f, u[a]);
      const double curv = add_rn(sub_rn(f, mul_rn(2, u[a])), M[a * T + a]);
      const double g_max = lam[a] / sub_rn(1, lam[a]);
      const double g = curv > 0 ? min_of(g_max, -slope / curv) : g_max;
      for (int64_t i = 0; i < T; ++i) {
        u[i] = sub_rn(mul_rn(add_rn(1, g), u[i]), mul_rn(g, Ma[i]));
        lam[i] = mul_rn(lam[i], add_rn(1, g));
      }
      lam[a] = g >= g_max ? 0.0 : sub_rn(lam[a], g);
    }
    for (int64_t i = 0; i < T; ++i) lam[i] = max_of(lam[i], 0.0);
  }
  refresh();
  return it;
}

}  // namespace pyxtask::detail

#ifdef PYX_MIN_NORM_POP_CLANG
#pragma float_control(pop)
#undef PYX_MIN_NORM_POP_CLANG
#endif
#ifdef PYX_MIN_NORM_POP_GCC
#pragma GCC pop_options
#undef PYX_MIN_NORM_POP_GCC
#endif
