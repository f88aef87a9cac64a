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
from dataclasses import dataclass

import cv2
import numpy as np

from .. import geometry as G
from ..borders import BORDERS
from ..decode_plan import affine_source_box, clipped_box
from ..plan import AxisAligned, SamplePlan
from ..source_map import opencv_maps


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


# Below this many source pixels a read pass costs more than the stalls it saves (a 32² crop of a
# rotation: +3 µs per image with the pass; from 48², a gain).
MIN_READ_PIXELS = 2048


def read_into_cache(image: np.ndarray, box: tuple[float, float, float, float] | None) -> None:
    """One sequential read of the pixels of ``box`` = ``(x0, y0, x1, y1)``, continuous coordinates as
    :func:`~pipelines.decode_plan.source_box` gives them (None: nothing), whose result is not needed.
    OpenCV 5's ``warpAffine`` and ``remap`` work through their output in tiles, so they read
    their source in short runs the hardware prefetcher does not follow: on pixels not in cache (a
    batch of inputs outgrows the core's L2) they stall on every run, and one pass in memory order
    first (``cv2.sumElems``) costs far less than those stalls. Measured per image, one core, batches
    of 64 256² inputs into 224² outputs (medians of interleaved rounds, AMD EPYC), without and with
    the pass: the kernel loops of rotate ±15° 314 → 178 µs and random-resized-crop + flip 131–140 →
    61 µs (:func:`warp_window`); whole pipelines of shear ±10° 328 → 195 µs and local warps
    (``remap``) 535 → 520 µs. On 1600×1200 photos (24 per batch, from memory) whole pipelines went
    from 598 to 447 µs per image resizing to a 224 short side (the pass reads every row, the taps
    two in five: still a gain), 543 → 489 µs for random-resized-crop + flip and 1054 → 741 µs
    for resize + rotate ±15° + centre crop. Other passes measured the same (a single-channel sum,
    ``countNonZero``, ``NORM_INF``) or slower (one byte per cache line: +7%; software prefetches:
    +80%). Skipped for boxes under :data:`MIN_READ_PIXELS`."""
    if box is not None:
        x0, y0, x1, y1 = math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])
        if (y1 - y0) * (x1 - x0) >= MIN_READ_PIXELS:
            cv2.sumElems(image[y0:y1, x0:x1])


