"""The device-memory hand-off without a GPU: the route a worker picks, the slot lifecycle of device slots,
descriptors checked before any memory is touched, the trainer's release when the last view goes, and the
wire format (new fields optional, old messages still decoding).

The slots here are CPU tensors and their control segments real files in a fresh directory under
/dev/shm. What would be CUDA IPC — mapping a slot by its handle, waiting on its event — is done by
:class:`HostOpener`, which maps a handle to the slot tensor of this very process: the lifecycle, the
checks and the release around those calls are the code under test; the calls themselves are tested on
a GPU (tests/gpu/test_cuda_ipc_gpu.py).
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import sys

import msgpack
import numpy as np
import pytest
import torch

from augserve import connect
from augserve import protocol as P
from augserve.handoff import shm
from augserve.handoff.cuda import trainer_gpu
from augserve.handoff.device import DeviceSlot, create_device_slot
from augserve.handoff.device_receiver import DeviceSlotReader, check
from augserve.handoff.policy import StreamTransport, handoff_for, route
from augserve.handoff.receiver import SlotReader
from augserve.handoff.sender import Sender
from augserve.handoff.slots import FREE, LENT, REFUSED, NoSlot, SlotPool

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm") or not sys.platform.startswith("linux"), reason="needs Linux and /dev/shm")

GPU = "5e8f0b1c-2d3a-4b5c-8d9e-0f1a2b3c4d5e"
OTHER_GPU = "aaaaaaaa-2d3a-4b5c-8d9e-0f1a2b3c4d5e"
IMAGES = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
LABELS = np.array([1, 0], dtype=np.int64)
IDS = np.array([5, 9], dtype=np.int64)
INFO = dict(stream="s1", task="s1:0:0", epoch=0, index=0, pipeline_version=1, worker="w")


def names(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(shm.PREFIX))


# --- the stand-ins for CUDA: a device slot in host memory, and an opener that finds it by its handle ------

SHARED: dict[bytes, torch.Tensor] = {}  # handle -> slot tensor, as CUDA maps a handle to an allocation


def host_device_slot(directory: str, device: str, reserve: int, capacity: int) -> DeviceSlot:
    """``create_device_slot`` on the CPU, with a share descriptor as torch's ``_share_cuda_`` would give."""
    slot = create_device_slot(directory, "cpu", reserve, capacity)
    handle = b"\x02c" + secrets.token_bytes(64)
    SHARED[handle] = slot.data
    slot.shared = P.CudaMemory(handle=handle, size=capacity, offset=0, ref_counter=f"/torch_{os.getpid()}_17_{len(SHARED)}", ref_counter_offset=len(SHARED) % 100)
    return slot


class HostOpener:
    """CudaOpener's calls, in host memory: ``open`` finds the slot tensor of a handle (and refuses one it
    does not know, as CUDA refuses a bad handle), the event is a token, a waited event is counted."""

    cuda = False
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.waited = 0

    def open(self, memory: P.CudaMemory):
        if memory.handle not in SHARED:
            raise RuntimeError("CUDA error: invalid resource handle\nCUDA kernel errors might be asynchronously reported ...")
        tensor = SHARED[memory.handle]
        return tensor, tensor.data_ptr()

    def open_event(self, handle: bytes):
        return handle

    def wait(self, event) -> None:
        self.waited += 1

    def fence(self):
        return None  # host memory: every read is over when the last view goes

    def as_tensor(self, lease) -> torch.Tensor:
        return torch.from_numpy(np.asarray(lease))


def task(host: P.ShmHost | None, gpu: str | None = GPU, stream: str = "s1", slots: int = 3) -> P.Task:
    handoff = None if host is None else P.Handoff(mode="shm", host=host, slots=slots, cuda=None if gpu is None else P.CudaDevice(uuid=gpu))
    return P.Task(
        task=f"{stream}:0:0", stream=stream, epoch=0, index=0, ids=[5, 9], seed=0, dataset=P.DatasetRef(ref="digits"),
        pipeline=P.PipelineRef(stream=stream, version=1, spec={}), data="tcp://127.0.0.1:9", handoff=handoff,
    )  # fmt: skip


def gpu_sender(shm_dir: str, gpu: str = GPU) -> Sender:
    """A worker's sender on ``cuda:0`` = GPU ``gpu`` whose device slots are host stand-ins."""
    return Sender(shm_dir, device="cuda:0", gpu=gpu, device_slots=host_device_slot)


