"""The bundle an export writes: files, their manifest, and reading it back without torch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pyxtask._hashing import sha256_file

__all__ = ["BUNDLE_FORMAT", "BUNDLE_VERSION", "BundleError", "read_manifest"]

BUNDLE_FORMAT = "pyxtask.bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
VARIANTS = ("fp32", "fp16", "int8")


class BundleError(ValueError):
    """A bundle folder that cannot be served: missing files, a bad manifest, a checksum."""


def read_manifest(bundle: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """The manifest of ``bundle``, checked: format, version, and (with ``verify``) that every
    listed file exists with its recorded SHA-256."""
    root = Path(bundle)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{os.fspath(root)!r} is not a pyxtask bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{os.fspath(path)}: not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{os.fspath(path)}: not a {BUNDLE_FORMAT} manifest")
    if manifest.get("version") != BUNDLE_VERSION:
        raise BundleError(
            f"{os.fspath(path)}: bundle version {manifest.get('version')!r}; this pyxtask reads "
            f"version {BUNDLE_VERSION}"
        )
    for key in ("task", "kind", "labels", "max_length", "stride", "files", "variants"):
        if key not in manifest:
            raise BundleError(f"{os.fspath(path)}: the manifest has no {key!r}")
    if verify:
        for name, digest in manifest["files"].items():
            file = root / name
            if not file.is_file():
                raise BundleError(f"bundle file {os.fspath(file)!r} is missing")
            if sha256_file(file) != digest:
                raise BundleError(
                    f"bundle file {os.fspath(file)!r} does not match its checksum in the manifest"
                )
    return manifest
