"""Any loss weighting as a training method: every task's batch per step, one plain backward.

:class:`LossWeightedMethod` drives a :class:`~pyxtask.weighting.LossWeighting` (DWA, FAMO,
RLW): before the backward it shows the weighting the step's task losses and gets this step's
factors (``T * w`` for ``scale = "mean"``, so equal weights give the plain summed-loss step);
one backward of ``sum_t f_t L_t`` follows — no per-task gradients, so the step costs what the
plain step costs. After the optimizer update it gives the weighting the losses at the new
parameters (FAMO learns from their decrease) and at an epoch's end the epoch (DWA).

FAMO's losses after the update come, as in its paper and official trainers, from the same
batch (one extra forward without gradients, ``update_with = "same-batch"``), or from the next
step's batch (``"next-step"``: no extra forward; the change then also includes the switch of
batch). With gradient accumulation the factors are computed from the first micro-batch.

>>> from pyxtask.methods.loss_weighted import LossWeightedMethod
>>> from pyxtask.weighting.rlw import RLW
>>> LossWeightedMethod(lambda T: RLW(T, seed=0), "rlw").name
'rlw'
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar, Literal, cast

import torch
from torch import Tensor

from pyxtask.methods._base import Method, Sampling, Step, StepContext, checked_losses, shares
from pyxtask.weighting._loss import LossWeighting

__all__ = ["LossWeightedMethod"]

UpdateWith = Literal["same-batch", "next-step"]


class LossWeightedMethod(Method):
    """Loss factors from a :class:`LossWeighting` (see the module docs).

    Args:
        weighting: builds the weighting for T tasks (called once the tasks are known).
        name: the method's name.
        update_with: where the losses after an update come from (only weightings that learn
            from them, FAMO, use it).
    """

    sampling: ClassVar[Sampling] = "all"
    adaptive: ClassVar[bool] = True
    data_parallel: ClassVar[bool] = True

    def __init__(
        self,
        weighting: Callable[[int], LossWeighting],
        name: str,
        *,
        update_with: UpdateWith = "same-batch",
    ) -> None:
        super().__init__()
        if update_with not in ("same-batch", "next-step"):
            raise ValueError(f"{name}: update_with must be 'same-batch' or 'next-step'")
        self.make_weighting = weighting
        self.name = name
        self.update_with: UpdateWith = update_with
        self.weighting: LossWeighting | None = None
        self._factors: Tensor | None = None
        self._first: Step | None = None

    def bind(self, ctx: StepContext) -> None:
        self.weighting = self.make_weighting(ctx.num_tasks)
        self._factors = torch.ones(ctx.num_tasks, dtype=torch.float64)

    def _learns_from_updates(self) -> bool:
        return type(cast(LossWeighting, self.weighting)).update is not LossWeighting.update

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        m = len(micro_batches)
        totals: dict[int, float] = {}
        for j, step in enumerate(micro_batches):
            ctx.backward(partial(self._objective, ctx, step, j, m, totals), last=j == m - 1)
        return totals

    def _objective(
        self, ctx: StepContext, step: Step, j: int, m: int, totals: dict[int, float]
    ) -> Tensor:
        """Micro-batch ``j``'s weighted loss; the first one's losses set the weights."""
        weighting = cast(LossWeighting, self.weighting)
        losses = checked_losses(ctx, step, totals, m)
        if j == 0:
            values = _values(ctx, self.name, losses)
            if self.update_with == "next-step" and getattr(weighting, "pending", False):
                weighting.update(values)
            w = weighting.observe(values)
            scale = ctx.num_tasks if weighting.scale == "mean" else 1
            self._factors = w * scale
            self._first = step
        f = cast(Tensor, self._factors).tolist()
        total = sum(f[t] * loss / m for t, loss in enumerate(losses) if loss is not None)
        return cast(Tensor, total)

    def after_update(self, ctx: StepContext) -> None:
        weighting = cast(LossWeighting, self.weighting)
        if self.update_with == "same-batch" and self._learns_from_updates():
            with torch.no_grad():
                losses = ctx.step_losses(cast(Step, self._first))
            weighting.update(_values(ctx, self.name, losses))
        self.updates += 1
        self.record(ctx)

    def epoch_end(self, ctx: StepContext, epoch: int) -> None:
        cast(LossWeighting, self.weighting).epoch_end()

    def weights(self) -> tuple[Tensor, Tensor]:
        f = cast(Tensor, self._factors).detach().to(torch.float64).cpu()
        return f, shares(f)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["weighting"] = cast(LossWeighting, self.weighting).state_dict()
        state["factors"] = cast(Tensor, self._factors).clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        cast(LossWeighting, self.weighting).load_state_dict(state["weighting"])
        self._factors = state["factors"].clone()


def _values(ctx: StepContext, name: str, losses: list[Tensor | None]) -> Tensor:
    missing = [t for t, loss in enumerate(losses) if loss is None]
    if missing:
        raise ValueError(f"{name}: tasks {missing} have no batch in this step; it needs them all")
    # Summed over the processes under torchrun: every process's weighting sees global losses.
    values = ctx.loss_values([cast(Tensor, x) for x in losses])
    return torch.tensor(values, dtype=torch.float64)
