"""MetaWeighting (Mao et al., Alg. 1, eqs. 9-13): task weights from held-out query losses.

Each task's training examples are split into a support set and a query set (``holdout``, the
paper's query ratio 0.1). A step backwards every task's support loss at θ^(k-1) into a T x P
buffer (the step's own backward passes) and combines ``sum_t w_t g^s_t`` into ``.grad``; the
optimizer moves the parameters to θ^k; then one query batch per task gives the query gradients
at θ^k, one ``cross_gram`` gives ``d[t, s] = -(eta/T) grad L^q_t(θ^k) . grad L^s_s(θ^(k-1))``
(eq. 10), and :class:`~pyxtask.weighting.MetaWeighting` takes the min-norm common direction and
the step ``w <- w - alpha lambda*^T d`` (eqs. 11-13).

Across processes (torchrun), ``exact``: the support and the query rows are each summed over
the processes (two T x P all-reduces a step), so d is the one-process d; ``cheap``: d is
``R`` times the sum of the processes' local products (T x T numbers).

θ^k is the optimizer's real step (Adam, as in the paper's experiments); ``eta`` is the inner
step of eq. 10, which the paper ties to its learning rate (2e-5 for BERT). That makes d tiny
and w moves little; each epoch's movement is logged (``kind: "metaweighting"``) and a larger
``eta`` is offered as a documented departure. ``parameters`` chooses which gradients the
products cover: ``"shared"`` (the encoder, default) or ``"all"`` (encoder and heads).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, cast

import torch
from torch import Tensor

from pyxtask import ops
from pyxtask.gradients import TaskGradients
from pyxtask.methods._base import Method, Sampling, Step, StepContext, backward_all, shares
from pyxtask.weighting import MetaWeighting

__all__ = ["MetaWeightingMethod"]


class MetaWeightingMethod(Method):
    """MetaWeighting's step (see the module docs).

    Args:
        alpha: step size of eq. 13 (the paper: 0.1 sentiment, 0.5 topics).
        eta: the inner learning rate of eq. 10 (the paper's: 2e-5 for BERT).
        query_ratio: fraction of each task's training examples held out as its query set.
        parameters: ``"shared"`` or ``"all"``.
        target_query: the target's query set: ``"split"`` (``query_ratio`` of its training
            examples, like every task's) or ``"dev"`` (its dev split; all its training examples
            train, but the dev split then also steers the weights, so it is no longer an
            unbiased model-selection set).
    """

    name = "metaweighting"
    sampling: ClassVar[Sampling] = "all"
    adaptive: ClassVar[bool] = True

    def __init__(
        self,
        *,
        alpha: float = 0.1,
        eta: float = 2e-5,
        query_ratio: float = 0.1,
        parameters: str = "shared",
        target_query: str = "split",
    ) -> None:
        super().__init__()
        if not 0.0 < query_ratio < 1.0:
            raise ValueError(f"query_ratio must be in (0, 1), got {query_ratio}")
        if parameters not in ("shared", "all"):
            raise ValueError(f"parameters must be 'shared' or 'all', got {parameters!r}")
        if target_query not in ("split", "dev"):
            raise ValueError(f"target_query must be 'split' or 'dev', got {target_query!r}")
        self.target_holdout = cast(Literal["split", "dev"], target_query)
        self.alpha, self.eta = float(alpha), float(eta)
        self.holdout = float(query_ratio)
        self.covered = parameters
        self._weighting: MetaWeighting | None = None
        self._support: TaskGradients | None = None
        self._query: TaskGradients | None = None
        self._epoch_start: Tensor | None = None

    @property
    def weighting(self) -> MetaWeighting:
        if self._weighting is None:
            raise RuntimeError("metaweighting: bind() the method to a context first")
        return self._weighting

    def bind(self, ctx: StepContext) -> None:
        self._weighting = MetaWeighting(ctx.num_tasks, alpha=self.alpha, eta=self.eta)

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        self._support = self.task_gradients(ctx, "buffer", self.covered)
        if self._epoch_start is None:
            self._epoch_start = self.weighting.w
        _, losses = backward_all(ctx, micro_batches, self._support, None)
        self._support.combine(self.weighting.w)
        return losses

    def after_update(self, ctx: StepContext) -> None:
        support = self._support
        if support is None or support.buffer is None:
            return
        if self._query is None:  # a second buffer: the support rows are still needed
            self._query = ctx.task_gradients("buffer", self.covered)
        T = ctx.num_tasks
        seed = ctx.seed * 6007 + ctx.global_step
        self._query.backward(ctx.heldout_losses(range(T), ctx.batch_size, seed))
        assert self._query.buffer is not None
        cross = ops.cross_gram(self._query.buffer, support.buffer).double().cpu()
        reducer = ctx.distributed
        if reducer.cheap:  # local rows (exact mode summed them): R times the summed products
            cross = reducer.all_reduce_(cross, "statistics") * reducer.world_size
        self.weighting.update(cross)
        self.updates = self.weighting.updates
        ctx.model.zero_grad(set_to_none=True)  # the query pass is a measurement, not a step
        self.record(ctx)

    def close(self) -> None:
        super().close()
        if self._query is not None:
            self._query.close()
            self._query = None

    def epoch_end(self, ctx: StepContext, epoch: int) -> None:
        w = self.weighting.w
        start = w if self._epoch_start is None else self._epoch_start
        ctx.log(
            {
                "kind": "metaweighting",
                "epoch": epoch,
                "step": ctx.global_step,
                "w": w.tolist(),
                "w_change": (w - start).abs().sum().item(),
                "lambda": None
                if self.weighting.last_lambda is None
                else self.weighting.last_lambda.tolist(),
            }
        )
        self._epoch_start = w

    def weights(self) -> tuple[Tensor, Tensor]:
        w = self.weighting.w
        return w, shares(w)

    def state_dict(self) -> dict[str, Any]:
        start = None if self._epoch_start is None else self._epoch_start.tolist()
        return {"name": self.name, "weighting": self.weighting.state_dict(), "epoch_start": start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"the state is for method {state.get('name')!r}, not {self.name!r}")
        self.weighting.load_state_dict(state["weighting"])
        self.updates = self.weighting.updates
        start = state["epoch_start"]
        self._epoch_start = None if start is None else torch.tensor(start, dtype=torch.float64)
