"""Typed Python API over the compiled ops ``torch.ops.pyxtask.*``.

Every function here calls its compiled op directly (CPU or CUDA kernel, by the device of
its inputs); their float64 references live in :mod:`pyxtask.reference`. The ops are also
usable as ``torch.ops.pyxtask.<name>`` from TorchScript and under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Loading the extension registers torch.ops.pyxtask.*, or fails saying how to rebuild it.
from pyxtask import _extension  # noqa: F401

__all__ = [
    "MAX_TASKS",
    "OP_NAMES",
    "add_scaled_",
    "cagrad_inner",
    "cosine_matrix",
    "cross_gram",
    "dual_cone_projection",
    "embedding_sample_dots",
    "embedding_sample_sq_norms",
    "gather_flat",
    "gram",
    "linear_sample_dots",
    "linear_sample_sq_norms",
    "min_norm_point",
    "mirror_descent_step",
    "nash_bargaining",
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
    "dual_cone_projection",
    "nash_bargaining",
    "cagrad_inner",
    "linear_sample_dots",
    "linear_sample_sq_norms",
    "embedding_sample_dots",
    "embedding_sample_sq_norms",
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


def dual_cone_projection(
    M: Tensor, U: Tensor, max_iter: int = 1000, tol: float = 1e-12
) -> tuple[Tensor, Tensor]:
    """For each row ``u`` of ``U``: ``argmin_v v @ M @ v`` subject to ``v >= u``.

    With ``M = J @ J.T`` this gives the weights of the projection of ``J.T @ u`` onto the dual
    cone of the rows of J, ``{x : J @ x >= 0}`` (Quinton & Rakotomamonjy 2024, "Jacobian
    Descent for Multi-Objective Optimization", Prop. 1): UPGrad projects each ``e_i / T``,
    DualProj the mean. ``U`` is a vector of T weights or a K x T matrix; M must be symmetric
    positive semi-definite and may be singular (v is then not unique, ``J.T @ v`` is).

    Solved exactly by Lawson-Hanson NNLS on ``v = u + x, x >= 0``, a projected Gauss-Seidel
    polish taking over if ``max_iter`` outer steps do not finish. Returns ``(V, residual)``:
    V (float64, U's shape) and per row the relative KKT residual, the largest violation of
    ``(M v)_i >= 0`` (and ``= 0`` where ``v_i > u_i``) over ``sqrt(M_ii) sum_j sqrt(M_jj) |v_j|``;
    it stays at rounding level (~1e-15) when the solve succeeded. On a GPU the rows are solved
    in parallel on the device.

    >>> import torch, pyxtask
    >>> M = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
    >>> V, residual = pyxtask.ops.dual_cone_projection(M, torch.eye(2, dtype=torch.float64) / 2)
    >>> V
    tensor([[0.5000, 0.2500],
            [0.2500, 0.5000]], dtype=torch.float64)
    >>> bool((residual < 1e-12).all())
    True
    """
    V, residual = torch.ops.pyxtask.dual_cone_projection(M, U, int(max_iter), float(tol))
    return V, residual


def nash_bargaining(
    M: Tensor, init: Tensor | None = None, max_iter: int = 100, tol: float = 1e-12
) -> tuple[Tensor, Tensor]:
    """Nash-MTL's bargaining weights: ``alpha > 0`` with ``(M @ alpha)_i = 1 / alpha_i`` for all i.

    Navon et al. 2022, "Multi-Task Learning as a Bargaining Game", eq. (3) / Thm 3.1. These are
    the stationarity conditions of the strictly convex ``1/2 alpha @ M @ alpha - sum(log(alpha))``,
    which damped Newton minimises from ``init`` (a warm start, used when it is the better
    start) or ``1 / sqrt(diag(M))``; iterates do not depend on how the tasks are scaled.

    A solution exists, and is unique, iff no non-negative combination of the gradients is zero
    (the min-norm point of their hull is not the origin). When there is none, ``alpha`` solves
    ``(M + 1e-8 diag(max(M_ii, 1e-8 max_j M_jj))) alpha = 1 / alpha`` instead (a private
    direction per task; finite, task-scale invariant). Returns ``(alpha, residual)``, both
    float64, with ``residual = max_i |alpha_i (M @ alpha)_i - 1|`` measured on M itself:
    rounding level for a solution, of order one when there is none. ``M = 0`` gives ones
    and residual 1.

    >>> import torch, pyxtask
    >>> alpha, residual = pyxtask.ops.nash_bargaining(torch.diag(torch.tensor([1.0, 4.0])))
    >>> alpha
    tensor([1.0000, 0.5000], dtype=torch.float64)
    >>> float(residual) < 1e-12
    True
    """
    alpha, residual = torch.ops.pyxtask.nash_bargaining(M, init, int(max_iter), float(tol))
    return alpha, residual


def cagrad_inner(
    M: Tensor, c: float, max_iter: int = 1000, tol: float = 1e-12
) -> tuple[Tensor, Tensor]:
    """CAGrad's inner problem: ``argmin`` over the simplex of ``w M b + sqrt_phi sqrt(w M w)``.

    Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning", Sec. 3 / Alg. 1,
    with ``b = 1/T`` and ``sqrt_phi = c * sqrt(b @ M @ b)``. Solved as a root search over the
    shift ``kappa`` at which the min-norm point ``w`` of ``{g_i + kappa g0}`` has
    ``||J.T @ w|| = sqrt_phi * kappa``, each step an exact Lawson-Hanson NNLS. When the origin
    is in the gradients' hull and the optimum is the kink ``J.T @ w = 0``, w is the min-norm
    point. Returns ``(w, residual)``, float64: the relative KKT residual (or, at a kink,
    ``||J.T @ w|| / max_i ||g_i||``, which rounding keeps near 1e-8). CAGrad's combination is
    ``b + sqrt_phi / ||J.T @ w|| * w``.

    Two orthogonal gradients of norms 1 and 2: the conflict-averse correction leans entirely
    on the weaker task.

    >>> import torch, pyxtask
    >>> w, residual = pyxtask.ops.cagrad_inner(torch.tensor([[1.0, 0.0], [0.0, 4.0]]), 0.4)
    >>> w
    tensor([1., 0.], dtype=torch.float64)
    """
    w, residual = torch.ops.pyxtask.cagrad_inner(M, float(c), int(max_iter), float(tol))
    return w, residual


def linear_sample_dots(a: Tensor, d: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per sample b, ``<G_b, v>`` with ``G_b = sum_k m_bk d_bk a_bk^T`` the gradient of sample
    b's loss w.r.t. a linear layer's weight, never formed.

    ``a`` ``[B, L, I]``: the layer's inputs; ``d`` ``[B, L, O]``: the gradients of its
    outputs; ``v`` ``[O, I]``; ``mask`` ``[B, L]``, nonzero at real positions (None: all).
    One GEMM over the real positions, ``D @ v`` or ``A @ v.T`` (whichever has fewer
    columns), then a dot per row. Returns ``[B]``, float32 (float64 for float64 inputs).

    >>> import torch, pyxtask
    >>> a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    >>> d = torch.tensor([[[3.0], [1.0]]])
    >>> pyxtask.ops.linear_sample_dots(a, d, torch.tensor([[1.0, 1.0]]))  # G = [[3, 2]]
    tensor([5.])
    >>> pyxtask.ops.linear_sample_dots(a, d, torch.tensor([[1.0, 1.0]]), torch.tensor([[1, 0]]))
    tensor([3.])
    """
    out: Tensor = torch.ops.pyxtask.linear_sample_dots(a, d, v, mask)
    return out


def linear_sample_sq_norms(
    a: Tensor, d: Tensor, mask: Tensor | None = None, method: str = "auto"
) -> Tensor:
    """Per sample b, ``||G_b||^2`` for the G_b of :func:`linear_sample_dots`, never formed
    for the whole batch.

    ``method="gram"``: ``sum_{k,l} (d_bk . d_bl)(a_bk . a_bl)`` from the two L x L Grams of
    the sample (~L^2 (I + O) multiply-adds); ``"materialize"``: ``G_b`` built for one
    sample at a time (~L I O); ``"auto"``: the cheaper at each sample's number of real
    positions (on CUDA: at L, for the whole batch).

    >>> import torch, pyxtask
    >>> a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    >>> d = torch.tensor([[[3.0], [1.0]]])
    >>> pyxtask.ops.linear_sample_sq_norms(a, d)  # ||[[3, 2]]||^2
    tensor([13.])
    """
    out: Tensor = torch.ops.pyxtask.linear_sample_sq_norms(a, d, mask, method)
    return out


def embedding_sample_dots(ids: Tensor, d: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per sample b, ``<G_b, v>`` for an embedding's per-sample gradient G_b, whose row r is
    the sum of ``d_bk`` over the real positions k with ``ids_bk = r``.

    ``ids`` ``[B, L]`` (int64/int32), ``d`` ``[B, L, H]``, ``v`` ``[num_embeddings, H]``,
    ``mask`` ``[B, L]`` or None. An id outside v's rows at a real position is an error.

    >>> import torch, pyxtask
    >>> ids, d = torch.tensor([[2, 0, 2]]), torch.ones(1, 3, 2)
    >>> v = torch.tensor([[1.0, 0.0], [5.0, 5.0], [0.0, 3.0]])
    >>> pyxtask.ops.embedding_sample_dots(ids, d, v)  # G = [[1, 1], [0, 0], [2, 2]]
    tensor([7.])
    """
    out: Tensor = torch.ops.pyxtask.embedding_sample_dots(ids, d, v, mask)
    return out


def embedding_sample_sq_norms(ids: Tensor, d: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per sample b, ``||G_b||^2`` for the G_b of :func:`embedding_sample_dots`: positions with
    the same id are summed before the norm.

    >>> import torch, pyxtask
    >>> pyxtask.ops.embedding_sample_sq_norms(torch.tensor([[2, 0, 2]]), torch.ones(1, 3, 2))
    tensor([10.])
    """
    out: Tensor = torch.ops.pyxtask.embedding_sample_sq_norms(ids, d, mask)
    return out
