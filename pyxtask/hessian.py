"""Hessian-vector products and conjugate gradients over lists of parameters.

``hvp`` is exact (double backward); ``fd_hvp`` is the central difference
``(grad L(theta + eps v) - grad L(theta - eps v)) / (2 eps)`` that DARTS and MetaXT use when
double backward is too costly, moving the parameters with the fused
:func:`pyxtask.ops.add_scaled_` and restoring them bit for bit; ``conjugate_gradient``
solves ``(H + damping I) x = b`` with either as its HVP (TAWT's exact g_t needs one such
solve per weight update).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from pyxtask.ops import add_scaled_

Tensors = list[Tensor]
HVP = Callable[[Sequence[Tensor]], Tensors]


def _as_list(xs: Sequence[Tensor]) -> Tensors:
    return list(xs)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum(
        (torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True)),
        start=torch.zeros((), dtype=a[0].dtype, device=a[0].device),
    )


def _check_vector(params: Sequence[Tensor], vector: Sequence[Tensor], who: str) -> None:
    if len(params) != len(vector):
        raise ValueError(
            f"pyxtask.hessian.{who}: got {len(params)} parameters but {len(vector)} vector pieces"
        )
    for i, (p, v) in enumerate(zip(params, vector, strict=True)):
        if p.shape != v.shape:
            raise ValueError(
                f"pyxtask.hessian.{who}: vector[{i}] has shape {tuple(v.shape)} "
                f"but parameter {i} has shape {tuple(p.shape)}"
            )


def hvp_function(loss_fn: Callable[[], Tensor], params: Sequence[Tensor]) -> HVP:
    """An exact HVP callable at the current parameters: the gradient graph is built once
    and every call differentiates it again (what conjugate gradients needs).

    >>> import torch
    >>> from pyxtask.hessian import hvp_function
    >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> H = hvp_function(lambda: (x ** 3).sum(), [x])  # Hessian diag(6 x)
    >>> H([torch.tensor([1.0, 1.0])])
    [tensor([ 6., 12.])]
    """
    params = _as_list(params)
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)

    def apply(vector: Sequence[Tensor]) -> Tensors:
        _check_vector(params, vector, "hvp")
        out = torch.autograd.grad(
            grads, params, grad_outputs=list(vector), retain_graph=True, allow_unused=True
        )
        return [
            torch.zeros_like(p) if o is None else o.detach()
            for p, o in zip(params, out, strict=True)
        ]

    return apply


def hvp(
    loss_fn: Callable[[], Tensor], params: Sequence[Tensor], vector: Sequence[Tensor]
) -> Tensors:
    """Exact Hessian-vector product of ``loss_fn()`` w.r.t. ``params`` (double backward)."""
    return hvp_function(loss_fn, params)(vector)


def _grad(loss_fn: Callable[[], Tensor], params: Tensors) -> Tensors:
    out = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out, strict=True)]


@contextmanager
def restored(params: Sequence[Tensor]) -> Iterator[None]:
    """Move ``params`` freely inside the block (``add_scaled_`` on their ``.data``); they are
    restored bit for bit from a saved copy on leaving it, also when the block raises
    (``p + e - e`` is not ``p`` in floating point)."""
    data = [p.data for p in params]
    saved = [d.clone() for d in data]
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(data, saved)


def fd_hvp(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    vector: Sequence[Tensor],
    eps: float | None = None,
) -> Tensors:
    """Central-difference HVP: two gradients, at ``theta + eps v`` and ``theta - eps v``.

    ``eps`` defaults to DARTS's ``0.01 / ||v||``. The parameters are moved in place with
    :func:`pyxtask.ops.add_scaled_` and restored bit for bit from a saved copy afterwards,
    also when ``loss_fn`` raises.

    >>> import torch
    >>> from pyxtask.hessian import fd_hvp
    >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    >>> [h.round(decimals=6) for h in fd_hvp(lambda: (x ** 3).sum(), [x],
    ...                                      [torch.ones(2, dtype=torch.float64)])]
    [tensor([ 6., 12.], dtype=torch.float64)]
    """
    params = _as_list(params)
    vector = _as_list(vector)
    _check_vector(params, vector, "fd_hvp")
    norm = float(torch.sqrt(_dot(vector, vector)))
    if norm == 0.0:
        return [torch.zeros_like(p) for p in params]
    if eps is None:
        eps = 0.01 / norm
    data = [p.data for p in params]
    with restored(params):
        with torch.no_grad():
            add_scaled_(data, vector, eps)
        plus = _grad(loss_fn, params)
        with torch.no_grad():
            add_scaled_(data, vector, -2.0 * eps)
        minus = _grad(loss_fn, params)
    return [(a - b) / (2.0 * eps) for a, b in zip(plus, minus, strict=True)]


@dataclass
class CGResult:
    """Solution of a conjugate-gradient solve and how it ended."""

    x: Tensors
    iterations: int
    residual: float  # ||b - (H + damping I) x|| / ||b||
    converged: bool


def conjugate_gradient(
    hvp_fn: HVP, b: Sequence[Tensor], damping: float = 0.0, max_iter: int = 100, tol: float = 1e-6
) -> CGResult:
    """Solves ``(H + damping I) x = b`` for symmetric positive definite ``H + damping I``.

    Stops when the relative residual ``||r|| / ||b||`` drops to ``tol`` or after
    ``max_iter`` HVPs; a direction of non-positive curvature (H not positive definite there)
    stops it too, with ``converged=False``.

    >>> import torch
    >>> from pyxtask.hessian import conjugate_gradient
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> res = conjugate_gradient(lambda v: [A @ v[0]], [b])
    >>> res.x[0], res.converged
    (tensor([0.0909, 0.6364], dtype=torch.float64), True)
    """
    if damping < 0:
        raise ValueError(f"pyxtask.hessian.conjugate_gradient: damping must be >= 0, got {damping}")
    b = [t.detach() for t in b]
    b_norm = float(torch.sqrt(_dot(b, b)))
    x = [torch.zeros_like(t) for t in b]
    if b_norm == 0.0:
        return CGResult(x, 0, 0.0, True)
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rr = _dot(r, r)
    for it in range(1, max_iter + 1):
        hp = hvp_fn(p)
        if damping:
            hp = [h + damping * q for h, q in zip(hp, p, strict=True)]
        curvature = _dot(p, hp)
        if not bool(curvature > 0):
            return CGResult(x, it - 1, float(torch.sqrt(rr)) / b_norm, False)
        alpha = rr / curvature
        torch._foreach_add_(x, torch._foreach_mul(p, alpha))
        torch._foreach_sub_(r, torch._foreach_mul(hp, alpha))
        rr_new = _dot(r, r)
        residual = float(torch.sqrt(rr_new)) / b_norm
        if residual <= tol:
            return CGResult(x, it, residual, True)
        beta = rr_new / rr
        p = [ri + beta * pi for ri, pi in zip(r, p, strict=True)]
        rr = rr_new
    return CGResult(x, max_iter, float(torch.sqrt(rr)) / b_norm, False)
