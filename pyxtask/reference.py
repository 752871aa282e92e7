"""Plain-PyTorch float64 references of every op in :mod:`pyxtask.ops`.

They are the tests' oracle and the benchmarks' baseline, never a fall-back: the ops do not
call them. Each takes the same arguments as its op and computes in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def gram_reference(G: Tensor) -> Tensor:
    g = G.double()
    return g @ g.T


def cross_gram_reference(A: Tensor, B: Tensor) -> Tensor:
    return A.double() @ B.double().T


def cosine_matrix_reference(G: Tensor) -> Tensor:
    g = G.double()
    norms = g.norm(dim=1)
    inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    c = (g @ g.T) * inv[:, None] * inv[None, :]
    c = c.clamp(-1.0, 1.0)
    c.diagonal().copy_((norms > 0).double())
    return c


def gather_flat_reference(tensors: Sequence[Tensor]) -> Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.double().reshape(-1) for t in tensors])


def scatter_combination_reference(
    G: Tensor, weights: Tensor, tensors: Sequence[Tensor], accumulate: bool = False
) -> list[Tensor]:
    combined = weights.double() @ G.double()
    out, offset = [], 0
    for t in tensors:
        piece = combined[offset : offset + t.numel()].reshape(t.shape)
        out.append(t.double() + piece if accumulate else piece)
        offset += t.numel()
    return out


def add_scaled_reference(
    tensors: Sequence[Tensor], vectors: Sequence[Tensor], alpha: float
) -> list[Tensor]:
    return [t.double() + alpha * v.double() for t, v in zip(tensors, vectors, strict=True)]


def mirror_descent_step_reference(weights: Tensor, grads: Tensor, lr: float) -> Tensor:
    w = weights.double()
    logits = torch.where(w > 0, w.log() - lr * grads.double(), torch.full_like(w, -torch.inf))
    return torch.softmax(logits, dim=0)


def _affine_support_step(m: Tensor, scale: float, lam: Tensor) -> Tensor:
    """Wolfe's affine step on the support, as the op takes it (see csrc/ops/min_norm.h)."""
    idx = torch.nonzero(lam > 0).flatten()
    k = idx.numel()
    if k < 2:
        return lam
    kkt = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    kkt[:k, :k] = m[idx][:, idx] + 1e-13 * scale * torch.eye(k, dtype=torch.float64)
    kkt[:k, k] = scale
    kkt[k, :k] = scale
    rhs = torch.zeros(k + 1, dtype=torch.float64)
    rhs[k] = scale
    try:
        x = torch.linalg.solve(kkt, rhs)[:k]
    except RuntimeError:  # singular
        return lam
    before = lam[idx]
    neg = x < 0
    theta = 1.0
    if bool(neg.any()):
        theta = min(1.0, float((before[neg] / (before[neg] - x[neg])).min()))
    after = (before + theta * (x - before)).clamp_min(0)
    after = after / after.sum()
    sub = m[idx][:, idx]
    if not bool(after @ sub @ after < before @ sub @ before):
        return lam
    out = lam.clone()
    out[idx] = after
    return out


