"""The local hand-off without a daemon: the slot lifecycle, shared-memory segments, descriptors checked
against their slot, slots returned when their last tensor goes, and names that never outlive a process.

Segments live in a fresh directory under /dev/shm per test (a real tmpfs); the "too small" cases mount
a 1 MB tmpfs of their own when the test runs as root with the right to mount, and are skipped otherwise.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import uuid

import msgpack
import numpy as np
import pytest
import torch

from augserve import protocol as P
from augserve.handoff import shm
from augserve.handoff.host import host_identity, mismatch
from augserve.handoff.policy import StreamTransport, handoff_for
from augserve.handoff.receiver import SlotReader
from augserve.handoff.sender import Sender
from augserve.handoff.slots import FREE, LENT, NoSlot, SlotPool
from augserve.status import format_transport

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm") or not sys.platform.startswith("linux"), reason="needs Linux and /dev/shm")


def names(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(shm.PREFIX))


# --- the lifecycle, on a memory of plain Python objects ------------------------------------------------


class FakeMemory:
    """A slot memory whose state word the test flips the way a trainer would."""

    made = 0

    def __init__(self, capacity: int) -> None:
        FakeMemory.made += 1
        self.name = f"fake-{FakeMemory.made}"
        self.capacity = capacity
        self.word = FREE
        self.generation = 0
        self.closed = False
        self.bytes = bytearray(capacity)

    def state(self) -> int:
        return self.word

    def write(self, offset, source) -> None:
        self.bytes[offset : offset + len(source)] = bytes(source)

    def publish(self, generation: int) -> None:
        self.generation, self.word = generation, LENT

    def reclaim(self) -> None:
        self.word = FREE

    def close(self) -> None:
        self.closed = True


def test_slots_are_made_on_demand_and_reused_once_the_trainer_lets_go():
    pool = SlotPool(FakeMemory, max_slots=3)
    first = pool.acquire(100)
    assert first.filling and len(pool.slots) == 1 and first.memory.capacity == 100
    assert pool.lend(first) == 1 and first.memory.word == LENT and not first.filling
    second = pool.acquire(100)  # the first is lent: a second slot is made
    assert second is not first and len(pool.slots) == 2
    pool.lend(second)
    first.memory.word = FREE  # the trainer dropped the batch
    again = pool.acquire(80)
    assert again is first and len(pool.slots) == 2
    assert pool.lend(again) == 2 and first.memory.generation == 2


def test_a_full_pool_of_lent_slots_says_busy_and_never_waits():
    pool = SlotPool(FakeMemory, max_slots=2)
    for _ in range(2):
        pool.lend(pool.acquire(10))
    with pytest.raises(NoSlot, match="all 2 slots of this stream's pool are held by the trainer") as info:
        pool.acquire(10)
    assert info.value.kind == "busy" and len(pool.slots) == 2
    pool.slots[1].memory.word = FREE
    assert pool.acquire(10) is pool.slots[1]


def test_a_free_slot_too_small_is_retired_for_a_bigger_one_and_reported_once():
    pool = SlotPool(FakeMemory, max_slots=1)
    small = pool.acquire(10)
    pool.lend(small)
    small.memory.word = FREE
    big = pool.acquire(50)
    assert big is not small and small.memory.closed and big.memory.capacity == 50
    assert pool.take_retired() == [small.memory.name] and pool.take_retired() == []
    pool.lend(big)
    big.memory.word = FREE
    assert pool.acquire(10) is big  # a smaller batch fits the bigger slot
    assert pool.slot_bytes == 50


def test_new_slots_take_the_largest_size_seen():
    pool = SlotPool(FakeMemory, max_slots=3)
    pool.lend(pool.acquire(50))
    pool.lend(pool.acquire(10))  # made as large as the largest batch, for the batches to come
    assert [s.memory.capacity for s in pool.slots] == [50, 50]


def test_give_back_frees_a_slot_whose_batch_was_never_sent():
    pool = SlotPool(FakeMemory, max_slots=1)
    slot = pool.acquire(10)
    pool.give_back(slot)  # still filling: nothing was published
    assert not slot.filling and slot.memory.word == FREE and slot.memory.generation == 0
    slot = pool.acquire(10)
    pool.lend(slot)
    pool.give_back(slot)  # published, but the send failed
    assert slot.memory.word == FREE
    assert pool.acquire(10) is slot


def test_a_slot_that_cannot_be_made_leaves_the_pool_as_it_was():
    def refuse(capacity):
        raise NoSlot("no_space", "full")

    pool = SlotPool(refuse, max_slots=2)
    with pytest.raises(NoSlot, match="full"):
        pool.acquire(10)
    assert pool.slots == []


def test_close_closes_every_slot_and_refuses_more():
    pool = SlotPool(FakeMemory, max_slots=2)
    a, b = pool.acquire(1), pool.acquire(1)
    pool.lend(a)
    pool.close()
    assert a.memory.closed and b.memory.closed and pool.slots == []
    with pytest.raises(NoSlot, match="closed"):
        pool.acquire(1)
    with pytest.raises(ValueError, match="at least one slot"):
        SlotPool(FakeMemory, max_slots=0)


# --- segments -----------------------------------------------------------------------------------------


def test_a_segment_is_a_private_fully_allocated_file_with_its_header(shm_dir):
    segment = shm.Segment.create(shm_dir, 3 * 4096 + 5)
    path = os.path.join(shm_dir, segment.name)
    info = os.stat(path)
    assert info.st_mode & 0o777 == 0o600 and info.st_uid == os.geteuid()
    assert info.st_size == shm.HEADER_BYTES + 3 * 4096 + 5
    assert info.st_blocks * 512 >= info.st_size, "every page must be allocated at creation"
    with open(path, "rb") as handle:
        head = handle.read(32)
    assert head[:8] == b"AUGSLOT1" and int.from_bytes(head[24:32], "little") == 3 * 4096 + 5
    assert segment.state() == FREE
    ns, pid = segment.name[len(shm.PREFIX) :].split("-")[:2]
    assert ns == shm.pid_namespace() and int(pid) == os.getpid()
    segment.close()
    assert names(shm_dir) == []


def test_the_trainer_maps_a_segment_unlinks_its_name_and_shares_its_state(shm_dir):
    segment = shm.Segment.create(shm_dir, 4096)
    mapped = shm.open_segment(shm_dir, segment.name)
    assert names(shm_dir) == [], "the name goes once the trainer has mapped the segment"
    segment.write(0, np.arange(10, dtype=np.uint8))
    segment.publish(5)
    assert mapped.header() == (LENT, 5) and bytes(mapped.mapping[shm.HEADER_BYTES : shm.HEADER_BYTES + 10]) == bytes(range(10))
    mapped.release(4)  # not the fill it holds: ignored
    assert segment.state() == LENT
    mapped.release(5)
    assert segment.state() == FREE
    segment.close()  # the worker's close after the trainer's unlink is fine
    with pytest.raises(ValueError, match="overflow the 4096-byte slot"):
        shm.Segment.create(shm_dir, 4096).write(4090, np.zeros(10, np.uint8))


def test_a_reserve_the_directory_cannot_keep_is_no_space_with_the_fix(shm_dir):
    free = shm.free_bytes(shm_dir)
    with pytest.raises(NoSlot) as info:
        shm.Segment.create(shm_dir, 4096, reserve=free)
    assert info.value.kind == "no_space"
    text = str(info.value)
    assert text.startswith(f"{shm_dir} has ") and "--shm-size" in text and "--shm-reserve-mb" in text and "\n" not in text
    assert names(shm_dir) == []


def test_a_full_tmpfs_fails_at_creation_never_later(tiny_tmpfs, monkeypatch):
    with pytest.raises(NoSlot, match="has 1.0 MB free; it cannot hold a 2.0 MB slot") as info:
        shm.Segment.create(tiny_tmpfs, 2 * 10**6)
    assert info.value.kind == "no_space"
    # The free-space check can race with another process: then the allocation itself must fail cleanly.
    monkeypatch.setattr(shm, "free_bytes", lambda directory: 1 << 40)
    with pytest.raises(NoSlot, match="ran out of room while allocating a 2.0 MB slot") as info:
        shm.Segment.create(tiny_tmpfs, 2 * 10**6)
    assert info.value.kind == "no_space" and names(tiny_tmpfs) == []
    fits = shm.Segment.create(tiny_tmpfs, 512 * 1024)  # what fits still works, every page backed
    fits.write(0, np.full(512 * 1024, 7, np.uint8))
    fits.close()


# --- the trainer's reader -------------------------------------------------------------------------------


def lend_batch(segment: shm.Segment, generation: int, tensors: dict[str, np.ndarray]) -> P.ShmBatch:
    """Write ``tensors`` into ``segment`` as a worker does and return the descriptor it would send."""
    descriptors, offset = [], 0
    for name, array in tensors.items():
        segment.write(offset, np.frombuffer(array.tobytes(), np.uint8))
        descriptors.append(P.SlotTensor(name=name, dtype=str(array.dtype), shape=list(array.shape), offset=offset))
        offset = shm.aligned(offset + array.nbytes)
    segment.publish(generation)
    return P.ShmBatch(stream="s", task="t", epoch=0, index=0, pipeline_version=1, worker="w", segment=segment.name, generation=generation, tensors=descriptors)


IMAGES = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
IDS = np.array([5, 9], dtype=np.int64)


def test_tensors_are_views_of_the_slot_and_the_slot_returns_with_the_last_of_them(shm_dir):
    segment = shm.Segment.create(shm_dir, 4096)
    reader = SlotReader(shm_dir)
    tensors = reader.wrap(lend_batch(segment, 1, {"images": IMAGES, "sample_ids": IDS}))
    images, ids = tensors["images"], tensors["sample_ids"]
    assert images.dtype == torch.uint8 and images.shape == (2, 4, 4, 3) and torch.equal(images, torch.from_numpy(IMAGES))
    assert ids.tolist() == [5, 9]
    segment.data[0] = 200  # the worker's write shows through: the tensor views the slot, no copy
    assert images[0, 0, 0, 0].item() == 200
    del tensors
    corner = images[1, 0]  # a view keeps the slot as surely as the batch does
    del images, ids
    gc.collect()
    assert segment.state() == LENT
    kept = corner.clone()
    del corner
    assert segment.state() == FREE, "the slot returns when its last view is gone"
    assert kept.tolist() == IMAGES[1, 0].tolist()
    reader.close()
    segment.close()


def test_a_kept_batch_keeps_its_bytes_while_the_worker_refills_other_slots(shm_dir):
    pool = SlotPool(lambda n: shm.Segment.create(shm_dir, n), max_slots=2)
    reader = SlotReader(shm_dir)
    held = pool.acquire(4096)
    kept = reader.wrap(lend_batch(held.memory, pool.lend(held), {"images": IMAGES}))["images"]
    for round_ in range(3):  # while `kept` lives, the worker refills only the other slot
        other = pool.acquire(4096)
        assert other is not held
        batch = lend_batch(other.memory, pool.lend(other), {"images": np.full_like(IMAGES, round_)})
        assert reader.wrap(batch)["images"].sum().item() == round_ * IMAGES.size  # dropped at once: freed
    assert pool.acquire(4096) is not held
    with pytest.raises(NoSlot, match="held by the trainer"):
        pool.acquire(4096)
    assert torch.equal(kept, torch.from_numpy(IMAGES))
    pool.close()
    reader.close()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"generation": 2}, "holds fill 1 (lent), the descriptor names fill 2"),
        ({"tensors": [P.SlotTensor(name="images", dtype="uint8", shape=[4096], offset=64)]}, "does not lie 64-byte aligned inside the 4096-byte slot"),
        ({"tensors": [P.SlotTensor(name="images", dtype="uint8", shape=[8], offset=8)]}, "(uint8 [8], 8 bytes at offset 8) does not lie 64-byte aligned"),
        ({"tensors": [P.SlotTensor(name="images", dtype="float64", shape=[1 << 39, 1 << 39], offset=0)]}, "does not lie 64-byte aligned inside"),
        ({"segment": "augserve-slot-1-1-0000000000000000"}, "slot augserve-slot-1-1-0000000000000000 is gone from"),
    ],
)
def test_a_descriptor_that_does_not_fit_its_slot_is_refused_in_one_line(shm_dir, change, message):
    segment = shm.Segment.create(shm_dir, 4096)
    reader = SlotReader(shm_dir)
    good = lend_batch(segment, 1, {"images": IMAGES})
    bad = good.model_copy(update=change)
    with pytest.raises(P.ProtocolError) as info:
        reader.wrap(bad)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert segment.state() == LENT  # a refused descriptor does not touch the slot
    assert torch.equal(reader.wrap(good)["images"], torch.from_numpy(IMAGES))  # the real one still works
    segment.close()


def test_only_regular_files_of_this_user_with_a_slot_header_are_mapped(shm_dir):
    name = f"{shm.PREFIX}{shm.pid_namespace()}-{os.getpid()}-{uuid.uuid4().hex[:16]}"
    path = os.path.join(shm_dir, name)
    with open(path, "wb") as handle:
        handle.write(b"\0" * 8192)
    with pytest.raises(P.ProtocolError, match="does not hold an augserve slot header"):
        shm.open_segment(shm_dir, name)
    os.unlink(path)
    with open(path, "wb") as handle:
        handle.write(b"tiny")
    with pytest.raises(P.ProtocolError, match="has 4 bytes: not a slot"):
        shm.open_segment(shm_dir, name)
    os.unlink(path)
    target = shm.Segment.create(shm_dir, 4096)
    os.symlink(os.path.join(shm_dir, target.name), path)
    with pytest.raises(P.ProtocolError, match=f"cannot open slot {name}"):  # O_NOFOLLOW: never through a link
        shm.open_segment(shm_dir, name)
    os.unlink(path)
    shrunk = shm.Segment.create(shm_dir, 8192)
    os.truncate(os.path.join(shm_dir, shrunk.name), shm.HEADER_BYTES + 4096)  # the header says 8192
    with pytest.raises(P.ProtocolError, match="does not hold an augserve slot header"):
        shm.open_segment(shm_dir, shrunk.name)
    for bad in ("../../etc/passwd", "augserve-slot-1-1-XYZ", "/dev/shm/x"):
        with pytest.raises(P.ProtocolError, match="bad slot name"):
            shm.open_segment(shm_dir, bad)
    if os.geteuid() == 0:
        foreign = shm.Segment.create(shm_dir, 4096)
        os.chown(os.path.join(shm_dir, foreign.name), 65534, 65534)
        with pytest.raises(P.ProtocolError, match="belongs to uid 65534, not to this trainer's uid 0"):
            shm.open_segment(shm_dir, foreign.name)


def test_retired_segments_are_let_go(shm_dir):
    reader = SlotReader(shm_dir)
    first = shm.Segment.create(shm_dir, 4096)
    reader.wrap(lend_batch(first, 1, {"images": IMAGES}))
    assert list(reader._segments) == [first.name]
    second = shm.Segment.create(shm_dir, 4096)
    reader.wrap(lend_batch(second, 1, {"images": IMAGES}).model_copy(update={"retired": [first.name]}))
    assert list(reader._segments) == [second.name]


# --- no name outlives its process ------------------------------------------------------------------------

_MAKE_AND_DIE = """
import os, signal, sys
from augserve.handoff import shm
segment = shm.Segment.create(sys.argv[1], 4096)
print(segment.name, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_names_of_a_killed_process_are_reaped_and_no_others(shm_dir):
    done = subprocess.run([sys.executable, "-c", _MAKE_AND_DIE, shm_dir], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    orphan = done.stdout.strip()
    mine = shm.Segment.create(shm_dir, 4096)
    other_namespace = f"{shm.PREFIX}1-{os.getpid() + 1}-{'0' * 16}"  # pid 1 would be alive; the namespace differs
    open(os.path.join(shm_dir, other_namespace), "wb").close()
    assert names(shm_dir) == sorted([orphan, mine.name, other_namespace])
    assert shm.reap_orphans(shm_dir) == [orphan]
    assert names(shm_dir) == sorted([mine.name, other_namespace])
    assert shm.reap_orphans(shm_dir) == []
    assert shm.reap_orphans(os.path.join(shm_dir, "missing")) == []


# --- who may use shared memory ----------------------------------------------------------------------------


def test_the_host_identity_tells_hosts_directories_and_users_apart(shm_dir, tmp_path):
    here, why = host_identity(shm_dir)
    assert why == "" and here is not None and here.uid == os.geteuid()
    assert host_identity(shm_dir)[0] == here and mismatch(here, here) is None
    parent, _ = host_identity("/dev/shm")  # the same tmpfs, but names are looked up in another directory
    assert parent.dev == here.dev and "another shared-memory directory" in mismatch(here, parent)
    assert mismatch(here, here.model_copy(update={"boot": "0" * 32})) == "the trainer is on another host"
    assert "another shared-memory directory" in mismatch(here, here.model_copy(update={"dev": here.dev + 1}))
    assert mismatch(here, here.model_copy(update={"uid": here.uid + 1})) == f"the trainer runs as uid {here.uid + 1} and this worker as uid {here.uid}"
    elsewhere, _ = host_identity(str(tmp_path))
    if os.stat(tmp_path).st_dev != os.stat(shm_dir).st_dev:
        assert "another shared-memory directory" in mismatch(here, elsewhere)
    none, why = host_identity(str(tmp_path / "missing"))
    assert none is None and why.startswith(f"no shared-memory directory {tmp_path / 'missing'}")


def attach(**fields) -> P.Attach:
    host, _ = host_identity("/dev/shm")
    return P.Attach(**{"dataset": "digits", "pipeline": "lenet5", "batch_size": 8, "data": "tcp://127.0.0.1:1", "prefetch": 4, "shm_host": host, **fields})


@pytest.mark.parametrize(
    "trainer, daemon, mode",
    [("auto", "auto", "auto"), ("shm", "auto", "shm"), ("auto", "shm", "shm"), ("frames", "auto", None), ("auto", "frames", None), ("shm", "frames", None)],
)
def test_the_transport_of_a_stream_combines_both_sides(trainer, daemon, mode):
    handoff, phrase = handoff_for(attach(transport=trainer), daemon)
    if mode is None:
        assert handoff is None and phrase.startswith("frames (the ")
    else:
        assert handoff.mode == mode and handoff.slots == 4 + 2 and phrase.startswith(f"{mode}: shared memory")
    assert handoff_for(attach(shm_host=None), "auto") == (None, "frames (the trainer has no shared memory)")


def done(**fields) -> P.Done:
    return P.Done(worker="w", task="t", stream="s", epoch=0, index=0, samples=8, **fields)


def test_status_shows_a_streams_transport_and_why_frames():
    for trainer, daemon, host, reason, text in [
        ("frames", "auto", True, "trainer", "frames (forced by the trainer)"),
        ("auto", "frames", True, "daemon", "frames (forced by the daemon)"),
        ("auto", "auto", False, "no_shm", "frames (the trainer has no shared memory)"),
    ]:
        transport = StreamTransport.of(attach(transport=trainer, **({} if host else {"shm_host": None})), daemon)
        assert (transport.mode, transport.frames_reason) == ("frames", reason) and format_transport(transport.status()) == text

    transport = StreamTransport.of(attach(transport="auto"), "shm")
    for report in [done(via="shm")] * 5 + [done(via="frames", fallback="busy")] * 2 + [done(via="frames", fallback="no_space"), done(via="frames", fallback="other_host"), done()]:
        transport.count(report)  # the last one: a worker that does not say (before the field existed)
    assert transport.status() == {
        "mode": "shm", "frames_reason": None, "batches": {"frames": 4, "shm": 5},
        "fallbacks": {"other_host": 1, "no_space": 1, "busy": 2, "unavailable": 0},
    }  # fmt: skip
    assert format_transport(transport.status()) == (
        "shm: 5 batches through shared memory, 4 as frames (remote host (or another /dev/shm or user) 1, /dev/shm too small 1, the trainer holds every slot 2)"
    )


def test_a_workers_transport_report_is_typed_and_old_reports_still_decode():
    old = P.encode(done())
    assert b"via" not in old[0] and P.decode(old).body.via is None  # a default is left out of the header
    assert P.decode(P.encode(done(via="frames", fallback="no_space"))).body.fallback == "no_space"
    for bad in ({"via": "carrier pigeon"}, {"via": "frames", "fallback": "x" * 5000}):
        header = msgpack.unpackb(old[0])
        with pytest.raises(P.ProtocolError, match="bad 'done' message"):
            P.decode([msgpack.packb({**header, **bad})])


# --- the worker's sender --------------------------------------------------------------------------------


def task(shm_dir: str, host: P.ShmHost | None, stream: str = "s1", slots: int = 3) -> P.Task:
    handoff = None if host is None else P.Handoff(mode="auto", host=host, slots=slots)
    return P.Task(
        task=f"{stream}:0:0", stream=stream, epoch=0, index=0, ids=[5, 9], seed=0, dataset=P.DatasetRef(ref="digits"),
        pipeline=P.PipelineRef(stream=stream, version=1, spec={}), data="tcp://127.0.0.1:9", handoff=handoff,
    )  # fmt: skip


INFO = dict(stream="s1", task="s1:0:0", epoch=0, index=0, pipeline_version=1, worker="w")


def test_the_sender_uses_a_slot_on_the_same_host_and_frames_elsewhere(shm_dir):
    sender = Sender(shm_dir)
    here = sender.identity
    tensors = [("images", torch.from_numpy(IMAGES)), ("sample_ids", IDS)]
    out = sender.pack(task(shm_dir, here), INFO, tensors)
    assert out.via == "shm" and len(out.frames) == 1
    message = P.decode(out.frames, P.WORKER_TO_CLIENT)
    assert message.type == "shm_batch" and [t.offset for t in message.body.tensors] == [0, 128]
    got = SlotReader(shm_dir).wrap(message.body)
    assert torch.equal(got["images"], torch.from_numpy(IMAGES)) and got["sample_ids"].tolist() == [5, 9]

    away = sender.pack(task(shm_dir, here.model_copy(update={"boot": "f" * 32})), INFO, tensors)
    message = P.decode(away.frames, P.WORKER_TO_CLIENT)
    assert away.via == "frames" and message.type == "batch"
    assert message.body.fallback == P.Fallback(kind="other_host", message="the trainer is on another host")
    assert torch.equal(P.frames_to_tensors(message.body.tensors, message.buffers)["images"], torch.from_numpy(IMAGES))

    plain = sender.pack(task(shm_dir, None), INFO, tensors)
    assert plain.via == "frames" and P.decode(plain.frames).body.fallback is None
    sender.close()


def test_the_sender_falls_back_when_full_and_cleans_up_after_a_stream(shm_dir):
    sender = Sender(shm_dir, reserve_bytes=shm.free_bytes(shm_dir))
    out = sender.pack(task(shm_dir, sender.identity), INFO, [("images", IMAGES)])
    assert P.decode(out.frames).body.fallback.kind == "no_space" and names(shm_dir) == []

    sender = Sender(shm_dir)
    lent = [sender.pack(task(shm_dir, sender.identity, slots=2), INFO, [("images", IMAGES)]) for _ in range(2)]
    assert [o.via for o in lent] == ["shm", "shm"] and len(names(shm_dir)) == 2
    busy = sender.pack(task(shm_dir, sender.identity, slots=2), INFO, [("images", IMAGES)])
    assert P.decode(busy.frames).body.fallback.kind == "busy"
    sender.cancel(lent[0])  # never sent: the slot is free again
    assert sender.pack(task(shm_dir, sender.identity, slots=2), INFO, [("images", IMAGES)]).via == "shm"
    sender.pack(task(shm_dir, sender.identity, stream="s2"), {**INFO, "stream": "s2"}, [("images", IMAGES)])
    assert len(names(shm_dir)) == 3
    sender.drop("tcp://127.0.0.1:9")  # the daemon says the trainer there is gone: every pool of it closes
    assert names(shm_dir) == [] and len(sender.pools) == 0
    with pytest.raises(ValueError, match="reserve must be >= 0"):
        Sender(shm_dir, reserve_bytes=-1)


# --- a batch written in place: the worker takes the slot first, the pipeline writes into it ---------------


LABELS = np.array([1, 0], dtype=np.int64)


def test_a_reserved_slot_is_written_once_and_sent_as_it_lies(shm_dir):
    sender = Sender(shm_dir)
    reservation = sender.reserve(task(shm_dir, sender.identity), (8, 8))
    images = reservation.images((2, 4, 4, 3))  # what a pipeline's out= gets, before any pixel is made
    pool, slot = reservation.slot
    assert images.ctypes.data == slot.memory.data.ctypes.data and images.flags.writeable
    assert slot.filling and slot.memory.capacity >= 2 * 4 * 4 * 3 + 2 * 64
    images[...] = IMAGES  # the producing step
    tensor = torch.from_numpy(images)

    slot.memory.data.flags.writeable = False  # any copy into the slot would raise now
    slot.memory.write(0, np.frombuffer(P.tensor_buffer(tensor), dtype=np.uint8))  # already there: nothing is copied
    with pytest.raises(ValueError, match="read-only"):
        slot.memory.write(128, np.frombuffer(LABELS, dtype=np.uint8))
    slot.memory.data.flags.writeable = True

    out = sender.pack(task(shm_dir, sender.identity), INFO, [("images", tensor), ("labels", LABELS), ("sample_ids", IDS)], reservation)
    assert out.via == "shm" and out.slot == (pool, slot) and out.fallback is None and reservation.slot is None
    message = P.decode(out.frames, P.WORKER_TO_CLIENT)
    assert [(t.name, t.offset, t.shape) for t in message.body.tensors] == [("images", 0, [2, 4, 4, 3]), ("labels", 128, [2]), ("sample_ids", 192, [2])]
    got = SlotReader(shm_dir).wrap(message.body)
    assert torch.equal(got["images"], torch.from_numpy(IMAGES)) and got["labels"].tolist() == [1, 0] and got["sample_ids"].tolist() == [5, 9]
    reservation.cancel()  # after pack: nothing left to give back
    assert slot.memory.state() == LENT
    sender.close()


def test_a_reservation_asked_again_for_fewer_images_keeps_its_slot(shm_dir):
    """Samples skipped as corrupt: the batch is planned again with fewer images, in the same memory."""
    sender = Sender(shm_dir)
    reservation = sender.reserve(task(shm_dir, sender.identity), (8, 8))
    first = reservation.images((3, 4, 4, 3))
    slot = reservation.slot[1]
    kept = reservation.images((2, 4, 4, 3))
    assert reservation.slot[1] is slot and kept.ctypes.data == first.ctypes.data and kept.shape == (2, 4, 4, 3)
    kept[...] = IMAGES
    out = sender.pack(task(shm_dir, sender.identity), INFO, [("images", torch.from_numpy(kept)), ("labels", LABELS[:2]), ("sample_ids", IDS)], reservation)
    body = P.decode(out.frames).body
    assert body.tensors[0].shape == [2, 4, 4, 3] and torch.equal(SlotReader(shm_dir).wrap(body)["images"], torch.from_numpy(IMAGES))
    sender.close()


def test_a_reservation_that_finds_no_slot_hands_out_private_memory_and_frames_say_why(shm_dir):
    sender = Sender(shm_dir)
    away = task(shm_dir, sender.identity.model_copy(update={"boot": "f" * 32}))
    reservation = sender.reserve(away, (8, 8))
    images = reservation.images((2, 4, 4, 3))
    assert reservation.slot is None and reservation.fallback == P.Fallback(kind="other_host", message="the trainer is on another host")
    assert images.shape == (2, 4, 4, 3) and images.dtype == np.uint8 and images.flags.c_contiguous and images.flags.writeable
    images[...] = IMAGES
    out = sender.pack(away, INFO, [("images", images), ("sample_ids", IDS)], reservation)
    message = P.decode(out.frames, P.WORKER_TO_CLIENT)
    assert out.via == "frames" and out.fallback == "other_host" and message.body.fallback.kind == "other_host"
    assert torch.equal(P.frames_to_tensors(message.body.tensors, message.buffers)["images"], torch.from_numpy(IMAGES))
    assert names(shm_dir) == []

    full = Sender(shm_dir, reserve_bytes=shm.free_bytes(shm_dir))
    reservation = full.reserve(task(shm_dir, full.identity), (8, 8))
    reservation.images((2, 4, 4, 3))
    assert reservation.slot is None and reservation.fallback.kind == "no_space" and names(shm_dir) == []


def test_a_cancelled_reservation_frees_its_slot_for_the_next_batch(shm_dir):
    """A task that fails after its slot was taken (a corrupt image under on_error="raise", an error)."""
    sender = Sender(shm_dir)
    reservation = sender.reserve(task(shm_dir, sender.identity, slots=1), (8, 8))
    reservation.images((2, 4, 4, 3))
    slot = reservation.slot[1]
    busy = sender.reserve(task(shm_dir, sender.identity, slots=1), (8, 8))
    busy.images((2, 4, 4, 3))
    assert busy.fallback.kind == "busy"  # the pool's one slot is being filled
    reservation.cancel()
    assert reservation.slot is None and not slot.filling
    again = sender.reserve(task(shm_dir, sender.identity, slots=1), (8, 8))
    again.images((2, 4, 4, 3))
    assert again.slot[1] is slot
    sender.close()


# --- page-locked memory for a worker on a GPU (augserve.handoff.pinned); CUDA's side is in tests/gpu -----


def test_a_gpu_workers_slots_are_registered_with_cuda_until_closed_and_a_cpu_workers_never(shm_dir, monkeypatch):
    from augserve.handoff import pinned

    calls = []

    def register(array, device):
        calls.append(("register", array.ctypes.data, array.nbytes, device))
        return True

    def unregister(array, device):
        assert array is not None and array.ctypes.data  # while the memory is still mapped
        calls.append(("unregister", array.ctypes.data, device))

    monkeypatch.setattr(pinned, "register", register)
    monkeypatch.setattr(pinned, "unregister", unregister)
    gpu = Sender(shm_dir, device="cuda:1", gpu="GPU-fake")
    out = gpu.pack(task(shm_dir, gpu.identity), INFO, [("images", IMAGES), ("sample_ids", IDS)])
    segment = out.slot[1].memory
    assert out.via == "shm" and isinstance(segment, pinned.PinnedSegment) and segment.pinned
    assert calls == [("register", segment.data.ctypes.data, segment.capacity, "cuda:1")]  # the data region, once, on the worker's GPU
    address = segment.data.ctypes.data
    gpu.close()
    assert calls[1:] == [("unregister", address, "cuda:1")] and not segment.pinned and names(shm_dir) == []

    calls.clear()
    cpu = Sender(shm_dir)
    out = cpu.pack(task(shm_dir, cpu.identity), INFO, [("images", IMAGES), ("sample_ids", IDS)])
    assert type(out.slot[1].memory) is shm.Segment and calls == []
    cpu.close()


def test_a_slot_cuda_will_not_register_is_used_as_it_is_and_said_once(shm_dir, caplog, monkeypatch):
    """On this machine's CPU-only torch, CUDA refuses: the slot still carries the batch, pageable."""
    from augserve.handoff import pinned

    monkeypatch.setattr(pinned, "_said", set())
    sender = Sender(shm_dir, device="cuda:0", gpu="GPU-fake")
    with caplog.at_level("WARNING", logger="augserve.worker"):
        sent = [sender.pack(task(shm_dir, sender.identity, slots=2), INFO, [("images", IMAGES), ("sample_ids", IDS)]) for _ in range(2)]
    assert [o.via for o in sent] == ["shm", "shm"] and not any(o.slot[1].memory.pinned for o in sent)
    said = [r.getMessage() for r in caplog.records if "pageable" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("shared-memory slots stay pageable"), said
    got = SlotReader(shm_dir).wrap(P.decode(sent[0].frames).body)
    assert torch.equal(got["images"], torch.from_numpy(IMAGES))
    sender.close()
    assert names(shm_dir) == []


def test_frames_of_a_cpu_worker_stay_in_ordinary_memory():
    from augserve.handoff import pinned

    images = torch.from_numpy(IMAGES)
    assert pinned.to_host(images) is images  # a host tensor is not copied
    array = pinned.host_array((2, 4, 4, 3), "cpu")
    assert isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.flags.c_contiguous and array.shape == (2, 4, 4, 3)
    assert not pinned.on_gpu("cpu") and pinned.on_gpu("cuda:1")
