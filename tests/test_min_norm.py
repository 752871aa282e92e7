import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyxtask
from pyxtask import reference

METHODS = ["away", "pairwise"]


def scipy_min_norm(M: np.ndarray) -> float:
    """Independent exact optimum: the min-norm point of conv{l_i} (M = L L^T) is the
    projection of (0, 1) onto the cone of the lifted points (l_i, 1), which Lawson-Hanson
    NNLS finds exactly; lam = mu / sum(mu)."""
    w, V = np.linalg.eigh(M)
    L = V * np.sqrt(np.clip(w, 0, None))
    t = M.shape[0]
    E = np.vstack([L.T, np.ones((1, t))])
    d = np.zeros(E.shape[0])
    d[-1] = 1
    mu, _ = scipy.optimize.nnls(E, d, maxiter=100 * t)
    lam = mu / mu.sum()
    return float(lam @ M @ lam)


@st.composite
def gram_matrices(draw):
    t = draw(st.integers(1, 64))
    # Low rank (P < T) puts the origin in or near the hull; P >> T is the usual case.
    p = draw(st.sampled_from([1, 2, 3, max(1, t // 3), t, 2 * t, 1000]))
    seed = draw(st.integers(0, 2**31 - 1))
    shared = draw(st.sampled_from([0.0, 0.5, 3.0]))  # a common direction keeps 0 off the hull
    scale = draw(st.sampled_from([1e-6, 1.0, 1e6]))
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((t, p)) + shared * rng.standard_normal(p)
    return scale * (G @ G.T)


def check_kkt(M: np.ndarray, lam: np.ndarray, tol: float) -> None:
    assert np.all(lam >= 0) and abs(lam.sum() - 1) < 1e-12
    u = M @ lam
    f = lam @ u
    assert np.all(u >= f - tol), (u.min(), f)
    assert np.all(np.abs(u[lam > 0] - f) <= tol), np.abs(u[lam > 0] - f).max()


@given(gram_matrices(), st.sampled_from(METHODS))
def test_min_norm_point_is_the_optimum(M, method):
    lam = pyxtask.ops.min_norm_point(torch.from_numpy(M), method=method).numpy()
    scale = float(np.diag(M).max())
    check_kkt(M, lam, 1e-9 * scale)
    f, f_star = float(lam @ M @ lam), scipy_min_norm(M)
    assert abs(f - f_star) <= 1e-6 * f_star + 1e-12 * scale, (f, f_star)


@given(gram_matrices(), st.integers(0, 2**31 - 1))
def test_min_norm_point_is_permutation_equivariant(M, seed):
    perm = np.random.default_rng(seed).permutation(M.shape[0])
    lam = pyxtask.ops.min_norm_point(torch.from_numpy(M)).numpy()
    lam_p = pyxtask.ops.min_norm_point(torch.from_numpy(M[np.ix_(perm, perm)])).numpy()
    # The minimiser is unique when M is definite on the hull's affine span; compare the
    # points they give (M^(1/2) lam) rather than the weights, which may differ otherwise.
    scale = float(np.diag(M).max())
    diff = lam[perm] - lam_p
    assert float(diff @ M[np.ix_(perm, perm)] @ diff) <= 1e-8 * scale


@given(gram_matrices())
def test_min_norm_point_matches_reference(M):
    m = torch.from_numpy(M)
    lam = pyxtask.ops.min_norm_point(m)
    ref = reference.min_norm_point_reference(m)
    f = float(lam @ m @ lam)
    f_ref = float(ref @ m @ ref)
    assert abs(f - f_ref) <= 1e-9 * max(f_ref, 1e-300) + 1e-12 * float(m.diagonal().max())


def test_two_tasks_closed_form():
    G = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    lam = pyxtask.ops.min_norm_point(G @ G.T)
    # min over g of |g a + (1 - g) b|^2 = 1 at g = 1 (a is the foot of the perpendicular).
    assert torch.allclose(lam, torch.tensor([1.0, 0.0], dtype=torch.float64))
    lam = pyxtask.ops.min_norm_point(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    assert torch.allclose(lam, torch.tensor([0.5, 0.5]))


def test_plain_frank_wolfe_stalls_where_away_steps_do_not():
    # The optimum lies inside a face: Alg. 2 zig-zags and is still far off after 100
    # iterations, away steps finish.
    rng = np.random.default_rng(0)
    G = rng.standard_normal((20, 8)) + 2.0 * rng.standard_normal(8)
    M = torch.from_numpy(G @ G.T)
    f_star = scipy_min_norm(M.numpy())
    plain = pyxtask.ops.min_norm_point(M, max_iter=100, method="plain")
    away = pyxtask.ops.min_norm_point(M, max_iter=100, method="away")
    assert float(plain @ M @ plain) > f_star * (1 + 1e-3)
    assert float(away @ M @ away) <= f_star * (1 + 1e-9)
    ref = reference.min_norm_point_reference(M, max_iter=100, method="plain")
    assert torch.allclose(plain, ref, rtol=1e-9, atol=1e-12)  # same iterations, same iterate


def test_float32_input_returns_float32_simplex_point():
    G = torch.randn(10, 50)
    lam = pyxtask.ops.min_norm_point(G @ G.T)
    assert lam.dtype == torch.float32 and abs(float(lam.sum()) - 1) < 1e-6


@pytest.mark.parametrize(
    ("M", "kwargs", "message"),
    [
        (torch.ones(3, 4), {}, "pyxtask.min_norm_point: M must be a square T x T Gram matrix"),
        (torch.ones(65, 65), {}, "pyxtask.min_norm_point: M has 65 rows; at most 64"),
        (torch.ones(2, 2, dtype=torch.int32), {}, "pyxtask.min_norm_point: M must be float32"),
        (
            torch.tensor([[1.0, float("nan")], [0.0, 1.0]]),
            {},
            "pyxtask.min_norm_point: M[0, 1] = nan is not finite",
        ),
        (torch.eye(3), {"method": "newton"}, "method must be 'away', 'pairwise' or 'plain'"),
        (torch.eye(3), {"max_iter": -1}, "pyxtask.min_norm_point: max_iter must be >= 0"),
        (torch.eye(3), {"tol": -1.0}, "pyxtask.min_norm_point: tol must be finite and >= 0"),
    ],
)
def test_min_norm_point_rejects_bad_input(M, kwargs, message):
    with pytest.raises(RuntimeError) as info:
        pyxtask.ops.min_norm_point(M, **kwargs)
    assert message in str(info.value)


@pytest.mark.cuda
@pytest.mark.parametrize("method", [*METHODS, "plain"])
def test_min_norm_point_cuda_matches_cpu(method):
    rng = np.random.default_rng(1)
    for t, p in [(2, 5), (3, 1), (8, 100), (64, 20), (64, 1000)]:
        G = rng.standard_normal((t, p)) + rng.standard_normal(p)
        M = torch.from_numpy(G @ G.T)
        cpu = pyxtask.ops.min_norm_point(M, method=method)
        gpu = pyxtask.ops.min_norm_point(M.cuda(), method=method).cpu()
        assert float((cpu - gpu) @ M @ (cpu - gpu)) <= 1e-9 * float(M.diagonal().max())


@pytest.mark.cuda
@pytest.mark.parametrize("method", [*METHODS, "plain"])
def test_min_norm_point_cuda_is_the_cpu_bitwise(method):
    """One solver (min_norm_solver.h) on both devices, and no FMA contraction on either:
    every iterate, hence the solution, has the same bits. Includes supports whose KKT
    system is singular (repeated and zero rows) and fp32 input."""
    rng = np.random.default_rng(7)
    cases = []
    for t, p in [(2, 5), (3, 1), (3, 50), (5, 3), (8, 100), (17, 40), (33, 1000), (64, 20)]:
        for _ in range(3):
            G = rng.standard_normal((t, p)) + rng.standard_normal(p)
            cases.append(G @ G.T)
    G = rng.standard_normal((12, 30))
    G[5] = G[2]  # a repeated task
    G[7] = 0  # a task without gradient
    cases.append(G @ G.T)
    cases.append(np.zeros((4, 4)))
    for m in cases:
        M = torch.from_numpy(m)
        for dtype in (torch.float64, torch.float32):
            cpu = pyxtask.ops.min_norm_point(M.to(dtype), method=method)
            gpu = pyxtask.ops.min_norm_point(M.to(dtype).cuda(), method=method).cpu()
            assert torch.equal(cpu, gpu), (method, m.shape, dtype, (cpu - gpu).abs().max())