def min_norm_point_reference(
    M: Tensor, max_iter: int = 10000, tol: float = 1e-12, method: str = "away"
) -> Tensor:
    """The same Frank-Wolfe iterations as the op, one Python step at a time.

    This is the shape of the peers' solvers (a Python loop over tensor ops). Its result
    agrees with the op's to rounding; optimality itself is tested against SciPy.
    """
    m = M.double()
    t = m.shape[0]
    if t == 1:
        return torch.ones(1, dtype=torch.float64)
    if t == 2:
        den = m[0, 0] + m[1, 1] - 2 * m[0, 1]
        first = ((m[1, 1] - m[0, 1]) / den).clamp(0, 1) if den > 0 else torch.tensor(0.5).double()
        return torch.stack([first, 1 - first])
    lam = torch.full((t,), 1.0 / t, dtype=torch.float64)
    scale = float(m.diagonal().max())
    if scale <= 0:
        return lam
    tol_abs = tol * scale
    polished = None
    for it in range(max_iter):
        if method != "plain" and it % t == t - 1:
            support = tuple(int(i) for i in torch.nonzero(lam > 0).flatten())
            if support != polished:
                lam = _affine_support_step(m, scale, lam)
                polished = support
        u = m @ lam
        f = float(lam @ u)
        s = int(u.argmin())
        a = int(torch.where(lam > 0, u, torch.full_like(u, -torch.inf)).argmax())
        fw_gap, away_gap = f - float(u[s]), float(u[a]) - f
        if (fw_gap if method == "plain" else float(u[a] - u[s])) <= tol_abs:
            break
        if method == "pairwise":
            curv = float(m[s, s] - 2 * m[s, a] + m[a, a])
            g_max = float(lam[a])
            step = min(g_max, -float(u[s] - u[a]) / curv) if curv > 0 else g_max
            lam[s] += step
            lam[a] = 0.0 if step >= g_max else lam[a] - step
        elif method == "plain" or fw_gap >= away_gap:
            curv = float(m[s, s]) - 2 * float(u[s]) + f
            step = min(1.0, fw_gap / curv) if curv > 0 else 1.0
            lam = (1 - step) * lam
            lam[s] += step
        else:
            curv = f - 2 * float(u[a]) + float(m[a, a])
            g_max = float(lam[a] / (1 - lam[a]))
            step = min(g_max, away_gap / curv) if curv > 0 else g_max
            lam = (1 + step) * lam
            lam[a] = 0.0 if step >= g_max else lam[a] - step
        lam = lam.clamp_min(0)
    return lam / lam.sum()


def _gram_factor(M: Tensor) -> Tensor:
    """L (T x T) with ``L @ L.T = M``, negative rounding eigenvalues clipped to zero."""
    m = M.double()
    m = (m + m.T) / 2
    evals, evecs = torch.linalg.eigh(m)
    factor: Tensor = evecs * evals.clamp_min(0).sqrt()
    return factor


def dual_cone_projection_reference(
    M: Tensor, U: Tensor, max_iter: int = 1000, tol: float = 1e-12
) -> Tensor:
    """``argmin v^T M v`` s.t. ``v >= u`` per row of U, by SciPy's NNLS on a factor of M.

    With ``M = L L^T`` and ``v = u + x``: ``min_{x >= 0} ||L^T x + L^T u||``, which Lawson-Hanson
    (scipy.optimize.nnls) solves on the factor rather than on M's normal equations as the op
    does. Returns V only; v is not unique when M is singular, ``L^T v`` is.
    """
    import scipy.optimize  # noqa: PLC0415  (SciPy is a test extra, not a dependency)

    L = _gram_factor(M).numpy()
    u2 = np.atleast_2d(U.double().numpy())
    rows = []
    for u in u2:
        x, _ = scipy.optimize.nnls(L.T, -(L.T @ u), maxiter=max(max_iter, 50 * len(u)))
        rows.append(u + x)
    return torch.from_numpy(np.stack(rows)).reshape(U.shape)


def nash_bargaining_reference(
    M: Tensor, init: Tensor | None = None, max_iter: int = 100, tol: float = 1e-12
) -> Tensor:
    """Plain damped Newton on ``1/2 a^T M a - sum(log a)`` from ``init`` or ones, in float64.

    The textbook iteration without the op's task-scaled start, scaled factorisation or
    fallback: it is the oracle only where a solution exists.
    """
    m = M.double()
    a = torch.ones(m.shape[0], dtype=torch.float64) if init is None else init.double().clone()
    for _ in range(max_iter):
        grad = m @ a - 1 / a
        if float((a * (m @ a) - 1).abs().max()) <= tol:
            break
        step = -torch.linalg.solve(m + torch.diag(1 / a**2), grad)
        lam = abs(float(grad @ step)) ** 0.5
        a = a + (1.0 if lam <= 0.25 else 1.0 / (1.0 + lam)) * step
    return a


