"""Per-task gradients of the shared parameters, taken during the backward passes a step runs.

A multi-task step with one batch per task already runs one backward pass per task. Instead of
a second round of ``autograd.grad`` calls (what peers do), :class:`TaskGradients` takes each
task's gradient of the shared parameters φ as that task's backward produces it, in one of two
modes (``docs/architecture.md``):

``"buffer"``
    every task's gradient becomes a row of a T x P buffer (``pyxtask.ops.gather_flat``, one
    multi-tensor copy per task); the T x T Gram matrix comes from one pass over the buffer
    (``pyxtask.ops.gram``) and the update ``sum_t w_t g_t`` is written into ``.grad`` by
    ``pyxtask.ops.scatter_combination``. The weights may be chosen *after* the gradients are
    seen (same-step methods: MGDA, MetaWeighting): call :meth:`TaskGradients.combine` then.
``"streaming"``
    no T x P buffer: hooks on the shared parameters accumulate, while backward runs, only the
    dot products of every task's gradient with one reference vector (the target's gradient,
    taken first, or any vector given) and the squared norms; each task's gradient is scaled by
    its weight as it flows into ``.grad``. Memory O(P). This is all TAWT needs.

In both modes a task's head parameters receive ``w_t`` times their gradient, exactly what a
backward pass of ``sum_t w_t L_t`` gives them, and the resulting ``.grad`` equals that of
``sum_t w_t L_t``. The scaling is applied to the gradients (hooks, or the combination) rather
than to the losses, so a task with weight 0 still has its gradient measured. A gradient that
is not finite stops the step with :class:`NonFiniteGradientError` naming the task.

Across processes (``reducer``, a :class:`pyxtask.distributed.Distributed` of several
processes, each holding its slice of every batch, losses normalised so that the processes'
gradients sum to the global ones), the statistics are global:

``exact`` (buffer mode only)
    the T x P buffer is summed over the processes in one all-reduce, then the Gram, the
    weights and the combination are formed locally from the global rows, identically on every
    process; the shared parameters' ``.grad`` is then global and marked so, and the trainer's
    own gradient all-reduce skips it (heads, small, are summed by the trainer).
``cheap``
    buffer mode: the Gram is ``R`` times the sum of the processes' Grams (``R`` processes: the
    mean of their Grams when each holds as many tokens); streaming mode: the target's gradient
    is summed once (P numbers) right after its backward pass, the dot products of every
    task's local gradient with it are summed as T scalars (exact: ``g_0 . g_t``), and the
    squared norms are ``R`` times the sum of the local ones (an estimate: exact when the
    processes' gradients agree, an upper bound otherwise). ``.grad`` stays local, summed by
    the trainer as for a plain step.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from pyxtask import ops
from pyxtask.distributed import SINGLE, Distributed

__all__ = ["GradientStats", "NonFiniteGradientError", "TaskGradients"]

Mode = Literal["buffer", "streaming"]
_MODES = ("buffer", "streaming")
_BUFFER_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class NonFiniteGradientError(FloatingPointError):
    """A task's gradient of the shared parameters has NaN or infinite entries."""


@dataclass(frozen=True)
class GradientStats:
    """What one multi-task backward measured about the tasks' shared-parameter gradients.

    Attributes:
        sq_norms: ``(T,)`` float64, ``||g_t||^2``.
        reference_dots: ``(T,)`` float64, ``v . g_t`` for the reference vector ``v``: the
            target's gradient unless another vector was given.
        reference_sq_norm: ``||v||^2``.
        gram: ``(T, T)`` float64 Gram matrix of the gradients (buffer mode only, else None).
        measured: ``(T,)`` bool, False for a task that was given no loss.
    """

    sq_norms: Tensor
    reference_dots: Tensor
    reference_sq_norm: float
    gram: Tensor | None
    measured: Tensor

    def reference_cosines(self) -> Tensor:
        """``cos(v, g_t)`` for every task (0 where either vector is zero, never NaN)."""
        denom = torch.sqrt(self.sq_norms * self.reference_sq_norm)
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        return torch.where(denom > 0, self.reference_dots / safe, torch.zeros_like(denom))

    def cosine_matrix(self) -> Tensor | None:
        """All pairwise cosines (buffer mode), 0 for a zero gradient; None in streaming mode."""
        if self.gram is None:
            return None
        norms = torch.sqrt(torch.diagonal(self.gram))
        denom = norms[:, None] * norms[None, :]
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        return torch.where(denom > 0, self.gram / safe, torch.zeros_like(denom))