def received(frames: list) -> P.Message:
    return P.decode([bytes(f) for f in frames], P.WORKER_TO_CLIENT)


# --- the route a worker picks for one batch (a pure function) --------------------------------------------

HERE = P.ShmHost(boot="09dde2b3-449f-4477-99bd-e65768717057", dev=27, ino=1, uid=1000)
ELSEWHERE = HERE.model_copy(update={"boot": "f" * 32})


def handoff(host: P.ShmHost = HERE, gpu: str | None = GPU) -> P.Handoff:
    return P.Handoff(mode="shm", host=host, slots=4, cuda=None if gpu is None else P.CudaDevice(uuid=gpu))


@pytest.mark.parametrize(
    "task_handoff, worker_host, worker_device, worker_gpu, expected",
    [
        (handoff(), HERE, "cuda:0", GPU, ("cuda-ipc", None, "")),  # same host, same GPU
        (handoff(), HERE, "cuda:1", OTHER_GPU, ("shm", "other_gpu", f"the worker's cuda:1 is GPU {OTHER_GPU}, another GPU than the trainer's ({GPU})")),
        (handoff(), HERE, "cpu", None, ("shm", "other_gpu", "the worker augments on cpu, not on the trainer's GPU")),
        (handoff(), HERE, "cuda:0", None, ("shm", "unavailable", "cannot tell which GPU the worker's cuda:0 is")),
        (handoff(ELSEWHERE), HERE, "cuda:0", GPU, ("frames", "other_host", "the trainer is on another host")),  # same UUID, other host: no
        (handoff(gpu=None), HERE, "cuda:0", GPU, ("shm", None, "")),  # a trainer on the CPU, or one that did not ask for cuda-ipc
        (handoff(gpu=None), HERE, "cpu", None, ("shm", None, "")),
        (handoff(ELSEWHERE, gpu=None), HERE, "cpu", None, ("frames", "other_host", "the trainer is on another host")),
        (handoff(), None, "cuda:0", GPU, ("frames", "unavailable", "no shared memory on the worker's side: no /dev/shm")),
        (None, HERE, "cuda:0", GPU, ("frames", None, "")),  # the stream asked for frames
    ],
    ids=["same-gpu", "other-gpu", "cpu-worker", "unknown-gpu", "other-host", "cpu-trainer", "cpu-both", "cpu-trainer-other-host", "no-shm", "frames"],
)
def test_the_route_of_a_batch(task_handoff, worker_host, worker_device, worker_gpu, expected):
    assert route(task_handoff, worker_host, "no /dev/shm", worker_device, worker_gpu) == expected


def attach(**fields) -> P.Attach:
    base = dict(dataset="digits", pipeline="lenet5", batch_size=8, prefetch=4, data="tcp://127.0.0.1:9", shm_host=HERE)
    return P.Attach(**{**base, **fields})


def test_a_cuda_ipc_stream_carries_the_trainers_gpu_and_counts_device_batches():
    task_handoff, phrase = handoff_for(attach(transport="cuda-ipc", cuda=P.CudaDevice(uuid=GPU)), "auto")
    assert task_handoff == P.Handoff(mode="shm", host=HERE, slots=6, cuda=P.CudaDevice(uuid=GPU))
    assert phrase == f"cuda-ipc: device memory from workers on the trainer's GPU {GPU}, shared memory from the other workers on its host, frames from the others"
    # The GPU rides along only with the transport that asks for it, and never past a daemon that wants frames.
    assert handoff_for(attach(transport="auto", cuda=P.CudaDevice(uuid=GPU)), "auto")[0].cuda is None
    assert handoff_for(attach(transport="cuda-ipc", cuda=P.CudaDevice(uuid=GPU)), "frames") == (None, "frames (the daemon asked for them)")

    transport = StreamTransport.of(attach(transport="cuda-ipc", cuda=P.CudaDevice(uuid=GPU)), "auto")
    done = dict(worker="w", task="t", stream="s", epoch=0, index=0, samples=8)
    for report in [P.Done(**done, via="cuda-ipc")] * 3 + [P.Done(**done, via="shm", fallback="other_gpu")] * 2 + [P.Done(**done, via="frames", fallback="other_host")]:
        transport.count(report)
    assert transport.status() == {
        "mode": "cuda-ipc", "frames_reason": None, "batches": {"frames": 1, "shm": 2, "cuda-ipc": 3},
        "fallbacks": {"other_host": 1, "no_space": 0, "busy": 0, "unavailable": 0, "other_gpu": 2},
    }  # fmt: skip
    plain = StreamTransport.of(attach(transport="auto"), "auto")
    plain.count(P.Done(**done, via="cuda-ipc"))  # not a way this stream allows: a worker that says so is not counted
    assert plain.status()["batches"] == {"frames": 0, "shm": 0} and "other_gpu" not in plain.status()["fallbacks"]


