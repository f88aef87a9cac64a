"""OpenCV kernels that execute one sample's plan on the CPU: uint8 H×W×C in, uint8 out.

Shared by the albumentations backend (every pass) and the DALI backend (the remaps DALI's CPU build
lacks). Each kernel writes into ``out`` when given — a C-contiguous out_h×out_w×C slot of the batch
array — so a batch is filled in place. OpenCV should run single threaded in each worker process
(``cv2.setNumThreads``): parallelism comes from processes.

Coordinates follow :mod:`pipelines.geometry` (pixel centres at ``j + 0.5``); OpenCV puts them on
integers, hence :func:`~pipelines.geometry.to_pixel_center_inverse` and the ``- 0.5`` of the maps.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .. import geometry as G
from ..borders import BORDERS
from ..plan import AxisAligned, SamplePlan
from ..source_map import opencv_maps

# The resize path computes ``k`` extra output columns/rows when its region of interest cannot start
# where the output does; past this many times the output's area, warpAffine is cheaper.
_MAX_RESIZE_WASTE = 3.0
# The resize path converts its whole region to float32: when shrinking a region of more than this many
# times the output's pixels, warpAffine (whose cost follows the output alone) is cheaper. Measured on
# 224² outputs: float resize 140 µs from 300², 250 µs from 600², 460 µs from 900²; warpAffine ~280 µs.
_MAX_REGION_PER_OUTPUT = 6.0
_ATOL = 1e-9


def as_2d(out: np.ndarray | None) -> np.ndarray | None:
    """OpenCV returns H×W for one channel: hand it an H×W view of a grey slot."""
    if out is not None and out.shape[2] == 1:
        return out[..., 0]
    return out


def _hwc(result: np.ndarray) -> np.ndarray:
    return result if result.ndim == 3 else result[..., None]


def flip_code(flip_x: bool, flip_y: bool) -> int | None:
    """``cv2.flip``'s code for the mirrors (None: no mirror)."""
    if flip_x and flip_y:
        return -1
    if flip_x:
        return 1
    return 0 if flip_y else None


def copy_window(image: np.ndarray, top: int, left: int, out_hw: tuple[int, int], code: int | None, out: np.ndarray | None) -> np.ndarray | None:
    """The integer window ``image[top:top+out_h, left:left+out_w]``, mirrored by ``code`` — exact, a
    memory copy. None when the window leaves the image (then the border mode decides the pixels)."""
    out_h, out_w = out_hw
    height, width = image.shape[:2]
    if not (0 <= top and 0 <= left and top + out_h <= height and left + out_w <= width):
        return None
    window = image[top : top + out_h, left : left + out_w]
    if code is None:
        if out is None:
            return window
        out[...] = window
        return out
    return _hwc(cv2.flip(window, code, dst=as_2d(out)))


def warp_affine(image: np.ndarray, inverse: np.ndarray, out_hw: tuple[int, int], border: str, fill: int, out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear resampling at ``inverse @ destination`` (3×3, dst→src, continuous coordinates): one
    ``warpAffine`` with the inverse map as is (``WARP_INVERSE_MAP``: no inversion)."""
    out_h, out_w = out_hw
    matrix = G.to_pixel_center_inverse(inverse)[:2]
    fills = (float(fill),) * image.shape[2]
    return _hwc(cv2.warpAffine(image, matrix, (out_w, out_h), dst=as_2d(out), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=BORDERS[border].opencv, borderValue=fills))


def remap(image: np.ndarray, plan: SamplePlan, border: str, fill: int, out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear resampling at the plan's dense source map (plans with a local warp)."""
    map_x, map_y = opencv_maps(plan)
    fills = (float(fill),) * image.shape[2]
    return _hwc(cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, dst=as_2d(out), borderMode=BORDERS[border].opencv, borderValue=fills))


def _resize_region(start: float, scale: float, count: int, extent: int) -> tuple[int, int, int] | None:
    """Along one axis: ``(first, skip, length)`` such that resizing source pixels
    ``[first, first + length)`` by ``1 / scale`` and dropping the first ``skip`` outputs gives output
    pixels whose centres sample ``start + scale * (j + 0.5)`` — or None when no such whole-pixel
    region exists inside ``[0, extent)``.

    ``cv2.resize`` with an explicit factor samples ``first + scale * (k + 0.5)`` for its output ``k``,
    so ``first + skip * scale`` must equal ``start``: ``skip = 0`` (the output starts on a whole
    pixel: crops, random-resized-crops) or ``first = 0`` (a resize followed by a crop)."""
    for skip in (0, round(start / scale)):
        first = start - skip * scale
        if skip < 0 or first < -_ATOL or abs(first - round(first)) > 1e-6:
            continue
        first = int(round(first))
        # cv2.resize makes round(length / scale) outputs: take just enough source pixels.
        length = min(extent - first, math.ceil((skip + count) * scale - 1e-6))
        if length >= 1 and round(length / scale) >= skip + count:
            return first, skip, length
    return None


