"""The extension point is real: a method defined here, in a few lines, trains end to end
through ``pyxtask train``'s configuration without any change to the trainer; its own
parameters get their own optimizer group and survive a resume."""

import csv
import math

import pytest
import torch
import transformers

from pyxtask.config import ConfigError
from pyxtask.methods import Method, StepContext, backward_all, register_method, shares
from pyxtask.trainer import Trainer
from tests.test_train import synthetic_config, synthetic_tasks

transformers.utils.logging.disable_progress_bar()


# -- a new method (RLW-like random loss weights, with a learnable temperature) from outside --
class RandomLossWeighting(Method):
    """Every task's batch per step; factors T * softmax(z / tau), z ~ N(0, 1) each step."""

    name = "random-softmax"
    sampling = "all"
    adaptive = True
    lr = 0.5

    def bind(self, ctx: StepContext) -> None:
        self.tau = torch.nn.Parameter(torch.ones(()))
        self.factors = torch.ones(ctx.num_tasks, dtype=torch.float64)

    def parameters(self):
        return [self.tau]

    def step(self, ctx, micro_batches):
        z = torch.randn(ctx.num_tasks)  # the trainer saves and restores every RNG
        self.factors = (torch.softmax(z / self.tau.detach(), 0) * ctx.num_tasks).double()
        _, losses = backward_all(ctx, micro_batches, None, self.factors.tolist())
        self.tau.grad = torch.ones(())  # the temperature only shows the group's own lr
        return losses

    def after_update(self, ctx):
        self.updates += 1
        self.record(ctx)

    def weights(self):
        return self.factors, shares(self.factors)


register_method(
    "random-softmax",
    lambda config, c: RandomLossWeighting(),
)
# ---------------------------------------------------------------------------------------------


def test_a_registered_method_trains_end_to_end(tmp_path):
    config = synthetic_config(method="random-softmax", epochs=2, lr=5e-3)
    tasks = synthetic_tasks(0, 24, 40, 24)
    summary = Trainer(config, tmp_path, progress=False, tasks=tasks).fit()
    assert summary["method"] == "random-softmax" and summary["sampling"] == "all"
    steps_per_epoch = math.ceil(40 / 8)  # one pass over the largest task
    assert summary["steps"] == 2 * steps_per_epoch
    # Every step has a batch of every task, so the target saw a batch in every step.
    assert summary["target_examples_seen"] == 8 * summary["steps"]
    with open(tmp_path / "weights.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["update"]) for r in rows] == list(range(summary["steps"] + 1))
    factors = [[float(r[f"w:{t.name}"]) for t in tasks] for r in rows[1:]]
    assert all(math.isclose(sum(f), 3.0, rel_tol=1e-6) for f in factors)
    assert len({tuple(f) for f in factors}) == len(factors)  # fresh random weights each step
    assert summary["dev"] > 0.5  # it learnt the target's rule (chance ~0.25)


def test_a_method_owns_its_parameters_in_the_optimizer_and_checkpoint(tmp_path):
    config = synthetic_config(method="random-softmax", epochs=1, lr=5e-3, warmup=0.5)
    method = RandomLossWeighting()
    tasks = synthetic_tasks(0, 16, 16, 8)
    Trainer(
        config, tmp_path, progress=False, tasks=tasks, keep_checkpoint=True, method=method
    ).fit()
    # Own group: lr 0.5 every step (no warm-up, no decay) and no weight decay; the gradient
    # is always 1, so Adam moves tau by ~lr per step.
    steps = math.ceil(16 / 8)
    assert float(method.tau.detach()) == pytest.approx(1.0 - 0.5 * steps, abs=1e-3)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert torch.equal(saved["method"]["parameters"][0], method.tau.detach())
    group = saved["optimizer"]["param_groups"][-1]
    assert group["lr"] == 0.5 and group["weight_decay"] == 0.0


def test_an_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="method = 'nope' is not one of"):
        synthetic_config(method="nope").validate()
