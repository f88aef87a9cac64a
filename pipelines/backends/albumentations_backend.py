"""CPU backend, one image at a time, with OpenCV kernels (those albumentations calls) driven by our
parameters.

Per sample, the cheapest exact-enough pass its plan allows (decided for the whole batch at once by
:func:`~pipelines.plan.axis_aligned`):

* an integer window, maybe mirrored (crops, centre crops, flips): a slice and ``cv2.flip`` — exact;
* scale + translation, maybe mirrored (random-resized-crops, resizes, resize-then-crop, + flips): one
  ``warpAffine`` of the window the taps read (:func:`~pipelines.backends.opencv_kernels.warp_window`);
* any other affine chain: one ``warpAffine``; a local warp: one ``remap``.

Every resampling pass first reads the source pixels its taps fall in once, in memory order
(:func:`~pipelines.backends.opencv_kernels.read_into_cache`): OpenCV's tiled kernels stall on pixels
not in cache, and the pass costs far less than the stalls (rotations ~1.8× faster).

Why no ``cv2.resize`` for scale + translation: with OpenCV 5, ``warpAffine`` is exact float bilinear
(within one level of float64 on ties) and faster than ``cv2.resize`` of the box in float32 (which needs
two conversions and the outputs whose taps leave the box redone) at every box size measured, from 80²
to 700² boxes into 224² outputs, RGB and grey; OpenCV's uint8 ``cv2.resize`` is slower still and reads
0.12 levels low on average (fixed-point rounding), outside the other backends' parity bounds.

The fused color is one ``cv2.transform`` (3×4 matrix, saturating to uint8).
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # never let an albumentations import reach the network

import numpy as np
import torch

from ..plan import AxisAligned, SamplePlan, axis_aligned
from . import opencv_kernels as K
from .base import Backend, same_output_shape


class AlbumentationsBackend(Backend):
    name = "albumentations"
    devices = ("cpu",)
    reads_only_sampled_pixels = True  # slices, the windows of warp_window, warpAffine/remap taps
    writes_in_place = True  # run(..., out=): each sample's last kernel writes into its row (Pipeline's out=)

    def run(self, images, plans, out: torch.Tensor | None = None):
        """As :meth:`Backend.run`. ``out``: a C-contiguous uint8 CPU tensor N×H×W×C of the plans' common
        output size; each sample's last kernel writes its row (OpenCV's ``dst=``), and ``out`` is returned."""
        if isinstance(images, torch.Tensor):
            images = [image for image in images.cpu().numpy()]
        facts = axis_aligned(plans)
        batch = (facts, K.tap_windows(facts))
        if out is not None:
            rows = out.numpy()  # the tensor's own memory: rows[i] is a view of out[i]
            expected = (len(plans), *plans[0].out_hw, plans[0].channels)
            if not same_output_shape(plans) or rows.shape != expected or not rows.flags.c_contiguous:
                raise ValueError(f"out must be a C-contiguous uint8 array of shape {expected} for these plans, got {rows.shape}")
        elif same_output_shape(plans):
            height, width = plans[0].out_hw
            rows = np.empty((len(plans), height, width, plans[0].channels), dtype=np.uint8)
        else:
            return [torch.from_numpy(np.ascontiguousarray(self._apply(image, plan, batch, index, None))) for index, (image, plan) in enumerate(zip(images, plans))]
        for index, (image, plan) in enumerate(zip(images, plans)):
            self._apply(image, plan, batch, index, rows[index])
        return out if out is not None else torch.from_numpy(rows)

    def _apply(self, image: np.ndarray, plan: SamplePlan, batch: tuple[AxisAligned, K.TapWindows], index: int, out: np.ndarray | None) -> np.ndarray:
        """Sample ``index`` of the batch (H×W×C uint8) → out_h×out_w×C uint8, written into ``out`` when
        given (a C-contiguous slot of the batch array). ``batch``: the batch's axis-aligned facts and
        tap windows."""
        if plan.color is not None and plan.color_first:
            image = K.apply_color(image, *plan.color)
        color_after = plan.color is not None and not plan.color_first
        result = self._geometry(image, plan, batch, index, None if color_after else out)
        if color_after:
            return K.apply_color(result, *plan.color, out=out)
        if out is not None and result is not out and not np.shares_memory(result, out):
            out[...] = result
            return out
        return result

    def _geometry(self, image: np.ndarray, plan: SamplePlan, batch: tuple[AxisAligned, K.TapWindows], index: int, out: np.ndarray | None) -> np.ndarray:
        facts, windows = batch
        if facts.copies[index]:
            top, left = facts.window(index)
            code = K.flip_code(bool(facts.flip_x[index]), bool(facts.flip_y[index]))
            copied = K.copy_window(image, top, left, plan.out_hw, code, out)
            if copied is not None:
                return copied
        if facts.aligned[index]:
            warped = K.warp_window(image, windows, index, plan.out_hw, self.border, self.fill, out)
            if warped is not None:
                return warped
        if plan.inverse is not None:
            return K.warp_affine(image, plan.inverse, plan.out_hw, self.border, self.fill, out)
        return K.remap(image, plan, self.border, self.fill, out)
