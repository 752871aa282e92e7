"""The one training loop: every method and paradigm differs only in its weighting object.

A run trains a :class:`~pyxtask.models.MultiTaskModel` (shared encoder, one head per task) on
a target task and source tasks. Batches of one task at a time come from a
:class:`~pyxtask.data.MultiTaskBatchSampler`; the task's weight acts as a loss factor (the
paper's protocol) or as the probability of drawing its batch. Methods with task-gradient
weights (TAWT) get probe gradients — a random ``probe_size`` subset per task, eval mode —
through :class:`~pyxtask.gradients.TaskGradients` once per epoch or every k steps.

Everything a run writes goes into its folder: ``config.json``, ``metrics.jsonl``,
``weights.csv``, ``similarity.jsonl``, ``summary.json``, the PNG plots, the best model by the
target's dev metric (``best/``, a :class:`~pyxtask.models.MultiTaskModel` folder) and
``checkpoint.pt``, written atomically every ``checkpoint_every`` steps and at every epoch's
end, from which ``resume=True`` continues a killed run to the same final weights as an
uninterrupted one (bitwise on CPU with the same thread count).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from pyxtask import checkpoint
from pyxtask.config import ConfigError, TrainConfig
from pyxtask.data import LabeledText, LabelMap, TaggedSentence, collate, corpora, tokenize_corpus
from pyxtask.data.tokenization import Encoded, group_by_sentence, words_from_subwords
from pyxtask.gradients import TaskGradients
from pyxtask.metrics import sentence_scores, span_f1, token_accuracy
from pyxtask.models import MultiTaskModel
from pyxtask.weighting import TAWT, SampleSize, TargetOnly, Uniform, Weighting, exact_reference

__all__ = ["RunResult", "TaskData", "Trainer", "evaluate", "load_tasks", "run_experiment"]

_CHECKPOINT = "checkpoint.pt"
_SUMMARY = "summary.json"
_LOGS = ("metrics.jsonl", "weights.csv", "similarity.jsonl")

Example = TaggedSentence | LabeledText


# --------------------------------------------------------------------------------------------
# Data


@dataclass
class TaskData:
    """One task's examples: ``name`` is ``corpus.task``; only the target needs dev and test."""

    name: str
    kind: str
    labels: LabelMap
    train: list[Example]
    dev: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    @property
    def head(self) -> str:
        """The model's head name (heads cannot contain dots)."""
        return self.name.replace(".", "__")


def _labels_of(examples: Sequence[Example]) -> list[str | tuple[str, ...]]:
    return [e.tags if isinstance(e, TaggedSentence) else e.label for e in examples]


def load_tasks(config: TrainConfig) -> list[TaskData]:
    """The target (with dev and test) and the sources, from the named corpora."""
    tasks: list[TaskData] = []
    names = [config.target] + ([] if config.paradigm == "single" else config.sources)
    for i, name in enumerate(names):
        corpus_name, task = name.split(".")
        try:
            corpus = corpora.get_corpus(corpus_name)
        except corpora.CorpusError as exc:
            raise ConfigError(f"task {name!r}: {exc}") from None
        if task not in corpus.tasks:
            raise ConfigError(
                f"task {name!r}: corpus {corpus_name!r} has no task {task!r}; its tasks: "
                f"{', '.join(corpus.tasks)}"
            )
        size = config.target_size if i == 0 else config.source_size
        train: list[Example] = list(
            corpora.load(corpus_name, task, "train", size, config.seed, cache=config.cache)
        )
        dev: list[Example] = []
        test: list[Example] = []
        if i == 0:
            dev = list(
                corpora.load(corpus_name, task, "dev", config.dev_size, 0, cache=config.cache)
            )
            test = list(
                corpora.load(corpus_name, task, "test", config.test_size, 0, cache=config.cache)
            )
        if size is not None and len(train) < size:
            raise ConfigError(
                f"{'target_size' if i == 0 else 'source_size'} = {size} but {name!r} has only "
                f"{len(train)} training sentences"
            )
        kind = corpus.tasks[task]
        labels = LabelMap.from_corpus(
            _labels_of(train + dev + test), name=name.replace(".", "__"), kind=kind
        )
        tasks.append(TaskData(name, kind, labels, train, dev, test))
    return tasks


