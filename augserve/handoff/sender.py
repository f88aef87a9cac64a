"""A worker's side of the hand-off: each batch goes into a device slot, a shared-memory slot or frames.

For a task whose ``handoff`` allows shared memory, the worker first checks that it shares the
trainer's shared memory (:func:`augserve.handoff.policy.route`), then takes a slot of the stream's
pool and sends a ``shm_batch`` descriptor of the batch's tensors in it. When the trainer asked for
``cuda-ipc`` and this worker augments on the trainer's very GPU, the slot is a device slot
(:mod:`.device`) and the descriptor a ``cuda_batch``: the images never leave the GPU. A worker takes
the slot before it augments (:meth:`Sender.reserve`): the pipeline writes the images straight into the
slot (``out=``), so each byte of a batch is written once, and only the labels and ids are copied in
after (into a host slot) or sent as frames (with a device slot). :meth:`Sender.pack` without a
reservation copies the tensors into a slot instead. Anything that stands in the way (another host,
another GPU, a full ``/dev/shm`` or GPU, every slot held by the trainer) sends the batch the next way
down — device memory, host shared memory, frames — with a ``fallback`` saying why; the worker logs each
reason once per stream and the trainer's client does too. A worker on a GPU sends through page-locked
host memory whenever a batch leaves the device (:mod:`.pinned`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np

from .. import protocol as P
from ..lru import LRUCache
from .host import host_identity
from .pinned import PinnedSegment, host_array, on_gpu
from .policy import route
from .shm import Segment, aligned, reap_orphans
from .slots import NoSlot, Slot, SlotPool

log = logging.getLogger("augserve.worker")

MAX_POOLS = 8  # streams with a pool in one worker; the least recently used one closes beyond that
_LEVEL = {"other_host": logging.INFO, "busy": logging.INFO, "no_space": logging.WARNING, "unavailable": logging.WARNING, "other_gpu": logging.INFO}


@dataclass
class Outgoing:
    """One batch ready to send: its ``frames``, the slot it occupies (``None`` for frames), what that
    slot is made of (``memory``: ``shm`` or ``cuda-ipc``) and, for a batch sent a slower way than its
    task allowed, the kind of :class:`~augserve.protocol.Fallback`."""

    frames: list
    slot: tuple[SlotPool, Slot] | None = None
    fallback: str | None = None
    memory: str = "shm"

    @property
    def via(self) -> str:
        return "frames" if self.slot is None else self.memory


def batch_layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Where tensors of ``sizes`` bytes lie in a slot, one after another, each at a 64-byte aligned
    offset: ``(offsets, the bytes the slot needs)``."""
    offsets, offset = [], 0
    for nbytes in sizes:
        offsets.append(offset)
        offset = aligned(offset + nbytes)
    return offsets, max(offset, 1)


def write_batch(pool: SlotPool, tensors: Sequence[tuple[str, Any]], slot_for: Callable[[int], Slot] | None = None) -> tuple[Slot, int, list[P.SlotTensor]]:
    """Write ``tensors`` (name, C-contiguous host array or tensor) into a slot of ``pool`` — taken by
    ``slot_for(nbytes)``, by default ``pool.acquire`` — at the offsets of :func:`batch_layout`, and lend
    it. A tensor that already lies at its offset (written there in place) is not copied. Returns the
    slot, the generation its descriptor names, and the descriptors of the tensors."""
    buffers = [np.frombuffer(P.tensor_buffer(array), dtype=np.uint8) for _, array in tensors]
    offsets, nbytes = batch_layout([buffer.nbytes for buffer in buffers])
    descriptors = []
    for (name, array), offset in zip(tensors, offsets):
        described = P.describe(name, array)
        descriptors.append(P.SlotTensor(name=name, dtype=described.dtype, shape=described.shape, offset=offset))
    slot = (slot_for or pool.acquire)(nbytes)
    try:
        for start, buffer in zip(offsets, buffers):
            slot.memory.write(start, buffer)
        return slot, pool.lend(slot), descriptors
    except BaseException:
        pool.give_back(slot)
        raise


