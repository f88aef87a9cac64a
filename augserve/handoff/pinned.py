"""Page-locked host memory for a worker on a GPU: what it sends through host memory leaves the device
by one DMA at full PCIe speed, instead of through CUDA's small pageable staging buffers.

* **Frames** (a trainer on another host, or a stream that asked for frames): the batch is made in, or
  copied into, a block of torch's caching host allocator (:func:`host_array`, :func:`to_host`). The
  frames hold the block until ZeroMQ has sent them; then it goes back to the cache for a later batch,
  so a worker allocates page-locked memory once per batch size, not once per batch.
* **Host shared-memory slots** (a trainer on this host but on another GPU, or on the CPU): each slot's
  segment is registered with CUDA (``cudaHostRegister``) once, when the worker makes it
  (:class:`PinnedSegment`), and unregistered before it is unmapped. The pipeline's device-to-host copy
  then lands in the slot directly: the issue's "pinned staging" for another GPU of the host, without a
  staging copy. (A GPU-to-GPU peer copy would need two GPUs to measure against it; the lent machines
  have one, so it is not built.)

Registering can fail (a driver or container that refuses to page-lock the mapping): the slot is then
used as it is, correct and slower, and the worker says why once. A worker on the CPU never calls
CUDA: everything here is for ``cuda:K`` workers.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from .shm import Segment

log = logging.getLogger("augserve.worker")

_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context of the process, not just the current one
_said: set[str] = set()  # reasons already logged by this process (a handful at most: CUDA's error texts)


def on_gpu(device: str) -> bool:
    """Whether a worker augmenting on ``device`` (``"cpu"``, ``"cuda:1"``) sends from page-locked memory."""
    return str(device).startswith("cuda")


def host_array(shape: Sequence[int], device: str):
    """A writable, C-contiguous uint8 host array of ``shape`` for a batch sent as frames: a page-locked
    torch tensor for a worker on a GPU, else a numpy array."""
    if not on_gpu(device):
        return np.empty(tuple(shape), dtype=np.uint8)
    import torch

    return torch.empty(tuple(shape), dtype=torch.uint8, pin_memory=True)


def to_host(tensor):
    """``tensor`` in host memory: a device tensor copied into a page-locked block (same shape, dtype,
    values), a host tensor as it is."""
    if tensor.device.type == "cpu":
        return tensor
    import torch

    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor)  # synchronous: the frames are read as soon as this returns
    return host


def register(array: np.ndarray, device: str) -> bool:
    """Page-lock the memory of host ``array`` (C-contiguous) with CUDA, in the context of the worker's
    ``device``; False, said once, when CUDA refuses."""
    import torch

    try:
        # On the worker's own GPU: CUDA's runtime would otherwise register in the current device's
        # context, creating one on cuda:0 (hundreds of MB) for a worker on cuda:3.
        with torch.cuda.device(torch.device(device)):
            error = int(torch.cuda.cudart().cudaHostRegister(array.ctypes.data, array.nbytes, _PORTABLE))
    except (RuntimeError, AttributeError, AssertionError) as exc:  # no CUDA in this torch, or it cannot start
        _say_once(f"shared-memory slots stay pageable (CUDA cannot register them: {exc})")
        return False
    if error != 0:
        _say_once(f"shared-memory slots stay pageable (cudaHostRegister failed with CUDA error {error}): device-to-host copies into them are slower")
        return False
    return True


def unregister(array: np.ndarray, device: str) -> None:
    """Undo :func:`register` (before the memory is unmapped); an error is only logged: the slot goes anyway."""
    import torch

    with torch.cuda.device(torch.device(device)):
        error = int(torch.cuda.cudart().cudaHostUnregister(array.ctypes.data))
    if error != 0:
        log.debug("cudaHostUnregister of a shared-memory slot failed with CUDA error %d", error)


def _say_once(text: str) -> None:
    if text not in _said:
        _said.add(text)
        log.warning("%s", text)


class PinnedSegment(Segment):
    """A host slot of a worker on a GPU: a :class:`~augserve.handoff.shm.Segment` whose data region is
    registered with CUDA from its creation until :meth:`close` (see the module docstring).
    :attr:`pinned` says whether the registration took."""

    pinned = False
    device = "cuda"

    @classmethod
    def create(cls, directory: str, capacity: int, reserve: int = 0, device: str = "cuda") -> "PinnedSegment":
        """:meth:`Segment.create <augserve.handoff.shm.Segment.create>`, then registered on ``device`` (the worker's GPU)."""
        segment = super().create(directory, capacity, reserve)
        segment.device = device
        segment.pinned = register(segment.data, device)
        return segment

    def close(self) -> None:
        if self.pinned:
            self.pinned = False
            unregister(self.data, self.device)  # while the memory is still mapped
        super().close()
