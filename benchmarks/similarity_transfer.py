"""Measured transfer gains of source -> target pairs, and which similarity score predicts them.

For every pair, short step-matched runs with the same encoder, step budget, batch size,
learning rate and seeds:

- target alone: ``single`` paradigm, ``total_steps`` optimizer steps on the target's sample;
- target + source: ``normalized-joint`` with the ``equal`` method (every step takes one
  target batch and one source batch, each task's mean loss counting once), one epoch over
  the source's ``steps * batch`` sentences, so the same number of optimizer steps and of
  target batches as the run alone.

The gain of a pair is mean test metric (joint) - mean test metric (alone) over the seeds.
Every run's result is a JSON file under ``--out``/runs; a run already there is not repeated
(the experiment resumes). ``runs.csv`` and ``gains.csv`` collect them.

``--analyse`` then computes every score of :mod:`pyxtask.similarity` for the same pairs (the
CLI's default sizes), and writes each score's Spearman correlation with the gain, with a
bootstrap interval over pairs, as ``correlations.md``/``.json`` and ``scatter.png``.

    .venv/bin/python benchmarks/similarity_transfer.py                # the runs
    .venv/bin/python benchmarks/similarity_transfer.py --analyse      # scores, correlations
    .venv/bin/python benchmarks/similarity_transfer.py --encoder tiny --steps 4 --seeds 0 \\
        --out /tmp/st --analyse                                        # a smoke run

Not part of CI. A run takes 1-2 minutes of CPU with MiniLM on two cores (3-6 minutes of wall
time on a machine shared with other jobs); the defaults, 8 pairs x 3 seeds + 3 targets
alone x 3 seeds, are about 1.5 hours of CPU. Seeds run one after another over all pairs, so
an experiment stopped early holds every pair at fewer seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

#: target -> sources. English only (MiniLM is an English uncased encoder); sources of other
#: inputs (other corpora) and other labels (tags, genres, sentiment, silver NER and chunks).
PAIRS: dict[str, list[str]] = {
    "wsj-pos.pos": [
        "brown.pos",
        "brown.upos",
        "brown.genre",
        "polarity.polarity",
        "brown-silver.ner",
    ],
    "polarity.polarity": ["tweets.sentiment", "brown.genre"],
    "tweets.sentiment": ["polarity.polarity"],
}
#: Target dev / test sentences (the same seeded sample in every run of a target).
EVAL_SIZES = {"wsj-pos.pos": (None, None)}
DEFAULT_EVAL = (100, 400)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--target-size", type=int, default=200)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=64, help="sub-words per window")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--targets", default=",".join(PAIRS), help="a subset of the targets")
    p.add_argument("--limit", type=int, default=None, help="at most this many new runs")
    p.add_argument("--out", default="benchmarks/results/similarity-transfer")
    p.add_argument("--analyse", action="store_true", help="scores and correlations only")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    return p.parse_args()


def config_for(args: argparse.Namespace, target: str, source: str | None, seed: int):
    from pyxtask.config import TrainConfig

    dev, test = EVAL_SIZES.get(target, DEFAULT_EVAL)
    common = dict(
        target=target,
        target_size=args.target_size,
        dev_size=dev,
        test_size=test,
        encoder=args.encoder,
        epochs=1,
        batch_size=args.batch,
        lr=args.lr,
        max_length=args.max_length,
        seed=seed,
        checkpoint_every=10_000,
    )
    if source is None:
        return TrainConfig(
            **common, sources=[], paradigm="single", method="fixed", total_steps=args.steps
        )
    # One epoch of the all-task step is one pass over the larger task: the source.
    return TrainConfig(
        **common,
        sources=[source],
        source_size=args.steps * args.batch,
        paradigm="normalized-joint",
        method="equal",
    )


def run_name(target: str, source: str | None, seed: int) -> str:
    return f"{target}__{source or 'alone'}__s{seed}"


def train(args: argparse.Namespace, out: Path, target: str, source: str | None, seed: int):
    """One run's result (read back if it finished earlier), or ``None`` if it fails."""
    from pyxtask.trainer import Trainer

    name = run_name(target, source, seed)
    result_file = out / "runs" / f"{name}.json"
    if result_file.exists():
        return json.loads(result_file.read_text()), False
    run_dir = out / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    try:
        summary = Trainer(config_for(args, target, source, seed), run_dir, progress=False).fit()
    except Exception as exc:
        print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
        return None, False
    row = {
        "target": target,
        "source": source or "",
        "seed": seed,
        "metric": summary["metric"],
        "dev": summary["dev"],
        "test": summary["test"],
        "steps": summary["steps"],
        "seconds": round(time.perf_counter() - started, 1),
        "encoder": args.encoder,
    }
    from pyxtask import checkpoint

    checkpoint.write_text(result_file, json.dumps(row, indent=2) + "\n")
    shutil.rmtree(run_dir)  # the model is not needed: the result is
    return row, True


