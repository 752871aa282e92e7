"""Tests of sub-word tokenization and label alignment (pyxtask.data.tokenization).

The tokenizer is a tiny WordPiece model built here (nothing is downloaded): words such as
"playing" split into "play ##ing", "aaaa" into "a ##a ##a ##a", so a word can have many
sub-words and a long one can span several windows.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyxtask.data.labels import LabelMap
from pyxtask.data.readers import LabeledText, TaggedSentence
from pyxtask.data.tokenization import (
    Encoded,
    LongSequenceWarning,
    TokenizationStats,
    align_labels,
    collate,
    encode_sentence_task,
    group_by_sentence,
    tokenize_corpus,
    words_from_subwords,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

IGNORE = LabelMap.ignore_index
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PIECES = [
    "play",
    "##ing",
    "##ed",
    "##s",
    "the",
    "cat",
    "dog",
    "run",
    "##ning",
    "un",
    "##believ",
    "##able",
    "a",
    "##a",
    "b",
    "##b",
    ".",
]
VOCAB = {token: i for i, token in enumerate(SPECIALS + PIECES)}
PAD_ID = VOCAB["[PAD]"]

# Words with their expected number of sub-words under VOCAB.
WORDS = {
    "the": 1,
    "cat": 1,
    "dog": 1,
    ".": 1,
    "zzz": 1,  # [UNK]
    "play": 1,
    "playing": 2,
    "played": 2,
    "plays": 2,
    "running": 2,
    "unbelievable": 3,
    "aaaa": 4,
    "babab": 5,
}


def _build_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    model = Tokenizer(models.WordPiece(VOCAB, unk_token="[UNK]"))
    model.normalizer = normalizers.BertNormalizer(lowercase=True)
    model.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    model.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])],
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


TOKENIZER = _build_tokenizer()


def _full(words: Sequence[str]) -> tuple[list[int], list[int]]:
    """The sentence's sub-word ids and word ids, without special tokens or windows."""
    enc = TOKENIZER(list(words), is_split_into_words=True, add_special_tokens=False)
    return list(enc["input_ids"]), list(enc.word_ids())


def _global_positions(
    windows: Sequence[Encoded], words: Sequence[str], stride: int
) -> list[list[int | None]]:
    """Each window position's index in the whole sentence's sub-words (None for specials).

    Checks the windowing on the way: every window after the first starts ``stride`` sub-words
    before the previous one ended, and the windows together are exactly the full sequence.
    """
    full_ids, full_words = _full(words)
    result: list[list[int | None]] = []
    end = 0
    for k, window in enumerate(windows):
        start = 0 if k == 0 else max(0, end - stride)
        row: list[int | None] = []
        g = start
        for token, word in zip(window.input_ids, window.word_ids, strict=True):
            if word is None:
                row.append(None)
                continue
            assert (full_ids[g], full_words[g]) == (token, word)
            row.append(g)
            g += 1
        end = g
        result.append(row)
    assert end == len(full_ids)
    return result


def _first_last(words: Sequence[str]) -> tuple[list[int], list[int], list[list[int]]]:
    _, full_words = _full(words)
    positions: list[list[int]] = [[] for _ in words]
    for g, word in enumerate(full_words):
        positions[word].append(g)
    return [p[0] for p in positions], [p[-1] for p in positions], positions


word_lists = st.lists(
    st.one_of(
        st.sampled_from(sorted(WORDS)),
        st.integers(1, 30).map(lambda n: "a" * n),  # up to 30 sub-words in one word
    ),
    min_size=0,
    max_size=60,
)


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[str], list[int], int, int]:
    words = draw(word_lists)
    labels = draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, IGNORE]), min_size=len(words),
                           max_size=len(words)))  # fmt: skip
    max_length = draw(st.integers(3, 24))
    stride = draw(st.integers(0, max_length - 3))
    return words, labels, max_length, stride


def _align(words: list[str], labels: list[int] | None, mode: str, max_length: int, stride: int):
    stats = TokenizationStats()
    windows = align_labels(
        words,
        labels,
        TOKENIZER,
        label_all=mode,  # type: ignore[arg-type]
        max_length=max_length,
        stride=stride,
        stats=stats,
    )
    return windows, stats


HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# Tokenizer sanity (the tests below rely on these splits)


def test_tiny_tokenizer_splits_words_as_expected():
    for word, count in WORDS.items():
        ids, _ = _full([word])
        assert len(ids) == count, word
    assert TOKENIZER.is_fast


# --------------------------------------------------------------------------------------------
# Properties of the alignment


