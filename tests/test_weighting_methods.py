"""MGDA, MetaWeighting, GradNorm and Uncertainty against independent float64 NumPy references.

The references are written from the papers, not from ``pyxtask.weighting``:

MGDA (Sener & Koltun 2018)
    lam* minimises ``|| sum_t lam_t g_t / n_t ||^2`` over the simplex. Checked by its KKT
    conditions on the normalised Gram matrix built here from G, and by the two-task closed
    form ``gamma = clip((M22 - M12) / (M11 + M22 - 2 M12), 0, 1)``; the normalisers ``n_t``
    are the authors' ``gradient_normalizers`` (1, ||g_t||, L_t, L_t ||g_t||).
MetaWeighting (Alg. 1, eqs. 10-13)
    From support gradients G_s and query gradients G_q: ``d = -(eta / T) G_q G_s^T``,
    ``lam* = argmin_{simplex} lam^T (d d^T) lam`` found exactly by enumerating the supports
    (for each support S, the equality-constrained minimiser from its KKT linear system; the
    feasible one of least objective is the optimum because ``d d^T`` is definite here),
    ``d_c = lam*^T d``, ``w <- w - alpha d_c``.
GradNorm (Chen et al. 2018, eqs. 1-2)
    ``L_grad = sum_t |w_t ||g_t|| - mean(w ||g||) r_t^alpha|`` with the target constant;
    its w-gradient by hand and by torch autograd with the target detached.
Uncertainty (Kendall et al. 2018, eq. 10)
    ``sum_t exp(-s_t) L_t + s_t / 2`` differentiated by autograd; its minimiser by SciPy.

Tolerances (all float64, eps = 2.2e-16). :func:`pyxtask.ops.min_norm_point` stops when the
KKT conditions hold to ``1e-12 * max(diag M)``; a residual that size moves lam by up to about
``1e-12 * cond(M)``, so weights and directions are compared within ``1e-10 * cond(M)``
(measured worst case over 16,000 random problems: ``1.3e-12 * cond`` where the optimum is the
vertex of a zero gradient, ``3e-14 * cond`` elsewhere, where the solver ends on an exact solve
over the support). The KKT conditions are checked within ``1e-9 * max(diag M)`` and objective
values within ``1e-10 * max(diag M)`` (the Frank-Wolfe duality gap is at most twice the KKT
residual). Problems whose matrix is ill-conditioned beyond 1e8 are skipped: their lam* is not
determined to any useful accuracy. GradNorm and Uncertainty are a few flops per entry:
1e-12 relative or better, as each test says.
"""

import doctest
import importlib
import math

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import pyxtask
from pyxtask.gradients import GradientStats
from pyxtask.weighting import (
    MGDA,
    TAWT,
    GradNorm,
    GramWeighting,
    MetaWeighting,
    Uncertainty,
)
from pyxtask.weighting import gradnorm as gradnorm_module
from pyxtask.weighting import uncertainty as uncertainty_module
from tests._weighting_asserts import (
    as_array,
    assert_finite_weights,
    assert_invariant_to_task_scaling,
    assert_permutation_equivariant,
    assert_source_permutation_equivariant,
    np_min_norm,
    permute_tasks,
)

NORMALIZATIONS = ["none", "l2", "loss", "loss+"]
MAX_COND = 1e8  # see the module docstring


# -- independent NumPy references ---------------------------------------------------------------


def np_normalizers(G, losses, normalization):
    """Sener & Koltun's ``gradient_normalizers``; a non-positive normaliser counts as 1."""
    norms = np.sqrt(np.sum(np.asarray(G, dtype=np.float64) ** 2, axis=1))
    losses = np.asarray(losses, dtype=np.float64)
    n = {
        "none": np.ones_like(norms),
        "l2": norms,
        "loss": losses,
        "loss+": losses * norms,
    }[normalization]
    return np.where(n > 0, n, 1.0)


def np_normalized_gram(G, losses, normalization):
    Gn = np.asarray(G, dtype=np.float64) / np_normalizers(G, losses, normalization)[:, None]
    return Gn @ Gn.T


def check_kkt(M, lam, tol):
    """lam on the simplex minimises lam^T M lam iff (M lam)_t >= lam^T M lam for every t,
    with equality where lam_t > 0."""
    assert np.all(lam >= 0) and abs(lam.sum() - 1) < 1e-12, lam
    u = M @ lam
    f = lam @ u
    assert np.all(u >= f - tol), (u - f, tol)
    assert np.all(np.abs(u[lam > 0] - f) <= tol), (np.abs(u[lam > 0] - f).max(), tol)


def np_metaweighting_step(w, G_q, G_s, alpha, eta):
    """Eqs. 10-13 on fixed gradients: returns (new w, lam*, d, d_c)."""
    T = G_q.shape[0]
    d = -(eta / T) * (G_q @ G_s.T)  # eq. 10: d[t, s] = -(eta/T) grad L^q_t . grad L^s_s
    lam = np_min_norm(d @ d.T)  # eq. 12: ||lam d||^2 = lam (d d^T) lam^T
    d_c = lam @ d  # eq. 11
    return w - alpha * d_c, lam, d, d_c  # eq. 13


