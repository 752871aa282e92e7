"""Evaluation metrics over decoded label strings (no torch needed).

* :func:`token_accuracy`: the fraction of tokens tagged right;
* :func:`span_f1`: strict IOB2 span precision/recall/F1 (through ``seqeval``), micro and per
  entity type;
* :func:`sentence_scores`: accuracy, macro-F1 and per-label scores of a sentence task;
* :func:`tagging_report`: token accuracy plus, for BIO tasks, the span report, with a text
  table (:meth:`TaggingReport.format`).

Every report is a frozen dataclass with ``to_dict()`` (plain JSON types) for metrics.jsonl.
Positions with no label (``LabelMap.ignore_index``) must be dropped before decoding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from seqeval.metrics import classification_report, f1_score
from seqeval.scheme import IOB2, Entities

__all__ = [
    "LabelScores",
    "SentenceReport",
    "SpanReport",
    "TaggingReport",
    "sentence_scores",
    "span_f1",
    "tagging_report",
    "token_accuracy",
]


@dataclass(frozen=True)
class LabelScores:
    """Precision, recall and F1 of one label (or entity type); ``support`` is the gold count."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "support": self.support,
        }


def _rows_dict(rows: Sequence[LabelScores]) -> dict[str, dict[str, Any]]:
    return {row.label: row.to_dict() for row in rows}


@dataclass(frozen=True)
class SpanReport:
    """Strict IOB2 span scores: micro precision/recall/F1 and one row per entity type.

    ``n_gold``/``n_pred`` count the spans. When neither gold nor prediction has a span, the
    prediction is perfect and precision = recall = F1 = 1 (``per_type`` is then empty).
    """

    precision: float
    recall: float
    f1: float
    macro_f1: float
    n_gold: int
    n_pred: int
    per_type: tuple[LabelScores, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "macro_f1": self.macro_f1,
            "n_gold": self.n_gold,
            "n_pred": self.n_pred,
            "per_type": _rows_dict(self.per_type),
        }


@dataclass(frozen=True)
class SentenceReport:
    """Accuracy, macro-F1 and per-label scores of a sentence (one label per example) task."""

    accuracy: float
    macro_f1: float
    n_examples: int
    per_label: tuple[LabelScores, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "n_examples": self.n_examples,
            "per_label": _rows_dict(self.per_label),
        }


@dataclass(frozen=True)
class TaggingReport:
    """Scores of a token task: token accuracy, per-tag token scores and (BIO) span scores."""

    token_accuracy: float
    n_sentences: int
    n_tokens: int
    per_tag: tuple[LabelScores, ...]
    spans: SpanReport | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "token_accuracy": self.token_accuracy,
            "n_sentences": self.n_sentences,
            "n_tokens": self.n_tokens,
            "per_tag": _rows_dict(self.per_tag),
            "spans": None if self.spans is None else self.spans.to_dict(),
        }

    def format(self) -> str:
        """A text table: one row per entity type (BIO) or per tag, then the totals."""
        lines = [
            f"token accuracy {self.token_accuracy:.4f} "
            f"({self.n_tokens} tokens, {self.n_sentences} sentences)"
        ]
        if self.spans is not None:
            rows = self.spans.per_type
            head = "type"
            total = ("micro", self.spans.precision, self.spans.recall, self.spans.f1)
            total_support = self.spans.n_gold
            macro = self.spans.macro_f1
        else:
            rows = self.per_tag
            head = "tag"
            total = None
            total_support = self.n_tokens
            macro = _mean([row.f1 for row in rows])
        width = max([len(head), len("micro"), len("macro")] + [len(r.label) for r in rows])
        lines.append(f"{head:<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>7}")
        lines.extend(
            f"{r.label:<{width}}  {r.precision:>9.4f}  {r.recall:>9.4f}  {r.f1:>9.4f}  "
            f"{r.support:>7d}"
            for r in rows
        )
        if total is not None:
            label, p, r, f = total
            lines.append(f"{label:<{width}}  {p:>9.4f}  {r:>9.4f}  {f:>9.4f}  {total_support:>7d}")
        lines.append(f"{'macro':<{width}}  {'':>9}  {'':>9}  {macro:>9.4f}  {total_support:>7d}")
        return "\n".join(lines)


# -- helpers ----------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _check_pairs(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> int:
    """Check the shapes agree; return the number of tokens."""
    if isinstance(gold, str) or isinstance(pred, str):
        raise TypeError("gold and pred must be sequences of label sequences, not strings")
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
    n_tokens = 0
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if isinstance(g, str) or isinstance(p, str):
            raise TypeError(f"sentence {i}: expected a sequence of labels, got a string")
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: gold has {len(g)} tokens but pred has {len(p)}")
        n_tokens += len(g)
    return n_tokens


