"""Tests for pyxtask.plots on hand-written run folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image as mpimg
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


# --------------------------------------------------------------------------- label transfer

# Penn Treebank's punctuation tags need CSV quoting (",") or look like quotes ("''", "``").
PENN = ["NN", "NNS", "VB", ",", "''", "``", "-LRB-", "."]


def _six_digits(value: float) -> float:
    # What the CSV keeps; writing such values makes the round trip exact.
    return float(f"{value:.6g}")


def _transfer_record(epoch, source, labels, targets, seed, *, zero_rows=()):
    rng = np.random.default_rng(seed)
    rows = [[_six_digits(v) for v in rng.dirichlet(np.ones(len(targets)))] for _ in labels]
    counts = [int(c) for c in rng.integers(1, 300, len(labels))]
    for i in zero_rows:
        rows[i] = [None] * len(targets)
        counts[i] = 0
    return {
        "epoch": epoch,
        "step": 63 * (epoch + 1),
        "source": source,
        "source_labels": labels,
        "target_labels": targets,
        "map": rows,
        "counts": counts,
    }


LT_SOURCES = {"brown.pos": ["NOUN", "VERB", "PUNCT"], "conll.chunk": ["B-NP", "I-NP"]}


def _write_label_transfer(
    run: Path, epochs: int = 3, targets=PENN, sources=LT_SOURCES, zero_rows=()
) -> list[dict]:
    records = [
        _transfer_record(epoch, source, labels, targets, 10 * epoch + k, zero_rows=zero_rows)
        for epoch in range(epochs)
        for k, (source, labels) in enumerate(sources.items())
    ]
    (run / "label_transfer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def _read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_label_transfer_csv_round_trips(tmp_path):
    records = _write_label_transfer(tmp_path)
    written = plots.plot_label_transfer(tmp_path)
    assert [p.name for p in written] == [
        "label_transfer.csv",
        "label_transfer.png",
        "label_transfer_epochs.png",
    ]
    rows = _read_csv(written[0])
    assert rows[0] == ["epoch", "step", "source_task", "source_label", "count", *PENN]
    assert len(rows) == 1 + 3 * (3 + 2)
    expected = [
        [rec["epoch"], rec["step"], rec["source"], label, count, row]
        for rec in records
        for label, count, row in zip(rec["source_labels"], rec["counts"], rec["map"], strict=True)
    ]
    for row, (epoch, step, source, label, count, probs) in zip(rows[1:], expected, strict=True):
        assert row[:5] == [str(epoch), str(step), source, label, str(count)]
        assert [float(cell) for cell in row[5:]] == probs
    assert not list(tmp_path.glob("*.tmp*"))


def test_label_transfer_pngs_grow_with_label_count(tmp_path):
    few, many = tmp_path / "few", tmp_path / "many"
    for run, targets in ((few, ["pos", "neg", "neu"]), (many, [f"T{i}" for i in range(40)])):
        run.mkdir()
        _write_label_transfer(run, targets=targets)
        _, heatmap, epochs = plots.plot_label_transfer(run)
        _assert_png(heatmap, "label_transfer.png")
        _assert_png(epochs, "label_transfer_epochs.png")
    for name in ("label_transfer.png", "label_transfer_epochs.png"):
        small = mpimg.imread(few / name)
        large = mpimg.imread(many / name)
        assert small.ndim == large.ndim == 3
        assert min(small.shape[:2]) > 200
        assert large.shape[1] > 1.5 * small.shape[1]


def test_label_transfer_latest_epoch_per_source(tmp_path):
    _write_label_transfer(tmp_path, epochs=3, targets=["pos", "neg", "neu"])
    (tmp_path / "summary.json").write_text(json.dumps({"target": "sst2"}))
    records = plots._read_label_transfer(tmp_path / "label_transfer.jsonl")
    fig = plots._label_transfer_figure(records, plots._target_name(tmp_path, records))
    heatmaps = _heatmap_axes(fig)
    assert [ax.get_title() for ax in heatmaps] == [
        "brown.pos → sst2 (epoch 2)",
        "conll.chunk → sst2 (epoch 2)",
    ]
    assert [t.get_text() for t in heatmaps[0].get_yticklabels()] == LT_SOURCES["brown.pos"]
    assert [t.get_text() for t in heatmaps[0].get_xticklabels()] == ["pos", "neg", "neu"]
    assert all(t.get_rotation() == 90 for t in heatmaps[0].get_xticklabels())
    image = heatmaps[0].images[0]
    assert image.get_clim() == (0.0, 1.0)
    np.testing.assert_allclose(image.get_array(), records[4].probs)  # epoch 2, brown.pos
    assert len(heatmaps[0].texts) == 9  # a 3x3 map is annotated
    assert len(fig.axes) == 3  # plus the colour bar


def test_label_transfer_target_name(tmp_path):
    _write_label_transfer(tmp_path, epochs=1)
    records = plots._read_label_transfer(tmp_path / "label_transfer.jsonl")
    assert plots._target_name(tmp_path, records) == "target"
    (tmp_path / "summary.json").write_text("[1, 2]")
    assert plots._target_name(tmp_path, records) == "target"
    (tmp_path / "summary.json").write_text(json.dumps({"target": "ptb.pos"}))
    assert plots._target_name(tmp_path, records) == "ptb.pos"
    rec = _transfer_record(0, "brown.pos", ["NOUN"], PENN, 0)
    rec["target"] = "wsj.pos"
    (tmp_path / "label_transfer.jsonl").write_text(json.dumps(rec) + "\n")
    records = plots._read_label_transfer(tmp_path / "label_transfer.jsonl")
    assert plots._target_name(tmp_path, records) == "wsj.pos"


def test_label_transfer_large_map_not_annotated(tmp_path):
    sources = {"brown.pos": [f"S{i}" for i in range(17)]}
    _write_label_transfer(tmp_path, targets=[f"T{i}" for i in range(45)], sources=sources)
    records = plots._read_label_transfer(tmp_path / "label_transfer.jsonl")
    fig = plots._label_transfer_figure(records, "ptb.pos")
    (ax,) = _heatmap_axes(fig)
    assert not ax.texts
    assert len(ax.get_xticklabels()) == 45
    assert len(ax.get_yticklabels()) == 17


def test_label_transfer_epochs_grid_picks_evenly(tmp_path):
    _write_label_transfer(tmp_path, epochs=10, targets=["pos", "neg", "neu"])
    records = plots._read_label_transfer(tmp_path / "label_transfer.jsonl")
    fig = plots._label_transfer_epochs_figure(records, "sst2")
    heatmaps = _heatmap_axes(fig)
    titles = [ax.get_title() for ax in heatmaps]
    # one row per source, six epochs each, first and last included
    assert len(titles) == 12
    assert titles[:6] == titles[6:]
    assert titles[0] == "epoch 0"
    assert titles[5] == "epoch 9"
    assert [ax.get_ylabel() for ax in heatmaps[::6]] == list(LT_SOURCES)
    # source labels only left of each row; each source's row has its target labels
    assert [bool(ax.get_yticklabels()[0].get_text()) for ax in heatmaps[:6]] == [True] + [False] * 5
    assert heatmaps[0].get_xticklabels()[0].get_text() == "pos"
    assert heatmaps[6].get_xticklabels()[0].get_text() == "pos"


def test_label_transfer_epochs_grid_wraps_wide_maps(tmp_path):
    _write_label_transfer(tmp_path, epochs=6, targets=[f"T{i}" for i in range(45)])
    records = plots._read_label_transfer(tmp_path / "label_transfer.jsonl")
    fig = plots._label_transfer_epochs_figure(records, "ptb.pos")
    heatmaps = _heatmap_axes(fig)
    assert len(heatmaps) == 12
    assert fig.get_figwidth() <= plots._MAX_WIDTH + 3
    # three 45-label maps per line: each source takes two lines, its labels under the second
    assert [ax.get_title() for ax in heatmaps[:6]] == [f"epoch {e}" for e in range(6)]
    assert [ax.get_ylabel() for ax in heatmaps] == ["brown.pos", "", "", "brown.pos", "", ""] + [
        "conll.chunk",
        "",
        "",
    ] * 2
    assert [bool(ax.get_xticklabels()[0].get_text()) for ax in heatmaps[:6]] == [False] * 3 + [
        True
    ] * 3


def test_label_transfer_zero_count_row_is_blank(tmp_path):
    _write_label_transfer(tmp_path, epochs=2, zero_rows=(1,))
    written = plots.plot_label_transfer(tmp_path)
    assert len(written) == 3
    rows = _read_csv(written[0])
    verb = [row for row in rows[1:] if row[3] == "VERB"]
    assert len(verb) == 2
    assert all(row[4] == "0" and row[5:] == [""] * len(PENN) for row in verb)
    assert all(cell for row in rows[1:] if row[3] == "NOUN" for cell in row)
    records = plots._read_label_transfer(tmp_path / "label_transfer.jsonl")
    data = _heatmap_axes(plots._label_transfer_figure(records, "t"))[0].images[0].get_array()
    assert data.mask[1].all()
    assert not data.mask[0].any()
    for path in written[1:]:
        _assert_png(path, path.name)


def test_label_transfer_truncated_last_line_is_ignored(tmp_path):
    _write_label_transfer(tmp_path)
    plots.plot_label_transfer(tmp_path)
    complete = (tmp_path / "label_transfer.csv").read_text()
    partial = json.dumps(_transfer_record(3, "brown.pos", ["NOUN"], PENN, 7))[:60]
    with (tmp_path / "label_transfer.jsonl").open("a") as handle:
        handle.write(partial)
    assert len(plots.plot_label_transfer(tmp_path)) == 3
    assert (tmp_path / "label_transfer.csv").read_text() == complete
    # ended with a newline it is a malformed record, not a cut-off one
    with (tmp_path / "label_transfer.jsonl").open("a") as handle:
        handle.write("\n")
    with pytest.raises(ValueError, match=r"label_transfer\.jsonl:7: not valid JSON"):
        plots.plot_label_transfer(tmp_path)


def test_label_transfer_missing_or_empty_gives_nothing(tmp_path):
    assert plots.plot_label_transfer(tmp_path) == []
    (tmp_path / "label_transfer.jsonl").write_text("\n")
    assert plots.plot_label_transfer(tmp_path) == []
    (tmp_path / "label_transfer.jsonl").write_text('{"epoch": 0, "step": 63, "sou')
    assert plots.plot_label_transfer(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["label_transfer.jsonl"]


def test_label_transfer_target_labels_must_agree(tmp_path):
    records = _write_label_transfer(tmp_path, epochs=1)
    other = _transfer_record(1, "brown.pos", ["NOUN"], [*PENN[:-1], "SYM"], 3)
    with (tmp_path / "label_transfer.jsonl").open("a") as handle:
        handle.write(json.dumps(other) + "\n")
    with pytest.raises(ValueError, match=r"label_transfer\.jsonl:3: 'target_labels' differ"):
        plots.plot_label_transfer(tmp_path)
    assert len(records) == 2
    assert not (tmp_path / "label_transfer.csv").exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("map", [[0.5, 0.5]], r"'map' must be a 1x8 matrix"),
        ("map", [["0.5"] * 8], r"'map' holds a non-number"),
        ("counts", [1, 2], r"'counts' must be 1 non-negative integers"),
        ("counts", [-1], r"'counts' must be 1 non-negative integers"),
        ("source_labels", [], r"'source_labels' must be a non-empty list of strings"),
        ("epoch", None, r"'epoch' missing"),
    ],
)
def test_label_transfer_malformed_record_names_file_and_line(tmp_path, key, value, message):
    good = _transfer_record(0, "brown.pos", ["NOUN"], PENN, 0)
    bad = {**good, key: value}
    (tmp_path / "label_transfer.jsonl").write_text(f"{json.dumps(good)}\n{json.dumps(bad)}\n")
    with pytest.raises(ValueError, match=rf"label_transfer\.jsonl:2: {message}"):
        plots.plot_label_transfer(tmp_path)


def test_plot_run_draws_label_transfer_when_present(tmp_path):
    _write_metrics(tmp_path)
    assert [p.name for p in plots.plot_run(tmp_path)] == ["learning_curves.png"]
    assert not list(tmp_path.glob("label_transfer*"))
    _write_label_transfer(tmp_path)
    written = plots.plot_run(tmp_path)
    assert [p.name for p in written] == [
        "learning_curves.png",
        "label_transfer.csv",
        "label_transfer.png",
        "label_transfer_epochs.png",
    ]
    for path in written[2:]:
        _assert_png(path, path.name)


def test_label_transfer_tags_with_dollar_signs_are_drawn(tmp_path):
    """Brown's ``pp$$`` and Penn's ``PRP$`` once reached matplotlib's math parser and ended a
    training run at its first epoch's end."""
    record = {
        "epoch": 0,
        "step": 1,
        "source": "brown.pos",
        "target": "wsj-pos.pos",
        "source_labels": ["pp$$", "nn", "$"],
        "target_labels": ["PRP$", "NN", "$"],
        "map": [[0.5, 0.25, 0.25]] * 3,
        "counts": [1, 2, 3],
    }
    (tmp_path / "label_transfer.jsonl").write_text(json.dumps(record) + "\n")
    names = [p.name for p in plots.plot_label_transfer(tmp_path)]
    assert names == ["label_transfer.csv", "label_transfer.png", "label_transfer_epochs.png"]
