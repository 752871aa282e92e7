"""The one training loop: every method differs only in its :class:`~pyxtask.methods.Method`.

A run trains a :class:`~pyxtask.models.MultiTaskModel` (shared encoder, one head per task) on
a target task and source tasks. Each optimizer step is the method's step (it leaves the
gradient in ``.grad``), gradient clipping, the optimizer and schedule steps, the method's
``after_update``, logging and checkpointing; each epoch ends with the method's ``epoch_end``
and the target's dev evaluation. The trainer samples what the method asks for (one task's
batch from the stream, every task's batch, or one batch that every task labels).

Everything a run writes goes into its folder: ``config.json``, ``metrics.jsonl``,
``weights.csv``, ``similarity.jsonl``, ``summary.json``, the PNG plots, the best model by the
target's dev metric (``best/``) and ``checkpoint.pt``, written atomically every
``checkpoint_every`` steps and at every epoch's end, from which ``resume=True`` continues a
killed run to the same final weights as an uninterrupted one (bitwise on CPU with the same
thread count).

Under torchrun (``pyxtask.distributed``) every process runs this loop over the same global
steps, each on its slice of every batch; the gradients are summed — by DDP while the step's
last backward runs, for a method that asks for it (``Method.data_parallel``), else after the
method's step (what the method already summed is skipped) — so every process takes the same
optimizer step
and the parameters stay identical (rank 0's are broadcast once, at the start). Rank 0 alone
writes the run's files (logs, plots, ``best/``, checkpoints — which hold nothing per process,
so a run resumes on any number of processes); evaluation is split over the processes and
gathered.
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import math
import os
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from pyxtask import checkpoint, distributed
from pyxtask.config import ConfigError, TrainConfig
from pyxtask.data import MultiTaskBatchSampler, tokenize_corpus
from pyxtask.data.tokenization import Encoded
from pyxtask.evaluation import evaluate, metric_name
from pyxtask.methods import Method, Step, StepContext, StreamMethod, make_method
from pyxtask.models import MultiTaskModel
from pyxtask.tasks import Example, TaskData, build_model, load_tasks
from pyxtask.weighting import TargetOnly

__all__ = ["Phase", "Trainer"]

_CHECKPOINT = "checkpoint.pt"
_SUMMARY = "summary.json"
_LOGS = ("metrics.jsonl", "weights.csv", "similarity.jsonl", "label_transfer.jsonl")


@dataclass
class Phase:
    """A stretch of training with one objective: its tasks, method and length."""

    name: str
    tasks: list[int]
    method: Method
    epochs: int
    max_steps: int | None = None


def split_holdout(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """``(kept, held out)``: a seeded ``fraction`` of the examples held out (at least one)."""
    n = len(examples)
    if n < 2:
        raise ConfigError(f"holding out {fraction:g} of the examples needs at least 2, got {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    out = set(order[: min(n - 1, max(1, round(fraction * n)))])
    return [e for i, e in enumerate(examples) if i not in out], [examples[i] for i in sorted(out)]


def _same_run(saved: str, current: str) -> bool:
    """Whether two ``config.json`` texts describe the same run. The output folder is not part
    of it (a run folder that was moved or copied resumes where it is now), nor the processes'
    timeout."""
    try:
        a, b = json.loads(saved), json.loads(current)
    except json.JSONDecodeError:
        return False
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    for config in (a, b):
        config.pop("output", None)
        # How long to wait for other processes is not part of the run either.
        if isinstance(config.get("distributed"), dict):
            config["distributed"].pop("timeout", None)
    return bool(a == b)


class Trainer:
    """One run of ``config`` in ``run_dir``; :meth:`fit` trains, evaluates and writes it all.

    Args:
        config: the run's configuration.
        run_dir: its folder (created). An existing run's folder needs ``resume=True``.
        c: TAWT's constant for this run (the pre-training sweep runs one Trainer per value).
        progress: show tqdm bars.
        tasks: already loaded tasks (to share one load between runs), else loaded here.
        keep_checkpoint: keep ``checkpoint.pt`` after the run finished.
        method: the method object to train with, instead of the one ``config.method`` names.
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | os.PathLike[str],
        *,
        c: float | None = None,
        progress: bool = True,
        tasks: list[TaskData] | None = None,
        keep_checkpoint: bool = False,
        method: Method | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.run_dir = Path(run_dir)
        self.c = config.c_values()[0] if c is None else float(c)
        self.progress = progress
        self.keep_checkpoint = keep_checkpoint
        self.tasks = tasks if tasks is not None else load_tasks(config)
        if config.paradigm == "single":
            self.tasks = self.tasks[:1]
        self.method = method if method is not None else make_method(config, self.c)
        self.dist = distributed.from_environment(
            statistics=config.distributed.statistics,
            timeout_s=config.distributed.timeout,
            device=config.device,
        )
        if config.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(config.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)  # one GPU per process

    # -- set-up --------------------------------------------------------------------------------

    def _setup(self) -> None:
        config = self.config
        self.model = build_model(self.tasks, config, self.run_dir).to(self.device).train()
        tokenizer = self.model.tokenizer
        # Windows of long sentences overlap by 32 sub-words, or a quarter of short windows.
        stride = min(32, (config.max_length - 2) // 4)

        def tok(examples: Sequence[Example], task: TaskData | None = None) -> list[Encoded]:
            labels = None if task is None else task.labels
            return tokenize_corpus(
                examples, labels, tokenizer, max_length=config.max_length, stride=stride
            )[0]

        holdout = self.method.holdout
        encoded, heldout = [], []
        for t, task in enumerate(self.tasks):
            train = task.train
            if holdout > 0 and t == 0 and self.method.target_holdout == "dev":
                if not task.dev:
                    raise ConfigError(f"{task.name} has no dev split to use as its query set")
                heldout.append(tok(task.dev, task))
            elif holdout > 0:
                train, query = split_holdout(train, holdout, config.seed * 31 + t)
                heldout.append(tok(query, task))
            encoded.append(tok(train, task))
        self.encoded = encoded
        self.dev_encoded = tok(self.tasks[0].dev)
        self.test_encoded = tok(self.tasks[0].test)
        self.sizes = [len(items) for items in encoded]
        self.ctx = StepContext(
            self.model,
            self.tasks,
            encoded,
            device=self.device,
            bf16=config.bf16,
            seed=config.seed,
            batch_size=config.batch_size,
            heldout=heldout if holdout > 0 else None,
            log=self._log,
            save=self._save_file,
            distributed=self.dist,
        )
        self.phases = self._phases()
        for i, phase in enumerate(self.phases):
            # Read on demand: a stream sampler's length may depend on the bound weights.
            self.ctx.steps_per_epoch = functools.partial(self._steps_per_epoch, i, 0)
            phase.method.bind(self.ctx)

    def _phases(self) -> list[Phase]:
        config = self.config
        T = len(self.tasks)
        if config.paradigm == "pretrain":
            finetune = StreamMethod(TargetOnly)
            return [
                Phase("pretrain", list(range(1, T)), self.method, config.epochs),
                Phase("finetune", [0], finetune, config.epochs),
            ]
        tasks = [0] if config.paradigm == "single" else list(range(T))
        return [Phase("train", tasks, self.method, config.epochs, config.total_steps)]

    def _sampler_for(self, phase_index: int, epoch: int) -> MultiTaskBatchSampler:
        config = self.config
        phase = self.phases[phase_index]
        sizes = [self.sizes[t] for t in phase.tasks]
        b = config.batch_size
        seed = config.seed * 1009 + phase_index
        sampling = phase.method.sampling
        lengths = self._lengths(phase)
        if sampling == "shared":
            rows = self.ctx.aligned()
            lengths = None if lengths is None else [[lengths[0][r[0]] for r in rows]]
            sampler = MultiTaskBatchSampler([len(rows)], b, "shuffle", seed, lengths=lengths)
        elif sampling == "all":
            # An epoch is one pass over the target, or over the largest task.
            anchor = 0 if config.epoch == "target" else sizes.index(max(sizes))
            sampler = MultiTaskBatchSampler(
                sizes, b, "all", seed, epoch_task=anchor, lengths=lengths
            )
        else:
            sampler = self._stream_sampler(phase, sizes, seed, lengths)
        sampler.set_epoch(epoch)
        return sampler

    def _stream_sampler(
        self, phase: Phase, sizes: list[int], seed: int, lengths: list[list[int]] | None
    ) -> MultiTaskBatchSampler:
        config = self.config
        b = config.batch_size
        probs: list[float] | None = None
        steps: int | None = None
        if phase.max_steps is not None:
            probs = [1.0 / len(sizes)] * len(sizes)
            steps = math.ceil(phase.max_steps / phase.epochs)
        elif len(sizes) > 1 and (config.weights_as == "sampling" or config.epoch == "target"):
            chosen = phase.method.task_probabilities()
            if chosen is not None:
                probs = [chosen[t] for t in phase.tasks]
            else:
                probs = [n / sum(sizes) for n in sizes]
            total = math.fsum(probs)
            probs = [p / total for p in probs]
            if config.epoch == "target":
                target_batches = math.ceil(sizes[0] / b)
                steps = max(1, math.ceil(target_batches / max(probs[0], 1e-12)))
            else:
                steps = sum(math.ceil(n / b) for n in sizes)
        return MultiTaskBatchSampler(
            sizes, b, "shuffle", seed, task_probs=probs, steps_per_epoch=steps, lengths=lengths
        )

    def _lengths(self, phase: Phase) -> list[list[int]] | None:
        if not self.config.group_by_length:
            return None
        return [[len(item.input_ids) for item in self.encoded[t]] for t in phase.tasks]

    def _steps_per_epoch(self, phase_index: int, epoch: int) -> int:
        """Optimizer steps of an epoch (``accumulate`` sampler steps make one)."""
        return math.ceil(len(self._sampler_for(phase_index, epoch)) / self.config.accumulate)

    def _phase_steps(self, phase_index: int) -> int:
        phase = self.phases[phase_index]
        total = self._steps_per_epoch(phase_index, 0) * phase.epochs
        return total if phase.max_steps is None else min(total, phase.max_steps)

    def _optimizer(self, phase_index: int) -> tuple[torch.optim.Optimizer, Any]:
        config = self.config
        phase = self.phases[phase_index]
        params: list[torch.nn.Parameter] = list(self.model.shared_parameters())
        for t in phase.tasks:
            params.extend(self.model.task_parameters(self.tasks[t].head))
        # BERT's recipe: no weight decay on biases and LayerNorm weights.
        groups: list[dict[str, Any]] = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self._planned_steps = max(1, self._phase_steps(phase_index))
        warm = int(config.warmup * self._planned_steps)

        decay = config.lr_schedule == "linear"

        def schedule(step: int) -> float:
            # Linear decay to the planned end, re-planned at each epoch's start (with
            # weights as sampling probabilities, later epochs can be shorter).
            total = self._planned_steps
            if step < warm:
                return (step + 1) / (warm + 1)
            return max(0.0, (total - step) / max(1, total - warm)) if decay else 1.0

        lambdas: list[Any] = [schedule, schedule]
        own = phase.method.parameters()
        if own:  # the method's own parameters: their own rate, no decay, no schedule
            groups.append({"params": own, "weight_decay": 0.0, "lr": phase.method.lr})
            lambdas.append(lambda step: 1.0)
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    # -- logs ----------------------------------------------------------------------------------

    def _plot_epoch(self) -> None:
        """Redraw the per-epoch plots; a plot that cannot be drawn is a warning, never the end
        of a training run (the logs it is drawn from are kept)."""
        from pyxtask.plots import plot_epoch  # noqa: PLC0415 -- matplotlib is slow to load

        if not self.dist.is_main:
            return
        try:
            plot_epoch(self.run_dir)
        except Exception as exc:
            warnings.warn(f"{self.run_dir}: a plot could not be drawn: {exc}", stacklevel=2)

    def _save_file(self, name: str, obj: Any) -> None:
        if self.dist.is_main:
            checkpoint.save(obj, self.run_dir / name)

    def _log(self, name: str, record: dict[str, Any] | str) -> None:
        if not self.dist.is_main:
            return
        path = self.run_dir / name
        if name == "weights.csv" and (not path.exists() or path.stat().st_size == 0):
            names = [t.name for t in self.tasks]
            header = ["update", "epoch", "step"] + [f"w:{n}" for n in names]
            checkpoint.append_line(path, ",".join(header + [f"omega:{n}" for n in names]))
        checkpoint.append_line(path, record)

    def _log_sizes(self) -> dict[str, int]:
        return {
            n: (self.run_dir / n).stat().st_size if (self.run_dir / n).exists() else 0
            for n in _LOGS
        }

    def _truncate_logs(self, sizes: dict[str, int]) -> None:
        for name in _LOGS:
            path = self.run_dir / name
            if path.exists():
                with open(path, "r+b") as f:
                    f.truncate(sizes.get(name, 0))

    def _flush_losses(
        self, pending: dict[int, list[float]], epoch: int, step: int, scheduler: Any
    ) -> None:
        lr = float(scheduler.get_last_lr()[0])
        for t in sorted(pending):
            total, count = pending[t]
            if count:
                self._log(
                    "metrics.jsonl",
                    {
                        "kind": "train",
                        "epoch": epoch,
                        "step": step,
                        "task": self.tasks[t].name,
                        "loss": total / count,
                        "steps": int(count),
                        "lr": lr,
                    },
                )
        pending.clear()

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train (or continue), pick the best epoch on the target's dev set, test it."""
        finished = self._open(resume)
        self.dist.barrier()  # every process has read the folder before rank 0 writes to it
        if finished is not None:
            return finished
        self._setup()
        state = self._initial_state(resume)
        if self.dist.enabled:  # whatever each process built or loaded, rank 0's values
            self.dist.broadcast_tensors_(self._synced_tensors())
        self._sent_at_start = self.dist.bytes_sent()
        self._steps_run = 0
        started = time.perf_counter() - float(state["elapsed"])
        for phase_index in range(int(state["phase"]), len(self.phases)):
            optimizer, scheduler = self._start_phase(phase_index, state)
            phase = self.phases[phase_index]
            for epoch in range(int(state["epoch"]), phase.epochs):
                if self.ctx.phase_step >= self._planned_steps:
                    break
                self.ctx.epoch = epoch
                self._epoch(phase_index, epoch, state, optimizer, scheduler, started)
                phase.method.epoch_end(self.ctx, epoch)
                self._check_processes_agree(phase)
                self._plot_epoch()
                if 0 in phase.tasks:
                    self._eval_dev(state, epoch)
                state.update(epoch=epoch + 1, sampler=None, pending={})
                self._save_checkpoint(state, phase_index, optimizer, scheduler, started)
            state.update(phase=phase_index + 1, optimizer=None, epoch=0)
        self._data_parallel(False)
        return self._finish(state, time.perf_counter() - started)

    def _epoch(  # noqa: PLR0917
        self,
        phase_index: int,
        epoch: int,
        state: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        started: float,
    ) -> None:
        """One epoch's optimizer steps (or the rest of a resumed one)."""
        config, ctx, phase = self.config, self.ctx, self.phases[phase_index]
        # The same sampler as the epoch started with (weights that act as sampling
        # probabilities change only between epochs), moved to the saved position.
        sampler = self._sampler_for(phase_index, epoch)
        if state["sampler"] is not None and state["sampler"]["epoch"] == epoch:
            sampler.load_state_dict(state["sampler"])
        state["sampler"] = None
        pending: dict[int, list[float]] = {int(k): v for k, v in state["pending"].items()}
        m = config.accumulate
        per_epoch = math.ceil(len(sampler) / m)
        planned = ctx.phase_step - sampler.step // m + (phase.epochs - epoch) * per_epoch
        self._planned_steps = planned if phase.max_steps is None else min(planned, phase.max_steps)
        phase_steps = self._planned_steps
        bar = tqdm(
            total=min(
                math.ceil(len(sampler) / m), phase_steps - ctx.phase_step + sampler.step // m
            ),
            initial=sampler.step // m,
            desc=f"{config.label} {phase.name} epoch {epoch + 1}/{phase.epochs}",
            # None: quiet when not a terminal; under torchrun only rank 0 shows a bar.
            disable=None if self.progress and self.dist.is_main else True,
            leave=False,
        )
        steps = iter(sampler)
        while micro := [self._as_global(phase, s) for s in itertools.islice(steps, m)]:
            losses = self._step(phase, micro, optimizer, scheduler)
            ctx.phase_step += 1
            ctx.global_step = state["global_step"] = state["global_step"] + 1
            state["target_seen"] += sum(len(idx) for s in micro for t, idx in s if t == 0)
            for t, loss in losses.items():
                acc = pending.setdefault(t, [0.0, 0])
                acc[0] += loss
                acc[1] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses.values()) / max(1, len(losses)):.3f}")
            gs = ctx.global_step
            if gs % config.log_every == 0:
                self._flush_losses(pending, epoch, gs, scheduler)
            phase.method.after_update(ctx)
            optimizer.zero_grad(set_to_none=True)
            last = ctx.phase_step >= phase_steps
            if gs % config.checkpoint_every == 0 and sampler.step < len(sampler) and not last:
                state.update(epoch=epoch, sampler=sampler.state_dict(), pending=pending)
                self._save_checkpoint(state, phase_index, optimizer, scheduler, started)
                state["sampler"] = None
            if last:
                break
        bar.close()
        self._flush_losses(pending, epoch, state["global_step"], scheduler)

    def _as_global(self, phase: Phase, step: Step) -> Step:
        if phase.method.sampling == "shared":
            return step  # rows of the aligned examples, read by the method
        return [(phase.tasks[i], list(indices)) for i, indices in step]

    def _step(
        self,
        phase: Phase,
        micro: list[Step],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
    ) -> dict[int, float]:
        """The method's step, clipping, the optimizer and the schedule."""
        self.dist.begin_step()
        losses = phase.method.step(self.ctx, micro)
        if self.dist.enabled:  # the gradients DDP did not sum (all, if the method has no DDP)
            self.dist.sync_gradients([p for g in optimizer.param_groups for p in g["params"]])
        self._steps_run += 1
        # The total norm is needed for clipping anyway; a NaN/inf one names the tasks.
        clip = self.config.clip if self.config.clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            names = ", ".join(self.tasks[t].name for t in sorted(losses))
            raise FloatingPointError(
                f"the gradient of {names}'s loss has NaN or infinite entries at step "
                f"{int(scheduler.last_epoch) + 1}; lower lr or check the data"
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return losses

    # -- starting, resuming, saving -------------------------------------------------------------

    def _open(self, resume: bool) -> dict[str, Any] | None:
        """Check the folder; the summary of an already finished run, else None."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / "config.json"
        self._config_text = json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n"
        if not config_path.exists():
            return None
        if not resume:
            raise FileExistsError(
                f"{os.fspath(self.run_dir)!r} already holds a run; resume it "
                "(pyxtask train --resume) or choose another output folder"
            )
        if not _same_run(config_path.read_text(), self._config_text):
            raise ConfigError(
                f"{os.fspath(config_path)} differs from this config; a run resumes only with "
                "the configuration it was started with"
            )
        summary_path = self.run_dir / _SUMMARY
        if summary_path.exists() and not (self.run_dir / _CHECKPOINT).exists():
            return cast(dict[str, Any], json.loads(summary_path.read_text()))
        return None

    def _initial_state(self, resume: bool) -> dict[str, Any]:
        state: dict[str, Any] = {
            "phase": 0,
            "epoch": 0,
            "sampler": None,
            "optimizer": None,
            "scheduler": None,
            "method": None,
            "global_step": 0,
            "best": None,
            "pending": {},
            "target_seen": 0,
            "elapsed": 0.0,
            "rng": None,
        }
        ckpt_path = self.run_dir / _CHECKPOINT
        if resume and ckpt_path.exists():
            # Everything is checked before the logs are cut back: a checkpoint that cannot be
            # resumed from leaves the folder as it was.
            saved = checkpoint.load(ckpt_path, keys=[*state, "model", "logs"])
            self._load_model_state(ckpt_path, saved["model"])
            state.update({k: saved[k] for k in state})
            if self.dist.is_main:
                self._truncate_logs(saved["logs"])
                # A moved or copied run says where it is now.
                checkpoint.write_text(self.run_dir / "config.json", self._config_text)
        elif self.dist.is_main:
            for name in (*_LOGS, _SUMMARY):
                (self.run_dir / name).unlink(missing_ok=True)
            checkpoint.write_text(self.run_dir / "config.json", self._config_text)
        self.ctx.global_step = int(state["global_step"])
        return state

    def _load_model_state(self, path: Path, weights: Any) -> None:
        try:
            self.model.load_state_dict(weights)
        except (RuntimeError, TypeError, AttributeError) as exc:
            # torch's message: a header line ("Error(s) in loading ...:"), then what differs.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [repr(exc)]
            reason = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
            if len(reason) > 120:
                reason = reason[:117] + "..."
            raise checkpoint.CheckpointError(
                f"{os.fspath(path)}: its model does not fit this run's ({reason}); "
                f"{checkpoint.REMEDY}"
            ) from exc

    def _start_phase(
        self, phase_index: int, state: dict[str, Any]
    ) -> tuple[torch.optim.Optimizer, Any]:
        """The phase's optimizer and schedule, fresh or as the checkpoint left them."""
        phase, ctx = self.phases[phase_index], self.ctx
        ctx.phase_tasks = phase.tasks
        self._data_parallel(phase.method.data_parallel)
        optimizer, scheduler = self._optimizer(phase_index)
        if phase_index == state["phase"] and state["optimizer"] is not None:
            phase.method.load_state_dict(state["method"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        else:
            state.update(epoch=0, sampler=None, pending={})
            ctx.epoch = 0
            if phase.method.adaptive or phase_index == 0:
                phase.method.record(ctx)
        if state["rng"] is not None:
            checkpoint.set_rng_state(state["rng"])
            state["rng"] = None
        if self.dist.rank > 0:
            # Rank 0's stream is the one a checkpoint keeps; the others draw their own dropout
            # masks from (seed, rank, step), so a resumed run draws them again the same way.
            torch.manual_seed(self.config.seed * 1_000_003 + self.dist.rank * 7919 +
                              int(state["global_step"]))  # fmt: skip
        ctx.phase_step = int(scheduler.last_epoch)
        return optimizer, scheduler

    def _save_checkpoint(
        self,
        state: dict[str, Any],
        phase_index: int,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        started: float,
    ) -> None:
        if not self.dist.is_main:
            return
        saved = dict(state)
        saved.update(
            phase=phase_index,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            method=self.phases[phase_index].method.state_dict(),
            elapsed=time.perf_counter() - started,
            model=self.model.state_dict(),
            rng=checkpoint.rng_state(),
            logs=self._log_sizes(),
        )
        checkpoint.save(saved, self.run_dir / _CHECKPOINT)

    # -- evaluation and the summary -------------------------------------------------------------

    def _eval_dev(self, state: dict[str, Any], epoch: int) -> None:
        target = self.tasks[0]
        scores = evaluate(
            self.model,
            target,
            target.dev,
            self.dev_encoded,
            batch_size=self.config.eval_batch_size,
            device=self.device,
            distributed=self.dist,
        )
        main = metric_name(target)
        self._log_scores("dev", epoch, state["global_step"], scores)
        best = state["best"]
        if best is None or scores[main] > best["value"]:
            state["best"] = {
                "epoch": epoch,
                "step": state["global_step"],
                "value": scores[main],
                "metric": main,
            }
            if self.dist.is_main:
                self.model.save(self.run_dir / "best", overwrite=True)

    def _log_scores(self, split: str, epoch: int, step: int, scores: dict[str, float]) -> None:
        for metric, value in scores.items():
            record = {"kind": "eval", "split": split, "epoch": epoch, "step": step}
            record.update(task=self.tasks[0].name, metric=metric, value=value)
            self._log("metrics.jsonl", record)

    def _finish(self, state: dict[str, Any], elapsed: float) -> dict[str, Any]:
        from pyxtask.plots import plot_run  # noqa: PLC0415

        config = self.config
        target = self.tasks[0]
        self.dist.barrier()  # rank 0 has written best/
        best = MultiTaskModel.load(self.run_dir / "best").to(self.device)
        test = evaluate(
            best,
            target,
            target.test,
            self.test_encoded,
            batch_size=config.eval_batch_size,
            device=self.device,
            distributed=self.dist,
        )
        main = metric_name(target)
        self._log_scores("test", state["best"]["epoch"], state["best"]["step"], test)
        method = self.phases[0].method
        summary = {
            "method": config.label,
            "method_name": method.name,
            "sampling": method.sampling,
            "paradigm": config.paradigm,
            "weights_as": config.weights_as,
            "epoch_definition": config.epoch,
            "seed": config.seed,
            "encoder": config.encoder,
            "target": target.name,
            "target_head": target.head,
            "sources": [t.name for t in self.tasks[1:]],
            "train_examples": {t.name: n for t, n in zip(self.tasks, self.sizes, strict=True)},
            "metric": main,
            "dev": state["best"]["value"],
            "test": test[main],
            "test_scores": test,
            "best_epoch": state["best"]["epoch"],
            "steps": state["global_step"],
            "target_examples_seen": state["target_seen"],
            "c": None,
            **method.summary(),
            "time_s": round(elapsed, 1),
            "best_model": os.fspath(self.run_dir / "best"),
        }
        if self.dist.enabled:
            summary["distributed"] = self._distributed_summary()
        for phase in self.phases:
            phase.method.close()
        if self.dist.is_main:
            checkpoint.write_text(self.run_dir / _SUMMARY, json.dumps(summary, indent=2) + "\n")
            plot_run(self.run_dir)
            if not self.keep_checkpoint:
                (self.run_dir / _CHECKPOINT).unlink(missing_ok=True)
        self.dist.barrier()  # nobody leaves (and reads the folder) before rank 0 is done
        return summary

    # -- processes ------------------------------------------------------------------------------

    def _data_parallel(self, wanted: bool) -> None:
        """Put the model in DDP for a method that wants it (several processes), or take it
        out: a phase's reducer must not see the next phase's passes (its hooks stay on the
        parameters until it is collected)."""
        if self.ctx.data_parallel is not None:
            self.ctx.data_parallel = None
            gc.collect()
        if wanted and self.dist.enabled:
            self.ctx.data_parallel = self.dist.data_parallel(self.model)

    def _synced_tensors(self) -> list[torch.Tensor]:
        """What must be equal on every process: the model's parameters and buffers and every
        phase's method parameters."""
        tensors = list(self.model.state_dict().values())
        for phase in self.phases:
            tensors += [p.data for p in phase.method.parameters()]
        return tensors

    def _check_processes_agree(self, phase: Phase) -> None:
        """Every process must hold the same weights and parameters (computed redundantly from
        the same global statistics): a cheap check at each epoch's end, an error if not."""
        if not self.dist.enabled:
            return
        w, omega = phase.method.weights()
        digest = torch.stack(
            [p.detach().double().sum() for p in self.model.parameters()]
            + [p.detach().double().sum() for p in phase.method.parameters()]
        ).cpu()
        self.dist.check_same(torch.cat([w.double().cpu(), omega.double().cpu()]), "task weights")
        self.dist.check_same(digest, "the parameters' sums")

    def _distributed_summary(self) -> dict[str, Any]:
        """The processes and what this one sent per optimizer step, by kind."""
        steps = max(1, self._steps_run)
        sent = self.dist.bytes_sent()
        return {
            "processes": self.dist.world_size,
            "backend": self.dist.backend,
            "statistics": self.dist.statistics,
            "steps_here": self._steps_run,
            # Per phase: the gradients summed by DDP during the backward (else after the step).
            "data_parallel": {phase.name: phase.method.data_parallel for phase in self.phases},
            "bytes_per_step": {k: (sent[k] - self._sent_at_start.get(k, 0)) / steps for k in sent},
        }