def test_cuda_ipc_is_refused_in_one_line_where_it_cannot_work():
    assert trainer_gpu("auto", torch.device("cuda:0")) is None and trainer_gpu("shm", torch.device("cpu")) is None
    with pytest.raises(ValueError) as info:
        trainer_gpu("cuda-ipc", torch.device("cpu"))
    assert str(info.value) == "transport='cuda-ipc' hands batches over in GPU memory, so the stream needs a CUDA device (device='cuda:N'), not 'cpu'"
    with pytest.raises(ValueError, match="^transport='cuda-ipc' hands batches over in GPU memory") as info:
        connect("tcp://127.0.0.1:9", dataset="digits", pipeline="lenet5", batch_size=8, transport="cuda-ipc")  # fails before any socket
    assert "\n" not in str(info.value)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^transport='cuda-ipc' cannot be used: torch has no CUDA here, or no GPU is visible$"):
            trainer_gpu("cuda-ipc", torch.device("cuda:0"))
    with pytest.raises(ValueError, match="transport must be 'auto', 'frames', 'shm' or 'cuda-ipc', got 'nvlink'"):
        connect("tcp://127.0.0.1:9", dataset="digits", pipeline="lenet5", batch_size=8, transport="nvlink")


# --- device slots: the lifecycle of host slots, the bytes elsewhere ----------------------------------------


def test_a_device_slot_lives_like_a_host_slot(shm_dir):
    pool = SlotPool(lambda capacity: create_device_slot(shm_dir, "cpu", 0, capacity), max_slots=2)
    first = pool.acquire(96)
    memory = first.memory
    assert isinstance(memory, DeviceSlot) and memory.capacity == 96 and memory.data.dtype == torch.uint8
    assert names(shm_dir) == [memory.name] and memory.shared is None  # its state word lives in a control segment
    assert os.path.getsize(os.path.join(shm_dir, memory.name)) == shm.HEADER_BYTES + shm.ALIGN
    view = memory.view(0, 96).view(2, 4, 4, 3)
    view.copy_(torch.from_numpy(IMAGES))  # what the pipeline's out= does
    memory.write(0, view)  # already there: nothing to copy
    memory.write(0, torch.from_numpy(IMAGES).flip(0))  # not contiguous, elsewhere: one copy
    assert torch.equal(memory.data.view(2, 4, 4, 3), torch.from_numpy(IMAGES).flip(0))
    with pytest.raises(ValueError, match=f"97 bytes at offset 0 overflow the 96-byte device slot {memory.name}"):
        memory.write(0, torch.zeros(97, dtype=torch.uint8))

    assert pool.lend(first) == 1 and memory.state() == LENT
    trainer = shm.open_segment(shm_dir, memory.name)  # the trainer's view of the state word
    second = pool.acquire(96)
    assert second is not first
    pool.lend(second)
    with pytest.raises(NoSlot, match="all 2 slots") as info:
        pool.acquire(96)
    assert info.value.kind == "busy"
    trainer.release(1)
    assert memory.state() == FREE and pool.acquire(50) is first and pool.lend(first) == 2
    trainer.release(1)  # a stale release (fill 1) leaves fill 2 lent
    assert memory.state() == LENT

    second_name = second.memory.name
    shm.open_segment(shm_dir, second_name).release(1)
    bigger = pool.acquire(200)  # the free slot is too small and the pool full: retired for a bigger one
    assert bigger.memory.capacity == 200 and pool.take_retired() == [second_name] and second.memory.data is None
    trainer.refuse()  # the trainer cannot open slot 1: the pool stops lending
    with pytest.raises(NoSlot, match=f"the trainer could not use slot {memory.name}") as info:
        pool.acquire(10)
    assert info.value.kind == "unavailable"
    pool.close()
    assert names(shm_dir) == []


