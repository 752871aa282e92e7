"""Serving exported bundles: onnxruntime, numpy and ``tokenizers`` — no torch at run time.

:class:`Tagger` tags raw or pre-split sentences with a bundle ``pyxtask export`` wrote;
``pyxtask tag`` and ``pyxtask serve`` (:mod:`pyxtask.serving.cli`) are built on it. The names
below load on first use, so ``pyxtask tag --help`` and ``pyxtask serve --help`` import
neither numpy nor onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyxtask.serving.bundle import BundleError, read_manifest
    from pyxtask.serving.tagger import Tagged, Tagger

# Where each public name lives.
_HOMES = {
    "BundleError": "pyxtask.serving.bundle",
    "read_manifest": "pyxtask.serving.bundle",
    "Tagged": "pyxtask.serving.tagger",
    "Tagger": "pyxtask.serving.tagger",
}

__all__ = ["BundleError", "Tagged", "Tagger", "read_manifest"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    import pkgutil  # noqa: PLC0415 -- only dir() needs it

    return sorted({*__all__, *(m.name for m in pkgutil.iter_modules(__path__))})
