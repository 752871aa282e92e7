"""Training on several processes (``torchrun``): the process group, sharding, all-reduces.

``pyxtask train`` started by ``torchrun --nproc-per-node N`` (and across nodes with the usual
``--nnodes``/``--rdzv-*`` flags) finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its
environment and joins the process group (:func:`from_environment`): NCCL when it trains on
GPUs (each process on ``cuda:LOCAL_RANK``), gloo on CPUs, with a timeout on every collective.
Without them — or with a world of one process — :data:`SINGLE` stands in: every operation is a
no-op and training is bitwise what it is without torchrun.

How a run is split (``docs/architecture.md``, *Distributed training*):

- every process samples the same *global* steps; :meth:`Distributed.shard` gives each process
  its slice of every batch (``indices[rank::world_size]``), and a loss is that slice's sum
  divided by the labelled units (tokens, or labelled texts) of the whole global batch — every
  process knows the global batch, so the count needs no message — so the processes' losses
  and gradients *sum* to the one-process values;
- a method whose every backward pass adds to one summed gradient (fixed weights, equal,
  the loss weightings, Uncertainty, SVD: :attr:`pyxtask.methods.Method.data_parallel`) runs
  its forward passes inside DDP (:meth:`Distributed.data_parallel`): the step's last
  backward all-reduces the gradient bucket by bucket while it runs. The other methods run
  one backward pass per task (or probes between steps) and scale or measure each task's
  gradient in hooks, which DDP's reducer (one all-reduce per forward/backward, every pass
  since the last one reduced) does not fit: no DDP for them — the per-task passes are DDP's
  ``no_sync`` — and after their step :meth:`Distributed.sync_gradients` sums every
  ``.grad`` in one all-reduce per dtype (DDP's traffic, with its unused-parameter bitmap,
  not overlapped), except the gradients the method already summed
  (:meth:`Distributed.mark_reduced`);
- per-task statistics are global, ``exact`` or ``cheap`` (:attr:`Distributed.statistics`; see
  :class:`pyxtask.gradients.TaskGradients`).

A collective that fails — another process died, raised, or hung past the timeout — is a
:class:`DistributedError` with a one-line message on every surviving process, never a hang;
when torchrun stops the survivors (SIGTERM) they say so in one line too.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import inspect
import os
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "SINGLE",
    "Distributed",
    "DistributedError",
    "from_environment",
    "torchrun_environment",
]

T = TypeVar("T")

#: The per-task statistics' modes (``distributed.statistics``).
STATISTICS = ("exact", "cheap")
#: Counters of :attr:`Distributed.sent`: what the bytes were for.
KINDS = ("gradients", "statistics", "losses", "other")


class DistributedError(RuntimeError):
    """A collective failed: another process died, raised or hung past the timeout."""


def torchrun_environment() -> dict[str, int] | None:
    """``{"rank", "world_size", "local_rank"}`` set by torchrun, or None outside it."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    return {"rank": rank, "world_size": world, "local_rank": int(os.environ.get("LOCAL_RANK", "0"))}


