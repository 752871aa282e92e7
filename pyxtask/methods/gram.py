"""Any Gram weighting as a training method: every task's batch per step, weights from the Gram.

:class:`GramMethod` drives a :class:`~pyxtask.weighting.GramWeighting` (MGDA, UPGrad, PCGrad,
CAGrad, IMTL-G, Aligned-MTL, Nash-MTL, DualProj, or a user's own): the step's own backward
passes write each task's gradient of the shared encoder into a row of a T x P buffer (no
second backward), one pass over the buffer gives the T x T Gram, the weighting maps it (and
the step's losses) to T weights, and one ``scatter_combination`` writes ``sum_t f_t g_t`` into
``.grad``. The loss factors are ``f = T * w`` for a weighting whose weights average the
gradients (``scale = "mean"``: equal weights 1/T give the plain summed-loss step) and
``f = w`` otherwise.

Across processes (torchrun): ``distributed.statistics = "exact"`` sums the T x P rows over
the processes (one all-reduce of T times the shared parameters) and forms the Gram, the
weights and the combination from the global rows, identically on every process (the shared
gradient is then not all-reduced again); ``"cheap"`` takes ``R`` times the sum of the
processes' Grams (T x T numbers) and sums the local combinations like a plain step.

>>> from pyxtask.methods.gram import GramMethod
>>> from pyxtask.weighting import MGDA
>>> GramMethod(MGDA()).name
'mgda'
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from pyxtask.methods._base import Method, Sampling, Step, StepContext, backward_all, shares
from pyxtask.weighting import GramWeighting

__all__ = ["GramMethod", "loss_vector"]


class GramMethod(Method):
    """Weights from the Gram of the step's per-task gradients (see the module docs).

    Args:
        weighting: maps the T x T Gram (and the T losses) to T weights.
        name: the method's name in run folders and summaries (default: the weighting's).
    """

    sampling: ClassVar[Sampling] = "all"
    adaptive: ClassVar[bool] = True

    def __init__(self, weighting: GramWeighting, name: str | None = None) -> None:
        super().__init__()
        self.weighting = weighting
        self.name = name or weighting.name
        self._factors: Tensor | None = None

    def factor_scale(self, num_tasks: int) -> float:
        """What the weights are multiplied by to become loss factors."""
        return float(num_tasks) if self.weighting.scale == "mean" else 1.0

    def bind(self, ctx: StepContext) -> None:
        self._factors = torch.ones(ctx.num_tasks, dtype=torch.float64)

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        grads = self.task_gradients(ctx, "buffer")
        stats, losses = backward_all(ctx, micro_batches, grads, None)
        gram = cast(Tensor, stats[-1].gram)
        w = self.weighting(gram, loss_vector(losses, ctx.num_tasks))
        self._factors = w * self.factor_scale(ctx.num_tasks)
        grads.combine(self._factors)
        self.updates += 1
        return losses

    def after_update(self, ctx: StepContext) -> None:
        self.record(ctx)

    def weights(self) -> tuple[Tensor, Tensor]:
        f = cast(Tensor, self._factors).detach().to(torch.float64).cpu()
        return f, shares(f)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "weighting": self.weighting.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "weighting" in state:  # checkpoints from before weightings kept state
            self.weighting.load_state_dict(state["weighting"])


def loss_vector(losses: dict[int, float], T: int) -> Tensor:
    """The step's mean losses as a float64 ``(T,)`` (0 for a task without a batch)."""
    return torch.tensor([losses.get(t, 0.0) for t in range(T)], dtype=torch.float64)
