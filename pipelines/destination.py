"""``out=``: a destination the caller allocated, so a pipeline writes each batch exactly once.

A pipeline normally returns a batch in memory of its own; a caller that must put the batch somewhere
else (a shared-memory slot, a pinned buffer, a preallocated array) would then copy every byte a second
time. With ``out`` the pipeline writes the batch straight there instead.

``out`` is one of:

* a ``torch.uint8`` tensor on the CPU, N×H×W×C (the pipeline's output layout: N images, H×W pixels,
  C = 1 or 3 channels), C-contiguous; N, H, W and C must be those of the batch's outputs. For a
  pipeline whose backend makes its batch on a GPU (torch, DALI), a tensor on that GPU works too — a
  worker's device slot —: the batch goes there with one device-to-device copy and never touches the
  host;
* a callable ``(N, H, W, C) -> such a tensor``, called once per pipeline call as soon as the sampled
  parameters fix the outputs' size — before any image is decoded or any pixel written. This is how a
  caller that only learns the size from the pipeline (a worker taking a slot of the right size) still
  allocates before the pixels are made.

Only uint8 outputs of one size can go into ``out``: a spec that ends with ``normalize`` (float output)
and a batch whose outputs differ in size are refused with one line, as is a tensor of the wrong shape,
dtype, device or strides. The pipeline returns the ``out`` tensor itself.
"""

from __future__ import annotations

from typing import Callable, Union

import numpy as np
import torch

from .sampling import BatchParams

OutShape = tuple[int, int, int, int]  # N, H, W, C
Destination = Union[torch.Tensor, Callable[[OutShape], torch.Tensor]]


def output_shape(params: BatchParams) -> OutShape:
    """(N, H, W, C) of the batch whose parameters are ``params``; ValueError when its outputs differ in size."""
    sizes = np.concatenate([np.asarray(params.out_hw).reshape(-1, 2), np.asarray(params.in_shapes)[:, 2:3]], axis=1)  # (N, 3): H, W, C
    differ = np.flatnonzero((sizes != sizes[0]).any(axis=1))
    if differ.size:
        first, other = sizes[0].tolist(), sizes[differ[0]].tolist()
        raise ValueError(
            f"out= needs outputs of one size, but this batch's differ ({'×'.join(map(str, first))} and {'×'.join(map(str, other))}): "
            f"add a crop or resize op to the pipeline so a batch can be stacked"
        )  # fmt: skip
    height, width, channels = sizes[0].tolist()
    return (len(params), height, width, channels)


def resolve(out: Destination, shape: OutShape, device: str | torch.device | None = None) -> torch.Tensor:
    """The tensor ``out`` stands for (calling it with ``shape`` if it is a callable), checked against
    ``shape`` and, when given, the pipeline's ``device``."""
    tensor = out if isinstance(out, torch.Tensor) or not callable(out) else out(shape)
    check(tensor, shape, device)
    return tensor


def check(tensor, shape: OutShape, device: str | torch.device | None = None) -> None:
    """One-line TypeError/ValueError unless ``tensor`` is a C-contiguous uint8 tensor of ``shape`` on the
    CPU or on a CUDA device — ``device``, the pipeline's, when it is given (a pipeline on the CPU then
    takes CPU tensors only)."""
    expected = "×".join(map(str, shape))
    if not isinstance(tensor, torch.Tensor):
        hint = " (wrap a numpy array with torch.from_numpy)" if hasattr(tensor, "__array_interface__") else ""
        raise TypeError(f"out= must be a torch.uint8 tensor of shape {expected} (N×H×W×C) or a callable returning one, got {type(tensor).__name__}{hint}")
    if tensor.dtype != torch.uint8:
        raise TypeError(f"out= must have dtype torch.uint8, got {tensor.dtype}")
    if tensor.device.type not in ("cpu", "cuda"):
        raise ValueError(f"out= must be on the CPU, got a tensor on {tensor.device} (or on the GPU of a pipeline that makes its batches there)")
    if tensor.device.type == "cuda" and device is not None and tensor.device != _indexed(device):
        raise ValueError(f"out= must be on the CPU or on this pipeline's device {device}, got a tensor on {tensor.device}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"out= has shape {'×'.join(map(str, tensor.shape))}, but this batch's outputs are {expected} (N×H×W×C)")
    if not tensor.is_contiguous():
        raise ValueError(f"out= must be C-contiguous (N×H×W×C in memory order), got strides {tuple(tensor.stride())}")


def _indexed(device: str | torch.device) -> torch.device:
    """``device`` with its index (``cuda`` is the current CUDA device); a CPU device as it is."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
