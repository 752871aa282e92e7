"""Task weightings, one method per module; each is a drop-in object the trainer consults.

:class:`TargetOnly` (single-task), :class:`SampleSize` (joint training, ω ∝ n_t),
:class:`Uniform` (normalized joint training, ω = 1/T) and :class:`TAWT` (target-aware weighted
training for the pre-training, joint and normalized-joint paradigms).

Weightings from other papers: :class:`MGDA` (min-norm weights of the task gradients, a
:class:`GramWeighting`: T weights from the T x T Gram matrix of the task gradients),
:class:`MetaWeighting` (multi-objective hypergradient descent on the weights),
:class:`GradNorm` (weights that balance the tasks' gradient norms) and :class:`Uncertainty`
(learnt homoscedastic-uncertainty weights); more Gram weightings — :class:`UPGrad`,
:class:`DualProj`, :class:`PCGrad`, :class:`CAGrad`, :class:`IMTLG`, :class:`AlignedMTL`,
:class:`NashMTL` — and the loss weightings (:class:`LossWeighting`) :class:`DWA`,
:class:`FAMO` and :class:`RLW`.

>>> import torch
>>> from pyxtask.weighting import MGDA, SampleSize
>>> [round(x, 3) for x in SampleSize([100, 300]).omega.tolist()]
[0.25, 0.75]
>>> MGDA()(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # two orthogonal unit gradients
tensor([0.5000, 0.5000], dtype=torch.float64)
"""

from pyxtask.weighting._base import PARADIGMS, Paradigm, Weighting
from pyxtask.weighting._gram import GramWeighting
from pyxtask.weighting._loss import LossWeighting
from pyxtask.weighting.aligned_mtl import AlignedMTL
from pyxtask.weighting.cagrad import CAGrad
from pyxtask.weighting.dualproj import DualProj
from pyxtask.weighting.dwa import DWA
from pyxtask.weighting.famo import FAMO
from pyxtask.weighting.gradnorm import GradNorm
from pyxtask.weighting.imtl_g import IMTLG
from pyxtask.weighting.metaweighting import MetaWeighting
from pyxtask.weighting.mgda import MGDA
from pyxtask.weighting.nash_mtl import NashMTL
from pyxtask.weighting.pcgrad import PCGrad
from pyxtask.weighting.rlw import RLW
from pyxtask.weighting.sample_size import SampleSize
from pyxtask.weighting.target_only import TargetOnly
from pyxtask.weighting.tawt import SIMILARITIES, TAWT, Similarity, exact_reference
from pyxtask.weighting.uncertainty import Uncertainty
from pyxtask.weighting.uniform import Uniform
from pyxtask.weighting.upgrad import UPGrad

__all__ = [
    "DWA",
    "FAMO",
    "IMTLG",
    "MGDA",
    "PARADIGMS",
    "RLW",
    "SIMILARITIES",
    "TAWT",
    "AlignedMTL",
    "CAGrad",
    "DualProj",
    "GradNorm",
    "GramWeighting",
    "LossWeighting",
    "MetaWeighting",
    "NashMTL",
    "PCGrad",
    "Paradigm",
    "SampleSize",
    "Similarity",
    "TargetOnly",
    "UPGrad",
    "Uncertainty",
    "Uniform",
    "Weighting",
    "exact_reference",
]
