"""TAWT with one weight per source training example (Chen et al., App. B "Extension to the
weighted-sample training", Fig. 2; Sec. 5 leaves its efficient implementation open).

The source objective is ``sum_i p_i l_i`` with ``p`` on the simplex over every source example
of the run (N of them, one float64 N-vector, no per-example Python objects). Every
``update_every`` epochs (the first after ``first_update``) ``p`` takes one mirror-descent
step (eq. 2.8 on samples),

    p_i <- p_i * exp(-eta * g_i) / sum_j p_j * exp(-eta * g_j),     g_i = -c * s_i,

with ``s_i`` how much example i's gradient of the shared encoder agrees with the target's
gradient ``v = grad_phi L_0``:

``"cosine"`` (default, for encoders)
    ``s_i = grad l_i . v / (||grad l_i|| ||v||)``, c = 1 (the paper's Sec. 4 similarity);
``"dot"`` (App. B: the Hessian of eq. 2.7 replaced by a multiple of the identity)
    ``s_i = grad l_i . v``, c = 5 (the paper's constant, for its two-layer network on word
    features; raw per-sentence products of a BERT are orders of magnitude larger, see
    ``sample_weights`` records of ``metrics.jsonl``).

The products come from one pass over the source examples in eval mode: per batch, one
forward and one backward of the summed per-example losses through
:class:`pyxtask.sample_gradients.SampleGradientProducts` (``measure``: per-example dot
products and norms from the covered layers' inputs and output gradients, no per-example
gradient, no weight gradient, ``.grad`` untouched; no optimizer step). ``layers = "all"``
covers every Linear, Embedding and LayerNorm of the encoder (all of a BERT's parameters);
``"linear"`` the Linear layers only (the ``coverage`` of each update's record says how much).
A token task's per-example loss ``l_i`` is the sentence's mean over its labelled words.

In the training step an example counts by its labelled words, as in the token-mean batch loss
of every other method: a batch's source loss is ``sum_i f_i n_i l_i / sum_i n_i`` with
``n_i`` labelled words and ``f_i`` the example's factor. The factors are scaled so that at
uniform ``p`` they equal the fixed method's ``K * w_t`` for the paradigm: until its first
update the method trains exactly as ``--method fixed`` does (same batches, same loss scale).

The weights act as per-example loss factors (``weights_as = "loss"``, default) or as the
probabilities with which a source batch's examples are drawn (``"sampling"``: the step draws
them, the sampler is unchanged). A step on the stream of batches then minimises
``omega_0 L_0 + (1 - omega_0) sum_i p_i l_i`` with the target's share ``omega_0`` fixed by the
paradigm (joint: n_0 / n, normalized joint: 1 / T, pretrain: 0) and, at uniform ``p``, every
example counting the same (joint) or every source task the same (normalized joint).

Each update writes ``sample_weights.pt`` (atomic) with the weights, their history (quantiles
and histograms per source), the scale of the raw products, and the examples weighted least
and most (text, labels, weight); ``pyxtask samples RUN_DIR`` turns it into tables and plots.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol, cast

import numpy as np
import torch
from torch import Tensor, nn

from pyxtask import ops
from pyxtask.data import LabeledText, collate
from pyxtask.methods._base import Method, Sampling, Step, StepContext
from pyxtask.weighting import SampleSize, Uniform

__all__ = [
    "HIST_EDGES",
    "SampleTAWTMethod",
    "SampleWeights",
    "sample_similarities",
]

SampleSimilarity = Literal["cosine", "dot"]
#: log10 of the relative weight ``p_i * N`` (1 = the uniform weight): the histogram bins.
HIST_EDGES: tuple[float, ...] = tuple(float(x) for x in np.linspace(-10.0, 4.0, 71))
QUANTILES: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
#: Examples per source (and overall) kept with their text at each end of the weights.
EXTREMES = 50
FILE = "sample_weights.pt"


class Products(Protocol):
    """What the update needs of :class:`pyxtask.sample_gradients.SampleGradientProducts`."""

    coverage: float
    parameter_names: tuple[str, ...]

    def measure(
        self,
        losses: Callable[[], Tensor],
        vector: Mapping[str, Tensor] | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor]: ...


ProductsFactory = Callable[[nn.Module, str], Products]


def default_products(module: nn.Module, layers: str) -> Products:
    from pyxtask.sample_gradients import SampleGradientProducts  # noqa: PLC0415

    return cast(Products, SampleGradientProducts(module, layers=layers))


def sample_similarities(
    dots: Tensor, sq_norms: Tensor, v_norm: float, similarity: SampleSimilarity
) -> Tensor:
    """``s_i`` (float64): ``dots / (||grad l_i|| ||v||)`` (an example with no gradient gets 0)
    or the raw ``dots``."""
    dots = dots.to(torch.float64)
    if similarity == "dot":
        return dots
    denom = sq_norms.to(torch.float64).clamp(min=0).sqrt() * float(v_norm)
    return torch.where(denom > 0, dots / denom.clamp(min=1e-300), torch.zeros_like(dots))


class SampleWeights:
    """``p``: one weight per source example on the simplex, its mirror-descent step and its
    history (pure state; the method and ``benchmarks/`` scripts share it).

    Args:
        sizes: examples per source task (N = their sum).
        start: ``"uniform"`` (every example the same: joint, pretrain) or ``"per-task"``
            (every task the same share: normalized joint).
        names: the sources' names (for the history).
    """

    def __init__(
        self, sizes: Sequence[int], start: str = "uniform", names: Sequence[str] | None = None
    ) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"every source needs at least one example, got sizes {list(sizes)}")
        self.sizes = [int(n) for n in sizes]
        self.names = list(names) if names is not None else [str(i) for i in range(len(sizes))]
        self.offsets = [0, *np.cumsum(self.sizes).tolist()]
        n = self.offsets[-1]
        if start == "uniform":
            self.p = torch.full((n,), 1.0 / n, dtype=torch.float64)
        elif start == "per-task":
            self.p = torch.cat(
                [torch.full((k,), 1.0 / (k * len(sizes)), dtype=torch.float64) for k in sizes]
            )
        else:
            raise ValueError(f"start must be 'uniform' or 'per-task', got {start!r}")
        self.updates = 0
        self.history: list[dict[str, Any]] = []
        self._cdf: Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    def task_slice(self, s: int) -> slice:
        return slice(self.offsets[s], self.offsets[s + 1])

    def shares(self) -> list[float]:
        """Each source's share of the source objective (sums to 1)."""
        return [float(self.p[self.task_slice(s)].sum()) for s in range(len(self.sizes))]

    def update(self, similarity: Tensor, c: float, lr: float) -> None:
        """One mirror-descent step (eq. 2.8) from ``s_i`` with ``g_i = -c * s_i``."""
        s = torch.as_tensor(similarity, dtype=torch.float64).reshape(-1)
        if s.numel() != self.n:
            raise ValueError(f"got {s.numel()} similarities for {self.n} source examples")
        if not bool(torch.isfinite(s).all()):
            raise FloatingPointError("tawt-samples: a per-example similarity is not finite")
        self.p = ops.mirror_descent_step(self.p, -float(c) * s, float(lr))
        self.updates += 1
        self._cdf = None

    def draw(self, count: int, generator: torch.Generator) -> Tensor:
        """``count`` example indices drawn with probabilities ``p`` (with replacement)."""
        if self._cdf is None:
            self._cdf = torch.cumsum(self.p, 0)
        u = torch.rand(count, dtype=torch.float64, generator=generator) * float(self._cdf[-1])
        return torch.searchsorted(self._cdf, u, right=True).clamp(max=self.n - 1)

    def relative(self) -> Tensor:
        """``p_i * N``: 1 is the uniform weight."""
        return self.p * self.n

    def snapshot(self, **where: Any) -> dict[str, Any]:
        """A history record: each source's share, quantiles and histogram of ``p_i * N``."""
        rel = self.relative()
        edges = torch.tensor(HIST_EDGES, dtype=torch.float64)
        sources: dict[str, Any] = {}
        for s, name in enumerate(self.names):
            r = rel[self.task_slice(s)]
            logr = r.clamp(min=10 ** HIST_EDGES[0]).log10().clamp(max=HIST_EDGES[-1])
            counts = torch.histc(logr, bins=len(edges) - 1, min=HIST_EDGES[0], max=HIST_EDGES[-1])
            q = np.quantile(r.numpy(), QUANTILES)  # torch.quantile stops at 2**24 values
            sources[name] = {
                "share": float(r.sum()) / self.n,
                "quantiles": [float(x) for x in q],
                "histogram": [int(x) for x in counts.tolist()],
                "zero": int((r == 0).sum()),
            }
        record = {"update": self.updates, **where, "sources": sources}
        self.history.append(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"sizes": self.sizes, "p": self.p.clone(), "updates": self.updates,
                "history": list(self.history)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["sizes"]) != self.sizes:
            raise ValueError(
                f"the saved sample weights are for sources of sizes {state['sizes']}, this run's "
                f"are {self.sizes}"
            )
        self.p = state["p"].to(torch.float64).clone()
        self.updates = int(state["updates"])
        self.history = list(state["history"])
        self._cdf = None