def warp_affine(image: np.ndarray, inverse: np.ndarray, out_hw: tuple[int, int], border: str, fill: int, out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear resampling at ``inverse @ destination`` (3×3, dst→src, continuous coordinates): one
    ``warpAffine`` with the inverse map as is (``WARP_INVERSE_MAP``: no inversion), after one read
    pass over the source box its taps fall in (:func:`read_into_cache`; the map is affine, so the
    output's corner pixels bound it) — unless the source area they cover, ``|det| · out_h · out_w``,
    is under :data:`MIN_READ_PIXELS`, where even computing the box costs more than it saves."""
    out_h, out_w = out_hw
    matrix = G.to_pixel_center_inverse(inverse)[:2]
    if abs(inverse[0, 0] * inverse[1, 1] - inverse[0, 1] * inverse[1, 0]) * out_h * out_w >= MIN_READ_PIXELS:  # the source area: worth a pass
        read_into_cache(image, affine_source_box(inverse, out_hw, image.shape[:2]))
    fills = (float(fill),) * image.shape[2]
    return _hwc(cv2.warpAffine(image, matrix, (out_w, out_h), dst=as_2d(out), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=BORDERS[border].opencv, borderValue=fills))


def remap(image: np.ndarray, plan: SamplePlan, border: str, fill: int, out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear resampling at the plan's dense source map (plans with a local warp), after one read
    pass over the box its coordinates span (:func:`read_into_cache`)."""
    map_x, map_y = opencv_maps(plan)
    x_min, x_max = cv2.minMaxLoc(map_x)[:2]
    y_min, y_max = cv2.minMaxLoc(map_y)[:2]
    # The maps are in OpenCV's convention (pixel centres on integers): + 0.5 to continuous coordinates.
    read_into_cache(image, clipped_box((x_min + 0.5, x_max + 0.5), (y_min + 0.5, y_max + 0.5), image.shape[:2]))
    fills = (float(fill),) * image.shape[2]
    return _hwc(cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, dst=as_2d(out), borderMode=BORDERS[border].opencv, borderValue=fills))


@dataclass(frozen=True)
class TapWindows:
    """Per sample of a batch, for its axis-aligned plans (scale + translation, maybe mirrored): the
    source window ``image[y0:y1, x0:x1]`` that the bilinear taps read (plus a margin of one pixel),
    and the 2×3 matrix for ``warpAffine(..., WARP_INVERSE_MAP)`` from the output to that window
    (negative scales where the plan mirrors). ``inside[i]``: the window lies inside the image with
    its margin, so no tap can leave it and the border mode cannot matter. Rows of other samples are
    meaningless.
    """

    bounds: list[tuple[int, int, int, int]]  # (y0, y1, x0, x1)
    matrices: np.ndarray  # (N, 2, 3) float64, OpenCV's pixel centres (on integers)
    inside: list[bool]


def _tap_span(start: np.ndarray, scale: np.ndarray, count: np.ndarray, extent: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis, per sample: the source pixels ``[first, end)`` that the bilinear taps of
    ``count`` outputs sampling ``start + scale * (j + 0.5)`` read, plus one pixel of margin each side
    (OpenCV computes the coordinates in its own float arithmetic), clipped to ``[0, extent)``, and
    whether it needed no clipping. Where the span is clipped, the taps may leave the image there and
    the border mode decides them, as on the whole image."""
    first = np.floor(start + 0.5 * scale - 0.5) - 1
    end = np.floor(start + (count - 0.5) * scale - 0.5) + 3
    inside = (first >= 0) & (end <= extent)
    return np.maximum(first, 0).astype(np.int64), np.minimum(end, extent).astype(np.int64), inside


def tap_windows(facts: AxisAligned) -> TapWindows:
    """The :class:`TapWindows` of a batch, computed for the whole batch at once."""
    out_h, out_w = facts.out_hw[:, 0], facts.out_hw[:, 1]
    x0, x1, inside_x = _tap_span(facts.left, facts.scale_x, out_w, facts.in_hw[:, 1])
    y0, y1, inside_y = _tap_span(facts.top, facts.scale_y, out_h, facts.in_hw[:, 0])
    # Output column j samples window x = start + step * (j + 0.5): step = scale_x, or -scale_x from
    # the box's right edge when mirrored. OpenCV's pixel centres sit on integers: hence the 0.5 terms.
    step_x = np.where(facts.flip_x, -facts.scale_x, facts.scale_x)
    step_y = np.where(facts.flip_y, -facts.scale_y, facts.scale_y)
    start_x = facts.left - x0 + np.where(facts.flip_x, facts.scale_x * out_w, 0.0)
    start_y = facts.top - y0 + np.where(facts.flip_y, facts.scale_y * out_h, 0.0)
    matrices = np.zeros((len(x0), 2, 3))
    matrices[:, 0, 0], matrices[:, 1, 1] = step_x, step_y
    matrices[:, 0, 2] = start_x + 0.5 * step_x - 0.5
    matrices[:, 1, 2] = start_y + 0.5 * step_y - 0.5
    return TapWindows(list(zip(y0.tolist(), y1.tolist(), x0.tolist(), x1.tolist())), matrices, (inside_x & inside_y).tolist())


def warp_window(image: np.ndarray, windows: TapWindows, i: int, out_hw: tuple[int, int], border: str, fill: int, out: np.ndarray | None) -> np.ndarray | None:
    """Sample ``i`` of an axis-aligned batch (scale + translation, maybe mirrored): one ``warpAffine``
    of the window of source pixels its taps read, after one read pass over that window
    (:func:`read_into_cache`). None when the window is empty (the taps all leave the image: the plain
    warp decides them by the border mode).

    The same samples as :func:`warp_affine` with the plan's matrix (up to the float rounding of the
    coordinates: at most one level, on ties), faster: where no tap can leave the window, OpenCV's
    replicate border runs instead of the spec's (~10% faster; the same pixels). A mirrored plan warps
    the window with a negative scale: once the window is in cache, walking it backwards costs no more
    than forwards. (Mirroring it into a copy first, the earlier way, measured 6–8% slower in the kernel
    loop of 224² random-resized-crops with flips, 0–3% of the whole pipeline; uncached, the backwards
    walk had doubled the warp's time.)"""
    y0, y1, x0, x1 = windows.bounds[i]
    if x1 <= x0 or y1 <= y0:
        return None
    read_into_cache(image, (x0, y0, x1, y1))
    window = image[y0:y1, x0:x1]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    if windows.inside[i]:
        return _hwc(cv2.warpAffine(window, windows.matrices[i], (out_hw[1], out_hw[0]), dst=as_2d(out), flags=flags, borderMode=cv2.BORDER_REPLICATE))
    fills = (float(fill),) * image.shape[2]
    return _hwc(cv2.warpAffine(window, windows.matrices[i], (out_hw[1], out_hw[0]), dst=as_2d(out), flags=flags, borderMode=BORDERS[border].opencv, borderValue=fills))


def apply_color(image: np.ndarray, matrix: np.ndarray, offset: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``image`` H×W×C uint8 → ``saturate(round(matrix @ pixel + offset))`` per pixel (0–255 scale),
    one ``cv2.transform`` pass; written into ``out`` when given."""
    affine = np.concatenate([matrix, offset[:, None]], axis=1).astype(np.float32)
    source = np.ascontiguousarray(image)
    if image.shape[2] == 1:  # grey: a 1×2 matrix over an H×W image
        return _hwc(cv2.transform(source[..., 0], affine, dst=as_2d(out)))
    return cv2.transform(source, affine, dst=out)
