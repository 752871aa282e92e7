"""Tests for pyxtask.plots on hand-written run folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pyxtask import plots

TASKS = ["target", "brown.pos", "brown-genre_x"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_weights(run: Path, tasks: list[str], w_rows: list[list[float]], omega_rows=None):
    omega_rows = w_rows if omega_rows is None else omega_rows
    header = ["update", "epoch", "step"] + [f"w:{t}" for t in tasks] + [f"omega:{t}" for t in tasks]
    lines = [",".join(header)]
    for k, (w, om) in enumerate(zip(w_rows, omega_rows, strict=True)):
        cells = [k, k // 3, 10 * k, *w, *om]
        lines.append(",".join(str(c) for c in cells))
    (run / "weights.csv").write_text("\n".join(lines) + "\n")


def _simplex(values: list[float]) -> list[float]:
    total = sum(values)
    return [v / total for v in values]


def _cosine(n: int, seed: int) -> list[list[float | None]]:
    rng = np.random.default_rng(seed)
    m = rng.uniform(-1, 1, (n, n))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    return m.tolist()


def _write_similarity(run: Path, count: int, tasks: list[str] = TASKS) -> None:
    lines = []
    for k in range(1, count + 1):
        rec = {"update": k, "epoch": k // 4, "step": 12 * k, "tasks": tasks}
        rec["cosine"] = _cosine(len(tasks), k)
        rec["similarity"] = [1.0] + [0.1] * (len(tasks) - 1)
        lines.append(json.dumps(rec))
    (run / "similarity.jsonl").write_text("\n".join(lines) + "\n")


def _write_metrics(run: Path) -> None:
    records = []
    for step in (10, 20, 30, 40):
        for i, task in enumerate(TASKS):
            loss = 2.0 / (step * (i + 1))
            records.append(
                {"kind": "train", "step": step, "epoch": 0, "task": task, "loss": loss, "lr": 5e-5}
            )
    for epoch, step in enumerate((20, 40)):
        records.append(
            {
                "kind": "eval",
                "split": "dev",
                "epoch": epoch,
                "step": step,
                "task": "target",
                "metric": "accuracy",
                "value": 0.8 + 0.05 * epoch,
            }
        )
        records.append(
            {
                "kind": "eval",
                "split": "dev",
                "epoch": epoch,
                "step": step,
                "task": "brown.pos",
                "metric": "macro_f1",
                "value": 0.6 + 0.1 * epoch,
            }
        )
        records.append(
            {
                "kind": "eval",
                "split": "test",
                "epoch": epoch,
                "step": step,
                "task": "target",
                "metric": "accuracy",
                "value": 0.5,
            }
        )
    records.append({"kind": "checkpoint", "path": "x.pt"})
    text = "\n".join(json.dumps(r) for r in records)
    (run / "metrics.jsonl").write_text(text.replace("\n", "\n\n", 1) + "\n")


def _assert_png(path: Path | None, name: str) -> None:
    assert path is not None
    assert path.name == name
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000
    assert not path.with_name(name + ".tmp").exists()


def _wide_weights(run: Path, rows: int = 5) -> None:
    w = [_simplex([1.0, 10 ** -(k % 4), 1e-4]) for k in range(rows)]
    om = [_simplex([1.0, 0.5, 0.4 + 0.01 * k]) for k in range(rows)]
    _write_weights(run, TASKS, w, om)


# --------------------------------------------------------------------------- weights


def test_weight_figure_has_one_line_per_task_per_panel(tmp_path):
    _wide_weights(tmp_path)
    fig = plots._weights_figure(tmp_path)
    assert fig is not None
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert [line.get_label() for line in ax.lines] == TASKS
        np.testing.assert_array_equal(ax.lines[0].get_xdata(), np.arange(5))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == TASKS
    # the target is drawn thicker than every other task
    widths = [line.get_linewidth() for line in fig.axes[0].lines]
    assert widths[0] > max(widths[1:])
    assert "loss factors" in fig.axes[0].get_title()
    assert "ω" in fig.axes[1].get_title()


def test_weight_values_are_plotted_per_panel(tmp_path):
    w = [[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]]
    om = [[0.2, 0.3, 0.5], [0.1, 0.6, 0.3]]
    _write_weights(tmp_path, TASKS, w, om)
    fig = plots._weights_figure(tmp_path)
    assert fig is not None
    left, right = fig.axes
    np.testing.assert_allclose(left.lines[2].get_ydata(), [0.2, 0.2])
    np.testing.assert_allclose(right.lines[1].get_ydata(), [0.3, 0.6])


def test_log_scale_switches_on_wide_range_only(tmp_path):
    _wide_weights(tmp_path)
    fig = plots._weights_figure(tmp_path)
    assert fig is not None
    # w spans 1e-4..1 (log), omega stays within a factor 3 (linear)
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "linear"]


def test_single_row_weights_plot(tmp_path):
    _write_weights(tmp_path, TASKS, [_simplex([1.0, 1.0, 1.0])])
    path = plots.plot_weight_trajectory(tmp_path)
    _assert_png(path, "weights.png")


def test_weights_png_written(tmp_path):
    _wide_weights(tmp_path)
    _assert_png(plots.plot_weight_trajectory(tmp_path), "weights.png")


def test_missing_weights_gives_none(tmp_path):
    assert plots.plot_weight_trajectory(tmp_path) is None
    assert not (tmp_path / "weights.png").exists()


def test_weights_row_with_wrong_column_count(tmp_path):
    _wide_weights(tmp_path, rows=3)
    with (tmp_path / "weights.csv").open("a") as handle:
        handle.write("3,1,30,0.5,0.5\n")
    with pytest.raises(ValueError, match=r"weights\.csv:5: "):
        plots.plot_weight_trajectory(tmp_path)


def test_weights_bad_header(tmp_path):
    (tmp_path / "weights.csv").write_text("update,epoch,step,w:a,omega:b\n0,0,0,1,1\n")
    with pytest.raises(ValueError, match=r"weights\.csv:1: "):
        plots.plot_weight_trajectory(tmp_path)


# --------------------------------------------------------------------------- similarity


def _heatmap_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def test_similarity_one_heatmap_per_update(tmp_path):
    _write_similarity(tmp_path, 3)
    fig = plots._similarity_figure(tmp_path)
    assert fig is not None
    heatmaps = _heatmap_axes(fig)
    assert len(heatmaps) == 3
    assert len(fig.axes) == 4  # plus the shared colour bar
    assert heatmaps[1].get_title() == "update 2 (epoch 0, step 24)"
    image = heatmaps[0].images[0]
    assert image.get_cmap().name.startswith("RdBu_r")
    assert image.get_clim() == (-1.0, 1.0)
    # 3x3 matrix: every cell annotated with two decimals
    texts = [t.get_text() for t in heatmaps[0].texts]
    assert len(texts) == 9
    assert "1.00" in texts
    assert [t.get_text() for t in heatmaps[0].get_yticklabels()] == TASKS


def test_similarity_caps_at_twelve_with_first_and_last(tmp_path):
    _write_similarity(tmp_path, 20)
    fig = plots._similarity_figure(tmp_path)
    assert fig is not None
    titles = [ax.get_title() for ax in _heatmap_axes(fig)]
    assert len(titles) == 12
    assert titles[0].startswith("update 1 ")
    assert titles[-1].startswith("update 20 ")
    updates = [int(t.split()[1]) for t in titles]
    assert updates == sorted(set(updates))


def test_similarity_large_matrix_not_annotated(tmp_path):
    _write_similarity(tmp_path, 2, tasks=[f"task{i}" for i in range(9)])
    fig = plots._similarity_figure(tmp_path)
    assert fig is not None
    assert all(not ax.texts for ax in _heatmap_axes(fig))


def test_similarity_null_entries_are_blank(tmp_path):
    cosine = [[1.0, None, 0.5], [None, None, None], [0.5, None, 1.0]]
    rec = {"update": 1, "epoch": 0, "step": 12, "tasks": TASKS, "cosine": cosine}
    (tmp_path / "similarity.jsonl").write_text(json.dumps(rec) + "\n")
    fig = plots._similarity_figure(tmp_path)
    assert fig is not None
    data = _heatmap_axes(fig)[0].images[0].get_array()
    assert np.ma.is_masked(data)
    assert data.mask.sum() == 5
    assert data[0, 2] == pytest.approx(0.5)
    assert len(_heatmap_axes(fig)[0].texts) == 4
    _assert_png(plots.plot_similarity(tmp_path), "similarity.png")


def test_similarity_png_written(tmp_path):
    _write_similarity(tmp_path, 5)
    _assert_png(plots.plot_similarity(tmp_path), "similarity.png")


def test_similarity_missing_or_empty_gives_none(tmp_path):
    assert plots.plot_similarity(tmp_path) is None
    (tmp_path / "similarity.jsonl").write_text("\n")
    assert plots.plot_similarity(tmp_path) is None
    assert not (tmp_path / "similarity.png").exists()


def test_similarity_malformed_line_names_file_and_line(tmp_path):
    _write_similarity(tmp_path, 2)
    with (tmp_path / "similarity.jsonl").open("a") as handle:
        handle.write('{"update": 3, "cosine": [\n')
    with pytest.raises(ValueError, match=r"similarity\.jsonl:3: not valid JSON"):
        plots.plot_similarity(tmp_path)


def test_similarity_non_square_matrix_rejected(tmp_path):
    rec = {"update": 1, "epoch": 0, "step": 1, "tasks": TASKS, "cosine": [[1.0, 0.0]]}
    (tmp_path / "similarity.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"similarity\.jsonl:1: "):
        plots.plot_similarity(tmp_path)


# --------------------------------------------------------------------------- learning curves


def test_learning_curves_panels(tmp_path):
    _write_metrics(tmp_path)
    fig = plots._learning_curves_figure(tmp_path)
    assert fig is not None
    left, right = fig.axes
    assert [line.get_label() for line in left.lines] == TASKS
    assert left.get_yscale() == "log"
    np.testing.assert_allclose(left.lines[0].get_xdata(), [10, 20, 30, 40])
    np.testing.assert_allclose(left.lines[1].get_ydata(), [2.0 / (s * 2) for s in (10, 20, 30, 40)])
    # dev only (the test-split record is left out), metric names in the legend
    labels = [t.get_text() for t in right.get_legend().get_texts()]
    assert labels == ["target (accuracy)", "brown.pos (macro_f1)"]
    np.testing.assert_allclose(right.lines[0].get_ydata(), [0.8, 0.85])


def test_learning_curves_png_written(tmp_path):
    _write_metrics(tmp_path)
    _assert_png(plots.plot_learning_curves(tmp_path), "learning_curves.png")


def test_learning_curves_missing_or_empty_gives_none(tmp_path):
    assert plots.plot_learning_curves(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text("")
    assert plots.plot_learning_curves(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text('{"kind": "unknown", "x": 1}\n')
    assert plots.plot_learning_curves(tmp_path) is None


def test_metrics_malformed_line_names_file_and_line(tmp_path):
    good = json.dumps({"kind": "train", "step": 1, "epoch": 0, "task": "target", "loss": 1.0})
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n\n{{not json\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not valid JSON"):
        plots.plot_learning_curves(tmp_path)


def test_metrics_record_missing_field(tmp_path):
    bad = json.dumps({"kind": "train", "step": 1, "epoch": 0, "task": "target"})
    (tmp_path / "metrics.jsonl").write_text(bad + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1: 'loss'"):
        plots.plot_learning_curves(tmp_path)


# --------------------------------------------------------------------------- run


def test_plot_run_writes_what_applies(tmp_path):
    assert plots.plot_run(tmp_path) == []
    _wide_weights(tmp_path)
    _write_metrics(tmp_path)
    written = plots.plot_run(tmp_path)
    assert [p.name for p in written] == ["weights.png", "learning_curves.png"]
    _write_similarity(tmp_path, 4)
    written = plots.plot_run(tmp_path)
    assert [p.name for p in written] == ["weights.png", "similarity.png", "learning_curves.png"]
    for path in written:
        _assert_png(path, path.name)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == []
