"""tawt-samples: one TAWT weight per source example (App. B of the TAWT paper).

- the method's update equals an independent reference from the paper's equations: per-example
  gradients one example at a time (no padding, no hooks), ``s_i`` and the mirror-descent step
  (eq. 2.8) in float64;
- on a synthetic source with a known fraction of corrupted sentences (tags shuffled), the
  corrupted ones end with lower weight (AUROC of weight against cleanness >= 0.8 per seed);
- ``pyxtask train --method tawt-samples --encoder tiny`` and ``pyxtask samples RUN_DIR``;
- a run stopped after an update and resumed ends with the uninterrupted run's weights.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch
import transformers
from sklearn.metrics import roc_auc_score
from torch import nn

from pyxtask import cli
from pyxtask.config import SampleTAWTConfig, TrainConfig
from pyxtask.data import LabelMap, TaggedSentence
from pyxtask.methods.sample_tawt import SampleTAWTMethod, SampleWeights, sample_similarities
from pyxtask.tasks import TaskData
from pyxtask.trainer import Trainer

transformers.utils.logging.disable_progress_bar()

VOCAB = 40
TAGS = ["a", "b", "c", "d"]


# --------------------------------------------------------------------------------------------
# Synthetic tasks: the tag is a fixed function of the word; the source follows the same rule
# under other names, except a known set of corrupted sentences whose tags are shuffled.


def _sentence(rng, rule, labels, name, i, *, corrupt=False):
    words = tuple(f"w{rng.randrange(VOCAB)}" for _ in range(rng.randint(4, 9)))
    tags = [labels[rule[w]] for w in words]
    if corrupt:
        tags = [rng.choice(labels) for _ in words]
    return TaggedSentence(words, tuple(tags), f"{name}:{i}")


def corrupted_tasks(seed, n_target=24, n_source=64, fraction=0.3, n_eval=16):
    """[target, source] and the source's corrupted sentence indices."""
    rng = random.Random(seed)
    rule = {f"w{i}": rng.randrange(len(TAGS)) for i in range(VOCAB)}
    corrupted = set(rng.sample(range(n_source), int(fraction * n_source)))
    source_tags = [f"s{t}" for t in TAGS]

    def task(name, labels, n, bad=frozenset(), dev=0):
        make = [_sentence(rng, rule, labels, name, i, corrupt=i in bad) for i in range(n)]
        evals = [_sentence(rng, rule, labels, name, n + i) for i in range(dev)]
        lm = LabelMap(labels, name=name.replace(".", "__"), kind="token")
        return TaskData(name, "token", lm, make, evals, list(evals))

    target = task("syn.target", TAGS, n_target, dev=n_eval)
    source = task("syn.source", source_tags, n_source, corrupted)
    return [target, source], corrupted


def config(**changes):
    base = {
        "target": "syn.target",
        "sources": ["syn.source"],
        "encoder": "tiny",
        "paradigm": "normalized-joint",
        "method": "tawt-samples",
        "epochs": 2,
        "batch_size": 8,
        "eval_batch_size": 64,
        "lr": 3e-3,
        "max_length": 32,
        "dropout": 0.0,
        "seed": 0,
        "device": "cpu",
        "checkpoint_every": 10**6,
        "tawt_samples": SampleTAWTConfig(),
    }
    base.update(changes)
    return TrainConfig(**base)


def trainer(cfg, run_dir, tasks, **kwargs):
    return Trainer(cfg, run_dir, progress=False, tasks=tasks, **kwargs)


# --------------------------------------------------------------------------------------------
# 1. The update against the paper's equations


