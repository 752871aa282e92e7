"""Training configuration: one dataclass, read from TOML or YAML files and command-line flags.

Every key is checked when the configuration is built: an unknown key, task, method or
paradigm, or a size out of range, is a :class:`ConfigError` naming the key (and the file).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import tomllib

from pyxtask.data.files import UNSEEN_LABELS, FileTask, FileTaskError, file_task, infer_task
from pyxtask.data.files import is_task_file as _is_task_file

__all__ = [
    "COMPARISONS",
    "ConfigError",
    "DistributedConfig",
    "GradNormConfig",
    "MGDAConfig",
    "MetaWeightingConfig",
    "SampleTAWTConfig",
    "TAWTConfig",
    "TrainConfig",
    "UncertaintyConfig",
    "WindowMLPConfig",
    "load_config",
]

PARADIGMS = ("single", "joint", "normalized-joint", "pretrain")
WEIGHTS_AS = ("loss", "sampling")
EPOCHS = ("stream", "target")
#: Methods that take one task's batch per step from the stream (the rest take every task's).
STREAM_METHODS = ("fixed", "tawt", "tawt-samples", "alignment")
#: Methods that can train the target alone (paradigm ``single``).
SINGLE_METHODS = ("fixed", "alignment")
#: Fixed baselines ``compare`` can run beside the main run, with the same data and seed; any
#: method name (``pyxtask.methods.method_names()``) runs that method beside it too.
COMPARISONS = ("single", "single-steps", "joint", "normalized-joint", "pretrain")


class ConfigError(ValueError):
    """A training configuration that cannot be run; the message names the key."""


@dataclass
class TAWTConfig:
    """TAWT's settings (paper defaults; see :class:`pyxtask.weighting.TAWT`)."""

    similarity: str = "cosine"
    #: ``g_t = -c * s_t``. A list (pre-training) runs each value and keeps the best on the
    #: target's dev set; ``None`` is 1 for the joint paradigms and [1, 10, 30, 100] for pretrain.
    c: float | list[float] | None = None
    lr: float = 1.0
    probe_size: int = 64
    #: Update every this many optimizer steps; ``None`` once per epoch (the paper).
    update_every: int | None = None
    #: How probe gradients are taken: ``"streaming"`` (dot products in hooks) or ``"buffer"``.
    gradients: str = "streaming"
    damping: float = 1e-2
    cg_max_iter: int = 20


@dataclass
class SampleTAWTConfig:
    """``tawt-samples``: TAWT on source examples (see :mod:`pyxtask.methods.sample_tawt`)."""

    #: ``"cosine"`` (per-example cosine with the target's gradient) or ``"dot"`` (App. B).
    similarity: str = "cosine"
    #: ``g_i = -c * s_i``; ``None``: 1 for cosine, 5 for dot (the paper's App. B).
    c: float | None = None
    #: The mirror-descent step η.
    lr: float = 1.0
    #: Epochs between weight updates (the paper: 5, 40 updates in 200 epochs).
    update_every: int = 1
    #: Epochs trained before the first update (``None``: ``update_every``): the target's
    #: gradient of a barely trained model says little about which examples help it.
    first_update: int | None = None
    #: Target examples the target's gradient is taken on (``None``: all of them).
    target_probe: int | None = None
    #: Parameters the per-example products cover: ``"all"`` or ``"linear"`` layers.
    layers: str = "all"
    #: Examples per batch of the update's pass (``None``: the run's batch size).
    batch_size: int | None = None


@dataclass
class MGDAConfig:
    """MGDA and MGDA-UB: how gradients are normalised before the min-norm solve."""

    normalization: str = "none"


@dataclass
class MetaWeightingConfig:
    """MetaWeighting (paper defaults: alpha 0.1 sentiment / 0.5 topics, query ratio 0.1)."""

    alpha: float = 0.1
    #: The inner step of eq. 10; the paper ties it to its BERT learning rate (2e-5).
    eta: float = 2e-5
    query_ratio: float = 0.1
    #: Gradients the cross products cover: "shared" (encoder) or "all" (encoder and heads).
    parameters: str = "shared"
    #: The target's query set: "split" (query_ratio of its training examples) or "dev".
    target_query: str = "split"


