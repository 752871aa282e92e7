"""Training methods: what one optimizer step does. One module each; the trainer names none.

========================  =====================================================================
``fixed``                 the stream of all tasks' batches with fixed weights: single-task,
                          joint (ω ∝ n_t), normalized joint (ω = 1/T), pre-training
``tawt``                  TAWT as its authors ran it: the stream, ω from probe gradients once
                          per epoch (or every ``tawt.update_every`` steps)
``tawt-step``             TAWT per step: every task's batch per step, ω from the step's own
                          streaming statistics every ``tawt.update_every`` steps
``tawt-samples``          TAWT on source examples: one weight per example, mirror descent on
                          per-example gradient products every ``tawt_samples.update_every``
                          epochs (App. B)
``equal``                 every task's batch per step, each loss counting once
``mgda`` / ``mgda-ub``    min-norm weights from the encoder's Gram / the representation's
``metaweighting``         weights from held-out query losses (Mao et al., Alg. 1)
``gradnorm``              learnable weights balancing gradient norms (Chen et al. 2018)
``uncertainty``           learnable log variances (Kendall et al. 2018)
``upgrad`` ``dualproj``   projections onto the dual cone of the task gradients (Quinton &
                          Rakotomamonjy 2024; GEM's eq. 11)
``pcgrad``                gradient surgery: conflicting gradients projected (Yu et al. 2020)
``cagrad``                conflict-averse direction near the mean gradient (Liu et al. 2021)
``imtl-g``                equal projections on every unit task gradient (Liu et al. 2021)
``aligned-mtl``           gradients aligned to condition number 1 (Senushkin et al. 2023)
``nash-mtl``              the Nash bargaining solution (Navon et al. 2022)
``dwa`` ``famo`` ``rlw``  loss weights: dynamic weight average (Liu et al. 2019), fast
                          adaptive (Liu et al. 2023), random (Lin et al. 2022)
``metaxt`` / ``xt``       a label transfer network turns source labels into soft target labels,
                          learnt by a meta-step (Sharma et al.), or jointly (XT)
``alignment``             covariance alignment: a per-task matrix on the summed embeddings, first
                          trained with the heads on a fixed encoder (Wu, Zhang & Ré, Alg. 1),
                          folded into the embedding tables of the saved model
``svd``                   fixed weights from an SVD of the tasks' ``Xᵀ y_i`` on the pretrained
                          encoder's features of shared examples (Wu, Zhang & Ré, Alg. 2)
========================  =====================================================================

``mgda``, ``upgrad``, ``pcgrad`` … are each a :class:`GramMethod` around a weighting of the
Gram matrix; ``dwa``, ``famo``, ``rlw`` a :class:`LossWeightedMethod` around a loss weighting.

A new method is a :class:`Method` subclass registered with :func:`register_method`; then
``pyxtask train --method NAME`` and configuration files select it (see ``docs/``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from pyxtask.methods._base import (
    Method,
    Sampling,
    Step,
    StepContext,
    StepLosses,
    backward_all,
    shares,
)
from pyxtask.methods.alignment import AlignmentMethod
from pyxtask.methods.fixed import EqualMethod, StreamMethod
from pyxtask.methods.gradnorm import GradNormMethod
from pyxtask.methods.gram import GramMethod
from pyxtask.methods.loss_weighted import LossWeightedMethod
from pyxtask.methods.metaweighting import MetaWeightingMethod
from pyxtask.methods.metaxt import MetaXTMethod
from pyxtask.methods.mgda import MGDAMethod, MGDAUBMethod
from pyxtask.methods.sample_tawt import SampleTAWTMethod
from pyxtask.methods.svd_weighting import SVDWeightMethod
from pyxtask.methods.tawt import TAWTMethod, TAWTStepMethod
from pyxtask.methods.uncertainty import UncertaintyMethod
from pyxtask.weighting import (
    DWA,
    FAMO,
    IMTLG,
    RLW,
    TAWT,
    AlignedMTL,
    CAGrad,
    DualProj,
    NashMTL,
    PCGrad,
    SampleSize,
    TargetOnly,
    Uniform,
    UPGrad,
    Weighting,
)

if TYPE_CHECKING:
    from pyxtask.config import TrainConfig

__all__ = [
    "AlignmentMethod",
    "EqualMethod",
    "GradNormMethod",
    "GramMethod",
    "LossWeightedMethod",
    "MGDAMethod",
    "MGDAUBMethod",
    "MetaWeightingMethod",
    "MetaXTMethod",
    "Method",
    "MethodFactory",
    "SVDWeightMethod",
    "SampleTAWTMethod",
    "Sampling",
    "Step",
    "StepContext",
    "StepLosses",
    "StreamMethod",
    "TAWTMethod",
    "TAWTStepMethod",
    "UncertaintyMethod",
    "backward_all",
    "make_method",
    "method_names",
    "register_method",
    "shares",
]

#: Builds a method from a run's configuration and TAWT's constant c for that run.
MethodFactory = Callable[["TrainConfig", float], Method]


def fixed_weighting(config: TrainConfig) -> Callable[[Sequence[int]], Weighting]:
    """The fixed weighting of the config's paradigm."""
    if config.paradigm == "single":
        return TargetOnly
    if config.paradigm == "normalized-joint":
        return Uniform
    return lambda sizes: SampleSize(sizes, cast(Any, config.paradigm))


