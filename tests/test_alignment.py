"""Covariance alignment (Wu, Zhang & Ré 2020, Alg. 1): the embedding hook, the fold into the
embedding tables, the encoder-fixed stage against an autograd reference, bitwise plain
training at R = I, checkpoint/resume, export, configuration errors and the command line."""

import copy
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
from pyxtask.config import AlignmentConfig, ConfigError, TrainConfig, from_mapping
from pyxtask.data import LabelMap, TaggedSentence
from pyxtask.methods import AlignmentMethod, StepContext
from pyxtask.methods import fixed_weighting as paradigm_weighting
from pyxtask.methods.alignment import embedding_tables, fold_alignment
from pyxtask.models import MultiTaskModel
from pyxtask.tasks import TaskData, build_model
from pyxtask.trainer import Trainer
from tests._corpora import prepare_or_skip

transformers.utils.logging.disable_progress_bar()
VOCAB = 40


def _tasks(seed=0, n_target=16, n_source=32):
    """A target and a source tagging words by one rule under other names."""
    rng = random.Random(seed)
    rule = {f"w{i}": rng.randrange(3) for i in range(VOCAB)}

    def task(name, tags, n, n_eval):
        def sentences(split, k):
            out = []
            for i in range(k):
                words = tuple(f"w{rng.randrange(VOCAB)}" for _ in range(rng.randint(4, 9)))
                out.append(
                    TaggedSentence(words, tuple(tags[rule[w]] for w in words), f"{split}{i}")
                )
            return out

        labels = LabelMap(tags, name=name.replace(".", "__"), kind="token")
        return TaskData(name, "token", labels, sentences("tr", n), sentences("d", n_eval),
                        sentences("te", n_eval))  # fmt: skip

    return [task("syn.target", ["A", "B", "C"], n_target, 8), task("syn.source", ["x", "y", "z"],
                                                                    n_source, 0)]  # fmt: skip


def _config(**changes):
    base = dict(
        target="syn.target", sources=["syn.source"], encoder="tiny", paradigm="normalized-joint",
        method="alignment", epochs=2, batch_size=8, lr=3e-3, max_length=32, device="cpu",
        checkpoint_every=10**6, alignment=AlignmentConfig(epochs=1, lr=1e-2),
    )  # fmt: skip
    base.update(changes)
    return TrainConfig(**base)


def _fit(tmp_path, name, config, method=None, **kwargs):
    trainer = Trainer(config, tmp_path / name, progress=False, tasks=_tasks(), method=method,
                      **kwargs)  # fmt: skip
    return trainer, trainer.fit()


def _best(run):
    return MultiTaskModel.load(run / "best").state_dict()


