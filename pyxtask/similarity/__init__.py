"""Which source helps before training: similarity scores between a target and candidate
sources, computed from the pretrained encoder without training it.

* :func:`~pyxtask.similarity.scores.covariance_similarity` — Wu, Zhang and Ré's covariance
  similarity score (ICLR 2020, eq. 6), label-blind;
* :func:`~pyxtask.similarity.scores.gradient_cosine_matrix` — TAWT's task similarity at the
  pretrained encoder, each head a linear probe on frozen features;
* :func:`~pyxtask.similarity.scores.leep` — LEEP (Nguyen et al. 2020) of the target labels
  under the source probe's soft outputs;
* :func:`~pyxtask.similarity.scores.logme` — LogME (You et al. 2021).

:func:`~pyxtask.similarity.report.compute` computes all of them for a target and its
sources (``pyxtask similarity``), caching each task's features and gradient.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyxtask.similarity.report import SCORES, SimilarityResult, compute, write_outputs
    from pyxtask.similarity.scores import (
        covariance_similarity,
        covariance_similarity_matrix,
        gradient_cosine_matrix,
        leep,
        log_evidence,
        logme,
        logme_fit,
        truncated_covariance,
    )

# Imported on first use: the command line's parser imports this package's ``cli`` module,
# which must not pull in torch and transformers for every other command.
_REPORT = ("SCORES", "SimilarityResult", "compute", "write_outputs")


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = "report" if name in _REPORT else "scores"
        return getattr(importlib.import_module(f"pyxtask.similarity.{module}"), name)
    raise AttributeError(f"module 'pyxtask.similarity' has no attribute {name!r}")


__all__ = [
    "SCORES",
    "SimilarityResult",
    "compute",
    "covariance_similarity",
    "covariance_similarity_matrix",
    "gradient_cosine_matrix",
    "leep",
    "log_evidence",
    "logme",
    "logme_fit",
    "truncated_covariance",
    "write_outputs",
]
