"""Training under real ``torchrun`` processes (2 CPU processes, gloo) against one process.

The module is also the driver torchrun starts (``python -m tests.test_distributed``): it
trains the methods on the synthetic tasks of ``tests.test_train`` and writes, per rank, the
final parameters and weights, so the tests can compare the ranks with each other and with a
one-process run over the same global batches. Dropout is off: each process draws its own
masks, so with dropout the two runs differ by construction.

Tolerances: the processes sum fp32 partial gradients whose one-process counterpart is one
fp32 sum in another order, and each slice is padded to its own length (other matmul shapes),
so a gradient entry differs by a few ulps (~1e-7 relative); after a few Adam steps at lr 2e-3
a parameter differs by ~1e-6 of the step size. 1e-4 absolute on parameters of size ~0.1
(and 1e-5 on weights in [0, 1]) leaves room for that and fails on any real difference (one
example dropped or counted twice moves them by ~1e-3).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
METHODS = ("tawt", "tawt-step", "mgda", "metaweighting", "upgrad", "gradnorm", "uncertainty")
PAUSE_AT = 8  # the optimizer step a paused run waits before (checkpoints every 3 steps)


# -- the driver (runs inside torchrun's processes) ------------------------------------------


def _config(method: str, **changes: object) -> object:
    from pyxtask.config import DistributedConfig, MetaWeightingConfig, TAWTConfig
    from tests.test_train import synthetic_config

    base: dict[str, object] = {
        "method": method,
        "epochs": 2,
        "dropout": 0.0,
        "log_every": 1,
        "tawt": TAWTConfig(probe_size=15, update_every=4 if method == "tawt-step" else None),
        "metaweighting": MetaWeightingConfig(eta=0.5, alpha=0.5),
        "distributed": DistributedConfig(timeout=20.0),
    }
    base.update(changes)
    return synthetic_config(**base)


def _tasks() -> list[object]:
    from tests.test_train import synthetic_tasks

    # 15 target sentences: batches of 8 and 7, split 4/4 and 4/3 between two processes.
    return synthetic_tasks(0, 15, 40, 16)


class _NoDropoutTrainer:
    """``dropout = 0`` configures the heads; the tiny BERT's own dropout layers are switched
    off here, after the model is built. No plots either: they are not what is tested here,
    and drawing them is most of a tiny run's time."""

    @staticmethod
    def make(*args: object, **kwargs: object) -> object:
        from pyxtask.trainer import Trainer

        class NoDropout(Trainer):
            def _setup(self) -> None:
                super()._setup()
                for module in self.model.modules():
                    if isinstance(module, torch.nn.Dropout):
                        module.p = 0.0

            def _plot_epoch(self) -> None:
                pass

            def fit(self, resume: bool = False) -> dict[str, Any]:
                with mock.patch("pyxtask.plots.plot_run"):
                    return super().fit(resume)

        return NoDropout(*args, **kwargs)  # type: ignore[arg-type]


def _train(run_dir: Path, method: str, resume: bool = False, **changes: object) -> None:
    from pyxtask.distributed import torchrun_environment

    trainer: Any = _NoDropoutTrainer.make(
        _config(method, **changes), run_dir, progress=False, tasks=_tasks(), keep_checkpoint=True
    )
    summary = trainer.fit(resume=resume)
    env = torchrun_environment()
    rank = 0 if env is None else env["rank"]
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save({"summary": summary, "model": state}, run_dir / f"rank{rank}.pt")


