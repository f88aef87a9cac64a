"""Seeded per-sample parameter sampling: the only place where augmentation randomness is drawn.

The parameters of sample ``i`` in epoch ``e`` under seed ``s`` come from its own counter-based stream
(:mod:`pipelines.rng`): a function of (s, e, i) and the image shape alone — not of the batch, the
position in it, the worker or the backend. Every op owns a fixed slice of that stream (its draws start
where the previous op's end, whatever values they took), so changing one op's hyper-parameters never
changes the draws of another.

Sampling is vectorised over the batch: each sampler is ``(spec, keys, start, hw) -> (arrays, hw)`` with
``hw`` the (N, 2) canvas sizes before the op. :class:`BatchParams` holds the arrays; ``records()``
turns them into the JSON-friendly replay records (one dict per op per sample). Kernels never draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import spec as S
from .registry import Registry
from .rng import normal_draws, normals, sample_keys, uniforms


@dataclass(frozen=True)
class Sampler:
    """How one op draws: ``draws(spec)`` numbers per sample, turned into arrays by ``sample``."""

    draws: Callable[[S.OpSpec], int]
    sample: Callable[[S.OpSpec, np.ndarray, int, np.ndarray], tuple[dict, np.ndarray]]


SAMPLERS: Registry[Sampler] = Registry("sampler")


def register(name: str, draws: Callable[[S.OpSpec], int]):
    return lambda function: SAMPLERS.add(name, Sampler(draws, function))


@dataclass
class SampleParams:
    """The replay record of one sample: input/output shapes (H, W, C) and one dict per op."""

    sample_id: int
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    ops: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"sample_id": self.sample_id, "in_shape": list(self.in_shape), "out_shape": list(self.out_shape), "ops": self.ops}


@dataclass
class BatchParams:
    """Parameters of a batch as arrays: per op, its name and a dict of arrays with a leading N axis
    (plus constants shared by every sample, such as a warp's ``kind``)."""

    sample_ids: np.ndarray  # (N,) int64
    in_shapes: np.ndarray  # (N, 3) int64: H, W, C
    ops: list[tuple[str, dict]]
    out_hw: np.ndarray  # (N, 2) int64

    def __len__(self) -> int:
        return len(self.sample_ids)

    def records(self) -> list[SampleParams]:
        """Per-sample replay records (plain Python values, JSON-friendly)."""
        records = []
        for i in range(len(self)):
            ops = []
            for name, arrays in self.ops:
                record = {"op": name}
                for key, value in arrays.items():
                    record[key] = value[i].tolist() if isinstance(value, np.ndarray) else value
                ops.append(record)
            shape = tuple(int(v) for v in self.in_shapes[i])
            records.append(SampleParams(int(self.sample_ids[i]), shape, (int(self.out_hw[i, 0]), int(self.out_hw[i, 1]), shape[2]), ops))
        return records

    @classmethod
    def from_records(cls, records: list[SampleParams]) -> "BatchParams":
        """Stack replay records (all of the same spec) back into arrays."""
        if not records:
            raise ValueError("no parameter records were given")
        names = [r["op"] for r in records[0].ops]
        if any([r["op"] for r in record.ops] != names for record in records):
            raise ValueError("parameter records of one batch must come from the same pipeline spec")
        ops = []
        for position, name in enumerate(names):
            arrays = {}
            for key, value in records[0].ops[position].items():
                if key == "op":
                    continue
                if isinstance(value, str):
                    arrays[key] = value
                else:
                    arrays[key] = np.asarray([r.ops[position][key] for r in records])
            ops.append((name, arrays))
        return cls(
            np.asarray([r.sample_id for r in records], dtype=np.int64),
            np.asarray([r.in_shape for r in records], dtype=np.int64),
            ops,
            np.asarray([r.out_shape[:2] for r in records], dtype=np.int64),
        )


def check_ids(seed: int, epoch: int, sample_ids) -> np.ndarray:
    for name, value in (("seed", seed), ("epoch", epoch)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    ids = np.asarray(sample_ids)
    if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0):
        raise ValueError(f"sample_id must be a non-negative integer, got {sample_ids!r}")
    return ids.astype(np.int64).reshape(-1)


def sample_batch(spec: S.PipelineSpec, shapes, seed: int, epoch: int, sample_ids) -> BatchParams:
    """Draw every op's parameters for a batch. ``shapes``: (N, 3) of (H, W, C)."""
    ids = check_ids(seed, epoch, sample_ids)
    in_shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 3)
    keys = sample_keys(int(seed), int(epoch), ids)
    hw = in_shapes[:, :2].copy()
    ops, start = [], 0
    for op in spec.ops:
        if isinstance(op, S.Normalize):
            continue  # pipeline-level conversion, nothing random and nothing per sample
        sampler = SAMPLERS.get(op.op)
        arrays, hw = sampler.sample(op, keys, start, hw)
        start += sampler.draws(op)
        ops.append((op.op, arrays))
    return BatchParams(ids, in_shapes, ops, hw)


