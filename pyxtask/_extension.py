"""Loads the compiled extension, refusing a missing or stale one.

There is no Python fall-back for the ops: an extension that is missing, built for another
torch, or built from other sources than the checkout it sits in is an error that says how
to rebuild.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from pyxtask._source_hash import source_hash

REBUILD = "pip install --no-build-isolation -e .  (run in the pyxtask source checkout)"


def _base_version(version: str) -> str:
    return version.split("+", 1)[0]


def load() -> ModuleType:
    try:
        extension = importlib.import_module("pyxtask._C")  # after torch: it links libtorch
    except ImportError as exc:
        raise ImportError(
            f"pyxtask's compiled extension pyxtask._C is missing or does not load ({exc}).\n"
            f"Rebuild it against the installed torch {torch.__version__}:\n  {REBUILD}"
        ) from exc
    info: dict[str, Any] = extension.build_info()
    if _base_version(info["torch_version"]) != _base_version(torch.__version__):
        raise ImportError(
            f"pyxtask._C was built against torch {info['torch_version']} but torch "
            f"{torch.__version__} is installed. Rebuild it:\n  {REBUILD}"
        )
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    if csrc.is_dir():
        current = source_hash(csrc, bool(info["cuda"]))
        if current != info["source_hash"]:
            raise ImportError(
                f"pyxtask._C is stale: it was built from sources with hash "
                f"{info['source_hash']} but {csrc} now hashes to {current}. Rebuild it:\n"
                f"  {REBUILD}"
            )
    return extension


def build_info() -> dict[str, Any]:
    """What the installed extension was built with.

    Keys: ``torch_version`` (torch the extension was compiled against), ``cuda`` (whether the
    CUDA kernels were built), ``cuda_version``, ``cuda_arch_list``, ``openmp``,
    ``num_threads`` (threads the CPU kernels use now), ``cpu_isa`` (the instruction set the
    CPU kernels chose on this machine) and ``source_hash``.

    >>> import pyxtask
    >>> info = pyxtask.build_info()
    >>> sorted(info)[:3]
    ['cpu_isa', 'cuda', 'cuda_arch_list']
    """
    info: dict[str, Any] = dict(_C_MODULE.build_info())
    info["cuda_available"] = torch.cuda.is_available()
    return info


_C_MODULE = load()
