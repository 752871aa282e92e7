"""Every score between a target and its candidate sources: the computation behind
``pyxtask similarity``, its ranked table, JSON file and heatmap."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pyxtask import checkpoint
from pyxtask.config import ConfigError, TAWTConfig, from_mapping
from pyxtask.data import corpora
from pyxtask.similarity import features as feat
from pyxtask.similarity import scores
from pyxtask.tasks import TaskData, build_model, load_tasks

__all__ = ["SCORES", "SimilarityResult", "compute", "write_outputs"]

#: The scores, in table order: name -> what it is (higher means more similar for each).
SCORES: dict[str, str] = {
    "covariance": "Wu-Zhang-Re eq. 6 on the encoder features (99 % of the spectrum)",
    "covariance-normalized": "eq. 6 divided by the geometric mean of the self-scores",
    "gradient-cosine": "cosine of the encoder gradients under linear probes (TAWT)",
    "leep": "LEEP of the target labels under the source probe's soft outputs",
    "logme": "LogME of the target labels on the source probe's logits",
}


@dataclass
class SimilarityResult:
    """Task-by-task matrices (row: the task scored as a target, column: the source) and the
    settings they were computed with. Task 0 is the target."""

    tasks: list[str]
    kinds: list[str]
    matrices: dict[str, list[list[float]]]
    #: Each task's LogME on the plain encoder features (no source involved).
    logme_encoder: list[float]
    settings: dict[str, Any]
    seconds: float = 0.0
    examples: list[int] = field(default_factory=list)

    @property
    def target(self) -> str:
        return self.tasks[0]

    def source_scores(self) -> dict[str, dict[str, float]]:
        """Every score of each source for the target (row 0 of each matrix)."""
        return {
            source: {name: self.matrices[name][0][j] for name in SCORES}
            for j, source in enumerate(self.tasks)
            if j > 0
        }

    def ranks(self) -> dict[str, dict[str, int]]:
        """Each source's rank under each score: 1 + the number of sources that score higher
        (tied sources share a rank: tasks on the same sentences tie on covariance)."""
        per_source = self.source_scores()
        return {
            source: {
                name: 1 + sum(other[name] > mine[name] for other in per_source.values())
                for name in SCORES
            }
            for source, mine in per_source.items()
        }

    def table(self) -> str:
        """The sources ranked by their mean rank over the scores; each cell ``value (rank)``."""
        per_source, ranks = self.source_scores(), self.ranks()
        order = sorted(per_source, key=lambda s: (np.mean(list(ranks[s].values())), s))
        width = max(len("source"), *(len(s) for s in order))
        head = f"{'source':<{width}}  " + "  ".join(f"{n:>21}" for n in SCORES) + "  mean rank"
        lines = [f"target {self.target} ({self.kinds[0]}), sources ranked by mean rank:", head]
        for source in order:
            cells = "  ".join(
                f"{per_source[source][n]:>15.4f} ({ranks[source][n]:>2})" for n in SCORES
            )
            lines.append(
                f"{source:<{width}}  {cells}  {np.mean(list(ranks[source].values())):9.1f}"
            )
        lines.append(
            f"LogME of {self.target} on the encoder's own features: {self.logme_encoder[0]:.4f}"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "sources": self.tasks[1:],
            "kinds": dict(zip(self.tasks, self.kinds, strict=True)),
            "scores": self.source_scores(),
            "ranks": self.ranks(),
            "matrices": {"tasks": self.tasks, **self.matrices},
            "logme_encoder": dict(zip(self.tasks, self.logme_encoder, strict=True)),
            "definitions": SCORES,
            "examples": dict(zip(self.tasks, self.examples, strict=True)),
            "settings": self.settings,
            "seconds": round(self.seconds, 1),
        }


@dataclass
class _TaskState:
    task: TaskData
    items: list[Any]
    key: str
    features: feat.TaskFeatures | None = None
    probe: tuple[torch.Tensor, torch.Tensor] | None = None
    gradient: torch.Tensor | None = None


def _load(
    target: str, sources: Sequence[str], *, encoder: str, max_length: int, seed: int, size: int
) -> tuple[Any, list[TaskData]]:
    if not sources:
        raise ConfigError("similarity: give at least one source task (--sources S1,S2,...)")
    if len(sources) + 1 > scores.MAX_TASKS:
        raise ConfigError(f"similarity: at most {scores.MAX_TASKS - 1} sources at once")
    config = from_mapping(
        {
            "target": target,
            "sources": list(sources),
            "encoder": encoder,
            "target_size": size if _has_at_least(target, size) else "all",
            "source_size": size if all(_has_at_least(s, size) for s in sources) else "all",
            "dev_size": 1,
            "test_size": 1,
            "paradigm": "normalized-joint",
            "method": "fixed",
            "max_length": max_length,
            "seed": seed,
            "device": "cpu",
        },
        source="similarity",
    )
    tasks = load_tasks(config)
    for task in tasks:  # the same seeded sample as training's, of `size` examples
        task.train = [task.train[i] for i in corpora.sample_indices(len(task.train), size, seed)]
    return config, tasks


def _has_at_least(task: str, size: int) -> bool:
    """Whether ``task`` is a prepared named corpus with ``size`` training sentences (then
    only the sample is read; otherwise the whole split is, and sampled here)."""
    corpus = task.split(".", maxsplit=1)[0]
    if corpus not in corpora.list_corpora():
        return False
    card = corpora.cached_card(corpus)
    return card is not None and int(card.splits["train"]["sentences"]) >= size


def _key(fingerprint: str, state: _TaskState, settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(fingerprint.encode())
    digest.update(
        json.dumps(
            [
                state.task.name,
                state.task.kind,
                list(state.task.labels.labels),
                settings["max_length"],
            ]
        ).encode()
    )
    for item in state.items:
        digest.update(repr((item.input_ids, item.labels)).encode())
    return digest.hexdigest()[:24]


def compute(
    target: str,
    sources: Sequence[str],
    *,
    encoder: str = "minilm",
    size: int = 400,
    max_length: int = 128,
    probe_size: int = TAWTConfig().probe_size,
    probe_batches: int = 4,
    probe_points: int = 4000,
    keep: float = 0.99,
    seed: int = 0,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> SimilarityResult:
    """Every score of :data:`SCORES` between all tasks, from ``size`` seeded training examples
    per task (token tasks: every labelled word of them), features and gradients cached in
    ``cache`` (``None``: no cache)."""
    started = time.perf_counter()
    for name, value, low in (
        ("size", size, 2),
        ("probe_size", probe_size, 1),
        ("probe_batches", probe_batches, 1),
        ("probe_points", probe_points, 2),
    ):
        if value < low:
            raise ConfigError(f"similarity: {name} = {value} must be >= {low}")
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"similarity: keep = {keep} must be in (0, 1]")
    settings = dict(
        encoder=encoder,
        size=size,
        max_length=max_length,
        probe_size=probe_size,
        probe_batches=probe_batches,
        probe_points=probe_points,
        keep=keep,
        seed=seed,
    )
    config, tasks = _load(
        target, sources, encoder=encoder, max_length=max_length, seed=seed, size=size
    )
    store = feat.FeatureCache(cache)
    with tempfile.TemporaryDirectory(prefix="pyxtask-similarity-") as work:
        model = build_model(tasks, config, Path(work)).eval()
    fingerprint = feat.encoder_fingerprint(model)
    states = []
    for task in tasks:
        state = _TaskState(task, feat.tokenize(task, model, max_length), "")
        state.key = _key(fingerprint, state, settings)
        states.append(state)
    bar = tqdm(total=3 * len(states), desc="similarity", disable=not progress, unit="step")
    for state in states:
        bar.set_postfix_str(f"features {state.task.name}")
        encode = partial(feat.encode_task, model, state.task, state.items)
        state.features = _cached(store, "features", state.key, encode)
        bar.update()
    for state in states:
        bar.set_postfix_str(f"probe {state.task.name}")
        fit = partial(feat.fit_probe, _features_of(state), probe_points, seed)
        state.probe = _cached(store, "probe", f"{state.key}-p{probe_points}", fit)
        bar.update()
    for state in states:
        bar.set_postfix_str(f"gradient {state.task.name}")
        weight, bias = _probe_of(state)
        gradient = partial(
            feat.probe_gradient,
            model,
            state.task,
            state.items,
            weight,
            bias,
            probe_size=probe_size,
            batches=probe_batches,
            seed=seed,
        )
        key = f"{state.key}-p{probe_points}-b{probe_size}x{probe_batches}"
        state.gradient = _cached(store, "gradient", key, gradient)
        bar.update()
    bar.close()
    result = _scores(states, keep)
    result.settings = settings
    result.seconds = time.perf_counter() - started
    return result


def _cached(store: feat.FeatureCache, kind: str, key: str, make: Callable[[], Any]) -> Any:
    value = store.get(kind, key)
    if value is None:
        value = make()
        store.put(kind, key, value.to_dict() if hasattr(value, "to_dict") else value)
        return value
    return feat.TaskFeatures(**value) if kind == "features" else value


def _features_of(state: _TaskState) -> feat.TaskFeatures:
    if state.features is None:
        raise RuntimeError(f"{state.task.name}: features are computed before probes")
    return state.features


def _probe_of(state: _TaskState) -> tuple[torch.Tensor, torch.Tensor]:
    if state.probe is None:
        raise RuntimeError(f"{state.task.name}: the probe is fitted before its gradient")
    return state.probe


def _scores(states: list[_TaskState], keep: float) -> SimilarityResult:
    features = [_features_of(s) for s in states]
    n = len(states)
    matrices: dict[str, list[list[float]]] = {
        "covariance": scores.covariance_similarity_matrix(
            [f.points for f in features], keep
        ).tolist(),
        "covariance-normalized": scores.covariance_similarity_matrix(
            [f.points for f in features], keep, normalized=True
        ).tolist(),
        "gradient-cosine": scores.gradient_cosine_matrix(
            torch.stack([s.gradient for s in states if s.gradient is not None])
        ).tolist(),
        "leep": [[0.0] * n for _ in range(n)],
        "logme": [[0.0] * n for _ in range(n)],
    }
    for i, scored in enumerate(features):
        for j, state in enumerate(states):
            weight, bias = _probe_of(state)
            logits = feat.source_outputs(weight, bias, features[j].kind, scored)
            matrices["leep"][i][j] = scores.leep(
                torch.softmax(logits.double(), 1), scored.labels, scored.num_labels
            )
            matrices["logme"][i][j] = scores.logme(logits, scored.labels)
    return SimilarityResult(
        tasks=[s.task.name for s in states],
        kinds=[s.task.kind for s in states],
        matrices=matrices,
        logme_encoder=[scores.logme(f.points, f.labels) for f in features],
        settings={},
        examples=[len(s.items) for s in states],
    )


def write_outputs(result: SimilarityResult, out: str | os.PathLike[str]) -> list[Path]:
    """``similarity.json``, ``similarity.txt`` (the table) and ``similarity.png`` (one heatmap
    per score) in ``out``, each written atomically."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, text_path = folder / "similarity.json", folder / "similarity.txt"
    checkpoint.write_text(json_path, json.dumps(result.to_dict(), indent=2) + "\n")
    checkpoint.write_text(text_path, result.table() + "\n")
    return [json_path, text_path, plot_heatmaps(result, folder / "similarity.png")]


