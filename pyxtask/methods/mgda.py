"""MGDA on the shared encoder's Gram, and MGDA-UB on the representation (Sener & Koltun 2018).

:class:`MGDAMethod`: every task's batch in every step; the step's own backward passes write
each task's gradient of the shared encoder into a row of a T x P buffer (no second backward),
one pass over it gives the Gram matrix, ``min_norm_point`` the min-norm weights λ (with the
chosen normalisation, :class:`~pyxtask.weighting.MGDA`), and ``.grad`` becomes
``sum_t T * lambda_t * g_t`` (``T * lambda`` so that uniform λ gives every loss a factor of 1,
the scale of the plain summed-loss step).

:class:`MGDAUBMethod` (the paper's upper bound, Sec. 3.3): for tasks that label the same
inputs, one encoder pass serves every head; each task's gradient with respect to the
encoder's *output* (one backward to the representation per task) gives the Gram, and one
backward of ``sum_t T * lambda_t L_t`` runs through the encoder.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from pyxtask import ops
from pyxtask.config import ConfigError
from pyxtask.data import collate
from pyxtask.evaluation import autocast
from pyxtask.methods._base import Method, Sampling, Step, StepContext, backward_all, shares
from pyxtask.weighting import MGDA

__all__ = ["MGDAMethod", "MGDAUBMethod"]


class MGDAMethod(Method):
    """MGDA on the shared parameters' gradients (see the module docs)."""

    name: ClassVar[str] = "mgda"
    sampling: ClassVar[Sampling] = "all"
    adaptive: ClassVar[bool] = True

    def __init__(self, normalization: str = "none") -> None:
        super().__init__()
        self.weighting = MGDA(normalization=cast(Any, normalization))
        self._lambda: Tensor | None = None

    def bind(self, ctx: StepContext) -> None:
        self._lambda = torch.full((ctx.num_tasks,), 1.0 / ctx.num_tasks, dtype=torch.float64)

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        grads = self.task_gradients(ctx, "buffer")
        stats, losses = backward_all(ctx, micro_batches, grads, None)
        gram = cast(Tensor, stats[-1].gram)
        self._lambda = self.weighting(gram, _loss_vector(losses, ctx.num_tasks))
        grads.combine(self._lambda * ctx.num_tasks)
        self.updates += 1
        return losses

    def after_update(self, ctx: StepContext) -> None:
        self.record(ctx)

    def weights(self) -> tuple[Tensor, Tensor]:
        lam = cast(Tensor, self._lambda)
        return lam * lam.numel(), shares(lam)


class MGDAUBMethod(MGDAMethod):
    """MGDA-UB: the Gram of the gradients with respect to the shared representation."""

    name: ClassVar[str] = "mgda-ub"
    sampling: ClassVar[Sampling] = "shared"

    def bind(self, ctx: StepContext) -> None:
        super().bind(ctx)
        try:
            ctx.aligned()  # tasks that do not share their inputs fail here, before training
        except ConfigError as exc:
            raise ConfigError(f"{self.name}: {exc}") from None

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        if len(micro_batches) != 1:
            raise ValueError("mgda-ub takes one batch per step (no gradient accumulation)")
        ((_, rows),) = micro_batches[0]
        aligned = ctx.aligned()
        T, model = ctx.num_tasks, ctx.model
        first = collate([ctx.encoded[0][aligned[r][0]] for r in rows], ctx.pad)
        ids = first["input_ids"].to(ctx.device)
        mask = first["attention_mask"].to(ctx.device)
        losses: list[Tensor] = []
        with autocast(ctx.device, ctx.bf16):
            hidden = model.encode(ids, mask)
            for t in range(T):
                labels = collate([ctx.encoded[t][aligned[r][t]] for r in rows], ctx.pad)["labels"]
                out = model.apply_head(ctx.tasks[t].head, hidden, mask, labels.to(ctx.device))
                losses.append(cast(Tensor, out.loss).float())
        values = {t: float(loss.detach()) for t, loss in enumerate(losses)}
        for t, value in values.items():
            ctx.check_loss(ctx.tasks[t].name, value, ctx.global_step + 1)
        rep = [
            torch.autograd.grad(loss, hidden, retain_graph=True)[0].reshape(-1) for loss in losses
        ]
        gram = ops.gram(torch.stack(rep).float()).double().cpu()
        self._lambda = self.weighting(gram, _loss_vector(values, T))
        factors = (self._lambda * T).tolist()
        torch.autograd.backward(
            torch.stack([f * loss for f, loss in zip(factors, losses, strict=True)]).sum()
        )
        self.updates += 1
        return values


def _loss_vector(losses: dict[int, float], T: int) -> Tensor:
    return torch.tensor([losses.get(t, 0.0) for t in range(T)], dtype=torch.float64)
