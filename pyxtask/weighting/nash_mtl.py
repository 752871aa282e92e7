"""Nash-MTL task weights (Navon et al. 2022, "Multi-Task Learning as a Bargaining Game",
Sec. 3: the bargaining problem eq. 2, its solution eq. 3 / Thm 3.1, Alg. 1).

The tasks bargain over the update ``d`` in a ball: the Nash bargaining solution maximises
``sum_i log(g_i . d)``, and Thm 3.1 shows ``d = J^T alpha`` with ``alpha > 0`` solving

    (M alpha)_i = 1 / alpha_i   for every task i,          M = J J^T        (eq. 3),

so every task gets ``g_i . d = 1 / alpha_i > 0`` and a task with a small gradient gets a large
weight. The paper approximates the solution by a sequence of convex programs (CVXPY/ECOS,
at most 20 of them, warm-started from the previous step; TorchJD's ``NashMTL`` does the
same and stops at ``||M alpha - 1/alpha|| < 1e-3``). :func:`pyxtask.ops.nash_bargaining`
solves eq. 3 itself to rounding (it is the minimiser of the strictly convex
``1/2 alpha^T M alpha - sum(log(alpha))``, found by damped Newton); the residual it reports is
kept in :attr:`NashMTL.last_residual`.

As in the authors' code, eq. 3 is solved on M divided by its Frobenius norm and alpha scaled
back (so it solves eq. 3 for M itself), alpha is recomputed every ``update_weights_every``
steps and reused in between, and the update is clipped to ``||J^T alpha|| <= max_norm``
(``alpha^T M alpha`` is its square; ``max_norm=0`` disables the clipping). Defaults are the
authors' and TorchJD's: ``max_norm=1.0``, ``update_weights_every=1``.

When the origin is in the convex hull of the gradients (a Pareto-stationary point: the
Gram matrix is singular with a non-negative null vector) eq. 3 has no solution; the op then
returns the solution of a system ridged by ``1e-8`` per task and a residual of order one,
and this weighting warns. The weights are not normalised: ``scale = "sum"``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from pyxtask import ops
from pyxtask.weighting._gram import GramWeighting

__all__ = ["NashMTL"]

#: Above this residual eq. 3 was not solved (no solution exists); rounding stays ~1e-12.
RESIDUAL_LIMIT = 1e-6


class NashMTL(GramWeighting):
    """Nash bargaining weights ``alpha`` (``M alpha = 1 / alpha``), clipped to ``max_norm``.

    Args:
        max_norm: largest ``||J^T alpha||``; 0 disables the clipping.
        update_weights_every: solve every that many calls, reuse alpha in between.
        max_iter, tol: passed to :func:`pyxtask.ops.nash_bargaining`.

    Stateful: the last alpha (a warm start, and the weights reused between updates) and the
    call count are in :meth:`state_dict`.

    Orthogonal gradients of norms 1 and 2: ``alpha_i = 1 / ||g_i||``, then clipped so that
    ``||J^T alpha|| = 1``.

    >>> import torch
    >>> from pyxtask.weighting.nash_mtl import NashMTL
    >>> NashMTL(max_norm=0.0)(torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    tensor([1.0000, 0.5000], dtype=torch.float64)
    >>> NashMTL()(torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    tensor([0.7071, 0.3536], dtype=torch.float64)
    """

    name = "nash-mtl"
    permutation_equivariant = True
    scale = "sum"

    def __init__(
        self,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        *,
        max_iter: int = 100,
        tol: float = 1e-12,
    ) -> None:
        if not (max_norm >= 0 and max_norm < float("inf")):
            raise ValueError(f"{self.name}: max_norm must be finite and >= 0, got {max_norm}")
        if update_weights_every < 1:
            raise ValueError(
                f"{self.name}: update_weights_every must be >= 1, got {update_weights_every}"
            )
        if max_iter < 0:
            raise ValueError(f"{self.name}: max_iter must be >= 0, got {max_iter}")
        if not (tol >= 0 and tol < float("inf")):
            raise ValueError(f"{self.name}: tol must be finite and >= 0, got {tol}")
        self.max_norm = float(max_norm)
        self.update_weights_every = int(update_weights_every)
        self.max_iter, self.tol = int(max_iter), float(tol)
        self.reset()

    def reset(self) -> None:
        """Forgets the last alpha and the call count."""
        self.step = 0
        self.alpha: Tensor | None = None
        #: ``max_i |alpha_i (M alpha)_i - 1|`` of the last solve, NaN before any.
        self.last_residual = float("nan")

    def __call__(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        """alpha (float64 ``(T,)``) for this step, clipped so that ``||J^T alpha|| <= max_norm``."""
        gram, _ = self._inputs(gram, losses)
        T = gram.shape[0]
        stale = self.alpha is None or self.alpha.shape != (T,)
        if stale or self.step % self.update_weights_every == 0:
            self.alpha = self._solve(gram, None if stale else self.alpha)
        self.step += 1
        assert self.alpha is not None
        alpha = self.alpha.to(gram.device)
        if self.max_norm > 0:
            norm = max(float(alpha @ gram @ alpha), 0.0) ** 0.5
            if norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
        return alpha

    def _solve(self, gram: Tensor, init: Tensor | None) -> Tensor:
        # Solving on M / ||M||_F and scaling back is the authors' conditioning device; alpha
        # (and the warm start) stay in the units of the raw Gram matrix, as theirs do.
        frobenius = float(torch.linalg.matrix_norm(gram))
        unit = frobenius**0.5 if frobenius > 0 else 1.0
        M = gram / (unit * unit)
        init = None if init is None else init.to(gram.device) * unit
        alpha, residual = ops.nash_bargaining(M, init, self.max_iter, self.tol)
        alpha = alpha / unit
        self.last_residual = float(residual)
        if not self.last_residual <= RESIDUAL_LIMIT:
            warnings.warn(
                f"{self.name}: no bargaining solution (residual {self.last_residual:.2e}): "
                "some non-negative combination of the task gradients is zero; "
                "using the solution of the ridged system",
                RuntimeWarning,
                stacklevel=3,
            )
        return alpha

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_norm": self.max_norm,
            "update_weights_every": self.update_weights_every,
            "step": self.step,
            "alpha": None if self.alpha is None else self.alpha.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fixed = ("name", "max_norm", "update_weights_every")
        mine = {k: v for k, v in self.state_dict().items() if k in fixed}
        if {k: state.get(k) for k in fixed} != mine:
            raise ValueError(f"{self.name}: state is for {state}, this weighting is {mine}")
        self.step = int(state["step"])
        alpha = state.get("alpha")
        self.alpha = None if alpha is None else torch.tensor(alpha, dtype=torch.float64)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_norm={self.max_norm}, "
            f"update_weights_every={self.update_weights_every})"
        )
