"""What every weighting shares: task sizes, the paradigm, w and ω, the recorded trajectory."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["PARADIGMS", "Paradigm", "Weighting"]

Paradigm = Literal["single", "joint", "normalized-joint", "pretrain"]
PARADIGMS: tuple[str, ...] = ("single", "joint", "normalized-joint", "pretrain")


def _omega(w: Tensor, sizes: Tensor) -> Tensor:
    mass = w * sizes
    total = mass.sum()
    return mass / total if bool(total > 0) else mass


class Weighting:
    """Task weights over ``[target, source 1, ..., source T]`` (task 0 is always the target).

    Two views of the same weights, as in the TAWT authors' code:

    ``w``
        per-batch *loss factors* when every task's batches come in one shuffled stream (a task
        with ``n_t`` examples gets ``~n_t / batch`` batches per epoch); the trainer multiplies a
        task's batch loss by ``K * w_t`` (K = the number of tasks in the objective).
    ``omega``
        the paper's ω, each task's share of the objective: ``omega_t ∝ n_t * w_t``. It is also
        what the trainer uses as the probability of drawing a task's batch when weights act as
        sampling probabilities.

    A weighting is a drop-in object: the trainer reads :attr:`w` / :attr:`omega` and calls
    :meth:`update` when the method's schedule says so (only methods with
    :attr:`needs_gradients` need task gradients there). ``state_dict`` / ``load_state_dict``
    make it resumable; :attr:`trajectory` records the weights at every update.
    """

    #: Whether :meth:`update` needs task-gradient statistics (probe gradients).
    needs_gradients: bool = False
    #: Short name used in run folders and summaries.
    name: str = "weighting"

    def __init__(self, task_sizes: Sequence[int], paradigm: Paradigm) -> None:
        if paradigm not in PARADIGMS:
            raise ValueError(f"unknown paradigm {paradigm!r}; expected one of {list(PARADIGMS)}")
        sizes = [int(n) for n in task_sizes]
        if not sizes:
            raise ValueError("task_sizes is empty: need at least the target task")
        if any(n < 1 for n in sizes):
            raise ValueError(f"every task needs at least one example, got sizes {sizes}")
        if paradigm != "single" and len(sizes) < 2:
            raise ValueError(f"paradigm {paradigm!r} needs at least one source task")
        self.paradigm: Paradigm = paradigm
        self.sizes = torch.tensor(sizes, dtype=torch.float64)
        self._w = self.initial_w()
        self.updates = 0
        self.trajectory: list[dict[str, Any]] = []
        self._record(similarity=None)

    # -- the two views -------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return int(self.sizes.numel())

    @property
    def included(self) -> Tensor:
        """Which tasks are in the representation's objective (bool, ``(T,)``)."""
        inc = torch.ones(self.num_tasks, dtype=torch.bool)
        if self.paradigm == "single":
            inc[1:] = False
        elif self.paradigm == "pretrain":
            inc[0] = False  # the target joins only when fine-tuning
        return inc

    @property
    def w(self) -> Tensor:
        """Loss factors on the simplex (float64, zero for tasks outside the objective)."""
        return self._w.clone()

    @property
    def omega(self) -> Tensor:
        """The paper's ω: ``n_t * w_t`` normalised (float64)."""
        return _omega(self._w, self.sizes)

    def loss_factors(self) -> Tensor:
        """``K * w_t``: 1 for every task under uniform ``w`` (each example counts the same)."""
        return self._w * float(self.included.sum())

    def initial_w(self) -> Tensor:
        """Uniform loss factors over the tasks in the objective: ω ∝ n_t (joint training)."""
        inc = self.included.to(torch.float64)
        return inc / inc.sum()

    # -- updates -------------------------------------------------------------------------------

    def update(self, similarity: Tensor | None = None, **where: Any) -> None:
        """Fixed weightings do not change; TAWT overrides this."""

    def _set(self, w: Tensor, similarity: Tensor | None, **where: Any) -> None:
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise FloatingPointError(f"{self.name}: the weight update gave {w.tolist()}")
        self._w = w.to(torch.float64)
        self.updates += 1
        self._record(similarity=similarity, **where)

    def _record(self, similarity: Tensor | None, **where: Any) -> None:
        row: dict[str, Any] = {"update": self.updates, **where}
        row["w"] = self._w.tolist()
        row["omega"] = self.omega.tolist()
        row["similarity"] = None if similarity is None else similarity.tolist()
        self.trajectory.append(row)

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "paradigm": self.paradigm,
            "sizes": self.sizes.tolist(),
            "w": self._w.tolist(),
            "updates": self.updates,
            "trajectory": copy.deepcopy(self.trajectory),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("name", self.name), ("paradigm", self.paradigm)):
            if state.get(key) != mine:
                raise ValueError(f"state is for {key} {state.get(key)!r}, this is {mine!r}")
        if [float(x) for x in state["sizes"]] != self.sizes.tolist():
            raise ValueError(
                f"state is for task sizes {state['sizes']}, this weighting has "
                f"{self.sizes.tolist()}"
            )
        w = torch.tensor(state["w"], dtype=torch.float64)
        valid = (
            w.shape == self._w.shape
            and bool(torch.isfinite(w).all())
            and bool((w >= 0).all())
            and math.isclose(float(w.sum()), 1.0, abs_tol=1e-9)
            and bool((w[~self.included] == 0).all())
        )
        if not valid:
            raise ValueError(
                f"state has invalid weights {state['w']}: they must be finite, >= 0, sum to 1 "
                f"and be 0 outside the {self.paradigm!r} objective"
            )
        self._w = w
        self.updates = int(state["updates"])
        # A trainer keeps the trajectory in the run's files, not in every checkpoint.
        self.trajectory = copy.deepcopy(list(state.get("trajectory", [])))

    def __repr__(self) -> str:
        omega = ", ".join(f"{x:.4g}" for x in self.omega.tolist())
        return f"{type(self).__name__}(paradigm={self.paradigm!r}, omega=[{omega}])"
