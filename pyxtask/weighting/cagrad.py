"""CAGrad task weights (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task
Learning", Sec. 3, eq. 1 and its dual, Alg. 1).

CAGrad looks for the update that maximises the worst task's improvement within a ball
around the mean gradient ``g0 = J^T b`` (``b = 1/T``): ``max_d min_i g_i . d`` subject to
``||d - g0|| <= sqrt(phi)``, ``sqrt(phi) = c ||g0||``. Its dual is over the simplex,

    w* = argmin_{w in simplex}  w^T M b + sqrt(phi) sqrt(w^T M w),     M = J J^T,

and the update is ``d = g0 + sqrt(phi) / ||J^T w*|| * J^T w*``, i.e. the weights

    b + sqrt(phi) / sqrt(w*^T M w*) * w*.

:func:`pyxtask.ops.cagrad_inner` solves the inner problem exactly (a root search over the
shift of a min-norm problem, see there), where the authors' code calls SciPy's SLSQP and
TorchJD calls CVXPY/Clarabel; the weights are then those of TorchJD's ``CAGradWeighting``
(same convention: ``1/T`` plus the correction, no rescaling) up to its solver's accuracy.

As in TorchJD, the Gram matrix is divided by its trace first (all zeros below ``norm_eps``)
and, when ``||J^T w*||`` (normalised) is below ``norm_eps``, the parameters are taken to be
Pareto-stationary and the weights are all zero. The authors' code divides the update by
``1 + c^2`` (``rescale=1``, the default there) or ``1 + c`` (``rescale=2``); ``rescale``
offers both, default none (Alg. 1 and TorchJD). ``c = 0.4`` is the paper's choice for its
NYUv2 and CityScapes experiments; ``c = 0`` gives the mean.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from pyxtask import ops
from pyxtask.weighting._gram import GramWeighting
from pyxtask.weighting.upgrad import check_eps, normalized_gram

__all__ = ["RESCALES", "CAGrad", "Rescale"]

Rescale = Literal["none", "1+c^2", "1+c"]
RESCALES: tuple[str, ...] = ("none", "1+c^2", "1+c")

#: The inner solve's KKT residual is ~1e-15, or ~1e-8 at a kink (see ops.cagrad_inner).
RESIDUAL_LIMIT = 1e-6


class CAGrad(GramWeighting):
    """Conflict-averse weights: the mean plus the correction that helps the worst task most.

    Args:
        c: radius of the ball around the mean gradient, relative to its norm (``c >= 0``).
        norm_eps: trace normalisation threshold and Pareto-stationarity cut-off, as TorchJD.
        rescale: ``"none"`` (default), ``"1+c^2"`` or ``"1+c"``: divide the weights by that.
        max_iter, tol: passed to :func:`pyxtask.ops.cagrad_inner`.

    Two orthogonal gradients of norms 1 and 2: the correction goes entirely to the shorter
    one, the task the mean improves least, whose weight rises above the mean's 1/2.

    >>> import torch
    >>> from pyxtask.weighting.cagrad import CAGrad
    >>> CAGrad(c=0.4)(torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    tensor([0.9472, 0.5000], dtype=torch.float64)
    """

    name = "cagrad"
    permutation_equivariant = True
    scale = "mean"

    def __init__(
        self,
        c: float = 0.4,
        *,
        norm_eps: float = 1e-4,
        rescale: Rescale = "none",
        max_iter: int = 1000,
        tol: float = 1e-12,
    ) -> None:
        check_eps(self.name, c=c, norm_eps=norm_eps, tol=tol)
        if rescale not in RESCALES:
            raise ValueError(
                f"{self.name}: unknown rescale {rescale!r}; expected one of {RESCALES}"
            )
        if max_iter < 0:
            raise ValueError(f"{self.name}: max_iter must be >= 0, got {max_iter}")
        self.c, self.norm_eps = float(c), float(norm_eps)
        self.rescale: Rescale = rescale
        self.max_iter, self.tol = int(max_iter), float(tol)

    def __call__(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        """``b + sqrt(phi) / ||J^T w*|| * w*`` (float64 ``(T,)``), rescaled as asked."""
        gram, _ = self._inputs(gram, losses)
        T = gram.shape[0]
        M = normalized_gram(gram, self.norm_eps, 0.0)
        w, residual = ops.cagrad_inner(M, self.c, self.max_iter, self.tol)
        if not float(residual) <= RESIDUAL_LIMIT:
            raise RuntimeError(
                f"{self.name}: the inner problem did not converge "
                f"(KKT residual {float(residual):.2e})"
            )
        b = torch.full((T,), 1.0 / T, dtype=torch.float64, device=gram.device)
        sqrt_phi = self.c * max(float(b @ M @ b), 0.0) ** 0.5
        norm = max(float(w @ M @ w), 0.0) ** 0.5
        if norm < self.norm_eps:
            return torch.zeros_like(b)  # Pareto-stationary: TorchJD's convention
        weights: Tensor = b + (sqrt_phi / norm) * w
        if self.rescale == "1+c^2":
            weights = weights / (1 + self.c**2)
        elif self.rescale == "1+c":
            weights = weights / (1 + self.c)
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "c": self.c, "rescale": self.rescale}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(c={self.c}, norm_eps={self.norm_eps}, rescale={self.rescale!r})"
        )
