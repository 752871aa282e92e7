"""Tests for pyxtask.data.readers: each format, each error (with file and line), laziness."""

import itertools
import pickle
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyxtask.data.readers import (
    CorpusFormatError,
    LabeledText,
    TaggedSentence,
    UnknownLabelError,
    read_conll,
    read_conllu,
    read_sentence_labels,
    read_word_tag,
)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(iterator):
    with pytest.raises(CorpusFormatError) as info:
        list(iterator)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# Errors


def test_error_str_and_attributes():
    e = CorpusFormatError("a/b.conll", 7, "bad thing")
    assert isinstance(e, ValueError)
    assert (e.path, e.line, e.message) == ("a/b.conll", 7, "bad thing")
    assert str(e) == "a/b.conll:7: bad thing"


def test_errors_pickle_round_trip():
    e = CorpusFormatError("x.tsv", 3, "empty text")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is CorpusFormatError
    assert str(back) == str(e)
    u = UnknownLabelError("x.tsv", 4, "Q", ["A", "B"])
    back = pickle.loads(pickle.dumps(u))
    assert type(back) is UnknownLabelError
    assert (str(back), back.label, back.known) == (str(u), "Q", frozenset({"A", "B"}))


def test_unknown_label_lists_at_most_ten_sorted():
    known = [f"L{i:02d}" for i in range(13)]
    e = UnknownLabelError("f", 1, "X", known)
    listed = ", ".join(repr(f"L{i:02d}") for i in range(10))
    assert str(e) == f"f:1: unknown label 'X' (known labels: {listed}, ... (3 more))"
    assert isinstance(e, CorpusFormatError)


# --------------------------------------------------------------------------------------------
# CoNLL


CONLL = """\
-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC


Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

Hi UH B-INTJ O
"""


def test_conll_whitespace_docstart_and_double_blank(tmp_path):
    path = write(tmp_path, "a.conll", CONLL)
    got = list(read_conll(path))
    assert got == [
        TaggedSentence(("EU", "rejects", "German"), ("B-ORG", "O", "B-MISC"), f"{path}:3"),
        TaggedSentence(("Peter", "Blackburn"), ("B-PER", "I-PER"), f"{path}:8"),
        TaggedSentence(("Hi",), ("O",), f"{path}:13"),
    ]


def test_conll_tag_column_index(tmp_path):
    path = write(tmp_path, "a.conll", CONLL)
    pos = [s.tags for s in read_conll(path, tag_column=1)]
    assert pos == [("NNP", "VBZ", "JJ"), ("NNP", "NNP"), ("UH",)]
    chunks = [s.tags for s in read_conll(path, tag_column=-2)]
    assert chunks == [("B-NP", "B-VP", "B-NP"), ("B-NP", "I-NP"), ("B-INTJ",)]
    words = [s.words for s in read_conll(path, tag_column=0, word_column=1)]
    assert words[0] == ("NNP", "VBZ", "JJ")


def test_conll_tabs_keep_spaces_inside_fields(tmp_path):
    path = write(tmp_path, "a.tsv", "New York\tB-LOC\ncity\tO\n\nok\tO")
    got = list(read_conll(path, separator="\t"))
    assert got == [
        TaggedSentence(("New York", "city"), ("B-LOC", "O"), f"{path}:1"),
        TaggedSentence(("ok",), ("O",), f"{path}:4"),
    ]


def test_conll_column_count_set_by_first_token_line(tmp_path):
    path = write(tmp_path, "b.conll", "New York B-LOC\n\nParis B-LOC\n")
    assert error_of(read_conll(path)) == f"{path}:3: expected 3 columns (as on line 1), got 2"


