"""Dense source coordinates of a plan's output pixels: what ``remap`` samples when a local warp is present.

The chain runs destination → source. When the affine pieces the destination pixel centres meet before
the first warp are axis-aligned — scale, translation, flips: crops, resizes, mirrors applied after the
warp — the warp sees an axis-aligned grid of points (x depends on the column only, y on the row only)
and its field factors into small matrices (:func:`geometry.warp_factors`). The affine pieces behind it
(any, rotations included) fold into the same factors, so both coordinate maps come out of one
(2·out_h, K+2) @ (K+2, out_w) product. Other chains (a rotation or shear applied after the warp) take
the general path, where every point weighs every knot.

The arithmetic runs in torch, also when the result is numpy: torch's thread count is the worker's
(``torch.set_num_threads``), while numpy's BLAS keeps a pool of its own that nobody sizes — on a busy
two-core machine a (512, 9) @ (9, 256) float32 product through it took 1–15 ms instead of 20 µs.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import geometry as G
from .plan import AffineStep, SamplePlan, WarpStep

_CPU = torch.device("cpu")


def source_map(plan: SamplePlan, dtype=np.float32, device=None):
    """Dense source coordinates (x, y) — continuous pixel coordinates — of every output pixel centre:
    two (out_h, out_w) arrays. Used when the geometry has a warp.

    numpy arrays of ``dtype`` by default: float32 is computed in float32 (within about two float32
    roundings of the coordinate: measured 4e-5 px on a 256² canvas, 4e-4 px on 2048²), float64 in
    float64. With a torch ``device``, float64 tensors computed there (the same arithmetic; on a GPU the
    general path is ~20× faster).
    """
    if device is None:
        work = torch.float64 if np.dtype(dtype) == np.float64 else torch.float32
        x, y = _evaluate(plan, work, _CPU)
        return x.numpy().astype(dtype, copy=False), y.numpy().astype(dtype, copy=False)
    return _evaluate(plan, torch.float64, torch.device(device))


def opencv_maps(plan: SamplePlan) -> tuple[np.ndarray, np.ndarray]:
    """Maps for ``cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, ...)``: float32 (out_h, out_w) source
    coordinates in OpenCV's convention (pixel centres on integers): ``source_map(plan) - 0.5`` within
    float32 rounding (the shift is folded into the product, not a pass of its own).

    Float maps, not ``cv2.convertMaps`` fixed point: OpenCV 5 interpolates float maps exactly, while
    fixed-point maps snap to 1/32 px — up to 6 levels apart on noise images, outside the torch
    backend's parity bounds — for ~0.1 ms saved of ~0.35 ms per 256² RGB remap.
    """
    x, y = _evaluate(plan, torch.float32, _CPU, shift=0.5)
    return x.numpy(), y.numpy()


def _evaluate(plan: SamplePlan, work: torch.dtype, device: torch.device, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - shift, y - shift) as contiguous (out_h, out_w) tensors of dtype ``work`` on ``device``."""
    steps = plan.chain if plan.chain is not None else [AffineStep(plan.inverse)]
    prefix, k = [], 0  # the leading axis-aligned pieces, as (a, c, e, f): x -> a x + c, y -> e y + f
    while k < len(steps) and isinstance(steps[k], AffineStep) and _axis_aligned(steps[k].inverse):
        (a, _, c), (_, e, f) = steps[k].inverse[:2].tolist()
        prefix.append((a, c, e, f))
        k += 1
    if k < len(steps) and isinstance(steps[k], WarpStep):
        warp, k = steps[k], k + 1
        after = _IDENTITY  # the affine pieces up to the next warp (fuse emits one), folded into U
        while k < len(steps) and isinstance(steps[k], AffineStep):
            after = steps[k].inverse if after is _IDENTITY else steps[k].inverse @ after
            k += 1
        grid = _grid_side(tuple(prefix), plan.out_hw, warp.kind, warp.control.shape[0] - 1, (warp.height, warp.width), work, device)
        x, y = _separable(grid, warp, after, work, device, shift if k == len(steps) else 0.0)
        if k == len(steps):
            return x, y  # views of one fresh tensor, shift included
    else:
        cols, rows = _axis_coordinates(prefix, plan.out_hw)
        out_h, out_w = plan.out_hw
        x = torch.as_tensor(cols, dtype=work, device=device).expand(out_h, out_w)
        y = torch.as_tensor(rows, dtype=work, device=device)[:, None].expand(out_h, out_w)
    for step in steps[k:]:  # the general path: points anywhere
        if isinstance(step, AffineStep):
            (a, b, c), (d, e, f) = step.inverse[:2].tolist()
            x, y = a * x + b * y + c, d * x + e * y + f
        else:
            control = torch.as_tensor(step.control, dtype=work, device=device)
            dx, dy = G.warp_displacement(x, y, control, step.kind, step.height, step.width)
            x, y = x + dx, y + dy
    x, y = x.contiguous(), y.contiguous()  # no stride-0 broadcasts: callers may write in place
    if shift:
        x -= shift
        y -= shift
    return x, y