class Reservation:
    """Room for one task's batch, taken once its pipeline knows the images' size: :meth:`images` is
    what the pipeline writes the images into. At the start of a slot of the stream's pool when the task
    may use shared memory and a slot can be had — a device slot (:attr:`route` ``cuda-ipc``) on the
    trainer's GPU, else a host slot with room after the images for the tensors that follow, ``trailing``
    bytes per image (labels and sample ids) — else private memory (page-locked on a GPU worker:
    :mod:`.pinned`), and the batch goes as frames.
    :attr:`fallback` says why a slower way than the task allows. Handed to :meth:`Sender.pack`, which
    sends the slot without copying the images again; :meth:`cancel` gives back a slot the batch never
    reached."""

    def __init__(self, sender: "Sender", task: P.Task, trailing: Sequence[int]) -> None:
        self._sender = sender
        self.task = task
        self.trailing = tuple(trailing)
        self.slot: tuple[SlotPool, Slot] | None = None
        self.route = "frames"
        self.fallback: P.Fallback | None = None
        self.written = None  # the device view last handed out: what the pipeline wrote the images into
        self.tried = False

    def images(self, shape: Sequence[int]):
        """A writable, C-contiguous uint8 array of ``shape`` (N×H×W×C): a tensor on the device for a
        device slot, a page-locked host tensor for a GPU worker's frames, else a numpy array. Called
        again for the same task with fewer images (samples skipped as corrupt, the batch planned again),
        it is the same memory: the kept images lie one after another from the slot's start."""
        shape = tuple(int(v) for v in shape)
        count = int(np.prod(shape))
        host_bytes = batch_layout([count, *(per_image * shape[0] for per_image in self.trailing)])[1]
        if self.slot is not None and self.slot[1].memory.capacity < (count if self.route == "cuda-ipc" else host_bytes):
            self.cancel()
            self.tried = False
        if not self.tried and self.task.handoff is not None:
            self.tried = True
            self.route, self.slot, self.fallback = self._sender.take(self.task, count, host_bytes)
        if self.slot is None:  # frames: page-locked on a GPU worker, so the images leave the device in one DMA
            return host_array(shape, self._sender.device)
        if self.route == "cuda-ipc":
            self.written = self.slot[1].memory.view(0, count).view(shape)
            return self.written
        return self.slot[1].memory.view(0, count).reshape(shape)

    def take(self) -> tuple[SlotPool, Slot] | None:
        """The slot, now the caller's to lend or give back (None if there is none)."""
        slot, self.slot = self.slot, None
        return slot

    def cancel(self) -> None:
        taken = self.take()
        if taken is not None:
            taken[0].give_back(taken[1])


def into_slot(slot: Slot) -> Callable[[int], Slot]:
    """``slot_for`` of :func:`write_batch` for a slot taken beforehand (ValueError if the batch outgrew it)."""

    def reserved(nbytes: int) -> Slot:
        if slot.memory.capacity < nbytes:
            raise ValueError(f"the batch needs {nbytes} bytes, more than the {slot.memory.capacity} of its reserved slot {slot.memory.name}")
        return slot

    return reserved


