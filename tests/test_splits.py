import json
from collections import Counter

import numpy as np
import pytest
import torch

from feedbackcam.data.splits import BALANCE_MODES, Splits, balance, make_slices, split_feedback

N = 1000
COUNTS = {0: 750, 1: 170, 2: 80}  # unbalanced, like NV / MEL / BKL


@pytest.fixture
def labels():
    y = np.concatenate([np.full(c, k) for k, c in COUNTS.items()])
    return np.random.default_rng(123).permutation(y)


def proportions(y, idx):
    return np.bincount(y[idx], minlength=3) / len(idx)


def assert_partition(s: Splits, n):
    allidx = np.concatenate([s.train, s.val, s.test])
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))  # each index exactly once
    for part in (s.train, s.val, s.test):
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no duplicates


# ---------------------------------------------------------------------------------------------
# split_feedback
# ---------------------------------------------------------------------------------------------


def test_split_sizes_partition_and_stratification(labels):
    s = split_feedback(labels, seed=0)
    assert_partition(s, N)
    assert (len(s.train), len(s.val), len(s.test)) == (800, 100, 100)
    whole = proportions(labels, np.arange(N))
    for part in (s.val, s.test, s.train):
        np.testing.assert_allclose(proportions(labels, part), whole, atol=0.01)


def test_split_is_deterministic_by_seed(labels):
    a, b, c = (split_feedback(labels, seed=s) for s in (7, 7, 8))
    assert a.to_dict() == b.to_dict()
    assert not np.array_equal(a.val, c.val)
    assert not np.array_equal(a.test, c.test)


def test_split_train_only_stays_in_train_and_val_test_keep_size(labels):
    # Overlap with the base model's data, skewed to class 0 as it might be in practice.
    cls0 = np.flatnonzero(labels == 0)
    locked = np.concatenate([cls0[:250], np.flatnonzero(labels == 1)[:50]])
    s = split_feedback(labels, seed=3, train_only=locked)
    assert_partition(s, N)
    assert set(locked.tolist()) <= set(s.train.tolist())
    assert not set(locked.tolist()) & (set(s.val.tolist()) | set(s.test.tolist()))
    assert (len(s.val), len(s.test)) == (100, 100)
    whole = proportions(labels, np.arange(N))
    for part in (s.val, s.test):
        np.testing.assert_allclose(proportions(labels, part), whole, atol=0.01)


def test_split_train_only_as_mask_equals_as_indices(labels):
    locked = np.arange(0, N, 7)
    mask = np.zeros(N, dtype=bool)
    mask[locked] = True
    by_idx = split_feedback(labels, seed=1, train_only=locked.tolist())
    by_mask = split_feedback(labels, seed=1, train_only=torch.tensor(mask))
    by_set = split_feedback(labels, seed=1, train_only=set(locked.tolist()))
    assert by_idx.to_dict() == by_mask.to_dict() == by_set.to_dict()


def test_split_shrinks_val_test_only_when_eligible_samples_run_out():
    y = np.array([0] * 10 + [1] * 10)
    locked = np.arange(17)  # only 3 eligible samples left, all class 1
    s = split_feedback(y, seed=0, train_only=locked)
    assert_partition(s, 20)
    assert len(s.val) + len(s.test) == 3
    assert set(s.val.tolist()) | set(s.test.tolist()) == {17, 18, 19}


def test_split_tiny_classes_go_to_train():
    y = np.array([0] * 50 + [1] * 2 + [2])
    s = split_feedback(y, seed=0)
    assert_partition(s, len(y))
    assert {50, 51, 52} <= set(s.train.tolist())
    assert (len(s.val), len(s.test)) == (5, 5)


def test_split_accepts_string_labels():
    y = np.array(["NV"] * 60 + ["MEL"] * 30 + ["BKL"] * 10)
    s = split_feedback(y, seed=0)
    assert Counter(y[s.val].tolist()) == {"NV": 6, "MEL": 3, "BKL": 1}


