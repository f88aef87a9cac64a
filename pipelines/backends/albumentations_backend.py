"""CPU backend, one image at a time, with albumentations/OpenCV kernels driven by our parameters.

The fused geometry is one ``warpAffine`` (or one ``remap`` when a local warp is present) through
albumentations' functional kernels; the fused colour is one ``cv2.transform`` (3×4 matrix, saturating
to uint8). Plain integer windows (centre crops) are copied by slicing. OpenCV should run single
threaded in each worker process (``cv2.setNumThreads``): parallelism comes from processes.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # never let the import reach the network

import cv2
import numpy as np
import torch
from albumentations.augmentations.geometric import functional as AF

from .. import geometry as G
from ..plan import SamplePlan
from ..source_map import source_map
from .base import Backend, same_output_shape

_BORDERS = {"constant": cv2.BORDER_CONSTANT, "replicate": cv2.BORDER_REPLICATE}


class AlbumentationsBackend(Backend):
    name = "albumentations"
    devices = ("cpu",)

    def run(self, images, plans):
        if isinstance(images, torch.Tensor):
            images = [image for image in images.cpu().numpy()]
        if same_output_shape(plans):
            height, width = plans[0].out_hw
            out = np.empty((len(plans), height, width, plans[0].channels), dtype=np.uint8)
            for index, (image, plan) in enumerate(zip(images, plans)):
                self.apply_one(image, plan, out=out[index])
            return torch.from_numpy(out)
        return [torch.from_numpy(np.ascontiguousarray(self.apply_one(image, plan))) for image, plan in zip(images, plans)]

    # --- one image -----------------------------------------------------------------------------------

    def apply_one(self, image: np.ndarray, plan: SamplePlan, out: np.ndarray | None = None) -> np.ndarray:
        """``image``: H×W×C uint8. Returns out_h×out_w×C uint8, written into ``out`` when given (a
        C-contiguous slot of the batch array: the kernels write there directly, no extra copy)."""
        if plan.color is not None and plan.color_first:
            image = apply_color(image, *plan.color)
        colour_after = plan.color is not None and not plan.color_first
        result = self._geometry(image, plan, None if colour_after else out)
        if colour_after:
            result = apply_color(result, *plan.color, out=out)
        elif out is not None and not np.shares_memory(result, out):
            out[...] = result
        return out if out is not None else result

    def _geometry(self, image: np.ndarray, plan: SamplePlan, out: np.ndarray | None) -> np.ndarray:
        out_h, out_w = plan.out_hw
        copy = plan.pixel_copy()
        if copy is not None:
            top, left, flip_x, flip_y = copy
            height, width = image.shape[:2]
            if 0 <= top and 0 <= left and top + out_h <= height and left + out_w <= width:
                # Crops and mirrors move whole pixels: a slice (and cv2.flip) is exact and far cheaper.
                window = image[top : top + out_h, left : left + out_w]
                if not (flip_x or flip_y):
                    return window
                code = -1 if flip_x and flip_y else (1 if flip_x else 0)
                flipped = cv2.flip(np.ascontiguousarray(window), code, dst=_as_2d(out))
                return flipped if flipped.ndim == 3 else flipped[..., None]
        fill = (float(self.fill),) * image.shape[2]
        border = _BORDERS[self.border]
        if plan.inverse is not None:
            # The kernel of albumentations' own warp_affine, called directly: it takes our dst→src matrix
            # as is (WARP_INVERSE_MAP, no inversion) and writes straight into the batch slot.
            matrix = G.to_pixel_center_inverse(plan.inverse)[:2]
            result = cv2.warpAffine(image, matrix, (out_w, out_h), dst=_as_2d(out), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=border, borderValue=fill)
        else:
            map_x, map_y = source_map(plan)
            result = AF.remap(image, map_x - 0.5, map_y - 0.5, cv2.INTER_LINEAR, border, fill)
        return result if result.ndim == 3 else result[..., None]


def _as_2d(out: np.ndarray | None) -> np.ndarray | None:
    """OpenCV returns H×W for one channel: hand it an H×W view of a grey slot."""
    if out is not None and out.shape[2] == 1:
        return out[..., 0]
    return out


def apply_color(image: np.ndarray, matrix: np.ndarray, offset: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``image`` H×W×C uint8 → ``saturate(round(matrix @ pixel + offset))`` per pixel (0–255 scale),
    one ``cv2.transform`` pass; written into ``out`` when given."""
    affine = np.concatenate([matrix, offset[:, None]], axis=1).astype(np.float32)
    source = np.ascontiguousarray(image)
    if image.shape[2] == 1:  # grey: a 1×2 matrix over an H×W image
        result = cv2.transform(source[..., 0], affine, dst=_as_2d(out))
        return result[..., None] if result.ndim == 2 else result
    return cv2.transform(source, affine, dst=out)
