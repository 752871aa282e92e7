"""MultiTaskBatchSampler: coverage, mixing, determinism, resumption, task_probs, validation."""

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyxtask.data.sampler import MultiTaskBatchSampler


def _epoch(sampler):
    """One epoch's steps as plain data (so streams compare with ==)."""
    return [[(t, list(idx)) for t, idx in step] for step in sampler]


def _stream(epoch, **kw):
    s = MultiTaskBatchSampler(**kw)
    s.set_epoch(epoch)
    return _epoch(s)


# ---------------------------------------------------------------------- configs for properties

sizes_st = st.lists(st.integers(1, 40), min_size=1, max_size=5)


@st.composite
def configs(draw):
    sizes = draw(sizes_st)
    mode = draw(st.sampled_from(["shuffle", "all"]))
    if draw(st.booleans()):
        batch = draw(st.integers(1, 12))
        bs = [batch] * len(sizes)
    else:
        bs = [draw(st.integers(1, 12)) for _ in sizes]
        batch = bs
    drop_last = draw(st.booleans())
    if drop_last:
        # drop_last with a task smaller than its batch is refused; keep the config legal.
        bs = [min(b, n) for b, n in zip(bs, sizes, strict=True)]
        batch = bs
    kw = {
        "task_sizes": sizes,
        "batch_size": batch,
        "mode": mode,
        "seed": draw(st.integers(-(2**40), 2**40)),
        "drop_last": drop_last,
    }
    if mode == "shuffle" and draw(st.booleans()):
        raw = [draw(st.integers(0, 5)) for _ in sizes]
        if sum(raw) == 0:
            raw[0] = 1
        kw["task_probs"] = [r / sum(raw) for r in raw]
        kw["steps_per_epoch"] = draw(st.integers(1, 30))
    if mode == "all":
        kw["epoch_task"] = draw(st.integers(0, len(sizes) - 1))
    return kw


# ---------------------------------------------------------------------- shuffle mode


@given(
    sizes=sizes_st, batch=st.integers(1, 16), seed=st.integers(0, 2**32), epoch=st.integers(0, 5)
)
def test_shuffle_covers_every_example_once(sizes, batch, seed, epoch):
    steps = _stream(epoch, task_sizes=sizes, batch_size=batch, seed=seed)
    per_task = {t: [] for t in range(len(sizes))}
    batches = Counter()
    for step in steps:
        assert len(step) == 1
        t, idx = step[0]
        assert all(isinstance(i, int) for i in idx)
        assert 1 <= len(idx) <= batch
        per_task[t].extend(idx)
        batches[t] += 1
    for t, n in enumerate(sizes):
        assert sorted(per_task[t]) == list(range(n))
        assert batches[t] == math.ceil(n / batch)
    assert len(steps) == sum(math.ceil(n / batch) for n in sizes)
    assert len(MultiTaskBatchSampler(sizes, batch)) == len(steps)


