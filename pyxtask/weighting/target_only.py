"""Single-task training: the target alone."""

from __future__ import annotations

from collections.abc import Sequence

from pyxtask.weighting._base import Weighting

__all__ = ["TargetOnly"]


class TargetOnly(Weighting):
    """All weight on the target (task 0); sources, if given, are ignored.

    >>> from pyxtask.weighting import TargetOnly
    >>> TargetOnly([200, 2000]).omega.tolist()
    [1.0, 0.0]
    """

    name = "single"

    def __init__(self, task_sizes: Sequence[int]) -> None:
        super().__init__(task_sizes, "single")
