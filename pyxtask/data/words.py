"""Word-level examples: one training example per word of a tagged corpus.

The TAWT paper's sample-weighted setting (App. B) weights *words*: each example is one word
in its sentence, labelled with that word's tag, the sentence's other words unlabelled context.
:func:`word_examples` draws such examples from a token task's sentences; a
:class:`WordExample` is a :class:`TaggedSentence` that also says which word carries the label,
so tokenization labels that word only (:func:`example_label_ids`) and every other part of the
pipeline reads it as a sentence.

Every word is an example. The paper takes only entity words; the closest here (capitalised,
alphabetic, not sentence-initial) are 85 % NNP in the WSJ test split, so a target model
predicts NNP for all of them, and evaluation scores every word of the dev and test sentences.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from pyxtask.data.corpora import sample_indices
from pyxtask.data.labels import LabelMap
from pyxtask.data.readers import TaggedSentence

__all__ = ["WordExample", "example_label_ids", "labelled_tags", "word_examples"]


@dataclass(frozen=True, slots=True)
class WordExample(TaggedSentence):
    """A sentence (or a stretch of it) of which only the word at ``position`` is labelled.

    ``tags`` keeps every word's tag (what the corpus says); only ``tags[position]`` is a
    training label.
    """

    position: int

    def __post_init__(self) -> None:
        if not 0 <= self.position < len(self.words):
            raise ValueError(
                f"{self.source}: labelled word {self.position} is outside the "
                f"{len(self.words)} words"
            )


def word_examples(
    sentences: Sequence[TaggedSentence], limit: int | None, seed: int, context: int | None = None
) -> list[WordExample]:
    """``limit`` words of ``sentences`` (all without a limit), a seeded sample in corpus order:
    the same ``(limit, seed)`` picks the same words of the same sentences on every machine (and
    for every task of one corpus).

    ``context``: the words kept each side of the labelled one (``None``: the whole sentence).
    An encoder that reads only a window of words around each word (``window-mlp``) gives the
    labelled word the same representation from that stretch as from the whole sentence, at a
    fraction of the cost. Each example's ``source`` names its sentence and word (1-based).
    """
    ends = list(accumulate(len(s.words) for s in sentences))
    total = ends[-1] if ends else 0
    out = []
    for flat in sample_indices(total, limit, seed):
        i = bisect_right(ends, flat)
        s = sentences[i]
        k = flat - (ends[i - 1] if i else 0)
        lo, hi = (0, len(s.words)) if context is None else (max(0, k - context), k + context + 1)
        out.append(WordExample(s.words[lo:hi], s.tags[lo:hi], f"{s.source} word {k + 1}", k - lo))
    return out


def labelled_tags(example: TaggedSentence) -> tuple[str, ...]:
    """The tags an example trains on: all of a sentence's, a word example's one."""
    if isinstance(example, WordExample):
        return (example.tags[example.position],)
    return example.tags


def example_label_ids(example: TaggedSentence, label_map: LabelMap) -> list[int]:
    """One id per word: the tag's, or :attr:`LabelMap.ignore_index` on a word example's
    unlabelled words."""
    if not isinstance(example, WordExample):
        return label_map.encode_many(example.tags)
    ids = [LabelMap.ignore_index] * len(example.words)
    ids[example.position] = label_map.encode(example.tags[example.position])
    return ids
