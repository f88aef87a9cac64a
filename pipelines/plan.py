"""Fusion: turn one sample's replay record into the few passes a backend runs.

All geometric ops of a sample compose into one forward matrix, so a backend resamples once (crop +
flip + rotate + shear + resize = one ``warpAffine``). A local ``warp`` is not affine: then the chain
becomes a dense source-coordinate map (affine pieces and warp fields evaluated back to front), still
one resampling. Color ops compose into one ``C×C`` matrix plus offset on the 0–255 scale.

The color pass runs after the geometric one unless every color op precedes every geometric op. The
two orders differ only on pixels filled from outside the image (padding, rotated corners): with color
last those get the color transform too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sampling import BatchParams, SampleParams
from .spec import COLOR_OPS, GEOMETRY_OPS, PipelineSpec


@dataclass(frozen=True)
class AffineStep:
    """Map destination points to source points of one affine piece: ``src = inverse @ dst`` (3×3)."""

    inverse: np.ndarray


@dataclass(frozen=True)
class WarpStep:
    """A local warp on a ``height``×``width`` canvas: ``src = dst + displacement(dst)``."""

    control: np.ndarray  # (cells+1, cells+1, 2), fractions of the shorter side
    kind: str
    height: int
    width: int


@dataclass
class SamplePlan:
    """What a backend does to one sample.

    ``inverse``: 3×3 destination→source matrix in continuous pixel coordinates, set when the geometry is
    purely affine. ``chain``: set instead when a warp is present — steps to apply, in order, to
    destination points to reach source points. ``color``: ``(matrix C×C, offset C)`` on the 0–255 scale,
    or ``None`` when the color is unchanged.
    """

    in_shape: tuple[int, int, int]
    out_hw: tuple[int, int]
    inverse: np.ndarray | None = None
    chain: list[AffineStep | WarpStep] | None = None
    color: tuple[np.ndarray, np.ndarray] | None = None
    color_first: bool = False
    sample_id: int = -1

    @property
    def channels(self) -> int:
        return self.in_shape[2]


_GEOMETRY_NAMES = {cls.model_fields["op"].default for cls in GEOMETRY_OPS}
_COLOR_NAMES = {cls.model_fields["op"].default for cls in COLOR_OPS}


def color_runs_first(spec: PipelineSpec) -> bool:
    """True when every color op of ``spec`` precedes every geometric op."""
    geometry = [i for i, op in enumerate(spec.ops) if op.op in _GEOMETRY_NAMES]
    color = [i for i, op in enumerate(spec.ops) if op.op in _COLOR_NAMES]
    return bool(color) and bool(geometry) and max(color) < min(geometry)


# --- the vectorised path: a whole batch of arrays at once --------------------------------------------


_EYE = np.eye(3)


def _eyes(n: int) -> np.ndarray:
    """(n, 3, 3) identity matrices, writable, in one C call (numpy's Python-level helpers such as
    ``broadcast_to`` and ``stack`` cost several microseconds each, and a batch is planned with dozens)."""
    return _EYE[None].repeat(n, axis=0)


def _about_centers(linear: np.ndarray, hw: np.ndarray) -> np.ndarray:
    """(N, 3, 3) of per-sample 2×2 maps ``linear`` (N, 2, 2) about each canvas centre."""
    matrices = _eyes(len(linear))
    matrices[:, :2, :2] = linear
    cx, cy = hw[:, 1] / 2.0, hw[:, 0] / 2.0
    matrices[:, 0, 2] = cx - (linear[:, 0, 0] * cx + linear[:, 0, 1] * cy)
    matrices[:, 1, 2] = cy - (linear[:, 1, 0] * cx + linear[:, 1, 1] * cy)
    return matrices


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for stacks of 3×3 matrices, summed elementwise: every sample's result has the same bits
    whatever the batch size (batched BLAS calls may change the summation order)."""
    return (a[:, :, :, None] * b[:, None, :, :]).sum(axis=2)


