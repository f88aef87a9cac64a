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


def basis_weights(u, count: int, kind: str):
    """Weights of ``count`` control knots (at -1, 0, …, count-2) for positions ``u`` (in cell units).

    ``u``: array (numpy or torch) of any shape; returns ``u.shape + (count,)``. ``grid`` uses the linear
    hat function, ``elastic`` the cubic B-spline (written with truncated powers so the same code runs on
    numpy and torch).
    """
    if isinstance(u, np.ndarray):
        knots = np.arange(-1, count - 1, dtype=u.dtype)
    else:
        import torch

        knots = torch.arange(-1, count - 1, dtype=u.dtype, device=u.device)
    distance = abs(u[..., None] - knots)
    if kind == "grid":
        return (1.0 - distance).clip(min=0.0)
    if kind == "elastic":
        return ((2.0 - distance).clip(min=0.0) ** 3 - 4.0 * (1.0 - distance).clip(min=0.0) ** 3) / 6.0
    raise ValueError(f"unknown warp kind {kind!r}: expected 'grid' or 'elastic'")


def warp_displacement(x, y, control, kind: str, height: int, width: int):
    """Displacement (dx, dy) in pixels of the warp at canvas points (x, y).

    ``x``, ``y``: point coordinates (continuous pixel coordinates, numpy or torch): any shape for one
    ``control`` of shape (cells+1, cells+1, 2); shape (B, ...) for a batch of controls (B, cells+1,
    cells+1, 2). Controls are fractions of the shorter side. The sample
    position of destination point p is ``p + displacement(p)``.
    """
    if control.ndim == 4 and x.ndim > 2:
        # Batched controls (B, K, K, 2) pair with points (B, P): flatten (B, H, W) points so the
        # matmul below pairs each sample's points with its own controls.
        batch_shape = x.shape
        dx, dy = warp_displacement(x.reshape(batch_shape[0], -1), y.reshape(batch_shape[0], -1), control, kind, height, width)
        return dx.reshape(batch_shape), dy.reshape(batch_shape)
    cells = control.shape[-3] - 1
    extended = extend_control(control) * float(min(height, width))
    count = cells + 3
    wy = basis_weights(y * (cells / height), count, kind)  # (..., K)
    wx = basis_weights(x * (cells / width), count, kind)  # (..., K)
    # field_c(p) = sum_k sum_l wy[p, k] * C[k, l, c] * wx[p, l]
    dx = ((wy @ extended[..., 0]) * wx).sum(-1)
    dy = ((wy @ extended[..., 1]) * wx).sum(-1)
    return dx, dy


def pixel_centers(height: int, width: int, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Continuous coordinates of every pixel centre of a canvas: two (height, width) arrays (x, y)."""
    xs = np.arange(width, dtype=dtype) + 0.5
    ys = np.arange(height, dtype=dtype) + 0.5
    return np.broadcast_to(xs, (height, width)), np.broadcast_to(ys[:, None], (height, width))