def _pause_at(step: int, rank: int, action: str, marker: Path) -> None:
    """Make ``rank`` stop before optimizer step ``step``: wait to be killed ("pause"), SIGKILL
    itself in the middle of the step, after its forward passes ("die"), or hang there."""
    from pyxtask.distributed import torchrun_environment
    from pyxtask.methods import StepContext
    from pyxtask.trainer import Trainer

    env = torchrun_environment()
    if (0 if env is None else env["rank"]) != rank:
        return
    original_step, original_loss = Trainer._step, StepContext.batch_loss
    calls = [0]

    def paused(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == step and action == "pause":
            marker.write_text(str(step))
            time.sleep(120)  # the test kills the whole torchrun here
        return original_step(self, *args, **kwargs)

    def dying(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        loss = original_loss(self, *args, **kwargs)
        if calls[0] == step:
            marker.write_text(str(time.time()))
            if action == "hang":
                time.sleep(600)
            os.kill(os.getpid(), signal.SIGKILL)
        return loss

    Trainer._step = paused  # type: ignore[method-assign]
    if action in ("die", "hang"):
        StepContext.batch_loss = dying  # type: ignore[method-assign]


def driver(argv: list[str]) -> None:
    """``runs mode [methods...]``: mode ``train``, ``resume``, ``pause``, ``die`` or ``hang``."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    runs, mode, methods = Path(argv[0]), argv[1], argv[2:]
    if mode in ("pause", "die", "hang"):
        _pause_at(PAUSE_AT, 0 if mode == "pause" else 1, mode, runs / f"{mode}d")
    for method in methods:
        changes: dict[str, object] = {"checkpoint_every": 3} if method == "tawt-step" else {}
        _train(runs / method, method, resume=mode == "resume", **changes)
    if mode == "train":  # and the cheap statistics, once
        from pyxtask.config import DistributedConfig

        cheap = DistributedConfig(statistics="cheap", timeout=20.0)
        _train(runs / "cheap", "tawt-step", distributed=cheap)


# -- the tests -------------------------------------------------------------------------------


def _torchrun(runs: Path, mode: str, *methods: str, nproc: int = 2) -> subprocess.Popen[str]:
    """The driver under torchrun; ``nproc=1``: the same driver as a plain process."""
    runs.mkdir(parents=True, exist_ok=True)
    launcher = [os.fspath(TORCHRUN), "--nproc-per-node", "2", "--standalone",
                "--monitor-interval", "0.2"]  # fmt: skip
    if nproc == 1:
        launcher = [sys.executable]
    command = [*launcher, "-m", "tests.test_distributed", os.fspath(runs), mode, *methods]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.fspath(REPO)
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _load(run_dir: Path, rank: int = 0) -> dict[str, object]:
    return torch.load(run_dir / f"rank{rank}.pt", weights_only=False)


def _weights(run_dir: Path) -> list[list[float]]:
    with open(run_dir / "weights.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [[float(v) for k, v in row.items() if k.startswith(("w:", "omega:"))] for row in rows]


def _assert_close_models(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for name, value in a.items():
        diff = float((value.double() - b[name].double()).abs().max()) if value.numel() else 0
        worst = max(worst, diff)
    assert worst < 1e-4, worst
    return worst


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every method of METHODS trained once by 2 torchrun processes (one launch): TAWT per
    epoch and per step, MGDA, MetaWeighting and UPGrad (a Gram peer) in exact mode, and the
    methods with parameters of their own (GradNorm's weights, Uncertainty's log variances)."""
    runs = tmp_path_factory.mktemp("two")
    _finish(_torchrun(runs, "train", *METHODS))
    return runs


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same runs in this process, no torchrun."""
    runs = tmp_path_factory.mktemp("one")
    for method in METHODS:
        changes = {"checkpoint_every": 3} if method == "tawt-step" else {}
        _train(runs / method, method, **changes)
    return runs


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_equal_one_process_over_the_same_global_batches(
    two_process_runs: Path, one_process_runs: Path, method: str
) -> None:
    two, one = two_process_runs / method, one_process_runs / method
    rank0, rank1, single = _load(two, 0), _load(two, 1), _load(one)
    # The ranks agree bitwise: weights computed redundantly from the same summed statistics,
    # the same summed gradients, the same optimizer steps.
    for name, value in rank0["model"].items():
        assert torch.equal(value, rank1["model"][name]), name
    assert rank0["summary"]["w"] == rank1["summary"]["w"]
    # ... and equal the one-process run: every weight update, the final parameters.
    w2, w1 = _weights(two), _weights(one)
    assert len(w2) == len(w1) > 1
    assert torch.tensor(w2) == pytest.approx(torch.tensor(w1), abs=1e-5)
    _assert_close_models(rank0["model"], single["model"])
    assert rank0["summary"]["steps"] == single["summary"]["steps"]
    assert rank0["summary"]["dev"] == pytest.approx(single["summary"]["dev"], abs=1 / 16)
    # Rank 0 alone wrote the logs; the loss records are the global means.
    losses2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    losses1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    train2 = [r["loss"] for r in losses2 if r["kind"] == "train"]
    train1 = [r["loss"] for r in losses1 if r["kind"] == "train"]
    assert train2 == pytest.approx(train1, rel=1e-4)
    info = rank0["summary"]["distributed"]
    assert info["processes"] == 2 and info["statistics"] == "exact"
    assert "distributed" not in single["summary"]


def test_killed_two_process_run_resumes_on_two_and_on_one_process(
    two_process_runs: Path, tmp_path: Path
) -> None:
    """Paused before step 8 (checkpoint at step 6), the whole torchrun SIGKILLed; resumed
    with 2 processes and, from a copy, with 1: both end where the unkilled run ended."""
    killed = tmp_path / "killed"
    victim = _torchrun(killed, "pause", "tawt-step")
    try:
        deadline = time.monotonic() + 120
        while not (killed / "paused").exists():
            assert victim.poll() is None, victim.communicate()[0][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        _kill_tree(victim.pid)  # the workers first: once torchrun is gone they are orphans
        victim.kill()
    finally:
        victim.wait(timeout=60)
    assert not (killed / "tawt-step" / "summary.json").exists()
    saved = torch.load(killed / "tawt-step" / "checkpoint.pt", weights_only=False)
    assert saved["global_step"] == 6
    shutil.copytree(killed, tmp_path / "copy")
    _finish(_torchrun(killed, "resume", "tawt-step"))
    _finish(_torchrun(tmp_path / "copy", "resume", "tawt-step", nproc=1))
    reference = _load(two_process_runs / "tawt-step")
    for resumed in (killed, tmp_path / "copy"):
        out = _load(resumed / "tawt-step")
        _assert_close_models(out["model"], reference["model"])
        assert out["summary"]["w"] == pytest.approx(reference["summary"]["w"], abs=1e-5)
        assert out["summary"]["steps"] == reference["summary"]["steps"]
    # Resumed on 2 processes again: the same operations in the same order, bitwise.
    again = _load(killed / "tawt-step")["model"]
    for name, value in reference["model"].items():
        assert torch.equal(again[name], value), name


def _kill_tree(pid: int) -> None:
    """SIGKILL torchrun's worker processes (children of ``pid``) too."""
    for child in Path("/proc").glob("[0-9]*"):
        try:
            stat = (child / "stat").read_text().split()
        except OSError:
            continue
        if int(stat[3]) == pid:
            _kill_tree(int(child.name))
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child.name), signal.SIGKILL)


