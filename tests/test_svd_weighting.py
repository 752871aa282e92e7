"""SVD task reweighting (Wu, Zhang & Ré 2020, Alg. 2): the math against a numpy float64
reference, the down-weighting of a task with noisy labels (Sec. 3.3), and the method: weights
from the pretrained encoder's features of shared examples, fixed, recorded in weights.csv."""

import csv
import itertools
import json
import os
import random

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxtask import cli
from pyxtask.config import ConfigError, SVDConfig, TrainConfig, from_mapping
from pyxtask.data import LabelMap, TaggedSentence, collate
from pyxtask.tasks import TaskData, build_model
from pyxtask.trainer import Trainer
from pyxtask.weighting.svd import svd_task_weights
from tests._corpora import prepare_or_skip

transformers.utils.logging.disable_progress_bar()


def reference_alpha(x, ys, rank, center):
    """Alg. 2 in numpy float64: Θ_i = Xᵀ Y_i (one-hot columns, or the scalar y_i), U_r of
    [Θ_1 … Θ_k], α_i = ‖Θ_iᵀ U_r‖_F."""
    x = np.asarray(x, dtype=np.float64)
    if center:
        x = x - x.mean(axis=0)
    thetas = [x.T @ (y if y.ndim == 2 else y[:, None]) for y in ys]
    u, _, _ = np.linalg.svd(np.concatenate(thetas, axis=1), full_matrices=False)
    u_r = u[:, :rank]
    return np.array([np.linalg.norm(theta.T @ u_r) for theta in thetas])


def _one_hot(labels, classes):
    return np.eye(classes)[labels]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(5, 60), d=st.integers(1, 12),
       k=st.integers(1, 5), r=st.integers(1, 5))  # fmt: skip
def test_scalar_labels_match_the_numpy_reference(seed, m, d, k, r):
    rng = np.random.default_rng(seed)
    x, ys = rng.normal(size=(m, d)), [rng.normal(size=m) for _ in range(k)]
    got = svd_task_weights(torch.from_numpy(x), [torch.from_numpy(y) for y in ys], [1] * k, r,
                           center=False)  # fmt: skip
    np.testing.assert_allclose(got.numpy(), reference_alpha(x, ys, r, False), rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(4, 80), d=st.integers(1, 16),
       classes=st.lists(st.integers(2, 6), min_size=1, max_size=4), r=st.integers(1, 8),
       center=st.booleans())  # fmt: skip
def test_one_hot_labels_match_the_numpy_reference(seed, m, d, classes, r, center):  # noqa: PLR0917
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=2.0, size=(m, d)).astype(np.float32)  # float32 features, as an encoder's
    labels = [rng.integers(0, c, size=m) for c in classes]
    got = svd_task_weights(torch.from_numpy(x), [torch.from_numpy(y) for y in labels], classes, r,
                           center=center)  # fmt: skip
    one_hot = [_one_hot(y, c) for y, c in zip(labels, classes, strict=True)]
    expected = reference_alpha(x, one_hot, r, center)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9)


def test_default_rank_is_the_number_of_tasks_and_bad_inputs_are_errors():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(30, 6)))
    ys = [torch.from_numpy(rng.integers(0, 3, size=30)) for _ in range(2)]
    assert torch.equal(svd_task_weights(x, ys, [3, 3]), svd_task_weights(x, ys, [3, 3], rank=2))
    with pytest.raises(ValueError, match="label ids"):
        svd_task_weights(x, [ys[0] + 3], [3])
    with pytest.raises(ValueError, match="one label vector"):
        svd_task_weights(x, ys, [3])


