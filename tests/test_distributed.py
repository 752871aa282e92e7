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
#: Run name -> (method, other settings); the plain names run the method's defaults.
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "tawt-exact": ("tawt", {"similarity": "exact"}),  # eq. 2.7: HVPs summed in the CG solve
    "tawt-samples": ("tawt-samples", {}),  # per-example products split and summed
    "tawt-samples-drawn": ("tawt-samples", {"weights_as": "sampling"}),
    # Methods in DDP (Method.data_parallel): one task's batch per step (the other heads unused),
    # every task's with 2 micro-batches (the first accumulated under no_sync), a loss weighting.
    "normalized-joint": ("fixed", {"paradigm": "normalized-joint"}),
    "equal-accumulate": ("equal", {"accumulate": 2}),
    "famo": ("famo", {}),
}
METHODS = ("tawt", "tawt-step", "mgda", "metaweighting", "upgrad", "gradnorm", "uncertainty",
           "alignment", *VARIANTS)  # fmt: skip
#: The methods whose gradients DDP sums (the others' after the step, by the trainer).
IN_DDP = ("uncertainty", "normalized-joint", "equal-accumulate", "famo")
PAUSE_AT = 8  # the optimizer step a paused run waits before (checkpoints every 3 steps)
#: Label transfer runs (run name -> the method, its ``metaxt`` settings, other settings), with
#: a small network. The exact meta-gradient's run has target batches of 2 (one item to train,
#: one to meta-train; the last batch one item): rank 1's target slices are empty while its
#: source slices are not: its sources' part of α's meta-gradient comes through the all-reduce
#: in the lookahead's backward pass alone (rank 0's L_meta).
LABEL_TRANSFER: dict[str, tuple[str, dict[str, object], dict[str, object]]] = {
    "metaxt": ("metaxt", {}, {}),
    "xt": ("xt", {}, {}),
    "metaxt-exact": (
        "metaxt",
        {"meta_gradient": "exact"},
        {"batch_size": 2, "epochs": 1, "epoch": "target"},
    ),
}


# -- the driver (runs inside torchrun's processes) ------------------------------------------


