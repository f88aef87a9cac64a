"""Epoch plans: exactly-once across ranks, determinism, drop_last."""

import numpy as np
import pytest

from augserve.epochs import EpochPlan


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
@pytest.mark.parametrize("num_samples, batch_size", [(100, 8), (1797, 256), (5, 10)])
def test_every_id_exactly_once_across_ranks(num_samples, batch_size, world_size):
    for epoch in (0, 3):
        ids = []
        for rank in range(world_size):
            try:
                plan = EpochPlan(num_samples, batch_size, seed=5, rank=rank, world_size=world_size)
            except ValueError:
                assert num_samples < world_size  # a rank with nothing to do is refused
                continue
            ids.extend(np.concatenate([plan.batch(epoch, i) for i in range(plan.num_batches())]).tolist())
        if num_samples >= world_size:
            assert sorted(ids) == list(range(num_samples))


def test_order_depends_on_seed_and_epoch_only():
    a = EpochPlan(50, 8, seed=1)
    assert np.array_equal(a.order(0), EpochPlan(50, 3, seed=1, rank=1, world_size=2).order(0))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), EpochPlan(50, 8, seed=2).order(0))
    assert np.array_equal(EpochPlan(50, 8, shuffle=False).order(4), np.arange(50))


def test_drop_last_gives_every_rank_the_same_full_batches():
    plans = [EpochPlan(103, 10, rank=r, world_size=3, drop_last=True) for r in range(3)]
    assert {p.num_batches() for p in plans} == {3}
    for plan in plans:
        assert all(len(plan.batch(0, i)) == 10 for i in range(plan.num_batches()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_samples": 0, "batch_size": 4}, "dataset is empty"),
        ({"num_samples": 10, "batch_size": 0}, "batch_size must be >= 1"),
        ({"num_samples": 10, "batch_size": 4, "rank": 2, "world_size": 2}, "rank must be in"),
        ({"num_samples": 10, "batch_size": 4, "world_size": 3, "drop_last": True}, "no batches"),
    ],
)
def test_bad_plans_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EpochPlan(**kwargs)
