"""Task weightings against an independent float64 NumPy version of TAWT (eqs. 2.7-2.8).

The reference below is written from the paper (Chen et al., eqs. 2.7-2.8 and App. B,
"Settings for weighted training"), not from ``pyxtask.weighting``: the similarity is
``s_t = cos(grad L_0, grad L_t)`` (or the plain dot product, or ``grad L_0^T H^-1 grad L_t``),
``g_t = -c * s_t`` and one mirror-descent step is ``w_t exp(-eta g_t) / sum(...)``. The three
paradigms fix the starting point: "joint" (uniform per-example loss factors, ω ∝ n_t),
"normalized-joint" (ω = 1/T) and "pretrain" (sources only, target weight 0 forever).

Tolerances: everything is float64. A similarity is a ratio of sums of at most a few hundred
products, so it carries a relative error of ~1e-14; in the exponent it is multiplied by at most
eta * c = 300, giving an absolute exponent error (hence a relative weight error) well below
1e-10. Weights that underflow to denormals are covered by a small absolute tolerance.
"""

import doctest
import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyxtask.gradients import GradientStats, TaskGradients
from pyxtask.weighting import TAWT, SampleSize, TargetOnly, Uniform, exact_reference

PARADIGMS = ["joint", "normalized-joint", "pretrain"]
RTOL, ATOL = 1e-10, 1e-13  # see the module docstring

# -- the independent NumPy reference ----------------------------------------------------------


def np_included(T, paradigm):
    inc = np.ones(T, dtype=bool)
    if paradigm == "pretrain":
        inc[0] = False
    return inc


def np_initial(sizes, paradigm):
    """(w0, omega0) of a paradigm, from the paper's definitions (App. B)."""
    n = np.asarray(sizes, dtype=np.float64)
    T = n.size
    inc = np_included(T, paradigm)
    if paradigm == "normalized-joint":
        omega = np.full(T, 1.0 / T)  # every task counts the same
        w = (1.0 / n) / np.sum(1.0 / n)  # per-example factors w ∝ omega / n
    else:  # joint / pretrain: every example in the objective counts the same
        w = np.where(inc, 1.0, 0.0) / inc.sum()
        omega = np.where(inc, n, 0.0) / n[inc].sum()
    return w, omega


def np_similarities(G, similarity):
    """s_t against the target's gradient (row 0); a cosine with a zero vector is 0."""
    G = np.asarray(G, dtype=np.float64)
    dots = G @ G[0]
    if similarity == "dot":
        return dots
    norms = np.sqrt(np.sum(G * G, axis=1))
    denom = norms * norms[0]
    out = np.zeros_like(dots)
    ok = denom > 0
    out[ok] = dots[ok] / denom[ok]
    return out


def np_mirror_descent(w, g, eta):
    """Eq. 2.8 in the log domain; zero weights stay zero."""
    w = np.asarray(w, dtype=np.float64)
    out = np.zeros_like(w)
    pos = w > 0
    logits = np.log(w[pos]) - eta * np.asarray(g, dtype=np.float64)[pos]
    logits -= logits.max()
    e = np.exp(logits)
    out[pos] = e / e.sum()
    return out


def np_tawt_step(w, s, c, eta, paradigm):
    inc = np_included(len(w), paradigm)
    g = np.where(inc, -c * np.asarray(s, dtype=np.float64), 0.0)
    return np_mirror_descent(w, g, eta)


def stats_from_G(G):
    """GradientStats exactly as a buffer-mode backward would measure G (row 0 = target)."""
    G = np.asarray(G, dtype=np.float64)
    gram = G @ G.T
    return GradientStats(
        sq_norms=torch.tensor(np.diag(gram).copy()),
        reference_dots=torch.tensor(G @ G[0]),
        reference_sq_norm=float(G[0] @ G[0]),
        gram=torch.tensor(gram),
        measured=torch.ones(G.shape[0], dtype=torch.bool),
    )


def assert_simplex(w, included=None):
    w = np.asarray(w, dtype=np.float64)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    assert math.isclose(w.sum(), 1.0, abs_tol=1e-12)
    if included is not None:
        assert np.all(w[~included] == 0.0)


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), b, rtol=rtol, atol=atol)


