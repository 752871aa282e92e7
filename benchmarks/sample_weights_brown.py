"""Sample-weighted TAWT on real data: Brown sentences, a known fraction with shuffled tags.

The source is Brown POS (``brown.pos``) with ``--corrupt`` of its training sentences' tags
shuffled (a random permutation of the sentence's own tags, so the tag distribution is
unchanged and only the alignment to the words is lost); the target a small WSJ sample
(``wsj-pos.pos``, Penn tags). Runs, with the same encoder (MiniLM), data, batch size, learning
rate and seed:

- ``tawt-samples``: one weight per source sentence, updated every epoch from the second on
  (cosine form, c = 10; until its first update it trains exactly as ``normalized-joint``);
- ``tawt``: task-weighted TAWT (one weight for the whole source), the paper's protocol;
- ``normalized-joint``: the same stream, fixed weights (no weighting at all);
- ``single-steps``: the target alone for as many optimizer steps as the ``tawt-samples`` run.

Written to ``--out``: ``results.json``, ``results.md`` (AUROC of the weights against
cleanness after every update, the weights of clean and corrupted sentences, the target's dev
and test accuracy per run, the scale of the raw dot products), ``weights_clean_vs_corrupted.png``
and the ``tawt-samples`` run's own report (``sample_weights*.png``, ``*.csv``, ``*.md``). One
seed: a first look, not a significance test. Not part of CI (about half an hour of CPU).

    .venv/bin/python benchmarks/sample_weights_brown.py
    .venv/bin/python benchmarks/sample_weights_brown.py --encoder tiny --source-size 200 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

SCALE = ("update", "dots", "grad_norms", "similarity", "target_grad_norm", "coverage", "seconds")
RUNS = ("tawt-samples", "tawt", "normalized-joint", "single-steps")
COPIED = (
    "sample_weights.png",
    "sample_weights_extremes.png",
    "sample_weights_extremes.csv",
    "sample_weights_extremes.md",
    "weights.csv",
    "summary.json",
)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--source", default="brown.pos")
    p.add_argument("--target", default="wsj-pos.pos")
    p.add_argument("--source-size", type=int, default=1000)
    p.add_argument("--target-size", type=int, default=100)
    p.add_argument("--dev-size", type=int, default=200)
    p.add_argument("--test-size", type=int, default=400)
    p.add_argument("--corrupt", type=float, default=0.3, help="fraction of source sentences")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--c", type=float, default=10.0, help="tawt-samples c (cosine form)")
    p.add_argument("--first-update", type=int, default=2, help="epochs before the first update")
    p.add_argument("--update-every", type=int, default=1, help="epochs between updates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=",".join(RUNS), help="which of " + ",".join(RUNS))
    p.add_argument("--out", default="benchmarks/results/sample-weights-brown")
    p.add_argument("--report-only", action="store_true", help="redo the analysis of a run")
    p.add_argument("--work", default="/tmp/sample-weights-brown-runs", help="run folders")
    return p.parse_args()


def base_config(args: argparse.Namespace) -> Any:
    from pyxtask.config import SampleTAWTConfig, TrainConfig

    return TrainConfig(
        target=args.target,
        sources=[args.source],
        target_size=args.target_size,
        source_size=args.source_size,
        dev_size=args.dev_size,
        test_size=args.test_size,
        paradigm="normalized-joint",
        method="tawt-samples",
        encoder=args.encoder,
        epochs=args.epochs,
        batch_size=args.batch,
        lr=args.lr,
        seed=args.seed,
        device="cpu",
        checkpoint_every=10**6,
        tawt_samples=SampleTAWTConfig(
            c=args.c, first_update=args.first_update, update_every=args.update_every
        ),
    )


def corrupt(tasks: list[Any], fraction: float, seed: int) -> set[int]:
    """Shuffle the tags of ``fraction`` of the source's training sentences (in place); return
    the indices of the sentences whose tags changed."""
    from pyxtask.data import TaggedSentence

    source = tasks[1]
    rng = random.Random(seed)
    picked = rng.sample(range(len(source.train)), round(fraction * len(source.train)))
    changed = set()
    for i in picked:
        s = source.train[i]
        tags = list(s.tags)
        rng.shuffle(tags)
        if tuple(tags) != s.tags:
            changed.add(i)
        source.train[i] = TaggedSentence(s.words, tuple(tags), s.source)
    return changed


def run(config: Any, folder: Path, tasks: list[Any], snapshots: list[Any] | None) -> dict:
    from pyxtask.methods import make_method
    from pyxtask.trainer import Trainer

    if folder.exists():
        shutil.rmtree(folder)
    method = make_method(config)
    if snapshots is not None:  # the weights after every update, for the AUROC per update
        update = method.update

        def recorded(ctx: Any) -> None:
            update(ctx)
            snapshots.append(method.sample_weights.p.clone())

        method.update = recorded
    started = time.perf_counter()
    trainer = Trainer(config, folder, progress=True, tasks=tasks, method=method)
    summary = trainer.fit()
    summary["seconds"] = time.perf_counter() - started
    return summary


def weights_figure(rel_clean: Any, rel_bad: Any, aurocs: list[float], path: Path) -> None:
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    from pyxtask.plots import _new_figure, _save

    fig = _new_figure(10, 3.4)
    left, right = fig.subplots(1, 2)
    lo = np.log10(np.concatenate([rel_clean, rel_bad]).clip(1e-12))
    bins = np.linspace(lo.min(), lo.max(), 50)
    left.hist(np.log10(rel_clean), bins=bins, alpha=0.6, label=f"clean ({len(rel_clean)})")
    left.hist(np.log10(rel_bad), bins=bins, alpha=0.6, label=f"tags shuffled ({len(rel_bad)})")
    left.set_xlabel("log10 relative weight p_i·N after the last update (0 = uniform)")
    left.set_ylabel("source sentences")
    left.legend(fontsize=8)
    left.set_title("Brown sentences: clean vs corrupted", fontsize=10)
    right.plot(range(1, len(aurocs) + 1), aurocs, marker="o")
    right.set_ylim(0.0, 1.0)
    right.axhline(0.5, color="0.5", lw=0.6)
    right.set_xlabel("weight update")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_ylabel("AUROC of weight vs cleanness")
    right.set_title("corrupted sentences down-weighted", fontsize=10)
    _save(fig, path)


def main() -> None:
    args = parse()
    import numpy as np
    import torch
    import transformers
    from sklearn.metrics import roc_auc_score

    from pyxtask.sample_report import write_report
    from pyxtask.tasks import load_tasks

    transformers.utils.logging.disable_progress_bar()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    config = base_config(args)
    tasks = load_tasks(config)
    corrupted = corrupt(tasks, args.corrupt, args.seed)
    print(f"target {config.target}: {len(tasks[0].train)} train / {len(tasks[0].dev)} dev / "
          f"{len(tasks[0].test)} test; source {config.sources[0]}: {len(tasks[1].train)} "
          f"sentences, {len(corrupted)} with shuffled tags")  # fmt: skip
    if args.report_only:  # the analysis again, from the run folder and results.json
        results = json.loads((out / "results.json").read_text())
        saved = torch.load(work / "tawt-samples" / "sample_weights.pt", weights_only=False)
        aurocs = results["corruption"]["auroc_per_update"]
        results["corruption"] = analyse(saved, corrupted, len(tasks[1].train), aurocs, out)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (out / "results.md").write_text(markdown(results) + "\n")
        print(markdown(results))
        return
    wanted = args.runs.split(",")
    results: dict[str, Any] = {"settings": vars(args), "runs": {}}
    snapshots: list[torch.Tensor] = []
    steps = None
    if "tawt-samples" in wanted:
        summary = run(config, work / "tawt-samples", tasks, snapshots)
        steps = summary["steps"]
        results["runs"]["tawt-samples"] = summary
        write_report(work / "tawt-samples")
        for name in COPIED:
            shutil.copy(work / "tawt-samples" / name, out / name)
        saved = torch.load(work / "tawt-samples" / "sample_weights.pt", weights_only=False)
        clean = np.array([int(s) not in corrupted for s in saved["sentence"].tolist()])
        aurocs = [float(roc_auc_score(clean, p.numpy())) for p in snapshots]
        results["corruption"] = analyse(saved, corrupted, len(tasks[1].train), aurocs, out)
        print(f"AUROC per update: {[round(a, 3) for a in aurocs]}")
    for name in (n for n in wanted if n != "tawt-samples"):
        if name == "single-steps":
            if steps is None:
                raise SystemExit("single-steps needs the tawt-samples run's step count")
            cfg = config.replace(paradigm="single", method="fixed", total_steps=steps)
        elif name == "normalized-joint":
            cfg = config.replace(method="fixed")
        else:
            cfg = config.replace(method=name)
        results["runs"][name] = run(cfg, work / name, tasks, None)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n")
    print(markdown(results))


def analyse(
    saved: dict[str, Any], corrupted: set[int], sentences: int, aurocs: list[float], out: Path
) -> dict[str, Any]:
    """Weights of clean and corrupted sentences, and how many of the least and most trusted
    examples kept in ``sample_weights.pt`` are corrupted; draws the figure."""
    import numpy as np

    sentence = saved["sentence"].tolist()
    clean = np.array([int(s) not in corrupted for s in sentence])
    rel = (saved["weights"] * len(clean)).numpy()
    ends: dict[str, float] = {}
    for end in ("least", "most"):
        rows = [r for r in saved["extremes"]["all sources"] if r["end"] == end]
        share = sum(sentence[r["item"]] in corrupted for r in rows) / max(1, len(rows))
        ends[f"{end} trusted {len(rows)}"] = share
    weights_figure(rel[clean], rel[~clean], aurocs, out / "weights_clean_vs_corrupted.png")
    quantiles = ("0.1", "0.5", "0.9")
    return {
        "sentences": sentences,
        "corrupted": len(corrupted),
        "auroc_per_update": aurocs,
        "relative_weight_clean": {q: float(np.quantile(rel[clean], float(q))) for q in quantiles},
        "relative_weight_corrupted": {
            q: float(np.quantile(rel[~clean], float(q))) for q in quantiles
        },
        "weight_share_corrupted": float(rel[~clean].sum() / rel.sum()),
        # Kish's effective sample size 1 / sum p_i^2 as a fraction of N: how concentrated.
        "effective_size_fraction": float(len(rel) / (rel**2).sum()),
        "share_corrupted_at_start": float((~clean).sum() / len(clean)),
        "corrupted_among_extremes": ends,
        "scale": [{k: h[k] for k in SCALE} for h in saved["history"][1:]],
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| run | steps | dev acc | test acc | seconds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results["runs"].items():
        lines.append(
            f"| {name} | {r['steps']} | {100 * r['dev']:.2f} | {100 * r['test']:.2f} | "
            f"{r['seconds']:.0f} |"
        )
    c = results.get("corruption")
    if c:
        lines += [
            "",
            f"{c['corrupted']} of {c['sentences']} source sentences with shuffled tags.",
            "AUROC of weight vs cleanness per update: "
            + ", ".join(f"{a:.3f}" for a in c["auroc_per_update"]),
            f"Corrupted sentences' share of the source weight: {c['weight_share_corrupted']:.3f} "
            f"(at the start {c['share_corrupted_at_start']:.3f}).",
            f"Effective sample size 1 / sum p_i^2: {c['effective_size_fraction']:.3f} N.",
            "Corrupted among the extremes: "
            + ", ".join(f"{k}: {v:.0%}" for k, v in c.get("corrupted_among_extremes", {}).items()),
            "Relative weight p_i·N, 10/50/90 % quantiles: clean "
            + " / ".join(f"{v:.3g}" for v in c["relative_weight_clean"].values())
            + ", corrupted "
            + " / ".join(f"{v:.3g}" for v in c["relative_weight_corrupted"].values()),
            "Raw dot products grad l_i . v per update (median |.|, max |.|): "
            + "; ".join(
                f"{s['dots']['median_abs']:.3g}, {s['dots']['max_abs']:.3g}" for s in c["scale"]
            ),
            "Cosines (mean, max |.|): "
            + "; ".join(
                f"{s['similarity']['mean']:.3g}, {s['similarity']['max_abs']:.3g}"
                for s in c["scale"]
            ),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
