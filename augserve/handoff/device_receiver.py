"""The trainer's side of the device-memory hand-off: a ``cuda_batch`` descriptor in, a tensor on the GPU out.

:class:`DeviceSlotReader` checks each descriptor before it touches any memory (:func:`check`: the
images lie inside the slot, aligned, with the bytes their dtype and shape imply; the reference counter
is the sending worker's), then opens each slot once — its control segment (:mod:`.shm`), its device
memory and its fill event (:mod:`.cuda`) — and keeps them while the worker keeps the slot (a bounded
cache, keyed by the slot's name, which names its worker process). For each batch it checks the
generation in the control segment, makes the current stream wait for the fill event (on the GPU: the
host does not block), and views the images in the slot without copying.

**When a slot goes back to its worker.** As for host slots, when the last tensor viewing the batch is
gone: ``images`` and every view or slice of it hold one per-batch lease, whose end records an event on
the current CUDA stream of the thread that let go. A thread of the reader waits for that event and
only then writes FREE, so the worker never overwrites a batch that kernels queued before that moment
still read. Work on *another* stream must be ordered before the batch is dropped (or use
``batch.clone()``), as for any tensor the caching allocator frees. ``batch.clone()`` copies a batch out
of its slot.

A slot the trainer cannot open (another GPU than the worker claims, an IPC handle CUDA refuses) is
marked REFUSED in its control segment: the worker then sends that stream's batches through host
shared memory, and the trainer's log says why.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .. import protocol as P
from .device import first_line
from .receiver import opened_once
from .shm import ALIGN, MappedSegment, open_segment
from .slots import LENT

log = logging.getLogger("augserve.client")

MAX_OPEN = 1024  # device slots one stream keeps open; more means a worker misbehaves


def check(header: P.CudaBatch, gpu: str) -> str:
    """The numpy type string of ``header``'s images, once the descriptor is known to fit its slot; a
    one-line :class:`~augserve.protocol.ProtocolError` otherwise. Reads nothing but the descriptor."""
    images = header.images
    if images.name != "images":
        raise P.ProtocolError(f"a device slot holds the images, not {images.name!r}")
    if header.gpu.uuid != gpu:
        raise P.ProtocolError(f"worker {header.worker} sent a batch in the memory of GPU {header.gpu.uuid}, but this trainer is on GPU {gpu}")
    if images.dtype == "bfloat16":
        raise P.ProtocolError("bfloat16 images cannot be viewed in a device slot (no array-interface type for them)")
    _, nbytes = P.tensor_layout(images)
    if images.offset % ALIGN or images.offset + nbytes > header.memory.size:
        raise P.ProtocolError(
            f"images ({images.dtype} {list(images.shape)}, {nbytes} bytes at offset {images.offset}) do not lie {ALIGN}-byte aligned "
            f"inside the {header.memory.size}-byte device slot {header.segment}"
        )  # fmt: skip
    counter_pid = header.memory.ref_counter.split("_")[1]
    slot_pid = header.segment.rsplit("-", 2)[1]
    if counter_pid != slot_pid:
        raise P.ProtocolError(f"device slot {header.segment} names the reference counter {header.memory.ref_counter} of another process")
    return np.dtype(images.dtype).str


@dataclass(eq=False)
class _OpenSlot:
    """One slot as opened: its control segment, what the first descriptor said of its memory and event
    (later ones must say the same), and what keeps the memory mapped."""

    control: MappedSegment
    memory: P.CudaMemory
    event_handle: bytes
    keep: Any  # the opened storage: the mapping lasts as long as it does
    address: int
    event: Any


class _Lease:
    """One batch's hold on its slot: the images tensor views the slot through this object's array
    interface and keeps it alive; its end is the slot's return (see the module docstring)."""

    def __init__(self, slot: _OpenSlot, address: int, shape: Sequence[int], typestr: str, cuda: bool) -> None:
        self.slot = slot
        interface = {"shape": tuple(shape), "typestr": typestr, "data": (address, False), "strides": None}
        if cuda:
            self.__cuda_array_interface__ = {**interface, "version": 2}
        else:  # a device slot in host memory: how the lifecycle is tested without a GPU
            self.__array_interface__ = {**interface, "version": 3}