def test_a_batch_goes_into_a_device_slot_and_back_when_its_last_view_goes(shm_dir):
    sender = gpu_sender(shm_dir)
    reservation = sender.reserve(task(sender.identity), (8, 8))
    images = reservation.images((2, 4, 4, 3))  # the pipeline's out=: a tensor in the device slot
    assert reservation.route == "cuda-ipc" and isinstance(images, torch.Tensor) and images.shape == (2, 4, 4, 3)
    pool, slot = reservation.slot
    assert images.data_ptr() == slot.memory.data.data_ptr() and slot.memory.capacity == IMAGES.nbytes  # the images alone
    images.copy_(torch.from_numpy(IMAGES))
    host_copy = images.clone()  # what augserve.batch hands back today: the same bytes, on the host
    out = sender.pack(task(sender.identity), INFO, [("images", host_copy), ("labels", LABELS), ("sample_ids", IDS)], reservation)
    assert out.via == "cuda-ipc" and out.slot == (pool, slot) and out.fallback is None and len(out.frames) == 3
    message = received(out.frames)
    body = message.body
    assert message.type == "cuda_batch" and body.gpu.uuid == GPU and body.generation == 1 and body.memory == slot.memory.shared
    assert body.images == P.SlotTensor(name="images", dtype="uint8", shape=[2, 4, 4, 3], offset=0)
    assert [t.name for t in body.tensors] == ["labels", "sample_ids"]

    opener = HostOpener()
    reader = DeviceSlotReader(shm_dir, GPU, opener)
    got = reader.wrap(body, message.buffers)
    assert torch.equal(got["images"], torch.from_numpy(IMAGES)) and got["images"].data_ptr() == slot.memory.data.data_ptr()  # a view, no copy
    assert got["labels"].tolist() == [1, 0] and got["sample_ids"].tolist() == [5, 9] and opener.waited == 1
    assert names(shm_dir) == []  # the trainer unlinked the control segment's name once mapped
    corner = got["images"][1, 2:]  # a view of a view holds the slot too
    del got
    gc.collect()
    assert slot.memory.state() == LENT
    del corner
    assert slot.memory.state() == FREE  # the last view is gone: the worker may refill it

    again = sender.reserve(task(sender.identity), (8, 8))
    refill = again.images((2, 4, 4, 3))
    assert again.slot[1] is slot
    refill.copy_(torch.from_numpy(255 - IMAGES))
    body2 = received(sender.pack(task(sender.identity), INFO, [("images", refill), ("labels", LABELS), ("sample_ids", IDS)], again).frames)
    assert body2.body.generation == 2
    kept = reader.wrap(body2.body, body2.buffers)
    assert torch.equal(kept["images"], torch.from_numpy(255 - IMAGES)) and reader.opened == 1  # each slot is opened once
    copy = kept["images"].clone()
    del kept
    assert slot.memory.state() == FREE and torch.equal(copy, torch.from_numpy(255 - IMAGES))
    reader.close()
    sender.close()


def test_the_workers_pipeline_writes_into_the_device_slot(shm_dir):
    """What the worker does (augserve.worker): reserve, augment into the reservation through ``out=``,
    pack — with a device slot, the images are written once, into the slot, and sent as they lie."""
    import pipelines
    from augserve.batch import augment_batch
    from augserve.sources import SkipStats, open_dataset
    from augserve.worker import TRAILING_BYTES, _as_tensor

    spec = {"ops": [{"op": "random_crop", "size": 24, "padding": 2}, {"op": "mirror"}, {"op": "rotate", "degrees": 10}]}
    source, ids = open_dataset("shapes", n=40, size=32), [3, 1, 4, 15, 9, 2]
    expected, *_ = augment_batch(source, pipelines.build(spec, backend="torch"), ids, 7, 0, "skip", SkipStats())  # the frame path
    sender = gpu_sender(shm_dir)
    the_task = task(sender.identity).model_copy(update={"ids": ids})
    reservation = sender.reserve(the_task, TRAILING_BYTES)
    out, kept, labels, _ = augment_batch(source, pipelines.build(spec, backend="torch"), ids, 7, 0, "skip", SkipStats(), out=_as_tensor(reservation.images))
    pool, slot = reservation.slot
    assert reservation.route == "cuda-ipc" and out.data_ptr() == slot.memory.data.data_ptr(), "the pipeline wrote the images at the start of the slot"
    tensors = [("images", out), ("labels", np.asarray(labels, dtype=np.int64)), ("sample_ids", np.asarray(kept, dtype=np.int64))]
    message = received(sender.pack(the_task, INFO, tensors, reservation).frames)
    got = DeviceSlotReader(shm_dir, GPU, HostOpener()).wrap(message.body, message.buffers)
    assert torch.equal(got["images"], expected) and got["sample_ids"].tolist() == kept == ids and got["labels"].tolist() == labels
    sender.close()


