"""Uncertainty weighting (Kendall, Gal & Cipolla 2018, "Multi-task learning using uncertainty
to weigh losses for scene geometry and semantics", Sec. 3.2, eq. 10, classification form).

Each task t has a learnt homoscedastic noise ``sigma_t``; with ``s_t = log sigma_t^2`` (learnt
in place of sigma_t because it is unconstrained and numerically stable) the objective is

    sum_t exp(-s_t) L_t + s_t / 2          (eq. 10: (1 / sigma^2) L + log sigma),

so the loss weights are ``exp(-s_t)`` and the gradient in ``s`` is

    d/ds_t = -exp(-s_t) L_t + 1/2.

For fixed losses the optimum is ``s_t* = log(2 L_t)``, where ``exp(-s_t*) L_t = 1/2``: every
task's weighted loss is 1/2 whatever the scale of its loss, and scaling ``L_t`` by ``c`` only
shifts ``s_t*`` by ``log c``. The ``s_t / 2`` term is what keeps the weights from collapsing
to zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Uncertainty", "log_var_gradient", "loss_weights", "objective", "optimal_log_vars"]


def loss_weights(log_vars: Tensor) -> Tensor:
    """``exp(-s_t)``, the factor multiplying each task's loss (same dtype as ``log_vars``)."""
    return torch.exp(-log_vars)


def objective(log_vars: Tensor, losses: Tensor) -> Tensor:
    """``sum_t exp(-s_t) L_t + s_t / 2`` (differentiable in both)."""
    return (torch.exp(-log_vars) * losses + 0.5 * log_vars).sum()


def log_var_gradient(log_vars: Tensor, losses: Tensor) -> Tensor:
    """``d objective / d s_t = -exp(-s_t) L_t + 1/2`` (same dtype as the inputs)."""
    return 0.5 - torch.exp(-log_vars) * losses


def optimal_log_vars(losses: Tensor) -> Tensor:
    """``s_t* = log(2 L_t)``, where :func:`log_var_gradient` is zero (losses must be > 0)."""
    return torch.log(2 * losses)


class Uncertainty(torch.nn.Module):
    """The learnable ``s = log sigma^2`` (one per task, starting at 0: every weight 1).

    Its parameters go into the model's optimizer; ``forward(losses)`` is the objective.

    >>> import torch
    >>> from pyxtask.weighting import Uncertainty
    >>> u = Uncertainty(2, dtype=torch.float64)
    >>> total = u(torch.tensor([2.0, 0.5], dtype=torch.float64))
    >>> total.backward()
    >>> u.log_vars.grad  # -exp(-s) L + 1/2 at s = 0
    tensor([-1.5000,  0.0000], dtype=torch.float64)
    """

    name = "uncertainty"

    def __init__(self, num_tasks: int, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if int(num_tasks) < 1:
            raise ValueError(f"uncertainty: num_tasks must be >= 1, got {num_tasks}")
        self.log_vars = torch.nn.Parameter(torch.zeros(int(num_tasks), dtype=dtype))

    def forward(self, losses: Tensor) -> Tensor:
        if losses.shape != self.log_vars.shape:
            raise ValueError(
                f"uncertainty: losses must have shape {tuple(self.log_vars.shape)}, "
                f"got {tuple(losses.shape)}"
            )
        return objective(self.log_vars, losses)

    def weights(self) -> Tensor:
        """The current loss weights ``exp(-s_t)`` (detached)."""
        return loss_weights(self.log_vars.detach())

    def extra_repr(self) -> str:
        return f"num_tasks={self.log_vars.numel()}"
