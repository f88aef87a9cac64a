"""The trainer's side of the shared-memory hand-off: a ``shm_batch`` descriptor in, tensors out.

:class:`SlotReader` maps each segment once (and unlinks its name, see :mod:`augserve.handoff.shm`),
checks the descriptor against the segment — the generation it names is the one the slot holds, every
tensor lies inside the slot's data, aligned, with the byte size its dtype and shape imply — and wraps
each tensor as a view of the slot, without copying.

**When a slot goes back to its worker.** When the last tensor viewing it is gone. All tensors of one
batch view one fresh numpy array over the slot's data; a finalizer on that array writes FREE into the
slot's state word once nothing refers to it any more — the batch, its tensors, or any view or slice of
them. In ``for batch in stream:`` that is the moment the loop takes the next batch (unless the step kept
a reference); ``del batch`` does it at once. Anything kept stays valid: the worker reuses only FREE
slots, and sends frames when all of its slots are held. ``batch.clone()`` copies a batch out of its slot.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

import numpy as np
import torch

from .. import protocol as P
from .shm import ALIGN, HEADER_BYTES, MappedSegment, open_segment
from .slots import LENT

MAX_MAPPED = 4096  # segments one stream keeps mapped; more means a worker misbehaves


def opened_once(cache: dict, header: P.ShmBatch | P.CudaBatch, limit: int, open_slot: Callable[[], Any]):
    """The slot ``header`` names, from ``cache`` (slot name -> opened slot) or opened now by
    ``open_slot()`` and kept; the slots ``header`` retires leave the cache first (each is let go of once
    no tensor of it is left). Past ``limit`` open slots a worker misbehaves: ProtocolError."""
    for name in header.retired:
        cache.pop(name, None)
    slot = cache.get(header.segment)
    if slot is None:
        if len(cache) >= limit:
            raise P.ProtocolError(f"more than {limit} slots open for one stream; refusing slot {header.segment}")
        slot = cache[header.segment] = open_slot()
    return slot


class SlotReader:
    """Wraps the ``shm_batch`` descriptors of one stream; segments are looked up in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._segments: dict[str, MappedSegment] = {}
        self._lock = threading.Lock()  # the I/O thread wraps; close() may come from the consumer

    def wrap(self, header: P.ShmBatch) -> dict[str, torch.Tensor]:
        """Tensors of the batch in ``header``'s slot (views, not copies). A descriptor that does not fit
        its slot is a one-line :class:`~augserve.protocol.ProtocolError`; nothing outside the slot is read."""
        with self._lock:
            segment = opened_once(self._segments, header, MAX_MAPPED, lambda: open_segment(self.directory, header.segment))
        state, generation = segment.header()
        if state != LENT or generation != header.generation:
            raise P.ProtocolError(f"slot {header.segment} holds fill {generation} ({'lent' if state == LENT else 'free'}), the descriptor names fill {header.generation}")
        layouts = []
        for tensor in header.tensors:
            dtype, nbytes = P.tensor_layout(tensor)
            itemsize = dtype.itemsize
            if tensor.offset % ALIGN or tensor.offset + nbytes > segment.capacity:
                raise P.ProtocolError(
                    f"tensor {tensor.name!r} ({tensor.dtype} {list(tensor.shape)}, {nbytes} bytes at offset {tensor.offset}) "
                    f"does not lie {ALIGN}-byte aligned inside the {segment.capacity}-byte slot {header.segment}"
                )  # fmt: skip
            layouts.append((tensor, dtype, nbytes // itemsize))
        # One array for the whole batch: its finalizer is the slot's return (see the module docstring).
        base = np.frombuffer(segment.mapping, dtype=np.uint8, count=segment.capacity, offset=HEADER_BYTES)
        lease = weakref.finalize(base, segment.release, header.generation)
        lease.atexit = False
        tensors = {}
        for tensor, dtype, count in layouts:
            if count == 0:
                tensors[tensor.name] = torch.empty(list(tensor.shape), dtype=dtype)
            else:
                tensors[tensor.name] = torch.frombuffer(base, dtype=dtype, count=count, offset=tensor.offset).reshape(list(tensor.shape))
        return tensors

    def close(self) -> None:
        """Let go of every mapping; those still viewed by a tensor unmap when it goes."""
        with self._lock:
            self._segments.clear()
