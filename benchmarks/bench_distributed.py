"""Training on 2 torchrun processes (CPU, gloo) against 1 process: step time, bytes sent, and
how far the cheap statistics are from the exact ones.

``python benchmarks/bench_distributed.py [--encoder tiny|minilm] [--methods a,b] [--timed a,b]``
trains every method of ``--methods`` (each statistics mode) in one ``torchrun
--nproc-per-node 2`` launch for the bytes, and those of ``--timed`` on 1 process (1 thread;
all cores) and on 2 processes for the step times — the whole ``Trainer``: sampling, the
method's step, the gradient all-reduce, clipping, AdamW — on synthetic tagging tasks (T = 3: a
target, a source with the target's rule, a source with random tags; 16 sentences of 5-12
words per batch and task). It reports, per method:

- the median time of an optimizer step (``Trainer._step``: the method's step, the all-reduce,
  clipping, the optimizer) after 2 warm-up steps, on 1 process with 1 thread and with all the
  machine's cores, and on 2 processes with cores / 2 threads each; a method in DDP
  (``Method.data_parallel``: its gradient summed while the backward runs) is timed on 2
  processes a second time with DDP off (``method:exact:after-step``: one all-reduce after the
  backward), which is what the overlap buys;
- the bytes one process sent per step, counted by wrapping every collective pyxtask issues
  (``Distributed.sent``), by kind, and beyond DDP's own all-reduce (every trainable
  parameter once, 4 bytes each);
- for the statistics: at the same parameters and batches, the cheap mode's cosines to the
  target (TAWT) and MGDA weights against the exact mode's (max absolute difference).

Results: ``benchmarks/results/distributed/<encoder>.json`` and ``.md``. Run heavy timings
under ``flock /tmp/pyxtask-heavy.lock``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

RESULTS = Path(__file__).resolve().parent / "results" / "distributed"
ROOT = Path(__file__).resolve().parents[1]
STAT_METHODS = ("tawt", "tawt-step", "mgda", "upgrad", "metaweighting", "gradnorm")
DEFAULT_METHODS = ("equal", "tawt", "tawt-step", "mgda", "upgrad", "metaweighting", "gradnorm",
                   "uncertainty", "metaxt", "xt")  # fmt: skip


def _tasks(n_target: int, n_source: int) -> list[Any]:
    from pyxtask.data import LabelMap, TaggedSentence
    from pyxtask.tasks import TaskData

    rng = random.Random(0)
    rule = {f"w{i}": rng.randrange(4) for i in range(200)}

    def task(name: str, labels: list[str], n: int, shuffled: bool = False) -> TaskData:
        def sentences(k: int, split: str) -> list[TaggedSentence]:
            out = []
            for i in range(k):
                words = tuple(f"w{rng.randrange(200)}" for _ in range(rng.randint(5, 12)))
                tags = tuple(rng.choice(labels) if shuffled else labels[rule[w]] for w in words)
                out.append(TaggedSentence(words, tags, f"{name}:{split}:{i}"))
            return out

        label_map = LabelMap(labels, name=name.replace(".", "__"), kind="token")
        dev = 32 if name.endswith("target") else 0
        return TaskData(name, "token", label_map, sentences(n, "train"),
                        sentences(dev, "dev"), sentences(dev, "test"))  # fmt: skip

    return [
        task("syn.target", ["t0", "t1", "t2", "t3"], n_target),
        task("syn.helpful", ["a0", "a1", "a2", "a3"], n_source),
        task("syn.noise", ["b0", "b1", "b2", "b3"], n_source, shuffled=True),
    ]


def _config(args: argparse.Namespace, method: str, statistics_mode: str, out: Path) -> Any:
    from pyxtask.config import DistributedConfig, TAWTConfig, TrainConfig

    return TrainConfig(
        target="syn.target", sources=["syn.helpful", "syn.noise"], encoder=args.encoder,
        method=method, paradigm="normalized-joint", epochs=1, batch_size=16, lr=2e-4,
        max_length=48, device="cpu", bf16=False, checkpoint_every=10**6, output=os.fspath(out),
        tawt=TAWTConfig(probe_size=16, update_every=4),
        distributed=DistributedConfig(statistics=statistics_mode, timeout=300.0),
    )  # fmt: skip


# -- inside the processes ---------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """Every ``method:mode`` of ``--runs`` in turn, in one process group (one start-up)."""
    import torch
    import transformers

    from pyxtask.distributed import torchrun_environment
    from pyxtask.trainer import Trainer

    transformers.utils.logging.disable_progress_bar()
    times: list[float] = []
    step = Trainer._step

    def timed(self: Trainer, *a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        result = step(self, *a, **k)
        times.append(time.perf_counter() - start)
        return result

    Trainer._step = timed  # type: ignore[method-assign]
    Trainer._plot_epoch = lambda self: None  # type: ignore[method-assign]
    in_ddp = Trainer._data_parallel
    env = torchrun_environment()
    records = []
    for run in args.runs.split(","):
        method, mode, *after_step = run.split(":")
        out = Path(args.out) / run.replace(":", "-")
        times.clear()
        Trainer._data_parallel = (  # type: ignore[method-assign]
            (lambda self, wanted: in_ddp(self, False)) if after_step else in_ddp
        )
        # "all"-task methods: one pass over the target; stream methods: every task's batches.
        tasks = _tasks(16 * args.steps, 16 * args.steps)
        trainer = Trainer(_config(args, method, mode, out), out, progress=False, tasks=tasks)
        summary = trainer.fit()
        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        own = list(trainer.method.parameters())
        record = {
            "method": method,
            "statistics": mode,
            "summed": (
                "in the backward (DDP)"
                if trainer.method.data_parallel and not after_step and env is not None
                else "after the step"
            ),
            "processes": 1 if env is None else env["world_size"],
            "threads": torch.get_num_threads(),
            "steps": summary["steps"],
            "step_s": statistics.median(times[2:] or times),
            "ddp_bytes_per_step": sum(p.numel() * p.element_size() for p in trainable + own),
            "parameters": sum(p.numel() for p in trainable),
            "distributed": summary.get("distributed"),
            "w": summary["w"],
        }
        if env is not None and method in STAT_METHODS and mode == "cheap":
            record["cheap_vs_exact"] = _statistics_deviation(trainer)
        records.append(record)
    if env is None or env["rank"] == 0:
        Path(args.record).write_text(json.dumps(records, indent=1))


def _statistics_deviation(trainer: Any) -> dict[str, float]:
    """At the trained parameters, on 4 global batches: the cheap cosines to the target and MGDA
    weights against the exact ones (max absolute difference)."""
    import torch

    from pyxtask.gradients import TaskGradients
    from pyxtask.weighting import MGDA

    ctx, dist = trainer.ctx, trainer.dist
    exact = dataclasses.replace(dist, statistics="exact")
    cheap = dataclasses.replace(dist, statistics="cheap")
    shared, T = ctx.shared_parameters(), ctx.num_tasks
    sizes = ctx.sizes
    cos_dev = mgda_dev = norm_dev = 0.0
    for k in range(4):
        g = torch.Generator().manual_seed(k)
        batch = [(t, torch.randperm(sizes[t], generator=g)[:16].tolist()) for t in range(T)]
        found = {}
        for name, reducer, mode in (("exact", exact, "buffer"), ("cheap", cheap, "buffer"),
                                    ("stream", cheap, "streaming")):  # fmt: skip
            trainer.model.zero_grad(set_to_none=True)
            with TaskGradients(shared, T, mode=mode, reducer=reducer) as grads:
                stats = grads.backward(ctx.step_losses(batch), [1.0] * T)
            found[name] = stats
        trainer.model.zero_grad(set_to_none=True)
        e, c, s = found["exact"], found["cheap"], found["stream"]
        cos_dev = max(cos_dev, float((s.reference_cosines() - e.reference_cosines()).abs().max()))
        norm_dev = max(norm_dev, float((s.sq_norms.sqrt() / e.sq_norms.sqrt() - 1).abs().max()))
        we, wc = MGDA()(e.gram), MGDA()(c.gram)
        mgda_dev = max(mgda_dev, float((we - wc).abs().max()))
    return {"tawt_cosine": cos_dev, "norm_relative": norm_dev, "mgda_weight": mgda_dev}


# -- the parent ---------------------------------------------------------------------------------


def _launch(  # noqa: PLR0917
    args: argparse.Namespace, runs: list[str], nproc: int, threads: int, tmp: Path, steps: int
) -> list[dict[str, Any]]:
    name = f"{nproc}-{threads}-{steps}"
    record = tmp / f"{name}.json"
    worker_args = ["--worker", "--runs", ",".join(runs), "--out", os.fspath(tmp / name),
                   "--record", os.fspath(record), "--encoder", args.encoder,
                   "--steps", str(steps)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.fspath(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    env["OMP_NUM_THREADS"] = str(threads)
    if nproc == 1:
        command = [sys.executable, __file__, *worker_args]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        command = [os.fspath(torchrun), "--nproc-per-node", str(nproc), "--standalone",
                   __file__, *worker_args]  # fmt: skip
    done = subprocess.run(command, check=False, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stdout[-2000:] + done.stderr[-3000:]
        raise SystemExit(f"{name}: failed\n{tail}")
    return cast(list[dict[str, Any]], json.loads(record.read_text()))


def _bytes_table(records: list[dict[str, Any]], encoder: str) -> str:
    lines = [
        f"encoder {encoder}: bytes one of 2 processes sent per optimizer step (counted at "
        "every collective pyxtask issues); DDP's own = every trainable parameter once",
        "",
        "| method | statistics | gradients summed | gradients | statistics | losses | total | "
        "DDP's own | beyond DDP's own | cheap vs exact (same parameters and batches) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        sent = r["distributed"]["bytes_per_step"]
        total = sent["gradients"] + sent["statistics"] + sent["losses"]
        ddp = r["ddp_bytes_per_step"]
        dev = r.get("cheap_vs_exact")
        deviation = (
            f"cos to target {dev['tawt_cosine']:.1e}, norms {100 * dev['norm_relative']:.0f} %, "
            f"MGDA w {dev['mgda_weight']:.1e}" if dev else ""
        )  # fmt: skip
        lines.append(
            f"| {r['method']} | {r['statistics']} | {r['summed']} | {_mb(sent['gradients'])} | "
            f"{_mb(sent['statistics'])} | {sent['losses']:.0f} B | {_mb(total)} | {_mb(ddp)} | "
            f"{(total - ddp) / 1e6:+.3f} MB ({total / ddp:.2f}x) | {deviation} |"
        )
    return "\n".join(lines) + "\n"


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB"


def _time_table(
    one: list[dict[str, Any]],
    cores: list[dict[str, Any]],
    two: list[dict[str, Any]],
    encoder: str,
) -> str:
    lines = [
        f"encoder {encoder}: median optimizer step (Trainer._step), after 2 warm-up steps",
        "",
        "| method | statistics | gradients summed | 1 process, 1 thread | 1 process, all cores "
        "| 2 processes, 1 thread each | 1 thread / 2 processes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    alone = {(r["method"], r["statistics"]): (r, c) for r, c in zip(one, cores, strict=True)}
    for r in two:
        single, every = alone[r["method"], r["statistics"]]
        lines.append(
            f"| {r['method']} | {r['statistics']} | {r['summed']} | {single['step_s']:.3f} s | "
            f"{every['step_s']:.3f} s | {r['step_s']:.3f} s | "
            f"{single['step_s'] / r['step_s']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _in_ddp(args: argparse.Namespace, method: str, tmp: Path) -> bool:
    """Whether the trainer puts ``method`` in DDP (``Method.data_parallel``)."""
    from pyxtask.methods import make_method

    return bool(make_method(_config(args, method, "exact", tmp), 1.0).data_parallel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="tiny")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="bytes for these")
    parser.add_argument("--timed", default="equal,tawt-step,mgda", help="step times for these")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--runs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1

    def runs(methods: str) -> list[str]:
        out = []
        for m in methods.split(","):
            out += [f"{m}:exact", f"{m}:cheap"] if m in STAT_METHODS else [f"{m}:exact"]
        return [r for r in out if r]

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        result: dict[str, Any] = {"encoder": args.encoder, "cores": cores}
        text = ""
        if args.methods:
            sent = _launch(args, runs(args.methods), 2, max(1, cores // 2), tmp, steps=3)
            result["bytes"] = sent
            text += _bytes_table(sent, args.encoder) + "\n"
        if args.timed:
            timed = runs(args.timed)
            one = _launch(args, timed, 1, 1, tmp, args.steps)
            every = _launch(args, timed, 1, cores, tmp, args.steps)
            in_ddp = [m for m in args.timed.split(",") if _in_ddp(args, m, tmp)]
            ddp_off = [f"{m}:exact:after-step" for m in in_ddp]
            two = _launch(args, timed + ddp_off, 2, max(1, cores // 2), tmp, args.steps)
            result["times"] = {"one": one, "cores": every, "two": two}
            text += _time_table(one, every, two, args.encoder)
    (RESULTS / f"{args.encoder}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{args.encoder}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
