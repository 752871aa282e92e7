"""TAWT as its authors ran it (probe gradients per epoch) and per step (no probe passes).

:class:`TAWTMethod` — the paper's protocol (Chen et al., Alg. 1, Sec. 4, App. B): the stream
of every task's batches, each batch's loss multiplied by ``K * w_t``; once per epoch (or every
``update_every`` steps) one ``probe_size`` batch per task in eval mode gives the tasks'
gradients of the shared encoder, and ω takes one mirror-descent step (eq. 2.8) with
``g_t = -c * s_t``.

:class:`TAWTStepMethod` — per step: every task's batch in every step, its loss multiplied by
``K * omega_t``; the step's own backward passes measure each task's gradient against the
target's in streaming mode (dot products in hooks, no T x P buffer, no extra pass), and every
``update_every`` steps ω takes one mirror-descent step on the mean similarity of those steps.
The paper's η is per epoch; spread over an epoch's updates it becomes
``eta * update_every / steps_per_epoch`` per update, so an epoch of per-step updates moves ω
about as far as one of the paper's.

Across processes (torchrun), both: ``distributed.statistics = "exact"`` takes the statistics
in buffer mode and sums the T x P rows over the processes (the probe's, or the step's), so the
cosines are the one-process ones and ω is the same on every process; ``"cheap"`` streams as on
one process and sums the target's gradient once (P numbers) and the dot products as T scalars
(exact), the norms being ``R`` times the sum of the processes' (an estimate; probes with
``tawt.gradients = "buffer"`` take ``R`` times the sum of the Grams instead). The eq. 2.7
similarity (``"exact"``, conjugate gradients) sums the target's gradient and every
Hessian-vector product over the processes (P floats each, at most ``tawt.cg_max_iter + 1``
per update), so the solve is the one-process solve on every process.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, cast

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from pyxtask.gradients import GradientStats, TaskGradients
from pyxtask.methods._base import Method, Sampling, Step, StepContext
from pyxtask.methods.fixed import StreamMethod
from pyxtask.weighting import TAWT, exact_reference

__all__ = ["TAWTMethod", "TAWTStepMethod"]


class TAWTMethod(StreamMethod):
    """TAWT with probe gradients (the paper's protocol); ``tawt`` is its weighting."""

    name = "tawt"
    adaptive: ClassVar[bool] = True
    data_parallel: ClassVar[bool] = False  # the probes backward between steps

    def __init__(
        self,
        make_tawt: Any,
        weights_as: str = "loss",
        *,
        gradients: Literal["streaming", "buffer"] = "streaming",
    ) -> None:
        super().__init__(make_tawt, weights_as)
        self.gradients = gradients

    @property
    def tawt(self) -> TAWT:
        return cast(TAWT, self.weighting)

    def after_update(self, ctx: StepContext) -> None:
        every = self.tawt.update_every
        if every is not None and ctx.phase_step % every == 0:
            self.update(ctx)

    def epoch_end(self, ctx: StepContext, epoch: int) -> None:
        if self.tawt.update_every is None:
            self.update(ctx)

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "c": self.tawt.c}

    def _probe(self, ctx: StepContext) -> list[Tensor | None]:
        tasks = sorted(set(ctx.phase_tasks) | {0})
        return ctx.probe_losses(tasks, self.tawt.probe_size, ctx.seed * 7919 + self.updates)

    def update(self, ctx: StepContext) -> None:
        """One probe of every task's gradient and one mirror-descent step of ω."""
        tawt = self.tawt
        model = ctx.model
        was_training = model.training
        model.eval()  # the authors' probes: no dropout
        model.zero_grad(set_to_none=True)
        shared = ctx.shared_parameters()
        T = ctx.num_tasks
        try:
            reference = None
            if tawt.similarity == "exact":
                reference = self._exact_reference(ctx, shared)
            losses = self._probe(ctx)
            reducer = ctx.distributed
            mode = "buffer" if reducer.exact else self.gradients  # exact: the summed rows
            with TaskGradients(
                shared, T, mode=mode, task_names=ctx.task_names, reducer=reducer
            ) as grads:
                stats = grads.backward(losses, [1.0] * T, reference=reference)
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        s = tawt.similarities(stats)
        tawt.update(s, epoch=ctx.epoch, step=ctx.global_step)
        self.record(ctx)
        log_similarity(ctx, self.updates, stats, s, reference is None)

    def _exact_reference(self, ctx: StepContext, shared: list[torch.nn.Parameter]) -> Tensor:
        """``x`` of eq. 2.7 on this update's probe batches, and a ``cg`` record in the log."""
        tawt = self.tawt
        omega = tawt.omega

        def hessian_loss() -> Tensor:
            losses = self._probe(ctx)
            return torch.stack(
                [float(omega[t]) * cast(Tensor, losses[t]) for t in ctx.phase_tasks]
            ).sum()

        # Hessian-vector products differentiate attention twice; only the math kernel of
        # scaled_dot_product_attention has a double backward.
        with sdpa_kernel([SDPBackend.MATH]):
            target_loss = cast(Tensor, self._probe(ctx)[0])
            grads = torch.autograd.grad(target_loss, shared, allow_unused=True)
            b = [
                torch.zeros_like(p) if g is None else g for p, g in zip(shared, grads, strict=True)
            ]
            reducer = ctx.distributed
            b = reducer.sum_tensors(b)
            reference, cg = exact_reference(
                hessian_loss,
                shared,
                b,
                damping=tawt.damping,
                max_iter=tawt.cg_max_iter,
                tol=tawt.cg_tol,
                reduce=reducer.sum_tensors if reducer.enabled else None,
            )
        ctx.log(
            {
                "kind": "cg",
                "epoch": ctx.epoch,
                "step": ctx.global_step,
                "iterations": cg.iterations,
                "residual": cg.residual,
                "converged": cg.converged,
            }
        )
        return reference


