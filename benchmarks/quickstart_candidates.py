"""Which configuration should the README's first command train? Every method on the
quickstart's data (WSJ POS target, 200 sentences; Brown POS, universal POS and genre sources,
250 sentences each; the MiniLM encoder), picked by the target's *dev* accuracy, beside the
step-matched single-task run and normalized joint training.

    python benchmarks/quickstart_candidates.py [--only NAME ...] [--seeds 0 1]

Writes ``benchmarks/quickstart_candidates.json`` (every run's summary) and prints a table. On
2 CPU cores an all-tasks run of 128 steps takes about 4 minutes; the whole sweep about 40.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import transformers

from pyxtask.config import from_mapping
from pyxtask.tasks import load_tasks
from pyxtask.trainer import Trainer

HERE = Path(__file__).resolve().parent
QUICKSTART: dict[str, Any] = {
    "target": "wsj-pos.pos",
    "target_size": 200,
    "sources": ["brown.pos", "brown.upos", "brown.genre"],
    "source_size": 250,
}
#: All-tasks methods get 16 epochs of 8 steps (one pass over the largest task each): 128
#: optimizer steps, each with a batch of every task, so the target gets 128 steps as well.
ALL_TASKS = {"epochs": 16}
CANDIDATES: dict[str, dict[str, Any]] = {
    "tawt (paper protocol)": {"method": "tawt"},
    "tawt, sampling, target epochs": {
        "method": "tawt",
        "weights_as": "sampling",
        "epoch": "target",
        "epochs": 16,
    },
    "tawt-step": {"method": "tawt-step", **ALL_TASKS},
    # The paper's eta per update rather than per epoch: omega follows the cosines within steps.
    "tawt-step, eta 8": {"method": "tawt-step", "tawt": {"lr": 8.0}, **ALL_TASKS},
    "equal": {"method": "equal", **ALL_TASKS},
    "mgda": {"method": "mgda", **ALL_TASKS},
    "mgda l2": {"method": "mgda", "mgda": {"normalization": "l2"}, **ALL_TASKS},
    "gradnorm": {"method": "gradnorm", **ALL_TASKS},
    "uncertainty": {"method": "uncertainty", **ALL_TASKS},
    "metaweighting": {"method": "metaweighting", **ALL_TASKS},
    "normalized-joint (stream)": {"method": "fixed"},
    "single-steps 128": {"paradigm": "single", "method": "fixed", "total_steps": 128},
    "single-steps 160": {"paradigm": "single", "method": "fixed", "total_steps": 160},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="candidates to run, in this order (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=HERE / "quickstart_candidates.json")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    root = Path(tempfile.mkdtemp(prefix="pyxtask-candidates-"))
    tasks = None
    for seed in args.seeds:
        for name in args.only or CANDIDATES:
            changes = CANDIDATES[name]
            config = from_mapping({**QUICKSTART, **changes, "seed": seed})
            if tasks is None or seed != tasks[0]:  # every task, whatever the first run needs
                tasks = (seed, load_tasks(from_mapping({**QUICKSTART, "seed": seed})))
            started = time.perf_counter()
            run = root / f"{name.replace(' ', '_').replace(',', '')}-{seed}"
            summary = Trainer(config, run, progress=False, tasks=tasks[1]).fit()
            summary["wall_s"] = round(time.perf_counter() - started, 1)
            key = f"{name} | seed {seed}"
            results[key] = {k: summary[k] for k in (
                "method", "dev", "test", "steps", "target_examples_seen", "omega", "wall_s"
            )}  # fmt: skip
            args.out.write_text(json.dumps(results, indent=1) + "\n")
            print(
                f"{key:<40} dev {100 * summary['dev']:6.2f}  test {100 * summary['test']:6.2f}"
                f"  steps {summary['steps']:4d}  {summary['wall_s']:7.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
