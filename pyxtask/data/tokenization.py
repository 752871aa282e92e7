"""Sub-word tokenization with word-level labels, and the way back from sub-words to words.

Token tasks (tagging) label words, but models see the sub-words of a *fast* Hugging Face
tokenizer. :func:`align_labels` tokenizes one pre-split sentence and puts each word's label on
one of its sub-words (the first, by default), or on all of them, or on the last; every other
position (the remaining sub-words, special tokens) gets :attr:`LabelMap.ignore_index`, which
``cross_entropy`` skips. :func:`words_from_subwords` is the inverse: it reads a word-level
prediction off the sub-word that carried the word's label.

A sentence longer than ``max_length`` sub-words is never cut: it is split into overlapping
windows (``stride`` sub-words of overlap, so later windows get left context), and each labelled
sub-word is labelled in exactly one window, the earliest that contains it, so no word is
counted twice by the loss. Sentence-level tasks (:func:`encode_sentence_task`) are truncated
instead, since one label covers the whole text.

Neither splitting nor truncation is silent: both are counted in a :class:`TokenizationStats`,
and :func:`tokenize_corpus` issues a single :class:`LongSequenceWarning` with the counts for a
whole corpus. :func:`collate` pads a batch of :class:`Encoded` items into int64 tensors.

The module does not import ``transformers``: it only calls the tokenizer it is given.
"""

from __future__ import annotations

import operator
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from pyxtask.data.labels import LabelMap
from pyxtask.data.readers import LabeledText, TaggedSentence
from pyxtask.data.words import example_label_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Encoded",
    "LabelAll",
    "LongSequenceWarning",
    "TokenizationStats",
    "align_labels",
    "collate",
    "encode_sentence_task",
    "group_by_sentence",
    "tokenize_corpus",
    "words_from_subwords",
]

LabelAll = Literal["first", "all", "last"]
_MODES = ("first", "all", "last")
_MAX_SHOWN = 10


class LongSequenceWarning(UserWarning):
    """Sentences were split into windows or truncated to fit ``max_length``."""


@dataclass(frozen=True, slots=True)
class Encoded:
    """One model input: a window of a tokenized sentence (or a whole sentence-level text).

    Attributes:
        input_ids: sub-word ids, special tokens included, at most ``max_length`` of them.
        attention_mask: ``1`` for every position (padding is added by :func:`collate`).
        labels: token tasks: one id per position, :attr:`LabelMap.ignore_index` where the
            position carries no label; sentence tasks: a single id (``ignore_index`` when the
            text has no label).
        word_ids: the index of the word each position belongs to; ``None`` for special
            tokens (and for every position of a sentence-level item).
        label_mask: ``True`` where the position carries its word's label in this window. It is
            set even when no labels were given (inference), so that :func:`words_from_subwords`
            knows where to read predictions.
        window: the index of this window among the windows of its sentence.
        num_windows: how many windows the sentence was split into.
        sentence: the index of the sentence in the corpus (:func:`tokenize_corpus`), else 0.
        kind: ``"token"`` (per-position labels) or ``"sentence"`` (one label).
    """

    input_ids: tuple[int, ...]
    attention_mask: tuple[int, ...]
    labels: tuple[int, ...]
    word_ids: tuple[int | None, ...]
    label_mask: tuple[bool, ...]
    window: int = 0
    num_windows: int = 1
    sentence: int = 0
    kind: Literal["token", "sentence"] = "token"

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        lengths = [len(self.attention_mask), len(self.word_ids), len(self.label_mask)]
        if self.kind == "token":
            lengths.append(len(self.labels))
        elif len(self.labels) != 1:
            raise ValueError(f"a sentence-level item has one label, got {len(self.labels)}")
        if any(length != n for length in lengths):
            raise ValueError("input_ids, attention_mask, word_ids, label_mask (and token labels)")
        if not 0 <= self.window < self.num_windows:
            raise ValueError(f"window {self.window} is out of range [0, {self.num_windows})")