class DeviceSlotReader:
    """Wraps the ``cuda_batch`` descriptors of one stream whose trainer is on GPU ``gpu`` (UUID).
    ``opener`` does the device's calls (:class:`~augserve.handoff.cuda.CudaOpener`: ``device``,
    ``cuda``, ``open``, ``open_event``, ``wait``, ``fence``, ``as_tensor``); control segments are looked
    up in ``directory``."""

    def __init__(self, directory: str, gpu: str, opener) -> None:
        self.directory = directory
        self.gpu = gpu
        self.opener = opener
        self.opened = 0  # slots opened so far (each once)
        self._slots: dict[str, _OpenSlot] = {}
        # The I/O thread wraps, close() may come from the consumer, and releases from any thread — even
        # from a garbage collection run while this thread holds the lock: hence re-entrant.
        self._lock = threading.RLock()
        self._releases: queue.Queue | None = None
        self._releaser: threading.Thread | None = None
        self._closed = False

    def wrap(self, header: P.CudaBatch, buffers: Sequence[Any]) -> dict[str, torch.Tensor]:
        """``images`` (a view of the slot, on the trainer's device) and the tensors of the frames
        (labels, sample ids, on the host). Anything wrong is a one-line
        :class:`~augserve.protocol.ProtocolError`, never another exception."""
        typestr = check(header, self.gpu)
        tensors = P.frames_to_tensors(header.tensors, buffers)
        if "images" in tensors:
            raise P.ProtocolError("the images of a device-slot batch cannot also come as a frame")
        slot = self._slot(header)
        state, generation = slot.control.header()
        if state != LENT or generation != header.generation:
            raise P.ProtocolError(f"device slot {header.segment} holds fill {generation} ({'lent' if state == LENT else 'not lent'}), the descriptor names fill {header.generation}")
        images = header.images
        try:
            self.opener.wait(slot.event)
            if not int(np.prod(images.shape, dtype=np.int64)):
                tensors["images"] = torch.empty(list(images.shape), dtype=P.tensor_layout(images)[0], device=self.opener.device)
                slot.control.release(header.generation)  # nothing to view: the slot is free at once
                return tensors
            lease = _Lease(slot, slot.address + images.offset, images.shape, typestr, self.opener.cuda)
            finalizer = weakref.finalize(lease, self._released, slot.control, header.generation)
            finalizer.atexit = False
            tensors["images"] = self.opener.as_tensor(lease)
        except Exception as exc:  # a CUDA error: the batch is lost, the stream goes on
            raise P.ProtocolError(f"cannot view device slot {header.segment}: {first_line(exc)}") from None
        return tensors

    def _slot(self, header: P.CudaBatch) -> _OpenSlot:
        with self._lock:
            slot = opened_once(self._slots, header, MAX_OPEN, lambda: self._open(header))
        if slot.memory != header.memory or slot.event_handle != header.event:
            raise P.ProtocolError(f"device slot {header.segment} names other memory than when it was opened")
        return slot

    def _open(self, header: P.CudaBatch) -> _OpenSlot:
        control = open_segment(self.directory, header.segment)
        try:
            keep, address = self.opener.open(header.memory)
            event = self.opener.open_event(header.event)
        except Exception as exc:
            control.refuse()  # the worker stops sending this stream device slots (see augserve.handoff.slots)
            raise P.ProtocolError(
                f"cannot open device slot {header.segment} of worker {header.worker} through CUDA IPC ({first_line(exc)}); "
                f"that worker now sends this stream's batches through host shared memory"
            ) from None  # fmt: skip
        self.opened += 1
        return _OpenSlot(control, header.memory, header.event, keep, address, event)

    def _released(self, control: MappedSegment, generation: int) -> None:
        """The last view of a batch is gone (on whatever thread let go of it)."""
        try:
            fence = self.opener.fence()
        except Exception as exc:  # CUDA is broken in this process: nothing left to protect
            log.warning("cannot order the release of device slot %s after its readers: %s", control.name, first_line(exc))
            fence = None
        if fence is None:
            control.release(generation)
            return
        with self._lock:
            if self._releaser is None and not self._closed:
                self._releases = queue.Queue()
                self._releaser = threading.Thread(target=self._release_loop, args=(self._releases,), name="augserve-device-slots", daemon=True)
                self._releaser.start()
            releases = self._releases if not self._closed else None
        if releases is None:
            _release_after(fence, control, generation)
        else:
            releases.put((fence, control, generation))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every release queued so far is written (False if that took over ``timeout`` s)."""
        with self._lock:
            releases = self._releases if not self._closed else None
        if releases is None:
            return True
        done = threading.Event()
        releases.put(done)
        return done.wait(timeout)

    @staticmethod
    def _release_loop(releases: queue.Queue) -> None:
        while True:
            item = releases.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()  # flush(): everything queued before it is written
                continue
            _release_after(*item)

    def close(self) -> None:
        """Let go of every slot; those still viewed by a batch are let go when it goes. Releases already
        queued are written first."""
        with self._lock:
            self._closed = True
            self._slots.clear()
            releaser, releases = self._releaser, self._releases
            self._releaser = self._releases = None
        if releaser is not None:
            releases.put(None)
            releaser.join(timeout=10)


def _release_after(fence, control: MappedSegment, generation: int) -> None:
    try:
        fence.synchronize()
    except Exception as exc:
        log.warning("waiting for the readers of device slot %s failed: %s", control.name, first_line(exc))
    control.release(generation)