def test_conll_labels_accepted(tmp_path):
    path = write(tmp_path, "a.conll", "a X\nb Y\n")
    assert [s.tags for s in read_conll(path, labels=["X", "Y"])] == [("X", "Y")]


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("a X\nb Y Z\n", {}, "2: expected 2 columns (as on line 1), got 3"),
        (
            "\n\na\n",
            {},
            "3: expected at least 2 columns for word column 0 and tag column -1, got 1",
        ),
        (
            "a B C\n",
            {"tag_column": 3},
            "1: expected at least 4 columns for word column 0 and tag column 3, got 3",
        ),
        (
            "a B C\n",
            {"tag_column": -3},
            "1: word column 0 and tag column -3 are the same column in a line of 3 columns",
        ),
        ("a\tX\nb\t\n", {"separator": "\t"}, "2: token 'b' has an empty tag"),
        ("a\tX\n\tY\n", {"separator": "\t"}, "2: empty word in column 0"),
        ("a X\n\nb Q\n", {"labels": {"X", "Y"}}, "3: unknown label 'Q' (known labels: 'X', 'Y')"),
    ],
)
def test_conll_errors(tmp_path, text, kwargs, message):
    path = write(tmp_path, "bad.conll", text)
    assert error_of(read_conll(path, **kwargs)) == f"{path}:{message}"


def test_conll_unknown_label_is_unknown_label_error(tmp_path):
    path = write(tmp_path, "bad.conll", "a Q\n")
    with pytest.raises(UnknownLabelError) as info:
        list(read_conll(path, labels=["X"]))
    assert (info.value.path, info.value.line, info.value.label) == (str(path), 1, "Q")


def test_conll_is_lazy(tmp_path):
    path = write(tmp_path, "lazy.conll", "a X\n\nb Y\nc Z\n\nd\n\ne X\n")
    it = read_conll(path)
    assert next(it).words == ("a",)
    assert next(it).words == ("b", "c")
    with pytest.raises(CorpusFormatError) as info:
        next(it)
    assert str(info.value) == f"{path}:6: expected 2 columns (as on line 1), got 1"


def test_conll_bad_arguments_fail_at_call():
    with pytest.raises(ValueError, match="both 1"):
        read_conll("never-opened.conll", tag_column=1, word_column=1)
    with pytest.raises(ValueError, match="separator"):
        read_conll("never-opened.conll", separator="")


# --------------------------------------------------------------------------------------------
# CoNLL-U

CONLLU = textwrap.dedent(
    """\
    # sent_id = 1
    # text = Vámonos al mar.
    1-2\tVámonos\t_\t_\t_\t_\t_\t_\t_\t_
    1\tVamos\tir\tVERB\tV\tMood=Imp|Number=Plur\t0\troot\t_\t_
    2\tnos\tnosotros\tPRON\tP\tCase=Acc|Number=Plur\t1\tobj\t_\t_
    3-4\tal\t_\t_\t_\t_\t_\t_\t_\t_
    3\ta\ta\tADP\tS\t_\t5\tcase\t_\t_
    4\tel\tel\tDET\tD\tDefinite=Def\t5\tdet\t_\t_
    4.1\tvoy\tir\tVERB\t_\t_\t_\t_\t0:root\t_
    5\tmar\tmar\tNOUN\tN\tCase=Nom\t1\tobl\t_\tSpaceAfter=No
    6\t.\t.\tPUNCT\tF\t_\t1\tpunct\t_\t_

    # sent_id = 2
    1\tSí\tsí\tINTJ\t_\t_\t0\troot\t_\tSpaceAfter=No|Gloss=yes
    """
)


def test_conllu_upos_skips_ranges_and_empty_nodes(tmp_path):
    path = write(tmp_path, "es.conllu", CONLLU)
    got = list(read_conllu(path))
    assert got == [
        TaggedSentence(
            ("Vamos", "nos", "a", "el", "mar", "."),
            ("VERB", "PRON", "ADP", "DET", "NOUN", "PUNCT"),
            f"{path}:1",
        ),
        TaggedSentence(("Sí",), ("INTJ",), f"{path}:13"),
    ]


@pytest.mark.parametrize(
    ("field", "tags"),
    [
        ("deprel", [("root", "obj", "case", "det", "obl", "punct"), ("root",)]),
        ("feats:Case", [("_", "Acc", "_", "_", "Nom", "_"), ("_",)]),
        ("feats:Number", [("Plur", "Plur", "_", "_", "_", "_"), ("_",)]),
        ("misc:SpaceAfter", [("_", "_", "_", "_", "No", "_"), ("No",)]),
        ("misc:Gloss", [("_",) * 6, ("yes",)]),
    ],
)
def test_conllu_fields(tmp_path, field, tags):
    path = write(tmp_path, "es.conllu", CONLLU)
    assert [s.tags for s in read_conllu(path, field=field)] == tags