def _scale(x: Tensor) -> dict[str, float]:
    x = x.to(torch.float64)
    a = x.abs()
    return {
        "mean": float(x.mean()),
        "std": float(x.std()) if x.numel() > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
        "median_abs": float(a.median()),
        "max_abs": float(a.max()),
    }


class SampleTAWTMethod(Method):
    """TAWT on source examples (see the module docs).

    Args:
        paradigm: ``"joint"``, ``"normalized-joint"`` or ``"pretrain"`` (the target's share).
        similarity: ``"cosine"`` (default) or ``"dot"``.
        c: ``g_i = -c * s_i`` (None: 1 for cosine, 5 for dot).
        lr: the mirror-descent step η (default 1.0).
        update_every: epochs between updates (the paper: 5 of 200).
        first_update: epochs before the first update (None: ``update_every``).
        weights_as: ``"loss"`` (per-example factors) or ``"sampling"`` (drawn by weight).
        target_probe: target examples the target's gradient is taken on (None: all).
        layers: what the products cover: ``"all"`` (Linear, Embedding, LayerNorm) or
            ``"linear"``.
        batch_size: examples per batch of the update's pass (None: the run's batch size).
        products: builds the per-example products (default
            :class:`~pyxtask.sample_gradients.SampleGradientProducts`).
    """

    name = "tawt-samples"
    sampling: ClassVar[Sampling] = "one"
    adaptive: ClassVar[bool] = True

    def __init__(
        self,
        paradigm: str = "normalized-joint",
        *,
        similarity: SampleSimilarity = "cosine",
        c: float | None = None,
        lr: float = 1.0,
        update_every: int = 1,
        first_update: int | None = None,
        weights_as: str = "loss",
        target_probe: int | None = None,
        layers: str = "all",
        batch_size: int | None = None,
        products: ProductsFactory | None = None,
    ) -> None:
        super().__init__()
        if paradigm not in ("joint", "normalized-joint", "pretrain"):
            raise ValueError(f"tawt-samples weights source examples; paradigm {paradigm!r}")
        if similarity not in ("cosine", "dot"):
            raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
        if weights_as not in ("loss", "sampling"):
            raise ValueError(f"weights_as must be 'loss' or 'sampling', got {weights_as!r}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1 epoch, got {update_every}")
        if first_update is not None and first_update < 1:
            raise ValueError(f"first_update must be >= 1 epoch, got {first_update}")
        self.paradigm = paradigm
        self.similarity: SampleSimilarity = similarity
        self.c = float(c) if c is not None else (1.0 if similarity == "cosine" else 5.0)
        self.lr_md = float(lr)
        self.update_every = int(update_every)
        self.first_update = self.update_every if first_update is None else int(first_update)
        self.weights_as = weights_as
        self.target_probe = target_probe
        self.layers = layers
        self.pass_batch = batch_size
        self.make_products = products or default_products
        self._weights: SampleWeights | None = None
        self._last: dict[str, Tensor] = {}

    # -- set-up ---------------------------------------------------------------------------------

    @property
    def sample_weights(self) -> SampleWeights:
        if self._weights is None:
            raise RuntimeError("tawt-samples: bind() the method to a context first")
        return self._weights

    def bind(self, ctx: StepContext) -> None:
        if ctx.num_tasks < 2:
            raise ValueError("tawt-samples needs at least one source task")
        sizes = ctx.sizes
        start = "per-task" if self.paradigm == "normalized-joint" else "uniform"
        self._weights = SampleWeights(sizes[1:], start, ctx.task_names[1:])
        self.n_target = sizes[0]
        in_objective = self.paradigm != "pretrain"
        self.n_all = sum(sizes) if in_objective else sum(sizes[1:])
        if self.paradigm == "joint":
            self.omega0 = sizes[0] / sum(sizes)
        elif self.paradigm == "normalized-joint":
            self.omega0 = 1.0 / len(sizes)
        else:
            self.omega0 = 0.0
        self.sample_weights.snapshot(epoch=0, step=0)
        # The fixed method's loss factor of a source over this method's at uniform weights: a
        # constant (1 for joint and pretrain) that makes both start with the same loss scale.
        fixed = (
            Uniform(sizes)
            if self.paradigm == "normalized-joint"
            else SampleSize(sizes, cast(Any, self.paradigm))
        )
        omega = float(fixed.omega[1])
        self.scale = float(fixed.loss_factors()[1]) * sizes[1] / (omega * self.n_all)

    # -- the step ------------------------------------------------------------------------------

    def _factors(self, s: int, items: Tensor) -> Tensor:
        """Loss factors of source ``s``'s examples ``items`` (the fixed method's at uniform
        weights)."""
        w = self.sample_weights
        return w.p[w.offsets[s] + items] * ((1 - self.omega0) * self.n_all * self.scale)

    def step(self, ctx: StepContext, micro_batches: list[Step]) -> dict[int, float]:
        m = len(micro_batches)
        tasks: list[int] = []
        values: list[Tensor] = []
        for j, step in enumerate(micro_batches):
            ((t, indices),) = step
            if t == 0:
                loss = ctx.batch_loss(0, indices)
                f0 = self.omega0 * self.n_all / self.n_target * self.scale
                terms = [(0, loss.detach(), loss * f0)]
            elif self.weights_as == "loss":
                units = float(ctx.item_units(t, indices).sum())
                terms = [self._term(ctx, t, indices, units=units, loss_units=units)]
            else:
                terms = self._drawn(ctx, len(indices), j)
            total = cast(Tensor, sum(loss for _, _, loss in terms))
            torch.autograd.backward(total / m if m > 1 else total)
            tasks += [t for t, _, _ in terms]
            values += [value for _, value, _ in terms]
        return ctx.mean_losses(tasks, values)

    def _term(
        self,
        ctx: StepContext,
        t: int,
        indices: Sequence[int],
        *,
        units: float,
        loss_units: float,
        factor: float | None = None,
    ) -> tuple[int, Tensor, Tensor]:
        """Task ``t``'s examples ``indices`` (global; this process takes its slice): their mean
        loss (÷ ``units``) and their loss weighted by ``factor`` (None: each example's own) ÷
        ``loss_units``. Both are this process's shares: summed over the processes they are the
        one-process values."""
        local = ctx.shard(indices)
        if not local or units == 0:
            zero = ctx.zero_loss(t)
            return t, zero.detach(), zero
        per = ctx.batch_loss(t, local, per_sample=True)
        words = ctx.item_units(t, local).to(per) * per
        if factor is None:
            weighted = self._factors(t - 1, torch.as_tensor(local, dtype=torch.long)).to(per)
            loss = (weighted * words).sum() / loss_units
        else:
            loss = words.sum() * (factor / loss_units)
        return t, (words.sum() / units).detach(), loss

    def _drawn(self, ctx: StepContext, count: int, j: int) -> list[tuple[int, Tensor, Tensor]]:
        """``count`` source examples drawn by weight (seeded by the step, the same on every
        process), grouped by task; each loss divides by all drawn examples' labelled words, so
        their sum is the batch's mean loss times the factor of uniform weights."""
        w = self.sample_weights
        g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + ctx.global_step * 31 + j)
        drawn = w.draw(count, g)
        factor = (1 - self.omega0) * self.n_all / w.n * self.scale
        groups = []
        for s in range(len(w.sizes)):
            sl = w.task_slice(s)
            mine = (drawn[(drawn >= sl.start) & (drawn < sl.stop)] - sl.start).tolist()
            if mine:
                groups.append((s + 1, mine, float(ctx.item_units(s + 1, mine).sum())))
        total = sum(units for _, _, units in groups)
        return [
            self._term(ctx, t, mine, units=units, loss_units=total, factor=factor)
            for t, mine, units in groups
        ]

    # -- the update ----------------------------------------------------------------------------

    def epoch_end(self, ctx: StepContext, epoch: int) -> None:
        since = epoch + 1 - self.first_update
        if since >= 0 and since % self.update_every == 0:
            self.update(ctx)

    def update(self, ctx: StepContext) -> None:
        """One pass over the source examples and one mirror-descent step of ``p``."""
        import time  # noqa: PLC0415

        w = self.sample_weights
        model = ctx.model
        products = self.make_products(model.encoder, self.layers)
        named = dict(model.encoder.named_parameters())
        covered = {name: named[name] for name in products.parameter_names}
        saved = {p: p.grad for p in model.parameters()}
        was_training = model.training
        model.eval()  # the authors' probes: no dropout
        started = time.perf_counter()
        try:
            for p in saved:
                p.grad = None
            v = self._target_gradient(ctx, covered)
            v_norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in v.values()))
            dots, sq_norms = self._products(ctx, products, v)
        finally:
            for p, grad in saved.items():
                p.grad = grad
            model.train(was_training)
        seconds = time.perf_counter() - started
        s = sample_similarities(dots, sq_norms, v_norm, self.similarity)
        w.update(s, self.c, self.lr_md)
        self.updates = w.updates
        scale = {
            "dots": _scale(dots),
            "grad_norms": _scale(sq_norms.clamp(min=0).sqrt()),
            "similarity": _scale(s),
            "target_grad_norm": v_norm,
            "coverage": float(products.coverage),
            "seconds": seconds,
        }
        record = w.snapshot(epoch=ctx.epoch + 1, step=ctx.global_step, **scale)
        ctx.log({"kind": "sample_weights", **{k: v for k, v in record.items() if k != "sources"},
                 "shares": {k: x["share"] for k, x in record["sources"].items()}})  # fmt: skip
        self._last = {"similarity": s.float(), "dots": dots.float(), "sq_norms": sq_norms.float()}
        self.record(ctx)
        ctx.save(FILE, self.report(ctx))

    def _batches(self, ctx: StepContext, t: int, items: Sequence[int]) -> Iterator[list[int]]:
        """``items`` in batches of similar length (less padding), with a progress bar; under
        torchrun this process's share of the batches."""
        from tqdm.auto import tqdm  # noqa: PLC0415

        size = self.pass_batch or ctx.batch_size
        order = sorted(items, key=lambda i: len(ctx.encoded[t][i].input_ids))
        chunks = ctx.distributed.shard([order[k : k + size] for k in range(0, len(order), size)])
        desc = f"tawt-samples update {self.sample_weights.updates + 1}: {ctx.task_names[t]}"
        yield from tqdm(chunks, desc=desc, disable=None, leave=False)

    def _target_gradient(
        self, ctx: StepContext, covered: dict[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        """``v = grad_phi L_0``: the target's mean per-example loss over its training examples
        (or a seeded ``target_probe`` of them), on the parameters the products cover."""
        n = ctx.sizes[0]
        items = list(range(n))
        if self.target_probe is not None and self.target_probe < n:
            g = torch.Generator().manual_seed(ctx.seed * 7919 + self.sample_weights.updates)
            items = torch.randperm(n, generator=g)[: self.target_probe].tolist()
        names, params = list(covered), list(covered.values())
        total = [torch.zeros_like(p) for p in params]
        for batch in self._batches(ctx, 0, items):
            loss = ctx.batch_loss(0, batch, per_sample=True).sum() / len(items)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, grad in zip(total, grads, strict=True):
                if grad is not None:
                    acc.add_(grad)
        return dict(zip(names, ctx.distributed.sum_tensors(total), strict=True))

    def _products(
        self, ctx: StepContext, products: Products, v: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Every source example's ``grad l_i . v`` and ``||grad l_i||^2`` (float64, CPU): per
        batch one forward and one backward of the summed losses, products by hooks."""
        w = self.sample_weights
        dots = torch.zeros(w.n, dtype=torch.float64)
        sq_norms = torch.zeros(w.n, dtype=torch.float64)
        for s in range(len(w.sizes)):
            t = s + 1
            for batch in self._batches(ctx, t, range(w.sizes[s])):
                mask = collate([ctx.encoded[t][i] for i in batch], ctx.pad)["attention_mask"]
                d, sq = products.measure(
                    functools.partial(ctx.batch_loss, t, batch, per_sample=True),
                    v,
                    mask.to(ctx.device),
                )
                where = torch.as_tensor(batch, dtype=torch.long) + w.offsets[s]
                dots[where] = cast(Tensor, d).detach().to("cpu", torch.float64)
                sq_norms[where] = sq.detach().to("cpu", torch.float64)
        # Each process measured its share of the batches, zeros elsewhere: 2N float64 summed.
        ctx.distributed.all_reduce_(dots)
        ctx.distributed.all_reduce_(sq_norms)
        return dots, sq_norms

    # -- what users see ------------------------------------------------------------------------

    def report(self, ctx: StepContext) -> dict[str, Any]:
        """``sample_weights.pt``: the weights, their history and the extreme examples."""
        w = self.sample_weights
        sentence = torch.cat(
            [torch.tensor([e.sentence for e in ctx.encoded[s + 1]], dtype=torch.int32)
             for s in range(len(w.sizes))]
        )  # fmt: skip
        extremes: dict[str, list[dict[str, Any]]] = {}
        for s, name in enumerate(w.names):
            extremes[name] = self._extremes(ctx, w.p[w.task_slice(s)], w.offsets[s])
        extremes["all sources"] = self._extremes(ctx, w.p, 0)
        return {
            "method": self.name,
            "paradigm": self.paradigm,
            "similarity": self.similarity,
            "c": self.c,
            "lr": self.lr_md,
            "weights_as": self.weights_as,
            "layers": self.layers,
            "tasks": w.names,
            "sizes": w.sizes,
            "offsets": w.offsets,
            "weights": w.p.clone(),
            "sentence": sentence,
            "last": dict(self._last),
            "history": list(w.history),
            "hist_range": (HIST_EDGES[0], HIST_EDGES[-1]),
            "extremes": extremes,
        }

    def _extremes(self, ctx: StepContext, p: Tensor, offset: int) -> list[dict[str, Any]]:
        """The ``EXTREMES`` least and most weighted examples among ``p`` (text, labels)."""
        w = self.sample_weights
        k = min(EXTREMES, p.numel())
        order = torch.argsort(p)
        picked = torch.cat([order[:k], order[-k:].flip(0)]) if p.numel() > k else order
        rows = []
        for rank, j in enumerate(picked.tolist()):
            i = offset + j
            s = max(x for x in range(len(w.sizes)) if w.offsets[x] <= i)
            item = i - w.offsets[s]
            example = ctx.tasks[s + 1].train[ctx.encoded[s + 1][item].sentence]
            if isinstance(example, LabeledText):
                text, labels = example.text, example.label
            else:
                text, labels = " ".join(example.words), " ".join(example.tags)
            last = self._last.get("similarity")
            rows.append({
                "end": "least" if rank < k else "most",
                "task": w.names[s],
                "item": item,
                "source": example.source,
                "weight": float(w.p[i]) * w.n,
                "similarity": None if last is None else float(last[i]),
                "text": text,
                "labels": labels,
            })  # fmt: skip
        return rows

    # -- weights, summary, state ---------------------------------------------------------------

    def weights(self) -> tuple[Tensor, Tensor]:
        """Per task: the mean loss factor of its examples and its share of the objective."""
        w = self.sample_weights
        shares = [x * (1 - self.omega0) for x in w.shares()]
        factors = [self.omega0 * self.n_all / self.n_target if self.n_target else 0.0]
        factors += [share * self.n_all / n for share, n in zip(shares, w.sizes, strict=True)]
        factors = [x * self.scale for x in factors]
        return (
            torch.tensor(factors, dtype=torch.float64),
            torch.tensor([self.omega0, *shares], dtype=torch.float64),
        )

    def summary(self) -> dict[str, Any]:
        rel = self.sample_weights.relative()
        qs = (0.01, 0.5, 0.99)
        return {
            **super().summary(),
            "c": self.c,
            "similarity": self.similarity,
            "source_examples": self.sample_weights.n,
            "relative_weight_quantiles": {
                str(q): float(x) for q, x in zip(qs, np.quantile(rel.numpy(), qs), strict=True)
            },
        }

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self.sample_weights.state_dict(),
                "last": dict(self._last)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"the state is for method {state.get('name')!r}, not {self.name!r}")
        self.sample_weights.load_state_dict(state["weights"])
        self.updates = self.sample_weights.updates
        self._last = dict(state.get("last", {}))
