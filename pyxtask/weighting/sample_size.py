"""Joint training: every example counts the same, so a task weighs by its size."""

from __future__ import annotations

from collections.abc import Sequence

from pyxtask.weighting._base import Paradigm, Weighting

__all__ = ["SampleSize"]


class SampleSize(Weighting):
    """``omega_t = n_t / sum(n)`` over the tasks in the objective (uniform loss factors ``w``).

    ``paradigm="joint"`` includes the target; ``"pretrain"`` is the sources-only phase of
    pre-training.

    >>> from pyxtask.weighting import SampleSize
    >>> [round(x, 3) for x in SampleSize([200, 1800, 2000]).omega.tolist()]
    [0.05, 0.45, 0.5]
    """

    name = "sample-size"

    def __init__(self, task_sizes: Sequence[int], paradigm: Paradigm = "joint") -> None:
        if paradigm not in ("joint", "pretrain"):
            raise ValueError(f"SampleSize is for 'joint' or 'pretrain', not {paradigm!r}")
        super().__init__(task_sizes, paradigm)
