"""``pyxtask tag``'s input and output formats (no torch here either).

Input: ``text`` (one sentence per line, split into words by the bundle's tokenizer), ``conll``
(one word per line in the first column — tab or whitespace separated — sentences separated by
blank lines, ``#`` comment lines skipped) or ``jsonl`` (one object per line with ``"text"`` or
``"words"``). Output: ``conll`` (word, label, probability; sentence tasks: label and
probability per input) or ``jsonl`` (one object per input).

Nothing one bad piece of input can do stops the rest from being tagged; each problem is
reported (``file:line: problem``) and skipped:

- a malformed line (bad JSON, no ``text``/``words``, a lone surrogate escape) is skipped;
- input is read as bytes and decoded line by line (lines end at ``\\n``; a trailing ``\\r`` is
  dropped), so invalid UTF-8 costs one line: the first bad byte and its 0-based offset in the
  line are named. ``text`` and ``jsonl`` skip that line; ``conll`` keeps it with U+FFFD in place
  of the bad bytes, because dropping a word would shift every later row of the sentence
  against the input. A UTF-8 byte-order mark opening an input is removed;
- an input file that cannot be opened (or fails mid-read) is skipped, the others are read;
- a word with no label — empty, only whitespace, or turned into no sub-token at all by the
  bundle's tokenizer (``'\\u200b'``, ``'\\x00'``) — is named with its 1-based index. The rest
  of its sentence is still tagged (the model simply does not see it); the word itself is
  written with label ``_`` and probability 0 in CoNLL, ``null`` and 0 in JSONL.

Output is written after every chunk of sentences; a file (:class:`Output`) is written as
``FILE.partial`` and renamed onto ``FILE`` only when the run is complete, so ``FILE`` is never
half a run, and a run that stops early leaves what it had tagged in ``FILE.partial``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any

from pyxtask.serving.tagger import Tagged, Tagger

__all__ = [
    "INPUT_FORMATS",
    "OUTPUT_FORMATS",
    "Item",
    "Output",
    "read_inputs",
    "read_items",
    "tag_stream",
    "write_result",
]

INPUT_FORMATS = ("text", "conll", "jsonl")
OUTPUT_FORMATS = ("conll", "jsonl")

Report = Callable[[str], None]

_BOM = b"\xef\xbb\xbf"
# json.loads turns a "\ud800" escape into a lone surrogate, which no tokenizer or UTF-8
# writer accepts: such a line would otherwise end the run at tagging or writing time.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Item:
    """One input: raw text or words, where it came from, and a JSON ``id`` if it had one.

    ``lines``: each word's own line number (CoNLL input), so a warning about a word names it.
    """

    value: str | list[str]
    source: str
    id: Any = None
    lines: list[int] | None = None

    def word_source(self, index: int) -> str:
        if self.lines is None:
            return self.source
        return f"{self.source.rpartition(':')[0]}:{self.lines[index]}"


def read_inputs(
    names: Sequence[str],
    fmt: str,
    report: Report,
    *,
    opened: list[str] | None = None,
) -> Iterator[Item]:
    """Items of the files ``names`` in turn (``-``: stdin); one that cannot be opened is
    reported and skipped. The names that could be opened are appended to ``opened``."""
    if fmt not in INPUT_FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; expected one of {list(INPUT_FORMATS)}")
    for name in names:
        if name == "-":
            # A stdin replaced by a text stream (a notebook, a test) has no .buffer: read text.
            stdin = getattr(sys.stdin, "buffer", sys.stdin)
            if opened is not None:
                opened.append(name)
            yield from read_items(stdin, fmt, "<stdin>", report)
            continue
        try:
            f = open(name, "rb")  # noqa: SIM115 -- closed below; an open failure is reported
        except OSError as exc:
            report(f"{name}: cannot read: {exc.strerror or exc}; file skipped")
            continue
        with f:
            if opened is not None:
                opened.append(name)
            yield from read_items(f, fmt, name, report)


def read_items(lines: Iterable[bytes | str], fmt: str, name: str, report: Report) -> Iterator[Item]:
    """Items of ``lines`` (bytes or text of a file or stdin called ``name``); problems go to
    ``report`` and cost only their line (see the module's docstring)."""
    if fmt not in INPUT_FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; expected one of {list(INPUT_FORMATS)}")
    numbered = _decoded(lines, name, report, keep_bad=fmt == "conll")
    if fmt == "conll":
        yield from _conll_items(numbered, name)
    else:
        yield from _line_items(numbered, fmt, name, report)


def _decoded(
    lines: Iterable[bytes | str], name: str, report: Report, *, keep_bad: bool
) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line that decodes; a read error ends the input."""
    number = 0
    iterator = iter(lines)
    while True:
        try:
            raw = next(iterator)
        except StopIteration:
            return
        except OSError as exc:
            report(f"{name}:{number + 1}: cannot read: {exc.strerror or exc}; rest skipped")
            return
        number += 1
        text = _decode_line(raw, number, name, report, keep_bad=keep_bad)
        if text is not None:
            yield number, text.rstrip("\r\n")


def _decode_line(
    raw: bytes | str, number: int, name: str, report: Report, *, keep_bad: bool
) -> str | None:
    if isinstance(raw, str):
        return raw.removeprefix("\ufeff") if number == 1 else raw
    skip = len(_BOM) if number == 1 and raw.startswith(_BOM) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        problem = f"{name}:{number}: not valid UTF-8 (byte 0x{raw[offset]:02x} at offset {offset})"
        if not keep_bad:
            report(f"{problem}; line skipped")
            return None
        report(f"{problem}; read with U+FFFD in its place")
        return raw[skip:].decode("utf-8", "replace")


def _conll_items(numbered: Iterable[tuple[int, str]], name: str) -> Iterator[Item]:
    words: list[str] = []
    lines: list[int] = []
    for number, text in numbered:
        if not text.strip():
            if words:
                yield Item(words, f"{name}:{lines[0]}", lines=lines)
            words, lines = [], []
        elif not text.startswith("#"):
            words.append(text.split("\t")[0].split()[0] if "\t" in text else text.split()[0])
            lines.append(number)
    if words:
        yield Item(words, f"{name}:{lines[0]}", lines=lines)


def _line_items(
    numbered: Iterable[tuple[int, str]], fmt: str, name: str, report: Report
) -> Iterator[Item]:
    for number, text in numbered:
        if not text.strip():
            continue
        if fmt == "text":
            yield Item(text, f"{name}:{number}")
            continue
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            report(f"{name}:{number}: not valid JSON ({exc.msg}); line skipped")
            continue
        value = _json_value(doc)
        if isinstance(value, str) and value.startswith("error:"):
            report(f"{name}:{number}: {value[6:].strip()}; line skipped")
            continue
        yield Item(value, f"{name}:{number}", doc.get("id"))


def _json_value(doc: object) -> str | list[str]:
    """The words or text of a JSONL record, or ``"error: ..."`` saying what is wrong."""
    problem = None
    value: str | list[str] = ""
    if not isinstance(doc, dict):
        problem = "expected a JSON object with 'text' or 'words'"
    elif "words" in doc:
        words = doc["words"]
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            problem = "'words' must be a list of strings"
        elif not words:
            problem = "'words' is empty"
        elif any(_SURROGATE.search(w) for w in words):
            problem = "'words' holds a lone surrogate escape (not a character)"
        value = list(words) if problem is None else ""
    elif "text" in doc:
        text = doc["text"]
        if not isinstance(text, str):
            problem = "'text' must be a string"
        elif not text.strip():
            problem = "'text' is empty"
        elif _SURROGATE.search(text):
            problem = "'text' holds a lone surrogate escape (not a character)"
        value = text if problem is None else ""
    else:
        problem = "the object has neither 'text' nor 'words'"
    return f"error: {problem}" if problem is not None else value


def write_result(out: IO[str], item: Item, result: Tagged, fmt: str) -> None:
    if fmt == "jsonl":
        record: dict[str, Any] = {"source": item.source, **result.to_dict()}
        if item.id is not None:
            record["id"] = item.id
        if "words" not in record and isinstance(item.value, str):
            record["text"] = item.value
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    elif result.label is not None:
        out.write(f"{result.label}\t{result.score:.4f}\n")
    else:
        for word, label, score in zip(result.words, result.labels, result.scores, strict=True):
            out.write(f"{word}\t{label if label is not None else '_'}\t{score:.4f}\n")
        out.write("\n")


def report_untagged(item: Item, result: Tagged, report: Report) -> None:
    """Name each word of a token task that got no label (see the module's docstring)."""
    if result.label is not None or result.probabilities is not None:
        return
    for index, (word, label) in enumerate(zip(result.words, result.labels, strict=True)):
        if label is not None:
            continue
        where = f"{item.word_source(index)}: word {index + 1}"
        if not word:
            report(f"{where} is empty; left untagged")
        elif not word.strip():
            report(f"{where} ({word!r}) is only whitespace; left untagged")
        else:
            report(f"{where} ({word!r}) has no sub-token in the bundle's tokenizer; left untagged")


def tag_stream(
    tagger: Tagger,
    items: Iterable[Item],
    out: IO[str],
    fmt: str,
    *,
    chunk: int = 256,
    progress: bool = True,
    report: Report | None = None,
) -> int:
    """Tag ``items`` in chunks (a progress bar counts sentences); return how many.

    Each chunk is written and flushed as soon as it is tagged, so an error or interrupt
    loses only the chunk in hand. Words left untagged go to ``report``, if given.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    count = 0
    pending: list[Item] = []

    def flush() -> None:
        nonlocal count
        results = tagger.tag([item.value for item in pending])
        for item, result in zip(pending, results, strict=True):
            if report is not None:
                report_untagged(item, result, report)
            write_result(out, item, result, fmt)
        out.flush()
        count += len(pending)
        bar.update(len(pending))
        pending.clear()

    # disable=None: no bar when stderr is not a terminal (a log would keep every redraw).
    quiet = None if progress else True
    with tqdm(desc="tagging", unit=" sentences", disable=quiet, file=sys.stderr) as bar:
        for item in items:
            pending.append(item)
            if len(pending) >= chunk:
                flush()
        if pending:
            flush()
    return count


class Output:
    """Where ``pyxtask tag`` writes: stdout (``path`` None) or ``path``, via ``path.partial``.

    The partial file is renamed onto ``path`` when the ``with`` block ends normally, so an
    existing ``path`` is replaced only by a complete run; after an error or interrupt, what was
    written stays in ``path.partial`` (and ``report`` says so). :meth:`discard` drops it.
    """

    def __init__(self, path: str | None, report: Report) -> None:
        self.path = path
        self.partial = f"{path}.partial" if path is not None else None
        self.report = report
        self.stream: IO[str] = sys.stdout
        self._discard = False

    def __enter__(self) -> Output:
        if self.partial is not None:
            self.stream = open(self.partial, "w", encoding="utf-8")
        return self

    def discard(self) -> None:
        """Leave ``path`` as it was and remove the partial file."""
        self._discard = True

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.partial is None or self.path is None:
            return
        written = self.stream.tell() > 0
        self.stream.close()
        if kind is None and not self._discard:
            os.replace(self.partial, self.path)
        elif written and not self._discard:
            self.report(f"{self.path}: stopped early; the output so far is in {self.partial}")
        else:
            os.remove(self.partial)
