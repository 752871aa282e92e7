"""The trainer end to end on synthetic tasks with the tiny encoder (fast, offline), a killed run
resumed bitwise, the command line on real corpora (network), and configuration errors."""

import csv
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from pyxtask import cli
from pyxtask.config import (
    ConfigError,
    MetaWeightingConfig,
    TAWTConfig,
    TrainConfig,
    from_mapping,
    load_config,
)
from pyxtask.data import LabelMap, TaggedSentence
from pyxtask.data.tokenization import LongSequenceWarning
from pyxtask.models import MultiTaskModel
from pyxtask.tasks import TaskData, load_tasks
from pyxtask.trainer import Trainer
from tests._corpora import prepare_or_skip

transformers.utils.logging.disable_progress_bar()

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOCAB = 60


# --------------------------------------------------------------------------------------------
# Synthetic tasks: the target's tag is a fixed function of the word; the helpful source follows
# the same rule under other label names, the noise source tags words at random.


def _sentences(rng, name, split, n, labels, rule, shuffled):  # noqa: PLR0917
    out = []
    for i in range(n):
        words = tuple(f"w{rng.randrange(VOCAB)}" for _ in range(rng.randint(5, 12)))
        if shuffled:
            tags = tuple(rng.choice(labels) for _ in words)
        else:
            tags = tuple(labels[rule[w]] for w in words)
        out.append(TaggedSentence(words, tags, f"{name}:{split}:{i}"))
    return out


def _task(rng, name, labels, rule, n_train, n_eval=0, shuffled=False):  # noqa: PLR0917
    return TaskData(
        name=name,
        kind="token",
        labels=LabelMap(labels, name=name.replace(".", "__"), kind="token"),
        train=_sentences(rng, name, "train", n_train, labels, rule, shuffled),
        dev=_sentences(rng, name, "dev", n_eval, labels, rule, shuffled),
        test=_sentences(rng, name, "test", n_eval, labels, rule, shuffled),
    )


def synthetic_tasks(seed=0, n_target=40, n_source=200, n_eval=40, sources=(None, None)):
    """[target, helpful source, noise source]; ``sources`` overrides the sources' sizes."""
    rng = random.Random(seed)
    rule = {f"w{i}": rng.randrange(4) for i in range(VOCAB)}
    n_a, n_b = (n_source if n is None else n for n in sources)
    return [
        _task(rng, "syn.target", ["t0", "t1", "t2", "t3"], rule, n_target, n_eval),
        _task(rng, "syn.helpful", ["a0", "a1", "a2", "a3"], rule, n_a),
        _task(rng, "syn.noise", ["b0", "b1", "b2", "b3"], rule, n_b, shuffled=True),
    ]


def synthetic_config(**changes):
    base = {
        "target": "syn.target",
        "sources": ["syn.helpful", "syn.noise"],
        "encoder": "tiny",
        "paradigm": "normalized-joint",
        "method": "tawt",
        "epochs": 2,
        "batch_size": 8,
        "eval_batch_size": 64,
        "lr": 2e-3,
        "max_length": 48,
        "seed": 0,
        "device": "cpu",
        "checkpoint_every": 10**6,
        "tawt": TAWTConfig(probe_size=16),
    }
    base.update(changes)
    return TrainConfig(**base)


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _weights_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# 1. TAWT prefers the helpful source