def test_conllu_xpos(tmp_path):
    path = write(tmp_path, "es.conllu", CONLLU.split("\n\n")[0] + "\n")
    assert [s.tags for s in read_conllu(path, field="xpos")] == [("V", "P", "S", "D", "N", "F")]


def test_conllu_missing_xpos_is_error(tmp_path):
    path = write(tmp_path, "es.conllu", CONLLU)
    assert error_of(read_conllu(path, field="xpos")) == f"{path}:14: token 'Sí' has no xpos"


def test_conllu_empty_sentence_is_error(tmp_path):
    good = "1\tA\ta\tX\t_\t_\t0\troot\t_\t_\n\n"
    only_range = "# sent_id = 2\n1-2\tAB\t_\t_\t_\t_\t_\t_\t_\t_\n\n"
    path = write(tmp_path, "e.conllu", good + only_range)
    assert error_of(read_conllu(path)) == f"{path}:3: empty sentence (no syntactic words)"


def test_conllu_missing_upos_is_error(tmp_path):
    text = "# c\n1\tA\ta\tX\t_\t_\t0\troot\t_\t_\n2\tb\tb\t_\t_\t_\t1\tdep\t_\t_\n"
    path = write(tmp_path, "x.conllu", text)
    assert error_of(read_conllu(path)) == f"{path}:3: token 'b' has no upos"


def test_conllu_parse_error_names_line(tmp_path):
    text = CONLLU + "\n# sent_id = 3\n1\tok\tok\tX\t_\t_\t0\troot\t_\t_\n2 bad line\n"
    path = write(tmp_path, "x.conllu", text)
    it = read_conllu(path)
    assert len([next(it), next(it)]) == 2  # lazy: the good sentences come first
    with pytest.raises(CorpusFormatError) as info:
        next(it)
    assert str(info.value) == (
        f"{path}:18: expected 10 tab-separated columns, found 1 (the line has no tab)"
    )


def test_conllu_bad_id_names_line(tmp_path):
    text = "1\ta\ta\tX\t_\t_\t0\troot\t_\t_\nx\tb\tb\tX\t_\t_\t1\tdep\t_\t_\n"
    path = write(tmp_path, "x.conllu", text)
    assert error_of(read_conllu(path)) == (
        f"{path}:2: Failed parsing field 'id': 'x' is not a valid ID."
    )


def test_conllu_unknown_label(tmp_path):
    path = write(tmp_path, "es.conllu", CONLLU)
    labels = ["ADP", "DET", "NOUN", "PRON", "PUNCT", "VERB"]
    assert error_of(read_conllu(path, labels=labels)) == (
        f"{path}:14: unknown label 'INTJ' (known labels: 'ADP', 'DET', 'NOUN', 'PRON', "
        "'PUNCT', 'VERB')"
    )


TOKEN = "1\ta\ta\tX\t_\t_\t0\troot\t_\t_\n"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("2\tb\tb\tX\n", "expected 10 tab-separated columns, found 4"),
        ("2\tb\tb\tX\t_\t_\t1\tdep\t_\t_\t_\n", "expected 10 tab-separated columns, found 11"),
        (
            "2  b  b  X  _  _  1  dep  _  _\n",
            "expected 10 tab-separated columns, found 1 (the line has no tab)",
        ),
    ],
)
def test_conllu_wrong_column_count_names_line_and_count(tmp_path, line, message):
    path = write(tmp_path, "x.conllu", TOKEN + "\n# sent_id = 2\n" + TOKEN + line)
    it = read_conllu(path)
    assert next(it).words == ("a",)  # lazy: the good sentence comes first
    with pytest.raises(CorpusFormatError) as info:
        next(it)
    assert str(info.value) == f"{path}:5: {message}"