@given(sizes=sizes_st, seed=st.integers(0, 2**32), data=st.data())
def test_shuffle_drop_last_counts_and_full_batches(sizes, seed, data):
    bs = [data.draw(st.integers(1, n)) for n in sizes]
    steps = _stream(0, task_sizes=sizes, batch_size=bs, seed=seed, drop_last=True)
    batches = Counter()
    seen = {t: set() for t in range(len(sizes))}
    for [(t, idx)] in steps:
        assert len(idx) == bs[t]
        assert seen[t].isdisjoint(idx)
        seen[t].update(idx)
        batches[t] += 1
    assert dict(batches) == {t: n // b for t, (n, b) in enumerate(zip(sizes, bs, strict=True))}


def test_per_task_batch_sizes():
    steps = _stream(0, task_sizes=[10, 7], batch_size=[4, 3], seed=1)
    got = Counter((t, len(idx)) for [(t, idx)] in steps)
    assert got == Counter({(0, 4): 2, (0, 2): 1, (1, 3): 2, (1, 1): 1})


def test_shuffle_mixes_tasks():
    steps = _stream(0, task_sizes=[100, 100, 100], batch_size=10, seed=0)
    order = [step[0][0] for step in steps]
    # Task-by-task would switch task exactly twice; a shuffled stream of 30 switches far more.
    switches = sum(a != b for a, b in itertools.pairwise(order))
    assert switches > 10
    assert order != sorted(order)


def test_shuffle_within_task_is_shuffled():
    steps = _stream(0, task_sizes=[200], batch_size=200, seed=0)
    assert steps[0][0][1] != list(range(200))


# ---------------------------------------------------------------------- all mode


@given(
    sizes=sizes_st,
    batch=st.integers(1, 16),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 5),
    data=st.data(),
)
def test_all_mode_every_task_each_step_epoch_task_once(sizes, batch, seed, epoch, data):
    et = data.draw(st.integers(0, len(sizes) - 1))
    kw = {"task_sizes": sizes, "batch_size": batch, "mode": "all", "seed": seed, "epoch_task": et}
    steps = _stream(epoch, **kw)
    assert len(steps) == math.ceil(sizes[et] / batch) == len(MultiTaskBatchSampler(**kw))
    covered = []
    for step in steps:
        assert [t for t, _ in step] == list(range(len(sizes)))
        for t, idx in step:
            assert 1 <= len(idx) <= batch
            assert all(0 <= i < sizes[t] for i in idx)
        covered.extend(step[et][1])
    assert sorted(covered) == list(range(sizes[et]))


def test_all_mode_other_tasks_cycle_and_reshuffle():
    # Task 1 (3 examples, batch 1) is passed over 4 times during task 0's 12 steps; each pass
    # covers it once, and the passes are not all the same order.
    steps = _stream(0, task_sizes=[12, 3], batch_size=1, mode="all", seed=3)
    other = [step[1][1][0] for step in steps]
    passes = [other[i : i + 3] for i in range(0, 12, 3)]
    assert all(sorted(p) == [0, 1, 2] for p in passes)
    assert len({tuple(p) for p in passes}) > 1


def test_all_mode_epoch_task_source():
    steps = _stream(0, task_sizes=[2, 9], batch_size=2, mode="all", epoch_task=1)
    assert len(steps) == 5
    assert sorted(i for step in steps for i in step[1][1]) == list(range(9))


# ---------------------------------------------------------------------- determinism and epochs


@given(kw=configs(), epoch=st.integers(0, 10))
def test_same_seed_and_epoch_same_stream(kw, epoch):
    assert _stream(epoch, **kw) == _stream(epoch, **kw)


def test_different_epoch_or_seed_different_stream():
    kw = {"task_sizes": [30, 20, 10], "batch_size": 4}
    base = _stream(0, **kw, seed=0)
    assert _stream(1, **kw, seed=0) != base
    assert _stream(0, **kw, seed=1) != base
    all_kw = {"task_sizes": [30, 20], "batch_size": 4, "mode": "all"}
    assert _stream(0, **all_kw) != _stream(1, **all_kw)
    p_kw = {**kw, "task_probs": [0.5, 0.3, 0.2], "steps_per_epoch": 40}
    assert _stream(0, **p_kw) != _stream(1, **p_kw)


def test_stream_is_pinned():
    # Guards cross-version/machine determinism: a change in how orders derive from
    # (seed, epoch, task) (or in numpy's PCG64/SeedSequence streams) shows up here rather than
    # as silently different training runs.
    assert _stream(0, task_sizes=[5, 3], batch_size=2, seed=0) == [
        [(0, [3, 1])],
        [(0, [4, 2])],
        [(0, [0])],
        [(1, [1, 2])],
        [(1, [0])],
    ]
    assert _stream(0, task_sizes=[4, 3], batch_size=2, mode="all", seed=7) == [
        [(0, [1, 2]), (1, [2, 1])],
        [(0, [0, 3]), (1, [0])],
    ]
    probs = {"task_probs": [0.5, 0.5], "steps_per_epoch": 4}
    assert _stream(0, task_sizes=[4, 3], batch_size=2, seed=1, **probs) == [
        [(1, [0, 2])],
        [(1, [1])],
        [(1, [2, 0])],
        [(1, [1])],
    ]


