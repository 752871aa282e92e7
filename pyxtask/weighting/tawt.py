"""TAWT, target-aware weighted training (Chen et al., Alg. 1, eqs. 2.7-2.9, Sec. 4, App. B).

The weights move by one mirror-descent step (eq. 2.8) per update,

    w_t <- w_t * exp(-eta * g_t) / sum_t' w_t' * exp(-eta * g_t'),    g_t = -c * s_t,

where ``s_t`` measures how much the target's gradient agrees with task ``t``'s:

``"cosine"`` (the paper's experiments, Sec. 4)
    ``s_t = cos(grad L_0, grad L_t)``; c = 1 for the joint paradigms, c picked from
    {1, 10, 30, 100} on the target's dev set for pre-training;
``"exact"`` (eq. 2.7)
    ``s_t = x . grad L_t`` with ``x`` the solution of ``[sum_t omega_t H_t] x = grad L_0``,
    one conjugate-gradient solve over Hessian-vector products (:func:`exact_reference`);
``"dot"`` (the identity approximation)
    ``s_t = grad L_0 . grad L_t``: eq. 2.7 with the Hessian replaced by ``I / c``.

Mirror descent on ``w`` and on ``omega`` differ by the fixed factor ``n_t``, which the
normalisation divides out, so one step on ``w`` is the paper's step on ω. The gradients are
taken by the trainer on a random subset of ``probe_size`` examples per task in eval mode, as
the authors' code does; for the joint paradigms the target is one of the tasks (cos = 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from pyxtask import ops
from pyxtask.gradients import GradientStats
from pyxtask.hessian import CGResult, conjugate_gradient, hvp_function
from pyxtask.weighting._base import Paradigm, Weighting
from pyxtask.weighting.uniform import normalized_w

__all__ = ["SIMILARITIES", "TAWT", "Similarity", "exact_reference"]

Similarity = Literal["cosine", "dot", "exact"]
SIMILARITIES: tuple[str, ...] = ("cosine", "dot", "exact")
PRETRAIN_C: tuple[float, ...] = (1.0, 10.0, 30.0, 100.0)


class TAWT(Weighting):
    """Target-aware task weights for one of the paper's three paradigms.

    Args:
        task_sizes: ``n_t`` for ``[target, source 1, ...]``.
        paradigm: ``"joint"`` (ω starts at n_t / Σn), ``"normalized-joint"`` (ω starts at
            1/(T+1)) or ``"pretrain"`` (sources only, ω starts at n_t / Σn over the sources).
        similarity: ``"cosine"``, ``"dot"`` or ``"exact"`` (see the module docs).
        c: the constant in ``g_t = -c * s_t`` (default 1).
        lr: the mirror-descent step η (default 1.0, the paper's).
        probe_size: examples per task the gradients are taken on (default 64).
        update_every: update every this many optimizer steps; ``None`` (default) once per epoch.
        damping, cg_max_iter, cg_tol: the exact variant's conjugate-gradient solve of
            ``(H + damping I) x = grad L_0``.

    >>> import torch
    >>> from pyxtask.weighting import TAWT
    >>> tawt = TAWT([200, 2000, 2000], paradigm="normalized-joint")
    >>> tawt.update(torch.tensor([1.0, 0.5, -0.1], dtype=torch.float64))  # cosines
    >>> [round(x, 3) for x in tawt.omega.tolist()]
    [0.516, 0.313, 0.172]
    """

    needs_gradients = True
    name = "tawt"

    def __init__(
        self,
        task_sizes: Sequence[int],
        paradigm: Paradigm = "normalized-joint",
        *,
        similarity: Similarity = "cosine",
        c: float = 1.0,
        lr: float = 1.0,
        probe_size: int = 64,
        update_every: int | None = None,
        damping: float = 1e-2,
        cg_max_iter: int = 20,
        cg_tol: float = 1e-3,
    ) -> None:
        if paradigm == "single":
            raise ValueError("TAWT weights source tasks; paradigm 'single' has none")
        if similarity not in SIMILARITIES:
            raise ValueError(
                f"unknown similarity {similarity!r}; expected one of {list(SIMILARITIES)}"
            )
        for key, value in (("c", c), ("lr", lr)):
            if not float(value) > 0:
                raise ValueError(f"TAWT {key} must be > 0, got {value}")
        if probe_size < 1:
            raise ValueError(f"probe_size must be >= 1, got {probe_size}")
        if update_every is not None and update_every < 1:
            raise ValueError(
                f"update_every must be >= 1 step (or None: per epoch), got {update_every}"
            )
        if damping < 0 or cg_max_iter < 1 or not cg_tol > 0:
            raise ValueError("damping must be >= 0, cg_max_iter >= 1 and cg_tol > 0")
        self.similarity: Similarity = similarity
        self.c = float(c)
        self.lr = float(lr)
        self.probe_size = int(probe_size)
        self.update_every = update_every
        self.damping = float(damping)
        self.cg_max_iter = int(cg_max_iter)
        self.cg_tol = float(cg_tol)
        super().__init__(task_sizes, paradigm)

    def initial_w(self) -> Tensor:
        if self.paradigm == "normalized-joint":
            return normalized_w(self.included, self.sizes)
        return super().initial_w()

    def similarities(self, stats: GradientStats) -> Tensor:
        """``s_t`` from a probe's statistics: cosines for ``"cosine"``, else the dot products
        with the reference vector (the target's gradient, or ``x`` for ``"exact"``)."""
        if self.similarity == "cosine":
            return stats.reference_cosines()
        return stats.reference_dots.clone()

    def update(self, similarity: Tensor | None = None, **where: Any) -> None:
        """One mirror-descent step (eq. 2.8) from ``s_t`` (float64 ``(T,)``).

        Tasks outside the objective keep weight 0. Extra keyword arguments (``epoch``,
        ``step``) are recorded in :attr:`trajectory`.
        """
        if similarity is None:
            raise ValueError("TAWT.update needs the similarities s_t of the tasks")
        s = torch.as_tensor(similarity, dtype=torch.float64).reshape(-1)
        if s.numel() != self.num_tasks:
            raise ValueError(f"got {s.numel()} similarities for {self.num_tasks} tasks")
        if not bool(torch.isfinite(s[self.included]).all()):
            raise FloatingPointError(f"TAWT: similarities {s.tolist()} are not finite")
        g = torch.where(self.included, -self.c * s, torch.zeros_like(s))
        if not bool(torch.isfinite(g).all()):
            raise FloatingPointError(f"TAWT: -c * s = {g.tolist()} overflows (c = {self.c})")
        self._set(ops.mirror_descent_step(self._w, g, self.lr), s, **where)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["hyper"] = self._hyper()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("hyper") != self._hyper():
            raise ValueError(
                f"state is for TAWT {state.get('hyper')}, this TAWT is {self._hyper()}"
            )
        super().load_state_dict(state)

    def _hyper(self) -> dict[str, Any]:
        return {"similarity": self.similarity, "c": self.c, "lr": self.lr}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", similarity={self.similarity!r}, c={self.c:g})"


def exact_reference(
    hessian_loss: Callable[[], Tensor],
    params: Sequence[Tensor],
    target_grad: Sequence[Tensor],
    *,
    damping: float = 1e-2,
    max_iter: int = 20,
    tol: float = 1e-3,
    reduce: Callable[[Sequence[Tensor]], list[Tensor]] | None = None,
) -> tuple[Tensor, CGResult]:
    """``x`` of eq. 2.7: solves ``(H + damping I) x = grad L_0`` by conjugate gradients.

    ``hessian_loss()`` is ``sum_t omega_t L_t`` (the weighted objective whose Hessian H the
    paper inverts); HVPs are exact (double backward). Returns ``x`` flattened like
    :class:`~pyxtask.gradients.TaskGradients` flattens (parameter order, each row-major) and
    the solver's report; then ``s_t = x . grad L_t`` for every task comes from one
    ``backward`` with ``reference=x``.

    ``reduce`` sums a list of tensors over processes (torchrun): each process's
    ``hessian_loss`` and ``target_grad`` are its share of the global ones, so every HVP is
    summed, ``target_grad`` must already be, and conjugate gradients then run identically on
    every process (P floats exchanged per iteration).
    """
    params = list(params)
    local_hvp = hvp_function(hessian_loss, params)
    hvp = local_hvp if reduce is None else lambda v: reduce(local_hvp(v))
    result = conjugate_gradient(
        hvp,
        [g.detach() for g in target_grad],
        damping=damping,
        max_iter=max_iter,
        tol=tol,
    )
    flat = ops.gather_flat([x.contiguous() for x in result.x])
    return flat, result