def test_conllu_plus_global_columns_set_the_count(tmp_path):
    text = "# global.columns = ID FORM UPOS\n1\ta\tNOUN\n2\tb\tVERB\n\n1\tc\tX\n"
    path = write(tmp_path, "x.conllup", text)
    assert [s.tags for s in read_conllu(path)] == [("NOUN", "VERB"), ("X",)]
    path = write(tmp_path, "x.conllup", text + "\n1\td\tX\t_\n")
    assert error_of(read_conllu(path)) == (
        f"{path}:7: expected 3 tab-separated columns (as # global.columns on line 1 declares), "
        "found 4"
    )


def test_conllu_empty_upos_is_error(tmp_path):
    path = write(tmp_path, "x.conllu", "1\tA\ta\t\t_\t_\t0\troot\t_\t_\n")
    assert error_of(read_conllu(path)) == f"{path}:1: token 'A' has no upos"


def test_conllu_id_too_long_for_int_is_error(tmp_path):
    path = write(tmp_path, "x.conllu", TOKEN + "9" * 5000 + TOKEN[1:])
    message = error_of(read_conllu(path))
    assert message.startswith(f"{path}:2: Exceeds the limit (4300 digits)")


@pytest.mark.parametrize("field", ["form", "feats", "feats:", "misc:A:B", "UPOS"])
def test_conllu_bad_field_fails_at_call(field):
    with pytest.raises(ValueError, match="field must be"):
        read_conllu("never-opened.conllu", field=field)


# --------------------------------------------------------------------------------------------
# word/TAG

BROWN = """\

\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd ./.

\tIt/pps cost/vbd 1/2/cd of/in it/ppo ./.
"""


def test_word_tag_brown(tmp_path):
    path = write(tmp_path, "ca01", BROWN)
    got = list(read_word_tag(path))
    assert got == [
        TaggedSentence(
            ("The", "Fulton", "County", "Grand", "Jury", "said", "."),
            ("at", "np-tl", "nn-tl", "jj-tl", "nn-tl", "vbd", "."),
            f"{path}:2",
        ),
        TaggedSentence(
            ("It", "cost", "1/2", "of", "it", "."),
            ("pps", "vbd", "cd", "in", "ppo", "."),
            f"{path}:4",
        ),
    ]


def test_word_tag_other_separator(tmp_path):
    path = write(tmp_path, "wsj.txt", "Pierre_NNP Vinken_NNP ,_, a_b_DT\n")
    (s,) = read_word_tag(path, separator="_", labels=["NNP", ",", "DT"])
    assert s.words == ("Pierre", "Vinken", ",", "a_b")
    assert s.tags == ("NNP", "NNP", ",", "DT")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("The/DT dog", "token 'dog' has no '/' separator"),
        ("The/DT /NN", "token '/NN' has an empty word"),
        ("The/DT dog/", "token 'dog/' has an empty tag"),
        ("The/DT dog/XX", "unknown label 'XX' (known labels: 'DT', 'NN')"),
    ],
)
def test_word_tag_errors(tmp_path, line, message):
    path = write(tmp_path, "bad.txt", f"A/DT b/NN\n\n{line}\n")
    assert error_of(read_word_tag(path, labels=["DT", "NN"])) == f"{path}:3: {message}"


def test_word_tag_is_lazy(tmp_path):
    path = write(tmp_path, "lazy.txt", "a/X\nb/Y c/Z\nbroken\nd/X\n")
    it = read_word_tag(path)
    assert [next(it).words, next(it).words] == [("a",), ("b", "c")]
    with pytest.raises(CorpusFormatError, match=r":3: token 'broken' has no '/' separator$"):
        next(it)


@pytest.mark.parametrize("separator", ["", " ", "a\tb"])
def test_word_tag_bad_separator_fails_at_call(separator):
    with pytest.raises(ValueError, match="separator"):
        read_word_tag("never-opened.txt", separator=separator)


# --------------------------------------------------------------------------------------------
# Sentence labels


def test_csv_quoted_commas_and_newlines(tmp_path):
    text = 'id,text,label\n1,"Well, fine.",pos\n2,"two\nlines, here",neg\n\n3,plain,pos\n'
    path = write(tmp_path, "a.csv", text)
    assert list(read_sentence_labels(path)) == [
        LabeledText("Well, fine.", "pos", f"{path}:2"),
        LabeledText("two\nlines, here", "neg", f"{path}:3"),
        LabeledText("plain", "pos", f"{path}:6"),
    ]


