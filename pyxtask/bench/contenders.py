"""The contenders of `pyxtask bench`: each is set up once and gives a zero-argument step.

A step is what a trainer does per optimizer step: the forward passes, the backward (and
whatever the method or peer does with the per-task gradients), clipping at 1.0, AdamW, and
clearing the gradients. ``plain`` — the summed-loss step — is the floor every ratio divides by.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pyxtask import ops
from pyxtask.config import FAMOConfig, MetaXTConfig, TrainConfig
from pyxtask.evaluation import autocast
from pyxtask.methods import Method, Step, StepContext, make_method
from pyxtask.models import MultiTaskModel

from .workload import Workload, build_model, finish_step, make_optimizer

__all__ = ["Contender", "method_contender", "naive_contender", "plain_contender", "task_losses"]


@dataclass
class Contender:
    """One timed variant. ``kind``: "baseline", "all" (every task's batch per step),
    "stream" (one task's batch per step: its ratio is per T steps), "contrast" (the naive
    way), "peer", or "update" (a cost per weight update, not per step)."""

    name: str
    kind: str
    step: Callable[[], object] | None = None
    close: Callable[[], None] = lambda: None
    note: str = ""
    #: pyxtask method this peer row is compared with (same weighting), if any.
    compare_with: str = ""
    samples: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    error: str | None = None


def task_losses(model: MultiTaskModel, work: Workload) -> list[Tensor]:
    """Every task's loss on its own step batch (one encoder pass per task)."""
    with autocast(work.device, work.bf16):
        outs = [
            model(t.head, b["input_ids"], b["attention_mask"], b["labels"])
            for t, b in zip(work.tasks, work.batches(), strict=True)
        ]
    return [torch.as_tensor(o.loss).float() for o in outs]


def plain_contender(work: Workload) -> Contender:
    model = build_model(work)
    optimizer = make_optimizer(model)

    def step() -> None:
        torch.autograd.backward(torch.stack(task_losses(model, work)).sum())
        finish_step(model, optimizer)

    return Contender("plain", "baseline", step, note="sum of T losses, one backward")


def naive_contender(work: Workload) -> Contender:
    """Per-task weights the usual way: autograd.grad per task, torch.cat, a Gram, the
    min-norm weights, then a second, weighted backward through the retained graphs."""
    model = build_model(work)
    optimizer = make_optimizer(model)
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    T = work.num_tasks

    def step() -> None:
        losses = task_losses(model, work)
        rows = []
        for loss in losses:
            grads = torch.autograd.grad(loss, shared, retain_graph=True, materialize_grads=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        G = torch.stack(rows).float()
        factors = ops.min_norm_point((G @ G.T).double()) * T
        torch.autograd.backward((torch.stack(losses) * factors.to(losses[0])).sum())
        finish_step(model, optimizer)

    return Contender(
        "naive", "contrast", step, note="autograd.grad x T + cat + gram + min-norm + 2nd backward"
    )


def _context(work: Workload, model: MultiTaskModel, method: Method) -> StepContext:
    ctx = StepContext(
        model,
        work.tasks,
        work.encoded,
        device=work.device,
        bf16=work.bf16,
        seed=0,
        batch_size=work.batch,
        heldout=work.heldout if method.holdout > 0 else None,
    )
    ctx.steps_per_epoch = work.train_items // work.batch
    return ctx


def method_contender(work: Workload, name: str, variant: str = "") -> Contender:
    """pyxtask's method ``name`` exactly as the trainer steps it. ``variant``: "buffer" takes
    its per-task statistics from the T x P buffer instead of streaming hooks; "bf16-buffer"
    stores that buffer in bf16; "next-step" (FAMO) learns from the next step's losses;
    "exact" (MetaXT) takes the meta-gradient by double backward."""
    famo = FAMOConfig(update_with="next-step" if variant == "next-step" else "same-batch")
    metaxt = MetaXTConfig(meta_gradient="exact" if variant == "exact" else "finite-difference")
    method = make_method(TrainConfig(method=name, famo=famo, metaxt=metaxt), 1.0)
    if variant == "buffer":
        method.gradient_mode = "buffer"
    elif variant == "bf16-buffer":
        method.buffer_dtype = torch.bfloat16
    model = build_model(work)
    ctx = _context(work, model, method)
    method.bind(ctx)
    optimizer = make_optimizer(model, method)
    T, rows = work.num_tasks, work.rows
    turn = [0]

    def micro() -> list[Step]:
        if method.sampling == "all":
            return [[(t, rows) for t in range(T)]]
        if method.sampling == "shared":
            return [[(0, rows)]]  # rows of ctx.aligned(): every task labels these inputs
        turn[0] += 1
        return [[((turn[0] - 1) % T, rows)]]  # the stream: one task's batch, tasks in turn

    def step() -> None:
        method.step(ctx, micro())
        finish_step(model, optimizer)
        ctx.phase_step += 1
        ctx.global_step += 1
        method.after_update(ctx)

    kind = "stream" if method.sampling == "one" else "all"
    label = f"{name}/{variant}" if variant else name
    return Contender(label, kind, step, close=method.close, note=_NOTES.get(label, ""))


def probe_contender(work: Workload) -> Contender:
    """TAWT's probe update (once per epoch in the paper's protocol): a probe batch per task
    in eval mode, their gradients in streaming mode, one mirror-descent step."""
    method = make_method(TrainConfig(method="tawt"), 1.0)
    model = build_model(work)
    ctx = _context(work, model, method)
    method.bind(ctx)
    update = getattr(method, "update")  # noqa: B009 (TAWTMethod.update)
    probe = min(TrainConfig().tawt.probe_size, work.train_items)
    return Contender(
        "tawt-update",
        "update",
        lambda: update(ctx),
        close=method.close,
        note=f"one per-epoch TAWT update: {probe}-item probe per task",
    )


_NOTES = {
    "equal": "the plain step through the method API",
    "tawt-step": "streaming dot products in backward hooks",
    "tawt-step/buffer": "T x P buffer, then the dot products",
    "gradnorm": "streaming norms in backward hooks",
    "gradnorm/buffer": "T x P buffer, then the norms",
    "mgda/bf16-buffer": "the T x P buffer in bf16 (half its memory and reads)",
    "famo": "plain backward; + a no-grad forward on the same batch after the update",
    "famo/next-step": "plain backward; the update uses the next step's losses",
    "dwa": "plain backward of the weighted losses",
    "rlw": "plain backward of the weighted losses",
    "mgda": "T x P buffer, gram, min_norm_point, scatter",
    "mgda-ub": "one encoder pass; gradients w.r.t. the representation",
    "metaweighting": "support buffer + query pass after the step",
    "uncertainty": "plain backward of the learnable objective",
    "upgrad": "T x P buffer, gram, dual-cone QPs (compiled), scatter",
    "dualproj": "T x P buffer, gram, one dual-cone QP, scatter",
    "cagrad": "T x P buffer, gram, CAGrad's inner solve (compiled), scatter",
    "nash-mtl": "T x P buffer, gram, Newton on G a = 1/a (compiled), scatter",
    "pcgrad": "T x P buffer, gram, projections on the Gram, scatter",
    "imtl-g": "T x P buffer, gram, pinv solve, scatter",
    "aligned-mtl": "T x P buffer, gram, eigh, scatter",
    "fixed": "one task's batch per step; ratio = T steps / plain",
    "tawt": "one task's batch per step (updates: tawt-update)",
    "metaxt": "meta-step by finite differences: lookahead + 2 source passes + LTN backward",
    "metaxt/exact": "meta-step by double backward through a functional lookahead",
    "xt": "the label transfer network trained jointly: no meta-step",
}