def resize_window(image: np.ndarray, facts: AxisAligned, i: int, out_hw: tuple[int, int], border: str, fill: int, out: np.ndarray | None) -> np.ndarray | None:
    """Sample ``i`` of an axis-aligned batch (scale + translation, maybe mirrored) as one
    ``cv2.resize`` of a whole-pixel region instead of a ``warpAffine``: ~3× cheaper per output pixel.
    None when the plan has no such region (a sub-pixel offset) or it would cost more than the warp
    (too many outputs computed only to be dropped, or a region much larger than the output).

    Output pixels whose bilinear taps reach past the region — at most about ``0.5 / scale`` on each
    side, and only when enlarging — are redone by ``warpAffine`` on those strips alone, so the
    result is the warp's everywhere up to OpenCV's fixed-point rounding (at most one level)."""
    out_h, out_w = out_hw
    height, width = image.shape[:2]
    sx, sy, left, top = float(facts.scale_x[i]), float(facts.scale_y[i]), float(facts.left[i]), float(facts.top[i])
    across = _resize_region(left, sx, out_w, width)
    down = _resize_region(top, sy, out_h, height)
    if across is None or down is None:
        return None
    (x0, skip_x, length_x), (y0, skip_y, length_y) = across, down
    if (skip_x + out_w) * (skip_y + out_h) > _MAX_RESIZE_WASTE * out_w * out_h:
        return None
    if length_x * length_y > _MAX_REGION_PER_OUTPUT * out_w * out_h:
        return None
    code = flip_code(bool(facts.flip_x[i]), bool(facts.flip_y[i]))
    # A mirror commutes with resizing a region that maps exactly onto the output: mirror whichever
    # of the two is smaller (the region, when enlarging).
    exact_fit = skip_x == 0 and skip_y == 0 and round(length_x / sx) == out_w and round(length_y / sy) == out_h
    flip_first = code is not None and exact_fit and length_x * length_y < out_w * out_h
    region = image[y0 : y0 + length_y, x0 : x0 + length_x]
    if flip_first:
        region = _hwc(cv2.flip(region, code))
    # In float32: OpenCV's uint8 resize truncates its fixed-point sums (0.12 levels low on average);
    # float weights and one rounding at the end agree with the warp and the other backends.
    resized = cv2.resize(region.astype(np.float32), None, fx=1.0 / sx, fy=1.0 / sy, interpolation=cv2.INTER_LINEAR)
    target = out if code is None or flip_first else None
    # convertScaleAbs: round half to even and saturate to uint8 (values are never negative).
    result = _hwc(cv2.convertScaleAbs(resized[skip_y : skip_y + out_h, skip_x : skip_x + out_w], dst=as_2d(target)))
    (n_left, n_right), (n_top, n_bottom) = _edge_strips(left, sx, out_w, x0, x0 + length_x), _edge_strips(top, sy, out_h, y0, y0 + length_y)
    if n_left or n_right or n_top or n_bottom:
        # Column j of the result samples x = a * (j + 0.5) + tx: mirrored when flipped first.
        a, tx, d, ty = sx, left, sy, top
        if flip_first and facts.flip_x[i]:
            a, tx, n_left, n_right = -sx, left + sx * out_w, n_right, n_left
        if flip_first and facts.flip_y[i]:
            d, ty, n_top, n_bottom = -sy, top + sy * out_h, n_bottom, n_top
        _redo_edges(image, (a, tx, d, ty), result, ((n_left, n_right), (n_top, n_bottom)), border, fill)
    if code is not None and not flip_first:
        return _hwc(cv2.flip(result, code, dst=as_2d(out)))
    return result


def _edge_strips(start: float, scale: float, count: int, first: int, end: int) -> tuple[int, int]:
    """How many outputs at each end sample closer than half a pixel to the region's edge: their
    bilinear taps would reach past ``[first, end)``, where ``cv2.resize`` clamps. Output ``j``
    samples ``start + scale * (j + 0.5)``; only an enlargement (scale < 1) has any."""
    low = math.ceil((first + 0.5 - start) / scale - 0.5 - 1e-7)
    high = count - 1 - math.floor((end - 0.5 - start) / scale - 0.5 + 1e-7)
    return min(max(low, 0), count), min(max(high, 0), count)


def _redo_edges(image: np.ndarray, axes: tuple[float, float, float, float], result: np.ndarray, edges, border: str, fill: int) -> None:
    """Overwrite the edge strips of ``result`` with ``warpAffine`` on each strip's own output window.
    ``axes``: ``(a, tx, d, ty)``: output pixel (i, j) of ``result`` samples source
    ``(a (j + 0.5) + tx, d (i + 0.5) + ty)`` (``a``, ``d`` negative where mirrored)."""
    a, tx, d, ty = axes
    out_h, out_w = result.shape[:2]
    (n_left, n_right), (n_top, n_bottom) = edges
    fills = (float(fill),) * image.shape[2]
    mode = BORDERS[border].opencv
    strips = [(0, n_top, 0, out_w), (out_h - n_bottom, out_h, 0, out_w), (0, out_h, 0, n_left), (0, out_h, out_w - n_right, out_w)]
    for r0, r1, c0, c1 in strips:
        if r1 <= r0 or c1 <= c0:
            continue
        # OpenCV's integer pixel centres, origin at the strip: x_pixel = a * c + a * (c0 + 0.5) + tx - 0.5.
        matrix = np.array([[a, 0.0, a * (c0 + 0.5) + tx - 0.5], [0.0, d, d * (r0 + 0.5) + ty - 0.5]])
        # Written in place: OpenCV takes the strided view of the strip as its destination.
        cv2.warpAffine(image, matrix, (c1 - c0, r1 - r0), dst=as_2d(result[r0:r1, c0:c1]), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=mode, borderValue=fills)


def apply_color(image: np.ndarray, matrix: np.ndarray, offset: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``image`` H×W×C uint8 → ``saturate(round(matrix @ pixel + offset))`` per pixel (0–255 scale),
    one ``cv2.transform`` pass; written into ``out`` when given."""
    affine = np.concatenate([matrix, offset[:, None]], axis=1).astype(np.float32)
    source = np.ascontiguousarray(image)
    if image.shape[2] == 1:  # grey: a 1×2 matrix over an H×W image
        return _hwc(cv2.transform(source[..., 0], affine, dst=as_2d(out)))
    return cv2.transform(source, affine, dst=out)
