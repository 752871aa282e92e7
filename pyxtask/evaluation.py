"""Predictions and metrics of a task's model on its examples (used by training and export).

Under torchrun (``distributed``) every process predicts its slice of the items
(``encoded[rank::world_size]``) and the slices are gathered, so every process holds all the
predictions, in order, and computes the same metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch

from pyxtask.data import LabeledText, LabelMap, TaggedSentence, collate
from pyxtask.data.tokenization import Encoded, group_by_sentence, words_from_subwords
from pyxtask.distributed import Distributed
from pyxtask.metrics import sentence_scores, span_f1, token_accuracy
from pyxtask.models import MultiTaskModel
from pyxtask.tasks import Example, TaskData

__all__ = ["autocast", "evaluate", "metric_name", "predict"]


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
    distributed: Distributed | None = None,
) -> list[list[int]] | list[int]:
    """Predicted label ids: per word for token tasks, one per text for sentence tasks."""
    if distributed is not None and distributed.enabled:
        mine = _rows(model, task, distributed.shard(encoded), batch_size, device)
        every = distributed.all_gather_object(mine)
        rows: list[Any] = [None] * len(encoded)
        for rank, part in enumerate(every):
            rows[rank :: distributed.world_size] = part
    else:
        rows = _rows(model, task, encoded, batch_size, device)
    if task.kind == "sentence":
        return cast(list[int], rows)
    out: list[list[int]] = []
    first = 0
    for windows in group_by_sentence(encoded):  # a sentence's windows are consecutive
        out.append(words_from_subwords(windows, rows[first : first + len(windows)]))
        first += len(windows)
    return out


@torch.no_grad()
def _rows(
    model: MultiTaskModel,
    task: TaskData,
    encoded: Sequence[Encoded],
    batch_size: int,
    device: torch.device,
) -> list[Any]:
    """The predicted ids of every item: a list per token item, an id per sentence item."""
    was_training = model.training
    model.eval()
    pad = int(model.tokenizer.pad_token_id)
    rows: list[Any] = []
    try:
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start : start + batch_size], pad)
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            with autocast(device, True):
                logits = model(task.head, ids, mask).logits
            rows.extend(logits.argmax(-1).cpu().tolist())
    finally:
        model.train(was_training)
    return rows


def evaluate(
    model: MultiTaskModel,
    task: TaskData,
    examples: Sequence[Example],
    encoded: Sequence[Encoded],
    *,
    batch_size: int,
    device: torch.device,
    distributed: Distributed | None = None,
) -> dict[str, float]:
    """The task's metric on ``examples`` (``encoded`` is their tokenization)."""
    predictions = predict(
        model, task, encoded, batch_size=batch_size, device=device, distributed=distributed
    )
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


def autocast(device: torch.device, enabled: bool) -> Any:
    # bf16 autocast on GPUs only: CPU bf16 matmuls are slower than fp32 on most CPUs.
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda"
    )
