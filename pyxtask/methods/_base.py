"""The extension point: what a method is, and the context the trainer gives it.

A *method* says what one optimizer step does. It declares

- how the trainer samples (:attr:`Method.sampling`): ``"one"`` task's batch per step from the
  shuffled stream of all tasks' batches (the papers' joint training), ``"all"`` tasks' batches
  in every step, or ``"shared"``: one batch of examples that every task labels (one encoder
  pass serves all heads);
- the parameters it owns (:meth:`Method.parameters`: log variances, GradNorm weights, …), which
  the trainer puts into the optimizer as their own group (:attr:`Method.lr`, no weight decay,
  no schedule) and into every checkpoint;
- what a step does (:meth:`Method.step`): it computes the losses through the
  :class:`StepContext` and leaves the combined gradient in the parameters' ``.grad``;
- what happens after the optimizer has moved the parameters (:meth:`Method.after_update`) and
  at the end of an epoch (:meth:`Method.epoch_end`).

The trainer then clips, steps the optimizer and the schedule, logs and checkpoints. It never
names a method. Weights a method learns are written with :meth:`StepContext.record_weights`
(``weights.csv``); records for ``metrics.jsonl`` (or another log) with :meth:`StepContext.log`;
networks of its own with :meth:`StepContext.save`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyxtask.data import LabelMap, collate
from pyxtask.data.tokenization import Encoded
from pyxtask.distributed import SINGLE, Distributed
from pyxtask.evaluation import autocast
from pyxtask.gradients import GradientStats, Mode, NonFiniteGradientError, TaskGradients
from pyxtask.models import MultiTaskModel
from pyxtask.tasks import TaskData

__all__ = ["Method", "Sampling", "Step", "StepContext"]

Sampling = Literal["one", "all", "shared"]
#: One step's batches: ``(task, example indices)`` pairs, tasks numbered as in the run.
Step = list[tuple[int, list[int]]]


class StepContext:
    """What a method may use: the model, the tasks' data, losses, per-task gradients, logs.

    Built by the trainer; a method never sees files, ranks or the optimizer. Task ``0`` is
    the target. ``phase_step`` (optimizer steps done in this phase), ``global_step`` and
    ``epoch`` are kept current by the trainer.

    Under torchrun (``distributed``, several processes) a method still sees the *global*
    steps: :meth:`batch_loss` computes the loss of this process's slice of the batch divided
    by the whole batch's labelled units, so the processes' losses and gradients sum to the
    one-process ones; :class:`StepLosses` and :meth:`loss_values` read the summed (global)
    values; :meth:`task_gradients` measures global statistics. A method whose own
    parameters' gradient it computes from global statistics marks it
    (:meth:`mark_reduced`) so that the trainer does not sum it again.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        tasks: Sequence[TaskData],
        encoded: Sequence[Sequence[Encoded]],
        *,
        device: torch.device,
        bf16: bool = False,
        seed: int = 0,
        batch_size: int = 32,
        heldout: Sequence[Sequence[Encoded]] | None = None,
        log: Callable[[str, dict[str, Any] | str], None] | None = None,
        save: Callable[[str, Any], None] | None = None,
        distributed: Distributed | None = None,
    ) -> None:
        self.model = model
        #: The processes the run is split over (one: :data:`pyxtask.distributed.SINGLE`).
        self.distributed = SINGLE if distributed is None else distributed
        self.tasks = list(tasks)
        self.encoded = [list(items) for items in encoded]
        self.heldout = None if heldout is None else [list(items) for items in heldout]
        self.device = device
        self.bf16 = bf16
        self.seed = seed
        self.batch_size = batch_size
        self.pad = int(model.tokenizer.pad_token_id) if model.tokenizer is not None else 0
        self._log = log
        self._save = save
        self.phase_tasks: list[int] = list(range(len(self.tasks)))
        self.phase_step = 0
        self.global_step = 0
        self.epoch = 0
        self._steps_per_epoch: int | Callable[[], int] = 1
        self._aligned: list[tuple[int, ...]] | None = None
        #: The model in DDP (:meth:`pyxtask.distributed.Distributed.data_parallel`) while a
        #: :attr:`Method.data_parallel` method trains on several processes, else None.
        self.data_parallel: nn.Module | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch of the current phase (for methods that pace themselves)."""
        value = self._steps_per_epoch
        return value if isinstance(value, int) else value()

    @steps_per_epoch.setter
    def steps_per_epoch(self, value: int | Callable[[], int]) -> None:
        self._steps_per_epoch = value

    # -- tasks and parameters -------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def sizes(self) -> list[int]:
        """Training items per task (the support part when a method holds some out)."""
        return [len(items) for items in self.encoded]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.shared_parameters() if p.requires_grad]

    def head_parameters(self, t: int) -> list[nn.Parameter]:
        return [p for p in self.model.task_parameters(self.tasks[t].head) if p.requires_grad]

    def task_gradients(
        self, mode: Mode, parameters: str = "shared", buffer_dtype: torch.dtype | None = None
    ) -> TaskGradients:
        """Per-task gradients of the shared encoder (heads scaled by their task's weight), or
        with ``parameters="all"`` of every parameter, heads included, as one flat row.

        Across processes the statistics are global; with ``distributed.statistics = "exact"``
        a ``"streaming"`` request is served in buffer mode (the summed T x P rows)."""
        names = self.task_names
        reducer = self.distributed
        if reducer.exact:
            mode = "buffer"
        if parameters == "all":
            every = self.shared_parameters() + [
                p for t in range(self.num_tasks) for p in self.head_parameters(t)
            ]
            return TaskGradients(
                every, self.num_tasks, mode=mode, task_names=names, buffer_dtype=buffer_dtype,
                reducer=reducer,
            )  # fmt: skip
        heads = [self.head_parameters(t) for t in range(self.num_tasks)]
        return TaskGradients(
            self.shared_parameters(), self.num_tasks, mode=mode, task_parameters=heads,
            task_names=names, buffer_dtype=buffer_dtype, reducer=reducer,
        )  # fmt: skip

    # -- processes -----------------------------------------------------------------------------

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This process's slice of a global batch (all of it with one process)."""
        return self.distributed.shard(indices) if self.distributed.enabled else list(indices)

    def loss_share(
        self, t: int, indices: Sequence[int], local: Sequence[int], *,
        items: Sequence[Encoded] | None = None,
    ) -> float:  # fmt: skip
        """``units(local) / units(indices)``: the factor that turns the mean loss of the slice
        ``local`` into its share of the global batch's mean loss (units: labelled tokens of a
        token task, labelled texts of a sentence task; 0 for a batch with none)."""
        source = self.encoded[t] if items is None else items
        total = _loss_units(source, indices)
        return _loss_units(source, local) / total if total else 0.0

    def item_units(self, t: int, indices: Sequence[int]) -> Tensor:
        """What each item's mean loss divides by (labelled words, or 1 for a labelled text):
        ``(units * per_item_loss).sum() / units.sum()`` is the batch's mean loss."""
        source = self.encoded[t]
        return torch.tensor([_loss_units(source, [i]) for i in indices], dtype=torch.float32)

    def zero_loss(self, t: int) -> Tensor:
        """A zero loss on task ``t``'s head (its gradient zero, not None): the loss of a
        process whose slice of a batch is empty, so it joins the step's backward passes."""
        head = self.head_parameters(t) or self.shared_parameters()
        return torch.stack([p.reshape(-1)[0] for p in head]).sum().float() * 0.0

    def loss_values(self, losses: Sequence[Tensor]) -> list[float]:
        """Loss tensors as floats, read in one host synchronisation, summed over the
        processes (each process holds its slice's share of the global mean)."""
        if not losses:
            return []
        read = torch.stack([loss.detach().float() for loss in losses]).cpu()
        if self.distributed.enabled:
            return self.distributed.sum_values(read.tolist(), "losses")
        return cast(list[float], read.tolist())

    def mean_losses(self, tasks: Sequence[int], losses: Sequence[Tensor]) -> dict[int, float]:
        """Each task's mean loss over a step's micro-batches (``tasks[i]`` owns ``losses[i]``),
        read once after the backward passes and checked for non-finite values."""
        sums: dict[int, list[float]] = {}
        for t, value in zip(tasks, self.loss_values(losses), strict=True):
            self.check_loss(self.tasks[t].name, value, self.global_step + 1)
            acc = sums.setdefault(t, [0.0, 0.0])
            acc[0] += value
            acc[1] += 1
        return {t: total / count for t, (total, count) in sums.items()}

    def mark_reduced(self, parameters: Sequence[Tensor]) -> None:
        """These parameters' ``.grad`` already hold the all-process value (computed from
        global statistics): the trainer's gradient all-reduce skips them this step."""
        self.distributed.mark_reduced(parameters)

    def backward(self, objective: Callable[[], Tensor], *, last: bool = True) -> None:
        """Backward ``objective()``: one summed loss, its forward passes run by the call.

        With one process: ``objective().backward()``. Under torchrun, for a method whose
        every backward pass adds to the step's gradient (:attr:`Method.data_parallel`), the
        forward runs inside DDP: the ``last`` backward of the step sums the gradients over
        the processes while it runs (earlier ones accumulate locally, DDP's ``no_sync``),
        and the trainer does not sum the model's gradients again.
        """
        ddp = self.data_parallel
        if ddp is None:
            torch.autograd.backward(objective())
            return
        if not last:
            with cast(Any, ddp).no_sync():
                torch.autograd.backward(ddp(objective))
            return
        loss = ddp(objective)
        self.distributed.run(
            "the gradient all-reduce (DDP) in the backward pass", torch.autograd.backward, loss
        )
        self.distributed.mark_reduced([p for p in ddp.parameters() if p.requires_grad])

    # -- losses --------------------------------------------------------------------------------

    def batch_loss(
        self,
        t: int,
        indices: Sequence[int],
        *,
        items: Sequence[Encoded] | None = None,
        per_sample: bool = False,
        params: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Task ``t``'s mean loss on its training items ``indices`` (fp32).

        ``items`` picks from another list (held-out items); ``per_sample=True`` gives one loss
        per item (a token item's mean over its labelled words); ``params`` evaluates the model
        at other parameter values (``torch.func.functional_call``: lookaheads).

        Across processes: this process's share of that mean (see the class docs); per-item
        losses are not split (every process computes every item's).
        """
        source = self.encoded[t] if items is None else items
        if self.distributed.enabled and not per_sample:
            local = self.distributed.shard(indices)
            share = self.loss_share(t, indices, local, items=source)
            if not local or share == 0.0:
                return self.zero_loss(t)
            return self._loss(t, source, local, False, params) * share
        return self._loss(t, source, indices, per_sample, params)

    def _loss(
        self,
        t: int,
        source: Sequence[Encoded],
        indices: Sequence[int],
        per_sample: bool,
        params: dict[str, Tensor] | None,
    ) -> Tensor:
        batch = collate([source[i] for i in indices], self.pad)
        head = self.tasks[t].head
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        labels = batch["labels"].to(self.device)
        with autocast(self.device, self.bf16):
            if params is None and not per_sample:
                return cast(Tensor, self.model(head, ids, mask, labels).loss).float()
            args = (head, ids, mask, None if per_sample else labels)
            if params is None:
                out = self.model(*args)
            else:
                out = torch.func.functional_call(self.model, params, args)
        if not per_sample:
            return cast(Tensor, out.loss).float()
        return _per_item_loss(out.logits.float(), labels)

    def shared_losses(self, global_rows: Sequence[int]) -> tuple[Tensor | None, list[Tensor]]:
        """Every task's mean loss on the shared inputs ``global_rows`` (rows of
        :meth:`aligned`) through one encoder pass, and the encoder's output. Across processes:
        this process's rows, each loss its share of the global mean; a process without rows
        gets ``None`` and zero losses."""
        aligned = self.aligned()
        rows = self.shard(global_rows)
        if not rows:
            return None, [self.zero_loss(t) for t in range(self.num_tasks)]
        first = collate([self.encoded[0][aligned[r][0]] for r in rows], self.pad)
        ids, mask = first["input_ids"].to(self.device), first["attention_mask"].to(self.device)
        losses: list[Tensor] = []
        with autocast(self.device, self.bf16):
            hidden = self.model.encode(ids, mask)
            for t, task in enumerate(self.tasks):
                items = [self.encoded[t][aligned[r][t]] for r in rows]
                labels = collate(items, self.pad)["labels"].to(self.device)
                out = self.model.apply_head(task.head, hidden, mask, labels)
                loss = cast(Tensor, out.loss).float()
                if self.distributed.enabled:
                    mine = [aligned[r][t] for r in rows]
                    every = [aligned[r][t] for r in global_rows]
                    loss = loss * self.loss_share(t, every, mine)
                losses.append(loss)
        return hidden, losses

    def step_losses(self, step: Step) -> list[Tensor | None]:
        """One loss per task of the run (None for a task without a batch in ``step``)."""
        losses: list[Tensor | None] = [None] * self.num_tasks
        for t, indices in step:
            losses[t] = self.batch_loss(t, indices)
        return losses

    def probe_losses(self, tasks: Sequence[int], size: int, seed: int) -> list[Tensor | None]:
        """One random ``size``-item batch per task in ``tasks`` (seeded; None elsewhere)."""
        g = torch.Generator().manual_seed(seed)
        wanted = set(tasks)
        losses: list[Tensor | None] = []
        for t, items in enumerate(self.encoded):
            if t not in wanted:
                losses.append(None)
                continue
            k = min(size, len(items))
            idx = torch.randperm(len(items), generator=g)[:k].tolist()
            losses.append(self.batch_loss(t, idx))
        return losses

    def heldout_losses(self, tasks: Sequence[int], size: int, seed: int) -> list[Tensor | None]:
        """Like :meth:`probe_losses`, on the items the method held out (its query sets)."""
        if self.heldout is None:
            raise RuntimeError("this run holds no examples out (the method's holdout is 0)")
        g = torch.Generator().manual_seed(seed)
        losses: list[Tensor | None] = [None] * self.num_tasks
        for t in tasks:
            items = self.heldout[t]
            idx = torch.randperm(len(items), generator=g)[: min(size, len(items))].tolist()
            losses[t] = self.batch_loss(t, idx, items=items)
        return losses

    def aligned(self) -> list[tuple[int, ...]]:
        """For every target item whose input every task also labels: each task's item index.

        Tasks layered on one corpus (Brown's POS, universal tags and genre; the Turkish
        treebank's layers) label the same sentences; a target item is kept when every task has
        an item with the same sub-word ids.
        """
        if self._aligned is None:
            from pyxtask.config import ConfigError  # noqa: PLC0415

            index = [
                {tuple(it.input_ids): i for i, it in enumerate(items)} for items in self.encoded
            ]
            rows = []
            for item in self.encoded[0]:
                key = tuple(item.input_ids)
                found = [index[t].get(key) for t in range(self.num_tasks)]
                if all(j is not None for j in found):
                    rows.append(tuple(cast(list[int], found)))
            if len(rows) < max(1, len(self.encoded[0]) // 2):
                missing = [
                    self.tasks[t].name
                    for t in range(1, self.num_tasks)
                    if sum(tuple(it.input_ids) in index[t] for it in self.encoded[0])
                    < len(self.encoded[0]) // 2
                ]
                raise ConfigError(
                    f"these tasks do not label the target's inputs: {', '.join(missing)} "
                    f"({len(rows)} of {len(self.encoded[0])} target items are shared); a "
                    "shared-input method needs tasks annotated on the same sentences (e.g. "
                    "target brown.upos with sources brown.pos, brown.genre)"
                )
            self._aligned = rows
        return self._aligned

    @staticmethod
    def check_loss(name: str, value: float, step: int) -> None:
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the training loss of {name} is {value} at step {step}; lower lr or check the data"
            )

    # -- logs ----------------------------------------------------------------------------------

    def log(self, record: dict[str, Any], file: str = "metrics.jsonl") -> None:
        """Append a JSON record to one of the run's logs (``metrics.jsonl`` by default)."""
        if self._log is not None:
            self._log(file, record)

    def save(self, name: str, obj: Any) -> None:
        """Write ``obj`` (``torch.save``) atomically as the run's file ``name`` (a method's
        own networks, kept beside the model it trains)."""
        if self._save is not None:
            self._save(name, obj)

    def record_weights(self, update: int, w: Tensor, omega: Tensor) -> None:
        """A row of ``weights.csv``: ``w`` the loss factors, ``omega`` each task's share."""
        if self._log is None:
            return
        values = [str(update), str(self.epoch), str(self.global_step)]
        values += [f"{float(x):.10g}" for x in w] + [f"{float(x):.10g}" for x in omega]
        self._log("weights.csv", ",".join(values))


def _loss_units(items: Sequence[Encoded], indices: Sequence[int]) -> int:
    """What a mean loss over these items divides by: labelled positions (token items) or
    labelled texts (sentence items)."""
    ignore = LabelMap.ignore_index
    total = 0
    for i in indices:
        item = items[i]
        labels = item.labels[:1] if item.kind == "sentence" else item.labels
        total += sum(1 for label in labels if label != ignore)
    return total


def _per_item_loss(logits: Tensor, labels: Tensor) -> Tensor:
    if labels.dim() == 1:  # sentence task
        return F.cross_entropy(logits, labels, reduction="none")
    ignore = LabelMap.ignore_index
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore,
        reduction="none",
    ).reshape(labels.shape)  # fmt: skip
    counts = (labels != ignore).sum(dim=1).clamp(min=1)
    return flat.sum(dim=1) / counts


class Method:
    """Base class of the training methods (see the module docs); override what differs.

    Subclasses set :attr:`name`, :attr:`sampling`, and implement :meth:`step`. A method that
    learns weights sets :attr:`adaptive`, records each update with
    :meth:`StepContext.record_weights` and counts them in :attr:`updates`.
    """

    name: str = "method"
    sampling: ClassVar[Sampling] = "one"
    #: Its weights change during training (every update is a row of ``weights.csv``).
    adaptive: ClassVar[bool] = False
    #: Fraction of each task's training examples held out from training (query sets).
    holdout: float = 0.0
    #: Where the target's held-out set comes from: a split of its training examples, or its
    #: dev split (then every training example trains, but the dev set also picks weights).
    target_holdout: Literal["split", "dev"] = "split"
    #: Every backward pass it runs — in steps and between them — adds to the step's summed
    #: gradient through :meth:`StepContext.backward` (no per-task passes, no probes): under
    #: torchrun the trainer then puts the model in DDP, which sums the gradient while the
    #: step's last backward runs. Methods that measure per-task gradients leave it False
    #: (DDP would sum every pass since its last reduction) and get one all-reduce after
    #: the step.
    data_parallel: ClassVar[bool] = False
    #: Learning rate of :meth:`parameters` (their own optimizer group).
    lr: float = 1e-2
    #: How :meth:`measured_backward` takes the per-task statistics: ``"auto"`` streams them
    #: for one micro-batch and buffers several; ``"buffer"`` always fills the T x P buffer
    #: (what ``pyxtask bench`` compares streaming against).
    gradient_mode: Literal["auto", "buffer"] = "auto"
    #: dtype of the T x P buffer's rows (None: the parameters'); bf16 halves its memory.
    buffer_dtype: torch.dtype | None = None

    def __init__(self) -> None:
        self.updates = 0
        self._task_gradients: dict[tuple[str, str], TaskGradients] = {}

    def bind(self, ctx: StepContext) -> None:
        """Called once the data is known (task sizes), before training or resuming."""

    def parameters(self) -> list[nn.Parameter]:
        """Parameters the method learns with the optimizer (default: none)."""
        return []

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        """Leave one optimizer step's gradient in ``.grad``; return the tasks' mean losses.

        ``micro_batches`` holds one sampler step per micro-batch (gradient accumulation).
        """
        raise NotImplementedError

    def after_update(self, ctx: StepContext) -> None:
        """After the optimizer step (parameters at their new values, ``.grad`` cleared)."""

    def epoch_end(self, ctx: StepContext, epoch: int) -> None:
        """After an epoch's last step, before the dev evaluation."""

    def task_gradients(
        self, ctx: StepContext, mode: Mode, parameters: str = "shared"
    ) -> TaskGradients:
        """The method's :class:`TaskGradients` of that mode (made once: a buffer is T x P)."""
        key = (mode, parameters)
        if key not in self._task_gradients:
            self._task_gradients[key] = ctx.task_gradients(mode, parameters, self.buffer_dtype)
        return self._task_gradients[key]

    def measured_backward(
        self, ctx: StepContext, micro_batches: list[Step], weights: Sequence[float]
    ) -> tuple[GradientStats, dict[int, float]]:
        """``.grad = sum_t w_t g_t`` and the statistics of the step's own per-task gradients:
        streaming for one micro-batch; with several, the norms and dot products of their sum
        need the rows, so buffer mode."""
        if len(micro_batches) == 1 and self.gradient_mode == "auto":
            grads = self.task_gradients(ctx, "streaming")
            stats, losses = backward_all(ctx, micro_batches, grads, weights)
            return stats[0], losses
        grads = self.task_gradients(ctx, "buffer")
        stats, losses = backward_all(ctx, micro_batches, grads, None)
        grads.combine(weights)
        return stats[-1], losses

    def close(self) -> None:
        """Release what the method holds on the model (the hooks of its TaskGradients)."""
        for grads in self._task_gradients.values():
            grads.close()
        self._task_gradients.clear()

    def task_probabilities(self) -> list[float] | None:
        """``sampling="one"``: draw a task's batch with these probabilities (None: the
        natural stream of every task's batches)."""
        return None

    def weights(self) -> tuple[Tensor, Tensor]:
        """``(w, omega)``: the loss factors a step applies and each task's share of the
        objective (float64). Default: every task's loss counts once."""
        raise NotImplementedError

    def record(self, ctx: StepContext) -> None:
        """Write the current weights as a row of ``weights.csv``."""
        w, omega = self.weights()
        ctx.record_weights(self.updates, w, omega)

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` reports about the method."""
        w, omega = self.weights()
        return {"w": w.tolist(), "omega": omega.tolist(), "weight_updates": self.updates}

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "updates": self.updates,
            "parameters": [p.detach().clone() for p in self.parameters()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"the state is for method {state.get('name')!r}, not {self.name!r}")
        self.updates = int(state["updates"])
        with torch.no_grad():
            for p, saved in zip(self.parameters(), state["parameters"], strict=True):
                p.copy_(saved)


def shares(w: Tensor) -> Tensor:
    """``w / sum(w)`` in float64 (each task's share when every task has a batch per step)."""
    w = w.detach().to(torch.float64).cpu()
    total = float(w.sum())
    return w / total if total != 0 else w


class StepLosses:
    """A step's task losses, kept on the device until :meth:`values` reads them all at once:
    one host synchronisation per step instead of one per task and micro-batch (on a GPU a
    ``float(loss)`` per task stalls the host until that task's forward has run)."""

    def __init__(self, ctx: StepContext, micro_batches: int) -> None:
        self.ctx, self.m = ctx, micro_batches
        self._parts: list[tuple[int, Tensor]] = []

    def add(self, losses: list[Tensor | None]) -> None:
        self._parts += [(t, loss.detach()) for t, loss in enumerate(losses) if loss is not None]

    def values(self) -> dict[int, float]:
        """Each task's mean loss over the micro-batches; a non-finite one is an error."""
        if not self._parts:
            return {}
        read = self.ctx.loss_values([loss for _, loss in self._parts])
        totals: dict[int, float] = {}
        for (t, _), value in zip(self._parts, read, strict=True):
            self.ctx.check_loss(self.ctx.tasks[t].name, value, self.ctx.global_step + 1)
            totals[t] = totals.get(t, 0.0) + value / self.m
        return totals


def checked_losses(
    ctx: StepContext, step: Step, totals: dict[int, float], m: int
) -> list[Tensor | None]:
    """``ctx.step_losses(step)``, each checked to be finite and added (``/ m``) to ``totals``
    now (for a method that needs the values before its backward)."""
    losses = ctx.step_losses(step)
    read = StepLosses(ctx, m)
    read.add(losses)
    for t, value in read.values().items():
        totals[t] = totals.get(t, 0.0) + value
    return losses


def _divided(losses: list[Tensor | None], m: int) -> list[Tensor | None]:
    """Each loss over the ``m`` micro-batches (untouched for one: bitwise the plain step)."""
    return [None if loss is None else loss / m if m > 1 else loss for loss in losses]


def _weighted_sum(
    ctx: StepContext, step: Step, read: StepLosses, weights: Sequence[float] | None, m: int
) -> Tensor:
    """``sum_t w_t L_t / m`` of one micro-batch (``w = 1`` by default), its losses kept."""
    losses = ctx.step_losses(step)
    read.add(losses)
    w = [1.0] * len(losses) if weights is None else list(weights)
    scaled = _divided(losses, m)
    return cast(Tensor, sum(w[t] * loss for t, loss in enumerate(scaled) if loss is not None))


def backward_all(
    ctx: StepContext,
    micro_batches: list[Step],
    grads: TaskGradients | None,
    weights: Sequence[float] | None,
) -> tuple[list[GradientStats], dict[int, float]]:
    """Every task's loss of every micro-batch backwarded once (divided by the number of
    micro-batches, so ``.grad`` is their mean); through ``grads`` when given, else as one
    plain backward of ``sum_t w_t L_t``. Returns each micro-batch's statistics and the
    tasks' mean losses (read once, after the backward passes are queued)."""
    m = len(micro_batches)
    stats: list[GradientStats] = []
    read = StepLosses(ctx, m)
    try:
        for j, step in enumerate(micro_batches):
            if grads is None:
                ctx.backward(partial(_weighted_sum, ctx, step, read, weights, m), last=j == m - 1)
                continue
            losses = ctx.step_losses(step)
            read.add(losses)
            scaled = _divided(losses, m)
            stats.append(grads.backward(scaled, weights, accumulate=j > 0))
    except NonFiniteGradientError:
        read.values()  # a non-finite loss is the cause to report, if there is one
        raise
    return stats, read.values()
