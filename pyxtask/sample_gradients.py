"""Per-sample gradient products without per-sample gradients ("ghost" products).

For a batch whose loss is a sum of per-sample losses ``l_i``, :class:`SampleGradientProducts`
gives every sample's ``grad l_i . V`` (V: a vector over the parameters, e.g. a target task's
gradient) and ``||grad l_i||^2``, from the one backward pass of ``sum_i l_i``. It never
builds the per-sample gradients: hooks keep each covered layer's input ``a`` (forward) and
output gradient ``d`` (backward), and the compiled ops of :mod:`pyxtask.ops` reduce them
sample by sample:

- ``nn.Linear``: ``grad l_i . V = sum_k d_ik . (V a_ik)`` (``linear_sample_dots``) and
  ``||grad l_i||^2 = sum_{k,l} (d_ik . d_il)(a_ik . a_il)`` — or, when that costs more, the
  norm of the per-sample layer gradient ``sum_k d_ik a_ik^T`` built a few samples at a time
  (``linear_sample_sq_norms``, chosen per layer by its cost); bias: ``sum_k d_ik``;
- ``nn.Embedding``: a sample's gradient row r is the sum of ``d_ik`` over its positions with
  token id r: the dot gathers V's rows, the norm pairs positions with the same id
  (``embedding_sample_dots``, ``embedding_sample_sq_norms``); ``padding_idx`` gets no gradient;
- ``nn.LayerNorm``: the per-sample gradients ``sum_k d_ik * xhat_ik`` and ``sum_k d_ik`` are
  only as large as the layer, so they are formed (batched torch ops) and reduced directly.

Positions where ``mask`` is 0 (padding) are left out. Other parameters are not covered;
:attr:`SampleGradientProducts.coverage` says which fraction of the module's trainable
parameters (by count) the products span. Results are float64.

Two ways to run it:

- inside a training step: ``with products.capture(V, mask): loss = f(); loss.sum().backward()``
  — the step's own backward; ``.grad`` of every parameter is exactly what it would have been;
- for a weight update alone: ``dots, sq_norms = products.measure(f, V, mask)`` — one forward
  and a backward that computes the layers' output gradients and nothing else: no weight
  gradient is formed and no ``.grad`` is touched.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyxtask import ops

__all__ = ["SampleGradientProducts"]

LAYER_CHOICES = ("all", "linear")


@dataclass(frozen=True)
class _Layer:
    """A covered module and the names of its covered parameters (None: not covered)."""

    name: str
    module: nn.Module
    kind: str  # "linear", "embedding" or "layer_norm"
    weight: str | None
    bias: str | None


def _kind(module: nn.Module, layers: str) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if layers == "all" and isinstance(module, nn.Embedding):
        return "embedding"
    if layers == "all" and isinstance(module, nn.LayerNorm):
        return "layer_norm"
    return None


def _covered_layers(module: nn.Module, layers: str) -> list[_Layer]:
    names = {id(p): name for name, p in module.named_parameters()}
    owner: dict[int, str] = {}
    out = []
    for mod_name, sub in module.named_modules():
        kind = _kind(sub, layers)
        if kind is None:
            continue
        if isinstance(sub, nn.Embedding) and (sub.scale_grad_by_freq or sub.sparse):
            raise ValueError(
                f"SampleGradientProducts: embedding {mod_name!r} uses "
                f"{'scale_grad_by_freq' if sub.scale_grad_by_freq else 'sparse'} gradients, "
                "which it does not support"
            )
        pieces: dict[str, str | None] = {}
        for attr in ("weight", "bias"):
            p = getattr(sub, attr, None)
            if not isinstance(p, nn.Parameter) or not p.requires_grad:
                pieces[attr] = None
                continue
            if id(p) in owner:  # a shared parameter's per-sample norm needs cross terms
                raise ValueError(
                    f"SampleGradientProducts: parameter {names[id(p)]!r} is used by both "
                    f"{owner[id(p)]!r} and {mod_name!r}; shared (tied) parameters are not "
                    "supported"
                )
            owner[id(p)] = mod_name
            pieces[attr] = names[id(p)]
        if pieces["weight"] is not None or pieces["bias"] is not None:
            out.append(_Layer(mod_name, sub, kind, pieces["weight"], pieces["bias"]))
    return out


class SampleGradientProducts:
    """Per-sample ``grad l_i . V`` and ``||grad l_i||^2`` over a module's layers, from one
    backward pass, without per-sample gradients.

    ``layers``: ``"all"`` covers ``nn.Linear``, ``nn.Embedding`` and ``nn.LayerNorm``;
    ``"linear"`` only ``nn.Linear``. After a backward inside :meth:`capture` (or after
    :meth:`measure`), :attr:`dots` (None without a vector) and :attr:`sq_norms` hold one
    float64 entry per sample, summed over the covered parameters.

    The batch is dimension 0 of every covered layer's input; a layer input with batch size 1
    (BERT's position ids) is broadcast to the batch. Samples must not interact in the forward
    pass (no batch normalisation), and each covered module runs at most once per forward.
    """

    def __init__(self, module: nn.Module, layers: str = "all") -> None:
        if layers not in LAYER_CHOICES:
            raise ValueError(f"layers must be one of {LAYER_CHOICES}, got {layers!r}")
        self.module = module
        self.layers = layers
        self._layers = _covered_layers(module, layers)
        self.parameter_names = tuple(
            n for layer in self._layers for n in (layer.weight, layer.bias) if n is not None
        )
        params = dict(module.named_parameters())
        total = sum(p.numel() for p in params.values() if p.requires_grad)
        covered = sum(params[n].numel() for n in self.parameter_names)
        #: Fraction of the module's trainable parameters (by count) the products cover.
        self.coverage: float = covered / total if total else 1.0
        self.dots: Tensor | None = None
        self.sq_norms: Tensor = torch.zeros(0, dtype=torch.float64)
        self._vector: dict[str, Tensor] | None = None
        self._mask: Tensor | None = None
        self._batch: int | None = None
        self._probe: Tensor | None = None
        self._seen: set[str] = set()
        self._active = False

    # -- public ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(
        self, vector: Mapping[str, Tensor] | None = None, mask: Tensor | None = None
    ) -> Iterator[SampleGradientProducts]:
        """Hooks the covered layers for one forward and backward run inside the block.

        ``vector``: parameter name (as in ``module.named_parameters()``) to V, same shape,
        for every covered parameter (extra names of uncovered parameters are ignored), or
        None for norms only. ``mask``: ``[B, L]`` of real positions (0 = padding) for the
        layers whose inputs are ``[B, L, ...]``, or None when every position is real.
        """
        yield from self._capture(vector, mask, probe=False)

    def measure(
        self,
        losses: Callable[[], Tensor],
        vector: Mapping[str, Tensor] | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor]:
        """Runs ``losses()`` (the per-sample losses, a forward pass) and a backward pass that
        only computes the products; returns ``(dots, sq_norms)``.

        No weight gradient is formed and no ``.grad`` changes: the module's parameters are
        set not to require gradients for the call (and restored), and a zero scalar that does
        is added to the covered layers' outputs that would otherwise not need a gradient
        (those fed by the data alone); the backward with respect to it computes the layers'
        output gradients and nothing else.
        """
        frozen = [p for p in self.module.parameters() if p.requires_grad]
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.contextmanager(self._capture)(vector, mask, probe=True))
            stack.callback(lambda: [p.requires_grad_(True) for p in frozen])
            for p in frozen:
                p.requires_grad_(False)
            out = losses()
            if out.dim() != 1:
                raise ValueError(
                    f"measure: losses() must return one loss per sample (a 1-D tensor), got "
                    f"shape {tuple(out.shape)}"
                )
            if not self._seen:
                raise RuntimeError("measure: no covered layer ran in losses(); nothing to measure")
            assert self._probe is not None
            if out.requires_grad:
                torch.autograd.grad(out.sum(), self._probe, allow_unused=True)
        return self.dots, self.sq_norms

    # -- capture --------------------------------------------------------------------------

    def _capture(
        self, vector: Mapping[str, Tensor] | None, mask: Tensor | None, probe: bool
    ) -> Iterator[SampleGradientProducts]:
        if self._active:
            raise RuntimeError("SampleGradientProducts: capture() is already active")
        self._vector = self._check_vector(vector)
        self._mask = self._check_mask(mask)
        self._batch = None if mask is None else int(mask.shape[0])
        self._seen = set()
        self.dots, self.sq_norms = None, torch.zeros(0, dtype=torch.float64)
        self._probe = torch.zeros((), requires_grad=True, device=self._device()) if probe else None
        handles = [
            layer.module.register_forward_hook(functools.partial(self._forward_hook, layer))
            for layer in self._layers
        ]
        self._active = True
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._active = False
            self._probe = None
            self._vector = None

    def _device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    def _check_vector(self, vector: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
        if vector is None:
            return None
        params = dict(self.module.named_parameters())
        unknown = sorted(set(vector) - set(params))
        if unknown:
            raise KeyError(
                f"vector names {unknown[0]!r}, which is not a parameter of the module "
                f"({len(unknown)} unknown name(s))"
            )
        missing = [n for n in self.parameter_names if n not in vector]
        if missing:
            raise KeyError(
                f"vector has no entry for the covered parameter {missing[0]!r} "
                f"({len(missing)} missing); give zeros for parameters V does not touch"
            )
        out = {}
        for n in self.parameter_names:
            v = vector[n]
            if v.shape != params[n].shape:
                raise ValueError(
                    f"vector[{n!r}] has shape {tuple(v.shape)}, the parameter "
                    f"{tuple(params[n].shape)}"
                )
            out[n] = v.detach()
        return out

    @staticmethod
    def _check_mask(mask: Tensor | None) -> Tensor | None:
        if mask is None:
            return None
        if mask.dim() != 2:
            raise ValueError(f"mask must be [batch, positions], got shape {tuple(mask.shape)}")
        return mask.detach()

    def _batch_size(self, layer: _Layer, batch: int) -> int:
        if self._batch is None:
            self._batch = batch
        elif batch not in (1, self._batch):
            raise ValueError(
                f"layer {layer.name!r} sees a batch of {batch}, an earlier layer {self._batch}"
            )
        return self._batch

    def _forward_hook(
        self, layer: _Layer, module: nn.Module, inputs: tuple[object, ...], output: object
    ) -> Tensor | None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return None
        if layer.name in self._seen:
            raise RuntimeError(
                f"SampleGradientProducts: layer {layer.name!r} ran twice in one capture; "
                "each covered module may run once per forward"
            )
        x = inputs[0]
        assert isinstance(x, Tensor)
        if x.dim() < (1 if layer.kind == "embedding" else 2):
            raise ValueError(f"layer {layer.name!r}: its input has no batch dimension")
        self._seen.add(layer.name)
        batch = self._batch_size(layer, x.shape[0])
        replaced = None
        if x.shape[0] != batch:  # broadcast over the batch (BERT's position embeddings)
            x = x.expand(batch, *x.shape[1:])
            output = replaced = output.expand(batch, *output.shape[1:])
        if self._probe is not None and not output.requires_grad:
            output = replaced = output + self._probe
        if output.requires_grad:
            mask = self._positions(layer, _positions_shape(layer, x))
            hook = functools.partial(self._backward_hook, layer, x.detach(), mask)
            cast(Any, output).register_hook(hook)
        return replaced

    # -- backward: per-layer products ------------------------------------------------------

    def _positions(self, layer: _Layer, positions: torch.Size) -> Tensor | None:
        """The mask for a layer whose per-sample positions have shape ``positions``."""
        if self._mask is None or len(positions) == 0:
            return None
        if tuple(positions) != tuple(self._mask.shape[1:]):
            raise ValueError(
                f"layer {layer.name!r} has positions {tuple(positions)} per sample, the mask "
                f"{tuple(self._mask.shape[1:])}; give a mask that matches the layer inputs"
            )
        return self._mask

    def _backward_hook(self, layer: _Layer, x: Tensor, mask: Tensor | None, grad: Tensor) -> None:
        with torch.no_grad():
            dots, sq = getattr(self, "_" + layer.kind)(layer, x, mask, grad)
            if self.sq_norms.numel() == 0:
                self.sq_norms = torch.zeros(grad.shape[0], dtype=torch.float64, device=grad.device)
                if self._vector is not None:
                    self.dots = torch.zeros_like(self.sq_norms)
            self.sq_norms += sq
            if self.dots is not None and dots is not None:
                self.dots += dots

    def _v(self, name: str | None, like: Tensor) -> Tensor | None:
        if self._vector is None or name is None:
            return None
        return self._vector[name].to(dtype=like.dtype, device=like.device)

    def _linear(
        self, layer: _Layer, x: Tensor, mask: Tensor | None, grad: Tensor
    ) -> tuple[Tensor | None, Tensor]:
        batch = x.shape[0]
        a = x.reshape(batch, -1, x.shape[-1])
        d = grad.reshape(batch, -1, grad.shape[-1])
        dots = torch.zeros(batch, dtype=torch.float64, device=d.device)
        sq = torch.zeros_like(dots)
        if layer.weight is not None:
            sq += ops.linear_sample_sq_norms(a, d, mask)
            v = self._v(layer.weight, d)
            if v is not None:
                dots += ops.linear_sample_dots(a, d, v, mask)
        if layer.bias is not None:
            dots, sq = self._add_bias(layer.bias, d, mask, dots, sq)
        return (dots if self._vector is not None else None), sq

    def _add_bias(
        self, name: str, d: Tensor, mask: Tensor | None, dots: Tensor, sq: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Adds a bias (gradient sum_k m_k d_k per sample) to dots and sq."""
        s = _masked_sum(d, mask)
        sq = sq + s.square().sum(1)
        v = self._v(name, d)
        if v is not None:
            dots = dots + (s @ v.double().reshape(-1))
        return dots, sq

    def _embedding(
        self, layer: _Layer, x: Tensor, mask: Tensor | None, grad: Tensor
    ) -> tuple[Tensor | None, Tensor]:
        module = layer.module
        assert isinstance(module, nn.Embedding)
        batch = x.shape[0]
        ids = x.reshape(batch, -1)
        d = grad.reshape(batch, ids.shape[1], grad.shape[-1])
        if module.padding_idx is not None:  # that row gets no gradient
            real = ids != module.padding_idx
            mask = real if mask is None else real & (mask.reshape(ids.shape) != 0)
        sq = ops.embedding_sample_sq_norms(ids, d, mask)
        v = self._v(layer.weight, d)
        dots = None if v is None else ops.embedding_sample_dots(ids, d, v, mask)
        return dots, sq

    def _layer_norm(
        self, layer: _Layer, x: Tensor, mask: Tensor | None, grad: Tensor
    ) -> tuple[Tensor | None, Tensor]:
        module = layer.module
        assert isinstance(module, nn.LayerNorm)
        batch, shape = x.shape[0], tuple(module.normalized_shape)
        width = math.prod(shape)
        xhat = F.layer_norm(x, shape, eps=module.eps).reshape(batch, -1, width)
        d = grad.reshape(batch, -1, width)
        dots = torch.zeros(batch, dtype=torch.float64, device=d.device)
        sq = torch.zeros_like(dots)
        if layer.weight is not None:
            g = _masked_sum(d * xhat, mask)
            sq += g.square().sum(1)
            v = self._v(layer.weight, d)
            if v is not None:
                dots += g @ v.double().reshape(-1)
        if layer.bias is not None:
            dots, sq = self._add_bias(layer.bias, d, mask, dots, sq)
        return (dots if self._vector is not None else None), sq


def _positions_shape(layer: _Layer, x: Tensor) -> torch.Size:
    """The per-sample positions of a layer's input (the dimensions between batch and
    features)."""
    if layer.kind == "embedding":
        return x.shape[1:]
    if layer.kind == "layer_norm":
        assert isinstance(layer.module, nn.LayerNorm)
        return x.shape[1 : x.dim() - len(layer.module.normalized_shape)]
    return x.shape[1:-1]


def _masked_sum(d: Tensor, mask: Tensor | None) -> Tensor:
    """``sum_k m_k d[:, k]``: [B, L, H] -> [B, H] float64 (summed in d's dtype, one pass)."""
    if mask is None:
        return d.sum(1).double()
    m = (mask.reshape(d.shape[:2]) != 0).to(d.dtype)
    return torch.bmm(m[:, None, :], d).squeeze(1).double()