@dataclass
class TokenizationStats:
    """Counts of what tokenization had to do to fit ``max_length``.

    Pass one instance to many calls of :func:`align_labels` / :func:`encode_sentence_task`
    (they then count instead of warning) and call :meth:`warn` once at the end;
    :func:`tokenize_corpus` does exactly that.
    """

    sentences: int = 0
    """Sentences (or texts) tokenized."""
    windows: int = 0
    """Model inputs produced (one per window; one per sentence-level text)."""
    split: int = 0
    """Token-task sentences longer than ``max_length`` that were split into several windows."""
    truncated: int = 0
    """Sentence-level texts longer than ``max_length`` that were truncated."""
    truncated_tokens: int = 0
    """Sub-words dropped by truncation, over all truncated texts."""
    max_length: int | None = None
    """The ``max_length`` of the last call that counted into these stats."""
    examples: list[str] = field(default_factory=list)
    """A few of the split or truncated items, for the warning (their ``source`` or index)."""

    def summary(self) -> str | None:
        """A one-line description of the splits and truncations, or ``None`` if there were none."""
        parts: list[str] = []
        limit = f"max_length={self.max_length}" if self.max_length is not None else "max_length"
        if self.split:
            parts.append(
                f"{self.split} of {self.sentences} sentences were longer than {limit} sub-words "
                "and were split into overlapping windows (every word is still labelled once)"
            )
        if self.truncated:
            parts.append(
                f"{self.truncated} of {self.sentences} texts were longer than {limit} sub-words "
                f"and were truncated ({self.truncated_tokens} sub-words dropped)"
            )
        if not parts:
            return None
        text = "; ".join(parts)
        if self.examples:
            text += f" (e.g. {', '.join(self.examples)})"
        return text

    def warn(self, stacklevel: int = 2) -> bool:
        """Issue one :class:`LongSequenceWarning` with :meth:`summary`; ``True`` if it did."""
        text = self.summary()
        if text is None:
            return False
        warnings.warn(text, LongSequenceWarning, stacklevel=stacklevel + 1)
        return True

    def _example(self, name: str) -> None:
        if len(self.examples) < 3:
            self.examples.append(name)


# --------------------------------------------------------------------------------------------
# Checks


def _require_fast(tokenizer: PreTrainedTokenizerBase | Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"a fast tokenizer is needed (its word ids map sub-words back to words), got "
            f"{type(tokenizer).__name__}; load one with AutoTokenizer.from_pretrained(..., "
            "use_fast=True) or wrap a `tokenizers.Tokenizer` in PreTrainedTokenizerFast"
        )


def _check_lengths(tokenizer: Any, max_length: int, stride: int) -> None:
    for name, value in (("max_length", max_length), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    specials = int(tokenizer.num_special_tokens_to_add(pair=False))
    room = max_length - specials
    if room < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for sub-words after {specials} special tokens"
        )
    # The tokenizer itself refuses stride >= room; say so in terms of our arguments.
    if not 0 <= stride < room:
        raise ValueError(
            f"stride must be in [0, {room}) (max_length={max_length} minus {specials} special "
            f"tokens), got {stride}"
        )


def _as_label(value: object, position: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"label id at word {position} is a bool ({value!r})")
    try:
        label = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"label id at word {position} must be an int, not {type(value).__name__} ({value!r})"
        ) from None
    if label < 0 and label != LabelMap.ignore_index:
        raise ValueError(
            f"label id at word {position} is {label}; ids are >= 0, or "
            f"LabelMap.ignore_index ({LabelMap.ignore_index}) for a word without a label"
        )
    return int(label)


# --------------------------------------------------------------------------------------------
# Token tasks