def test_iteration_advances_epoch_and_set_epoch_matches():
    kw = {"task_sizes": [9, 4], "batch_size": 2, "seed": 5}
    s = MultiTaskBatchSampler(**kw)
    first, second = _epoch(s), _epoch(s)
    assert s.epoch == 2 and s.step == 0
    assert first == _stream(0, **kw)
    assert second == _stream(1, **kw)


def test_set_epoch_same_epoch_keeps_position_other_resets():
    kw = {"task_sizes": [9, 4], "batch_size": 2, "seed": 5}
    s = MultiTaskBatchSampler(**kw)
    s.set_epoch(3)
    it = iter(s)
    next(it)
    next(it)
    assert (s.epoch, s.step) == (3, 2)
    s.set_epoch(3)
    assert (s.epoch, s.step) == (3, 2)
    s.set_epoch(4)
    assert (s.epoch, s.step) == (4, 0)


def test_abandoned_iteration_continues_where_it_stopped():
    kw = {"task_sizes": [9, 4], "batch_size": 2, "seed": 5}
    full = _stream(0, **kw)
    s = MultiTaskBatchSampler(**kw)
    head = []
    for step in s:
        head.append(step)
        if len(head) == 3:
            break
    assert head + _epoch(s) == full


# ---------------------------------------------------------------------- resumption


@given(kw=configs(), epoch=st.integers(0, 4), data=st.data())
def test_resume_at_any_step_equals_uninterrupted(kw, epoch, data):
    full = _stream(epoch, **kw)
    k = data.draw(st.integers(0, len(full)))
    s = MultiTaskBatchSampler(**kw)
    s.set_epoch(epoch)
    it = iter(s)
    head = [[(t, list(i)) for t, i in next(it)] for _ in range(k)]
    state = json.loads(json.dumps(s.state_dict()))  # survives a round trip through JSON
    assert state["epoch"] == epoch and state["step"] == k

    fresh = MultiTaskBatchSampler(**kw)
    fresh.load_state_dict(state)
    fresh.set_epoch(epoch)  # the usual loop calls it again after restoring; must keep the step
    tail = _epoch(fresh)
    assert head + tail == full
    assert (fresh.epoch, fresh.step) == (epoch + 1, 0)


@pytest.mark.parametrize(
    "kw",
    [
        {"task_sizes": [7, 5, 3], "batch_size": 2},
        {"task_sizes": [7, 5, 3], "batch_size": [3, 2, 1], "drop_last": True},
        {"task_sizes": [7, 5, 3], "batch_size": 2, "mode": "all", "epoch_task": 1},
        {
            "task_sizes": [7, 5, 3],
            "batch_size": 2,
            "task_probs": [0.2, 0.5, 0.3],
            "steps_per_epoch": 17,
        },
    ],
)
def test_resume_every_step_exhaustively(kw):
    for epoch in (0, 2):
        full = _stream(epoch, **kw)
        for k in range(len(full) + 1):
            s = MultiTaskBatchSampler(**kw)
            s.set_epoch(epoch)
            it = iter(s)
            head = [next(it) for _ in range(k)]
            fresh = MultiTaskBatchSampler(**kw)
            fresh.load_state_dict(s.state_dict())
            assert head + _epoch(fresh) == full, (epoch, k)


def test_state_at_end_of_epoch_then_next_epoch():
    kw = {"task_sizes": [6, 4], "batch_size": 2, "seed": 9}
    s = MultiTaskBatchSampler(**kw)
    it = iter(s)
    for _ in range(len(s)):
        next(it)
    state = s.state_dict()
    assert (state["epoch"], state["step"]) == (0, len(s))
    fresh = MultiTaskBatchSampler(**kw)
    fresh.load_state_dict(state)
    assert _epoch(fresh) == []
    assert _epoch(fresh) == _stream(1, **kw)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"task_sizes": [8, 5]}, "task_sizes"),
        ({"batch_size": 3}, "batch_sizes"),
        ({"mode": "all"}, "mode"),
        ({"seed": 1}, "seed"),
        ({"drop_last": True}, "drop_last"),
        ({"epoch_task": 1, "mode": "all"}, "epoch_task"),
        ({"task_probs": [0.5, 0.5], "steps_per_epoch": 4}, "task_probs"),
    ],
)
def test_load_state_from_other_config_names_difference(change, named):
    base = {"task_sizes": [8, 4], "batch_size": 2, "seed": 0}
    state = MultiTaskBatchSampler(**base).state_dict()
    other = MultiTaskBatchSampler(**{**base, **change})
    with pytest.raises(ValueError, match=f"differently configured.*{named}"):
        other.load_state_dict(state)