@dataclass
class GradNormConfig:
    alpha: float = 1.5
    #: The task weights' own learning rate (no weight decay, no schedule).
    lr: float = 0.025


@dataclass
class UncertaintyConfig:
    #: The log variances' own learning rate (no weight decay, no schedule).
    lr: float = 0.01


@dataclass
class PCGradConfig:
    #: The order each gradient visits the others in: "random" (the paper) or "index".
    order: str = "random"
    #: Seed of the random orders (reproducible runs; resumed with the checkpoint).
    seed: int = 0


@dataclass
class CAGradConfig:
    #: The radius of the ball around the mean gradient, in units of its norm (paper: 0.4).
    c: float = 0.4


@dataclass
class NashMTLConfig:
    #: The bargaining direction is clipped to this norm (the authors' code: 1.0).
    max_norm: float = 1.0
    #: Solve for alpha every N steps and reuse it in between (the authors' code: 1).
    update_every: int = 1


@dataclass
class AlignedMTLConfig:
    #: The eigenvalue the aligned gradients are scaled to: "min" (paper), "median", "rmse".
    scale_mode: str = "min"


@dataclass
class DWAConfig:
    #: The softmax temperature of eq. 1 (paper: 2).
    temperature: float = 2.0


@dataclass
class FAMOConfig:
    #: Learning rate and weight decay of the logits' Adam (the official code's defaults).
    lr: float = 0.025
    gamma: float = 0.01
    #: Losses after an update from the "same-batch" (paper; one extra forward) or the
    #: "next-step" batch.
    update_with: str = "same-batch"


@dataclass
class RLWConfig:
    #: The distribution the weights' logits are drawn from (paper: standard normal).
    distribution: str = "normal"
    seed: int = 0


@dataclass
class MetaXTConfig:
    """MetaXT and XT. The paper tunes γ1, γ2 by cross-validation and gives no values: 1 and 1
    weigh the three terms of eq. 2 alike."""

    gamma1: float = 1.0
    gamma2: float = 1.0
    #: The lookahead's SGD step η (Θ' = Θ - η ∇L_train); not the optimizer's learning rate.
    eta: float = 0.01
    #: "finite-difference" (DARTS, no second-order graph) or "exact" (double backward).
    meta_gradient: str = "finite-difference"
    #: The central difference's ε = fd_eps / ||v|| (DARTS: 0.01).
    fd_eps: float = 0.01
    #: Adam's learning rate for the label (and representation) transfer networks. The paper
    #: gives none; at 1e-3 the network settles on the target's majority tag for every source
    #: label within the first steps, before the target head has learnt the label prior, and
    #: never leaves it (WSJ from Brown, k = 20, MiniLM: 30 % test accuracy; 3e-4: 77 %, 1e-4: 74 %).
    lr: float = 3e-4
    #: Share of each target batch held out as the meta part (the paper: half).
    meta_fraction: float = 0.5
    label_dim: int = 64
    hidden: int = 256
    #: A representation transfer network after this encoder layer (-1: the middle one) for
    #: sources from another domain; unset: none.
    rtn_layer: int | None = None
    #: Source examples per source task that make each epoch's label-transfer map.
    map_examples: int = 256


@dataclass
class AlignmentConfig:
    """Covariance alignment (Wu, Zhang & Ré 2020, Alg. 1). The paper trains the alignment
    matrices with the heads at BERT's learning rate (2e-5, App. B.3) and gives no length for
    the encoder-fixed stage."""

    #: Epochs of Alg. 1 proper (encoder fixed; heads and alignment matrices move) before the
    #: usual training; as many as ``epochs`` keeps the encoder fixed throughout (the paper's GLUE
    #: runs).
    epochs: int = 1
    #: The alignment matrices' learning rate (their own group, no decay); unset: the run's lr.
    lr: float | None = None
    #: Which tasks get a matrix: "all" (joint training) or "target" (with paradigm "single"
    #: and a source-trained encoder: transfer).
    tasks: str = "all"


