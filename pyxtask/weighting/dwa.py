"""Dynamic Weight Average (Liu, Johns & Davison 2019, "End-to-End Multi-Task Learning with
Attention", Sec. 3.3, eq. 1).

DWA weighs each task by how slowly its loss has been falling: with ``L_k(t)`` the mean loss of
task k over epoch t,

    r_k(t-1) = L_k(t-1) / L_k(t-2),
    w_k(t) = K exp(r_k(t-1) / Temp) / sum_i exp(r_i(t-1) / Temp),

for K tasks and temperature ``Temp`` (2 in the paper); ``w_k(t) = 1`` for the first two epochs,
before two epoch means exist. The weights sum to K and multiply the losses as they are
(``scale = "sum"``), and they change only at epoch boundaries.

The epoch means are those of LibMTL's trainer (``train_loss_buffer[:, epoch]``, filled at the
end of every epoch, and ``DWA.backward`` using columns ``epoch - 1`` and ``epoch - 2``): by
default the mean of the losses passed to :meth:`DWA.observe` during the epoch (LibMTL weighs
its batches by size, which only differs for a short last batch); a caller that averages
differently passes its own means to :meth:`DWA.epoch_end`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pyxtask.weighting._loss import LossWeighting

__all__ = ["DWA"]


class DWA(LossWeighting):
    """Per-epoch weights ``K softmax(r / Temp)`` from the ratio of the last two epoch-mean losses.

    Args:
        num_tasks: K.
        temperature: ``Temp`` (default 2, the paper's); larger is closer to uniform.

    Call :meth:`observe` with every step's losses and :meth:`epoch_end` after every epoch:

    >>> import torch
    >>> from pyxtask.weighting.dwa import DWA
    >>> dwa = DWA(2)
    >>> for epoch_losses in ([1.0, 1.0], [0.5, 1.0]):  # task 0 halves, task 1 stalls
    ...     _ = dwa.observe(torch.tensor(epoch_losses))
    ...     dwa.epoch_end()
    >>> dwa.weights()  # the stalling task gets more weight in epoch 3
    tensor([0.8756, 1.1244], dtype=torch.float64)
    """

    name = "dwa"
    scale = "sum"

    def __init__(self, num_tasks: int, *, temperature: float = 2.0) -> None:
        super().__init__(num_tasks)
        if not (temperature > 0 and temperature < float("inf")):
            raise ValueError(f"dwa: temperature must be finite and > 0, got {temperature}")
        self.temperature = float(temperature)
        # The last two epoch means are all eq. 1 needs.
        self.history: list[Tensor] = []
        self._sum = torch.zeros(num_tasks, dtype=torch.float64)
        self._count = 0
        self._weights = torch.ones(num_tasks, dtype=torch.float64)

    def weights(self) -> Tensor:
        """``w(t)`` for the current epoch: ones until two epochs have ended."""
        return self._weights.clone()

    def observe(self, losses: Tensor) -> Tensor:
        """Add the step's losses to the epoch mean; the (epoch-constant) weights."""
        self._sum += self._losses(losses)
        self._count += 1
        return self.weights()

    def epoch_end(self, mean_losses: Tensor | None = None) -> None:
        """Close the epoch with ``mean_losses`` (default: the mean of the observed losses)."""
        if mean_losses is not None:
            mean = self._losses(mean_losses, "mean_losses")
        elif self._count == 0:
            raise ValueError("dwa: epoch_end() with no losses observed this epoch")
        else:
            mean = self._sum / self._count
        if not bool((mean > 0).all()):
            # r = L(t-1) / L(t-2) divides by these means.
            raise ValueError(f"dwa: epoch-mean losses must be > 0, got {mean.tolist()}")
        self.history = [*self.history[-1:], mean]
        self._sum = torch.zeros(self.num_tasks, dtype=torch.float64)
        self._count = 0
        if len(self.history) == 2:
            r = self.history[1] / self.history[0]
            self._weights = self.num_tasks * torch.softmax(r / self.temperature, dim=0)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "temperature": self.temperature,
            "history": [h.tolist() for h in self.history],
            "sum": self._sum.tolist(),
            "count": self._count,
            "weights": self._weights.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state, {**super().state_dict(), "temperature": self.temperature})
        self.history = [torch.tensor(h, dtype=torch.float64) for h in state["history"]]
        self._sum = torch.tensor(state["sum"], dtype=torch.float64)
        self._count = int(state["count"])
        self._weights = torch.tensor(state["weights"], dtype=torch.float64)

    def __repr__(self) -> str:
        return f"DWA(num_tasks={self.num_tasks}, temperature={self.temperature})"
