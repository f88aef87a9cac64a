"""Seeded per-sample parameter sampling: the only place where augmentation randomness is drawn.

The parameters of sample ``i`` in epoch ``e`` under seed ``s`` come from one generator seeded with
``SeedSequence([s, e, i])``; ops draw from it in spec order, each op always drawing the same count of
numbers (even when its probability says "skip"), so the result depends on (s, e, i) and the image shape
alone — not on the batch, the position in it, the worker or the backend.

Each sampler is ``(spec, rng, (height, width)) -> (params, (out_height, out_width))``. ``params`` is a
JSON-friendly dict: the replay record. Kernels never draw random numbers; they consume these records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import spec as S
from .registry import Registry

HW = tuple[int, int]
Sampler = Callable[[S.OpSpec, np.random.Generator, HW], tuple[dict, HW]]

SAMPLERS: Registry[Sampler] = Registry("sampler")


@dataclass
class SampleParams:
    """The replay record of one sample: input/output shapes (H, W, C) and one dict per op."""

    sample_id: int
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    ops: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"sample_id": self.sample_id, "in_shape": list(self.in_shape), "out_shape": list(self.out_shape), "ops": self.ops}


def sample_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """The generator of one sample: a function of (seed, epoch, sample_id) alone."""
    for name, value in (("seed", seed), ("epoch", epoch), ("sample_id", sample_id)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), int(sample_id)])))


def sample_one(spec: S.PipelineSpec, shape: tuple[int, int, int], seed: int, epoch: int, sample_id: int) -> SampleParams:
    """Draw the parameters of every op of ``spec`` for one sample of ``shape`` (H, W, C)."""
    rng = sample_rng(seed, epoch, sample_id)
    hw: HW = (int(shape[0]), int(shape[1]))
    records = []
    for op in spec.ops:
        if isinstance(op, S.Normalize):
            continue  # pipeline-level conversion, nothing random and nothing per sample
        params, hw = SAMPLERS.get(op.op)(op, rng, hw)
        records.append(params)
    return SampleParams(int(sample_id), tuple(int(v) for v in shape), (hw[0], hw[1], int(shape[2])), records)


# --- geometry ----------------------------------------------------------------------------------------


@SAMPLERS.register("mirror")
def _mirror(op: S.Mirror, rng, hw):
    draws = rng.random(2)
    return {"op": "mirror", "horizontal": bool(draws[0] < op.horizontal), "vertical": bool(draws[1] < op.vertical)}, hw


@SAMPLERS.register("random_crop")
def _random_crop(op: S.RandomCrop, rng, hw):
    (height, width), (out_h, out_w), pad = hw, op.size, op.padding
    if height + 2 * pad < out_h or width + 2 * pad < out_w:
        raise ValueError(
            f"random_crop size {out_h}x{out_w} is larger than the padded image "
            f"{height + 2 * pad}x{width + 2 * pad} (image {height}x{width}, padding {pad})"
        )
    top = int(rng.integers(0, height + 2 * pad - out_h + 1))
    left = int(rng.integers(0, width + 2 * pad - out_w + 1))
    # Offsets relative to the unpadded image: negative means the window starts inside the padding.
    return {"op": "random_crop", "top": top - pad, "left": left - pad, "height": out_h, "width": out_w}, (out_h, out_w)


@SAMPLERS.register("random_resized_crop")
def _random_resized_crop(op: S.RandomResizedCrop, rng, hw):
    height, width = hw
    area = float(height * width)
    log_ratio = (math.log(op.ratio[0]), math.log(op.ratio[1]))
    # Always draw all ten tries so the stream of numbers does not depend on which try succeeds.
    fractions = rng.uniform(op.scale[0], op.scale[1], size=10)
    aspects = np.exp(rng.uniform(log_ratio[0], log_ratio[1], size=10))
    positions = rng.random((10, 2))
    box = None
    for fraction, aspect, (ry, rx) in zip(fractions, aspects, positions):
        box_w = math.sqrt(area * fraction * aspect)
        box_h = math.sqrt(area * fraction / aspect)
        if box_w <= width and box_h <= height:
            box = (ry * (height - box_h), rx * (width - box_w), box_h, box_w)
            break
    if box is None:  # fallback: the largest centred box whose aspect lies within ratio
        in_ratio = width / height
        if in_ratio < op.ratio[0]:
            box_w, box_h = float(width), width / op.ratio[0]
        elif in_ratio > op.ratio[1]:
            box_h, box_w = float(height), height * op.ratio[1]
        else:
            box_h, box_w = float(height), float(width)
        box = ((height - box_h) / 2.0, (width - box_w) / 2.0, box_h, box_w)
    top, left, box_h, box_w = (float(v) for v in box)
    out_h, out_w = op.size
    return {"op": "random_resized_crop", "top": top, "left": left, "height": box_h, "width": box_w, "size": [out_h, out_w]}, (out_h, out_w)


@SAMPLERS.register("rotate")
def _rotate(op: S.Rotate, rng, hw):
    gate, angle = rng.random(), rng.uniform(-op.degrees, op.degrees)
    return {"op": "rotate", "applied": bool(gate < op.p), "angle": float(angle)}, hw


@SAMPLERS.register("shear")
def _shear(op: S.Shear, rng, hw):
    gate, angles = rng.random(), rng.uniform(-op.degrees, op.degrees, size=2)
    return {"op": "shear", "applied": bool(gate < op.p), "x": float(angles[0]), "y": float(angles[1])}, hw


@SAMPLERS.register("warp")
def _warp(op: S.Warp, rng, hw):
    gate = rng.random()
    size = (op.cells + 1, op.cells + 1, 2)
    if op.kind == "grid":
        control = rng.uniform(-op.magnitude, op.magnitude, size=size)
    else:
        control = np.clip(rng.normal(0.0, op.magnitude, size=size), -3 * op.magnitude, 3 * op.magnitude)
    control[0, :], control[-1, :], control[:, 0], control[:, -1] = 0.0, 0.0, 0.0, 0.0  # border stays put
    return {"op": "warp", "applied": bool(gate < op.p), "kind": op.kind, "control": control.tolist()}, hw


@SAMPLERS.register("resize")
def _resize(op: S.Resize, rng, hw):
    height, width = hw
    if isinstance(op.short_side, tuple):
        short = int(rng.integers(op.short_side[0], op.short_side[1] + 1))
    else:
        short = op.short_side
    factor = short / min(height, width)
    out = (max(1, round(height * factor)), max(1, round(width * factor)))
    return {"op": "resize", "height": out[0], "width": out[1]}, out


@SAMPLERS.register("center_crop")
def _center_crop(op: S.CenterCrop, rng, hw):
    (height, width), (out_h, out_w) = hw, op.size
    # Integer offsets keep a centre crop an exact copy of pixels (no interpolation).
    top, left = int(round((height - out_h) / 2.0)), int(round((width - out_w) / 2.0))
    return {"op": "center_crop", "top": top, "left": left, "height": out_h, "width": out_w}, (out_h, out_w)


# --- colour ------------------------------------------------------------------------------------------


@SAMPLERS.register("pca_color")
def _pca_color(op: S.PcaColor, rng, hw):
    alpha = rng.normal(0.0, op.alpha_std, size=3) if op.alpha_std > 0 else np.zeros(3)
    eigvec = np.asarray(op.eigvec, dtype=np.float64)
    eigval = np.asarray(op.eigval, dtype=np.float64)
    offset = eigvec @ (alpha * eigval) * 255.0  # the paper's offset, here on the 0–255 scale
    return {"op": "pca_color", "alpha": alpha.tolist(), "offset": offset.tolist()}, hw


@SAMPLERS.register("color_shift")
def _color_shift(op: S.ColorShift, rng, hw):
    gate = rng.random()
    limits = np.asarray(op.limits)
    offset = rng.uniform(-1.0, 1.0, size=3) * limits
    return {"op": "color_shift", "applied": bool(gate < op.p), "offset": offset.tolist()}, hw
