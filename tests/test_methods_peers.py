"""The peers' weightings as training methods: each step leaves ``sum_t f_t grad L_t``.

The weightings' math is tested against the peers in ``test_weightings_*.py``; here the glue:
for every registered Gram method, the factors a step applies are the weighting's weights on
the Gram of the per-task gradients (taken independently, one ``autograd.grad`` per task),
times T for weights that average; for the loss methods, the factors a fresh weighting gives
when it is shown the same losses in the same order — FAMO's update included, which must see
the same batch's losses at the parameters after the optimizer step.
"""

import random

import numpy as np
import pytest
import torch

from pyxtask.config import FAMOConfig, PCGradConfig, TrainConfig
from pyxtask.methods import GramMethod, LossWeightedMethod, make_method, method_names
from pyxtask.weighting.dwa import DWA
from pyxtask.weighting.famo import FAMO
from pyxtask.weighting.rlw import RLW
from tests.test_methods import (
    advance,
    assert_combination,
    problem,
    random_step,
    reference,
    shared_matrix,
    tokenizer,  # noqa: F401 (fixture)
)

# MGDA-UB (one shared encoder pass; its own test in test_methods.py) differs in its step.
GRAM_METHODS = [
    n
    for n in method_names()
    if isinstance(make_method(TrainConfig(method=n)), GramMethod) and n != "mgda-ub"
]


def test_every_peer_weighting_is_registered():
    for name in ("upgrad", "dualproj", "pcgrad", "cagrad", "imtl-g", "aligned-mtl", "nash-mtl"):
        if name in method_names():  # the compiled-solver weightings may land separately
            assert name in GRAM_METHODS
    for name in ("dwa", "famo", "rlw"):
        assert isinstance(make_method(TrainConfig(method=name)), LossWeightedMethod)


@pytest.mark.parametrize("name", GRAM_METHODS)
def test_gram_method_applies_its_weighting_to_the_steps_gram(tokenizer, name):  # noqa: F811
    p = problem(tokenizer, seed=3)
    T = len(p.tasks)
    ctx = p.context()
    method = make_method(TrainConfig(method=name, pcgrad=PCGradConfig(order="index")))
    oracle = make_method(TrainConfig(method=name, pcgrad=PCGradConfig(order="index"))).weighting
    method.bind(ctx)
    optimizer = torch.optim.SGD(p.model.parameters(), lr=0.5)
    rng = random.Random(4)
    for _ in range(2):
        step = random_step(rng, p.encoded)
        refs = reference(p.model, p.tasks, p.encoded, step)
        G = shared_matrix(refs)
        losses = torch.tensor([r.loss for r in refs], dtype=torch.float64)
        w = oracle(torch.from_numpy(G @ G.T), losses).numpy()
        factors = w * (T if oracle.scale == "mean" else 1)
        p.model.zero_grad(set_to_none=True)
        method.step(ctx, [step])
        # fp32 gradients against float64 references: the weights move by ~1e-6 relative.
        np.testing.assert_allclose(method.weights()[0].numpy(), factors, rtol=1e-4, atol=1e-6)
        assert_combination(p.model, p.tasks, refs, method.weights()[0].numpy())
        advance(ctx, method, optimizer)


@pytest.mark.parametrize(
    ("name", "replay"),
    [
        ("rlw", lambda T: RLW(T, seed=0)),
        ("famo", FAMO),
        ("dwa", DWA),
    ],
)
def test_loss_method_factors_replay_its_weighting(tokenizer, name, replay):  # noqa: F811
    p = problem(tokenizer, seed=5)
    T = len(p.tasks)
    ctx = p.context()
    method = make_method(TrainConfig(method=name))
    method.bind(ctx)
    oracle = replay(T)
    optimizer = torch.optim.SGD(p.model.parameters(), lr=0.5)
    rng = random.Random(6)
    for k in range(4):
        step = random_step(rng, p.encoded)
        refs = reference(p.model, p.tasks, p.encoded, step)
        losses = torch.tensor([r.loss for r in refs], dtype=torch.float64)
        factors = oracle.observe(losses).numpy() * (T if oracle.scale == "mean" else 1)
        p.model.zero_grad(set_to_none=True)
        method.step(ctx, [step])
        np.testing.assert_allclose(method.weights()[0].numpy(), factors, rtol=1e-5, atol=1e-7)
        assert_combination(p.model, p.tasks, refs, factors)
        advance(ctx, method, optimizer)
        if name == "famo":  # the same batch's losses at the updated parameters
            after = reference(p.model, p.tasks, p.encoded, step)
            oracle.update(torch.tensor([r.loss for r in after], dtype=torch.float64))
        if name == "dwa" and k % 2 == 1:  # two-step "epochs": the weights move from epoch 3
            method.epoch_end(ctx, k // 2)
            oracle.epoch_end()
    if name != "dwa":
        assert not np.allclose(factors, factors.mean()), factors  # the weights really moved


def test_famo_next_step_needs_no_extra_forward(tokenizer):  # noqa: F811
    p = problem(tokenizer, seed=7)
    ctx = p.context()
    method = make_method(TrainConfig(method="famo", famo=FAMOConfig(update_with="next-step")))
    method.bind(ctx)
    calls = []
    original = ctx.step_losses
    ctx.step_losses = lambda step: calls.append(step) or original(step)
    optimizer = torch.optim.SGD(p.model.parameters(), lr=0.5)
    rng = random.Random(8)
    for _ in range(3):
        method.step(ctx, [random_step(rng, p.encoded)])
        advance(ctx, method, optimizer)
    assert len(calls) == 3  # one forward per step: the update uses the next step's losses
    assert method.weighting.pending