def _tiny_vocabulary(tasks: Sequence[TaskData], size: int = 4000) -> list[str]:
    """A WordPiece vocabulary: specials, every character (also as ``##c``), frequent words.

    Built by counting, not with ``tokenizers``' WordPiece trainer, whose result changes from
    run to run (hash-map order decides its ties), which would make runs irreproducible.
    """
    from tokenizers import normalizers, pre_tokenizers  # noqa: PLC0415

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for task in tasks:
        for e in task.train:
            text = " ".join(e.words) if isinstance(e, TaggedSentence) else e.text
            counts.update(w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    taken = set(vocab)
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= size:
            break
        if word not in taken:
            vocab.append(word)
            taken.add(word)
    return vocab


def _tiny_encoder(tasks: Sequence[TaskData], config: TrainConfig, folder: Path) -> MultiTaskModel:
    """A small random BERT with a word-and-character vocabulary from the training text."""
    import transformers  # noqa: PLC0415

    vocab_file = folder / "vocab.txt"
    if not vocab_file.exists():  # a resumed run keeps the vocabulary it started with
        folder.mkdir(parents=True, exist_ok=True)
        text = "".join(f"{token}\n" for token in _tiny_vocabulary(tasks))
        checkpoint.write_text(vocab_file, text)
    tokenizer = cast(Any, transformers).BertTokenizerFast.from_pretrained(
        folder, local_files_only=True
    )
    bert = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=max(config.max_length, 64),
    )
    heads = [(t.head, t.labels) for t in tasks]
    return MultiTaskModel.from_config(bert, heads, tokenizer=tokenizer, dropout=config.dropout)


def build_model(tasks: Sequence[TaskData], config: TrainConfig, run_dir: Path) -> MultiTaskModel:
    torch.manual_seed(config.seed)
    heads = [(t.head, t.labels) for t in tasks]
    if config.encoder == "tiny":
        model = _tiny_encoder(tasks, config, run_dir / "tiny-vocab")
    else:
        path = None if config.encoder == "minilm" else config.encoder
        model = MultiTaskModel.from_pretrained(path, heads, dropout=config.dropout)
    if model.tokenizer is None:
        raise ConfigError(f"encoder {config.encoder!r} comes without a tokenizer")
    return model


# --------------------------------------------------------------------------------------------
# Evaluation


def _is_iob2(labels: LabelMap) -> bool:
    return any(lab != "O" for lab in labels) and all(
        lab == "O" or (lab[:2] in ("B-", "I-") and len(lab) > 2) for lab in labels
    )


def metric_name(task: TaskData) -> str:
    """``accuracy`` for tags and sentence labels, ``f1`` (strict IOB2 spans) for BIO tasks."""
    return "f1" if task.kind == "token" and _is_iob2(task.labels) else "accuracy"


@torch.no_grad()
def predict(
    model: MultiTaskModel,
    task: TaskData,
    encoded: Sequence[Encoded],
    *,
    batch_size: int,
    device: torch.device,
) -> list[list[int]] | list[int]:
    """Predicted label ids: per word for token tasks, one per text for sentence tasks."""
    was_training = model.training
    model.eval()
    pad = int(model.tokenizer.pad_token_id)
    rows: list[list[int]] = []
    try:
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start : start + batch_size], pad)
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            with _autocast(device, True):
                logits = model(task.head, ids, mask).logits
            rows.extend(logits.argmax(-1).cpu().tolist())
    finally:
        model.train(was_training)
    if task.kind == "sentence":
        return cast(list[int], rows)
    out: list[list[int]] = []
    first = 0
    for windows in group_by_sentence(encoded):  # a sentence's windows are consecutive
        out.append(words_from_subwords(windows, rows[first : first + len(windows)]))
        first += len(windows)
    return out