@pytest.mark.parametrize("seed", [0, 1])
def test_tawt_weights_the_helpful_source_above_the_shuffled_one(tmp_path, seed):
    config = synthetic_config(
        epochs=3,
        batch_size=16,
        seed=seed,
        tawt=TAWTConfig(update_every=4, probe_size=32),
    )
    tasks = synthetic_tasks(seed)
    summary = Trainer(config, tmp_path, progress=False, tasks=tasks).fit()

    omega = summary["omega"]
    assert summary["sources"] == ["syn.helpful", "syn.noise"]
    _, helpful, noise = omega
    # Observed on seeds 0-5: helpful / noise from 36 to 6700 (omega_target ~ 1 - 1e-6: with
    # cos = 1 for itself, 21 updates at the paper's eta = c = 1 push the target's weight up).
    assert helpful > 5 * noise, omega
    assert math.isclose(sum(omega), 1.0, abs_tol=1e-9)
    # The target learnt its rule (4 classes: chance is ~25%).
    assert summary["dev"] > 0.6

    # The helpful source's gradients agree with the target's; the shuffled one's do not.
    sims = [r["similarity"] for r in _read_jsonl(tmp_path / "similarity.jsonl")]
    assert len(sims) == summary["weight_updates"]
    mean_a = sum(s[1] for s in sims) / len(sims)
    mean_b = sum(s[2] for s in sims) / len(sims)
    assert mean_a > mean_b + 0.1, (mean_a, mean_b)

    # weights.csv: the initial weights, then one row per update, each on the simplex.
    steps_per_epoch = sum(math.ceil(len(t.train) / 16) for t in tasks)
    assert summary["steps"] == 3 * steps_per_epoch
    assert summary["weight_updates"] == summary["steps"] // 4
    rows = _weights_rows(tmp_path / "weights.csv")
    assert [int(r["update"]) for r in rows] == list(range(summary["weight_updates"] + 1))
    assert [int(r["step"]) for r in rows[1:]] == [4 * (i + 1) for i in range(len(rows) - 1)]
    names = [t.name for t in tasks]
    for row in rows:
        assert math.isclose(sum(float(row[f"omega:{n}"]) for n in names), 1.0, abs_tol=1e-8)
        assert math.isclose(sum(float(row[f"w:{n}"]) for n in names), 1.0, abs_tol=1e-8)
    # From halfway on the helpful source stays ahead (observed: at least 3.9 times the weight).
    for row in rows[len(rows) // 2 :]:
        assert float(row["omega:syn.helpful"]) > float(row["omega:syn.noise"]), row
    last = [float(rows[-1][f"omega:{n}"]) for n in names]
    assert last == pytest.approx(omega, rel=1e-8, abs=1e-12)
    # Normalized-joint starts at omega = 1/3 each.
    assert [float(rows[0][f"omega:{n}"]) for n in names] == pytest.approx([1 / 3] * 3)

    for name in ("config.json", "metrics.jsonl", "summary.json", "similarity.jsonl"):
        assert (tmp_path / name).is_file()
    for name in ("weights.png", "similarity.png", "learning_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "checkpoint.pt").exists()  # keep_checkpoint=False
    assert MultiTaskModel.load(tmp_path / "best").task_names == tuple(t.head for t in tasks)


# --------------------------------------------------------------------------------------------
# 2. kill -9 mid-epoch, resume: the same run bitwise

KILL_AT = 19  # the optimizer step the killed run pauses before (checkpoint at 15, update at 16)

CHILD = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
import transformers
transformers.utils.logging.disable_progress_bar()
from pyxtask.trainer import Trainer
from tests.test_train import resume_config, synthetic_tasks

run_dir, mode, method, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode == "pause":
    step = Trainer._step
    calls = [0]

    def paused(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            Path(run_dir, "paused").write_text(str(calls[0]))
            time.sleep(120)  # the parent kills us here
        return step(self, *args, **kwargs)

    Trainer._step = paused
trainer = Trainer(
    resume_config(method), run_dir, progress=False, tasks=synthetic_tasks(0, 16, 40, 16),
    keep_checkpoint=True,
)
trainer.fit(resume=mode == "resume")
"""


def resume_config(method="tawt"):
    if method == "tawt":
        return synthetic_config(
            epochs=2,
            checkpoint_every=5,
            log_every=2,
            tawt=TAWTConfig(update_every=4, probe_size=16),
        )
    # All-tasks methods: 5 steps an epoch (one pass over the 40-example sources), dropout on,
    # MetaWeighting's query batches and w, GradNorm's learnt weights and Adam state.
    return synthetic_config(
        method=method,
        epochs=3,
        checkpoint_every=3,
        log_every=2,
        dropout=0.1,
        metaweighting=MetaWeightingConfig(eta=0.5, alpha=0.5),
    )


def _child(run_dir, mode, method="tawt", kill_at=KILL_AT):
    code = CHILD.format(repo=os.fspath(REPO))
    return subprocess.Popen(
        [sys.executable, "-c", code, os.fspath(run_dir), mode, method, str(kill_at)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
    )


def _finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode(errors="replace")


def _kill_at_pause(killed, method, kill_at):
    """Run into ``killed`` until the pause before step ``kill_at``, SIGKILL it; return whether
    a summary existed then and the logs' sizes at the kill."""
    victim = _child(killed, "pause", method, kill_at)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "paused").exists():
            assert victim.poll() is None, victim.communicate()[0].decode(errors="replace")
            assert time.monotonic() < deadline, "the child never reached the pause"
            time.sleep(0.02)
        summary_at_kill = (killed / "summary.json").exists()
        log_sizes = {n: (killed / n).stat().st_size for n in ("metrics.jsonl", "weights.csv")}
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert victim.returncode == -signal.SIGKILL
    return summary_at_kill, log_sizes


def _assert_same_run(killed, straight):
    a = torch.load(killed / "checkpoint.pt", map_location="cpu", weights_only=False)
    b = torch.load(straight / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"]
    assert a["model"].keys() == b["model"].keys()
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert str(a["method"]) == str(b["method"])
    assert a["best"] == b["best"]
    for name in (
        *("metrics.jsonl", "weights.csv", "similarity.jsonl", "config.json"),
        *("label_transfer.jsonl", "label_transfer.csv"),
    ):
        if (straight / name).exists():
            assert (killed / name).read_bytes() == (straight / name).read_bytes(), name
    sa = json.loads((killed / "summary.json").read_text())
    sb = json.loads((straight / "summary.json").read_text())
    for key in ("dev", "test", "test_scores", "omega", "w", "steps", "weight_updates"):
        assert sa[key] == sb[key], key
    assert sa["target_examples_seen"] == sb["target_examples_seen"]
    best_a = MultiTaskModel.load(killed / "best").state_dict()
    best_b = MultiTaskModel.load(straight / "best").state_dict()
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_b)
    return a


def test_kill_mid_epoch_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    reference = _child(straight, "straight")  # runs beside the killed one (one thread each)
    summary_at_kill, log_sizes = _kill_at_pause(killed, "tawt", KILL_AT)
    assert not summary_at_kill
    assert not (killed / "summary.json").exists()

    saved = torch.load(killed / "checkpoint.pt", map_location="cpu", weights_only=False)
    per_epoch = 2 + 5 + 5  # ceil(16 / 8) + 2 * ceil(40 / 8)
    assert saved["global_step"] == 15  # the last checkpoint: mid-epoch 2, every 5 steps
    assert saved["epoch"] == 1 and saved["sampler"] is not None
    assert per_epoch < KILL_AT - 1 < 2 * per_epoch
    # Lines were written after that checkpoint (the update at step 16, losses at 16 and 18):
    # resuming must cut them off.
    assert all(log_sizes[n] > saved["logs"][n] for n in log_sizes), (log_sizes, saved["logs"])

    _finish(_child(killed, "resume"))
    _finish(reference)
    a = _assert_same_run(killed, straight)
    assert a["global_step"] == 2 * per_epoch


def _assert_same_tree(a, b, where="state"):
    """Nested dicts, lists and tensors equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


LABEL_TRANSFER = ("metaxt", "xt")


@pytest.mark.parametrize(
    "method", ["metaweighting", "gradnorm", "famo", "pcgrad", "nash-mtl", *LABEL_TRANSFER]
)
def test_all_tasks_method_killed_mid_epoch_resumes_bitwise(tmp_path, method):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    reference = _child(straight, "straight", method)
    # Checkpoints at steps 3, 5 (epoch end) and 6; killed before step 8, so step 7's weight
    # row was written after the last checkpoint and must be cut off on resume. MetaXT and XT
    # write no weight row per step: killed before step 9, step 8's losses (metrics.jsonl, every
    # 2 steps) are the lines to cut.
    kill_at, grown = (9, "metrics.jsonl") if method in LABEL_TRANSFER else (8, "weights.csv")
    _, log_sizes = _kill_at_pause(killed, method, kill_at)
    saved = torch.load(killed / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 6 and saved["epoch"] == 1 and saved["sampler"] is not None
    assert log_sizes[grown] > saved["logs"][grown]
    _finish(_child(killed, "resume", method, kill_at))
    _finish(reference)
    a = _assert_same_run(killed, straight)
    assert a["global_step"] == 15 and a["method"]["name"] == method
    if method in LABEL_TRANSFER:
        # The label transfer network and its Adam (moments, step counts), bit for bit.
        b = torch.load(straight / "checkpoint.pt", map_location="cpu", weights_only=False)
        _assert_same_tree(a["method"], b["method"], "method")
        assert a["method"]["updates"] == 15 and a["method"]["optimizer"]["state"]
        assert saved["method"]["updates"] == 6
        nets = [
            torch.load(run / "label_transfer_network.pt", map_location="cpu", weights_only=False)
            for run in (killed, straight)
        ]
        _assert_same_tree(*nets, "label_transfer_network.pt")
        _assert_same_tree(nets[0]["label_transfer_network"], a["method"]["ltn"], "final LTN")
        records = _read_jsonl(straight / "label_transfer.jsonl")
        assert [(r["epoch"], r["source"]) for r in records] == [
            (e, s) for e in range(3) for s in ("syn.helpful", "syn.noise")
        ]


# --------------------------------------------------------------------------------------------
# 3. The command line on real corpora


@pytest.fixture(scope="module")
def real_corpora():
    prepare_or_skip("wsj-pos")
    prepare_or_skip("brown")


TINY_RUN = [
    "train",
    "--encoder",
    "tiny",
    "--target-size",
    "40",
    "--source-size",
    "80",
    "--sources",
    "brown.upos,brown.genre",
    "--dev-size",
    "30",
    "--test-size",
    "30",
    "--epochs",
    "1",
    "--device",
    "cpu",
    "--quiet",
]


@pytest.mark.network
@pytest.mark.filterwarnings("ignore::pyxtask.data.tokenization.LongSequenceWarning")
def test_cli_train_tiny_encoder_with_step_matched_baseline(real_corpora, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main([*TINY_RUN, "--output", os.fspath(out), "--compare", "single-steps"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    main = json.loads((out / "summary.json").read_text())
    base = json.loads((out / "compare" / "single-steps" / "summary.json").read_text())
    assert main["method"] == "tawt-normalized-joint"
    assert base["method"] == "single-steps"
    assert main["target"] == "wsj-pos.pos"
    assert main["sources"] == ["brown.upos", "brown.genre"]
    assert main["train_examples"]["wsj-pos.pos"] == 40
    assert base["steps"] == main["steps"] > 0
    for row in (main, base):
        line = next(x for x in printed.out.splitlines() if x.strip().startswith(row["method"]))
        assert f"({row['steps']} steps, {row['target_examples_seen']} target examples seen" in line
    # The step-matched baseline sees the target in every step: more target examples.
    assert base["target_examples_seen"] > main["target_examples_seen"]
    assert (out / "comparison.txt").read_text().strip() in printed.out

    for name in ("config.json", "metrics.jsonl", "weights.csv", "similarity.jsonl"):
        assert (out / name).stat().st_size > 0, name
    for name in ("weights.png", "similarity.png", "learning_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    model = MultiTaskModel.load(out / "best")
    assert model.task_names == ("wsj-pos__pos", "brown__upos", "brown__genre")
    assert set(MultiTaskModel.load(out / "compare" / "single-steps" / "best").task_names) == {
        "wsj-pos__pos"
    }


@pytest.mark.network
@pytest.mark.filterwarnings("ignore::pyxtask.data.tokenization.LongSequenceWarning")
def test_cli_pretrain_sweeps_c_and_keeps_the_best_dev(real_corpora, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        [*TINY_RUN, "--output", os.fspath(out), "--paradigm", "pretrain", "--c", "1,10"]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "tawt-pretrain"
    assert set(summary["sweep"]) == {"1", "10"}
    subs = {c: json.loads((out / f"c={c}" / "summary.json").read_text()) for c in ("1", "10")}
    for c, sub in subs.items():
        assert sub["c"] == float(c)
        assert summary["sweep"][c] == {"dev": sub["dev"], "test": sub["test"]}
        # pretrain: the sources' phase, then fine-tuning on the target
        assert sub["omega"][0] == 0.0
    best = max(subs.values(), key=lambda s: s["dev"])
    assert summary["dev"] == best["dev"] == max(r["dev"] for r in summary["sweep"].values())
    assert summary["c"] == best["c"]
    assert "tawt-pretrain" in printed.out


@pytest.mark.network
@pytest.mark.filterwarnings("ignore::pyxtask.data.tokenization.LongSequenceWarning")
@pytest.mark.parametrize(
    "method",
    [
        *("tawt-step", "equal", "mgda", "mgda-ub", "metaweighting", "gradnorm", "uncertainty"),
        *("upgrad", "cagrad", "nash-mtl", "famo", "dwa"),
    ],
)
def test_every_all_tasks_method_trains_on_real_corpora(real_corpora, tmp_path, capsys, method):
    # Brown's layers label the same sentences, which MGDA-UB needs.
    out = tmp_path / method
    args = [*TINY_RUN, "--target", "brown.upos", "--sources", "brown.pos,brown.genre"]
    code = cli.main([*args, "--method", method, "--output", os.fspath(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method_name"] == method and summary["target"] == "brown.upos"
    assert summary["steps"] > 0 and 0.0 <= summary["test"] <= 1.0
    # Every step had a batch of every task; the weights changed and were written at each update.
    assert summary["target_examples_seen"] >= summary["steps"]
    rows = _weights_rows(out / "weights.csv")
    assert len(rows) == summary["weight_updates"] + 1
    if method != "equal":
        assert summary["weight_updates"] == summary["steps"] or method == "tawt-step"
    for name in ("weights.png", "learning_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name


def _onnx_initializers(bundle):
    import onnx

    graph = onnx.load(os.fspath(bundle / "model.onnx")).graph
    return sorted((i.name, tuple(i.dims)) for i in graph.initializer)


@pytest.mark.network
@pytest.mark.filterwarnings("ignore::pyxtask.data.tokenization.LongSequenceWarning")
def test_cli_metaxt_on_a_real_pair_saves_its_map_and_exports_only_the_target_model(
    real_corpora, tmp_path, capsys
):
    runs = {}
    for method, epochs in (("metaxt", "2"), ("equal", "1")):
        out = tmp_path / method
        args = [*TINY_RUN, "--target", "wsj-pos.pos", "--sources", "brown.pos", "--epochs", epochs]
        code = cli.main([*args, "--method", method, "--output", os.fspath(out)])
        printed = capsys.readouterr()
        assert code == 0, printed.err
        bundle = tmp_path / f"{method}-bundle"
        export = ["export", os.fspath(out), "--out", os.fspath(bundle), "--no-torchscript"]
        code = cli.main([*export, "--no-measure"])
        printed = capsys.readouterr()
        assert code == 0, printed.err
        runs[method] = (out, bundle)
    out, bundle = runs["metaxt"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method_name"] == "metaxt" and summary["target"] == "wsj-pos.pos"
    assert summary["sources"] == ["brown.pos"]
    assert summary["meta_gradient"] == "finite-difference"
    assert summary["label_transfer_network"] == "label_transfer_network.pt"
    assert summary["steps"] > 0 and summary["weight_updates"] == summary["steps"]
    assert 0.0 <= summary["test"] <= 1.0
    # One map per epoch (one source): rows over Brown's tags, distributions over WSJ's.
    records = _read_jsonl(out / "label_transfer.jsonl")
    assert [(r["epoch"], r["source"], r["target"]) for r in records] == [
        (e, "brown.pos", "wsj-pos.pos") for e in range(2)
    ]
    for record in records:
        assert len(record["map"]) == len(record["source_labels"]) == len(record["counts"])
        for row, count in zip(record["map"], record["counts"], strict=True):
            if count > 0:
                assert len(row) == len(record["target_labels"])
                assert min(row) >= 0 and math.isclose(sum(row), 1.0, abs_tol=1e-6), row
        assert sum(record["counts"]) > 0
    network = torch.load(out / "label_transfer_network.pt", map_location="cpu", weights_only=True)
    assert network["method"] == "metaxt" and list(network["sources"]) == ["brown.pos"]
    ltn = network["label_transfer_network"]
    assert ltn["label_embedding.weight"].shape[0] == len(records[0]["source_labels"])
    assert ltn["mlp.4.weight"].shape[0] == len(records[0]["target_labels"])
    # The plots of the maps (label_transfer.csv: one row per epoch and source label).
    for name in ("label_transfer.png", "label_transfer_epochs.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    with open(out / "label_transfer.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(records[0]["source_labels"])
    assert set(MultiTaskModel.load(out / "best").task_names) == {"wsj-pos__pos", "brown__pos"}
    # The bundle holds the target model alone: the same initializers as a plain run's export,
    # none shaped like the label transfer network's, and no file of it.
    initializers = _onnx_initializers(bundle)
    assert initializers == _onnx_initializers(runs["equal"][1])
    model = MultiTaskModel.load(out / "best").state_dict()
    ltn_shapes = {tuple(t.shape) for t in ltn.values()} - {tuple(t.shape) for t in model.values()}
    assert ltn_shapes and not ltn_shapes & {dims for _, dims in initializers}
    assert not [p for p in bundle.rglob("*") if "transfer" in p.name]


@pytest.mark.filterwarnings("ignore::pyxtask.data.tokenization.LongSequenceWarning")
def test_mgda_ub_on_tasks_with_different_inputs_is_one_error_line(real_corpora, capsys):
    code = cli.main([*TINY_RUN, "--method", "mgda-ub", "--output", "/nonexistent/never"])
    printed = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in printed.err
    errors = [line for line in printed.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, printed.err
    assert "mgda-ub" in errors[0] and "brown.upos" in errors[0] and "same sentences" in errors[0]


@pytest.mark.parametrize("target_query", ["split", "dev"])
def test_metaweighting_query_sets(tmp_path, target_query):
    tasks = synthetic_tasks(0, 20, 30, 10)
    config = synthetic_config(
        method="metaweighting",
        epochs=1,
        metaweighting=MetaWeightingConfig(query_ratio=0.2, target_query=target_query),
    )
    trainer = Trainer(config, tmp_path, progress=False, tasks=tasks)
    summary = trainer.fit()
    held = [len(items) for items in trainer.ctx.heldout]
    # 20% of each task's sentences are its query set (one window per short sentence) ...
    assert held[1:] == [6, 6]
    assert trainer.sizes[1:] == [24, 24]
    if target_query == "split":
        assert (held[0], trainer.sizes[0]) == (4, 16)
    else:  # ... or the target's dev split, and all its training sentences train
        assert (held[0], trainer.sizes[0]) == (10, 20)
    assert summary["weight_updates"] == summary["steps"] > 0


# --------------------------------------------------------------------------------------------
# 4. Configuration errors (no training)


def test_unknown_toml_key_names_key_and_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('target = "wsj-pos.pos"\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError, match="learning_rate") as info:
        load_config(path)
    assert os.fspath(path) in str(info.value)


def test_unknown_tawt_key_names_key_and_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[tawt]\nstep = 2\n")
    with pytest.raises(ConfigError, match=r"tawt\.step") as info:
        load_config(path)
    assert os.fspath(path) in str(info.value)


def test_yaml_config_loads(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "target: wsj-pos.pos\n"
        "sources: [brown.upos, brown.genre]\n"
        "paradigm: pretrain\n"
        "encoder: tiny\n"
        "epochs: 2\n"
        "tawt:\n  c: [1, 10]\n  similarity: dot\n"
    )
    config = load_config(path)
    assert config.sources == ["brown.upos", "brown.genre"]
    assert config.paradigm == "pretrain"
    assert config.epochs == 2
    assert config.tawt.similarity == "dot"
    assert config.c_values() == [1.0, 10.0]


@pytest.mark.parametrize(
    ("document", "match"),
    [
        ({"target": "brown"}, "corpus.task"),
        ({"sources": ["brown.upos", "brown"]}, "corpus.task"),
        ({"sources": "brown.upos,brown.upos"}, "distinct"),
        ({"weights_as": "sampling", "tawt": {"update_every": 5}}, "update_every"),
        ({"paradigm": "joint", "tawt": {"c": [1, 10]}}, "pretrain only"),
        ({"paradigm": "x"}, "paradigm"),
        ({"max_length": 4}, "max_length"),
        ({"paradigm": "single", "weighting": "tawt"}, "needs source tasks"),
        ({"paradigm": "pretrain", "epoch": "target"}, "epoch"),
    ],
)
def test_bad_configs(document, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(document)


@pytest.mark.parametrize(
    ("target", "match"), [("nocorpus.pos", "nocorpus"), ("brown.nothing", "no task 'nothing'")]
)
def test_unknown_corpus_or_task_is_a_config_error(target, match):
    config = TrainConfig(target=target, sources=["brown.upos"])
    with pytest.raises(ConfigError, match=match):
        load_tasks(config)


@pytest.mark.parametrize(
    ("document", "match"),
    [
        ({"method": "mgda", "paradigm": "pretrain"}, "every task's batch in every step"),
        ({"method": "gradnorm", "weights_as": "sampling"}, "draws one task per step"),
        ({"method": "mgda-ub", "accumulate": 2}, "one batch per step"),
        ({"method": "tawt-step", "tawt": {"similarity": "exact"}}, "probe batches"),
        ({"mgda": {"normalization": "max"}}, "mgda.normalization"),
        ({"metaweighting": {"query_ratio": 0.9}}, "metaweighting.query_ratio"),
        ({"metaweighting": {"steps": 3}}, "metaweighting.steps"),
        ({"weighting": "mgda"}, "the key is now 'method'"),
        ({"weighting": "fixed", "method": "tawt"}, "disagree"),
        ({"compare": ["nothing"]}, "compare entry"),
    ],
)
def test_bad_method_configs(document, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(document)


def test_old_configs_with_weighting_still_read():
    assert from_mapping({"weighting": "fixed"}).method == "fixed"
    assert from_mapping({"weighting": "tawt", "method": "tawt"}).label == "tawt-normalized-joint"


def test_cli_set_overrides_any_key_and_method_tables(tmp_path):
    args = cli._parser().parse_args(
        [
            "train",
            "--method",
            "metaweighting",
            "--set",
            "metaweighting.eta=1e-3",
            "--set",
            "metaweighting.parameters=all",
            "--set",
            "accumulate=2",
            "--set",
            "group_by_length=false",
        ]
    )
    config = cli._train_config(args)
    assert config.method == "metaweighting" and config.accumulate == 2
    assert config.metaweighting.eta == 1e-3 and config.metaweighting.parameters == "all"
    assert config.group_by_length is False
    legacy = cli._train_config(cli._parser().parse_args(["train", "--weighting", "fixed"]))
    assert legacy.method == "fixed"


def test_cli_bad_set_is_one_error_line(capsys):
    assert cli.main(["train", "--set", "metaweighting.eta"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "KEY=VALUE" in err[0]


def test_cli_bad_paradigm_exits_1_with_one_error_line(capsys):
    assert cli.main(["train", "--paradigm", "x"]) == 1
    printed = capsys.readouterr()
    lines = printed.err.strip().splitlines()
    assert len(lines) == 1, printed.err
    assert lines[0].startswith("error:") and "paradigm" in lines[0]
    assert "Traceback" not in printed.err
    assert printed.out == ""


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
    """A finished one-epoch run that kept its checkpoint."""
    run_dir = tmp_path_factory.mktemp("kept")
    config = synthetic_config(epochs=1)
    tasks = synthetic_tasks(0, 16, 24, 8)
    summary = Trainer(config, run_dir, progress=False, tasks=tasks, keep_checkpoint=True).fit()
    return run_dir, config, tasks, summary


def test_resume_with_a_changed_config_is_an_error(kept_run):
    run_dir, config, tasks, _ = kept_run
    changed = config.replace(lr=1e-3)
    with pytest.raises(ConfigError, match="differs"):
        Trainer(changed, run_dir, progress=False, tasks=tasks).fit(resume=True)


def test_second_run_into_an_existing_folder_needs_resume(kept_run):
    run_dir, config, tasks, summary = kept_run
    before = (run_dir / "summary.json").read_bytes()
    with pytest.raises(FileExistsError, match="resume"):
        Trainer(config, run_dir, progress=False, tasks=tasks).fit()
    assert (run_dir / "summary.json").read_bytes() == before
    assert summary["steps"] == sum(math.ceil(len(t.train) / 8) for t in tasks)


def test_resume_of_a_finished_run_with_a_changed_config_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(synthetic_config().to_dict(), indent=2, sort_keys=True) + "\n"
    )
    (tmp_path / "summary.json").write_text('{"steps": 1}\n')
    changed = synthetic_config(lr=1e-3)
    with pytest.raises(ConfigError, match="differs"):
        Trainer(changed, tmp_path, progress=False, tasks=synthetic_tasks(0, 4, 4, 4)).fit(
            resume=True
        )


def test_short_max_length_trains(tmp_path):
    # max_length >= 8 is valid: the windows' stride must shrink with it (sentences of up to 12
    # words are split into overlapping windows of 10 sub-words)
    config = synthetic_config(epochs=1, max_length=12)
    with pytest.warns(LongSequenceWarning, match="overlapping windows"):
        summary = Trainer(config, tmp_path, progress=False, tasks=synthetic_tasks(0, 8, 8, 4)).fit()
    assert summary["steps"] >= 3
    assert 0.0 <= summary["test"] <= 1.0


# --------------------------------------------------------------------------------------------
# 5. Sampling mode and target epochs


def test_weights_as_sampling(tmp_path):
    tasks = synthetic_tasks(0, 16, 24, 8, sources=(24, 40))
    config = synthetic_config(weights_as="sampling", epochs=2)
    summary = Trainer(config, tmp_path, progress=False, tasks=tasks).fit()
    assert summary["weights_as"] == "sampling"
    # A stream epoch: as many batches as the tasks have, drawn by omega.
    assert summary["steps"] == 2 * sum(math.ceil(len(t.train) / 8) for t in tasks)
    assert summary["weight_updates"] == 2  # once per epoch (the paper)
    rows = _weights_rows(tmp_path / "weights.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 0, 1]
    train = [r for r in _read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert sum(r["steps"] for r in train) == summary["steps"]


def test_target_epoch_counts_passes_over_the_target(tmp_path):
    tasks = synthetic_tasks(0, 20, 30, 8, sources=(30, 50))
    b, epochs = 8, 2
    config = synthetic_config(epoch="target", epochs=epochs, batch_size=b)
    summary = Trainer(config, tmp_path, progress=False, tasks=tasks).fit()
    sizes = [len(t.train) for t in tasks]
    assert summary["train_examples"] == dict(zip([t.name for t in tasks], sizes, strict=True))
    p0 = sizes[0] / sum(sizes)
    per_epoch = math.ceil(math.ceil(sizes[0] / b) / p0)
    assert per_epoch == 15
    assert summary["steps"] == epochs * per_epoch
    assert summary["epoch_definition"] == "target"
    assert summary["weight_updates"] == epochs


# --------------------------------------------------------------------------------------------
# 6. The exact similarity and the buffer gradient mode


def test_exact_similarity_logs_its_cg_solves(tmp_path):
    tasks = synthetic_tasks(0, 16, 24, 8)
    config = synthetic_config(
        epochs=1, tawt=TAWTConfig(similarity="exact", cg_max_iter=5, probe_size=8)
    )
    summary = Trainer(config, tmp_path, progress=False, tasks=tasks).fit()
    records = _read_jsonl(tmp_path / "metrics.jsonl")
    cg = [r for r in records if r["kind"] == "cg"]
    assert len(cg) == summary["weight_updates"] == 1
    assert 1 <= cg[0]["iterations"] <= 5
    assert math.isfinite(cg[0]["residual"])
    assert isinstance(cg[0]["converged"], bool)
    assert math.isclose(sum(summary["omega"]), 1.0, abs_tol=1e-9)
    sims = _read_jsonl(tmp_path / "similarity.jsonl")
    assert len(sims) == 1 and all(math.isfinite(s) for s in sims[0]["similarity"])


def test_buffer_gradients_match_streaming(tmp_path):
    tasks = synthetic_tasks(0, 16, 24, 8)
    summaries, sims = {}, {}
    for mode in ("streaming", "buffer"):
        config = synthetic_config(tawt=TAWTConfig(gradients=mode, update_every=3, probe_size=16))
        run = tmp_path / mode
        summaries[mode] = Trainer(config, run, progress=False, tasks=tasks).fit()
        sims[mode] = _read_jsonl(run / "similarity.jsonl")
    stream, buffer = summaries["streaming"], summaries["buffer"]
    assert stream["weight_updates"] == buffer["weight_updates"] >= 3
    assert buffer["omega"] == pytest.approx(stream["omega"], abs=1e-5)
    for a, b in zip(sims["streaming"], sims["buffer"], strict=True):
        assert b["similarity"] == pytest.approx(a["similarity"], abs=1e-4)
        full = b["cosine"]
        assert all(x is not None for row in full for x in row)
        assert all(
            full[i][j] == pytest.approx(full[j][i], abs=1e-6) for i in range(3) for j in range(3)
        )
        # streaming measures only the target's row and column
        assert a["cosine"][1][2] is None
        assert [full[0][t] for t in range(3)] == pytest.approx(a["cosine"][0], abs=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_lr_schedule_decays_linearly_or_stays_at_lr(tmp_path, schedule):
    config = synthetic_config(method="fixed", epochs=1, warmup=0.0, lr_schedule=schedule,
                              log_every=1)  # fmt: skip
    Trainer(config, tmp_path, progress=False, tasks=synthetic_tasks(0, 16, 16, 8)).fit()
    rates = [r["lr"] for r in _read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rates) > 2
    if schedule == "constant":
        assert rates == [config.lr] * len(rates)
    else:
        assert rates == sorted(rates, reverse=True) and rates[-1] < rates[0] / 2