def _linear_rule_task(seed, m=4000, d=24, classes=4):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(m, d))
    labels = (z @ rng.normal(size=(d, classes))).argmax(axis=1)
    return rng, z + 3 * rng.normal(size=d), labels  # features with a mean far from 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_task_with_noisy_labels_is_down_weighted(seed):
    # Sec. 3.3: two tasks on the same inputs; one gets random labels on a fraction of its data.
    rng, x, clean = _linear_rule_task(seed)
    renamed = (clean + 1) % 4  # the same task under other label names
    alphas = []
    for fraction in (0.0, 0.2, 0.5, 1.0):
        noisy = clean.copy()
        picked = rng.random(len(clean)) < fraction
        noisy[picked] = rng.integers(0, 4, size=int(picked.sum()))
        ys = [torch.from_numpy(y) for y in (clean, renamed, noisy)]
        alpha = svd_task_weights(torch.from_numpy(x), ys, [4, 4, 4]).numpy()
        assert alpha[0] == pytest.approx(alpha[1], rel=1e-9)  # renaming changes nothing
        alphas.append(alpha[2] / alpha[0])
    assert alphas[0] == pytest.approx(1.0, rel=1e-9)
    assert alphas[1] < 0.9 and alphas[3] < 0.2, alphas  # 20 % noise already costs weight
    assert all(a > b for a, b in itertools.pairwise(alphas)), alphas  # more noise, less weight


def test_without_centering_the_mean_direction_hides_the_noise():
    # Why the features are centred: the class sums' shared n_c * mean direction dominates U_r.
    rng, x, clean = _linear_rule_task(0)
    noise = rng.integers(0, 4, size=len(clean))
    ys = [torch.from_numpy(clean), torch.from_numpy(noise)]
    raw = svd_task_weights(torch.from_numpy(x), ys, [4, 4], center=False).numpy()
    centred = svd_task_weights(torch.from_numpy(x), ys, [4, 4], center=True).numpy()
    assert raw[1] / raw[0] > 0.9 and centred[1] / centred[0] < 0.2


# --------------------------------------------------------------------------------------------
# The method: tasks on the same sentences, the tiny encoder


VOCAB = 40


def _shared_tasks(n=96, seed=0):
    """A target, a source with the target's rule under other names, and a source of random
    tags, all on the same sentences."""
    rng = random.Random(seed)
    rule = {f"w{i}": rng.randrange(3) for i in range(VOCAB)}

    def words(k):
        return [
            tuple(f"w{rng.randrange(VOCAB)}" for _ in range(rng.randint(4, 9))) for _ in range(k)
        ]

    train, dev = words(n), words(8)

    def task(name, tags, split_words, noise=False):
        out = []
        for i, ws in enumerate(split_words):
            labels = tuple(rng.choice(tags) if noise else tags[rule[w]] for w in ws)
            out.append(TaggedSentence(ws, labels, f"{name}:{i}"))
        return out

    def make(name, tags, noise=False):
        labels = LabelMap(tags, name=name.replace(".", "__"), kind="token")
        evaluation = task(name, tags, dev, noise)
        return TaskData(name, "token", labels, task(name, tags, train, noise), evaluation,
                        evaluation)  # fmt: skip

    return [make("syn.target", ["A", "B", "C"]), make("syn.helpful", ["x", "y", "z"]),
            make("syn.noise", ["p", "q", "r"], noise=True)]  # fmt: skip


def _config(**changes):
    base = dict(
        target="syn.target", sources=["syn.helpful", "syn.noise"], encoder="tiny",
        paradigm="normalized-joint", method="svd", epochs=1, batch_size=16, lr=3e-3,
        max_length=32, device="cpu", checkpoint_every=10**6, svd=SVDConfig(examples=512),
    )  # fmt: skip
    base.update(changes)
    return TrainConfig(**base)


