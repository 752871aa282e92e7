"""`pyxtask tag`: input formats, output formats, malformed lines, errors."""

import io
import json

import pytest

from pyxtask import cli
from pyxtask.serving import Tagger
from pyxtask.serving.files import Item, Output, read_items, tag_stream
from tests._bundles import make_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("tag"), "token")[1]


def run(argv, capsys, monkeypatch, stdin=None):
    if stdin is not None:
        # Like the real stdin: text on top of bytes (`tag` reads .buffer).
        data = stdin.encode() if isinstance(stdin, str) else stdin
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
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
    assert "3 warning(s) above" in err


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


def conll_rows(out):
    """The (word, label) rows of CoNLL output, one list per sentence."""
    blocks = [b for b in out.strip().split("\n\n") if b]
    return [[tuple(row.split("\t")[:2]) for row in block.splitlines()] for block in blocks]


def expected_rows(bundle, sentences):
    results = Tagger(bundle).tag(sentences)
    return [[(w, lab or "_") for w, lab in zip(r.words, r.labels, strict=True)] for r in results]


def test_invalid_utf8_in_a_file_costs_one_line(bundle, capsys, monkeypatch, tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"w1 w2\nw3 w4\nw5 w6\xff\nw7 w8\n")
    code, out, err = run(["tag", str(bundle), str(path), "--quiet"], capsys, monkeypatch)
    assert code == 0
    assert f"warning: {path}:3: not valid UTF-8 (byte 0xff at offset 5); line skipped" in err
    assert conll_rows(out) == expected_rows(bundle, ["w1 w2", "w3 w4", "w7 w8"])


def test_invalid_utf8_on_stdin(bundle, capsys, monkeypatch):
    stdin = b'{"text": "w1 w2"}\n{"text": "w3 \xc3("}\n{"words": ["w4"]}\n'
    argv = ["tag", str(bundle), "--format", "jsonl", "--output-format", "jsonl", "--quiet"]
    code, out, err = run(argv, capsys, monkeypatch, stdin)
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert "warning: <stdin>:2: not valid UTF-8 (byte 0xc3 at offset 13); line skipped" in err
    assert [r["source"] for r in records] == ["<stdin>:1", "<stdin>:3"]
    expected = Tagger(bundle).tag(["w1 w2", ["w4"]])
    assert [r["labels"] for r in records] == [e.labels for e in expected]


def test_invalid_utf8_in_conll_keeps_the_word(bundle, capsys, monkeypatch, tmp_path):
    # Dropping the word would shift the rest of the sentence against the input's rows.
    path = tmp_path / "in.conll"
    path.write_bytes(b"w1\tX\nw\xff2\tX\nw3\tX\n\nw4\tX\n")
    code, out, err = run(
        ["tag", str(bundle), str(path), "--format", "conll", "--quiet"], capsys, monkeypatch
    )
    assert code == 0
    assert f"{path}:2: not valid UTF-8 (byte 0xff at offset 1); read with U+FFFD" in err
    expected = expected_rows(bundle, [["w1", "w\ufffd2", "w3"], ["w4"]])
    assert conll_rows(out) == expected