_IDENTITY = np.eye(3)


def _axis_aligned(inverse: np.ndarray) -> bool:
    """True when the affine piece maps x to x and y to y separately (no rotation, no shear). Exact
    zeros only: the fused matrices of crops, resizes and flips have them, and the factored field is
    then the same maths as the dense one."""
    return inverse[0, 1] == 0.0 and inverse[1, 0] == 0.0


def _axis_coordinates(prefix, out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Source x of every output column and source y of every row after the axis-aligned ``prefix``."""
    out_h, out_w = out_hw
    cols = np.arange(out_w, dtype=np.float64) + 0.5
    rows = np.arange(out_h, dtype=np.float64) + 0.5
    for a, c, e, f in prefix:
        cols, rows = a * cols + c, e * rows + f
    return cols, rows


@functools.lru_cache(maxsize=8)  # a worker sees one or a few sizes; an entry of a 4096² canvas is ~2 MB
def _grid_side(prefix: tuple, out_hw: tuple[int, int], kind: str, cells: int, canvas: tuple[int, int], work, device):
    """The half of the separable product that depends on the sample's shape only — output size,
    axis-aligned prefix, warp grid — not on its controls, so samples of one size share it (a plain warp,
    or a resize before it): row coordinates (H,) and weights Wy (H, K), read-only numpy float64, and
    V = [Wx, cols, 1] (W, K+2) in ``work`` on ``device``."""
    cols, rows = _axis_coordinates(prefix, out_hw)
    height, width = canvas
    wy, wx = G.axis_weights(rows, height, cells, kind), G.axis_weights(cols, width, cells, kind)
    right = np.empty((len(cols), cells + 5))
    right[:, :-2], right[:, -2], right[:, -1] = wx, cols, 1.0
    for array in (rows, wy):
        array.setflags(write=False)
    return rows, wy, torch.from_numpy(right).to(device=device, dtype=work)


def _separable(grid, warp: WarpStep, after: np.ndarray, work, device, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - shift, y - shift) after ``warp`` on the grid of points (cols[j], rows[i]) followed by the
    affine ``after``: two views of one contiguous (2 out_h, out_w) tensor.

    With the warp factors, x = cols[j] + (Wy Cx Wx^T)[i, j] and y = rows[i] + (Wy Cy Wx^T)[i, j]; the
    affine piece gives x' = a x + b y + c = (Wy (a Cx + b Cy))[i]·Wx[j] + a cols[j] + (b rows[i] + c):
    a rank-(K+2) product U @ V^T with V = [Wx, cols, 1] (see :func:`_grid_side`).
    """
    rows, wy, right = grid
    height, count = wy.shape
    extended = G.control_in_pixels(warp.control, warp.height, warp.width)  # (K rows, K columns, 2)
    if after is not _IDENTITY:
        extended = extended @ after[:2, :2].T  # [..., 0] = a Cx + b Cy, [..., 1] = d Cx + e Cy
    table = extended.transpose(0, 2, 1).reshape(count, 2 * count)  # [k, (component, l)]
    # U is formed in float64 and rounded once, into the product's dtype.
    left = np.empty((2, height, count + 2), dtype=np.float32 if work == torch.float32 else np.float64)
    left[:, :, :count] = (wy @ table).reshape(height, 2, count).transpose(1, 0, 2)
    left[:, :, count] = after[:2, :1]  # a, d
    left[:, :, count + 1] = after[:2, 1:2] * rows + (after[:2, 2:] - shift)  # b rows + c, e rows + f
    left = torch.from_numpy(left.reshape(2 * height, count + 2)).to(device=device, dtype=work)
    both = left @ right.T  # (2 out_h, out_w): x on top of y
    return both[:height], both[height:]
