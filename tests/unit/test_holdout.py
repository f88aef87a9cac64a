"""The ``val`` split: a deterministic, stratified hold-out of train that never overlaps what train yields."""

import pickle

import numpy as np
import pytest

from augserve.sources import open_dataset
from augserve.sources.holdout import holdout


def test_val_and_train_partition_the_train_split():
    full = open_dataset("digits", "train")
    train = open_dataset("digits", "train", val_fraction=0.2, val_seed=5)
    val = open_dataset("digits", "val", val_fraction=0.2, val_seed=5)
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted([*train.indices, *val.indices]) == list(range(len(full)))
    assert len(val) == pytest.approx(0.2 * len(full), abs=len(full.classes))  # rounded per class
    # The same samples, labels and pixels as the train split's.
    for part in (train, val):
        for k in (0, len(part) // 2, len(part) - 1):
            np.testing.assert_array_equal(part.load(k), full.load(int(part.indices[k])))
        np.testing.assert_array_equal(part.labels, full.labels[part.indices])
    assert (val.split, train.split) == ("val", "train") and val.classes == full.classes


def test_the_hold_out_is_stratified_and_deterministic():
    labels = np.repeat(np.arange(4), [100, 50, 10, 3])
    held = holdout(labels, 0.2, seed=1)
    assert [int(held[labels == c].sum()) for c in range(4)] == [20, 10, 2, 1]
    np.testing.assert_array_equal(held, holdout(labels, 0.2, seed=1))
    assert not np.array_equal(held, holdout(labels, 0.2, seed=2))
    # Pinned: the hash is SplitMix64 of (seed, index), the same on every machine and numpy version.
    assert np.flatnonzero(holdout(np.zeros(10, dtype=int), 0.3, seed=0)).tolist() == [1, 4, 5]


def test_a_val_split_survives_pickling_and_test_ignores_the_options():
    val = open_dataset("digits", "val", val_fraction=0.1, val_seed=3)
    again = pickle.loads(pickle.dumps(val))  # how workers re-open a source
    np.testing.assert_array_equal(again.indices, val.indices)
    assert again.options == {"val_fraction": 0.1, "val_seed": 3}
    test = open_dataset("digits", "test", val_fraction=0.1, val_seed=3)
    assert len(test) == len(open_dataset("digits", "test"))


@pytest.mark.parametrize(
    "split, options, message",
    [
        ("val", {}, "has no 'val' split of its own"),
        ("val", {"val_fraction": 0.0}, "strictly between 0 and 1"),
        ("train", {"val_fraction": 1.5}, "strictly between 0 and 1"),
        ("val", {"val_fraction": 0.1, "val_seed": -1}, "val_seed must be an integer"),
        ("train", {"val_seed": 4}, "val_seed needs val_fraction"),
        ("val", {"val_fraction": 0.01}, "leaves the val split empty"),
    ],
)
def test_bad_hold_out_options_are_one_clear_line(split, options, message):
    with pytest.raises(ValueError, match=message):
        open_dataset("shapes", split, n=20, **options)
