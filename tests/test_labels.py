import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyxtask.data.labels import LabelIdError, LabelMap, UnknownLabelError

NER = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]

# Labels: any non-empty unicode text (hypothesis's text() leaves out lone surrogates).
label_sets = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=30, unique=True)
kinds = st.sampled_from(["token", "sentence"])


# -- construction and ids ---------------------------------------------------------------------


def test_ids_are_positions_in_given_order():
    lm = LabelMap(NER, name="ner")
    assert [lm.encode(x) for x in NER] == [0, 1, 2, 3, 4]
    assert [lm.decode(i) for i in range(5)] == NER
    assert lm.labels == tuple(NER)
    assert len(lm) == 5
    assert list(lm) == NER
    assert "B-PER" in lm and "B-ORG" not in lm and 3 not in lm
    assert lm.name == "ner" and lm.kind == "token"


def test_ids_are_stable_across_instances_and_save_load(tmp_path):
    a = LabelMap(NER, name="ner")
    a.save(tmp_path / "labels.json")
    b = LabelMap.load(tmp_path / "labels.json")
    assert [b.encode(x) for x in NER] == [a.encode(x) for x in NER]


def test_from_corpus_sorts_by_label_string():
    corpus = [["O", "B-PER", "I-PER"], ["B-LOC", "O"], "I-LOC"]
    lm = LabelMap.from_corpus(corpus, name="ner")
    assert lm.labels == ("B-LOC", "B-PER", "I-LOC", "I-PER", "O")
    # The order of the corpus does not matter.
    assert LabelMap.from_corpus(reversed(corpus), name="ner") == lm
    sent = LabelMap.from_corpus(["pos", "neg", "pos", "neu"], name="sst", kind="sentence")
    assert sent.labels == ("neg", "neu", "pos") and sent.kind == "sentence"


def test_ignore_index_matches_torch_cross_entropy_default():
    assert LabelMap.ignore_index == -100
    assert torch.nn.CrossEntropyLoss().ignore_index == LabelMap.ignore_index


def test_equality_and_hash():
    a = LabelMap(NER, name="ner")
    assert a == LabelMap(list(NER), name="ner")
    assert hash(a) == hash(LabelMap(NER, name="ner"))
    assert a != LabelMap(NER, name="other")
    assert a != LabelMap(NER, name="ner", kind="sentence")
    assert a != LabelMap(list(reversed(NER)), name="ner")
    assert a != NER


# -- errors -----------------------------------------------------------------------------------


def test_duplicate_labels_are_named():
    with pytest.raises(ValueError, match=r"duplicate label\(s\) in task 'ner': 'O', 'B-PER'"):
        LabelMap(["O", "B-PER", "O", "B-PER", "O"], name="ner")


def test_empty_label_is_rejected():
    with pytest.raises(ValueError, match=r"empty label at position\(s\) \[1\] in task 'ner'"):
        LabelMap(["O", "", "B-PER"], name="ner")


