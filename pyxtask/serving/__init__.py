"""Serving exported bundles: onnxruntime, numpy and ``tokenizers`` — no torch at run time.

:class:`Tagger` tags raw or pre-split sentences with a bundle ``pyxtask export`` wrote;
``pyxtask tag`` and ``pyxtask serve`` are built on it.
"""

from pyxtask.serving.bundle import BundleError, read_manifest
from pyxtask.serving.tagger import Tagged, Tagger

__all__ = ["BundleError", "Tagged", "Tagger", "read_manifest"]
