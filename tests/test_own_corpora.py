"""A user's own files as tasks: bare data files, [tasks.NAME] tables and corpus definition
files; seeded dev/test carving; the label check across splits; training, export and data info
from the command line."""

import json
import os
import random
import re
import textwrap

import pytest
import transformers

from pyxtask import cli
from pyxtask.config import ConfigError, from_mapping, load_config
from pyxtask.data import LabeledText, TaggedSentence
from pyxtask.data.files import UNKNOWN_LABEL, file_task, read_splits
from pyxtask.tasks import load_tasks
from tests._corpora import prepare_or_skip

transformers.utils.logging.disable_progress_bar()

VOCAB = 40


def _rule(seed=0):
    rng = random.Random(seed)
    return {f"w{i}": rng.randrange(3) for i in range(VOCAB)}


def _sentences(n, seed):
    rng = random.Random(seed)
    return [[f"w{rng.randrange(VOCAB)}" for _ in range(rng.randint(4, 9))] for _ in range(n)]


def write_conll(path, n, labels, seed=0, columns="{w}\t_\t{t}"):
    """A CoNLL file whose tag is a fixed function of the word (learnable by the tiny encoder)."""
    rule = _rule()
    blocks = [
        "".join(columns.format(w=w, t=labels[rule[w]]) + "\n" for w in words)
        for words in _sentences(n, seed)
    ]
    path.write_text("\n".join(blocks), encoding="utf-8")
    return path


def _names(examples):
    return [e.source for e in examples]


# --------------------------------------------------------------------------------------------
# Definitions


def test_a_bare_conll_file_is_a_token_task_named_after_it(tmp_path):
    path = write_conll(tmp_path / "ner.conll", 50, ["A", "B", "C"])
    config = from_mapping({"target": os.fspath(path), "sources": ["brown.pos"]})
    assert config.target == "ner"
    assert config.tasks["ner"].format == "conll"
    assert config.tasks["ner"].train == os.fspath(path)


def test_task_table_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    write_conll(data / "train.conll", 30, ["A", "B", "C"])
    (data / "reviews.csv").write_text("review,stars\ngood film,5\nbad film,1\n", encoding="utf-8")
    (tmp_path / "run.toml").write_text(
        textwrap.dedent(
            """
            target = "mine"
            sources = ["reviews"]
            [tasks.mine]
            train = "data/train.conll"
            [tasks.reviews]
            train = "data/reviews.csv"
            text_field = "review"
            label_field = "stars"
            """
        ),
        encoding="utf-8",
    )
    monkeypatch.chdir("/")
    config = load_config(tmp_path / "run.toml")
    assert config.tasks["mine"].train == os.fspath(data / "train.conll")
    splits = read_splits(config.tasks["reviews"], "reviews")
    every = splits["train"] + splits["dev"] + splits["test"]
    assert sorted(e.label for e in every) == ["1", "5"]
    assert all(isinstance(e, LabeledText) for e in every)


def test_a_corpus_definition_file_names_its_task_and_reads_its_files(tmp_path):
    write_conll(tmp_path / "a.txt", 30, ["X", "Y", "Z"], columns="{t} {w}")
    (tmp_path / "tags.toml").write_text(
        'name = "mytags"\nformat = "conll"\ntrain = "a.txt"\ntag_column = 0\nword_column = 1\n',
        encoding="utf-8",
    )
    config = from_mapping({"target": os.fspath(tmp_path / "tags.toml"), "sources": ["brown.pos"]})
    assert config.target == "mytags"
    first = read_splits(config.tasks["mytags"], "mytags")["train"][0]
    assert first.words[0].startswith("w") and first.tags[0] in {"X", "Y", "Z"}


def test_a_config_saved_with_a_run_reads_back_the_same(tmp_path):
    path = write_conll(tmp_path / "tags.conll", 30, ["A", "B", "C"])
    config = from_mapping({"target": os.fspath(path), "sources": ["brown.pos"]})
    again = from_mapping(json.loads(json.dumps(config.to_dict())), source="config.json")
    assert again == config


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"format": "conll"}, "'train' (the training file) is required"),
        ({"train": "x.conll", "colour": 1}, "unknown key 'colour'"),
        ({"train": "x.txt"}, "format = '' is not one of"),
        ({"train": "x.csv", "kind": "token"}, "format 'csv' holds sentence tasks"),
        ({"train": "x.conll", "split": [0.6, 0.5]}, "split must be [dev, test] fractions"),
        ({"train": "x.conll", "encoding": "klingon"}, "unknown encoding 'klingon'"),
    ],
)
def test_a_bad_task_table_is_one_line_naming_the_task(table, message):
    with pytest.raises(ConfigError) as info:
        from_mapping({"target": "mine", "sources": ["brown.pos"], "tasks": {"mine": table}})
    assert "tasks.mine" in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_an_unknown_bare_name_explains_every_way_to_name_a_task():
    with pytest.raises(ConfigError, match=r"\[tasks.NAME\] table"):
        from_mapping({"target": "mine", "sources": ["brown.pos"]})