def _invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverses of a stack of affine 3×3 matrices (last row 0 0 1), in closed form."""
    a, b, c, d = m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
    tx, ty = m[:, 0, 2], m[:, 1, 2]
    det = a * d - b * c
    if np.any(np.abs(det) < 1e-12):
        raise ValueError("a geometric op collapsed the image (singular transform)")
    inverse = _eyes(len(m))
    inverse[:, 0, 0], inverse[:, 0, 1] = d / det, -b / det
    inverse[:, 1, 0], inverse[:, 1, 1] = -c / det, a / det
    inverse[:, 0, 2] = -(inverse[:, 0, 0] * tx + inverse[:, 0, 1] * ty)
    inverse[:, 1, 2] = -(inverse[:, 1, 0] * tx + inverse[:, 1, 1] * ty)
    return inverse


def _batch_forward(name: str, arrays: dict, hw: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Forward matrices (N, 3, 3) of one geometric op for a batch, and the canvases after it."""
    n = len(hw)
    if name == "mirror":
        horizontal, vertical = arrays["horizontal"].astype(bool), arrays["vertical"].astype(bool)
        if not (horizontal.any() or vertical.any()):
            return None, hw
        matrices = _eyes(n)
        matrices[horizontal, 0, 0], matrices[horizontal, 0, 2] = -1.0, hw[horizontal, 1]
        matrices[vertical, 1, 1], matrices[vertical, 1, 2] = -1.0, hw[vertical, 0]
        return matrices, hw
    if name in ("random_crop", "center_crop"):
        matrices = _eyes(n)
        matrices[:, 0, 2], matrices[:, 1, 2] = -arrays["left"], -arrays["top"]
        return matrices, np.stack([arrays["height"], arrays["width"]], axis=1).astype(np.int64)
    if name == "random_resized_crop":
        size = np.broadcast_to(np.asarray(arrays["size"]), (n, 2))
        sx, sy = size[:, 1] / arrays["width"], size[:, 0] / arrays["height"]
        matrices = _eyes(n)
        matrices[:, 0, 0], matrices[:, 1, 1] = sx, sy
        matrices[:, 0, 2], matrices[:, 1, 2] = -arrays["left"] * sx, -arrays["top"] * sy
        return matrices, size.astype(np.int64)
    if name == "resize":
        out = np.stack([arrays["height"], arrays["width"]], axis=1).astype(np.int64)
        matrices = _eyes(n)
        matrices[:, 0, 0], matrices[:, 1, 1] = out[:, 1] / hw[:, 1], out[:, 0] / hw[:, 0]
        return matrices, out
    if name == "rotate":
        theta = np.radians(np.where(arrays["applied"], arrays["angle"], 0.0))
        c, s = np.cos(theta), np.sin(theta)
        return _about_centers(np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], 1), hw), hw
    if name == "shear":
        tx = np.tan(np.radians(np.where(arrays["applied"], arrays["x"], 0.0)))
        ty = np.tan(np.radians(np.where(arrays["applied"], arrays["y"], 0.0)))
        ones = np.ones_like(tx)
        return _about_centers(np.stack([np.stack([ones, tx], -1), np.stack([ty, ones], -1)], 1), hw), hw
    raise ValueError(f"not a geometric op: {name!r}")


def fuse_batch(batch: BatchParams, color_first: bool = False) -> list[SamplePlan]:
    """Fuse a whole batch with numpy (a few hundred microseconds for 256 samples): one forward matrix
    per sample, composed op by op. A sample whose local warp applies gets a chain instead: the affine
    piece before each warp, the warp, and the piece after, in destination → source order."""
    n = len(batch)
    channels = batch.in_shapes[:, 2]
    hw = batch.in_shapes[:, :2].copy()
    forward = _eyes(n)
    offset = np.zeros((n, 3))  # per sample; grey images use the first value
    colored = np.zeros(n, dtype=bool)
    pieces: dict[int, list[AffineStep | WarpStep]] = {}  # forward order, warped samples only
    for name, arrays in batch.ops:
        if name in _COLOR_NAMES:
            if name == "pca_color":
                if (channels != 3).any():
                    raise ValueError(f"pca_color needs RGB images (3 channels), got {int(channels[channels != 3][0])} channel(s)")
                offset += arrays["offset"]
                colored[:] = True
            else:  # color_shift
                applied = arrays["applied"].astype(bool)
                offset[applied] += arrays["offset"][applied]
                colored |= applied
        elif name == "warp":
            warped = np.flatnonzero(arrays["applied"])
            if warped.size:
                before = _invert_affine(forward[warped])
                control = np.asarray(arrays["control"], dtype=np.float64)
                for k, i in enumerate(warped.tolist()):
                    steps = pieces.setdefault(i, [])
                    steps.append(AffineStep(before[k]))
                    steps.append(WarpStep(control[i], arrays["kind"], int(hw[i, 0]), int(hw[i, 1])))
                forward[warped] = np.eye(3)
        else:
            matrices, hw = _batch_forward(name, arrays, hw)
            if matrices is not None:
                forward = _compose(matrices, forward)
    inverse = _invert_affine(forward)
    plans = []
    # Plain Python values for the per-sample loop: indexing numpy arrays element by element costs more
    # than the rest of the loop.
    shapes, out_hws, ids, with_color = batch.in_shapes.tolist(), hw.tolist(), batch.sample_ids.tolist(), colored.tolist()
    for i in range(n):
        height, width, count = shapes[i]
        plan = SamplePlan((height, width, count), tuple(out_hws[i]), sample_id=ids[i], color_first=color_first)
        if i in pieces:
            plan.chain = list(reversed([*pieces[i], AffineStep(inverse[i])]))
        else:
            plan.inverse = inverse[i]
        if with_color[i]:
            plan.color = (np.eye(count), offset[i, :count])
        plans.append(plan)
    return plans


