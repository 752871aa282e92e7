import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyxtask.metrics import (
    LabelScores,
    SentenceReport,
    SpanReport,
    TaggingReport,
    sentence_scores,
    span_f1,
    tagging_report,
    token_accuracy,
)

pytestmark = pytest.mark.filterwarnings("error")  # seqeval/numpy must stay quiet

#            0        1        2    3        4        5    6
GOLD = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O", "B-ORG"], ["O", "O"]]
PRED = [["B-PER", "I-PER", "O", "B-LOC", "O", "O", "B-MISC"], ["O", "O"]]
# Gold spans: PER[0:2], LOC[3:5], ORG[6:7].  Pred spans: PER[0:2], LOC[3:4], MISC[6:7].
# PER matches; LOC has the wrong boundary; MISC has the wrong type: 1 true positive.
# precision = 1/3, recall = 1/3, F1 = 1/3.
# Per type: PER 1/1/1 (support 1); LOC 0/0/0 (1); ORG 0/0/0 (1); MISC 0/0/0 (support 0).
# macro F1 over the 4 types = (1 + 0 + 0 + 0) / 4 = 0.25.
# Tokens: 9, wrong at sentence 0 positions 4 and 6 -> accuracy 7/9.


def test_token_accuracy_by_hand():
    assert token_accuracy(GOLD, PRED) == pytest.approx(7 / 9)
    assert token_accuracy([["a", "b"], ["c"]], [["a", "x"], ["c"]]) == pytest.approx(2 / 3)


def test_token_accuracy_length_errors_name_the_sentence():
    with pytest.raises(ValueError, match="sentence 1: gold has 2 tokens but pred has 1"):
        token_accuracy([["a"], ["b", "c"]], [["a"], ["b"]])
    with pytest.raises(ValueError, match="gold has 2 sentences but pred has 1"):
        token_accuracy([["a"], ["b"]], [["a"]])
    with pytest.raises(ValueError, match="no tokens"):
        token_accuracy([[]], [[]])
    with pytest.raises(TypeError, match="sentence 0: expected a sequence of labels"):
        token_accuracy(["ab"], [["a", "b"]])


def test_span_f1_strict_by_hand():
    report = span_f1(GOLD, PRED)
    assert report.precision == pytest.approx(1 / 3)
    assert report.recall == pytest.approx(1 / 3)
    assert report.f1 == pytest.approx(1 / 3)
    assert report.macro_f1 == pytest.approx(0.25)
    assert (report.n_gold, report.n_pred) == (3, 3)
    rows = {row.label: row for row in report.per_type}
    assert list(rows) == ["LOC", "MISC", "ORG", "PER"]
    assert rows["PER"] == LabelScores("PER", 1.0, 1.0, 1.0, 1)
    assert rows["LOC"] == LabelScores("LOC", 0.0, 0.0, 0.0, 1)
    assert rows["ORG"] == LabelScores("ORG", 0.0, 0.0, 0.0, 1)
    assert rows["MISC"] == LabelScores("MISC", 0.0, 0.0, 0.0, 0)


def test_span_f1_strict_iob2_does_not_start_spans_at_i():
    # Gold "I-PER I-PER" with no B-: under strict IOB2 that is no span at all (the lenient
    # conlleval reading would see PER[0:2] and call the prediction right).
    # Gold spans 0, pred spans 1 (PER[0:2]) -> precision 0/1 = 0, recall undefined -> 0, F1 0.
    report = span_f1([["I-PER", "I-PER", "O"]], [["B-PER", "I-PER", "O"]])
    assert (report.n_gold, report.n_pred) == (0, 1)
    assert (report.precision, report.recall, report.f1) == (0.0, 0.0, 0.0)


def test_span_f1_partial_recall_by_hand():
    # Gold: PER[0:1], LOC[2:3]; pred: PER[0:1] only.  tp 1, P = 1/1, R = 1/2, F1 = 2/3.
    report = span_f1([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "O"]])
    assert (report.precision, report.recall) == (1.0, 0.5)
    assert report.f1 == pytest.approx(2 / 3)


def test_span_f1_no_spans_anywhere_is_perfect():
    report = span_f1([["O", "O"]], [["O", "O"]])
    assert report == SpanReport(1.0, 1.0, 1.0, 1.0, 0, 0, ())


