"""Fuzzing pyxtask.data.readers: whatever the bytes, a reader either reads them or raises
CorpusFormatError (or a subclass), never another exception."""

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pyxtask.data.readers import (
    CorpusFormatError,
    read_conll,
    read_conllu,
    read_jsonl_tags,
    read_sentence_labels,
    read_word_tag,
)

# Pieces of the formats the readers take, and of what goes wrong in files: byte-order marks,
# invalid UTF-8 (a lone continuation byte, a cut sequence, an encoded surrogate), NUL, CRs.
_PIECES = [
    b"\t",
    b"\n",
    b"\n\n",
    b"\r\n",
    b"\r",
    b" ",
    b"  ",
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b"#",
    b"# sent_id = 1",
    b"# text = a b",
    b"# global.columns = ID FORM UPOS",
    b"-DOCSTART-",
    b"0",
    b"1",
    b"2",
    b"1-2",
    b"2-1",
    b"1.1",
    b"_",
    b"=",
    b"|",
    b"a",
    b"word",
    b"NOUN",
    b"Case=Nom|Number=Sing",
    b"SpaceAfter=No",
    b"0:root",
    b"/",
    b"a/NN",
    b",",
    b'"',
    b'""',
    b"text",
    b"label",
    b"text,label",
    b"text\tlabel",
    b"{",
    b"}",
    b"[",
    b":",
    b'{"text": "a", "label": "b"}',
    b'{"words": ["a", "b"], "tags": ["O", "X"]}',
    b'"words": [',
    b'"tags": [',
    b'""]',
    b'"text": ',
    b'"label": ',
    b"1e400",
    b"true",
    b"\\u00e9",
    b"\\ud800",
    b"\xc3\xa9",
    b"\xe2\x80\xa8",
    b"\xc2\x85",
    b"\xff",
    b"\x80",
    b"\xc3",
    b"\xe2\x82",
    b"\xed\xa0\x80",
    b"\x00",
    b"\x1c",
    b"1\tw\tw\tNOUN\tNN\tCase=Nom\t0\troot\t_\tSpaceAfter=No",
    b"2\tx\tx\t_\t_\t_\t1\tdep\t_\t_",
]
PLAUSIBLE = st.lists(st.sampled_from(_PIECES), max_size=40).map(b"".join)
DATA = st.one_of(st.binary(max_size=200), PLAUSIBLE)
ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "ascii", "utf-16", "cp1252"])

# Each reader with the settings that take different paths through it.
READERS = {
    "conll": lambda p, e: read_conll(p, encoding=e),
    "conll-tab": lambda p, e: read_conll(p, separator="\t", encoding=e),
    "conll-columns": lambda p, e: read_conll(p, tag_column=1, word_column=-1, encoding=e),
    "conll-labels": lambda p, e: read_conll(p, labels=["NOUN", "O"], encoding=e),
    "conllu": lambda p, e: read_conllu(p, encoding=e),
    "conllu-xpos": lambda p, e: read_conllu(p, field="xpos", encoding=e),
    "conllu-deprel": lambda p, e: read_conllu(p, field="deprel", labels=["root"], encoding=e),
    "conllu-feats": lambda p, e: read_conllu(p, field="feats:Case", encoding=e),
    "conllu-misc": lambda p, e: read_conllu(p, field="misc:SpaceAfter", encoding=e),
    "word-tag": lambda p, e: read_word_tag(p, encoding=e),
    "word-tag-labels": lambda p, e: read_word_tag(p, separator="_", labels=["NN"], encoding=e),
    "csv": lambda p, e: read_sentence_labels(p, format="csv", encoding=e),
    "csv-no-header": lambda p, e: read_sentence_labels(
        p, text_field=0, label_field=1, format="csv", encoding=e, header=False
    ),
    "csv-indices": lambda p, e: read_sentence_labels(
        p, text_field=1, label_field=0, format="csv", labels=["b"], encoding=e
    ),
    "tsv": lambda p, e: read_sentence_labels(p, format="tsv", encoding=e),
    "tsv-no-header": lambda p, e: read_sentence_labels(
        p, text_field=1, label_field=0, format="tsv", encoding=e, header=False
    ),
    "jsonl": lambda p, e: read_sentence_labels(p, format="jsonl", encoding=e),
    "jsonl-tags": lambda p, e: read_jsonl_tags(p, encoding=e),
    "jsonl-tags-labels": lambda p, e: read_jsonl_tags(p, "w", "t", labels=["O"], encoding=e),
    "jsonl-labels": lambda p, e: read_sentence_labels(
        p, "label", "text", format="jsonl", labels=["a"], encoding=e
    ),
}


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory):
    # Module-scoped: hypothesis reruns the test body, and a function-scoped fixture would not
    # be reset between its examples.
    return tmp_path_factory.mktemp("fuzz") / "corpus"


def read_all(path, encoding):
    for name, reader in READERS.items():
        try:
            for record in reader(path, encoding):
                assert record.source.startswith(f"{path}:"), name
        except CorpusFormatError as e:
            assert e.path == str(path), name
            assert e.line >= 1, name
            assert "\n" not in str(e), name


@settings(max_examples=300)
@given(data=DATA)
@example(data=b"\xef\xbb\xbf1\tw\tw\tNOUN\t_\t_\t0\troot\t_\t_\n")
@example(data=b"text,label\n\xff,b\n")
@example(data=b"1\tw\tw\tNOUN\n")
@example(data=b"[" * 5000)
def test_utf8_bytes_raise_only_corpus_format_errors(fuzz_path, data):
    fuzz_path.write_bytes(data)
    read_all(fuzz_path, "utf-8")


@settings(max_examples=120)
@given(data=DATA, encoding=ENCODINGS)
@example(data=b"\xff\xfea\x00\x00\xd8\n\x00", encoding="utf-16")
@example(data=b"a\x00b", encoding="utf-16")
def test_other_encodings_raise_only_corpus_format_errors(fuzz_path, data, encoding):
    fuzz_path.write_bytes(data)
    read_all(fuzz_path, encoding)
