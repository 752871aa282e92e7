"""GradNorm, gradient normalisation for adaptive loss balancing (Chen et al. 2018, Sec. 3.2,
eqs. 1-2, Alg. 1).

The weights ``w_t`` of the loss ``sum_t w_t L_t`` are trained so that each task's weighted
gradient norm at a chosen shared layer W,

    G_W(t) = || grad_W w_t L_t || = w_t ||grad_W L_t||,

approaches a common scale times the task's relative inverse training rate (eq. 1):

    target_t = mean_t(G_W) * r_t^alpha,    r_t = Lt_t / mean_t(Lt),    Lt_t = L_t / L_t(0),

so a task whose loss has fallen less than the others' (r_t > 1) gets a larger gradient. The
weights follow the gradient of (eq. 2)

    L_grad = sum_t | G_W(t) - target_t |,

with the target held constant (the paper: no gradient flows through it), which gives

    dL_grad / dw_t = sign(G_W(t) - target_t) ||grad_W L_t||,

and after every step they are renormalised to sum to T (Alg. 1). ``alpha`` (default 1.5, the
paper's choice for NYUv2) sets how strongly the rates pull; ``alpha = 0`` asks for equal
gradient norms.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["GradNorm", "inverse_training_rates", "targets", "weight_gradient"]

#: The smallest weight :meth:`GradNorm.renormalize` lets through (before rescaling to sum T).
WEIGHT_FLOOR = 1e-8


def _vector(name: str, x: Tensor, T: int | None = None) -> Tensor:
    x = torch.as_tensor(x).detach()
    if x.dim() != 1 or (T is not None and x.shape[0] != T):
        want = "(T,)" if T is None else f"({T},)"
        raise ValueError(f"gradnorm: {name} must have shape {want}, got {tuple(x.shape)}")
    x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"gradnorm: {name} have non-finite entries: {x.tolist()}")
    return x


def inverse_training_rates(losses: Tensor, initial_losses: Tensor) -> Tensor:
    """``r_t = Lt_t / mean(Lt)`` with ``Lt_t = L_t / L_t(0)`` (float64 ``(T,)``).

    Losses must be >= 0 and initial losses > 0. When every loss is zero no task lags the
    others and every r_t is 1.
    """
    L0 = _vector("initial losses", initial_losses)
    L = _vector("losses", losses, int(L0.shape[0]))
    if bool((L0 <= 0).any()):
        raise ValueError(f"gradnorm: initial losses must be > 0, got {L0.tolist()}")
    if bool((L < 0).any()):
        raise ValueError(f"gradnorm: losses must be >= 0, got {L.tolist()}")
    ratio = L / L0
    mean = ratio.mean()
    if not bool(mean > 0):
        return torch.ones_like(ratio)
    return ratio / mean


def targets(weights: Tensor, grad_norms: Tensor, rates: Tensor, alpha: float) -> Tensor:
    """``mean_t(w_t ||grad_W L_t||) * r_t^alpha``, the value each G_W(t) is pulled to (eq. 1)."""
    w = _vector("weights", weights)
    T = int(w.shape[0])
    g = _vector("grad norms", grad_norms, T)
    r = _vector("rates", rates, T)
    return (w * g).mean() * r.pow(alpha)


def weight_gradient(
    weights: Tensor, grad_norms: Tensor, losses: Tensor, initial_losses: Tensor, alpha: float
) -> Tensor:
    """``dL_grad / dw_t = sign(G_W(t) - target_t) ||grad_W L_t||`` (float64 ``(T,)``).

    ``grad_norms`` are the *unweighted* norms ``||grad_W L_t||``; the target is a constant.
    At ``G_W(t) == target_t`` the subgradient 0 is taken (as autograd takes it for ``abs``).
    """
    w = _vector("weights", weights)
    T = int(w.shape[0])
    g = _vector("grad norms", grad_norms, T)
    if bool((g < 0).any()):
        raise ValueError(f"gradnorm: grad norms must be >= 0, got {g.tolist()}")
    r = inverse_training_rates(
        _vector("losses", losses, T), _vector("initial losses", initial_losses, T)
    )
    return torch.sign(w * g - targets(w, g, r, alpha)) * g


class GradNorm:
    """GradNorm's weight gradient, remembering the first losses as ``L_t(0)``.

    Args:
        num_tasks: T.
        alpha: the restoring-force strength of eq. 1 (default 1.5).

    >>> import torch
    >>> from pyxtask.weighting import GradNorm
    >>> gn = GradNorm(2)
    >>> w = torch.ones(2, dtype=torch.float64)
    >>> gn.weight_gradient(w, torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]))
    tensor([-1.,  3.], dtype=torch.float64)
    >>> GradNorm.renormalize(torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64))
    tensor([0.3750, 1.1250, 1.5000], dtype=torch.float64)
    """

    name = "gradnorm"

    def __init__(self, num_tasks: int, *, alpha: float = 1.5) -> None:
        if int(num_tasks) < 1:
            raise ValueError(f"gradnorm: num_tasks must be >= 1, got {num_tasks}")
        if not (math.isfinite(float(alpha)) and float(alpha) >= 0):
            raise ValueError(f"gradnorm: alpha must be finite and >= 0, got {alpha}")
        self.num_tasks = int(num_tasks)
        self.alpha = float(alpha)
        #: ``L_t(0)``: the losses of the first :meth:`weight_gradient` call.
        self.initial_losses: Tensor | None = None

    def weight_gradient(self, weights: Tensor, grad_norms: Tensor, losses: Tensor) -> Tensor:
        """``dL_grad / dw`` (float64 ``(T,)``) for the current weights, unweighted gradient
        norms ``||grad_W L_t||`` and losses; the first call's losses become ``L_t(0)``."""
        T = self.num_tasks
        L = _vector("losses", losses, T)
        initial = L.clone() if self.initial_losses is None else self.initial_losses
        out = weight_gradient(
            _vector("weights", weights, T),
            _vector("grad norms", grad_norms, T),
            L,
            initial,
            self.alpha,
        )
        self.initial_losses = initial  # only once the first call's inputs were valid
        return out

    @staticmethod
    def renormalize(weights: Tensor) -> Tensor:
        """The weights rescaled to sum to T (Alg. 1), each first raised to at least
        :data:`WEIGHT_FLOOR`.

        A gradient step can drive a weight to zero or below; a zero weight would silence its
        task for good (its G_W stays 0 whatever the target) and a negative one would train it
        to *increase* its loss, so the floor keeps every weight a tiny positive number.
        """
        w = _vector("weights", weights)
        w = w.clamp(min=WEIGHT_FLOOR)
        return w * (w.shape[0] / w.sum())

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        initial = None if self.initial_losses is None else self.initial_losses.tolist()
        return {
            "name": self.name,
            "num_tasks": self.num_tasks,
            "alpha": self.alpha,
            "initial_losses": initial,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"name": self.name, "num_tasks": self.num_tasks, "alpha": self.alpha}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"gradnorm: state is for {theirs}, this GradNorm is {mine}")
        initial = state.get("initial_losses")
        if initial is None:
            self.initial_losses = None
            return
        L0 = _vector("initial losses", torch.tensor(initial, dtype=torch.float64), self.num_tasks)
        if bool((L0 <= 0).any()):
            raise ValueError(f"gradnorm: state has initial losses {initial}; they must be > 0")
        self.initial_losses = L0

    def __repr__(self) -> str:
        return f"GradNorm(num_tasks={self.num_tasks}, alpha={self.alpha:g})"