@HYPOTHESIS
@given(cases(), st.sampled_from(["first", "last"]))
def test_first_and_last_modes_label_each_word_once_on_that_subword(case, mode):
    words, labels, max_length, stride = case
    windows, _ = _align(words, labels, mode, max_length, stride)
    positions = _global_positions(windows, words, stride)
    firsts, lasts, _ = _first_last(words)
    expected = firsts if mode == "first" else lasts
    labelled: dict[int, list[int]] = {}
    for window, row in zip(windows, positions, strict=True):
        for p, (g, word) in enumerate(zip(row, window.word_ids, strict=True)):
            if window.label_mask[p]:
                assert word is not None and g is not None
                labelled.setdefault(word, []).append(g)
                assert window.labels[p] == labels[word]
            else:
                assert window.labels[p] == IGNORE
    assert sorted(labelled) == list(range(len(words)))
    for word, gs in labelled.items():
        assert gs == [expected[word]]


@HYPOTHESIS
@given(cases())
def test_all_mode_labels_every_subword_once_with_its_words_label(case):
    words, labels, max_length, stride = case
    windows, _ = _align(words, labels, "all", max_length, stride)
    positions = _global_positions(windows, words, stride)
    _, full_words = _full(words)
    seen: list[int] = []
    for window, row in zip(windows, positions, strict=True):
        for p, g in enumerate(row):
            if g is None:
                assert not window.label_mask[p] and window.labels[p] == IGNORE
            elif window.label_mask[p]:
                seen.append(g)
                assert window.labels[p] == labels[full_words[g]]
            else:
                assert window.labels[p] == IGNORE
    # every sub-word exactly once, in the earliest window containing it
    assert seen == list(range(len(full_words)))


@HYPOTHESIS
@given(cases(), st.sampled_from(["first", "all", "last"]))
def test_windows_fit_and_labels_round_trip(case, mode):
    words, labels, max_length, stride = case
    windows, stats = _align(words, labels, mode, max_length, stride)
    assert all(len(w.input_ids) <= max_length for w in windows)
    assert all(len(w.attention_mask) == len(w.input_ids) == len(w.labels) for w in windows)
    assert [w.window for w in windows] == list(range(len(windows)))
    assert all(w.num_windows == len(windows) for w in windows)
    assert stats.sentences == 1 and stats.windows == len(windows)
    assert stats.split == (1 if len(windows) > 1 else 0)
    assert words_from_subwords(windows, [w.labels for w in windows]) == labels


@HYPOTHESIS
@given(cases(), st.sampled_from(["first", "all", "last"]))
def test_inference_without_labels_still_marks_prediction_positions(case, mode):
    words, _, max_length, stride = case
    windows, _ = _align(words, None, mode, max_length, stride)
    assert all(label == IGNORE for w in windows for label in w.labels)
    predictions = [[-1 if word is None else 7 * word for word in w.word_ids] for w in windows]
    assert words_from_subwords(windows, predictions) == [7 * i for i in range(len(words))]


def test_long_sentence_with_long_words_round_trips_through_padded_tensor():
    words = ["unbelievable", "a" * 25, "playing", *["the", "cat", "played"] * 30, "babab"]
    labels = [i % 5 for i in range(len(words))]
    windows = align_labels(
        words, labels, TOKENIZER, max_length=10, stride=3, stats=TokenizationStats()
    )
    assert len(windows) > 10
    batch = collate(windows, PAD_ID)
    # predictions as a padded 2-D tensor, as a model's argmax would give
    assert words_from_subwords(windows, batch["labels"]) == labels


def test_first_window_labels_words_in_the_overlap():
    words = ["playing", "the", "cat", "played", "dog"]  # play ##ing the cat play ##ed dog
    windows = align_labels(
        words, [0, 1, 2, 3, 4], TOKENIZER, max_length=6, stride=2, stats=TokenizationStats()
    )
    assert [w.word_ids for w in windows] == [
        (None, 0, 0, 1, 2, None),
        (None, 1, 2, 3, 3, None),
        (None, 3, 3, 4, None),
    ]
    assert [w.labels for w in windows] == [
        (IGNORE, 0, IGNORE, 1, 2, IGNORE),
        (IGNORE, IGNORE, IGNORE, 3, IGNORE, IGNORE),
        (IGNORE, IGNORE, IGNORE, 4, IGNORE),
    ]


def test_empty_sentence_gives_one_window_of_special_tokens():
    windows = align_labels([], [], TOKENIZER)
    assert len(windows) == 1
    assert windows[0].word_ids == (None, None)
    assert words_from_subwords(windows, [windows[0].labels]) == []


# --------------------------------------------------------------------------------------------
# Errors


