"""augserve.Loader against a real daemon: one epoch per iter(), set_epoch, len, state_dict resume,
DDP topology, DataLoader wrapping, and the misuse that must fail in one clear line."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch

from augserve import Loader
from augserve.client import Batch

from conftest import CROP_FLIP, SHAPES, as_record, ids_per_epoch, images_by_sample

BATCHES = 13  # 200 shapes in batches of 16


def make_loader(address: str, **options) -> Loader:
    options.setdefault("dataset_options", dict(SHAPES))
    options.setdefault("timeout", 10.0)
    options.setdefault("batch_timeout", 30.0)
    return Loader(address, "shapes", options.pop("pipeline", CROP_FLIP), options.pop("batch_size", 16), **options)


def epoch_records(loader, limit: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        out.append(as_record(batch))
        if limit is not None and len(out) == limit:
            break
    return out


def test_each_iter_is_the_next_epoch_with_its_own_augmentation(daemon):
    with make_loader(daemon.address) as loader:
        assert len(loader) == BATCHES
        first, second = epoch_records(loader), epoch_records(loader)
    assert {r["epoch"] for r in first} == {0} and {r["epoch"] for r in second} == {1}
    for records in (first, second):
        assert len(records) == BATCHES
        assert sorted(ids_per_epoch(records)[records[0]["epoch"]]) == list(range(200))  # exactly once
    images = images_by_sample(first + second)
    same = sum(np.array_equal(images[(0, i)], images[(1, i)]) for i in range(200))
    assert same < 20, f"{same} of 200 samples got the same augmentation in epochs 0 and 1"


def test_set_epoch_chooses_the_epoch_and_matches_an_uninterrupted_run(daemon):
    with make_loader(daemon.address) as straight, make_loader(daemon.address) as jumped:
        epoch_records(straight)
        reference = images_by_sample(epoch_records(straight))  # epoch 1 after epoch 0
        it = iter(jumped)
        jumped.sampler.set_epoch(1)  # between iter() and the first batch, as Lightning does it
        records = [as_record(b) for b in it]
        assert {r["epoch"] for r in records} == {1}
        assert images_by_sample(records).keys() == reference.keys()
        assert all(np.array_equal(images_by_sample(records)[k], reference[k]) for k in reference)
        jumped.set_epoch(5)
        assert next(iter(jumped)).epoch == 5
        assert next(iter(jumped)).epoch == 6  # an iterator left mid-epoch counts as that epoch done
        with pytest.raises(ValueError, match="epoch must be an int >= 0"):
            jumped.set_epoch(-1)


def test_state_dict_mid_epoch_resumes_exactly_the_remaining_batches(daemon):
    with make_loader(daemon.address) as whole:
        epoch_records(whole)
        uninterrupted = images_by_sample(epoch_records(whole))
    with make_loader(daemon.address) as first:
        first.set_epoch(1)
        it = iter(first)
        seen = [as_record(next(it)) for _ in range(5)]
        state = first.state_dict()
        assert state["positions"]["0"]["epoch"] == 1 and len(state["positions"]["0"]["delivered"]) == 5
    buffer = io.BytesIO()
    torch.save(state, buffer)  # a framework's checkpoint: plain data, loadable with weights_only
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)
    with make_loader(daemon.address) as second:
        second.load_state_dict(restored)
        second.set_epoch(1)  # Lightning calls it after loading: the same epoch keeps the position
        assert len(second) == BATCHES  # a whole epoch, as Lightning counts steps
        rest = epoch_records(second)
        assert second.state_dict()["positions"]["0"] == {"epoch": 2, "delivered": [], "fingerprint": state["positions"]["0"]["fingerprint"]}
    assert len(rest) == BATCHES - 5 and {r["epoch"] for r in rest} == {1}
    got = images_by_sample(seen + rest)  # raises if a sample came twice
    assert got.keys() == uninterrupted.keys()
    assert all(np.array_equal(got[k], uninterrupted[k]) for k in got)


def test_a_state_of_another_run_is_refused(daemon):
    with make_loader(daemon.address) as loader:
        next(iter(loader))
        state = loader.state_dict()
    with make_loader(daemon.address, seed=7) as other:
        other.load_state_dict(state)
        with pytest.raises(ValueError, match="seed"):
            next(iter(other))
        with pytest.raises(ValueError, match="not a Loader state_dict"):
            other.load_state_dict({"epoch": 3})


def test_ranks_from_the_process_group_and_explicit_ranks_share_each_epoch_exactly_once(daemon, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with make_loader(daemon.address) as loader:
            assert (loader.rank, loader.world_size) == (0, 1)
            assert loader.state_dict()["world_size"] == 1  # a group of one gathers nothing
    finally:
        dist.destroy_process_group()
    with make_loader(daemon.address, rank=0, world_size=2, drop_last=False) as r0, make_loader(daemon.address, rank=1, world_size=2, drop_last=False) as r1:
        assert len(r0) == len(r1) == 7  # 100 samples each in batches of 16
        ids = [i for loader in (r0, r1) for batch in loader for i in batch.sample_ids.tolist()]
        with pytest.raises(ValueError, match="not of rank 1"):
            r1.load_state_dict(r0.state_dict())
    assert sorted(ids) == list(range(200))


def test_ranks_take_the_same_number_of_steps_unless_told_otherwise(daemon):
    """33 samples over 2 ranks in batches of 16: 17 and 16 samples, 2 and 1 batches with drop_last=False
    (a DDP job would hang in its all-reduce). Left unset, drop_last is on under world_size > 1."""
    small = {**SHAPES, "n": 33}

    def lengths(**options):
        with make_loader(daemon.address, rank=0, world_size=2, dataset_options=small, **options) as r0:
            with make_loader(daemon.address, rank=1, world_size=2, dataset_options=small, **options) as r1:
                return len(r0), len(r1), sum(len(b) for b in r0) + sum(len(b) for b in r1)

    assert lengths(drop_last=False) == (2, 1, 33)
    assert lengths() == (1, 1, 32)
    with make_loader(daemon.address, dataset_options=small) as alone:  # one process: nothing dropped
        assert len(alone) == 3 and sum(len(b) for b in alone) == 33


def test_works_inside_a_dataloader_and_unpacks_like_one(daemon):
    with make_loader(daemon.address) as loader:
        wrapped = torch.utils.data.DataLoader(loader, batch_size=None)
        epochs = [[b for b in wrapped] for _ in range(2)]
        assert [len(e) for e in epochs] == [BATCHES, BATCHES]
        assert [e[0].epoch for e in epochs] == [0, 1]
        batch = epochs[1][0]
        images, labels = batch
        assert images is batch.images and labels is batch.labels and len(batch) == 16
        moved = batch.to("cpu")
        assert isinstance(moved, Batch) and moved.epoch == 1 and moved.index == batch.index and torch.equal(moved.sample_ids, batch.sample_ids)
        with pytest.raises(RuntimeError, match="num_workers=0"):
            next(iter(torch.utils.data.DataLoader(loader, batch_size=None, num_workers=1)))


def test_two_threads_and_use_after_close_fail_in_one_clear_line(daemon):
    loader = make_loader(daemon.address)
    it = iter(loader)
    next(it)
    errors: list[BaseException] = []

    def other_thread():
        try:
            next(iter(loader))
        except BaseException as exc:  # noqa: BLE001 (the test reads it)
            errors.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(timeout=30)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors
    assert "from one thread" in str(errors[0]) and "\n" not in str(errors[0])
    next(it)  # the first thread's epoch goes on
    loader.close()
    for use in (lambda: iter(loader), lambda: len(loader), loader.state_dict, lambda: next(it)):
        with pytest.raises(RuntimeError, match="closed") as caught:
            use()
        assert "\n" not in str(caught.value)
    loader.close()  # twice is fine


def test_options_the_loader_owns_are_refused():
    with pytest.raises(TypeError, match="set_epoch"):
        Loader("tcp://127.0.0.1:5555", "digits", "lenet5", 64, epochs=3)
    with pytest.raises(TypeError, match="unknown option"):
        Loader("tcp://127.0.0.1:5555", "digits", "lenet5", 64, batchsize=3)
