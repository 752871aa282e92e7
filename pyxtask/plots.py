"""PNG plots of a training run folder (matplotlib, Agg canvas, no pyplot).

The trainer writes these files into a run folder; each has its plot:

* ``weights.csv`` -> ``weights.png`` (:func:`plot_weight_trajectory`): the loss factors /
  sampling weights ``w`` and the effective task weights ``omega`` per weight update;
* ``similarity.jsonl`` -> ``similarity.png`` (:func:`plot_similarity`): the task-gradient
  cosine matrix of each update that measured it, as small-multiple heatmaps;
* ``metrics.jsonl`` -> ``learning_curves.png`` (:func:`plot_learning_curves`): training loss
  per task and dev metrics;
* ``label_transfer.jsonl`` (MetaXT) -> ``label_transfer.csv``, ``label_transfer.png`` and
  ``label_transfer_epochs.png`` (:func:`plot_label_transfer`): where the label transfer network
  sends each source label among the target's labels, per epoch.

:func:`plot_run` draws whichever apply. A plot whose input file is missing (or holds no data)
is skipped and its function returns ``None``; a malformed line raises :class:`ValueError`
naming ``file:line``. Each PNG is written to ``<name>.tmp`` and renamed, so a viewer polling
the folder during training never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator

from pyxtask import checkpoint

__all__ = [
    "plot_epoch",
    "plot_label_transfer",
    "plot_learning_curves",
    "plot_run",
    "plot_similarity",
    "plot_weight_trajectory",
]

WEIGHTS_FILE = "weights.csv"
SIMILARITY_FILE = "similarity.jsonl"
METRICS_FILE = "metrics.jsonl"
LABEL_TRANSFER_FILE = "label_transfer.jsonl"
_SUMMARY_FILE = "summary.json"

_DPI = 120
_MAX_HEATMAPS = 12
_MAX_ANNOTATED = 8
# A label-transfer map gets its probabilities written into the cells up to this many labels on
# either axis; beyond it the numbers no longer fit a readable cell.
_MAX_ANNOTATED_LABELS = 12
_MAX_EPOCH_PANELS = 6
_MAX_WIDTH = 20.0  # inches; the epoch grid wraps a source's row beyond it
# Above this max/min ratio a linear axis squashes the small weights onto zero.
_LOG_RATIO = 100.0

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class _Weights:
    tasks: list[str]
    update: FloatArray
    epoch: FloatArray
    step: FloatArray
    w: FloatArray  # (updates, tasks)
    omega: FloatArray  # (updates, tasks)


@dataclass(frozen=True)
class _Similarity:
    update: int
    epoch: int
    step: int
    tasks: list[str]
    cosine: FloatArray  # (tasks, tasks); NaN where a gradient was not measured


@dataclass(frozen=True)
class _LabelTransfer:
    epoch: int
    step: int
    source: str
    source_labels: list[str]
    target_labels: list[str]
    probs: FloatArray  # (source labels, target labels); NaN rows where no example was seen
    counts: list[int]
    target: str | None  # the target task's name, when the writer recorded it


# --------------------------------------------------------------------------- reading


def _parse_float(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: not a number: {text!r}") from None


def _read_weights(path: Path) -> _Weights | None:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return None
    header = [cell.strip() for cell in rows[0]]
    name = path.name
    if header[:3] != ["update", "epoch", "step"]:
        raise ValueError(f"{name}:1: header must start with update,epoch,step, got {header[:3]}")
    rest = header[3:]
    half = len(rest) // 2
    w_cols, omega_cols = rest[:half], rest[half:]
    tasks = [col.removeprefix("w:") for col in w_cols]
    if (
        not rest
        or len(rest) % 2
        or not all(col.startswith("w:") for col in w_cols)
        or omega_cols != [f"omega:{task}" for task in tasks]
    ):
        raise ValueError(
            f"{name}:1: expected w:<task> columns then omega:<task> in the same order, got {rest}"
        )
    values: list[list[float]] = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        where = f"{name}:{lineno}"
        if len(row) != len(header):
            raise ValueError(f"{where}: {len(row)} columns, the header has {len(header)}")
        values.append([_parse_float(cell, where) for cell in row])
    if not values:
        return None
    table = np.asarray(values, dtype=np.float64)
    n = len(tasks)
    return _Weights(
        tasks=tasks,
        update=table[:, 0],
        epoch=table[:, 1],
        step=table[:, 2],
        w=table[:, 3 : 3 + n],
        omega=table[:, 3 + n :],
    )


def _read_jsonl(path: Path, *, drop_partial_tail: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """The objects of a JSON-lines file, each with its 1-based line number (for errors).

    With ``drop_partial_tail`` a last line that has no newline and does not parse is skipped:
    it is a record cut off mid-write (a crash, or a copy taken while the trainer appends), not
    a malformed one. A bad line that was ended still raises.
    """
    records: list[tuple[int, dict[str, Any]]] = []
    with path.open() as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if drop_partial_tail and not line.endswith("\n"):
                    continue  # only the last line can lack its newline
                raise ValueError(f"{path.name}:{lineno}: not valid JSON: {exc}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path.name}:{lineno}: not a JSON object")
            records.append((lineno, record))
    return records


def _field(record: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = record.get(key)
    # bool is an int subclass; a true/false step or loss is a writer bug, not a number.
    if value is None or isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{where}: {key!r} missing or not {_kind_name(kind)}: {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _read_similarity(path: Path) -> list[_Similarity]:
    out: list[_Similarity] = []
    for lineno, record in _read_jsonl(path):
        where = f"{path.name}:{lineno}"
        tasks = _field(record, "tasks", list, where)
        if not all(isinstance(task, str) for task in tasks):
            raise ValueError(f"{where}: 'tasks' must be a list of strings")
        n = len(tasks)
        cosine = _float_matrix(record, "cosine", (n, n), "one row per task", where)
        out.append(
            _Similarity(
                update=_field(record, "update", int, where),
                epoch=_field(record, "epoch", int, where),
                step=_field(record, "step", int, where),
                tasks=tasks,
                cosine=cosine,
            )
        )
    return out


def _float_matrix(
    record: dict[str, Any], key: str, shape: tuple[int, int], rows_are: str, where: str
) -> FloatArray:
    """``record[key]`` as a float matrix of ``shape``; ``null`` (not measured, or a NaN the
    writer turned into valid JSON) becomes NaN."""
    matrix = _field(record, key, list, where)
    n, m = shape
    if len(matrix) != n or not all(isinstance(row, list) and len(row) == m for row in matrix):
        raise ValueError(f"{where}: {key!r} must be a {n}x{m} matrix ({rows_are})")
    values = [v for row in matrix for v in row]
    if not all(
        v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values
    ):
        raise ValueError(f"{where}: {key!r} holds a non-number")
    return np.array(
        [math.nan if v is None else float(v) for v in values], dtype=np.float64
    ).reshape(n, m)


def _labels(record: dict[str, Any], key: str, where: str) -> list[str]:
    labels: list[str] = _field(record, key, list, where)
    if not labels or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"{where}: {key!r} must be a non-empty list of strings")
    return labels


def _read_label_transfer(path: Path) -> list[_LabelTransfer]:
    """The complete records of ``label_transfer.jsonl``; one target label list for all.

    A later record for an (epoch, source) pair already read replaces the earlier one in place,
    so a rerun epoch that was not truncated away counts once, with its newer map.
    """
    by_key: dict[tuple[int, str], _LabelTransfer] = {}
    first: tuple[int, list[str]] | None = None
    for lineno, record in _read_jsonl(path, drop_partial_tail=True):
        where = f"{path.name}:{lineno}"
        source_labels = _labels(record, "source_labels", where)
        target_labels = _labels(record, "target_labels", where)
        # The CSV has one column per target label, so every map must share them; a different
        # list means two runs' logs were mixed, which no header could describe.
        if first is None:
            first = (lineno, target_labels)
        elif target_labels != first[1]:
            raise ValueError(
                f"{where}: 'target_labels' differ from those on line {first[0]} "
                f"({len(target_labels)} vs {len(first[1])} labels); one run has one target task"
            )
        n = len(source_labels)
        probs = _float_matrix(
            record, "map", (n, len(target_labels)), "one row per source label", where
        )
        counts = _field(record, "counts", list, where)
        if len(counts) != n or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts
        ):
            raise ValueError(f"{where}: 'counts' must be {n} non-negative integers")
        target = record.get("target")
        if target is not None and not isinstance(target, str):
            raise ValueError(f"{where}: 'target' must be a string: {target!r}")
        entry = _LabelTransfer(
            epoch=_field(record, "epoch", int, where),
            step=_field(record, "step", int, where),
            source=_field(record, "source", str, where),
            source_labels=source_labels,
            target_labels=target_labels,
            probs=probs,
            counts=counts,
            target=target,
        )
        by_key[entry.epoch, entry.source] = entry
    return list(by_key.values())


# --------------------------------------------------------------------------- drawing helpers


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.1)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _wants_log(values: FloatArray) -> bool:
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == 0:
        return False
    return bool(positive.max() / positive.min() > _LOG_RATIO)


def _set_y_scale(ax: Axes, values: FloatArray) -> None:
    if _wants_log(values):
        # Zero weights (a switched-off task) cannot sit on a log axis; masking drops those
        # points instead of pulling the axis down to 1e-300.
        ax.set_yscale("log", nonpositive="mask")


def _task_colors(tasks: Sequence[str]) -> dict[str, Any]:
    cmap = colormaps["tab10" if len(tasks) <= 10 else "tab20"]
    return {task: cmap(i % cmap.N) for i, task in enumerate(tasks)}


# --------------------------------------------------------------------------- weights


def _weights_figure(run_dir: str | os.PathLike[str]) -> Figure | None:
    path = Path(run_dir) / WEIGHTS_FILE
    if not path.is_file():
        return None
    weights = _read_weights(path)
    if weights is None:
        return None
    fig = _new_figure(12.0, 4.6)
    left, right = fig.subplots(1, 2, sharex=True)
    colors = _task_colors(weights.tasks)
    panels = (
        (left, weights.w, "w (loss factors / sampling weights)"),
        (right, weights.omega, "ω (effective task weights)"),
    )
    for ax, values, title in panels:
        for i, task in enumerate(weights.tasks):
            is_target = i == 0
            ax.plot(
                weights.update,
                values[:, i],
                label=task,
                color=colors[task],
                marker="o",
                markersize=4 if is_target else 3,
                linewidth=2.8 if is_target else 1.3,
                zorder=3 if is_target else 2,
            )
        _set_y_scale(ax, values)
        ax.set_title(title)
        ax.set_xlabel(_update_axis_label(weights))
        # Update numbers are counts; a one-row file would otherwise get ticks at -0.04 .. 0.04
        # (MaxNLocator falls back to fractions when the range holds too few integers).
        if weights.update.size == 1:
            ax.set_xticks(weights.update)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="major", alpha=0.3)
    left.set_ylabel("weight")
    # Both panels share tasks and colours, so one legend outside the axes serves both and
    # keeps the curves uncovered.
    fig.legend(
        *left.get_legend_handles_labels(),
        loc="outside right upper",
        title="task (target thick)",
        fontsize="small",
    )
    return fig


def _update_axis_label(weights: _Weights) -> str:
    epochs = weights.epoch[np.isfinite(weights.epoch)]
    if epochs.size and epochs.max() > epochs.min():
        return f"weight update (epochs {epochs.min():g}-{epochs.max():g})"
    if epochs.size:
        return f"weight update (epoch {epochs[0]:g})"
    return "weight update"


def plot_weight_trajectory(run_dir: str | os.PathLike[str]) -> Path | None:
    """Draw ``w`` and ``omega`` per task against the update number into ``weights.png``.

    Returns the PNG path, or ``None`` (writing nothing) when ``weights.csv`` is missing or has
    no rows. A y axis turns logarithmic when its positive values span more than a factor 100.
    """
    fig = _weights_figure(run_dir)
    return None if fig is None else _save(fig, Path(run_dir) / "weights.png")


# --------------------------------------------------------------------------- similarity


def _pick_evenly(count: int, limit: int) -> list[int]:
    if count <= limit:
        return list(range(count))
    picks = np.rint(np.linspace(0, count - 1, limit)).astype(int)
    return sorted({int(i) for i in picks})


def _similarity_figure(run_dir: str | os.PathLike[str]) -> Figure | None:
    path = Path(run_dir) / SIMILARITY_FILE
    if not path.is_file():
        return None
    records = _read_similarity(path)
    if not records:
        return None
    shown = [records[i] for i in _pick_evenly(len(records), _MAX_HEATMAPS)]
    ncols = min(4, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    n_tasks = max(len(r.tasks) for r in shown)
    longest = max(len(task) for r in shown for task in r.tasks)
    # Cells must hold a "-0.25" annotation; the label margin grows with the longest task name.
    panel = max(2.6, 0.42 * n_tasks + 0.07 * longest + 0.6)
    fig = _new_figure(ncols * panel + 1.0, nrows * (panel + 0.3))
    cmap: Colormap = colormaps["RdBu_r"].with_extremes(bad="0.8")
    same_tasks = all(r.tasks == shown[0].tasks for r in shown)
    axes: list[Axes] = []
    image = None
    for k, record in enumerate(shown):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        axes.append(ax)
        image = ax.imshow(
            np.ma.masked_invalid(record.cosine), cmap=cmap, vmin=-1.0, vmax=1.0, aspect="equal"
        )
        ax.set_title(f"update {record.update} (epoch {record.epoch}, step {record.step})")
        ticks = list(range(len(record.tasks)))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        col = k % ncols
        # With one task list for all panels, labels on the outer edge suffice; repeating them
        # on every panel crowds small multiples.
        has_panel_below = k + ncols < len(shown)
        show_x = not same_tasks or not has_panel_below
        show_y = not same_tasks or col == 0
        ax.set_xticklabels(record.tasks if show_x else [], rotation=45, ha="right")
        ax.set_yticklabels(record.tasks if show_y else [])
        if len(record.tasks) <= _MAX_ANNOTATED:
            _annotate(ax, record.cosine)
    assert image is not None
    fig.colorbar(image, ax=axes, label="gradient cosine", shrink=0.8)
    return fig


def _annotate(ax: Axes, matrix: FloatArray, fontsize: float = 7) -> None:
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isfinite(value):
            continue
        # Dark text vanishes on the saturated ends of RdBu_r (and on the dark end of Blues).
        color = "white" if abs(value) > 0.6 else "black"
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=fontsize, color=color)


def plot_similarity(run_dir: str | os.PathLike[str]) -> Path | None:
    """Draw the task-gradient cosine matrices of ``similarity.jsonl`` into ``similarity.png``.

    One heatmap per update (at most 12, evenly spaced, first and last included), a shared
    colour bar over [-1, 1]; unmeasured (``null``) entries are grey. Returns the PNG path, or
    ``None`` when the file is missing or holds no records.
    """
    fig = _similarity_figure(run_dir)
    return None if fig is None else _save(fig, Path(run_dir) / "similarity.png")


# --------------------------------------------------------------------------- learning curves


def _learning_curves_figure(run_dir: str | os.PathLike[str]) -> Figure | None:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    losses: dict[str, list[tuple[float, float]]] = {}
    dev: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for lineno, record in _read_jsonl(path):
        where = f"{path.name}:{lineno}"
        kind = record.get("kind")
        if kind == "train":
            task = _field(record, "task", str, where)
            step = float(_field(record, "step", (int, float), where))
            loss = float(_field(record, "loss", (int, float), where))
            losses.setdefault(task, []).append((step, loss))
        elif kind == "eval" and record.get("split") == "dev":
            task = _field(record, "task", str, where)
            metric = _field(record, "metric", str, where)
            step = float(_field(record, "step", (int, float), where))
            value = float(_field(record, "value", (int, float), where))
            dev.setdefault((task, metric), []).append((step, value))
        # Other kinds (and test-split evaluations) are not drawn; a newer trainer may add kinds.
    if not losses and not dev:
        return None
    tasks = list(dict.fromkeys([*losses, *(task for task, _ in dev)]))
    colors = _task_colors(tasks)
    fig = _new_figure(12.0, 4.6)
    left, right = fig.subplots(1, 2, sharex=True)
    for task, points in losses.items():
        steps, values = np.asarray(sorted(points), dtype=np.float64).T
        left.plot(steps, values, label=task, color=colors[task], linewidth=1.4)
    all_losses = np.asarray([v for pts in losses.values() for _, v in pts], dtype=np.float64)
    if all_losses.size and np.any(all_losses > 0):
        left.set_yscale("log", nonpositive="mask")
    left.set_title("training loss")
    left.set_xlabel("step")
    left.set_ylabel("loss (mean over logging interval)")
    _legend_or_note(left, "no training losses logged")
    metrics = list(dict.fromkeys(metric for _, metric in dev))
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    for (task, metric), points in dev.items():
        steps, values = np.asarray(sorted(points), dtype=np.float64).T
        m = metrics.index(metric)
        right.plot(
            steps,
            values,
            label=f"{task} ({metric})",
            color=colors[task],
            linestyle=styles[m % len(styles)],
            marker=markers[m % len(markers)],
            markersize=4,
        )
    right.set_title("dev evaluation")
    right.set_xlabel("step")
    right.set_ylabel("metric")
    _legend_or_note(right, "no dev evaluations logged")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    return fig


def _legend_or_note(ax: Axes, note: str) -> None:
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="0.4")


def plot_learning_curves(run_dir: str | os.PathLike[str]) -> Path | None:
    """Draw training loss per task and dev metrics into ``learning_curves.png``.

    Returns the PNG path, or ``None`` when ``metrics.jsonl`` is missing or holds no training
    or dev-evaluation record.
    """
    fig = _learning_curves_figure(run_dir)
    return None if fig is None else _save(fig, Path(run_dir) / "learning_curves.png")


# --------------------------------------------------------------------------- label transfer


def _label_transfer_csv(records: Sequence[_LabelTransfer]) -> str:
    buffer = io.StringIO()
    # csv quotes the labels that need it: Penn Treebank has "," and "''" among its tags.
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["epoch", "step", "source_task", "source_label", "count"]
    writer.writerow([*header, *records[0].target_labels])
    for record in records:
        for label, count, row in zip(
            record.source_labels, record.counts, record.probs, strict=True
        ):
            # An unseen source label has no distribution: blank cells, not a made-up 0.
            cells = [f"{p:.6g}" if math.isfinite(p) else "" for p in row]
            writer.writerow([record.epoch, record.step, record.source, label, count, *cells])
    return buffer.getvalue()


def _target_name(run_dir: Path, records: Sequence[_LabelTransfer]) -> str:
    """The target task's name for titles: the log's own, else ``summary.json``'s (written just
    before :func:`plot_run` at the end of training), else the word "target"."""
    for record in reversed(records):
        if record.target:
            return record.target
    try:
        name = json.loads((run_dir / _SUMMARY_FILE).read_text(encoding="utf-8")).get("target")
    except (OSError, ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) and name else "target"


def _longest(labels: Sequence[str]) -> int:
    return max(len(label) for label in labels)


def _transfer_cmap() -> Colormap:
    # Sequential, white at 0 so the (mostly near-zero) map stays quiet; grey for the rows of
    # source labels with no examples, which no shade of blue means.
    return colormaps["Blues"].with_extremes(bad="0.6")


def _draw_transfer(
    ax: Axes,
    record: _LabelTransfer,
    *,
    fontsize: float,
    show_x: bool,
    show_y: bool,
    annotate: bool,
) -> AxesImage:
    image = ax.imshow(
        np.ma.masked_invalid(record.probs),
        cmap=_transfer_cmap(),
        vmin=0.0,
        vmax=1.0,
        aspect="auto",  # the figure size makes cells square; see _label_transfer_figure
        interpolation="nearest",
    )
    n, m = record.probs.shape
    ax.set_xticks(range(m))
    ax.set_yticks(range(n))
    x_labels = [_literal(x) for x in record.target_labels] if show_x else []
    ax.set_xticklabels(x_labels, rotation=90, fontsize=fontsize)
    ax.set_yticklabels([_literal(y) for y in record.source_labels] if show_y else [],
                       fontsize=fontsize)  # fmt: skip
    ax.tick_params(which="major", length=2, pad=1.5)
    # Thin cell borders let the eye follow one row across 45 mostly white columns.
    ax.set_xticks(np.arange(m + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.tick_params(which="minor", length=0)
    ax.grid(which="minor", color="0.85", linewidth=0.4)
    ax.grid(which="major", visible=False)
    if annotate:
        _annotate(ax, record.probs, fontsize=fontsize - 1)
        for i, count in enumerate(record.counts):
            if count == 0:  # say why the row is grey where there is room to
                ax.text(
                    (m - 1) / 2,
                    i,
                    "no examples",
                    ha="center",
                    va="center",
                    fontsize=fontsize - 1,
                    color="white",
                )
    return image


def _small_enough_to_annotate(records: Sequence[_LabelTransfer]) -> bool:
    return all(
        len(r.source_labels) <= _MAX_ANNOTATED_LABELS
        and len(r.target_labels) <= _MAX_ANNOTATED_LABELS
        for r in records
    )


def _by_source(records: Sequence[_LabelTransfer]) -> dict[str, list[_LabelTransfer]]:
    out: dict[str, list[_LabelTransfer]] = {}
    for record in records:
        out.setdefault(record.source, []).append(record)
    for history in out.values():
        history.sort(key=lambda r: r.epoch)
    return out


def _text_inches(chars: int, fontsize: float) -> float:
    """Rough width of ``chars`` characters of DejaVu Sans at ``fontsize`` points."""
    return chars * 0.62 * fontsize / 72


def _label_transfer_figure(records: Sequence[_LabelTransfer], target: str) -> Figure:
    """Each source's latest map, stacked one source per row (they share the target axis)."""
    shown = [history[-1] for history in _by_source(records).values()]
    annotate = _small_enough_to_annotate(shown)
    fontsize = 8.0
    cell = 0.5 if annotate else 0.2  # inches: an 8 pt tick label needs about 0.15
    n_target = len(shown[0].target_labels)
    # The figure is sized so that cells come out square with aspect="auto": an "equal" aspect
    # leaves whatever the size estimate got wrong as gaps between the panels.
    y_margin = 0.35 + _text_inches(max(_longest(r.source_labels) for r in shown), fontsize)
    x_margin = 0.1 + _text_inches(_longest(shown[0].target_labels), fontsize)
    title = max(_text_inches(len(f"{r.source} → {target} (epoch {r.epoch})"), 10) for r in shown)
    plot_width = max(n_target * cell, title - y_margin / 2)
    rows = [len(r.source_labels) for r in shown]
    fig = _new_figure(
        y_margin + plot_width + 1.3,
        sum(n * cell + x_margin + 0.3 for n in rows) + 0.3,
    )
    axes = fig.subplots(len(shown), 1, squeeze=False, height_ratios=rows)[:, 0]
    image = None
    for ax, record in zip(axes, shown, strict=True):
        image = _draw_transfer(
            ax, record, fontsize=fontsize, show_x=True, show_y=True, annotate=annotate
        )
        ax.set_title(_literal(f"{record.source} → {target} (epoch {record.epoch})"), fontsize=10)
        ax.set_ylabel(f"{record.source} label")
    axes[-1].set_xlabel(f"{target} label")
    assert image is not None
    fig.colorbar(image, ax=list(axes), label="mean P(target label | source label)", shrink=0.8)
    return fig


