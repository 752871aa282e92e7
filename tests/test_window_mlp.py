"""The TAWT paper's App. B setting: the ``window-mlp`` encoder and word-level examples.

- window features against a hand computation, and the encoder's states against a float64
  ``ReLU(W x + b)`` built from the tokenizer's ids and the vector table;
- word examples: one labelled word each, a seeded sample, the window crop exact;
- ``pyxtask train --encoder window-mlp --method tawt-samples`` updates the sample weights with
  products covering all of phi; ``pyxtask export`` refuses the run in one line;
- the shipped ``benchmarks/configs/tawt_samples_paper.toml`` holds the paper's settings.
"""

import json
import os
from pathlib import Path

import torch

from pyxtask import cli
from pyxtask.config import TrainConfig, WindowMLPConfig, load_config
from pyxtask.data import LabelMap, TaggedSentence, tokenize_corpus
from pyxtask.data.words import WordExample, word_examples
from pyxtask.models import MultiTaskModel
from pyxtask.sample_gradients import SampleGradientProducts
from pyxtask.tasks import TaskData, load_tasks
from pyxtask.window_mlp import WindowMLPEncoder, build_window_mlp, window_features

from ._corpora import prepare_or_skip

REPO = Path(__file__).resolve().parents[1]
IGNORE = LabelMap.ignore_index


