"""Typed Python API over the compiled ops ``torch.ops.pyxtask.*``.

Every function here calls its compiled op directly (CPU or CUDA kernel, by the device of
its inputs); their float64 references live in :mod:`pyxtask.reference`. The ops are also
usable as ``torch.ops.pyxtask.<name>`` from TorchScript and under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "MAX_TASKS",
    "OP_NAMES",
    "add_scaled_",
    "cosine_matrix",
    "cross_gram",
    "gather_flat",
    "gram",
    "min_norm_point",
    "mirror_descent_step",
    "scatter_combination",
]

#: Most rows (tasks) the Gram-family ops and the min-norm solver take.
MAX_TASKS = 64

#: The compiled ops, as registered in ``torch.ops.pyxtask`` (tests and benchmarks walk this).
OP_NAMES = (
    "gram",
    "cross_gram",
    "cosine_matrix",
    "gather_flat",
    "scatter_combination",
    "add_scaled_",
    "mirror_descent_step",
    "min_norm_point",
)


def gram(G: Tensor) -> Tensor:
    """``G @ G.T`` for a T x P matrix (T <= 64), reading G once.

    fp32, fp16 and bf16 inputs accumulate in fp32 and return fp32; fp64 stays fp64.
    Differentiable.

    >>> import torch, pyxtask
    >>> pyxtask.ops.gram(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    tensor([[ 5., 11.],
            [11., 25.]])
    """
    out: Tensor = torch.ops.pyxtask.gram(G)
    return out


def cross_gram(A: Tensor, B: Tensor) -> Tensor:
    """``A @ B.T`` for T x P and S x P matrices (T, S <= 64), accumulated like :func:`gram`.

    >>> import torch, pyxtask
    >>> pyxtask.ops.cross_gram(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 5.0], [0.0, 1.0]]))
    tensor([[2., 0.]])
    """
    out: Tensor = torch.ops.pyxtask.cross_gram(A, B)
    return out


def cosine_matrix(G: Tensor) -> Tensor:
    """Cosine similarity between the rows of G; a zero row gives 0 (never NaN).

    >>> import torch, pyxtask
    >>> pyxtask.ops.cosine_matrix(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    tensor([[1.0000, 0.7071, 0.0000],
            [0.7071, 1.0000, 0.0000],
            [0.0000, 0.0000, 0.0000]])
    """
    out: Tensor = torch.ops.pyxtask.cosine_matrix(G)
    return out


def gather_flat(tensors: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    """Writes ``tensors`` back to back into the 1-D ``out`` and returns it.

    The tensors may have any shapes and strides; ``out`` (allocated in the first tensor's
    dtype when not given) must be contiguous and hold exactly their elements. A row of a
    T x P buffer is a valid ``out``.

    >>> import torch, pyxtask
    >>> pyxtask.ops.gather_flat([torch.ones(2, 2), torch.arange(3.0)])
    tensor([1., 1., 1., 1., 0., 1., 2.])
    """
    tensors = list(tensors)
    if out is None:
        dtype = tensors[0].dtype if tensors else torch.float32
        device = tensors[0].device if tensors else None
        out = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
    torch.ops.pyxtask.gather_flat(tensors, out)
    return out


def scatter_combination(
    G: Tensor, weights: Tensor, tensors: Sequence[Tensor], accumulate: bool = False
) -> None:
    """Writes (or, with ``accumulate``, adds) ``sum_t weights[t] * G[t]`` into ``tensors``.

    ``tensors`` are laid out back to back as :func:`gather_flat` lays them; this is how a
    combined gradient lands in the parameters' ``.grad``.

    >>> import torch, pyxtask
    >>> G = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    >>> a, b = torch.zeros(2), torch.zeros(1)
    >>> pyxtask.ops.scatter_combination(G, torch.tensor([1.0, 0.5]), [a, b])
    >>> a, b
    (tensor([ 6., 12.]), tensor([18.]))
    """
    torch.ops.pyxtask.scatter_combination(G, weights, list(tensors), accumulate)


def add_scaled_(tensors: Sequence[Tensor], vectors: Sequence[Tensor], alpha: float) -> None:
    """``tensors[i] += alpha * vectors[i]`` for every i, fused across the list, in place.

    >>> import torch, pyxtask
    >>> p = [torch.ones(2), torch.zeros(1)]
    >>> pyxtask.ops.add_scaled_(p, [torch.ones(2), torch.ones(1)], 0.5)
    >>> p
    [tensor([1.5000, 1.5000]), tensor([0.5000])]
    """
    tensors, vectors = list(tensors), list(vectors)
    if not tensors and not vectors:
        return  # nothing to dispatch on, nothing to do
    torch.ops.pyxtask.add_scaled_(tensors, vectors, float(alpha))


def mirror_descent_step(weights: Tensor, grads: Tensor, lr: float) -> Tensor:
    """One exponentiated-gradient step on the simplex: ``w * exp(-lr * g) / sum(...)``.

    Evaluated in the log domain, so ``lr * g`` of any finite size is safe; zero weights
    stay zero; NaN or Inf in the inputs is an error.

    >>> import torch, pyxtask
    >>> w, g = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.0, 1e4, 1.0])
    >>> pyxtask.ops.mirror_descent_step(w, g, 1.0)
    tensor([1., 0., 0.])
    """
    out: Tensor = torch.ops.pyxtask.mirror_descent_step(weights, grads, float(lr))
    return out


def min_norm_point(
    M: Tensor, max_iter: int = 10000, tol: float = 1e-12, method: str = "away"
) -> Tensor:
    """``argmin`` over the probability simplex of ``lam @ M @ lam`` for a T x T Gram matrix.

    The min-norm element of the convex hull of the rows of G when ``M = G @ G.T`` (MGDA,
    MetaWeighting Alg. 2). ``method="away"`` (default) is Frank-Wolfe with exact line
    search and away steps, which converges linearly; ``"pairwise"`` moves mass between two
    vertices per step; ``"plain"`` is MetaWeighting's Alg. 2 as printed. Iteration stops when
    the KKT conditions hold to ``tol * max(diag(M))``. T = 2 uses the closed form. On a GPU
    the whole loop runs on the device.

    >>> import torch, pyxtask
    >>> pyxtask.ops.min_norm_point(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    tensor([0.5000, 0.5000])
    """
    out: Tensor = torch.ops.pyxtask.min_norm_point(M, int(max_iter), float(tol), method)
    return out
