"""DualProj task weights: the mean gradient projected onto the dual cone of the task gradients
(Quinton & Rakotomamonjy 2024, "Jacobian Descent for Multi-Objective Optimization", Sec. 3
and App. A, eq. 3 with Prop. 1; the projection is eq. 11 of Lopez-Paz & Ranzato 2017,
"Gradient Episodic Memory for Continual Learning").

DualProj averages first and projects once:

    d = pi_C(sum_i p_i g_i),      C = {x : g_t . x >= 0 for all t},

so d conflicts with no task. By Prop. 1, ``d = J^T v`` with ``v = argmin v^T M v`` subject to
``v >= p``, solved exactly by :func:`pyxtask.ops.dual_cone_projection`. Unlike UPGrad, the
result depends on the gradients only through their mean and the cone.

Gram normalisation and ridge follow the peer (TorchJD's ``DualProjWeighting``): trace
normalisation with ``norm_eps = 1e-4`` and ``reg_eps = 1e-4`` on the diagonal, see
:mod:`pyxtask.weighting.upgrad`; ``reg_eps=0`` is the paper's problem exactly.
"""

from __future__ import annotations

from torch import Tensor

from pyxtask import ops
from pyxtask.weighting.upgrad import UPGrad, checked, normalized_gram, preference

__all__ = ["DualProj"]


class DualProj(UPGrad):
    """Weights of the projection of the (preference-weighted) mean gradient onto the dual cone.

    UPGrad's options and state; only what is projected differs (the mean, once).

    Args:
        pref_vector: the weights ``p`` of the combination projected (default ``1/T``).
        norm_eps, reg_eps: trace normalisation threshold and ridge, as TorchJD.
        max_iter, tol: passed to :func:`pyxtask.ops.dual_cone_projection`.

    Two unit gradients at 120 degrees: their mean conflicts with neither and is kept.
    Opposite gradients of norms 2 and 1/2: the mean follows the long one; the dual cone is
    the hyperplane orthogonal to both, and the projection, zero, is reached by raising the
    short task's weight to 2.

    >>> import torch
    >>> from pyxtask.weighting.dualproj import DualProj
    >>> DualProj(reg_eps=0.0)(torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64))
    tensor([0.5000, 0.5000], dtype=torch.float64)
    >>> DualProj(reg_eps=0.0)(torch.tensor([[4.0, -1.0], [-1.0, 0.25]], dtype=torch.float64))
    tensor([0.5000, 2.0000], dtype=torch.float64)
    """

    name = "dualproj"

    def __call__(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        """``v`` (float64 ``(T,)``), the dual-cone QP's solution for ``u = p``."""
        gram, _ = self._inputs(gram, losses)
        pref = preference(self.name, self.pref_vector, gram)
        M = normalized_gram(gram, self.norm_eps, self.reg_eps)
        v, residual = ops.dual_cone_projection(M, pref, self.max_iter, self.tol)
        checked(self.name, residual)
        return v