def test_csv_custom_field_names(tmp_path):
    path = write(tmp_path, "a.csv", "sentence,sentiment\nhello,1\n")
    got = list(read_sentence_labels(path, text_field="sentence", label_field="sentiment"))
    assert got == [LabeledText("hello", "1", f"{path}:2")]


def test_csv_header_less_by_index(tmp_path):
    path = write(tmp_path, "a.csv", 'pos,"a, b"\nneg,c\n')
    got = list(read_sentence_labels(path, text_field=1, label_field=0, header=False))
    assert got == [LabeledText("a, b", "pos", f"{path}:1"), LabeledText("c", "neg", f"{path}:2")]


def test_csv_index_with_header(tmp_path):
    path = write(tmp_path, "a.csv", "t,l\nx,y\n")
    got = list(read_sentence_labels(path, text_field=0, label_field=1))
    assert got == [LabeledText("x", "y", f"{path}:2")]


def test_tsv_keeps_bare_quotes(tmp_path):
    path = write(tmp_path, "train.tsv", 'sentence\tlabel\nit \'s a "charming" film\t1\n')
    got = list(read_sentence_labels(path, text_field="sentence"))
    assert got == [LabeledText('it \'s a "charming" film', "1", f"{path}:2")]


def test_format_overrides_extension(tmp_path):
    path = write(tmp_path, "data.txt", "text\tlabel\na, b\tx\n")
    assert [r.text for r in read_sentence_labels(path, format="tsv")] == ["a, b"]
    path = write(tmp_path, "data.csv", '{"text": "t", "label": "l"}\n')
    assert [r.label for r in read_sentence_labels(path, format="jsonl")] == ["l"]


def test_jsonl(tmp_path):
    text = '{"text": "good", "label": "pos", "x": 1}\n\n{"label": 0, "text": "bad, \\"so\\""}\n'
    for name in ("a.jsonl", "a.json"):
        path = write(tmp_path, name, text)
        assert list(read_sentence_labels(path, labels=["pos", "0"])) == [
            LabeledText("good", "pos", f"{path}:1"),
            LabeledText('bad, "so"', "0", f"{path}:3"),
        ]


@pytest.mark.parametrize(
    ("name", "text", "kwargs", "message"),
    [
        (
            "a.csv",
            "text,label\na,b\n",
            {"text_field": "sentence"},
            "1: no column 'sentence' in the header ('text', 'label')",
        ),
        (
            "a.csv",
            "text,label\na,b\n",
            {"label_field": 2},
            "1: no column 2: the header has 2 columns",
        ),
        (
            "a.csv",
            "a,b\n",
            {"text_field": 0, "label_field": 5, "header": False},
            "1: no column 5: the line has 2 columns",
        ),
        (
            "a.csv",
            "text,label\na,b\nc,d,e\n",
            {},
            "3: expected 2 columns (as in the header on line 1), got 3",
        ),
        (
            "a.csv",
            "a,b\nc\n",
            {"text_field": 0, "label_field": 1, "header": False},
            "2: expected 2 columns (as in line 1), got 1",
        ),
        ("a.csv", 'text,label\na,b\n"  ",c\n', {}, "3: empty text"),
        ("a.tsv", "text\tlabel\na\t\n", {}, "2: empty label"),
        (
            "a.tsv",
            "text\tlabel\na\tb\nc\tz\n",
            {"labels": ["b"]},
            "3: unknown label 'z' (known labels: 'b')",
        ),
        (
            "a.jsonl",
            '{"text": "a", "label": "b"}\n{"text": "a", "label": "b"\n',
            {},
            "2: malformed JSON: Expecting ',' delimiter (column 27)",
        ),
        ("a.jsonl", '["a", "b"]\n', {}, "1: expected a JSON object, got list"),
        ("a.jsonl", '{"text": "a"}\n', {}, "1: no field 'label'"),
        ("a.jsonl", '{"label": "a"}\n', {}, "1: no field 'text'"),
        ("a.jsonl", '{"text": "", "label": "a"}\n', {}, "1: empty text"),
        ("a.jsonl", '{"text": 3, "label": "a"}\n', {}, "1: field 'text' is int, not a string"),
        (
            "a.jsonl",
            '{"text": "a", "label": 1.5}\n',
            {},
            "1: field 'label' is float, not a string or an integer",
        ),
        (
            "a.jsonl",
            '{"text": "a", "label": true}\n',
            {},
            "1: field 'label' is bool, not a string or an integer",
        ),
    ],
)
def test_sentence_label_errors(tmp_path, name, text, kwargs, message):
    path = write(tmp_path, name, text)
    assert error_of(read_sentence_labels(path, **kwargs)) == f"{path}:{message}"


