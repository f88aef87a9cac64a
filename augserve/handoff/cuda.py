"""CUDA IPC through torch's own primitives — what ``torch.multiprocessing`` does for a CUDA tensor,
without pickle — and which GPU a process is on.

The worker's side: :func:`export` shares a device slot's storage once (``UntypedStorage._share_cuda_``),
and :class:`FillEvent` is the slot's interprocess event, recorded after each fill. The trainer's side:
:class:`CudaOpener` maps a slot (``UntypedStorage._new_shared_cuda``) and its event
(``torch.cuda.Event.from_ipc_handle``), waits on that event on its own stream, and views the slot.
What a peer sent reaches these calls only as validated fields of a
:class:`~augserve.protocol.CudaBatch` — bytes of bounded length, integers in range, a reference-counter
name of torch's own pattern; nothing is unpickled.

**Who frees a slot's memory.** ``_share_cuda_`` sets a counter to 1 in torch's reference-counter file
(a ``/dev/shm/torch_<pid>_…`` file of the worker's), and the storage ``_new_shared_cuda`` returns
decrements it when it is freed; until then torch keeps the worker's memory allocated even after the
worker lets go of it (``CudaIPCSentDataLimbo``), so a trainer never reads memory given to something
else. That is why each slot is shared once and opened once: the trainer keeps the opened storage as
long as it keeps the slot, and each batch is a view of it.

The signatures, the same in torch 2.11 and 2.13 (:func:`unusable` names what is missing in another
version, :func:`export` checks what ``_share_cuda_`` returns)::

    UntypedStorage._share_cuda_() -> (device, handle, size, offset, ref_counter, ref_counter_offset,
                                      event_handle, event_sync_required)
    UntypedStorage._new_shared_cuda(device, handle, size, offset, ref_counter, ref_counter_offset,
                                    event_handle, event_sync_required)
    torch.cuda.Event(interprocess=True).ipc_handle() -> 64 bytes;  torch.cuda.Event.from_ipc_handle(device, handle)
"""

from __future__ import annotations

import re
import uuid

import torch
from pydantic import ValidationError

from .. import protocol as P

_UUID = re.compile(P.GPU_UUID_PATTERN)
_PRIMITIVES = ((torch.UntypedStorage, "_share_cuda_"), (torch.UntypedStorage, "_new_shared_cuda"), (torch.cuda.Event, "from_ipc_handle"), (torch.cuda.Event, "ipc_handle"))


def gpu_uuid(device) -> str | None:
    """The UUID of CUDA device ``device`` (``torch.device`` or ``"cuda:N"``) as
    :class:`~augserve.protocol.CudaDevice` spells it, or None (not CUDA, no GPU, no UUID)."""
    try:
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        raw = torch.cuda.get_device_properties(index).uuid  # torch's _CUuuid: str() is the bare UUID (2.11, 2.13)
        text = str(raw).strip().lower().removeprefix("gpu-")
        if not _UUID.fullmatch(text) and len(bytes(getattr(raw, "bytes", b""))) == 16:
            text = str(uuid.UUID(bytes=bytes(raw.bytes)))  # its 16 bytes, should str() ever spell it otherwise
    except (RuntimeError, AssertionError, AttributeError, TypeError, ValueError):
        return None
    return text if _UUID.fullmatch(text) else None


