// Solvers on a T x T Gram matrix M = J J^T (T <= 64) behind the gram_solvers ops, free of
// ATen so that the CPU kernel, the CUDA kernel and the C++ tests share one implementation.
//
//  - dual_cone_solve: min_v v^T M v s.t. v >= u, the dual of projecting J^T u onto the dual
//    cone of the rows of J (Quinton & Rakotomamonjy 2024, Prop. 1). With v = u + x it is a
//    non-negative least-squares problem in Gram form, solved exactly by Lawson-Hanson.
//  - nash_solve: alpha > 0 with (M alpha)_i = 1 / alpha_i (Navon et al. 2022, Thm 3.1). These
//    are the stationarity conditions of the strictly convex, self-concordant
//        f(alpha) = 1/2 alpha^T M alpha - sum_i log alpha_i,
//    minimised by damped Newton (Nesterov & Nemirovski's step 1 / (1 + lambda)), which
//    converges from any start when f is bounded below.
//  - cagrad_solve: CAGrad's w* = argmin_{w in simplex} w^T M b + s sqrt(w^T M w) (Liu et al.
//    2021, Sec. 3). Writing sqrt(a) = min_mu a / (2 mu) + mu / 2 turns it into a 1-D root
//    search over kappa = mu / s, each step a min-norm point of the shifted gradients
//    g_i + kappa g0 (a Lawson-Hanson NNLS on the lifted points (g_i + kappa g0, 1)).
//
// Every array the solvers touch beyond scalars lives in caller-provided workspaces (the
// *_dwork / *_iwork sizes below): on the GPU they are a slice of a global scratch tensor,
// never per-thread stack arrays.
#pragma once

#include <math.h>

#include <cstdint>

#include "min_norm_solver.h"  // PYX_HD, min_of, max_of