def run_all(args: argparse.Namespace, out: Path) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    # Runs of the silver corpus last: it may still be in preparation when the script starts.
    plan = [(t, None) for t in targets] + [(t, s) for t in targets for s in PAIRS[t]]
    plan.sort(key=lambda p: p[1] is not None and p[1].startswith("brown-silver"))
    new = 0
    # Seed-major: stopped early, the experiment still holds every pair at fewer seeds.
    for seed, (target, source) in [(s, p) for s in seeds for p in plan]:
        if args.limit is not None and new >= args.limit:
            break
        row, fresh = train(args, out, target, source, seed)
        if row is not None and fresh:
            new += 1
            print(
                f"{run_name(target, source, seed):<55} test {100 * row['test']:5.1f}  "
                f"({row['steps']} steps, {row['seconds']:.0f} s)",
                flush=True,
            )
    collect(out)


def collect(out: Path) -> list[dict[str, Any]]:
    """``runs.csv`` (every run) and ``gains.csv`` (one row per pair with every seed done)."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    if not rows:
        return []
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    gains = []
    for target in sorted({r["target"] for r in rows}):
        alone = {r["seed"]: r["test"] for r in rows if r["target"] == target and not r["source"]}
        for source in sorted({r["source"] for r in rows if r["target"] == target} - {""}):
            joint = {
                r["seed"]: r["test"]
                for r in rows
                if r["target"] == target and r["source"] == source
            }
            seeds = sorted(set(alone) & set(joint))
            if not seeds:
                continue
            per_seed = [joint[s] - alone[s] for s in seeds]
            gains.append(
                {
                    "target": target,
                    "source": source,
                    "seeds": len(seeds),
                    "alone": mean(alone[s] for s in seeds),
                    "joint": mean(joint[s] for s in seeds),
                    "gain": mean(per_seed),
                    "gain_min": min(per_seed),
                    "gain_max": max(per_seed),
                }
            )
    with open(out / "gains.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(gains[0]) if gains else ["target"])
        writer.writeheader()
        writer.writerows(gains)
    return gains


def main() -> None:
    args = parse()
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if args.analyse:
        analyse(args, out)
    else:
        run_all(args, out)


def analyse(args: argparse.Namespace, out: Path) -> None:
    """Every score for the measured pairs, its Spearman correlation with the gain (bootstrap
    over pairs), ``scores.csv``, ``correlations.md``/``.json`` and ``scatter.png``."""
    from pyxtask.data import corpora
    from pyxtask.similarity import SCORES, compute, write_outputs

    gains = collect(out)
    if not gains:
        raise SystemExit(f"--analyse: no finished pairs under {out / 'runs'}")
    rows = []
    for target in sorted({g["target"] for g in gains}):
        sources = [g["source"] for g in gains if g["target"] == target]
        result = compute(  # the command line's default sizes and cache
            target,
            sources,
            encoder=args.encoder,
            cache=corpora.cache_dir() / "similarity",
            progress=sys.stderr.isatty(),
        )
        write_outputs(result, out / "scores" / target)
        print(result.table(), f"\n({result.seconds:.0f} s)\n", flush=True)
        per_source = result.source_scores()
        for g in gains:
            if g["target"] == target:
                rows.append({**g, **per_source[g["source"]]})
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = correlations(rows, list(SCORES), args.resamples)
    from pyxtask import checkpoint

    checkpoint.write_text(out / "correlations.json", json.dumps(report, indent=2) + "\n")
    checkpoint.write_text(out / "correlations.md", correlation_table(report, rows) + "\n")
    scatter(rows, list(SCORES), report, out / "scatter.png")
    print((out / "correlations.md").read_text())


def _spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _centred(rows: list[dict], key: str) -> list[float]:
    """``key`` minus its mean over the pairs of the same target."""
    means = {t: mean(r[key] for r in rows if r["target"] == t) for t in {r["target"] for r in rows}}
    return [r[key] - means[r["target"]] for r in rows]


def correlations(rows: list[dict], names: list[str], resamples: int) -> dict[str, Any]:
    """Spearman's rho of each score with the gain over all pairs (``pooled``) and after
    subtracting each target's mean from both (``within``: which source for this target),
    with 95 % percentile intervals from ``resamples`` bootstrap resamples of the pairs."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = len(rows)
    draws = [rng.integers(0, n, n) for _ in range(resamples)]
    out: dict[str, Any] = {"pairs": n, "resamples": resamples, "scores": {}}
    for name in names:
        entry = {}
        for view, x, y in (
            ("pooled", [r[name] for r in rows], [r["gain"] for r in rows]),
            ("within", _centred(rows, name), _centred(rows, "gain")),
        ):
            rho = _spearman(x, y)
            boot = [_spearman([x[i] for i in d], [y[i] for i in d]) for d in draws]
            boot = [
                b for b in boot if not math.isnan(b)
            ]  # resamples with a constant column: no rho
            low, high = np.percentile(boot, [2.5, 97.5]) if boot else (float("nan"),) * 2
            entry[view] = {
                "rho": rho,
                "low": float(low),
                "high": float(high),
                "valid_resamples": len(boot),
            }
        out["scores"][name] = entry
    return out


