"""Task weightings, one method per module; each is a drop-in object the trainer consults.

:class:`TargetOnly` (single-task), :class:`SampleSize` (joint training, ω ∝ n_t),
:class:`Uniform` (normalized joint training, ω = 1/T) and :class:`TAWT` (target-aware weighted
training for the pre-training, joint and normalized-joint paradigms).
"""

from pyxtask.weighting._base import PARADIGMS, Paradigm, Weighting
from pyxtask.weighting.sample_size import SampleSize
from pyxtask.weighting.target_only import TargetOnly
from pyxtask.weighting.tawt import SIMILARITIES, TAWT, Similarity, exact_reference
from pyxtask.weighting.uniform import Uniform

__all__ = [
    "PARADIGMS",
    "SIMILARITIES",
    "TAWT",
    "Paradigm",
    "SampleSize",
    "Similarity",
    "TargetOnly",
    "Uniform",
    "Weighting",
    "exact_reference",
]
