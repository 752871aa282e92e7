"""Corpora, tasks and labels, batching: the data layer (it knows nothing of weightings).

Readers stream the formats users have (CoNLL columns, CoNLL-U, ``word/TAG`` lines, CSV, TSV
and JSONL) and name file and line in every error; :class:`LabelMap` is a task's label set
with stable ids, saved beside every model; :class:`MultiTaskBatchSampler` mixes the tasks'
batches the two ways the methods need.
"""

from pyxtask.data.labels import LabelIdError, LabelMap, UnknownLabelError
from pyxtask.data.readers import (
    CorpusFormatError,
    LabeledText,
    TaggedSentence,
    read_conll,
    read_conllu,
    read_sentence_labels,
    read_word_tag,
)
from pyxtask.data.sampler import MultiTaskBatchSampler

__all__ = [
    "CorpusFormatError",
    "LabelIdError",
    "LabelMap",
    "LabeledText",
    "MultiTaskBatchSampler",
    "TaggedSentence",
    "UnknownLabelError",
    "read_conll",
    "read_conllu",
    "read_sentence_labels",
    "read_word_tag",
]