def correlation_table(report: dict[str, Any], rows: list[dict]) -> str:
    lines = [
        f"Spearman's rho of each score with the measured transfer gain, {report['pairs']} "
        f"source -> target pairs; 95 % intervals from {report['resamples']} bootstrap "
        "resamples of the pairs. *pooled*: raw values; *within target*: each target's mean "
        "subtracted from score and gain.",
        "",
        "| score | rho (pooled) | 95 % interval | rho (within target) | 95 % interval |",
        "|---|---|---|---|---|",
    ]
    for name, entry in report["scores"].items():
        p, w = entry["pooled"], entry["within"]
        lines.append(
            f"| {name} | {p['rho']:+.2f} | [{p['low']:+.2f}, {p['high']:+.2f}] | "
            f"{w['rho']:+.2f} | [{w['low']:+.2f}, {w['high']:+.2f}] |"
        )
    lines += [
        "",
        "| target | source | alone | joint | gain (points) | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["target"], -r["gain"])):
        lines.append(
            f"| {r['target']} | {r['source']} | {100 * r['alone']:.1f} | "
            f"{100 * r['joint']:.1f} | {100 * r['gain']:+.1f} "
            f"[{100 * r['gain_min']:+.1f}, {100 * r['gain_max']:+.1f}] | {r['seeds']} |"
        )
    return "\n".join(lines)


def scatter(rows: list[dict], names: list[str], report: dict[str, Any], path: Path) -> None:
    """One panel per score: the score (x) against the gain in points (y), one colour per target."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13.5, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    targets = sorted({r["target"] for r in rows})
    colours = dict(zip(targets, ["tab:blue", "tab:orange", "tab:green", "tab:red"], strict=False))
    axes = fig.subplots(2, 3, squeeze=False).ravel()
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    for ax, name in zip(axes, names, strict=False):
        for target in targets:
            mine = [r for r in rows if r["target"] == target]
            ax.scatter(
                [r[name] for r in mine],
                [100 * r["gain"] for r in mine],
                color=colours[target],
                label=target,
                s=28,
            )
            for r in mine:
                ax.annotate(
                    r["source"],
                    (r[name], 100 * r["gain"]),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.axhline(0, color="grey", lw=0.6)
        p, w = report["scores"][name]["pooled"], report["scores"][name]["within"]
        ax.set_title(
            f"{name}\nrho {p['rho']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}]; "
            f"within target {w['rho']:+.2f}",
            fontsize=8,
        )
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel("transfer gain (test points)", fontsize=8)
    fig.axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