def test_sentence_labels_are_lazy(tmp_path):
    path = write(tmp_path, "a.csv", "text,label\na,x\nb,y\n,z\nd,w\n")
    it = read_sentence_labels(path)
    assert [next(it).text, next(it).text] == ["a", "b"]
    with pytest.raises(CorpusFormatError, match=r"a\.csv:4: empty text$"):
        next(it)


def test_sentence_labels_empty_file_yields_nothing(tmp_path):
    assert list(read_sentence_labels(write(tmp_path, "e.csv", ""))) == []
    assert list(read_sentence_labels(write(tmp_path, "e.jsonl", "\n"))) == []


@pytest.mark.parametrize(
    ("path", "kwargs", "match"),
    [
        ("x.txt", {}, "cannot tell the format"),
        ("x.csv", {"format": "xml"}, "format must be"),
        ("x.csv", {"header": False}, r"must be a column index \(int\) when header=False"),
        ("x.jsonl", {"text_field": 0}, "must be a key"),
        ("x.csv", {"label_field": -1}, "non-negative"),
    ],
)
def test_sentence_labels_bad_arguments_fail_at_call(path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        read_sentence_labels(path, **kwargs)


# --------------------------------------------------------------------------------------------
# Encodings, byte-order marks, odd bytes

BOM = b"\xef\xbb\xbf"
LATIN1_HINT = 'pass encoding="latin-1" if the file is Latin-1'


def write_bytes(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


READER_BY_SUFFIX = {
    ".conll": read_conll,
    ".conllu": read_conllu,
    ".txt": read_word_tag,
    ".csv": read_sentence_labels,
    ".tsv": read_sentence_labels,
    ".jsonl": read_sentence_labels,
}


def read(path, **kwargs):
    return READER_BY_SUFFIX[path.suffix](path, **kwargs)


def first_field(record):
    return record.words[0] if isinstance(record, TaggedSentence) else record.text


@pytest.mark.parametrize(
    ("name", "data", "line", "offset"),
    [
        ("data.conll", b"a X\n\nJohn\xff X\n", 3, 4),
        ("data.conllu", TOKEN.encode() + b"\n2\tJo\xffhn" + TOKEN[3:].encode(), 3, 4),
        ("data.txt", b"a/X\nb/Y c\xff/Z\n", 2, 5),
        ("data.csv", b'text,label\r\n"two\r\nli\xffnes",x\r\n', 3, 2),
        ("data.tsv", b"text\tlabel\nok\tx\n\xff\ty\n", 3, 0),
        ("data.jsonl", b'{"text": "a", "label": "b"}\n{"text": "\xff"}\n', 2, 10),
    ],
)
def test_invalid_utf8_names_file_line_and_byte(tmp_path, name, data, line, offset):
    path = write_bytes(tmp_path, name, data)
    assert error_of(read(path)) == (
        f"{path}:{line}: not valid UTF-8 (byte 0xff at offset {offset} of the line; {LATIN1_HINT})"
    )


@pytest.mark.parametrize(
    ("data", "byte", "offset"),
    [
        (b"caf\xc3", "0xc3", 3),  # a sequence cut by the end of the file
        (b"ab\xc3( X", "0xc3", 2),  # a lead byte without its continuation
        (b"a\x80 X", "0x80", 1),  # a continuation byte without its lead
        (b"a\xed\xa0\x80 X", "0xed", 1),  # an encoded surrogate
    ],
)
def test_invalid_utf8_kinds(tmp_path, data, byte, offset):
    path = write_bytes(tmp_path, "x.conll", b"a X\n" + data)
    assert error_of(read_conll(path)) == (
        f"{path}:2: not valid UTF-8 (byte {byte} at offset {offset} of the line; {LATIN1_HINT})"
    )


def test_invalid_utf8_is_lazy(tmp_path):
    path = write_bytes(tmp_path, "x.conll", b"a X\n\nb Y\n\n" * 5000 + b"\xff X\n")
    it = read_conll(path)
    assert sum(1 for _ in itertools.islice(it, 10000)) == 10000  # all read ahead of the bad line
    with pytest.raises(CorpusFormatError, match=r":20001: not valid UTF-8 \(byte 0xff at"):
        next(it)


def test_utf16_read_as_utf8_suggests_utf16(tmp_path):
    path = write_bytes(tmp_path, "x.conll", "a X\n".encode("utf-16"))
    assert error_of(read_conll(path)) == (
        f"{path}:1: not valid UTF-8 (byte 0xff at offset 0 of the line; it starts like UTF-16, "
        'so pass encoding="utf-16")'
    )


def test_byte_order_mark_counts_in_the_offset(tmp_path):
    path = write_bytes(tmp_path, "x.conll", BOM + b"Joh\xffn X\n")
    for encoding in ("utf-8", "utf-8-sig"):
        assert error_of(read_conll(path, encoding=encoding)) == (
            f"{path}:1: not valid UTF-8 (byte 0xff at offset 6 of the line; {LATIN1_HINT})"
        )


def test_other_encodings_name_themselves(tmp_path):
    path = write_bytes(tmp_path, "x.conll", b"a X\n\xe9 Y\n")
    assert error_of(read_conll(path, encoding="ascii")) == (
        f"{path}:2: not valid ascii (byte 0xe9 at offset 0 of the line)"
    )
    # An odd byte at the end of UTF-16: its offset counts the bytes, not the characters.
    path = write_bytes(tmp_path, "x.conll", "a X\nbc Y\n".encode("utf-16") + b"\x00")
    assert error_of(read_conll(path, encoding="utf-16")) == (
        f"{path}:3: not valid utf-16 (byte 0x00 at offset 0 of the line)"
    )
    path = write_bytes(tmp_path, "x.conll", "a X\n".encode("utf-16-le"))
    assert error_of(read_conll(path, encoding="utf-16")) == (
        f"{path}:1: not valid utf-16: UTF-16 stream does not start with BOM"
    )


JOSE = [
    ("x.conll", "José X\n"),
    ("x.conllu", "1\tJosé\tJosé\tX\t_\t_\t0\troot\t_\t_\n"),
    ("x.txt", "José/X\n"),
    ("x.csv", "text,label\nJosé,x\n"),
    ("x.tsv", "text\tlabel\nJosé\tx\n"),
    ("x.jsonl", '{"text": "José", "label": "x"}\n'),
]


@pytest.mark.parametrize(("name", "text"), JOSE)
@pytest.mark.parametrize("encoding", ["latin-1", "utf-16", "cp1252"])
def test_other_encodings_read_every_format(tmp_path, name, text, encoding):
    path = write_bytes(tmp_path, name, text.encode(encoding))
    (record,) = read(path, encoding=encoding)
    assert first_field(record) == "José"


@pytest.mark.parametrize(
    "read", [read_conll, read_conllu, read_word_tag, read_sentence_labels], ids=lambda r: r.__name__
)
def test_unknown_encoding_fails_at_call(read):
    with pytest.raises(LookupError, match="unknown encoding: klingon"):
        read("never-opened.csv", encoding="klingon")


# The first word, or the text: with the mark left on, the word would be '\ufeffJohn', and the
# header's first name '\ufefftext' or '\ufefflabel', so that no column would be found.
BOMMED = [
    ("x.conll", "John X\nsaid Y\n", "John"),
    ("x.conll", "-DOCSTART- X\n\nJohn X\n", "John"),
    ("x.conllu", "# sent_id = 1\n" + TOKEN, "a"),
    ("x.conllu", TOKEN, "a"),
    ("x.txt", "John/NNP said/VBD\n", "John"),
    ("x.csv", "text,label\nhi,x\n", "hi"),
    ("x.csv", "label,text\nx,hi\n", "hi"),
    ("x.tsv", "text\tlabel\nhi\tx\n", "hi"),
    ("x.jsonl", '{"text": "hi", "label": "x"}\n', "hi"),
]


@pytest.mark.parametrize(("name", "text", "expected"), BOMMED)
@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])
def test_leading_byte_order_mark_is_removed(tmp_path, name, text, expected, encoding):
    path = write_bytes(tmp_path, name, BOM + text.encode())
    record = next(read(path, encoding=encoding))
    assert first_field(record) == expected