@dataclass
class Distributed:
    """One process's view of the run: its rank, the world, the collectives it may issue.

    Every collective sums (``SUM``) and counts the bytes it sends into :attr:`sent`, by kind.
    The single-process instance (:data:`SINGLE`) does nothing and counts nothing.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: ``"exact"``: per-task gradients summed across processes (T x P), then the statistics;
    #: ``"cheap"``: each process's statistics, summed (see ``TaskGradients``).
    statistics: str = "exact"
    backend: str = "none"
    timeout_s: float = 0.0
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    _reduced: set[int] = field(default_factory=set)

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    @property
    def exact(self) -> bool:
        return self.enabled and self.statistics == "exact"

    @property
    def cheap(self) -> bool:
        return self.enabled and self.statistics == "cheap"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run's files."""
        return self.rank == 0

    # -- sharding ------------------------------------------------------------------------------

    def shard(self, indices: Sequence[T]) -> list[T]:
        """This process's slice of a global batch: every ``world_size``-th item from its rank
        (strided, so length-sorted batches give every process similar lengths)."""
        return list(indices[self.rank :: self.world_size])

    # -- collectives ---------------------------------------------------------------------------

    def run(self, what: str, op: Any, *args: Any, **kwargs: Any) -> Any:
        """``op(*args, **kwargs)``, a failed collective inside it (``what``) turned into a
        one-line :class:`DistributedError`."""
        try:
            return op(*args, **kwargs)
        except (RuntimeError, dist.DistError) as exc:
            first = next(
                (s.strip() for s in str(exc).splitlines() if s.strip()), type(exc).__name__
            )
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {what} failed — another process died, "
                f"raised or hung longer than the {self.timeout_s:g} s timeout "
                f"(distributed.timeout); its own log says why ({first[:160]})"
            ) from exc

    def _count(self, kind: str, nbytes: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + nbytes
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def all_reduce_(self, tensor: Tensor, kind: str = "statistics") -> Tensor:
        """Sum ``tensor`` over the processes, in place (a CPU tensor goes through the GPU under
        NCCL); returns it. No-op with one process."""
        if not self.enabled:
            return tensor
        self._count(kind, tensor.numel() * tensor.element_size())
        if self.backend == "nccl" and tensor.device.type != "cuda":
            on_device = tensor.to(f"cuda:{self.local_rank}")
            self.run(f"all_reduce of {kind}", dist.all_reduce, on_device)
            tensor.copy_(on_device)
            return tensor
        if not tensor.is_contiguous():
            raise ValueError("all_reduce_ needs a contiguous tensor")
        self.run(f"all_reduce of {kind}", dist.all_reduce, tensor)
        return tensor

    def sum_tensors(self, tensors: Sequence[Tensor], kind: str = "statistics") -> list[Tensor]:
        """``tensors`` (one dtype) summed over the processes by one all-reduce, as new
        tensors (the inputs are untouched). With one process: the inputs."""
        if not self.enabled or not tensors:
            return list(tensors)
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        self.all_reduce_(flat, kind)
        return unflatten(flat, tensors)

    def sum_values(self, values: Sequence[float], kind: str = "losses") -> list[float]:
        """Python floats summed over the processes (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        return self.all_reduce_(torch.tensor(values, dtype=torch.float64), kind).tolist()

    def broadcast_tensors_(self, tensors: Iterable[Tensor], kind: str = "other") -> None:
        """Rank 0's values into every process's ``tensors`` (in place)."""
        if not self.enabled:
            return
        for tensor in tensors:
            self._count(kind, tensor.numel() * tensor.element_size())
            src = tensor
            if self.backend == "nccl" and tensor.device.type != "cuda":
                src = tensor.to(f"cuda:{self.local_rank}")
            self.run("broadcast", dist.broadcast, src, 0)
            if src is not tensor:
                tensor.copy_(src)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self.run("all_gather_object", dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        self.run("broadcast_object", dist.broadcast_object_list, box, 0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            # A barrier as a tiny all-reduce: gloo's barrier and NCCL's both honour the timeout
            # this way, and the error names the step it was waiting in.
            self.all_reduce_(torch.zeros(1), "other")

    # -- gradients -----------------------------------------------------------------------------

    def begin_step(self) -> None:
        """Forget the marks of :meth:`mark_reduced` (made by measurements between steps, e.g.
        probes, whose gradients are thrown away): a step starts with every gradient local."""
        self._reduced.clear()

    def mark_reduced(self, parameters: Iterable[Tensor]) -> None:
        """These parameters' ``.grad`` already hold the all-process value (summed, or computed
        from summed statistics): :meth:`sync_gradients` leaves them alone this step."""
        if self.enabled:
            self._reduced.update(id(p) for p in parameters)

    def sync_gradients(self, parameters: Sequence[Tensor]) -> None:
        """Sum ``.grad`` over the processes: one all-reduce per dtype of every gradient not
        marked reduced, with a presence flag per parameter, so that a parameter no process
        gave a gradient keeps ``.grad = None`` (what the optimizer then skips) and one that
        only some processes touched gets their sum."""
        if not self.enabled:
            return
        pending = [p for p in parameters if id(p) not in self._reduced]
        self._reduced.clear()
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in pending:
            by_dtype.setdefault(p.dtype, []).append(p)
        for params in by_dtype.values():
            flags = torch.tensor(
                [0.0 if p.grad is None else 1.0 for p in params], dtype=params[0].dtype
            ).to(params[0].device)
            parts = [
                (torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params
            ]
            flat = torch.cat([*parts, flags])
            self.all_reduce_(flat, "gradients")
            offset = 0
            for p, present in zip(params, flat[-len(params) :].tolist(), strict=True):
                n = p.numel()
                if present > 0:
                    p.grad = flat[offset : offset + n].view_as(p).clone()
                else:
                    p.grad = None
                offset += n

    def check_same(self, values: Tensor, what: str) -> None:
        """Raise :class:`DistributedError` unless every process holds bitwise the same
        ``values`` (weights computed redundantly must agree)."""
        if not self.enabled:
            return
        mine = values.detach().cpu().contiguous()
        every = self.all_gather_object(mine)
        for rank, other in enumerate(every):
            if other.shape != mine.shape or not torch.equal(other, mine):
                where = int((other != mine).nonzero()[0, 0]) if other.shape == mine.shape else 0
                raise DistributedError(
                    f"rank {self.rank}: {what} differ from rank {rank}'s (entry {where}: "
                    f"{mine.reshape(-1)[where].item()!r} vs {other.reshape(-1)[where].item()!r}); "
                    "the processes diverged"
                )

    def data_parallel(self, module: nn.Module) -> DistributedDataParallel:
        """``module`` wrapped in DDP to run a closure's forward passes: ``ddp(fn)`` returns
        ``fn()``, and the backward of that output sums (not averages: a process's loss is
        already its share of the global mean) every gradient of ``module`` over the
        processes, bucket by bucket while the backward runs. Parameters a closure leaves
        out are found each step (``find_unused_parameters``), so one task's batch per step
        works; the module's values are not broadcast (the trainer already did)."""
        buffers = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        # Buffers (BERT's position ids) are constants: no broadcast before each forward.
        no_broadcast: dict[str, Any] = (
            {"forward_sync_buffers": False} if buffers else {"broadcast_buffers": False}
        )
        ddp = DistributedDataParallel(
            _Call(module),
            device_ids=[self.local_rank] if self.backend == "nccl" else None,
            init_sync=False,
            find_unused_parameters=True,
            **no_broadcast,
        )
        ddp.register_comm_hook(self, _sum_bucket)
        return ddp

    def bytes_sent(self) -> dict[str, int]:
        return dict(self.sent)


