"""Hash of the C++/CUDA sources, computed the same way by setup.py (baked into the
extension) and at import (to detect an extension built from other sources)."""

from __future__ import annotations

import hashlib
from pathlib import Path

SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h", ".inc")


def source_hash(csrc: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.suffix in SOURCE_SUFFIXES):
        digest.update(path.relative_to(csrc).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
