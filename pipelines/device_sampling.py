"""Per-sample parameters drawn on a torch device: the batched twin of :mod:`pipelines.sampling`.

Same streams, same slices, same formulas — every sampler below mirrors the numpy sampler of the same
name line by line (read that one for the why), so integers come out equal and floats within a few ulp
(``exp``/``log1p``/``cos``/``sin`` are the device's own). Each op's slice of a sample's stream is the
one :data:`pipelines.sampling.SAMPLERS` declares (its ``draws``); all draws of a spec are computed in
one pass and every op reads its columns.

A sampler is ``(spec, u, hw) -> Drawn``: ``u`` (N, draws) float64 uniforms of its slice, ``hw`` (N, 2)
int64 canvas sizes before the op. Arrays use :class:`~pipelines.sampling.BatchParams`' keys and dtypes
(bool flags, int64 pixels, float64 degrees / offsets) as tensors on the device. Checks that need the
values (a crop larger than its canvas) are not raised here — that would stop the host until the device
has caught up — but returned as a per-sample ``invalid`` mask, which the caller fetches with the rest
of what it needs on the host (see :mod:`pipelines.device_fusion`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from . import spec as S
from .device_rng import batch_base, box_muller, keys_from_base, uniforms
from .registry import Registry
from .sampling import _RRC_TRIES, SAMPLERS, _warp_count, check_ids


class Drawn(NamedTuple):
    """One op's draws for a batch: its arrays, the canvas sizes after it, and the samples the numpy
    sampler would refuse (``None``: none can be)."""

    arrays: dict
    hw: torch.Tensor  # (N, 2) int64
    invalid: torch.Tensor | None = None  # (N,) bool


DEVICE_SAMPLERS: Registry[Callable[[S.OpSpec, torch.Tensor, torch.Tensor], Drawn]] = Registry("device sampler")


@dataclass
class DeviceParams:
    """A batch's parameters on the device; the layout of :class:`~pipelines.sampling.BatchParams`."""

    sample_ids: torch.Tensor  # (N,) int64
    in_shapes: torch.Tensor  # (N, 3) int64: H, W, C
    ops: list[tuple[str, dict]]  # per op: tensors with a leading N axis, and constants (a warp's kind)
    out_hw: torch.Tensor  # (N, 2) int64
    invalid: torch.Tensor  # (N,) bool: samples whose parameters the numpy sampler refuses

    def __len__(self) -> int:
        return len(self.sample_ids)


INPUT_COLUMNS = ("sample_id", "height", "width", "channels", "batch_base")


def device_inputs(shapes, seed: int, epoch: int, sample_ids) -> np.ndarray:
    """The host's whole contribution to a batch: (N, 5) int64 rows of :data:`INPUT_COLUMNS` — the
    sample id, its input H, W, C and the batch's key base (:func:`~pipelines.device_rng.batch_base`,
    repeated so that one upload carries everything). Checks ids and seed/epoch like the numpy path."""
    ids = check_ids(seed, epoch, sample_ids if hasattr(sample_ids, "__len__") else list(sample_ids))
    in_shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 3)
    if len(ids) != len(in_shapes):
        raise ValueError(f"got {len(ids)} sample_ids for {len(in_shapes)} images")
    base = np.full((len(ids), 1), batch_base(int(seed), int(epoch)), dtype=np.int64)
    return np.concatenate([ids[:, None], in_shapes, base], axis=1)


def sample_on_device(spec: S.PipelineSpec, inputs: torch.Tensor) -> DeviceParams:
    """Draw every op's parameters for a batch where ``inputs`` (:func:`device_inputs`, uploaded) is.

    A pure function of ``inputs`` and ``spec``: no host value of the batch enters it and nothing comes
    back to the host, so a CUDA graph of it replays correctly for any batch of the same size."""
    keys = keys_from_base(inputs[:, 0], inputs[:, 4])
    ops = [op for op in spec.ops if not isinstance(op, S.Normalize)]  # normalize draws nothing (see sampling)
    counts = [SAMPLERS.get(op.op).draws(op) for op in ops]
    draws = uniforms(keys, 0, sum(counts))  # the whole spec's slice of every stream in one pass
    hw = inputs[:, 1:3]
    invalid = torch.zeros(len(inputs), dtype=torch.bool, device=inputs.device)
    arrays, start = [], 0
    for op, count in zip(ops, counts):
        drawn = DEVICE_SAMPLERS.get(op.op)(op, draws[:, start : start + count], hw)
        if drawn.invalid is not None:
            invalid = invalid | drawn.invalid
        arrays.append((op.op, drawn.arrays))
        hw, start = drawn.hw, start + count
    return DeviceParams(inputs[:, 0], inputs[:, 1:4], arrays, hw, invalid)