def test_a_kept_batch_keeps_its_slot_and_the_pool_then_uses_host_shared_memory(shm_dir, caplog):
    sender = gpu_sender(shm_dir)
    reader = DeviceSlotReader(shm_dir, GPU, HostOpener())
    kept = []
    for value in (10, 20):
        reservation = sender.reserve(task(sender.identity, slots=2), (8, 8))
        reservation.images((2, 4, 4, 3)).fill_(value)
        message = received(sender.pack(task(sender.identity, slots=2), INFO, [("images", IMAGES), ("labels", LABELS), ("sample_ids", IDS)], reservation).frames)
        kept.append(reader.wrap(message.body, message.buffers)["images"])
    with caplog.at_level(logging.INFO, logger="augserve.worker"):
        reservation = sender.reserve(task(sender.identity, slots=2), (8, 8))
        images = reservation.images((2, 4, 4, 3))  # both device slots are held: a host slot instead
    assert reservation.route == "shm" and isinstance(images, np.ndarray) and reservation.fallback.kind == "busy"
    images[...] = IMAGES
    out = sender.pack(task(sender.identity, slots=2), INFO, [("images", torch.from_numpy(images)), ("labels", LABELS), ("sample_ids", IDS)], reservation)
    message = received(out.frames)
    assert out.via == "shm" and out.fallback == "busy" and message.type == "shm_batch" and message.body.fallback.kind == "busy"
    assert torch.equal(SlotReader(shm_dir).wrap(message.body)["images"], torch.from_numpy(IMAGES))
    assert [int(k[0, 0, 0, 0]) for k in kept] == [10, 20]  # the kept batches are intact
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stream ")]  # not the pinning's: no CUDA here
    assert said == ["stream s1: batches through host shared memory, not CUDA IPC: all 2 slots of this stream's pool are held by the trainer",
                    "stream s1: batches through shared memory in " + shm_dir + " (up to 2 slots)"]  # fmt: skip
    reader.close()
    sender.close()


def test_a_worker_on_another_gpu_or_the_cpu_sends_host_memory_and_says_why(shm_dir):
    for sender, why in [
        (gpu_sender(shm_dir, gpu=OTHER_GPU), f"the worker's cuda:0 is GPU {OTHER_GPU}, another GPU than the trainer's ({GPU})"),
        (Sender(shm_dir), "the worker augments on cpu, not on the trainer's GPU"),
    ]:
        reservation = sender.reserve(task(sender.identity), (8, 8))
        images = reservation.images((2, 4, 4, 3))
        images[...] = IMAGES
        out = sender.pack(task(sender.identity), INFO, [("images", torch.from_numpy(images)), ("labels", LABELS), ("sample_ids", IDS)], reservation)
        body = received(out.frames).body
        assert out.via == "shm" and out.fallback == "other_gpu" and body.fallback == P.Fallback(kind="other_gpu", message=why)
        assert len(sender.device_pools) == 0
        sender.close()
    # No reservation (pack copies): the same route.
    sender = gpu_sender(shm_dir)
    out = sender.pack(task(sender.identity), INFO, [("images", torch.from_numpy(IMAGES)), ("labels", LABELS), ("sample_ids", IDS)])
    message = received(out.frames)
    assert out.via == "cuda-ipc" and message.type == "cuda_batch"
    assert torch.equal(DeviceSlotReader(shm_dir, GPU, HostOpener()).wrap(message.body, message.buffers)["images"], torch.from_numpy(IMAGES))
    away = sender.pack(task(sender.identity.model_copy(update={"boot": "f" * 32})), INFO, [("images", IMAGES), ("labels", LABELS)])
    assert away.via == "frames" and received(away.frames).body.fallback == P.Fallback(kind="other_host", message="the trainer is on another host")
    sender.drop("tcp://127.0.0.1:9")
    assert len(sender.device_pools) == 0 and names(shm_dir) == []


