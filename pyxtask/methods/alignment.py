"""Covariance alignment (Wu, Zhang & Ré 2020, Alg. 1): a per-task rotation of the embeddings.

Each aligned task ``i`` has an alignment matrix ``R_i`` (H x H, initialised to the identity)
applied to the sum of its inputs' word, position and token-type embeddings, *before* the
embedding LayerNorm (:attr:`~pyxtask.models.MultiTaskModel.embedding_transform`): task ``i``
sees ``Z_i = X_i R_i`` where the paper's ``X_i`` is the task's embedding layer. Because the
sum is linear, ``(e_w + e_p + e_t) R = e_w R + e_p R + e_t R``: ``R_i`` folds exactly into the
three embedding tables (``E <- E R``), so a model for one task never needs the matrix
(:func:`fold_alignment`).

Training follows Alg. 1 and App. B.3: the stream of every task's batches (one task's batch per
optimizer step, its loss factor from the paradigm's fixed weighting, as in
:class:`~pyxtask.methods.StreamMethod`). For the first ``align_epochs`` epochs the shared
encoder is held fixed and a batch of task ``i`` moves only ``A_i`` (its head) and ``R_i`` — the
tasks' updates alternate as their batches come — then the usual training moves everything,
``R_i`` included. The matrices are the method's own parameters (their own optimizer group,
learning rate ``lr``, saved with the method's state in every checkpoint).

``tasks="all"`` aligns every task (joint training); ``"target"`` only the target, which with
the ``single`` paradigm and an encoder trained on a source (``--encoder RUN/best``) is the
paper's transfer setting: the target fine-tuned with an alignment module.

The saved model stays a plain encoder + heads: at every epoch's end — before the trainer
evaluates the target and saves ``best/`` — the target's ``R`` is folded into the embedding
tables (the unfolded tables are kept, and restored bit for bit at the next step, also from a
checkpoint), so ``best/``, the test evaluation and ``pyxtask export`` see the folded target
model. Source heads in ``best/`` then see the target's alignment, not their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from pyxtask.methods._base import Sampling, Step, StepContext
from pyxtask.methods.fixed import StreamMethod
from pyxtask.weighting import Weighting

__all__ = ["AlignmentMethod", "embedding_tables", "fold_alignment"]

_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def embedding_tables(encoder: nn.Module) -> list[nn.Parameter]:
    """The word, position and token-type tables whose sum feeds the embedding LayerNorm.

    ``ValueError`` for an encoder without BERT's embedding block (its sum could not be
    folded into tables).
    """
    embeddings = getattr(encoder, "embeddings", None)
    tables = [getattr(embeddings, name, None) for name in _TABLES]
    if not isinstance(getattr(embeddings, "LayerNorm", None), nn.LayerNorm) or not all(
        isinstance(t, nn.Embedding) for t in tables
    ):
        raise ValueError(
            "covariance alignment needs a BERT-style encoder (embeddings.word_embeddings, "
            "position_embeddings, token_type_embeddings and LayerNorm); "
            f"{type(encoder).__name__} has no such block"
        )
    return [cast(nn.Parameter, t.weight) for t in tables if isinstance(t, nn.Embedding)]


@torch.no_grad()
def fold_alignment(encoder: nn.Module, matrix: Tensor) -> None:
    """``E <- E R`` for the word, position and token-type tables (computed in float64)."""
    for table in embedding_tables(encoder):
        folded = table.double() @ matrix.to(device=table.device, dtype=torch.float64)
        table.copy_(folded.to(table.dtype))


class AlignmentMethod(StreamMethod):
    """Alg. 1 on the stream of all tasks' batches (see the module docs).

    Args:
        make_weighting: the paradigm's fixed weighting (loss factors or sampling).
        weights_as: ``"loss"`` or ``"sampling"``, as for :class:`StreamMethod`.
        align_epochs: epochs of Alg. 1 proper (encoder held fixed) before the usual training.
        lr: the alignment matrices' learning rate.
        tasks: ``"all"`` (every task has an ``R``) or ``"target"``.
        frozen: hold every ``R`` at the identity (an ablation: the alignment path without
            alignment, which reproduces plain training bit for bit).
    """

    name = "alignment"
    sampling: ClassVar[Sampling] = "one"
    data_parallel: ClassVar[bool] = False  # Alg. 1's steps backward into R and heads only

    def __init__(
        self,
        make_weighting: Callable[[Sequence[int]], Weighting],
        weights_as: str = "loss",
        *,
        align_epochs: int = 1,
        lr: float = 5e-5,
        tasks: str = "all",
        frozen: bool = False,
    ) -> None:
        super().__init__(make_weighting, weights_as)
        if tasks not in ("all", "target"):
            raise ValueError(f"tasks must be 'all' or 'target', got {tasks!r}")
        self.align_epochs = int(align_epochs)
        self.lr = float(lr)
        self.aligned_tasks = tasks
        self.frozen = frozen
        self.matrices: dict[str, nn.Parameter] = {}
        self._model: Any = None
        self._target = ""
        # The target's unfolded tables while the model holds them folded (between an epoch's
        # end and the next step).
        self._unfolded: list[Tensor] | None = None

    # -- set-up ----------------------------------------------------------------------------------

    def bind(self, ctx: StepContext) -> None:
        super().bind(ctx)
        from pyxtask.config import ConfigError  # noqa: PLC0415

        try:
            tables = embedding_tables(ctx.model.encoder)
        except ValueError as exc:
            raise ConfigError(f"{self.name}: {exc}") from None
        hidden = tables[0].shape[1]
        heads = [t.head for t in ctx.tasks]
        self._target = heads[0]
        chosen = heads if self.aligned_tasks == "all" else heads[:1]
        like = tables[0]
        self.matrices = {
            head: nn.Parameter(
                torch.eye(hidden, dtype=like.dtype, device=like.device),
                requires_grad=not self.frozen,
            )
            for head in chosen
        }
        self._model = ctx.model
        ctx.model.embedding_transform = self._align

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.frozen else list(self.matrices.values())

    def _align(self, task: str, embeddings: Tensor) -> Tensor:
        if self._unfolded is not None:  # the tables already hold the target's R
            if task != self._target:
                raise RuntimeError(
                    f"{self.name}: the model holds the target's folded tables; task {task!r} "
                    "runs again only after the next training step"
                )
            return embeddings
        matrix = self.matrices.get(task)
        return embeddings if matrix is None else embeddings @ matrix.to(embeddings.dtype)

    # -- training --------------------------------------------------------------------------------

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        self._unfold()
        if ctx.epoch >= self.align_epochs:
            return super().step(ctx, micro_batches)
        # Alg. 1: the encoder held fixed; a batch of task i moves its head A_i and R_i only.
        m = len(micro_batches)
        tasks: list[int] = []
        losses: list[Tensor] = []
        for step in micro_batches:
            ((t, indices),) = step
            factor = 1.0 if self.weights_as != "loss" else float(self.weighting.loss_factors()[t])
            loss = ctx.batch_loss(t, indices)
            moved = ctx.head_parameters(t)
            matrix = self.matrices.get(ctx.tasks[t].head)
            if matrix is not None and matrix.requires_grad:
                moved.append(matrix)
            torch.autograd.backward(loss * (factor / m), inputs=moved)
            tasks.append(t)
            losses.append(loss)
        return ctx.mean_losses(tasks, losses)

    def epoch_end(self, ctx: StepContext, epoch: int) -> None:
        ctx.log({"kind": "alignment", "epoch": epoch, "step": ctx.global_step,
                 **self.distances()})  # fmt: skip
        if 0 in ctx.phase_tasks and self._target in self.matrices:
            self._fold()

    def _fold(self) -> None:
        """The target's R into the embedding tables, keeping the unfolded ones."""
        if self._unfolded is not None:
            return
        tables = embedding_tables(self._model.encoder)
        self._unfolded = [t.detach().clone() for t in tables]
        fold_alignment(self._model.encoder, self.matrices[self._target].detach())

    def _unfold(self) -> None:
        if self._unfolded is None:
            return
        with torch.no_grad():
            for table, saved in zip(
                embedding_tables(self._model.encoder), self._unfolded, strict=True
            ):
                table.copy_(saved)
        self._unfolded = None

    def close(self) -> None:
        """Leave the model folded for the target, without the transform."""
        super().close()
        if self._model is not None:
            self._model.embedding_transform = None

    # -- reports and state ------------------------------------------------------------------------

    def distances(self) -> dict[str, float]:
        """``||R_i - I||_F`` of every aligned task (how far alignment moved it)."""
        out = {}
        for head, matrix in self.matrices.items():
            eye = torch.eye(matrix.shape[0], dtype=torch.float64, device=matrix.device)
            out[f"distance:{head}"] = float(torch.linalg.norm(matrix.detach().double() - eye))
        return out

    def summary(self) -> dict[str, Any]:
        return {
            **super().summary(),
            "alignment_epochs": self.align_epochs,
            "aligned_tasks": list(self.matrices),
            "alignment_distance": {k.split(":", 1)[1]: v for k, v in self.distances().items()},
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["matrices"] = {k: v.detach().cpu().clone() for k, v in self.matrices.items()}
        state["unfolded"] = (
            None if self._unfolded is None else [t.cpu().clone() for t in self._unfolded]
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state["matrices"]
        if set(saved) != set(self.matrices):
            raise ValueError(
                f"the state aligns tasks {sorted(saved)}, this run aligns {sorted(self.matrices)}"
            )
        with torch.no_grad():
            for head, matrix in self.matrices.items():
                matrix.copy_(saved[head])
        unfolded = state["unfolded"]
        self._unfolded = (
            None
            if unfolded is None
            else [
                t.to(table.device)
                for t, table in zip(unfolded, embedding_tables(self._model.encoder), strict=True)
            ]
        )