def reference_update(ctx, p0, similarity, c, lr):
    """Eq. 2.8 on samples from per-example gradients taken one example at a time (float64)."""
    kinds = (nn.Linear, nn.Embedding, nn.LayerNorm)  # layers = "all"
    tensors = [p for m in ctx.model.encoder.modules() if isinstance(m, kinds)
               for p in m.parameters(recurse=False)]  # fmt: skip
    n0 = ctx.sizes[0]
    v = [torch.zeros_like(p, dtype=torch.float64) for p in tensors]
    for i in range(n0):
        loss = ctx.batch_loss(0, [i], per_sample=True).sum() / n0
        for acc, g in zip(v, torch.autograd.grad(loss, tensors, allow_unused=True), strict=True):
            if g is not None:
                acc.add_(g.double())
    v_flat = torch.cat([x.reshape(-1) for x in v])
    s = []
    for t in range(1, ctx.num_tasks):
        for i in range(ctx.sizes[t]):
            loss = ctx.batch_loss(t, [i], per_sample=True).sum()
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            g = torch.cat(
                [(torch.zeros_like(p) if x is None else x).double().reshape(-1)
                 for p, x in zip(tensors, grads, strict=True)]
            )  # fmt: skip
            dot = float(g @ v_flat)
            s.append(dot if similarity == "dot" else dot / (g.norm() * v_flat.norm()).item())
    s = torch.tensor(s, dtype=torch.float64)
    logits = torch.log(p0) + lr * c * s  # w_i exp(-eta g_i), g_i = -c s_i
    return torch.softmax(logits, 0), s


@pytest.mark.parametrize(("similarity", "paradigm"), [("cosine", "normalized-joint"),
                                                       ("dot", "joint")])  # fmt: skip
def test_update_equals_the_papers_equations(tmp_path, similarity, paradigm):
    tasks, _ = corrupted_tasks(0, n_target=6, n_source=14)
    cfg = config(
        paradigm=paradigm,
        epochs=1,
        tawt_samples=SampleTAWTConfig(similarity=similarity, batch_size=5),
    )
    tr = trainer(cfg, tmp_path, tasks)
    tr._setup()
    method = tr.method
    ctx = tr.ctx
    ctx.model.eval()
    p0 = method.sample_weights.p.clone()
    expected, s_ref = reference_update(ctx, p0, similarity, method.c, method.lr_md)
    ctx.model.train()
    method.update(ctx)
    # batch_loss casts the logits to float32: products agree to float32 rounding of the losses.
    s = method._last["similarity"].double()
    torch.testing.assert_close(s, s_ref, rtol=2e-4, atol=1e-6 * float(s_ref.abs().max()))
    torch.testing.assert_close(method.sample_weights.p, expected, rtol=1e-3, atol=0)
    assert math.isclose(float(method.sample_weights.p.sum()), 1.0, rel_tol=1e-12)
    assert all(p.grad is None for p in ctx.model.parameters())
    assert ctx.model.training


def test_sample_weights_start_and_similarities():
    w = SampleWeights([2, 6], "per-task", ["x", "y"])
    assert w.shares() == pytest.approx([0.5, 0.5])
    w = SampleWeights([2, 6], "uniform")
    assert w.shares() == pytest.approx([0.25, 0.75])
    dots = torch.tensor([3.0, -4.0, 0.0])
    s = sample_similarities(dots, torch.tensor([9.0, 4.0, 0.0]), 2.0, "cosine")
    assert s.tolist() == pytest.approx([0.5, -1.0, 0.0])
    with pytest.raises(ValueError, match="similarities for 8"):
        w.update(torch.zeros(3), 1.0, 1.0)


@pytest.mark.parametrize("paradigm", ["normalized-joint", "joint"])
def test_before_its_first_update_the_method_trains_as_fixed_does(tmp_path, paradigm):
    """At uniform weights: the same batches, the same token-mean losses, the same loss scale."""
    tasks, _ = corrupted_tasks(5, n_target=12, n_source=36)
    runs = {}
    for method in ("fixed", "tawt-samples"):
        cfg = config(
            method=method,
            paradigm=paradigm,
            epochs=1,
            tawt_samples=SampleTAWTConfig(update_every=2),  # no update in this one epoch
        )
        runs[method] = trainer(cfg, tmp_path / method, tasks)
        runs[method].fit()
    factors, _ = runs["tawt-samples"].method.weights()
    fixed = runs["fixed"].method.weighting.loss_factors()
    torch.testing.assert_close(factors, fixed, rtol=1e-12, atol=0)
    a = dict(runs["fixed"].ctx.model.named_parameters())
    b = dict(runs["tawt-samples"].ctx.model.named_parameters())
    # fp32 losses summed in another order (per word vs per sentence), then 6 Adam steps.
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert not all(torch.equal(b[n], v) for n, v in a.items())  # same scale, not the same code


SCHEDULES = [(None, 1, [1, 2, 3, 4, 5, 6]), (None, 5, [5]), (2, 3, [2, 5])]