def sample_one(spec: S.PipelineSpec, shape: tuple[int, int, int], seed: int, epoch: int, sample_id: int) -> SampleParams:
    """The replay record of one sample of ``shape`` (H, W, C)."""
    return sample_batch(spec, [shape], seed, epoch, [sample_id]).records()[0]


# --- geometry ----------------------------------------------------------------------------------------


@register("mirror", lambda op: 2)
def _mirror(op: S.Mirror, keys, start, hw):
    u = uniforms(keys, start, 2)
    return {"horizontal": u[:, 0] < op.horizontal, "vertical": u[:, 1] < op.vertical}, hw


@register("random_crop", lambda op: 2)
def _random_crop(op: S.RandomCrop, keys, start, hw):
    (out_h, out_w), pad = op.size, op.padding
    room_h, room_w = hw[:, 0] + 2 * pad - out_h, hw[:, 1] + 2 * pad - out_w
    bad = np.flatnonzero((room_h < 0) | (room_w < 0))
    if bad.size:
        height, width = hw[bad[0]]
        raise ValueError(
            f"random_crop size {out_h}x{out_w} is larger than the padded image "
            f"{height + 2 * pad}x{width + 2 * pad} (image {height}x{width}, padding {pad})"
        )
    u = uniforms(keys, start, 2)
    # Offsets relative to the unpadded image: negative means the window starts inside the padding.
    top = np.floor(u[:, 0] * (room_h + 1)).astype(np.int64) - pad
    left = np.floor(u[:, 1] * (room_w + 1)).astype(np.int64) - pad
    n = len(keys)
    return {"top": top, "left": left, "height": np.full(n, out_h), "width": np.full(n, out_w)}, np.full((n, 2), (out_h, out_w), dtype=np.int64)


_RRC_TRIES = 10


@register("random_resized_crop", lambda op: 4 * _RRC_TRIES)
def _random_resized_crop(op: S.RandomResizedCrop, keys, start, hw):
    # Whole-pixel boxes, as torchvision and albumentations cut them: the crop is then a plain integer
    # window of the image, which a backend may resize directly (cv2.resize) instead of warping.
    height, width = hw[:, 0:1].astype(np.float64), hw[:, 1:2].astype(np.float64)
    u = uniforms(keys, start, 4 * _RRC_TRIES).reshape(len(keys), 4, _RRC_TRIES)
    fraction = op.scale[0] + (op.scale[1] - op.scale[0]) * u[:, 0]
    low, high = math.log(op.ratio[0]), math.log(op.ratio[1])
    aspect = np.exp(low + (high - low) * u[:, 1])
    area = height * width
    box_w, box_h = np.round(np.sqrt(area * fraction * aspect)), np.round(np.sqrt(area * fraction / aspect))
    fits = (box_w >= 1) & (box_h >= 1) & (box_w <= width) & (box_h <= height)
    first = np.argmax(fits, axis=1)  # the first try that fits (the Inception recipe's ten tries)
    rows = np.arange(len(keys))
    box_h, box_w = box_h[rows, first], box_w[rows, first]
    # Uniform over the (room + 1) whole-pixel positions; min() guards u's float rounding at 1.
    top = np.minimum(np.floor(u[rows, 2, first] * (height[:, 0] - box_h + 1)), height[:, 0] - box_h)
    left = np.minimum(np.floor(u[rows, 3, first] * (width[:, 0] - box_w + 1)), width[:, 0] - box_w)
    fallback = ~fits.any(axis=1)
    if fallback.any():  # the largest centred box whose aspect lies within ratio
        h, w = height[fallback, 0], width[fallback, 0]
        ratio = w / h
        fb_w = np.where(ratio < op.ratio[0], w, np.where(ratio > op.ratio[1], np.round(h * op.ratio[1]), w))
        fb_h = np.where(ratio < op.ratio[0], np.round(w / op.ratio[0]), h)
        fb_w, fb_h = np.clip(fb_w, 1, w), np.clip(fb_h, 1, h)
        box_h[fallback], box_w[fallback] = fb_h, fb_w
        top[fallback], left[fallback] = np.floor((h - fb_h) / 2.0), np.floor((w - fb_w) / 2.0)
    out_h, out_w = op.size
    n = len(keys)
    arrays = {"top": top.astype(np.int64), "left": left.astype(np.int64), "height": box_h.astype(np.int64), "width": box_w.astype(np.int64)}
    return {**arrays, "size": [out_h, out_w]}, np.full((n, 2), (out_h, out_w), dtype=np.int64)