def test_a_rank_killed_mid_step_fails_the_run_with_one_clear_line(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = _torchrun(tmp_path, "die", "mgda")
    out, _ = proc.communicate(timeout=120)
    died = float((tmp_path / "died").read_text())
    assert proc.returncode != 0
    # The survivor's error is one line, and comes within the 20 s timeout of the death.
    lines = [line for line in out.splitlines() if "rank 0/2" in line]
    assert lines, out[-3000:]
    assert any("another process died" in line or "stopped by torchrun" in line for line in lines)
    assert time.time() - died < 20 + 10, out[-2000:]
    assert time.monotonic() - started < 120


def test_cheap_statistics_agree_across_ranks_and_stay_near_exact(two_process_runs: Path) -> None:
    cheap, exact = two_process_runs / "cheap", two_process_runs / "tawt-step"
    rank0, rank1 = _load(cheap, 0), _load(cheap, 1)
    for name, value in rank0["model"].items():
        assert torch.equal(value, rank1["model"][name]), name
    assert rank0["summary"]["w"] == rank1["summary"]["w"]
    info = rank0["summary"]["distributed"]
    assert info["statistics"] == "cheap"
    # Cheap mode sends the target's gradient (P floats) and 2T scalars for the statistics;
    # exact mode the T x P rows (T = 3): about a third.
    exact_info = _load(exact)["summary"]["distributed"]
    ratio = info["bytes_per_step"]["statistics"] / exact_info["bytes_per_step"]["statistics"]
    assert 0.2 < ratio < 0.5, ratio
    # The dot products are exact and the norms R * sum of the ranks': the weights stay close.
    w_cheap, w_exact = _weights(cheap), _weights(exact)
    assert len(w_cheap) == len(w_exact)
    assert torch.tensor(w_cheap) == pytest.approx(torch.tensor(w_exact), abs=0.05)


if __name__ == "__main__":
    driver(sys.argv[1:])
