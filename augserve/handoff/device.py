"""Device slots: a worker's slot in GPU memory, handed to a trainer on the same GPU through CUDA IPC.

A device slot is ``capacity`` bytes of one uint8 tensor on the worker's device, allocated once, plus
a small host shared-memory segment (:mod:`.shm`, :data:`CONTROL_BYTES` of data that nothing uses) that
holds its state word and generation. So the lifecycle of :mod:`.slots` is the very one of host slots:
the pool, its sizes and retirements, FREE/LENT in the segment, the names that die with their
processes. Only the bytes live elsewhere.

Layout in the slot: the batch's images (uint8 N×H×W×C) from offset 0, written there by the pipeline
(``out=``) or copied in with one device-to-device copy. Labels and sample ids (int64, N each) travel as
frames of the ``cuda_batch`` message (:func:`cuda_batch_frames`): a few kilobytes the trainer checks
on the host anyway.

A fill ends with :meth:`DeviceSlot.publish`: the slot's :class:`~augserve.handoff.cuda.FillEvent` is
recorded after the write and waited for, then the state word says LENT. The CUDA calls live in
:mod:`.cuda`; this module runs as well on a CPU tensor (no event, no export), which is how the
lifecycle is tested without a GPU.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .. import protocol as P
from .shm import ALIGN, Segment
from .slots import NoSlot, Slot, SlotPool

CONTROL_BYTES = ALIGN  # a control segment's data region: the header alone carries state and generation


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (CUDA errors come with pages of hints), at most 300 characters."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def as_bytes(source) -> torch.Tensor:
    """``source`` (a tensor on any device, or a numpy array) as a flat uint8 tensor over the same memory."""
    tensor = source if isinstance(source, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(source))
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor.reshape(-1).view(torch.uint8)


class DeviceSlot:
    """A slot's memory in device memory, as its worker sees it (a :class:`~augserve.handoff.slots.SlotMemory`).

    ``data``: the uint8 tensor of ``capacity`` bytes; ``shared``: how the trainer opens it (None on a
    CPU, where nothing is shared); ``event_handle``: the IPC handle of its fill event once a fill was
    published (64 zero bytes without an event)."""

    def __init__(self, control: Segment, data: torch.Tensor, shared: P.CudaMemory | None = None, fill=None) -> None:
        self.control = control
        self.data = data
        self.capacity = int(data.numel())
        self.shared = shared
        self._fill = fill
        self.event_handle = bytes(P.CUDA_IPC_HANDLE_BYTES)

    @property
    def name(self) -> str:
        return self.control.name

    def state(self) -> int:
        return self.control.state()

    def write(self, offset: int, source) -> None:
        """Copy ``source`` into the slot at ``offset`` (one copy, from the host or another device tensor);
        nothing when ``source`` is that very memory (written there in place, see :meth:`view`)."""
        flat = as_bytes(source)
        nbytes = int(flat.numel())
        if offset < 0 or offset + nbytes > self.capacity:
            raise ValueError(f"{nbytes} bytes at offset {offset} overflow the {self.capacity}-byte device slot {self.name}")
        if nbytes == 0:
            return
        target = self.data[offset : offset + nbytes]
        if flat.device == target.device and flat.data_ptr() == target.data_ptr():
            return
        target.copy_(flat)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of the slot from ``offset``: a writable uint8 tensor on the slot's device."""
        if offset < 0 or offset + nbytes > self.capacity:
            raise ValueError(f"{nbytes} bytes at offset {offset} overflow the {self.capacity}-byte device slot {self.name}")
        return self.data[offset : offset + nbytes]

    def publish(self, generation: int) -> None:
        if self._fill is not None:
            self.event_handle = self._fill.signal()  # the fill is complete on the GPU from here
        self.control.publish(generation)

    def reclaim(self) -> None:
        self.control.reclaim()

    def close(self) -> None:
        """Unlink the control segment and drop this side's tensor; torch keeps the memory allocated
        while the trainer still holds it (see :mod:`.cuda`)."""
        self.control.close()
        self.data = None


def create_device_slot(directory: str, device: str, reserve: int, capacity: int) -> DeviceSlot:
    """A new FREE device slot of ``capacity`` bytes on ``device``, its control segment in ``directory``
    (which keeps ``reserve`` bytes free); on a CUDA device shared through CUDA IPC at once.
    :class:`~augserve.handoff.slots.NoSlot` when either memory cannot be had."""
    control = Segment.create(directory, CONTROL_BYTES, reserve)
    try:
        data = torch.empty(capacity, dtype=torch.uint8, device=device)
        if data.device.type != "cuda":
            return DeviceSlot(control, data)
        from .cuda import FillEvent, export

        return DeviceSlot(control, data, export(data.untyped_storage()), FillEvent(data.device))
    except torch.cuda.OutOfMemoryError:
        control.close()
        raise NoSlot("no_space", f"{device} has no room for a {_mb(capacity)} device slot") from None
    except (RuntimeError, ValueError) as exc:
        control.close()
        raise NoSlot("unavailable", f"cannot make a {_mb(capacity)} device slot on {device} to share through CUDA IPC: {first_line(exc)}") from None
    except BaseException:
        control.close()
        raise


def cuda_batch_frames(info: dict, pool: SlotPool, slot: Slot, gpu: str, images, others: Sequence[tuple[str, Any]]) -> list:
    """The ``cuda_batch`` message of a lent device slot: ``info`` (the
    :class:`~augserve.protocol.BatchInfo` fields), the slot holding ``images`` from offset 0, and
    ``others`` (name, host array: labels, sample ids) as frames."""
    memory: DeviceSlot = slot.memory
    if memory.shared is None:
        raise ValueError(f"device slot {memory.name} is not shared through CUDA IPC (it is on {memory.data.device})")
    described = P.describe("images", images)
    header = P.CudaBatch(
        **info, segment=memory.name, generation=slot.generation, gpu=P.CudaDevice(uuid=gpu), memory=memory.shared, event=memory.event_handle,
        images=P.SlotTensor(name="images", dtype=described.dtype, shape=described.shape, offset=0),
        tensors=[P.describe(name, array) for name, array in others], retired=pool.take_retired(),
    )  # fmt: skip
    return P.encode(header, [P.tensor_buffer(array) for _, array in others])
