"""``pyxtask tag``'s input and output formats (no torch here either).

Input: ``text`` (one sentence per line, split into words by the bundle's tokenizer), ``conll``
(one word per line in the first column — tab or whitespace separated — sentences separated by
blank lines, ``#`` comment lines skipped) or ``jsonl`` (one object per line with ``"text"`` or
``"words"``). A malformed line is reported with its file and line number and skipped; the rest
is still tagged. Output: ``conll`` (word, label, probability; sentence tasks: label and
probability per input) or ``jsonl`` (one object per input).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from pyxtask.serving.tagger import Tagged, Tagger

__all__ = ["INPUT_FORMATS", "OUTPUT_FORMATS", "Item", "read_items", "tag_stream", "write_result"]

INPUT_FORMATS = ("text", "conll", "jsonl")
OUTPUT_FORMATS = ("conll", "jsonl")


@dataclass
class Item:
    """One input: raw text or words, where it came from, and a JSON ``id`` if it had one."""

    value: str | list[str]
    source: str
    id: Any = None


def read_items(
    lines: Iterable[str], fmt: str, name: str, report: Callable[[str], None]
) -> Iterator[Item]:
    """Items of ``lines`` (a file or stdin called ``name``); bad lines go to ``report``."""
    if fmt not in INPUT_FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; expected one of {list(INPUT_FORMATS)}")
    words: list[str] = []
    first = 0
    number = 0
    for number, line in enumerate(lines, start=1):
        text = line.rstrip("\r\n")
        if fmt == "text":
            if text.strip():
                yield Item(text, f"{name}:{number}")
        elif fmt == "conll":
            if not text.strip():
                if words:
                    yield Item(words, f"{name}:{first}")
                words = []
            elif not text.startswith("#"):
                if not words:
                    first = number
                words.append(text.split("\t")[0].split()[0] if "\t" in text else text.split()[0])
        else:
            if not text.strip():
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
    if fmt == "conll" and words:
        yield Item(words, f"{name}:{first or number}")


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
        value = list(words) if problem is None else ""
    elif "text" in doc:
        text = doc["text"]
        if not isinstance(text, str):
            problem = "'text' must be a string"
        elif not text.strip():
            problem = "'text' is empty"
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


def tag_stream(
    tagger: Tagger,
    items: Iterable[Item],
    out: IO[str],
    fmt: str,
    *,
    chunk: int = 256,
    progress: bool = True,
) -> int:
    """Tag ``items`` in chunks (a progress bar counts sentences); return how many."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    count = 0
    bar = tqdm(desc="tagging", unit=" sentences", disable=not progress, file=sys.stderr)
    pending: list[Item] = []

    def flush() -> None:
        nonlocal count
        results = tagger.tag([item.value for item in pending])
        for item, result in zip(pending, results, strict=True):
            write_result(out, item, result, fmt)
        count += len(pending)
        bar.update(len(pending))
        pending.clear()

    for item in items:
        pending.append(item)
        if len(pending) >= chunk:
            flush()
    if pending:
        flush()
    bar.close()
    out.flush()
    return count
