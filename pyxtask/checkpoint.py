"""Atomic files: a crash or ``kill -9`` leaves either the old file or the new one, never half.

Every file is written to a temporary name in the same folder, flushed and fsynced, renamed
over the target (atomic on POSIX), and the folder is fsynced so the rename itself survives a
power cut.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "append_line",
    "fsync_dir",
    "load",
    "rng_state",
    "save",
    "set_rng_state",
    "write_text",
]

#: What a user can do about a checkpoint that cannot be resumed from.
REMEDY = "delete it and run again with --resume to start the run over, or point --output elsewhere"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: empty, truncated, corrupted or foreign."""


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_bytes(Path(path), buffer.getvalue())


def load(path: str | os.PathLike[str], *, keys: Iterable[str] = ()) -> Any:
    """Load a checkpoint written by :func:`save` (plain Python, numpy and tensors only).

    A file that cannot be read, or (with ``keys``) is not a dict holding every one of them,
    is a :class:`CheckpointError` naming the file, what is wrong and what to do.
    """
    path = Path(path)
    if path.stat().st_size == 0:  # torch's own message for it is "Ran out of input"
        raise CheckpointError(f"{os.fspath(path)}: empty file, not a checkpoint; {REMEDY}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except OSError:
        raise  # the disk or permissions, not the file's content: the OS says it best
    except Exception as exc:
        raise CheckpointError(
            f"{os.fspath(path)}: cannot be read, it is truncated, corrupted or not a "
            f"checkpoint ({_first_sentence(exc)}); {REMEDY}"
        ) from exc
    missing = [key for key in keys if not isinstance(obj, dict) or key not in obj]
    if missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise CheckpointError(
            f"{os.fspath(path)}: not a pyxtask training checkpoint (no {shown}); {REMEDY}"
        )
    return obj


def _first_sentence(exc: BaseException) -> str:
    # torch's messages run on for lines of advice about versions that do not apply here.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0].rstrip(".")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically."""
    _write_bytes(Path(path), text.encode("utf-8"))


def append_line(path: str | os.PathLike[str], record: dict[str, Any] | str) -> None:
    """Append one line (a JSON record or a ready line) and flush it to disk.

    Appends are not atomic by themselves; the trainer records each log's length in its
    checkpoint and truncates back to it on resume, so a line half-written at a crash, or lines
    written after the last checkpoint, never survive into the resumed run.
    """
    line = record if isinstance(record, str) else json.dumps(record, sort_keys=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    """Every random generator training touches: Python, NumPy, torch CPU and CUDA."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 -- the legacy global a user may seed
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
