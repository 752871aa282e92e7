"""How ``Tagger`` groups windows into onnxruntime calls: by length, capped in size and padding.

Padding decides CPU speed (a batch of 64 corpus sentences padded to its longest ran 3x slower
than the same sentences in padding-capped batches), and grouping must never change a tag.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxtask.serving import Tagger
from pyxtask.serving.tagger import _length_chunks
from tests._bundles import make_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("tagger-batching"), "token")[1]


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 128), max_size=80),
    batch_size=st.integers(1, 40),
    max_padding=st.sampled_from([0.0, 0.1, 0.25, 1.0, float("inf")]),
)
def test_chunks_cover_windows_within_size_and_padding(lengths, batch_size, max_padding):
    chunks = _length_chunks(lengths, batch_size, max_padding)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    flat = [lengths[i] for c in chunks for i in c]
    assert flat == sorted(flat)  # by length, so a chunk pads to its last window
    for c in chunks:
        assert 1 <= len(c) <= batch_size
        real = sum(lengths[i] for i in c)
        padded = len(c) * lengths[c[-1]]
        assert len(c) == 1 or padded <= real * (1 + max_padding) + 1e-9
    if max_padding == float("inf"):  # no padding cap: full batches, only the last one short
        assert [len(c) for c in chunks[:-1]] == [batch_size] * (len(chunks) - 1)
    if max_padding == 0.0:  # no padding at all: one length per chunk
        assert all(len({lengths[i] for i in c}) == 1 for c in chunks)


def test_grouping_never_changes_a_tag(bundle):
    rng = random.Random(3)
    vocabulary = [f"w{i}" for i in range(40)] + ["zq77x", "Zoë", "日本", ",", "."]
    sentences = [[rng.choice(vocabulary) for _ in range(rng.randint(1, 30))] for _ in range(60)]
    capped = Tagger(bundle, batch_size=16, max_padding=0.0, verify=False).tag(sentences)
    uncapped = Tagger(bundle, batch_size=16, max_padding=float("inf"), verify=False).tag(sentences)
    one_by_one = Tagger(bundle, batch_size=1, verify=False).tag(sentences)
    assert (
        [r.labels for r in capped] == [r.labels for r in uncapped] == [r.labels for r in one_by_one]
    )
    for a, b in zip(capped, uncapped, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-5)


def test_int8_tags_do_not_depend_on_batch_mates(tmp_path_factory):
    # Dynamic int8 quantization scales activations over the whole batch; by default the int8
    # variant runs one window per call, so a sentence tags the same alone or among others.
    bundle = make_bundle(tmp_path_factory.mktemp("int8"), "token", int8=True)[1]
    rng = random.Random(5)
    vocabulary = [f"w{i}" for i in range(40)] + ["zq77x", "Zoë", ",", "."]
    sentences = [[rng.choice(vocabulary) for _ in range(rng.randint(1, 30))] for _ in range(30)]
    tagger = Tagger(bundle, "int8", verify=False)
    assert tagger.batch_size == 1
    together = tagger.tag(sentences)
    alone = [tagger.tag([s])[0] for s in sentences]
    assert [r.scores for r in together] == [r.scores for r in alone]
    assert Tagger(bundle, "fp32", verify=False).batch_size == 32


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_negative_or_nan_max_padding_is_refused(bundle, bad):
    with pytest.raises(ValueError, match="max_padding"):
        Tagger(bundle, max_padding=bad, verify=False)