# --------------------------------------------------------------------------------------------
# Splits and labels


def test_one_file_is_carved_into_disjoint_seeded_dev_and_test(tmp_path):
    path = write_conll(tmp_path / "tags.conll", 200, ["A", "B", "C"])
    task = file_task({"train": os.fspath(path)}, "t")
    splits = read_splits(task, "t")
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"train": 160, "dev": 20, "test": 20}
    seen = [_names(splits[k]) for k in ("train", "dev", "test")]
    assert len(set().union(*map(set, seen))) == 200
    assert read_splits(task, "t") == splits  # the same carving every time


def test_the_run_seed_samples_training_but_never_moves_test(tmp_path):
    path = write_conll(tmp_path / "tags.conll", 200, ["A", "B", "C"])
    tests, trains = [], []
    for seed in (0, 1):
        config = from_mapping(
            {
                "target": os.fspath(path),
                "paradigm": "single",
                "method": "fixed",
                "seed": seed,
                "target_size": 50,
            }
        )
        target = load_tasks(config)[0]
        tests.append(_names(target.test))
        trains.append(_names(target.train))
        assert len(target.train) == 50 and target.kind == "token"
    assert tests[0] == tests[1]
    assert trains[0] != trains[1]


def test_given_dev_and_test_files_are_used_as_they_are(tmp_path):
    train = write_conll(tmp_path / "train.conll", 60, ["A", "B", "C"], seed=1)
    dev = write_conll(tmp_path / "dev.conll", 7, ["A", "B", "C"], seed=2)
    task = file_task({"train": os.fspath(train), "dev": os.fspath(dev)}, "t")
    splits = read_splits(task, "t")
    assert len(splits["dev"]) == 7 and all("dev.conll" in s for s in _names(splits["dev"]))
    assert len(splits["test"]) == 6 and len(splits["train"]) == 54  # test carved: 10%


def _with_new_test_label(tmp_path):
    train = write_conll(tmp_path / "train.conll", 40, ["A", "B", "C"])
    test = tmp_path / "test.conll"
    test.write_text("w1\tA\nw2\tNEW\n\nw3\tB\n", encoding="utf-8")
    return {"train": os.fspath(train), "test": os.fspath(test)}


def _unseen_config(tmp_path, **extra):
    tables = {"mine": _with_new_test_label(tmp_path)}
    single = {"paradigm": "single", "method": "fixed", "target_size": 10}
    return from_mapping({"target": "mine", **single, "tasks": tables, **extra})


def test_a_label_seen_only_in_test_names_its_file_and_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_tasks(_unseen_config(tmp_path))
    message = str(info.value)
    assert f"{tmp_path / 'test.conll'}:1: label 'NEW'" in message
    assert "unseen_labels" in message


def test_unseen_labels_unknown_maps_them_and_keeps_the_rest(tmp_path):
    config = _unseen_config(tmp_path, unseen_labels="unknown")
    target = load_tasks(config)[0]
    assert target.test[0].tags == ("A", UNKNOWN_LABEL)
    assert target.test[1].tags == ("B",)
    assert UNKNOWN_LABEL in target.labels and "NEW" not in target.labels


def test_jsonl_holds_token_or_sentence_tasks_by_its_keys(tmp_path):
    tokens = tmp_path / "tokens.jsonl"
    tokens.write_text(
        "\n".join(json.dumps({"words": ["a", "b"], "tags": ["X", "Y"]}) for _ in range(12)),
        encoding="utf-8",
    )
    texts = tmp_path / "texts.jsonl"
    texts.write_text(
        "\n".join(json.dumps({"text": f"t {i}", "label": i % 2}) for i in range(12)),
        encoding="utf-8",
    )
    token = read_splits(file_task({"train": os.fspath(tokens)}, "t"), "t")["train"][0]
    sentence = read_splits(file_task({"train": os.fspath(texts)}, "s"), "s")["train"][0]
    assert isinstance(token, TaggedSentence) and token.tags == ("X", "Y")
    assert isinstance(sentence, LabeledText) and sentence.label in {"0", "1"}