@st.composite
def gradient_problems(draw):
    T = draw(st.integers(2, 8))
    P = draw(st.integers(1, 50))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((T, P)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    # A zero gradient now and then (cosine convention: 0, never NaN).
    zero_rows = draw(st.lists(st.integers(0, T - 1), max_size=1))
    G[zero_rows] = 0.0
    sizes = draw(st.lists(st.integers(1, 100_000), min_size=T, max_size=T))
    return G, sizes


# -- 1. TAWT against the reference -------------------------------------------------------------


@given(
    problem=gradient_problems(),
    c=st.floats(0.5, 100.0),
    eta=st.floats(0.1, 3.0),
    paradigm=st.sampled_from(PARADIGMS),
    similarity=st.sampled_from(["cosine", "dot"]),
)
def test_tawt_update_matches_numpy_reference(problem, c, eta, paradigm, similarity):
    G, sizes = problem
    if similarity == "dot":
        G = G / max(1.0, np.abs(G).max()) / 8  # keep c * eta * |dot| <= 300 (float range)
    tawt = TAWT(sizes, paradigm, similarity=similarity, c=c, lr=eta)
    w0, omega0 = np_initial(sizes, paradigm)
    close(tawt.w, w0)
    close(tawt.omega, omega0)

    s = tawt.similarities(stats_from_G(G))
    close(s, np_similarities(G, similarity))
    tawt.update(s)

    # Mirror descent on w and on omega agree up to n_t, which the normalisation removes.
    s_ref = np_similarities(G, similarity)
    close(tawt.w, np_tawt_step(w0, s_ref, c, eta, paradigm))
    close(tawt.omega, np_tawt_step(omega0, s_ref, c, eta, paradigm))
    assert_simplex(tawt.w.numpy(), np_included(len(sizes), paradigm))
    assert_simplex(tawt.omega.numpy(), np_included(len(sizes), paradigm))


def small_multitask_model(seed, T=3):
    """A float64 tanh encoder (shared) with one linear head per task, and each task's data."""
    g = torch.Generator().manual_seed(seed)
    enc = torch.nn.Linear(5, 4).double()
    heads = [torch.nn.Linear(4, 1).double() for _ in range(T)]
    with torch.no_grad():
        for p in [*enc.parameters(), *(p for h in heads for p in h.parameters())]:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    data = [
        (
            torch.randn(7 + t, 5, generator=g, dtype=torch.float64),
            torch.randn(7 + t, generator=g, dtype=torch.float64),
        )
        for t in range(T)
    ]

    def losses():
        return [
            ((heads[t](torch.tanh(enc(x))).squeeze(-1) - y) ** 2).mean()
            for t, (x, y) in enumerate(data)
        ]

    return enc, heads, losses


@pytest.mark.parametrize("mode", ["buffer", "streaming"])
@pytest.mark.parametrize("paradigm", PARADIGMS)
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_tawt_through_task_gradients_matches_numpy(mode, paradigm, similarity):
    sizes = [50, 400, 1200]
    c, eta = (30.0, 0.7) if similarity == "cosine" else (0.3, 0.5)
    enc, heads, losses = small_multitask_model(seed=3)
    shared = list(enc.parameters())
    # Independent per-task gradients of the shared parameters (row-major, parameter order).
    G = np.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared)]).numpy()
            for loss in losses()
        ]
    )
    tawt = TAWT(sizes, paradigm, similarity=similarity, c=c, lr=eta)
    w, omega = np_initial(sizes, paradigm)
    with TaskGradients(
        shared, 3, mode=mode, task_parameters=[h.parameters() for h in heads]
    ) as grads:
        for _ in range(3):  # the gradients are fixed (no optimizer step): three updates
            for p in enc.parameters():
                p.grad = None
            stats = grads.backward(losses(), weights=tawt.loss_factors())
            assert bool(stats.measured.all())  # the target is measured even at weight 0
            tawt.update(tawt.similarities(stats))
            s_ref = np_similarities(G, similarity)
            w = np_tawt_step(w, s_ref, c, eta, paradigm)
            omega = np_tawt_step(omega, s_ref, c, eta, paradigm)
            # Gradients come from a different summation order (hooks / gather): ~1e-15 rel.
            close(tawt.similarities(stats), s_ref, rtol=1e-11, atol=1e-14)
            close(tawt.w, w, rtol=1e-9)
            close(tawt.omega, omega, rtol=1e-9)
    assert tawt.updates == 3


# -- 2. mathematical properties ---------------------------------------------------------------


