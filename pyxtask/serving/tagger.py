"""Tag text with an exported bundle: onnxruntime, numpy and ``tokenizers`` only (no torch).

The windowing mirrors training exactly (:func:`pyxtask.data.tokenization.align_labels`): a
sentence longer than ``max_length`` sub-words is cut into windows that overlap by ``stride``
sub-words, and every word is read at its first sub-word in the first window that holds it, so
the tags equal the trainer's own predictions on the same words.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pyxtask.serving.bundle import BundleError, read_manifest

__all__ = ["Tagged", "Tagger"]


@dataclass
class Tagged:
    """One input's result.

    Token tasks: ``words``, one ``labels`` entry and one ``scores`` entry (the probability of
    that label) per word; a word the tokenizer turns into no sub-word at all (e.g. a lone
    control character) gets label None and score 0. Sentence tasks: ``label``, its
    ``score``, and ``probabilities`` of every label.
    """

    words: list[str]
    labels: list[str | None] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    label: str | None = None
    score: float | None = None
    probabilities: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.label is not None or self.probabilities is not None:
            return {"label": self.label, "score": self.score, "probabilities": self.probabilities}
        return {"words": self.words, "labels": self.labels, "scores": self.scores}


@dataclass
class _Window:
    item: int
    ids: list[int]
    reads: list[tuple[int, int]]  # (position in window, word index) to read predictions from


def _length_chunks(lengths: Sequence[int], batch_size: int, max_padding: float) -> list[list[int]]:
    """Indices of ``lengths`` grouped into model calls: sorted by length, at most
    ``batch_size`` a call, and a call is cut where the next (longer) window would pad it past
    ``max_padding`` times its real sub-words."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    chunks: list[list[int]] = []
    chunk: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]
        if chunk and (
            len(chunk) >= batch_size or (len(chunk) + 1) * n > (real + n) * (1.0 + max_padding)
        ):
            chunks.append(chunk)
            chunk, real = [], 0
        chunk.append(i)
        real += n
    if chunk:
        chunks.append(chunk)
    return chunks


def _softmax(logits: NDArray[np.float32]) -> NDArray[np.float64]:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


