"""What ``tawt-samples`` learnt, for people: tables and plots from a run's ``sample_weights.pt``.

:func:`write_report` writes into the run folder

- ``sample_weights_extremes.csv``: per source and over all sources, the examples weighted least
  and most (task, item, ``path:line``, relative weight ``p_i * N`` with 1 the uniform weight,
  the last update's similarity, text, labels); ``sample_weights_extremes.md``: the ``top`` of
  each end over all sources;
- ``sample_weights.png``: per source, the quantiles of the relative weights after every update
  and their histograms at the first, middle and last update;
- ``sample_weights_extremes.png``: the least and most trusted examples as bars.

``pyxtask samples RUN_DIR --top 20`` writes them and prints the table.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from pyxtask import checkpoint

__all__ = ["SampleReportError", "load_sample_weights", "text_table", "write_report"]

FILE = "sample_weights.pt"
COLUMNS = ("end", "task", "item", "source", "weight", "similarity", "text", "labels")


class SampleReportError(ValueError):
    """A folder without sample weights to report; the message says what to do."""


def load_sample_weights(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run's ``sample_weights.pt`` (a :class:`SampleReportError` naming the folder if it
    has none)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise SampleReportError(f"{os.fspath(run)}: no such run folder")
    path = run / FILE
    if not path.is_file():
        raise SampleReportError(
            f"{os.fspath(run)}: no {FILE}; it is written by runs of --method tawt-samples "
            "after their first weight update"
        )
    data: dict[str, Any] = checkpoint.load(path, keys=("weights", "history", "extremes"))
    return data


def rows_of(
    data: dict[str, Any], group: str = "all sources", top: int | None = None
) -> list[dict[str, Any]]:
    """The extreme examples of ``group`` (a source's name or ``"all sources"``), ``top`` of
    each end (None: all that were kept)."""
    rows = list(data["extremes"].get(group, []))
    least = [r for r in rows if r["end"] == "least"][:top]
    most = [r for r in rows if r["end"] == "most"][:top]
    return least + most


def text_table(data: dict[str, Any], top: int, width: int = 110) -> str:
    """The ``top`` least and most trusted examples over all sources, one line each."""
    last = data["history"][-1]
    lines = [
        f"tawt-samples: {sum(data['sizes'])} source examples, {last['update']} updates "
        f"(similarity {data['similarity']}, c = {data['c']:g}, eta = {data['lr']:g}); weight "
        "= p_i * N (1 = uniform)"
    ]
    for end in ("least", "most"):
        lines.append(f"\n{end} trusted:")
        lines.append(f"{'weight':>9} {'sim':>7}  {'task':<14} text  [labels]")
        for r in (r for r in rows_of(data, top=top) if r["end"] == end):
            sim = "" if r["similarity"] is None else f"{r['similarity']:+.3f}"
            body = f"{r['text']}  [{r['labels']}]"
            room = max(20, width - 35)
            body = body if len(body) <= room else body[: room - 1] + "…"
            lines.append(f"{r['weight']:>9.3g} {sim:>7}  {r['task'][:14]:<14} {body}")
    return "\n".join(lines)


def _csv(data: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["group", *COLUMNS], lineterminator="\n")
    writer.writeheader()
    for group in data["extremes"]:
        for r in rows_of(data, group):
            writer.writerow({"group": group, **{k: r[k] for k in COLUMNS}})
    return out.getvalue()


def _markdown(data: dict[str, Any], top: int) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| end | weight | similarity | task | source | text | labels |",
             "| --- | ---: | ---: | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows_of(data, top=top):
        sim = "" if r["similarity"] is None else f"{r['similarity']:+.3f}"
        lines.append(
            f"| {r['end']} | {r['weight']:.3g} | {sim} | {cell(r['task'])} | {cell(r['source'])} "
            f"| {cell(r['text'])} | {cell(r['labels'])} |"
        )
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | os.PathLike[str], top: int = 20) -> list[Path]:
    """Write the tables and plots of the module docs into ``run_dir``; return their paths."""
    data = load_sample_weights(run_dir)
    run = Path(run_dir)
    csv_path, md_path = run / "sample_weights_extremes.csv", run / "sample_weights_extremes.md"
    checkpoint.write_text(csv_path, _csv(data))
    checkpoint.write_text(md_path, _markdown(data, top))
    return [csv_path, md_path, plot_distributions(data, run), plot_extremes(data, run, top)]


def plot_distributions(data: dict[str, Any], run: Path) -> Path:
    """``sample_weights.png``: quantile bands over the updates and histograms per source."""
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415 -- matplotlib loads slowly

    from pyxtask.plots import _new_figure, _save  # noqa: PLC0415

    history = data["history"]
    names = list(data["tasks"])
    fig = _new_figure(11, 3.2 * len(names))
    axes = fig.subplots(len(names), 2, squeeze=False)
    updates = [h["update"] for h in history]
    bins = len(history[0]["sources"][names[0]]["histogram"])
    low, high = data.get("hist_range", (-4.0, 2.0))  # files of the first version: -4 to 2
    edges = np.linspace(float(low), float(high), bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    for row, name in zip(axes, names, strict=True):
        q = np.array([h["sources"][name]["quantiles"] for h in history])  # updates x 11
        ax = row[0]
        for lo, hi, alpha, label in ((1, 9, 0.15, "1-99 %"), (2, 8, 0.25, "5-95 %"),
                                     (4, 6, 0.45, "25-75 %")):  # fmt: skip
            ax.fill_between(updates, q[:, lo], q[:, hi], color="C0", alpha=alpha, lw=0, label=label)
        ax.plot(updates, q[:, 5], color="C0", lw=1.5, label="median")
        ax.plot(updates, q[:, 0], color="C3", lw=0.8, ls=":", label="min / max")
        ax.plot(updates, q[:, 10], color="C3", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.axhline(1.0, color="0.5", lw=0.6)
        share = history[-1]["sources"][name]["share"]
        ax.set_title(
            f"{name}: relative weight p_i·N per update (share now {share:.3f})", fontsize=9
        )
        ax.set_xlabel("weight update")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="lower left")
        ax = row[1]
        # Update 0 (every weight uniform) is one spike that would flatten the others.
        picks = sorted({min(1, len(history) - 1), len(history) // 2, len(history) - 1})
        for k, i in enumerate(picks):
            counts = np.array(history[i]["sources"][name]["histogram"], dtype=float)
            ax.step(centers, counts, where="mid", color=f"C{k}", label=f"update {updates[i]}")
        ax.set_xlabel(
            f"log10 relative weight (0 = uniform; clipped to [{edges[0]:g}, {edges[-1]:g}])"
        )
        ax.set_ylabel("examples")
        ax.set_title(f"{name}: histogram", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"tawt-samples: {data['similarity']}, c = {data['c']:g}, eta = {data['lr']:g}, "
        f"{sum(data['sizes'])} source examples",
        fontsize=10,
    )
    return _save(fig, run / "sample_weights.png")


def plot_extremes(data: dict[str, Any], run: Path, top: int) -> Path:
    """``sample_weights_extremes.png``: the ``top`` least and most trusted examples."""
    from pyxtask.plots import _new_figure, _save  # noqa: PLC0415

    rows = rows_of(data, top=top)
    fig = _new_figure(11, 0.8 + 0.22 * len(rows))
    ax = fig.subplots()
    labels = []
    for r in rows:
        text = f"[{r['task']}] {r['text']}"
        labels.append(text if len(text) <= 80 else text[:79] + "…")
    y = np.arange(len(rows))[::-1]
    weights = np.array([max(r["weight"], 1e-12) for r in rows])
    colors = ["C3" if r["end"] == "least" else "C2" for r in rows]
    ax.barh(y, np.log10(weights), color=colors)
    ax.set_yticks(y, labels, fontsize=7)
    ax.axvline(0.0, color="0.3", lw=0.6)
    ax.set_xlabel("log10 relative weight p_i·N (0 = uniform; red: least, green: most trusted)")
    finite = np.log10(weights)
    ax.set_xlim(min(-0.5, math.floor(finite.min())), max(0.5, math.ceil(finite.max())))
    ax.set_title("source examples tawt-samples trusts least and most", fontsize=10)
    return _save(fig, run / "sample_weights_extremes.png")
