"""Fixed task weights: single-task, joint and normalized joint training, in two step shapes.

:class:`StreamMethod` is the papers' protocol: every task's batches in one shuffled stream,
one batch per optimizer step, its loss multiplied by the weighting's factor ``K * w_t`` (or,
with ``weights_as="sampling"``, the task drawn with probability ω_t and factor 1). Which
weights is a :class:`~pyxtask.weighting.Weighting`: :class:`~pyxtask.weighting.TargetOnly`,
:class:`~pyxtask.weighting.SampleSize` (joint: ω ∝ n_t) or :class:`~pyxtask.weighting.Uniform`
(normalized joint: ω = 1/T). TAWT's probe protocol extends it (:mod:`pyxtask.methods.tawt`).

:class:`EqualMethod` is the all-tasks step with every task's batch loss counting once: the
plain summed-loss step that every per-step method is measured against.

Across processes (torchrun) both need no statistics: each process backwards its share of the
batch inside DDP, which sums the gradients while the step's last backward runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from pyxtask.methods._base import Method, Sampling, Step, StepContext, backward_all, shares
from pyxtask.weighting import Weighting

__all__ = ["EqualMethod", "StreamMethod"]


class StreamMethod(Method):
    """One task's batch per step from the stream, weighted by a fixed :class:`Weighting`.

    Args:
        make_weighting: builds the weighting from the tasks' training sizes.
        weights_as: ``"loss"`` (factors ``K * w_t``, the paper) or ``"sampling"`` (draw a
            task's batch with probability ω_t, factor 1).
    """

    name = "fixed"
    sampling: ClassVar[Sampling] = "one"
    data_parallel: ClassVar[bool] = True

    def __init__(
        self, make_weighting: Callable[[Sequence[int]], Weighting], weights_as: str = "loss"
    ) -> None:
        super().__init__()
        if weights_as not in ("loss", "sampling"):
            raise ValueError(f"weights_as must be 'loss' or 'sampling', got {weights_as!r}")
        self.make_weighting = make_weighting
        self.weights_as = weights_as
        self._weighting: Weighting | None = None

    @property
    def weighting(self) -> Weighting:
        if self._weighting is None:
            raise RuntimeError(f"{self.name}: bind() the method to a context first")
        return self._weighting

    @property
    def updates(self) -> int:
        return 0 if self._weighting is None else self._weighting.updates

    @updates.setter
    def updates(self, value: int) -> None:
        pass  # the weighting counts its own updates

    def bind(self, ctx: StepContext) -> None:
        self._weighting = self.make_weighting(ctx.sizes)

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        m = len(micro_batches)
        tasks: list[int] = []
        losses: list[Tensor] = []
        for j, step in enumerate(micro_batches):
            ((t, indices),) = step
            factor = 1.0
            if self.weights_as == "loss":
                factor = float(self.weighting.loss_factors()[t])
            scale = factor if m == 1 else factor / m
            ctx.backward(partial(_scaled_loss, ctx, t, indices, scale, losses), last=j == m - 1)
            tasks.append(t)
        return ctx.mean_losses(tasks, losses)

    def task_probabilities(self) -> list[float] | None:
        if self.weights_as != "sampling":
            return None
        return [float(x) for x in self.weighting.omega]

    def weights(self) -> tuple[Tensor, Tensor]:
        return self.weighting.w, self.weighting.omega

    def state_dict(self) -> dict[str, Any]:
        state = self.weighting.state_dict()
        state.pop("trajectory", None)
        return {"name": self.name, "weighting": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"the state is for method {state.get('name')!r}, not {self.name!r}")
        self.weighting.load_state_dict(cast(dict[str, Any], state["weighting"]))


def _scaled_loss(
    ctx: StepContext, t: int, indices: list[int], scale: float, losses: list[Tensor]
) -> Tensor:
    loss = ctx.batch_loss(t, indices)
    losses.append(loss)
    return loss * scale


class EqualMethod(Method):
    """Every task's batch in every step, each task's mean loss counting once (ω = 1/T)."""

    name = "equal"
    sampling: ClassVar[Sampling] = "all"
    data_parallel: ClassVar[bool] = True

    def bind(self, ctx: StepContext) -> None:
        self.num_tasks = ctx.num_tasks

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        return backward_all(ctx, micro_batches, None, None)[1]

    def weights(self) -> tuple[Tensor, Tensor]:
        w = torch.ones(self.num_tasks, dtype=torch.float64)
        return w, shares(w)