def _train_losses(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [
        (r["step"], r["task"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"
    ]


# --------------------------------------------------------------------------------------------
# The hook and the fold


def _tiny_model(dtype=torch.float64):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32, type_vocab_size=2)  # fmt: skip
    labels = [(n, LabelMap(["a", "b", "c"], name=n, kind="token")) for n in ("t", "s")]
    return MultiTaskModel.from_config(config, labels).to(dtype).eval()


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny_model()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 1.0), length=st.integers(1, 12))
def test_folded_tables_give_the_aligned_model_float64(tiny_model, seed, scale, length):
    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(tiny_model)
    noise = torch.randn(16, 16, generator=g, dtype=torch.float64)
    matrix = torch.eye(16, dtype=torch.float64) + scale * noise
    ids = torch.randint(0, 50, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length // 2 + 1 :] = 0
    model.embedding_transform = lambda task, x: x @ matrix if task == "t" else x
    aligned = model("t", ids, mask).logits
    plain_source = model("s", ids, mask).logits
    model.embedding_transform = None
    fold_alignment(model.encoder, matrix)
    folded = model("t", ids, mask).logits
    torch.testing.assert_close(folded, aligned, rtol=1e-10, atol=1e-12)
    # The transform only touches the task it names; encode() without a task never calls it.
    assert not torch.equal(plain_source, aligned)


def test_identity_transform_is_bitwise_no_transform(tiny_model):
    model = _tiny_model(torch.float32)
    ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    plain = model("t", ids, mask).logits
    eye = torch.eye(16)
    model.embedding_transform = lambda task, x: x @ eye
    assert torch.equal(model("t", ids, mask).logits, plain)


def test_encoder_without_bert_embeddings_is_a_value_error():
    with pytest.raises(ValueError, match="BERT-style encoder"):
        embedding_tables(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------
# Alg. 1's encoder-fixed step against an autograd reference of its loss


def test_alignment_step_gradients_equal_the_functional_reference(tmp_path):
    config = _config(dropout=0.0)
    tasks = _tasks()
    model = build_model(tasks, config, tmp_path).eval()  # no dropout: a deterministic loss
    from pyxtask.data import tokenize_corpus

    encoded = [
        tokenize_corpus(t.train, t.labels, model.tokenizer, max_length=32, stride=8)[0]
        for t in tasks
    ]
    ctx = StepContext(model, tasks, encoded, device=torch.device("cpu"), batch_size=8)
    method = AlignmentMethod(paradigm_weighting(config), align_epochs=1, lr=1e-2)
    method.bind(ctx)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # R away from I, so the reference is not the plain model
        for matrix in method.matrices.values():
            matrix.add_(0.05 * torch.randn(matrix.shape, generator=g))
    factor = float(method.weighting.loss_factors()[1])
    indices = list(range(8))
    method.step(ctx, [[(1, indices)]])

    # Reference: R_source folded functionally into the tables (no hook), autograd.grad.
    names = ["encoder.embeddings." + n + ".weight" for n in
             ("word_embeddings", "position_embeddings", "token_type_embeddings")]  # fmt: skip
    r = method.matrices["syn__source"].detach().clone().requires_grad_(True)
    params = dict(model.named_parameters())
    params.update({n: params[n].detach() @ r for n in names})
    head = list(model.task_parameters("syn__source"))
    model.embedding_transform = None
    loss = torch.func.functional_call(model, params, (*_batch(ctx, 1, indices),)).loss * factor
    reference = torch.autograd.grad(loss, [r, *head])
    torch.testing.assert_close(method.matrices["syn__source"].grad, reference[0])
    for p, ref in zip(head, reference[1:], strict=True):
        torch.testing.assert_close(p.grad, ref)
    # The encoder is held fixed (no gradient), the target's head and R untouched.
    assert all(p.grad is None for p in model.shared_parameters())
    assert all(p.grad is None for p in model.task_parameters("syn__target"))
    assert method.matrices["syn__target"].grad is None


def _batch(ctx, t, indices):
    from pyxtask.data import collate

    batch = collate([ctx.encoded[t][i] for i in indices], ctx.pad)
    return ctx.tasks[t].head, batch["input_ids"], batch["attention_mask"], batch["labels"]


# --------------------------------------------------------------------------------------------
# Training runs


def test_frozen_identity_alignment_reproduces_plain_training_bitwise(tmp_path):
    plain_config = _config(method="fixed")
    plain, _ = _fit(tmp_path, "plain", plain_config)
    frozen = AlignmentMethod(paradigm_weighting(plain_config), align_epochs=0, frozen=True)
    aligned, summary = _fit(tmp_path, "aligned", _config(), method=frozen)
    # The alignment path ran (a transform on every forward, the fold and unfold at epoch ends).
    assert summary["method_name"] == "alignment" and summary["alignment_distance"] == {
        "syn__target": 0.0, "syn__source": 0.0}  # fmt: skip
    a, b = plain.model.state_dict(), aligned.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    best_a, best_b = _best(tmp_path / "plain"), _best(tmp_path / "aligned")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    assert _train_losses(tmp_path / "plain") == _train_losses(tmp_path / "aligned")


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A run that is all Alg. 1 (one epoch, the encoder fixed), its checkpoint kept."""
    folder = tmp_path_factory.mktemp("one-epoch")
    trainer, summary = _fit(folder, "run", _config(epochs=1), keep_checkpoint=True)
    return trainer, summary, folder / "run"


def test_encoder_fixed_stage_then_best_model_is_the_folded_target(one_epoch, tmp_path):
    trainer, summary, run = one_epoch
    initial = build_model(_tasks(), _config(epochs=1), tmp_path / "init").state_dict()
    final = trainer.model.state_dict()
    method = trainer.method
    assert isinstance(method, AlignmentMethod)
    r_target = method.matrices["syn__target"].detach()
    tables = {"encoder.embeddings." + n + ".weight" for n in
              ("word_embeddings", "position_embeddings", "token_type_embeddings")}  # fmt: skip
    for key, value in initial.items():
        if key in tables:  # the target's R folded into the untouched tables
            expected = (value.double() @ r_target.double()).float()
            assert torch.equal(final[key], expected), key
        elif key.startswith("encoder."):
            assert torch.equal(final[key], value), key  # held fixed throughout Alg. 1
        else:
            assert not torch.equal(final[key], value), key  # the heads moved
    assert all(d > 1e-4 for d in summary["alignment_distance"].values())
    best = _best(run)
    assert all(torch.equal(best[k], final[k]) for k in best)  # one epoch: best is the last
    # The checkpoint keeps R and the unfolded tables (what the next step would restore).
    saved = torch.load(run / "checkpoint.pt", weights_only=False)["method"]
    assert torch.equal(saved["matrices"]["syn__target"], r_target)
    word = "encoder.embeddings.word_embeddings.weight"
    assert torch.equal(saved["unfolded"][0], initial[word])


class _Interrupted(Exception):
    pass


class _StopsAt(AlignmentMethod):
    def __init__(self, stop_at, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at = stop_at

    def step(self, ctx, micro_batches):
        if ctx.global_step == self.stop_at:
            raise _Interrupted
        return super().step(ctx, micro_batches)


RESUMED = _config(epochs=2, checkpoint_every=4)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    trainer, _ = _fit(folder, "run", RESUMED, keep_checkpoint=True)
    assert trainer.ctx.steps_per_epoch == 6  # ceil(16 / 8) + ceil(32 / 8)
    return folder / "run"


# Stopped mid-epoch in Alg. 1's stage (resumed from step 4), and at the first step after the
# epoch-end checkpoint (step 6), which holds the target's folded tables.
@pytest.mark.parametrize("stop_at", [5, 6])
def test_resume_keeps_the_alignment_matrices_bitwise(tmp_path, straight, stop_at):
    method = _StopsAt(stop_at, paradigm_weighting(RESUMED), align_epochs=1, lr=1e-2)
    with pytest.raises(_Interrupted):
        _fit(tmp_path, "resumed", RESUMED, method=method)
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert saved["global_step"] == (4 if stop_at == 5 else 6)
    assert (saved["method"]["unfolded"] is None) == (stop_at == 5)
    resumed = Trainer(RESUMED, tmp_path / "resumed", progress=False, tasks=_tasks(),
                      keep_checkpoint=True)  # fmt: skip
    resumed.fit(resume=True)
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    for head, matrix in a["method"]["matrices"].items():
        assert torch.equal(matrix, b["method"]["matrices"][head]), head
        assert not torch.equal(matrix, torch.eye(matrix.shape[0]))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    best_a, best_b = _best(straight), _best(tmp_path / "resumed")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_export_of_an_aligned_run_matches_the_aligned_model_in_onnxruntime(one_epoch, tmp_path):
    import onnxruntime as ort

    from pyxtask.export import export_run

    trainer, _, run = one_epoch
    bundle = tmp_path / "bundle"
    export_run(run, bundle, optimize=False, torchscript=False, measure=False)
    # The aligned model: the checkpoint's unfolded tables with the target's R as a transform.
    saved = torch.load(run / "checkpoint.pt", weights_only=False)
    model = copy.deepcopy(trainer.model)
    model.load_state_dict(saved["model"])
    with torch.no_grad():
        for table, unfolded in zip(embedding_tables(model.encoder), saved["method"]["unfolded"],
                                   strict=True):  # fmt: skip
            table.copy_(unfolded)
    r = saved["method"]["matrices"]["syn__target"]
    model.embedding_transform = lambda task, x: x @ r
    model.eval()
    ids = torch.tensor([[2, 7, 9, 11, 3], [2, 5, 3, 0, 0]])
    mask = (ids != 0).long()
    expected = model("syn__target", ids, mask).logits.detach().numpy()
    session = ort.InferenceSession(os.fspath(bundle / "model.onnx"))
    (logits,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert not any("alignment" in p.name for p in bundle.rglob("*"))


# --------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"alignment": {"epochs": -1}}, "alignment.epochs"),
        ({"alignment": {"lr": 0}}, "alignment.lr"),
        ({"alignment": {"tasks": "sources"}}, "alignment.tasks"),
        ({"alignment": {"rotate": True}}, "alignment.rotate"),
        ({"paradigm": "pretrain"}, "paradigm 'single'"),
    ],
)
def test_bad_alignment_config_is_a_config_error(table, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping({"method": "alignment", **table}, source="run.toml")


def test_cli_bad_alignment_value_is_one_error_line(capsys):
    assert cli.main(["train", "--method", "alignment", "--set", "alignment.epochs=-2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "alignment.epochs = -2" in err and "Traceback" not in err


def test_a_saved_model_folder_is_an_encoder_for_transfer(one_epoch, tmp_path):
    _, _, run = one_epoch
    labels = LabelMap(["P", "Q"], name="new", kind="token")
    model = MultiTaskModel.from_pretrained(run / "best", [("new", labels)])
    saved = MultiTaskModel.load(run / "best")
    mine, theirs = model.encoder.state_dict(), saved.encoder.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert model.task_names == ("new",) and model.tokenizer.vocab == saved.tokenizer.vocab


# --------------------------------------------------------------------------------------------
# The command line on a real pair, joint and transfer


@pytest.fixture(scope="module")
def real_corpora():
    prepare_or_skip("wsj-pos")
    prepare_or_skip("brown")


SMALL = ["train", "--encoder", "tiny", "--target-size", "24", "--source-size", "40",
         "--dev-size", "16", "--test-size", "16", "--max-length", "48", "--batch-size", "8",
         "--device", "cpu", "--quiet", "--lr", "3e-3"]  # fmt: skip


@pytest.mark.network
@pytest.mark.filterwarnings("ignore::pyxtask.data.tokenization.LongSequenceWarning")
def test_cli_alignment_joint_and_transfer_from_a_source_run(real_corpora, tmp_path, capsys):
    joint = tmp_path / "joint"
    args = [*SMALL, "--target", "wsj-pos.pos", "--sources", "brown.pos", "--epochs", "2"]
    assert cli.main([*args, "--method", "alignment", "--output", os.fspath(joint)]) == 0
    summary = json.loads((joint / "summary.json").read_text())
    assert summary["method"] == "alignment-normalized-joint"
    assert summary["aligned_tasks"] == ["wsj-pos__pos", "brown__pos"]
    assert min(summary["alignment_distance"].values()) > 0
    records = [json.loads(x) for x in (joint / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "alignment"] == [0, 1]
    # Transfer: a source model, then the target fine-tuned from it with its own alignment.
    source = tmp_path / "source"
    single = [*SMALL, "--paradigm", "single", "--epochs", "1"]
    source_run = [*single, "--target", "brown.pos", "--sources", "brown.upos", "--method", "fixed"]
    assert cli.main([*source_run, "--output", os.fspath(source)]) == 0
    target = tmp_path / "target"
    transfer = [*single, "--target", "wsj-pos.pos", "--method", "alignment",
                "--encoder", os.fspath(source / "best"), "--output", os.fspath(target)]  # fmt: skip
    assert cli.main([*transfer, "--set", "alignment.epochs=0"]) == 0, capsys.readouterr().err
    summary = json.loads((target / "summary.json").read_text())
    assert summary["method"] == "alignment-single" and summary["sources"] == []
    assert summary["aligned_tasks"] == ["wsj-pos__pos"]
    assert summary["alignment_distance"]["wsj-pos__pos"] > 0
    assert "alignment-single" in capsys.readouterr().out
