"""Corpora, tasks and labels, batching: the data layer (it knows nothing of weightings).

Readers stream the formats users have (CoNLL columns, CoNLL-U, ``word/TAG`` lines, CSV, TSV
and JSONL) and name file and line in every error; :class:`LabelMap` is a task's label set
with stable ids, saved beside every model; :mod:`~pyxtask.data.tokenization` aligns word
labels to a fast tokenizer's sub-words (windows for long sentences, counted warnings);
:class:`MultiTaskBatchSampler` mixes the tasks' batches the two ways the methods need.
"""

from pyxtask.data.labels import LabelIdError, LabelMap, UnknownLabelError
from pyxtask.data.readers import (
    CorpusFormatError,
    LabeledText,
    TaggedSentence,
    read_conll,
    read_conllu,
    read_jsonl_tags,
    read_sentence_labels,
    read_word_tag,
)
from pyxtask.data.sampler import MultiTaskBatchSampler
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

__all__ = [
    "CorpusFormatError",
    "Encoded",
    "LabelIdError",
    "LabelMap",
    "LabeledText",
    "LongSequenceWarning",
    "MultiTaskBatchSampler",
    "TaggedSentence",
    "TokenizationStats",
    "UnknownLabelError",
    "align_labels",
    "collate",
    "encode_sentence_task",
    "group_by_sentence",
    "read_conll",
    "read_conllu",
    "read_jsonl_tags",
    "read_sentence_labels",
    "read_word_tag",
    "tokenize_corpus",
    "words_from_subwords",
]
