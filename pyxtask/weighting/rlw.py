"""Random Loss Weighting (Lin et al. 2022, "Reasonable Effectiveness of Random Weighting: A
Litmus Test for Multi-Task Learning", TMLR, Sec. 3).

RLW draws fresh loss weights every step, ``lambda = f(lambda~)`` with ``lambda~`` from a fixed
distribution and ``f`` a normalisation onto the simplex; the paper's default is
``lambda~ ~ N(0, I)`` and ``f = softmax``. The distributions are those of LibMTL's ``RLW.py``:

``"normal"``     ``softmax(N(0, I))`` (the default);
``"uniform"``    ``softmax(U(0, 1)^T)``;
``"dirichlet"``  ``softmax(Dir(1, ..., 1))`` (LibMTL applies the softmax to this draw too);
``"bernoulli"``  a 0/1 draw with p = 1/2 per task, redrawn while it is all zeros, used as loss
                 factors as it is.

The three softmax variants give weights on the simplex (equal tasks get 1/T on average, so
``scale = "mean"``); Bernoulli's 0/1 factors have ``scale = "sum"``. LibMTL's
``constrained_Bernoulli`` (one task per step, from Python's ``random``) is not offered.

The draws are float32, as LibMTL's (its distributions have float32 parameters), so the same
generator state gives the same samples; the softmax is taken in float64. They come from
``generator``, from a private generator seeded by ``seed``, or, with neither, from torch's
global RNG (as LibMTL).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from pyxtask.weighting._loss import LossWeighting

__all__ = ["DISTRIBUTIONS", "RLW", "Distribution"]

Distribution = Literal["normal", "uniform", "dirichlet", "bernoulli"]
DISTRIBUTIONS: tuple[str, ...] = ("normal", "uniform", "dirichlet", "bernoulli")


class RLW(LossWeighting):
    """Random weights, drawn afresh at every :meth:`observe`.

    Args:
        num_tasks: T.
        distribution: ``"normal"`` (default), ``"uniform"``, ``"dirichlet"`` or
            ``"bernoulli"`` (see the module docs).
        seed: seed a private generator (reproducible, and saved in :meth:`state_dict`).
        generator: draw from this generator instead.

    >>> import torch
    >>> from pyxtask.weighting.rlw import RLW
    >>> rlw = RLW(3, seed=0)
    >>> w = rlw.observe(torch.tensor([0.5, 2.0, 1.0]))
    >>> bool(torch.equal(w, rlw.weights())), round(float(w.sum()), 12)
    (True, 1.0)
    >>> bool(torch.equal(w, RLW(3, seed=0).draw()))  # the losses never matter, the seed does
    True
    """

    name = "rlw"

    def __init__(
        self,
        num_tasks: int,
        distribution: Distribution = "normal",
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_tasks)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"rlw: unknown distribution {distribution!r}; expected one of {list(DISTRIBUTIONS)}"
            )
        if seed is not None and generator is not None:
            raise ValueError("rlw: give a seed or a generator, not both")
        self.distribution: Distribution = distribution
        self.scale = "sum" if distribution == "bernoulli" else "mean"
        self.seed = seed
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        self.generator = generator
        self._weights = self.expected_weights()

    def expected_weights(self) -> Tensor:
        """The mean of the draws (float64 ``(T,)``): the weights before the first draw.

        1/T by symmetry for the softmax distributions; ``P(b_t = 1 | b != 0) =
        (1/2) / (1 - 2^-T)`` for Bernoulli.
        """
        T = self.num_tasks
        if self.distribution == "bernoulli":
            return torch.full((T,), 0.5 / (1.0 - 0.5**T), dtype=torch.float64)
        return torch.full((T,), 1.0 / T, dtype=torch.float64)

    def draw(self) -> Tensor:
        """A fresh weight vector (float64 ``(T,)``); does not change :meth:`weights`."""
        T, g = self.num_tasks, self.generator
        if self.distribution == "bernoulli":
            half = torch.full((T,), 0.5)
            while True:
                b = torch.bernoulli(half, generator=g)
                if bool(b.any()):
                    return b.to(torch.float64)
        if self.distribution == "normal":
            raw = torch.randn(T, generator=g)
        elif self.distribution == "uniform":
            raw = torch.rand(T, generator=g)
        else:
            raw = torch._sample_dirichlet(torch.ones(T), generator=g)
        return torch.softmax(raw.to(torch.float64), dim=0)

    def weights(self) -> Tensor:
        """The last draw (the expected weights before the first)."""
        return self._weights.clone()

    def observe(self, losses: Tensor) -> Tensor:
        """Check the step's losses (they do not enter the weights); a fresh draw."""
        self._losses(losses)
        self._weights = self.draw()
        return self.weights()

    def state_dict(self) -> dict[str, Any]:
        state = {
            **super().state_dict(),
            "distribution": self.distribution,
            "weights": self._weights.tolist(),
        }
        # Only a private generator is ours to save; the global RNG belongs to the run.
        if self.seed is not None and self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state, {**super().state_dict(), "distribution": self.distribution})
        self._weights = torch.tensor(state["weights"], dtype=torch.float64)
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        extra = "" if self.seed is None else f", seed={self.seed}"
        return f"RLW(num_tasks={self.num_tasks}, distribution={self.distribution!r}{extra})"