def evaluate(
    model: MultiTaskModel,
    task: TaskData,
    examples: Sequence[Example],
    encoded: Sequence[Encoded],
    *,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """The task's metric on ``examples`` (``encoded`` is their tokenization)."""
    predictions = predict(model, task, encoded, batch_size=batch_size, device=device)
    if task.kind == "sentence":
        gold = [cast(LabeledText, e).label for e in examples]
        pred = task.labels.decode_many(cast(list[int], predictions))
        report = sentence_scores(gold, pred, labels=list(task.labels))
        return {"accuracy": report.accuracy, "macro_f1": report.macro_f1}
    gold_tags = [list(cast(TaggedSentence, e).tags) for e in examples]
    pred_tags = [task.labels.decode_many(p) for p in cast(list[list[int]], predictions)]
    if metric_name(task) == "f1":
        spans = span_f1(gold_tags, pred_tags)
        return {"f1": spans.f1, "accuracy": token_accuracy(gold_tags, pred_tags)}
    return {"accuracy": token_accuracy(gold_tags, pred_tags)}


def _autocast(device: torch.device, enabled: bool) -> Any:
    # bf16 autocast on GPUs only: CPU bf16 matmuls are slower than fp32 on most CPUs.
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda"
    )


# --------------------------------------------------------------------------------------------
# The trainer


@dataclass
class Phase:
    """A stretch of training with one objective: its tasks, weighting and length."""

    name: str
    tasks: list[int]
    weighting: Weighting
    epochs: int
    max_steps: int | None = None


def make_weighting(config: TrainConfig, sizes: Sequence[int], c: float) -> Weighting:
    if config.paradigm == "single":
        return TargetOnly(sizes)
    if config.weighting == "tawt":
        t = config.tawt
        return TAWT(
            sizes,
            cast(Any, config.paradigm),
            similarity=cast(Any, t.similarity),
            c=c,
            lr=t.lr,
            probe_size=t.probe_size,
            update_every=t.update_every,
            damping=t.damping,
            cg_max_iter=t.cg_max_iter,
        )
    if config.paradigm == "normalized-joint":
        return Uniform(sizes)
    return SampleSize(sizes, cast(Any, config.paradigm))


