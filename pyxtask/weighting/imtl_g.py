"""IMTL-G task weights (Liu et al. 2021, "Towards Impartial Multi-task Learning", Sec. 3.2,
gradient balance, and its closed form).

IMTL-G picks weights ``alpha`` (summing to 1) so that the aggregated gradient
``g = sum_t alpha_t g_t`` has the same projection onto every unit task gradient
``u_t = g_t / ||g_t||``: ``g . u_1 = g . u_t`` for all t, so that no task is favoured. The paper
solves this with ``D = [g_1 - g_t]_{t>=2}`` and ``U = [u_1 - u_t]_{t>=2}`` (rows) as

    alpha_{2:T} = g_1 U^T (D U^T)^{-1},        alpha_1 = 1 - sum_{t>=2} alpha_t.

Everything here is a Gram entry: with ``M = G G^T`` and ``n_t = sqrt(M_tt)``, ``g . u_t =
(M alpha)_t / n_t``, so the condition reads ``M alpha = c n`` for some scalar c, and for a
positive-definite M the paper's solution is

    alpha = M^{-1} n / (1^T M^{-1} n),

which is what is computed (one symmetric eigendecomposition, no T-1 x T-1 system in a
distinguished task 1, so the weights are permutation-equivariant).

A singular M (linearly dependent task gradients) has no such solution in general: ``n`` is
then usually outside the range of M, and the only ``alpha`` with equal projections gives
``g = 0``. As TorchJD's ``IMTLGWeighting`` (after Quinton & Rey 2024, "Jacobian Descent for
Multi-Objective Optimization") we use the pseudo-inverse, ``alpha ∝ M^+ n``, dropping the
eigenvalues at or below ``rtol * lambda_max`` (default ``T * eps`` of the Gram's dtype, the
default of ``torch.linalg.pinv``). Tasks with a zero gradient get weight 0.

The normalisation ``sum alpha = 1`` is the paper's; it can make the common projection c
negative (all tasks ascend) when some entries of ``M^{-1} n`` are negative. When
``1^T M^+ n`` is zero to rounding the weights would blow up; they are all 0 instead
(TorchJD does the same).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pyxtask.weighting._gram import GramWeighting

__all__ = ["IMTLG", "default_rtol"]


def default_rtol(num_tasks: int, dtype: torch.dtype) -> float:
    """``T * eps`` of ``dtype`` (float64's for an integer dtype): ``torch.linalg.pinv``'s rule.

    A Gram computed in float32 carries float32 rounding even once converted to float64, so the
    tolerance follows the dtype the caller passed.
    """
    return num_tasks * torch.finfo(dtype if dtype.is_floating_point else torch.float64).eps


class IMTLG(GramWeighting):
    """Weights (summing to 1) whose combination has equal projections on the unit task gradients.

    Args:
        rtol: eigenvalues of M at or below ``rtol * lambda_max`` count as zero; ``None``
            (default) is ``T * eps`` of the Gram's dtype.

    Two orthogonal gradients of lengths 1 and 2: ``g = (2/3) g_1 + (1/3) g_2 = (2/3, 2/3)``
    projects to 2/3 on both unit gradients (the plain mean would favour the longer one).

    >>> import torch
    >>> from pyxtask.weighting.imtl_g import IMTLG
    >>> IMTLG()(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    tensor([0.6667, 0.3333], dtype=torch.float64)
    """

    name = "imtl-g"
    permutation_equivariant = True
    scale = "mean"

    def __init__(self, *, rtol: float | None = None) -> None:
        if rtol is not None and not (0 <= rtol < 1):
            raise ValueError(f"imtl-g: rtol must be in [0, 1), got {rtol}")
        self.rtol = rtol

    def __call__(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        """alpha (float64 ``(T,)``, summing to 1, or all 0) for the T x T ``gram``."""
        dtype = torch.as_tensor(gram).dtype
        gram, _ = self._inputs(gram, losses)
        rtol = default_rtol(gram.shape[0], dtype) if self.rtol is None else self.rtol
        norms = gram.diagonal().clamp(min=0).sqrt()
        lam, V = torch.linalg.eigh(gram)
        keep = lam > rtol * lam.max().clamp(min=0)
        if not bool(keep.any()):
            return torch.zeros_like(norms)
        Vk = V[:, keep]
        v = Vk @ ((Vk.T @ norms) / lam[keep])
        total = v.sum()
        # Below this the sign of the sum is rounding noise and v / total is meaningless.
        if float(total.abs()) <= gram.shape[0] * torch.finfo(torch.float64).eps * float(
            v.abs().sum()
        ):
            return torch.zeros_like(norms)
        weights: Tensor = v / total
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rtol": self.rtol}

    def __repr__(self) -> str:
        return "IMTLG()" if self.rtol is None else f"IMTLG(rtol={self.rtol})"
