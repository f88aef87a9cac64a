"""Geometry maths shared by every backend: affine matrices of the ops and the local-warp field.

Coordinate convention (the same on every backend): continuous image coordinates ``(x, y)`` in pixels,
x to the right, y down, pixel ``(row i, col j)`` covering ``[j, j+1) × [i, i+1)`` so its centre is at
``(j + 0.5, i + 0.5)``. A geometric op maps its input canvas to its output canvas with a *forward*
3×3 matrix; a chain of ops is the product of their matrices, and a backend samples the source at
``inverse(product) @ destination`` — one resampling for the whole chain.
"""

from __future__ import annotations

import math

import numpy as np


def translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def scaling(sx: float, sy: float) -> np.ndarray:
    return np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])


def about_center(linear: np.ndarray, height: float, width: float) -> np.ndarray:
    """A 2×2 linear map applied about the centre of an ``height``×``width`` canvas (size unchanged)."""
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    cx, cy = width / 2.0, height / 2.0
    return translation(cx, cy) @ matrix @ translation(-cx, -cy)


def mirror_matrix(horizontal: bool, vertical: bool, height: int, width: int) -> np.ndarray:
    """Forward matrix of a flip: ``x -> W - x`` and/or ``y -> H - y`` (pixel j lands on W-1-j exactly)."""
    matrix = np.eye(3)
    if horizontal:
        matrix[0, 0], matrix[0, 2] = -1.0, float(width)
    if vertical:
        matrix[1, 1], matrix[1, 2] = -1.0, float(height)
    return matrix


def crop_matrix(top: float, left: float) -> np.ndarray:
    """Forward matrix of cutting a window whose top-left corner is at (left, top) of the input."""
    return translation(-left, -top)


def resized_crop_matrix(top: float, left: float, height: float, width: float, out_h: int, out_w: int) -> np.ndarray:
    """Forward matrix of cutting the box (top, left, height, width) and stretching it to out_h × out_w."""
    return scaling(out_w / width, out_h / height) @ translation(-left, -top)


def rotation_matrix(degrees: float, height: int, width: int) -> np.ndarray:
    """Rotation about the centre; positive angles turn the picture counter-clockwise on screen
    (OpenCV's ``getRotationMatrix2D`` convention)."""
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    return about_center(np.array([[c, s], [-s, c]]), height, width)


def shear_matrix(x_degrees: float, y_degrees: float, height: int, width: int) -> np.ndarray:
    """Shear about the centre: ``x += tan(x_deg) * y`` and ``y += tan(y_deg) * x`` (relative to the centre)."""
    linear = np.array([[1.0, math.tan(math.radians(x_degrees))], [math.tan(math.radians(y_degrees)), 1.0]])
    return about_center(linear, height, width)


def to_pixel_center_inverse(inverse: np.ndarray) -> np.ndarray:
    """Re-express a dst→src matrix for libraries whose pixel centres sit on integers (OpenCV's
    ``warpAffine``/``remap``): ``T(-0.5) @ inverse @ T(+0.5)``. DALI's ``warp_affine`` uses our
    half-integer convention and takes the matrix unchanged."""
    return translation(-0.5, -0.5) @ inverse @ translation(0.5, 0.5)


# --- local warping ---------------------------------------------------------------------------------


def extend_control(control: np.ndarray) -> np.ndarray:
    """Pad a (cells+1, cells+1, 2) control grid with one ring of *negated mirror* points.

    The border control points are zero; mirroring the first interior ring with a minus sign makes
    both the linear and the cubic B-spline field exactly zero on the image border (the odd extension of
    a spline vanishes at its centre), so a warp never pulls in pixels from outside the image.
    Works for numpy arrays and torch tensors (leading batch dimensions allowed).
    """
    first, last = control[..., 1:2, :, :], control[..., -2:-1, :, :]
    rows = _cat([-first, control, -last], axis=-3)
    first, last = rows[..., :, 1:2, :], rows[..., :, -2:-1, :]
    return _cat([-first, rows, -last], axis=-2)


def _cat(parts, axis):
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=axis)
    import torch

    return torch.cat(parts, dim=axis)


def _knots(count: int, like):
    """Knot positions -1, 0, …, count-2 in ``like``'s dtype (and device)."""
    if isinstance(like, np.ndarray):
        return np.arange(-1, count - 1, dtype=like.dtype)
    import torch

    return torch.arange(-1, count - 1, dtype=like.dtype, device=like.device)


def _clip_negative(a):
    """``max(a, 0)`` in place (numpy or torch)."""
    if isinstance(a, np.ndarray):
        return np.maximum(a, 0.0, out=a)
    return a.clamp_(min=0.0)


def _spline(distance, kind: str):
    """Basis function of ``kind`` at ``distance`` (>= 0, knot spacing 1), computed in place: ``distance``
    must be a fresh array (it is overwritten and returned for ``grid``)."""
    if kind == "grid":  # hat: max(1 - d, 0)
        distance -= 1.0
        distance *= -1.0
        return _clip_negative(distance)
    if kind == "elastic":  # cubic B-spline: (max(2 - d, 0)^3 - 4 max(1 - d, 0)^3) / 6
        inner = _clip_negative(1.0 - distance)
        distance -= 2.0
        distance *= -1.0
        outer = _clip_negative(distance)
        weights = outer * outer
        weights *= outer
        cube = inner * inner
        cube *= inner
        cube *= 4.0
        weights -= cube
        weights /= 6.0
        return weights
    raise ValueError(f"unknown warp kind {kind!r}: expected 'grid' or 'elastic'")