def test_span_f1_rejects_non_iob2_tags():
    with pytest.raises(ValueError, match=r"pred sentence 1: tag 'E-PER' is not IOB2"):
        span_f1([["O"], ["B-PER"]], [["O"], ["E-PER"]])
    with pytest.raises(ValueError, match=r"gold sentence 0: tag 'PER' is not IOB2"):
        span_f1([["PER"]], [["O"]])
    with pytest.raises(ValueError, match=r"tag 'B-' is not IOB2"):
        span_f1([["B-"]], [["O"]])
    with pytest.raises(ValueError, match="sentence 0: gold has 1 tokens but pred has 2"):
        span_f1([["O"]], [["O", "O"]])


# 3-class sentence example:
#   gold = a a a b b c ; pred = a a b b c c
#   a: tp 2, pred 2, gold 3 -> P 1,   R 2/3, F1 = 2*(2/3)/(5/3) = 0.8
#   b: tp 1, pred 2, gold 2 -> P 1/2, R 1/2, F1 = 0.5
#   c: tp 1, pred 2, gold 1 -> P 1/2, R 1,   F1 = 2*(1/2)/(3/2) = 2/3
#   macro F1 = (0.8 + 0.5 + 2/3) / 3 = 59/90; accuracy = 4/6.
S_GOLD = ["a", "a", "a", "b", "b", "c"]
S_PRED = ["a", "a", "b", "b", "c", "c"]


def test_sentence_scores_three_classes_by_hand():
    report = sentence_scores(S_GOLD, S_PRED)
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.macro_f1 == pytest.approx(59 / 90)
    assert report.n_examples == 6
    a, b, c = report.per_label
    assert (a.label, a.precision, a.recall, a.support) == ("a", 1.0, pytest.approx(2 / 3), 3)
    assert a.f1 == pytest.approx(0.8)
    assert (b.label, b.precision, b.recall, b.f1, b.support) == ("b", 0.5, 0.5, 0.5, 2)
    assert (c.label, c.precision, c.recall, c.support) == ("c", 0.5, 1.0, 1)
    assert c.f1 == pytest.approx(2 / 3)


def test_sentence_scores_explicit_labels_count_unseen_labels_as_zero():
    # "d" has no gold and no pred: F1 0, and it is averaged in -> (0.8 + 0.5 + 2/3 + 0) / 4.
    report = sentence_scores(S_GOLD, S_PRED, labels=["c", "b", "a", "d"])
    assert [row.label for row in report.per_label] == ["c", "b", "a", "d"]
    assert report.per_label[3] == LabelScores("d", 0.0, 0.0, 0.0, 0)
    assert report.macro_f1 == pytest.approx(59 / 120)


def test_sentence_scores_label_with_gold_but_no_pred():
    # gold x x y, pred x x x: x P 2/3 R 1 F1 0.8; y P 0 (no pred) R 0 F1 0 -> macro 0.4.
    report = sentence_scores(["x", "x", "y"], ["x", "x", "x"])
    assert report.macro_f1 == pytest.approx(0.4)
    assert report.per_label[1] == LabelScores("y", 0.0, 0.0, 0.0, 1)


def test_sentence_scores_errors():
    with pytest.raises(ValueError, match="gold has 2 examples but pred has 1"):
        sentence_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        sentence_scores([], [])
    with pytest.raises(ValueError, match=r"not in labels: 'c'"):
        sentence_scores(["a", "b"], ["a", "c"], labels=["a", "b"])
    with pytest.raises(ValueError, match=r"duplicate label\(s\) in labels: 'a'"):
        sentence_scores(["a"], ["a"], labels=["a", "a"])


def test_tagging_report_bio_and_format():
    report = tagging_report(GOLD, PRED, bio=True)
    assert isinstance(report, TaggingReport)
    assert report.token_accuracy == pytest.approx(7 / 9)
    assert (report.n_sentences, report.n_tokens) == (2, 9)
    assert report.spans == span_f1(GOLD, PRED)
    text = report.format()
    lines = text.splitlines()
    assert lines[0] == "token accuracy 0.7778 (9 tokens, 2 sentences)"
    assert lines[1].split() == ["type", "precision", "recall", "f1", "support"]
    assert lines[2].split() == ["LOC", "0.0000", "0.0000", "0.0000", "1"]
    assert lines[5].split() == ["PER", "1.0000", "1.0000", "1.0000", "1"]
    assert lines[6].split() == ["micro", "0.3333", "0.3333", "0.3333", "3"]
    assert lines[7].split() == ["macro", "0.2500", "3"]