def _config(method: str, **changes: object) -> object:
    from pyxtask.config import (
        DistributedConfig,
        MetaWeightingConfig,
        MetaXTConfig,
        SampleTAWTConfig,
        TAWTConfig,
    )
    from tests.test_train import synthetic_config

    other: dict[str, object] = {}
    if method in VARIANTS:
        method, other = VARIANTS[method]
        other = dict(other)
    similarity = str(other.pop("similarity", "cosine"))
    weights_as = other.pop("weights_as", "loss")
    changes = {**other, **changes}
    if method in LABEL_TRANSFER:
        method, settings, other = LABEL_TRANSFER[method]
        metaxt = MetaXTConfig(label_dim=8, hidden=32, **settings)  # type: ignore[arg-type]
        changes = {"metaxt": metaxt, **other, **changes}
    base: dict[str, object] = {
        "method": method,
        "epochs": 2,
        "dropout": 0.0,
        "log_every": 1,
        "tawt": TAWTConfig(
            probe_size=15,
            update_every=4 if method == "tawt-step" else None,
            similarity=similarity,
        ),
        "tawt_samples": SampleTAWTConfig(c=20.0, batch_size=6),
        "weights_as": weights_as,
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
                method = self.phases[-1].method
                if hasattr(method, "meta_parameters"):  # MetaXT's network before training
                    self.transfer_at_start = [p.detach().clone() for p in method.meta_parameters()]

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
    saved: dict[str, object] = {"summary": summary, "model": state}
    method = trainer.phases[-1].method
    if hasattr(method, "meta_parameters"):  # MetaXT/XT: the label transfer network, its sizes
        saved["transfer"] = [p.detach().clone() for p in method.meta_parameters()]
        saved["transfer_at_start"] = trainer.transfer_at_start
        theta = method.lookahead_parameters(trainer.ctx)
        saved["sizes"] = {"theta": sum(p.numel() for p in theta),
                          "transfer": sum(p.numel() for p in method.meta_parameters())}  # fmt: skip
    torch.save(saved, run_dir / f"rank{rank}.pt")


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
    methods with parameters of their own (GradNorm's weights, Uncertainty's log variances,
    the alignment matrices, folded into the final model),
    and the label transfer runs (MetaXT's network)."""
    runs = tmp_path_factory.mktemp("two")
    _finish(_torchrun(runs, "train", *METHODS, *LABEL_TRANSFER))
    return runs


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same runs in this process, no torchrun."""
    runs = tmp_path_factory.mktemp("one")
    for method in (*METHODS, *LABEL_TRANSFER):
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
    fixed = method in ("alignment", "normalized-joint", "equal-accumulate")
    assert len(w2) == len(w1) >= (1 if fixed else 2)
    assert torch.tensor(w2) == pytest.approx(torch.tensor(w1), abs=1e-5)
    _assert_close_models(rank0["model"], single["model"])
    assert rank0["summary"]["steps"] == single["summary"]["steps"]
    assert rank0["summary"]["dev"] == pytest.approx(single["summary"]["dev"], abs=1 / 16)
    if method == "alignment":  # every R_t moved, as far on 2 processes as on 1
        moved, moved1 = (
            rank0["summary"]["alignment_distance"],
            single["summary"]["alignment_distance"],
        )
        assert moved == pytest.approx(moved1, abs=1e-5) and min(moved1.values()) > 1e-2
    # Rank 0 alone wrote the logs; the loss records are the global means.
    losses2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    losses1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    train2 = [r["loss"] for r in losses2 if r["kind"] == "train"]
    train1 = [r["loss"] for r in losses1 if r["kind"] == "train"]
    assert train2 == pytest.approx(train1, rel=1e-4)
    info = rank0["summary"]["distributed"]
    assert info["processes"] == 2 and info["statistics"] == "exact"
    assert set(info["data_parallel"].values()) == {method in IN_DDP}
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


# MGDA's survivor waits in the per-task statistics' all-reduce, normalized joint's in DDP's
# gradient all-reduce inside the backward pass.
@pytest.mark.parametrize("method", ["mgda", "normalized-joint"])
def test_a_rank_killed_mid_step_fails_the_run_with_one_clear_line(
    tmp_path: Path, method: str
) -> None:
    started = time.monotonic()
    proc = _torchrun(tmp_path, "die", method)
    out, _ = proc.communicate(timeout=120)
    died = float((tmp_path / "died").read_text())
    assert proc.returncode != 0
    # The survivor's error is one line, and comes within the 20 s timeout of the death.
    lines = [line for line in out.splitlines() if "rank 0/2" in line]
    assert lines, out[-3000:]
    assert any("another process died" in line or "stopped by torchrun" in line for line in lines)
    assert time.time() - died < 20 + 10, out[-2000:]
    assert time.monotonic() - started < 120


@pytest.mark.parametrize("method", ["mgda", "normalized-joint"])
def test_a_hung_rank_fails_the_run_within_the_timeout(tmp_path: Path, method: str) -> None:
    """Rank 1 sleeps inside a step: rank 0's next collective times out (20 s) with one line,
    and torchrun then stops rank 1, which says so in one line."""
    proc = _torchrun(tmp_path, "hang", method)
    out, _ = proc.communicate(timeout=120)
    hung = float((tmp_path / "hangd").read_text())
    assert proc.returncode != 0
    # The driver calls the trainer, not the CLI: the line is the error's message (the CLI
    # prints it alone as "error: ...").
    lines = out.splitlines()
    assert any("rank 0/2" in x and "hung longer than the 20 s timeout" in x for x in lines), out
    assert any("rank 1/2: stopped by torchrun (signal SIGTERM)" in x for x in lines), out
    assert time.time() - hung < 20 + 15, out[-2000:]


@pytest.mark.parametrize("name", ["tawt-samples", "tawt-samples-drawn"])
def test_sample_weights_on_two_processes_equal_one_process(
    two_process_runs: Path, one_process_runs: Path, name: str
) -> None:
    """Each process measures its share of the source examples' products; the summed N-vectors
    give every process the one-process weights."""
    two = torch.load(two_process_runs / name / "sample_weights.pt", weights_only=False)
    one = torch.load(one_process_runs / name / "sample_weights.pt", weights_only=False)
    assert [h["update"] for h in two["history"]] == [h["update"] for h in one["history"]]
    assert len(one["history"]) == 3  # the start and one update per epoch
    torch.testing.assert_close(two["weights"], one["weights"], rtol=1e-5, atol=1e-9)
    uniform = torch.full_like(one["weights"], 1 / one["weights"].numel())
    assert float((one["weights"] - uniform).abs().max()) > 1e-3  # the weights moved


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


@pytest.mark.parametrize("name", LABEL_TRANSFER)
def test_label_transfer_on_two_processes_equals_one_process(
    two_process_runs: Path, one_process_runs: Path, name: str
) -> None:
    """MetaXT (finite-difference and exact meta-gradients) and XT: the networks and models of
    2 processes equal a 1-process run's over the same global batches."""
    two, one = two_process_runs / name, one_process_runs / name
    rank0, rank1, single = _load(two, 0), _load(two, 1), _load(one)
    # The ranks hold bitwise the same model and the same label transfer network ...
    for key, value in rank0["model"].items():
        assert torch.equal(value, rank1["model"][key]), key
    assert len(rank0["transfer"]) == len(single["transfer"]) > 0
    for a, b in zip(rank0["transfer"], rank1["transfer"], strict=True):
        assert torch.equal(a, b)
    # ... which equal the one-process run's. α moved (Adam at lr 3e-4: up to 3e-4 a step), far
    # beyond the tolerance, and by the same amount on both sides.
    _assert_close_models(rank0["model"], single["model"])
    network = {str(i): p for i, p in enumerate(rank0["transfer"])}
    _assert_close_models(network, {str(i): p for i, p in enumerate(single["transfer"])})
    start = {str(i): p for i, p in enumerate(single["transfer_at_start"])}
    moved = max(float((network[k] - start[k]).abs().max()) for k in network)
    assert moved > 1e-3, moved
    assert rank0["summary"]["steps"] == single["summary"]["steps"] > 0
    losses2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    losses1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    train2 = [r["loss"] for r in losses2 if r["kind"] == "train"]
    train1 = [r["loss"] for r in losses1 if r["kind"] == "train"]
    assert train2 == pytest.approx(train1, rel=1e-4)
    epochs = int(LABEL_TRANSFER[name][2].get("epochs", 2))  # type: ignore[call-overload]
    assert (two / "label_transfer.jsonl").read_text().count("\n") == epochs * 2  # 2 sources
    # What a step sends besides the trainer's gradient all-reduce: the lookahead's two
    # P_Θ-vectors (none for XT) and α's gradient.
    sizes, sent = rank0["sizes"], rank0["summary"]["distributed"]["bytes_per_step"]
    lookahead = 0 if name == "xt" else 2 * 4 * sizes["theta"]
    assert sent["statistics"] == lookahead
    assert sent["gradients"] >= 4 * sizes["transfer"] + 4 * sizes["theta"]


if __name__ == "__main__":
    driver(sys.argv[1:])