def test_byte_order_mark_alone_on_the_first_line_is_a_blank_line(tmp_path):
    path = write_bytes(tmp_path, "x.conll", BOM + b"\na X\n")
    assert list(read_conll(path)) == [TaggedSentence(("a",), ("X",), f"{path}:2")]


def test_byte_order_mark_inside_the_file_is_kept(tmp_path):
    # Only a leading one is an encoding marker; elsewhere U+FEFF is a (zero-width) character.
    path = write_bytes(tmp_path, "x.conll", b"a X\n\n" + BOM + b"b Y\n")
    assert [s.words for s in read_conll(path)] == [("a",), ("\ufeffb",)]


def test_csv_field_over_the_size_limit_is_error(tmp_path):
    path = write(tmp_path, "a.csv", 'text,label\nok,x\n"' + "a" * 200_000 + '",x\n')
    assert error_of(read_sentence_labels(path)) == (
        f"{path}:3: malformed CSV: field larger than field limit (131072)"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[" * 100_000, "malformed JSON: nested too deeply"),
        ('{"text": "a", "label": ' + "1" * 5000 + "}", "malformed JSON: Exceeds the limit"),
    ],
)
def test_jsonl_pathological_lines_are_errors(tmp_path, line, message):
    path = write(tmp_path, "a.jsonl", '{"text": "a", "label": "b"}\n' + line + "\n")
    assert error_of(read_sentence_labels(path)).startswith(f"{path}:2: {message}")


