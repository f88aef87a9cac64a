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
from ..plan import SamplePlan, source_map
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
                out[index] = self.apply_one(image, plan)
            return torch.from_numpy(out)
        return [torch.from_numpy(self.apply_one(image, plan)) for image, plan in zip(images, plans)]

    # --- one image -----------------------------------------------------------------------------------

    def apply_one(self, image: np.ndarray, plan: SamplePlan) -> np.ndarray:
        """``image``: H×W×C uint8. Returns out_h×out_w×C uint8."""
        if plan.color is not None and plan.color_first:
            image = apply_color(image, *plan.color)
        image = self._geometry(image, plan)
        if plan.color is not None and not plan.color_first:
            image = apply_color(image, *plan.color)
        return image

    def _geometry(self, image: np.ndarray, plan: SamplePlan) -> np.ndarray:
        out_h, out_w = plan.out_hw
        window = plan.integer_window()
        if window is not None:
            top, left = window
            height, width = image.shape[:2]
            if 0 <= top and 0 <= left and top + out_h <= height and left + out_w <= width:
                return image[top : top + out_h, left : left + out_w]
        fill = (float(self.fill),) * image.shape[2]
        border = _BORDERS[self.border]
        if plan.inverse is not None:
            # albumentations' warp_affine takes the forward matrix in OpenCV's pixel-centre convention.
            forward_cv = np.linalg.inv(G.to_pixel_center_inverse(plan.inverse))
            out = AF.warp_affine(image, forward_cv, cv2.INTER_LINEAR, fill, border, (out_h, out_w))
        else:
            map_x, map_y = source_map(plan)
            out = AF.remap(image, map_x - 0.5, map_y - 0.5, cv2.INTER_LINEAR, border, fill)
        return out if out.ndim == 3 else out[..., None]


def apply_color(image: np.ndarray, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``image`` H×W×C uint8 → ``saturate(round(matrix @ pixel + offset))`` per pixel (0–255 scale)."""
    affine = np.concatenate([matrix, offset[:, None]], axis=1).astype(np.float32)
    channels = image.shape[2]
    if channels == 1:  # cv2.transform wants the channel axis to match the matrix; grey is a 1×2 matrix
        return cv2.transform(image, affine)[..., None] if image.ndim == 3 else cv2.transform(image, affine)
    return cv2.transform(np.ascontiguousarray(image), affine)
