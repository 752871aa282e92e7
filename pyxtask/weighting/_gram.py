"""Weightings computed from the Gram matrix of the per-task gradients.

A :class:`GramWeighting` maps ``M = G G^T`` (``M[t, s] = g_t . g_s`` for the T per-task
gradients ``g_t``, e.g. from :func:`pyxtask.ops.gram`) and, optionally, the T task losses to
T weights. Everything such a method needs about the gradients is in M: it is invariant to
any rotation of parameter space, and it is T x T however many parameters the model has.

Permuting the tasks permutes the rows and columns of M and the entries of the losses; a
method whose weights are then permuted the same way is *permutation-equivariant*
(:attr:`GramWeighting.permutation_equivariant`). Methods that single out a task (the target
of target-aware training) are not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
from torch import Tensor

from pyxtask import ops

__all__ = ["GramWeighting"]


class GramWeighting(ABC):
    """T weights from a T x T Gram matrix of per-task gradients (and optionally the losses).

    Subclasses implement :meth:`__call__` (returning float64 ``(T,)``) and validate their
    inputs with :meth:`_inputs`, which gives the messages every method shares.
    """

    #: Short name used in messages, run folders and summaries.
    name: str = "gram-weighting"
    #: Whether permuting the tasks (rows/columns of the Gram matrix, entries of the losses)
    #: permutes the weights the same way.
    permutation_equivariant: bool = True
    #: How a training step turns the weights into loss factors. ``"mean"``: the weights
    #: average the task gradients (equal tasks get 1/T), so the step multiplies them by T to
    #: keep the plain summed-loss step's scale; ``"sum"``: they are loss factors as they are
    #: (PCGrad's projected gradients are summed, Nash-MTL's alpha is its own scale).
    scale: Literal["mean", "sum"] = "mean"

    @abstractmethod
    def __call__(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        """The weights (float64 ``(T,)``) for ``gram`` (T x T) and the T task ``losses``."""

    def _inputs(self, gram: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``gram`` and ``losses`` in float64 after checking shape and finiteness.

        Raises ValueError with a one-line message naming the weighting and the problem.
        """
        gram = torch.as_tensor(gram).detach()
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(
                f"{self.name}: gram must be a square T x T matrix, got shape {tuple(gram.shape)}"
            )
        T = int(gram.shape[0])
        if T < 1:
            raise ValueError(f"{self.name}: gram is 0 x 0; need at least one task")
        if T > ops.MAX_TASKS:
            raise ValueError(f"{self.name}: gram has {T} tasks; at most {ops.MAX_TASKS} supported")
        if not (gram.is_floating_point() or gram.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{self.name}: gram must hold real numbers, got dtype {gram.dtype}")
        gram = gram.to(torch.float64)
        if not bool(torch.isfinite(gram).all()):
            raise ValueError(f"{self.name}: gram has non-finite entries (NaN or Inf)")
        if losses is None:
            return gram, None
        losses = torch.as_tensor(losses).detach()
        if losses.shape != (T,):
            raise ValueError(
                f"{self.name}: losses must have shape ({T},) for a {T} x {T} gram, "
                f"got {tuple(losses.shape)}"
            )
        losses = losses.to(device=gram.device, dtype=torch.float64)
        if not bool(torch.isfinite(losses).all()):
            raise ValueError(f"{self.name}: losses have non-finite entries (NaN or Inf)")
        return gram, losses

    def state_dict(self) -> dict[str, Any]:
        """Stateless by default: an empty dict."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A weighting whose state is only its settings: check that ``state`` (from
        :meth:`state_dict`) was saved by a weighting with the same settings."""
        mine = self.state_dict()
        if {k: state.get(k) for k in mine} != mine:
            raise ValueError(f"{self.name}: state is for {state}, this weighting is {mine}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