def _label_transfer_epochs_figure(records: Sequence[_LabelTransfer], target: str) -> Figure:
    """Per source a row of up to six epochs (first and last included), small multiples.

    A row that would pass ``_MAX_WIDTH`` inches (six 45-label maps do) wraps onto further lines
    of that source, so the PNG stays viewable without horizontal scrolling.
    """
    picked = {
        source: [recs[i] for i in _pick_evenly(len(recs), _MAX_EPOCH_PANELS)]
        for source, recs in _by_source(records).items()
    }
    everything = [r for recs in picked.values() for r in recs]
    annotate = _small_enough_to_annotate(everything)
    fontsize = 6.0 if annotate else 5.5
    cell = 0.36 if annotate else 0.125
    panel_width = len(everything[0].target_labels) * cell + 0.08
    per_line = max(1, min(_MAX_EPOCH_PANELS, int(_MAX_WIDTH // panel_width)))
    # (source, its epochs on this line, whether the source's last line)
    lines: list[tuple[str, list[_LabelTransfer], bool]] = []
    for source, recs in picked.items():
        starts = range(0, len(recs), per_line)
        lines += [(source, recs[i : i + per_line], i == starts[-1]) for i in starts]
    ncols = max(len(chunk) for _, chunk, _ in lines)
    y_margin = 0.3 + _text_inches(max(_longest(r.source_labels) for r in everything), fontsize)
    x_margin = 0.08 + _text_inches(_longest(everything[0].target_labels), fontsize)
    title = (fontsize + 1.5) * 1.6 / 72
    rows = [len(chunk[0].source_labels) for _, chunk, _ in lines]
    height = sum(
        n * cell + title + (x_margin if last else 0.0)
        for n, (_, _, last) in zip(rows, lines, strict=True)
    )
    fig = _new_figure(y_margin + ncols * panel_width + 1.0, height + 0.35)
    grid = fig.subplots(len(lines), ncols, squeeze=False, height_ratios=rows)
    image = None
    used: list[Axes] = []
    for r, (source, chunk, last) in enumerate(lines):
        for c in range(ncols):
            ax = grid[r, c]
            if c >= len(chunk):
                ax.remove()
                continue
            used.append(ax)
            record = chunk[c]
            # Target labels under each source's last line only, source labels left of each
            # line only: the panels of a row share both (unless a log changed them).
            image = _draw_transfer(
                ax,
                record,
                fontsize=fontsize,
                show_x=last,
                show_y=c == 0 or record.source_labels != chunk[0].source_labels,
                annotate=annotate,
            )
            ax.set_title(f"epoch {record.epoch}", fontsize=fontsize + 1.5, pad=2)
            if c == 0:
                ax.set_ylabel(source, fontsize=fontsize + 1.5)
    assert image is not None
    fig.colorbar(image, ax=used, label="mean P(target label | source label)", shrink=0.8)
    fig.suptitle(f"label transfer to {target}, by epoch", fontsize=10)
    return fig


def _literal(text: str) -> str:
    """``text`` drawn as written: a ``$`` in a tag (Penn's ``PRP$``, Brown's ``pp$$``) would
    otherwise start matplotlib's math mode, and an unpaired one fails to draw."""
    return text.replace("$", r"\$")


def plot_label_transfer(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Tabulate and draw MetaXT's label transfer maps from ``label_transfer.jsonl``.

    Writes ``label_transfer.csv`` (one row per epoch, source task and source label: its
    example count and its mean probability for each target label, 6 significant digits, blank
    for a label with no examples), ``label_transfer.png`` (each source's latest map) and
    ``label_transfer_epochs.png`` (up to six epochs per source, to see the mapping settle).
    Returns those paths, CSV first, or ``[]`` when the file is missing or holds no complete
    record; a last line cut off mid-write is ignored. Raises :class:`ValueError` naming
    ``file:line`` for a malformed record or one whose target labels differ from the first's.
    """
    folder = Path(run_dir)
    path = folder / LABEL_TRANSFER_FILE
    if not path.is_file():
        return []
    records = _read_label_transfer(path)
    if not records:
        return []
    csv_path = folder / "label_transfer.csv"
    checkpoint.write_text(csv_path, _label_transfer_csv(records))
    target = _target_name(folder, records)
    return [
        csv_path,
        _save(_label_transfer_figure(records, target), folder / "label_transfer.png"),
        _save(_label_transfer_epochs_figure(records, target), folder / "label_transfer_epochs.png"),
    ]


# --------------------------------------------------------------------------- all


def plot_run(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Draw every plot whose input file exists in ``run_dir``; return the files written (the
    PNGs, and ``label_transfer.csv`` before its PNGs)."""
    written = (
        plot_weight_trajectory(run_dir),
        plot_similarity(run_dir),
        plot_learning_curves(run_dir),
    )
    return [path for path in written if path is not None] + plot_label_transfer(run_dir)


def plot_epoch(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The plots worth redrawing after every epoch of a running job (a method's maps); the
    rest are drawn once, by :func:`plot_run`."""
    return plot_label_transfer(run_dir)


# --------------------------------------------------------------------------- benchmarks


def _bench_figure(results: dict[str, Any]) -> Figure | None:
    rows = [r for r in results.get("results", []) if r.get("ratio") is not None]
    if not rows:
        return None
    names = [r["name"] for r in rows]
    ratios = np.array([r["ratio"] for r in rows], dtype=np.float64)
    memory = np.array([r.get("memory_ratio") or np.nan for r in rows], dtype=np.float64)
    colors = {"baseline": "0.5", "peer": "tab:red", "contrast": "tab:orange"}
    fig = _new_figure(10.0, 0.9 + 0.28 * len(rows))
    time_ax, mem_ax = fig.subplots(1, 2, sharey=True, width_ratios=(3, 2))
    y = np.arange(len(rows))
    bar_colors = [colors.get(r["kind"], "tab:blue") for r in rows]
    time_ax.barh(y, ratios, color=bar_colors)
    mem_ax.barh(y, memory, color=bar_colors)
    for ax, values, title in (
        (time_ax, ratios, "step time / plain"),
        (mem_ax, memory, "peak memory / plain"),
    ):
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        for yi, v in zip(y, values, strict=True):
            if np.isfinite(v):
                ax.annotate(
                    f"{v:.2f}x",
                    (v, yi),
                    xytext=(3, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=7,
                )
    time_ax.set_yticks(y, names, fontsize=8)
    time_ax.invert_yaxis()
    work = results.get("workload", {})
    fig.suptitle(
        f"pyxtask bench: {work.get('encoder', '?')} encoder, T={work.get('num_tasks', '?')}, "
        f"{work.get('batch', '?')}x{work.get('seq', '?')} per task, {work.get('device', '?')}"
        f"{' bf16' if work.get('bf16') else ''}  (blue: pyxtask, red: peers)",
        fontsize=10,
    )
    return fig


def plot_bench(results_json: str | os.PathLike[str]) -> Path | None:
    """``bench.png`` beside ``pyxtask bench``'s ``bench.json``: each contender's step time and
    peak memory as ratios to the plain step (None when nothing was timed)."""
    path = Path(results_json)
    fig = _bench_figure(json.loads(path.read_text(encoding="utf-8")))
    return None if fig is None else _save(fig, path.with_suffix(".png"))