def test_load_state_bad_position():
    s = MultiTaskBatchSampler([4, 4], 2)
    state = s.state_dict()
    with pytest.raises(ValueError, match=r"step = 5 is outside \[0, 4\]"):
        s.load_state_dict({**state, "step": 5})
    with pytest.raises(ValueError, match="epoch = -1"):
        s.load_state_dict({**state, "epoch": -1})
    missing = dict(state)
    del missing["mode"]
    with pytest.raises(ValueError, match=r"missing \['mode'\]"):
        s.load_state_dict(missing)


# ---------------------------------------------------------------------- task_probs


@pytest.mark.parametrize(
    ("probs", "seed"),
    [([0.7, 0.2, 0.1], 0), ([0.25, 0.25, 0.25, 0.25], 1), ([0.5, 0.0, 0.5], 2), ([0.05, 0.95], 3)],
)
def test_task_probs_empirical_frequencies(probs, seed):
    n = 20_000
    s = MultiTaskBatchSampler([13] * len(probs), 4, seed=seed, task_probs=probs, steps_per_epoch=n)
    steps = _epoch(s)
    assert len(steps) == n
    counts = Counter(step[0][0] for step in steps)
    for t, p in enumerate(probs):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[t] - n * p) <= 3 * sigma + 1e-9, (t, counts[t], n * p)
    assert counts[1] > 0 or probs[1] == 0.0


def test_task_probs_tasks_reshuffle_when_exhausted():
    # Task 0 has 5 examples in batches of 5: each of its draws is a full pass, and the passes
    # are reshuffled orders of the same examples.
    s = MultiTaskBatchSampler([5, 3], 5, seed=0, task_probs=[0.9, 0.1], steps_per_epoch=50)
    passes = [idx for [(t, idx)] in _epoch(s) if t == 0]
    assert len(passes) > 5
    assert all(sorted(p) == list(range(5)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1


def test_task_probs_consecutive_batches_cover_task():
    s = MultiTaskBatchSampler([10], 3, seed=4, task_probs=[1.0], steps_per_epoch=8)
    idx = [step[0][1] for step in _epoch(s)]
    assert [len(i) for i in idx] == [3, 3, 3, 1, 3, 3, 3, 1]
    assert sorted(i for b in idx[:4] for i in b) == list(range(10))
    assert sorted(i for b in idx[4:] for i in b) == list(range(10))


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"task_sizes": []}, "task_sizes is empty"),
        ({"task_sizes": [3, 0]}, r"task 1 is empty \(task_sizes\[1\] = 0\)"),
        ({"task_sizes": [3, 2.5]}, r"task_sizes\[1\] = 2.5 is not an int"),
        ({"batch_size": 0}, "batch size of task 0 is 0; it must be >= 1"),
        ({"batch_size": [2, -1]}, "batch size of task 1 is -1; it must be >= 1"),
        ({"batch_size": [2, 2, 2]}, "batch_size has 3 entries but there are 2 tasks"),
        ({"batch_size": True}, "neither an int nor a sequence"),
        ({"batch_size": "4"}, "neither an int nor a sequence"),
        ({"mode": "roundrobin"}, "unknown mode 'roundrobin'"),
        ({"seed": 1.5}, "seed = 1.5 is not an int"),
        (
            {"batch_size": 4, "drop_last": True},
            "task 1 has 3 examples, fewer than its batch size 4",
        ),
        (
            {"task_probs": [0.5, 0.6], "steps_per_epoch": 5},
            r"not a distribution: it sums to 1.1",
        ),
        (
            {"task_probs": [1.5, -0.5], "steps_per_epoch": 5},
            "not a distribution: entries must be finite, >= 0",
        ),
        (
            {"task_probs": [float("nan"), 1.0], "steps_per_epoch": 5},
            "not a distribution: entries must be finite",
        ),
        (
            {"task_probs": [1.0], "steps_per_epoch": 5},
            "task_probs has 1 entries but there are 2 tasks",
        ),
        ({"task_probs": [0.5, 0.5]}, "task_probs needs steps_per_epoch"),
        ({"steps_per_epoch": 5}, "steps_per_epoch only applies together with task_probs"),
        ({"task_probs": [0.5, 0.5], "steps_per_epoch": 0}, "steps_per_epoch = 0 must be"),
        (
            {"task_probs": [0.5, 0.5], "steps_per_epoch": 4, "mode": "all"},
            "task_probs only applies to mode='shuffle'",
        ),
        ({"epoch_task": 2}, "epoch_task = 2 is out of range for 2 tasks"),
        ({"epoch_task": -1}, "epoch_task = -1 is out of range for 2 tasks"),
    ],
)
def test_validation_errors(kw, message):
    args = {"task_sizes": [4, 3], "batch_size": 2, **kw}
    with pytest.raises(ValueError, match=f"MultiTaskBatchSampler: .*{message}"):
        MultiTaskBatchSampler(**args)


