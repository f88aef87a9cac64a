"""A worker's side of the hand-off: each batch goes into a shared-memory slot or into frames.

For a task whose ``handoff`` allows shared memory, the worker first checks that it shares the
trainer's shared memory (:func:`augserve.handoff.host.mismatch`), then takes a slot of the stream's
pool and sends a ``shm_batch`` descriptor of the batch's tensors in it. A worker takes the slot before
it augments (:meth:`Sender.reserve`): the pipeline writes the images straight into the slot
(``out=``), so each byte of a batch is written once, and only the labels and ids are copied in
after. :meth:`Sender.pack` without a reservation copies every tensor into a slot instead. Anything
that stands in the way (another host, a full ``/dev/shm``, every slot held by the trainer) sends the
batch as frames instead, with a ``fallback`` saying why; the worker logs each reason once per stream
and the trainer's client does too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np

from .. import protocol as P
from ..lru import LRUCache
from .host import host_identity, mismatch
from .shm import Segment, aligned, reap_orphans
from .slots import NoSlot, Slot, SlotPool

log = logging.getLogger("augserve.worker")

MAX_POOLS = 8  # streams with a pool in one worker; the least recently used one closes beyond that
_LEVEL = {"other_host": logging.INFO, "busy": logging.INFO, "no_space": logging.WARNING, "unavailable": logging.WARNING}


@dataclass
class Outgoing:
    """One batch ready to send: its ``frames``, the slot it occupies (``None`` for frames) and, for frames
    although the task allowed shared memory, the kind of :class:`~augserve.protocol.Fallback`."""

    frames: list
    slot: tuple[SlotPool, Slot] | None = None
    fallback: str | None = None

    @property
    def via(self) -> str:
        return "frames" if self.slot is None else "shm"


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
    may use shared memory and a slot can be had — with room after them for the tensors that follow,
    ``trailing`` bytes per image (labels and sample ids) — else private memory, and the batch goes as
    frames with :attr:`fallback` saying why. Handed to :meth:`Sender.pack`, which sends the slot without
    copying the images again; :meth:`cancel` gives back a slot the batch never reached."""

    def __init__(self, sender: "Sender", task: P.Task, trailing: Sequence[int]) -> None:
        self._sender = sender
        self.task = task
        self.trailing = tuple(trailing)
        self.slot: tuple[SlotPool, Slot] | None = None
        self.fallback: P.Fallback | None = None

    def images(self, shape: Sequence[int]) -> np.ndarray:
        """A writable, C-contiguous uint8 array of ``shape`` (N×H×W×C). Called again for the same task
        with fewer images (samples skipped as corrupt, the batch planned again), it is the same memory:
        the kept images lie one after another from the slot's start."""
        shape = tuple(int(v) for v in shape)
        count = int(np.prod(shape))
        nbytes = batch_layout([count, *(per_image * shape[0] for per_image in self.trailing)])[1]
        if self.slot is not None and self.slot[1].memory.capacity < nbytes:
            self.cancel()
        if self.slot is None and self.fallback is None and self.task.handoff is not None:
            try:
                pool = self._sender.pool_for(self.task)
                self.slot = (pool, pool.acquire(nbytes))
            except NoSlot as exc:
                self.fallback = self._sender.fell_back(self.task, exc)
        if self.slot is None:
            return np.empty(shape, dtype=np.uint8)
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
    """Packs batches for one worker; owns its slot pools. Used by the worker's task thread alone."""

    def __init__(self, directory: str, reserve_bytes: int = 0) -> None:
        if reserve_bytes < 0:
            raise ValueError(f"the shared-memory reserve must be >= 0, got {reserve_bytes} bytes")
        self.directory = directory
        self.reserve_bytes = reserve_bytes
        self.identity, self.unavailable = host_identity(directory)
        self.pools: LRUCache = LRUCache(MAX_POOLS, on_evict=lambda _key, pool: pool.close())
        self._said: set[tuple[str, str]] = set()

    def reap(self) -> list[str]:
        """Remove slot names dead workers left in this worker's directory (see :mod:`.shm`)."""
        return reap_orphans(self.directory) if self.identity is not None else []

    def reserve(self, task: P.Task, trailing: Sequence[int] = ()) -> Reservation:
        """Room for ``task``'s batch, taken when :meth:`Reservation.images` is first called (see there)."""
        return Reservation(self, task, trailing)

    def pack(self, task: P.Task, info: dict, tensors: Sequence[tuple[str, Any]], reservation: Reservation | None = None) -> Outgoing:
        """The message for one batch: ``info`` (the :class:`~augserve.protocol.BatchInfo` fields) and
        ``tensors`` (name, C-contiguous host array or tensor), in a slot when the task allows it — the
        slot of ``reservation`` when it holds one (tensors already in it are not copied again)."""
        taken = None if reservation is None else reservation.take()
        if taken is not None:
            return self._into_slot(task, info, tensors, taken)
        fallback = None if reservation is None else reservation.fallback
        if task.handoff is not None and fallback is None:
            try:
                return self._into_slot(task, info, tensors)
            except NoSlot as exc:
                fallback = self.fell_back(task, exc)
        header = P.BatchHeader(**info, tensors=[P.describe(name, array) for name, array in tensors], fallback=fallback)
        return Outgoing(P.encode(header, [P.tensor_buffer(array) for _, array in tensors]), fallback=None if fallback is None else fallback.kind)

    def pool_for(self, task: P.Task) -> SlotPool:
        """The pool of ``task``'s stream; :class:`NoSlot` when this worker does not share the trainer's memory."""
        handoff = task.handoff
        if handoff is None:
            raise NoSlot("unavailable", "the task does not allow shared memory")
        if self.identity is None:
            raise NoSlot("unavailable", f"no shared memory on the worker's side: {self.unavailable}")
        reason = mismatch(self.identity, handoff.host)
        if reason is not None:
            raise NoSlot("other_host", reason)
        pool = self.pools.get_or_create((task.data, task.stream), lambda: self._new_pool(task.stream, handoff.slots))
        pool.max_slots = handoff.slots
        return pool

    def fell_back(self, task: P.Task, exc: NoSlot) -> P.Fallback:
        """The ``fallback`` of a batch of ``task`` that goes as frames because of ``exc`` (logged once per stream and reason)."""
        self._say(task.stream, exc.kind, f"stream {task.stream}: batches as frames: {exc}")
        return P.Fallback(kind=exc.kind, message=str(exc)[:4000])

    def _into_slot(self, task: P.Task, info: dict, tensors: Sequence[tuple[str, Any]], taken: tuple[SlotPool, Slot] | None = None) -> Outgoing:
        pool = self.pool_for(task) if taken is None else taken[0]
        slot_for = None if taken is None else into_slot(taken[1])
        slot, generation, descriptors = write_batch(pool, tensors, slot_for)
        header = P.ShmBatch(**info, segment=slot.memory.name, generation=generation, tensors=descriptors, retired=pool.take_retired())
        return Outgoing(P.encode(header), (pool, slot))

    def _new_pool(self, stream: str, slots: int) -> SlotPool:
        log.info("stream %s: batches through shared memory in %s (up to %d slots)", stream, self.directory, slots)
        return SlotPool(partial(Segment.create, self.directory, reserve=self.reserve_bytes), slots)

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

    def close(self) -> None:
        self.pools.clear()  # closes every pool (on_evict)

    def _say(self, stream: str, kind: str, text: str) -> None:
        """Log each reason once per stream (every batch of a stream usually has the same one)."""
        if (stream, kind) in self._said:
            return
        if len(self._said) > 10_000:
            self._said.clear()
        self._said.add((stream, kind))
        log.log(_LEVEL[kind], "%s", text)
