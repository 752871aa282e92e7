"""UPGrad, DualProj, CAGrad and Nash-MTL against their peer implementation (TorchJD 0.18) on
the hypothesis Gramians of tests/_gramians.py, and against the properties that define them.

Weights are compared through the directions they give, ``(w - w')^T M (w - w')``, relative to
the scale of M (its trace), since weights are not unique when M is singular."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxtask.weighting.cagrad import CAGrad
from pyxtask.weighting.dualproj import DualProj
from pyxtask.weighting.nash_mtl import NashMTL
from pyxtask.weighting.upgrad import UPGrad
from tests._gramians import gram_norm_sq, jacobians
from tests._weighting_asserts import (
    as_array,
    assert_finite_weights,
    assert_permutation_equivariant,
)

aggregation = pytest.importorskip("torchjd.aggregation")
# CVXPY's chatter from inside TorchJD's Nash-MTL; its accuracy is what the tests measure.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*not DPP:UserWarning"),
    pytest.mark.filterwarnings("ignore:Solution may be inaccurate:UserWarning"),
]


def gram_of(M):
    return torch.from_numpy(M)


# --- UPGrad / DualProj ----------------------------------------------------------------------

DUAL_CONE = [
    (UPGrad, aggregation.UPGradWeighting),
    (DualProj, aggregation.DualProjWeighting),
]


@pytest.mark.parametrize(("ours", "peer"), DUAL_CONE, ids=["upgrad", "dualproj"])
@settings(max_examples=30)
@given(JM=jacobians(max_tasks=10))
def test_dual_cone_weightings_match_torchjd(ours, peer, JM):
    _, M = JM
    w = as_array(ours()(gram_of(M)))
    w_peer = as_array(peer()(gram_of(M)))
    # Both solve the same strictly convex QP (trace-normalised Gram + 1e-4 I, condition
    # number <= 1e4) exactly (quadprog's dual active set, our Lawson-Hanson): the weights
    # agree to solver rounding, amplified at most by the condition number.
    np.testing.assert_allclose(w, w_peer, rtol=1e-7, atol=1e-9)
    assert gram_norm_sq(M, w, w_peer) <= 1e-12 * np.trace(M)


@pytest.mark.parametrize("ours", [UPGrad, DualProj], ids=["upgrad", "dualproj"])
@given(JM=jacobians(max_tasks=12))
def test_dual_cone_weightings_conflict_with_no_task(ours, JM):
    _, M = JM
    weighting = ours(reg_eps=0.0)  # the paper's exact problem
    w = as_array(weighting(gram_of(M)))
    assert_finite_weights(torch.from_numpy(w), M.shape[0])
    g = M @ w  # (J J^T w)_i = g_i . d
    s = np.sqrt(np.diag(M))
    assert np.all(g >= -1e-11 * s * (s @ np.abs(w))), g
    assert np.all(w >= 1.0 / M.shape[0] - 1e-15)  # v >= u = p: never below the preference


@pytest.mark.parametrize("ours", [UPGrad, DualProj], ids=["upgrad", "dualproj"])
def test_dual_cone_weightings_leave_agreeing_gradients_alone(ours):
    M = torch.tensor([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(ours(reg_eps=0.0)(M), torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize(
    "weighting", [UPGrad(), DualProj(), CAGrad(), NashMTL()], ids=lambda w: w.name
)
@given(JM=jacobians(min_tasks=2, max_tasks=8, kinds=("full_rank", "conflicting", "scaled")))
def test_permutation_equivariant(weighting, JM):
    _, M = JM
    perm = np.random.default_rng(M.shape[0]).permutation(M.shape[0])
    if isinstance(weighting, NashMTL):
        weighting.reset()
    assert_permutation_equivariant(weighting, gram_of(M), perm=perm, rtol=1e-6, atol=1e-9)


def test_preference_vector_breaks_equivariance_and_is_used():
    M = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
    upgrad = UPGrad(torch.tensor([0.8, 0.2]), reg_eps=0.0)
    assert not upgrad.permutation_equivariant
    peer = aggregation.UPGradWeighting(torch.tensor([0.8, 0.2], dtype=torch.float64))
    torch.testing.assert_close(upgrad(M), peer(M), rtol=1e-3, atol=1e-4)  # peer has reg 1e-4
    assert UPGrad(torch.ones(3)).state_dict()["pref_vector"] == [1.0, 1.0, 1.0]


# --- CAGrad ---------------------------------------------------------------------------------


def cagrad_value(M, w, c):
    b = np.full(M.shape[0], 1.0 / M.shape[0])
    return float(w @ M @ b + c * np.sqrt(b @ M @ b) * np.sqrt(max(w @ M @ w, 0.0)))


@settings(max_examples=25)
@given(JM=jacobians(max_tasks=10), c=st.sampled_from([0.4, 0.9]))
def test_cagrad_matches_torchjd(JM, c):
    _, M = JM
    T = M.shape[0]
    w = as_array(CAGrad(c)(gram_of(M)))
    w_peer = as_array(aggregation.CAGradWeighting(c=c)(gram_of(M)))
    Mn = M / np.trace(M)
    if not w.any() or not w_peer.any():  # one of them saw a Pareto-stationary point
        return
    # Clarabel stops at ~1e-8 relative accuracy, and the correction divides by ||J^T w*||;
    # the directions (of norm ~ 1 + c on the normalised Gram) agree to that accuracy.
    assert gram_norm_sq(Mn, w, w_peer) <= 1e-6 * (1 + c) ** 2, (w, w_peer)
    # The defining constraint: ||d - g0|| <= sqrt(phi) = c ||g0||, with equality.
    b = np.full(T, 1.0 / T)
    assert gram_norm_sq(Mn, w, b) <= c**2 * (b @ Mn @ b) * (1 + 1e-9)


@settings(max_examples=25)
@given(JM=jacobians(min_tasks=2, max_tasks=10), c=st.sampled_from([0.4, 0.9]))
def test_cagrad_inner_objective_beats_torchjd(JM, c):
    # Recover w* from the final weights (w = b + k w*, w* on the simplex) and compare the
    # inner objective with the peer's on the same normalised Gram: ours is exact, so never
    # worse than a feasible point by more than rounding.
    _, M = JM
    T = M.shape[0]
    Mn, b = M / np.trace(M), np.full(T, 1.0 / T)
    w, w_peer = (as_array(x(gram_of(M))) - b for x in (CAGrad(c), aggregation.CAGradWeighting(c)))
    if w.sum() <= 0 or w_peer.sum() <= 0:
        return
    ours, peer = w / w.sum(), np.clip(w_peer, 0, None) / np.clip(w_peer, 0, None).sum()
    assert cagrad_value(Mn, ours, c) <= cagrad_value(Mn, peer, c) + 1e-10


def test_cagrad_options():
    M = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    plain = CAGrad(0.5)(M)
    torch.testing.assert_close(CAGrad(0.5, rescale="1+c^2")(M), plain / 1.25)
    torch.testing.assert_close(CAGrad(0.5, rescale="1+c")(M), plain / 1.5)
    torch.testing.assert_close(CAGrad(0.0)(M), torch.full((2,), 0.5, dtype=torch.float64))
    # Opposite gradients: Pareto-stationary, TorchJD's convention gives no update.
    assert not CAGrad()(torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)).any()
    with pytest.raises(ValueError, match="cagrad: unknown rescale 'x'"):
        CAGrad(rescale="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cagrad: c must be finite and >= 0"):
        CAGrad(-1.0)


# --- Nash-MTL -------------------------------------------------------------------------------


def nash_residual_norm(M, alpha):
    """TorchJD's stopping quantity ||M a - 1/a|| on the Frobenius-normalised Gram, for the
    alpha of that normalised problem (a = alpha sqrt(||M||_F))."""
    f = np.linalg.norm(M)
    a = alpha * np.sqrt(f)
    return float(np.linalg.norm(M / f @ a - 1 / a))


@settings(max_examples=12)
@given(JM=jacobians(min_tasks=2, max_tasks=6, kinds=("full_rank", "conflicting", "scaled")))
def test_nash_mtl_solves_eq3_at_least_as_well_as_torchjd(JM):
    J, M = JM
    T = M.shape[0]
    ours = NashMTL(max_norm=0.0)
    alpha = as_array(ours(gram_of(M)))
    peer = aggregation.NashMTL(n_tasks=T, max_norm=0.0)
    alpha_peer = as_array(peer.weighting(torch.from_numpy(J)))
    # Defining property: alpha > 0 and alpha_i (M alpha)_i = 1 (eq. 3), to rounding.
    assert np.all(alpha > 0)
    assert np.abs(alpha * (M @ alpha) - 1).max() <= 1e-9
    assert ours.last_residual <= 1e-9
    # The peer stops at ||M a - 1/a|| < 1e-3 after at most 20 ECOS solves: ours is better.
    assert nash_residual_norm(M, alpha) <= max(nash_residual_norm(M, alpha_peer), 1e-9)
    if nash_residual_norm(M, alpha_peer) < 1e-4:  # the peer converged: the same solution,
        # to first order in its residual r: alpha_peer - alpha ~ H^-1 r, with H = M +
        # diag(1/alpha^2) the Jacobian of M a - 1/a (scaled tasks make H ill-conditioned, so
        # a small residual alone does not make every entry close).
        r = M @ alpha_peer - 1 / alpha_peer
        bound = np.abs(np.linalg.solve(M + np.diag(1 / alpha**2), r))
        assert np.all(np.abs(alpha - alpha_peer) <= 10 * bound + 1e-9 * np.abs(alpha))


@given(JM=jacobians(min_tasks=1, max_tasks=12, kinds=("full_rank", "conflicting", "scaled")))
def test_nash_mtl_clips_the_update_norm(JM):
    _, M = JM
    alpha = as_array(NashMTL(max_norm=1.0)(gram_of(M)))
    # alpha^T M alpha = T at the solution, so the clip is active whenever T ||M||_F > 1.
    assert float(alpha @ M @ alpha) <= 1.0 + 1e-9
    unclipped = as_array(NashMTL(max_norm=0.0)(gram_of(M)))
    assert float(unclipped @ M @ unclipped) == pytest.approx(M.shape[0], rel=1e-8)


def test_nash_mtl_state_reuses_and_restores_alpha():
    rng = np.random.default_rng(0)
    M1, M2 = (torch.from_numpy(G @ G.T) for G in rng.standard_normal((2, 3, 7)))
    nash = NashMTL(max_norm=0.0, update_weights_every=2)
    first = nash(M1)
    torch.testing.assert_close(nash(M2), first)  # reused on the second call
    state = nash.state_dict()
    assert state["step"] == 2 and state["alpha"] == first.tolist()
    third = nash(M2)
    restored = NashMTL(max_norm=0.0, update_weights_every=2)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(M2), third)
    with pytest.raises(ValueError, match="nash-mtl: state is for"):
        NashMTL(max_norm=2.0).load_state_dict(state)


def test_nash_mtl_warns_without_a_solution():
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    nash = NashMTL()
    with pytest.warns(RuntimeWarning, match="nash-mtl: no bargaining solution"):
        alpha = nash(G @ G.T)
    assert_finite_weights(alpha, 3)
    assert nash.last_residual > 1e-3


# --- shared -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weighting", "scale"),
    [(UPGrad(), "mean"), (DualProj(), "mean"), (CAGrad(), "mean"), (NashMTL(), "sum")],
    ids=lambda x: getattr(x, "name", x),
)
def test_declared_scale_and_validation(weighting, scale):
    assert weighting.scale == scale
    assert repr(weighting).startswith(type(weighting).__name__ + "(")
    with pytest.raises(ValueError, match=f"{weighting.name}: gram has non-finite entries"):
        weighting(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=f"{weighting.name}: gram must be a square"):
        weighting(torch.ones(2, 3))
    state = weighting.state_dict()
    weighting.load_state_dict(state)
    assert state["name"] == weighting.name
