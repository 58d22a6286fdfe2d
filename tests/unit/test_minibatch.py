"""ORZ's mini-batches (learner/minibatch.py): dealt by tokens from a seeded shuffle of the whole batch, the same
whichever way the batch is split over ranks, and one pass in all."""

from __future__ import annotations

import numpy as np
import pytest

from learner.minibatch import _mix, deal, sample_key


def test_deal_by_hand() -> None:
    keys = np.array([sample_key("t", i) for i in range(5)], dtype=np.int64)
    lengths = np.array([10, 4, 7, 3, 6])
    out = deal(keys, lengths, 2, seed=0)
    # worked from the shuffled order: each sample to the lighter mini-batch so far, ties to the lower index
    order = np.lexsort((lengths, _mix(keys, 0)))
    load, expected = [0, 0], np.empty(5, dtype=int)
    for i in order:
        m = 0 if load[0] <= load[1] else 1
        expected[i], load[m] = m, load[m] + lengths[i]
    assert out.tolist() == expected.tolist()
    totals = [int(lengths[out == m].sum()) for m in range(2)]
    assert sum(totals) == 30 and abs(totals[0] - totals[1]) <= lengths.max()  # balanced to within one sample


def test_deal_is_a_function_of_the_batch_not_of_its_order() -> None:
    rng = np.random.default_rng(0)
    keys = np.array([sample_key(f"g{g}", s) for g in range(20) for s in range(8)], dtype=np.int64)
    lengths = rng.integers(5, 300, size=len(keys))
    a = deal(keys, lengths, 12, seed=3)
    perm = rng.permutation(len(keys))
    b = deal(keys[perm], lengths[perm], 12, seed=3)
    assert (a[perm] == b).all()  # as when the batch is split over ranks differently
    assert set(a.tolist()) == set(range(12))
    loads = np.bincount(a, weights=lengths)
    assert loads.max() - loads.min() <= lengths.max()
    assert (deal(keys, lengths, 12, seed=4) != a).any()  # a fresh shuffle every iteration


@pytest.mark.parametrize("n", [1, 3, 12])
def test_fewer_samples_than_steps(n: int) -> None:
    keys = np.array([sample_key("t", i) for i in range(3)], dtype=np.int64)
    out = deal(keys, np.array([5, 5, 5]), n, seed=0)
    assert sorted(out.tolist()) == (list(range(3)) if n >= 3 else sorted(out.tolist()))
    assert out.max() + 1 == min(n, 3)