def plot_heatmaps(result: SimilarityResult, path: Path) -> Path:
    """One task-by-task heatmap per score (row: task scored as a target; column: source).

    LEEP and LogME are log-likelihoods of the row's labels, whose scale changes from row to
    row (more labels, lower values): their colours are scaled per row, so that each row shows
    which source its task prefers; the numbers are the values themselves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    n = len(result.tasks)
    cell = max(0.4, min(0.75, 7.0 / n))
    side = n * cell + 1.8
    fig = Figure(figsize=(3 * side, 2 * side + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    labels = [t if len(t) <= 22 else t[:21] + "..." for t in result.tasks]
    axes = fig.subplots(2, 3, squeeze=False).ravel()
    for ax, (name, definition) in zip(axes, SCORES.items(), strict=False):
        matrix = np.asarray(result.matrices[name], dtype=float)
        per_row = name in ("leep", "logme")
        shown = _row_scaled(matrix) if per_row else matrix
        image = ax.imshow(shown, cmap="viridis")
        if not per_row:
            fig.colorbar(image, ax=ax, shrink=0.8)
        note = " (colour scaled per row)" if per_row else ""
        ax.set_title(textwrap.fill(f"{name}: {definition}{note}", 44), fontsize=7)
        ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        ax.set_xlabel("source", fontsize=7)
        ax.set_ylabel("scored as target", fontsize=7)
        if n <= 12:
            for (i, j), value in np.ndenumerate(matrix):
                dark = shown[i, j] < np.nanmin(shown) + 0.5 * (np.nanmax(shown) - np.nanmin(shown))
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=5.5,
                    color="white" if dark else "black",
                )
    for ax in axes[len(SCORES) :]:
        ax.set_axis_off()
    fig.suptitle(f"pyxtask similarity: target {result.target}", fontsize=9)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _row_scaled(matrix: np.ndarray) -> np.ndarray:
    """Each row mapped to [0, 1] by its off-diagonal range (the diagonal, a probe on its own
    training examples, would otherwise take the whole range), clipped."""
    off = matrix.copy()
    if len(matrix) > 2:
        np.fill_diagonal(off, np.nan)
    low = np.nanmin(off, axis=1, keepdims=True)
    span = np.nanmax(off, axis=1, keepdims=True) - low
    scaled: np.ndarray = np.clip((matrix - low) / np.where(span > 0, span, 1.0), 0.0, 1.0)
    return scaled
