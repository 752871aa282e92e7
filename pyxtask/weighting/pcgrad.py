"""PCGrad as weights from the Gram (Yu et al. 2020, "Gradient Surgery for Multi-Task
Learning", Sec. 2.2 and Alg. 1).

PCGrad replaces each task gradient ``g_i`` by a "projected" copy: starting from
``g_i^PC = g_i``, it visits the other tasks ``j != i`` in a random order and, whenever
``g_i^PC . g_j < 0``, removes the conflicting component (eq. in Alg. 1, line 6),

    g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2  g_j,

always projecting onto the *original* ``g_j``. The update is the sum ``sum_i g_i^PC``.

Every ``g_i^PC`` stays in the span of the task gradients, ``g_i^PC = sum_k c_ik g_k``, and both
the test ``g_i^PC . g_j = (M c_i)_j`` and the step ``c_ij -= (M c_i)_j / M_jj`` need only
``M = G G^T``; the weights are ``w = sum_i c_i`` (the projected gradients are summed, so they
are loss factors as they are: ``scale = "sum"``). This is the formulation of TorchJD's
``PCGradWeighting``.

What a projection guarantees: right after ``g_j`` is visited, ``g_i^PC . g_j >= 0`` (zero if it
was projected). A later projection onto another ``g_k`` can bring a conflict with ``g_j`` back,
so at the end only the *last* task visited is sure to be conflict-free with ``g_i^PC``; with two
tasks that is the whole statement, and tasks that conflict with nobody are left untouched.

The visiting order is part of the method. ``order="random"`` draws a fresh permutation per
task and call, as the paper and its reference code do, from ``generator`` (or from a private
generator seeded by ``seed``, or, with neither, from torch's global RNG, which reproduces
TorchJD's draws exactly); ``order="index"`` visits ``0, 1, ..., T-1`` for every task, a
deterministic order for reproducible runs and tests. Neither is permutation-equivariant: the
random order is so only in distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from pyxtask.weighting._gram import GramWeighting

__all__ = ["ORDERS", "Order", "PCGrad", "pcgrad_weights", "project"]

Order = Literal["random", "index"]
ORDERS: tuple[str, ...] = ("random", "index")


def project(gram: Tensor, i: int, order: Sequence[int]) -> Tensor:
    """``c_i`` (``(T,)``, the dtype of ``gram``) with ``g_i^PC = sum_k c_ik g_k`` after visiting
    the tasks of ``order`` in turn (``i`` itself, and tasks with a zero gradient, are skipped).

    ``gram`` must already be validated (a finite square float tensor).
    """
    c = torch.zeros(gram.shape[0], dtype=gram.dtype, device=gram.device)
    c[i] = 1.0
    for j in map(int, order):
        # g_j = 0 cannot conflict; its M_jj = 0 would only divide by zero.
        if j == i or not bool(gram[j, j] > 0):
            continue
        inner = gram[j] @ c
        if inner < 0.0:
            c[j] -= inner / gram[j, j]
    return c


def pcgrad_weights(gram: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    """``sum_i c_i`` for the visiting orders ``orders[i]`` of every task ``i``."""
    w = torch.zeros(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for i, order in enumerate(orders):
        w = w + project(gram, i, order)
    return w


class PCGrad(GramWeighting):
    """PCGrad's weights: the projected gradients ``g_i^PC`` written in the task gradients, summed.

    Args:
        order: ``"random"`` (default, as in the paper) or ``"index"`` (see the module docs).
        seed: for ``order="random"``, seed a private generator (reproducible, and saved in
            :meth:`state_dict`).
        generator: for ``order="random"``, draw from this generator instead.

    With ``seed`` and ``generator`` both left out, the orders come from torch's global RNG,
    like TorchJD's ``PCGradWeighting``.

    Two gradients ``(1, 0)`` and ``(-1, 1)`` conflict: each loses its component along the
    other, ``g_1^PC = (1/2, 1/2) = g_1 + g_2 / 2`` and ``g_2^PC = (0, 1) = g_1 + g_2``, so the
    update ``(1/2, 3/2)`` is ``2 g_1 + 1.5 g_2``. Without a conflict PCGrad is the plain sum
    (weights 1):

    >>> import torch
    >>> from pyxtask.weighting.pcgrad import PCGrad
    >>> PCGrad(order="index")(torch.tensor([[1.0, -1.0], [-1.0, 2.0]]))
    tensor([2.0000, 1.5000], dtype=torch.float64)
    >>> PCGrad(seed=0)(torch.tensor([[1.0, 0.5], [0.5, 2.0]]))
    tensor([1., 1.], dtype=torch.float64)
    """

    name = "pcgrad"
    permutation_equivariant = False
    scale = "sum"

    def __init__(
        self,
        order: Order = "random",
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"pcgrad: unknown order {order!r}; expected one of {list(ORDERS)}")
        if order == "index" and (seed is not None or generator is not None):
            raise ValueError("pcgrad: seed and generator only apply to order='random'")
        if seed is not None and generator is not None:
            raise ValueError("pcgrad: give a seed or a generator, not both")
        self.order: Order = order
        self.seed = seed
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        self.generator = generator

    def orders(self, num_tasks: int) -> list[list[int]]:
        """The visiting order of every task for one call (draws from the RNG when random)."""
        if self.order == "index":
            return [list(range(num_tasks)) for _ in range(num_tasks)]
        # One randperm per task, in task order: the same draws as TorchJD's loop.
        return [
            torch.randperm(num_tasks, generator=self.generator).tolist() for _ in range(num_tasks)
        ]

    def __call__(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        """The weights (float64 ``(T,)``) of ``sum_i g_i^PC`` for the T x T ``gram``."""
        gram, _ = self._inputs(gram, losses)
        # T scalar loops of T steps each: cheaper on the CPU than shuttling scalars off a GPU.
        device = gram.device
        gram = gram.cpu()
        return pcgrad_weights(gram, self.orders(gram.shape[0])).to(device)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"name": self.name, "order": self.order}
        # Only a private generator is ours to save; the global RNG belongs to the run.
        if self.seed is not None and self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"name": self.name, "order": self.order}
        if {k: state.get(k) for k in mine} != mine:
            raise ValueError(f"pcgrad: state is for {state.get('order')!r} order, this is {mine}")
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        extra = "" if self.seed is None else f", seed={self.seed}"
        return f"PCGrad(order={self.order!r}{extra})"