@given(
    sizes=st.lists(st.integers(1, 10_000), min_size=2, max_size=8),
    paradigm=st.sampled_from(PARADIGMS),
    c=st.floats(0.5, 100.0),
    eta=st.floats(0.1, 3.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_weights_stay_on_the_simplex_over_many_updates(sizes, paradigm, c, eta, seed):
    rng = np.random.default_rng(seed)
    tawt = TAWT(sizes, paradigm, c=c, lr=eta)
    inc = np_included(len(sizes), paradigm)
    for _ in range(60):
        tawt.update(torch.tensor(rng.uniform(-1, 1, len(sizes))))
        assert_simplex(tawt.w.numpy(), inc)
        assert_simplex(tawt.omega.numpy(), inc)
    assert tawt.updates == 60 and len(tawt.trajectory) == 61


@given(
    problem=gradient_problems(),
    paradigm=st.sampled_from(PARADIGMS),
    c=st.floats(0.5, 100.0),
    eta=st.floats(0.1, 3.0),
    perm_seed=st.integers(0, 2**32 - 1),
)
def test_permuting_sources_permutes_the_weights(problem, paradigm, c, eta, perm_seed):
    G, sizes = problem
    T = len(sizes)
    perm = np.concatenate([[0], 1 + np.random.default_rng(perm_seed).permutation(T - 1)])
    a = TAWT(sizes, paradigm, c=c, lr=eta)
    b = TAWT([sizes[i] for i in perm], paradigm, c=c, lr=eta)
    for _ in range(3):
        a.update(a.similarities(stats_from_G(G)))
        b.update(b.similarities(stats_from_G(G[perm])))
        close(b.w, a.w.numpy()[perm])
        close(b.omega, a.omega.numpy()[perm])


@given(
    problem=gradient_problems(),
    paradigm=st.sampled_from(PARADIGMS),
    c=st.floats(0.5, 100.0),
    k=st.floats(1e-3, 1e3),
)
def test_cosine_update_ignores_gradient_scale(problem, paradigm, c, k):
    G, sizes = problem
    a, b = TAWT(sizes, paradigm, c=c), TAWT(sizes, paradigm, c=c)
    a.update(a.similarities(stats_from_G(G)))
    b.update(b.similarities(stats_from_G(k * G)))
    close(b.w, a.w.numpy())
    close(b.omega, a.omega.numpy())


@given(
    problem=gradient_problems(),
    paradigm=st.sampled_from(PARADIGMS),
    c=st.floats(0.5, 10.0),
    k=st.floats(0.1, 10.0),
)
def test_dot_variant_is_bilinear(problem, paradigm, c, k):
    G, sizes = problem
    G = G / max(1.0, np.abs(G).max()) / 30  # c * k^2 * |dot| stays a few hundred at most
    a = TAWT(sizes, paradigm, similarity="dot", c=c)
    b = TAWT(sizes, paradigm, similarity="dot", c=c * k * k)
    a.update(a.similarities(stats_from_G(k * G)))
    b.update(b.similarities(stats_from_G(G)))
    close(a.w, b.w.numpy(), rtol=1e-9)
    close(a.omega, b.omega.numpy(), rtol=1e-9)


@given(
    sizes=st.lists(st.integers(1, 10_000), min_size=3, max_size=8),
    paradigm=st.sampled_from(PARADIGMS),
    c=st.floats(0.5, 100.0),
    eta=st.floats(0.1, 3.0),
    data=st.data(),
)
def test_more_similar_source_gains_relative_weight(sizes, paradigm, c, eta, data):
    T = len(sizes)
    i, j = data.draw(st.lists(st.integers(1, T - 1), min_size=2, max_size=2, unique=True))
    s = np.array(data.draw(st.lists(st.floats(-1, 1), min_size=T, max_size=T)))
    s[j] = data.draw(st.floats(-1, 0.9))
    s[i] = data.draw(st.floats(s[j] + 0.05, 1.0))  # c * eta * (s_i - s_j) >= 0.005
    tawt = TAWT(sizes, paradigm, c=c, lr=eta)
    w0, omega0 = tawt.w.numpy(), tawt.omega.numpy()
    tawt.update(torch.tensor(s))
    w1, omega1 = tawt.w.numpy(), tawt.omega.numpy()
    assert w1[i] / w1[j] > w0[i] / w0[j]
    assert omega1[i] / omega1[j] > omega0[i] / omega0[j]
    # ... by exactly exp(eta * c * (s_i - s_j)).
    assert math.isclose(
        (w1[i] / w1[j]) / (w0[i] / w0[j]), math.exp(eta * c * (s[i] - s[j])), rel_tol=1e-10
    )


@given(
    sizes=st.lists(st.integers(1, 10_000), min_size=2, max_size=8),
    paradigm=st.sampled_from(PARADIGMS),
    c=st.floats(0.5, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_tiny_step_barely_moves(sizes, paradigm, c, seed):
    eta = 1e-9
    s = np.random.default_rng(seed).uniform(-1, 1, len(sizes))
    tawt = TAWT(sizes, paradigm, c=c, lr=eta)
    w0 = tawt.w.numpy()
    tawt.update(torch.tensor(s))
    # |w'_t - w_t| <= w_t (exp(eta * range(g)) - 1) with range(g) <= 2c.
    bound = w0 * math.expm1(eta * 2 * c) * 1.01 + 1e-15
    assert np.all(np.abs(tawt.w.numpy() - w0) <= bound)


@pytest.mark.parametrize("paradigm", PARADIGMS)
@pytest.mark.parametrize("scale", [1e4, 1e6, 1e200])
def test_huge_c_times_s_does_not_overflow(paradigm, scale):
    sizes = [10, 300, 20, 5000]
    s = np.array([1.0, 0.9, -1.0, 0.3])
    tawt = TAWT(sizes, paradigm, c=scale, lr=3.0)
    tawt.update(torch.tensor(s))
    inc = np_included(4, paradigm)
    assert_simplex(tawt.w.numpy(), inc)
    assert_simplex(tawt.omega.numpy(), inc)
    winner = int(np.argmax(np.where(inc, s, -np.inf)))
    assert tawt.omega[winner] == pytest.approx(1.0)
    close(tawt.w, np_tawt_step(np_initial(sizes, paradigm)[0], s, scale, 3.0, paradigm))


# -- 3. the exact variant ---------------------------------------------------------------------


def mlp_problem(seed=0):
    """A 3-4-1 tanh MLP in float64 (P = 3*4 + 4 + 4 = 20) and three regression tasks."""
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(),
        torch.randn(4, generator=g, dtype=torch.float64).requires_grad_(),
        torch.randn(4, generator=g, dtype=torch.float64).requires_grad_(),
    ]
    data = [
        (
            torch.randn(9, 3, generator=g, dtype=torch.float64),
            torch.randn(9, generator=g, dtype=torch.float64),
        )
        for _ in range(3)
    ]

    def loss(t, W1, b1, w2):
        x, y = data[t]
        return ((torch.tanh(x @ W1.T + b1) @ w2 - y) ** 2).mean()

    def unflatten(theta):
        return theta[:12].reshape(4, 3), theta[12:16], theta[16:20]

    return params, loss, unflatten


@pytest.mark.parametrize("mode", ["buffer", "streaming"])
@pytest.mark.parametrize("paradigm", ["joint", "normalized-joint"])
def test_exact_reference_solves_the_damped_system(mode, paradigm):
    params, loss, unflatten = mlp_problem(seed=1)
    sizes = [9, 30, 90]
    c = 2.0
    tawt = TAWT(sizes, paradigm, similarity="exact", c=c, lr=0.5)
    omega = tawt.omega.tolist()

    def hessian_loss():
        return sum(omega[t] * loss(t, *params) for t in range(3))

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    H = torch.autograd.functional.hessian(
        lambda th: sum(omega[t] * loss(t, *unflatten(th)) for t in range(3)), theta
    )
    eig = torch.linalg.eigvalsh(H)
    # Damping that makes H + dI safely positive definite but leaves H visible in the solve.
    d = max(0.0, -float(eig[0])) + 0.1 * float(eig[-1] - eig[0]) + 1e-3
    A = H + d * torch.eye(20, dtype=torch.float64)
    grads = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(t, *params), params)])
        for t in range(3)
    ]
    b_pieces = torch.autograd.grad(loss(0, *params), params)

    x, result = exact_reference(hessian_loss, params, b_pieces, damping=d, max_iter=200, tol=1e-12)
    assert result.converged and result.residual <= 1e-12
    assert x.shape == (20,) and x.dtype == torch.float64
    # The dense H comes from a different route (functional.hessian): CG's recurrence residual
    # may drift from the true one by ~cond * eps, cond <= ~11 here.
    b = grads[0]
    assert float(torch.linalg.norm(A @ x - b)) <= 1e-9 * float(torch.linalg.norm(b))

    # s_t = x . grad L_t from one backward with reference=x, vs dense b^T (H + dI)^-1 grad L_t.
    dense = np.array([float(b @ torch.linalg.solve(A, gt)) for gt in grads])
    assert dense[0] > 0  # b^T A^-1 b with A positive definite
    with TaskGradients(params, 3, mode=mode) as tg:
        stats = tg.backward([loss(t, *params) for t in range(3)], weights=[1.0] * 3, reference=x)
    close(stats.reference_dots, dense, rtol=1e-8, atol=1e-12)
    assert stats.reference_sq_norm == pytest.approx(float(x @ x), rel=1e-12)
    s = tawt.similarities(stats)
    close(s, dense, rtol=1e-8, atol=1e-12)

    # Eq. 2.7: g_t = -grad L_0^T H^-1 grad L_t, scaled by c; eq. 2.8 step on w and omega.
    w0, omega0 = np_initial(sizes, paradigm)
    tawt.update(s)
    close(tawt.w, np_mirror_descent(w0, -c * dense, 0.5), rtol=1e-7)
    close(tawt.omega, np_mirror_descent(omega0, -c * dense, 0.5), rtol=1e-7)