@functools.lru_cache(maxsize=256)
def _uploaded(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


_KEEPERS = threading.local()  # .active: the dicts of the keeping_constants blocks open on this thread


def constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A spec's constant (a size, eigen-pairs, limits) on ``device``, uploaded once: an upload costs a
    synchronous transfer each time, and cannot happen inside a CUDA graph capture. Never written to.
    The cache is bounded (specs come from peers); whoever captures a graph reading constants holds them
    itself (:func:`keeping_constants`)."""
    tensor = _uploaded(values, dtype, device)
    for keep in getattr(_KEEPERS, "active", ()):
        keep[id(tensor)] = tensor
    return tensor


@contextlib.contextmanager
def keeping_constants() -> Iterator[dict[int, torch.Tensor]]:
    """Collect every :func:`constant` handed out on this thread within the block. A CUDA graph reads its
    constants at the addresses they had when it was captured: if the bounded cache dropped one, its
    memory would be reused and the replays would read whatever came there, silently. The graph's
    owner keeps the collected tensors as long as the graph."""
    keep: dict[int, torch.Tensor] = {}
    outer = getattr(_KEEPERS, "active", ())
    _KEEPERS.active = (*outer, keep)
    try:
        yield keep
    finally:
        _KEEPERS.active = outer


def divide(a, b) -> torch.Tensor:
    """``a / b`` rounded once, as numpy divides (float64; either may be a Python number). torch computes
    ``number / tensor`` as a reciprocal times the number, and on CUDA ``tensor / number`` as a product
    with the number's reciprocal: an ulp off at times. A division of two tensors is IEEE's. (Halving
    stays a plain ``/ 2.0``: the reciprocal of 2 is exact.)"""
    device = b.device if isinstance(b, torch.Tensor) else a.device
    a, b = (v if isinstance(v, torch.Tensor) else constant((float(v),), torch.float64, device) for v in (a, b))
    return a / b


def fixed_size(hw: torch.Tensor, size) -> torch.Tensor:
    """(N, 2) int64 of one size for every sample."""
    return constant(tuple(size), torch.int64, hw.device).expand(len(hw), 2)


def _full(hw: torch.Tensor, value: int) -> torch.Tensor:
    return torch.full((len(hw),), value, dtype=torch.int64, device=hw.device)


def _f64(values: torch.Tensor) -> torch.Tensor:
    # numpy's int64 / float arithmetic is float64; torch's would be float32 (its default float type).
    return values.to(torch.float64)


# --- geometry ----------------------------------------------------------------------------------------


@DEVICE_SAMPLERS.register("mirror")
def _mirror(op: S.Mirror, u, hw):
    return Drawn({"horizontal": u[:, 0] < op.horizontal, "vertical": u[:, 1] < op.vertical}, hw)


@DEVICE_SAMPLERS.register("random_crop")
def _random_crop(op: S.RandomCrop, u, hw):
    (out_h, out_w), pad = op.size, op.padding
    room_h, room_w = hw[:, 0] + 2 * pad - out_h, hw[:, 1] + 2 * pad - out_w
    invalid = (room_h < 0) | (room_w < 0)
    top = torch.floor(u[:, 0] * (room_h + 1)).to(torch.int64) - pad
    left = torch.floor(u[:, 1] * (room_w + 1)).to(torch.int64) - pad
    arrays = {"top": top, "left": left, "height": _full(hw, out_h), "width": _full(hw, out_w)}
    return Drawn(arrays, fixed_size(hw, (out_h, out_w)), invalid)


@DEVICE_SAMPLERS.register("random_resized_crop")
def _random_resized_crop(op: S.RandomResizedCrop, u, hw):
    height, width = _f64(hw[:, 0:1]), _f64(hw[:, 1:2])
    u = u.reshape(len(u), 4, _RRC_TRIES)
    fraction = op.scale[0] + (op.scale[1] - op.scale[0]) * u[:, 0]
    low, high = math.log(op.ratio[0]), math.log(op.ratio[1])
    aspect = torch.exp(low + (high - low) * u[:, 1])
    area = height * width
    box_w, box_h = torch.round(torch.sqrt(area * fraction * aspect)), torch.round(torch.sqrt(area * fraction / aspect))
    fits = (box_w >= 1) & (box_h >= 1) & (box_w <= width) & (box_h <= height)
    # The first try that fits (numpy's argmax of the flags), or try 0 when none does.
    tries = torch.arange(_RRC_TRIES, device=u.device)
    first = torch.where(fits, tries, _RRC_TRIES).amin(dim=1, keepdim=True)
    found = first[:, 0] < _RRC_TRIES
    first = torch.where(found[:, None], first, 0)
    box_h, box_w = box_h.gather(1, first)[:, 0], box_w.gather(1, first)[:, 0]
    height, width = height[:, 0], width[:, 0]
    top = torch.minimum(torch.floor(u[:, 2].gather(1, first)[:, 0] * (height - box_h + 1)), height - box_h)
    left = torch.minimum(torch.floor(u[:, 3].gather(1, first)[:, 0] * (width - box_w + 1)), width - box_w)
    # The fallback box of every sample, kept where no try fits.
    ratio = width / height
    fb_w = torch.where(ratio < op.ratio[0], width, torch.where(ratio > op.ratio[1], torch.round(height * op.ratio[1]), width))
    fb_h = torch.where(ratio < op.ratio[0], torch.round(divide(width, op.ratio[0])), height)
    fb_w, fb_h = torch.minimum(fb_w.clamp(min=1), width), torch.minimum(fb_h.clamp(min=1), height)
    box_h, box_w = torch.where(found, box_h, fb_h), torch.where(found, box_w, fb_w)
    top = torch.where(found, top, torch.floor((height - fb_h) / 2.0))
    left = torch.where(found, left, torch.floor((width - fb_w) / 2.0))
    out_h, out_w = op.size
    arrays = {"top": top.to(torch.int64), "left": left.to(torch.int64), "height": box_h.to(torch.int64), "width": box_w.to(torch.int64)}
    return Drawn({**arrays, "size": [out_h, out_w]}, fixed_size(hw, (out_h, out_w)))


@DEVICE_SAMPLERS.register("rotate")
def _rotate(op: S.Rotate, u, hw):
    return Drawn({"applied": u[:, 0] < op.p, "angle": op.degrees * (2.0 * u[:, 1] - 1.0)}, hw)


@DEVICE_SAMPLERS.register("shear")
def _shear(op: S.Shear, u, hw):
    return Drawn({"applied": u[:, 0] < op.p, "x": op.degrees * (2.0 * u[:, 1] - 1.0), "y": op.degrees * (2.0 * u[:, 2] - 1.0)}, hw)


@DEVICE_SAMPLERS.register("warp")
def _warp(op: S.Warp, u, hw):
    count = _warp_count(op)
    if op.kind == "grid":
        control = op.magnitude * (2.0 * u[:, 1 : 1 + count] - 1.0)
    else:
        control = torch.clamp(op.magnitude * box_muller(u[:, 1:], count), -3 * op.magnitude, 3 * op.magnitude)
    control = control.reshape(len(u), op.cells + 1, op.cells + 1, 2).clone()
    control[:, 0], control[:, -1], control[:, :, 0], control[:, :, -1] = 0.0, 0.0, 0.0, 0.0  # border stays put
    return Drawn({"applied": u[:, 0] < op.p, "kind": op.kind, "control": control}, hw)


@DEVICE_SAMPLERS.register("resize")
def _resize(op: S.Resize, u, hw):
    if isinstance(op.short_side, tuple):
        low, high = op.short_side
        short = low + torch.floor(u[:, 0] * (high - low + 1)).to(torch.int64)
    else:
        short = _full(hw, op.short_side)
    factor = _f64(short) / _f64(hw.amin(dim=1))
    out = torch.round(_f64(hw) * factor[:, None]).clamp(min=1).to(torch.int64)
    return Drawn({"height": out[:, 0], "width": out[:, 1]}, out)


@DEVICE_SAMPLERS.register("center_crop")
def _center_crop(op: S.CenterCrop, u, hw):
    out_h, out_w = op.size
    top = torch.round(_f64(hw[:, 0] - out_h) / 2.0).to(torch.int64)
    left = torch.round(_f64(hw[:, 1] - out_w) / 2.0).to(torch.int64)
    return Drawn({"top": top, "left": left, "height": _full(hw, out_h), "width": _full(hw, out_w)}, fixed_size(hw, (out_h, out_w)))


# --- color ------------------------------------------------------------------------------------------


@DEVICE_SAMPLERS.register("pca_color")
def _pca_color(op: S.PcaColor, u, hw):
    alpha = op.alpha_std * box_muller(u, 3)
    eigvec, eigval = constant(op.eigvec, torch.float64, u.device), constant(op.eigval, torch.float64, u.device)
    terms = eigvec[None, :, :] * (alpha * eigval)[:, None, :]
    # Summed left to right, the order of numpy's sum over the last axis (bit-identical offsets).
    offset = (terms[:, :, 0] + terms[:, :, 1] + terms[:, :, 2]) * 255.0
    return Drawn({"alpha": alpha, "offset": offset}, hw)


@DEVICE_SAMPLERS.register("color_shift")
def _color_shift(op: S.ColorShift, u, hw):
    limits = constant(op.limits, torch.float64, u.device)
    return Drawn({"applied": u[:, 0] < op.p, "offset": (2.0 * u[:, 1:4] - 1.0) * limits}, hw)