#: Row stride of the T x P buffer, in bytes: a multiple of the widest vector load of the
#: kernels that read it (16 B on CUDA) and of a cache line (64 B).
_ROW_ALIGN_BYTES = 64


def _padded_rows(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised ``rows x cols`` matrix whose row stride is padded to
    ``_ROW_ALIGN_BYTES``: every row then starts aligned (the allocator aligns the first one),
    which the vectorised Gram and gather kernels need; with ``torch.empty(rows, cols)`` any
    P not a multiple of the vector width sends them to their scalar path. The ops take any
    row stride and never read the padding, so the values are those of a contiguous buffer."""
    per_line = max(1, _ROW_ALIGN_BYTES // dtype.itemsize)
    stride = -(-cols // per_line) * per_line
    return torch.empty(rows, stride, dtype=dtype, device=device)[:, :cols]


def _as_weights(weights: Tensor | Sequence[float], num_tasks: int) -> list[float]:
    values = [float(w) for w in (weights.tolist() if isinstance(weights, Tensor) else weights)]
    if len(values) != num_tasks:
        raise ValueError(f"got {len(values)} weights for {num_tasks} tasks")
    bad = [w for w in values if not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite, got {values}")
    return values


class TaskGradients:
    """Per-task gradients of ``shared_parameters`` for ``num_tasks`` tasks (see module docs).

    Args:
        shared_parameters: the parameters every task's loss depends on (the encoder φ).
        num_tasks: T, at most ``pyxtask.ops.MAX_TASKS``.
        mode: ``"buffer"`` or ``"streaming"``.
        task_parameters: optional, one iterable of parameters per task (its head): their
            gradients are scaled by the task's weight. Without them only φ is weighted.
        target: index of the target task, whose gradient is the default reference vector.
        task_names: names used in error messages (default ``task 0``, ``task 1``, …).
        buffer_dtype: buffer mode, the dtype of the T x P rows (default: the parameters').
            ``torch.bfloat16`` halves the buffer's memory and the Gram's reads; the Gram still
            accumulates in fp32, and each entry carries bf16's 2^-8 relative rounding.
        reducer: the processes the statistics are global over (see the module docs; default:
            this process alone).

    >>> import torch
    >>> from pyxtask.gradients import TaskGradients
    >>> shared = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    >>> grads = TaskGradients([shared], num_tasks=2, mode="streaming")
    >>> stats = grads.backward([(shared * shared).sum(), shared[0] * 3.0], weights=[1.0, 0.5])
    >>> shared.grad  # 1.0 * (2, 4) + 0.5 * (3, 0)
    tensor([3.5000, 4.0000])
    >>> stats.reference_dots  # target (task 0) gradient (2, 4) against (2, 4) and (3, 0)
    tensor([20.,  6.], dtype=torch.float64)
    >>> grads.close()
    """

    def __init__(
        self,
        shared_parameters: Iterable[nn.Parameter | Tensor],
        num_tasks: int,
        *,
        mode: Mode = "buffer",
        task_parameters: Sequence[Iterable[nn.Parameter | Tensor]] | None = None,
        target: int = 0,
        task_names: Sequence[str] | None = None,
        buffer_dtype: torch.dtype | None = None,
        reducer: Distributed | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {list(_MODES)}")
        if not 1 <= num_tasks <= ops.MAX_TASKS:
            raise ValueError(f"num_tasks = {num_tasks} must be in [1, {ops.MAX_TASKS}]")
        if not 0 <= target < num_tasks:
            raise ValueError(f"target = {target} is out of range for {num_tasks} tasks")
        params = [p for p in shared_parameters if p.requires_grad]
        if not params:
            raise ValueError("shared_parameters has no parameter that requires grad")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"shared parameters must share one dtype and device, got {sorted(map(str, dtypes))}"
                f" on {sorted(map(str, devices))}"
            )
        heads = [[p for p in group if p.requires_grad] for group in task_parameters or []]
        if task_parameters is not None and len(heads) != num_tasks:
            raise ValueError(f"task_parameters has {len(heads)} groups for {num_tasks} tasks")
        shared_ids = {id(p) for p in params}
        if any(id(p) in shared_ids for group in heads for p in group):
            raise ValueError("a parameter is both shared and task-specific")
        if task_names is not None and len(task_names) != num_tasks:
            raise ValueError(f"task_names has {len(task_names)} names for {num_tasks} tasks")
        self._reducer = SINGLE if reducer is None else reducer
        if mode == "streaming" and self._reducer.exact:
            raise ValueError(
                "streaming statistics cannot be exact across processes: use buffer mode (the "
                "T x P rows are summed) or distributed.statistics = 'cheap'"
            )
        self.mode: Mode = mode
        self.num_tasks = num_tasks
        self.target = target
        self.task_names = (
            list(task_names) if task_names is not None else [f"task {t}" for t in range(num_tasks)]
        )
        self._params = params
        self._heads = heads
        self._sizes = [p.numel() for p in params]
        self._offsets = [0]
        for n in self._sizes:
            self._offsets.append(self._offsets[-1] + n)
        self._dtype = params[0].dtype
        self._device = params[0].device
        if buffer_dtype is not None and buffer_dtype not in _BUFFER_DTYPES:
            choices = [str(d) for d in _BUFFER_DTYPES]
            raise ValueError(f"buffer_dtype must be one of {choices}, got {buffer_dtype}")
        self._buffer_dtype = buffer_dtype or self._dtype
        self._buffer: Tensor | None = None
        # Buffer mode, between backward() and combine(): the .grad held before, and whether a
        # combination is still owed.
        self._previous: list[Tensor | None] = []
        self._head_grads_before: list[list[Tensor | None]] = []
        self._pending = False
        self._measured = torch.zeros(num_tasks, dtype=torch.bool)
        self._reference: Tensor | None = None
        # Streaming state, read by the hooks while a task's backward runs.
        self._phase: int | None = None
        self._capture = False
        self._scale = 1.0
        self._dot: list[Tensor] = []
        self._sq: list[Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        if mode == "streaming":
            for i, p in enumerate(params):
                self._handles.append(
                    cast(Any, p).register_hook(functools.partial(self._shared_hook, i))
                )
        for group in heads:
            for p in group:
                self._handles.append(cast(Any, p).register_hook(self._head_hook))

    # -- properties ----------------------------------------------------------------------------

    @property
    def num_parameters(self) -> int:
        """P, the number of shared scalars."""
        return self._offsets[-1]

    @property
    def buffer(self) -> Tensor | None:
        """The T x P gradient buffer of the last buffer-mode backward (None in streaming).

        Each row is contiguous; the rows are padded apart (see ``_padded_rows``), so the
        matrix itself is not: ``.contiguous()`` before ``.view``."""
        return self._buffer

    def close(self) -> None:
        """Remove the hooks (the object is unusable afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> TaskGradients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hooks ---------------------------------------------------------------------------------

    def _shared_hook(self, index: int, grad: Tensor) -> Tensor | None:
        if self._phase is None:
            return None  # an ordinary backward outside backward(): leave it alone
        flat = grad.reshape(-1)
        reference = self._reference
        assert reference is not None
        piece = reference[self._offsets[index] : self._offsets[index + 1]]
        if self._capture:
            piece.copy_(flat)
        self._dot.append(torch.dot(flat, piece).double())
        self._sq.append(torch.dot(flat, flat).double())
        return None if self._scale == 1.0 else grad * self._scale

    def _head_hook(self, grad: Tensor) -> Tensor | None:
        if self._phase is None or self._scale == 1.0:
            return None
        return grad * self._scale

    # -- the step ------------------------------------------------------------------------------

    def _order(self) -> list[int]:
        return [self.target] + [t for t in range(self.num_tasks) if t != self.target]

    def _check_inputs(self, losses: Sequence[Tensor | None]) -> None:
        if len(losses) != self.num_tasks:
            raise ValueError(f"got {len(losses)} losses for {self.num_tasks} tasks")
        for t, loss in enumerate(losses):
            if loss is not None and loss.dim() != 0:
                raise ValueError(
                    f"{self.task_names[t]}: the loss must be a scalar, got shape "
                    f"{tuple(loss.shape)}"
                )

    def _raise_non_finite(self, sq_norms: Tensor, measured: Tensor) -> None:
        bad = [
            t
            for t in range(self.num_tasks)
            if bool(measured[t]) and not math.isfinite(float(sq_norms[t]))
        ]
        if bad:
            for p in self._params:
                p.grad = None
            names = ", ".join(self.task_names[t] for t in bad)
            raise NonFiniteGradientError(
                f"the gradient of {names} has NaN or infinite entries; the step was stopped "
                "(lower the learning rate, check the loss and the inputs of that task)"
            )

    def backward(
        self,
        losses: Sequence[Tensor | None],
        weights: Tensor | Sequence[float] | None = None,
        reference: Tensor | None = None,
        *,
        accumulate: bool = False,
    ) -> GradientStats:
        """Backward every task's loss once; leave ``sum_t w_t g_t`` in ``.grad``.

        Args:
            losses: one scalar loss per task (each with its own graph), or None for a task
                without a batch this step (it contributes nothing and is not measured).
            weights: ``w_t`` per task. Required in streaming mode; in buffer mode it may be
                omitted and given to :meth:`combine` once the statistics are known.
            reference: optional flat vector of P entries to take dot products against,
                instead of the target's gradient.
            accumulate: buffer mode, a later micro-batch of the same step: its gradients are
                added to the rows of the previous ``backward`` (not yet combined), and the
                statistics describe the sums. Streaming mode adds into ``.grad`` anyway; its
                statistics are per call.

        Gradients already in ``.grad`` (accumulation over micro-batches) are kept and added to.
        """
        self._check_inputs(losses)
        w = None if weights is None else _as_weights(weights, self.num_tasks)
        if reference is not None and reference.shape != (self.num_parameters,):
            raise ValueError(
                f"reference must be a flat vector of {self.num_parameters} entries, got shape "
                f"{tuple(reference.shape)}"
            )
        if self.mode == "streaming":
            if w is None:
                raise ValueError("streaming mode needs the weights before backward")
            return self._backward_streaming(losses, w, reference)
        if accumulate and not self._pending:
            raise RuntimeError("accumulate=True follows a buffer-mode backward() without weights")
        stats = self._backward_buffer(losses, reference, accumulate)
        if w is not None:
            self.combine(w)
        return stats

    def _backward_buffer(
        self, losses: Sequence[Tensor | None], reference: Tensor | None, accumulate: bool
    ) -> GradientStats:
        T = self.num_tasks
        if self._buffer is None:
            self._buffer = _padded_rows(T, self.num_parameters, self._buffer_dtype, self._device)
        G = self._buffer
        reducer = self._reducer
        if not accumulate:
            self._previous = [p.grad for p in self._params]
            # Copies: backward accumulates into an existing .grad in place.
            self._head_grads_before = [
                [None if p.grad is None else p.grad.clone() for p in group] for group in self._heads
            ]
            self._measured = torch.zeros(T, dtype=torch.bool)
        for p in self._params:
            p.grad = None
        measured = self._measured
        for t in self._order():
            loss = losses[t]
            if loss is None:
                if not accumulate:
                    G[t].zero_()
                continue
            # Heads collect their own task's gradient unscaled here; combine() scales them.
            torch.autograd.backward(loss)
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self._params]
            if accumulate and bool(measured[t]):
                G[t].add_(ops.gather_flat(grads))
            else:
                ops.gather_flat(grads, G[t])
            for p in self._params:
                p.grad = None
            measured[t] = True
        if reducer.exact:  # the global rows: every statistic below is then exact
            storage = G if G.is_contiguous() else G._base
            assert storage is not None
            reducer.all_reduce_(storage, "statistics")
        try:
            gram = ops.gram(G).double().cpu()
        except RuntimeError as exc:
            # The CPU kernel checks for NaN/inf as it reads G; name the task, not the row.
            found = re.search(r"NaN or Inf \(row (\d+)\)", str(exc))
            if found is None:
                raise
            nan = torch.zeros(T, dtype=torch.float64)
            nan[int(found.group(1))] = math.nan
            self._raise_non_finite(nan, measured)
            raise
        if reducer.cheap:
            gram = reducer.all_reduce_(gram, "statistics") * reducer.world_size
        sq_norms = torch.diagonal(gram).clone()
        self._raise_non_finite(sq_norms, measured)
        if reference is None:
            dots = gram[self.target].clone()
            ref_sq = float(gram[self.target, self.target])
        else:
            ref = reference.to(self._dtype).reshape(1, -1)
            dots = ops.cross_gram(ref, G).double().cpu()[0]
            if reducer.cheap:  # the reference is global, the rows local: a sum is exact
                dots = reducer.all_reduce_(dots.contiguous(), "statistics")
            ref_sq = float(ops.gram(ref).double()[0, 0])
        self._pending = True
        return GradientStats(sq_norms, dots, ref_sq, gram, measured.clone())

    def combine(self, weights: Tensor | Sequence[float]) -> None:
        """Buffer mode: write ``sum_t w_t g_t`` (plus what ``.grad`` held before) into ``.grad``
        and scale each task's head gradients by its weight."""
        if self.mode != "buffer" or self._buffer is None or not self._pending:
            raise RuntimeError("combine() follows a buffer-mode backward() without weights")
        w = _as_weights(weights, self.num_tasks)
        G = self._buffer
        grads = []
        for p, before in zip(self._params, self._previous, strict=True):
            p.grad = torch.zeros_like(p) if before is None else before
            grads.append(p.grad)
        # Weights in the parameters' dtype: a bf16 buffer must not also round the weights.
        ops.scatter_combination(
            G, torch.tensor(w, dtype=self._dtype, device=G.device), grads, accumulate=True
        )
        for t, group in enumerate(self._heads):
            for p, before in zip(group, self._head_grads_before[t], strict=True):
                if p.grad is None:
                    continue
                # Only this task's backward touched the head: its gradient is grad - before.
                if before is None:
                    p.grad.mul_(w[t])
                else:
                    p.grad.sub_(before).mul_(w[t]).add_(before)
        if self._reducer.exact:  # a combination of global rows: already summed
            self._reducer.mark_reduced(self._params)
        self._pending = False

    def _backward_streaming(
        self, losses: Sequence[Tensor | None], w: list[float], reference: Tensor | None
    ) -> GradientStats:
        T = self.num_tasks
        own_reference = reference is None
        if own_reference:
            if self._reference is None or self._reference.dtype != self._dtype:
                self._reference = torch.empty(
                    self.num_parameters, dtype=self._dtype, device=self._device
                )
            self._reference.zero_()
        else:
            assert reference is not None
            self._reference = reference.to(self._dtype).contiguous()
        sq = torch.zeros(T, dtype=torch.float64, device=self._device)
        dots = torch.zeros(T, dtype=torch.float64, device=self._device)
        measured = torch.zeros(T, dtype=torch.bool)
        cheap = self._reducer.cheap
        try:
            for t in self._order():
                loss = losses[t]
                if loss is None:
                    continue
                self._phase = t
                self._capture = own_reference and t == self.target
                self._scale = w[t]
                self._dot, self._sq = [], []
                torch.autograd.backward(loss)
                if self._sq:
                    sq[t] = torch.stack(self._sq).sum()
                    dots[t] = torch.stack(self._dot).sum()
                measured[t] = True
                if cheap and self._capture:  # the global target gradient, once
                    assert self._reference is not None
                    self._reducer.all_reduce_(self._reference, "statistics")
        finally:
            self._phase = None
            self._capture = False
            self._scale = 1.0
            self._dot, self._sq = [], []
        if cheap:
            self._reduce_streaming(sq, dots, own_reference)
        sq_cpu, dots_cpu = sq.cpu(), dots.cpu()
        self._raise_non_finite(sq_cpu, measured)
        if own_reference:
            if not bool(measured[self.target]):
                raise ValueError(
                    f"streaming mode needs the target's loss ({self.task_names[self.target]}) "
                    "or a reference vector"
                )
            ref_sq = float(sq_cpu[self.target])
        else:
            assert self._reference is not None
            ref_sq = float(torch.dot(self._reference, self._reference))
            self._reference = None
        return GradientStats(sq_cpu, dots_cpu, ref_sq, None, measured)

    def _reduce_streaming(self, sq: Tensor, dots: Tensor, own_reference: bool) -> None:
        """Cheap mode: the dot products with the (global) reference summed, exact; the squared
        norms ``R`` times the sum of the local ones; the target's own, exact, from the summed
        reference."""
        reducer = self._reducer
        both = reducer.all_reduce_(torch.cat([dots, sq]), "statistics")
        T = self.num_tasks
        dots.copy_(both[:T])
        sq.copy_(both[T:] * reducer.world_size)
        if own_reference:
            assert self._reference is not None
            exact = torch.dot(self._reference, self._reference).double()
            dots[self.target] = sq[self.target] = exact