@pytest.mark.parametrize(("first", "every", "expected"), SCHEDULES)
def test_updates_after_first_update_epochs_then_every_update_every(first, every, expected):
    method = SampleTAWTMethod(update_every=every, first_update=first)
    done = []
    method.update = lambda ctx: done.append(ctx.epoch + 1)
    for epoch in range(6):
        method.epoch_end(SimpleNamespace(epoch=epoch), epoch)
    assert done == expected


# --------------------------------------------------------------------------------------------
# 2. Corrupted sentences end with lower weight


@pytest.mark.parametrize("seed", [0, 1])
def test_corrupted_source_sentences_end_with_lower_weight(tmp_path, seed):
    tasks, corrupted = corrupted_tasks(seed, n_target=16, n_source=48, fraction=0.3)
    tr = trainer(config(seed=seed, tawt_samples=SampleTAWTConfig(batch_size=32)), tmp_path, tasks)
    tr.fit()
    p = tr.method.sample_weights.p
    clean = [i not in corrupted for i in range(len(p))]
    assert roc_auc_score(clean, p.numpy()) >= 0.8
    assert tr.method.updates == 2
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-12)


# --------------------------------------------------------------------------------------------
# 3. The command line: train, then the report of a finished run


def write_conll(path, sentences):
    blocks = ["".join(f"{w}\t_\t{t}\n" for w, t in zip(s.words, s.tags, strict=True))
              for s in sentences]  # fmt: skip
    path.write_text("\n".join(blocks), encoding="utf-8")
    return os.fspath(path)


def test_train_command_and_samples_report(tmp_path, capsys):
    (target, source), _ = corrupted_tasks(3, n_target=40, n_source=40)
    run = tmp_path / "run"
    args = ["train", "--target", write_conll(tmp_path / "tgt.conll", target.train),
            "--sources", write_conll(tmp_path / "src.conll", source.train),
            "--method", "tawt-samples", "--weights-as", "sampling", "--encoder", "tiny",
            "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--max-length", "32",
            "--target-size", "all", "--source-size", "all", "--device", "cpu", "--quiet",
            "--output", os.fspath(run)]  # fmt: skip
    assert cli.main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    for name in ("sample_weights.png", "sample_weights_extremes.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    rows = list(csv.DictReader((run / "sample_weights_extremes.csv").read_text().splitlines()))
    assert {r["group"] for r in rows} == {"src", "all sources"}
    weights = list(csv.DictReader((run / "weights.csv").read_text().splitlines()))
    assert [int(r["update"]) for r in weights] == [0, 1, 2]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scales = [r for r in records if r.get("kind") == "sample_weights"]
    assert len(scales) == 2 and all(r["dots"]["max_abs"] > 0 for r in scales)

    assert cli.main(["samples", os.fspath(run), "--top", "3"]) == 0
    out = capsys.readouterr().out
    least = out.split("least trusted:")[1].split("most trusted:")[0]
    assert len(least.strip().splitlines()) == 1 + 3  # the header and three examples
    assert "src.conll" not in out and "w" in least  # the sentences' words, not their files

    for bad in (tmp_path / "nowhere", tmp_path):
        assert cli.main(["samples", os.fspath(bad)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------------------------
# 4. Resume keeps the weights


def test_resumed_run_ends_with_the_uninterrupted_runs_weights(tmp_path, monkeypatch):
    tasks, _ = corrupted_tasks(4, n_target=8, n_source=24)
    cfg = config(epochs=2, weights_as="sampling", checkpoint_every=2)
    straight = trainer(cfg, tmp_path / "straight", tasks)
    straight.fit()

    step, calls = Trainer._step, [0]

    def crash_in_epoch_two(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:  # 4 steps an epoch (8 / 8 + 24 / 8): after the first update
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_step", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        trainer(cfg, tmp_path / "resumed", tasks).fit()
    monkeypatch.setattr(Trainer, "_step", step)
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert saved["method"]["weights"]["updates"] == 1
    resumed = trainer(cfg, tmp_path / "resumed", tasks)
    resumed.fit(resume=True)
    a = resumed.method.sample_weights
    b = straight.method.sample_weights
    assert a.updates == b.updates == 2
    assert torch.equal(a.p, b.p)
    on_disk = torch.load(tmp_path / "resumed" / "sample_weights.pt", weights_only=False)
    assert torch.equal(on_disk["weights"], b.p)
    assert [h["update"] for h in on_disk["history"]] == [0, 1, 2]