def test_a_slot_the_trainer_cannot_open_is_refused_and_the_worker_moves_to_host_memory(shm_dir):
    sender = gpu_sender(shm_dir)
    reservation = sender.reserve(task(sender.identity), (8, 8))
    reservation.images((2, 4, 4, 3)).copy_(torch.from_numpy(IMAGES))
    message = received(sender.pack(task(sender.identity), INFO, [("images", IMAGES), ("labels", LABELS), ("sample_ids", IDS)], reservation).frames)
    SHARED.pop(message.body.memory.handle)  # as if CUDA refused the handle
    reader = DeviceSlotReader(shm_dir, GPU, HostOpener())
    with pytest.raises(P.ProtocolError) as info:
        reader.wrap(message.body, message.buffers)
    assert str(info.value) == (
        f"cannot open device slot {message.body.segment} of worker w through CUDA IPC (CUDA error: invalid resource handle); "
        "that worker now sends this stream's batches through host shared memory"
    )
    assert sender.device_pools.get(("tcp://127.0.0.1:9", "s1")).slots[0].memory.state() == REFUSED
    next_one = sender.reserve(task(sender.identity), (8, 8))
    assert isinstance(next_one.images((2, 4, 4, 3)), np.ndarray) and next_one.route == "shm"
    assert next_one.fallback.kind == "unavailable" and "the trainer could not use slot" in next_one.fallback.message
    next_one.cancel()
    sender.close()


# --- descriptors a worker may not send ---------------------------------------------------------------------


def a_device_batch(shm_dir):
    """A real lent device slot and its descriptor, for the hostile variants below."""
    sender = gpu_sender(shm_dir)
    out = sender.pack(task(sender.identity), INFO, [("images", torch.from_numpy(IMAGES)), ("labels", LABELS), ("sample_ids", IDS)])
    message = received(out.frames)
    return sender, out.slot[1], message.body, message.buffers


def changed(body: P.CudaBatch, **fields) -> P.CudaBatch:
    return body.model_copy(update=fields)