def test_set_epoch_rejects_negative():
    with pytest.raises(ValueError, match="epoch = -1 must be an int >= 0"):
        MultiTaskBatchSampler([3], 1).set_epoch(-1)


def test_properties_and_repr():
    s = MultiTaskBatchSampler([10, 3], [4, 2], drop_last=True)
    assert s.num_tasks == 2
    assert s.batches_per_task == [2, 1]
    assert len(s) == 3
    assert "MultiTaskBatchSampler(task_sizes=[10, 3]" in repr(s)


@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=3),
    batch=st.integers(1, 16),
    seed=st.integers(0, 2**32),
    drop_last=st.booleans(),
)
def test_group_by_length_is_a_permutation_with_less_padding(sizes, batch, seed, drop_last):
    sizes = [max(n, batch) if drop_last else n for n in sizes]
    rng = np.random.default_rng(seed)
    lengths = [rng.integers(1, 100, n).tolist() for n in sizes]
    grouped = MultiTaskBatchSampler(sizes, batch, seed=seed, drop_last=drop_last, lengths=lengths)
    plain = MultiTaskBatchSampler(sizes, batch, seed=seed, drop_last=drop_last)
    seen = {t: [] for t in range(len(sizes))}
    padded = {"grouped": 0, "plain": 0}
    for name, sampler in (("grouped", grouped), ("plain", plain)):
        for step in sampler:
            ((t, idx),) = step
            if name == "grouped":
                seen[t].extend(idx)
            lens = [lengths[t][i] for i in idx]
            padded[name] += max(lens) * len(lens)
    for t, n in enumerate(sizes):
        expected = (n // batch) * batch if drop_last else n
        assert len(seen[t]) == expected and len(set(seen[t])) == expected
    if not drop_last:
        # Both cut the same permutation; sorting inside chunks of whole batches minimises the
        # sum of batch maxima of each chunk, so padding can only shrink.
        assert padded["grouped"] <= padded["plain"]

    # Deterministic, and resumable mid-epoch like the plain sampler.
    def fresh():
        return MultiTaskBatchSampler(sizes, batch, seed=seed, drop_last=drop_last, lengths=lengths)

    assert list(fresh()) == list(fresh())
    assert grouped.state_dict()["group_by_length"] is True


def test_group_by_length_checks_its_input():
    with pytest.raises(ValueError, match="lengths has 1 entries but there are 2 tasks"):
        MultiTaskBatchSampler([3, 4], 2, lengths=[[1, 2, 3]])
    with pytest.raises(ValueError, match=r"lengths\[1\] has 3 entries for 4 examples"):
        MultiTaskBatchSampler([3, 4], 2, lengths=[[1, 2, 3], [1, 2, 3]])
    with pytest.raises(ValueError, match="group_by_length"):
        MultiTaskBatchSampler([3], 2).load_state_dict(
            MultiTaskBatchSampler([3], 2, lengths=[[1, 2, 3]]).state_dict()
        )