namespace pyxtask::detail {

constexpr int64_t kGramSolverMaxTasks = 64;

// Workspace sizes, in doubles and ints, of each solver for T tasks.
PYX_HD inline int64_t nnls_dwork(int64_t T) { return T * T + 7 * T; }
PYX_HD inline int64_t nnls_iwork(int64_t T) { return 2 * T; }
PYX_HD inline int64_t dual_cone_dwork(int64_t T) { return nnls_dwork(T) + 4 * T; }
PYX_HD inline int64_t dual_cone_iwork(int64_t T) { return nnls_iwork(T); }
PYX_HD inline int64_t nash_dwork(int64_t T) { return T * T + 7 * T; }
PYX_HD inline int64_t nash_iwork(int64_t T) { return T; }
PYX_HD inline int64_t cagrad_dwork(int64_t T) { return T * T + nnls_dwork(T) + 6 * T; }
PYX_HD inline int64_t cagrad_iwork(int64_t T) { return nnls_iwork(T); }

// Cholesky factor L (k x k, row-major, lower) of D Q_SS D + ridge I, with S = idx[0..k) and
// D = diag(d). The Jacobi scaling d_r = 1 / sqrt(Q_rr) makes the factorisation blind to how
// the tasks' gradient norms differ. False when a pivot is not positive.
PYX_HD inline bool scaled_cholesky(const double* Q, int64_t T, const int* idx, int64_t k,
                                   const double* d, double ridge, double* L) {
  for (int64_t r = 0; r < k; ++r) {
    for (int64_t c = 0; c <= r; ++c) {
      double acc = Q[idx[r] * T + idx[c]] * d[r] * d[c] + (r == c ? ridge : 0.0);
      for (int64_t j = 0; j < c; ++j) acc -= L[r * k + j] * L[c * k + j];
      if (r == c) {
        if (!(acc > 0)) return false;
        L[r * k + r] = sqrt(acc);
      } else {
        L[r * k + c] = acc / L[c * k + c];
      }
    }
  }
  return true;
}

// y <- (L L^T)^{-1} y.
PYX_HD inline void cholesky_solve(const double* L, int64_t k, double* y) {
  for (int64_t r = 0; r < k; ++r) {
    double acc = y[r];
    for (int64_t j = 0; j < r; ++j) acc -= L[r * k + j] * y[j];
    y[r] = acc / L[r * k + r];
  }
  for (int64_t r = k - 1; r >= 0; --r) {
    double acc = y[r];
    for (int64_t j = r + 1; j < k; ++j) acc -= L[j * k + r] * y[j];
    y[r] = acc / L[r * k + r];
  }
}

// x (k) solving Q_SS x = rhs for a PSD Q_SS (Q_rr > 0) and a consistent rhs, possibly
// singular: iterated Tikhonov on the scaled system. The ridge only has to beat rounding
// (the scaled matrix has a unit diagonal); each refinement step against the unregularised
// Q_SS shrinks the error by ridge / (ridge + eigenvalue), so the components that matter
// converge in a step or two, and the iteration stops as soon as the residual stops
// shrinking. work: k * k + 3 k doubles.
PYX_HD inline void solve_principal(const double* Q, int64_t T, const int* idx, int64_t k,
                                   const double* rhs, double* x, double* work) {
  double* L = work;
  double* d = L + k * k;
  double* r = d + k;
  double* y = r + k;
  for (int64_t i = 0; i < k; ++i) {
    d[i] = 1.0 / sqrt(Q[idx[i] * T + idx[i]]);
    x[i] = 0;
  }
  double ridge = 1e-13;
  while (!scaled_cholesky(Q, T, idx, k, d, ridge, L) && ridge < 1) ridge *= 100;
  double last = INFINITY;
  for (int pass = 0; pass < 8; ++pass) {
    double norm = 0;
    for (int64_t a = 0; a < k; ++a) {
      double acc = rhs[a];
      for (int64_t b = 0; b < k; ++b) acc -= Q[idx[a] * T + idx[b]] * x[b];
      r[a] = acc;
      norm = max_of(norm, fabs(acc) * d[a]);
    }
    if (!(norm < last)) {
      for (int64_t a = 0; a < k; ++a) x[a] -= y[a];  // the last step did not help: undo it
      return;
    }
    last = norm;
    if (norm == 0) return;
    for (int64_t a = 0; a < k; ++a) y[a] = r[a] * d[a];
    cholesky_solve(L, k, y);
    for (int64_t a = 0; a < k; ++a) {
      y[a] *= d[a];
      x[a] += y[a];
    }
  }
}

// Relative KKT residual of x >= 0 for min 1/2 x^T Q x + q^T x, given the gradient g = Q x + q:
// the largest violation of g_i >= 0 (and of g_i = 0 where x_i > 0), each divided by gs_i,
// the size rounding gives g_i (see nnls_gram).
PYX_HD inline double nnls_residual(int64_t T, const double* x, const double* g, const double* gs) {
  double res = 0;
  for (int64_t i = 0; i < T; ++i) {
    const double viol = x[i] > 0 ? fabs(g[i]) : max_of(-g[i], 0.0);
    if (viol > 0) res = max_of(res, gs[i] > 0 ? viol / gs[i] : INFINITY);
  }
  return res;
}

// g = Q x + q and gs_i = sqrt(Q_ii) sum_j sqrt(Q_jj) |x_j| + qs_i, a bound on |Q_ij x_j| summed
// (Cauchy-Schwarz, Q being a Gram matrix) plus the caller's size of q_i: rounding in g_i is
// a few ulps of gs_i, so g_i / gs_i is a residual that no rescaling of the tasks changes.
PYX_HD inline void nnls_gradient(const double* Q, int64_t T, const double* q, const double* qs,
                                 const double* x, double* g, double* gs) {
  double mass = 0;
  for (int64_t j = 0; j < T; ++j) mass += sqrt(max_of(Q[j * T + j], 0.0)) * fabs(x[j]);
  for (int64_t i = 0; i < T; ++i) {
    double acc = q[i];
    for (int64_t j = 0; j < T; ++j) acc += Q[i * T + j] * x[j];
    g[i] = acc;
    gs[i] = sqrt(max_of(Q[i * T + i], 0.0)) * mass + qs[i];
  }
}

// Projected Gauss-Seidel sweeps: the fallback when Lawson-Hanson has not finished in
// max_iter outer steps (rounding can make it cycle on nearly dependent columns). Coordinate
// descent on a convex bound-constrained QP cannot cycle; it is slow but only polishes.
PYX_HD inline void nnls_sweeps(const double* Q, int64_t T, const double* q, int64_t sweeps,
                               double* x) {
  for (int64_t s = 0; s < sweeps; ++s) {
    for (int64_t i = 0; i < T; ++i) {
      const double qii = Q[i * T + i];
      if (!(qii > 0)) continue;
      double gi = q[i];
      for (int64_t j = 0; j < T; ++j) gi += Q[i * T + j] * x[j];
      x[i] = max_of(x[i] - gi / qii, 0.0);
    }
  }
}

// One Lawson-Hanson inner loop after column j joined the passive set (state 1): solve the
// unconstrained problem on the passive set, and while that leaves a coordinate <= 0, move
// toward it as far as feasibility allows and free the coordinates that hit zero. Returns
// false (and excludes j, state 2) when j's own coordinate comes out <= 0 at once: in exact
// arithmetic it cannot, so j's column is numerically in the span of the others.
PYX_HD inline bool nnls_inner(const double* Q, int64_t T, const double* q, int64_t j, double* x,
                              int* state, int* idx, double* z, double* rhs, double* work) {
  for (int64_t round = 0; round <= T; ++round) {
    int64_t k = 0, pos = -1;
    for (int64_t i = 0; i < T; ++i) {
      if (state[i] != 1) continue;
      if (i == j) pos = k;
      rhs[k] = -q[i];
      idx[k++] = static_cast<int>(i);
    }
    if (k == 0) return true;
    solve_principal(Q, T, idx, k, rhs, z, work);
    if (round == 0 && pos >= 0 && !(z[pos] > 0)) {
      state[j] = 2;
      return false;
    }
    double step = 1;
    for (int64_t a = 0; a < k; ++a) {
      const double from = x[idx[a]];
      if (!(z[a] > 0) && from / (from - z[a]) < step) step = from / (from - z[a]);
    }
    if (step >= 1) {
      for (int64_t a = 0; a < k; ++a) x[idx[a]] = z[a];
      return true;
    }
    for (int64_t a = 0; a < k; ++a) {
      const int64_t i = idx[a];
      const double from = x[i];
      x[i] = from + step * (z[a] - from);
      if (!(z[a] > 0) && (x[i] <= 0 || from / (from - z[a]) <= step)) {
        x[i] = 0;
        state[i] = 0;
      }
    }
  }
  return true;
}

// min over x >= 0 of 1/2 x^T Q x + q^T x for a PSD Gram matrix Q and q in the range of Q
// (so the problem is bounded): Lawson-Hanson (1974, Ch. 23) on the normal equations, exact
// in finitely many steps; Projected Gauss-Seidel polishes if max_iter outer steps do not
// finish. qs: the size of each q_i (for the residual). Writes x and g = Q x + q; returns the
// relative KKT residual (nnls_residual). dwork: nnls_dwork(T), iwork: nnls_iwork(T).
PYX_HD inline double nnls_gram(const double* Q, int64_t T, const double* q, const double* qs,
                               int64_t max_iter, double tol, double* x, double* g, double* dwork,
                               int* iwork) {
  double* gs = dwork;
  double* z = gs + T;
  double* rhs = z + T;
  double* best = rhs + T;
  double* work = best + T;  // T * T + 3 T
  int* idx = iwork;
  int* state = idx + T;  // 0: at the bound, 1: passive (free), 2: excluded for this step
  for (int64_t i = 0; i < T; ++i) {
    x[i] = 0;
    state[i] = 0;
  }
  nnls_gradient(Q, T, q, qs, x, g, gs);
  int64_t it = 0;
  for (; it < max_iter; ++it) {
    int64_t j = -1;
    double worst = tol;
    for (int64_t i = 0; i < T; ++i) {
      if (state[i] != 0 || !(gs[i] > 0)) continue;
      if (-g[i] > worst * gs[i]) {
        worst = -g[i] / gs[i];
        j = i;
      }
    }
    if (j < 0) break;
    state[j] = 1;
    if (!nnls_inner(Q, T, q, j, x, state, idx, z, rhs, work)) continue;
    for (int64_t i = 0; i < T; ++i)
      if (state[i] == 2) state[i] = 0;  // x moved: excluded columns get another chance
    nnls_gradient(Q, T, q, qs, x, g, gs);
  }
  double res = nnls_residual(T, x, g, gs);
  if (it < max_iter || res <= tol) return res;
  for (int64_t i = 0; i < T; ++i) best[i] = x[i];
  nnls_sweeps(Q, T, q, max_iter, x);
  nnls_gradient(Q, T, q, qs, x, g, gs);
  const double polished = nnls_residual(T, x, g, gs);
  if (polished <= res) return polished;
  for (int64_t i = 0; i < T; ++i) x[i] = best[i];
  nnls_gradient(Q, T, q, qs, x, g, gs);
  return res;
}

// v = argmin v^T M v s.t. v >= u, M symmetric PSD. Returns the relative KKT residual:
// the largest violation of (M v)_i >= 0, and of (M v)_i = 0 where v_i > u_i, each divided by
// sqrt(M_ii) sum_j sqrt(M_jj) (|u_j| + |v_j - u_j|). dwork: dual_cone_dwork(T).
PYX_HD inline double dual_cone_solve(const double* M, int64_t T, const double* u, int64_t max_iter,
                                     double tol, double* v, double* dwork, int* iwork) {
  double* q = dwork;
  double* qs = q + T;
  double* x = qs + T;
  double* g = x + T;
  double mass = 0;
  for (int64_t j = 0; j < T; ++j) mass += sqrt(max_of(M[j * T + j], 0.0)) * fabs(u[j]);
  for (int64_t i = 0; i < T; ++i) {
    double acc = 0;
    for (int64_t j = 0; j < T; ++j) acc += M[i * T + j] * u[j];
    q[i] = acc;
    qs[i] = sqrt(max_of(M[i * T + i], 0.0)) * mass;
  }
  const double res = nnls_gram(M, T, q, qs, max_iter, tol, x, g, g + T, iwork);
  for (int64_t i = 0; i < T; ++i) v[i] = u[i] + x[i];
  return res;
}

// ---------------------------------------------------------------------------------------
// Nash bargaining.

// max_i |alpha_i ((M + diag(ridge)) alpha)_i - 1|: zero exactly at the solution, and blind to
// rescaling M or any one task (alpha_i (M alpha)_i is invariant under both).
PYX_HD inline double nash_residual(const double* M, int64_t T, const double* ridge,
                                   const double* alpha, double* Ma) {
  double res = 0;
  for (int64_t i = 0; i < T; ++i) {
    double acc = ridge[i] * alpha[i];
    for (int64_t j = 0; j < T; ++j) acc += M[i * T + j] * alpha[j];
    Ma[i] = acc;
    res = max_of(res, fabs(alpha[i] * acc - 1));
  }
  return res;
}

// alpha scaled by t > 0 minimising f along its ray (t^2 = T / alpha^T A alpha); returns f there,
// or +inf when alpha is not a valid start (a zero or negative entry, or alpha^T A alpha <= 0).
PYX_HD inline double nash_ray_scale(const double* M, int64_t T, const double* ridge,
                                    double* alpha) {
  double quad = 0, logs = 0;
  for (int64_t i = 0; i < T; ++i) {
    if (!(alpha[i] > 0) || !(alpha[i] < INFINITY)) return INFINITY;
    double acc = ridge[i] * alpha[i];
    for (int64_t j = 0; j < T; ++j) acc += M[i * T + j] * alpha[j];
    quad += alpha[i] * acc;
    logs += log(alpha[i]);
  }
  if (!(quad > 0)) return INFINITY;
  const double t = sqrt(static_cast<double>(T) / quad);
  for (int64_t i = 0; i < T; ++i) alpha[i] *= t;
  return 0.5 * static_cast<double>(T) - logs - static_cast<double>(T) * log(t);
}

// Damped Newton on f for A = M + diag(ridge), from alpha. True when it converged (residual
// <= tol, or stalled at the rounding floor in the quadratic phase); false when max_iter
// steps left it in the damped phase: f is then (numerically) unbounded below, i.e. no
// solution. Newton's iterates do not depend on how the tasks are scaled (it is affine
// invariant), and the Jacobi-scaled factorisation keeps that true in floating point.
PYX_HD inline bool nash_newton(const double* M, int64_t T, const double* ridge, int64_t max_iter,
                               double tol, double* alpha, double* dwork, int* iwork) {
  double* L = dwork;
  double* d = L + T * T;
  double* grad = d + T;
  double* step = grad + T;
  double* Ma = step + T;
  double* H = Ma + T;  // the diagonal of the Hessian; its off-diagonal part is M's
  int* idx = iwork;
  for (int64_t i = 0; i < T; ++i) idx[i] = static_cast<int>(i);
  double last = INFINITY;
  int64_t full_steps = 0;
  for (int64_t it = 0; it < max_iter; ++it) {
    const double res = nash_residual(M, T, ridge, alpha, Ma);
    if (res <= tol) return true;
    if (full_steps >= 2 && !(res < 0.5 * last)) return true;  // rounding floor
    last = res;
    for (int64_t i = 0; i < T; ++i) {
      grad[i] = Ma[i] - 1.0 / alpha[i];
      H[i] = M[i * T + i] + ridge[i] + 1.0 / (alpha[i] * alpha[i]);
      d[i] = 1.0 / sqrt(H[i]);
    }
    // The Hessian M + diag(ridge + 1 / alpha^2), Jacobi-scaled, factored in place of
    // scaled_cholesky (which would read its diagonal from M).
    double ridge_scaled = 0;
    bool ok = false;
    for (int attempt = 0; attempt < 8 && !ok; ++attempt) {
      ok = true;
      for (int64_t r = 0; r < T && ok; ++r) {
        for (int64_t c = 0; c <= r; ++c) {
          double acc = (r == c ? H[r] : M[r * T + c]) * d[r] * d[c] + (r == c ? ridge_scaled : 0);
          for (int64_t j = 0; j < c; ++j) acc -= L[r * T + j] * L[c * T + j];
          if (r == c) {
            if (!(acc > 0)) {
              ok = false;
              break;
            }
            L[r * T + r] = sqrt(acc);
          } else {
            L[r * T + c] = acc / L[c * T + c];
          }
        }
      }
      ridge_scaled = ridge_scaled == 0 ? 1e-14 : ridge_scaled * 100;
    }
    if (!ok) return false;
    for (int64_t i = 0; i < T; ++i) step[i] = -grad[i] * d[i];
    cholesky_solve(L, T, step);
    double lam2 = 0;
    for (int64_t i = 0; i < T; ++i) {
      step[i] *= d[i];
      lam2 -= grad[i] * step[i];
    }
    const double lam = sqrt(max_of(lam2, 0.0));
    // Damped phase: 1 / (1 + lambda) keeps alpha inside the Dikin ellipsoid, hence > 0.
    const double t = lam > 0.25 ? 1.0 / (1.0 + lam) : 1.0;
    full_steps = t == 1.0 ? full_steps + 1 : 0;
    // The clamp only guards against rounding at the ellipsoid's edge.
    for (int64_t i = 0; i < T; ++i) alpha[i] = max_of(alpha[i] + t * step[i], 1e-3 * alpha[i]);
  }
  return full_steps > 0 && nash_residual(M, T, ridge, alpha, Ma) <= sqrt(tol);
}

// Starting point: alpha_i = 1 / sqrt(A_ii), the solution when the gradients are orthogonal,
// scaled along its ray; a warm start `init` (may be null) replaces it when its own ray
// optimum has the lower f. Returns false when no start is valid (a zero diagonal entry).
PYX_HD inline bool nash_start(const double* M, int64_t T, const double* ridge, const double* init,
                              double* alpha, double* tmp) {
  for (int64_t i = 0; i < T; ++i) {
    const double a = M[i * T + i] + ridge[i];
    alpha[i] = a > 0 ? 1.0 / sqrt(a) : 0.0;
  }
  const double f = nash_ray_scale(M, T, ridge, alpha);
  if (init != nullptr) {
    for (int64_t i = 0; i < T; ++i) tmp[i] = init[i];
    if (nash_ray_scale(M, T, ridge, tmp) < f) {
      for (int64_t i = 0; i < T; ++i) alpha[i] = tmp[i];
      return true;
    }
  }
  return f < INFINITY;
}

// Relative ridge of the fallback: M + eps diag(max(M_ii, eps max_j M_jj)) keeps the task
// scaling invariance (it is one private gradient direction per task, of norm sqrt(eps)
// times the task's own) and makes f coercive.
constexpr double kNashFallbackRidge = 1e-8;

// alpha > 0 with M alpha = 1 / alpha, for a symmetric PSD M. A solution exists (and is
// unique) iff no non-negative combination of the gradients is zero, i.e. the minimum norm
// of their convex hull is positive. When Newton finds none, alpha solves instead
// (M + eps diag(max(M_ii, eps max M_jj))) alpha = 1 / alpha (eps = 1e-8); the residual is
// always measured on M itself, so it is then of order one. M = 0 gives alpha = 1 and
// residual 1. Returns max_i |alpha_i (M alpha)_i - 1|. init: a warm start or null.
PYX_HD inline double nash_solve(const double* M, int64_t T, const double* init, int64_t max_iter,
                                double tol, double* alpha, double* dwork, int* iwork) {
  double* ridge = dwork;
  double* Ma = ridge + T;
  double* work = Ma + T;  // T * T + 4 T
  double top = 0;
  for (int64_t i = 0; i < T; ++i) {
    ridge[i] = 0;
    top = max_of(top, M[i * T + i]);
  }
  if (!(top > 0)) {
    for (int64_t i = 0; i < T; ++i) alpha[i] = 1;
    return nash_residual(M, T, ridge, alpha, Ma);
  }
  const bool solved = nash_start(M, T, ridge, init, alpha, Ma) &&
                      nash_newton(M, T, ridge, max_iter, tol, alpha, work, iwork);
  if (!solved) {
    const double eps = kNashFallbackRidge;
    for (int64_t i = 0; i < T; ++i) ridge[i] = eps * max_of(M[i * T + i], eps * top);
    nash_start(M, T, ridge, nullptr, alpha, Ma);
    nash_newton(M, T, ridge, max_iter, tol, alpha, work, iwork);
    for (int64_t i = 0; i < T; ++i) ridge[i] = 0;
  }
  return nash_residual(M, T, ridge, alpha, Ma);
}

// ---------------------------------------------------------------------------------------
// CAGrad.

// The min-norm point of conv{g_i + kappa g0} (g0 = J^T b) as simplex weights w, via the NNLS
// projection of (0, 1) onto the cone of the lifted points (g_i + kappa g0, 1). Returns
// w^T M w = ||J^T w||^2. p = M b, G = b^T M b. Q: T * T doubles.
PYX_HD inline double cagrad_shifted_min_norm(const double* M, int64_t T, const double* p, double G,
                                             double kappa, int64_t max_iter, double tol, double* w,
                                             double* Q, double* dwork, int* iwork) {
  double* q = dwork;
  double* qs = q + T;
  double* g = qs + T;
  double* nn = g + T;
  double lift = 0;
  for (int64_t i = 0; i < T; ++i)
    lift = max_of(lift, M[i * T + i] + 2 * kappa * p[i] + kappa * kappa * G);
  if (!(lift > 0)) lift = 1;
  for (int64_t i = 0; i < T; ++i) {
    for (int64_t j = 0; j < T; ++j)
      Q[i * T + j] = M[i * T + j] + kappa * (p[i] + p[j]) + kappa * kappa * G + lift;
    q[i] = -lift;
    qs[i] = lift;
  }
  nnls_gram(Q, T, q, qs, max_iter, tol, w, g, nn, iwork);
  double sum = 0;
  for (int64_t i = 0; i < T; ++i) sum += w[i];
  if (!(sum > 0)) {  // only with a degenerate lift; the centre is a valid point
    for (int64_t i = 0; i < T; ++i) w[i] = 1.0 / static_cast<double>(T);
    sum = 1;
  }
  double a = 0;
  for (int64_t i = 0; i < T; ++i) w[i] /= sum;
  for (int64_t i = 0; i < T; ++i) {
    double acc = 0;
    for (int64_t j = 0; j < T; ++j) acc += M[i * T + j] * w[j];
    a += w[i] * acc;
  }
  return max_of(a, 0.0);
}

// Relative KKT residual of w for min_{w in simplex} F(w) = p^T w + s sqrt(w^T M w): with
// grad = p + s M w / n (n = ||J^T w||) and nu = w^T grad, the largest violation of
// grad_i >= nu, and of grad_i = nu where w_i > 0, over max_i sqrt(M_ii) (||g0|| + s), the
// size of the gradient's entries. Near a kink (n <= 1e-6 sqrt(max M_ii)) it is n / sqrt(max M_ii).
PYX_HD inline double cagrad_residual(const double* M, int64_t T, const double* p, double G,
                                     double s, const double* w, double* Mw) {
  double n2 = 0, top = 0;
  for (int64_t i = 0; i < T; ++i) {
    double acc = 0;
    for (int64_t j = 0; j < T; ++j) acc += M[i * T + j] * w[j];
    Mw[i] = acc;
    n2 += w[i] * acc;
    top = max_of(top, M[i * T + i]);
  }
  const double n = sqrt(max_of(n2, 0.0));
  const double size = sqrt(top) * (sqrt(G) + s);
  if (!(size > 0)) return 0;
  // Rounding leaves w^T M w ~ 1e-16 top at a kink, so n itself only reaches ~1e-8 sqrt(top):
  // below 1e-6 sqrt(top) the gradient s M w / n is noise and n is the honest residual.
  if (!(n > 1e-6 * sqrt(top))) return n / sqrt(top);
  double nu = 0;
  for (int64_t i = 0; i < T; ++i) {
    Mw[i] = p[i] + s * Mw[i] / n;
    nu += w[i] * Mw[i];
  }
  double res = 0;
  for (int64_t i = 0; i < T; ++i)
    res = max_of(res, w[i] > 0 ? fabs(Mw[i] - nu) : max_of(nu - Mw[i], 0.0));
  return res / size;
}

// w* = argmin over the simplex of w^T M b + c sqrt(b^T M b) sqrt(w^T M w), b = 1 / T. At the
// optimum the shift kappa satisfies ||J^T w_kappa|| = s kappa (s = c ||g0||), and
// chi(kappa) = ||J^T w_kappa||^2 - s^2 kappa^2 falls from positive to negative exactly once (the
// convexity of the 1-D problem); on a fixed support chi is a quadratic, so a bracketed
// secant (Illinois) finds the root in a few min-norm solves. When chi <= 0 already as kappa
// -> 0 the optimum is the kink J^T w = 0 (the origin is in the hull): w is then the min-norm
// point. c = 0 or g0 = 0 make F linear or zero: w is b. Returns cagrad_residual.
PYX_HD inline double cagrad_solve(const double* M, int64_t T, double c, int64_t max_iter,
                                  double tol, double* w, double* dwork, int* iwork) {
  double* Q = dwork;
  double* p = Q + T * T;
  double* wk = p + T;
  double* Mw = wk + T;
  double* nn = Mw + T;  // nnls_dwork(T) + 3 T
  double G = 0;
  for (int64_t i = 0; i < T; ++i) {
    double acc = 0;
    for (int64_t j = 0; j < T; ++j) acc += M[i * T + j];
    p[i] = acc / static_cast<double>(T);
    G += p[i] / static_cast<double>(T);
    w[i] = 1.0 / static_cast<double>(T);
  }
  const double s = c * sqrt(max_of(G, 0.0));
  if (T == 1 || !(G > 0) || !(s > 0)) return 0;
  auto chi = [&](double kappa) {
    const double a = cagrad_shifted_min_norm(M, T, p, G, kappa, max_iter, tol, wk, Q, nn, iwork);
    return a - s * s * kappa * kappa;
  };
  auto keep = [&] {
    for (int64_t i = 0; i < T; ++i) w[i] = wk[i];
  };
  double top = 0;
  for (int64_t i = 0; i < T; ++i) top = max_of(top, M[i * T + i]);
  // kappa = mu / s where mu = ||J^T w*|| <= sqrt(max M_ii): start at that bound.
  double hi = sqrt(top) / s, lo = hi;
  double chi_hi = chi(hi), chi_lo = chi_hi;
  keep();
  if (chi_hi == 0) return cagrad_residual(M, T, p, G, s, w, Mw);
  if (chi_hi > 0) {
    for (int e = 0; e < 200 && chi_hi > 0; ++e) {
      lo = hi;
      chi_lo = chi_hi;
      hi *= 4;
      chi_hi = chi(hi);
    }
  } else {
    for (int e = 0; e < 200 && chi_lo <= 0; ++e) {
      hi = lo;
      chi_hi = chi_lo;
      lo *= 0.25;
      chi_lo = chi(lo);
      if (lo < 1e-15 * sqrt(top) / s) {
        keep();  // the kink: the min-norm point of the hull itself
        return cagrad_residual(M, T, p, G, s, w, Mw);
      }
    }
  }
  int side = 0;  // Illinois: halve the stale end's value when one end is kept twice
  double best = INFINITY;
  for (int64_t it = 0; it < max_iter; ++it) {
    double kappa = (lo * chi_hi - hi * chi_lo) / (chi_hi - chi_lo);
    if (!(kappa > lo && kappa < hi)) kappa = 0.5 * (lo + hi);
    const double ck = chi(kappa);
    if (fabs(ck) < best) {
      best = fabs(ck);
      keep();
    }
    if (fabs(ck) <= tol * s * s * kappa * kappa || hi - lo <= 4e-16 * hi) break;
    if (ck > 0) {
      lo = kappa;
      chi_lo = ck;
      if (side == 1) chi_hi *= 0.5;
      side = 1;
    } else {
      hi = kappa;
      chi_hi = ck;
      if (side == -1) chi_lo *= 0.5;
      side = -1;
    }
  }
  return cagrad_residual(M, T, p, G, s, w, Mw);
}

}  // namespace pyxtask::detail