class Tagger:
    """An exported target model served by onnxruntime.

    Args:
        bundle: the folder ``pyxtask export`` wrote.
        variant: ``"fp32"`` (default), ``"fp16"`` or ``"int8"``, if the bundle has it.
        providers: onnxruntime execution providers (default: CUDA where available, else CPU).
        batch_size: most windows per onnxruntime call; windows are sorted by length first.
            Default 32, but 1 for ``"int8"``: dynamic quantization scales activations over the
            whole input tensor, so in a batch a sentence's int8 tags depend on its batch-mates
            (5 % of the quickstart tagger's labels changed); one window a call keeps every
            sentence's tags its own, for about 13 % of int8 throughput on CPU.
        max_padding: a call is cut where padding to its longest window would add more than
            this fraction of its real sub-words (on CPU the model's time grows with every
            padded position: uncapped, a call of 64 corpus sentences ran 3x slower).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        verify: check the bundle's files against their checksums when loading.
    """

    def __init__(
        self,
        bundle: str | os.PathLike[str],
        variant: str = "fp32",
        *,
        providers: Sequence[str] | None = None,
        batch_size: int | None = None,
        threads: int | None = None,
        max_padding: float = 0.1,
        verify: bool = True,
    ) -> None:
        import onnxruntime as ort  # noqa: PLC0415 -- heavy; keep `import pyxtask.serving` light
        from tokenizers import Tokenizer  # noqa: PLC0415

        root = Path(bundle)
        manifest = read_manifest(root, verify=verify)
        variants = manifest["variants"]
        if variant not in variants:
            raise BundleError(
                f"bundle {os.fspath(root)!r} has no {variant!r} model; it has {sorted(variants)}"
            )
        if batch_size is None:
            batch_size = 1 if variant == "int8" else 32
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not max_padding >= 0:
            raise ValueError(f"max_padding must be >= 0, got {max_padding}")
        self.max_padding = float(max_padding)
        self.manifest = manifest
        self.variant = variant
        self.kind: str = manifest["kind"]
        self.task: str = manifest["task"]
        self.labels: list[str] = list(manifest["labels"])
        self.max_length: int = int(manifest["max_length"])
        self.stride: int = int(manifest["stride"])
        self.batch_size = batch_size
        self._tokenizer = Tokenizer.from_file(os.fspath(root / manifest["tokenizer"]))
        self._tokenizer.no_padding()
        self._pad_id = int(manifest["pad_token_id"])
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider",) if p in available]
            providers.append("CPUExecutionProvider")
        self._session = ort.InferenceSession(
            os.fspath(root / variants[variant]["file"]), options, providers=list(providers)
        )
        self._input_names = [i.name for i in self._session.get_inputs()]
        self._tokenize_lock = threading.Lock()

    @property
    def metadata(self) -> dict[str, Any]:
        """What a client needs to know: task, kind, labels, limits, versions, variant."""
        keys = ("task", "kind", "labels", "max_length", "metric", "versions", "created")
        info = {k: self.manifest[k] for k in keys if k in self.manifest}
        info["variant"] = self.variant
        info["providers"] = self._session.get_providers()
        return info

    # -- tokenization ----------------------------------------------------------------------------

    def split_words(self, text: str) -> list[str]:
        """The words of raw text, as the bundle's tokenizer pre-splits them."""
        pre = self._tokenizer.pre_tokenizer
        if pre is None:
            return text.split()
        return [w for w, _ in pre.pre_tokenize_str(text)]

    def _token_windows(self, item: int, words: list[str]) -> tuple[list[_Window], list[bool]]:
        self._tokenizer.enable_truncation(self.max_length, stride=self.stride)
        encoding = self._tokenizer.encode(words, is_pretokenized=True)
        encodings = [encoding, *encoding.overflowing]
        # Windows are slices of the sentence's sub-word sequence, each starting `stride`
        # sub-words before the previous one ended (as in training's align_labels).
        total = 0
        starts: list[int] = []
        contents: list[list[int | None]] = []
        for k, enc in enumerate(encodings):
            wids = list(enc.word_ids)
            content = [w for w in wids if w is not None]
            start = 0 if k == 0 else max(0, total - self.stride)
            starts.append(start)
            total = max(total, start + len(content))
            contents.append(wids)
        first_position: dict[int, int] = {}
        for k, wids in enumerate(contents):
            j = 0
            for w in wids:
                if w is None:
                    continue
                g = starts[k] + j
                j += 1
                if w not in first_position or g < first_position[w]:
                    first_position[w] = g
        designated = {g: w for w, g in first_position.items()}
        windows: list[_Window] = []
        labelled_upto = 0
        for k, (enc, wids) in enumerate(zip(encodings, contents, strict=True)):
            reads: list[tuple[int, int]] = []
            j = 0
            for pos, w in enumerate(wids):
                if w is None:
                    continue
                g = starts[k] + j
                j += 1
                if g in designated and g >= labelled_upto:
                    reads.append((pos, designated[g]))
            labelled_upto = max(labelled_upto, starts[k] + j)
            windows.append(_Window(item, list(enc.ids), reads))
        covered = [w in first_position for w in range(len(words))]
        return windows, covered

    def _sentence_window(self, item: int, text: str) -> _Window:
        self._tokenizer.enable_truncation(self.max_length)
        encoding = self._tokenizer.encode(text)
        return _Window(item, list(encoding.ids), [(0, 0)])

    # -- inference -------------------------------------------------------------------------------

    def _run(self, windows: list[_Window]) -> list[NDArray[np.float64]]:
        """Probabilities at each window's read positions, batched by length."""
        out: list[NDArray[np.float64]] = [np.empty((0, len(self.labels)))] * len(windows)
        lengths = [len(w.ids) for w in windows]
        for chunk in _length_chunks(lengths, self.batch_size, self.max_padding):
            longest = lengths[chunk[-1]]
            ids = np.full((len(chunk), longest), self._pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), longest), dtype=np.int64)
            for row, i in enumerate(chunk):
                n = len(windows[i].ids)
                ids[row, :n] = windows[i].ids
                mask[row, :n] = 1
            feeds = {"input_ids": ids, "attention_mask": mask}
            (logits,) = self._session.run(
                ["logits"], {k: v for k, v in feeds.items() if k in self._input_names}
            )
            for row, i in enumerate(chunk):
                if self.kind == "sentence":
                    out[i] = _softmax(logits[row : row + 1])
                else:
                    positions = [p for p, _ in windows[i].reads]
                    out[i] = _softmax(logits[row, positions])
        return out

    def tag(self, inputs: Sequence[str | Sequence[str]]) -> list[Tagged]:
        """Tag raw sentences (strings) and/or pre-split sentences (lists of words).

        Sentence tasks take strings (a list of words is joined with spaces).
        """
        if isinstance(inputs, str):
            raise TypeError("tag() takes a sequence of sentences; wrap one sentence in a list")
        windows: list[_Window] = []
        words_of: list[list[str]] = []
        covered_of: list[list[bool]] = []
        with self._tokenize_lock:  # truncation settings live on the shared tokenizer
            for item, value in enumerate(inputs):
                if isinstance(value, str):
                    text = value
                    words = self.split_words(value)
                elif isinstance(value, Sequence) and all(isinstance(w, str) for w in value):
                    words = list(value)
                    text = " ".join(words)
                else:
                    raise TypeError(f"input {item} must be a string or a list of strings")
                words_of.append(words)
                if self.kind == "sentence":
                    windows.append(self._sentence_window(item, text))
                    covered_of.append([])
                elif words:
                    found, covered = self._token_windows(item, words)
                    windows.extend(found)
                    covered_of.append(covered)
                else:
                    covered_of.append([])
        probabilities = self._run(windows)
        results = [Tagged(words=w) for w in words_of]
        if self.kind == "sentence":
            for window, probs in zip(windows, probabilities, strict=True):
                row = probs[0]
                best = int(row.argmax())
                result = results[window.item]
                result.label = self.labels[best]
                result.score = float(row[best])
                result.probabilities = {
                    lab: float(p) for lab, p in zip(self.labels, row, strict=True)
                }
            return results
        for result in results:
            result.labels = [None] * len(result.words)
            result.scores = [0.0] * len(result.words)
        for window, probs in zip(windows, probabilities, strict=True):
            result = results[window.item]
            for (_, word), row in zip(window.reads, probs, strict=True):
                best = int(row.argmax())
                result.labels[word] = self.labels[best]
                result.scores[word] = float(row[best])
        return results
