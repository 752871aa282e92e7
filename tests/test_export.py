"""Exported bundles: ONNX / TorchScript parity with PyTorch, Tagger = trainer, manifest checks.

Two tiny runs (a token task and a sentence task, ``max_length=16``) are trained and exported
once per module, with fp16 and int8 variants. Their synthetic words include out-of-vocabulary
ones (``zq123456x``) that split into many sub-words, and the test sentences run to 60 words,
so a token sentence is cut into several overlapping windows of the 16-sub-word limit.

Tolerances: the fp32 ONNX graph is rewritten by onnxruntime's transformer optimizer (fused
attention, LayerNorm, GELU) and runs different kernels with a different summation order than
eager PyTorch (which itself uses SDPA attention where the export traced the eager pattern), so
logits of order 1-3 agree to a few float32 ulps times the depth, well inside ``atol=1e-4``
(observed ~1e-6). TorchScript runs the same ATen kernels as eager and agrees even closer.
"""

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import pyxtask
from pyxtask.data import LabeledText, LabelMap, TaggedSentence, collate, tokenize_corpus
from pyxtask.evaluation import predict
from pyxtask.export import ExportError, TargetModel, export_run
from pyxtask.models import MultiTaskModel
from pyxtask.serving import BundleError, Tagger, read_manifest
from tests._bundles import VOCAB, make_bundle, words

ATOL = 1e-4  # fp32 ONNX / TorchScript against eager PyTorch (see the module docstring)
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


