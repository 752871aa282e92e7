"""Hash of the C++/CUDA sources, computed the same way by setup.py (baked into the
extension) and at import (to detect an extension built from other sources)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CPU_SUFFIXES = (".cpp", ".h", ".inc")
CUDA_SUFFIXES = (".cu", ".cuh")


def source_hash(csrc: Path, with_cuda: bool) -> str:
    """Hash of the sources a build compiles: a CPU-only build does not depend on .cu files."""
    suffixes = CPU_SUFFIXES + CUDA_SUFFIXES if with_cuda else CPU_SUFFIXES
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.suffix in suffixes):
        digest.update(path.relative_to(csrc).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