def _weight_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_svd_method_weights_are_fixed_recorded_and_down_weight_the_noise(tmp_path):
    tasks = _shared_tasks()
    config = _config()
    trainer = Trainer(config, tmp_path / "run", progress=False, tasks=tasks)
    summary = trainer.fit()
    rows = _weight_rows(tmp_path / "run" / "weights.csv")
    assert len(rows) == 1 and summary["weight_updates"] == 0  # computed once, then fixed
    w = [float(rows[0][f"w:{t.name}"]) for t in tasks]
    assert sum(w) == pytest.approx(1.0) and w == pytest.approx(summary["w"], rel=1e-9)
    assert w[2] < 0.5 * min(w[0], w[1]), w  # the source of random tags
    alpha = np.array(summary["svd_alpha"])
    np.testing.assert_allclose(alpha / alpha.sum(), w, rtol=1e-9)
    # Every step took one batch of shared sentences: every task's loss, one encoder pass.
    assert summary["sampling"] == "shared" and summary["steps"] == 6  # 96 / 16

    # An independent reference: the pretrained model's features at every labelled position
    # (sentence by sentence, no padding), then Alg. 2 in numpy.
    model = build_model(tasks, config, tmp_path / "reference").eval()
    encoded = trainer.ctx.encoded
    feats, labels = [], [[] for _ in tasks]
    with torch.no_grad():
        for i, item in enumerate(encoded[0]):
            batch = collate([item], 0)
            hidden = model.encode(batch["input_ids"], batch["attention_mask"])[0]
            keep = [j for j, y in enumerate(item.labels) if y != LabelMap.ignore_index]
            feats.append(hidden[keep].double().numpy())
            for t in range(len(tasks)):
                labels[t].extend(encoded[t][i].labels[j] for j in keep)
    x = np.concatenate(feats)
    assert summary["svd_feature_rows"] == len(x)
    ys = [_one_hot(np.array(y), 3) for y in labels]
    np.testing.assert_allclose(alpha, reference_alpha(x, ys, 3, True), rtol=1e-4)


@pytest.mark.parametrize(
    ("table", "match"),
    [({"svd": {"rank": 0}}, "svd.rank"), ({"svd": {"examples": "all"}}, "svd.examples"),
     ({"svd": {"center": "yes"}}, "svd.center"), ({"paradigm": "pretrain"}, "every task")],
)  # fmt: skip
def test_bad_svd_config_is_a_config_error(table, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping({"method": "svd", **table}, source="run.toml")


def test_svd_on_tasks_that_do_not_share_inputs_is_a_config_error(tmp_path):
    tasks = _shared_tasks()
    other = _shared_tasks(seed=1)[1]  # other sentences
    with pytest.raises(ConfigError, match="svd: these tasks do not label the target's inputs"):
        Trainer(_config(sources=["syn.helpful"]), tmp_path, progress=False,
                tasks=[tasks[0], other]).fit()  # fmt: skip


# --------------------------------------------------------------------------------------------
# The command line on Brown's layers


@pytest.fixture(scope="module")
def brown():
    prepare_or_skip("brown")


SMALL = ["train", "--encoder", "tiny", "--target-size", "24", "--source-size", "24",
         "--dev-size", "16", "--test-size", "16", "--max-length", "48", "--batch-size", "8",
         "--epochs", "1", "--device", "cpu", "--quiet", "--method", "svd"]  # fmt: skip


@pytest.mark.network
@pytest.mark.filterwarnings("ignore::pyxtask.data.tokenization.LongSequenceWarning")
def test_cli_svd_on_brown_pos_and_universal_tags(brown, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*SMALL, "--target", "brown.upos", "--sources", "brown.pos", "--output", os.fspath(out)]
    assert cli.main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method_name"] == "svd" and summary["sources"] == ["brown.pos"]
    assert summary["svd_feature_rows"] > 24 and all(a > 0 for a in summary["svd_alpha"])
    (row,) = _weight_rows(out / "weights.csv")
    assert float(row["w:brown.upos"]) + float(row["w:brown.pos"]) == pytest.approx(1.0)
    assert "svd" in capsys.readouterr().out


@pytest.mark.network
@pytest.mark.filterwarnings("ignore::pyxtask.data.tokenization.LongSequenceWarning")
def test_cli_svd_with_a_sentence_task_among_token_tasks_is_one_error_line(brown, capsys):
    args = [*SMALL, "--target", "brown.upos", "--sources", "brown.pos,brown.genre"]
    assert cli.main([*args, "--output", "/nonexistent/never"]) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "tasks of one kind" in line and "Traceback" not in err