@dataclass
class SVDConfig:
    """SVD task reweighting (Wu, Zhang & Ré 2020, Alg. 2) for tasks labelling the same inputs."""

    #: The rank r of the approximation of the thetas; unset: the number of tasks (the paper's
    #: largest, r <= k).
    rank: int | None = None
    #: Shared examples (sentences) whose encoder features give the weights (a seeded sample).
    examples: int = 512
    #: Centre the features first (a constant direction carries no label information).
    center: bool = True


@dataclass
class WindowMLPConfig:
    """The TAWT paper's App. B network (``encoder = "window-mlp"``, :mod:`pyxtask.window_mlp`):
    per word, the concatenated frozen vectors of the ``2 * window + 1`` words around it (zeros
    past the sentence's ends), then Linear + ReLU; the heads on top."""

    #: Hidden units of the Linear + ReLU representation (the paper: 4,096).
    hidden: int = 4096
    #: Words each side of the word (the paper's 5-grams: 2).
    window: int = 2
    #: The frozen word vectors: ``"minilm"`` (each word the mean of its sub-words' rows of
    #: MiniLM's input embeddings; the paper's 50-d GloVe is not available) or ``"random"``
    #: (seeded N(0, 1) vectors of ``random_dim`` numbers: tests).
    embeddings: str = "minilm"
    random_dim: int = 16


@dataclass
class DistributedConfig:
    """Training under torchrun (several processes); a single process ignores it."""

    #: Per-task statistics: "exact" (the T x P per-task gradients summed over the processes,
    #: then the statistics) or "cheap" (each process's statistics summed; see docs).
    statistics: str = "exact"
    #: Seconds any collective may wait for the other processes before the run fails.
    timeout: float = 600.0


#: The method tables of a configuration file and their dataclasses.
SECTIONS: dict[str, type] = {
    "tawt": TAWTConfig,
    "tawt_samples": SampleTAWTConfig,
    "mgda": MGDAConfig,
    "metaweighting": MetaWeightingConfig,
    "gradnorm": GradNormConfig,
    "uncertainty": UncertaintyConfig,
    "pcgrad": PCGradConfig,
    "cagrad": CAGradConfig,
    "nash_mtl": NashMTLConfig,
    "aligned_mtl": AlignedMTLConfig,
    "dwa": DWAConfig,
    "famo": FAMOConfig,
    "rlw": RLWConfig,
    "metaxt": MetaXTConfig,
    "distributed": DistributedConfig,
    "alignment": AlignmentConfig,
    "svd": SVDConfig,
    "window_mlp": WindowMLPConfig,
}


