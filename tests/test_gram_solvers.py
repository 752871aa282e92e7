"""The gram_solvers ops (dual_cone_projection, nash_bargaining, cagrad_inner): optimality
checked from first principles (KKT conditions, residuals), agreement with the float64
references of pyxtask.reference (SciPy NNLS, plain Newton, bisection), errors, fake kernels."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyxtask
from pyxtask import reference
from tests._gramians import gram_norm_sq, jacobians

ops = pyxtask.ops


@st.composite
def gram_matrices(draw, max_tasks=64, spread=4.0):
    """Gram matrices the weightings meet: T up to 64, any rank, shared directions (few
    conflicts) or none, duplicated or opposite tasks, norms over 2 * spread decades."""
    t = draw(st.integers(1, max_tasks))
    p = draw(st.sampled_from([1, 2, 3, max(1, t // 3), t, 2 * t, 200]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    G = rng.standard_normal((t, p)) + draw(st.sampled_from([0.0, 0.5, 3.0])) * rng.standard_normal(
        p
    )
    twist = draw(st.sampled_from(["none", "duplicate", "opposite", "zero", "scaled"]))
    if twist == "duplicate" and t >= 2:
        G[1] = G[0]
    elif twist == "opposite" and t >= 2:
        G[1] = -2.0 * G[0]
    elif twist == "zero":
        G[0] = 0.0
    elif twist == "scaled":
        G *= 10.0 ** rng.uniform(-spread, spread, size=(t, 1))
    return G @ G.T


def kkt_scale(M, v):
    """sqrt(M_ii) sum_j sqrt(M_jj) |v_j|: the size rounding gives (M v)_i."""
    s = np.sqrt(np.clip(np.diag(M), 0, None))
    return s * float(s @ np.abs(v))


def check_dual_cone_kkt(M, u, v, tol):
    g = M @ v
    scale = kkt_scale(M, np.abs(u) + np.abs(v - u)) + 1e-300
    assert np.all(v >= u), (v - u).min()
    assert np.all(g >= -tol * scale), (g / scale).min()  # dual feasibility: J^T v in the cone
    free = v > u
    assert np.all(np.abs(g[free]) <= tol * scale[free]), np.abs(g[free] / scale[free]).max()


# --- dual_cone_projection -------------------------------------------------------------------


@given(gram_matrices())
def test_dual_cone_projection_satisfies_kkt(M):
    T = M.shape[0]
    U = np.vstack([np.eye(T) / T, np.full((1, T), 1.0 / T)])
    V, residual = ops.dual_cone_projection(torch.from_numpy(M), torch.from_numpy(U))
    assert V.dtype == torch.float64 and V.shape == (T + 1, T) and residual.shape == (T + 1,)
    assert float(residual.max()) <= 1e-12
    for u, v in zip(U, V.numpy(), strict=True):
        check_dual_cone_kkt(M, u, v, 1e-11)


def _range_factor(M):
    """``(L, N)``: ``L L^T = M`` on M's numerical range, and an orthonormal basis N of its
    numerical null space (eigenvalues below T * eps * lambda_max are M's own rounding)."""
    evals, evecs = np.linalg.eigh((M + M.T) / 2)
    keep = evals > M.shape[0] * np.finfo(np.float64).eps * max(float(evals.max()), 0.0)
    return evecs[:, keep] * np.sqrt(evals[keep]), evecs[:, ~keep]


def _on_range(v, N):
    """``v`` without its null-space part: the same direction ``J^T v`` in exact arithmetic.
    A solver may drift along a null direction (two opposite tasks: v_0 = 2 v_1 = 8e10 for a
    direction of norm 0.3), and measuring ``L^T v`` at that size cancels ~1e-3 of its value."""
    return v - N @ (N.T @ v)


@settings(max_examples=25)
@given(gram_matrices(max_tasks=24, spread=2.0))
def test_dual_cone_projection_matches_scipy_nnls(M):
    T = M.shape[0]
    m, U = torch.from_numpy(M), torch.eye(T, dtype=torch.float64) / T
    V, _ = ops.dual_cone_projection(m, U)
    ref = reference.dual_cone_projection_reference(m, U)
    # v is not unique for a singular M; L^T v (the direction J^T v up to a rotation) is. The
    # reference may drift to |v| ~ 1e11 along a null direction, where v^T M v is rounding
    # noise, so objectives and directions are measured on a PSD factor L of M's range.
    L, N = _range_factor(M)
    for raw, raw_ref in zip(V.numpy(), ref.numpy(), strict=True):
        v, r = _on_range(raw, N), _on_range(raw_ref, N)
        f, f_ref = float(np.sum((L.T @ v) ** 2)), float(np.sum((L.T @ r) ** 2))
        tol = 1e-10 * (f_ref + np.trace(M) / T**2)
        assert f <= f_ref + tol, (f, f_ref)
        assert float(np.sum((L.T @ (v - r)) ** 2)) <= 10 * tol


@given(gram_matrices(max_tasks=16), st.integers(0, 2**31 - 1))
def test_dual_cone_projection_is_permutation_equivariant(M, seed):
    perm = np.random.default_rng(seed).permutation(M.shape[0])
    u = np.random.default_rng(seed).uniform(-1, 1, M.shape[0])
    v, _ = ops.dual_cone_projection(torch.from_numpy(M), torch.from_numpy(u))
    vp, _ = ops.dual_cone_projection(
        torch.from_numpy(M[np.ix_(perm, perm)]), torch.from_numpy(u[perm])
    )
    Mp = M[np.ix_(perm, perm)]
    assert gram_norm_sq(Mp, v.numpy()[perm], vp.numpy()) <= 1e-9 * (np.trace(M) + 1e-300)


def test_dual_cone_projection_closed_forms():
    # No conflict: the projection of anything already in the cone is itself.
    M = torch.tensor([[1.0, 0.2], [0.2, 1.0]], dtype=torch.float64)
    u = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert torch.equal(ops.dual_cone_projection(M, u)[0], u)
    # g2 = -g1 / 2: the cone is the hyperplane orthogonal to g1, the projection is zero.
    M = torch.tensor([[1.0, -0.5], [-0.5, 0.25]], dtype=torch.float64)
    v, _ = ops.dual_cone_projection(M, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert abs(float(v @ M @ v)) < 1e-15 and bool((v >= torch.tensor([1.0, 0.0])).all())
    # M = 0: every v is optimal, the least change (v = u) is returned.
    zero, u = torch.zeros(3, 3), torch.tensor([0.1, -2.0, 3.0])
    assert torch.equal(ops.dual_cone_projection(zero, u)[0], u.double())


def test_dual_cone_projection_float32_input_gives_float64():
    G = torch.randn(5, 20)
    V, residual = ops.dual_cone_projection(G @ G.T, torch.eye(5) / 5)
    assert V.dtype == residual.dtype == torch.float64
    assert float(residual.max()) < 1e-12


# --- nash_bargaining ------------------------------------------------------------------------


@given(jacobians(max_tasks=64, kinds=("full_rank", "conflicting", "scaled")))
def test_nash_bargaining_solves_the_bargaining_equations(JM):
    _, M = JM
    alpha, residual = ops.nash_bargaining(torch.from_numpy(M))
    a = alpha.numpy()
    assert np.all(a > 0)
    r = np.abs(a * (M @ a) - 1).max()
    assert r <= 1e-9 and abs(float(residual) - r) <= 1e-10, (r, float(residual))


@settings(max_examples=20)
@given(jacobians(max_tasks=12, kinds=("full_rank", "conflicting")))
def test_nash_bargaining_matches_plain_newton(JM):
    _, M = JM
    m = torch.from_numpy(M)
    alpha, _ = ops.nash_bargaining(m)
    ref = reference.nash_bargaining_reference(m)
    assert torch.allclose(alpha, ref, rtol=1e-8, atol=0)


@given(jacobians(max_tasks=16, kinds=("full_rank", "conflicting")), st.integers(0, 2**31 - 1))
def test_nash_bargaining_follows_task_scaling(JM, seed):
    # alpha_i scales by 1 / c_i when g_i does by c_i: the solver is affine-invariant.
    _, M = JM
    c = 10.0 ** np.random.default_rng(seed).uniform(-3, 3, M.shape[0])
    alpha, _ = ops.nash_bargaining(torch.from_numpy(M))
    scaled, _ = ops.nash_bargaining(torch.from_numpy(M * np.outer(c, c)))
    np.testing.assert_allclose(scaled.numpy() * c, alpha.numpy(), rtol=1e-8)


def test_nash_bargaining_warm_start_gives_the_same_solution():
    G = torch.randn(8, 30, dtype=torch.float64)
    M = G @ G.T
    cold, _ = ops.nash_bargaining(M)
    warm, residual = ops.nash_bargaining(M, cold * 1.5)
    assert torch.allclose(cold, warm, rtol=1e-10) and float(residual) < 1e-10


def test_nash_bargaining_reports_when_no_solution_exists():
    # g3 = -(g1 + g2): the origin is in the hull, no alpha > 0 gives every task progress.
    G = torch.randn(2, 6, dtype=torch.float64)
    G = torch.cat([G, -G.sum(0, keepdim=True)])
    alpha, residual = ops.nash_bargaining(G @ G.T)
    assert bool(torch.isfinite(alpha).all() and (alpha > 0).all())
    assert float(residual) > 1e-3
    # Duplicated tasks make M singular too, but a solution exists and is found.
    G = torch.randn(3, 6, dtype=torch.float64)
    G = torch.cat([G, G[:1]])
    alpha, residual = ops.nash_bargaining(G @ G.T)
    assert float(residual) < 1e-10 and torch.isclose(alpha[0], alpha[3], rtol=1e-10)
    alpha, residual = ops.nash_bargaining(torch.zeros(3, 3))
    assert torch.equal(alpha, torch.ones(3, dtype=torch.float64)) and float(residual) == 1.0


# --- cagrad_inner ---------------------------------------------------------------------------


def cagrad_objective(M, w, c):
    b = np.full(M.shape[0], 1.0 / M.shape[0])
    return float(w @ M @ b + c * np.sqrt(max(b @ M @ b, 0)) * np.sqrt(max(w @ M @ w, 0)))


# The root search shifts every gradient by kappa g0, which costs the small gradients digits
# when norms differ by more than ~1e4 (see cagrad_solve): tested over four decades.
@given(gram_matrices(max_tasks=32, spread=2.0), st.sampled_from([0.1, 0.4, 0.9, 2.0]))
def test_cagrad_inner_is_optimal(M, c):
    w, residual = ops.cagrad_inner(torch.from_numpy(M), c)
    w = w.numpy()
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-12
    size = np.sqrt(np.diag(M).max()) * np.sqrt(max(M.mean(), 0)) * (1 + c) + 1e-300
    if np.sqrt(max(w @ M @ w, 0)) > 1e-6 * np.sqrt(np.diag(M).max()):
        assert float(residual) <= 1e-9
    else:  # at the kink J^T w = 0 the residual is ||J^T w|| / max ||g_i||
        assert float(residual) <= 1e-6
    # No vertex, and not the centre, does better.
    f = cagrad_objective(M, w, c)
    for other in [*np.eye(M.shape[0]), np.full(M.shape[0], 1.0 / M.shape[0])]:
        assert f <= cagrad_objective(M, other, c) + 1e-10 * size


@settings(max_examples=15)
@given(gram_matrices(max_tasks=10, spread=2.0), st.sampled_from([0.4, 1.5]))
def test_cagrad_inner_matches_bisection_reference(M, c):
    m = torch.from_numpy(M)
    w, _ = ops.cagrad_inner(m, c)
    ref = reference.cagrad_inner_reference(m, c)
    size = np.sqrt(np.diag(M).max()) * np.sqrt(max(M.mean(), 0)) * (1 + c) + 1e-300
    # Near the kink (optimum ~ 0) rounding fixes F only to ~sqrt(eps) of its scale.
    assert cagrad_objective(M, w.numpy(), c) <= cagrad_objective(M, ref.numpy(), c) + 1e-8 * size


def test_cagrad_inner_degenerate_cases():
    # c = 0 or g0 = 0: F is linear in w or zero, and CAGrad's weights are the mean's.
    third = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert torch.equal(ops.cagrad_inner(torch.eye(3), 0.0)[0], third)
    assert torch.equal(ops.cagrad_inner(torch.zeros(3, 3), 0.4)[0], third)
    assert torch.equal(ops.cagrad_inner(torch.ones(1, 1), 0.4)[0], torch.ones(1).double())


# --- errors, fake kernels, devices ----------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: ops.dual_cone_projection(torch.ones(3, 4), torch.ones(3)),
            "pyxtask.dual_cone_projection: M must be a square T x T Gram matrix",
        ),
        (
            lambda: ops.dual_cone_projection(torch.eye(3), torch.ones(4)),
            "pyxtask.dual_cone_projection: U has 4 columns but M is for 3 tasks",
        ),
        (
            lambda: ops.dual_cone_projection(torch.eye(3), torch.ones(1, 1, 3)),
            "pyxtask.dual_cone_projection: U must be a vector of T weights or a K x T matrix",
        ),
        (
            lambda: ops.dual_cone_projection(torch.eye(2), torch.tensor([0.0, float("inf")])),
            "pyxtask.dual_cone_projection: U has a non-finite entry inf at 1",
        ),
        (
            lambda: ops.dual_cone_projection(torch.eye(65), torch.ones(65)),
            "pyxtask.dual_cone_projection: M has 65 rows; at most 64",
        ),
        (
            lambda: ops.nash_bargaining(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])),
            "pyxtask.nash_bargaining: M[0, 1] = nan is not finite",
        ),
        (
            lambda: ops.nash_bargaining(torch.eye(3), torch.ones(2)),
            "pyxtask.nash_bargaining: init must be a vector of 3 weights",
        ),
        (
            lambda: ops.nash_bargaining(torch.eye(3), max_iter=-1),
            "pyxtask.nash_bargaining: max_iter must be >= 0",
        ),
        (
            lambda: ops.cagrad_inner(torch.eye(3), -0.1),
            "pyxtask.cagrad_inner: c must be finite and >= 0, got -0.1",
        ),
        (
            lambda: ops.cagrad_inner(torch.ones(2, 2, dtype=torch.int32), 0.4),
            "pyxtask.cagrad_inner: M must be float32",
        ),
        (
            lambda: ops.cagrad_inner(torch.eye(2), 0.4, tol=float("nan")),
            "pyxtask.cagrad_inner: tol must be finite and >= 0",
        ),
    ],
)
def test_bad_input_is_refused_with_one_line(call, message):
    with pytest.raises(RuntimeError) as info:
        call()
    assert message in str(info.value)
    assert "\n" not in str(info.value).split("\n\n")[0].strip()


