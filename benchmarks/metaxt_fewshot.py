"""MetaXT on few-shot Penn tagging: k WSJ sentences with Brown POS as the source.

For each k, four runs with the same encoder, step budget, batch size and learning rate:
target-only (step-matched), multi-task (``equal``: both losses every step), XT and MetaXT
(finite-difference meta-gradient). Test accuracy of the best dev epoch, the real
label-transfer map of the MetaXT run, and the meta-step's cost against a plain step on the
same batches (``pyxtask bench``: plain, equal, xt, metaxt, metaxt/exact) are written to
``--out`` as ``results.json`` and ``results.md``. One seed: a first look, not a significance
test.

    .venv/bin/python benchmarks/metaxt_fewshot.py                  # MiniLM, k = 20, 50, 100
    .venv/bin/python benchmarks/metaxt_fewshot.py --encoder tiny --k 20 --steps 20 --quick

Not part of CI: with MiniLM on two CPU cores it takes about an hour.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

RUNS = {  # label -> (paradigm, method)
    "target-only": ("single", "fixed"),
    "multi-task": ("normalized-joint", "equal"),
    "xt": ("normalized-joint", "xt"),
    "metaxt": ("normalized-joint", "metaxt"),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--k", default="20,50,100", help="target training sentences, comma-separated")
    p.add_argument("--source-size", type=int, default=2000)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--epochs", type=int, default=1, help="dev evaluations per run")
    p.add_argument("--batch", type=int, default=10, help="the paper's batch size")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=",".join(RUNS), help="which of " + ",".join(RUNS))
    p.add_argument("--out", default="benchmarks/results/metaxt-fewshot")
    p.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    p.add_argument("--no-cost", action="store_true", help="skip the step-cost measurement")
    p.add_argument(
        "--metaxt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [metaxt] setting for the xt and metaxt runs (repeatable), e.g. lr=1e-4",
    )
    return p.parse_args()


def config_for(args: argparse.Namespace, k: int, label: str):
    from pyxtask.config import MetaXTConfig, TrainConfig

    paradigm, method = RUNS[label]
    metaxt = MetaXTConfig(**{key: _value(text) for key, text in args.metaxt_items})
    # An epoch of the all-task methods is one pass over the source; the source size fixes
    # the steps per epoch, so the step budget is the same for every method.
    source_size = args.steps * args.batch // args.epochs
    return TrainConfig(
        target="wsj-pos.pos",
        target_size=k,
        sources=["brown.pos"],
        source_size=min(args.source_size, source_size),
        paradigm=paradigm,
        method=method,
        encoder=args.encoder,
        epochs=args.epochs,
        total_steps=args.steps if paradigm == "single" else None,
        batch_size=args.batch,
        lr=args.lr,
        seed=args.seed,
        metaxt=metaxt,
    )


def _value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def train(args: argparse.Namespace, out: Path, k: int, label: str) -> dict:
    from pyxtask.trainer import Trainer

    run_dir = out / "runs" / f"k{k}-{label}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    summary = Trainer(config_for(args, k, label), run_dir, progress=sys.stderr.isatty()).fit()
    return {
        "k": k,
        "run": label,
        "dev": summary["dev"],
        "test": summary["test"],
        "steps": summary["steps"],
        "seconds": round(time.perf_counter() - started, 1),
        "run_dir": str(run_dir),
    }


def step_cost(args: argparse.Namespace, out: Path) -> str:
    """`pyxtask bench` on a two-task workload of this encoder (its table, as printed)."""
    bench = "plain,equal,xt,metaxt,metaxt/exact"
    reps = ["--reps", "3", "--warmup", "1"] if args.quick else ["--reps", "7", "--warmup", "2"]
    cmd = [sys.executable, "-m", "pyxtask.cli", "bench", "--encoder", args.encoder]
    cmd += ["--tasks", "2", "--batch", str(args.batch), "--seq", "40", "--only", bench]
    cmd += ["--no-peers", "--out", str(out / "cost"), *reps]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return done.stdout


def table(rows: list[dict], ks: list[int], labels: list[str]) -> str:
    head = "| k | " + " | ".join(labels) + " |"
    lines = [head, "|" + "---|" * (len(labels) + 1)]
    for k in ks:
        cells = []
        for label in labels:
            found = [r for r in rows if r["k"] == k and r["run"] == label]
            cells.append(f"{100 * found[0]['test']:.1f}" if found else "")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.k.split(",")]
    args.metaxt_items = [item.split("=", 1) for item in args.metaxt]
    if any(len(item) != 2 for item in args.metaxt_items):
        raise SystemExit(f"--metaxt: expected KEY=VALUE, got {args.metaxt}")
    labels = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(labels) - set(RUNS))
    if unknown:
        raise SystemExit(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
    # Runs not repeated now are kept from an earlier invocation (a resumed experiment).
    earlier = (
        json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    )
    cost = earlier.get("cost", "") if args.no_cost else step_cost(args, out)
    if cost:
        print(cost)
    rows: list[dict] = earlier.get("rows", [])
    for k in ks:
        for label in labels:
            row = train(args, out, k, label)
            rows = [r for r in rows if (r["k"], r["run"]) != (k, label)] + [row]
            dev, test = 100 * row["dev"], 100 * row["test"]
            print(f"k={k:<4} {label:<12} dev {dev:5.1f}%  test {test:5.1f}%  "
                  f"({row['steps']} steps, {row['seconds']:.0f} s)", flush=True)  # fmt: skip
            (out / "results.json").write_text(
                json.dumps({"args": vars(args), "rows": rows, "cost": cost}, indent=2) + "\n"
            )
    for k in ks:  # the real label-transfer maps, kept beside the results
        run = out / "runs" / f"k{k}-metaxt"
        for name in ("label_transfer.csv", "label_transfer.png", "label_transfer_epochs.png"):
            if (run / name).exists():
                shutil.copy(run / name, out / f"k{k}-{name}")
    md = [
        "# MetaXT few-shot: wsj-pos.pos (k sentences) with brown.pos as the source",
        "",
        f"Encoder {args.encoder}; {args.steps} optimizer steps per run, batch {args.batch}, "
        f"lr {args.lr}, source {min(args.source_size, args.steps * args.batch // args.epochs)} "
        f"sentences, {args.epochs} dev evaluations, seed {args.seed} (one seed). Test accuracy "
        "(%) of the best dev epoch:",
        "",
        table(rows, sorted({r["k"] for r in rows}), list(RUNS)),
        "",
        "Command: `" + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) + "`",
        "",
        "## Step cost (pyxtask bench, two tasks)",
        "",
        "```",
        cost.strip(),
        "```",
        "",
    ]
    (out / "results.md").write_text("\n".join(md))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
