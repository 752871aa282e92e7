"""`pyxtask tag`: input formats, output formats, malformed lines, errors."""

import json

import pytest

from pyxtask import cli
from pyxtask.serving import Tagger
from pyxtask.serving.files import read_items
from tests._bundles import make_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("tag"), "token")[1]


def run(argv, capsys, monkeypatch, stdin=None):
    if stdin is not None:
        import io

        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_text_in_conll_out_matches_the_tagger(bundle, capsys, monkeypatch):
    lines = ["w1 w2 zq99x w3", "", "w5 w6 , w7 ."]
    code, out, _ = run(["tag", str(bundle), "--quiet"], capsys, monkeypatch, "\n".join(lines))
    assert code == 0
    blocks = [b for b in out.strip().split("\n\n")]
    expected = Tagger(bundle).tag([lines[0], lines[2]])
    assert len(blocks) == 2
    for block, result in zip(blocks, expected, strict=True):
        rows = [row.split("\t") for row in block.splitlines()]
        assert [r[0] for r in rows] == result.words
        assert [r[1] for r in rows] == result.labels
        assert all(0.0 < float(r[2]) <= 1.0 for r in rows)


def test_conll_and_jsonl_inputs_with_malformed_lines(bundle, capsys, monkeypatch, tmp_path):
    conll = tmp_path / "in.conll"
    conll.write_text("# a comment\nw1\tX\nw2\tY\n\nw3 Z\n")
    code, out, _ = run(
        [
            "tag",
            str(bundle),
            str(conll),
            "--format",
            "conll",
            "--output-format",
            "jsonl",
            "--quiet",
        ],
        capsys,
        monkeypatch,
    )
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["words"] for r in records] == [["w1", "w2"], ["w3"]]
    assert records[0]["source"].endswith("in.conll:2")

    jsonl = '{"text": "w1 w2"}\nnot json\n{"words": ["w4"], "id": 3}\n{"words": []}\n[1]\n'
    code, out, err = run(
        ["tag", str(bundle), "--format", "jsonl", "--output-format", "jsonl", "--quiet"],
        capsys,
        monkeypatch,
        jsonl,
    )
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [r["source"] for r in records] == ["<stdin>:1", "<stdin>:3"]
    assert records[1]["id"] == 3
    assert "<stdin>:2: not valid JSON" in err
    assert "<stdin>:4: 'words' is empty" in err
    assert "<stdin>:5: expected a JSON object" in err
    assert "3 malformed line(s) skipped" in err


def test_output_file_and_bad_bundle(bundle, capsys, monkeypatch, tmp_path):
    out_file = tmp_path / "tags.conll"
    code, out, _ = run(
        ["tag", str(bundle), "-o", str(out_file), "--quiet"], capsys, monkeypatch, "w1 w2\n"
    )
    assert code == 0 and out == "" and out_file.read_text().count("\t") == 4
    code, _, err = run(["tag", str(tmp_path)], capsys, monkeypatch, "w1\n")
    assert code == 1 and err.startswith("error:") and "not a pyxtask bundle" in err
    code, _, err = run(["tag", str(bundle), "--variant", "int8"], capsys, monkeypatch, "w1\n")
    assert code == 1 and "no 'int8' model" in err


def test_read_items_rejects_unknown_format():
    with pytest.raises(ValueError, match="unknown input format"):
        list(read_items([], "xml", "f", print))
