"""MetaWeighting: task weights learnt by multi-objective hypergradient descent
("MetaWeighting: Learning to Weight Tasks in Multi-Task Learning", Sec. 4.3, Alg. 1, eqs. 9-13).

Each task's data is split into a support set (the model trains on it) and a query set (the
weights are judged on it). One training step is eq. 9,

    theta^k = theta^(k-1) - (eta / T) sum_s w_s grad L^s_s(theta^(k-1)),

so the hypergradient of task t's query loss with respect to ``w`` is the T-vector (eq. 10)

    d_t = dL^q_t(theta^k) / dw = -(eta / T) [grad L^q_t(theta^k) . grad L^s_s(theta^(k-1))]_s.

Stacking the rows ``d = (d_1; ...; d_T)`` (T x T), the common descent direction is the
min-norm point of their convex hull (eqs. 11-12),

    d_c = lam*^T d,    lam* = argmin_{lam in simplex} || lam^T d ||^2 = lam^T (d d^T) lam,

solved by :func:`pyxtask.ops.min_norm_point` on ``d d^T`` up to a positive factor (the paper's
Alg. 2 is plain Frank-Wolfe; the op adds away steps and stops on the KKT conditions), and the
weights move against it (eq. 13): ``w <- w - alpha d_c``. Moving against ``d_c`` decreases, to
first order, every task's query loss at once (the paper's Theorem 1, after Désidéri 2012),
unless d_c = 0.

The weights start at ``w0 = (1, ..., 1)`` (Alg. 1) and are not projected anywhere: the
paper's update has no projection, so a weight may in principle become zero or negative.
``eta`` is the model's own learning rate of eq. 9; it only scales ``d`` (hence ``d_c``), so it
must match the optimizer for ``alpha`` to mean what the paper's does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from pyxtask import ops

__all__ = ["MetaWeighting"]


class MetaWeighting:
    """The task weights ``w`` of MetaWeighting and their update (Alg. 1, eqs. 10-13).

    Args:
        num_tasks: T.
        alpha: the step size of eq. 13 (default 0.1).
        eta: the model's learning rate in eq. 9 (default 2e-5).

    The trainer takes one step on ``sum_t w_t L^s_t`` (eq. 9), measures the query gradients
    at the new parameters, and passes ``cross_gram[t, s] = grad L^q_t(theta^k) .
    grad L^s_s(theta^(k-1))`` (e.g. :func:`pyxtask.ops.cross_gram` of the two T x P gradient
    matrices) to :meth:`update`.

    >>> import torch
    >>> from pyxtask.weighting import MetaWeighting
    >>> mw = MetaWeighting(2, alpha=1.0, eta=0.1)
    >>> cross = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> mw.update(cross)  # d = -0.05 * cross, lam* = (0.2, 0.8), d_c = (-0.02, -0.04)
    tensor([1.0200, 1.0400], dtype=torch.float64)
    >>> mw.last_lambda
    tensor([0.2000, 0.8000], dtype=torch.float64)
    """

    name = "metaweighting"

    def __init__(self, num_tasks: int, *, alpha: float = 0.1, eta: float = 2e-5) -> None:
        if not 1 <= int(num_tasks) <= ops.MAX_TASKS:
            raise ValueError(
                f"metaweighting: num_tasks must be in 1..{ops.MAX_TASKS}, got {num_tasks}"
            )
        for key, value in (("alpha", alpha), ("eta", eta)):
            if not (math.isfinite(float(value)) and float(value) > 0):
                raise ValueError(f"metaweighting: {key} must be finite and > 0, got {value}")
        self.num_tasks = int(num_tasks)
        self.alpha = float(alpha)
        self.eta = float(eta)
        self._w = torch.ones(self.num_tasks, dtype=torch.float64)  # the paper's w0
        self.updates = 0
        #: lam* of eq. 12, the hypergradients d of eq. 10 and d_c of eq. 11 from the last update.
        self.last_lambda: Tensor | None = None
        self.last_d: Tensor | None = None
        self.last_direction: Tensor | None = None

    @property
    def w(self) -> Tensor:
        """The task weights (float64 ``(T,)``, a copy)."""
        return self._w.clone()

    def update(self, cross_gram: Tensor) -> Tensor:
        """One step of eq. 13 from ``cross_gram`` (T x T); returns the new ``w`` (a copy).

        ``cross_gram[t, s]`` is the query gradient of task t at the new parameters dotted
        with the support gradient of task s at the old ones. Raises ValueError for a wrong
        shape or non-finite entries, FloatingPointError if the step overflows; either way
        the weights are left as they were.
        """
        T = self.num_tasks
        c = torch.as_tensor(cross_gram).detach()
        if c.shape != (T, T):
            raise ValueError(
                f"metaweighting: cross_gram must be {T} x {T} (query task x support task), "
                f"got shape {tuple(c.shape)}"
            )
        c = c.to(device=self._w.device, dtype=torch.float64)
        if not bool(torch.isfinite(c).all()):
            raise ValueError("metaweighting: cross_gram has non-finite entries (NaN or Inf)")
        d = -(self.eta / T) * c  # row t is d_t of eq. 10
        # ||lam^T d||^2 = lam^T (d d^T) lam: eq. 12 is a min-norm point over the rows of d. Its
        # lam* does not change when d is multiplied by a nonzero number, but d d^T leaves the
        # float64 range for entries beyond ~1e154 (overflow) or below ~1e-162 (underflow to 0),
        # so the solve runs on c / max|c|, whose rows are those of d up to one common factor.
        peak = c.abs().max()
        unit = c / peak if bool(peak > 0) else c
        lam = ops.min_norm_point(ops.gram(unit))
        direction = lam @ d  # eq. 11
        w = self._w - self.alpha * direction  # eq. 13, unprojected as in the paper
        if not (bool(torch.isfinite(d).all()) and bool(torch.isfinite(w).all())):
            raise FloatingPointError(
                f"metaweighting: the update overflows (d_c = {direction.tolist()}, "
                f"alpha = {self.alpha})"
            )
        self._w = w
        self.updates += 1
        self.last_lambda, self.last_d, self.last_direction = lam, d, direction
        return w.clone()

    # -- state ---------------------------------------------------------------------------------

    def _hyper(self) -> dict[str, Any]:
        return {"num_tasks": self.num_tasks, "alpha": self.alpha, "eta": self.eta}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self._hyper(), "w": self._w.tolist(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(
                f"metaweighting: state is for {state.get('name')!r}, not MetaWeighting"
            )
        theirs = {k: state.get(k) for k in self._hyper()}
        if theirs != self._hyper():
            raise ValueError(
                f"metaweighting: state is for {theirs}, this MetaWeighting is {self._hyper()}"
            )
        w = torch.tensor(state["w"], dtype=torch.float64)
        if w.shape != (self.num_tasks,) or not bool(torch.isfinite(w).all()):
            raise ValueError(
                f"metaweighting: state has invalid weights {state['w']}: need "
                f"{self.num_tasks} finite numbers"
            )
        updates = int(state["updates"])
        if updates < 0:
            raise ValueError(f"metaweighting: state has {updates} updates")
        self._w = w
        self.updates = updates
        self.last_lambda = self.last_d = self.last_direction = None

    def __repr__(self) -> str:
        w = ", ".join(f"{x:.4g}" for x in self._w.tolist())
        return f"MetaWeighting(alpha={self.alpha:g}, eta={self.eta:g}, w=[{w}])"
