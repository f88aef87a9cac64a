"""The daemon serves the ``val`` split: a hold-out of train that the train stream, given the same
dataset options, never yields."""

import numpy as np
import pytest

import pipelines
from augserve.sources import open_dataset

try:
    from .conftest import collect, images_by_sample, open_stream
except ImportError:  # collected without the package context
    from conftest import collect, images_by_sample, open_stream

SPEC = {"ops": [{"op": "random_crop", "size": 8, "padding": 1}, {"op": "mirror"}]}
HOLD_OUT = {"val_fraction": 0.1, "val_seed": 7}


def test_train_and_val_streams_split_the_train_set_without_overlap(daemon):
    val = collect(open_stream(daemon.address, dataset="digits", pipeline=SPEC, batch_size=64, split="val", dataset_options=HOLD_OUT, shuffle=False))
    train = collect(open_stream(daemon.address, dataset="digits", pipeline=SPEC, batch_size=64, dataset_options=HOLD_OUT))
    val_source = open_dataset("digits", "val", **HOLD_OUT)
    train_source = open_dataset("digits", "train", **HOLD_OUT)
    val_ids = sorted(i for r in val for i in r["ids"].tolist())
    train_ids = sorted(i for r in train for i in r["ids"].tolist())
    assert val_ids == list(range(len(val_source))) and train_ids == list(range(len(train_source)))
    # Ids number each split's own samples; underneath, the two are disjoint and cover the train set.
    assert set(val_source.indices[val_ids]).isdisjoint(train_source.indices[train_ids])
    assert len(val_ids) + len(train_ids) == len(open_dataset("digits", "train"))
    # What the workers computed is the library's output on the held-out images.
    pipe = pipelines.build(SPEC)
    for (epoch, sample), image in list(images_by_sample(val).items())[:20]:
        expected = pipe([val_source.load(sample)], seed=0, epoch=epoch, sample_ids=[sample]).numpy()[0]
        np.testing.assert_array_equal(image, expected)


def test_a_val_stream_without_a_hold_out_is_refused_in_one_line(daemon):
    with pytest.raises(ValueError, match="has no 'val' split of its own.*val_fraction"):
        open_stream(daemon.address, dataset="digits", pipeline=SPEC, batch_size=64, split="val")