class Trainer:
    """One run of ``config`` in ``run_dir``; :meth:`fit` trains, evaluates and writes it all.

    Args:
        config: the run's configuration.
        run_dir: its folder (created). An existing run's folder needs ``resume=True``.
        c: TAWT's constant for this run (the pre-training sweep runs one Trainer per value).
        progress: show tqdm bars.
        tasks: already loaded tasks (to share one load between runs), else loaded here.
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
        if config.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(config.device)

    # -- set-up --------------------------------------------------------------------------------

    def _setup(self) -> None:
        config = self.config
        self.model = build_model(self.tasks, config, self.run_dir).to(self.device).train()
        tokenizer = self.model.tokenizer
        self.pad = int(tokenizer.pad_token_id)

        # Windows of long sentences overlap by 32 sub-words, or a quarter of short windows.
        stride = min(32, (config.max_length - 2) // 4)

        def tok(examples: Sequence[Example]) -> list[Encoded]:
            return tokenize_corpus(
                examples, None, tokenizer, max_length=config.max_length, stride=stride
            )[0]

        self.encoded: list[list[Encoded]] = []
        for task in self.tasks:
            items, _ = tokenize_corpus(
                task.train, task.labels, tokenizer, max_length=config.max_length, stride=stride
            )
            self.encoded.append(items)
        target = self.tasks[0]
        self.dev_encoded = tok(target.dev)
        self.test_encoded = tok(target.test)
        self.sizes = [len(items) for items in self.encoded]
        self.phases = self._phases()

    def _phases(self) -> list[Phase]:
        config = self.config
        T = len(self.tasks)
        if config.paradigm == "pretrain":
            return [
                Phase(
                    "pretrain",
                    list(range(1, T)),
                    make_weighting(config, self.sizes, self.c),
                    config.epochs,
                ),
                Phase("finetune", [0], TargetOnly(self.sizes), config.epochs),
            ]
        tasks = [0] if config.paradigm == "single" else list(range(T))
        weighting = make_weighting(config, self.sizes, self.c)
        return [Phase("train", tasks, weighting, config.epochs, config.total_steps)]

    def _sampler_for(self, phase_index: int, epoch: int) -> Any:
        from pyxtask.data import MultiTaskBatchSampler  # noqa: PLC0415

        config = self.config
        phase = self.phases[phase_index]
        sizes = [self.sizes[t] for t in phase.tasks]
        b = config.batch_size
        seed = config.seed * 1009 + phase_index
        probs: list[float] | None = None
        steps: int | None = None
        if phase.max_steps is not None:
            probs = [1.0 / len(sizes)] * len(sizes)
            steps = math.ceil(phase.max_steps / phase.epochs)
        elif len(sizes) > 1 and (config.weights_as == "sampling" or config.epoch == "target"):
            if config.weights_as == "sampling":
                omega = phase.weighting.omega
                probs = [float(omega[t]) for t in phase.tasks]
            else:
                probs = [n / sum(sizes) for n in sizes]
            total = math.fsum(probs)
            probs = [p / total for p in probs]
            if config.epoch == "target":
                target_batches = math.ceil(sizes[0] / b)
                steps = max(1, math.ceil(target_batches / max(probs[0], 1e-12)))
            else:
                steps = sum(math.ceil(n / b) for n in sizes)
        sampler = MultiTaskBatchSampler(
            sizes,
            b,
            "shuffle",
            seed,
            task_probs=probs,
            steps_per_epoch=steps,
            lengths=self._lengths(phase),
        )
        sampler.set_epoch(epoch)
        return sampler

    def _phase_steps(self, phase_index: int) -> int:
        phase = self.phases[phase_index]
        per_epoch = len(self._sampler_for(phase_index, 0))
        total = per_epoch * phase.epochs
        return total if phase.max_steps is None else min(total, phase.max_steps)

    def _optimizer(self, phase_index: int) -> tuple[torch.optim.Optimizer, Any]:
        config = self.config
        phase = self.phases[phase_index]
        params: list[torch.nn.Parameter] = list(self.model.shared_parameters())
        for t in phase.tasks:
            params.extend(self.model.task_parameters(self.tasks[t].head))
        # BERT's recipe: no weight decay on biases and LayerNorm weights.
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
        )
        total = max(1, self._phase_steps(phase_index))
        warm = int(config.warmup * total)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            return max(0.0, (total - step) / max(1, total - warm))

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    # -- logs ----------------------------------------------------------------------------------

    def _log(self, name: str, record: dict[str, Any] | str) -> None:
        checkpoint.append_line(self.run_dir / name, record)

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

    def _write_weights(self, phase: Phase, row: dict[str, Any]) -> None:
        path = self.run_dir / "weights.csv"
        names = [t.name for t in self.tasks]
        if not path.exists() or path.stat().st_size == 0:
            header = (
                ["update", "epoch", "step"]
                + [f"w:{n}" for n in names]
                + [f"omega:{n}" for n in names]
            )
            self._log("weights.csv", ",".join(header))
        values = [row["update"], row.get("epoch", 0), row.get("step", 0)]
        values += [f"{x:.10g}" for x in row["w"]] + [f"{x:.10g}" for x in row["omega"]]
        self._log("weights.csv", ",".join(str(v) for v in values))

    # -- probes and weight updates ------------------------------------------------------------

    def _probe_losses(self, phase: Phase, update: int) -> list[Tensor | None]:
        """One ``probe_size`` batch per task (eval mode, seeded per update); None where unused."""
        weighting = cast(TAWT, phase.weighting)
        g = torch.Generator().manual_seed(self.config.seed * 7919 + update)
        wanted = set(phase.tasks) | {0}
        losses: list[Tensor | None] = []
        for t, items in enumerate(self.encoded):
            if t not in wanted:
                losses.append(None)
                continue
            k = min(weighting.probe_size, len(items))
            idx = torch.randperm(len(items), generator=g)[:k].tolist()
            losses.append(self._batch_loss(t, idx))
        return losses

    def _batch_loss(self, t: int, indices: Sequence[int]) -> Tensor:
        """Task ``t``'s mean loss on its training examples ``indices`` (fp32)."""
        batch = collate([self.encoded[t][i] for i in indices], self.pad)
        with _autocast(self.device, self.config.bf16):
            out = self.model(
                self.tasks[t].head,
                batch["input_ids"].to(self.device),
                batch["attention_mask"].to(self.device),
                batch["labels"].to(self.device),
            )
        return cast(Tensor, out.loss).float()

    def _exact_reference(
        self, phase: Phase, weighting: TAWT, shared: list[torch.nn.Parameter], epoch: int, step: int
    ) -> Tensor:
        """``x`` of eq. 2.7 on this update's probe batches, and a ``cg`` record in the log."""
        omega = weighting.omega

        def hessian_loss() -> Tensor:
            losses = self._probe_losses(phase, weighting.updates)
            return torch.stack(
                [float(omega[t]) * cast(Tensor, losses[t]) for t in phase.tasks]
            ).sum()

        # Hessian-vector products differentiate attention twice; only the math kernel of
        # scaled_dot_product_attention has a double backward.
        with sdpa_kernel([SDPBackend.MATH]):
            target_loss = cast(Tensor, self._probe_losses(phase, weighting.updates)[0])
            grads = torch.autograd.grad(target_loss, shared, allow_unused=True)
            b = [
                torch.zeros_like(p) if g is None else g for p, g in zip(shared, grads, strict=True)
            ]
            reference, cg = exact_reference(
                hessian_loss,
                shared,
                b,
                damping=weighting.damping,
                max_iter=weighting.cg_max_iter,
                tol=weighting.cg_tol,
            )
        self._log(
            "metrics.jsonl",
            {
                "kind": "cg",
                "epoch": epoch,
                "step": step,
                "iterations": cg.iterations,
                "residual": cg.residual,
                "converged": cg.converged,
            },
        )
        return reference

    def _update_weights(self, phase: Phase, epoch: int, step: int) -> None:
        weighting = phase.weighting
        if not isinstance(weighting, TAWT):
            return
        was_training = self.model.training
        self.model.eval()  # the authors' probes: no dropout
        self.model.zero_grad(set_to_none=True)
        T = len(self.tasks)
        names = [t.name for t in self.tasks]
        mode: Literal["buffer", "streaming"] = (
            "buffer" if self.config.tawt.gradients == "buffer" else "streaming"
        )
        shared = list(self.model.shared_parameters())
        try:
            reference = None
            if weighting.similarity == "exact":
                reference = self._exact_reference(phase, weighting, shared, epoch, step)
            losses = self._probe_losses(phase, weighting.updates)
            with TaskGradients(shared, T, mode=mode, task_names=names) as grads:
                stats = grads.backward(losses, [1.0] * T, reference=reference)
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.train(was_training)
        s = weighting.similarities(stats)
        weighting.update(s, epoch=epoch, step=step)
        self._write_weights(phase, weighting.trajectory[-1])
        cos = stats.cosine_matrix()
        if cos is None:  # streaming: only the target's row and column were measured
            row = stats.reference_cosines() if reference is None else None
            matrix: list[list[float | None]] = [[None] * T for _ in range(T)]
            for t in range(T):
                matrix[t][t] = 1.0 if bool(stats.sq_norms[t] > 0) else 0.0
                if row is not None and bool(stats.measured[t]):
                    matrix[0][t] = matrix[t][0] = float(row[t])
        else:
            matrix = [[float(x) for x in r] for r in cos.tolist()]
        self._log(
            "similarity.jsonl",
            {
                "update": weighting.updates,
                "epoch": epoch,
                "step": step,
                "tasks": names,
                "cosine": matrix,
                "similarity": s.tolist(),
            },
        )

    # -- the loop ------------------------------------------------------------------------------

    def _save_checkpoint(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["model"] = self.model.state_dict()
        state["rng"] = checkpoint.rng_state()
        state["logs"] = self._log_sizes()
        checkpoint.save(state, self.run_dir / _CHECKPOINT)

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train (or continue), pick the best epoch on the target's dev set, test it."""
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / "config.json"
        config_text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
        ckpt_path = self.run_dir / _CHECKPOINT
        summary_path = self.run_dir / _SUMMARY
        if config_path.exists():
            if not resume:
                raise FileExistsError(
                    f"{os.fspath(self.run_dir)!r} already holds a run; resume it "
                    "(pyxtask train --resume) or choose another output folder"
                )
            if config_path.read_text() != config_text:
                raise ConfigError(
                    f"{os.fspath(config_path)} differs from this config; a run resumes only with "
                    "the configuration it was started with"
                )
            if summary_path.exists() and not ckpt_path.exists():
                return cast(dict[str, Any], json.loads(summary_path.read_text()))  # finished
        self._setup()
        state: dict[str, Any] = {
            "phase": 0,
            "epoch": 0,
            "sampler": None,
            "optimizer": None,
            "scheduler": None,
            "weighting": None,
            "global_step": 0,
            "best": None,
            "pending": {},
            "target_seen": 0,
            "elapsed": 0.0,
        }
        if resume and ckpt_path.exists():
            saved = checkpoint.load(ckpt_path)
            self.model.load_state_dict(saved["model"])
            self._truncate_logs(saved["logs"])
            state.update({k: saved[k] for k in state})
            rng = saved["rng"]
        else:
            for name in (*_LOGS, _SUMMARY):
                (self.run_dir / name).unlink(missing_ok=True)
            checkpoint.write_text(config_path, config_text)
            rng = None
        started = time.perf_counter() - float(state["elapsed"])

        for phase_index in range(int(state["phase"]), len(self.phases)):
            phase = self.phases[phase_index]
            optimizer, scheduler = self._optimizer(phase_index)
            fresh = phase_index != state["phase"] or state["optimizer"] is None
            if not fresh:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                phase.weighting.load_state_dict(state["weighting"])
            else:
                state.update(epoch=0, sampler=None, pending={})
                if isinstance(phase.weighting, TAWT) or phase_index == 0:
                    self._write_weights(phase, phase.weighting.trajectory[0])
            if rng is not None:
                checkpoint.set_rng_state(rng)
                rng = None
            phase_steps = self._phase_steps(phase_index)
            done_steps = int(scheduler.last_epoch)
            for epoch in range(int(state["epoch"]), phase.epochs):
                if done_steps >= phase_steps:
                    break
                # The same sampler as the epoch started with (weights that act as sampling
                # probabilities change only between epochs), moved to the saved position.
                sampler = self._sampler_for(phase_index, epoch)
                if state["sampler"] is not None and state["sampler"]["epoch"] == epoch:
                    sampler.load_state_dict(state["sampler"])
                state["sampler"] = None
                pending: dict[int, list[float]] = {int(k): v for k, v in state["pending"].items()}
                factors = phase.weighting.loss_factors() if config.weights_as == "loss" else None
                bar = tqdm(
                    total=min(len(sampler), phase_steps - done_steps + sampler.step),
                    initial=sampler.step,
                    desc=f"{config.method} {phase.name} epoch {epoch + 1}/{phase.epochs}",
                    disable=not self.progress,
                    leave=False,
                )
                for step in sampler:
                    ((sampler_task, indices),) = step
                    t = phase.tasks[sampler_task]
                    factor = 1.0 if factors is None else float(factors[t])
                    loss = self._train_step(t, indices, factor, optimizer, scheduler)
                    done_steps += 1
                    state["global_step"] += 1
                    if t == 0:
                        state["target_seen"] += len(indices)
                    acc = pending.setdefault(t, [0.0, 0])
                    acc[0] += loss
                    acc[1] += 1
                    bar.update(1)
                    bar.set_postfix(task=self.tasks[t].name, loss=f"{loss:.3f}")
                    gs = state["global_step"]
                    if gs % config.log_every == 0:
                        self._flush_losses(pending, epoch, gs, scheduler)
                    every = getattr(phase.weighting, "update_every", None)
                    if every is not None and done_steps % every == 0:
                        self._update_weights(phase, epoch, gs)
                        factors = phase.weighting.loss_factors()
                    last = done_steps >= phase_steps
                    if (
                        gs % config.checkpoint_every == 0
                        and sampler.step < len(sampler)
                        and not last
                    ):
                        state.update(
                            phase=phase_index,
                            epoch=epoch,
                            sampler=sampler.state_dict(),
                            optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(),
                            weighting=phase.weighting.state_dict(),
                            pending=pending,
                            elapsed=time.perf_counter() - started,
                        )
                        self._save_checkpoint(state)
                        state["sampler"] = None
                    if last:
                        break
                bar.close()
                self._flush_losses(pending, epoch, state["global_step"], scheduler)
                if getattr(phase.weighting, "update_every", 1) is None:
                    self._update_weights(phase, epoch, state["global_step"])
                if 0 in phase.tasks:
                    self._eval_dev(state, epoch)
                state.update(
                    phase=phase_index,
                    epoch=epoch + 1,
                    sampler=None,
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    weighting=phase.weighting.state_dict(),
                    pending={},
                    elapsed=time.perf_counter() - started,
                )
                self._save_checkpoint(state)
            state.update(phase=phase_index + 1, optimizer=None, epoch=0)
        return self._finish(state, time.perf_counter() - started)

    def _lengths(self, phase: Phase) -> list[list[int]] | None:
        if not self.config.group_by_length:
            return None
        return [[len(item.input_ids) for item in self.encoded[t]] for t in phase.tasks]

    def _train_step(
        self,
        t: int,
        indices: Sequence[int],
        factor: float,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
    ) -> float:
        task = self.tasks[t]
        loss = self._batch_loss(t, indices)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the training loss of {task.name} is {value} at step "
                f"{int(scheduler.last_epoch) + 1}; lower lr or check the data"
            )
        torch.autograd.backward(loss * factor)
        # The total norm is needed for clipping anyway; a NaN/inf one names the task.
        clip = self.config.clip if self.config.clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"the gradient of {task.name}'s loss has NaN or infinite entries at step "
                f"{int(scheduler.last_epoch) + 1}; lower lr or check the data"
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return value

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

    def _eval_dev(self, state: dict[str, Any], epoch: int) -> None:
        target = self.tasks[0]
        scores = evaluate(
            self.model,
            target,
            target.dev,
            self.dev_encoded,
            batch_size=self.config.eval_batch_size,
            device=self.device,
        )
        main = metric_name(target)
        for metric, value in scores.items():
            self._log(
                "metrics.jsonl",
                {
                    "kind": "eval",
                    "split": "dev",
                    "epoch": epoch,
                    "step": state["global_step"],
                    "task": target.name,
                    "metric": metric,
                    "value": value,
                },
            )
        best = state["best"]
        if best is None or scores[main] > best["value"]:
            state["best"] = {
                "epoch": epoch,
                "step": state["global_step"],
                "value": scores[main],
                "metric": main,
            }
            self.model.save(self.run_dir / "best", overwrite=True)

    def _finish(self, state: dict[str, Any], elapsed: float) -> dict[str, Any]:
        from pyxtask.plots import plot_run  # noqa: PLC0415

        config = self.config
        target = self.tasks[0]
        best = MultiTaskModel.load(self.run_dir / "best").to(self.device)
        test = evaluate(
            best,
            target,
            target.test,
            self.test_encoded,
            batch_size=config.eval_batch_size,
            device=self.device,
        )
        main = metric_name(target)
        weighting = self.phases[0].weighting
        for metric, value in test.items():
            self._log(
                "metrics.jsonl",
                {
                    "kind": "eval",
                    "split": "test",
                    "epoch": state["best"]["epoch"],
                    "step": state["best"]["step"],
                    "task": target.name,
                    "metric": metric,
                    "value": value,
                },
            )
        summary = {
            "method": config.method,
            "paradigm": config.paradigm,
            "weighting": config.weighting,
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
            "c": self.c if isinstance(weighting, TAWT) else None,
            "w": weighting.w.tolist(),
            "omega": weighting.omega.tolist(),
            "weight_updates": weighting.updates,
            "time_s": round(elapsed, 1),
            "best_model": os.fspath(self.run_dir / "best"),
        }
        checkpoint.write_text(self.run_dir / _SUMMARY, json.dumps(summary, indent=2) + "\n")
        plot_run(self.run_dir)
        if not self.keep_checkpoint:
            (self.run_dir / _CHECKPOINT).unlink(missing_ok=True)
        return summary


