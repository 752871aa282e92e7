"""Multi-task batch sampling: which examples of which tasks a training step sees.

Task 0 is the target, tasks ``1..T-1`` the sources. :class:`MultiTaskBatchSampler` yields, per
step, a list of ``(task_id, indices)`` pairs with ``indices`` the example indices *within* that
task, in one of two mixings:

``"shuffle"`` (MT-DNN, as the TAWT authors' code trains)
    Each task's examples are shuffled and cut into batches, ``ceil(n_t / b_t)`` of them
    (``floor`` with ``drop_last``); the batches of all tasks then form one shuffled stream and
    every step yields ONE batch of ONE task. With ``task_probs`` the stream is instead drawn:
    each step picks a task with those probabilities and takes that task's next batch (a task's
    order is reshuffled when it runs out) for ``steps_per_epoch`` steps -- task weights used as
    sampling probabilities.

``"all"``
    Every step yields one batch of EVERY task (for methods that compare per-task gradients at
    each step). An epoch is one pass over ``epoch_task`` (default: the target); the other tasks
    cycle, reshuffled whenever they run out.

Every order is a pure function of ``(seed, epoch, task)``: the random streams come from
:class:`numpy.random.SeedSequence` keyed by those numbers, so a stream is the same across runs
and machines and a sampler restored with :meth:`~MultiTaskBatchSampler.load_state_dict` in the
middle of an epoch yields exactly the steps an uninterrupted run would have yielded next.

It is a plain iterable, not a ``batch_sampler`` for :class:`torch.utils.data.DataLoader`: a
step may name several tasks, so the caller maps the indices to each task's dataset itself.

Under torchrun every process iterates the same sampler and takes its slice of every batch
(:mod:`pyxtask.distributed`): the global batches, their order and a saved position are those
of one process, so a run resumes on any number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = ["MultiTaskBatchSampler", "Step"]

Step = list[tuple[int, list[int]]]
"""One training step: ``(task_id, indices within that task)`` pairs."""

Mode = Literal["shuffle", "all"]
_MODES: tuple[str, ...] = ("shuffle", "all")

# Distinct spawn-key tags keep the streams independent: the mixing stream of an epoch must not
# coincide with, say, task 0's permutation of the same epoch.
_KIND_TASK_ORDER = 0
_KIND_MIX = 1

# SeedSequence wants non-negative entropy; folding keeps any Python int usable as a seed.
_SEED_MOD = 2**64

_CONFIG_KEYS: tuple[str, ...] = (
    "task_sizes",
    "batch_sizes",
    "mode",
    "seed",
    "drop_last",
    "task_probs",
    "steps_per_epoch",
    "epoch_task",
    "group_by_length",
)
# Batches are formed inside chunks of this many batches sorted by length (fairseq's and
# transformers' "mega-batches"): little padding, and still a random mix of lengths per epoch.
_LENGTH_CHUNK_BATCHES = 50


def _is_int(x: object) -> bool:
    # bool is an int subclass, but True as a batch size is a bug, not a request for 1.
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def _err(msg: str) -> ValueError:
    return ValueError(f"MultiTaskBatchSampler: {msg}")


class MultiTaskBatchSampler:
    """Yields multi-task training steps; see the module docstring for the two mixings.

    Args:
        task_sizes: number of examples of each task (task 0 is the target); each at least 1.
        batch_size: one batch size for all tasks, or one per task.
        mode: ``"shuffle"`` (one batch of one task per step) or ``"all"`` (one batch of every
            task per step).
        seed: base seed; every order derives from ``(seed, epoch, task)``.
        drop_last: drop each task's final partial batch (per pass over that task). A task with
            fewer examples than its batch size would then never yield a batch, which is refused.
        task_probs: ``"shuffle"`` mode only: probability of drawing each task at a step, instead
            of the natural stream of all tasks' batches. Needs ``steps_per_epoch``.
        steps_per_epoch: number of steps of an epoch with ``task_probs`` (only used there).
        epoch_task: ``"all"`` mode: the task whose single pass makes the epoch.
        lengths: optional, one sequence of example lengths per task. Each task's shuffled order
            is then cut into chunks of 50 batches, each chunk sorted by length before it is cut
            into batches, and the batches shuffled: batches of similar lengths (little padding,
            which on a CPU is most of the cost of a padded transformer batch) in a random order.

    Iterating yields the remaining steps of the current epoch and, once they are exhausted,
    moves to the start of the next epoch, so a plain ``for`` loop over the sampler per epoch
    sees fresh orders even without :meth:`set_epoch`. Use one live iterator at a time: the
    position is the sampler's, not the iterator's.
    """

    def __init__(  # noqa: PLR0917 -- the documented positional signature
        self,
        task_sizes: Sequence[int],
        batch_size: int | Sequence[int],
        mode: Mode = "shuffle",
        seed: int = 0,
        drop_last: bool = False,
        task_probs: Sequence[float] | None = None,
        steps_per_epoch: int | None = None,
        epoch_task: int = 0,
        lengths: Sequence[Sequence[int]] | None = None,
    ) -> None:
        sizes = list(task_sizes)
        if not sizes:
            raise _err("task_sizes is empty: need at least one task")
        for t, n in enumerate(sizes):
            if not _is_int(n):
                raise _err(f"task_sizes[{t}] = {n!r} is not an int")
            if n < 1:
                raise _err(
                    f"task {t} is empty (task_sizes[{t}] = {n}); every task needs >= 1 example"
                )
        num_tasks = len(sizes)

        if _is_int(batch_size):
            batch_sizes = [int(batch_size)] * num_tasks  # type: ignore[arg-type]
        elif isinstance(batch_size, Sequence) and not isinstance(batch_size, str | bytes):
            batch_sizes = list(batch_size)
            if len(batch_sizes) != num_tasks:
                raise _err(
                    f"batch_size has {len(batch_sizes)} entries but there are {num_tasks} tasks"
                )
        else:
            raise _err(f"batch_size = {batch_size!r} is neither an int nor a sequence of ints")
        for t, b in enumerate(batch_sizes):
            if not _is_int(b):
                raise _err(f"batch size of task {t} = {b!r} is not an int")
            if b < 1:
                raise _err(f"batch size of task {t} is {b}; it must be >= 1")

        if mode not in _MODES:
            raise _err(f"unknown mode {mode!r}; expected one of {list(_MODES)}")
        if not _is_int(seed):
            raise _err(f"seed = {seed!r} is not an int")

        if drop_last:
            for t, (n, b) in enumerate(zip(sizes, batch_sizes, strict=True)):
                if n < b:
                    raise _err(
                        f"task {t} has {n} examples, fewer than its batch size {b}, so with "
                        "drop_last=True it would never yield a batch"
                    )

        probs: list[float] | None = None
        if task_probs is not None:
            if mode != "shuffle":
                raise _err(f"task_probs only applies to mode='shuffle', not mode={mode!r}")
            probs = [float(p) for p in task_probs]
            if len(probs) != num_tasks:
                raise _err(f"task_probs has {len(probs)} entries but there are {num_tasks} tasks")
            if any(not math.isfinite(p) or p < 0.0 for p in probs):
                raise _err(
                    f"task_probs {probs} is not a distribution: entries must be finite, >= 0"
                )
            total = math.fsum(probs)
            if not math.isclose(total, 1.0, rel_tol=0.0, abs_tol=1e-6):
                raise _err(f"task_probs {probs} is not a distribution: it sums to {total}, not 1")
            if steps_per_epoch is None:
                raise _err("task_probs needs steps_per_epoch (an epoch is a number of draws)")
        if steps_per_epoch is not None:
            if probs is None:
                raise _err("steps_per_epoch only applies together with task_probs")
            if not _is_int(steps_per_epoch) or steps_per_epoch < 1:
                raise _err(f"steps_per_epoch = {steps_per_epoch!r} must be an int >= 1")

        if not _is_int(epoch_task) or not 0 <= epoch_task < num_tasks:
            raise _err(f"epoch_task = {epoch_task!r} is out of range for {num_tasks} tasks")

        self._lengths: list[NDArray[np.int64]] | None = None
        if lengths is not None:
            if len(lengths) != num_tasks:
                raise _err(f"lengths has {len(lengths)} entries but there are {num_tasks} tasks")
            self._lengths = []
            for t, (n, task_lengths) in enumerate(zip(sizes, lengths, strict=True)):
                arr = np.asarray(task_lengths, dtype=np.int64)
                if arr.shape != (n,):
                    raise _err(f"lengths[{t}] has {arr.size} entries for {n} examples")
                self._lengths.append(arr)
        self._sizes: list[int] = [int(n) for n in sizes]
        self._batch_sizes: list[int] = [int(b) for b in batch_sizes]
        self._mode: Mode = mode
        self._seed: int = int(seed)
        self._drop_last = bool(drop_last)
        self._probs = probs
        self._steps_per_epoch: int | None = (
            int(steps_per_epoch) if steps_per_epoch is not None else None
        )
        self._epoch_task = int(epoch_task)
        # Batches in one pass over each task; >= 1 thanks to the drop_last check above.
        self._batches_per_pass: list[int] = [
            n // b if self._drop_last else -(-n // b)
            for n, b in zip(self._sizes, self._batch_sizes, strict=True)
        ]
        self._epoch = 0
        self._step = 0

    # ------------------------------------------------------------------ properties

    @property
    def num_tasks(self) -> int:
        """Number of tasks (task 0 is the target)."""
        return len(self._sizes)

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return self._epoch

    @property
    def step(self) -> int:
        """Steps of the current epoch already yielded."""
        return self._step

    @property
    def batches_per_task(self) -> list[int]:
        """Batches in one pass over each task (``ceil(n/b)``, or ``floor`` with drop_last)."""
        return list(self._batches_per_pass)

    def __len__(self) -> int:
        """Steps per epoch."""
        if self._probs is not None:
            assert self._steps_per_epoch is not None
            return self._steps_per_epoch
        if self._mode == "all":
            return self._batches_per_pass[self._epoch_task]
        return sum(self._batches_per_pass)

    def __repr__(self) -> str:
        return (
            f"MultiTaskBatchSampler(task_sizes={self._sizes}, batch_size={self._batch_sizes}, "
            f"mode={self._mode!r}, seed={self._seed}, drop_last={self._drop_last}, "
            f"task_probs={self._probs}, steps_per_epoch={self._steps_per_epoch}, "
            f"epoch_task={self._epoch_task}; epoch={self._epoch}, step={self._step})"
        )

    # ------------------------------------------------------------------ position

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``.

        Calling it with the epoch the sampler is already in keeps the position, so the usual
        ``for e in range(start, E): sampler.set_epoch(e); for step in sampler: ...`` loop
        continues a mid-epoch position restored by :meth:`load_state_dict`. To replay the
        current epoch from its start, load a state with ``step`` 0.
        """
        if not _is_int(epoch) or epoch < 0:
            raise _err(f"epoch = {epoch!r} must be an int >= 0")
        if int(epoch) != self._epoch:
            self._epoch = int(epoch)
            self._step = 0

    def state_dict(self) -> dict[str, Any]:
        """Position (``epoch``, ``step``: steps already yielded) plus the configuration."""
        return {
            "epoch": self._epoch,
            "step": self._step,
            "seed": self._seed,
            "task_sizes": list(self._sizes),
            "batch_sizes": list(self._batch_sizes),
            "mode": self._mode,
            "drop_last": self._drop_last,
            "task_probs": None if self._probs is None else list(self._probs),
            "steps_per_epoch": self._steps_per_epoch,
            "epoch_task": self._epoch_task,
            "group_by_length": self._lengths is not None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`.

        The next iteration yields exactly the steps of that epoch not yet yielded when the state
        was saved. A state from a sampler configured differently is a ValueError naming the
        differences (the same position would mean different batches).
        """
        missing = [k for k in ("epoch", "step", *_CONFIG_KEYS) if k not in state]
        if missing:
            raise _err(f"state is missing {missing}")
        mine = self.state_dict()
        diffs = [
            f"{k}: state has {state[k]!r}, sampler has {mine[k]!r}"
            for k in _CONFIG_KEYS
            if _normalise(state[k]) != _normalise(mine[k])
        ]
        if diffs:
            raise _err("state comes from a differently configured sampler: " + "; ".join(diffs))
        epoch, step = state["epoch"], state["step"]
        if not _is_int(epoch) or epoch < 0:
            raise _err(f"state epoch = {epoch!r} must be an int >= 0")
        if not _is_int(step) or not 0 <= step <= len(self):
            raise _err(f"state step = {step!r} is outside [0, {len(self)}]")
        self._epoch = int(epoch)
        self._step = int(step)

    # ------------------------------------------------------------------ streams

    def _rng(self, epoch: int, kind: int, *key: int) -> np.random.Generator:
        ss = np.random.SeedSequence(self._seed % _SEED_MOD, spawn_key=(epoch, kind, *key))
        return np.random.Generator(np.random.PCG64(ss))

    def _task_pass(self, epoch: int, task: int, pass_: int) -> list[list[int]]:
        """Batches of pass ``pass_`` over ``task`` in ``epoch``."""
        rng = self._rng(epoch, _KIND_TASK_ORDER, task, pass_)
        perm = rng.permutation(self._sizes[task])
        b = self._batches_per_pass[task]
        size = self._batch_sizes[task]
        if self._lengths is not None:
            chunk = size * _LENGTH_CHUNK_BATCHES
            lengths = self._lengths[task]
            perm = np.concatenate(
                [
                    part[np.argsort(-lengths[part], kind="stable")]
                    for part in np.split(perm, range(chunk, perm.size, chunk))
                ]
            )
        batches = [perm[i * size : (i + 1) * size].tolist() for i in range(b)]
        if self._lengths is not None:
            batches = [batches[i] for i in rng.permutation(b)]
        return batches

    def _task_schedule(self, epoch: int) -> NDArray[np.int64]:
        """Shuffle mode: the task of every step of ``epoch``."""
        rng = self._rng(epoch, _KIND_MIX)
        if self._probs is None:
            ids = np.repeat(np.arange(self.num_tasks, dtype=np.int64), self._batches_per_pass)
            return rng.permutation(ids)
        # Inverse-CDF draws from uniforms rather than Generator.choice: only the uniform stream
        # has to stay fixed across numpy versions for the schedule to stay fixed.
        cdf = np.cumsum(np.asarray(self._probs, dtype=np.float64))
        cdf /= cdf[-1]
        u = rng.random(len(self))
        ids = np.searchsorted(cdf, u, side="right").astype(np.int64)
        # Trailing zero-probability tasks share cdf == 1; clamping keeps them unreachable.
        last = int(np.flatnonzero(np.asarray(self._probs) > 0.0)[-1])
        return np.minimum(ids, last)

    def __iter__(self) -> Iterator[Step]:
        """Yield the remaining steps of the current epoch, then move to the next epoch."""
        epoch = self._epoch
        cache: dict[int, tuple[int, list[list[int]]]] = {}

        def batch(task: int, j: int) -> list[int]:
            # j counts the task's batches this epoch; passes past the first are reshuffles.
            pass_, i = divmod(j, self._batches_per_pass[task])
            hit = cache.get(task)
            if hit is None or hit[0] != pass_:
                hit = (pass_, self._task_pass(epoch, task, pass_))
                cache[task] = hit
            return hit[1][i]

        total = len(self)
        if self._mode == "all":
            while self._step < total:
                s = self._step
                out: Step = [(t, batch(t, s)) for t in range(self.num_tasks)]
                # Count the step as yielded before handing it out, so a state saved while the
                # caller trains on it resumes after it.
                self._step = s + 1
                yield out
        else:
            schedule = self._task_schedule(epoch)
            done = np.bincount(schedule[: self._step], minlength=self.num_tasks)
            counts = [int(c) for c in done]
            while self._step < total:
                s = self._step
                t = int(schedule[s])
                indices = batch(t, counts[t])
                counts[t] += 1
                self._step = s + 1
                yield [(t, indices)]
        # Only a fully consumed epoch advances; an abandoned iterator leaves the position where
        # the caller stopped, which is what resuming needs.
        if self._epoch == epoch:
            self._epoch = epoch + 1
            self._step = 0


def _normalise(x: object) -> object:
    # States may pass through JSON/torch.save, turning tuples into lists and ints into floats.
    if isinstance(x, tuple | list):
        return [_normalise(v) for v in x]
    return x