def test_a_bad_jsonl_token_record_names_file_and_line(tmp_path):
    path = tmp_path / "tokens.jsonl"
    path.write_text('{"words": ["a"], "tags": ["X"]}\n{"words": ["a", "b"], "tags": ["X"]}\n')
    with pytest.raises(ValueError, match=r"tokens.jsonl:2: 2 words but 1 tags"):
        read_splits(file_task({"train": os.fspath(path)}, "t"), "t")


def test_a_missing_file_and_too_small_a_file_are_config_errors(tmp_path):
    missing = {
        "target": "mine",
        "paradigm": "single",
        "method": "fixed",
        "tasks": {"mine": {"train": os.fspath(tmp_path / "gone.conll")}},
    }
    with pytest.raises(ConfigError, match=r"task 'mine': .*gone.conll: no such file"):
        load_tasks(from_mapping(missing))
    path = write_conll(tmp_path / "few.conll", 20, ["A", "B", "C"])
    small = {"target": os.fspath(path), "paradigm": "single", "method": "fixed"}
    with pytest.raises(ConfigError, match=r"target_size = 200 but 'few' has only 16"):
        load_tasks(from_mapping(small))
    assert len(load_tasks(from_mapping({**small, "target_size": "all"}))[0].train) == 16


# --------------------------------------------------------------------------------------------
# The command line


TRAIN = [
    "train",
    "--encoder",
    "tiny",
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--lr",
    "2e-3",
    "--device",
    "cpu",
    "--max-length",
    "32",
    "--quiet",
]


def test_own_conll_target_and_source_train_export_and_info(tmp_path, capsys):
    target = write_conll(tmp_path / "tags.conll", 150, ["T0", "T1", "T2"], seed=3)
    source = write_conll(tmp_path / "helper.conll", 150, ["S0", "S1", "S2"], seed=4)
    run = tmp_path / "run"
    args = [
        *TRAIN,
        "--target",
        os.fspath(target),
        "--sources",
        os.fspath(source),
        "--method",
        "equal",
        "--target-size",
        "all",
        "--source-size",
        "100",
        "--output",
        os.fspath(run),
    ]
    assert cli.main(args) == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["target"] == "tags" and summary["sources"] == ["helper"]
    assert summary["train_examples"] == {"tags": 120, "helper": 100}
    assert summary["dev"] > 0.6  # three classes, a word -> tag rule: chance is ~1/3

    bundle = tmp_path / "bundle"
    code = cli.main(["export", os.fspath(run), "--out", os.fspath(bundle), "--no-torchscript"])
    out = capsys.readouterr().out
    assert code == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["variants"]["fp32"]["test_metric"] == pytest.approx(summary["test"], abs=0.02)
    assert "test accuracy" in out

    assert cli.main(["data", "info", os.fspath(target)]) == 0
    card = capsys.readouterr().out
    assert card.startswith("tags: token task, format conll")
    assert "carved from train" in card and "labels (3 in train)" in card


@pytest.mark.network
@pytest.mark.filterwarnings("ignore::pyxtask.data.tokenization.LongSequenceWarning")
def test_own_conll_file_as_a_source_beside_a_named_target(tmp_path, capsys):
    prepare_or_skip("wsj-pos")
    source = write_conll(tmp_path / "helper.conll", 80, ["S0", "S1", "S2"])
    run = tmp_path / "run"
    args = [
        *TRAIN,
        "--target",
        "wsj-pos.pos",
        "--sources",
        os.fspath(source),
        "--target-size",
        "20",
        "--dev-size",
        "20",
        "--test-size",
        "20",
        "--source-size",
        "40",
        "--method",
        "equal",
        "--output",
        os.fspath(run),
    ]
    assert cli.main(args) == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sources"] == ["helper"]
    assert summary["train_examples"]["helper"] == 40  # the target's count is of windows


def test_data_info_on_a_definition_reports_labels_missing_from_train(tmp_path, capsys):
    tables = _with_new_test_label(tmp_path)
    (tmp_path / "mine.toml").write_text(f'train = "{tables["train"]}"\ntest = "test.conll"\n')
    assert cli.main(["data", "info", os.fspath(tmp_path / "mine.toml")]) == 0
    card = capsys.readouterr().out
    assert card.startswith("mine: token task")
    assert "not in train (1): NEW" in card
    assert re.search(rf"test +2 sentences +3 tokens +{re.escape(tables['test'])}", card)