def test_missing_second_file_keeps_the_first_files_tags(bundle, capsys, monkeypatch, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("w1 w2\nw3\n")
    missing = tmp_path / "missing.txt"
    out_file = tmp_path / "tags.conll"
    argv = ["tag", str(bundle), str(good), str(missing), "-o", str(out_file), "--quiet"]
    code, out, err = run(argv, capsys, monkeypatch)
    assert code == 0 and out == ""
    assert f"warning: {missing}: cannot read: No such file or directory; file skipped" in err
    assert conll_rows(out_file.read_text()) == expected_rows(bundle, ["w1 w2", "w3"])
    assert not (tmp_path / "tags.conll.partial").exists()


def test_no_readable_input_is_an_error(bundle, capsys, monkeypatch, tmp_path):
    out_file = tmp_path / "tags.conll"
    out_file.write_text("an earlier run\n")
    argv = ["tag", str(bundle), str(tmp_path / "a"), str(tmp_path), "-o", str(out_file), "--quiet"]
    code, _, err = run(argv, capsys, monkeypatch)
    assert code == 1
    assert f"warning: {tmp_path / 'a'}: cannot read: No such file or directory" in err
    assert f"warning: {tmp_path}: cannot read: Is a directory; file skipped" in err
    assert err.splitlines()[-1] == "error: no input could be read"
    assert out_file.read_text() == "an earlier run\n"
    assert not (tmp_path / "tags.conll.partial").exists()


def test_byte_order_mark_is_removed(bundle, capsys, monkeypatch, tmp_path):
    path = tmp_path / "bom.conll"
    path.write_bytes(b"\xef\xbb\xbfw1\tX\nw2\tX\n")
    argv = ["tag", str(bundle), str(path), "--format", "conll", "--quiet"]
    code, out, err = run(argv, capsys, monkeypatch)
    assert code == 0 and err == ""
    assert conll_rows(out) == expected_rows(bundle, [["w1", "w2"]])
    code, out, _ = run(
        ["tag", str(bundle), "--quiet"], capsys, monkeypatch, b"\xef\xbb\xbfw1 w2\nw3\n"
    )
    assert code == 0 and conll_rows(out) == expected_rows(bundle, ["w1 w2", "w3"])
    assert [i.value for i in read_items(["\ufeffw1\n"], "text", "f", print)] == ["w1"]


def test_empty_and_vanishing_words_are_named(bundle, capsys, monkeypatch, tmp_path):
    stdin = '{"words": ["w1", "", "w2"]}\n{"text": "w3 \\u200b w4"}\n{"words": ["w5", " "]}\n'
    argv = ["tag", str(bundle), "--format", "jsonl", "--output-format", "jsonl", "--quiet"]
    code, out, err = run(argv, capsys, monkeypatch, stdin)
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert "warning: <stdin>:1: word 2 is empty; left untagged" in err
    assert (
        "warning: <stdin>:2: word 2 ('\\u200b') has no sub-token in the bundle's tokenizer; "
        "left untagged"
    ) in err
    assert "warning: <stdin>:3: word 2 (' ') is only whitespace; left untagged" in err
    expected = Tagger(bundle).tag([["w1", "w2"], ["w3", "w4"], ["w5"]])
    # The model does not see the lost word; the rest of the sentence keeps its tags.
    assert [[x for x in r["labels"] if x is not None] for r in records] == [
        e.labels for e in expected
    ]
    assert [r["labels"][1] for r in records] == [None, None, None]

    path = tmp_path / "in.conll"
    path.write_text("w1\n\x00\nw2\n")
    argv = ["tag", str(bundle), str(path), "--format", "conll", "--quiet"]
    code, out, err = run(argv, capsys, monkeypatch)
    assert code == 0
    assert f"warning: {path}:2: word 2 ('\\x00') has no sub-token" in err
    assert conll_rows(out)[0][1] == ("\x00", "_")


def test_lone_surrogate_escape_is_a_bad_line(bundle, capsys, monkeypatch):
    stdin = '{"text": "w1 \\ud800"}\n{"words": ["\\udfff"]}\n{"text": "w2"}\n'
    argv = ["tag", str(bundle), "--format", "jsonl", "--output-format", "jsonl", "--quiet"]
    code, out, err = run(argv, capsys, monkeypatch, stdin)
    assert code == 0 and [json.loads(x)["source"] for x in out.splitlines()] == ["<stdin>:3"]
    assert "<stdin>:1: 'text' holds a lone surrogate escape" in err
    assert "<stdin>:2: 'words' holds a lone surrogate escape" in err


def test_read_error_mid_file_keeps_what_came_before():
    def lines():
        yield b"w1\n"
        yield b"w2\n"
        raise OSError(5, "Input/output error")

    problems = []
    items = list(read_items(lines(), "text", "in.txt", problems.append))
    assert [i.value for i in items] == ["w1", "w2"]
    assert problems == ["in.txt:3: cannot read: Input/output error; rest skipped"]


class _FailsOnSecondCall:
    def __init__(self, tagger, exc):
        self.tagger, self.exc, self.calls = tagger, exc, 0

    def tag(self, values):
        self.calls += 1
        if self.calls == 2:
            raise self.exc
        return self.tagger.tag(values)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_output_so_far_survives_a_failure(bundle, tmp_path, exc):
    path = tmp_path / "tags.conll"
    path.write_text("an earlier run\n")
    tagger = _FailsOnSecondCall(Tagger(bundle), exc)
    items = [Item("w1 w2", "f:1"), Item("w3", "f:2")]
    problems = []
    with pytest.raises(type(exc)), Output(str(path), problems.append) as output:
        tag_stream(tagger, items, output.stream, "conll", chunk=1, progress=False)
    partial = tmp_path / "tags.conll.partial"
    assert conll_rows(partial.read_text()) == expected_rows(bundle, ["w1 w2"])
    assert path.read_text() == "an earlier run\n"
    assert problems == [f"{path}: stopped early; the output so far is in {partial}"]