# --------------------------------------------------------------------------------------------
# Experiments: a run, its baselines, the pre-training sweep


@dataclass
class RunResult:
    """The main run's summary and those of the baselines run beside it."""

    main: dict[str, Any]
    baselines: dict[str, dict[str, Any]]

    def table(self) -> str:
        """The runs side by side, ending with the main run's test gain over each baseline."""
        rows = [self.main, *self.baselines.values()]
        metric = self.main["metric"]
        lines = [f"target {self.main['target']}, {metric} in %:"]
        for row in rows:
            lines.append(
                f"  {row['method']:<24} dev {100 * row['dev']:6.2f}  test {100 * row['test']:6.2f}"
                f"  ({row['steps']} steps, {row['target_examples_seen']} target examples seen, "
                f"{row['train_examples'][row['target']]} target sentences)"
            )
        if self.baselines:
            gains = ", ".join(
                f"{100 * (self.main['test'] - row['test']):+.2f} vs {row['method']}"
                for row in self.baselines.values()
            )
            lines.append(f"{self.main['method']} test {metric}: {gains} points")
        return "\n".join(lines)


def _baseline_config(config: TrainConfig, name: str, steps: int) -> TrainConfig:
    if name == "single":
        return config.replace(paradigm="single", weighting="fixed", compare=[])
    if name == "single-steps":
        return config.replace(paradigm="single", weighting="fixed", total_steps=steps, compare=[])
    return config.replace(
        paradigm=name,
        weighting="fixed",
        compare=[],
        epoch=config.epoch if name != "pretrain" else "stream",
    )


