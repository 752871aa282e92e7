"""Uncertainty weighting (Kendall, Gal & Cipolla 2018), the classification form.

Every task's batch in every step; the objective is ``sum_t exp(-s_t) L_t + s_t / 2`` with
learnable ``s_t = log sigma_t^2`` (:class:`~pyxtask.weighting.Uncertainty`), so one plain
backward gives the model ``sum_t exp(-s_t) grad L_t`` and ``s`` its own gradient; the
optimizer moves ``s`` in its own group (``lr``; at the encoder's 5e-5 it would barely move).

Across processes (torchrun) each process's objective holds its share of the losses and
``s_t / (2R)``, so their gradients, summed like the model's, are the one-process gradient and
``s`` stays the same everywhere.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from pyxtask.methods._base import Method, Sampling, Step, StepContext, StepLosses, shares
from pyxtask.weighting import Uncertainty

__all__ = ["UncertaintyMethod"]


class UncertaintyMethod(Method):
    """Learnable log variances; ``lr`` is their learning rate."""

    name = "uncertainty"
    sampling: ClassVar[Sampling] = "all"
    adaptive: ClassVar[bool] = True
    data_parallel: ClassVar[bool] = True

    def __init__(self, *, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = float(lr)
        self.uncertainty: Uncertainty | None = None

    def bind(self, ctx: StepContext) -> None:
        self.uncertainty = Uncertainty(ctx.num_tasks, dtype=torch.float64).to(ctx.device)

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.uncertainty is None else list(self.uncertainty.parameters())

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        assert self.uncertainty is not None
        m = len(micro_batches)
        read = StepLosses(ctx, m)
        for j, step in enumerate(micro_batches):
            ctx.backward(partial(self._objective, ctx, step, read, m), last=j == m - 1)
        return read.values()

    def _objective(self, ctx: StepContext, step: Step, read: StepLosses, m: int) -> Tensor:
        assert self.uncertainty is not None
        losses = ctx.step_losses(step)
        read.add(losses)
        stacked = torch.stack([loss.double() for loss in losses if loss is not None])
        objective = self.uncertainty(stacked)
        R = ctx.distributed.world_size
        if R > 1:  # the processes' objectives are summed: each adds s_t / 2 only once in R
            objective = objective - (1 - 1 / R) * 0.5 * self.uncertainty.log_vars.sum()
        return cast(Tensor, objective / m)

    def after_update(self, ctx: StepContext) -> None:
        self.updates += 1
        self.record(ctx)

    def weights(self) -> tuple[Tensor, Tensor]:
        assert self.uncertainty is not None
        w = self.uncertainty.weights().cpu()
        return w, shares(w)
