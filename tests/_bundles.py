"""Tiny trained runs and their exported bundles, shared by the export, tagger and server tests.

A run is trained for real (tiny random BERT, synthetic tasks: a target whose tag or label is a
fixed function of the words, one source) in a couple of seconds; its bundle is exported
without measuring on a named corpus (the tasks are synthetic).
"""

import random
from pathlib import Path

import transformers

from pyxtask.config import TrainConfig
from pyxtask.data import LabeledText, LabelMap, TaggedSentence
from pyxtask.export import export_run
from pyxtask.tasks import TaskData
from pyxtask.trainer import Trainer

transformers.utils.logging.disable_progress_bar()

VOCAB = 40


def words(rng, low=3, high=14):
    # Some words outside the tiny vocabulary, so they split into many sub-words.
    return tuple(
        f"w{rng.randrange(VOCAB)}" if rng.random() < 0.8 else f"zq{rng.randrange(10**6)}x"
        for _ in range(rng.randint(low, high))
    )


def token_tasks(seed=0, n=48):
    rng = random.Random(seed)
    rule = {f"w{i}": rng.randrange(3) for i in range(VOCAB)}

    def tag(w, labels):
        return labels[rule.get(w, 0)]

    def sentences(name, labels, count, split):
        return [
            TaggedSentence(ws, tuple(tag(w, labels) for w in ws), f"{name}:{split}:{i}")
            for i, ws in enumerate(words(rng) for _ in range(count))
        ]

    target = ["B-X", "I-X", "O"]  # spans: the metric is strict IOB2 F1
    source = ["s0", "s1", "s2"]
    return [
        TaskData(
            "syn.target",
            "token",
            LabelMap(target, name="syn__target"),
            sentences("target", target, n, "train"),
            sentences("target", target, 16, "dev"),
            sentences("target", target, 16, "test"),
        ),
        TaskData(
            "syn.source",
            "token",
            LabelMap(source, name="syn__source"),
            sentences("s", source, n, "train"),
        ),
    ]


def sentence_tasks(seed=0, n=48):
    rng = random.Random(seed)
    labels = ["neg", "neu", "pos"]

    def texts(count, split):
        out = []
        for i in range(count):
            ws = words(rng)
            out.append(
                LabeledText(
                    " ".join(ws),
                    labels[int(ws[0][1:] or 0) % 3 if ws[0][1:].isdigit() else 0],
                    f"{split}:{i}",
                )
            )
        return out

    source = TaskData(
        "syn.source",
        "token",
        LabelMap(["s0", "s1"], name="syn__source"),
        [
            TaggedSentence(ws, tuple("s0" if len(w) < 3 else "s1" for w in ws), f"s:{i}")
            for i, ws in enumerate(words(rng) for _ in range(n))
        ],
    )
    target = TaskData(
        "syn.target",
        "sentence",
        LabelMap(labels, name="syn__target", kind="sentence"),
        texts(n, "train"),
        texts(16, "dev"),
        texts(16, "test"),
    )
    return [target, source]


def train_run(run_dir: Path, kind="token", max_length=16, seed=0):
    tasks = token_tasks(seed) if kind == "token" else sentence_tasks(seed)
    config = TrainConfig(
        target="syn.target",
        sources=["syn.source"],
        encoder="tiny",
        paradigm="normalized-joint",
        method="fixed",
        epochs=2,
        batch_size=8,
        lr=2e-3,
        max_length=max_length,
        seed=seed,
        device="cpu",
        output=str(run_dir),
    )
    Trainer(config, run_dir, progress=False, tasks=tasks).fit()
    return tasks


def make_bundle(tmp_path: Path, kind="token", max_length=16, **export):
    """(run_dir, bundle_dir, tasks) of a freshly trained tiny run."""
    run_dir = tmp_path / f"run-{kind}"
    tasks = train_run(run_dir, kind, max_length)
    bundle = tmp_path / f"bundle-{kind}"
    export_run(run_dir, bundle, measure=False, **export)
    return run_dir, bundle, tasks
