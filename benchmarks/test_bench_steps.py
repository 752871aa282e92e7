"""pytest-benchmark suite: each per-step method's optimizer step beside the plain summed-loss step.

The workload and the steps are `pyxtask bench`'s (:mod:`pyxtask.bench.workload`,
:mod:`pyxtask.bench.contenders`): a random BERT, T = 4 token-tagging tasks (45, 17, 12, 25
labels), one batch per task of the same random tokens with each task's own random labels, fixed
seed. Full: the 4-layer, 256-wide ``small`` encoder, 16 x 64 tokens per task (the published CPU
table's setting); ``--quick``: the 2-layer, 128-wide ``tiny`` encoder, 8 x 16 tokens. ``plain``
is plain PyTorch (each task's forward, one backward of the summed losses, clip, AdamW); a
method's step is the trainer's (``method.step``, clip, AdamW, ``zero_grad``, the step counters,
``method.after_update``). Every registered method whose ``sampling`` is ``"all"`` or
``"shared"`` (a batch of every task per step) is benchmarked, methods added later too. All rows
of a setting share one group, so the table shows each method beside ``plain``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from pyxtask.bench.contenders import Contender, method_contender, plain_contender
from pyxtask.bench.workload import Workload
from pyxtask.config import TrainConfig
from pyxtask.methods import make_method, method_names

NUM_TASKS = 4


@dataclass(frozen=True)
class Setting:
    encoder: str
    batch: int
    seq: int
    warmup: int
    rounds: int
    train_items: int  # items per task (a step takes the first ``batch``)

    @property
    def label(self) -> str:
        return f"{self.encoder}-{self.batch}x{self.seq}"


FULL = Setting("small", batch=16, seq=64, warmup=2, rounds=7, train_items=64)
QUICK = Setting("tiny", batch=8, seq=16, warmup=2, rounds=10, train_items=16)


def setting(config: pytest.Config) -> Setting:
    return QUICK if config.getoption("quick") else FULL


def per_step_methods() -> list[str]:
    """Registered methods that take a batch of every task per step (``sampling`` all/shared)."""
    return [
        name
        for name in method_names()
        if make_method(TrainConfig(method=name), 1.0).sampling in ("all", "shared")
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "name" in metafunc.fixturenames:
        # The setting is in the test id, which is what --benchmark-compare matches runs by:
        # a quick run is never compared with a full one.
        label = setting(metafunc.config).label
        names = ["plain", *per_step_methods()]
        metafunc.parametrize("name", names, ids=[f"{label}-{n}" for n in names])


@pytest.fixture(scope="module")
def workload(pytestconfig: pytest.Config) -> Workload:
    s = setting(pytestconfig)
    return Workload(
        s.encoder,
        NUM_TASKS,
        s.batch,
        s.seq,
        torch.device("cpu"),
        bf16=False,
        train_items=s.train_items,
    )


def test_step(benchmark: Any, workload: Workload, pytestconfig: pytest.Config, name: str) -> None:
    s = setting(pytestconfig)
    contender: Contender = (
        plain_contender(workload) if name == "plain" else method_contender(workload, name)
    )
    assert contender.step is not None
    benchmark.group = f"step {s.label} T={NUM_TASKS}"
    benchmark.extra_info.update(
        method=name, setting=s.label, note=contender.note, threads=torch.get_num_threads()
    )
    try:
        benchmark.pedantic(contender.step, rounds=s.rounds, warmup_rounds=s.warmup, iterations=1)
    finally:
        contender.close()