def align_labels(
    words: Sequence[str],
    label_ids: Sequence[int] | None,
    tokenizer: PreTrainedTokenizerBase | Any,
    *,
    label_all: LabelAll = "first",
    max_length: int = 128,
    stride: int = 32,
    stats: TokenizationStats | None = None,
) -> list[Encoded]:
    """Tokenize pre-split ``words`` and put each word's label on its sub-word(s).

    Args:
        words: the words of one sentence.
        label_ids: one label id per word (``LabelMap.ignore_index`` for a word without a
            label), or ``None`` at inference (every label is then ``ignore_index``, but
            :attr:`Encoded.label_mask` still marks where each word's prediction is read).
        tokenizer: a fast Hugging Face tokenizer (``TypeError`` otherwise).
        label_all: which sub-words of a word carry its label: ``"first"``, ``"all"`` or
            ``"last"``. Other sub-words and special tokens get ``ignore_index``.
        max_length: the most positions in one window, special tokens included.
        stride: how many sub-words consecutive windows share (the later window's left
            context). Must be less than ``max_length`` minus the special tokens.
        stats: counts splits into windows; when ``None``, a split sentence is reported by a
            :class:`LongSequenceWarning` at once.

    Returns:
        One :class:`Encoded` per window (a single one unless the sentence is too long). Each
        labelled sub-word is labelled in the earliest window that contains it and is
        ``ignore_index`` in later ones, so across the windows every word is labelled exactly
        once (``first``/``last``) or each of its sub-words once (``all``).

    Raises:
        TypeError: the tokenizer is not fast, or a word or label has the wrong type.
        ValueError: ``label_ids`` and ``words`` differ in length, ``label_all`` is unknown,
            ``max_length``/``stride`` do not fit, or the tokenizer turns a word into no
            sub-words at all (the message names the word and its position).
    """
    own_stats = stats is None
    counts = TokenizationStats() if stats is None else stats
    encoded = _align(
        words,
        label_ids,
        tokenizer,
        label_all=label_all,
        max_length=max_length,
        stride=stride,
        stats=counts,
        sentence=0,
        name="this sentence",
    )
    if own_stats:
        counts.examples.clear()  # the warning is about this very sentence
        counts.warn(stacklevel=2)
    return encoded