def test_slow_tokenizer_is_a_type_error():
    from transformers import PythonBackend

    class SlowWhitespace(PythonBackend):
        def __init__(self, **kwargs: Any) -> None:
            self.vocab = dict(VOCAB)
            super().__init__(unk_token="[UNK]", pad_token="[PAD]", **kwargs)

        def get_vocab(self) -> dict[str, int]:
            return dict(self.vocab)

        @property
        def vocab_size(self) -> int:
            return len(self.vocab)

        def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
            return text.split()

        def _convert_token_to_id(self, token: str) -> int:
            return self.vocab.get(token, self.vocab["[UNK]"])

        def _convert_id_to_token(self, index: int) -> str:
            return SPECIALS[index] if index < len(SPECIALS) else PIECES[index - len(SPECIALS)]

    slow = SlowWhitespace()
    assert not slow.is_fast
    with pytest.raises(TypeError, match="fast tokenizer"):
        align_labels(["the", "cat"], [0, 1], slow)
    with pytest.raises(TypeError, match="fast tokenizer"):
        encode_sentence_task("the cat", 0, slow)


def test_object_without_is_fast_is_a_type_error():
    with pytest.raises(TypeError, match="fast tokenizer"):
        align_labels(["the"], [0], object())


def test_word_with_no_subwords_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match=r"'\\x00' at position 2") as info:
        align_labels(["the", "cat", "\x00", "dog"], [0, 1, 2, 3], TOKENIZER)
    assert "no sub-words" in str(info.value)
    with pytest.raises(ValueError, match="no sub-words"):
        align_labels(["the", ""], None, TOKENIZER)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label_all": "middle"}, "label_all"),
        ({"max_length": 2}, "no room"),
        ({"max_length": 8, "stride": 6}, "stride"),
        ({"stride": -1}, "stride"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        align_labels(["the", "cat"], [0, 1], TOKENIZER, **kwargs)


def test_label_count_and_values_are_checked():
    with pytest.raises(ValueError, match="2 words but 1 label ids"):
        align_labels(["the", "cat"], [0], TOKENIZER)
    with pytest.raises(ValueError, match="ignore_index"):
        align_labels(["the", "cat"], [0, -3], TOKENIZER)
    with pytest.raises(TypeError, match="pre-split"):
        align_labels("the cat", None, TOKENIZER)


def test_words_from_subwords_rejects_incomplete_windows():
    words = ["the", "cat", "played"] * 10
    windows = align_labels(
        words, None, TOKENIZER, max_length=8, stride=2, stats=TokenizationStats()
    )
    rows = [list(w.labels) for w in windows]
    with pytest.raises(ValueError, match="windows"):
        words_from_subwords(windows[1:], rows[1:])
    with pytest.raises(ValueError, match="prediction rows"):
        words_from_subwords(windows, rows[:-1])
    with pytest.raises(ValueError, match="entries"):
        words_from_subwords(windows, [r[:2] for r in rows])


# --------------------------------------------------------------------------------------------
# Warnings and stats


def _sentences(lengths: Sequence[int]) -> list[TaggedSentence]:
    return [
        TaggedSentence(("the", "playing") * n, ("B", "I") * n, f"corpus.conll:{10 * i + 1}")
        for i, n in enumerate(lengths)
    ]


def test_corpus_warns_once_with_counts():
    label_map = LabelMap(["B", "I"])
    sentences = _sentences([2, 20, 1, 30, 3])  # 3 sub-words per pair: 2 long at max_length=16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoded, stats = tokenize_corpus(sentences, label_map, TOKENIZER, max_length=16, stride=4)
    long_warnings = [w for w in caught if issubclass(w.category, LongSequenceWarning)]
    assert len(long_warnings) == 1
    message = str(long_warnings[0].message)
    assert "2 of 5 sentences" in message and "max_length=16" in message
    assert "corpus.conll:11" in message
    assert long_warnings[0].filename == __file__  # points at the caller
    assert (stats.sentences, stats.split, stats.truncated) == (5, 2, 0)
    assert stats.windows == len(encoded)
    groups = group_by_sentence(encoded)
    assert [g[0].sentence for g in groups] == [0, 1, 2, 3, 4]
    for group, sentence in zip(groups, sentences, strict=True):
        predicted = words_from_subwords(group, [w.labels for w in group])
        assert label_map.decode_many(predicted) == list(sentence.tags)


def test_corpus_without_long_sentences_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, stats = tokenize_corpus(_sentences([1, 2]), LabelMap(["B", "I"]), TOKENIZER)
    assert stats.summary() is None


def test_corpus_warn_false_leaves_reporting_to_the_caller():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, stats = tokenize_corpus(
            _sentences([20]), LabelMap(["B", "I"]), TOKENIZER, max_length=16, stride=4, warn=False
        )
    assert stats.split == 1
    with pytest.warns(LongSequenceWarning, match="1 of 1 sentences"):
        assert stats.warn()


def test_single_long_sentence_warns_and_passed_stats_count_silently():
    words = ["the", "cat"] * 20
    with pytest.warns(LongSequenceWarning, match="1 of 1 sentences") as record:
        align_labels(words, None, TOKENIZER, max_length=10, stride=2)
    assert len(record) == 1
    stats = TokenizationStats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            align_labels(words, None, TOKENIZER, max_length=10, stride=2, stats=stats)
    assert (stats.sentences, stats.split) == (3, 3)


def test_corpus_errors_name_the_source():
    bad = TaggedSentence(("the", "\x00"), ("B", "I"), "train.conll:42")
    with pytest.raises(ValueError, match=r"^train\.conll:42: .*'\\x00' at position 1"):
        tokenize_corpus([bad], LabelMap(["B", "I"]), TOKENIZER)
    good = TaggedSentence(("the",), ("B",), "train.conll:1")
    mixed = [good, LabeledText("the cat", "B", "t.tsv:2")]
    with pytest.raises(TypeError, match="mixes"):
        tokenize_corpus(mixed, None, TOKENIZER)


# --------------------------------------------------------------------------------------------
# Sentence-level tasks


def test_sentence_task_truncates_with_counted_warning():
    text = " ".join(["the cat played"] * 5)  # 20 sub-words
    with pytest.warns(LongSequenceWarning, match=r"1 of 1 texts.*truncated \(12 sub-words"):
        item = encode_sentence_task(text, 3, TOKENIZER, max_length=10)
    assert len(item.input_ids) == 10 and item.labels == (3,) and item.kind == "sentence"
    assert item.input_ids[0] == VOCAB["[CLS]"] and item.input_ids[-1] == VOCAB["[SEP]"]

    texts = [LabeledText(text, "pos", "a.tsv:1"), LabeledText("the cat", "neg", "a.tsv:2")]
    label_map = LabelMap(["neg", "pos"], kind="sentence")
    with pytest.warns(LongSequenceWarning, match="1 of 2 texts") as record:
        encoded, stats = tokenize_corpus(texts, label_map, TOKENIZER, max_length=10)
    assert len(record) == 1
    assert (stats.truncated, stats.truncated_tokens, stats.split) == (1, 12, 0)
    assert [e.labels for e in encoded] == [(1,), (0,)]
    batch = collate(encoded, PAD_ID)
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].shape == (2, 10)