def basis_weights(u, count: int, kind: str):
    """Weights of ``count`` control knots (at -1, 0, …, count-2) for positions ``u`` (in cell units).

    ``u``: array (numpy or torch) of any shape; returns ``u.shape + (count,)`` in ``u``'s dtype. ``grid``
    uses the linear hat function, ``elastic`` the cubic B-spline (written with truncated powers so the
    same code runs on numpy and torch).
    """
    return _spline(abs(u[..., None] - _knots(count, u)), kind)


def _knot_major_weights(u, count: int, kind: str):
    """:func:`basis_weights` laid out knots first: ``u`` (..., P) → (..., count, P). Each knot's row is
    then one contiguous run over the points, which elementwise kernels and the sum over knots stream."""
    return _spline(abs(u[..., None, :] - _knots(count, u)[:, None]), kind)


def control_in_pixels(control, height: int, width: int, like=None):
    """The extended control grid (…, cells+3, cells+3, 2) of a warp on a ``height``×``width`` canvas,
    in pixels (controls are fractions of the shorter side); in ``like``'s dtype and device when given."""
    extended = extend_control(control) * float(min(height, width))
    if like is None:
        return extended
    if isinstance(like, np.ndarray):
        return extended.astype(like.dtype, copy=False)
    import torch

    return torch.as_tensor(extended, dtype=like.dtype, device=like.device)


def axis_weights(coordinates, extent: int, cells: int, kind: str):
    """Basis weights (…, cells+3) of pixel ``coordinates`` along one axis of a canvas ``extent`` pixels
    long, cut into ``cells`` cells: :func:`basis_weights` at the coordinates in cell units."""
    return basis_weights(coordinates * (cells / extent), cells + 3, kind)


def warp_displacement(x, y, control, kind: str, height: int, width: int):
    """Displacement (dx, dy) in pixels of the warp at canvas points (x, y).

    ``x``, ``y``: point coordinates (continuous pixel coordinates, numpy or torch): any shape for one
    ``control`` of shape (cells+1, cells+1, 2); shape (B, ...) for a batch of controls (B, cells+1,
    cells+1, 2). Controls are fractions of the shorter side. The sample
    position of destination point p is ``p + displacement(p)``. Computed in the points' dtype.

    Points anywhere (rotated, sheared): every point weighs all K = cells+3 knots per axis. On an
    axis-aligned grid of points :func:`warp_factors` gives the same field for far less work.
    """
    lead = tuple(x.shape[:1]) if control.ndim == 4 else ()  # a batch pairs each sample with its controls
    points_x, points_y = x.reshape(*lead, -1), y.reshape(*lead, -1)  # (..., P)
    cells = control.shape[-3] - 1
    count = cells + 3
    extended = control_in_pixels(control, height, width, like=points_x)  # (..., K rows k, K columns l, 2)
    wy = _knot_major_weights(points_y * (cells / height), count, kind)  # (..., K, P)
    wx = _knot_major_weights(points_x * (cells / width), count, kind)  # (..., K, P)
    # field_c(p) = sum_l wx[l, p] * sum_k C[k, l, c] * wy[k, p]: one product for both components.
    if isinstance(extended, np.ndarray):
        table = np.moveaxis(extended, (-1, -2, -3), (-3, -2, -1))  # (..., 2, K l, K k)
    else:
        table = extended.permute(*range(extended.ndim - 3), -1, -2, -3)
    rows = (table.reshape(*lead, 2 * count, count) @ wy).reshape(*lead, 2, count, -1)  # (..., 2, K, P)
    rows *= wx[..., None, :, :]
    field = rows.sum(-2)  # (..., 2, P)
    return field[..., 0, :].reshape(x.shape), field[..., 1, :].reshape(y.shape)


def warp_factors(xs, ys, control, kind: str, height: int, width: int):
    """The warp on an axis-aligned grid of points, in separable form.

    ``xs`` (W,) and ``ys`` (H,): coordinates of the grid's columns and rows (numpy or torch; with a batch
    of controls (B, cells+1, cells+1, 2), shapes (B, W) and (B, H)). Returns ``(wy, wx, extended)``:
    basis weights (…, H, K) of the rows and (…, W, K) of the columns, K = cells+3, and the extended
    control grid (…, K, K, 2) in pixels, such that the displacement of point ``(xs[j], ys[i])`` is
    ``dx = wy @ extended[..., 0] @ wx^T`` and ``dy = wy @ extended[..., 1] @ wx^T`` at ``[i, j]``: the
    same field as :func:`warp_displacement` (a point's weights factor into a row and a column part),
    for (H + W)·K weights instead of H·W·K.
    """
    cells = control.shape[-3] - 1
    wy, wx = axis_weights(ys, height, cells, kind), axis_weights(xs, width, cells, kind)
    return wy, wx, control_in_pixels(control, height, width, like=xs)


def pixel_centers(height: int, width: int, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Continuous coordinates of every pixel centre of a canvas: two (height, width) arrays (x, y)."""
    xs = np.arange(width, dtype=dtype) + 0.5
    ys = np.arange(height, dtype=dtype) + 0.5
    return np.broadcast_to(xs, (height, width)), np.broadcast_to(ys[:, None], (height, width))
