"""Aligned-MTL task weights (Senushkin et al. 2023, "Independent Component Alignment for
Multi-Task Learning", Sec. 4 and Alg. 1).

Aligned-MTL treats the stability of the linear system of task gradients: a badly conditioned
``G`` (T x P, one gradient per row) lets one direction dominate. It replaces ``G`` by the
*aligned* gradients ``G' = B G`` whose singular values are all equal, with the balance
transformation built from the eigendecomposition ``M = G G^T = V Lambda V^T`` (Alg. 1),

    B = sqrt(lambda_s) V_r Lambda_r^{-1/2} V_r^T,

over the r eigenvalues above the rank tolerance (``V_r``, ``Lambda_r``), so that
``G' G'^T = B M B = lambda_s V_r V_r^T``: r equal non-zero eigenvalues, condition number 1 on
the span of the gradients. The step is ``G'^T w`` for task preferences w (default 1/T each),
i.e. the weights returned are ``alpha = B w``. The scale ``lambda_s`` sets the step length:

``"min"``     the smallest kept eigenvalue (the paper's Alg. 1 and default);
``"median"``  their median (``torch.median``: the lower middle one for an even count);
``"rmse"``    their mean, i.e. the squared root-mean-square singular value of G.

As TorchJD's ``AlignedMTLWeighting`` (itself adapted from the authors' code): ``eigh`` on the
upper triangle, eigenvalues at or below ``rtol * lambda_max`` are dropped (default ``T * eps``
of the Gram's dtype; the authors' code used float32's eps whatever the dtype), and with no
eigenvalue kept (every gradient zero) ``B`` is the identity. Preferences summing to 1 make
these weights average the gradients: ``scale = "mean"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from pyxtask.weighting._gram import GramWeighting
from pyxtask.weighting.imtl_g import default_rtol

__all__ = ["SCALE_MODES", "AlignedMTL", "ScaleMode", "balance_transformation"]

ScaleMode = Literal["min", "median", "rmse"]
SCALE_MODES: tuple[str, ...] = ("min", "median", "rmse")


def balance_transformation(gram: Tensor, scale_mode: ScaleMode, rtol: float) -> Tensor:
    """``B`` (T x T) for a validated float ``gram`` (see the module docs)."""
    lam, V = torch.linalg.eigh(gram, UPLO="U")
    keep = lam > rtol * lam.max()
    if not bool(keep.any()):
        return torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    lam, V = lam[keep], V[:, keep]
    if scale_mode == "min":
        s = lam.min()
    elif scale_mode == "median":
        s = torch.median(lam)
    else:
        s = lam.mean()
    B: Tensor = (V * (s / lam).sqrt()) @ V.T
    return B


class AlignedMTL(GramWeighting):
    """``alpha = B w``: the preferences ``w`` applied to the aligned gradients ``B G``.

    Args:
        scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"`` (see the module docs).
        preferences: T non-negative task preferences w summing to 1; default ``1/T`` each.
        rtol: eigenvalues of M at or below ``rtol * lambda_max`` count as zero; ``None``
            (default) is ``T * eps`` of the Gram's dtype.

    Two orthogonal gradients of lengths 1 and 2 are aligned by shrinking the longer one to
    length 1 (``"min"``); with ``"rmse"`` both get length ``sqrt((1 + 4) / 2)``:

    >>> import torch
    >>> from pyxtask.weighting.aligned_mtl import AlignedMTL
    >>> AlignedMTL()(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    tensor([0.5000, 0.2500], dtype=torch.float64)
    >>> AlignedMTL(scale_mode="rmse")(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    tensor([0.7906, 0.3953], dtype=torch.float64)
    """

    name = "aligned-mtl"
    scale = "mean"

    def __init__(
        self,
        scale_mode: ScaleMode = "min",
        *,
        preferences: Sequence[float] | Tensor | None = None,
        rtol: float | None = None,
    ) -> None:
        if scale_mode not in SCALE_MODES:
            raise ValueError(
                f"aligned-mtl: unknown scale_mode {scale_mode!r}; "
                f"expected one of {list(SCALE_MODES)}"
            )
        if rtol is not None and not (0 <= rtol < 1):
            raise ValueError(f"aligned-mtl: rtol must be in [0, 1), got {rtol}")
        self.preferences: Tensor | None = None
        if preferences is not None:
            p = torch.as_tensor(preferences, dtype=torch.float64).detach().cpu()
            if p.dim() != 1 or p.numel() == 0:
                raise ValueError(
                    f"aligned-mtl: preferences must be a non-empty 1-D sequence, "
                    f"got shape {tuple(p.shape)}"
                )
            if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
                raise ValueError(
                    f"aligned-mtl: preferences must be finite and >= 0, got {p.tolist()}"
                )
            if abs(float(p.sum()) - 1.0) > 1e-9:
                raise ValueError(f"aligned-mtl: preferences must sum to 1, got {float(p.sum())}")
            self.preferences = p
        self.scale_mode: ScaleMode = scale_mode
        self.rtol = rtol
        # Uniform preferences treat the tasks alike; given ones single some out.
        self.permutation_equivariant = preferences is None

    def __call__(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        """alpha = B w (float64 ``(T,)``) for the T x T ``gram``."""
        dtype = torch.as_tensor(gram).dtype
        gram, _ = self._inputs(gram, losses)
        T = gram.shape[0]
        if self.preferences is None:
            w = torch.full((T,), 1.0 / T, dtype=torch.float64, device=gram.device)
        elif self.preferences.numel() != T:
            raise ValueError(
                f"aligned-mtl: {self.preferences.numel()} preferences for a {T} x {T} gram"
            )
        else:
            w = self.preferences.to(gram.device)
        rtol = default_rtol(T, dtype) if self.rtol is None else self.rtol
        return balance_transformation(gram, self.scale_mode, rtol) @ w

    def state_dict(self) -> dict[str, Any]:
        prefs = None if self.preferences is None else self.preferences.tolist()
        return {
            "name": self.name,
            "scale_mode": self.scale_mode,
            "preferences": prefs,
            "rtol": self.rtol,
        }

    def __repr__(self) -> str:
        args = [f"scale_mode={self.scale_mode!r}"]
        if self.preferences is not None:
            args.append(f"preferences={self.preferences.tolist()}")
        if self.rtol is not None:
            args.append(f"rtol={self.rtol}")
        return f"AlignedMTL({', '.join(args)})"