def sentences(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 3 + int(torch.randint(0, 6, (1,), generator=g))
        ids = torch.randint(0, 9, (length,), generator=g).tolist()
        out.append(
            TaggedSentence(
                tuple(f"w{j}" for j in ids), tuple("AB"[j % 2] for j in ids), f"toy:{i + 1}"
            )
        )
    return out


def toy_model(window=1, hidden=6, dim=3):
    train = sentences()
    labels = LabelMap(["A", "B"], name="toy__pos")
    task = TaskData("toy.pos", "token", labels, train, sentences(4, 1), sentences(4, 2))
    config = TrainConfig(
        target="toy.pos", sources=[], encoder="window-mlp", dropout=0.0,
        window_mlp=WindowMLPConfig(hidden=hidden, window=window, embeddings="random",
                                   random_dim=dim),
    )  # fmt: skip
    torch.manual_seed(0)
    return build_window_mlp([task], config).eval(), train


def test_window_features_equal_a_hand_computation():
    vectors = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    ids = torch.tensor([[2, 3, 4], [4, 2, 0]])  # the second sentence: 2 words and padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    x = window_features(vectors, ids, mask, window=1)
    expected = torch.tensor([
        [[0, 0, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 0, 0]],
        [[0, 0, 5, 6, 1, 2], [5, 6, 1, 2, 0, 0], [1, 2, 0, 0, 0, 0]],
    ], dtype=torch.float32)  # fmt: skip
    assert torch.equal(x, expected)
    # Padding is zeros in the window even where the id has a vector (mask 0, id 4).
    x = window_features(vectors, torch.tensor([[2, 4]]), torch.tensor([[1, 0]]), window=1)
    assert torch.equal(x, torch.tensor([[[0.0, 0, 1, 2, 0, 0], [1, 2, 0, 0, 0, 0]]]))


def test_encoder_states_are_relu_of_phi_on_the_words_vectors_float64():
    model, train = toy_model(window=2)
    encoder = model.encoder
    assert isinstance(encoder, WindowMLPEncoder)
    assert [n for n, p in model.encoder.named_parameters() if p.requires_grad] == [
        "phi.weight", "phi.bias"
    ]  # fmt: skip
    sentence = train[3]
    ids = model.tokenizer(list(sentence.words), is_split_into_words=True)["input_ids"]
    vocab = model.tokenizer.get_vocab()
    assert ids == [vocab[w] for w in sentence.words]  # one position per word
    hidden = model.encode(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
    table = encoder.word_vectors.double()
    w, b = encoder.phi.weight.double(), encoder.phi.bias.double()
    zero = torch.zeros(table.shape[1], dtype=torch.float64)
    for k in range(len(ids)):
        window = [table[ids[j]] if 0 <= j < len(ids) else zero for j in range(k - 2, k + 3)]
        expected = torch.relu(w @ torch.cat(window) + b)
        torch.testing.assert_close(hidden[k].double(), expected, rtol=1e-5, atol=1e-5)


def test_word_examples_label_one_word_each_and_sample_deterministically():
    corpus = sentences(30)
    total = sum(len(s.words) for s in corpus)
    first = word_examples(corpus, 25, seed=3)
    assert first == word_examples(corpus, 25, seed=3)
    assert first != word_examples(corpus, 25, seed=4)
    assert len(word_examples(corpus, None, seed=0)) == total
    assert len({e.source for e in first}) == 25  # distinct words
    by_source = {s.source: s for s in corpus}
    labels = LabelMap(["A", "B"], name="toy")
    encoded, _ = tokenize_corpus(first, labels, model_tokenizer())
    for example, item in zip(first, encoded, strict=True):
        sentence = by_source[example.source.rsplit(" word ", 1)[0]]
        k = int(example.source.rsplit(" word ", 1)[1]) - 1
        assert example.words == sentence.words
        assert example.tags[example.position] == sentence.tags[k] and example.position == k
        labelled = [x for x in item.labels if x != IGNORE]
        assert labelled == [labels.encode(sentence.tags[k])]
        assert item.labels[example.position] == labelled[0]


def model_tokenizer():
    return toy_model()[0].tokenizer


def test_the_window_crop_gives_the_labelled_word_the_same_state():
    model, train = toy_model(window=2)
    full = word_examples(train, None, seed=0)
    cropped = word_examples(train, None, seed=0, context=2)
    assert [len(e.words) for e in cropped] != [len(e.words) for e in full]
    labels = LabelMap(["A", "B"], name="toy__pos")

    def labelled_states(examples):
        encoded, _ = tokenize_corpus(examples, labels, model.tokenizer)
        out = []
        for item in encoded:
            ids = torch.tensor([item.input_ids])
            h = model.encode(ids, torch.ones_like(ids))[0]
            (k,) = [i for i, x in enumerate(item.labels) if x != IGNORE]
            out.append(h[k])
        return torch.stack(out)

    # Equal up to float32 rounding: the GEMM sums in another order for another length.
    torch.testing.assert_close(
        labelled_states(full), labelled_states(cropped), rtol=1e-6, atol=1e-6
    )
    for e in cropped:
        assert isinstance(e, WordExample) and len(e.words) <= 5


def test_load_tasks_counts_words_and_keeps_dev_test_sentences():
    prepare_or_skip("wsj-pos")
    config = TrainConfig(
        target="wsj-pos.pos", sources=[], paradigm="single", method="fixed",
        examples="words", target_size=50, dev_size=3, test_size=3, encoder="window-mlp",
    )  # fmt: skip
    (target,) = load_tasks(config)
    assert len(target.train) == 50
    assert all(isinstance(e, WordExample) and len(e.words) <= 5 for e in target.train)
    assert not any(isinstance(e, WordExample) for e in target.dev + target.test)
    assert [e.source for e in load_tasks(config)[0].train] == [e.source for e in target.train]


def test_products_cover_all_of_phi():
    model, _ = toy_model()
    assert SampleGradientProducts(model.encoder, layers="all").coverage == 1.0


RUN = [
    "train", "--target", "wsj-pos.pos", "--sources", "brown.pos", "--encoder", "window-mlp",
    "--target-size", "30", "--source-size", "60", "--dev-size", "4", "--test-size", "4",
    "--method", "tawt-samples", "--epochs", "2", "--batch-size", "16", "--lr", "3e-3",
    "--device", "cpu", "--quiet",
    "--set", "examples=words", "--set", "dropout=0.0",
    "--set", "window_mlp.embeddings=random", "--set", "window_mlp.hidden=32",
    "--set", "tawt_samples.similarity=dot", "--set", "tawt_samples.update_every=1",
]  # fmt: skip


def test_cli_train_window_mlp_tawt_samples_updates_weights_and_export_refuses(tmp_path, capsys):
    prepare_or_skip("wsj-pos")
    prepare_or_skip("brown")
    out = tmp_path / "run"
    assert cli.main([*RUN, "--output", os.fspath(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weight_updates"] == 2
    assert summary["train_examples"] == {"wsj-pos.pos": 30, "brown.pos": 60}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if r.get("kind") == "sample_weights"]
    assert [r["coverage"] for r in updates] == [1.0, 1.0]
    assert all(r["dots"]["max_abs"] > 0 for r in updates)
    saved = torch.load(out / "sample_weights.pt", weights_only=False)
    p = saved["weights"]
    assert p.shape == (60,) and abs(float(p.sum()) - 1) < 1e-9
    assert float(p.max() - p.min()) > 0  # moved away from uniform
    best = MultiTaskModel.load(out / "best")
    assert isinstance(best.encoder, WindowMLPEncoder)
    capsys.readouterr()
    code = cli.main(["export", os.fspath(out), "--out", os.fspath(tmp_path / "bundle")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "window-mlp" in err and "Traceback" not in err
    assert not (tmp_path / "bundle").exists()


def test_the_shipped_config_is_the_papers_setting():
    config = load_config(REPO / "benchmarks" / "configs" / "tawt_samples_paper.toml")
    assert (config.encoder, config.examples, config.method) == ("window-mlp", "words",
                                                                "tawt-samples")  # fmt: skip
    assert (config.target, config.sources) == ("wsj-pos.pos", ["brown.pos"])
    assert (config.target_size, config.source_size) == (100, 1000)
    assert (config.epochs, config.batch_size, config.lr) == (200, 128, 3e-4)
    assert (config.weight_decay, config.dropout, config.clip) == (0.0, 0.0, 0.0)
    assert (config.window_mlp.hidden, config.window_mlp.window) == (4096, 2)
    assert config.window_mlp.embeddings == "minilm"
    samples = config.tawt_samples
    assert (samples.similarity, samples.c, samples.lr, samples.update_every) == ("dot", 5, 1, 5)
    assert config.epochs // samples.update_every == 40  # the paper's 40 weight updates