class _Call(nn.Module):
    """The module DDP wraps: its forward is a closure over the wrapped module's parameters
    (a method's losses), so any forward a method runs can go through DDP."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[[], Tensor]) -> Tensor:
        return fn()


def _sum_bucket(state: Distributed, bucket: Any) -> torch.futures.Future[Tensor]:
    """DDP's communication hook: the bucket (a ``dist.GradBucket``) summed — DDP's default
    divides by the number of processes."""
    buffer = bucket.buffer()
    state._count("gradients", buffer.numel() * buffer.element_size())
    work = dist.all_reduce(buffer, async_op=True)
    return cast(torch.futures.Future[Tensor], work.get_future().then(lambda f: f.value()[0]))


# DDP checks a hook's annotations against the classes; this module's are strings (PEP 563).
_sum_bucket.__annotations__ = {
    "state": Distributed,
    "bucket": dist.GradBucket,  # type: ignore[attr-defined]
    "return": torch.futures.Future[Tensor],
}


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """``flat`` cut into views shaped like ``like`` (in order)."""
    views, offset = [], 0
    for x in like:
        views.append(flat[offset : offset + x.numel()].view_as(x))
        offset += x.numel()
    return views


#: The single-process stand-in: every collective is a no-op.
SINGLE = Distributed()

_CURRENT: Distributed | None = None


def from_environment(
    *, statistics: str = "exact", timeout_s: float = 600.0, device: str = "auto"
) -> Distributed:
    """Join torchrun's process group (once per process) or return :data:`SINGLE`.

    ``device`` is the run's device setting: GPUs (``auto`` with CUDA available, ``cuda``…)
    take NCCL and ``cuda:LOCAL_RANK``, CPUs gloo. ``timeout_s`` bounds every collective.
    """
    global _CURRENT  # noqa: PLW0603 -- one process group per process
    env = torchrun_environment()
    if env is None or env["world_size"] <= 1:
        return SINGLE
    if statistics not in STATISTICS:
        raise ValueError(f"distributed.statistics = {statistics!r} is not one of {STATISTICS}")
    if _CURRENT is not None:
        _CURRENT.statistics = statistics
        return _CURRENT
    gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if gpu else "gloo"
    if gpu:
        torch.cuda.set_device(env["local_rank"])
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        atexit.register(_destroy)
    _CURRENT = Distributed(
        rank=env["rank"],
        world_size=env["world_size"],
        local_rank=env["local_rank"],
        statistics=statistics,
        backend=backend,
        timeout_s=timeout_s,
    )
    _report_termination(_CURRENT)
    return _CURRENT


def _destroy() -> None:
    if dist.is_initialized():
        # A peer that already left: nothing to tear down.
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _report_termination(current: Distributed) -> None:
    """torchrun stops the other processes with SIGTERM when one fails: say so in one line
    (the CLI prints it as ``error: ...``) instead of vanishing without a word."""

    def stopped(signum: int, frame: FrameType | None) -> None:
        raise DistributedError(
            f"rank {current.rank}/{current.world_size}: stopped by torchrun (signal "
            f"{signal.Signals(signum).name}) because another process failed; see its log"
        )

    with contextlib.suppress(ValueError):  # not the main thread: leave the default
        signal.signal(signal.SIGTERM, stopped)