def test_no_labels_and_bad_kind_and_bad_types():
    with pytest.raises(ValueError, match="task 'ner' has no labels"):
        LabelMap([], name="ner")
    with pytest.raises(ValueError, match="kind must be 'token' or 'sentence', not 'span'"):
        LabelMap(NER, kind="span")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a single string"):
        LabelMap("OBI")
    with pytest.raises(TypeError, match=r"must be strings, got int \(3\)"):
        LabelMap(["O", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="cannot be encoded as UTF-8"):
        LabelMap(["O", "\ud800"])


def test_unknown_label_error_names_label_task_and_known_labels():
    lm = LabelMap(NER, name="ner")
    with pytest.raises(UnknownLabelError) as info:
        lm.encode("B-ORG")
    assert isinstance(info.value, KeyError)
    assert str(info.value) == (
        "unknown label 'B-ORG' for task 'ner'; 5 known labels: "
        "'O', 'B-PER', 'I-PER', 'B-LOC', 'I-LOC'"
    )
    assert info.value.label == "B-ORG" and info.value.task == "ner"


def test_unknown_label_error_shows_at_most_ten_known_labels():
    lm = LabelMap([f"L{i:02d}" for i in range(25)])
    with pytest.raises(UnknownLabelError) as info:
        lm.encode("nope")
    message = str(info.value)
    assert message.startswith("unknown label 'nope' for an unnamed task; 25 known labels: ")
    assert "'L09', ... (15 more)" in message
    assert "'L10'" not in message


def test_encode_many_stops_at_unknown_label():
    lm = LabelMap(NER, name="ner")
    assert lm.encode_many(["O", "B-LOC", "I-LOC"]) == [0, 3, 4]
    with pytest.raises(UnknownLabelError, match="unknown label 'X'"):
        lm.encode_many(["O", "X"])
    with pytest.raises(TypeError, match="not a single string"):
        lm.encode_many("O")


def test_label_id_error_names_id_range_and_task():
    lm = LabelMap(NER, name="ner")
    with pytest.raises(LabelIdError) as info:
        lm.decode(5)
    assert isinstance(info.value, IndexError)
    assert str(info.value) == "label id 5 is out of range [0, 5) for task 'ner'"
    with pytest.raises(LabelIdError, match=r"label id -1 is out of range \[0, 5\)"):
        lm.decode(-1)


def test_decoding_ignore_index_explains_it():
    lm = LabelMap(NER, name="ner")
    with pytest.raises(LabelIdError, match=r"-100 is LabelMap.ignore_index"):
        lm.decode(LabelMap.ignore_index)


def test_decode_rejects_non_integers():
    lm = LabelMap(NER)
    with pytest.raises(TypeError, match="not float"):
        lm.decode(1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not bool"):
        lm.decode(True)


def test_decode_many_accepts_lists_tensors_and_arrays():
    lm = LabelMap(NER, name="ner")
    expected = ["B-PER", "I-PER", "O"]
    assert lm.decode_many([1, 2, 0]) == expected
    assert lm.decode_many(torch.tensor([1, 2, 0])) == expected
    assert lm.decode_many(np.array([1, 2, 0], dtype=np.int32)) == expected
    assert lm.decode(np.int64(3)) == "B-LOC"
    with pytest.raises(ValueError, match="1-D tensor or array, got 2-D"):
        lm.decode_many(torch.tensor([[1, 2]]))
    with pytest.raises(LabelIdError, match="label id 7"):
        lm.decode_many(torch.tensor([1, 7]))
    with pytest.raises(TypeError, match="not float"):
        lm.decode_many(torch.tensor([1.0]))


# -- save / load ------------------------------------------------------------------------------


def test_save_writes_the_documented_json(tmp_path):
    path = tmp_path / "labels.json"
    LabelMap(["O", "B-Ört"], name="ner", kind="token").save(path)
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "format": "pyxtask.labels",
        "version": 1,
        "name": "ner",
        "kind": "token",
        "labels": ["O", "B-Ört"],
    }
    assert "Ört" in path.read_text(encoding="utf-8")  # readable, not \u-escaped


@given(labels=label_sets, name=st.text(max_size=10), kind=kinds)
def test_save_load_round_trip_is_exact(labels, name, kind):
    lm = LabelMap(labels, name=name, kind=kind)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "labels.json"
        lm.save(path)
        back = LabelMap.load(path)
        assert os.listdir(folder) == ["labels.json"]
    assert back == lm
    assert back.labels == tuple(labels)
    assert back.name == name and back.kind == kind
    assert [back.encode(x) for x in labels] == list(range(len(labels)))


@given(labels=label_sets)
def test_encode_decode_round_trip(labels):
    lm = LabelMap(labels)
    ids = lm.encode_many(labels)
    assert ids == list(range(len(labels)))
    assert lm.decode_many(ids) == labels
    assert lm.decode_many(torch.tensor(ids, dtype=torch.long)) == labels


@given(corpus=st.lists(st.lists(st.text(min_size=1, max_size=5), max_size=6), min_size=1))
def test_from_corpus_is_sorted_and_complete(corpus):
    seen = {x for sentence in corpus for x in sentence}
    if not seen:
        with pytest.raises(ValueError, match="has no labels"):
            LabelMap.from_corpus(corpus)
        return
    lm = LabelMap.from_corpus(corpus)
    assert lm.labels == tuple(sorted(seen))


def test_save_leaves_no_temp_file_and_replaces(tmp_path):
    path = tmp_path / "labels.json"
    LabelMap(["a"], name="t").save(path)
    LabelMap(["a", "b"], name="t").save(path)  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["labels.json"]
    assert LabelMap.load(path).labels == ("a", "b")


def test_save_fsyncs_and_renames_from_the_same_folder(tmp_path, monkeypatch):
    calls = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])

    def replace(src, dst):
        calls.append(("replace", Path(src).parent, Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    LabelMap(["a"]).save(tmp_path / "labels.json")
    replace_at = next(i for i, c in enumerate(calls) if c != "fsync")
    assert "fsync" in calls[:replace_at]  # the data was fsynced before the rename
    assert calls[replace_at] == ("replace", tmp_path, tmp_path / "labels.json")


def test_failed_save_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "labels.json"
    LabelMap(["old"], name="t").save(path)

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        LabelMap(["new"], name="t").save(path)
    assert sorted(os.listdir(tmp_path)) == ["labels.json"]
    monkeypatch.undo()
    assert LabelMap.load(path).labels == ("old",)


def _write(path, document):
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


GOOD = {"format": "pyxtask.labels", "version": 1, "name": "t", "kind": "token", "labels": ["a"]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, r"format is 'other', expected 'pyxtask.labels'"),
        ({"version": 2}, r"unsupported version 2 \(this pyxtask reads version 1\)"),
        ({"version": True}, r"unsupported version True"),
        ({"kind": "span"}, r"'kind' must be 'token' or 'sentence', got 'span'"),
        ({"name": 3}, r"'name' must be a string, got 3"),
        ({"labels": "abc"}, r"'labels' must be a list of strings"),
        ({"labels": ["a", 1]}, r"'labels' must be a list of strings"),
        ({"labels": ["a", "a"]}, r"duplicate label\(s\) in task 't': 'a'"),
        ({"labels": []}, r"task 't' has no labels"),
    ],
)
def test_load_rejects_bad_documents_naming_the_file(tmp_path, change, message):
    path = _write(tmp_path / "bad.json", {**GOOD, **change})
    with pytest.raises(ValueError, match=message) as info:
        LabelMap.load(path)
    assert str(info.value).startswith(str(path) + ": ")


def test_load_rejects_missing_keys(tmp_path):
    document = {k: v for k, v in GOOD.items() if k not in ("kind", "labels")}
    path = _write(tmp_path / "bad.json", document)
    with pytest.raises(ValueError, match=rf"^{path}: missing key\(s\) 'kind', 'labels'$"):
        LabelMap.load(path)


def test_load_rejects_non_json_and_non_objects(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}: not valid JSON"):
        LabelMap.load(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=rf"^{path}: not UTF-8 text"):
        LabelMap.load(path)
    _write(path, ["a", "b"])
    with pytest.raises(ValueError, match=rf"^{path}: expected a JSON object, got list"):
        LabelMap.load(path)
    with pytest.raises(FileNotFoundError):
        LabelMap.load(tmp_path / "missing.json")