def test_meta_kernels_give_shapes():
    M = torch.empty(7, 7, device="meta")
    V, r = ops.dual_cone_projection(M, torch.empty(3, 7, device="meta"))
    assert V.shape == (3, 7) and r.shape == (3,) and V.dtype == r.dtype == torch.float64
    V, r = ops.dual_cone_projection(M, torch.empty(7, device="meta"))
    assert V.shape == (7,) and r.shape == ()
    alpha, r = ops.nash_bargaining(M, torch.empty(7, device="meta"))
    assert alpha.shape == (7,) and r.shape == () and alpha.device.type == "meta"
    w, r = ops.cagrad_inner(M, 0.4)
    assert w.shape == (7,) and r.shape == () and w.dtype == torch.float64
    with pytest.raises(RuntimeError, match=r"pyxtask\.nash_bargaining: M has 65 rows"):
        ops.nash_bargaining(torch.empty(65, 65, device="meta"))


def test_torch_compile_traces_the_solvers():
    def step(G: torch.Tensor) -> torch.Tensor:
        M = ops.gram(G)
        T = M.shape[0]
        V, _ = ops.dual_cone_projection(M, torch.eye(T) / T)
        alpha, _ = ops.nash_bargaining(M)
        w, _ = ops.cagrad_inner(M, 0.4)
        return V.sum(0) + alpha + w

    G = torch.randn(4, 50, dtype=torch.float64)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(G), step(G))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    rng = np.random.default_rng(4)
    for t, p in [(1, 3), (2, 5), (8, 3), (33, 100), (64, 20), (64, 1000)]:
        G = rng.standard_normal((t, p)) + rng.standard_normal(p)
        M = torch.from_numpy(G @ G.T)
        U = torch.eye(t, dtype=torch.float64) / t
        for cpu, gpu in [
            (ops.dual_cone_projection(M, U), ops.dual_cone_projection(M.cuda(), U.cuda())),
            (ops.nash_bargaining(M), ops.nash_bargaining(M.cuda())),
            (ops.cagrad_inner(M, 0.4), ops.cagrad_inner(M.cuda(), 0.4)),
        ]:
            assert gpu[0].device.type == "cuda"
            # Same iterations; only fused multiply-adds may round differently.
            torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-9, atol=1e-12)
            assert float(gpu[1].max()) <= max(1e-9, 10 * float(cpu[1].max()))
