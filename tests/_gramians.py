"""Hypothesis Gramians for the weighting tests: the cases where weightings disagree.

Every strategy draws a Jacobian-like ``J`` (T x n, float64) and returns ``(J, M)`` with
``M = J J^T``, so a test can also form the combined direction ``J^T w`` and compare two weight
vectors in the Gram's norm, ``(w - w')^T M (w - w')`` = ``||J^T w - J^T w'||^2`` (weights are not
unique when M is singular; the direction is).

- ``full_rank``: n >= T random rows, M positive definite;
- ``rank_deficient``: rows from a random r-dimensional subspace, r < T (M singular);
- ``conflicting``: a full-rank J with one pair of rows made to point nearly opposite ways;
- ``scaled``: row norms spread over a few orders of magnitude.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

KINDS = ("full_rank", "rank_deficient", "conflicting", "scaled")


def make_jacobian(kind: str, T: int, seed: int) -> np.ndarray:
    """A T x n float64 matrix of the given kind (n = T + 3, or the subspace's rank)."""
    rng = np.random.default_rng(seed)
    n = T + 3
    if kind == "rank_deficient" and T >= 2:
        r = int(rng.integers(1, T))
        return rng.standard_normal((T, r)) @ rng.standard_normal((r, n))
    J = rng.standard_normal((T, n))
    if kind == "conflicting" and T >= 2:
        i, j = rng.choice(T, size=2, replace=False)
        J[j] = -J[i] * rng.uniform(0.3, 3.0) + 0.1 * rng.standard_normal(n)
    elif kind == "scaled":
        J *= 10.0 ** rng.uniform(-2, 2, size=(T, 1))
    return J


@st.composite
def jacobians(draw, min_tasks: int = 1, max_tasks: int = 12, kinds=KINDS):
    """``(J, M)``: a T x n float64 matrix of one of ``kinds`` and its Gram ``J J^T``."""
    T = draw(st.integers(min_tasks, max_tasks))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**31 - 1))
    J = make_jacobian(kind, T, seed)
    return J, J @ J.T


def gram_norm_sq(M: np.ndarray, w: np.ndarray, v: np.ndarray) -> float:
    """``(w - v)^T M (w - v)``: the squared distance between the directions ``J^T w``, ``J^T v``."""
    d = np.asarray(w, dtype=np.float64) - np.asarray(v, dtype=np.float64)
    return float(max(d @ M @ d, 0.0))
