"""The scores' math, on plain tensors: covariance similarity, LEEP, LogME, gradient cosines.

Every function takes the features, probabilities or gradients already computed (see
:mod:`pyxtask.similarity.features`) and works in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pyxtask import ops

__all__ = [
    "covariance_similarity",
    "covariance_similarity_matrix",
    "gradient_cosine_matrix",
    "leep",
    "log_evidence",
    "logme",
    "logme_fit",
    "truncated_covariance",
]

#: The largest precision α or β LogME's fixed point may reach.
_PRECISION_CAP = 1e12
#: The compiled Gram and cosine ops take at most this many rows (tasks).
MAX_TASKS = 64


def _spectrum(x: Tensor, keep: float) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors of ``XᵀX``, truncated to the smallest rank r
    whose eigenvalues sum to at least ``keep`` of their total."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"expected an (m, d) matrix with m >= 1, got shape {tuple(x.shape)}")
    x = x.double()
    values, vectors = torch.linalg.eigh(x.T @ x)
    values, vectors = values.flip(0).clamp(min=0.0), vectors.flip(1)
    total = float(values.sum())
    if total == 0.0:
        raise ValueError("the features are all zero: their covariance has no spectrum")
    cumulative = torch.cumsum(values, 0)
    # The 1e-12 slack keeps keep = 1.0 from failing on rounding in the last partial sum.
    rank = int((cumulative < keep * total * (1 - 1e-12)).sum()) + 1
    return values[:rank], vectors[:, :rank]


def truncated_covariance(x: Tensor, keep: float = 0.99) -> Tensor:
    """``U_r D_r U_rᵀ``: the best rank-r approximation of the covariance ``XᵀX`` of the rows
    of ``x`` (m x d), r the smallest rank whose eigenvalues hold ``keep`` of their sum
    (Wu, Zhang and Ré 2020, Sec. 2.3: the covariance is ``XᵀX``, not centred or scaled)."""
    values, vectors = _spectrum(x, keep)
    return (vectors * values) @ vectors.T


def covariance_similarity(x1: Tensor, x2: Tensor, keep: float = 0.99) -> float:
    """Wu, Zhang and Ré's covariance similarity score (ICLR 2020, eq. 6) of two tasks.

    With ``XᵢᵀXᵢ ≈ U_{i,r} D_{i,r} U_{i,r}ᵀ`` the rank-rᵢ approximation keeping ``keep``
    (99 %) of the eigenvalues' sum::

        score = ‖(U₁D₁^½)ᵀ U₂D₂^½‖_F / (‖U₁D₁^½‖_F · ‖U₂D₂^½‖_F)
              = √tr(C₁C₂) / √(tr C₁ · tr C₂),      Cᵢ = Uᵢ Dᵢ Uᵢᵀ

    Symmetric, in [0, 1], unchanged by ``Xᵢ → QXᵢ`` (Q orthogonal: the same covariance) and by
    one rotation ``Xᵢ → XᵢR`` of both tasks' features. A task's score with itself is
    ``‖d‖₂/‖d‖₁`` of its kept eigenvalues d: 1 only at rank 1, lower the more directions
    the features spread over.
    """
    d1, u1 = _spectrum(x1, keep)
    d2, u2 = _spectrum(x2, keep)
    if u1.shape[0] != u2.shape[0]:
        raise ValueError(f"feature sizes differ: {u1.shape[0]} and {u2.shape[0]}")
    a1, a2 = u1 * d1.sqrt(), u2 * d2.sqrt()
    return float(torch.linalg.norm(a1.T @ a2) / (torch.linalg.norm(a1) * torch.linalg.norm(a2)))


def covariance_similarity_matrix(
    features: list[Tensor], keep: float = 0.99, normalized: bool = False
) -> Tensor:
    """Eq. 6 between every pair of tasks: the T x T matrix of :func:`covariance_similarity`.

    Each task is the vector ``vec(Cᵢ)`` of its truncated covariance, so ``tr(CᵢCⱼ)`` is the
    Gram matrix of these rows (one compiled :func:`pyxtask.ops.gram`) and the score is
    ``√G_ij / (tr Cᵢ · tr Cⱼ)^½``.

    ``normalized`` divides every score by the geometric mean of the two self-scores
    (``score_ij / √(score_ii score_jj)``), which is ``√cos(vec Cᵢ, vec Cⱼ)``
    (:func:`pyxtask.ops.cosine_matrix`): 1 on the diagonal. This is a departure from the
    paper, whose self-scores depend on how spread each task's spectrum is (its Fig. 6
    values are 0.1-0.5); the normalised score compares the directions only.
    """
    if not 1 <= len(features) <= MAX_TASKS:
        raise ValueError(f"expected 1 to {MAX_TASKS} tasks, got {len(features)}")
    covariances = [truncated_covariance(x, keep) for x in features]
    flat = torch.stack([c.reshape(-1) for c in covariances])
    if normalized:
        return ops.cosine_matrix(flat).clamp(min=0.0).sqrt()
    traces = torch.stack([c.trace() for c in covariances])
    return ops.gram(flat).clamp(min=0.0).sqrt() / torch.outer(traces, traces).sqrt()


def gradient_cosine_matrix(gradients: Tensor) -> Tensor:
    """Cosines between the rows of a T x P matrix of task gradients (a zero row gives 0).

    With each row the gradient of a task's loss with respect to the shared encoder, this is
    TAWT's task similarity (Chen et al. 2022, eq. 2.9: ``-c`` times it is the task distance
    that mirror descent follows), here at the pretrained encoder.
    """
    if not 1 <= gradients.shape[0] <= MAX_TASKS:
        raise ValueError(f"expected 1 to {MAX_TASKS} tasks, got {gradients.shape[0]}")
    return ops.cosine_matrix(gradients)


def leep(
    source_probs: Tensor, target_labels: Tensor, num_target_labels: int | None = None
) -> float:
    """LEEP (Nguyen et al., ICML 2020): how well a source model's outputs explain the target
    labels.

    With θ(xᵢ) the source model's soft output distribution over its labels z on the target
    input xᵢ (n x Z ``source_probs``) and yᵢ the target label::

        P̂(y, z) = (1/n) Σ_{i: yᵢ = y} θ(xᵢ)_z        (empirical joint)
        P̂(y | z) = P̂(y, z) / Σ_y' P̂(y', z)
        LEEP = (1/n) Σᵢ log Σ_z P̂(yᵢ | z) θ(xᵢ)_z     (≤ 0; higher is better)

    For tagging tasks the rows are tokens. Source labels that no row puts mass on get no
    column of P̂(y | z) (their θ is 0 everywhere, so they add nothing).
    """
    theta = source_probs.double()
    if theta.dim() != 2 or target_labels.shape != theta.shape[:1]:
        raise ValueError(
            f"expected (n, Z) probabilities and (n,) labels, got {tuple(theta.shape)} and "
            f"{tuple(target_labels.shape)}"
        )
    labels = target_labels.long()
    classes = int(labels.max()) + 1 if num_target_labels is None else num_target_labels
    n = theta.shape[0]
    joint = torch.zeros(classes, theta.shape[1], dtype=torch.float64)
    joint.index_add_(0, labels, theta)
    joint /= n
    marginal = joint.sum(0)
    conditional = joint / marginal.clamp(min=torch.finfo(torch.float64).tiny)
    expected = (theta * conditional[labels]).sum(1)
    return float(expected.log().mean())


def _one_hot_targets(labels: Tensor) -> Tensor:
    if labels.dim() == 1:
        labels = labels.long()
        return torch.nn.functional.one_hot(labels, int(labels.max()) + 1).double()
    return labels.double()


def log_evidence(features: Tensor, y: Tensor, alpha: float, beta: float) -> float:
    """log p(y | F, α, β) of Bayesian linear regression, ``y = Fw + ε``, ``w ~ N(0, α⁻¹I)``,
    ``ε ~ N(0, β⁻¹I)``, evaluated directly (You et al., ICML 2021, eq. 2)::

        A = αI + βFᵀF,   m = βA⁻¹Fᵀy
        log p = (n/2) log β + (D/2) log α - (n/2) log 2π
                - (β/2)‖Fm - y‖² - (α/2)‖m‖² - (1/2) log|A|
    """
    f, y = features.double(), y.double()
    n, d = f.shape
    a = alpha * torch.eye(d, dtype=torch.float64) + beta * f.T @ f
    m = beta * torch.linalg.solve(a, f.T @ y)
    residual = float(((f @ m - y) ** 2).sum())
    return (
        n / 2 * math.log(beta)
        + d / 2 * math.log(alpha)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * residual
        - alpha / 2 * float(m @ m)
        - float(torch.linalg.slogdet(a)[1]) / 2
    )


def logme_fit(
    features: Tensor, y: Tensor, tol: float = 1e-8, max_iter: int = 1000
) -> tuple[float, float, float]:
    """LogME's evidence maximisation for one target column: ``(α, β, log evidence / n)``.

    You et al.'s Algorithm 1 on the SVD ``F = U S Vᵀ`` (σᵢ = sᵢ², z = Uᵀy): from α = β = 1,
    repeat until neither moves by more than ``tol`` (relative)::

        γ = Σᵢ βσᵢ / (α + βσᵢ)
        ‖m‖² = Σᵢ β²σᵢ zᵢ² / (α + βσᵢ)²,   ‖Fm - y‖² = Σᵢ α² zᵢ² / (α + βσᵢ)² + ‖y - UUᵀy‖²
        α ← γ / ‖m‖²,   β ← (n - γ) / ‖Fm - y‖²

    (each capped at 1e12: a column the features cannot explain sends α to infinity) and the
    evidence of :func:`log_evidence` at the fixed point, with
    ``log|A| = Σᵢ log(α + βσᵢ) + (D - rank) log α``.
    """
    u, s = _svd(features)
    y = y.double()
    return _fit_column(features.shape, s**2, u.T @ y, float(y @ y), tol=tol, max_iter=max_iter)


def _svd(features: Tensor) -> tuple[Tensor, Tensor]:
    u, s, _ = torch.linalg.svd(features.double(), full_matrices=False)
    return u, s


def _fit_column(
    shape: tuple[int, ...], sigma: Tensor, z: Tensor, y2: float, *, tol: float, max_iter: int
) -> tuple[float, float, float]:
    n, d = shape
    outside = max(y2 - float(z @ z), 0.0)  # the part of y outside the column space of F

    def moments(alpha: float, beta: float) -> tuple[Tensor, float, float]:
        denom = alpha + beta * sigma
        m2 = float((beta**2 * sigma * z**2 / denom**2).sum())
        res2 = float((alpha**2 * z**2 / denom**2).sum()) + outside
        return denom, m2, res2

    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        denom, m2, res2 = moments(alpha, beta)
        gamma = float((beta * sigma / denom).sum())
        # Capped: labels the features do not explain at all drive α (no weight) to infinity.
        new_alpha = min(gamma / max(m2, 1e-300), _PRECISION_CAP)
        new_beta = min((n - gamma) / max(res2, 1e-300), _PRECISION_CAP)
        done = abs(new_alpha - alpha) <= tol * alpha and abs(new_beta - beta) <= tol * beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    denom, m2, res2 = moments(alpha, beta)
    log_det = float(denom.log().sum()) + (d - len(sigma)) * math.log(alpha)
    evidence = (
        n / 2 * math.log(beta)
        + d / 2 * math.log(alpha)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * res2
        - alpha / 2 * m2
        - log_det / 2
    )
    return alpha, beta, evidence / n


def logme(features: Tensor, labels: Tensor, tol: float = 1e-8, max_iter: int = 1000) -> float:
    """LogME (You et al., ICML 2021): the mean over target columns of the maximised log
    evidence per example (:func:`logme_fit`) of a Bayesian linear model from the features to
    the column.

    ``labels`` are class ids (n,), taken one-hot (one column per class that occurs, as the
    authors do for classification), or real targets (n, K). Higher is better; it is a
    log-likelihood per example, comparable between feature sets for the same labels.
    """
    if features.dim() != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected (n, D) features and n labels, got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    targets = _one_hot_targets(labels)
    u, s = _svd(features)
    z = u.T @ targets
    y2 = (targets**2).sum(0)
    columns = [k for k in range(targets.shape[1]) if bool(targets[:, k].any())]
    fits = [
        _fit_column(features.shape, s**2, z[:, k], float(y2[k]), tol=tol, max_iter=max_iter)
        for k in columns
    ]
    return sum(evidence for _, _, evidence in fits) / len(fits)