def _tawt(config: TrainConfig, c: float, sizes: Sequence[int], lr: float) -> TAWT:
    t = config.tawt
    return TAWT(
        sizes,
        cast(Any, config.paradigm),
        similarity=cast(Any, t.similarity),
        c=c,
        lr=lr,
        probe_size=t.probe_size,
        update_every=t.update_every,
        damping=t.damping,
        cg_max_iter=t.cg_max_iter,
    )


def _sample_tawt(config: TrainConfig) -> SampleTAWTMethod:
    t = config.tawt_samples
    return SampleTAWTMethod(
        config.paradigm,
        similarity=cast(Any, t.similarity),
        c=t.c,
        lr=t.lr,
        update_every=t.update_every,
        first_update=t.first_update,
        weights_as=config.weights_as,
        target_probe=t.target_probe,
        layers=t.layers,
        batch_size=t.batch_size,
    )


def _metaxt(config: TrainConfig, meta_gradient: str) -> MetaXTMethod:
    m = config.metaxt
    return MetaXTMethod(
        meta_gradient=meta_gradient,
        gamma1=m.gamma1,
        gamma2=m.gamma2,
        eta=m.eta,
        lr=m.lr,
        fd_eps=m.fd_eps,
        meta_fraction=m.meta_fraction,
        label_dim=m.label_dim,
        width=m.hidden,
        rtn_layer=m.rtn_layer,
        map_examples=m.map_examples,
    )


_REGISTRY: dict[str, MethodFactory] = {
    "fixed": lambda config, c: StreamMethod(fixed_weighting(config), config.weights_as),
    "tawt": lambda config, c: TAWTMethod(
        lambda sizes: _tawt(config, c, sizes, config.tawt.lr),
        config.weights_as,
        gradients=cast(Any, config.tawt.gradients),
    ),
    "tawt-step": lambda config, c: TAWTStepMethod(
        lambda sizes, lr: _tawt(config, c, sizes, lr),
        lr=config.tawt.lr,
        update_every=config.tawt.update_every or 1,
    ),
    "tawt-samples": lambda config, c: _sample_tawt(config),
    "equal": lambda config, c: EqualMethod(),
    "mgda": lambda config, c: MGDAMethod(config.mgda.normalization),
    "mgda-ub": lambda config, c: MGDAUBMethod(config.mgda.normalization),
    "metaweighting": lambda config, c: MetaWeightingMethod(
        alpha=config.metaweighting.alpha,
        eta=config.metaweighting.eta,
        query_ratio=config.metaweighting.query_ratio,
        parameters=config.metaweighting.parameters,
        target_query=config.metaweighting.target_query,
    ),
    "gradnorm": lambda config, c: GradNormMethod(
        alpha=config.gradnorm.alpha, lr=config.gradnorm.lr
    ),
    "uncertainty": lambda config, c: UncertaintyMethod(lr=config.uncertainty.lr),
    "upgrad": lambda config, c: GramMethod(UPGrad()),
    "dualproj": lambda config, c: GramMethod(DualProj()),
    "cagrad": lambda config, c: GramMethod(CAGrad(config.cagrad.c)),
    "nash-mtl": lambda config, c: GramMethod(
        NashMTL(config.nash_mtl.max_norm, config.nash_mtl.update_every)
    ),
    "pcgrad": lambda config, c: GramMethod(
        PCGrad(seed=config.pcgrad.seed)
        if config.pcgrad.order == "random"
        else PCGrad(cast(Any, config.pcgrad.order))
    ),
    "imtl-g": lambda config, c: GramMethod(IMTLG()),
    "aligned-mtl": lambda config, c: GramMethod(
        AlignedMTL(cast(Any, config.aligned_mtl.scale_mode))
    ),
    "dwa": lambda config, c: LossWeightedMethod(
        lambda T: DWA(T, temperature=config.dwa.temperature), "dwa"
    ),
    "famo": lambda config, c: LossWeightedMethod(
        lambda T: FAMO(T, lr=config.famo.lr, gamma=config.famo.gamma),
        "famo",
        update_with=cast(Any, config.famo.update_with),
    ),
    "rlw": lambda config, c: LossWeightedMethod(
        lambda T: RLW(T, cast(Any, config.rlw.distribution), seed=config.rlw.seed), "rlw"
    ),
    "metaxt": lambda config, c: _metaxt(config, config.metaxt.meta_gradient),
    "xt": lambda config, c: _metaxt(config, "none"),
    "alignment": lambda config, c: AlignmentMethod(
        fixed_weighting(config),
        config.weights_as,
        align_epochs=config.alignment.epochs,
        lr=config.lr if config.alignment.lr is None else config.alignment.lr,
        tasks="target" if config.paradigm == "single" else config.alignment.tasks,
    ),
    "svd": lambda config, c: SVDWeightMethod(
        config.svd.rank, config.svd.examples, center=config.svd.center
    ),
}


def register_method(name: str, factory: MethodFactory, *, replace: bool = False) -> None:
    """Make ``factory`` selectable as ``method = name`` (``pyxtask train --method name``)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a method name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"method {name!r} is already registered (pass replace=True)")
    _REGISTRY[name] = factory


def method_names() -> list[str]:
    """Every selectable method, built-in and registered."""
    return list(_REGISTRY)


def make_method(config: TrainConfig, c: float = 1.0) -> Method:
    """The method ``config.method`` names (``fixed`` for the single-task paradigm)."""
    from pyxtask.config import SINGLE_METHODS  # noqa: PLC0415

    single = config.paradigm == "single" and config.method not in SINGLE_METHODS
    name = "fixed" if single else config.method
    return _REGISTRY[name](config, c)
