"""Experiments: a run, the baselines beside it, and TAWT's pre-training sweep over c."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyxtask import checkpoint
from pyxtask.config import COMPARISONS, STREAM_METHODS, ConfigError, TrainConfig
from pyxtask.distributed import torchrun_environment
from pyxtask.tasks import TaskData, load_tasks
from pyxtask.trainer import Trainer

__all__ = ["RunResult", "run_experiment", "run_single"]

_SUMMARY = "summary.json"


@dataclass
class RunResult:
    """The main run's summary and those of the baselines run beside it."""

    main: dict[str, Any]
    baselines: dict[str, dict[str, Any]]
    #: What a training example is (``TrainConfig.examples``): sentences or words.
    examples: str = "sentences"

    def table(self) -> str:
        """The runs side by side, ending with the main run's test gain over each baseline."""
        rows = [self.main, *self.baselines.values()]
        metric = self.main["metric"]
        width = max(24, *(len(row["method"]) for row in rows))
        lines = [f"target {self.main['target']}, {metric} in %:"]
        for row in rows:
            lines.append(
                f"  {row['method']:<{width}} dev {100 * row['dev']:6.2f}"
                f"  test {100 * row['test']:6.2f}"
                f"  ({row['steps']} steps, {row['target_examples_seen']} target examples seen, "
                f"{row['train_examples'][row['target']]} target {self.examples})"
            )
        if self.baselines:
            gains = ", ".join(
                f"{100 * (self.main['test'] - row['test']):+.2f} vs {row['method']}"
                for row in self.baselines.values()
            )
            lines.append(f"{self.main['method']} test {metric}: {gains} points")
            # Which runs the main run beat on the split that picks configurations.
            beaten = [r["method"] for r in self.baselines.values() if self.main["dev"] > r["dev"]]
            above = [r["method"] for r in self.baselines.values() if self.main["dev"] <= r["dev"]]
            verdict = f"on dev, {self.main['method']} beat " + (", ".join(beaten) or "none")
            if above:
                verdict += f"; it did not beat {', '.join(above)}"
            lines.append(verdict)
        return "\n".join(lines)


def _baseline_config(config: TrainConfig, name: str, steps: int) -> TrainConfig:
    """The configuration of the ``compare`` entry ``name``: a fixed baseline or a method."""
    if name == "single":
        return config.replace(paradigm="single", method="fixed", compare=[])
    if name == "single-steps":
        return config.replace(paradigm="single", method="fixed", total_steps=steps, compare=[])
    if name in COMPARISONS:
        return config.replace(
            paradigm=name,
            method="fixed",
            compare=[],
            epoch=config.epoch if name != "pretrain" else "stream",
        )
    joint = config.paradigm in ("joint", "normalized-joint")
    all_tasks = name not in STREAM_METHODS
    return config.replace(
        method=name,
        compare=[],
        paradigm=config.paradigm if joint or not all_tasks else "normalized-joint",
        weights_as="loss" if all_tasks else config.weights_as,
    )


def run_single(
    config: TrainConfig,
    run_dir: Path,
    *,
    resume: bool,
    progress: bool,
    tasks: list[TaskData],
    keep_checkpoint: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """One configuration; the pre-training sweep over c keeps the best on the target dev set."""
    cs = config.c_values() if config.method == "tawt" else [1.0]
    if len(cs) == 1:
        return Trainer(
            config,
            run_dir,
            c=cs[0],
            progress=progress,
            tasks=tasks,
            keep_checkpoint=keep_checkpoint,
        ).fit(resume)
    results = []
    for c in cs:
        log(f"{config.label}: c = {c:g}")
        sub = Trainer(
            config,
            run_dir / f"c={c:g}",
            c=c,
            progress=progress,
            tasks=tasks,
            keep_checkpoint=keep_checkpoint,
        )
        results.append(sub.fit(resume))
    best = max(results, key=lambda r: r["dev"])
    summary = dict(
        best, sweep={f"{r['c']:g}": {"dev": r["dev"], "test": r["test"]} for r in results}
    )
    if _writes_files():
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text(run_dir / _SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def _writes_files() -> bool:
    """Under torchrun only rank 0 writes a run's files."""
    env = torchrun_environment()
    return env is None or env["rank"] == 0


def _holds_run(folder: Path) -> bool:
    """Whether a run was started in ``folder``: its own, or the pre-training sweep's (c=*/)."""
    return (folder / "config.json").is_file() or any(folder.glob("c=*/config.json"))


def run_experiment(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> RunResult:
    """The main run in ``config.output``, each ``compare`` baseline in ``output/compare/NAME``.

    ``resume`` continues the run that ``config.output`` holds (a :class:`ConfigError` if it
    holds none); the folder may have been moved or copied since.
    """
    config.validate()
    out = Path(config.output)
    if resume and not _holds_run(out):
        raise ConfigError(
            f"--resume: {os.fspath(out)} holds no run (no checkpoint); drop --resume to start "
            "a new run"
        )
    tasks = load_tasks(config)
    target = f"{config.target} ({len(tasks[0].train)} {config.examples})"
    sources = ", ".join(f"{t.name} ({len(t.train)})" for t in tasks[1:]) or "none"
    log(f"{config.label}: target {target}, sources {sources}")
    main = run_single(config, out, resume=resume, progress=progress, tasks=tasks, log=log)
    baselines: dict[str, dict[str, Any]] = {}
    for name in config.compare:
        sub = _baseline_config(config, name, int(main["steps"]))
        log(f"baseline {sub.label}")
        baselines[name] = run_single(
            sub, out / "compare" / name, resume=resume, progress=progress, tasks=tasks, log=log
        )
    result = RunResult(main, baselines, config.examples)
    if _writes_files():
        checkpoint.write_text(out / "comparison.txt", result.table() + "\n")
    return result