@dataclass
class TrainConfig:
    """One training run. A task is a named corpus's ``corpus.task`` (see ``pyxtask data
    list``) or a name of :attr:`tasks`, the user's own files."""

    target: str = "wsj-pos.pos"
    #: Target training sentences (a seeded sample; ``None`` = the whole split).
    target_size: int | None = 200
    sources: list[str] = field(default_factory=lambda: ["brown.pos", "brown.upos", "brown.genre"])
    #: Training sentences per source task (the same sentences for tasks of one corpus).
    source_size: int | None = 2000
    #: Dev / test sentences of the target (``None`` = the whole split).
    dev_size: int | None = None
    test_size: int | None = None
    paradigm: str = "normalized-joint"
    #: What one optimizer step does: ``pyxtask.methods.method_names()`` (tawt, tawt-step,
    #: fixed, equal, mgda, mgda-ub, metaweighting, gradnorm, uncertainty, or a registered one).
    method: str = "tawt"
    #: Task weights as loss factors (the paper) or as the probability of drawing a task's batch.
    weights_as: str = "loss"
    #: An epoch is one shuffled stream of all tasks' batches, or one pass over the target.
    epoch: str = "stream"
    #: ``"minilm"`` (the all-MiniLM-L6-v2 package), a local encoder folder, ``"tiny"`` (a
    #: small random BERT with a WordPiece vocabulary learned from the training text), or
    #: ``"window-mlp"`` (the TAWT paper's two-layer network on word windows; ``[window_mlp]``).
    encoder: str = "minilm"
    #: Training examples of token tasks: ``"sentences"``, or ``"words"``: one example per word
    #: (the word in its sentence, only it labelled; TAWT's App. B), ``target_size`` and
    #: ``source_size`` then count words. Dev and test stay sentences (every word scored).
    examples: str = "sentences"
    epochs: int = 4
    #: Single-task runs only: this many optimizer steps in all (the step-matched baseline).
    total_steps: int | None = None
    batch_size: int = 32
    #: Micro-batches per optimizer step (gradient accumulation).
    accumulate: int = 1
    #: Batch examples of similar length (chunks of 50 batches sorted by length): far less
    #: padding, so much faster steps on CPUs; off gives the plain shuffled batches.
    group_by_length: bool = True
    eval_batch_size: int = 64
    lr: float = 5e-5
    #: After the warm-up: ``"linear"`` decay to 0 at the planned end (BERT's recipe) or
    #: ``"constant"`` (plain Adam at ``lr``, as TAWT's App. B network trains).
    lr_schedule: str = "linear"
    warmup: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0
    max_length: int = 128
    #: Dropout before every head's linear layer; the encoder keeps its own configuration's
    #: (``hidden_dropout_prob``, ``attention_probs_dropout_prob``: 0.1 for MiniLM).
    dropout: float = 0.1
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    output: str = "runs/pyxtask"
    checkpoint_every: int = 50
    log_every: int = 10
    compare: list[str] = field(default_factory=list)
    tawt: TAWTConfig = field(default_factory=TAWTConfig)
    tawt_samples: SampleTAWTConfig = field(default_factory=SampleTAWTConfig)
    mgda: MGDAConfig = field(default_factory=MGDAConfig)
    metaweighting: MetaWeightingConfig = field(default_factory=MetaWeightingConfig)
    gradnorm: GradNormConfig = field(default_factory=GradNormConfig)
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    pcgrad: PCGradConfig = field(default_factory=PCGradConfig)
    cagrad: CAGradConfig = field(default_factory=CAGradConfig)
    nash_mtl: NashMTLConfig = field(default_factory=NashMTLConfig)
    aligned_mtl: AlignedMTLConfig = field(default_factory=AlignedMTLConfig)
    dwa: DWAConfig = field(default_factory=DWAConfig)
    famo: FAMOConfig = field(default_factory=FAMOConfig)
    rlw: RLWConfig = field(default_factory=RLWConfig)
    metaxt: MetaXTConfig = field(default_factory=MetaXTConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    svd: SVDConfig = field(default_factory=SVDConfig)
    window_mlp: WindowMLPConfig = field(default_factory=WindowMLPConfig)
    cache: str | None = None
    #: Tasks read from the user's own files, by name (``[tasks.NAME]`` tables).
    tasks: dict[str, FileTask] = field(default_factory=dict)
    #: A dev or test label that no training example has: ``"error"`` (naming its file and
    #: line) or ``"unknown"`` (it becomes ``<unknown>``, which counts as wrong).
    unseen_labels: str = "error"

    # -- derived -------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        """The run's short name: ``tawt-normalized-joint``, ``normalized-joint``, ``single``,
        ``single-steps``, ``mgda``, ``tawt-step-joint``, …"""
        if self.paradigm == "single" and self.method == "fixed":
            return "single" if self.total_steps is None else "single-steps"
        if self.method == "fixed":
            return self.paradigm
        if self.method in ("tawt", "tawt-step", "alignment"):
            return f"{self.method}-{self.paradigm}"
        return self.method

    @property
    def all_tasks(self) -> bool:
        """Whether the method takes every task's batch in every step."""
        return self.method not in STREAM_METHODS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        out = dataclasses.replace(self, **changes)
        out.validate()
        return out

    # -- checks --------------------------------------------------------------------------------

    def validate(self) -> None:
        def choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise ConfigError(f"{key} = {value!r} is not one of {list(allowed)}")

        from pyxtask.methods import method_names  # noqa: PLC0415 -- the registry is live

        choice("paradigm", self.paradigm, PARADIGMS)
        choice("method", self.method, tuple(method_names()))
        choice("mgda.normalization", self.mgda.normalization, ("none", "l2", "loss", "loss+"))
        choice("metaweighting.parameters", self.metaweighting.parameters, ("shared", "all"))
        choice("metaweighting.target_query", self.metaweighting.target_query, ("split", "dev"))
        choice("weights_as", self.weights_as, WEIGHTS_AS)
        choice("epoch", self.epoch, EPOCHS)
        choice("tawt.similarity", self.tawt.similarity, ("cosine", "dot", "exact"))
        choice("tawt.gradients", self.tawt.gradients, ("streaming", "buffer"))
        choice("pcgrad.order", self.pcgrad.order, ("random", "index"))
        choice("tawt_samples.similarity", self.tawt_samples.similarity, ("cosine", "dot"))
        choice("tawt_samples.layers", self.tawt_samples.layers, ("all", "linear"))
        choice("aligned_mtl.scale_mode", self.aligned_mtl.scale_mode, ("min", "median", "rmse"))
        choice("famo.update_with", self.famo.update_with, ("same-batch", "next-step"))
        choice("metaxt.meta_gradient", self.metaxt.meta_gradient,
               ("finite-difference", "exact"))  # fmt: skip
        choice("rlw.distribution", self.rlw.distribution,
               ("normal", "uniform", "dirichlet", "bernoulli"))  # fmt: skip
        choice("unseen_labels", self.unseen_labels, UNSEEN_LABELS)
        choice("distributed.statistics", self.distributed.statistics, ("exact", "cheap"))
        choice("alignment.tasks", self.alignment.tasks, ("all", "target"))
        choice("examples", self.examples, ("sentences", "words"))
        choice("lr_schedule", self.lr_schedule, ("linear", "constant"))
        choice("window_mlp.embeddings", self.window_mlp.embeddings, ("minilm", "random"))
        if self.method == "alignment" and self.paradigm == "pretrain":
            raise ConfigError(
                "method = 'alignment' aligns the tasks it trains, and pretrain fine-tunes the "
                "target plainly; for transfer, train the source, then the target with paradigm "
                "'single', method 'alignment' and encoder = the source run's best/ folder"
            )
        for task in [self.target, *self.sources]:
            if task not in self.tasks:
                _check_task_name(task)
        if len(set(self.sources)) != len(self.sources) or self.target in self.sources:
            raise ConfigError(
                f"tasks must be distinct: target {self.target!r}, sources {self.sources}"
            )
        if self.paradigm == "single":
            if self.method not in SINGLE_METHODS:
                raise ConfigError(
                    f"method = {self.method!r} needs source tasks; paradigm 'single' trains the "
                    "target alone (method = 'fixed')"
                )
        elif not self.sources:
            raise ConfigError(f"paradigm {self.paradigm!r} needs at least one source task")
        if self.total_steps is not None and self.paradigm != "single":
            raise ConfigError("total_steps is for the single-task (step-matched) baseline only")
        if self.paradigm == "pretrain" and self.epoch == "target":
            raise ConfigError(
                "epoch = 'target' needs the target in the joint objective, not pretrain"
            )
        if self.all_tasks and self.paradigm not in ("joint", "normalized-joint"):
            raise ConfigError(
                f"method = {self.method!r} takes every task's batch in every step; use "
                "paradigm 'normalized-joint' or 'joint' (pretrain and single are stream methods)"
            )
        if self.all_tasks and self.weights_as != "loss":
            raise ConfigError(
                f"weights_as = 'sampling' draws one task per step; method = {self.method!r} "
                "takes every task's batch in every step"
            )
        if self.method == "tawt-step" and self.tawt.similarity == "exact":
            raise ConfigError(
                "tawt.similarity = 'exact' solves eq. 2.7 on probe batches; method 'tawt-step' "
                "measures 'cosine' or 'dot' from the step's own gradients"
            )
        if self.accumulate > 1 and self.method in ("mgda-ub", "metaxt", "xt"):
            raise ConfigError(f"{self.method} takes one batch per step: set accumulate = 1")
        if self.weights_as == "sampling" and self.tawt.update_every is not None:
            raise ConfigError(
                "weights_as = 'sampling' applies new weights from the next epoch; "
                "tawt.update_every (per-step updates) needs weights_as = 'loss'"
            )
        for key, value, low in (
            ("target_size", self.target_size, 1),
            ("source_size", self.source_size, 1),
            ("dev_size", self.dev_size, 1),
            ("test_size", self.test_size, 1),
            ("total_steps", self.total_steps, 1),
            ("tawt.update_every", self.tawt.update_every, 1),
            ("tawt_samples.update_every", self.tawt_samples.update_every, 1),
            ("tawt_samples.first_update", self.tawt_samples.first_update, 1),
            ("tawt_samples.target_probe", self.tawt_samples.target_probe, 1),
            ("tawt_samples.batch_size", self.tawt_samples.batch_size, 1),
            ("metaxt.label_dim", self.metaxt.label_dim, 1),
            ("metaxt.hidden", self.metaxt.hidden, 1),
            ("metaxt.map_examples", self.metaxt.map_examples, 1),
            ("svd.rank", self.svd.rank, 1),
            ("svd.examples", self.svd.examples, 1),
        ):
            if value is not None and (not _is_int(value) or value < low):
                raise ConfigError(f"{key} = {value!r} must be an integer >= {low} (or unset)")
        bounded: tuple[tuple[str, object, int, int], ...] = (
            ("epochs", self.epochs, 1, 10_000),
            ("batch_size", self.batch_size, 1, 1 << 16),
            ("accumulate", self.accumulate, 1, 1 << 16),
            ("eval_batch_size", self.eval_batch_size, 1, 1 << 16),
            ("max_length", self.max_length, 8, 1 << 16),
            ("checkpoint_every", self.checkpoint_every, 1, 1 << 30),
            ("log_every", self.log_every, 1, 1 << 30),
            ("tawt.probe_size", self.tawt.probe_size, 1, 1 << 20),
            ("tawt.cg_max_iter", self.tawt.cg_max_iter, 1, 100_000),
            ("seed", self.seed, 0, 2**63 - 1),
            ("alignment.epochs", self.alignment.epochs, 0, 10_000),
            ("window_mlp.hidden", self.window_mlp.hidden, 1, 1 << 20),
            ("window_mlp.window", self.window_mlp.window, 0, 64),
            ("window_mlp.random_dim", self.window_mlp.random_dim, 1, 1 << 16),
        )
        for name, number, low, high in bounded:
            if not _is_int(number) or not low <= cast(int, number) <= high:
                raise ConfigError(f"{name} = {number!r} must be an integer in [{low}, {high}]")
        ranges: tuple[tuple[str, object, float, float], ...] = (
            ("lr", self.lr, 0.0, 1.0),
            ("warmup", self.warmup, 0.0, 1.0),
            ("weight_decay", self.weight_decay, 0.0, 1.0),
            ("dropout", self.dropout, 0.0, 0.99),
            ("tawt.lr", self.tawt.lr, 0.0, 1e6),
            ("tawt.damping", self.tawt.damping, 0.0, 1e6),
            ("tawt_samples.lr", self.tawt_samples.lr, 1e-12, 1e6),
            ("metaweighting.alpha", self.metaweighting.alpha, 1e-12, 1e6),
            ("metaweighting.eta", self.metaweighting.eta, 1e-12, 1e6),
            ("metaweighting.query_ratio", self.metaweighting.query_ratio, 1e-6, 0.5),
            ("gradnorm.alpha", self.gradnorm.alpha, 0.0, 100.0),
            ("gradnorm.lr", self.gradnorm.lr, 1e-12, 10.0),
            ("uncertainty.lr", self.uncertainty.lr, 1e-12, 10.0),
            ("dwa.temperature", self.dwa.temperature, 1e-6, 1e6),
            ("cagrad.c", self.cagrad.c, 0.0, 1e3),
            ("nash_mtl.max_norm", self.nash_mtl.max_norm, 0.0, 1e6),
            ("nash_mtl.update_every", self.nash_mtl.update_every, 1, 1e9),
            ("famo.lr", self.famo.lr, 1e-12, 10.0),
            ("famo.gamma", self.famo.gamma, 0.0, 10.0),
            ("metaxt.gamma1", self.metaxt.gamma1, 0.0, 1e6),
            ("metaxt.gamma2", self.metaxt.gamma2, 0.0, 1e6),
            ("metaxt.eta", self.metaxt.eta, 1e-12, 1e6),
            ("metaxt.fd_eps", self.metaxt.fd_eps, 1e-12, 1e3),
            ("metaxt.lr", self.metaxt.lr, 1e-12, 10.0),
            ("metaxt.meta_fraction", self.metaxt.meta_fraction, 1e-6, 0.999),
            ("distributed.timeout", self.distributed.timeout, 1.0, 1e6),
        )
        for name, number, lo, hi in ranges:
            if not _is_number(number) or not lo <= float(cast(float, number)) <= hi:
                raise ConfigError(f"{name} = {number!r} must be a number in [{lo}, {hi}]")
        align_lr = self.alignment.lr
        if align_lr is not None and (not _is_number(align_lr) or not 0 < float(align_lr) <= 10):
            raise ConfigError(f"alignment.lr = {align_lr!r} must be a number in (0, 10] (or unset)")
        if not self.lr > 0 or not self.tawt.lr > 0:
            raise ConfigError("lr and tawt.lr must be > 0")
        if not _is_number(self.clip) or not float(self.clip) >= 0:
            raise ConfigError(f"clip = {self.clip!r} must be a number >= 0 (0: no clipping)")
        c_samples = self.tawt_samples.c
        if c_samples is not None and (not _is_number(c_samples) or not float(c_samples) > 0):
            raise ConfigError(f"tawt_samples.c = {c_samples!r} must be a number > 0 (or unset)")
        cs = self.tawt.c if isinstance(self.tawt.c, list) else [self.tawt.c]
        for c in cs:
            if c is not None and (not _is_number(c) or not float(c) > 0):
                raise ConfigError(f"tawt.c = {self.tawt.c!r}: every value must be a number > 0")
        if isinstance(self.tawt.c, list) and (not self.tawt.c or self.paradigm != "pretrain"):
            raise ConfigError("tawt.c as a list (a sweep on the dev set) is for pretrain only")
        for name in self.compare:
            choice("compare entry", name, COMPARISONS + tuple(method_names()))
        rtn = self.metaxt.rtn_layer
        if rtn is not None and (not _is_int(rtn) or rtn < -1):
            raise ConfigError(
                f"metaxt.rtn_layer = {rtn!r} must be a layer index >= 0, -1, or unset"
            )
        if not isinstance(self.group_by_length, bool) or not isinstance(self.bf16, bool):
            raise ConfigError("group_by_length and bf16 must be true or false")
        if not isinstance(self.svd.center, bool):
            raise ConfigError(f"svd.center = {self.svd.center!r} must be true or false")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device = {self.device!r}: use 'auto', 'cpu' or 'cuda[:N]'")

    def c_values(self) -> list[float]:
        """The TAWT constants to run: one, or the pre-training sweep."""
        c = self.tawt.c
        if c is None:
            return [1.0, 10.0, 30.0, 100.0] if self.paradigm == "pretrain" else [1.0]
        return [float(x) for x in c] if isinstance(c, list) else [float(c)]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return (isinstance(x, int | float) and not isinstance(x, bool)) and math.isfinite(float(x))


def _check_task_name(task: object) -> None:
    if not isinstance(task, str) or task.count(".") != 1 or "" in task.split("."):
        raise ConfigError(
            f"task {task!r} must be written 'corpus.task', e.g. 'brown.upos' (pyxtask data "
            "list shows the corpora), be a data file (.conll, .conllu, .csv, .tsv, .jsonl), a "
            "corpus definition (.toml), or a name defined in a [tasks.NAME] table"
        )


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def from_mapping(
    document: Mapping[str, Any], source: str = "config", base: Path | None = None
) -> TrainConfig:
    """Build a :class:`TrainConfig` from a mapping (a parsed file), checking every key.

    File paths (own tasks) are taken relative to ``base``, the config file's folder
    (``None``: the working directory).
    """
    if not isinstance(document, Mapping):
        raise ConfigError(f"{source}: the top level must be a table of keys")
    known = _fields(TrainConfig)
    values: dict[str, Any] = {}
    document = _legacy(document, source)
    for key, value in document.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {key!r}; known keys: {', '.join(known)}")
        if key == "tasks":
            values[key] = _file_tasks(value, source, base)
        elif key in _SIZES and value == "all":
            values[key] = None
        elif key in SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {key!r} must be a table")
            section_known = _fields(SECTIONS[key])
            for k in value:
                if k not in section_known:
                    raise ConfigError(
                        f"{source}: unknown key '{key}.{k}'; known: {', '.join(section_known)}"
                    )
            values[key] = SECTIONS[key](**dict(value))
        else:
            values[key] = value
    for key in ("sources", "compare"):
        if key in values:
            value = values[key]
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{source}: {key} must be a list of strings")
            values[key] = value
    _tasks_from_files(values, source, base)
    config = TrainConfig(**values)
    try:
        config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


_SIZES = ("target_size", "source_size", "dev_size", "test_size")


def _file_tasks(tables: Any, source: str, base: Path | None) -> dict[str, FileTask]:
    if not isinstance(tables, Mapping):
        raise ConfigError(f"{source}: 'tasks' must be a table of [tasks.NAME] tables")
    out: dict[str, FileTask] = {}
    for name, table in tables.items():
        if isinstance(table, FileTask):
            out[name] = table
            continue
        where = f"{source}: tasks.{name}"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where} must be a table (format, train, dev, test, ...)")
        if "." in name or not name:
            raise ConfigError(f"{where}: a task name needs no dots (those are corpus.task)")
        try:
            out[name] = file_task(table, where, base)
        except FileTaskError as exc:
            raise ConfigError(str(exc)) from None
    return out


