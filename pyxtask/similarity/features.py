"""What the scores are computed from: each task's frozen encoder features, its linear probe,
and its encoder gradient under that probe, computed once per task and cached.

A task's *points* are what its head classifies: the first sub-word of every labelled word
for a tagging task, the pooled sentence vector (the head's own pooling) for a sentence task.
Both views of every example are kept (:class:`TaskFeatures`), so that one task's probe can be
run on another task's inputs whatever their kinds (:func:`source_outputs`).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pyxtask import checkpoint, ops
from pyxtask.data.labels import LabelMap
from pyxtask.data.tokenization import Encoded, collate, tokenize_corpus
from pyxtask.models import MultiTaskModel
from pyxtask.tasks import TaskData

__all__ = [
    "FeatureCache",
    "TaskFeatures",
    "encode_task",
    "encoder_fingerprint",
    "fit_probe",
    "probe_gradient",
    "source_outputs",
]

#: Cached files of another version are recomputed, never misread: raised whenever what a
#: cached value depends on beyond its key changes (layout, the probe's settings).
_CACHE_VERSION = 3


@dataclass
class TaskFeatures:
    """One task's frozen encoder features (float32, on the CPU).

    Attributes:
        kind: ``"token"`` or ``"sentence"``.
        points: the rows the task's head classifies (N x d) and ``labels`` (N,) their ids.
        tokens: sub-word states (M x d): the labelled positions of a tagging task, every
            position of a sentence task but [CLS], [SEP] and padding; ``token_item`` (M,)
            the item of each.
        pooled: one pooled vector per item (I x d), the sentence head's input.
        num_labels: the size of the task's label map.
    """

    kind: str
    points: Tensor
    labels: Tensor
    tokens: Tensor
    token_item: Tensor
    pooled: Tensor
    num_labels: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def encoder_fingerprint(model: MultiTaskModel) -> str:
    """A short hash of the encoder's word embeddings and size: what cached features depend on
    (the tiny encoder's vocabulary and random weights change with its tasks and seed)."""
    weight = model.encoder.get_input_embeddings().weight.detach().float().contiguous()
    digest = hashlib.sha256(weight.numpy().tobytes())
    digest.update(repr(model.encoder.config.to_dict().get("num_hidden_layers")).encode())
    return digest.hexdigest()[:16]


def tokenize(task: TaskData, model: MultiTaskModel, max_length: int) -> list[Encoded]:
    """The task's training examples as model inputs (long sentences in windows)."""
    stride = min(32, (max_length - 2) // 4)
    with warnings.catch_warnings():  # long sentences are windowed: nothing to act on here
        warnings.simplefilter("ignore")
        items, _ = tokenize_corpus(
            task.train, task.labels, model.tokenizer, max_length=max_length, stride=stride
        )
    return items


def _batches(items: Sequence[Encoded], size: int) -> list[list[Encoded]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


@torch.no_grad()
def encode_task(
    model: MultiTaskModel, task: TaskData, items: Sequence[Encoded], batch_size: int = 32
) -> TaskFeatures:
    """The encoder's last hidden states for every item, as a task's points, tokens and pooled
    vectors (the model in eval mode: no dropout)."""
    model.eval()
    head = model.head(task.head)
    pad = int(model.tokenizer.pad_token_id)
    tokenizer = model.tokenizer
    # The markers around a text, not [UNK]: an unknown word is still a word of the sentence.
    markers = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
    special = torch.tensor([i for i in markers if i is not None])
    tokens, token_item, pooled, token_labels = [], [], [], []
    first = 0
    for batch in _batches(items, batch_size):
        inputs = collate(batch, pad)
        states = model.encode(inputs["input_ids"], inputs["attention_mask"])
        pooled.append(head.pool(states, inputs["attention_mask"]).float())
        if task.kind == "token":
            mask = inputs["labels"] != LabelMap.ignore_index
            token_labels.append(inputs["labels"][mask])
        else:
            mask = inputs["attention_mask"].bool() & ~torch.isin(inputs["input_ids"], special)
        tokens.append(states[mask].float())
        rows = torch.arange(first, first + len(batch)).unsqueeze(1).expand_as(mask)
        token_item.append(rows[mask])
        first += len(batch)
    pooled_t, tokens_t = torch.cat(pooled), torch.cat(tokens)
    if task.kind == "token":
        points, labels = tokens_t, torch.cat(token_labels)
    else:
        points, labels = pooled_t, torch.tensor([item.labels[0] for item in items])
    return TaskFeatures(
        kind=task.kind,
        points=points,
        labels=labels.long(),
        tokens=tokens_t,
        token_item=torch.cat(token_item),
        pooled=pooled_t,
        num_labels=len(task.labels),
    )


def fit_probe(
    features: TaskFeatures,
    max_points: int = 4000,
    seed: int = 0,
    ridge: float = 50.0,
    max_iter: int = 100,
) -> tuple[Tensor, Tensor]:
    """A linear probe ``(W, b)`` (K x d, K) on the task's frozen points: multinomial logistic
    regression, ``mean cross entropy + l2/2 ‖W̃‖²`` with ``l2 = ridge / n`` on n centred
    points scaled by their overall standard deviation, minimised by L-BFGS (strong Wolfe
    line search, ``max_iter`` iterations) on at most ``max_points`` seeded rows; centring
    and scaling are folded back into ``W`` and ``b``, so the probe takes the raw features
    as the head does. Labels no row carries end with low biases.

    The probe's soft outputs on *other* inputs are what LEEP reads, so its strength was
    chosen on held-out cross entropy (MiniLM, 3/4 of 400 sentences to fit, 1/4 held out):
    ``l2 = 50/n`` is within 6 % of the best of {1e-3, 1e-2, 0.1, 1} on each of WSJ and Brown
    POS (4,000 tokens: 0.95 and 1.11 against 0.93 and 1.08 at 1e-2) and polarity (300
    sentences: 0.69 against 0.66 at 1), where the best single fixed value (0.1) is 58 %
    worse on Brown POS.
    """
    x, y = features.points.float(), features.labels  # float32: 2x the speed, ample for a probe
    if len(y) > max_points:
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:max_points]
        x, y = x[keep], y[keep]
    # One scale for every dimension: per-dimension standardising would blow the weights of
    # the encoder's near-constant dimensions up, and with them those dimensions' gradients.
    mean, scale = x.mean(0), x.std().clamp(min=1e-12)
    l2 = ridge / len(y)
    x = (x - mean) / scale
    weight = torch.zeros(features.num_labels, x.shape[1], requires_grad=True)
    bias = torch.zeros(features.num_labels, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + l2 / 2 * (weight**2).sum()
        torch.autograd.backward(loss)
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        raw_weight = weight / scale
        raw_bias = bias - raw_weight @ mean
    return raw_weight.float(), raw_bias.float()


def source_outputs(weight: Tensor, bias: Tensor, source_kind: str, target: TaskFeatures) -> Tensor:
    """The source probe's logits on the target's points (N x K_source).

    A probe of the target's own kind runs on the target's points. A sentence probe on a
    tagging target runs on each sentence's pooled vector, and every token of the sentence
    takes that sentence's output. A tagging probe on a sentence target runs on every
    sub-word of the sentence, and the sentence takes the mean of their logits.
    """
    if source_kind == target.kind:
        return target.points @ weight.T + bias
    if source_kind == "sentence":  # target is token-level
        per_item = target.pooled @ weight.T + bias
        return per_item[target.token_item]
    per_token = target.tokens @ weight.T + bias
    sums = torch.zeros(len(target.pooled), weight.shape[0]).index_add_(
        0, target.token_item, per_token
    )
    counts = torch.bincount(target.token_item, minlength=len(target.pooled)).clamp(min=1)
    return sums / counts.unsqueeze(1)


def probe_gradient(
    model: MultiTaskModel,
    task: TaskData,
    items: Sequence[Encoded],
    weight: Tensor,
    bias: Tensor,
    *,
    probe_size: int,
    batches: int,
    seed: int = 0,
) -> Tensor:
    """The gradient of the task's loss with respect to the shared encoder, the head set to the
    probe ``(W, b)``: the mean over ``batches`` seeded batches of ``probe_size`` items of each
    batch's mean loss (TAWT's probe protocol: eval mode, no dropout), flattened (P,)."""
    model.eval()
    classifier = model.head(task.head).classifier
    with torch.no_grad():
        classifier.weight.copy_(weight)
        classifier.bias.copy_(bias)
    params = [p for p in model.shared_parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    pad = int(model.tokenizer.pad_token_id)
    chosen = [order[i * probe_size : (i + 1) * probe_size] for i in range(batches)]
    chosen = [rows for rows in chosen if rows]
    for rows in chosen:
        inputs = collate([items[r] for r in rows], pad)
        loss = model(task.head, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        torch.autograd.backward(loss.loss / len(chosen))
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = ops.gather_flat([g.detach().float().reshape(-1) for g in grads])
    model.zero_grad(set_to_none=True)
    return flat


class FeatureCache:
    """Files ``KIND-KEY.pt`` in ``folder`` (written atomically); ``None`` disables caching."""

    def __init__(self, folder: str | os.PathLike[str] | None) -> None:
        self.folder = None if folder is None else Path(folder)

    def path(self, kind: str, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{kind}-{key}.pt"

    def get(self, kind: str, key: str) -> Any | None:
        path = self.path(kind, key)
        if path is None or not path.is_file():
            return None
        try:
            record = checkpoint.load(path)
        except checkpoint.CheckpointError:
            return None  # a damaged cache file is recomputed, not an error
        if not isinstance(record, dict) or record.get("version") != _CACHE_VERSION:
            return None
        return record["value"]

    def put(self, kind: str, key: str, value: Any) -> None:
        path = self.path(kind, key)
        if path is not None:
            checkpoint.save({"version": _CACHE_VERSION, "value": value}, path)
