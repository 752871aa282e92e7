"""`pyxtask bench`: every method's optimizer step against the plain summed-loss step.

All contenders run in one process on the same batches. Each is built in turn, warmed up, and
its peak memory measured over one step (CUDA: ``max_memory_allocated``; CPU: the process's
resident-set high-water mark, reset before the step, with glibc told to return large blocks
to the system so that freed memory shows); then the timed rounds run round-robin — one step
of every contender per round, the order rotated every round — so that load that comes and goes
on the machine falls on all of them alike. Times are medians (CUDA events on a GPU). The
table goes to stdout, progress to stderr, and everything to ``bench.json`` and ``bench.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor
from tqdm import tqdm

from pyxtask import checkpoint, ops
from pyxtask.bench import add_arguments
from pyxtask.config import TrainConfig
from pyxtask.gradients import TaskGradients
from pyxtask.methods import make_method, method_names
from pyxtask.methods.gram import GramMethod
from pyxtask.plots import plot_bench

from . import peers
from ._machine import machine_info
from .contenders import (
    Contender,
    method_contender,
    naive_contender,
    plain_contender,
    probe_contender,
    task_losses,
)
from .workload import Workload, build_model

__all__ = ["BenchOptionError", "contender_names", "machine_info", "run"]


class BenchOptionError(ValueError):
    """An option of `pyxtask bench` that cannot work (reported as one line)."""


#: Methods whose step statistics stream in backward hooks: also timed from the T x P buffer.
STREAMING = ("tawt-step", "gradnorm")


def contender_names(num_tasks: int = 4) -> list[str]:
    """Every row `pyxtask bench` can run, in table order."""
    names = ["plain", "naive"]
    for name in method_names():
        names.append(name)
        if name in STREAMING:
            names.append(f"{name}/buffer")
        if name == "mgda":
            names.append("mgda/bf16-buffer")
        if name == "famo":
            names.append("famo/next-step")
        if name == "metaxt":
            names.append("metaxt/exact")
    return [*names, "tawt-update", *peers.peer_names()]


_SPECIAL = {"plain": plain_contender, "naive": naive_contender, "tawt-update": probe_contender}


def build(work: Workload, name: str) -> Contender:
    """The contender ``name``; a failure to build is a row with the error."""
    try:
        if name in _SPECIAL:
            return _SPECIAL[name](work)
        if name.startswith("torchjd:"):
            weighting, variant = name.removeprefix("torchjd:").split("/")
            return peers.torchjd_contender(work, weighting, variant)
        if name.startswith("libmtl:"):
            return peers.libmtl_contender(work, name.removeprefix("libmtl:"))
        method, _, variant = name.partition("/")
        return method_contender(work, method, variant)
    except Exception as exc:
        return Contender(name, "all", error=_one_line(exc))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


# ---------------------------------------------------------------------------------------------
# Memory and time


class Memory:
    """Peak memory of one step above what was in use before the contender was built."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cpu":
            _return_freed_memory()

    def baseline(self) -> int:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        return _rss_bytes()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # "5": reset the peak resident set size to the current one (Linux >= 4.0).
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return _status_bytes("VmHWM")


def _return_freed_memory() -> None:
    """Fix glibc's mmap threshold at 128 KiB: tensors are then mapped and unmapped on their
    own, and the resident set follows the memory in use (the default threshold grows after
    every large free, and freed blocks then stay in the heap)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def _rss_bytes() -> int:
    return _status_bytes("VmRSS")


def _status_bytes(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Clock:
    """Wall time of one call: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def time(self, fn: Callable[[], object]) -> float:
        if self.device.type != "cuda":
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return float(begin.elapsed_time(end)) / 1e3


