"""UPGrad task weights (Quinton & Rakotomamonjy 2024, "Jacobian Descent for Multi-Objective
Optimization", Sec. 3: the projection eq. 3, UPGrad's aggregator eq. 5, Prop. 1).

UPGrad projects every task gradient ``g_i`` onto the dual cone of all of them,
``C = {x : g_t . x >= 0 for all t}``, and averages the projections (eq. 5, preference
``p = 1/T``):

    d = sum_i p_i pi_C(g_i),

so the update conflicts with no task (``g_t . d >= 0``) and equals the mean gradient when no
two gradients conflict. By Prop. 1 the projection of ``J^T u`` is ``J^T v`` with

    v = argmin_v v^T M v  subject to  v >= u,            M = J J^T,

a quadratic program on the T x T Gram matrix alone, which :func:`pyxtask.ops.dual_cone_projection`
solves exactly (Lawson-Hanson NNLS, rounding-level KKT residual); the weights are the sum of
the solutions for ``u = p_i e_i``. Every ``v >= u >= 0``, so the weights are at least the
preference: ``w >= p``.

Like the peer implementation (TorchJD's ``UPGradWeighting`` with its ``QuadprogProjector``),
the Gram matrix is first divided by its trace (all zeros when the trace is below ``norm_eps``)
and ``reg_eps I`` is added: with the defaults (``1e-4`` both) the weights are TorchJD's to
solver precision. The ridge moves the answer by about ``reg_eps`` relative; ``reg_eps=0``
solves the paper's problem exactly, singular Gram matrices included (the weights are then
not unique; the direction ``J^T w`` is).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pyxtask import ops
from pyxtask.weighting._gram import GramWeighting

__all__ = ["UPGrad", "normalized_gram"]

#: A KKT residual above this means the solver failed (it is ~1e-15 when it succeeds).
RESIDUAL_LIMIT = 1e-8


def normalized_gram(gram: Tensor, norm_eps: float, reg_eps: float) -> Tensor:
    """``gram / trace(gram) + reg_eps I``, or ``reg_eps I`` when the trace is below ``norm_eps``.

    TorchJD's ``regularize(normalize(G, norm_eps), reg_eps)``: the trace is the squared Frobenius
    norm of the Jacobian, so this is the Gram matrix of ``J / ||J||_F``, made definite.
    """
    trace = gram.diagonal().sum()
    scaled = torch.where(trace < norm_eps, torch.zeros_like(gram), gram / trace)
    return scaled + reg_eps * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def check_eps(name: str, **values: float) -> None:
    for key, value in values.items():
        if not (value >= 0 and value < float("inf")):
            raise ValueError(f"{name}: {key} must be finite and >= 0, got {value}")


def check_pref(name: str, pref_vector: Tensor | None) -> Tensor | None:
    if pref_vector is None:
        return None
    pref = torch.as_tensor(pref_vector, dtype=torch.float64).detach().clone()
    if pref.dim() != 1 or not bool(torch.isfinite(pref).all()):
        raise ValueError(f"{name}: pref_vector must be a finite vector, got {pref_vector!r}")
    return pref


def preference(name: str, pref: Tensor | None, gram: Tensor) -> Tensor:
    T = gram.shape[0]
    if pref is None:
        return torch.full((T,), 1.0 / T, dtype=torch.float64, device=gram.device)
    if pref.shape != (T,):
        raise ValueError(f"{name}: pref_vector has {pref.numel()} entries for a {T}-task gram")
    return pref.to(gram.device)


def checked(name: str, residual: Tensor) -> None:
    worst = float(residual.max())
    if not worst <= RESIDUAL_LIMIT:
        raise RuntimeError(f"{name}: the dual-cone QP did not converge (KKT residual {worst:.2e})")


class UPGrad(GramWeighting):
    """Weights of the mean of the task gradients projected onto their dual cone.

    Args:
        pref_vector: the preference ``p`` combining the projections (default ``1/T``);
            a non-uniform one makes the method not permutation-equivariant.
        norm_eps, reg_eps: trace normalisation threshold and ridge, as TorchJD (see module).
        max_iter, tol: passed to :func:`pyxtask.ops.dual_cone_projection`.

    Two unit gradients at 120 degrees conflict: projecting each onto the dual cone adds some
    of the other task, and both weights grow from the mean's 1/2 to 3/4.

    >>> import torch
    >>> from pyxtask.weighting.upgrad import UPGrad
    >>> gram = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
    >>> UPGrad(reg_eps=0.0)(gram)
    tensor([0.7500, 0.7500], dtype=torch.float64)
    """

    name = "upgrad"
    permutation_equivariant = True
    scale = "mean"

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        *,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
        max_iter: int = 1000,
        tol: float = 1e-12,
    ) -> None:
        check_eps(self.name, norm_eps=norm_eps, reg_eps=reg_eps, tol=tol)
        if max_iter < 0:
            raise ValueError(f"{self.name}: max_iter must be >= 0, got {max_iter}")
        self.pref_vector = check_pref(self.name, pref_vector)
        self.permutation_equivariant = pref_vector is None
        self.norm_eps, self.reg_eps = float(norm_eps), float(reg_eps)
        self.max_iter, self.tol = int(max_iter), float(tol)

    def __call__(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        """``w = sum_i v_i`` (float64 ``(T,)``), ``v_i`` the QP's solution for ``u = p_i e_i``."""
        gram, _ = self._inputs(gram, losses)
        pref = preference(self.name, self.pref_vector, gram)
        M = normalized_gram(gram, self.norm_eps, self.reg_eps)
        V, residual = ops.dual_cone_projection(M, torch.diag(pref), self.max_iter, self.tol)
        checked(self.name, residual)
        return V.sum(dim=0)

    def state_dict(self) -> dict[str, Any]:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return {"name": self.name, "pref_vector": pref, "reg_eps": self.reg_eps}

    def __repr__(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return (
            f"{type(self).__name__}(pref_vector={pref}, norm_eps={self.norm_eps}, "
            f"reg_eps={self.reg_eps})"
        )
