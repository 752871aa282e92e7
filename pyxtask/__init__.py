"""pyxtask: cross-task learning for PyTorch.

Importing the package loads the compiled op library (``torch.ops.pyxtask.*``); the typed
Python API is :mod:`pyxtask.ops`, the plain-PyTorch references are in
:mod:`pyxtask.reference`, Hessian-vector products in :mod:`pyxtask.hessian`; corpora, labels
and batching in :mod:`pyxtask.data`, evaluation in :mod:`pyxtask.metrics`; per-task gradients
in :mod:`pyxtask.gradients`, task weightings (TAWT and the baselines) in
:mod:`pyxtask.weighting`, training methods (what one optimizer step does) in
:mod:`pyxtask.methods`, the loop in :mod:`pyxtask.trainer` and experiments with baselines in
:mod:`pyxtask.experiment` (``pyxtask train``); export in :mod:`pyxtask.export`, serving in
:mod:`pyxtask.serving` (which needs no torch: without torch installed, only it is importable).
"""

__version__ = "0.1.0"

try:
    import torch  # noqa: F401
except ImportError:  # a serving-only install (onnxruntime, numpy, tokenizers): pyxtask.serving
    __all__: list[str] = []
else:
    from pyxtask import data, gradients, hessian, metrics, ops, reference, weighting
    from pyxtask._extension import build_info

    __all__ = [
        "build_info",
        "data",
        "gradients",
        "hessian",
        "metrics",
        "ops",
        "reference",
        "weighting",
    ]