def test_short_sentence_task_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        item = encode_sentence_task("the cat", None, TOKENIZER)
    assert item.labels == (IGNORE,)
    assert item.input_ids == (VOCAB["[CLS]"], VOCAB["the"], VOCAB["cat"], VOCAB["[SEP]"])


# --------------------------------------------------------------------------------------------
# Collation


def test_collate_pads_to_the_longest():
    short = align_labels(["the"], [1], TOKENIZER)[0]
    long = align_labels(["playing", "aaaa"], [2, 3], TOKENIZER)[0]
    batch = collate([short, long], pad_token_id=PAD_ID)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.int64 and t.shape == (2, 8) for t in batch.values())
    assert batch["input_ids"][0].tolist() == [*short.input_ids, *[PAD_ID] * 5]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batch["labels"][0].tolist() == [IGNORE, 1, IGNORE, *[IGNORE] * 5]
    assert batch["input_ids"][1].tolist() == list(long.input_ids)
    assert batch["attention_mask"][1].tolist() == [1] * 8
    assert batch["labels"][1].tolist() == [IGNORE, 2, IGNORE, 3, IGNORE, IGNORE, IGNORE, IGNORE]


@HYPOTHESIS
@given(st.lists(word_lists, min_size=1, max_size=5))
def test_collate_property(sentences):
    items = [w for words in sentences for w in align_labels(words, None, TOKENIZER, max_length=512)]
    batch = collate(items, PAD_ID)
    longest = max(len(i.input_ids) for i in items)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        assert batch["input_ids"][row, :n].tolist() == list(item.input_ids)
        assert (batch["input_ids"][row, n:] == PAD_ID).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
        assert (batch["labels"][row, n:] == IGNORE).all()


def test_collate_rejects_empty_and_mixed_batches():
    token_item = align_labels(["the"], [0], TOKENIZER)[0]
    sentence_item = encode_sentence_task("the", 0, TOKENIZER)
    with pytest.raises(ValueError, match="empty"):
        collate([], PAD_ID)
    with pytest.raises(ValueError, match="mixes"):
        collate([token_item, sentence_item], PAD_ID)