# -- 4. identity Hessian: exact == dot with c = 1/h ---------------------------------------------


@given(
    h=st.floats(0.1, 10.0),
    paradigm=st.sampled_from(PARADIGMS),
    mode=st.sampled_from(["buffer", "streaming"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_identity_hessian_exact_equals_dot(h, paradigm, mode, seed):
    g = torch.Generator().manual_seed(seed)
    T = 4
    sizes = [int(n) for n in torch.randint(1, 1000, (T,), generator=g)]
    params = [
        torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_(),
        torch.randn(4, generator=g, dtype=torch.float64).requires_grad_(),
    ]
    a = [torch.randn(10, generator=g, dtype=torch.float64) for _ in range(T)]

    def losses():
        flat = torch.cat([p.reshape(-1) for p in params])
        return [0.5 * h * (flat @ flat) + a[t] @ flat for t in range(T)]

    exact = TAWT(sizes, paradigm, similarity="exact", damping=0.0)
    dot = TAWT(sizes, paradigm, similarity="dot", c=1.0 / h)
    for _ in range(2):
        omega = exact.omega.tolist()

        def hessian_loss(omega=omega):
            return sum(o * loss for o, loss in zip(omega, losses(), strict=True))

        b = torch.autograd.grad(losses()[0], params)
        x, result = exact_reference(hessian_loss, params, b, damping=0.0, max_iter=50, tol=1e-13)
        assert result.converged
        with TaskGradients(params, T, mode=mode) as tg:
            sx = exact.similarities(
                tg.backward(losses(), weights=exact.loss_factors(), reference=x)
            )
            for p in params:
                p.grad = None
            sd = dot.similarities(tg.backward(losses(), weights=dot.loss_factors()))
            for p in params:
                p.grad = None
        close(sx, sd.numpy() / h, rtol=1e-12, atol=1e-12)
        exact.update(sx)
        dot.update(sd)
        close(exact.w, dot.w.numpy(), rtol=1e-11, atol=1e-14)
        close(exact.omega, dot.omega.numpy(), rtol=1e-11, atol=1e-14)


# -- 5. fixed weightings, validation, state ------------------------------------------------------

sizes_lists = st.lists(st.integers(1, 100_000), min_size=2, max_size=8)


@given(sizes=st.lists(st.integers(1, 100_000), min_size=1, max_size=8))
def test_target_only(sizes):
    wt = TargetOnly(sizes)
    expected = np.zeros(len(sizes))
    expected[0] = 1.0
    np.testing.assert_array_equal(wt.omega.numpy(), expected)
    np.testing.assert_array_equal(wt.w.numpy(), expected)
    np.testing.assert_array_equal(wt.loss_factors().numpy(), expected)  # K = 1
    assert not wt.needs_gradients


@given(sizes=sizes_lists, paradigm=st.sampled_from(["joint", "pretrain"]))
def test_sample_size(sizes, paradigm):
    wt = SampleSize(sizes, paradigm)
    n = np.asarray(sizes, dtype=np.float64)
    inc = np_included(len(sizes), paradigm)
    close(wt.omega, np.where(inc, n, 0.0) / n[inc].sum(), rtol=1e-14, atol=0)
    close(wt.loss_factors(), inc.astype(np.float64), rtol=1e-14, atol=0)  # K * w = 1 each
    close(wt.loss_factors(), inc.sum() * wt.w.numpy(), rtol=1e-15, atol=0)


@given(sizes=sizes_lists)
def test_uniform(sizes):
    wt = Uniform(sizes)
    T = len(sizes)
    close(wt.omega, np.full(T, 1.0 / T), rtol=1e-14, atol=0)
    n = np.asarray(sizes, dtype=np.float64)
    close(wt.loss_factors(), T * (1.0 / n) / np.sum(1.0 / n), rtol=1e-14, atol=0)
    close(wt.loss_factors(), T * wt.w.numpy(), rtol=1e-15, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TargetOnly([5, 6, 7]),
        lambda: SampleSize([5, 6, 7]),
        lambda: SampleSize([5, 6, 7], "pretrain"),
        lambda: Uniform([5, 6, 7]),
    ],
)
def test_fixed_weightings_do_not_move(make):
    wt = make()
    w, omega = wt.w.clone(), wt.omega.clone()
    wt.update(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))
    wt.update()
    assert torch.equal(wt.w, w) and torch.equal(wt.omega, omega)
    assert wt.updates == 0
    # w is returned as a copy: mutating it leaves the weighting alone.
    wt.w.mul_(0)
    assert torch.equal(wt.w, w)


@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_tawt_loss_factors_are_k_times_w(paradigm):
    tawt = TAWT([10, 20, 30, 40], paradigm)
    K = 3 if paradigm == "pretrain" else 4
    for s in ([0.1, 0.5, -0.3, 0.9], [1.0, -1.0, 0.0, 0.2]):
        tawt.update(torch.tensor(s, dtype=torch.float64))
        close(tawt.loss_factors(), K * tawt.w.numpy(), rtol=1e-15, atol=0)


def test_trajectory_records_every_update():
    sizes = [20, 100, 300]
    tawt = TAWT(sizes, "joint", c=3.0)
    assert len(tawt.trajectory) == 1
    first = tawt.trajectory[0]
    assert first["update"] == 0 and first["similarity"] is None
    close(first["w"], np_initial(sizes, "joint")[0], rtol=1e-15, atol=0)
    close(first["omega"], np_initial(sizes, "joint")[1], rtol=1e-15, atol=0)
    sims = [[1.0, 0.2, -0.4], [1.0, -0.1, 0.7], [1.0, 0.0, 0.0]]
    for k, s in enumerate(sims, start=1):
        tawt.update(torch.tensor(s, dtype=torch.float64), epoch=k, step=10 * k)
        row = tawt.trajectory[-1]
        assert row["update"] == k == tawt.updates and row["epoch"] == k and row["step"] == 10 * k
        assert row["similarity"] == s
        close(row["w"], tawt.w.numpy(), rtol=0, atol=0)
        close(row["omega"], tawt.omega.numpy(), rtol=0, atol=0)
    assert len(tawt.trajectory) == len(sims) + 1


def test_tawt_state_round_trip():
    sizes = [20, 100, 300, 7]
    kwargs = {"similarity": "cosine", "c": 10.0, "lr": 0.5}
    a = TAWT(sizes, "pretrain", **kwargs)
    rng = np.random.default_rng(0)
    for epoch in range(4):
        a.update(torch.tensor(rng.uniform(-1, 1, 4)), epoch=epoch)
    state = a.state_dict()
    b = TAWT(sizes, "pretrain", **kwargs)
    b.load_state_dict(state)
    assert torch.equal(a.w, b.w) and torch.equal(a.omega, b.omega)
    assert b.updates == a.updates == 4
    assert b.trajectory == a.trajectory and len(b.trajectory) == 5
    # The resumed weighting continues exactly like the original.
    s = torch.tensor(rng.uniform(-1, 1, 4))
    a.update(s)
    b.update(s)
    assert torch.equal(a.w, b.w) and b.updates == 5 and b.trajectory == a.trajectory


@pytest.mark.parametrize(
    "other",
    [
        {"c": 11.0},
        {"lr": 1.0},
        {"similarity": "dot"},
        {"sizes": [20, 100, 300, 8]},
        {"sizes": [20, 100, 300]},
        {"paradigm": "joint"},
        {"paradigm": "normalized-joint"},
    ],
)
def test_loading_a_different_tawts_state_raises(other):
    base = {"sizes": [20, 100, 300, 7], "paradigm": "pretrain", "c": 10.0, "lr": 0.5}
    a = TAWT(base["sizes"], base["paradigm"], c=base["c"], lr=base["lr"])
    a.update(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    spec = {**base, "similarity": "cosine", **other}
    b = TAWT(
        spec["sizes"], spec["paradigm"], similarity=spec["similarity"], c=spec["c"], lr=spec["lr"]
    )
    before = b.w.clone()
    with pytest.raises(ValueError):
        b.load_state_dict(a.state_dict())
    assert torch.equal(b.w, before) and b.updates == 0


@pytest.mark.parametrize(
    ("paradigm", "w"), [("joint", [0.5, 1.5, -1.0]), ("pretrain", [0.5, 0.25, 0.25])]
)
def test_loading_invalid_weights_raises(paradigm, w):
    tawt = TAWT([5, 6, 7], paradigm)
    state = tawt.state_dict()
    state["w"] = w
    with pytest.raises(ValueError, match="invalid weights"):
        tawt.load_state_dict(state)


def test_overflowing_step_is_a_floating_point_error():
    tawt = TAWT([5, 6, 7], "joint", c=10.0)
    with pytest.raises(FloatingPointError, match="overflows"):
        tawt.update(torch.tensor([1.0, 1e308, 0.0], dtype=torch.float64))
    assert tawt.updates == 0


def test_loading_another_weightings_state_raises():
    with pytest.raises(ValueError):
        TAWT([5, 6], "joint").load_state_dict(SampleSize([5, 6]).state_dict())
    with pytest.raises(ValueError):
        SampleSize([5, 6]).load_state_dict(Uniform([5, 6]).state_dict())


@pytest.mark.parametrize(
    "make",
    [
        lambda: TAWT([5, 6], similarity="cos"),
        lambda: TAWT([5, 6], c=0.0),
        lambda: TAWT([5, 6], c=-1.0),
        lambda: TAWT([5, 6], c=math.nan),
        lambda: TAWT([5, 6], lr=0.0),
        lambda: TAWT([5, 6], "single"),
        lambda: TAWT([5, 6], "bogus"),
        lambda: TAWT([5]),
        lambda: TAWT([]),
        lambda: TAWT([5, 0, 6]),
        lambda: TAWT([5, 6], damping=-1.0),
        lambda: SampleSize([5, 0]),
        lambda: SampleSize([5, 6], "normalized-joint"),
        lambda: SampleSize([5, 6], "single"),
        lambda: Uniform([0, 6]),
        lambda: Uniform([6]),
        lambda: TargetOnly([0]),
        lambda: TargetOnly([]),
    ],
)
def test_bad_constructor_arguments_raise(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("paradigm", PARADIGMS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_similarities_raise(paradigm, bad):
    tawt = TAWT([5, 6, 7], paradigm)
    before = tawt.w.clone()
    with pytest.raises(FloatingPointError):
        tawt.update(torch.tensor([0.5, bad, 0.1], dtype=torch.float64))
    assert torch.equal(tawt.w, before) and tawt.updates == 0 and len(tawt.trajectory) == 1


def test_update_needs_one_similarity_per_task():
    tawt = TAWT([5, 6, 7])
    with pytest.raises(ValueError):
        tawt.update(torch.tensor([0.5, 0.1], dtype=torch.float64))
    with pytest.raises(ValueError):
        tawt.update()


# -- 6. docs examples ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [
        "pyxtask.weighting.tawt",
        "pyxtask.weighting.uniform",
        "pyxtask.weighting.sample_size",
        "pyxtask.weighting.target_only",
        "pyxtask.gradients",
    ],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(
        importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0


# pyxtask.weighting._base has no examples (its classes are shown through their subclasses):
# a doctest run over it would attempt nothing and pass whatever the code does.
@pytest.mark.parametrize("module", ["pyxtask.weighting"])
def test_docstring_examples_elsewhere_pass(module):
    result = doctest.testmod(
        importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0
