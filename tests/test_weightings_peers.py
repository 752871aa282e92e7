"""PCGrad, IMTL-G, Aligned-MTL, DWA, FAMO and RLW against their peers and their papers.

Peers: TorchJD's ``PCGradWeighting``, ``IMTLGWeighting`` and ``AlignedMTLWeighting`` (Gram
weightings, called on the same float64 Gram), and LibMTL's ``PCGrad``, ``IMTL``, ``DWA`` and
``RLW``, whose single files are loaded without ``import LibMTL`` (its package ``__init__``
imports torchvision APIs that no longer exist) and driven through a minimal fake host: the
attributes their ``backward`` reads (``task_num``, ``device``, ``epoch``, ...) and the
gradient hooks replaced by ones that hand over a fixed Jacobian. FAMO has no installed peer; it
is checked against a plain-torch transcription of the official algorithm, with its own Adam.

Where the Gram is singular the weights are not unique; directions are then compared in the
Gram's norm, ``(w - v)^T M (w - v) = ||J^T w - J^T v||^2``, relative to the larger of the two
squared directions. Each tolerance is justified where it is used.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyxtask.bench.peers import load_libmtl
from pyxtask.weighting._loss import LossWeighting
from pyxtask.weighting.aligned_mtl import AlignedMTL, balance_transformation
from pyxtask.weighting.dwa import DWA
from pyxtask.weighting.famo import FAMO
from pyxtask.weighting.imtl_g import IMTLG
from pyxtask.weighting.pcgrad import PCGrad, pcgrad_weights, project
from pyxtask.weighting.rlw import RLW
from tests._gramians import jacobians, make_jacobian
from tests._weighting_asserts import as_array, assert_finite_weights, assert_permutation_equivariant

EPS = float(np.finfo(np.float64).eps)
FULL_RANK = ("full_rank", "conflicting", "scaled")


def rel_gram_dist(M, w, v) -> float:
    """``||J^T (w - v)||^2 / max(||J^T w||^2, ||J^T v||^2)`` (0 when both directions are 0)."""
    M, w, v = (as_array(x) for x in (M, w, v))
    d = w - v
    den = max(float(w @ M @ w), float(v @ M @ v))
    return 0.0 if den <= 0 else max(float(d @ M @ d), 0.0) / den


def condition(M) -> float:
    lam = np.linalg.eigvalsh(as_array(M))
    return float(lam.max() / lam.min()) if lam.min() > 0 else float("inf")


def torchjd(name: str):
    aggregation = pytest.importorskip("torchjd.aggregation")
    return getattr(aggregation, name)


def libmtl(name: str):
    """A fresh LibMTL weighting object of class ``name`` (its host attributes still unset)."""
    try:
        module = load_libmtl(name)
    except ImportError:
        pytest.skip("LibMTL is not installed")
    return getattr(module, name)()


# ---------------------------------------------------------------------------------------------
# PCGrad


@given(jacobians(), st.integers(0, 2**31 - 1))
def test_pcgrad_equals_torchjd_with_the_same_draws(case, seed):
    # Same global-RNG state, same randperm calls, same float64 arithmetic: bit for bit.
    PCGradWeighting = torchjd("PCGradWeighting")
    _, M = case
    gram = torch.tensor(M)
    torch.manual_seed(seed)
    theirs = PCGradWeighting()(gram)
    torch.manual_seed(seed)
    ours = PCGrad()(gram)
    assert_finite_weights(ours, gram.shape[0])
    assert torch.equal(ours, theirs)
    # A private generator seeded alike replays the global RNG's stream.
    assert torch.equal(PCGrad(generator=torch.Generator().manual_seed(seed))(gram), theirs)


@given(jacobians(min_tasks=2, max_tasks=6), st.integers(0, 2**31 - 1))
def test_pcgrad_is_the_papers_algorithm_in_gradient_space(case, seed):
    # Alg. 1 run literally on the gradients in R^n; the Gram form must give the same update.
    J, M = case
    T = J.shape[0]
    orders = [np.random.default_rng(seed + i).permutation(T).tolist() for i in range(T)]
    update = np.zeros(J.shape[1])
    for i in range(T):
        g = J[i].copy()
        for j in orders[i]:
            if j != i and g @ J[j] < 0:
                g -= (g @ J[j]) / (J[j] @ J[j]) * J[j]
        update += g
    w = as_array(pcgrad_weights(torch.tensor(M), orders))
    # A handful of rank-one updates per task: rounding of order T eps relative to the inputs.
    scale = float(np.abs(J).sum(axis=0).max()) * (1 + float(np.abs(w).max()))
    np.testing.assert_allclose(J.T @ w, update, rtol=0, atol=1e3 * T * EPS * scale)


@given(jacobians(min_tasks=2, max_tasks=8), st.integers(0, 2**31 - 1))
def test_pcgrad_leaves_no_conflict_with_the_task_just_visited(case, seed):
    # The property a projection guarantees: right after visiting j, g_i^PC . g_j >= 0 (= 0
    # if it projected). Later tasks may reintroduce it, so this is checked prefix by prefix.
    _, M = case
    gram = torch.tensor(M)
    T = gram.shape[0]
    rng = np.random.default_rng(seed)
    for i in range(T):
        order = rng.permutation(T).tolist()
        for k in range(1, T + 1):
            j = order[k - 1]
            if j == i or M[j, j] <= 0:
                continue
            c = as_array(project(gram, i, order[:k]))
            inner = float(M[j] @ c)
            # The projection zeroes the inner product up to rounding of the terms it sums.
            size = float(np.abs(M[j]) @ np.abs(c))
            assert inner >= -1e3 * T * EPS * size, (i, order[:k], inner)


@given(jacobians(min_tasks=2, max_tasks=8))
def test_pcgrad_without_conflicts_is_the_plain_sum(case):
    _, M = case
    gram = torch.tensor(np.abs(M))  # non-negative inner products: nothing conflicts
    assert torch.equal(PCGrad()(gram), torch.ones(gram.shape[0], dtype=torch.float64))


@given(jacobians(min_tasks=2, max_tasks=2), st.integers(0, 2**31 - 1))
def test_pcgrad_equals_libmtl_for_two_tasks(case, seed):
    # LibMTL also visits i itself (it never conflicts with itself for two tasks, by
    # Cauchy-Schwarz), so for T = 2 its result cannot depend on its Python-random order.
    J, M = case
    peer = libmtl("PCGrad")
    peer.task_num, peer.device, peer.rep_grad = 2, "cpu", False
    peer._compute_grad_dim = lambda: None
    peer._compute_grad = lambda losses, mode, rep_grad=False: torch.tensor(J)
    peer._reset_grad = lambda new_grads: None
    random.seed(seed)
    theirs = peer.backward(torch.ones(2))
    ours = as_array(PCGrad(order="index")(torch.tensor(M)))
    # LibMTL accumulates the same two terms; .item() keeps them float64.
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_pcgrad_orders_seeds_and_state():
    gram = torch.tensor(make_jacobian("conflicting", 6, 3) @ make_jacobian("conflicting", 6, 3).T)
    index = PCGrad(order="index")
    assert torch.equal(index(gram), pcgrad_weights(gram, [list(range(6))] * 6))
    a, b = PCGrad(seed=5), PCGrad(seed=5)
    assert torch.equal(a(gram), b(gram))
    state = a.state_dict()
    first = a(gram)
    b.load_state_dict(state)
    assert torch.equal(b(gram), first)  # the generator resumes where the checkpoint was
    assert repr(a) == "PCGrad(order='random', seed=5)"
    assert a.scale == "sum" and not a.permutation_equivariant
    with pytest.raises(ValueError, match="state is for 'index' order"):
        a.load_state_dict(index.state_dict())


# ---------------------------------------------------------------------------------------------
# IMTL-G


@given(jacobians(kinds=FULL_RANK))
def test_imtl_g_equalises_the_projections_on_unit_gradients(case):
    # For a definite M the combined direction d = J^T w has d . g_t = c ||g_t|| for all t:
    # equal projections onto every unit gradient, i.e. M w = c n. The eigendecomposition is
    # backward-stable, so the residual is O(eps ||M|| ||w||) whatever cond(M) (measured worst:
    # 2.6 of that over 3000 random problems).
    J, M = case
    w = as_array(IMTLG()(torch.tensor(M)))
    assert abs(w.sum() - 1) < 1e-9
    n = np.sqrt(np.diag(M))
    r = M @ w
    c = (n @ r) / (n @ n)
    assert np.abs(r - c * n).max() <= 1e2 * EPS * np.linalg.norm(M, 2) * np.linalg.norm(w)
    # The same, written on the gradients: projections of d onto the unit gradients.
    proj = (J @ (J.T @ w)) / n
    assert np.abs(proj - c).max() <= 1e2 * EPS * np.linalg.norm(J, 2) ** 2 * np.linalg.norm(w) / (
        n.min()
    )


@given(jacobians())
def test_imtl_g_matches_torchjd(case):
    # TorchJD: pinv (an SVD) where we use eigh; both cut at T eps lambda_max. For a definite
    # M the two solves differ by O(cond(M) eps) relative (measured worst: squared distance 92
    # (cond eps)^2 over 2250 problems); for a singular M both drop the same eigenvalues unless
    # one lies within rounding of the cut (worst measured 4e-22 over 750 problems).
    IMTLGWeighting = torchjd("IMTLGWeighting")
    _, M = case
    gram = torch.tensor(M)
    ours, theirs = IMTLG()(gram), IMTLGWeighting()(gram)
    assert_finite_weights(ours, gram.shape[0])
    # A singular M (cond inf, or the huge cond of rounding-level eigenvalues) gets the cap.
    tol = min(max(1e3 * (condition(M) * EPS) ** 2, 1e-24), 1e-8)
    assert rel_gram_dist(M, ours, theirs) <= tol


@given(jacobians(min_tasks=2, kinds=FULL_RANK))
def test_imtl_g_matches_libmtls_closed_form(case):
    # LibMTL's IMTL.backward solves the paper's (T-1) x (T-1) system g_1 U^T (D U^T)^-1 on
    # the gradients themselves; with zero loss scales (its IMTL-L part at initialisation) the
    # losses do not matter. Weights are unique for a definite M; the two solves differ by
    # O(cond eps) relative, and U's differences of unit vectors cost a few more digits.
    J, M = case
    peer = libmtl("IMTL")
    peer.task_num, peer.device, peer.rep_grad = J.shape[0], "cpu", False
    peer.init_param()
    peer._get_grads = lambda losses, mode="backward": torch.tensor(J)
    peer._backward_new_grads = lambda alpha, per_grads=None, grads=None: None
    theirs = peer.backward(torch.ones(J.shape[0]))
    ours = as_array(IMTLG()(torch.tensor(M)))
    kappa = condition(M)
    # cond(D U^T) can exceed cond(M); the direction is what the method fixes.
    assert rel_gram_dist(M, ours, theirs) <= max(1e6 * (kappa * EPS) ** 2, 1e-20), kappa


def test_imtl_g_gives_zero_gradients_no_weight():
    # Exactly singular: tasks 1 and 3 have no gradient (say, absent from the batch). Both
    # implementations see exact zero rows, so the comparison does not hinge on a rank cut.
    IMTLGWeighting = torchjd("IMTLGWeighting")
    J = make_jacobian("full_rank", 4, 11)
    J[[1, 3]] = 0
    gram = torch.tensor(J @ J.T)
    ours = IMTLG()(gram)
    assert ours[1] == 0 and ours[3] == 0
    assert rel_gram_dist(gram, ours, IMTLGWeighting()(gram)) <= 1e-20
    np.testing.assert_allclose(
        as_array(ours)[[0, 2]], as_array(IMTLG()(gram[[0, 2]][:, [0, 2]])), rtol=1e-12
    )


@given(jacobians(kinds=FULL_RANK), st.randoms(use_true_random=False))
def test_imtl_g_is_permutation_equivariant(case, rnd):
    _, M = case
    perm = list(range(M.shape[0]))
    rnd.shuffle(perm)
    # Permuting M permutes its eigenvectors: rounding-level differences, amplified by cond.
    tol = 1e3 * condition(M) * EPS
    assert_permutation_equivariant(IMTLG(), torch.tensor(M), perm=perm, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# Aligned-MTL


@given(jacobians(), st.sampled_from(["min", "median", "rmse"]))
def test_aligned_mtl_matches_torchjd(case, mode):
    # Same eigh call (upper triangle), same rank cut: only the association of B's products
    # differs (measured worst 2e-27 relative over 9000 problems).
    AlignedMTLWeighting = torchjd("AlignedMTLWeighting")
    _, M = case
    gram = torch.tensor(M)
    ours = AlignedMTL(mode)(gram)
    assert_finite_weights(ours, gram.shape[0])
    assert rel_gram_dist(M, ours, AlignedMTLWeighting(scale_mode=mode)(gram)) <= 1e-20


def test_aligned_mtl_preferences_match_torchjd():
    AlignedMTLWeighting = torchjd("AlignedMTLWeighting")
    gram = torch.tensor(make_jacobian("scaled", 3, 4) @ make_jacobian("scaled", 3, 4).T)
    pref = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ours = AlignedMTL(preferences=pref)(gram)
    # TorchJD's preference vector is a weighting of its own, applied as given.
    theirs = AlignedMTLWeighting(pref_vector=pref)(gram)
    assert rel_gram_dist(gram, ours, theirs) <= 1e-20
    assert not AlignedMTL(preferences=pref).permutation_equivariant


@given(jacobians(), st.sampled_from(["min", "median", "rmse"]))
def test_aligned_gradients_have_condition_number_one(case, mode):
    # B M B (the Gram of the aligned gradients B G) has r equal non-zero eigenvalues, lambda_s.
    # The rank cut is set well above rounding (1e-10) so rank-deficient inputs keep only their
    # true eigenvalues; the kept ones then satisfy it to O(cond_r eps) (measured <= 5).
    _, M = case
    gram = torch.tensor(M)
    T = M.shape[0]
    lam = np.linalg.eigvalsh(M)
    kept = lam[lam > 1e-10 * lam.max()]
    s = {"min": kept.min(), "median": np.sort(kept)[(len(kept) - 1) // 2], "rmse": kept.mean()}
    B = as_array(balance_transformation(gram, mode, 1e-10))
    e = np.sort(np.linalg.eigvalsh(B @ M @ B))[::-1]
    r = len(kept)
    tol = 1e3 * (kept.max() / kept.min()) * T * EPS
    np.testing.assert_allclose(e[:r] / s[mode], 1.0, rtol=0, atol=tol)
    assert np.abs(e[r:]).max(initial=0.0) <= tol * s[mode]
    # The weights are B w with w = 1/T.
    w = as_array(AlignedMTL(mode, rtol=1e-10)(gram))
    np.testing.assert_allclose(w, B @ np.full(T, 1 / T), rtol=1e-12, atol=1e-12 * np.abs(w).max())


def test_aligned_mtl_with_no_gradient_is_the_mean():
    # Every eigenvalue is zero: B is the identity (TorchJD's convention), weights 1/T.
    assert torch.equal(
        AlignedMTL()(torch.zeros(3, 3)), torch.full((3,), 1 / 3, dtype=torch.float64)
    )


# ---------------------------------------------------------------------------------------------
# DWA


def _libmtl_dwa_run(epochs: list[list[np.ndarray]], temperature: float) -> list[np.ndarray]:
    """LibMTL's DWA through its trainer's loop: per-step weights, epoch means filled after."""
    peer = libmtl("DWA")
    T = len(epochs[0][0])
    peer.task_num, peer.device = T, "cpu"
    peer.train_loss_buffer = np.zeros([T, len(epochs)])
    out = []
    for epoch, steps in enumerate(epochs):
        peer.epoch = epoch
        for losses in steps:
            out.append(peer.backward(torch.tensor(losses, requires_grad=True), T=temperature))
        peer.train_loss_buffer[:, epoch] = np.mean(steps, axis=0)
    return out


@given(
    st.integers(1, 6),
    st.integers(3, 6),
    st.integers(1, 4),
    st.floats(0.5, 4.0),
    st.integers(0, 2**31 - 1),
)
def test_dwa_matches_libmtl(T, n_epochs, steps, temperature, seed):
    rng = np.random.default_rng(seed)
    epochs = [[rng.uniform(0.1, 3.0, size=T) for _ in range(steps)] for _ in range(n_epochs)]
    theirs = _libmtl_dwa_run(epochs, temperature)
    dwa = DWA(T, temperature=temperature)
    ours = []
    for steps_losses in epochs:
        for losses in steps_losses:
            ours.append(as_array(dwa.observe(torch.tensor(losses))))
        dwa.epoch_end()
    # LibMTL builds its ratios with torch.Tensor, in float32: r / Temp is off by up to
    # eps32 r / Temp, which exp turns into a relative error of the weights (and softmax's sum
    # into another one as large).
    means = np.array([np.mean(e, axis=0) for e in epochs])
    r_max = float((means[1:] / means[:-1]).max())
    rtol = 8 * float(np.finfo(np.float32).eps) * (1 + r_max / temperature)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=rtol, atol=0)
    # Weights 1 for the first two epochs, then summing to T.
    first = 2 * steps
    assert np.array_equal(np.array(ours[:first]), np.ones((first, T)))
    np.testing.assert_allclose(np.array(ours[first:]).sum(1), T, rtol=1e-12)


def test_dwa_favours_the_slowest_task_and_takes_given_means():
    dwa = DWA(3)
    dwa.epoch_end(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    dwa.epoch_end(torch.tensor([0.5, 0.9, 1.2], dtype=torch.float64))
    w = as_array(dwa.weights())
    assert w[0] < w[1] < w[2]
    r = np.array([0.5, 0.9, 1.2])
    np.testing.assert_allclose(w, 3 * np.exp(r / 2) / np.exp(r / 2).sum(), rtol=1e-14)
    # Only the last two epochs count; equal ratios are equal weights.
    dwa.epoch_end(torch.tensor([1.0, 1.8, 2.4], dtype=torch.float64))
    np.testing.assert_allclose(as_array(dwa.weights()), 1.0, rtol=1e-14)
    # A very hot softmax is uniform.
    hot = DWA(3, temperature=1e12)
    hot.epoch_end(torch.tensor([1.0, 1.0, 1.0]))
    hot.epoch_end(torch.tensor([0.1, 1.0, 5.0]))
    np.testing.assert_allclose(as_array(hot.weights()), 1.0, rtol=1e-10)


def test_dwa_state_round_trip_mid_epoch():
    rng = np.random.default_rng(0)
    a, b = DWA(2), DWA(2)
    for _ in range(2):
        for _ in range(3):
            a.observe(torch.tensor(rng.uniform(0.1, 1, 2)))
        a.epoch_end()
    a.observe(torch.tensor([0.3, 0.4]))
    b.load_state_dict(a.state_dict())
    for x in (a, b):
        x.observe(torch.tensor([0.5, 0.2]))
        x.epoch_end()
    assert torch.equal(a.weights(), b.weights())
    assert repr(a) == "DWA(num_tasks=2, temperature=2.0)" and a.scale == "sum"


# ---------------------------------------------------------------------------------------------
# FAMO


class OfficialFAMO:
    """FAMO transcribed from the paper's Alg. 1 and the official ``famo.py`` (``z`` from the
    logits, the log-loss objective with the detached ``c``, ``delta`` of the log losses pulled
    back through the softmax by autograd), with Adam (L2 weight decay) written out by hand."""

    def __init__(self, T, lr=0.025, gamma=0.01, eps=1e-8, min_losses=None):
        self.w = torch.zeros(T, dtype=torch.float64, requires_grad=True)
        self.min_losses = torch.zeros(T, dtype=torch.float64) if min_losses is None else min_losses
        self.lr, self.gamma, self.eps = lr, gamma, eps
        self.m = torch.zeros(T, dtype=torch.float64)
        self.v = torch.zeros(T, dtype=torch.float64)
        self.t = 0

    def loss(self, losses):
        self.prev = losses.detach()
        z = torch.softmax(self.w, -1)
        D = losses - self.min_losses + self.eps
        c = (z / D).sum().detach()
        return (D.log() * z / c).sum()

    def update(self, curr):
        delta = (self.prev - self.min_losses + self.eps).log() - (
            curr - self.min_losses + self.eps
        ).log()
        with torch.enable_grad():  # the official trainers call update() under no_grad
            (d,) = torch.autograd.grad(torch.softmax(self.w, -1), self.w, grad_outputs=delta)
        g = d + self.gamma * self.w.detach()
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * g
        self.v = 0.999 * self.v + 0.001 * g * g
        m_hat, v_hat = self.m / (1 - 0.9**self.t), self.v / (1 - 0.999**self.t)
        with torch.no_grad():
            self.w -= self.lr * m_hat / (v_hat.sqrt() + 1e-8)


def _regression(seed, T=4):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 5, generator=g, dtype=torch.float64)
    Y = torch.randn(64, T, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1, 3, 10][:T])
    model = torch.nn.Linear(5, T).double()
    return X, Y, model


@pytest.mark.parametrize("mode", ["same-batch", "next-step"])
@pytest.mark.parametrize("seed", [0, 1])
def test_famo_follows_the_official_algorithm(mode, seed):
    # Two identical models, one driven by the transcription's objective, one by our factors
    # times the raw losses: same parameter gradients, so the runs must stay together. Every
    # quantity is a few float64 flops per step (Adam's bias corrections are arranged
    # differently in torch): agreement to 1e-10 over 30 steps.
    X, Y, model_a = _regression(seed)
    model_b = torch.nn.Linear(5, 4).double()
    model_b.load_state_dict(model_a.state_dict())
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.05)
    ref, famo = OfficialFAMO(4), FAMO(4)

    def losses_of(model, rows):
        return (Y[rows] - model(X[rows])).pow(2).mean(0)

    for step in range(30):
        rows = slice(step % 4 * 16, step % 4 * 16 + 16)
        la, lb = losses_of(model_a, rows), losses_of(model_b, rows)
        if mode == "next-step" and step > 0:
            ref.update(la.detach())
            famo.update(lb.detach())
        opt_a.zero_grad()
        ref.loss(la).backward()
        opt_a.step()
        f = famo.observe(lb.detach())
        opt_b.zero_grad()
        (f * lb).sum().backward()
        opt_b.step()
        # The factors are the derivative of the official objective with respect to the losses.
        z = torch.softmax(ref.w.detach(), 0)
        l_var = la.detach().clone().requires_grad_(True)
        D = l_var + 1e-8
        ((D.log() * z / (z / D).sum().detach()).sum()).backward()
        np.testing.assert_allclose(as_array(f), as_array(l_var.grad), rtol=1e-10)
        if mode == "same-batch":
            with torch.no_grad():
                ref.update(losses_of(model_a, rows))
                famo.update(losses_of(model_b, rows))
        np.testing.assert_allclose(as_array(famo.logits), as_array(ref.w), rtol=1e-10, atol=1e-12)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        np.testing.assert_allclose(as_array(pb), as_array(pa), rtol=1e-10, atol=1e-12)
    # Same-batch updates close every step; next-step leaves the last one open.
    assert famo.pending == (mode == "next-step")
    # The weights moved: the run exercised the update, not only the initial uniform z.
    assert float(famo.weights().std()) > 1e-3


def test_famo_factors_sum_to_one_and_follow_slow_tasks():
    famo = FAMO(3)
    f = famo.observe(torch.tensor([2.0, 2.0, 2.0]))
    np.testing.assert_allclose(as_array(f), 1 / 3, rtol=1e-14)  # equal losses: z itself
    assert famo.scale == "mean" and famo.pending
    # Task 2's loss did not move; the others halved: task 2 gains weight, the others lose it.
    famo.update(torch.tensor([1.0, 1.0, 2.0]))
    z = as_array(famo.weights())
    assert z[2] > 1 / 3 > z[0] and z[0] == pytest.approx(z[1], rel=1e-14)
    f = as_array(famo.observe(torch.tensor([0.1, 1.0, 10.0])))
    assert abs(f.sum() - 1) < 1e-14 and f[0] > f[1] > f[2]  # 1 / loss scaling
    min_losses = FAMO(2, min_losses=[0.5, 0.0])
    np.testing.assert_allclose(
        as_array(min_losses.observe(torch.tensor([1.5, 1.0]))), [0.5, 0.5], rtol=1e-7
    )


def test_famo_state_round_trip_resumes_exactly():
    rng = np.random.default_rng(1)
    a = FAMO(3, lr=0.1, gamma=0.001)
    for _ in range(5):
        a.observe(torch.tensor(rng.uniform(0.5, 2, 3)))
        a.update(torch.tensor(rng.uniform(0.5, 2, 3)))
    a.observe(torch.tensor([1.0, 2.0, 3.0]))
    state = a.state_dict()
    b = FAMO(3, lr=0.1, gamma=0.001)
    b.load_state_dict(state)
    for x in (a, b):
        x.update(torch.tensor([0.9, 1.0, 3.5]))
        x.observe(torch.tensor([1.0, 1.0, 1.0]))
        x.update(torch.tensor([0.8, 1.1, 0.7]))
    assert torch.equal(a.logits.detach(), b.logits.detach())
    with pytest.raises(ValueError, match=r"famo: state is for .*'lr': 0.1"):
        FAMO(3).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# RLW


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("normal", "Normal"),
        ("uniform", "Uniform"),
        ("dirichlet", "Dirichlet"),
        ("bernoulli", "Bernoulli"),
    ],
)
@pytest.mark.parametrize("T", [1, 3, 7])
def test_rlw_matches_libmtl_with_the_same_draws(ours, theirs, T):
    peer = libmtl("RLW")
    peer.task_num, peer.device = T, "cpu"
    torch.manual_seed(1234)
    expected = [peer.backward(torch.ones(T, requires_grad=True), dist=theirs) for _ in range(8)]
    rlw = RLW(T, ours)
    torch.manual_seed(1234)
    got = [as_array(rlw.observe(torch.ones(T))) for _ in range(8)]
    # Same float32 draws; LibMTL takes the softmax in float32, we in float64.
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-6, atol=1e-7)
    # A private generator seeded alike gives the same sequence.
    seeded = RLW(T, ours, generator=torch.Generator().manual_seed(1234))
    assert np.array_equal(np.array([as_array(seeded.draw()) for _ in range(8)]), np.array(got))


@pytest.mark.parametrize("distribution", ["normal", "uniform", "dirichlet", "bernoulli"])
def test_rlw_draws_have_the_stated_distribution(distribution):
    T, N = 4, 4000
    rlw = RLW(T, distribution, seed=7)
    W = np.array([as_array(rlw.draw()) for _ in range(N)])
    expected = as_array(rlw.expected_weights())
    if distribution == "bernoulli":
        assert set(np.unique(W)) <= {0.0, 1.0} and W.sum(1).min() >= 1
        assert rlw.scale == "sum"
    else:
        assert (W > 0).all()
        np.testing.assert_allclose(W.sum(1), 1.0, rtol=1e-14)
        np.testing.assert_allclose(expected, 1 / T)
        assert rlw.scale == "mean"
    # The sample mean is within 5 standard errors of the expectation (a 1-in-1.7-million miss
    # per task for a fixed seed; the seed makes it deterministic anyway).
    se = W.std(0) / np.sqrt(N)
    assert (np.abs(W.mean(0) - expected) <= 5 * se).all(), (W.mean(0), expected, se)


def test_rlw_state_round_trip_and_repr():
    a = RLW(3, seed=3)
    a.observe(torch.ones(3))
    b = RLW(3, seed=99)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weights(), b.weights())
    assert torch.equal(a.observe(torch.ones(3)), b.observe(torch.ones(3)))
    assert repr(a) == "RLW(num_tasks=3, distribution='normal', seed=3)"
    with pytest.raises(ValueError, match="rlw: state is for"):
        RLW(3, "uniform").load_state_dict(a.state_dict())


# ---------------------------------------------------------------------------------------------
# Shared behaviour and bad input


def test_loss_weightings_share_the_base():
    for w in (DWA(2), FAMO(2), RLW(2)):
        assert isinstance(w, LossWeighting)
        before = w.weights()
        assert before.dtype == torch.float64 and before.shape == (2,)
        w.observe(torch.tensor([1.0, 2.0]))
        if not isinstance(w, DWA):
            # FAMO and RLW do not pace by epochs: the base's epoch_end leaves them alone.
            now = w.weights()
            w.epoch_end()
            assert torch.equal(w.weights(), now)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: PCGrad(order="sorted"), "pcgrad: unknown order 'sorted'"),
        (lambda: PCGrad(order="index", seed=1), "pcgrad: seed and generator only apply"),
        (lambda: PCGrad(seed=1, generator=torch.Generator()), "pcgrad: give a seed or"),
        (lambda: PCGrad()(torch.ones(2, 3)), "pcgrad: gram must be a square T x T matrix"),
        (lambda: IMTLG()(torch.tensor([[float("nan")]])), "imtl-g: gram has non-finite"),
        (lambda: IMTLG(rtol=-1.0), "imtl-g: rtol must be in [0, 1)"),
        (lambda: AlignedMTL("max"), "aligned-mtl: unknown scale_mode 'max'"),
        (lambda: AlignedMTL(preferences=[0.5, 0.6]), "aligned-mtl: preferences must sum to 1"),
        (lambda: AlignedMTL(preferences=[1.0])(torch.eye(2)), "aligned-mtl: 1 preferences for"),
        (lambda: DWA(0), "dwa: num_tasks must be in [1, 64]"),
        (lambda: DWA(2, temperature=0.0), "dwa: temperature must be finite and > 0"),
        (lambda: DWA(2).epoch_end(), "dwa: epoch_end() with no losses observed"),
        (lambda: DWA(2).epoch_end(torch.tensor([1.0, 0.0])), "dwa: epoch-mean losses must be > 0"),
        (lambda: DWA(2).observe(torch.ones(3)), "dwa: losses must have shape (2,), got (3,)"),
        (lambda: FAMO(2).update(torch.ones(2)), "famo: update() needs the step's losses"),
        (lambda: FAMO(2).observe(torch.tensor([1.0, -1.0])), "famo: losses must exceed"),
        (lambda: FAMO(2, lr=float("nan")), "famo: lr must be finite and >= 0"),
        (lambda: FAMO(2).observe(torch.tensor([1.0, float("inf")])), "famo: losses have non-"),
        (lambda: RLW(2, "gumbel"), "rlw: unknown distribution 'gumbel'"),
        (lambda: RLW(2).observe(torch.ones(2, 1)), "rlw: losses must have shape (2,)"),
    ],
)
def test_bad_input_gets_a_one_line_message(call, message):
    with pytest.raises(ValueError) as info:
        call()
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text
