"""A worker's side of the hand-off: each batch goes into a shared-memory slot or into frames.

For a task whose ``handoff`` allows shared memory, the worker first checks that it shares the
trainer's shared memory (:func:`augserve.handoff.host.mismatch`), then takes a slot of the stream's
pool, writes the batch's tensors into it — the one copy of the batch on its way — and sends a
``shm_batch`` descriptor. Anything that stands in the way (another host, a full ``/dev/shm``, every
slot held by the trainer) sends the batch as frames instead, with a ``fallback`` saying why; the worker
logs each reason once per stream and the trainer's client does too.
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
    """One batch ready to send: its ``frames``, and the slot it occupies (``None`` for frames)."""

    frames: list
    slot: tuple[SlotPool, Slot] | None = None

    @property
    def via(self) -> str:
        return "frames" if self.slot is None else "shm"


def write_batch(pool: SlotPool, tensors: Sequence[tuple[str, Any]], slot_for: Callable[[int], Slot] | None = None) -> tuple[Slot, int, list[P.SlotTensor]]:
    """Write ``tensors`` (name, C-contiguous host array or tensor) into a slot of ``pool`` — taken by
    ``slot_for(nbytes)``, by default ``pool.acquire`` — each at a 64-byte aligned offset, and lend it.
    Returns the slot, the generation its descriptor names, and the descriptors of the tensors."""
    buffers, descriptors, offset = [], [], 0
    for name, array in tensors:
        buffer = np.frombuffer(P.tensor_buffer(array), dtype=np.uint8)
        described = P.describe(name, array)
        descriptors.append(P.SlotTensor(name=name, dtype=described.dtype, shape=described.shape, offset=offset))
        buffers.append((offset, buffer))
        offset = aligned(offset + buffer.nbytes)
    slot = (slot_for or pool.acquire)(max(offset, 1))
    try:
        for start, buffer in buffers:
            slot.memory.write(start, buffer)
        return slot, pool.lend(slot), descriptors
    except BaseException:
        pool.give_back(slot)
        raise


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

    def pack(self, task: P.Task, info: dict, tensors: Sequence[tuple[str, Any]]) -> Outgoing:
        """The message for one batch: ``info`` (the :class:`~augserve.protocol.BatchInfo` fields) and
        ``tensors`` (name, C-contiguous host array or tensor), in a slot when the task allows it."""
        fallback = None
        if task.handoff is not None:
            try:
                return self._into_slot(task, info, tensors)
            except NoSlot as exc:
                fallback = P.Fallback(kind=exc.kind, message=str(exc)[:4000])
                self._say(task.stream, exc.kind, f"stream {task.stream}: batches as frames: {exc}")
        header = P.BatchHeader(**info, tensors=[P.describe(name, array) for name, array in tensors], fallback=fallback)
        return Outgoing(P.encode(header, [P.tensor_buffer(array) for _, array in tensors]))

    def _into_slot(self, task: P.Task, info: dict, tensors: Sequence[tuple[str, Any]]) -> Outgoing:
        handoff = task.handoff
        if self.identity is None:
            raise NoSlot("unavailable", f"no shared memory on the worker's side: {self.unavailable}")
        reason = mismatch(self.identity, handoff.host)
        if reason is not None:
            raise NoSlot("other_host", reason)
        pool = self.pools.get_or_create((task.data, task.stream), lambda: self._new_pool(task.stream, handoff.slots))
        pool.max_slots = handoff.slots
        slot, generation, descriptors = write_batch(pool, tensors)
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
