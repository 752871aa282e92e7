"""pyxtask: cross-task learning for PyTorch.

The typed Python API over the compiled op library (``torch.ops.pyxtask.*``) is
:mod:`pyxtask.ops`, the plain-PyTorch references are in :mod:`pyxtask.reference`,
Hessian-vector products in :mod:`pyxtask.hessian`; corpora, labels and batching in
:mod:`pyxtask.data`, evaluation in :mod:`pyxtask.metrics`; per-task gradients in
:mod:`pyxtask.gradients`, task weightings (TAWT and the baselines) in
:mod:`pyxtask.weighting`, training methods (what one optimizer step does) in
:mod:`pyxtask.methods`, the loop in :mod:`pyxtask.trainer` and experiments with baselines in
:mod:`pyxtask.experiment` (``pyxtask train``); export in :mod:`pyxtask.export`, serving in
:mod:`pyxtask.serving` (which needs no torch; the ``pyxtask-serve`` distribution is only it).

Submodules load on first use (``pyxtask.ops`` after ``import pyxtask`` works, and loads the
compiled extension then), so ``import pyxtask.serving`` and ``pyxtask tag`` load neither torch
nor the extension: a missing or stale extension fails ``import pyxtask.ops`` (and everything
that uses the ops) with the command that rebuilds it, not serving.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyxtask import data, gradients, hessian, metrics, ops, reference, serving, weighting
    from pyxtask._extension import build_info

__version__ = "0.1.0"

__all__ = ["serving"]
# Without torch (a serving-only install) star-importing the torch-side API could only fail.
if importlib.util.find_spec("torch") is not None:
    __all__ += [
        "build_info",
        "data",
        "gradients",
        "hessian",
        "metrics",
        "ops",
        "reference",
        "weighting",
    ]


def __getattr__(name: str) -> Any:
    """``pyxtask.NAME`` for a submodule not imported yet, and ``pyxtask.build_info``."""
    if name == "build_info":
        from pyxtask._extension import build_info  # noqa: PLC0415 -- loads torch and _C

        return build_info
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    import pkgutil  # noqa: PLC0415 -- only dir() needs it

    submodules = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return sorted({"__version__", *__all__, *submodules})