def _align(
    words: Sequence[str],
    label_ids: Sequence[int] | None,
    tokenizer: Any,
    *,
    label_all: LabelAll,
    max_length: int,
    stride: int,
    stats: TokenizationStats,
    sentence: int,
    name: str,
) -> list[Encoded]:
    _require_fast(tokenizer)
    if label_all not in _MODES:
        raise ValueError(f"label_all must be 'first', 'all' or 'last', not {label_all!r}")
    _check_lengths(tokenizer, max_length, stride)
    if isinstance(words, str):
        raise TypeError("words must be a sequence of strings (pre-split), not a single string")
    words = list(words)
    for i, text in enumerate(words):
        if not isinstance(text, str):
            raise TypeError(f"word {i} must be a string, not {type(text).__name__} ({text!r})")
    labels: list[int] | None = None
    if label_ids is not None:
        labels = [_as_label(value, i) for i, value in enumerate(label_ids)]
        if len(labels) != len(words):
            raise ValueError(f"{len(words)} words but {len(labels)} label ids")

    batch = tokenizer(
        words,
        is_split_into_words=True,
        truncation=True,
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_attention_mask=True,
    )
    all_ids: list[list[int]] = [list(map(int, row)) for row in batch["input_ids"]]
    all_masks: list[list[int]] = [list(map(int, row)) for row in batch["attention_mask"]]
    all_words: list[list[int | None]] = [list(batch.word_ids(k)) for k in range(len(all_ids))]

    # Give every content (non-special) position its index in the sentence's sub-word sequence.
    # Overflow windows are contiguous slices of that sequence, each starting `stride` before
    # the previous one ended; the shared positions are checked so that a tokenizer windowing
    # differently fails loudly instead of mislabelling.
    global_ids: list[int] = []
    global_words: list[int] = []
    starts: list[int] = []
    start = 0
    for k, (ids, wids) in enumerate(zip(all_ids, all_words, strict=True)):
        content = [(t, w) for t, w in zip(ids, wids, strict=True) if w is not None]
        if k > 0:
            start = max(0, len(global_ids) - stride)
        starts.append(start)
        for j, (token, word) in enumerate(content):
            g = start + j
            if g < len(global_ids):
                if (global_ids[g], global_words[g]) != (token, word):
                    raise RuntimeError(
                        f"window {k} of {name} does not overlap the previous window by "
                        f"stride={stride} sub-words; the tokenizer's overflow behaves unexpectedly"
                    )
            else:
                global_ids.append(token)
                global_words.append(word)

    positions: list[list[int]] = [[] for _ in words]
    for g, word in enumerate(global_words):
        if not 0 <= word < len(words):
            raise RuntimeError(f"the tokenizer returned word id {word} for {len(words)} words")
        positions[word].append(g)
    empty = [i for i, p in enumerate(positions) if not p]
    if empty:
        shown = ", ".join(f"{words[i]!r} at position {i}" for i in empty[:_MAX_SHOWN])
        more = f" and {len(empty) - _MAX_SHOWN} more" if len(empty) > _MAX_SHOWN else ""
        raise ValueError(
            f"the tokenizer turns word(s) {shown}{more} into no sub-words, so they "
            "could not carry a label; remove or replace them before tokenizing"
        )

    designated: set[int] = set()
    for p in positions:
        if label_all == "first":
            designated.add(p[0])
        elif label_all == "last":
            designated.add(p[-1])
        else:
            designated.update(p)

    num_windows = len(all_ids)
    out: list[Encoded] = []
    labelled_upto = 0  # every global position below this was labelled in an earlier window
    for k in range(num_windows):
        ids, wids = all_ids[k], all_words[k]
        window_labels: list[int] = []
        window_mask: list[bool] = []
        j = 0
        for word_id in wids:
            if word_id is None:
                window_labels.append(LabelMap.ignore_index)
                window_mask.append(False)
                continue
            g = starts[k] + j
            j += 1
            if g in designated and g >= labelled_upto:
                window_mask.append(True)
                window_labels.append(LabelMap.ignore_index if labels is None else labels[word_id])
            else:
                window_mask.append(False)
                window_labels.append(LabelMap.ignore_index)
        labelled_upto = max(labelled_upto, starts[k] + j)
        out.append(
            Encoded(
                input_ids=tuple(ids),
                attention_mask=tuple(all_masks[k]),
                labels=tuple(window_labels),
                word_ids=tuple(wids),
                label_mask=tuple(window_mask),
                window=k,
                num_windows=num_windows,
                sentence=sentence,
            )
        )

    stats.sentences += 1
    stats.windows += num_windows
    stats.max_length = max_length
    if num_windows > 1:
        stats.split += 1
        stats._example(name)
    return out


def words_from_subwords(
    encoded_windows: Sequence[Encoded], predictions: Sequence[Sequence[int]] | torch.Tensor
) -> list[int]:
    """Per-word predictions from per-sub-word predictions: the inverse of :func:`align_labels`.

    Args:
        encoded_windows: all the windows of one sentence, in order (what :func:`align_labels`
            returned, or one group of :func:`group_by_sentence`).
        predictions: one row per window, holding a prediction per position (e.g. the argmax
            of the logits); rows may be longer than their window (padding is ignored). A 2-D
            tensor works.

    Returns:
        One prediction per word: the prediction at the sub-word that carried the word's label
        (with ``label_all="all"``, the first of them, i.e. the first sub-word).

    Raises:
        ValueError: the windows are not the complete, ordered windows of one sentence, or a
            prediction row is shorter than its window.
    """
    rows: Sequence[Any] = (
        predictions.tolist() if isinstance(predictions, torch.Tensor) else predictions
    )
    if len(rows) != len(encoded_windows):
        raise ValueError(f"{len(encoded_windows)} windows but {len(rows)} prediction rows")
    if not encoded_windows:
        raise ValueError("no windows given")
    first = encoded_windows[0]
    for k, window in enumerate(encoded_windows):
        if window.kind != "token":
            raise ValueError("words_from_subwords takes token-task items, not sentence-level ones")
        if (window.window, window.num_windows, window.sentence) != (
            k,
            len(encoded_windows),
            first.sentence,
        ):
            raise ValueError(
                f"expected windows 0..{len(encoded_windows) - 1} of one sentence in order; item "
                f"{k} is window {window.window} of {window.num_windows} of sentence "
                f"{window.sentence}"
            )
    num_words = 1 + max(
        (w for e in encoded_windows for w in e.word_ids if w is not None), default=-1
    )
    words: list[Any] = [None] * num_words
    found = [False] * num_words
    for k, (window, row) in enumerate(zip(encoded_windows, rows, strict=True)):
        if len(row) < len(window.input_ids):
            raise ValueError(
                f"prediction row {k} has {len(row)} entries for a window of "
                f"{len(window.input_ids)} positions"
            )
        for position, (word, marked) in enumerate(
            zip(window.word_ids, window.label_mask, strict=True)
        ):
            if marked and word is not None and not found[word]:
                words[word] = row[position]
                found[word] = True
    missing = [i for i, f in enumerate(found) if not f]
    if missing:
        raise ValueError(f"no labelled sub-word for word(s) {missing[:_MAX_SHOWN]}")
    return [int(value) for value in words]


