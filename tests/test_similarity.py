"""pyxtask.similarity: eq. 6's properties and the paper's Sec. 2.3 example, LEEP and LogME
against hand computations, the probe gradient against autograd, and the command line."""

import json
import math
import os
import random

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxtask import cli
from pyxtask.config import TrainConfig
from pyxtask.data import LabelMap, TaggedSentence
from pyxtask.data.tokenization import collate
from pyxtask.similarity import (
    covariance_similarity,
    covariance_similarity_matrix,
    gradient_cosine_matrix,
    leep,
    log_evidence,
    logme,
    logme_fit,
    truncated_covariance,
)
from pyxtask.similarity import features as feat
from pyxtask.tasks import TaskData, build_model

transformers.utils.logging.disable_progress_bar()

seeds = st.integers(0, 2**31 - 1)


def _gaussian(seed, m, d, rank=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=torch.float64)
    if rank is not None:
        x = x[:, :rank] @ torch.randn(rank, d, generator=g, dtype=torch.float64)
    return x


def _self_score(x, keep=0.99):
    """‖d‖₂/‖d‖₁ of the kept eigenvalues of XᵀX, computed from numpy's SVD of X."""
    s = torch.from_numpy(np.linalg.svd(x.numpy(), compute_uv=False)) ** 2
    total, kept = float(s.sum()), []
    for value in s:
        kept.append(float(value))
        if sum(kept) >= keep * total * (1 - 1e-12):
            break
    d = torch.tensor(kept, dtype=torch.float64)
    return float(d.norm() / d.sum())


# --------------------------------------------------------------------------------------------
# Covariance similarity score (eq. 6)


@settings(max_examples=25, deadline=None)
@given(seeds, st.integers(3, 40), st.integers(3, 40), st.integers(2, 8))
def test_covariance_score_is_symmetric_and_in_the_unit_interval(seed, m1, m2, d):
    x1, x2 = _gaussian(seed, m1, d), _gaussian(seed + 1, m2, d) * 3 + 1
    s12, s21 = covariance_similarity(x1, x2), covariance_similarity(x2, x1)
    assert s12 == pytest.approx(s21, rel=1e-12)
    assert 0.0 <= s12 <= 1.0 + 1e-12


@settings(max_examples=25, deadline=None)
@given(seeds, st.integers(4, 30), st.integers(2, 8))
def test_a_row_rotation_has_the_same_covariance_and_scores_the_self_score(seed, m, d):
    x1 = _gaussian(seed, m, d)
    q, _ = torch.linalg.qr(_gaussian(seed + 7, m, m))  # m x m orthogonal
    x2 = q @ x1
    expected = _self_score(x1)
    assert covariance_similarity(x1, x2) == pytest.approx(expected, rel=1e-9)
    assert covariance_similarity(x1, x1) == pytest.approx(expected, rel=1e-9)


@settings(max_examples=20, deadline=None)
@given(seeds, st.integers(2, 8))
def test_the_self_score_is_one_only_at_rank_one(seed, d):
    assert covariance_similarity(*[_gaussian(seed, 20, d, rank=1)] * 2) == pytest.approx(1.0)
    x = _gaussian(seed, 40, d)  # full rank: keeps >= 2 directions at 99 %
    assert covariance_similarity(x, x) < 1.0 - 1e-6