HOSTILE = {
    "misaligned": (lambda b: changed(b, images=b.images.model_copy(update={"offset": 8})), "images (uint8 [2, 4, 4, 3], 96 bytes at offset 8) do not lie 64-byte aligned inside the 96-byte device slot"),
    "past_the_end": (lambda b: changed(b, images=b.images.model_copy(update={"shape": [3, 4, 4, 3]})), "images (uint8 [3, 4, 4, 3], 144 bytes at offset 0) do not lie 64-byte aligned inside the 96-byte device slot"),
    "huge_shape": (lambda b: changed(b, images=b.images.model_copy(update={"shape": [1 << 39, 1 << 39]})), "do not lie 64-byte aligned inside the 96-byte device slot"),
    "other_gpu": (lambda b: changed(b, gpu=P.CudaDevice(uuid=OTHER_GPU)), f"worker w sent a batch in the memory of GPU {OTHER_GPU}, but this trainer is on GPU {GPU}"),
    "foreign_counter": (lambda b: changed(b, memory=b.memory.model_copy(update={"ref_counter": "/torch_1_2_3"})), "names the reference counter /torch_1_2_3 of another process"),
    "not_images": (lambda b: changed(b, images=b.images.model_copy(update={"name": "labels"})), "a device slot holds the images, not 'labels'"),
    "bfloat16": (lambda b: changed(b, images=b.images.model_copy(update={"dtype": "bfloat16", "shape": [48]})), "bfloat16 images cannot be viewed in a device slot"),
    "stale_fill": (lambda b: changed(b, generation=b.generation + 1), "holds fill 1 (lent), the descriptor names fill 2"),
    "moved_memory": (lambda b: changed(b, memory=b.memory.model_copy(update={"offset": 64})), "names other memory than when it was opened"),
    "gone_segment": (lambda b: changed(b, segment=b.segment[:-4] + "ffff"), "is gone from"),
    "images_as_frame": (lambda b: changed(b, tensors=[P.TensorDescriptor(name="images", dtype="int64", shape=[2]), *b.tensors[1:]]), "the images of a device-slot batch cannot also come as a frame"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_descriptor_that_does_not_fit_its_slot_is_refused_in_one_line(shm_dir, name):
    sender, slot, body, buffers = a_device_batch(shm_dir)
    reader = DeviceSlotReader(shm_dir, GPU, HostOpener())
    if name in ("moved_memory", "stale_fill"):  # refused against what an earlier batch of the slot opened
        reader.wrap(body, buffers)
        gc.collect()
        slot.memory.control.publish(1)  # lent again, fill 1, for the hostile second descriptor
    mutate, message = HOSTILE[name]
    with pytest.raises(P.ProtocolError) as info:
        reader.wrap(mutate(body), buffers)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert slot.memory.state() == LENT  # nothing was released, nothing refused: the bad descriptor changed nothing
    sender.close()


def test_a_descriptor_is_checked_before_any_memory_is_touched(shm_dir):
    _, _, body, _ = a_device_batch(shm_dir)
    assert check(body, GPU) == "|u1"
    with pytest.raises(P.ProtocolError, match="but this trainer is on GPU"):
        check(body, OTHER_GPU)  # a pure function of the descriptor: no segment, no handle was opened
    assert names(shm_dir) == [body.segment]


# --- the wire: bytes as hex, bounds, and messages of peers that predate device slots ------------------------


def test_handles_travel_as_bounded_hex_and_nothing_else_decodes():
    header = {"proto": "augserve", "v": P.PROTOCOL_VERSION}
    memory = dict(handle=(b"\x02c" + bytes(64)).hex(), size=96, offset=0, ref_counter="/torch_1_2_3", ref_counter_offset=0)
    batch = dict(stream="s", task="t", epoch=0, index=0, pipeline_version=1, worker="w", segment="augserve-slot-1-1-0123456789abcdef", generation=1,
                 gpu={"uuid": GPU}, memory=memory, event="00" * 64, images={"name": "images", "dtype": "uint8", "shape": [2], "offset": 0}, tensors=[])  # fmt: skip

    def sent(**fields):
        return P.decode([msgpack.packb({**header, "type": "cuda_batch", **batch, **fields})], P.WORKER_TO_CLIENT)

    assert sent().body.memory.handle == b"\x02c" + bytes(64) and sent().body.event == bytes(64)
    for fields, problem in [
        ({"event": "00" * 63}, "event = "),
        ({"event": "0g" * 64}, "not an even number of lower-case hex digits"),
        ({"memory": {**memory, "handle": "ab" * 1025}}, "memory.handle = "),
        ({"memory": {**memory, "ref_counter": "/etc/passwd"}}, "memory.ref_counter = '/etc/passwd'"),
        ({"memory": {**memory, "ref_counter_offset": 10_000}}, "memory.ref_counter_offset = 10000"),
        ({"memory": {**memory, "size": 0}}, "memory.size = 0"),
        ({"gpu": {"uuid": "GPU-" + GPU}}, "gpu.uuid = "),
        ({"memory": {**memory, "handle": 5}}, "memory.handle = 5"),
    ]:
        with pytest.raises(P.ProtocolError, match="^bad 'cuda_batch' message: ") as info:
            sent(**fields)
        assert problem in str(info.value), str(info.value)


def test_messages_of_peers_that_predate_device_slots_still_decode():
    """Fields a version-3 peer sent before ``cuda-ipc`` existed, built by hand: none of the new ones."""
    host = HERE.model_dump()
    envelope = {"proto": "augserve", "v": P.PROTOCOL_VERSION}
    attach = P.decode([msgpack.packb({**envelope, "type": "attach", "dataset": "digits", "pipeline": "lenet5", "batch_size": 8, "data": "tcp://127.0.0.1:9",
                                      "transport": "shm", "shm_host": host})]).body  # fmt: skip
    assert attach.cuda is None and attach.transport == "shm"
    shm_batch = P.decode([msgpack.packb({**envelope, "type": "shm_batch", **INFO, "segment": "augserve-slot-1-1-0123456789abcdef", "generation": 3,
                                         "tensors": [{"name": "images", "dtype": "uint8", "shape": [2], "offset": 0}]})]).body  # fmt: skip
    assert shm_batch.fallback is None
    the_task = task(HERE, gpu=None).model_dump(mode="json", exclude_defaults=True)
    assert "cuda" not in the_task["handoff"]  # what a daemon sends for a stream that did not ask for cuda-ipc: as before
    assert P.decode([msgpack.packb({**envelope, "type": "task", **the_task})]).body.handoff.cuda is None
    done = P.decode([msgpack.packb({**envelope, "type": "done", "worker": "w", "task": "t", "stream": "s", "epoch": 0, "index": 0, "samples": 2, "via": "shm"})]).body
    assert (done.via, done.fallback) == ("shm", None)