class Sender:
    """Packs batches for one worker that augments on ``device``; owns its slot pools (host and device).
    Used by the worker's task thread alone. ``gpu``: the UUID of that device when known (else looked up
    when first needed); ``device_slots(directory, device, reserve, capacity)`` makes a device slot
    (:func:`~augserve.handoff.device.create_device_slot` unless given)."""

    def __init__(self, directory: str, reserve_bytes: int = 0, device: str = "cpu", gpu: str | None = None, device_slots: Callable | None = None) -> None:
        if reserve_bytes < 0:
            raise ValueError(f"the shared-memory reserve must be >= 0, got {reserve_bytes} bytes")
        self.directory = directory
        self.reserve_bytes = reserve_bytes
        self.device = device
        self.identity, self.unavailable = host_identity(directory)
        self.pools: LRUCache = LRUCache(MAX_POOLS, on_evict=lambda _key, pool: pool.close())
        self.device_pools: LRUCache = LRUCache(MAX_POOLS, on_evict=lambda _key, pool: _close_device_pool(pool))
        self._gpu = gpu
        self._gpu_known = gpu is not None
        self._device_slots = device_slots
        self._said: set[tuple[str, str]] = set()

    @property
    def gpu(self) -> str | None:
        """The UUID of this worker's GPU (None on a CPU, or unknown); looked up once, when first needed."""
        if not self._gpu_known:
            self._gpu_known = True
            if on_gpu(self.device):
                from .cuda import gpu_uuid  # torch and CUDA: only for a worker on a GPU

                self._gpu = gpu_uuid(self.device)
        return self._gpu

    def reap(self) -> list[str]:
        """Remove slot names dead workers left in this worker's directory (see :mod:`.shm`)."""
        return reap_orphans(self.directory) if self.identity is not None else []

    def reserve(self, task: P.Task, trailing: Sequence[int] = ()) -> Reservation:
        """Room for ``task``'s batch, taken when :meth:`Reservation.images` is first called (see there)."""
        return Reservation(self, task, trailing)

    def route(self, task: P.Task) -> tuple[str, str | None, str]:
        """:func:`augserve.handoff.policy.route` for ``task`` from this worker."""
        handoff = task.handoff
        wants_gpu = handoff is not None and handoff.cuda is not None
        return route(handoff, self.identity, self.unavailable, self.device, self.gpu if wants_gpu else None)

    def take(self, task: P.Task, device_bytes: int, host_bytes: int) -> tuple[str, tuple[SlotPool, Slot] | None, P.Fallback | None]:
        """A slot for a batch of ``task``: ``(route, (pool, slot) or None, fallback)`` — a device slot
        of ``device_bytes`` where the route allows one and it can be had, else a host slot of
        ``host_bytes``, else none (frames); ``fallback`` says why not the way the task allows."""
        way, kind, why = self.route(task)
        fallback = None
        if way == "cuda-ipc":
            try:
                pool = self.device_pool_for(task)
                return way, (pool, pool.acquire(device_bytes)), None
            except NoSlot as exc:
                fallback, way = self.fell_back(task, exc, "through host shared memory, not CUDA IPC"), "shm"
        elif kind is not None:
            fallback = self.fell_back(task, NoSlot(kind, why), "as frames" if way == "frames" else "through host shared memory, not CUDA IPC")
        if way == "shm":
            try:
                pool = self.pool_for(task)
                return way, (pool, pool.acquire(host_bytes)), fallback
            except NoSlot as exc:
                fallback = self.fell_back(task, exc)
        return "frames", None, fallback

    def pack(self, task: P.Task, info: dict, tensors: Sequence[tuple[str, Any]], reservation: Reservation | None = None) -> Outgoing:
        """The message for one batch: ``info`` (the :class:`~augserve.protocol.BatchInfo` fields) and
        ``tensors`` (name, C-contiguous array or tensor; ``images`` first), in a slot when the task
        allows it — the slot of ``reservation`` when it took one (tensors already in it are not copied
        again)."""
        written = None
        if reservation is not None and reservation.tried:
            way, taken, fallback, written = reservation.route, reservation.take(), reservation.fallback, reservation.written
        elif task.handoff is not None:
            sizes = [int(array.nbytes) for _, array in tensors]
            way, taken, fallback = self.take(task, sizes[0], batch_layout(sizes)[1])
        else:
            way, taken, fallback = "frames", None, None
        if taken is not None and way == "cuda-ipc":
            return self._into_device_slot(info, tensors, taken, written)
        if taken is not None:
            return self._into_slot(info, tensors, taken, fallback)
        header = P.BatchHeader(**info, tensors=[P.describe(name, array) for name, array in tensors], fallback=fallback)
        return Outgoing(P.encode(header, [P.tensor_buffer(array) for _, array in tensors]), fallback=None if fallback is None else fallback.kind)

    def pool_for(self, task: P.Task) -> SlotPool:
        """The host pool of ``task``'s stream; :class:`NoSlot` when this worker does not share the trainer's memory."""
        way, kind, why = self.route(task)
        if way == "frames":
            raise NoSlot(kind or "unavailable", why or "the task does not allow shared memory")
        pool = self.pools.get_or_create((task.data, task.stream), lambda: self._new_pool(task.stream, task.handoff.slots))
        pool.max_slots = task.handoff.slots
        return pool

    def device_pool_for(self, task: P.Task) -> SlotPool:
        """The device pool of ``task``'s stream (call it where :meth:`route` says ``cuda-ipc``)."""
        pool = self.device_pools.get_or_create((task.data, task.stream), lambda: self._new_device_pool(task.stream, task.handoff.slots))
        pool.max_slots = task.handoff.slots
        return pool

    def fell_back(self, task: P.Task, exc: NoSlot, instead: str = "as frames") -> P.Fallback:
        """The ``fallback`` of a batch of ``task`` that goes ``instead`` (a slower way) because of ``exc``
        (logged once per stream, way and reason)."""
        self._say(task.stream, f"{instead}:{exc.kind}", exc.kind, f"stream {task.stream}: batches {instead}: {exc}")
        return P.Fallback(kind=exc.kind, message=str(exc)[:4000])

    def _into_slot(self, info: dict, tensors: Sequence[tuple[str, Any]], taken: tuple[SlotPool, Slot], fallback: P.Fallback | None = None) -> Outgoing:
        pool, slot = taken
        slot, generation, descriptors = write_batch(pool, tensors, into_slot(slot))
        header = P.ShmBatch(**info, segment=slot.memory.name, generation=generation, tensors=descriptors, retired=pool.take_retired(), fallback=fallback)
        return Outgoing(P.encode(header), (pool, slot), None if fallback is None else fallback.kind)

    def _into_device_slot(self, info: dict, tensors: Sequence[tuple[str, Any]], taken: tuple[SlotPool, Slot], written=None) -> Outgoing:
        """The images into the device slot (nothing to copy when the pipeline wrote them there), the
        other tensors as frames. ``written``: the reservation's view of the slot — the pipeline's
        ``out=``, so its bytes are the images' even when ``images`` came back as a host copy of them."""
        pool, slot = taken
        images, others = tensors[0][1], list(tensors[1:])
        try:
            if written is not None and tuple(written.shape) == tuple(images.shape):
                images = written
            slot.memory.write(0, images)
            pool.lend(slot)
            from .device import cuda_batch_frames

            frames = cuda_batch_frames(info, pool, slot, self.gpu, images, others)
        except BaseException:
            pool.give_back(slot)
            raise
        return Outgoing(frames, (pool, slot), memory="cuda-ipc")

    def _new_pool(self, stream: str, slots: int) -> SlotPool:
        log.info("stream %s: batches through shared memory in %s (up to %d slots)", stream, self.directory, slots)
        if on_gpu(self.device):  # page-locked: a GPU worker's copy into a slot is one DMA
            make = partial(PinnedSegment.create, self.directory, reserve=self.reserve_bytes, device=self.device)
        else:
            make = partial(Segment.create, self.directory, reserve=self.reserve_bytes)
        return SlotPool(make, slots)

    def _new_device_pool(self, stream: str, slots: int) -> SlotPool:
        from .device import create_device_slot  # torch: only for a worker on the trainer's GPU

        log.info("stream %s: batches in device memory on %s (GPU %s) through CUDA IPC (up to %d slots)", stream, self.device, self.gpu, slots)
        return SlotPool(partial(self._device_slots or create_device_slot, self.directory, self.device, self.reserve_bytes), slots)

    def cancel(self, outgoing: Outgoing) -> None:
        """``outgoing`` was not sent: its slot is free again."""
        if outgoing.slot is not None:
            pool, slot = outgoing.slot
            pool.give_back(slot)

    def drop(self, data: str) -> None:
        """The trainer at ``data`` is gone or done: close its pools (their names go with them)."""
        for key in [k for k in self.pools.keys() if k[0] == data]:
            pool = self.pools.pop(key)
            if pool is not None:
                pool.close()
        for key in [k for k in self.device_pools.keys() if k[0] == data]:
            pool = self.device_pools.pop(key)
            if pool is not None:
                _close_device_pool(pool)

    def close(self) -> None:
        self.pools.clear()  # closes every pool (on_evict)
        self.device_pools.clear()

    def _say(self, stream: str, key: str, kind: str, text: str) -> None:
        """Log each reason once per stream (every batch of a stream usually has the same one)."""
        if (stream, key) in self._said:
            return
        if len(self._said) > 10_000:
            self._said.clear()
        self._said.add((stream, key))
        log.log(_LEVEL[kind], "%s", text)


def _close_device_pool(pool: SlotPool) -> None:
    """Close a device pool, then let torch free the slots whose trainer has let go of them already
    (the others stay allocated until it does; see :mod:`.cuda`)."""
    pool.close()
    import torch

    if torch.cuda.is_available():
        torch.cuda.ipc_collect()
