"""What `pyxtask bench` times: an encoder, T tagging tasks, and the same batches for everyone.

Every contender owns an identically initialised model (same seed) and AdamW and sees the same
batches: random sub-word ids (the same inputs for every task, so that methods and peers that
share one encoder pass can run) and each task's own random labels. Timing does not depend on
the weights' values, so the encoders are the architectures of their namesakes with random
weights; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import Tensor

from pyxtask.data import LabelMap, collate
from pyxtask.data.tokenization import Encoded
from pyxtask.methods import Method
from pyxtask.models import MultiTaskModel
from pyxtask.tasks import TaskData

__all__ = ["ENCODERS", "Workload", "build_model", "make_optimizer"]

#: name -> (vocabulary, hidden size, layers, attention heads, intermediate size)
ENCODERS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (2000, 128, 2, 2, 512),
    "small": (8000, 256, 4, 4, 1024),  # the CPU table's 4-layer 256-wide BERT
    "minilm": (30522, 384, 6, 12, 1536),  # all-MiniLM-L6-v2's architecture
    "bert-base": (30522, 768, 12, 12, 3072),
}
LABELS_PER_TASK = (45, 17, 12, 25)  # PTB-, UPOS-, chunk- and NER-sized tag sets
CLIP = 1.0
LR = 5e-5
WEIGHT_DECAY = 0.01


@dataclass
class Workload:
    """The encoder, the tasks and their batches, on one device."""

    encoder: str
    num_tasks: int
    batch: int
    seq: int
    device: torch.device
    bf16: bool
    #: Training items per task: a step takes the first ``batch``; TAWT's probe up to 64.
    train_items: int = 64

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; choose from {list(ENCODERS)}")
        gen = torch.Generator().manual_seed(0)
        labels = [LABELS_PER_TASK[t % len(LABELS_PER_TASK)] for t in range(self.num_tasks)]
        self.tasks = [
            TaskData(
                f"bench.tag{t}",
                "token",
                LabelMap([f"L{i}" for i in range(n)], name=f"bench__tag{t}"),
                train=[],
            )
            for t, n in enumerate(labels)
        ]
        self.encoded = self._items(self.train_items, labels, gen)
        self.heldout = self._items(self.batch, labels, gen)
        self._batches = [
            {k: v.to(self.device) for k, v in collate(items[: self.batch], 0).items()}
            for items in self.encoded
        ]

    def _items(self, count: int, labels: list[int], gen: torch.Generator) -> list[list[Encoded]]:
        vocab, n, ignore = ENCODERS[self.encoder][0], self.seq, LabelMap.ignore_index
        ids = torch.randint(5, vocab, (count, n), generator=gen)
        ids[:, 0], ids[:, -1] = 2, 3  # [CLS], [SEP]
        word_ids = (None, *range(n - 2), None)
        label_mask = (False, *([True] * (n - 2)), False)
        out: list[list[Encoded]] = []
        for k in labels:
            y = torch.randint(0, k, (count, n), generator=gen)
            y[:, 0] = y[:, -1] = ignore
            out.append(
                [
                    Encoded(
                        tuple(ids[i].tolist()), (1,) * n, tuple(y[i].tolist()), word_ids, label_mask
                    )
                    for i in range(count)
                ]
            )
        return out

    @property
    def rows(self) -> list[int]:
        return list(range(self.batch))

    def batches(self) -> list[dict[str, Tensor]]:
        """Each task's step batch on the device (the same tensors every step)."""
        return self._batches

    def describe(self) -> dict[str, Any]:
        vocab, hidden, layers, heads, inter = ENCODERS[self.encoder]
        return {
            "encoder": self.encoder,
            "vocab": vocab,
            "hidden": hidden,
            "layers": layers,
            "heads": heads,
            "intermediate": inter,
            "num_tasks": self.num_tasks,
            "batch": self.batch,
            "seq": self.seq,
            "device": str(self.device),
            "bf16": self.bf16,
            "labels_per_task": [len(t.labels) for t in self.tasks],
        }


def build_model(work: Workload) -> MultiTaskModel:
    """The workload's encoder with a head per task, initialised from seed 0."""
    vocab, hidden, layers, heads, inter = ENCODERS[work.encoder]
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=max(512, work.seq),
    )
    model = MultiTaskModel.from_config(config, [(t.head, t.labels) for t in work.tasks])
    return model.to(work.device).train()


def make_optimizer(model: MultiTaskModel, method: Method | None = None) -> torch.optim.Optimizer:
    """The trainer's AdamW: decay on matrices, none on biases/LayerNorm, the method's own
    parameters as their own group."""
    params = list(model.parameters())
    groups: list[dict[str, Any]] = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if method is not None and method.parameters():
        groups.append({"params": method.parameters(), "weight_decay": 0.0, "lr": method.lr})
    return torch.optim.AdamW(groups, lr=LR)


def finish_step(model: MultiTaskModel, optimizer: torch.optim.Optimizer) -> None:
    """What follows the backward in every contender: clip, update, clear."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