def _per_label(
    gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]
) -> tuple[LabelScores, ...]:
    """Per-label precision/recall/F1/support with numpy (precision etc. 0 when undefined)."""
    index = {label: i for i, label in enumerate(labels)}
    g = np.fromiter((index[x] for x in gold), dtype=np.int64, count=len(gold))
    p = np.fromiter((index[x] for x in pred), dtype=np.int64, count=len(pred))
    k = len(labels)
    tp = np.bincount(g[g == p], minlength=k).astype(np.float64)
    n_gold = np.bincount(g, minlength=k)
    n_pred = np.bincount(p, minlength=k)
    precision = np.divide(tp, n_pred, out=np.zeros(k), where=n_pred > 0)
    recall = np.divide(tp, n_gold, out=np.zeros(k), where=n_gold > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    return tuple(
        LabelScores(
            label=label,
            precision=float(precision[i]),
            recall=float(recall[i]),
            f1=float(f1[i]),
            support=int(n_gold[i]),
        )
        for i, label in enumerate(labels)
    )


# -- metrics ----------------------------------------------------------------------------------


def token_accuracy(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> float:
    """The fraction of tokens whose predicted label equals the gold one.

    Raises ``ValueError`` if the sentence counts or a sentence's lengths differ (naming the
    sentence index), or if there are no tokens at all.
    """
    n_tokens = _check_pairs(gold, pred)
    if n_tokens == 0:
        raise ValueError("token_accuracy of no tokens is undefined")
    right = sum(a == b for g, p in zip(gold, pred, strict=True) for a, b in zip(g, p, strict=True))
    return right / n_tokens


def _check_iob2(sentences: Sequence[Sequence[str]], which: str) -> None:
    for i, sentence in enumerate(sentences):
        for tag in sentence:
            if tag == "O":
                continue
            if not (tag.startswith(("B-", "I-")) and len(tag) > 2):
                raise ValueError(
                    f"{which} sentence {i}: tag {tag!r} is not IOB2 (expected 'O', 'B-TYPE' "
                    "or 'I-TYPE')"
                )


def span_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> SpanReport:
    """Strict IOB2 span scores, through ``seqeval`` (``mode="strict"``, ``scheme=IOB2``).

    A predicted span counts only if its type and both boundaries match a gold span. Under the
    strict IOB2 scheme, an ``I-X`` that does not continue a ``B-X``/``I-X`` starts no span.
    Tags must be ``O``, ``B-TYPE`` or ``I-TYPE`` (``ValueError`` otherwise).
    """
    _check_pairs(gold, pred)
    _check_iob2(gold, "gold")
    _check_iob2(pred, "pred")
    y_true = [list(s) for s in gold]
    y_pred = [list(s) for s in pred]
    n_gold = sum(len(s) for s in Entities(y_true, IOB2).entities)
    n_pred = sum(len(s) for s in Entities(y_pred, IOB2).entities)
    if n_gold == 0 and n_pred == 0:
        return SpanReport(1.0, 1.0, 1.0, 1.0, 0, 0, ())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval's UndefinedMetricWarning; 0 is reported
        report: dict[str, dict[str, Any]] = classification_report(
            y_true, y_pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0
        )
        f1 = float(f1_score(y_true, y_pred, mode="strict", scheme=IOB2, zero_division=0))
    summary_keys = {"micro avg", "macro avg", "weighted avg"}
    per_type = tuple(
        LabelScores(
            label=str(key),
            precision=float(row["precision"]),
            recall=float(row["recall"]),
            f1=float(row["f1-score"]),
            support=int(row["support"]),
        )
        for key, row in sorted(report.items())
        if key not in summary_keys
    )
    micro = report["micro avg"]
    return SpanReport(
        precision=float(micro["precision"]),
        recall=float(micro["recall"]),
        f1=f1,
        macro_f1=float(report["macro avg"]["f1-score"]),
        n_gold=n_gold,
        n_pred=n_pred,
        per_type=per_type,
    )


def sentence_scores(
    gold: Sequence[str], pred: Sequence[str], labels: Sequence[str] | None = None
) -> SentenceReport:
    """Accuracy, macro-F1 and per-label precision/recall/F1/support of a sentence task.

    ``labels`` fixes the labels (and row order) that macro-F1 averages over; a given label
    with no gold and no prediction counts with F1 = 0, and a gold or predicted label outside
    ``labels`` is a ``ValueError``. Without ``labels``, the labels are those seen in gold or
    pred, sorted. F1 is 0 where precision + recall = 0.
    """
    if isinstance(gold, str) or isinstance(pred, str):
        raise TypeError("gold and pred must be sequences of labels, not strings")
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} examples but pred has {len(pred)}")
    if not gold:
        raise ValueError("sentence_scores of no examples is undefined")
    seen = set(gold) | set(pred)
    if labels is None:
        label_list = sorted(seen)
    else:
        if isinstance(labels, str):
            raise TypeError("labels must be a sequence of labels, not a string")
        label_list = list(labels)
        if len(set(label_list)) != len(label_list):
            dups = sorted({x for x in label_list if label_list.count(x) > 1})
            raise ValueError(f"duplicate label(s) in labels: {', '.join(map(repr, dups))}")
        outside = sorted(seen - set(label_list))
        if outside:
            raise ValueError(
                f"gold/pred contain label(s) not in labels: {', '.join(map(repr, outside))}"
            )
        if not label_list:
            raise ValueError("labels is empty")
    rows = _per_label(gold, pred, label_list)
    accuracy = sum(a == b for a, b in zip(gold, pred, strict=True)) / len(gold)
    return SentenceReport(
        accuracy=accuracy,
        macro_f1=_mean([row.f1 for row in rows]),
        n_examples=len(gold),
        per_label=rows,
    )


def tagging_report(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], bio: bool
) -> TaggingReport:
    """Token accuracy and per-tag token scores, plus strict IOB2 span scores if ``bio``."""
    n_tokens = _check_pairs(gold, pred)
    accuracy = token_accuracy(gold, pred)
    flat_gold = [tag for sentence in gold for tag in sentence]
    flat_pred = [tag for sentence in pred for tag in sentence]
    per_tag = _per_label(flat_gold, flat_pred, sorted(set(flat_gold) | set(flat_pred)))
    return TaggingReport(
        token_accuracy=accuracy,
        n_sentences=len(gold),
        n_tokens=n_tokens,
        per_tag=per_tag,
        spans=span_f1(gold, pred) if bio else None,
    )