def unusable(device) -> str | None:
    """Why this process cannot hand over or open device slots on ``device``; None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"{device} is not a CUDA device"
    if not torch.cuda.is_available():
        return "torch has no CUDA here, or no GPU is visible"
    missing = [f"{owner.__name__}.{name}" for owner, name in _PRIMITIVES if not hasattr(owner, name)]
    if missing:
        return f"torch {torch.__version__} lacks {', '.join(missing)} (augserve uses torch 2.x's CUDA IPC primitives)"
    if gpu_uuid(device) is None:
        return f"cannot tell which GPU {device} is (torch.cuda.get_device_properties gives no UUID)"
    return None


def trainer_gpu(transport: str, device: torch.device) -> P.CudaDevice | None:
    """What a trainer puts in ``attach.cuda``: its GPU for ``transport="cuda-ipc"``, else None.
    ValueError in one line when ``cuda-ipc`` cannot work for a stream on ``device``."""
    if transport != "cuda-ipc":
        return None
    if device.type != "cuda":
        raise ValueError(f"transport='cuda-ipc' hands batches over in GPU memory, so the stream needs a CUDA device (device='cuda:N'), not {str(device)!r}")
    why = unusable(device)
    if why is not None:
        raise ValueError(f"transport='cuda-ipc' cannot be used: {why}")
    return P.CudaDevice(uuid=gpu_uuid(device))


def export(storage: torch.UntypedStorage) -> P.CudaMemory:
    """Share ``storage`` (a device slot's, on the worker's GPU) through CUDA IPC, once. RuntimeError in
    one line when this torch shares in a form this module does not know."""
    shared = storage._share_cuda_()
    if not isinstance(shared, tuple) or len(shared) != 8:
        fields = len(shared) if isinstance(shared, tuple) else type(shared).__name__
        raise RuntimeError(f"torch {torch.__version__}: UntypedStorage._share_cuda_() returned {fields} fields, not the 8 of torch 2.x")
    _device, handle, size, offset, counter, counter_offset, _event, _sync = shared
    if not isinstance(handle, bytes) or not isinstance(counter, bytes):
        raise RuntimeError(f"torch {torch.__version__}: UntypedStorage._share_cuda_() gave no handle (an empty storage?)")
    try:
        return P.CudaMemory(handle=handle, size=int(size), offset=int(offset), ref_counter=counter.decode("ascii", "replace"), ref_counter_offset=int(counter_offset))
    except ValidationError as exc:
        raise RuntimeError(f"torch {torch.__version__} shares CUDA memory in a form augserve does not know: {P.describe_validation_error(exc)}") from None


class FillEvent:
    """A device slot's interprocess event, on the worker's side: :meth:`signal` marks the end of a fill."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.event = torch.cuda.Event(blocking=True, interprocess=True)  # blocking: the wait sleeps, leaving the core to decoding
        self.handle: bytes | None = None

    def signal(self) -> bytes:
        """Record the event after the work queued so far on the device's current stream (the fill),
        wait for it, and return the event's IPC handle. Waiting here costs a worker nothing (it makes
        one batch at a time) and means a descriptor only ever names a finished batch: a worker killed
        after sending leaves no half-written slot and no event that never fires."""
        self.event.record(torch.cuda.current_stream(self.device))
        self.event.synchronize()
        if self.handle is None:
            self.handle = bytes(self.event.ipc_handle())  # after the first record: the event exists on the slot's device
        return self.handle


class CudaOpener:
    """The trainer's CUDA calls for :class:`~augserve.handoff.device_receiver.DeviceSlotReader`, on
    ``device`` (the trainer's index of the GPU the worker named; its UUID was checked)."""

    cuda = True

    def __init__(self, device: torch.device) -> None:
        self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())

    def open(self, memory: P.CudaMemory) -> tuple[torch.UntypedStorage, int]:
        """Map a slot's memory: ``(the storage, which keeps it mapped; its device address)``. The share
        time event of ``_share_cuda_`` is not waited for: each batch's own fill event covers it."""
        storage = torch.UntypedStorage._new_shared_cuda(
            self.device.index, memory.handle, memory.size, memory.offset, memory.ref_counter.encode("ascii"), memory.ref_counter_offset,
            bytes(P.CUDA_IPC_HANDLE_BYTES), False,
        )  # fmt: skip
        return storage, storage.data_ptr()

    def open_event(self, handle: bytes) -> torch.cuda.Event:
        return torch.cuda.Event.from_ipc_handle(self.device, handle)

    def wait(self, event: torch.cuda.Event) -> None:
        """Make this thread's current stream wait for the fill (on the GPU; the host does not block)."""
        event.wait(torch.cuda.current_stream(self.device))

    def fence(self) -> torch.cuda.Event:
        """An event after the work queued so far on this thread's current stream: once it has
        completed, nothing queued before it reads the slot any more."""
        event = torch.cuda.Event(blocking=True)  # waited for by the reader's thread: sleeping, not spinning
        event.record(torch.cuda.current_stream(self.device))
        return event

    def as_tensor(self, lease) -> torch.Tensor:
        """The tensor ``lease`` describes (``__cuda_array_interface__``), no copy: it holds ``lease``."""
        return torch.as_tensor(lease, device=self.device)