@register("rotate", lambda op: 2)
def _rotate(op: S.Rotate, keys, start, hw):
    u = uniforms(keys, start, 2)
    return {"applied": u[:, 0] < op.p, "angle": op.degrees * (2.0 * u[:, 1] - 1.0)}, hw


@register("shear", lambda op: 3)
def _shear(op: S.Shear, keys, start, hw):
    u = uniforms(keys, start, 3)
    return {"applied": u[:, 0] < op.p, "x": op.degrees * (2.0 * u[:, 1] - 1.0), "y": op.degrees * (2.0 * u[:, 2] - 1.0)}, hw


def _warp_count(op: S.Warp) -> int:
    return 2 * (op.cells + 1) ** 2


@register("warp", lambda op: 1 + normal_draws(_warp_count(op)))
def _warp(op: S.Warp, keys, start, hw):
    gate = uniforms(keys, start, 1)[:, 0]
    size = (len(keys), op.cells + 1, op.cells + 1, 2)
    if op.kind == "grid":
        control = op.magnitude * (2.0 * uniforms(keys, start + 1, _warp_count(op)) - 1.0)
    else:
        control = np.clip(op.magnitude * normals(keys, start + 1, _warp_count(op)), -3 * op.magnitude, 3 * op.magnitude)
    control = control.reshape(size)
    control[:, 0], control[:, -1], control[:, :, 0], control[:, :, -1] = 0.0, 0.0, 0.0, 0.0  # border stays put
    return {"applied": gate < op.p, "kind": op.kind, "control": control}, hw


@register("resize", lambda op: 1)
def _resize(op: S.Resize, keys, start, hw):
    if isinstance(op.short_side, tuple):
        low, high = op.short_side
        short = low + np.floor(uniforms(keys, start, 1)[:, 0] * (high - low + 1)).astype(np.int64)
    else:
        short = np.full(len(keys), op.short_side)
    factor = short / hw.min(axis=1)
    out = np.maximum(1, np.round(hw * factor[:, None])).astype(np.int64)
    return {"height": out[:, 0], "width": out[:, 1]}, out


@register("center_crop", lambda op: 0)
def _center_crop(op: S.CenterCrop, keys, start, hw):
    (out_h, out_w), n = op.size, len(keys)
    # Integer offsets keep a centre crop an exact copy of pixels (no interpolation).
    top = np.round((hw[:, 0] - out_h) / 2.0).astype(np.int64)
    left = np.round((hw[:, 1] - out_w) / 2.0).astype(np.int64)
    return {"top": top, "left": left, "height": np.full(n, out_h), "width": np.full(n, out_w)}, np.full((n, 2), (out_h, out_w), dtype=np.int64)


# --- color ------------------------------------------------------------------------------------------


@register("pca_color", lambda op: normal_draws(3))
def _pca_color(op: S.PcaColor, keys, start, hw):
    alpha = op.alpha_std * normals(keys, start, 3)
    eigvec = np.asarray(op.eigvec, dtype=np.float64)
    eigval = np.asarray(op.eigval, dtype=np.float64)
    # eigvec @ (alpha * eigval) per sample on the 0–255 scale, summed elementwise (not by BLAS) so a
    # sample's offset has the same bits whatever the batch around it.
    offset = (eigvec[None, :, :] * (alpha * eigval)[:, None, :]).sum(axis=2) * 255.0
    return {"alpha": alpha, "offset": offset}, hw


@register("color_shift", lambda op: 4)
def _color_shift(op: S.ColorShift, keys, start, hw):
    u = uniforms(keys, start, 4)
    return {"applied": u[:, 0] < op.p, "offset": (2.0 * u[:, 1:4] - 1.0) * np.asarray(op.limits)}, hw