def log_similarity(
    ctx: StepContext, update: int, stats: GradientStats, s: Tensor, own_reference: bool
) -> None:
    """A ``similarity.jsonl`` record: the task-cosine matrix (streaming measures only the
    target's row and column) and the similarities the update used."""
    T = ctx.num_tasks
    cos = stats.cosine_matrix()
    if cos is None:
        row = stats.reference_cosines() if own_reference else None
        matrix: list[list[float | None]] = [[None] * T for _ in range(T)]
        for t in range(T):
            matrix[t][t] = 1.0 if bool(stats.sq_norms[t] > 0) else 0.0
            if row is not None and bool(stats.measured[t]):
                matrix[0][t] = matrix[t][0] = float(row[t])
    else:
        matrix = [[float(x) for x in r] for r in cos.tolist()]
    ctx.log(
        {
            "update": update,
            "epoch": ctx.epoch,
            "step": ctx.global_step,
            "tasks": ctx.task_names,
            "cosine": matrix,
            "similarity": s.tolist(),
        },
        file="similarity.jsonl",
    )


class TAWTStepMethod(Method):
    """TAWT updated from every step's own gradients (see the module docs).

    Args:
        make_tawt: builds the :class:`~pyxtask.weighting.TAWT` weighting from the task sizes
            and the per-update step size.
        lr: the paper's per-epoch η (default 1.0).
        update_every: steps between updates (default 1).
    """

    name = "tawt-step"
    sampling: ClassVar[Sampling] = "all"
    adaptive: ClassVar[bool] = True

    def __init__(self, make_tawt: Any, *, lr: float = 1.0, update_every: int = 1) -> None:
        super().__init__()
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.make_tawt = make_tawt
        self.epoch_lr = float(lr)
        self.update_every = int(update_every)
        self._tawt: TAWT | None = None
        self._similarity_sum: Tensor | None = None
        self._count = 0
        self._last_stats: GradientStats | None = None

    @property
    def tawt(self) -> TAWT:
        if self._tawt is None:
            raise RuntimeError("tawt-step: bind() the method to a context first")
        return self._tawt

    def bind(self, ctx: StepContext) -> None:
        steps = max(1, ctx.steps_per_epoch)
        self._tawt = self.make_tawt(ctx.sizes, self.epoch_lr * self.update_every / steps)
        if self.tawt.similarity == "exact":
            raise ValueError("tawt-step measures cosines or dot products; 'exact' needs probes")

    def loss_factors(self) -> list[float]:
        omega = self.tawt.omega
        return [float(x) for x in omega * float(self.tawt.included.sum())]

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        stats, losses = self.measured_backward(ctx, micro_batches, self.loss_factors())
        self._last_stats = stats
        s = self.tawt.similarities(stats)
        self._similarity_sum = s if self._similarity_sum is None else self._similarity_sum + s
        self._count += 1
        return losses

    def after_update(self, ctx: StepContext) -> None:
        if ctx.phase_step % self.update_every or self._similarity_sum is None:
            return
        s = self._similarity_sum / self._count
        self.tawt.update(s, epoch=ctx.epoch, step=ctx.global_step)
        self._similarity_sum, self._count = None, 0
        self.updates = self.tawt.updates
        self.record(ctx)
        if self._last_stats is not None:  # the cosines of the update's last step
            log_similarity(ctx, self.updates, self._last_stats, s, own_reference=True)

    def weights(self) -> tuple[Tensor, Tensor]:
        return torch.tensor(self.loss_factors(), dtype=torch.float64), self.tawt.omega

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "c": self.tawt.c}

    def state_dict(self) -> dict[str, Any]:
        state = self.tawt.state_dict()
        state.pop("trajectory", None)
        pending = None if self._similarity_sum is None else self._similarity_sum.tolist()
        return {"name": self.name, "tawt": state, "pending": pending, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"the state is for method {state.get('name')!r}, not {self.name!r}")
        self.tawt.load_state_dict(state["tawt"])
        self.updates = self.tawt.updates
        pending = state["pending"]
        self._similarity_sum = (
            None if pending is None else torch.tensor(pending, dtype=torch.float64)
        )
        self._count = int(state["count"])