def group_by_sentence(encoded: Iterable[Encoded]) -> list[list[Encoded]]:
    """Split a flat list of items (as :func:`tokenize_corpus` returns) into per-sentence lists."""
    groups: list[list[Encoded]] = []
    for item in encoded:
        if item.window == 0:
            groups.append([item])
        elif not groups or groups[-1][-1].sentence != item.sentence:
            raise ValueError(f"window {item.window} of sentence {item.sentence} has no window 0")
        else:
            groups[-1].append(item)
    return groups


# --------------------------------------------------------------------------------------------
# Sentence tasks


def encode_sentence_task(
    text: str,
    label_id: int | None,
    tokenizer: PreTrainedTokenizerBase | Any,
    max_length: int = 128,
    *,
    stats: TokenizationStats | None = None,
) -> Encoded:
    """Tokenize ``text`` for a sentence-level task, truncating it to ``max_length`` positions.

    ``label_id`` is the text's label id, or ``None`` at inference (stored as
    ``ignore_index``). A truncated text is counted in ``stats``; without ``stats`` it is
    reported by a :class:`LongSequenceWarning` at once. Needs a fast tokenizer, like
    :func:`align_labels`.
    """
    own_stats = stats is None
    counts = TokenizationStats() if stats is None else stats
    item = _encode_text(
        text, label_id, tokenizer, max_length=max_length, stats=counts, sentence=0, name="this text"
    )
    if own_stats:
        counts.examples.clear()
        counts.warn(stacklevel=2)
    return item


def _encode_text(
    text: str,
    label_id: int | None,
    tokenizer: Any,
    *,
    max_length: int,
    stats: TokenizationStats,
    sentence: int,
    name: str,
) -> Encoded:
    _require_fast(tokenizer)
    _check_lengths(tokenizer, max_length, 0)
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, not {type(text).__name__}")
    label = LabelMap.ignore_index if label_id is None else _as_label(label_id, 0)
    # Overflow rows are what truncation dropped: counting them costs no second tokenization.
    batch = tokenizer(
        text,
        truncation=True,
        max_length=max_length,
        return_overflowing_tokens=True,
        return_attention_mask=True,
    )
    ids = [int(t) for t in batch["input_ids"][0]]
    mask = [int(m) for m in batch["attention_mask"][0]]
    dropped = sum(
        sum(1 for w in batch.word_ids(k) if w is not None)
        for k in range(1, len(batch["input_ids"]))
    )
    stats.sentences += 1
    stats.windows += 1
    stats.max_length = max_length
    if dropped:
        stats.truncated += 1
        stats.truncated_tokens += dropped
        stats._example(name)
    return Encoded(
        input_ids=tuple(ids),
        attention_mask=tuple(mask),
        labels=(label,),
        word_ids=(None,) * len(ids),
        label_mask=(False,) * len(ids),
        sentence=sentence,
        kind="sentence",
    )


