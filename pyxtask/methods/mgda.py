"""MGDA on the shared encoder's Gram, and MGDA-UB on the representation (Sener & Koltun 2018).

:class:`MGDAMethod`: every task's batch in every step; the step's own backward passes write
each task's gradient of the shared encoder into a row of a T x P buffer (no second backward),
one pass over it gives the Gram matrix, ``min_norm_point`` the min-norm weights λ (with the
chosen normalisation, :class:`~pyxtask.weighting.MGDA`), and ``.grad`` becomes
``sum_t T * lambda_t * g_t`` (``T * lambda`` so that uniform λ gives every loss a factor of 1,
the scale of the plain summed-loss step).

:class:`MGDAUBMethod` (the paper's upper bound, Sec. 3.3): for tasks that label the same
inputs, one encoder pass serves every head; each task's gradient with respect to the
encoder's *output* (one backward to the representation per task) gives the Gram, and one
backward of ``sum_t T * lambda_t L_t`` runs through the encoder.

Across processes (torchrun): MGDA is a :class:`~pyxtask.methods.gram.GramMethod` (exact or
cheap statistics, see there). MGDA-UB's representation Gram is exact in both modes: the
processes' slices are disjoint coordinates of the batch's representation, so the global Gram
is the sum of theirs (T x T numbers).
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from pyxtask import ops
from pyxtask.config import ConfigError
from pyxtask.methods._base import Sampling, Step, StepContext, StepLosses
from pyxtask.methods.gram import GramMethod, loss_vector
from pyxtask.weighting import MGDA

__all__ = ["MGDAMethod", "MGDAUBMethod"]


class MGDAMethod(GramMethod):
    """MGDA on the shared parameters' gradients (see the module docs)."""

    def __init__(self, normalization: str = "none") -> None:
        super().__init__(MGDA(normalization=cast(Any, normalization)))


class MGDAUBMethod(MGDAMethod):
    """MGDA-UB: the Gram of the gradients with respect to the shared representation."""

    sampling: ClassVar[Sampling] = "shared"

    def __init__(self, normalization: str = "none") -> None:
        super().__init__(normalization)
        self.name = "mgda-ub"

    def bind(self, ctx: StepContext) -> None:
        super().bind(ctx)
        try:
            ctx.aligned()  # tasks that do not share their inputs fail here, before training
        except ConfigError as exc:
            raise ConfigError(f"{self.name}: {exc}") from None

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        if len(micro_batches) != 1:
            raise ValueError("mgda-ub takes one batch per step (no gradient accumulation)")
        ((_, global_rows),) = micro_batches[0]
        hidden, losses = ctx.shared_losses(global_rows)
        if hidden is None:
            return self._empty_step(ctx)
        read = StepLosses(ctx, 1)
        read.add(list(losses))
        values = read.values()
        rep = [
            torch.autograd.grad(loss, hidden, retain_graph=True)[0].reshape(-1) for loss in losses
        ]
        gram = ops.gram(torch.stack(rep).float()).double().cpu()
        # The processes' representations are disjoint coordinates of the global one: the sum
        # of their Grams is the global Gram, exactly, in both statistics modes.
        gram = ctx.distributed.all_reduce_(gram, "statistics")
        self._apply(ctx, gram, values, losses)
        return values

    def _empty_step(self, ctx: StepContext) -> dict[int, float]:
        """A process whose slice of the batch is empty: zero losses, its share of the Gram
        zero, the same collectives as the others."""
        T = ctx.num_tasks
        losses = [ctx.zero_loss(t) for t in range(T)]
        read = StepLosses(ctx, 1)
        read.add(list(losses))
        values = read.values()
        gram = ctx.distributed.all_reduce_(torch.zeros(T, T, dtype=torch.float64), "statistics")
        self._apply(ctx, gram, values, losses)
        return values

    def _apply(
        self, ctx: StepContext, gram: Tensor, values: dict[int, float], losses: list[Tensor]
    ) -> None:
        T = ctx.num_tasks
        self._factors = self.weighting(gram, loss_vector(values, T)) * T
        factors = self._factors.tolist()
        torch.autograd.backward(
            torch.stack([f * loss for f, loss in zip(factors, losses, strict=True)]).sum()
        )
        self.updates += 1
