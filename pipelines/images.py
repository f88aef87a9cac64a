"""Validation of the images handed to a pipeline.

A batch is a uint8 array or tensor of shape N×H×W×C (C = 1 or 3; N×H×W means grey), or a list of
H×W×C (or H×W) uint8 arrays of possibly different sizes. Everything else is refused with a message
naming what was wrong.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

try:  # torch is a hard dependency of the project, but keep this module importable without it
    import torch
except ImportError:  # pragma: no cover
    torch = None


def _is_uint8(dtype) -> bool:
    # Compared as objects, not as strings: str(dtype) costs microseconds per image on the CPU fast path.
    if isinstance(dtype, np.dtype):
        return dtype == np.uint8
    return torch is not None and dtype == torch.uint8


def _check_one(shape: tuple[int, ...], dtype, where: str) -> tuple[int, int, int]:
    if not _is_uint8(dtype):
        raise TypeError(f"{where}: images must be uint8 (0–255), got dtype {dtype}")
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3:
        raise ValueError(f"{where}: expected an H×W×C image, got shape {tuple(shape)}")
    height, width, channels = (int(v) for v in shape)
    if channels not in (1, 3):
        raise ValueError(f"{where}: images must have 1 or 3 channels (HWC layout), got {channels} in shape {tuple(shape)}")
    if height < 1 or width < 1:
        raise ValueError(f"{where}: empty image of shape {tuple(shape)}")
    return height, width, channels


def as_batch(images) -> tuple[list[np.ndarray] | "torch.Tensor", list[tuple[int, int, int]]]:
    """Check ``images`` and return ``(batch, shapes)``.

    ``batch`` is either a list of HWC uint8 numpy arrays or an N×H×W×C uint8 torch tensor (tensors stay
    on their device); ``shapes`` holds each image's (H, W, C).
    """
    if torch is not None and isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(-1)
        if images.ndim != 4:
            raise ValueError(f"expected an N×H×W×C batch, got tensor shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("empty batch: no images were given")
        shape = _check_one(tuple(images.shape[1:]), images.dtype, "batch")
        return images, [shape] * images.shape[0]
    if isinstance(images, np.ndarray):
        if images.ndim == 3 and images.dtype == np.uint8 and images.shape[-1] not in (1, 3):
            images = images[..., None]  # N×H×W grey
        if images.ndim != 4:
            raise ValueError(f"expected an N×H×W×C batch or a list of H×W×C images, got array shape {images.shape}")
        if images.shape[0] == 0:
            raise ValueError("empty batch: no images were given")
        shape = _check_one(images.shape[1:], images.dtype, "batch")
        return [images[i] for i in range(images.shape[0])], [shape] * images.shape[0]
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        if len(images) == 0:
            raise ValueError("empty batch: no images were given")
        batch, shapes = [], []
        for index, image in enumerate(images):
            if torch is not None and isinstance(image, torch.Tensor):
                image = image.cpu().numpy()
            if not isinstance(image, np.ndarray):
                raise TypeError(f"image {index}: expected a numpy array, got {type(image).__name__}")
            shapes.append(_check_one(image.shape, image.dtype, f"image {index}"))
            batch.append(image if image.ndim == 3 else image[..., None])
        return batch, shapes
    raise TypeError(f"images must be a uint8 array, tensor or list of arrays, got {type(images).__name__}")