# --------------------------------------------------------------------------------------------
# Corpora and batches


def tokenize_corpus(
    sentences: Iterable[TaggedSentence | LabeledText],
    label_map: LabelMap | None,
    tokenizer: PreTrainedTokenizerBase | Any,
    *,
    label_all: LabelAll = "first",
    max_length: int = 128,
    stride: int = 32,
    warn: bool = True,
) -> tuple[list[Encoded], TokenizationStats]:
    """Tokenize a whole corpus; one :class:`LongSequenceWarning` summarises splits/truncations.

    :class:`TaggedSentence` items go through :func:`align_labels`, :class:`LabeledText` items
    through :func:`encode_sentence_task`; a corpus mixing both is a ``TypeError``. Labels are
    encoded with ``label_map``; with ``label_map=None`` (inference) every label is
    ``ignore_index``. :attr:`Encoded.sentence` is the item's index in ``sentences``, so
    :func:`group_by_sentence` recovers each sentence's windows.

    Errors raised for one item name its ``source`` (``"path:line"``). With ``warn=False`` the
    caller gets the stats and decides what to report.
    """
    stats = TokenizationStats()
    out: list[Encoded] = []
    kind: type | None = None
    for index, item in enumerate(sentences):
        if not isinstance(item, TaggedSentence | LabeledText):
            raise TypeError(
                f"item {index} is a {type(item).__name__}, not a TaggedSentence or LabeledText"
            )
        if kind is None:
            kind = type(item)
        elif type(item) is not kind:
            raise TypeError(
                f"item {index} ({item.source}) mixes {type(item).__name__} with "
                f"{kind.__name__} in one corpus"
            )
        try:
            if isinstance(item, TaggedSentence):
                ids = None if label_map is None else example_label_ids(item, label_map)
                out.extend(
                    _align(
                        item.words,
                        ids,
                        tokenizer,
                        label_all=label_all,
                        max_length=max_length,
                        stride=stride,
                        stats=stats,
                        sentence=index,
                        name=item.source,
                    )
                )
            else:
                label = None if label_map is None else label_map.encode(item.label)
                out.append(
                    _encode_text(
                        item.text,
                        label,
                        tokenizer,
                        max_length=max_length,
                        stats=stats,
                        sentence=index,
                        name=item.source,
                    )
                )
        except ValueError as exc:
            raise ValueError(f"{item.source}: {exc}") from exc
        except (KeyError, IndexError) as exc:
            if sys.version_info >= (3, 11):
                exc.add_note(f"in the item at {item.source}")
            raise
    if warn:
        stats.warn(stacklevel=2)
    return out, stats


def collate(batch: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest item: int64 ``input_ids``, ``attention_mask``, ``labels``.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0, token
    ``labels`` with :attr:`LabelMap.ignore_index` (all of shape ``(batch, longest)``).
    Sentence-level items give ``labels`` of shape ``(batch,)``. Mixing token and sentence
    items is a ``ValueError``, as is an empty batch.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    kinds = {item.kind for item in batch}
    if len(kinds) > 1:
        raise ValueError("a batch mixes token-task and sentence-level items")
    longest = max(len(item.input_ids) for item in batch)
    size = len(batch)
    input_ids = torch.full((size, longest), int(pad_token_id), dtype=torch.int64)
    attention_mask = torch.zeros((size, longest), dtype=torch.int64)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.int64)
        attention_mask[row, :n] = torch.tensor(item.attention_mask, dtype=torch.int64)
    if kinds == {"sentence"}:
        labels = torch.tensor([item.labels[0] for item in batch], dtype=torch.int64)
    else:
        labels = torch.full((size, longest), LabelMap.ignore_index, dtype=torch.int64)
        for row, item in enumerate(batch):
            labels[row, : len(item.labels)] = torch.tensor(item.labels, dtype=torch.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
