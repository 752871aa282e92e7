"""Tasks from a user's own files: a CoNLL, CoNLL-U, ``word/TAG``, CSV, TSV or JSONL file (or
train, dev and test files) wherever a named corpus's ``corpus.task`` works.

A :class:`FileTask` says where the files are and how to read them. It comes from a config's
``[tasks.NAME]`` table, from a corpus definition file (``.toml``, the same keys plus an
optional ``name``), or from a bare data file whose format its extension tells
(:func:`infer_task`). Splits missing from the files are carved out of the training file by
a seeded permutation (seed 0, so a run's seed never moves sentences between train and test).
A label that appears in dev or test but in no training sentence is an error naming its file
and line; with ``unseen_labels = "unknown"`` it becomes :data:`UNKNOWN_LABEL` instead, which
the model can never predict, so it counts as wrong, as it should.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

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

__all__ = [
    "FORMATS",
    "UNKNOWN_LABEL",
    "FileTask",
    "FileTaskError",
    "card",
    "file_task",
    "infer_task",
    "is_task_file",
    "load_definition",
    "read_splits",
]

FORMATS = ("conll", "conllu", "word-tag", "csv", "tsv", "jsonl")
#: The label a dev or test label unseen in training becomes with ``unseen_labels = "unknown"``.
UNKNOWN_LABEL = "<unknown>"
UNSEEN_LABELS = ("error", "unknown")
_SUFFIXES = {
    ".conll": "conll",
    ".conllx": "conll",
    ".bio": "conll",
    ".iob": "conll",
    ".conllu": "conllu",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
}
_TOKEN_FORMATS = ("conll", "conllu", "word-tag")
_SPLITS = ("train", "dev", "test")

Example = TaggedSentence | LabeledText


class FileTaskError(ValueError):
    """A task definition that cannot be used: a bad key or value, or a file that is missing."""


@dataclass(frozen=True)
class FileTask:
    """A task read from files. Only ``train`` is required; missing splits are carved from it.

    Paths are absolute once a definition is read (relative ones are taken from the config
    or definition file's folder), so a run's saved config finds them from anywhere.
    """

    train: str
    format: str
    #: ``"token"`` (a tag per word) or ``"sentence"`` (a label per text); the format's own
    #: kind when not given (JSONL: ``token`` when its first record has ``words``).
    kind: str = ""
    dev: str | None = None
    test: str | None = None
    #: Dev and test fractions carved from ``train`` when ``dev`` or ``test`` is not given.
    split: tuple[float, float] = (0.1, 0.1)
    encoding: str = "utf-8"
    #: CoNLL: the tag and word columns, and the column separator (none: any whitespace).
    tag_column: int = -1
    word_column: int = 0
    separator: str | None = None
    #: CoNLL-U: ``upos``, ``xpos``, ``deprel``, ``feats:<Key>`` or ``misc:<Key>``.
    field: str = "upos"
    #: CSV / TSV / JSONL: the text and label columns or keys (JSONL token tasks: the words
    #: and tags keys); CSV / TSV: whether the first row names the columns.
    text_field: str | int = "text"
    label_field: str | int = "label"
    header: bool = True

    def paths(self) -> dict[str, str]:
        """The files given, by split."""
        found = {"train": self.train, "dev": self.dev, "test": self.test}
        return {split: path for split, path in found.items() if path is not None}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if k == "split" else v for k, v in dataclasses.asdict(self).items()}


def is_task_file(name: str) -> bool:
    """Whether a task named ``name`` on the command line is a file rather than ``corpus.task``."""
    suffix = Path(name).suffix.lower()
    return suffix in _SUFFIXES or suffix == ".toml" or os.sep in name or "/" in name


def file_task(document: Mapping[str, Any], where: str, base: Path | None = None) -> FileTask:
    """A :class:`FileTask` from a mapping (``where`` names it in errors); relative paths are
    taken from ``base``."""
    fields = {f.name for f in dataclasses.fields(FileTask)}
    unknown = sorted(set(document) - fields)
    if unknown:
        raise FileTaskError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(fields)}")
    values = dict(document)
    if not isinstance(values.get("train"), str) or not values["train"]:
        raise FileTaskError(f"{where}: 'train' (the training file) is required")
    for split in _SPLITS:
        path = values.get(split)
        if path is None:
            continue
        if not isinstance(path, str) or not path:
            raise FileTaskError(f"{where}: {split} must be a file path, got {path!r}")
        values[split] = os.path.abspath(base / path if base is not None else path)
    values.setdefault("format", _SUFFIXES.get(Path(values["train"]).suffix.lower(), ""))
    if values["format"] not in FORMATS:
        raise FileTaskError(
            f"{where}: format = {values['format']!r} is not one of {list(FORMATS)} (set "
            "'format' when the extension does not tell)"
        )
    if "split" in values:
        values["split"] = _fractions(values["split"], where)
    try:
        task = FileTask(**values)
    except TypeError as exc:
        raise FileTaskError(f"{where}: {exc}") from None
    return _check(task, where)


def _fractions(value: Any, where: str) -> tuple[float, float]:
    ok = isinstance(value, list | tuple) and len(value) == 2
    if ok and all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
        dev, test = float(value[0]), float(value[1])
        if dev >= 0 and test >= 0 and dev + test < 1:
            return dev, test
    raise FileTaskError(
        f"{where}: split must be [dev, test] fractions of the training file that sum to less "
        f"than 1, got {value!r}"
    )


def _check(task: FileTask, where: str) -> FileTask:
    if task.kind not in ("", "token", "sentence"):
        raise FileTaskError(f"{where}: kind = {task.kind!r} is not 'token' or 'sentence'")
    if task.format in _TOKEN_FORMATS and task.kind == "sentence":
        raise FileTaskError(f"{where}: format {task.format!r} holds token tasks, not sentence")
    if task.format in ("csv", "tsv") and task.kind == "token":
        raise FileTaskError(f"{where}: format {task.format!r} holds sentence tasks, not token")
    try:
        "".encode(task.encoding)
    except LookupError:
        raise FileTaskError(f"{where}: unknown encoding {task.encoding!r}") from None
    return task


def infer_task(path: str) -> tuple[str, FileTask]:
    """The task a bare file stands for (its extension gives the format), or the one a corpus
    definition file (``.toml``) describes; with the name it goes by."""
    if Path(path).suffix.lower() == ".toml":
        return load_definition(path)
    if Path(path).suffix.lower() not in _SUFFIXES:
        raise FileTaskError(
            f"{path}: cannot tell the format from the extension (one of "
            f"{', '.join(sorted(_SUFFIXES))}); describe the task in a [tasks.NAME] table or a "
            "corpus definition file (.toml) with format = ..."
        )
    return _name_of(Path(path)), file_task({"train": path}, path)


def _name_of(path: Path) -> str:
    stem = path.stem if path.stem not in (*_SPLITS, "data", "all") else path.resolve().parent.name
    return stem.replace(".", "-") or "task"


def load_definition(path: str) -> tuple[str, FileTask]:
    """A corpus definition file: a TOML table of :class:`FileTask`'s keys and an optional
    ``name`` (default: the file's stem); paths are relative to the file's folder."""
    p = Path(path)
    try:
        document = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FileTaskError(f"{path}: cannot read the corpus definition: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FileTaskError(f"{path}: not valid TOML: {exc}") from None
    name = document.pop("name", p.stem)
    if not isinstance(name, str) or not name or "." in name:
        raise FileTaskError(f"{path}: name must be a non-empty string without dots, got {name!r}")
    return name, file_task(document, path, p.parent)


# --------------------------------------------------------------------------------------------
# Reading


def read_splits(task: FileTask, name: str) -> dict[str, list[Example]]:
    """Every example of each split (``train``, ``dev``, ``test``), read and carved."""
    read = {split: _read(task, path) for split, path in task.paths().items()}
    missing = [split for split in ("dev", "test") if split not in read]
    if missing:
        train = read["train"]
        names = _carve(len(train), task.split, missing)
        read["train"] = [e for e, s in zip(train, names, strict=True) if s == "train"]
        for split in missing:
            read[split] = [e for e, s in zip(train, names, strict=True) if s == split]
    if not read["train"]:
        raise FileTaskError(f"task {name!r}: {task.train} holds no training examples")
    return read


def _carve(count: int, fractions: tuple[float, float], missing: list[str]) -> list[str]:
    """Split names for ``count`` training examples: the missing splits' shares go to them."""
    order = list(range(count))
    random.Random(0).shuffle(order)
    names = ["train"] * count
    start = 0
    for split, fraction in zip(("dev", "test"), fractions, strict=True):
        if split not in missing:
            continue
        size = round(count * fraction)
        for index in order[start : start + size]:
            names[index] = split
        start += size
    return names


def _read(task: FileTask, path: str) -> list[Example]:
    if not os.path.isfile(path):
        raise FileTaskError(f"{path}: no such file")
    examples: Iterator[Example]
    if task.format == "conll":
        examples = read_conll(path, task.tag_column, task.word_column, task.separator,
                              encoding=task.encoding)  # fmt: skip
    elif task.format == "conllu":
        examples = read_conllu(path, task.field, encoding=task.encoding)
    elif task.format == "word-tag":
        examples = read_word_tag(path, task.separator or "/", encoding=task.encoding)
    elif task.format == "jsonl" and _kind(task, path) == "token":
        # A token task's JSONL keys default to words/tags, not the sentence task's text/label.
        words = "words" if task.text_field == "text" else str(task.text_field)
        tags = "tags" if task.label_field == "label" else str(task.label_field)
        examples = read_jsonl_tags(path, words, tags, encoding=task.encoding)
    else:
        examples = read_sentence_labels(path, task.text_field, task.label_field, task.format,
                                        encoding=task.encoding, header=task.header)  # fmt: skip
    try:
        return list(examples)
    except OSError as exc:
        raise FileTaskError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError as exc:
        if isinstance(exc, CorpusFormatError):
            raise
        raise FileTaskError(f"{path}: {exc}") from None


def kind_of(task: FileTask) -> str:
    """``"token"`` or ``"sentence"``: the task's own or its format's."""
    return _kind(task, task.train)


def _kind(task: FileTask, path: str) -> str:
    if task.kind:
        return task.kind
    if task.format in _TOKEN_FORMATS:
        return "token"
    if task.format != "jsonl":
        return "sentence"
    # JSONL holds both kinds: the first record's keys tell which.
    first = _first_record(path, task.encoding)
    return "token" if isinstance(first, dict) and "words" in first else "sentence"


def _first_record(path: str, encoding: str) -> Any:
    try:
        # Only a guess at the kind: the reader that follows names any real problem.
        with open(path, encoding=encoding, errors="replace") as f:
            for line in f:
                if line.strip():
                    return json.loads(line.lstrip("\ufeff"))
    except (OSError, ValueError, RecursionError):
        return None
    return None


# --------------------------------------------------------------------------------------------
# Labels


def label_of(example: Example) -> list[str]:
    return list(example.tags) if isinstance(example, TaggedSentence) else [example.label]


def check_labels(
    name: str, splits: dict[str, list[Example]], unseen: str
) -> dict[str, list[Example]]:
    """Dev and test whose labels all occur in training: an unseen one is an error naming its
    file and line, or (``unseen = "unknown"``) :data:`UNKNOWN_LABEL`."""
    known = {label for e in splits["train"] for label in label_of(e)}
    out = {"train": splits["train"]}
    for split in ("dev", "test"):
        out[split] = [_known(name, split, e, known, unseen) for e in splits[split]]
    return out


def _known(name: str, split: str, example: Example, known: set[str], unseen: str) -> Example:
    new = [label for label in label_of(example) if label not in known]
    if not new:
        return example
    if unseen != "unknown":
        raise FileTaskError(
            f"{example.source}: label {new[0]!r} of task {name!r} appears in {split} but in no "
            f"training example; add training examples with it, or set unseen_labels = "
            f'"unknown" to count it as {UNKNOWN_LABEL!r}'
        )
    if isinstance(example, TaggedSentence):
        tags = tuple(t if t in known else UNKNOWN_LABEL for t in example.tags)
        return TaggedSentence(example.words, tags, example.source)
    return LabeledText(example.text, UNKNOWN_LABEL, example.source)


# --------------------------------------------------------------------------------------------
# The card


def card(name: str, task: FileTask) -> str:
    """What ``pyxtask data info FILE`` prints: files, split sizes and labels with counts."""
    splits = read_splits(task, name)
    given = task.paths()
    lines = [f"{name}: {kind_of(task)} task, format {task.format}, encoding {task.encoding}"]
    for split in _SPLITS:
        examples = splits[split]
        where = given.get(split) or f"carved from train (seeded, {_share(task, split):.0%})"
        if kind_of(task) == "token":
            tokens = sum(len(e.words) for e in examples if isinstance(e, TaggedSentence))
            size = f"{len(examples):>8,} sentences {tokens:>10,} tokens"
        else:
            size = f"{len(examples):>8,} texts"
        lines.append(f"  {split:<6}{size}  {where}")
    counts = Counter(label for e in splits["train"] for label in label_of(e))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{label} {n:,}" for label, n in ranked[:20])
    more = f", ... ({len(ranked) - 20} more)" if len(ranked) > 20 else ""
    lines.append(f"labels ({len(ranked)} in train): {shown}{more}")
    unseen = {
        label
        for split in ("dev", "test")
        for e in splits[split]
        for label in label_of(e)
        if label not in counts
    }
    if unseen:
        lines.append(
            f"not in train ({len(unseen)}): {', '.join(sorted(unseen)[:20])} -- training stops "
            'on these unless unseen_labels = "unknown"'
        )
    return "\n".join(lines)


def _share(task: FileTask, split: str) -> float:
    return task.split[0] if split == "dev" else task.split[1]
