"""SVD task reweighting (Wu, Zhang & Ré 2020, Alg. 2) for tasks that label the same inputs.

Alg. 2, for ``k`` tasks with one feature matrix ``X`` (m x d) and scalar labels ``y_i``:

1. ``θ_i = Xᵀ y_i`` (d-vectors; nothing is normalised: neither ``X``, ``y_i`` nor ``θ_i``);
2. ``U_r D_r V_rᵀ`` = the best rank-``r`` approximation of ``Θ = [θ_1 … θ_k]`` (d x k), so
   ``U_r`` (d x r) spans its ``r`` principal left singular directions;
3. ``α_i = ‖θ_iᵀ U_r‖₂``: the length of ``θ_i``'s projection onto those directions.

A task whose labels are noise has ``θ_i`` a sum of cancelling terms (short, and pointing away
from the directions the other tasks share), so its ``α_i`` is small; a task aligned with the
others keeps its full length. α is *not* divided by ``‖θ_i‖`` — a cosine would discard
exactly the magnitude that separates a noisy task.

**Multi-class extension** (classification and tagging). Task ``i`` with ``c_i`` classes has
one-hot labels ``Y_i`` (m x c_i), i.e. ``c_i`` binary tasks on the same inputs, one column per
class (the paper's own reading of a multi-label problem as tasks with shared covariates):

* ``Θ_i = Xᵀ Y_i`` (d x c_i): column ``c`` is the sum of the features of the examples of
  class ``c``;
* ``Θ = [Θ_1 … Θ_k]`` (d x Σ c_i) and its rank-``r`` left singular vectors ``U_r``;
* ``α_i = ‖Θ_iᵀ U_r‖_F = (Σ_c ‖θ_{i,c}ᵀ U_r‖₂²)^{1/2}``, which is Alg. 2's ``α_i`` when
  ``c_i = 1``.

``center=True`` first subtracts the feature mean: ``X̄ᵀ Y_i``'s columns are then ``n_c (μ_c -
μ)``, class means against the overall mean. Without it every column carries ``n_c μ``, a
constant direction that says nothing about the labels, dominates ``U_r`` for encoder
features (whose mean is far from 0) and would give a task of random labels the same weight as
a real one. The training weights are the α normalised to sum 1 (``w = α / Σ α``; every task's
loss on the same batch, so ``w`` is also each task's share of the objective).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["class_sums", "svd_task_weights"]


def class_sums(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``Xᵀ Y`` with ``Y`` the one-hot ``labels`` (m,) ids: the (d, num_classes) sums of the
    features of each class's examples."""
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels must be ({features.shape[0]},) ids, one per feature row; got "
            f"{tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"label ids must be in [0, {num_classes})")
    sums = features.new_zeros(num_classes, features.shape[1])
    return sums.index_add_(0, labels.to(features.device), features).T


def svd_task_weights(
    features: Tensor,
    labels: Sequence[Tensor],
    num_classes: Sequence[int],
    rank: int | None = None,
    *,
    center: bool = True,
) -> Tensor:
    """Alg. 2's ``α`` (float64, one per task; see the module docs for the multi-class form).

    Args:
        features: ``X``, (m, d), the same rows for every task.
        labels: each task's (m,) class ids (``num_classes[i] = 1`` with float labels: the
            paper's scalar ``y_i``, used as given).
        num_classes: each task's number of classes.
        rank: ``r``; ``None``: the number of tasks. Clipped to the rank ``Θ`` can have.
        center: subtract the feature mean first.
    """
    if len(labels) != len(num_classes) or not labels:
        raise ValueError("give one label vector and one class count per task (at least one)")
    if features.dim() != 2:
        raise ValueError(f"features must be (m, d), got shape {tuple(features.shape)}")
    x = features.to(torch.float64)
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    thetas = [_theta(x, y, c) for y, c in zip(labels, num_classes, strict=True)]
    r = len(thetas) if rank is None else int(rank)
    if r < 1:
        raise ValueError(f"rank must be >= 1, got {rank!r}")
    u, _, _ = torch.linalg.svd(torch.cat(thetas, dim=1), full_matrices=False)
    u_r = u[:, : min(r, u.shape[1])]
    return torch.stack([torch.linalg.norm(theta.T @ u_r) for theta in thetas])


def _theta(x: Tensor, y: Tensor, classes: int) -> Tensor:
    if classes == 1 and y.dtype.is_floating_point:  # the paper's scalar label
        return (x.T @ y.to(x)).unsqueeze(1)
    return class_sums(x, y.long(), classes)