def test_splits_are_read_only_and_json_safe(labels):
    s = split_feedback(labels)
    with pytest.raises(ValueError):
        s.train[0] = 5
    d = json.loads(json.dumps(s.to_dict()))
    assert d["val"] == s.val.tolist()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fractions": (0.8, 0.1)}, "3 positive"),
        ({"fractions": (0.9, 0.2, -0.1)}, "3 positive"),
        ({"fractions": (0.8, 0.1, 0.0)}, "3 positive"),
        ({"fractions": (0.7, 0.1, 0.1)}, "sum to 1"),
        ({"train_only": [5, 1000]}, r"\[0, 1000\)"),
        ({"train_only": np.zeros(999, dtype=bool)}, r"shape \(1000,\)"),
    ],
)
def test_split_bad_inputs_raise(labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_feedback(labels, **kwargs)


def test_split_bad_labels_raise():
    with pytest.raises(ValueError, match="empty"):
        split_feedback([])
    with pytest.raises(ValueError, match="1-D"):
        split_feedback(np.zeros((10, 2)))


# ---------------------------------------------------------------------------------------------
# balance
# ---------------------------------------------------------------------------------------------


def test_balance_reduce_equalises_to_smallest_and_drops(labels):
    s = split_feedback(labels, seed=0)
    train = s.train.copy()
    out = balance(s.train, labels, "reduce", seed=0, drop_classes=(2,))
    counts = Counter(labels[out].tolist())
    smallest = min(Counter(labels[s.train].tolist())[k] for k in (0, 1))
    assert counts == {0: smallest, 1: smallest}
    assert len(set(out.tolist())) == len(out)  # no duplicates
    assert set(out.tolist()) <= set(s.train.tolist())
    np.testing.assert_array_equal(s.train, train)  # input untouched


def test_balance_upsample_equalises_to_largest_and_keeps_originals(labels):
    s = split_feedback(labels, seed=0)
    out = balance(s.train, labels, "upsample", seed=0)
    largest = max(Counter(labels[s.train].tolist()).values())
    assert Counter(labels[out].tolist()) == {0: largest, 1: largest, 2: largest}
    assert set(s.train.tolist()) == set(out.tolist())  # every original kept, nothing new
    assert not np.all(np.diff(out) >= 0)  # shuffled


def test_balance_never_touches_val_or_test(labels):
    s = split_feedback(labels, seed=0)
    held_out = set(s.val.tolist()) | set(s.test.tolist())
    for mode in BALANCE_MODES:
        out = balance(s.train, labels, mode, seed=1)
        assert not set(out.tolist()) & held_out


def test_balance_none_returns_indices_unchanged(labels):
    idx = np.array([5, 3, 999, 3])
    np.testing.assert_array_equal(balance(idx, labels, "none"), idx)


def test_balance_thesis_reduced_with_string_labels():
    y = np.array(["NV"] * 50 + ["MEL"] * 12 + ["BKL"] * 5)
    out = balance(np.arange(len(y)), y, "reduce", drop_classes=["BKL"])
    assert Counter(y[out].tolist()) == {"NV": 12, "MEL": 12}


def test_balance_is_deterministic_by_seed(labels):
    idx = np.arange(N)
    a = balance(idx, labels, "upsample", seed=4)
    np.testing.assert_array_equal(a, balance(idx, labels, "upsample", seed=4))
    assert not np.array_equal(a, balance(idx, labels, "upsample", seed=5))


def test_balance_bad_inputs_raise(labels):
    with pytest.raises(ValueError, match="'none', 'reduce', 'upsample'"):
        balance(np.arange(10), labels, "oversample")
    with pytest.raises(ValueError, match=r"drop_classes \[7\]"):
        balance(np.arange(10), labels, "reduce", drop_classes=[7])
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        balance([1, 1000], labels, "none")


# ---------------------------------------------------------------------------------------------
# make_slices
# ---------------------------------------------------------------------------------------------


def test_slices_partition_and_are_stratified(labels):
    train = split_feedback(labels, seed=0).train
    slices = make_slices(train, labels, k=20, seed=0)
    assert len(slices) == 20
    np.testing.assert_array_equal(np.sort(np.concatenate(slices)), train)  # union, no overlap
    assert {len(sl) for sl in slices} == {40}
    per_class = Counter(labels[train].tolist())
    for sl in slices:
        counts = Counter(labels[sl].tolist())
        for k, total in per_class.items():
            assert abs(counts[k] - total / 20) <= 1


def test_slices_keep_duplicates_from_upsampling(labels):
    up = balance(np.arange(200), labels, "upsample", seed=0)
    slices = make_slices(up, labels, k=7)
    assert Counter(np.concatenate(slices).tolist()) == Counter(up.tolist())


def test_slices_deterministic_by_seed(labels):
    idx = np.arange(100)
    a, b = make_slices(idx, labels, 5, seed=1), make_slices(idx, labels, 5, seed=1)
    c = make_slices(idx, labels, 5, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_slices_bad_inputs_raise(labels):
    with pytest.raises(ValueError, match=r"len\(indices\)=3"):
        make_slices([0, 1, 2], labels, k=4)
    with pytest.raises(ValueError, match="got 0"):
        make_slices([0, 1, 2], labels, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        make_slices([0, 1, 2], labels, k=2.0)