def np_gradnorm_gradient(w, g, L, L0, alpha):
    """dL_grad/dw of eq. 2 with the target of eq. 1 a constant, and the pieces."""
    ratio = L / L0
    r = ratio / ratio.mean()
    G = w * g
    target = G.mean() * r**alpha
    return np.sign(G - target) * g, G, target


# -- inputs --------------------------------------------------------------------------------------


@st.composite
def gradient_problems(draw, min_tasks=2, max_tasks=8, zero_row=True):
    """(G, losses): T x P gradients, P >= T + 2 (so their Gram matrix is definite unless a row
    is zero), sometimes with a common direction (the hull far from 0) and one zero row."""
    T = draw(st.integers(min_tasks, max_tasks))
    P = draw(st.integers(T + 2, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shared = draw(st.sampled_from([0.0, 1.0, 3.0]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    G = (rng.standard_normal((T, P)) + shared * rng.standard_normal(P)) * scale
    if zero_row and draw(st.booleans()):
        G[draw(st.integers(0, T - 1))] = 0.0
    losses = rng.uniform(0.05, 5.0, T) * draw(st.sampled_from([1e-2, 1.0, 1e2]))
    return G, losses


def torch_inputs(G, losses):
    return torch.tensor(G @ G.T), torch.tensor(losses)


def effective_cond(M):
    """cond(M) over the tasks with a nonzero gradient. A zero gradient (at most one here) makes
    its vertex the optimum; how far the solver stops from it is set by the other tasks."""
    keep = ~np.all(M == 0, axis=1)
    return float(np.linalg.cond(M[np.ix_(keep, keep)])) if keep.any() else 1.0


def lam_tolerance(M):
    return 1e-10 * effective_cond(M)


# -- test-local adapters: other weightings seen as GramWeightings -------------------------------


class TAWTOnGram(GramWeighting):
    """One TAWT cosine update from its initial weights, with the cosines taken from the Gram
    matrix (task 0 is the target); equal task sizes, so ``w == omega``."""

    name = "tawt-on-gram"
    permutation_equivariant = False  # the target is task 0

    def __init__(self, paradigm="normalized-joint", c=3.0, lr=1.0):
        self.paradigm, self.c, self.lr = paradigm, c, lr

    def __call__(self, gram, losses=None):
        gram, _ = self._inputs(gram, losses)
        T = gram.shape[0]
        tawt = TAWT([100] * T, self.paradigm, c=self.c, lr=self.lr)
        stats = GradientStats(
            sq_norms=gram.diagonal().clone(),
            reference_dots=gram[0].clone(),
            reference_sq_norm=float(gram[0, 0]),
            gram=gram,
            measured=torch.ones(T, dtype=torch.bool),
        )
        tawt.update(tawt.similarities(stats))
        return tawt.omega


class MetaWeightingDirection(GramWeighting):
    """MetaWeighting's common direction d_c (eq. 11) for a cross-Gram matrix; the min-norm
    point is unique even where lam* is not, so this is what the property asserts compare."""

    name = "metaweighting-direction"
    permutation_equivariant = True

    def __init__(self, alpha=0.5, eta=0.01):
        self.alpha, self.eta = alpha, eta

    def __call__(self, gram, losses=None):
        gram, _ = self._inputs(gram, losses)
        mw = MetaWeighting(gram.shape[0], alpha=self.alpha, eta=self.eta)
        mw.update(gram)
        assert mw.last_direction is not None
        return mw.last_direction


# -- (a) the shared properties over every weighting ----------------------------------------------


@given(
    problem=gradient_problems(),
    normalization=st.sampled_from(NORMALIZATIONS),
    seed=st.integers(0, 2**32 - 1),
)
def test_mgda_properties(problem, normalization, seed):
    G, losses = problem
    M_norm = np_normalized_gram(G, losses, normalization)
    cond = effective_cond(M_norm)
    assume(cond < MAX_COND)
    gram, L = torch_inputs(G, losses)
    mgda = MGDA(normalization)
    w = mgda(gram, L)
    assert_finite_weights(w, G.shape[0])
    assert math.isclose(float(w.sum()), 1.0, abs_tol=1e-12) and bool((w >= 0).all())
    perm = np.random.default_rng(seed).permutation(G.shape[0])
    assert_permutation_equivariant(mgda, gram, L, perm=perm, rtol=0, atol=lam_tolerance(M_norm))


@given(problem=gradient_problems(zero_row=False), seed=st.integers(0, 2**32 - 1))
def test_metaweighting_direction_properties(problem, seed):
    G_q, _ = problem
    rng = np.random.default_rng(seed)
    G_s = rng.standard_normal(G_q.shape) * float(np.abs(G_q).max())
    cross = torch.tensor(G_q @ G_s.T)
    d = -(0.01 / G_q.shape[0]) * (G_q @ G_s.T)
    B = d @ d.T
    assume(np.linalg.cond(B) < MAX_COND)
    weighting = MetaWeightingDirection(eta=0.01)
    direction = weighting(cross)
    assert_finite_weights(direction, G_q.shape[0])
    # d_c = lam* d is unique even where lam* is not; lam's error (module docstring) times the
    # size of d's entries bounds d_c's.
    tol = 1e-10 * np.linalg.cond(B) * np.abs(d).max()
    perm = rng.permutation(G_q.shape[0])
    assert_permutation_equivariant(weighting, cross, perm=perm, rtol=0, atol=tol)


@given(
    problem=gradient_problems(),
    paradigm=st.sampled_from(["joint", "normalized-joint", "pretrain"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_tawt_properties(problem, paradigm, seed):
    """TAWT declares it is not permutation-equivariant (task 0 is the target); what holds is
    that relabelling the sources relabels their weights."""
    G, _ = problem
    weighting = TAWTOnGram(paradigm)
    assert not weighting.permutation_equivariant
    gram = torch.tensor(G @ G.T)
    assert_finite_weights(weighting(gram), G.shape[0])
    rng = np.random.default_rng(seed)
    perm = np.concatenate([[0], 1 + rng.permutation(G.shape[0] - 1)])
    # Cosines are ratios of a few products (1e-15 relative) times c * lr = 3 in the exponent.
    assert_source_permutation_equivariant(weighting, gram, perm=perm, rtol=1e-12, atol=1e-15)
    with pytest.raises(AssertionError, match="not permutation-equivariant"):
        assert_permutation_equivariant(weighting, gram, perm=perm, rtol=0, atol=0)


def test_tawt_is_really_not_permutation_equivariant():
    """The declaration is not a formality: moving the target changes the weights."""
    G = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    weighting = TAWTOnGram("normalized-joint")
    gram = torch.tensor(G @ G.T)
    perm = [1, 0, 2]
    w = as_array(weighting(gram))
    wp = as_array(weighting(*permute_tasks(gram, None, perm)))
    assert not np.allclose(wp, w[perm], atol=1e-3)


# -- (b) MGDA against the min-norm KKT conditions and the two-task closed form --------------------


@given(problem=gradient_problems(), normalization=st.sampled_from(NORMALIZATIONS))
def test_mgda_meets_the_kkt_conditions(problem, normalization):
    G, losses = problem
    M_norm = np_normalized_gram(G, losses, normalization)
    lam = MGDA(normalization)(*torch_inputs(G, losses)).numpy()
    check_kkt(M_norm, lam, 1e-9 * float(np.diag(M_norm).max()))
    # Independently: the exact optimum by enumeration has the same objective.
    if G.shape[0] <= 6 and effective_cond(M_norm) < MAX_COND:
        ref = np_min_norm(M_norm)
        scale = float(np.diag(M_norm).max())
        assert abs(lam @ M_norm @ lam - ref @ M_norm @ ref) <= 1e-10 * scale
        np.testing.assert_allclose(lam, ref, rtol=0, atol=lam_tolerance(M_norm))


@given(problem=gradient_problems(2, 2), normalization=st.sampled_from(NORMALIZATIONS))
def test_mgda_two_tasks_closed_form(problem, normalization):
    G, losses = problem
    M = np_normalized_gram(G, losses, normalization)
    denom = M[0, 0] + M[1, 1] - 2 * M[0, 1]  # ||g1/n1 - g2/n2||^2
    assume(denom > 1e-3 * (M[0, 0] + M[1, 1]))  # near 0 every lam is (nearly) optimal
    gamma = float(np.clip((M[1, 1] - M[0, 1]) / denom, 0.0, 1.0))
    lam = MGDA(normalization)(*torch_inputs(G, losses)).numpy()
    # Rounding in gamma: a few eps times (M11 + M22) / denom <= 1e3.
    np.testing.assert_allclose(lam, [gamma, 1 - gamma], rtol=0, atol=1e-11)


def test_mgda_normalizers_by_hand():
    G = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    losses = np.array([2.0, 0.5, 0.0])
    gram, L = torch_inputs(G, losses)
    expected = {
        "none": [1.0, 1.0, 1.0],
        "l2": [5.0, 1.0, 1.0],  # zero gradient: 1
        "loss": [2.0, 0.5, 1.0],  # zero loss: 1
        "loss+": [10.0, 1.0, 1.0],
    }
    for normalization, n in expected.items():
        np.testing.assert_allclose(MGDA(normalization).normalizers(gram, L).numpy(), n)
        np.testing.assert_allclose(np_normalizers(G, losses, normalization), n)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_mgda_zero_gradient_takes_all_the_weight_without_nan(normalization):
    """A zero gradient puts the origin in the hull: MGDA picks that vertex (Pareto-stationary)."""
    G = np.array([[1.0, 2.0], [0.0, 0.0], [-1.0, 0.5]])
    losses = np.array([1.0, 2.0, 3.0])
    w = MGDA(normalization)(*torch_inputs(G, losses))
    assert_finite_weights(w, 3)
    # Frank-Wolfe approaches the vertex and stops on the KKT tolerance: not exactly e_1.
    tol = lam_tolerance(np_normalized_gram(G, losses, normalization))
    np.testing.assert_allclose(w.numpy(), [0.0, 1.0, 0.0], rtol=0, atol=tol)


def test_mgda_returns_lambda_not_lambda_over_n():
    """As in the authors' code, lam* is found on normalised gradients and applied to the raw
    losses: the weights are lam* itself."""
    G = np.array([[1.0, 0.0], [0.0, 2.0]])
    w = MGDA("l2")(*torch_inputs(G, np.ones(2))).numpy()
    np.testing.assert_allclose(w, [0.5, 0.5], atol=1e-15)  # not (0.5, 0.25) / 0.75


# -- (c) MetaWeighting against eqs. 10-13 ---------------------------------------------------------


@given(
    T=st.integers(2, 6),
    seed=st.integers(0, 2**32 - 1),
    eta=st.sampled_from([2e-5, 1e-3, 0.1]),
    alpha=st.sampled_from([0.1, 1.0, 100.0]),
)
def test_metaweighting_matches_numpy_reference(T, seed, eta, alpha):
    rng = np.random.default_rng(seed)
    P = int(rng.integers(T + 2, 30))
    mw = MetaWeighting(T, alpha=alpha, eta=eta)
    np.testing.assert_array_equal(mw.w.numpy(), np.ones(T))  # w0 = (1, ..., 1)
    w, w_tol = np.ones(T), 0.0
    for step in range(3):  # three steps on fresh gradients: the state carries over
        shared = rng.choice([0.0, 1.0, 3.0])
        G_s = rng.standard_normal((T, P)) + shared * rng.standard_normal(P)
        G_q = rng.standard_normal((T, P)) + shared * rng.standard_normal(P)
        w, lam, d, d_c = np_metaweighting_step(w, G_q, G_s, alpha, eta)
        B = d @ d.T
        cond = float(np.linalg.cond(B))
        assume(cond < MAX_COND)
        out = mw.update(pyxtask.ops.cross_gram(torch.tensor(G_q), torch.tensor(G_s)))
        assert mw.updates == step + 1
        # d: one product per entry, a different summation order (1e-15 relative).
        np.testing.assert_allclose(mw.last_d.numpy(), d, rtol=1e-12, atol=1e-13 * np.abs(d).max())
        got = mw.last_lambda.numpy()
        scale = float(np.diag(B).max())
        assert abs(got @ B @ got - lam @ B @ lam) <= 1e-10 * scale
        np.testing.assert_allclose(got, lam, rtol=0, atol=1e-10 * cond)
        dc_tol = 1e-10 * cond * float(np.abs(d).max())
        np.testing.assert_allclose(mw.last_direction.numpy(), d_c, rtol=0, atol=dc_tol)
        w_tol += alpha * dc_tol + 1e-15 * float(np.abs(w).max())
        np.testing.assert_allclose(out.numpy(), w, rtol=0, atol=w_tol)
        np.testing.assert_array_equal(out.numpy(), mw.w.numpy())


@given(problem=gradient_problems(zero_row=False), seed=st.integers(0, 2**32 - 1))
def test_metaweighting_direction_is_common_descent(problem, seed):
    """Theorem 1: moving against d_c decreases every query loss to first order. For the
    min-norm point d_c of the hull of the d_t: d_t . d_c >= ||d_c||^2 for every t."""
    G_q, _ = problem
    G_s = np.random.default_rng(seed).standard_normal(G_q.shape)
    mw = MetaWeighting(G_q.shape[0], alpha=1.0, eta=0.1)
    mw.update(torch.tensor(G_q @ G_s.T))
    d, d_c = mw.last_d.numpy(), mw.last_direction.numpy()
    scale = float(np.max(np.sum(d * d, axis=1)))
    assert np.all(d @ d_c >= d_c @ d_c - 1e-9 * scale)


def test_metaweighting_zero_cross_gram_leaves_w():
    mw = MetaWeighting(3)
    np.testing.assert_array_equal(mw.update(torch.zeros(3, 3)).numpy(), np.ones(3))
    assert mw.updates == 1


def test_metaweighting_does_not_project():
    """The paper's eq. 13 has no projection: a large step can make a weight negative."""
    mw = MetaWeighting(2, alpha=1e6, eta=1.0)
    w = mw.update(torch.tensor([[-1.0, 0.0], [0.0, -1.0]]))  # d = +0.5 I: w moves down
    assert bool((w < 0).all())


def test_metaweighting_state_round_trip():
    rng = np.random.default_rng(0)
    a = MetaWeighting(3, alpha=0.5, eta=1e-3)
    for _ in range(2):
        a.update(torch.tensor(rng.standard_normal((3, 3))))
    b = MetaWeighting(3, alpha=0.5, eta=1e-3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.w, b.w) and b.updates == 2
    cross = torch.tensor(rng.standard_normal((3, 3)))
    assert torch.equal(a.update(cross), b.update(cross))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_tasks": 4}, "num_tasks"),
        ({"alpha": 0.4}, "alpha"),
        ({"eta": 2e-5}, "eta"),
    ],
)
def test_metaweighting_refuses_another_state(kwargs, match):
    state = MetaWeighting(3, alpha=0.5, eta=1e-3).state_dict()
    spec = {"num_tasks": 3, "alpha": 0.5, "eta": 1e-3, **kwargs}
    other = MetaWeighting(spec.pop("num_tasks"), **spec)
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(state)


def test_metaweighting_refuses_invalid_state():
    mw = MetaWeighting(2)
    state = mw.state_dict()
    with pytest.raises(ValueError, match="invalid weights"):
        mw.load_state_dict({**state, "w": [1.0, math.nan]})
    with pytest.raises(ValueError, match="invalid weights"):
        mw.load_state_dict({**state, "w": [1.0]})
    with pytest.raises(ValueError, match="not MetaWeighting"):
        mw.load_state_dict({**state, "name": "tawt"})


# -- (d) GradNorm -------------------------------------------------------------------------------


@st.composite
def gradnorm_problems(draw):
    T = draw(st.integers(2, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = rng.uniform(0.1, 3.0, T)
    g = rng.uniform(0.01, 10.0, T) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    L0 = rng.uniform(0.5, 5.0, T)
    L = L0 * rng.uniform(0.05, 1.2, T)
    alpha = draw(st.sampled_from([0.0, 0.12, 1.5, 3.0]))
    return w, g, L, L0, alpha


def ties(G, target):
    """Entries where G_W(t) and its target agree to rounding: the subgradient there is any
    value in [-g, g], and two correct implementations may pick different signs."""
    return np.abs(G - target) <= 1e-12 * np.abs(G).max()


@given(problem=gradnorm_problems())
def test_gradnorm_weight_gradient_by_hand_and_by_autograd(problem):
    w, g, L, L0, alpha = problem
    gn = GradNorm(len(w), alpha=alpha)
    first = gn.weight_gradient(torch.tensor(w), torch.tensor(g), torch.tensor(L0))
    np.testing.assert_array_equal(gn.initial_losses.numpy(), L0)  # the first call's losses
    out = gn.weight_gradient(torch.tensor(w), torch.tensor(g), torch.tensor(L))
    np.testing.assert_array_equal(gn.initial_losses.numpy(), L0)  # ... kept, not replaced
    for got, losses in ((first, L0), (out, L)):
        assert_finite_weights(got, len(w))
        hand, G, target = np_gradnorm_gradient(w, g, losses, L0, alpha)
        ok = ~ties(G, target)
        np.testing.assert_array_equal(got.numpy()[ok], hand[ok])
        tied = got.numpy()[~ok]
        assert np.all((tied == 0) | (np.abs(tied) == g[~ok])), (tied, g[~ok])

        # Autograd on eq. 2 with the target detached (the paper: no gradient through it).
        wt = torch.tensor(w, requires_grad=True)
        ratio = torch.tensor(losses / L0)
        r = ratio / ratio.mean()
        G_W = wt * torch.tensor(g)
        L_grad = (G_W - (G_W.mean() * r**alpha).detach()).abs().sum()
        (auto,) = torch.autograd.grad(L_grad, wt)
        np.testing.assert_array_equal(got.numpy()[ok], auto.numpy()[ok])


def test_gradnorm_first_call_balances_gradient_norms():
    """At the first call every r_t is 1: the target is mean(G_W) for every task."""
    gn = GradNorm(3)
    out = gn.weight_gradient(
        torch.ones(3), torch.tensor([1.0, 2.0, 6.0]), torch.tensor([1.0, 7.0, 3.0])
    )
    np.testing.assert_array_equal(out.numpy(), [-1.0, -2.0, 6.0])  # mean 3


@given(
    w=st.lists(st.floats(-10.0, 10.0), min_size=1, max_size=8),
    k=st.floats(1e-3, 1e3),
)
def test_gradnorm_renormalize(w, k):
    w = np.asarray(w)
    out = GradNorm.renormalize(torch.tensor(w)).numpy()
    T = len(w)
    assert np.all(np.isfinite(out)) and np.all(out > 0)
    assert math.isclose(out.sum(), T, rel_tol=1e-14)
    floored = np.maximum(w, gradnorm_module.WEIGHT_FLOOR)
    np.testing.assert_allclose(out, floored * T / floored.sum(), rtol=1e-14)
    # Above the (absolute) floor, before and after scaling, only the scale changes.
    if np.all(np.minimum(w, k * w) >= gradnorm_module.WEIGHT_FLOOR):
        np.testing.assert_allclose(
            GradNorm.renormalize(torch.tensor(k * w)).numpy(), out, rtol=1e-13
        )


def test_gradnorm_state_round_trip_and_refusal():
    a = GradNorm(3, alpha=0.12)
    a.weight_gradient(torch.ones(3), torch.ones(3), torch.tensor([1.0, 2.0, 3.0]))
    b = GradNorm(3, alpha=0.12)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.initial_losses, b.initial_losses)
    args = (
        torch.tensor([0.5, 1.0, 1.5]),
        torch.tensor([2.0, 1.0, 3.0]),
        torch.tensor([0.5, 1.0, 2.0]),
    )
    assert torch.equal(a.weight_gradient(*args), b.weight_gradient(*args))
    with pytest.raises(ValueError, match="alpha"):
        GradNorm(3).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="num_tasks"):
        GradNorm(2, alpha=0.12).load_state_dict(a.state_dict())
    fresh = GradNorm(3, alpha=0.12)
    fresh.load_state_dict(GradNorm(3, alpha=0.12).state_dict())
    assert fresh.initial_losses is None


# -- (e) Uncertainty ----------------------------------------------------------------------------


@given(
    s=st.lists(st.floats(-5.0, 5.0), min_size=1, max_size=8),
    data=st.data(),
)
def test_uncertainty_gradient_matches_autograd(s, data):
    s = np.asarray(s)
    L = np.asarray(data.draw(st.lists(st.floats(1e-3, 1e3), min_size=len(s), max_size=len(s))))
    st_ = torch.tensor(s, requires_grad=True)
    # Kendall et al. eq. 10 with s = log sigma^2: (1/sigma^2) L + log sigma.
    total = (torch.exp(-st_) * torch.tensor(L) + 0.5 * st_).sum()
    (auto,) = torch.autograd.grad(total, st_)
    got = uncertainty_module.log_var_gradient(torch.tensor(s), torch.tensor(L))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), auto.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        uncertainty_module.loss_weights(torch.tensor(s)).numpy(), np.exp(-s), rtol=1e-15
    )
    # The module's forward is the same objective.
    u = Uncertainty(len(s), dtype=torch.float64)
    with torch.no_grad():
        u.log_vars.copy_(torch.tensor(s))
    u(torch.tensor(L)).backward()
    np.testing.assert_allclose(u.log_vars.grad.numpy(), auto.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(u.weights().numpy(), np.exp(-s), rtol=1e-15)


def test_uncertainty_keeps_the_dtype():
    s, L = torch.zeros(3, dtype=torch.float32), torch.ones(3, dtype=torch.float32)
    assert uncertainty_module.log_var_gradient(s, L).dtype == torch.float32
    assert uncertainty_module.loss_weights(s.double()).dtype == torch.float64


@given(
    L=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=8),
    task=st.integers(0, 7),
    c=st.floats(1e-3, 1e3),
)
def test_uncertainty_optimum_makes_weighted_losses_one_half(L, task, c):
    """For fixed losses s_t* = log(2 L_t): exp(-s_t*) L_t = 1/2 whatever the loss's scale, and
    scaling L_t by c shifts s_t* by log c."""
    L = np.asarray(L)
    task = task % len(L)
    s_star = uncertainty_module.optimal_log_vars(torch.tensor(L)).numpy()
    np.testing.assert_allclose(s_star, np.log(2 * L), rtol=1e-15, atol=1e-15)
    # Independently: SciPy's minimiser of exp(-s) L + s/2 for each task.
    for t in range(len(L)):
        res = scipy.optimize.minimize_scalar(
            lambda x, t=t: math.exp(-x) * L[t] + 0.5 * x,
            bounds=(-20, 20),
            method="bounded",
            options={"xatol": 1e-10},
        )
        assert abs(res.x - s_star[t]) <= 1e-6
    grad = uncertainty_module.log_var_gradient(torch.tensor(s_star), torch.tensor(L)).numpy()
    np.testing.assert_allclose(grad, 0.0, atol=1e-15)
    weighted = uncertainty_module.loss_weights(torch.tensor(s_star)).numpy() * L
    # log then exp: an absolute error of eps * |log 2L| <= 8 eps in s becomes relative here.
    np.testing.assert_allclose(weighted, 0.5, rtol=1e-14)
    scaled = L.copy()
    scaled[task] *= c
    s_scaled = uncertainty_module.optimal_log_vars(torch.tensor(scaled)).numpy()
    shift = np.zeros_like(L)
    shift[task] = math.log(c)
    np.testing.assert_allclose(s_scaled, s_star + shift, rtol=0, atol=1e-13)
    weighted = uncertainty_module.loss_weights(torch.tensor(s_scaled)).numpy() * scaled
    np.testing.assert_allclose(weighted, 0.5, rtol=1e-14)


# -- (f) scaling properties ---------------------------------------------------------------------


@given(
    problem=gradient_problems(zero_row=False),
    normalization=st.sampled_from(["l2", "loss"]),
    data=st.data(),
)
def test_mgda_normalized_ignores_a_tasks_loss_scale(problem, normalization, data):
    """Scaling L_t by c scales g_t by c: g_t / ||g_t|| and g_t / L_t do not change."""
    G, losses = problem
    M_norm = np_normalized_gram(G, losses, normalization)
    assume(effective_cond(M_norm) < MAX_COND)
    task = data.draw(st.integers(0, G.shape[0] - 1))
    c = data.draw(st.floats(1e-3, 1e3))
    assert_invariant_to_task_scaling(
        MGDA(normalization),
        *torch_inputs(G, losses),
        task=task,
        c=c,
        rtol=0,
        atol=lam_tolerance(M_norm),
    )


@pytest.mark.parametrize("normalization", ["none", "loss+"])
def test_mgda_other_normalizations_see_the_scale(normalization):
    """The invariance above is not automatic: without normalisation (or with L_t ||g_t||,
    which scales like c^2) a scaled task's weight moves."""
    G = np.array([[1.0, 0.0], [0.0, 1.0]])
    gram, L = torch_inputs(G, np.ones(2))
    with pytest.raises(AssertionError):
        assert_invariant_to_task_scaling(
            MGDA(normalization), gram, L, task=0, c=2.0, rtol=0, atol=1e-6
        )


@given(
    problem=gradient_problems(),
    paradigm=st.sampled_from(["joint", "normalized-joint", "pretrain"]),
    data=st.data(),
)
def test_tawt_cosine_update_ignores_a_tasks_gradient_scale(problem, paradigm, data):
    G, _ = problem
    task = data.draw(st.integers(0, G.shape[0] - 1))
    c = data.draw(st.floats(1e-3, 1e3))
    assert_invariant_to_task_scaling(
        TAWTOnGram(paradigm), torch.tensor(G @ G.T), task=task, c=c, rtol=1e-12, atol=1e-15
    )


def gradnorm_root(w, g, L, L0, alpha, *, t):
    """The w_t (others fixed) where pyxtask's GradNorm gradient for task t changes sign, by
    bisection; G_W(t) - target_t is increasing in w_t when r_t^alpha < T."""

    def sign(x):
        ww = w.copy()
        ww[t] = x
        return float(
            gradnorm_module.weight_gradient(
                torch.tensor(ww), torch.tensor(g), torch.tensor(L), torch.tensor(L0), alpha
            )[t]
        )

    lo, hi = 0.0, 1.0
    while sign(hi) < 0:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if sign(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@given(problem=gradnorm_problems(), c=st.floats(1e-2, 1e2))
def test_gradnorm_equilibrium_weight_scales_inversely(problem, c):
    """Scaling task t's loss by c (from the start, so L_t(0) too) scales its gradient norm by
    c and leaves r_t alone; the w_t at which G_W(t) meets its target scales by 1/c."""
    w, g, L, L0, alpha = problem
    T = len(w)
    r = gradnorm_module.inverse_training_rates(torch.tensor(L), torch.tensor(L0)).numpy()
    t = int(np.argmin(r))  # r_t <= 1 < T: the root exists and is unique
    root = gradnorm_root(w, g, L, L0, alpha, t=t)
    # By hand: w_t g_t = (w_t g_t + S) r_t^alpha / T with S = sum_{s != t} w_s g_s.
    ra = (np.mean(L / L0) ** -1 * L[t] / L0[t]) ** alpha
    S = float(np.sum(np.delete(w * g, t)))
    expected = ra / T * S / (g[t] * (1 - ra / T))
    assert math.isclose(root, expected, rel_tol=1e-9)

    g_c, L_c, L0_c = g.copy(), L.copy(), L0.copy()
    g_c[t] *= c
    L_c[t] *= c
    L0_c[t] *= c
    r_c = gradnorm_module.inverse_training_rates(torch.tensor(L_c), torch.tensor(L0_c)).numpy()
    np.testing.assert_allclose(r_c, r, rtol=1e-14)
    root_c = gradnorm_root(w, g_c, L_c, L0_c, alpha, t=t)
    # Bisection stops at adjacent floats; the roots themselves agree to rounding.
    assert math.isclose(root_c, root / c, rel_tol=1e-9)


def gradnorm_residual(w, g, r, alpha):
    """|G_W(t) - target_t| / target_t from pyxtask's targets."""
    w, g = torch.tensor(w), torch.tensor(g)
    target = gradnorm_module.targets(w, g, r, alpha)
    return ((w * g - target).abs() / target).numpy()


@given(problem=gradnorm_problems(), alpha=st.sampled_from([0.0, 1.0]), data=st.data())
def test_gradnorm_full_equilibrium_scales_inversely(problem, alpha, data):
    """For alpha in {0, 1} the weights with every G_W(t) on target are w_t ∝ r_t^alpha / ||g_t||;
    scaling task t's gradient norm by c divides its weight, relative to the others, by c."""
    _, g, L, L0, _ = problem
    T = len(g)
    task = data.draw(st.integers(0, T - 1))
    c = data.draw(st.floats(1e-2, 1e2))
    r = gradnorm_module.inverse_training_rates(torch.tensor(L), torch.tensor(L0))
    # (Not renormalised: the equilibrium is scale-free, and the floor must not interfere.)
    w_star = (r**alpha / torch.tensor(g)).numpy()
    assert gradnorm_residual(w_star, g, r, alpha).max() <= 1e-13
    g_c = g.copy()
    g_c[task] *= c
    w_c = w_star.copy()
    w_c[task] /= c
    assert gradnorm_residual(w_c, g_c, r, alpha).max() <= 1e-13
    # ... whereas the old weights are off target once the gradient norm moved.
    if abs(math.log(c)) > 0.01:
        assert gradnorm_residual(w_star, g_c, r, alpha).max() > 1e-6


@given(problem=gradnorm_problems())
def test_gradnorm_targets_sum_to_mean_r_alpha_times_the_total(problem):
    """sum_t target_t = mean(r^alpha) sum_t G_W(t): every G_W(t) can be on target at once only
    when mean(r^alpha) = 1, i.e. alpha in {0, 1} or equal rates (Jensen); otherwise L_grad
    stays positive and only the per-task equilibria above exist."""
    w, g, L, L0, alpha = problem
    r = gradnorm_module.inverse_training_rates(torch.tensor(L), torch.tensor(L0))
    target = gradnorm_module.targets(torch.tensor(w), torch.tensor(g), r, alpha).numpy()
    r_np = (L / L0) / np.mean(L / L0)
    assert math.isclose(target.sum(), np.mean(r_np**alpha) * np.sum(w * g), rel_tol=1e-13)


# -- (g) bad inputs -----------------------------------------------------------------------------

GOOD = torch.eye(3, dtype=torch.float64)
NAN_GRAM = torch.eye(3, dtype=torch.float64)
NAN_GRAM[1, 2] = math.nan


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: MGDA()(torch.ones(2, 3)), r"mgda: gram must be a square T x T matrix.*\(2, 3\)"),
        (lambda: MGDA()(torch.ones(3)), r"mgda: gram must be a square"),
        (lambda: MGDA()(torch.ones(2, 2, 2)), r"mgda: gram must be a square"),
        (lambda: MGDA()(torch.ones(0, 0)), r"mgda: gram is 0 x 0"),
        (lambda: MGDA()(torch.eye(65)), r"mgda: gram has 65 tasks; at most 64"),
        (lambda: MGDA()(NAN_GRAM), r"mgda: gram has non-finite entries"),
        (lambda: MGDA()(GOOD * math.inf), r"mgda: gram has non-finite entries"),
        (lambda: MGDA()(GOOD, torch.ones(2)), r"mgda: losses must have shape \(3,\).*\(2,\)"),
        (lambda: MGDA()(GOOD, torch.ones(3, 1)), r"mgda: losses must have shape \(3,\)"),
        (
            lambda: MGDA("loss")(GOOD, torch.tensor([1.0, math.nan, 1.0])),
            r"mgda: losses have non-finite entries",
        ),
        (lambda: MGDA("loss")(GOOD), r"mgda: normalization 'loss' needs the task losses"),
        (lambda: MGDA("loss+")(GOOD), r"mgda: normalization 'loss\+' needs the task losses"),
        (lambda: MGDA("l1"), r"mgda: unknown normalization 'l1'"),
        (lambda: MGDA(tol=-1.0), r"mgda: tol"),
        (
            lambda: MetaWeighting(3).update(torch.ones(3, 2)),
            r"metaweighting: cross_gram must be 3 x 3.*\(3, 2\)",
        ),
        (lambda: MetaWeighting(3).update(NAN_GRAM), r"metaweighting: cross_gram has non-finite"),
        (lambda: MetaWeighting(0), r"metaweighting: num_tasks must be in 1\.\.64"),
        (lambda: MetaWeighting(2, alpha=0.0), r"metaweighting: alpha must be finite and > 0"),
        (lambda: MetaWeighting(2, eta=math.nan), r"metaweighting: eta must be finite and > 0"),
        (
            lambda: GradNorm(3).weight_gradient(torch.ones(3), torch.ones(2), torch.ones(3)),
            r"gradnorm: grad norms must have shape \(3,\), got \(2,\)",
        ),
        (
            lambda: GradNorm(3).weight_gradient(torch.ones(3), torch.ones(3), torch.ones(4)),
            r"gradnorm: losses must have shape \(3,\), got \(4,\)",
        ),
        (
            lambda: GradNorm(2).weight_gradient(
                torch.ones(2), torch.ones(2), torch.tensor([1.0, math.nan])
            ),
            r"gradnorm: losses have non-finite entries",
        ),
        (
            lambda: GradNorm(2).weight_gradient(
                torch.ones(2), torch.ones(2), torch.tensor([1.0, 0.0])
            ),
            r"gradnorm: initial losses must be > 0",
        ),
        (
            lambda: GradNorm(2).weight_gradient(torch.ones(2), -torch.ones(2), torch.ones(2)),
            r"gradnorm: grad norms must be >= 0",
        ),
        (
            lambda: GradNorm.renormalize(torch.tensor([1.0, math.inf])),
            r"gradnorm: weights have non-finite",
        ),
        (lambda: GradNorm(2, alpha=-1.0), r"gradnorm: alpha must be finite and >= 0"),
        (lambda: Uncertainty(3)(torch.ones(2)), r"uncertainty: losses must have shape \(3,\)"),
        (lambda: Uncertainty(0), r"uncertainty: num_tasks must be >= 1"),
    ],
)
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_input_leaves_state_alone():
    mw = MetaWeighting(3)
    with pytest.raises(ValueError):
        mw.update(NAN_GRAM)
    assert mw.updates == 0 and torch.equal(mw.w, torch.ones(3, dtype=torch.float64))
    gn = GradNorm(2)
    with pytest.raises(ValueError):
        gn.weight_gradient(torch.ones(2), torch.ones(2), torch.tensor([1.0, 0.0]))
    assert gn.initial_losses is None


def test_metaweighting_overflow_is_a_floating_point_error():
    mw = MetaWeighting(2, alpha=1e300, eta=1.0)
    with pytest.raises(FloatingPointError, match="overflows"):
        mw.update(torch.tensor([[1e300, 0.0], [0.0, 1e300]], dtype=torch.float64))
    assert mw.updates == 0 and torch.equal(mw.w, torch.ones(2, dtype=torch.float64))


# -- docs examples -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [
        "pyxtask.weighting.mgda",
        "pyxtask.weighting.metaweighting",
        "pyxtask.weighting.gradnorm",
        "pyxtask.weighting.uncertainty",
    ],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(
        importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0