# --------------------------------------------------------------------------------------------
# Round trips

_CHARS = st.characters(blacklist_categories=("Cc", "Cs", "Z"))
WORDS = st.text(_CHARS, min_size=1, max_size=8).filter(
    lambda w: not any(c.isspace() for c in w) and not w.startswith("-DOCSTART-")
)
TAGS = st.sampled_from(["NN", "VB", "DT", "B-PER", "I-PER", "O", "$", "-LRB-", "."])
SENTENCES = st.lists(
    st.lists(st.tuples(WORDS, TAGS), min_size=1, max_size=6), min_size=1, max_size=5
)


@given(sentences=SENTENCES, tab=st.booleans())
def test_conll_round_trip(tmp_path_factory, sentences, tab):
    sep = "\t" if tab else " "
    text = "\n\n".join("\n".join(f"{w}{sep}{t}" for w, t in s) for s in sentences) + "\n"
    path = tmp_path_factory.mktemp("rt") / "r.conll"
    path.write_text(text, encoding="utf-8")
    got = list(read_conll(path, separator="\t" if tab else None))
    assert [(s.words, s.tags) for s in got] == [tuple(zip(*s, strict=True)) for s in sentences]


@given(sentences=SENTENCES)
def test_word_tag_round_trip(tmp_path_factory, sentences):
    # Words may contain the separator: only the last one splits.
    text = "\n".join(" ".join(f"{w}/{t}" for w, t in s) for s in sentences) + "\n"
    path = tmp_path_factory.mktemp("rt") / "r.txt"
    path.write_text(text, encoding="utf-8")
    got = list(read_word_tag(path))
    assert [(s.words, s.tags) for s in got] == [tuple(zip(*s, strict=True)) for s in sentences]
    assert [s.source for s in got] == [f"{path}:{i}" for i in range(1, len(sentences) + 1)]