def prepare(work: Workload, names: list[str], warmup: int) -> list[Contender]:
    """Build every contender in turn, warm it up and measure its peak memory."""
    memory = Memory(work.device)
    # The first step in a process pays for thread pools, kernels' first use and allocator
    # arenas; a throwaway one keeps that out of the first contender's memory.
    primer = plain_contender(work)
    for _ in range(2):
        cast(Callable[[], object], primer.step)()
    del primer
    out = []
    for name in tqdm(
        names,
        desc="build + warm-up",
        file=sys.stderr,
        unit="contender",
        disable=not sys.stderr.isatty(),
    ):
        before = memory.baseline()
        c = build(work, name)
        if c.step is not None and c.error is None:
            try:
                for _ in range(warmup):
                    c.step()
                memory.reset_peak()
                c.step()
                c.peak_bytes = max(0, memory.peak() - before)
            except Exception as exc:
                c.error = _one_line(exc)
        out.append(c)
    return out


def run_rounds(contenders: list[Contender], clock: Clock, reps: int) -> None:
    live = [c for c in contenders if c.error is None and c.step is not None]
    bar = tqdm(
        range(reps),
        desc="timed rounds",
        file=sys.stderr,
        unit="round",
        disable=not sys.stderr.isatty(),
    )
    for r in bar:
        k = r % max(1, len(live))
        for c in live[k:] + live[:k]:
            if c.error is not None or c.step is None:
                continue
            try:
                c.samples.append(clock.time(c.step))
            except Exception as exc:
                c.error = _one_line(exc)


def bf16_buffer_effect(work: Workload) -> dict[str, dict[str, float]]:
    """What storing the T x P buffer in bf16 does to each Gram method's weights, on one step's
    real gradients: the largest weight change and the change of the combined direction
    relative to its norm, ``||J^T (w - w16)|| / ||J^T w||`` (from the fp32 Gram)."""
    model = build_model(work)
    grads = TaskGradients(list(model.shared_parameters()), work.num_tasks, mode="buffer")
    losses = task_losses(model, work)
    grads.backward(losses)
    G = cast(Tensor, grads.buffer)
    gram32, gram16 = ops.gram(G).double().cpu(), ops.gram(G.bfloat16()).double().cpu()
    values = torch.tensor([float(loss.detach()) for loss in losses], dtype=torch.float64)
    grads.close()
    out = {}
    for name in method_names():
        method = make_method(TrainConfig(method=name), 1.0)
        if not isinstance(method, GramMethod):
            continue
        w = method.weighting(gram32, values)
        fresh = make_method(TrainConfig(method=name), 1.0)  # stateful weightings start afresh
        w16 = cast(GramMethod, fresh).weighting(gram16, values)
        d = w - w16
        norm = float(w @ gram32 @ w) ** 0.5
        out[name] = {
            "max_abs_weight_change": float(d.abs().max()),
            "direction_change": float(max(float(d @ gram32 @ d), 0.0) ** 0.5 / norm)
            if norm
            else 0.0,
        }
    return out


# ---------------------------------------------------------------------------------------------
# Results