def cagrad_inner_reference(M: Tensor, c: float, max_iter: int = 1000, tol: float = 1e-12) -> Tensor:
    """CAGrad's inner w by bisection on the shift kappa, each min-norm point from SciPy's NNLS.

    The op's characterisation (||J^T w_kappa|| = s kappa at the optimum, with w_kappa the
    min-norm point of conv{g_i + kappa g0}) solved the slow, obvious way: 200 bisections in
    log kappa, the min-norm point of a lifted factor by scipy.optimize.nnls.
    """
    import scipy.optimize  # noqa: PLC0415  (SciPy is a test extra, not a dependency)

    L = _gram_factor(M).numpy()
    T = L.shape[0]
    g0 = L.T @ np.full(T, 1.0 / T)
    s = c * float(np.linalg.norm(g0))
    if T == 1 or s <= 0:
        return torch.full((T,), 1.0 / T, dtype=torch.float64)

    def min_norm(kappa: float) -> np.ndarray:
        H = (L + kappa * g0).T
        lift = float(np.abs(H).max()) or 1.0
        E = np.vstack([H, np.full((1, T), lift)])
        d = np.zeros(E.shape[0])
        d[-1] = lift
        mu, _ = scipy.optimize.nnls(E, d, maxiter=100 * T)
        return np.asarray(mu / mu.sum())

    top = float(np.sqrt(np.diag(L @ L.T).max()))
    lo, hi = 1e-15 * top / s, 1e3 * top / s
    for _ in range(200):
        mid = float(np.sqrt(lo * hi))
        w = min_norm(mid)
        if np.linalg.norm(L.T @ w) > s * mid:
            lo = mid
        else:
            hi = mid
    return torch.from_numpy(min_norm(hi))


def _positions_mask(mask: Tensor | None, shape: torch.Size) -> Tensor:
    """The [B, L] mask of real positions as float64 (all ones when None)."""
    if mask is None:
        return torch.ones(shape, dtype=torch.float64)
    return (mask != 0).double()


def linear_sample_dots_reference(a: Tensor, d: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Per sample b: <sum_k m_bk d_bk a_bk^T, v>, the dot of sample b's weight gradient with v."""
    m = _positions_mask(mask, a.shape[:2])
    return torch.einsum("blo,oi,bli,bl->b", d.double(), v.double(), a.double(), m)


def linear_sample_sq_norms_reference(
    a: Tensor, d: Tensor, mask: Tensor | None, method: str = "auto"
) -> Tensor:
    """Per sample b: ||sum_k m_bk d_bk a_bk^T||^2, from the materialised per-sample gradients
    (``method`` only picks the op's algorithm; the answer is the same)."""
    m = _positions_mask(mask, a.shape[:2])
    per_sample = torch.einsum("blo,bli,bl->boi", d.double(), a.double(), m)
    return per_sample.square().sum((1, 2))


def embedding_sample_dots_reference(
    ids: Tensor, d: Tensor, v: Tensor, mask: Tensor | None
) -> Tensor:
    """Per sample b: sum_k m_bk d_bk . v[ids_bk] (the dot of b's embedding gradient with v)."""
    m = _positions_mask(mask, ids.shape)
    rows = v.double()[ids.long()]
    return torch.einsum("blh,blh,bl->b", d.double(), rows, m)


def embedding_sample_sq_norms_reference(ids: Tensor, d: Tensor, mask: Tensor | None) -> Tensor:
    """Per sample b: ||G_b||^2 with G_b[r] = sum_{k: ids_bk = r} m_bk d_bk, materialised."""
    m = _positions_mask(mask, ids.shape)
    out = torch.zeros(ids.shape[0], dtype=torch.float64)
    for b in range(ids.shape[0]):
        rows = int(ids[b].max()) + 1 if ids.shape[1] else 0
        grad = torch.zeros(rows, d.shape[-1], dtype=torch.float64)
        grad.index_add_(0, ids[b].long(), d[b].double() * m[b, :, None])
        out[b] = grad.square().sum()
    return out
