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
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["append_line", "fsync_dir", "load", "rng_state", "save", "set_rng_state", "write_text"]


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


def load(path: str | os.PathLike[str]) -> Any:
    """Load a checkpoint written by :func:`save` (plain Python, numpy and tensors only)."""
    return torch.load(Path(path), map_location="cpu", weights_only=False)


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
