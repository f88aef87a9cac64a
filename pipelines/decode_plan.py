"""Plan-aware decoding: what part of the source a plan reads, at what resolution, and the same plan
re-aimed at a decoded region.

A sample's parameters depend only on its image's shape, so a worker can read a file's header, fuse
the plan, and only then decode — the region the plan samples, at the largest JPEG DCT reduction
(1/2, 1/4, 1/8) that still gives the output at least one source pixel per output pixel along every
direction. :func:`reaim` folds the region's offset and the reduction into the plan's matrix, so the
geometry is unchanged: output pixel ``p`` samples the same point of the picture as before.

Coordinates are continuous pixel coordinates of the full-resolution source (:mod:`pipelines.geometry`).
A decoded array at ``factor`` placed at ``(top, left)`` holds, in its pixel ``(i, j)``, the square
``[left + factor j, left + factor (j + 1)) × [top + factor i, top + factor (i + 1))``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .plan import AffineStep, SamplePlan

REDUCTIONS = (8, 4, 2, 1)  # what JPEG's DCT scaling offers (libjpeg also has 3/8 … 7/8; not used)


def source_box(plan: SamplePlan) -> tuple[float, float, float, float] | None:
    """``(x0, y0, x1, y1)``: the part of the source the plan's bilinear taps can touch (its output's
    corners mapped back, one pixel of margin), clipped to the image; None when the plan reads the
    whole image anyway (a local warp) or nothing of it."""
    if plan.inverse is None:
        return None
    return affine_source_box(plan.inverse, plan.out_hw, plan.in_shape[:2])


def affine_source_box(inverse: np.ndarray, out_hw: tuple[int, int], in_hw: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """:func:`source_box` of the affine dst→src map ``inverse`` (3×3) from an ``in_hw`` source into
    ``out_hw``: the map is affine, so the output's four corners bound where every point lands. Plain
    Python floats: the OpenCV kernels ask for it once per image."""
    (a, b, c), (d, e, f) = inverse[:2].tolist()
    out_h, out_w = out_hw
    xs = (c, a * out_w + c, b * out_h + c, a * out_w + b * out_h + c)
    ys = (f, d * out_w + f, e * out_h + f, d * out_w + e * out_h + f)
    if not all(map(math.isfinite, (*xs, *ys))):  # min/max would skip a NaN that is not first
        return None
    return clipped_box((min(xs), max(xs)), (min(ys), max(ys)), in_hw)


def affine_source_boxes(inverse: np.ndarray, out_hw: np.ndarray, in_hw: np.ndarray) -> list[tuple[float, float, float, float] | None]:
    """:func:`affine_source_box` of N samples at once — ``inverse`` (N, 3, 3) float64, ``out_hw`` and
    ``in_hw`` (N, 2) — in whole-batch numpy operations: the same float64 operations in the same order
    as the one-sample version (and :func:`clipped_box`), so the same boxes, for a batch planned on a
    device whose matrices come to the host as one array."""
    a, b, c = inverse[:, 0, 0], inverse[:, 0, 1], inverse[:, 0, 2]
    d, e, f = inverse[:, 1, 0], inverse[:, 1, 1], inverse[:, 1, 2]
    out_h, out_w = (np.asarray(out_hw)[:, k].astype(np.float64) for k in (0, 1))
    xs = np.stack([c, a * out_w + c, b * out_h + c, a * out_w + b * out_h + c])
    ys = np.stack([f, d * out_w + f, e * out_h + f, d * out_w + e * out_h + f])
    height, width = (np.asarray(in_hw)[:, k].astype(np.float64) for k in (0, 1))
    with np.errstate(invalid="ignore"):  # a non-finite corner makes that sample's box None below
        x0, x1 = np.maximum(xs.min(axis=0) - 1.0, 0.0), np.minimum(xs.max(axis=0) + 1.0, width)
        y0, y1 = np.maximum(ys.min(axis=0) - 1.0, 0.0), np.minimum(ys.max(axis=0) + 1.0, height)
        kept = np.isfinite(xs).all(axis=0) & np.isfinite(ys).all(axis=0) & (x1 > x0) & (y1 > y0)
    boxes = np.stack([x0, y0, x1, y1], axis=1).tolist()
    return [tuple(box) if keep else None for box, keep in zip(boxes, kept.tolist())]


def clipped_box(x_range: tuple[float, float], y_range: tuple[float, float], in_hw: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """``(x0, y0, x1, y1)``: the source pixels bilinear taps at points within ``x_range`` × ``y_range``
    (continuous coordinates) can touch — one pixel of margin each side — clipped to an ``in_hw``
    image. None when that is empty or a bound is not finite."""
    if not all(math.isfinite(bound) for bound in (*x_range, *y_range)):
        return None
    height, width = in_hw
    x0, x1 = max(x_range[0] - 1.0, 0.0), min(x_range[1] + 1.0, float(width))
    y0, y1 = max(y_range[0] - 1.0, 0.0), min(y_range[1] + 1.0, float(height))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def largest_reduction(plan: SamplePlan) -> int:
    """The largest factor of :data:`REDUCTIONS` at which the source still has at least one pixel per
    output pixel along every direction: the smallest singular value of the plan's dst→src linear
    part (source pixels per output pixel, least-stretched direction). 1 for a local warp."""
    if plan.inverse is None:
        return 1
    linear = plan.inverse[:2, :2]
    smallest = float(np.linalg.svd(linear, compute_uv=False).min())
    for factor in REDUCTIONS:
        if smallest >= factor - 1e-9:
            return factor
    return 1


def on_canvas(region: np.ndarray, top: int, left: int, shape: tuple[int, ...]) -> np.ndarray:
    """A full-resolution region put back where it came from, on a zero canvas of the image's
    ``shape`` (H×W×C): the plan then runs unchanged, so its output has the same bytes as with the
    whole image decoded — re-aiming the matrix instead would shift the warp's coordinate arithmetic
    and flip a few roundings. Cheap: the canvas is ``np.zeros`` (pages the OS hands out zeroed on
    first touch), and only the region's pages are written; the plan reads nothing outside the region
    (:func:`source_box` covers every bilinear tap)."""
    canvas = np.zeros(shape, dtype=region.dtype)
    height, width = region.shape[:2]
    canvas[top : top + height, left : left + width] = region
    return canvas


def reaim(plan: SamplePlan, factor: int, top: int, left: int, shape: tuple[int, ...]) -> SamplePlan:
    """``plan`` sampling a decoded array of ``shape`` (H×W×C) placed at ``(top, left)`` at
    ``factor``, instead of the full-resolution source: array coordinates are
    ``(x - left) / factor``, folded into the matrix (or into the chain's last step)."""
    to_array = np.array([[1.0 / factor, 0.0, -left / factor], [0.0, 1.0 / factor, -top / factor], [0.0, 0.0, 1.0]])
    in_shape = (int(shape[0]), int(shape[1]), plan.in_shape[2])
    if plan.inverse is not None:
        return replace(plan, in_shape=in_shape, inverse=to_array @ plan.inverse)
    chain = list(plan.chain)
    chain[-1] = AffineStep(to_array @ chain[-1].inverse)  # the step that lands on the source
    return replace(plan, in_shape=in_shape, chain=chain)

