"""Label maps: the label set of one task, with stable integer ids.

A :class:`LabelMap` is saved beside every model (:meth:`LabelMap.save`) and reloaded exactly
(:meth:`LabelMap.load`), so that the ids a checkpoint was trained with decode to the same
labels later. Ids are the positions of the labels in the order the caller gives;
:meth:`LabelMap.from_corpus` builds one sorted by label string, for determinism.

Positions that carry no label (sub-words after the first, padding) use
:attr:`LabelMap.ignore_index` (``-100``, the default ``ignore_index`` of
:func:`torch.nn.functional.cross_entropy`); it is never a valid id.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, cast

__all__ = ["FORMAT", "VERSION", "LabelIdError", "LabelMap", "UnknownLabelError"]

FORMAT = "pyxtask.labels"
VERSION = 1
_KINDS = ("token", "sentence")
_MAX_SHOWN = 10

Kind = Literal["token", "sentence"]


class _ArrayLike(Protocol):
    """A 1-D torch tensor or numpy array (anything with ``ndim`` and ``tolist``)."""

    @property
    def ndim(self) -> int: ...

    def tolist(self) -> Any: ...


def _task(name: str) -> str:
    return f"task {name!r}" if name else "an unnamed task"


class UnknownLabelError(KeyError):
    """A label that is not in the task's label map (a :class:`KeyError`)."""

    def __init__(self, label: str, task: str, known: Sequence[str]) -> None:
        shown = ", ".join(repr(k) for k in known[:_MAX_SHOWN])
        more = f", ... ({len(known) - _MAX_SHOWN} more)" if len(known) > _MAX_SHOWN else ""
        self.label = label
        self.task = task
        self.message = (
            f"unknown label {label!r} for {_task(task)}; {len(known)} known labels: {shown}{more}"
        )
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return self.message


class LabelIdError(IndexError):
    """A label id outside ``[0, len(label_map))`` (an :class:`IndexError`)."""

    def __init__(self, label_id: int, size: int, task: str) -> None:
        self.label_id = label_id
        self.size = size
        self.task = task
        hint = ""
        if label_id == LabelMap.ignore_index:
            hint = f" ({label_id} is LabelMap.ignore_index, which marks positions with no label)"
        super().__init__(f"label id {label_id} is out of range [0, {size}) for {_task(task)}{hint}")


def _as_id(value: object) -> int:
    if isinstance(value, bool):
        raise TypeError(f"label ids must be integers, not bool ({value!r})")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"label ids must be integers, not {type(value).__name__} ({value!r})"
        ) from None