class Built:
    """One trained run, its bundle, and the PyTorch reference of the exported module."""

    def __init__(self, run_dir: Path, bundle: Path, tasks: list) -> None:
        self.run_dir = run_dir
        self.bundle = bundle
        self.tasks = tasks
        self.target = tasks[0]
        self.manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        self.model = MultiTaskModel.load(run_dir / "best")
        self.module = TargetModel(self.model, self.manifest["head"]).eval()
        self.max_length = int(self.manifest["max_length"])
        self.stride = min(32, (self.max_length - 2) // 4)  # the trainer's rule
        self.pad = int(self.model.tokenizer.pad_token_id)
        self._taggers: dict[str, Tagger] = {}

    def tagger(self, variant: str = "fp32") -> Tagger:
        if variant not in self._taggers:
            self._taggers[variant] = Tagger(self.bundle, variant)
        return self._taggers[variant]

    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.module(ids, mask).numpy()


def _build(tmp_path_factory, kind: str) -> Built:
    root = tmp_path_factory.mktemp(f"export-{kind}")
    run_dir, bundle, tasks = make_bundle(root, kind, max_length=16, fp16=True, int8=True)
    return Built(run_dir, bundle, tasks)


@pytest.fixture(scope="module")
def token(tmp_path_factory) -> Built:
    return _build(tmp_path_factory, "token")


@pytest.fixture(scope="module")
def sentence(tmp_path_factory) -> Built:
    return _build(tmp_path_factory, "sentence")


@pytest.fixture(scope="module", params=["token", "sentence"])
def built(request) -> Built:
    return request.getfixturevalue(request.param)


def long_sentences(seed: int, n: int = 50, low: int = 30, high: int = 60) -> list[list[str]]:
    rng = random.Random(seed)
    return [list(words(rng, low, high)) for _ in range(n)]


def encode(b: Built, sentences: list[list[str]]):
    """The trainer's own tokenization of ``sentences`` (labels unused)."""
    if b.target.kind == "token":
        examples = [
            TaggedSentence(tuple(s), ("O",) * len(s), f"s{i}") for i, s in enumerate(sentences)
        ]
    else:
        label = b.target.labels.labels[0]
        examples = [LabeledText(" ".join(s), label, f"s{i}") for i, s in enumerate(sentences)]
    encoded, _ = tokenize_corpus(
        examples, None, b.model.tokenizer, max_length=b.max_length, stride=b.stride, warn=False
    )
    return encoded


# ---------------------------------------------------------------------------------------------
# Logit parity: ONNX (onnxruntime) and TorchScript against eager PyTorch


def _batches(b: Built) -> dict[str, list]:
    """Named batches of windows: one full-length window alone, one short one alone, mixed."""
    encoded = encode(b, long_sentences(7, n=30, low=1, high=6) + long_sentences(8, n=4))
    by_length = sorted(encoded, key=lambda e: len(e.input_ids))
    longest, shortest = by_length[-1], by_length[0]
    assert len(longest.input_ids) == b.max_length  # a window (or truncated text) at the limit
    assert len(shortest.input_ids) < b.max_length // 2
    one_per_length = list({len(e.input_ids): e for e in encoded}.values())
    rng = random.Random(3)
    mixed = one_per_length + rng.sample(encoded, 6)
    rng.shuffle(mixed)
    assert len({len(e.input_ids) for e in mixed}) >= 5  # really mixed lengths, padded
    return {"single-max": [longest], "single-short": [shortest], "mixed": mixed}


def _compare(b: Built, got: np.ndarray, want: np.ndarray, mask: np.ndarray, atol: float) -> None:
    assert got.shape == want.shape
    if b.target.kind == "token":  # padded positions' logits are meaningless: compare the rest
        real = mask.astype(bool)
        np.testing.assert_allclose(got[real], want[real], rtol=0, atol=atol)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("batch", ["single-max", "single-short", "mixed"])
def test_onnx_logits_equal_pytorch(built, batch):
    items = _batches(built)[batch]
    tensors = collate(items, built.pad)
    ids, mask = tensors["input_ids"], tensors["attention_mask"]
    want = built.logits(ids, mask)
    path = built.bundle / built.manifest["variants"]["fp32"]["file"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(built.manifest["inputs"])
    assert [o.name for o in session.get_outputs()] == list(built.manifest["outputs"])
    (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    _compare(built, got, want, mask.numpy(), ATOL)
    # Padding changes nothing: each row alone gives its logits in the padded batch.
    for row, item in enumerate(items[:4]):
        n = len(item.input_ids)
        one = np.asarray([item.input_ids], dtype=np.int64)
        (alone,) = session.run(["logits"], {"input_ids": one, "attention_mask": np.ones_like(one)})
        padded = got[row : row + 1, :n] if built.target.kind == "token" else got[row : row + 1]
        np.testing.assert_allclose(alone, padded, rtol=0, atol=ATOL)


@pytest.mark.parametrize("batch", ["single-max", "single-short", "mixed"])
def test_torchscript_logits_equal_pytorch(built, batch):
    assert built.manifest["torchscript"] == "model.ts"
    items = _batches(built)[batch]
    tensors = collate(items, built.pad)
    ids, mask = tensors["input_ids"], tensors["attention_mask"]
    traced = torch.jit.load(str(built.bundle / "model.ts"))
    with torch.inference_mode():
        got = traced(ids, mask).numpy()
    _compare(built, got, built.logits(ids, mask), mask.numpy(), ATOL)


# ---------------------------------------------------------------------------------------------
# Tagger = the trainer's predictions


def _word_logits(b: Built, encoded) -> list[list[np.ndarray]]:
    """Eager logits at the sub-word each word is read from (as words_from_subwords reads)."""
    out: list[list[np.ndarray]] = []
    for start in range(0, len(encoded), 16):
        chunk = encoded[start : start + 16]
        t = collate(chunk, b.pad)
        logits = b.logits(t["input_ids"], t["attention_mask"])
        for row, e in enumerate(chunk):
            if e.window == 0:
                out.append([None] * (1 + max(w for w in e.word_ids if w is not None)))
            sentence = out[-1]
            for pos, (w, marked) in enumerate(zip(e.word_ids, e.label_mask, strict=True)):
                if marked and w is not None:
                    if w >= len(sentence):
                        sentence.extend([None] * (w + 1 - len(sentence)))
                    if sentence[w] is None:
                        sentence[w] = logits[row, pos]
    return out


def assert_tags_equal_trainer(b: Built, sentences: list[list[str]]) -> int:
    """Tagger tags == ``train.predict`` tags, word for word; returns the number of words.

    A word whose two best eager logits are within 1e-3 may flip under the export's rounding
    (differences ~1e-6); such near-ties are the only mismatches allowed.
    """
    encoded = encode(b, sentences)
    assert max(e.num_windows for e in encoded) > 2  # long sentences really are windowed
    pred = predict(b.model, b.target, encoded, batch_size=8, device=CPU)
    expected = [b.target.labels.decode_many(p) for p in pred]
    tagged = b.tagger().tag(sentences)
    margins = None
    count = 0
    for i, (s, want, got) in enumerate(zip(sentences, expected, tagged, strict=True)):
        assert got.words == s
        assert len(got.labels) == len(s) == len(want)
        assert all(0.0 < p <= 1.0 for p in got.scores)
        count += len(s)
        for j, (x, y) in enumerate(zip(want, got.labels, strict=True)):
            if x != y:
                margins = margins or _word_logits(b, encoded)
                top = np.sort(margins[i][j])[::-1]
                assert top[0] - top[1] < 1e-3, f"sentence {i} word {j} ({s[j]!r}): {x} != {y}"
    return count


def test_tagger_equals_trainer_on_long_sentences(token):
    sentences = long_sentences(11, n=50)
    assert any(len(w) >= 8 for s in sentences for w in s if w.startswith("zq"))  # many sub-words
    pieces = token.model.tokenizer(sentences[0], is_split_into_words=True)["input_ids"]
    assert len(pieces) > 3 * token.max_length
    assert assert_tags_equal_trainer(token, sentences) > 50 * 30


def test_tagger_raw_text_equals_pre_split(token):
    sentences = long_sentences(12, n=8)
    tagger = token.tagger()
    from_words = tagger.tag(sentences)
    from_text = tagger.tag([" ".join(s) for s in sentences])
    assert [r.labels for r in from_text] == [r.labels for r in from_words]
    assert [r.words for r in from_text] == sentences


_WORD = st.one_of(
    st.integers(0, VOCAB - 1).map(lambda i: f"w{i}"),
    st.integers(0, 10**9).map(lambda i: f"zq{i}x"),
    st.sampled_from([".", ",", "w1-w2", "Ünïcode", "ABC", "x" * 30]),
)


@settings(max_examples=25)
@given(sentence=st.lists(_WORD, min_size=1, max_size=60))
def test_tagger_equals_trainer_any_sentence(token, sentence):
    encoded = encode(token, [sentence])
    pred = predict(token.model, token.target, encoded, batch_size=8, device=CPU)
    want = token.target.labels.decode_many(pred[0])
    got = token.tagger().tag([sentence])[0].labels
    if got != want:  # only a near-tie may differ (see assert_tags_equal_trainer)
        assert_tags_equal_trainer_single(token, sentence, want, got)


def assert_tags_equal_trainer_single(b, sentence, want, got):
    logits = _word_logits(b, encode(b, [sentence]))[0]
    for j, (x, y) in enumerate(zip(want, got, strict=True)):
        if x != y:
            top = np.sort(logits[j])[::-1]
            assert top[0] - top[1] < 1e-3, f"word {j} ({sentence[j]!r}): {x} != {y}"


def test_word_without_subwords_gets_no_label(token):
    result = token.tagger().tag([["w1", "\x00", "w2"]])[0]
    assert result.labels[1] is None and result.scores[1] == 0.0
    assert result.labels[0] in token.manifest["labels"] and result.labels[2] is not None


def test_sentence_label_is_argmax_of_pytorch_logits(sentence):
    texts = long_sentences(13, n=50)
    encoded = encode(sentence, texts)
    assert any(len(e.input_ids) == sentence.max_length for e in encoded)  # truncated texts
    pred = predict(sentence.model, sentence.target, encoded, batch_size=8, device=CPU)
    t = collate(encoded, sentence.pad)
    logits = sentence.logits(t["input_ids"], t["attention_mask"])
    assert list(logits.argmax(-1)) == list(pred)
    probs = torch.softmax(torch.from_numpy(logits).double(), -1).numpy()
    tagged = sentence.tagger().tag([" ".join(s) for s in texts])
    labels = sentence.manifest["labels"]
    for row, (result, p) in enumerate(zip(tagged, pred, strict=True)):
        assert result.label == sentence.target.labels.decode(p)
        got = np.asarray([result.probabilities[lab] for lab in labels])
        np.testing.assert_allclose(got, probs[row], rtol=0, atol=1e-5)
        assert result.score == pytest.approx(max(got))
    # A list of words is the same text, joined with spaces.
    joined = sentence.tagger().tag(texts[:5])
    assert [r.label for r in joined] == [r.label for r in tagged[:5]]


# ---------------------------------------------------------------------------------------------
# The manifest and the files


def test_manifest(built):
    m = built.manifest
    assert m["format"] == "pyxtask.bundle" and m["version"] == 1
    assert m["versions"] == {
        "pyxtask": pyxtask.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    assert m["opset"] == 17
    assert m["inputs"] == {
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "sequence"],
    }
    kind = built.target.kind
    assert m["kind"] == kind
    want_out = ["batch", "sequence", "labels"] if kind == "token" else ["batch", "labels"]
    assert m["outputs"] == {"logits": want_out}
    assert m["max_length"] == 16 and m["stride"] == built.stride == 3
    assert m["head"] == built.target.head and m["task"] == built.target.name
    assert m["labels"] == list(built.target.labels) == list(built.model.head(m["head"]).label_map)
    assert m["labels"] == list(LabelMap.load(built.bundle / "labels.json").labels)
    assert m["pad_token_id"] == built.pad
    assert set(m["variants"]) == {"fp32", "fp16", "int8"}
    on_disk = {
        p.relative_to(built.bundle).as_posix()
        for p in built.bundle.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    assert set(m["files"]) == on_disk
    for name, digest in m["files"].items():
        assert hashlib.sha256((built.bundle / name).read_bytes()).hexdigest() == digest, name
    assert read_manifest(built.bundle) == m
    # The ONNX graph's outputs have the dimensions the manifest names.
    graph = onnx.load(str(built.bundle / "model.onnx")).graph
    out_dims = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert out_dims[:-1] == want_out[:-1] and out_dims[-1] == len(m["labels"])


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8"])
def test_onnx_checker_passes(token, variant):
    path = token.bundle / token.manifest["variants"][variant]["file"]
    onnx.checker.check_model(str(path))
    opsets = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == 17


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer/tokenizer.json", "labels.json"])
def test_corrupted_file_is_named(token, tmp_path, name):
    copy = tmp_path / "bundle"
    shutil.copytree(token.bundle, copy)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        Tagger(copy)


def test_missing_file_is_named(token, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(token.bundle, copy)
    (copy / "model.int8.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.int8\.onnx.*missing"):
        Tagger(copy)


def test_read_manifest_without_manifest(tmp_path):
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        read_manifest(tmp_path)
    with pytest.raises(BundleError):
        Tagger(tmp_path)


def test_unknown_variant(token, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(token.bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["variants"]["int8"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="int8"):
        Tagger(copy, "int8")


def test_export_refuses_existing_folder(token):
    before = token.manifest["files"]
    with pytest.raises(FileExistsError, match="overwrite"):
        export_run(token.run_dir, token.bundle, measure=False)
    assert read_manifest(token.bundle)["files"] == before  # untouched


def test_export_needs_a_finished_run(token, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(token.run_dir, run, ignore=shutil.ignore_patterns("summary.json"))
    with pytest.raises(ExportError, match=r"summary\.json"):
        export_run(run, tmp_path / "bundle", measure=False)
    assert not (tmp_path / "bundle").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no half bundle left behind
    with pytest.raises(ExportError, match="opset"):
        export_run(token.run_dir, tmp_path / "bundle", opset=3, measure=False)


def test_opset_choice_is_recorded(token, tmp_path):
    manifest = export_run(
        token.run_dir, tmp_path / "op14", opset=14, measure=False, torchscript=False
    )
    assert manifest["opset"] == 14 and manifest["torchscript"] is None
    assert read_manifest(tmp_path / "op14")["opset"] == 14
    assert not (tmp_path / "op14" / "model.ts").exists()
    model = onnx.load(str(tmp_path / "op14" / "model.onnx"))
    onnx.checker.check_model(model)
    assert {o.domain: o.version for o in model.opset_import}.get("") == 14
    sentences = long_sentences(14, n=10)
    got = Tagger(tmp_path / "op14").tag(sentences)
    assert [r.labels for r in got] == [r.labels for r in token.tagger().tag(sentences)]
    # overwrite=True replaces the folder in place.
    again = export_run(
        token.run_dir,
        tmp_path / "op14",
        opset=17,
        measure=False,
        torchscript=False,
        optimize=False,
        overwrite=True,
    )
    assert again["opset"] == 17 and read_manifest(tmp_path / "op14")["opset"] == 17
    assert again["variants"]["fp32"]["optimized"] is False


# ---------------------------------------------------------------------------------------------
# fp16 and int8 variants


# fp16 weights round at 2^-11 relative: logit changes ~1e-3 (observed <= 2e-3), so tags flip
# only at near-ties: >= 99 %. Dynamic int8 quantizes weights and activations per tensor to 8
# bits; on this random tiny model (hidden 64, untrained weights close to their init) logits
# move by ~1e-2 (observed <= 4e-2) against top-2 margins that are often that small: >= 90 %
# (observed ~99 %) still catches a broken quantization (which lands near 1/3, chance).
AGREEMENT = {"fp16": 0.99, "int8": 0.90}


@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_reduced_precision_variants(built, variant):
    file = built.manifest["variants"][variant]["file"]
    assert (built.bundle / file).is_file()
    assert file == f"model.{variant}.onnx"
    sentences = long_sentences(15, n=40)
    fp32 = built.tagger("fp32").tag(sentences)
    tagger = built.tagger(variant)
    assert tagger.variant == variant and tagger.metadata["variant"] == variant
    low = tagger.tag(sentences)
    labels = set(built.manifest["labels"])
    if built.target.kind == "token":
        pairs = [
            pair
            for r, s in zip(fp32, low, strict=True)
            for pair in zip(r.labels, s.labels, strict=True)
        ]
        k = len(labels)
        for r in low:
            assert set(r.labels) <= labels
            assert all(1.0 / k - 1e-9 <= p <= 1.0 for p in r.scores)  # a max probability
    else:
        pairs = [(r.label, s.label) for r, s in zip(fp32, low, strict=True)]
        for r in low:
            assert r.label in labels and set(r.probabilities) == labels
            assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
            assert all(0.0 <= p <= 1.0 for p in r.probabilities.values())
            assert r.score == max(r.probabilities.values())
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    assert agreement >= AGREEMENT[variant], f"{variant}: {agreement:.3f} of {len(pairs)}"


# ---------------------------------------------------------------------------------------------
# Serving without torch


_TORCH_FREE = """
import json, sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
from pyxtask.serving import Tagger
tagger = Tagger(sys.argv[1])
results = tagger.tag(json.loads(sys.argv[2]))
assert "torch" not in {m for m, v in sys.modules.items() if v is not None}
print(json.dumps([r.to_dict() for r in results]))
"""


def test_serving_without_torch(built):
    inputs: list = [" ".join(s) for s in long_sentences(16, n=3)]
    if built.target.kind == "token":
        inputs.append(long_sentences(17, n=1)[0])  # a pre-split one too
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE, str(built.bundle), json.dumps(inputs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    want = [r.to_dict() for r in built.tagger().tag(inputs)]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if built.target.kind == "token":
            assert g["words"] == w["words"] and g["labels"] == w["labels"]
            np.testing.assert_allclose(g["scores"], w["scores"], rtol=0, atol=1e-6)
        else:
            assert g["label"] == w["label"]
            assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-6)


def test_int8_export_leaves_the_root_logger_alone(tmp_path):
    import logging

    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.WARNING)
    try:
        make_bundle(tmp_path, "token", int8=True)
        assert root.level == logging.WARNING
    finally:
        root.setLevel(before)
