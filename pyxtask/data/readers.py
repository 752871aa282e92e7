"""Streaming readers for the corpus formats users bring: CoNLL columns, CoNLL-U, ``word/TAG``
lines, and sentence-label tables (CSV, TSV, JSON lines).

Every reader is lazy: it returns an iterator that reads the file one sentence (or one record)
at a time, so a corpus never has to fit in memory, and a malformed record is reported only
when iteration reaches it. Arguments are checked when the reader is called; the file is
opened on the first ``next()``. Every problem in a file raises :class:`CorpusFormatError`,
whose ``str()`` is ``"path:line: message"`` so that editors and terminals can jump to it.
Files are read as UTF-8 unless ``encoding`` says otherwise; a leading byte-order mark is
dropped, and a byte the encoding cannot decode is such an error too, naming its offset.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import os
import re
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import conllu
from conllu.exceptions import ParseException

__all__ = [
    "CorpusFormatError",
    "LabeledText",
    "TaggedSentence",
    "UnknownLabelError",
    "read_conll",
    "read_conllu",
    "read_jsonl_tags",
    "read_sentence_labels",
    "read_word_tag",
]

PathLike = str | os.PathLike[str]

# How many known labels an UnknownLabelError lists before it says "and N more".
_MAX_LISTED_LABELS = 10


@dataclass(frozen=True, slots=True)
class TaggedSentence:
    """A sentence with one tag per word; ``source`` is ``"path:line"`` of its first line."""

    words: tuple[str, ...]
    tags: tuple[str, ...]
    source: str


@dataclass(frozen=True, slots=True)
class LabeledText:
    """A text with one label; ``source`` is ``"path:line"`` of the record's first line."""

    text: str
    label: str
    source: str


class CorpusFormatError(ValueError):
    """A corpus file does not have the expected format at ``path``, line ``line`` (1-based)."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line
        self.message = message

    def __reduce__(self) -> tuple[type[CorpusFormatError], tuple[str, int, str]]:
        # The default reduce would call __init__ with the formatted string alone, so errors
        # raised in DataLoader worker processes could not cross the process boundary.
        return (type(self), (self.path, self.line, self.message))


class UnknownLabelError(CorpusFormatError):
    """A label that is not in the ``labels`` collection given to the reader."""

    def __init__(self, path: str, line: int, label: str, known: Collection[str]) -> None:
        listed = sorted(known)
        shown = ", ".join(repr(k) for k in listed[:_MAX_LISTED_LABELS])
        if len(listed) > _MAX_LISTED_LABELS:
            shown += f", ... ({len(listed) - _MAX_LISTED_LABELS} more)"
        super().__init__(path, line, f"unknown label {label!r} (known labels: {shown})")
        self.label = label
        self.known: frozenset[str] = frozenset(known)

    def __reduce__(  # type: ignore[override]
        self,
    ) -> tuple[type[UnknownLabelError], tuple[str, int, str, frozenset[str]]]:
        return (type(self), (self.path, self.line, self.label, self.known))


# --------------------------------------------------------------------------------------------
# Decoding: every reader reads its lines through _open_text.

_ESCAPE_ERRORS = "pyxtask.readers.escape"
# What _escape_undecodable puts for each byte it cannot decode: U+DC00 + the byte.
_UNDECODABLE = re.compile("[\udc00-\udcff]")
_BOM = "\ufeff"
_UTF16_BOMS = ("\udcff\udcfe", "\udcfe\udcff")


def _escape_undecodable(error: UnicodeError) -> tuple[str, int]:
    # Unlike "surrogateescape", which refuses bytes below 0x80 (UTF-16 can leave those
    # undecodable), this marks every byte, so decoding never fails inside a read-ahead chunk,
    # lines keep their numbers, and _checked_lines reports the first marked byte in order.
    if not isinstance(error, UnicodeDecodeError):
        raise error
    marks = "".join(chr(0xDC00 + b) for b in error.object[error.start : error.end])
    return marks, error.end


codecs.register_error(_ESCAPE_ERRORS, _escape_undecodable)


def _text_encoding(encoding: str) -> str:
    """The codec to read ``encoding`` with; an unknown name fails here, at the reader's call.

    ``utf-8-sig`` is read as ``utf-8``, as every reader removes a leading byte-order mark
    itself; its bytes then still count in the offsets that decoding errors give.
    """
    name = codecs.lookup(encoding).name
    return "utf-8" if name == "utf-8-sig" else encoding


@contextmanager
def _open_text(path: str, encoding: str, newline: str | None = None) -> Iterator[Iterator[str]]:
    with open(path, encoding=encoding, errors=_ESCAPE_ERRORS, newline=newline) as f:
        yield _checked_lines(path, f, encoding)


def _checked_lines(path: str, lines: Iterable[str], encoding: str) -> Iterator[str]:
    """``lines`` without the first one's byte-order mark, failing at the first bad byte."""
    iterator = iter(lines)
    for number in itertools.count(1):
        try:
            line = next(iterator)
        except StopIteration:
            return
        except UnicodeError as e:  # the codec's own complaint: UTF-16 without byte-order mark
            raise CorpusFormatError(path, number, f"not valid {encoding}: {e}") from e
        # isascii() is far cheaper than the search, and most lines of most corpora pass it.
        bad = None if line.isascii() else _UNDECODABLE.search(line)
        if bad:
            raise _decoding_error(path, number, line, bad.start(), encoding)
        yield line[1:] if number == 1 and line.startswith(_BOM) else line


