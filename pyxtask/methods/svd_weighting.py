"""SVD reweighting (Wu, Zhang & Ré 2020, Alg. 2) as a method: weights fixed once, at bind.

For tasks that label the same sentences (Brown's ``pos`` and ``upos``, the Turkish
treebank's layers): the *pretrained* encoder's features of a seeded sample of the shared
examples (token states at every position every task labels, or the target head's pooled
states for sentence tasks) give each task's ``α`` (:func:`pyxtask.weighting.svd.
svd_task_weights`), computed before the first step. Training then takes one batch of shared
examples per step (``sampling = "shared"``: one encoder pass serves every head, App. B.3's
"the SGD is applied on all the tasks jointly") and backwards ``Σ_t K w_t L_t`` with the fixed
``w = α / Σ α`` (K tasks, so equal α is the plain summed loss). The weights are the first
and only row of ``weights.csv``.
"""

from __future__ import annotations

import random
from functools import partial
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from pyxtask.data import LabelMap, collate
from pyxtask.methods._base import Method, Sampling, Step, StepContext, StepLosses, shares
from pyxtask.weighting.svd import svd_task_weights

__all__ = ["SVDWeightMethod", "shared_features"]


@torch.no_grad()
def shared_features(ctx: StepContext, rows: list[tuple[int, ...]]) -> tuple[Tensor, list[Tensor]]:
    """``X`` (n, H) and every task's (n,) label ids on the shared examples ``rows`` (rows of
    :meth:`StepContext.aligned`), from the model as it is (eval mode, fp32).

    Token tasks: one row per position that every task labels; sentence tasks: one row per
    example, pooled as the target's head pools.
    """
    model, T = ctx.model, ctx.num_tasks
    was_training = model.training
    model.eval()
    feats: list[Tensor] = []
    labels: list[list[Tensor]] = [[] for _ in range(T)]
    try:
        for start in range(0, len(rows), ctx.batch_size):
            chunk = rows[start : start + ctx.batch_size]
            first = collate([ctx.encoded[0][r[0]] for r in chunk], ctx.pad)
            ids, mask = first["input_ids"].to(ctx.device), first["attention_mask"].to(ctx.device)
            hidden = model.encode(ids, mask).float()
            ys = [
                collate([ctx.encoded[t][r[t]] for r in chunk], ctx.pad)["labels"].to(ctx.device)
                for t in range(T)
            ]
            if ys[0].dim() == 1:  # sentence tasks
                feats.append(model.head(ctx.tasks[0].head).pool(hidden, mask))
                keep = torch.ones_like(ys[0], dtype=torch.bool)
            else:
                keep = torch.stack([y != LabelMap.ignore_index for y in ys]).all(dim=0)
                feats.append(hidden[keep])
            for t in range(T):
                labels[t].append(ys[t][keep])
    finally:
        model.train(was_training)
    return torch.cat(feats).cpu(), [torch.cat(y).cpu() for y in labels]


class SVDWeightMethod(Method):
    """Alg. 2's weights from the pretrained encoder, then fixed (see the module docs).

    Args:
        rank: ``r`` (``None``: the number of tasks).
        examples: shared examples whose features give the weights (a seeded sample).
        center: centre the features first.
    """

    name = "svd"
    sampling: ClassVar[Sampling] = "shared"
    data_parallel: ClassVar[bool] = True

    def __init__(self, rank: int | None = None, examples: int = 512, center: bool = True) -> None:
        super().__init__()
        self.rank = rank
        self.examples = int(examples)
        self.center = center
        self.alpha = torch.ones(1, dtype=torch.float64)
        self.features_used = 0

    def bind(self, ctx: StepContext) -> None:
        from pyxtask.config import ConfigError  # noqa: PLC0415

        try:
            rows = ctx.aligned()  # tasks that do not share their inputs fail here
        except ConfigError as exc:
            raise ConfigError(f"{self.name}: {exc}") from None
        kinds = {t.kind for t in ctx.tasks}
        if len(kinds) > 1:
            names = ", ".join(f"{t.name} ({t.kind})" for t in ctx.tasks)
            raise ConfigError(
                f"{self.name}: Alg. 2 needs one feature matrix for every task, so tasks of one "
                f"kind (all token or all sentence tasks); got {names}"
            )
        k = min(len(rows), self.examples)
        picked = sorted(random.Random(ctx.seed).sample(range(len(rows)), k))
        features, labels = shared_features(ctx, [rows[i] for i in picked])
        self.features_used = int(features.shape[0])
        classes = [len(t.labels) for t in ctx.tasks]
        self.alpha = svd_task_weights(features, labels, classes, self.rank, center=self.center)
        if not bool(torch.isfinite(self.alpha).all()) or not float(self.alpha.sum()) > 0:
            raise FloatingPointError(f"{self.name}: the weights came out {self.alpha.tolist()}")

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        m = len(micro_batches)
        factors = (self.alpha.numel() * self.weights()[0]).tolist()
        read = StepLosses(ctx, m)
        for j, step in enumerate(micro_batches):
            ((_, rows),) = step
            ctx.backward(partial(_weighted_shared, ctx, rows, factors, read, m), last=j == m - 1)
        return read.values()

    def weights(self) -> tuple[Tensor, Tensor]:
        w = self.alpha / self.alpha.sum()
        return w, shares(w)

    def summary(self) -> dict[str, Any]:
        return {
            **super().summary(),
            "svd_alpha": self.alpha.tolist(),
            "svd_rank": self.alpha.numel() if self.rank is None else self.rank,
            "svd_feature_rows": self.features_used,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha": self.alpha.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        alpha = cast(Tensor, state["alpha"]).to(torch.float64)
        if alpha.shape != self.alpha.shape:
            raise ValueError(
                f"the state has {alpha.numel()} weights, this run {self.alpha.numel()}"
            )
        self.alpha = alpha.clone()


def _weighted_shared(
    ctx: StepContext, rows: list[int], factors: list[float], read: StepLosses, m: int
) -> Tensor:
    """``sum_t f_t L_t / m`` on the shared rows (one encoder pass), its losses kept."""
    _, losses = ctx.shared_losses(rows)
    read.add(list(losses))
    total = torch.stack([f * loss for f, loss in zip(factors, losses, strict=True)]).sum()
    return total / m if m > 1 else total
