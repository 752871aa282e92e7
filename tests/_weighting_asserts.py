"""Property asserts shared by the weighting tests (in the style of TorchJD's aggregator tests).

Each assert takes a :class:`~pyxtask.weighting.GramWeighting` (or anything called as
``weighting(gram, losses)``) and checks one property that a method states about itself:

- finite weights of the right shape, whatever the input;
- permutation equivariance: relabelling the tasks (rows and columns of the Gram matrix, the
  entries of the losses) relabels the weights; only for a weighting that declares
  ``permutation_equivariant = True``;
- source-permutation equivariance, for target-aware weightings (task 0 is the target): the
  same with task 0 held fixed;
- invariance to scaling one task: its gradient (row and column of the Gram matrix) and,
  optionally, its loss multiplied by ``c > 0``.

Tolerances are the caller's: each test knows how well-conditioned its inputs are.
"""

import itertools

import numpy as np
import torch


def as_array(x) -> np.ndarray:
    return np.asarray(torch.as_tensor(x).detach().cpu().to(torch.float64).numpy())


def assert_finite_weights(weights, num_tasks=None):
    """A float64 1-D tensor of ``num_tasks`` finite numbers (never NaN or Inf)."""
    assert isinstance(weights, torch.Tensor), type(weights)
    assert weights.dtype == torch.float64, weights.dtype
    assert weights.dim() == 1, weights.shape
    if num_tasks is not None:
        assert weights.shape == (num_tasks,), (weights.shape, num_tasks)
    assert bool(torch.isfinite(weights).all()), weights


def permute_tasks(gram, losses, perm):
    """``gram`` and ``losses`` with the tasks relabelled: new task i is old task perm[i]."""
    p = torch.as_tensor(np.asarray(perm), dtype=torch.long)
    gram = torch.as_tensor(gram)[p][:, p]
    return gram, None if losses is None else torch.as_tensor(losses)[p]


def scale_task(gram, losses, task, c, *, scale_loss=True):
    """Task ``task``'s gradient (and, with ``scale_loss``, its loss) multiplied by ``c``:
    row and column ``task`` of the Gram matrix scale by c (the diagonal entry by c^2)."""
    factors = torch.ones(gram.shape[0], dtype=torch.float64)
    factors[task] = c
    gram = torch.as_tensor(gram, dtype=torch.float64) * torch.outer(factors, factors)
    if losses is not None and scale_loss:
        losses = torch.as_tensor(losses, dtype=torch.float64) * factors
    return gram, losses


def _assert_weights_follow(weighting, gram, losses, perm, rtol, atol):  # noqa: PLR0917
    """Relabelling the tasks by ``perm`` relabels the weights the same way."""
    T = gram.shape[0]
    assert sorted(np.asarray(perm).tolist()) == list(range(T)), perm
    w = weighting(gram, losses)
    wp = weighting(*permute_tasks(gram, losses, perm))
    assert_finite_weights(w, T)
    assert_finite_weights(wp, T)
    np.testing.assert_allclose(as_array(wp), as_array(w)[np.asarray(perm)], rtol=rtol, atol=atol)


def assert_permutation_equivariant(weighting, gram, losses=None, *, perm, rtol, atol):
    """``weighting(P gram P^T, P losses) == P weighting(gram, losses)``."""
    assert weighting.permutation_equivariant, (
        f"{weighting!r} declares it is not permutation-equivariant; test what it promises"
    )
    _assert_weights_follow(weighting, gram, losses, perm, rtol, atol)


def assert_source_permutation_equivariant(weighting, gram, losses=None, *, perm, rtol, atol):
    """Permuting tasks ``1..T-1`` (the sources) and keeping task 0 (the target) in place
    permutes the weights the same way."""
    assert int(np.asarray(perm)[0]) == 0, f"perm {perm} moves the target"
    _assert_weights_follow(weighting, gram, losses, perm, rtol, atol)


def assert_invariant_to_task_scaling(
    weighting, gram, losses=None, *, task, c, scale_loss=True, rtol, atol
):
    """Scaling task ``task``'s gradient (and loss) by ``c > 0`` leaves the weights alone."""
    assert c > 0, c
    w = weighting(gram, losses)
    ws = weighting(*scale_task(gram, losses, task, c, scale_loss=scale_loss))
    assert_finite_weights(w, gram.shape[0])
    assert_finite_weights(ws, gram.shape[0])
    np.testing.assert_allclose(as_array(ws), as_array(w), rtol=rtol, atol=atol)


def np_min_norm(B):
    """Exact ``argmin_{lam in simplex} lam^T B lam`` for a definite B, by enumerating supports.

    On a support S the minimiser of ``lam_S^T B_SS lam_S`` with ``sum lam_S = 1`` solves
    ``[[B_SS, 1], [1^T, 0]] [lam_S; mu] = [0; 1]``; every feasible (``lam_S >= 0``) solution is
    a point of the simplex, and the optimum's own support gives the optimum, so the least
    objective among feasible ones is the minimum.
    """
    B = np.asarray(B, dtype=np.float64)
    T = B.shape[0]
    best = None
    for k in range(1, T + 1):
        for S in itertools.combinations(range(T), k):
            idx = list(S)
            K = np.zeros((k + 1, k + 1))
            K[:k, :k] = B[np.ix_(idx, idx)]
            K[:k, k] = K[k, :k] = 1.0
            rhs = np.zeros(k + 1)
            rhs[k] = 1.0
            try:
                sol = np.linalg.solve(K, rhs)
            except np.linalg.LinAlgError:
                continue
            if np.all(sol[:k] >= 0):
                lam = np.zeros(T)
                lam[idx] = sol[:k]
                f = float(lam @ B @ lam)
                if best is None or f < best[0]:
                    best = (f, lam)
    assert best is not None
    return best[1]
