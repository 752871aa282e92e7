"""MGDA task weights (Sener & Koltun 2018, "Multi-task learning as multi-objective
optimization", Sec. 3: eq. 3, the two-task closed form eq. 4, Algs. 1-2).

MGDA looks for the direction of steepest common descent: the min-norm element of the convex
hull of the task gradients (eq. 3),

    lam* = argmin_{lam in simplex} || sum_t lam_t g_t / n_t ||^2,

which is zero exactly when the parameters are Pareto-stationary (no direction decreases every
task) and otherwise a direction that decreases every task's loss. The ``g_t`` are gradients of
the shared parameters, or of the shared representation for the paper's cheaper upper bound
(MGDA-UB, Sec. 3.3); either way only their Gram matrix is needed. With ``M = G G^T`` the
objective is ``lam^T M' lam`` for the normalised Gram matrix ``M'[t, s] = M[t, s] / (n_t n_s)``,
and :func:`pyxtask.ops.min_norm_point` solves it: Frank-Wolfe with the exact line search of
the paper's Alg. 1 (as in its Alg. 2), plus away steps, and for two tasks the closed form

    lam_1 = clip((M'_22 - M'_12) / (M'_11 + M'_22 - 2 M'_12), 0, 1),    lam_2 = 1 - lam_1.

The normalisers ``n_t`` are those of the authors' code (``gradient_normalizers``):

``"none"``   ``n_t = 1``;
``"l2"``     ``n_t = ||g_t|| = sqrt(M_tt)``;
``"loss"``   ``n_t = L_t``;
``"loss+"``  ``n_t = L_t ||g_t||``.

As in that code, lam* is found on the normalised gradients and then applied to the *raw*
task losses: the weights returned are lam* itself (on the simplex), not ``lam*_t / n_t``.
A normaliser that is zero or negative (a task with a zero gradient or a zero loss) counts
as 1, so such a task never produces NaN; with a zero gradient it is the min-norm point on
its own (the origin is in the hull) and gets all the weight.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from pyxtask import ops
from pyxtask.weighting._gram import GramWeighting

__all__ = ["MGDA", "NORMALIZATIONS", "Normalization"]

Normalization = Literal["none", "l2", "loss", "loss+"]
NORMALIZATIONS: tuple[str, ...] = ("none", "l2", "loss", "loss+")


class MGDA(GramWeighting):
    """Min-norm weights of the (normalised) task gradients, on the simplex.

    Args:
        normalization: ``"none"`` (default), ``"l2"``, ``"loss"`` or ``"loss+"`` (see the
            module docs); the last two need the task losses.
        max_iter, tol: passed to :func:`pyxtask.ops.min_norm_point` (it stops when the KKT
            conditions hold to ``tol * max(diag(M'))``).

    Two orthogonal gradients ``(1, 0)`` and ``(0, 2)``: without normalisation the shorter one
    gets more weight (the min-norm point of the segment between them); with ``"l2"`` both
    are unit vectors and share the weight equally.

    >>> import torch
    >>> from pyxtask.weighting import MGDA
    >>> gram = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    >>> MGDA()(gram)
    tensor([0.8000, 0.2000], dtype=torch.float64)
    >>> MGDA(normalization="l2")(gram)
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    name = "mgda"
    permutation_equivariant = True

    def __init__(
        self, normalization: Normalization = "none", *, max_iter: int = 10000, tol: float = 1e-12
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"mgda: unknown normalization {normalization!r}; "
                f"expected one of {list(NORMALIZATIONS)}"
            )
        if max_iter < 0:
            raise ValueError(f"mgda: max_iter must be >= 0, got {max_iter}")
        if not (tol >= 0 and tol < float("inf")):
            raise ValueError(f"mgda: tol must be finite and >= 0, got {tol}")
        self.normalization: Normalization = normalization
        self.max_iter = int(max_iter)
        self.tol = float(tol)

    def normalizers(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        """``n_t`` (float64 ``(T,)``) for ``gram`` and ``losses``, non-positive ones set to 1."""
        gram, losses = self._inputs(gram, losses)
        return self._normalizers(gram, losses)

    def _normalizers(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        if self.normalization in ("loss", "loss+") and losses is None:
            raise ValueError(f"mgda: normalization {self.normalization!r} needs the task losses")
        # Rounding can leave a tiny negative diagonal for a (near-)zero gradient.
        norms = gram.diagonal().clamp(min=0).sqrt()
        if self.normalization == "none":
            n = torch.ones_like(norms)
        elif self.normalization == "l2":
            n = norms
        else:
            assert losses is not None  # checked above
            n = losses if self.normalization == "loss" else losses * norms
        # A zero gradient or loss would divide by zero: such a task is left unnormalised.
        return torch.where(n > 0, n, torch.ones_like(n))

    def __call__(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        """lam* (float64 ``(T,)``, on the simplex) for the T x T ``gram`` of the gradients."""
        gram, losses = self._inputs(gram, losses)
        n = self._normalizers(gram, losses)
        normalized = gram / torch.outer(n, n)
        if not bool(torch.isfinite(normalized).all()):
            # A tiny normaliser (a loss of 1e-300) can push M' past the float64 range.
            raise ValueError(
                f"mgda: the {self.normalization!r}-normalised gram overflows "
                f"(normalisers {n.tolist()})"
            )
        return ops.min_norm_point(normalized, self.max_iter, self.tol)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "normalization": self.normalization}

    def __repr__(self) -> str:
        return f"MGDA(normalization={self.normalization!r})"
