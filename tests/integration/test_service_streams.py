"""Several trainers on one daemon, credit-based flow control, and resumable streams."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
import torch

from augserve.sources import open_dataset

try:  # tests/integration is a package in some checkouts (tests/__init__.py) and a plain folder in others
    from .conftest import CROP_FLIP, GEOMETRIC, SHAPES, as_record, collect, ids_per_epoch, images_by_sample, open_stream, wait_until
except ImportError:
    from conftest import CROP_FLIP, GEOMETRIC, SHAPES, as_record, collect, ids_per_epoch, images_by_sample, open_stream, wait_until


def test_two_trainers_with_different_datasets_pipelines_and_seeds_progress_together(daemon):
    """A digits/lenet5 trainer and a shapes/custom trainer share the workers: both complete, and the
    scheduler interleaves them instead of serving one stream to the end first.

    Fairness is judged from the daemon's own per-stream ``acked`` counts, polled while both run: there
    must be a moment when the shapes stream has had batches consumed while the digits stream is still
    in the first half of its epoch."""
    digits_stream = open_stream(daemon.address, dataset="digits", pipeline="lenet5", batch_size=64, seed=1, epochs=1, prefetch=4)
    shapes_stream = open_stream(daemon.address, dataset="shapes", pipeline=CROP_FLIP, batch_size=8, seed=2, epochs=1, prefetch=4)
    d_batches, s_batches = digits_stream.batches_per_epoch, shapes_stream.batches_per_epoch
    start = threading.Barrier(3, timeout=30)

    def trainer(stream):
        start.wait()
        records = []
        for batch in stream:
            records.append(as_record(batch))
            time.sleep(0.01)  # a (very) short training step
        return records

    def interleaved():
        acked = {s["stream"]: s["acked"] for s in daemon.status()["streams"]}
        digits_acked = acked.get(digits_stream.id, d_batches)  # a finished stream leaves the status
        shapes_acked = acked.get(shapes_stream.id, s_batches)
        if shapes_acked >= 2 and digits_acked <= d_batches // 2:
            return acked
        assert digits_acked <= d_batches // 2, f"the shapes trainer starved: {shapes_acked} batch(es) consumed when digits had {digits_acked} of {d_batches}"
        return None

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        digits = pool.submit(trainer, digits_stream)
        shapes = pool.submit(trainer, shapes_stream)
        start.wait()
        try:
            wait_until(interleaved, timeout=60, interval=0.02, what="both streams to be consumed together")
        finally:  # let both trainers finish even when the check failed
            d_records, s_records = digits.result(timeout=90), shapes.result(timeout=90)

    assert len(d_records) == d_batches and sorted(ids_per_epoch(d_records)[0]) == list(range(len(open_dataset("digits"))))
    assert len(s_records) == s_batches and sorted(ids_per_epoch(s_records)[0]) == list(range(SHAPES["n"]))
    assert d_records[0]["images"].dtype == np.float32 and d_records[0]["images"].shape[1:] == (1, 32, 32)
    assert s_records[0]["images"].dtype == np.uint8 and s_records[0]["images"].shape[1:] == (32, 32, 3)


def test_a_slow_trainer_never_has_more_batches_in_flight_than_its_credits(daemon):
    prefetch = 2
    stream = open_stream(daemon.address, dataset="digits", pipeline=CROP_FLIP, batch_size=64, prefetch=prefetch, epochs=1)
    samples, queued, stop = [], [], threading.Event()

    def sample_status():
        while not stop.is_set():
            for s in daemon.status()["streams"]:
                if s["stream"] == stream.id:
                    samples.append((s["in_flight"], s["credits"], s["credits_free"]))
            queued.append(stream._queue.qsize())  # batches waiting on the trainer's side of the socket
            time.sleep(0.03)

    sampler = threading.Thread(target=sample_status, daemon=True)
    sampler.start()
    try:
        count = 0
        for batch in stream:
            count += 1
            time.sleep(0.12 if count < 12 else 0)  # a slow training step, then catch up
    finally:
        stop.set()
        sampler.join(timeout=10)
    assert count == stream.batches_per_epoch
    assert len(samples) >= 20, "too few status samples to judge"
    assert all(in_flight <= prefetch and credits == prefetch for in_flight, credits, _ in samples), samples
    assert max(in_flight for in_flight, _, _ in samples) >= 1
    # Memory stays bounded on the trainer too: never more than `prefetch` finished batches (+1 the end marker) waiting.
    assert max(queued) <= prefetch + 1, queued


def _uninterrupted(address: str, **options):
    records = collect(open_stream(address, **options))
    return {(r["epoch"], r["index"]): r for r in records}


def _check_resumed(full: dict, first: list[dict], second: list[dict]):
    keys_first = [(r["epoch"], r["index"]) for r in first]
    keys_second = [(r["epoch"], r["index"]) for r in second]
    both = keys_first + keys_second
    duplicated = sorted({k for k in both if both.count(k) > 1})
    missing = sorted(set(full) - set(both))
    assert not duplicated and not missing, f"resume delivered {len(duplicated)} batch(es) twice {duplicated[:6]} and lost {len(missing)} {missing[:6]}"
    for record in first + second:
        reference = full[(record["epoch"], record["index"])]
        np.testing.assert_array_equal(record["ids"], reference["ids"])
        np.testing.assert_array_equal(record["labels"], reference["labels"])
        np.testing.assert_array_equal(record["images"], reference["images"], err_msg=f"batch {record['epoch']}/{record['index']} differs after resume")


def test_resume_mid_epoch_continues_with_the_remaining_batches(daemon):
    options = dict(pipeline=GEOMETRIC, batch_size=16, seed=9, epochs=2, prefetch=4)
    full = _uninterrupted(daemon.address, **options)
    stream = open_stream(daemon.address, **options)
    first = collect(stream, limit=5)
    state = stream.state_dict()
    stream.close()
    assert state["epoch"] == 0 and len(state["delivered"]) == 5
    resumed = open_stream(daemon.address, resume=state, **options)
    assert len(resumed) == len(full) - 5
    second = collect(resumed)
    _check_resumed(full, first, second)


def test_resume_after_an_epoch_boundary_in_an_ordered_stream(daemon):
    options = dict(pipeline=GEOMETRIC, batch_size=16, seed=10, epochs=3, prefetch=4, ordered=True)
    full = _uninterrupted(daemon.address, **options)
    per_epoch = len(full) // 3
    stream = open_stream(daemon.address, **options)
    first = collect(stream, limit=per_epoch + 3)
    state = stream.state_dict()
    stream.close()
    assert state["epoch"] == 1 and state["delivered"] == [0, 1, 2]
    second = collect(open_stream(daemon.address, resume=state, **options))
    assert [(r["epoch"], r["index"]) for r in second][0] == (1, 3)
    _check_resumed(full, first, second)


def test_resume_of_an_unordered_stream_that_crossed_an_epoch_boundary(daemon):
    """Unordered delivery lets batches of epoch e+1 overtake the last ones of epoch e (with several
    workers this is common). A checkpoint taken then must still resume without duplicates or gaps.

    To make the overtaking certain, the ``slow`` dataset puts a large, slow-to-decode PNG in batch 11
    of every epoch (``shuffle=False`` pins it there), so the other worker serves (e, 12), (e+1, 0), ...
    meanwhile; the checkpoint is taken two batches into epoch 1."""
    options = dict(dataset="slow", pipeline=GEOMETRIC, batch_size=16, seed=12, epochs=2, prefetch=8, shuffle=False)
    full = _uninterrupted(daemon.address, **options)
    per_epoch = len(full) // 2
    assert per_epoch == 13
    stream = open_stream(daemon.address, **options)
    first = collect(stream, limit=per_epoch + 2)
    state = stream.state_dict()
    stream.close()
    # The other worker finishes (0, 12), (1, 0), ... while (0, 11) decodes, but the client holds batches
    # of epoch 1 back until every batch of epoch 0 has been released (augserve/reorder.py), so `first`
    # is all of epoch 0 and then (1, x), (1, y): the state names epoch 1 and nothing of epoch 0 is lost.
    assert [r["epoch"] for r in first] == [0] * per_epoch + [1, 1]
    assert state["epoch"] == 1 and len(state["delivered"]) == 2, state
    second = collect(open_stream(daemon.address, resume=state, **options))
    _check_resumed(full, first, second)


def test_resume_with_a_finished_state_delivers_nothing(daemon):
    options = dict(pipeline=CROP_FLIP, batch_size=64, seed=0, epochs=1)
    stream = open_stream(daemon.address, **options)
    records = collect(stream)
    state = stream.state_dict()
    assert state["epoch"] == 1 and state["delivered"] == [] and len(records) == stream.batches_per_epoch
    resumed = open_stream(daemon.address, resume=state, **options)
    assert len(resumed) == 0 and collect(resumed) == []


def test_batches_are_zero_copy_tensors_and_survive_the_stream(daemon):
    """Tensors wrap the received frames; they must stay valid after the stream is closed."""
    stream = open_stream(daemon.address, pipeline=CROP_FLIP, batch_size=32, epochs=1)
    batches = list(stream)
    stream.close()
    total = sum(len(b) for b in batches)
    assert total == SHAPES["n"]
    for b in batches:
        assert b.images.dtype == torch.uint8 and b.images.shape[1:] == (32, 32, 3)
        assert int(b.images.sum()) > 0
    ids = sorted(i for b in batches for i in b.sample_ids.tolist())
    assert ids == list(range(SHAPES["n"]))
    assert images_by_sample([as_record(b) for b in batches]).keys() == {(0, i) for i in range(SHAPES["n"])}
