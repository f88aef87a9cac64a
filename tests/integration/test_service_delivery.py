"""Delivery, DDP sharding and determinism through a real daemon, real workers and real sockets."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import torch

import pipelines
from augserve.sources import open_dataset

try:  # tests/integration is a package in some checkouts (tests/__init__.py) and a plain folder in others
    from .conftest import GEOMETRIC, SHAPES, collect, ids_per_epoch, images_by_sample, open_stream
except ImportError:
    from conftest import GEOMETRIC, SHAPES, collect, ids_per_epoch, images_by_sample, open_stream


def test_one_epoch_of_digits_with_lenet5_delivers_every_sample_once(daemon):
    source = open_dataset("digits")
    labels = source.labels
    stream = open_stream(daemon.address, dataset="digits", pipeline="lenet5", batch_size=64, seed=3, epochs=1)
    assert stream.batches_per_epoch == -(-len(source) // 64) and len(stream) == stream.batches_per_epoch
    ids, keys = [], []
    for batch in stream:
        # lenet5 ends in normalize: float32 N×C×H×W, made on the client after the uint8 wire transfer.
        assert batch.images.dtype == torch.float32 and batch.images.shape == (len(batch), 1, 32, 32)
        assert torch.isfinite(batch.images).all()
        assert batch.labels.dtype == torch.int64 and batch.sample_ids.dtype == torch.int64
        assert batch.labels.shape == batch.sample_ids.shape == (len(batch),)
        assert batch.epoch == 0 and 0 <= batch.index < stream.batches_per_epoch
        assert batch.pipeline_version == 1 and batch.skipped == []
        np.testing.assert_array_equal(batch.labels.numpy(), labels[batch.sample_ids.numpy()])
        ids.extend(batch.sample_ids.tolist())
        keys.append(batch.index)
    assert sorted(ids) == list(range(len(source)))
    assert sorted(keys) == list(range(stream.batches_per_epoch))


def test_two_epochs_deliver_uint8_nhwc_bytes_equal_to_the_library(daemon):
    """Every sample once per epoch, and each image is exactly what ``pipelines`` computes for
    (seed, epoch, sample id): the service adds no randomness of its own."""
    source = open_dataset("digits")
    labels = source.labels
    stream = open_stream(daemon.address, dataset="digits", pipeline=GEOMETRIC, batch_size=64, seed=11, epochs=2)
    records = collect(stream)
    assert len(records) == 2 * stream.batches_per_epoch
    for record in records:
        assert record["images"].dtype == np.uint8 and record["images"].shape == (len(record["ids"]), 32, 32, 1)
        np.testing.assert_array_equal(record["labels"], labels[record["ids"]])
    per_epoch = ids_per_epoch(records)
    assert sorted(per_epoch) == [0, 1]
    for epoch, ids in per_epoch.items():
        assert sorted(ids) == list(range(len(source))), f"epoch {epoch} is not every sample exactly once"
    assert per_epoch[0] != per_epoch[1], "both epochs visited the samples in the same order"

    pipe = pipelines.build(pipelines.PipelineSpec.model_validate(GEOMETRIC), backend="albumentations")
    for record in records:
        ids = record["ids"].tolist()
        expected = pipe([source.load(i) for i in ids], seed=11, epoch=record["epoch"], sample_ids=ids)
        np.testing.assert_array_equal(record["images"], expected.numpy(), err_msg=f"batch {record['epoch']}/{record['index']}")
    delivered = images_by_sample(records)
    assert any(not np.array_equal(delivered[(0, i)], delivered[(1, i)]) for i in range(50)), "epochs reuse the same augmentation"


@pytest.mark.parametrize("drop_last", [False, True])
def test_ddp_three_ranks_cover_every_sample_exactly_once(daemon, drop_last):
    world_size, epochs, batch_size = 3, 2, 16

    def rank(r: int):
        stream = open_stream(daemon.address, batch_size=batch_size, seed=5, epochs=epochs, rank=r, world_size=world_size, drop_last=drop_last)
        return stream.batches_per_epoch, collect(stream)

    with concurrent.futures.ThreadPoolExecutor(world_size) as pool:
        results = [f.result(timeout=90) for f in [pool.submit(rank, r) for r in range(world_size)]]
    n = SHAPES["n"]
    for epoch in range(epochs):
        per_rank = [ids_per_epoch(records).get(epoch, []) for _, records in results]
        union = [i for ids in per_rank for i in ids]
        assert len(union) == len(set(union)), f"epoch {epoch}: a sample went to two ranks"
        if drop_last:
            # DDP collectives need equal step counts: every rank gets the same number of full batches.
            assert len({len(ids) for ids in per_rank}) == 1 and all(len(ids) % batch_size == 0 for ids in per_rank)
            assert len(union) == (n // world_size) // batch_size * batch_size * world_size
        else:
            assert sorted(union) == list(range(n)), f"epoch {epoch}: the ranks do not cover every sample once"
            assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    assert len({batches for batches, _ in results}) == 1 or not drop_last


def test_same_seed_gives_identical_bytes_with_one_and_three_workers(daemon, start_daemon):
    one = start_daemon(workers=1, wait=False)
    three = start_daemon(workers=3, wait=False)
    one.wait_ready(1)
    three.wait_ready(3)

    def run(address: str, seed: int = 21):
        return images_by_sample(collect(open_stream(address, pipeline=GEOMETRIC, batch_size=16, seed=seed, epochs=2, prefetch=6)))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = [f.result(timeout=90) for f in [pool.submit(run, one.address), pool.submit(run, three.address), pool.submit(run, daemon.address)]]
    reference = runs[0]
    assert len(reference) == 2 * SHAPES["n"]
    for other, workers in zip(runs[1:], (3, 2)):
        assert other.keys() == reference.keys()
        different = [key for key in reference if not np.array_equal(reference[key], other[key])]
        assert not different, f"{len(different)} sample(s) differ between 1 and {workers} workers, e.g. (epoch, id) {different[:5]}"
    changed = run(three.address, seed=22)
    assert any(not np.array_equal(reference[k], changed[k]) for k in reference), "another seed gave the same augmentation"


def test_ordered_stream_delivers_plan_order(daemon):
    unordered = images_by_sample(collect(open_stream(daemon.address, pipeline=GEOMETRIC, batch_size=8, seed=4, epochs=2, prefetch=8)))
    stream = open_stream(daemon.address, pipeline=GEOMETRIC, batch_size=8, seed=4, epochs=2, prefetch=8, ordered=True)
    records = collect(stream)
    keys = [(r["epoch"], r["index"]) for r in records]
    assert keys == [(e, i) for e in range(2) for i in range(stream.batches_per_epoch)]
    ordered = images_by_sample(records)
    assert ordered.keys() == unordered.keys()
    assert all(np.array_equal(ordered[k], unordered[k]) for k in ordered), "ordered=True changed the augmentation"