def test_tagging_report_without_bio_lists_tags():
    # tokens: gold N V N, pred N N N -> accuracy 2/3; N: P 2/3 R 1 F1 0.8; V: 0 -> macro 0.4.
    report = tagging_report([["N", "V", "N"]], [["N", "N", "N"]], bio=False)
    assert report.spans is None
    assert report.token_accuracy == pytest.approx(2 / 3)
    lines = report.format().splitlines()
    assert lines[1].split()[0] == "tag"
    assert lines[2].split() == ["N", "0.6667", "1.0000", "0.8000", "2"]
    assert lines[3].split() == ["V", "0.0000", "0.0000", "0.0000", "1"]
    assert lines[4].split() == ["macro", "0.4000", "3"]


def test_reports_are_frozen_and_to_dict_is_json():
    tagging = tagging_report(GOLD, PRED, bio=True)
    sentence = sentence_scores(S_GOLD, S_PRED)
    for report in (tagging, tagging.spans, sentence):
        with pytest.raises(AttributeError):
            report.f1 = 2.0  # type: ignore[misc,union-attr]
    d = json.loads(json.dumps(tagging.to_dict()))
    assert d["spans"]["per_type"]["PER"] == {
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "support": 1,
    }
    assert d["spans"]["f1"] == pytest.approx(1 / 3)
    s = json.loads(json.dumps(sentence.to_dict()))
    assert s["macro_f1"] == pytest.approx(59 / 90)
    assert set(s["per_label"]) == {"a", "b", "c"}
    assert isinstance(sentence, SentenceReport)
    assert (
        json.loads(json.dumps(tagging_report([["a"]], [["a"]], bio=False).to_dict()))["spans"]
        is None
    )


# -- properties -------------------------------------------------------------------------------

tags = st.sampled_from(["a", "b", "c", "d"])
sentences = st.lists(st.lists(tags, min_size=1, max_size=8), min_size=1, max_size=6)
bio_tags = st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
bio_sentences = st.lists(st.lists(bio_tags, max_size=8), min_size=1, max_size=6)


@given(sentences)
def test_accuracy_of_gold_is_one(gold):
    assert token_accuracy(gold, gold) == 1.0
    flat = [t for s in gold for t in s]
    report = sentence_scores(flat, flat)
    assert report.accuracy == 1.0 and report.macro_f1 == 1.0


@given(bio_sentences)
def test_span_f1_of_identical_sequences_is_one(gold):
    report = span_f1(gold, gold)
    assert (report.precision, report.recall, report.f1) == (1.0, 1.0, 1.0)
    assert report.n_gold == report.n_pred
    if any(gold):  # tagging_report needs at least one token
        assert tagging_report(gold, gold, bio=True).spans == report


@given(
    st.lists(st.tuples(tags, tags), min_size=1, max_size=30).flatmap(
        lambda pairs: st.tuples(st.just(pairs), st.permutations(pairs))
    )
)
def test_macro_f1_is_permutation_invariant(pairs_and_perm):
    pairs, perm = pairs_and_perm
    a = sentence_scores([g for g, _ in pairs], [p for _, p in pairs])
    b = sentence_scores([g for g, _ in perm], [p for _, p in perm])
    assert math.isclose(a.macro_f1, b.macro_f1)
    assert math.isclose(a.accuracy, b.accuracy)
    assert a.per_label == b.per_label  # computed from the same integer counts


@given(sentences, st.data())
def test_scores_are_in_unit_interval(gold, data):
    pred = [data.draw(st.lists(tags, min_size=len(s), max_size=len(s))) for s in gold]
    acc = token_accuracy(gold, pred)
    assert 0.0 <= acc <= 1.0
    report = tagging_report(gold, pred, bio=False)
    for row in report.per_tag:
        assert 0.0 <= row.f1 <= 1.0
        # F1 is the harmonic mean of precision and recall.
        p, r = row.precision, row.recall
        assert math.isclose(row.f1, 2 * p * r / (p + r) if p + r else 0.0)