class LabelMap:
    """The labels of one task; the id of a label is its position in ``labels``.

    Args:
        labels: the labels, in id order. Each must be a non-empty string, encodable as
            UTF-8, and appear once.
        name: the task's name (used in error messages and saved with the labels).
        kind: ``"token"`` (one label per token) or ``"sentence"`` (one per example).
    """

    ignore_index: ClassVar[int] = -100
    """The id of positions that carry no label; matches torch's ``cross_entropy`` default."""

    __slots__ = ("_index", "_kind", "_labels", "_name")

    def __init__(self, labels: Sequence[str], name: str = "", kind: Kind = "token") -> None:
        if isinstance(labels, str):
            raise TypeError("labels must be a sequence of strings, not a single string")
        if not isinstance(name, str):
            raise TypeError(f"name must be a string, not {type(name).__name__}")
        if kind not in _KINDS:
            raise ValueError(f"kind must be 'token' or 'sentence', not {kind!r}")
        labels = tuple(labels)
        for label in labels:
            if not isinstance(label, str):
                raise TypeError(
                    f"labels of {_task(name)} must be strings, got {type(label).__name__} "
                    f"({label!r})"
                )
        if not labels:
            raise ValueError(f"{_task(name)} has no labels")
        if any(label == "" for label in labels):
            positions = [i for i, label in enumerate(labels) if label == ""]
            raise ValueError(f"empty label at position(s) {positions} in {_task(name)}")
        for label in labels:
            try:
                label.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f"label {label!r} of {_task(name)} cannot be encoded as UTF-8"
                ) from None
        index: dict[str, int] = {}
        duplicates: list[str] = []
        for i, label in enumerate(labels):
            if label in index and label not in duplicates:
                duplicates.append(label)
            index.setdefault(label, i)
        if duplicates:
            raise ValueError(
                f"duplicate label(s) in {_task(name)}: {', '.join(map(repr, duplicates))}"
            )
        self._labels: tuple[str, ...] = labels
        self._index = index
        self._name = name
        self._kind: Kind = kind

    @classmethod
    def from_corpus(
        cls, items: Iterable[str | Iterable[str]], name: str = "", kind: Kind = "token"
    ) -> LabelMap:
        """The labels seen in ``items``, sorted by label string (so ids are deterministic).

        ``items`` holds labels (sentence tasks) or sequences of labels (token tasks), or a
        mix of both.
        """
        seen: set[str] = set()
        for item in items:
            if isinstance(item, str):
                seen.add(item)
            else:
                seen.update(item)
        return cls(sorted(seen), name=name, kind=kind)

    # -- accessors ----------------------------------------------------------------------------

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels, in id order."""
        return self._labels

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> Kind:
        return self._kind

    def __len__(self) -> int:
        return len(self._labels)

    def __contains__(self, label: object) -> bool:
        return isinstance(label, str) and label in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._labels)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelMap):
            return NotImplemented
        return (self._labels, self._name, self._kind) == (other._labels, other._name, other._kind)

    def __hash__(self) -> int:
        return hash((self._labels, self._name, self._kind))

    def __repr__(self) -> str:
        return f"LabelMap({list(self._labels)!r}, name={self._name!r}, kind={self._kind!r})"

    # -- encoding -----------------------------------------------------------------------------

    def encode(self, label: str) -> int:
        """The id of ``label``; :class:`UnknownLabelError` if it is not in the map."""
        if not isinstance(label, str):
            raise TypeError(f"labels are strings, not {type(label).__name__} ({label!r})")
        try:
            return self._index[label]
        except KeyError:
            raise UnknownLabelError(label, self._name, self._labels) from None

    def decode(self, label_id: int) -> str:
        """The label with id ``label_id``; :class:`LabelIdError` if it is out of range."""
        i = _as_id(label_id)
        if not 0 <= i < len(self._labels):
            raise LabelIdError(i, len(self._labels), self._name)
        return self._labels[i]

    def encode_many(self, labels: Iterable[str]) -> list[int]:
        """The ids of ``labels``, in order."""
        if isinstance(labels, str):
            raise TypeError("encode_many takes a sequence of labels, not a single string")
        return [self.encode(label) for label in labels]

    def decode_many(self, ids: Iterable[int] | _ArrayLike) -> list[str]:
        """The labels of ``ids``: a list of ints or a 1-D integer tensor/array."""
        if hasattr(ids, "ndim") and hasattr(ids, "tolist"):
            array = cast(_ArrayLike, ids)
            if array.ndim != 1:
                raise ValueError(f"decode_many takes a 1-D tensor or array, got {array.ndim}-D")
            values = array.tolist()
            return [self.decode(v) for v in values]
        return [self.decode(v) for v in ids]

    # -- persistence --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON document :meth:`save` writes."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self._name,
            "kind": self._kind,
            "labels": list(self._labels),
        }

    @classmethod
    def from_dict(cls, document: object, source: str = "label map") -> LabelMap:
        """Validate and rebuild a document written by :meth:`to_dict` (``ValueError`` if bad).

        ``source`` names the document in error messages (``load`` passes the file name).
        """
        if not isinstance(document, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(document).__name__}")
        missing = [k for k in ("format", "version", "name", "kind", "labels") if k not in document]
        if missing:
            raise ValueError(f"{source}: missing key(s) {', '.join(map(repr, missing))}")
        if document["format"] != FORMAT:
            raise ValueError(f"{source}: format is {document['format']!r}, expected {FORMAT!r}")
        version = document["version"]
        if type(version) is not int or version != VERSION:
            raise ValueError(
                f"{source}: unsupported version {version!r} (this pyxtask reads version {VERSION})"
            )
        name, kind, labels = document["name"], document["kind"], document["labels"]
        if not isinstance(name, str):
            raise ValueError(f"{source}: 'name' must be a string, got {name!r}")
        if kind not in _KINDS:
            raise ValueError(f"{source}: 'kind' must be 'token' or 'sentence', got {kind!r}")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"{source}: 'labels' must be a list of strings")
        try:
            return cls(labels, name=name, kind=kind)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the map to ``path`` as JSON, atomically.

        The JSON goes to a temporary file in the same folder, which is flushed, fsynced and
        renamed over ``path`` (:func:`os.replace`), so readers see the old file or the new
        one, never a partial one. The temporary file is removed if anything fails.
        """
        target = Path(path)
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n"
        # Keep the mode of a file being replaced; new files get rw-r--r--.
        try:
            mode = target.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp_name, mode)
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        _fsync_dir(target.parent)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LabelMap:
        """Read a map written by :meth:`save`; ``ValueError`` naming the file if it is bad."""
        source = os.fspath(path)
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{source}: not UTF-8 text ({exc})") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc})") from exc
        return cls.from_dict(document, source=source)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