def summarize(c: Contender, plain: Contender, num_tasks: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": c.name,
        "kind": c.kind,
        "note": c.note,
        "compare_with": c.compare_with,
        "samples_s": c.samples,
        "peak_bytes": c.peak_bytes,
        "error": c.error,
    }
    if not c.samples:
        return row
    row["median_s"] = statistics.median(c.samples)
    if not plain.samples:
        return row
    # A stream method takes one task's batch per step: T of its steps see one plain step's data.
    scale = num_tasks if c.kind == "stream" else 1
    row["ratio"] = scale * row["median_s"] / statistics.median(plain.samples)
    paired = [scale * a / b for a, b in zip(c.samples, plain.samples, strict=False)]
    row["paired_ratio"] = statistics.median(paired)
    if c.peak_bytes is not None and plain.peak_bytes:
        row["memory_ratio"] = c.peak_bytes / plain.peak_bytes
    return row


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each peer row against the pyxtask method with the same weighting: peer / pyxtask."""
    by_name = {r["name"]: r for r in rows}
    out = []
    for r in rows:
        mine = by_name.get(r.get("compare_with") or "")
        if mine and mine.get("median_s") and r.get("median_s"):
            out.append(
                {"method": mine["name"], "peer": r["name"], "x": r["median_s"] / mine["median_s"]}
            )
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["contender", "ms/step", "x plain", "paired", "peak MB", "x mem", "what"]
    cells = [head]
    for r in rows:
        if r.get("median_s") is None:
            cells.append([r["name"], "n/a", "-", "-", "-", "-", r["error"] or ""])
            continue
        peak = r.get("peak_bytes")
        cells.append(
            [
                r["name"],
                f"{r['median_s'] * 1e3:.1f}",
                _ratio(r.get("ratio")),
                _ratio(r.get("paired_ratio")),
                "-" if peak is None else f"{peak / 2**20:.0f}",
                _ratio(r.get("memory_ratio")),
                r["note"],
            ]
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    for i, row in enumerate(cells):
        text = [
            c.rjust(w) if 0 < j < 6 else c.ljust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(text).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


# ---------------------------------------------------------------------------------------------
# Command line


def selected(args: argparse.Namespace) -> list[str]:
    """The contenders the options ask for, in table order; unknown names are an error."""
    every = contender_names(args.tasks)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = sorted(wanted - set(every))
        if unknown:
            raise BenchOptionError(
                f"--only: unknown contenders {unknown}; see `pyxtask bench --list`"
            )
        return [n for n in every if n == "plain" or n in wanted]
    if args.no_peers:
        return [n for n in every if ":" not in n]
    return every


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the options describe; 0 on success."""
    if args.list:
        print("\n".join(contender_names(args.tasks)))
        return 0
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise BenchOptionError(f"--device {args.device!r}: expected cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchOptionError(f"--device {args.device}: CUDA is not available on this machine")
    if not 1 <= args.tasks <= 64:
        raise BenchOptionError(f"--tasks must be between 1 and 64, got {args.tasks}")
    bf16 = (args.dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    if bf16 and device.type != "cuda":
        raise BenchOptionError("--dtype bf16: bf16 autocast is for GPUs; use fp32 on the CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = selected(args)
    # cvxpy (TorchJD's Nash-MTL) warns on every solve that its problem is not DPP.
    warnings.filterwarnings("ignore", message="You are solving a parameterized problem")
    work = Workload(args.encoder, args.tasks, args.batch, args.seq, device, bf16)
    print(
        f"pyxtask bench: {_describe(work)}; {len(names)} contenders, "
        f"{args.warmup} warm-up + {args.reps} timed rounds",
        file=sys.stderr,
    )
    start = time.perf_counter()
    contenders = prepare(work, names, args.warmup)
    run_rounds(contenders, Clock(device), args.reps)
    for c in contenders:
        c.close()
    rows = [summarize(c, contenders[0], args.tasks) for c in contenders]
    effect = bf16_buffer_effect(work)
    peer_speedups = speedups(rows)
    payload = {
        "machine": machine_info(device),
        "workload": work.describe(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "elapsed_s": time.perf_counter() - start,
        "results": rows,
        "peer_speedups": peer_speedups,
        "bf16_buffer_effect": effect,
    }
    print(
        f"\n== Step time and peak memory against the plain summed-loss step ({_describe(work)}; "
        f"median of {args.reps}; stream rows: T steps / plain)"
    )
    print_table(rows)
    for s in peer_speedups:
        print(f"  {s['peer']} / {s['method']}: {s['x']:.2f}x")
    print("\n== A bf16 T x P buffer against fp32, same step: weight change, direction change")
    for name, e in effect.items():
        print(
            f"  {name:<14} max |dw| {e['max_abs_weight_change']:.1e}   "
            f"||J^T dw|| / ||J^T w|| {e['direction_change']:.1e}"
        )
    write_results(payload, args.out)
    return 0


def write_results(payload: dict[str, Any], folder: Path) -> None:
    """``bench.json`` and ``bench.png`` in ``folder``, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text(folder / "bench.json", json.dumps(payload, indent=1, default=str) + "\n")
    png = plot_bench(folder / "bench.json")
    print(f"results: {folder / 'bench.json'}" + (f", {png}" if png else ""))


def _describe(work: Workload) -> str:
    return (
        f"{work.encoder} encoder, T={work.num_tasks}, {work.batch}x{work.seq} tokens per "
        f"task, {work.device}{' bf16' if work.bf16 else ''}, {torch.get_num_threads()} threads"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