def run_single(
    config: TrainConfig,
    run_dir: Path,
    *,
    resume: bool,
    progress: bool,
    tasks: list[TaskData],
    keep_checkpoint: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """One configuration; the pre-training sweep over c keeps the best on the target dev set."""
    cs = config.c_values() if config.weighting == "tawt" else [1.0]
    if len(cs) == 1:
        return Trainer(
            config,
            run_dir,
            c=cs[0],
            progress=progress,
            tasks=tasks,
            keep_checkpoint=keep_checkpoint,
        ).fit(resume)
    results = []
    for c in cs:
        log(f"{config.method}: c = {c:g}")
        sub = Trainer(
            config,
            run_dir / f"c={c:g}",
            c=c,
            progress=progress,
            tasks=tasks,
            keep_checkpoint=keep_checkpoint,
        )
        results.append(sub.fit(resume))
    best = max(results, key=lambda r: r["dev"])
    summary = dict(
        best, sweep={f"{r['c']:g}": {"dev": r["dev"], "test": r["test"]} for r in results}
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text(run_dir / _SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def run_experiment(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> RunResult:
    """The main run in ``config.output``, each ``compare`` baseline in ``output/compare/NAME``."""
    config.validate()
    out = Path(config.output)
    tasks = load_tasks(config)
    log(
        f"{config.method}: target {config.target} ({len(tasks[0].train)} sentences), sources "
        + ", ".join(f"{t.name} ({len(t.train)})" for t in tasks[1:])
    )
    main = run_single(config, out, resume=resume, progress=progress, tasks=tasks, log=log)
    baselines: dict[str, dict[str, Any]] = {}
    for name in config.compare:
        sub = _baseline_config(config, name, int(main["steps"]))
        log(f"baseline {sub.method}")
        baselines[name] = run_single(
            sub, out / "compare" / name, resume=resume, progress=progress, tasks=tasks, log=log
        )
    result = RunResult(main, baselines)
    checkpoint.write_text(out / "comparison.txt", result.table() + "\n")
    return result
