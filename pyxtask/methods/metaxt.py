"""MetaXT (Sharma, Zheng & Awadallah): label transfer between disparate label spaces.

A *label transfer network* g_α (Sec. 3.1) maps a source example -- its encoder representation
and its source label -- to a soft label over the *target's* labels. Training minimises eq. 2::

    L_train = L_target(x'_t) + γ1 · L_source(x_s) + γ2 · CE(target head on x_s, g_α(x_s, y_s))

and α is learnt by the meta-step of eqs. 4-5 (Alg. 1): each target batch is split into a
training part x'_t and a meta part x''_t; with the one-step lookahead Θ' = Θ - η ∇_Θ L_train
(η the lookahead's SGD step), α descends the meta-gradient::

    ∇_α L_meta(Θ') = -η ∇_α ( ∇_Θ L_trainᵀ ∇_Θ' L_meta(Θ') ),

then Θ takes its ordinary step on ∇_Θ L_train at the new α. The meta-gradient is computed

- ``"exact"``: second-order autograd through a functional lookahead (``torch.func``);
- ``"finite-difference"`` (the default, DARTS's central difference): v = ∇_Θ' L_meta, Θ moved
  to Θ ± εv in place with the fused :func:`pyxtask.ops.add_scaled_` (ε = ``fd_eps / ||v||``)
  and restored bit for bit; only the γ2 term depends on α, so two encoder forward passes over
  the source batch and a backward pass through the small network give the mixed derivative.
  The two passes reuse the training pass's dropout masks and run in float32, so their
  difference is the parameters' effect, not noise.

``xt`` (Sec. 4.4.2) is the same step with α descending ∇_α L_train instead: no meta level.

The network's input representation is **detached** (the token's last hidden state for tagging
tasks, [CLS] for sentence tasks): otherwise the γ2 term would pull the encoder toward
representations that make g_α's own outputs easy to fit, which is not the target task. With
several sources one *universal* network serves them all, conditioned on the source task and
its label (an embedding per (task, label) pair and one per task). An optional representation
transfer network (Sec. 4.3.2, for sources from another domain) adds a residual 3-layer
network after an encoder layer on the γ2 term's source pass; it learns with α.

The networks belong to the method, never to the exported model; they are saved with the run
(``label_transfer_network.pt``), and at every epoch's end the label-transfer map -- mean ŷ_t
per source label, as the paper's Fig. 7 -- is appended to ``label_transfer.jsonl`` and drawn.

Under torchrun (R processes) every process takes its slice of the target's training and meta
parts (``ctx.batch_loss``) and of each source batch (``indices[rank::R]``, its mean losses
scaled by its share of the batch's labelled units), so the processes' losses and gradients
sum to the one-process ones; each process keeps the same α (and φ): it is created from the
run's seed, stepped by the same Adam on the same summed gradient, and compared bitwise at every
epoch's end. Besides the trainer's all-reduce of the model's gradient (4 bytes per parameter),
a step sends, with P_Θ the encoder's and the target head's parameters and A the networks':

- ``finite-difference``: ∇_Θ L_train for the lookahead (4 P_Θ bytes; ``.grad`` keeps this
  process's share, for the trainer's sum), v = ∇_Θ' L_meta (4 P_Θ) and α's gradient (4 A);
- ``exact``: ∇_Θ L_train's value (4 P_Θ), the gradient of L_meta reaching ∇_Θ of the γ2 term
  in the lookahead's backward pass (4 P_Θ: every process's L_meta moves through every
  process's g_α) and α's gradient (4 A);
- ``xt``: α's gradient (4 A).

All-reduces of the P_Θ vectors count as ``statistics``, α's as ``gradients``. A 2-process run
equals a 1-process run over the same global batches up to the fp32 summation order
(``tests/test_distributed.py``); the epoch-end map and file are made by rank 0 alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pyxtask.data import LabelMap, collate
from pyxtask.distributed import unflatten
from pyxtask.evaluation import autocast
from pyxtask.hessian import restored
from pyxtask.methods._base import Method, Sampling, Step, StepContext, StepLosses, shares
from pyxtask.ops import add_scaled_

__all__ = ["LabelTransferNetwork", "MetaXTMethod", "RepresentationTransferNetwork"]

MetaGradient = Literal["exact", "finite-difference", "none"]


class LabelTransferNetwork(nn.Module):
    """g_α: a 3-layer feed-forward network from ``[h, e(task, label), e(task)]`` to a
    distribution over the target's labels (Sec. 3.1; the task embedding makes one network
    serve several sources).

    Args:
        hidden_size: the encoder's representation size (h_dim).
        source_labels: the number of labels of each source task.
        target_labels: the number of the target's labels.
        label_dim: z_dim, the size of the label (and task) embeddings.
        width: the two hidden layers' width.
    """

    def __init__(
        self,
        hidden_size: int,
        source_labels: Sequence[int],
        target_labels: int,
        *,
        label_dim: int = 64,
        width: int = 256,
    ) -> None:
        super().__init__()
        counts = [int(n) for n in source_labels]
        if not counts or min(counts) < 1 or target_labels < 1:
            raise ValueError(
                f"label transfer needs labels on both sides: sources {counts}, target "
                f"{target_labels}"
            )
        self.register_buffer(
            "offsets", torch.tensor([0, *counts[:-1]], dtype=torch.int64).cumsum(0), False
        )
        self.label_embedding = nn.Embedding(sum(counts), label_dim)
        self.task_embedding = nn.Embedding(len(counts), label_dim)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size + 2 * label_dim, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, target_labels),
        )

    def forward(self, hidden: Tensor, source: int, labels: Tensor) -> Tensor:
        """``(N, target_labels)`` probabilities for ``N`` examples of source ``source``."""
        offsets = cast(Tensor, self.offsets)
        pair = self.label_embedding(labels + offsets[source])
        task = self.task_embedding.weight[source].expand(len(labels), -1)
        logits = self.mlp(torch.cat([hidden.to(pair.dtype), pair, task], dim=-1))
        return torch.softmax(logits, dim=-1)


class RepresentationTransferNetwork(nn.Module):
    """φ: h <- h + FFN(h) after one encoder layer (MetaXL's RTN, a 3-layer network). Its last
    layer starts at zero, so training starts from the unchanged encoder; GELU, like the
    encoder, keeps the finite-difference passes at Θ ± εv off ReLU's kinks (with ReLU, φ's
    meta-gradient was off by 110 % at the default ε)."""

    def __init__(self, hidden_size: int, width: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, hidden_size),
        )
        last = cast(nn.Linear, self.mlp[-1])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + cast(Tensor, self.mlp(hidden)).to(hidden.dtype)


class _SourceBatch:
    """One source batch's training pass: what the γ2 term and the meta-step reuse."""

    def __init__(self, source: int, ids: Tensor, mask: Tensor, labels: Tensor) -> None:
        self.source, self.ids, self.mask, self.labels = source, ids, mask, labels
        self.rng: tuple[Tensor, Tensor | None] = (torch.get_rng_state(), None)
        self.hidden: Tensor | None = None  # the encoder's pass, until the source loss
        self.log_probs: Tensor | None = None  # target head on x_s, graph to Θ (and φ)
        self.features: Tensor | None = None  # g_α's detached input
        self.source_labels: Tensor | None = None
        self.soft: Tensor | None = None  # g_α's output, graph to α
        #: Under torchrun: this process's share of the global batch's labelled units (its
        #: mean losses times it sum to the global means); None on one process.
        self.share: float | None = None


