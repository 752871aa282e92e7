"""pyxtask: cross-task learning for PyTorch.

Importing the package loads the compiled op library (``torch.ops.pyxtask.*``); the typed
Python API is :mod:`pyxtask.ops`, the plain-PyTorch references are in
:mod:`pyxtask.reference`, Hessian-vector products in :mod:`pyxtask.hessian`; corpora, labels
and batching in :mod:`pyxtask.data`, evaluation in :mod:`pyxtask.metrics`.
"""

from pyxtask import data, hessian, metrics, ops, reference
from pyxtask._extension import build_info

__all__ = ["build_info", "data", "hessian", "metrics", "ops", "reference"]
__version__ = "0.1.0"