def _decoding_error(
    path: str, number: int, line: str, index: int, encoding: str
) -> CorpusFormatError:
    byte = ord(line[index]) - 0xDC00
    # The encoder's own prefix (a UTF-16 byte-order mark) is not part of any line.
    offset = len(line[:index].encode(encoding, "replace")) - len("".encode(encoding))
    if codecs.lookup(encoding).name != "utf-8":
        what, hint = f"not valid {encoding}", ""
    elif number == 1 and line.startswith(_UTF16_BOMS):
        what, hint = "not valid UTF-8", '; it starts like UTF-16, so pass encoding="utf-16"'
    else:
        what, hint = "not valid UTF-8", '; pass encoding="latin-1" if the file is Latin-1'
    return CorpusFormatError(
        path, number, f"{what} (byte 0x{byte:02x} at offset {offset} of the line{hint})"
    )


def _label_set(labels: Collection[str] | None) -> frozenset[str] | None:
    # A frozenset makes each membership test O(1) even when the caller passes a list.
    return None if labels is None else frozenset(labels)


def _check_label(path: str, line: int, label: str, known: frozenset[str] | None) -> None:
    if known is not None and label not in known:
        raise UnknownLabelError(path, line, label, known)


# --------------------------------------------------------------------------------------------
# CoNLL columns


def read_conll(
    path: PathLike,
    tag_column: int = -1,
    word_column: int = 0,
    separator: str | None = None,
    labels: Collection[str] | None = None,
    *,
    encoding: str = "utf-8",
) -> Iterator[TaggedSentence]:
    """Read a CoNLL column file (one token per line, a blank line between sentences).

    ``separator=None`` splits on any run of whitespace; ``"\\t"`` (or any other string)
    splits on exactly that string, so fields may contain spaces. Lines starting with
    ``-DOCSTART-`` are document boundaries and are skipped. Every token line must have the
    column count of the first token line of the file. With ``labels`` given, a tag outside
    it raises :class:`UnknownLabelError`.
    """
    if separator == "":
        raise ValueError("separator must be None (any whitespace) or a non-empty string")
    if word_column == tag_column:
        raise ValueError(f"word_column and tag_column are both {word_column}")
    return _iter_conll(
        os.fspath(path),
        tag_column=tag_column,
        word_column=word_column,
        separator=separator,
        known=_label_set(labels),
        encoding=_text_encoding(encoding),
    )


