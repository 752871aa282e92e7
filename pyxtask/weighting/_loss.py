"""Weightings computed from the task losses alone (and the method's own state).

A :class:`LossWeighting` never looks at gradients: it turns the T task losses it is shown,
step by step and epoch by epoch, into T loss factors. A training step drives it through three
hooks, each a no-op unless the method needs it:

1. :meth:`LossWeighting.observe` with the step's (detached) losses, before the backward; it
   returns the factors for this step (RLW draws them, FAMO computes them from the losses,
   DWA records the losses for its epoch average);
2. :meth:`LossWeighting.update` with the losses after the optimizer step (FAMO learns from the
   decrease between the two);
3. :meth:`LossWeighting.epoch_end` at the end of an epoch (DWA's weights change only then).

:meth:`LossWeighting.weights` reads the current weights without changing anything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
from torch import Tensor

from pyxtask import ops

__all__ = ["LossWeighting"]


class LossWeighting(ABC):
    """T loss factors from the task losses and the method's own state.

    Args:
        num_tasks: T, fixed for the weighting's lifetime (its state has one entry per task).
    """

    #: Short name used in messages, run folders and summaries.
    name: str = "loss-weighting"
    #: As :attr:`pyxtask.weighting.GramWeighting.scale`: ``"mean"`` if the factors sum to 1
    #: (equal tasks get 1/T; the step multiplies them by T), ``"sum"`` if they are loss
    #: factors as they are.
    scale: Literal["mean", "sum"] = "mean"

    def __init__(self, num_tasks: int) -> None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int):
            raise ValueError(f"{self.name}: num_tasks must be an int, got {num_tasks!r}")
        if not 1 <= num_tasks <= ops.MAX_TASKS:
            raise ValueError(
                f"{self.name}: num_tasks must be in [1, {ops.MAX_TASKS}], got {num_tasks}"
            )
        self.num_tasks = num_tasks

    @abstractmethod
    def weights(self) -> Tensor:
        """The current weights, float64 ``(T,)``; reading them changes nothing."""

    def observe(self, losses: Tensor) -> Tensor:
        """Record the step's task losses (before the backward); the factors for this step."""
        self._losses(losses)
        return self.weights()

    # Deliberate no-op defaults, not abstract methods: most weightings need only one hook.
    def update(self, new_losses: Tensor) -> None:  # noqa: B027
        """The task losses after the optimizer step (on the same batch or the next one)."""

    def epoch_end(self, mean_losses: Tensor | None = None) -> None:  # noqa: B027
        """The epoch is over; ``mean_losses`` are its mean task losses if the caller has them."""

    def _losses(self, losses: Tensor, what: str = "losses") -> Tensor:
        """``losses`` as float64 ``(T,)`` on the CPU after checking shape and finiteness.

        Raises ValueError with a one-line message naming the weighting and the problem.
        """
        losses = torch.as_tensor(losses).detach()
        if losses.shape != (self.num_tasks,):
            raise ValueError(
                f"{self.name}: {what} must have shape ({self.num_tasks},), "
                f"got {tuple(losses.shape)}"
            )
        if not (losses.is_floating_point() or losses.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{self.name}: {what} must hold real numbers, got {losses.dtype}")
        losses = losses.to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(losses).all()):
            raise ValueError(f"{self.name}: {what} have non-finite entries (NaN or Inf)")
        return losses

    def _check_state(self, state: dict[str, Any], mine: dict[str, Any]) -> None:
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"{self.name}: state is for {theirs}, this weighting is {mine}")

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_tasks": self.num_tasks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state, self.state_dict())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tasks={self.num_tasks})"