def _section_2_3_tasks(seed, d=20, m=200, kappa=100.0):
    """Wu, Zhang and Ré's Sec. 2.3 example: X1 = R1 Q1 D1, X2 = R2 Q1 D1 (the same covariance),
    X3 = R3 Q2 D2 (signal on another coordinate set, another rotation)."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.randperm(d, generator=g)
    s1, s2 = coords[: d // 10], coords[d // 10 : 2 * d // 10]  # disjoint, size d/10
    d1, d2 = torch.ones(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
    d1[s1], d2[s2] = kappa, kappa
    q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))

    def r():
        return torch.randn(m, d, generator=g, dtype=torch.float64)

    return r() @ q1 @ torch.diag(d1), r() @ q1 @ torch.diag(d1), r() @ q2 @ torch.diag(d2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_covariances_from_different_subspaces_score_lower(seed):
    x1, x2, x3 = _section_2_3_tasks(seed)
    same, different = covariance_similarity(x1, x2), covariance_similarity(x1, x3)
    assert different < 0.5 * same


@settings(max_examples=15, deadline=None)
@given(seeds, st.integers(2, 5), st.sampled_from([0.9, 0.99, 1.0]))
def test_the_matrix_of_the_compiled_gram_is_eq_6_pair_by_pair(seed, tasks, keep):
    xs = [_gaussian(seed + t, 10 + 3 * t, 6) * (t + 1) for t in range(tasks)]
    matrix = covariance_similarity_matrix(xs, keep)
    normalized = covariance_similarity_matrix(xs, keep, normalized=True)
    for i in range(tasks):
        for j in range(tasks):
            pair = covariance_similarity(xs[i], xs[j], keep)
            assert float(matrix[i, j]) == pytest.approx(pair, rel=1e-9)
            geometric = math.sqrt(float(matrix[i, i]) * float(matrix[j, j]))
            assert float(normalized[i, j]) == pytest.approx(pair / geometric, rel=1e-9)


def test_the_rank_keeps_99_percent_of_the_spectrum():
    x = torch.diag(torch.tensor([10.0, 3.0, 0.1, 0.01], dtype=torch.float64))  # XᵀX: 100, 9, ...
    values = torch.linalg.eigvalsh(truncated_covariance(x, 0.99))
    assert (values > 1e-9).sum() == 2  # 100 + 9 = 99.9 % of 109.0101 (100 alone: 91.7 %)
    assert (torch.linalg.eigvalsh(truncated_covariance(x, 1.0)) > 1e-9).sum() == 4


# --------------------------------------------------------------------------------------------
# LEEP


def test_leep_equals_a_hand_computation():
    theta = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    # Joint P(y, z): y=0 rows 1, 3 -> (1.5, 0.5)/4; y=1 rows 2, 4 -> (0.5, 1.5)/4.
    # P(z) = (0.5, 0.5), so P(y|z=0) = (0.75, 0.25) and P(y|z=1) = (0.25, 0.75).
    # Rows: 0.9*.75+.1*.25 = .70, .2*.25+.8*.75 = .65, .6*.75+.4*.25 = .55, .3*.25+.7*.75 = .60
    expected = (math.log(0.70) + math.log(0.65) + math.log(0.55) + math.log(0.60)) / 4
    assert leep(theta, y) == pytest.approx(expected, rel=1e-12)


def _leep_loops(theta, y, classes):
    """LEEP by explicit sums over rows, as Nguyen et al. write eqs. 1-2."""
    n, zs = len(theta), len(theta[0])
    joint = [
        [sum(theta[i][z] for i in range(n) if y[i] == c) / n for z in range(zs)]
        for c in range(classes)
    ]
    marginal = [sum(joint[c][z] for c in range(classes)) for z in range(zs)]
    total = 0.0
    for i in range(n):
        total += math.log(
            sum(joint[y[i]][z] / marginal[z] * theta[i][z] for z in range(zs) if marginal[z] > 0)
        )
    return total / n


@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(2, 30), st.integers(1, 5), st.integers(1, 4))
def test_leep_matches_the_papers_sums(seed, n, zs, classes):
    g = torch.Generator().manual_seed(seed)
    theta = torch.softmax(torch.randn(n, zs, generator=g, dtype=torch.float64) * 3, 1)
    y = torch.randint(classes, (n,), generator=g)
    expected = _leep_loops(theta.tolist(), y.tolist(), classes)
    assert leep(theta, y, classes) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert leep(theta, y, classes) <= 1e-12


def test_leep_is_zero_for_a_source_that_determines_the_target_labels():
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    theta = torch.nn.functional.one_hot((y + 1) % 3, 3).double()  # a relabelling
    assert leep(theta, y) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------
# LogME


def _marginal_log_likelihood(f, y, alpha, beta):
    """log N(y; 0, FFᵀ/α + I/β): the evidence of y = Fw + ε with w ~ N(0, I/α), ε ~ N(0, I/β),
    written as the Gaussian it is (no SVD, no posterior mean)."""
    cov = f @ f.T / alpha + torch.eye(len(y), dtype=torch.float64) / beta
    dist = torch.distributions.MultivariateNormal(torch.zeros(len(y), dtype=torch.float64), cov)
    return float(dist.log_prob(y))


@settings(max_examples=20, deadline=None)
@given(seeds, st.integers(3, 25), st.integers(1, 6))
def test_logme_maximises_the_evidence_of_the_hand_formula(seed, extra, d):
    n = d + extra  # n > d: with n <= d the labels are fitted exactly and β has no maximum
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = f @ torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        n, generator=g, dtype=torch.float64
    )
    alpha, beta, per_example = logme_fit(f, y)
    evidence = per_example * n
    assert evidence == pytest.approx(log_evidence(f, y, alpha, beta), rel=1e-8, abs=1e-8)
    assert evidence == pytest.approx(_marginal_log_likelihood(f, y, alpha, beta), rel=1e-7)
    # The fixed point's conditions, from the posterior computed directly.
    a = alpha * torch.eye(d, dtype=torch.float64) + beta * f.T @ f
    m = beta * torch.linalg.solve(a, f.T @ y)
    gamma = float((beta * torch.linalg.eigvalsh(f.T @ f) / torch.linalg.eigvalsh(a)).sum())
    if alpha < 1e11 and beta < 1e11:  # not at the cap
        assert alpha == pytest.approx(gamma / float(m @ m), rel=1e-5)
        assert beta == pytest.approx((n - gamma) / float(((f @ m - y) ** 2).sum()), rel=1e-5)
        for da, db in [(1.2, 1), (1 / 1.2, 1), (1, 1.2), (1, 1 / 1.2)]:
            assert log_evidence(f, y, alpha * da, beta * db) <= evidence + 1e-9


def test_logme_of_classes_is_the_mean_over_one_hot_columns():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(30, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 3] * 10)  # class 2 never occurs: no column for it
    columns = [logme_fit(f, (labels == k).double())[2] for k in (0, 1, 3)]
    assert logme(f, labels) == pytest.approx(sum(columns) / 3, rel=1e-12)


def test_logme_prefers_features_that_carry_the_labels():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(3, (200,), generator=g)
    noise = torch.randn(200, 5, generator=g, dtype=torch.float64)
    informative = torch.cat([torch.nn.functional.one_hot(labels, 3).double(), noise[:, :2]], 1)
    assert logme(informative + 0.1 * noise, labels) > logme(noise, labels) + 0.5


# --------------------------------------------------------------------------------------------
# Probes, cross-kind outputs and the encoder gradient


def _task(name, kind, tags, n, seed):
    rng = random.Random(seed)
    rule = {f"w{i}": rng.randrange(len(tags)) for i in range(20)}
    out = []
    for i in range(n):
        words = tuple(f"w{rng.randrange(20)}" for _ in range(rng.randint(3, 7)))
        out.append(TaggedSentence(words, tuple(tags[rule[w]] for w in words), f"{name}:{i}"))
    return TaskData(name, kind, LabelMap(tags, name=name.replace(".", "__"), kind=kind), out)


def test_a_probe_of_another_kind_is_pooled_or_spread_over_the_sentence():
    target = feat.TaskFeatures(
        kind="token",
        points=torch.tensor([[1.0, 0], [0, 1], [1, 1]]),
        labels=torch.tensor([0, 1, 0]),
        tokens=torch.tensor([[1.0, 0], [0, 1], [1, 1]]),
        token_item=torch.tensor([0, 0, 1]),
        pooled=torch.tensor([[2.0, 0], [0, 3]]),
        num_labels=2,
    )
    w, b = torch.tensor([[1.0, 0], [0, 1]]), torch.tensor([0.5, -0.5])
    spread = feat.source_outputs(w, b, "sentence", target)  # one sentence output per token
    assert spread.tolist() == [[2.5, -0.5], [2.5, -0.5], [0.5, 2.5]]
    sentence = feat.TaskFeatures(
        **{
            **target.to_dict(),
            "kind": "sentence",
            "points": target.pooled,
            "labels": torch.tensor([0, 1]),
        }
    )
    pooled = feat.source_outputs(w, b, "token", sentence)  # tokens' logits, mean per sentence
    assert pooled.tolist() == [[1.0, 0.0], [1.5, 0.5]]


def test_the_probe_gradient_is_autograds_and_the_cosines_are_of_it(tmp_path):
    tasks = [
        _task("toy.a", "token", ["A", "B", "C"], 24, 0),
        _task("toy.b", "token", ["x", "y"], 24, 1),
    ]
    config = TrainConfig(
        target="toy.a", sources=["toy.b"], encoder="tiny", max_length=16, device="cpu"
    )
    model = build_model(tasks, config, tmp_path).eval()
    grads = []
    for task in tasks:
        items = feat.tokenize(task, model, 16)
        features = feat.encode_task(model, task, items)
        w, b = feat.fit_probe(features)
        got = feat.probe_gradient(model, task, items, w, b, probe_size=5, batches=3, seed=2)
        # Reference: the same three seeded batches, a hand-written head, autograd.grad.
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(2)).tolist()
        params = list(model.encoder.parameters())
        total = [torch.zeros_like(p) for p in params]
        for k in range(3):
            inputs = collate([items[r] for r in order[5 * k : 5 * k + 5]], 0)
            hidden = model.encoder(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).last_hidden_state
            logits = hidden @ w.T + b
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, len(b)), inputs["labels"].reshape(-1), ignore_index=-100
            )
            step = torch.autograd.grad(loss, params, allow_unused=True)
            total = [t if g is None else t + g / 3 for t, g in zip(total, step, strict=True)]
        expected = torch.cat([t.reshape(-1) for t in total])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
        grads.append(got)
    g64 = torch.stack(grads).double()
    cosine = float(g64[0] @ g64[1] / (g64[0].norm() * g64[1].norm()))
    matrix = gradient_cosine_matrix(torch.stack(grads))
    assert float(matrix[0, 1]) == pytest.approx(cosine, abs=1e-5)
    assert float(matrix[0, 0]) == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------------------------
# The command line


def _conll(path, n, tags, seed):
    rng = random.Random(seed)
    rule = {f"w{i}": rng.randrange(len(tags)) for i in range(30)}
    blocks = []
    for _ in range(n):
        words = [f"w{rng.randrange(30)}" for _ in range(rng.randint(3, 8))]
        blocks.append("".join(f"{w}\t_\t{tags[rule[w]]}\n" for w in words))
    path.write_text("\n".join(blocks), encoding="utf-8")
    return os.fspath(path)


def _csv(path, n, seed):
    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(n):
        words = [f"w{rng.randrange(30)}" for _ in range(rng.randint(3, 8))]
        lines.append(f"{' '.join(words)},{'pos' if 'w1' in words else 'neg'}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return os.fspath(path)


def test_the_command_ranks_sources_and_writes_table_json_and_heatmap(tmp_path, capsys):
    target = _conll(tmp_path / "tags.conll", 60, ["T0", "T1", "T2"], 1)
    sources = [
        _conll(tmp_path / "other.conll", 60, ["S0", "S1"], 2),
        _csv(tmp_path / "rev.csv", 60, 3),
    ]
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [
        "similarity",
        "--target",
        target,
        "--sources",
        ",".join(sources),
        "--encoder",
        "tiny",
        "--size",
        "40",
        "--probe-size",
        "8",
        "--probe-batches",
        "2",
        "--max-length",
        "16",
        "--out",
        os.fspath(out),
        "--cache",
        os.fspath(cache),
    ]
    assert cli.main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "target tags (token)" in printed and "other" in printed and "rev" in printed
    result = json.loads((out / "similarity.json").read_text())
    assert set(result["scores"]) == {"other", "rev"}
    for name in ("covariance", "covariance-normalized", "gradient-cosine", "leep", "logme"):
        matrix = result["matrices"][name]
        assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
        assert sorted(result["ranks"][s][name] for s in ("other", "rev")) in ([1, 2], [1, 1])
        assert all(math.isfinite(v) for row in matrix for v in row)
    assert 0 <= result["scores"]["rev"]["covariance"] <= 1
    assert (out / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "similarity.txt").read_text().startswith("target tags")
    cached = sorted(p.name.split("-")[0] for p in cache.iterdir())
    assert cached == ["features"] * 3 + ["gradient"] * 3 + ["probe"] * 3
    # A second run reads the cache and gives the same matrices.
    assert (
        cli.main([*args[:-4], "--out", os.fspath(tmp_path / "again"), "--cache", os.fspath(cache)])
        == 0
    )
    again = json.loads((tmp_path / "again" / "similarity.json").read_text())
    assert again["matrices"] == result["matrices"]


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ("nope.task", "unknown corpus 'nope'"),
        ("brown", "must be written 'corpus.task'"),
        (",", "at least one source"),
    ],
)
def test_a_bad_task_is_one_error_line(tmp_path, capsys, sources, message):
    target = _conll(tmp_path / "tags.conll", 20, ["T0", "T1"], 1)
    args = [
        "similarity",
        "--target",
        target,
        "--sources",
        sources,
        "--encoder",
        "tiny",
        "--no-cache",
        "--out",
        os.fspath(tmp_path / "out"),
    ]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
