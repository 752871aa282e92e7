"""GradNorm (Chen et al. 2018, alpha = 1.5): learnable task weights that balance gradient norms.

Every task's batch in every step; the loss factors are the learnable weights ``w`` (summing to
T). The step's own backward passes measure ``||grad_W L_t||`` in streaming mode (hooks, no
buffer); ``w.grad`` is GradNorm's ``dL_grad/dw`` (:class:`~pyxtask.weighting.GradNorm`), the
optimizer moves ``w`` in its own group, and ``w`` is renormalised to sum to T.

W is every shared parameter: the paper takes the last shared layer to save a backward pass,
but the hooks measure the whole encoder's gradient norms during the step's own backward at no
extra cost.

Across processes (torchrun): the losses are the global means; the norms are exact (the T x P
rows summed, ``distributed.statistics = "exact"``) or estimated (``"cheap"``: ``R`` times the
sum of the processes' squared norms); ``w``'s gradient is computed from them identically on
every process and is not summed again.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from pyxtask.methods._base import Method, Sampling, Step, StepContext, shares
from pyxtask.weighting import GradNorm

__all__ = ["GradNormMethod"]


class GradNormMethod(Method):
    """GradNorm's step (see the module docs); ``lr`` is the weights' learning rate."""

    name = "gradnorm"
    sampling: ClassVar[Sampling] = "all"
    adaptive: ClassVar[bool] = True

    def __init__(self, *, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__()
        self.alpha, self.lr = float(alpha), float(lr)
        self.task_weights: nn.Parameter | None = None
        self._gradnorm: GradNorm | None = None

    def bind(self, ctx: StepContext) -> None:
        self._gradnorm = GradNorm(ctx.num_tasks, alpha=self.alpha)
        self.task_weights = nn.Parameter(torch.ones(ctx.num_tasks, dtype=torch.float64))

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.task_weights is None else [self.task_weights]

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        assert self.task_weights is not None and self._gradnorm is not None
        w = self.task_weights.detach()
        stats, losses = self.measured_backward(ctx, micro_batches, w.tolist())
        norms = stats.sq_norms.sqrt()
        L = torch.tensor([losses[t] for t in range(ctx.num_tasks)], dtype=torch.float64)
        self.task_weights.grad = self._gradnorm.weight_gradient(w, norms, L)
        ctx.mark_reduced([self.task_weights])  # from global norms and losses: not summed again
        return losses

    def after_update(self, ctx: StepContext) -> None:
        assert self.task_weights is not None
        with torch.no_grad():
            self.task_weights.copy_(GradNorm.renormalize(self.task_weights.detach()))
        self.updates += 1
        self.record(ctx)

    def weights(self) -> tuple[Tensor, Tensor]:
        assert self.task_weights is not None
        w = self.task_weights.detach().clone()
        return w, shares(w)

    def state_dict(self) -> dict[str, object]:
        assert self._gradnorm is not None
        return {**super().state_dict(), "gradnorm": self._gradnorm.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        assert self._gradnorm is not None
        super().load_state_dict(dict(state))
        self._gradnorm.load_state_dict(dict(state["gradnorm"]))  # type: ignore[call-overload]