def fuse(params: SampleParams, color_first: bool = False) -> SamplePlan:
    """The plan of one sample: :func:`fuse_batch` on a batch of one."""
    return fuse_batch(BatchParams.from_records([params]), color_first)[0]


# --- which plans copy or scale whole pixels ---------------------------------------------------------

PIXEL_ATOL = 1e-9  # how far a matrix entry may sit from 0, ±1 or an integer and still count as one


@dataclass(frozen=True)
class AxisAligned:
    """Per-sample facts about a batch's plans, for the backends' fast paths; arrays of length N.

    ``aligned``: the geometry is affine with no rotation or shear — a scale and a translation per axis,
    possibly mirrored. For those, in the *unmirrored* output (mirror it afterwards): output column
    ``j`` samples source x ``left + scale_x * (j + 0.5)`` (continuous pixel coordinates), likewise for
    rows. ``scale_x``/``scale_y`` (> 0) are source pixels per output pixel; ``left``/``top`` the
    source coordinates of the output's left/top edge. ``copies``: aligned, unit scales and integer
    ``left``/``top`` — the output is the window ``image[top:top+out_h, left:left+out_w]`` (mirrored
    by ``flip_x``/``flip_y``), copied exactly. Values of samples that are not aligned are meaningless.
    ``in_hw``/``out_hw``: (N, 2) int64 input and output height, width of every sample.
    """

    aligned: np.ndarray  # bool
    copies: np.ndarray  # bool
    flip_x: np.ndarray  # bool
    flip_y: np.ndarray  # bool
    scale_x: np.ndarray  # float64
    scale_y: np.ndarray  # float64
    left: np.ndarray  # float64
    top: np.ndarray  # float64
    in_hw: np.ndarray  # int64 (N, 2)
    out_hw: np.ndarray  # int64 (N, 2)

    def window(self, i: int) -> tuple[int, int]:
        """``(top, left)`` of sample ``i``'s integer window (meaningful when ``copies[i]``)."""
        return int(round(self.top[i])), int(round(self.left[i]))


def _whole(values: np.ndarray) -> np.ndarray:
    return np.abs(values - np.round(values)) <= PIXEL_ATOL


def axis_aligned(plans: list[SamplePlan]) -> AxisAligned:
    """The :class:`AxisAligned` facts of ``plans``, computed for the whole batch at once — the one
    detector every backend uses, with one tolerance (:data:`PIXEL_ATOL`)."""
    n = len(plans)
    matrices = _eyes(n)
    is_affine = np.zeros(n, dtype=bool)
    out_hw = np.array([plan.out_hw for plan in plans], dtype=np.int64).reshape(n, 2)
    in_hw = np.array([plan.in_shape[:2] for plan in plans], dtype=np.int64).reshape(n, 2)
    affine = [i for i, plan in enumerate(plans) if plan.inverse is not None]
    if affine:
        matrices[affine], is_affine[affine] = np.array([plans[i].inverse for i in affine]), True
    a, d = matrices[:, 0, 0], matrices[:, 1, 1]
    aligned = is_affine & (np.abs(matrices[:, 0, 1]) <= PIXEL_ATOL) & (np.abs(matrices[:, 1, 0]) <= PIXEL_ATOL) & (np.abs(a) > PIXEL_ATOL) & (np.abs(d) > PIXEL_ATOL)
    flip_x, flip_y = a < 0, d < 0
    # x = a * X + tx over the output's continuous X in [0, out_w]; mirrored: X -> out_w - X.
    left = np.where(flip_x, matrices[:, 0, 2] + a * out_hw[:, 1], matrices[:, 0, 2])
    top = np.where(flip_y, matrices[:, 1, 2] + d * out_hw[:, 0], matrices[:, 1, 2])
    scale_x, scale_y = np.abs(a), np.abs(d)
    unit = (np.abs(scale_x - 1.0) <= PIXEL_ATOL) & (np.abs(scale_y - 1.0) <= PIXEL_ATOL)
    copies = aligned & unit & _whole(left) & _whole(top)
    return AxisAligned(aligned, copies, flip_x & aligned, flip_y & aligned, scale_x, scale_y, left, top, in_hw, out_hw)