def _iter_conll(
    path: str,
    *,
    tag_column: int,
    word_column: int,
    separator: str | None,
    known: frozenset[str] | None,
    encoding: str,
) -> Iterator[TaggedSentence]:
    words: list[str] = []
    tags: list[str] = []
    start = 0
    expected: int | None = None  # the column count fixed by the first token line
    expected_line = 0
    with _open_text(path, encoding) as lines:
        for number, raw in enumerate(lines, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip() or line.startswith("-DOCSTART-"):
                if words:
                    yield TaggedSentence(tuple(words), tuple(tags), f"{path}:{start}")
                    words, tags = [], []
                continue
            fields = line.split(separator)
            if expected is None:
                _check_conll_columns(path, number, len(fields), word_column, tag_column)
                expected, expected_line = len(fields), number
            elif len(fields) != expected:
                raise CorpusFormatError(
                    path,
                    number,
                    f"expected {expected} columns (as on line {expected_line}), got {len(fields)}",
                )
            word, tag = fields[word_column], fields[tag_column]
            if not word:
                raise CorpusFormatError(path, number, f"empty word in column {word_column}")
            if not tag:
                raise CorpusFormatError(path, number, f"token {word!r} has an empty tag")
            _check_label(path, number, tag, known)
            if not words:
                start = number
            words.append(word)
            tags.append(tag)
        if words:
            yield TaggedSentence(tuple(words), tuple(tags), f"{path}:{start}")


def _check_conll_columns(
    path: str, line: int, count: int, word_column: int, tag_column: int
) -> None:
    # A negative index -k needs k columns, a non-negative index i needs i + 1; and a word
    # with its tag always takes two.
    need = max(2, *(-c if c < 0 else c + 1 for c in (word_column, tag_column)))
    if count < need:
        raise CorpusFormatError(
            path,
            line,
            f"expected at least {need} columns for word column {word_column} and "
            f"tag column {tag_column}, got {count}",
        )
    if word_column % count == tag_column % count:
        raise CorpusFormatError(
            path,
            line,
            f"word column {word_column} and tag column {tag_column} are the same column "
            f"in a line of {count} columns",
        )


# --------------------------------------------------------------------------------------------
# CoNLL-U

_CONLLU_PLAIN_FIELDS = ("upos", "xpos", "deprel")
_CONLLU_COLUMNS = 10
_GLOBAL_COLUMNS = "# global.columns = "
# How many tab-separated columns a token line must have, and the line of the CoNLL-U Plus
# "# global.columns" comment that said so (0: none did, CoNLL-U's ten).
_Columns = tuple[int, int]


class _LineTracker:
    """A line source for ``conllu.parse_incr`` that remembers the current block's lines.

    ``conllu`` keeps no line numbers. Its sentence splitter reads up to and including the
    blank line that ends a sentence before it yields, and does not read ahead further, so
    when a sentence (or its parse error) comes out, ``block`` still holds that sentence's
    ``(line number, text)`` pairs.
    """

    def __init__(self, lines: Iterable[str]) -> None:
        self._lines = lines
        self.block: list[tuple[int, str]] = []

    def read(self, size: int = -1) -> str:  # pragma: no cover - parse_incr only checks for it
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        after_blank = True
        for number, line in enumerate(self._lines, start=1):
            if not line.strip():
                after_blank = True
            else:
                if after_blank:
                    self.block = []
                    after_blank = False
                self.block.append((number, line))
            yield line


def read_conllu(
    path: PathLike,
    field: str = "upos",
    labels: Collection[str] | None = None,
    *,
    encoding: str = "utf-8",
) -> Iterator[TaggedSentence]:
    """Read a CoNLL-U file with ``conllu.parse_incr``, tagging each word with ``field``.

    ``field`` is ``"upos"``, ``"xpos"``, ``"deprel"``, ``"feats:<Key>"`` or ``"misc:<Key>"``;
    a token without that feature (or MISC key) gets the tag ``"_"``, while a token whose
    upos/xpos/deprel is missing or ``_`` is an error. Every token line must have the ten
    tab-separated columns. Multiword-token ranges (``3-4``) and empty nodes (``3.1``) are
    skipped, so ``words`` are the syntactic words. ``source`` points at the sentence's first
    line, its ``# sent_id`` comment if it has one.
    """
    prefix, _, key = field.partition(":")
    if not (
        (field in _CONLLU_PLAIN_FIELDS) or (prefix in ("feats", "misc") and key and ":" not in key)
    ):
        raise ValueError(
            f"field must be one of {', '.join(_CONLLU_PLAIN_FIELDS)}, 'feats:<Key>' or "
            f"'misc:<Key>', got {field!r}"
        )
    return _iter_conllu(os.fspath(path), field, _label_set(labels), _text_encoding(encoding))


def _iter_conllu(
    path: str, field: str, known: frozenset[str] | None, encoding: str
) -> Iterator[TaggedSentence]:
    with _open_text(path, encoding) as lines:
        tracker = _LineTracker(lines)
        sentences = iter(conllu.parse_incr(cast(TextIO, tracker)))
        columns: _Columns = (_CONLLU_COLUMNS, 0)
        while True:
            try:
                sentence = next(sentences)
            except StopIteration:
                return
            except CorpusFormatError:
                raise  # from the line source, already located
            # conllu lets int() fail with a ValueError on IDs or heads of over 4300 digits.
            except (ParseException, ValueError) as e:
                columns = _declared_columns(tracker.block, columns)
                raise _locate_conllu_error(path, tracker.block, columns, e) from e
            columns = _declared_columns(tracker.block, columns)
            yield _conllu_tagged(path, sentence, tracker.block, columns, field=field, known=known)


def _conllu_tagged(
    path: str,
    sentence: conllu.TokenList,
    block: list[tuple[int, str]],
    columns: _Columns,
    *,
    field: str,
    known: frozenset[str] | None,
) -> TaggedSentence:
    # conllu accepts a line of too few columns, or one split at runs of spaces, silently.
    column_error = _conllu_column_error(path, block, columns)
    if column_error:
        raise column_error
    prefix, _, key = field.partition(":")
    # parse_incr moves comments in front but keeps token lines in order, so the i-th token
    # is the i-th non-comment line of the block.
    token_lines = [n for n, text in block if not _is_conllu_comment(text)]
    words: list[str] = []
    tags: list[str] = []
    for token, number in zip(sentence, token_lines, strict=True):
        if isinstance(token.get("id"), tuple):
            continue  # a multiword range or an empty node, not a syntactic word
        form = str(token.get("form") or "_")
        if key:
            features = token.get(prefix)
            value = features.get(key) if isinstance(features, dict) else None
            tag = "_" if value is None or value == "" else str(value)
        else:
            value = token.get(field)
            if value in (None, "", "_"):
                raise CorpusFormatError(path, number, f"token {form!r} has no {field}")
            tag = str(value)
        _check_label(path, number, tag, known)
        words.append(form)
        tags.append(tag)
    start = block[0][0]
    if not words:
        # Only comments, multiword ranges or empty nodes: nothing to tag, and nothing a user
        # would want skipped without being told.
        raise CorpusFormatError(path, start, "empty sentence (no syntactic words)")
    return TaggedSentence(tuple(words), tuple(tags), f"{path}:{start}")


def _is_conllu_comment(text: str) -> bool:
    # conllu strips each line before it looks for the '#', so an indented comment is one too.
    return text.lstrip().startswith("#")


def _declared_columns(block: list[tuple[int, str]], columns: _Columns) -> _Columns:
    # As conllu does: the block's first "# global.columns = " comment, unindented (but for
    # the block's first line, which conllu strips), sets the columns from this block on.
    for i, (number, text) in enumerate(block):
        if (text.lstrip() if i == 0 else text).startswith(_GLOBAL_COLUMNS):
            names = text.split("=", 1)[1].split()
            return (len(names), number) if names else (_CONLLU_COLUMNS, 0)
    return columns


def _conllu_column_error(
    path: str, block: list[tuple[int, str]], columns: _Columns
) -> CorpusFormatError | None:
    expected, declared_on = columns
    for number, text in block:
        if _is_conllu_comment(text):
            continue
        count = text.rstrip("\r\n").count("\t") + 1
        if count != expected:
            why = " (the line has no tab)" if count == 1 else ""
            where = f" (as # global.columns on line {declared_on} declares)" if declared_on else ""
            return CorpusFormatError(
                path,
                number,
                f"expected {expected} tab-separated columns{where}, found {count}{why}",
            )
    return None


def _locate_conllu_error(
    path: str, block: list[tuple[int, str]], columns: _Columns, error: Exception
) -> CorpusFormatError:
    # conllu reports a failed sentence without saying which line; parsing the block's lines
    # one at a time finds the culprit (falling back to the sentence's first line). A line of
    # the wrong shape is the likelier cause, and its message the clearer one.
    column_error = _conllu_column_error(path, block, columns)
    if column_error:
        return column_error
    for number, text in block:
        try:
            conllu.parse_token_and_metadata(text.strip())
        except (ParseException, ValueError) as line_error:
            return CorpusFormatError(path, number, str(line_error))
    return CorpusFormatError(path, block[0][0] if block else 1, str(error))


# --------------------------------------------------------------------------------------------
# word/TAG lines


def read_word_tag(
    path: PathLike,
    separator: str = "/",
    labels: Collection[str] | None = None,
    *,
    encoding: str = "utf-8",
) -> Iterator[TaggedSentence]:
    """Read one sentence per line of whitespace-separated ``word/TAG`` tokens (Brown, WSJ).

    Each token splits at the *last* ``separator``, so words may contain it (``1/2/CD`` is
    the word ``1/2`` tagged ``CD``). Blank lines are skipped.
    """
    if not separator or any(c.isspace() for c in separator):
        raise ValueError(f"separator must be non-empty and without whitespace, got {separator!r}")
    return _iter_word_tag(os.fspath(path), separator, _label_set(labels), _text_encoding(encoding))


def _iter_word_tag(
    path: str, separator: str, known: frozenset[str] | None, encoding: str
) -> Iterator[TaggedSentence]:
    with _open_text(path, encoding) as lines:
        for number, line in enumerate(lines, start=1):
            tokens = line.split()
            if not tokens:
                continue
            words: list[str] = []
            tags: list[str] = []
            for token in tokens:
                word, sep, tag = token.rpartition(separator)
                if not sep:
                    raise CorpusFormatError(
                        path, number, f"token {token!r} has no {separator!r} separator"
                    )
                if not word:
                    raise CorpusFormatError(path, number, f"token {token!r} has an empty word")
                if not tag:
                    raise CorpusFormatError(path, number, f"token {token!r} has an empty tag")
                _check_label(path, number, tag, known)
                words.append(word)
                tags.append(tag)
            yield TaggedSentence(tuple(words), tuple(tags), f"{path}:{number}")


# --------------------------------------------------------------------------------------------
# Sentence labels: CSV, TSV, JSON lines

_FORMAT_BY_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
_FORMATS = ("csv", "tsv", "jsonl")


def read_sentence_labels(  # noqa: PLR0917 -- the documented positional signature
    path: PathLike,
    text_field: str | int = "text",
    label_field: str | int = "label",
    format: str | None = None,
    labels: Collection[str] | None = None,
    encoding: str = "utf-8",
    *,
    header: bool = True,
) -> Iterator[LabeledText]:
    """Read (text, label) records for sentence classification from CSV, TSV or JSON lines.

    The format comes from ``format`` (``"csv"``, ``"tsv"``, ``"jsonl"``) or else from the
    extension (``.csv``, ``.tsv``, ``.jsonl``/``.json``, the latter as one object per
    line). CSV and TSV have a header row unless ``header=False``; fields are column names,
    or integer column indices (required without a header). TSV is read without quote
    processing, as NLP TSVs (GLUE, SST) carry bare quote characters inside sentences. In
    JSON lines an integer label is turned into its string (``1`` -> ``"1"``).
    """
    spath = os.fspath(path)
    if format is None:
        suffix = Path(spath).suffix.lower()
        if suffix not in _FORMAT_BY_SUFFIX:
            raise ValueError(
                f"cannot tell the format of {spath!r} from its extension; pass format= one of "
                f"{', '.join(_FORMATS)}"
            )
        fmt = _FORMAT_BY_SUFFIX[suffix]
    else:
        fmt = "jsonl" if format == "json" else format
        if fmt not in _FORMATS:
            raise ValueError(f"format must be one of {', '.join(_FORMATS)}, got {format!r}")
    for name, value in (("text_field", text_field), ("label_field", label_field)):
        if isinstance(value, int):
            if fmt == "jsonl":
                raise ValueError(f"{name} must be a key (str) for JSON lines, got {value}")
            if value < 0:
                raise ValueError(f"{name} must be a non-negative column index, got {value}")
        elif not header and fmt != "jsonl":
            raise ValueError(f"{name} must be a column index (int) when header=False")
    known = _label_set(labels)
    encoding = _text_encoding(encoding)
    if fmt == "jsonl":
        return _iter_jsonl(spath, str(text_field), str(label_field), known, encoding)
    return _iter_table(
        spath,
        fmt=fmt,
        text_field=text_field,
        label_field=label_field,
        header=header,
        known=known,
        encoding=encoding,
    )


def _iter_table(
    path: str,
    *,
    fmt: str,
    text_field: str | int,
    label_field: str | int,
    header: bool,
    known: frozenset[str] | None,
    encoding: str,
) -> Iterator[LabeledText]:
    with _open_text(path, encoding, newline="") as lines:
        expected: int | None = None  # the column count fixed by the header or first row
        expected_where = ""
        text_index = label_index = 0
        for number, row in _table_rows(path, lines, fmt):
            if expected is None:
                expected = len(row)
                expected_where = f"the header on line {number}" if header else f"line {number}"
                text_index = _column_index(path, number, text_field, row, header)
                label_index = _column_index(path, number, label_field, row, header)
                if header:
                    continue
            elif len(row) != expected:
                raise CorpusFormatError(
                    path,
                    number,
                    f"expected {expected} columns (as in {expected_where}), got {len(row)}",
                )
            yield _labeled(path, number, row[text_index], row[label_index], known)


def _table_rows(path: str, lines: Iterator[str], fmt: str) -> Iterator[tuple[int, list[str]]]:
    """Each non-blank row with the number of its first line (a quoted field may span lines)."""
    if fmt == "tsv":
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(lines)
    end = 0  # reader.line_num after the previous row
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # a field over csv.field_size_limit(), say
            raise CorpusFormatError(path, reader.line_num, f"malformed {fmt.upper()}: {e}") from e
        number, end = end + 1, reader.line_num
        if row:  # else a blank line
            yield number, row


def _column_index(path: str, line: int, field: str | int, row: list[str], header: bool) -> int:
    if isinstance(field, int):
        if field >= len(row):
            where = "the header has" if header else "the line has"
            raise CorpusFormatError(path, line, f"no column {field}: {where} {len(row)} columns")
        return field
    if field not in row:
        names = ", ".join(repr(h) for h in row)
        raise CorpusFormatError(path, line, f"no column {field!r} in the header ({names})")
    return row.index(field)


def _labeled(
    path: str, line: int, text: str, label: str, known: frozenset[str] | None
) -> LabeledText:
    if not text.strip():
        raise CorpusFormatError(path, line, "empty text")
    if not label:
        raise CorpusFormatError(path, line, "empty label")
    _check_label(path, line, label, known)
    return LabeledText(text, label, f"{path}:{line}")


def _json_records(path: str, encoding: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines file."""
    with _open_text(path, encoding) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise CorpusFormatError(
                    path, number, f"malformed JSON: {e.msg} (column {e.colno})"
                ) from e
            except RecursionError as e:
                raise CorpusFormatError(path, number, "malformed JSON: nested too deeply") from e
            except ValueError as e:  # an integer of more digits than int() takes
                raise CorpusFormatError(path, number, f"malformed JSON: {e}") from e
            if not isinstance(record, dict):
                raise CorpusFormatError(
                    path, number, f"expected a JSON object, got {type(record).__name__}"
                )
            yield number, record


def _iter_jsonl(
    path: str, text_field: str, label_field: str, known: frozenset[str] | None, encoding: str
) -> Iterator[LabeledText]:
    for number, record in _json_records(path, encoding):
        for name in (text_field, label_field):
            if name not in record:
                raise CorpusFormatError(path, number, f"no field {name!r}")
        text, label = record[text_field], record[label_field]
        if not isinstance(text, str):
            raise CorpusFormatError(
                path, number, f"field {text_field!r} is {type(text).__name__}, not a string"
            )
        # bool is an int subclass, but true/false labels are almost surely a mistake.
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str):
            raise CorpusFormatError(
                path,
                number,
                f"field {label_field!r} is {type(label).__name__}, not a string or an integer",
            )
        yield _labeled(path, number, text, label, known)


def read_jsonl_tags(
    path: PathLike,
    words_field: str = "words",
    tags_field: str = "tags",
    labels: Collection[str] | None = None,
    *,
    encoding: str = "utf-8",
) -> Iterator[TaggedSentence]:
    """Read a token task from JSON lines: one object per sentence with a list of words and
    a list of as many tags (``{"words": ["John", "runs"], "tags": ["B-PER", "O"]}``)."""
    return _iter_jsonl_tags(
        os.fspath(path), words_field, tags_field, _label_set(labels), _text_encoding(encoding)
    )


def _iter_jsonl_tags(
    path: str, words_field: str, tags_field: str, known: frozenset[str] | None, encoding: str
) -> Iterator[TaggedSentence]:
    for number, record in _json_records(path, encoding):
        words = _string_list(path, number, record, words_field)
        tags = _string_list(path, number, record, tags_field)
        if len(words) != len(tags):
            raise CorpusFormatError(path, number, f"{len(words)} words but {len(tags)} tags")
        for tag in tags:
            _check_label(path, number, tag, known)
        yield TaggedSentence(tuple(words), tuple(tags), f"{path}:{number}")


def _string_list(path: str, number: int, record: dict[str, Any], name: str) -> list[str]:
    value = record.get(name)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise CorpusFormatError(
            path, number, f"field {name!r} must be a non-empty list of non-empty strings"
        )
    return value