def _tasks_from_files(values: dict[str, Any], source: str, base: Path | None) -> None:
    """A target or source given as a data file or corpus definition becomes a task table of
    its own, named after the file; the task list then names it."""
    tasks = dict(values.get("tasks", {}))
    names = {"target": values.get("target"), "sources": values.get("sources")}

    def named(entry: Any) -> Any:
        if not isinstance(entry, str) or entry in tasks or not _is_task_file(entry):
            return entry
        path = os.fspath(base / entry) if base is not None else entry
        try:
            name, task = infer_task(path)
        except FileTaskError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if name in tasks and tasks[name] != task:
            raise ConfigError(f"{source}: two tasks named {name!r}; name them in [tasks.NAME]")
        tasks[name] = task
        return name

    if names["target"] is not None:
        values["target"] = named(names["target"])
    if isinstance(names["sources"], list):
        values["sources"] = [named(entry) for entry in names["sources"]]
    if tasks:
        values["tasks"] = tasks


def _legacy(document: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    """Configurations written before methods: ``weighting = "tawt" | "fixed"`` is the method."""
    if "weighting" not in document:
        return document
    out = dict(document)
    weighting = out.pop("weighting")
    if weighting not in ("tawt", "fixed"):
        raise ConfigError(
            f"{source}: weighting = {weighting!r}: the key is now 'method' (e.g. method = "
            '"tawt", "fixed", "mgda")'
        )
    if "method" in out and out["method"] != weighting:
        raise ConfigError(
            f"{source}: weighting = {weighting!r} and method = {out['method']!r} disagree; "
            "write only method (weighting is its old name)"
        )
    out["method"] = weighting
    return out


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read a ``.toml``, ``.yaml``/``.yml`` or ``.json`` training configuration."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {os.fspath(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            document: Any = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml  # noqa: PLC0415 -- only YAML users need PyYAML

            document = yaml.safe_load(text) or {}
        elif suffix == ".json":
            document = json.loads(text)
        else:
            raise ConfigError(f"{p}: use a .toml, .yaml or .json config file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{p}: not valid {suffix[1:].upper()}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError without importing yaml at module level
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    return from_mapping(document, source=os.fspath(p), base=p.parent)
