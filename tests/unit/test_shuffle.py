"""The exact per-epoch shuffle's arithmetic: each epoch one permutation of every row,
dealt to replicas so that each global batch is a slice of it (no Ray needed)."""

from __future__ import annotations

import numpy as np
import pytest

from effray.data.shuffle import kept_rows, replica_rows, steps_per_epoch


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("rows", [540, 541, 45_000])
def test_every_row_once_per_epoch_disjoint_across_replicas(rows: int, replicas: int) -> None:
    batch = 60 * replicas
    shares = [replica_rows(rows, 5, 2, r, replicas, batch) for r in range(replicas)]
    union = np.concatenate(shares)
    assert len(union) == len(set(union.tolist())) == kept_rows(rows, batch, replicas)
    assert set(union.tolist()) <= set(range(rows))
    # every replica takes the same number of steps, so DDP's collectives pair up
    per = batch // replicas
    assert {-(-len(s) // per) for s in shares} == {steps_per_epoch(rows, batch, replicas)}
    # step k of every replica together is exactly rows k*B..(k+1)*B of one permutation
    whole = replica_rows(rows, 5, 2, 0, 1, batch)
    for k in range(steps_per_epoch(rows, batch, replicas)):
        step = np.concatenate([s[k * per : (k + 1) * per] for s in shares])
        assert sorted(step.tolist()) == sorted(whole[k * batch : (k + 1) * batch].tolist())


def test_epochs_differ_and_a_seed_repeats() -> None:
    a = replica_rows(540, 1, 0, 0, 2, 120)
    assert np.array_equal(a, replica_rows(540, 1, 0, 0, 2, 120))  # same seed, same epoch: same rows, same order
    assert not np.array_equal(a, replica_rows(540, 1, 1, 0, 2, 120))  # the next epoch: a new order...
    assert set(a.tolist()) != set(replica_rows(540, 1, 1, 0, 2, 120).tolist())  # ...and other rows for this rank
    assert not np.array_equal(a, replica_rows(540, 2, 0, 0, 2, 120))  # another seed


def test_a_last_batch_too_small_to_share_is_left_out() -> None:
    # 541 rows in batches of 60 over 2 replicas: the 1-row tail can't go to both
    assert kept_rows(541, 60, 2) == 540 and kept_rows(542, 60, 2) == 542 and kept_rows(541, 60, 1) == 541
    assert steps_per_epoch(542, 60, 2) == 10 and steps_per_epoch(540, 60, 2) == 9
    with pytest.raises(ValueError, match="multiple"):
        replica_rows(540, 0, 0, 0, 3, 100)