class MetaXTMethod(Method):
    """MetaXT's step, or XT's with ``meta_gradient="none"`` (see the module docs).

    Args:
        meta_gradient: ``"finite-difference"``, ``"exact"``, or ``"none"`` (XT).
        gamma1, gamma2: γ1, γ2 of eq. 2 (several sources: each source's terms are averaged).
        eta: η, the lookahead's SGD step (not the optimizer's learning rate).
        lr: learning rate of α's Adam optimizer (and φ's).
        fd_eps: the finite difference's ε is ``fd_eps / ||v||`` (DARTS: 0.01).
        meta_fraction: share of each target batch held out as its meta part x''_t.
        label_dim, width: the label transfer network's embedding size and width.
        rtn_layer: the encoder layer after which a representation transfer network adapts the
            source representations of the γ2 term (None: no RTN; -1: the middle layer).
        map_examples: source examples per source whose ŷ make each epoch's label-transfer map.
    """

    sampling: ClassVar[Sampling] = "all"

    def __init__(
        self,
        *,
        meta_gradient: str = "finite-difference",
        gamma1: float = 1.0,
        gamma2: float = 1.0,
        eta: float = 1e-2,
        lr: float = 3e-4,
        fd_eps: float = 0.01,
        meta_fraction: float = 0.5,
        label_dim: int = 64,
        width: int = 256,
        rtn_layer: int | None = None,
        map_examples: int = 256,
    ) -> None:
        super().__init__()
        if meta_gradient not in ("exact", "finite-difference", "none"):
            raise ValueError(
                f"meta_gradient must be 'exact', 'finite-difference' or 'none', got "
                f"{meta_gradient!r}"
            )
        if not 0.0 < meta_fraction < 1.0:
            raise ValueError(f"meta_fraction must be in (0, 1), got {meta_fraction}")
        self.meta_gradient = cast(MetaGradient, meta_gradient)
        self.name = "xt" if meta_gradient == "none" else "metaxt"
        self.gamma1, self.gamma2, self.eta = float(gamma1), float(gamma2), float(eta)
        self.meta_lr, self.fd_eps = float(lr), float(fd_eps)
        self.meta_fraction = float(meta_fraction)
        self.label_dim, self.width = int(label_dim), int(width)
        self.rtn_layer, self.map_examples = rtn_layer, int(map_examples)
        self.ltn: LabelTransferNetwork | None = None
        self.rtn: RepresentationTransferNetwork | None = None
        self.optimizer: torch.optim.Adam | None = None
        self.rtn_optimizer: torch.optim.Adam | None = None
        self._rtn_on = False
        self._pending: Tensor | None = None  # XT: L_train's α-free part, not yet backwarded
        self._hook: Any = None
        self._target_labels: tuple[str, ...] = ()
        self._sources = 1

    # -- set-up ----------------------------------------------------------------------------

    def bind(self, ctx: StepContext) -> None:
        from pyxtask.config import ConfigError  # noqa: PLC0415

        target = ctx.tasks[0]
        for task in ctx.tasks[1:]:
            if task.kind != target.kind:
                raise ConfigError(
                    f"{self.name}: source {task.name} is a {task.kind} task and the target "
                    f"{target.name} a {target.kind} task; label transfer needs sources of the "
                    "target's kind"
                )
        if ctx.num_tasks < 2:
            raise ConfigError(f"{self.name} needs at least one source task")
        hidden = int(ctx.model.encoder.config.hidden_size)
        self._target_labels = target.labels.labels
        self._sources = ctx.num_tasks - 1
        dtype = next(ctx.model.encoder.parameters()).dtype
        with torch.random.fork_rng(devices=[]):  # the run's random stream stays untouched
            torch.manual_seed(ctx.seed * 7919 + 17)
            self.ltn = LabelTransferNetwork(
                hidden,
                [len(t.labels) for t in ctx.tasks[1:]],
                len(target.labels),
                label_dim=self.label_dim,
                width=self.width,
            ).to(ctx.device, dtype)
            if self.rtn_layer is not None:
                self.rtn = RepresentationTransferNetwork(hidden, self.width).to(ctx.device, dtype)
                self._attach_rtn(ctx)
        self.optimizer = torch.optim.Adam(self.ltn.parameters(), lr=self.meta_lr)
        if self.rtn is not None:
            self.rtn_optimizer = torch.optim.Adam(self.rtn.parameters(), lr=self.meta_lr)

    def _attach_rtn(self, ctx: StepContext) -> None:
        from pyxtask.config import ConfigError  # noqa: PLC0415

        layers = _encoder_layers(ctx.model.encoder)
        index = len(layers) // 2 if self.rtn_layer == -1 else cast(int, self.rtn_layer)
        if not 0 <= index < len(layers):
            raise ConfigError(
                f"{self.name}.rtn_layer = {self.rtn_layer}: the encoder has layers "
                f"0..{len(layers) - 1} (-1 picks the middle one)"
            )
        self.rtn_layer = index

        def adapt(module: nn.Module, args: Any, output: Any) -> Any:
            if not self._rtn_on or self.rtn is None:
                return output
            if isinstance(output, tuple):
                return (self.rtn(output[0]), *output[1:])
            return self.rtn(output)

        self._hook = layers[index].register_forward_hook(adapt)

    @contextmanager
    def _adapted(self, on: bool) -> Iterator[None]:
        previous, self._rtn_on = self._rtn_on, on and self.rtn is not None
        try:
            yield
        finally:
            self._rtn_on = previous

    def meta_parameters(self) -> list[nn.Parameter]:
        """α (and φ): learnt by the meta-step (XT: jointly with Θ), by the method's Adam."""
        nets = [n for n in (self.ltn, self.rtn) if n is not None]
        return [p for net in nets for p in net.parameters()]

    def lookahead_parameters(self, ctx: StepContext) -> list[nn.Parameter]:
        """Θ of the lookahead: the encoder and the target head (the sources' heads do not
        reach L_meta)."""
        return ctx.shared_parameters() + ctx.head_parameters(0)

    # -- the step ----------------------------------------------------------------------------

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        if len(micro_batches) != 1:
            raise ValueError(f"{self.name} takes one batch per step (accumulate = 1)")
        assert self.optimizer is not None
        losses, sources, grad_alpha = self._train_pass(ctx, micro_batches[0])
        for p, g in zip(self.meta_parameters(), grad_alpha, strict=True):
            p.grad = g.detach()
        self.optimizer.step()
        self._correct_transfer(ctx, sources)  # Θ's gradient at the new α (Alg. 1's order)
        if self.rtn_optimizer is not None:  # φ moves after: the graph above still reads it
            self.rtn_optimizer.step()
        for p in self.meta_parameters():
            p.grad = None
        self.updates += 1
        return losses.values()

    def alpha_gradient(self, ctx: StepContext, step: Step) -> list[Tensor]:
        """The gradient α (and φ) would descend on ``step``'s batches -- the meta-gradient of
        eq. 5, or XT's ∇_α L_train -- without moving anything; ``.grad`` is left holding
        ∇_Θ L_train at the current α."""
        _, sources, grad_alpha = self._train_pass(ctx, step)
        if self._pending is not None:
            loss = self._pending + self._transfer_loss(sources, detach=True)
            torch.autograd.backward(loss, inputs=_trained(ctx))
            self._pending = None
        for s in sources:
            s.log_probs = s.soft = None
        return [g.detach() for g in grad_alpha]

    def _train_pass(
        self, ctx: StepContext, step: Step
    ) -> tuple[StepLosses, list[_SourceBatch], list[Tensor]]:
        """Eq. 2's forward pass, ∇_Θ L_train (at the current α) in ``.grad`` and α's gradient;
        the graph is kept for the gradient at the new α."""
        if self.meta_gradient == "exact":
            # Flash and memory-efficient attention have no second derivative; the math
            # kernel has, so the exact meta-gradient's passes all take it.
            with sdpa_kernel(SDPBackend.MATH):
                losses, sources, grad_alpha = self._train_pass_in(ctx, step)
        else:
            losses, sources, grad_alpha = self._train_pass_in(ctx, step)
        # Each process holds its slices' share: α's gradient is their sum, the same everywhere.
        return losses, sources, ctx.distributed.sum_tensors(grad_alpha, "gradients")

    def _train_pass_in(
        self, ctx: StepContext, step: Step
    ) -> tuple[StepLosses, list[_SourceBatch], list[Tensor]]:
        batches = dict(step)
        train_part, meta_part = self.split(ctx, batches[0])
        losses = StepLosses(ctx, 1)
        target_loss = ctx.batch_loss(0, train_part)
        sources = [self._source_pass(ctx, t, batches[t]) for t in range(1, ctx.num_tasks)]
        source_losses = [self._source_loss(ctx, s) for s in sources]
        losses.add([target_loss, *source_losses])
        fixed = target_loss + (self.gamma1 / len(sources)) * torch.stack(source_losses).sum()
        transfer = self._transfer_loss(sources, detach=True)
        ctx.model.zero_grad(set_to_none=True)
        if self.meta_gradient == "exact":
            return losses, sources, self._exact_meta_gradient(ctx, fixed, transfer, sources,
                                                               meta_part)  # fmt: skip
        if self.meta_gradient == "none":  # no lookahead: Θ's one backward waits for the new α
            self._pending = fixed
            return losses, sources, self._joint_gradient(sources)
        torch.autograd.backward(fixed + transfer, retain_graph=True, inputs=_trained(ctx))
        theta = self.lookahead_parameters(ctx)
        return losses, sources, self._fd_meta_gradient(ctx, theta, sources, meta_part)

    def split(self, ctx: StepContext, indices: Sequence[int]) -> tuple[list[int], list[int]]:
        """The target batch's training part x'_t and meta part x''_t (a seeded split; one
        example serves as both)."""
        idx = list(indices)
        if len(idx) < 2:
            return idx, idx
        g = torch.Generator().manual_seed(ctx.seed * 7243 + ctx.global_step)
        order = torch.randperm(len(idx), generator=g).tolist()
        n_meta = min(len(idx) - 1, max(1, round(self.meta_fraction * len(idx))))
        meta = sorted(idx[i] for i in order[:n_meta])
        return sorted(idx[i] for i in order[n_meta:]), meta

    def _source_pass(self, ctx: StepContext, t: int, indices: Sequence[int]) -> _SourceBatch:
        local, share = _slice(ctx, t, indices)
        batch = collate([ctx.encoded[t][i] for i in local], ctx.pad)
        s = _SourceBatch(
            t - 1,
            batch["input_ids"].to(ctx.device),
            batch["attention_mask"].to(ctx.device),
            batch["labels"].to(ctx.device),
        )
        s.share = share
        s.rng = _rng_state(ctx.device)
        with autocast(ctx.device, ctx.bf16):
            hidden = ctx.model.encode(s.ids, s.mask)
            # The target head first: the finite-difference passes replay its dropout masks.
            target_logits = ctx.model.head(ctx.tasks[0].head)(hidden, s.mask)
        s.source_labels, s.features, positions = _labelled(hidden, s.labels)
        s.log_probs = F.log_softmax(_wide(target_logits)[positions], dim=-1)
        s.soft = cast(LabelTransferNetwork, self.ltn)(s.features, s.source, s.source_labels)
        s.hidden = hidden
        if self.rtn is not None:  # the γ2 term reads the adapted pass instead
            s.log_probs = self._target_log_probs(ctx, s, grad=True)
        return s

    def _source_loss(self, ctx: StepContext, s: _SourceBatch) -> Tensor:
        head = ctx.tasks[s.source + 1].head
        hidden, s.hidden = cast(Tensor, s.hidden), None
        with autocast(ctx.device, ctx.bf16):
            logits = ctx.model.head(head)(hidden, s.mask)
        return _shared(ctx.model.task_loss(head, _wide(logits), s.labels), s)

    def _target_log_probs(self, ctx: StepContext, s: _SourceBatch, grad: bool) -> Tensor:
        """The target head's log-probabilities on the source batch at the current Θ, replaying
        the training pass's dropout masks, in float32 (with the RTN when there is one)."""
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.set_grad_enabled(grad):
            _set_rng_state(s.rng, ctx.device)
            with self._adapted(True):
                hidden = ctx.model.encode(s.ids, s.mask)
                logits = ctx.model.head(ctx.tasks[0].head)(hidden, s.mask)
        _, _, positions = _labelled(hidden, s.labels)
        return F.log_softmax(_wide(logits)[positions], dim=-1)

    def _transfer_loss(self, sources: list[_SourceBatch], *, detach: bool) -> Tensor:
        """γ2 · mean over sources of the soft cross-entropy against g_α's labels."""
        total = torch.zeros((), device=cast(Tensor, sources[0].log_probs).device)
        for s in sources:
            soft = cast(Tensor, s.soft)
            soft = soft.detach() if detach else soft
            total = total + _shared(_soft_cross_entropy(cast(Tensor, s.log_probs), soft), s)
        return (self.gamma2 / len(sources)) * total

    # -- α's gradient ----------------------------------------------------------------------

    def _meta_loss(self, ctx: StepContext, meta_part: Sequence[int], params: Any = None) -> Tensor:
        return ctx.batch_loss(0, meta_part, params=params)

    def _fd_meta_gradient(
        self,
        ctx: StepContext,
        theta: list[nn.Parameter],
        sources: list[_SourceBatch],
        meta_part: Sequence[int],
    ) -> list[Tensor]:
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in theta]
        # Summed into new tensors: .grad keeps this process's share, for the trainer's sum.
        grads = ctx.distributed.sum_tensors(grads)
        data = [p.data for p in theta]
        with restored(theta):
            with torch.no_grad():
                add_scaled_(data, grads, -self.eta)  # Θ' = Θ - η ∇_Θ L_train
            v = ctx.distributed.sum_tensors(_grads(self._meta_loss(ctx, meta_part), theta))
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v))))
        if norm == 0.0 or not math.isfinite(norm):
            return [torch.zeros_like(p) for p in self.meta_parameters()]
        eps = self.fd_eps / norm
        # ∇_Θ L_trainᵀ v by central differences; only the γ2 term depends on α (and φ):
        # coef · sum_s CE(log p(Θ + εv) - log p(Θ - εv), ŷ_s(α)).
        coef = -self.eta * self.gamma2 / len(sources) / (2.0 * eps)
        meta = self.meta_parameters()
        total = [torch.zeros_like(p) for p in meta]
        shifted: list[list[Tensor]] = []
        with restored(theta):
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    add_scaled_(data, v, eps if sign > 0 else -2.0 * eps)
                shifted.append([self._shifted_pass(ctx, s, sign * coef, total) for s in sources])
        directional = sum(
            (
                _shared(_soft_cross_entropy(p - m, cast(Tensor, s.soft)), s)
                for p, m, s in zip(*shifted, sources, strict=True)
            ),
            torch.zeros((), device=ctx.device),
        )
        torch._foreach_add_(total, _grads(coef * directional, meta))
        return total

    def _shifted_pass(
        self, ctx: StepContext, s: _SourceBatch, coef: float, total: list[Tensor]
    ) -> Tensor:
        """log p on the source batch at the moved Θ; with an RTN, φ's share of the
        directional derivative is taken now, while Θ is still where the pass saw it."""
        log_probs = self._target_log_probs(ctx, s, grad=self.rtn is not None)
        if self.rtn is not None:
            loss = coef * _shared(_soft_cross_entropy(log_probs, cast(Tensor, s.soft).detach()), s)
            torch._foreach_add_(total, _grads(loss, self.meta_parameters()))
        return log_probs.detach()

    def _exact_meta_gradient(
        self,
        ctx: StepContext,
        fixed: Tensor,
        transfer: Tensor,
        sources: list[_SourceBatch],
        meta_part: Sequence[int],
    ) -> list[Tensor]:
        theta = self.lookahead_parameters(ctx)
        trained = _trained(ctx)
        first = _grads(fixed + transfer, trained, retain_graph=True)
        for p, g in zip(trained, first, strict=True):
            p.grad = g.detach()
        by_id = {id(p): g for p, g in zip(trained, first, strict=True)}
        # Θ' moves on the global gradient.
        summed = ctx.distributed.sum_tensors([by_id[id(p)] for p in theta])
        by_id |= {id(p): g for p, g in zip(theta, summed, strict=True)}
        # Zero in value, ∇_α(∇_Θ L_train) in its graph: Θ'(α) = Θ - η (g + g_α - sg(g_α)).
        live = self._transfer_loss(sources, detach=False)
        second = _grads(live, theta, create_graph=True)
        reached = None
        if ctx.distributed.enabled:  # every process's g_α moves every process's Θ'
            second, reached = _summed_in_backward(ctx, second)
        names = {id(p): n for n, p in ctx.model.named_parameters()}
        lookahead = {
            names[id(p)]: p - self.eta * (by_id[id(p)] + g2 - g2.detach())
            for p, g2 in zip(theta, second, strict=True)
        }
        meta = self._meta_loss(ctx, meta_part, lookahead)
        if reached is not None:  # a slice without labels still joins the backward's all-reduce
            meta = meta + reached
        # The graph stays: Θ's gradient at the new α is taken through it afterwards.
        return _grads(meta, self.meta_parameters(), retain_graph=True)

    def _joint_gradient(self, sources: list[_SourceBatch]) -> list[Tensor]:
        """XT: α descends L_train itself (only its γ2 term depends on α)."""
        loss = self._transfer_loss(sources, detach=False)
        return _grads(loss, self.meta_parameters(), retain_graph=True)

    def _correct_transfer(self, ctx: StepContext, sources: list[_SourceBatch]) -> None:
        """Add ∇_Θ of γ2·CE(target head, ŷ(α_new) - ŷ(α_old)) to ``.grad``: L_train's
        gradient at the new α, through the graph the first backward kept (XT, which took no
        first backward, takes its only one here)."""
        assert self.ltn is not None
        pending, self._pending = self._pending, None
        with torch.no_grad():
            deltas = []
            for s in sources:
                new = self.ltn(cast(Tensor, s.features), s.source, cast(Tensor, s.source_labels))
                deltas.append(new if pending is not None else new - cast(Tensor, s.soft).detach())
        moved = [_with_soft(s, d) for s, d in zip(sources, deltas, strict=True)]
        loss = self._transfer_loss(moved, detach=True)
        # Into the model's .grad only: φ's gradient, already set, is not L_train's.
        torch.autograd.backward(loss if pending is None else pending + loss, inputs=_trained(ctx))
        for s in sources:
            s.log_probs = s.soft = None

    # -- epochs, outputs, state ------------------------------------------------------------

    def epoch_end(self, ctx: StepContext, epoch: int) -> None:
        # Stepped by every process on the same summed gradient: the networks must agree.
        every = torch.cat([p.detach().reshape(-1) for p in self.meta_parameters()])
        ctx.distributed.check_same(every, f"{self.name}'s transfer network parameters")
        if not ctx.distributed.is_main:
            return  # rank 0 writes the map and the network
        for record in self.label_transfer_map(ctx):
            ctx.log({"epoch": epoch, "step": ctx.global_step, **record}, "label_transfer.jsonl")
        ctx.save("label_transfer_network.pt", self.network_state(ctx))

    @torch.no_grad()
    def label_transfer_map(self, ctx: StepContext) -> list[dict[str, Any]]:
        """Mean ŷ_t per source label over a fixed sample of each source's training examples
        (``map_examples``), the model in eval mode: the paper's Fig. 7."""
        assert self.ltn is not None
        was_training = ctx.model.training
        ctx.model.eval()
        records = []
        try:
            for t in range(1, ctx.num_tasks):
                items = ctx.encoded[t]
                g = torch.Generator().manual_seed(ctx.seed * 4339 + t)
                idx = torch.randperm(len(items), generator=g)[: self.map_examples].tolist()
                n_src, n_tgt = len(ctx.tasks[t].labels), len(self._target_labels)
                sums = torch.zeros(n_src, n_tgt, dtype=torch.float64, device=ctx.device)
                counts = torch.zeros(n_src, dtype=torch.float64, device=ctx.device)
                for start in range(0, len(idx), ctx.batch_size):
                    batch = collate([items[i] for i in idx[start : start + ctx.batch_size]],
                                    ctx.pad)  # fmt: skip
                    ids = batch["input_ids"].to(ctx.device)
                    mask = batch["attention_mask"].to(ctx.device)
                    with autocast(ctx.device, ctx.bf16):
                        hidden = ctx.model.encode(ids, mask)
                    labels, features, _ = _labelled(hidden, batch["labels"].to(ctx.device))
                    soft = self.ltn(features, t - 1, labels).double()
                    sums.index_add_(0, labels, soft)
                    counts += torch.bincount(labels, minlength=n_src).double()
                rows = (sums / counts.clamp(min=1).unsqueeze(1)).cpu()
                rows[counts.cpu() == 0] = math.nan
                records.append(
                    {
                        "source": ctx.tasks[t].name,
                        "target": ctx.tasks[0].name,
                        "source_labels": list(ctx.tasks[t].labels.labels),
                        "target_labels": list(self._target_labels),
                        "map": [[None if math.isnan(x) else x for x in r] for r in rows.tolist()],
                        "counts": [int(c) for c in counts.tolist()],
                    }
                )
        finally:
            ctx.model.train(was_training)
        return records

    def network_state(self, ctx: StepContext) -> dict[str, Any]:
        """What ``label_transfer_network.pt`` holds: the networks and what they map."""
        assert self.ltn is not None
        return {
            "label_transfer_network": self.ltn.state_dict(),
            "representation_transfer_network": None if self.rtn is None else self.rtn.state_dict(),
            "rtn_layer": self.rtn_layer,
            "sources": {t.name: list(t.labels.labels) for t in ctx.tasks[1:]},
            "target": {ctx.tasks[0].name: list(self._target_labels)},
            "label_dim": self.label_dim,
            "width": self.width,
            "method": self.name,
        }

    def weights(self) -> tuple[Tensor, Tensor]:
        S = self._sources
        w = torch.tensor([1.0] + [self.gamma1 / S] * S, dtype=torch.float64)
        return w, shares(w)

    def summary(self) -> dict[str, Any]:
        return {
            **super().summary(),
            "meta_gradient": self.meta_gradient,
            "gamma1": self.gamma1,
            "gamma2": self.gamma2,
            "eta": self.eta,
            "label_transfer_network": "label_transfer_network.pt",
        }

    def state_dict(self) -> dict[str, Any]:
        assert self.ltn is not None and self.optimizer is not None
        return {
            "name": self.name,
            "updates": self.updates,
            "ltn": self.ltn.state_dict(),
            "rtn": None if self.rtn is None else self.rtn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rtn_optimizer": None
            if self.rtn_optimizer is None
            else self.rtn_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"the state is for method {state.get('name')!r}, not {self.name!r}")
        assert self.ltn is not None and self.optimizer is not None
        if (state["rtn"] is None) != (self.rtn is None):
            raise ValueError(f"{self.name}: the saved run and this one differ in rtn_layer")
        self.updates = int(state["updates"])
        self.ltn.load_state_dict(state["ltn"])
        if self.rtn is not None:
            self.rtn.load_state_dict(state["rtn"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.rtn_optimizer is not None:
            self.rtn_optimizer.load_state_dict(state["rtn_optimizer"])

    def close(self) -> None:
        super().close()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


# -- helpers ---------------------------------------------------------------------------------


def _encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a ``transformers`` encoder (BERT-like: ``encoder.layer``)."""
    for path in ("encoder.layer", "transformer.layer", "layers", "layer"):
        module: Any = encoder
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(
        f"cannot find the transformer layers of {type(encoder).__name__} for the representation "
        "transfer network"
    )


def _labelled(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Any]:
    """``(labels, detached representations, positions)``: the labelled tokens of a tagging
    batch, or every sentence's [CLS] state."""
    if labels.dim() == 1:
        return labels, _wide(hidden[:, 0].detach()), slice(None)
    where = labels != LabelMap.ignore_index
    return labels[where], _wide(hidden[where].detach()), where


def _wide(x: Tensor) -> Tensor:
    """float32 for half-precision (autocast) values; float64 stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _trained(ctx: StepContext) -> list[nn.Parameter]:
    """The model's trainable parameters: where Θ's gradient goes (never the networks')."""
    return [p for p in ctx.model.parameters() if p.requires_grad]


def _soft_cross_entropy(log_probs: Tensor, soft: Tensor) -> Tensor:
    """``mean_n -sum_c soft[n, c] log_probs[n, c]`` (0 for an empty batch)."""
    if log_probs.shape[0] == 0:
        return (log_probs * 0.0).sum() + (soft * 0.0).sum()
    return -(soft * log_probs).sum(dim=-1).mean()


def _grads(
    loss: Tensor,
    params: Sequence[Tensor],
    *,
    retain_graph: bool = False,
    create_graph: bool = False,
) -> list[Tensor]:
    out = torch.autograd.grad(
        loss, list(params), retain_graph=retain_graph or create_graph,
        create_graph=create_graph, allow_unused=True,
    )  # fmt: skip
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out, strict=True)]


def _slice(ctx: StepContext, t: int, indices: Sequence[int]) -> tuple[list[int], float | None]:
    """This process's items of a source batch and their share of its labelled units (None:
    one process, the whole batch). An empty slice is the batch's first item weighted 0, so
    that every process runs the same passes and collectives."""
    if not ctx.distributed.enabled:
        return list(indices), None
    local = ctx.shard(indices)
    if not local:
        return [indices[0]], 0.0
    return local, ctx.loss_share(t, indices, local)


def _shared(loss: Tensor, s: _SourceBatch) -> Tensor:
    """A mean over this process's slice of ``s`` as its share of the global batch's mean."""
    return loss if s.share is None else loss * s.share


class _SumInBackward(torch.autograd.Function):
    """The identity, whose backward sums the incoming gradient over the processes."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, reducer: Any) -> Tensor:
        ctx.reducer = reducer
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.reducer.all_reduce_(grad.contiguous().clone(), "statistics"), None


def _summed_in_backward(ctx: StepContext, tensors: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """The tensors unchanged in value, with one all-reduce in their backward pass: a loss
    on one process reaching them gets the gradient of every process's loss. Also a zero
    that reaches the all-reduce (added to a loss that may not reach the tensors otherwise,
    so that every process joins it)."""
    flat = torch.cat([x.reshape(-1) for x in tensors])
    out = cast(Tensor, _SumInBackward.apply(flat, ctx.distributed))  # type: ignore[no-untyped-call]
    return unflatten(out, tensors), (out * 0.0).sum()


def _with_soft(s: _SourceBatch, soft: Tensor) -> _SourceBatch:
    out = _SourceBatch(s.source, s.ids, s.mask, s.labels)
    out.log_probs, out.soft, out.share = s.log_probs, soft, s.share
    return out


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
