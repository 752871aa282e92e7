"""FAMO: Fast Adaptive Multitask Optimization (Liu et al. 2023, NeurIPS, Sec. 3 and Alg. 1).

FAMO keeps task logits ``xi`` (zeros at first) and weights ``z = softmax(xi)``. A step descends

    sum_i z_i log(l_i - l*_i + eps) / c,        c = sum_i z_i / (l_i - l*_i + eps)  (detached),

whose gradient is ``sum_i f_i grad l_i`` with loss factors ``f_i = z_i / (c (l_i - l*_i + eps))``;
they sum to 1 and equal z when all losses are equal (``scale = "mean"``; the official code
uses them as they are, i.e. at the scale of the mean loss). ``l*`` are lower bounds of the
losses (0 by default) and ``eps = 1e-8``.

After the step, with the losses ``l(theta_{t+1})``, the logits follow the decrease of the log
losses: ``delta = log(l(theta_t) - l* + eps) - log(l(theta_{t+1}) - l* + eps)``, and the
gradient ``(d z / d xi)^T delta = z * (delta - z . delta)`` is fed to Adam with L2 weight decay
gamma. Tasks whose log loss fell least gain weight.

Defaults are those of the official implementation (github.com/Cranial-XIX/FAMO): ``famo.py``
``FAMO(gamma=0.01, w_lr=0.025)`` with ``torch.optim.Adam([w], lr=w_lr, weight_decay=gamma)``
(Adam's own betas 0.9, 0.999 and eps 1e-8), the same defaults in its experiments' argument
parser (``--gamma 0.01``, ``--method-params-lr 0.025``); its QM9 script sets gamma = 0.001.
LibMTL's later ``FAMO.py`` documents w_lr 0.025 and gamma 1e-3.

Where ``l(theta_{t+1})`` comes from is the caller's choice; :meth:`FAMO.update` just receives
it. The official trainers (and Alg. 1) evaluate it on the *same* batch right after the
optimizer step, one extra no-grad forward: then delta measures the effect of the update alone.
The cheaper alternative passes the next step's losses (a different batch) to
:meth:`FAMO.update` before :meth:`FAMO.observe`; delta then also carries the batch-to-batch
change of the losses.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pyxtask.weighting._loss import LossWeighting

__all__ = ["FAMO"]


class FAMO(LossWeighting):
    """Loss factors from learnt task logits; see the module docs for the algorithm.

    Args:
        num_tasks: T.
        lr: Adam's learning rate for the logits (official default 0.025).
        gamma: Adam's (L2) weight decay on the logits (official default 0.01).
        eps: added inside the logs (official 1e-8).
        min_losses: the lower bounds ``l*`` (default 0 for every task).

    Per step: :meth:`observe` the losses before the backward (its result are the factors),
    then :meth:`update` with the losses after the optimizer step.

    >>> import torch
    >>> from pyxtask.weighting.famo import FAMO
    >>> famo = FAMO(2)
    >>> famo.observe(torch.tensor([1.0, 3.0]))  # z = (1/2, 1/2): factors ∝ 1 / l
    tensor([0.7500, 0.2500], dtype=torch.float64)
    >>> famo.update(torch.tensor([0.5, 2.9]))  # task 1 hardly moved: it gains weight
    >>> famo.weights()
    tensor([0.4875, 0.5125], dtype=torch.float64)
    """

    name = "famo"
    scale = "mean"

    def __init__(
        self,
        num_tasks: int,
        *,
        lr: float = 0.025,
        gamma: float = 0.01,
        eps: float = 1e-8,
        min_losses: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__(num_tasks)
        for what, value in (("lr", lr), ("gamma", gamma), ("eps", eps)):
            if not (value >= 0 and value < float("inf")):
                raise ValueError(f"famo: {what} must be finite and >= 0, got {value}")
        self.lr, self.gamma, self.eps = float(lr), float(gamma), float(eps)
        self.min_losses = (
            torch.zeros(num_tasks, dtype=torch.float64)
            if min_losses is None
            else self._losses(torch.as_tensor(min_losses), "min_losses")
        )
        self.logits = torch.zeros(num_tasks, dtype=torch.float64, requires_grad=True)
        self._optimizer = torch.optim.Adam([self.logits], lr=self.lr, weight_decay=self.gamma)
        self._prev: Tensor | None = None

    @property
    def pending(self) -> bool:
        """Whether an observed step awaits its :meth:`update`."""
        return self._prev is not None

    def weights(self) -> Tensor:
        """``z = softmax(xi)`` (float64 ``(T,)``): the task weights before the loss scaling."""
        return torch.softmax(self.logits.detach(), dim=0)

    def _log_gaps(self, losses: Tensor, what: str) -> Tensor:
        gaps = losses - self.min_losses + self.eps
        if not bool((gaps > 0).all()):
            raise ValueError(
                f"famo: {what} must exceed min_losses - eps (their logs are taken), "
                f"got {losses.tolist()}"
            )
        return gaps

    def factors(self, losses: Tensor) -> Tensor:
        """The loss factors ``z / (c (l - l* + eps))`` for ``losses``; records nothing."""
        gaps = self._log_gaps(self._losses(losses), "losses")
        f = self.weights() / gaps
        return f / f.sum()

    def observe(self, losses: Tensor) -> Tensor:
        """Remember ``l(theta_t)`` for :meth:`update`; the loss factors for this step."""
        losses = self._losses(losses)
        f = self.factors(losses)
        self._prev = losses
        return f

    def update(self, new_losses: Tensor) -> None:
        """One Adam step on the logits from the losses after the optimizer step."""
        if self._prev is None:
            raise ValueError("famo: update() needs the step's losses from observe() first")
        new = self._losses(new_losses, "new_losses")
        delta = self._log_gaps(self._prev, "losses").log() - self._log_gaps(new, "new_losses").log()
        z = self.weights()
        self._optimizer.zero_grad()
        self.logits.grad = z * (delta - z @ delta)
        self._optimizer.step()
        self._prev = None

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "lr": self.lr,
            "gamma": self.gamma,
            "eps": self.eps,
            "min_losses": self.min_losses.tolist(),
            "logits": self.logits.detach().clone(),
            # Adam updates its moments in place: a copy keeps the checkpoint as of now.
            "optimizer": copy.deepcopy(self._optimizer.state_dict()),
            "prev": None if self._prev is None else self._prev.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {
            **super().state_dict(),
            "lr": self.lr,
            "gamma": self.gamma,
            "eps": self.eps,
            "min_losses": self.min_losses.tolist(),
        }
        self._check_state(state, mine)
        with torch.no_grad():
            self.logits.copy_(torch.as_tensor(state["logits"], dtype=torch.float64))
        self._optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        prev = state.get("prev")
        self._prev = None if prev is None else torch.tensor(prev, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"FAMO(num_tasks={self.num_tasks}, lr={self.lr}, gamma={self.gamma}, eps={self.eps})"
