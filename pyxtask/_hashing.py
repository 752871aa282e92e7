"""File checksums, shared by the corpus fetchers and the bundles (no torch needed here)."""

from __future__ import annotations

import hashlib
import os

__all__ = ["sha256_file"]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of a file, read in chunks so large archives are not loaded whole."""
    # hashlib.file_digest would do this, but it is Python 3.11+ and the project targets 3.10.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
