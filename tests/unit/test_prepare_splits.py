"""The stratified, seeded train/val/test assignment of `effray data prepare`."""

from __future__ import annotations

import numpy as np
import pytest

from effray.data.splits import assign_splits


def _labels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(7, size=1003, p=[0.3, 0.2, 0.15, 0.15, 0.1, 0.07, 0.03])  # unbalanced, odd sizes


@pytest.mark.parametrize(("val", "test"), [(0.1, 0.1), (0.2, 0.05), (0.0, 0.15), (0.1, 0.0)])
def test_each_split_gets_its_share_of_every_class_and_no_row_is_in_two(val, test):
    labels = _labels()
    splits = assign_splits(labels, np.full(len(labels), "", dtype=object), val, seed=4, test_fraction=test)
    assert set(splits) <= {"train", "val", "test"}
    for name, fraction in (("val", val), ("test", test)):
        chosen = splits == name
        assert chosen.sum() == round(fraction * len(labels))  # the whole split: exact
        for c in range(7):  # each class: within one row of its share
            assert abs(chosen[labels == c].sum() - fraction * (labels == c).sum()) < 1
    assert (splits == "train").sum() == len(labels) - round(val * len(labels)) - round(test * len(labels))


def test_a_sources_own_test_rows_keep_their_split_and_only_the_others_are_carved():
    labels = _labels(1)
    fixed = np.where(np.arange(len(labels)) >= 900, "test", "").astype(object)
    splits = assign_splits(labels, fixed, 0.1, seed=0, test_fraction=0.0)
    assert (splits[900:] == "test").all() and not (splits[:900] == "test").any()
    assert (splits[:900] == "val").sum() == 90


def test_the_assignment_is_seeded():
    labels, free = _labels(2), np.full(1003, "", dtype=object)
    a = assign_splits(labels, free, 0.1, seed=7, test_fraction=0.1)
    assert (a == assign_splits(labels, free, 0.1, seed=7, test_fraction=0.1)).all()
    assert (a != assign_splits(labels, free, 0.1, seed=8, test_fraction=0.1)).any()
    # --test-fraction 0 is the assignment without one: the val rows earlier versions chose
    without = assign_splits(labels, free, 0.1, seed=7)
    assert (without == assign_splits(labels, free, 0.1, seed=7, test_fraction=0.0)).all()
