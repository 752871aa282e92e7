"""Normalized joint training: every task counts the same, whatever its size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pyxtask.weighting._base import Weighting

__all__ = ["Uniform"]


def normalized_w(included: Tensor, sizes: Tensor) -> Tensor:
    """Loss factors ``w_t ∝ 1 / n_t``: each task's total loss counts the same (ω = 1/T)."""
    inv = torch.where(included, 1.0 / sizes, torch.zeros_like(sizes))
    return inv / inv.sum()


class Uniform(Weighting):
    """``omega_t = 1 / T`` over all tasks, target included (``w_t ∝ 1 / n_t``).

    >>> from pyxtask.weighting import Uniform
    >>> [round(x, 6) for x in Uniform([200, 1800, 2000]).omega.tolist()]
    [0.333333, 0.333333, 0.333333]
    """

    name = "uniform"

    def __init__(self, task_sizes: Sequence[int]) -> None:
        super().__init__(task_sizes, "normalized-joint")

    def initial_w(self) -> Tensor:
        return normalized_w(self.included, self.sizes)
