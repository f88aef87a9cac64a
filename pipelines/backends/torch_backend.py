"""Batched torch backend (CPU or CUDA): one resampling per batch, with per-sample parameters.

torchvision v2 draws one set of parameters per batch; here every sample keeps its own fused plan and the
whole batch is still resampled by one ``grid_sample`` call per (input size, output size, kind of
geometry):

* the fused affine matrices of the batch (dst→src, pixel coordinates, centres at ``j + 0.5``) become a
  sampling grid in ``grid_sample``'s normalised ``align_corners=False`` coordinates — built from one
  small uploaded tensor with separable broadcasts, no per-pixel Python;
* a plan with a local warp evaluates its chain (affine pieces and warp fields) on all destination
  points of the batch at once (points flattened to (B, P), warp weights as (B, P, K) @ (B, K, K));
* plans that only move whole pixels (integer windows, possibly mirrored: crops, centre crops, flips,
  random crops with padding) are copied by indexing — exact, and no float pass at all;
* color is one per-sample ``C×C`` matrix plus offset, in float32, then round half to even and clamp
  (OpenCV's ``saturate_cast``). Each pass rounds to the uint8 grid, like the CPU reference.

Images outside the source are ``fill`` (``border="constant"``; sampling ``image - fill`` with zero
padding and adding ``fill`` back is exact because bilinear weights sum to one) or the nearest edge
pixel (``border="replicate"``, ``padding_mode="border"``).

On CUDA the uint8 batch goes to the device once (from pinned memory, ``non_blocking``) and stays there.
Every arithmetic step is elementwise per sample, so a sample's bytes do not depend on the batch it
travels in. Per-sample Python work is limited to gathering the plans' matrices.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import geometry as G
from ..borders import BORDERS
from ..plan import AffineStep, AxisAligned, SamplePlan, axis_aligned
from .base import Backend, same_output_shape

_CHAIN_ELEMENTS = 1 << 24  # per warp-chain chunk: bounds each (B, P, K) weight temporary to 64 MB


@dataclass
class _Group:
    """Samples sharing input shape and output size: resampled together."""

    positions: list[int]  # where the samples sit in the batch
    plans: list[SamplePlan]
    images: torch.Tensor | list[torch.Tensor]  # uint8 (n, H, W, C) on the device, or (CPU) a list of H×W×C

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return self.plans[0].in_shape

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.plans[0].out_hw


class TorchBackend(Backend):
    """Fused plans on a whole batch with ``torch.nn.functional.grid_sample`` (bilinear), CPU or CUDA."""

    name = "torch"
    devices = ("cpu", "cuda")

    def __init__(self, spec, device: str = "cpu") -> None:
        super().__init__(spec, device)
        self._device = torch.device(device)
        self._cuda = self._device.type == "cuda"

    # --- batch ---------------------------------------------------------------------------------------

    def run(self, images, plans):
        """``images``: N×H×W×C uint8 tensor (any device) or list of H×W×C uint8 arrays; one plan each.
        Returns uint8 N×out_h×out_w×C on ``self.device`` (a list of tensors when output sizes differ)."""
        count = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        if count != len(plans):
            raise ValueError(f"got {len(plans)} plans for {count} images")
        if count == 0:
            raise ValueError("empty batch: no images were given")
        results = []  # (positions, uint8 (n, h, w, C) tensor)
        for group in self._groups(images, plans):
            if any(p.color is not None for p in group.plans) and group.plans[0].color_first:
                group.images = self._color_uint8(self._stacked(group), group.plans)
            results.extend(self._geometry(group))
        return self._assemble(results, plans)

    def _groups(self, images, plans: list[SamplePlan]) -> list[_Group]:
        keyed: dict[tuple, list[int]] = defaultdict(list)
        for index, plan in enumerate(plans):
            keyed[(tuple(plan.in_shape), tuple(plan.out_hw))].append(index)
        if isinstance(images, torch.Tensor):
            batch = self._to_device(images)
            shape = tuple(batch.shape[1:])
            groups = []
            for (in_shape, _), positions in keyed.items():
                if in_shape != shape:
                    raise ValueError(f"image {positions[0]}: shape {shape} does not match its plan's in_shape {in_shape}")
                picked = batch if len(positions) == batch.shape[0] else batch[torch.tensor(positions, device=batch.device)]
                groups.append(_Group(positions, [plans[i] for i in positions], picked))
            return groups
        groups = []
        for (in_shape, _), positions in keyed.items():
            arrays = [images[i] if images[i].ndim == 3 else images[i][..., None] for i in positions]
            for i, array in zip(positions, arrays):
                if tuple(array.shape) != in_shape:
                    raise ValueError(f"image {i}: shape {tuple(array.shape)} does not match its plan's in_shape {in_shape}")
            if self._cuda:
                staging = torch.empty((len(arrays), *in_shape), dtype=torch.uint8, pin_memory=True)
                staged = staging.numpy()
                for k, array in enumerate(arrays):
                    staged[k] = array
                picked = staging.to(self._device, non_blocking=True)
            else:
                picked = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
            groups.append(_Group(positions, [plans[i] for i in positions], picked))
        return groups

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {batch.dtype}")
        if batch.device == self._device or (not self._cuda and batch.device.type == "cpu"):
            return batch
        if self._cuda and batch.device.type == "cpu":
            return batch.pin_memory().to(self._device, non_blocking=True)
        return batch.to(self._device)

    def _stacked(self, group: _Group) -> torch.Tensor:
        return group.images if isinstance(group.images, torch.Tensor) else torch.stack(group.images)

    def _assemble(self, results, plans):
        if same_output_shape(plans):
            if len(results) == 1:  # one piece covering the batch in order: no copy
                return results[0][1]
            height, width = plans[0].out_hw
            out = torch.empty((len(plans), height, width, plans[0].channels), dtype=torch.uint8, device=self._device)
            for positions, piece in results:
                out[torch.tensor(positions, device=self._device)] = piece
            return out
        outputs: list[torch.Tensor | None] = [None] * len(plans)
        for positions, piece in results:
            for k, position in enumerate(positions):
                outputs[position] = piece[k]
        return outputs

    # --- geometry ------------------------------------------------------------------------------------

    def _geometry(self, group: _Group):
        """Split a group into pixel copies, affine resamplings and warp chains; run each batched."""
        plans = group.plans
        facts = axis_aligned(plans)
        exact = [k for k in range(len(plans)) if facts.copies[k]]
        windows = _windows(facts, exact, group.out_hw)
        interpolated = [k for k, p in enumerate(plans) if p.inverse is not None and not facts.copies[k]]
        affine_matrices = np.stack([plans[k].inverse for k in interpolated]) if interpolated else None
        chains: dict[tuple, list[int]] = defaultdict(list)
        for k, plan in enumerate(plans):
            if plan.inverse is None:
                chains[_signature(plan)].append(k)

        pieces = []
        if exact:
            pieces.append((exact, self._copy_windows(group, exact, windows)))
        if interpolated:
            grid = self._affine_grid(affine_matrices, group.in_shape[:2], group.out_hw)
            pieces.append((interpolated, self._resample(group, interpolated, grid)))
        for members in chains.values():
            grid = self._chain_grid([plans[k] for k in members], group.in_shape[:2], group.out_hw)
            pieces.append((members, self._resample(group, members, grid)))

        results = []
        for members, image in pieces:
            member_plans = [plans[k] for k in members]
            color = None if member_plans[0].color_first else self._color_tensors(member_plans)
            image = self._finish(image, color)
            results.append(([group.positions[k] for k in members], image))
        return results

    def _affine_grid(self, matrices: np.ndarray, in_hw, out_hw) -> torch.Tensor:
        """(n, out_h, out_w, 2) normalised source coordinates of every destination pixel centre."""
        (in_h, in_w), (out_h, out_w) = in_hw, out_hw
        # Fold the pixel centres (+0.5) and grid_sample's normalisation (2 x / W - 1) into the matrices,
        # in float64 on the host, so the device evaluates x_n = a j + b i + c per pixel index (i, j).
        rows = matrices[:, :2, :]
        coefficients = np.empty((len(matrices), 2, 3))
        coefficients[:, :, :2] = rows[:, :, :2]
        coefficients[:, :, 2] = 0.5 * rows[:, :, 0] + 0.5 * rows[:, :, 1] + rows[:, :, 2]
        coefficients[:, 0] *= 2.0 / in_w
        coefficients[:, 1] *= 2.0 / in_h
        coefficients[:, :, 2] -= 1.0
        theta = torch.from_numpy(coefficients.astype(np.float32)).to(self._device)
        cols = torch.arange(out_w, dtype=torch.float32, device=self._device)
        rows_i = torch.arange(out_h, dtype=torch.float32, device=self._device)
        grid = torch.empty((len(matrices), out_h, out_w, 2), dtype=torch.float32, device=self._device)
        for axis in (0, 1):
            along_row = theta[:, axis, 0, None] * cols + theta[:, axis, 2, None]  # (n, out_w)
            along_col = theta[:, axis, 1, None] * rows_i  # (n, out_h)
            torch.add(along_row[:, None, :], along_col[:, :, None], out=grid[..., axis])
        return grid

    def _chain_grid(self, plans: list[SamplePlan], in_hw, out_hw) -> torch.Tensor:
        """Like :meth:`_affine_grid` for plans with the same chain signature (see ``source_map.source_map``)."""
        (in_h, in_w), (out_h, out_w) = in_hw, out_hw
        steps = list(zip(*(p.chain for p in plans)))  # step index → that step of every plan
        # One upload for every per-sample parameter of the chain.
        blocks = [np.stack([s.inverse[:2] for s in column]) if isinstance(column[0], AffineStep) else np.stack([s.control for s in column]) for column in steps]
        flat = torch.from_numpy(np.concatenate([b.reshape(len(plans), -1) for b in blocks], axis=1).astype(np.float32)).to(self._device)
        params, start = [], 0
        for block in blocks:
            size = int(np.prod(block.shape[1:]))
            params.append(flat[:, start : start + size].reshape(block.shape))
            start += size
        xs = torch.arange(out_w, dtype=torch.float32, device=self._device) + 0.5
        ys = torch.arange(out_h, dtype=torch.float32, device=self._device) + 0.5
        points_x = xs.repeat(out_h)  # (P,), row-major over the destination
        points_y = ys.repeat_interleave(out_w)
        grid = torch.empty((len(plans), out_h * out_w, 2), dtype=torch.float32, device=self._device)
        knots = max((s.control.shape[0] + 2 for s in plans[0].chain if not isinstance(s, AffineStep)), default=1)
        chunk = max(1, _CHAIN_ELEMENTS // (out_h * out_w * knots))
        for lo in range(0, len(plans), chunk):
            hi = min(lo + chunk, len(plans))
            x = points_x.expand(hi - lo, -1)  # (B, P)
            y = points_y.expand(hi - lo, -1)
            for column, param in zip(steps, params):
                step, value = column[0], param[lo:hi]
                if isinstance(step, AffineStep):
                    m = value[:, :, :, None]  # (B, 2, 3, 1)
                    x, y = m[:, 0, 0] * x + m[:, 0, 1] * y + m[:, 0, 2], m[:, 1, 0] * x + m[:, 1, 1] * y + m[:, 1, 2]
                else:
                    dx, dy = G.warp_displacement(x, y, value, step.kind, step.height, step.width)
                    x, y = x + dx, y + dy
            grid[lo:hi, :, 0] = x * (2.0 / in_w) - 1.0
            grid[lo:hi, :, 1] = y * (2.0 / in_h) - 1.0
        return grid.view(len(plans), out_h, out_w, 2)

    def _resample(self, group: _Group, members: list[int], grid: torch.Tensor):
        """Bilinear resampling of the ``members`` of ``group`` at ``grid``: float32 (n, C, out_h, out_w)."""
        source = self._float_nchw(group, members)
        fill = float(self.fill) if self.border == "constant" else 0.0
        if fill:
            source.sub_(fill)
        out = F.grid_sample(source, grid, mode="bilinear", padding_mode=BORDERS[self.border].torch_padding, align_corners=False)
        if fill:
            out.add_(fill)
        return out

    def _float_nchw(self, group: _Group, members: list[int]) -> torch.Tensor:
        """float32 (n, C, H, W) in channels-last memory (what a uint8 NHWC batch converts to fastest)."""
        if isinstance(group.images, torch.Tensor):
            images = group.images
            if len(members) != images.shape[0]:
                images = images[torch.tensor(members, device=images.device)]
            return images.permute(0, 3, 1, 2).to(torch.float32)
        height, width, channels = group.in_shape
        out = torch.empty((len(members), height, width, channels), dtype=torch.float32)
        for k, member in enumerate(members):  # convert while gathering: one pass, no uint8 stack
            out[k].copy_(group.images[member])
        return out.permute(0, 3, 1, 2)

    def _copy_windows(self, group: _Group, members: list[int], windows: np.ndarray):
        """Plain pixel copies: destination (i, j) ← source (r0 + sr i, c0 + sc j), sr, sc = ±1.
        Returns uint8 (n, out_h, out_w, C)."""
        (height, width, channels), (out_h, out_w) = group.in_shape, group.out_hw
        if self._cuda:
            # One gather kernel for the whole batch (a per-sample loop would launch 2 kernels per image).
            w = torch.from_numpy(windows).to(self._device)
            rows = w[:, 0, None] + w[:, 1, None] * torch.arange(out_h, device=self._device)
            cols = w[:, 2, None] + w[:, 3, None] * torch.arange(out_w, device=self._device)
            index = torch.tensor(members, device=self._device)[:, None, None]
            out = group.images[index, rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]
            if self.border == "constant" and not _inside(windows, out_h, out_w, height, width).all():
                inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
                out.masked_fill_(~inside[..., None], self.fill)
            return out
        out = torch.empty((len(members), out_h, out_w, channels), dtype=torch.uint8)
        inside = _inside(windows, out_h, out_w, height, width)
        for k, (member, (r0, sr, c0, sc), within) in enumerate(zip(members, windows.tolist(), inside)):
            image = group.images[member]
            if within:  # slices (+ flips): a plain memory copy
                top = r0 if sr > 0 else r0 - out_h + 1
                left = c0 if sc > 0 else c0 - out_w + 1
                window = image[top : top + out_h, left : left + out_w]
                flips = [axis for axis, step in ((0, sr), (1, sc)) if step < 0]
                out[k].copy_(window.flip(flips) if flips else window)
                continue
            rows = r0 + sr * torch.arange(out_h)
            cols = c0 + sc * torch.arange(out_w)
            out[k].copy_(image.index_select(0, rows.clamp(0, height - 1)).index_select(1, cols.clamp(0, width - 1)))
            if self.border == "constant":
                out[k][(rows < 0) | (rows >= height)] = self.fill
                out[k][:, (cols < 0) | (cols >= width)] = self.fill
        return out

    # --- color and the uint8 conversion -------------------------------------------------------------

    def _color_tensors(self, plans: list[SamplePlan]) -> "_Color | None":
        """The color pass of ``plans`` as device tensors; ``None`` when no plan changes the color."""
        if all(p.color is None for p in plans):
            return None
        channels = plans[0].channels
        identity, zero = np.eye(channels), np.zeros(channels)
        matrices = np.stack([identity if p.color is None else p.color[0] for p in plans])
        offsets = np.stack([zero if p.color is None else p.color[1] for p in plans])
        if np.all(matrices == identity):
            # Offsets only (pca_color, color_shift) on integer pixels: round(x + o) = x + round(o) unless
            # o sits on a .5 tie (then the parity of x decides). Away from ties, add whole numbers: no
            # float rounding per pixel, and uint8 pixels can take it in int16.
            fraction = np.abs(offsets - np.floor(offsets) - 0.5)
            if np.all(fraction > 1e-4):
                # ±1024 saturates 0..255 exactly like any larger offset, and fits int16.
                whole = torch.from_numpy(np.clip(np.round(offsets), -1024, 1024).astype(np.float32)).to(self._device)
                return _Color(None, whole, integral=True)
            return _Color(None, torch.from_numpy(offsets.astype(np.float32)).to(self._device), integral=False)
        packed = torch.from_numpy(np.concatenate([offsets, matrices.reshape(len(plans), -1)], axis=1).astype(np.float32)).to(self._device)
        return _Color(packed[:, channels:].reshape(-1, channels, channels), packed[:, :channels], integral=False)

    def _finish(self, image: torch.Tensor, color: "_Color | None") -> torch.Tensor:
        """Color and uint8 conversion of a geometry result: uint8 (n, h, w, C).

        ``image``: float (n, C, h, w) from resampling — a convex combination of pixels and ``fill``, so
        inside 0..255 — or uint8 (n, h, w, C) from pixel copies. As on the CPU reference, the resampled
        image is rounded to whole numbers before its color pass."""
        if image.dtype == torch.uint8:
            if color is None:
                return image
            if color.integral:
                shifted = image.to(torch.int16).add_(color.offsets.to(torch.int16)[:, None, None, :])
                return _to_uint8(shifted.clamp_(0, 255))
            image = image.to(torch.float32)
            color.apply(image, channel_dim=3)
            return _to_uint8(image.round_().clamp_(0.0, 255.0))
        if color is None:
            return _to_uint8(image.round_().permute(0, 2, 3, 1))
        if color.integral:  # round(v) + k = round(v + k) for whole k: one rounding
            image.add_(color.offsets[:, :, None, None])
        else:
            image.round_()
            color.apply(image, channel_dim=1)
        return _to_uint8(image.round_().clamp_(0.0, 255.0).permute(0, 2, 3, 1))

    def _color_uint8(self, images: torch.Tensor, plans: list[SamplePlan]) -> torch.Tensor:
        """Color pass on the uint8 input, before geometry (``color_first``): uint8 (n, H, W, C)."""
        return self._finish(images, self._color_tensors(plans))


@dataclass
class _Color:
    """Per-sample color on the device: ``matrices`` (n, C, C) or ``None`` for identities, ``offsets``
    (n, C) on the 0–255 scale; ``integral`` when the offsets were rounded to whole numbers (see
    :meth:`TorchBackend._color_tensors`)."""

    matrices: torch.Tensor | None
    offsets: torch.Tensor
    integral: bool

    def apply(self, image: torch.Tensor, channel_dim: int) -> None:
        """In place on float ``image``: ``pixel ← matrix @ pixel + offset`` per sample.

        Elementwise products over the (at most 3) channels rather than a bmm/einsum, so a sample's
        result never depends on the batch it travels in."""
        channels = self.offsets.shape[1]
        if self.matrices is not None:
            planes = [image.select(channel_dim, c) for c in range(channels)]
            view = [-1] + [1] * (image.ndim - 2)
            mixed = []
            for i in range(channels):
                total = self.matrices[:, i, 0].view(view) * planes[0]
                for j in range(1, channels):
                    total = total + self.matrices[:, i, j].view(view) * planes[j]
                mixed.append(total)
            for c, value in enumerate(mixed):
                planes[c].copy_(value)
        shape = [-1] + [1] * (image.ndim - 1)
        shape[channel_dim] = channels
        image.add_(self.offsets.view(shape))


def _windows(facts: AxisAligned, members: list[int], out_hw: tuple[int, int]) -> np.ndarray:
    """``(r0, sr, c0, sc)`` per pixel-copy member: destination (i, j) takes source pixel
    (r0 + sr i, c0 + sc j), sr, sc = ±1 (a mirrored window starts at its far edge)."""
    out_h, out_w = out_hw
    windows = np.empty((len(members), 4), dtype=np.int64)
    for row, k in enumerate(members):
        top, left = facts.window(k)
        flip_y, flip_x = bool(facts.flip_y[k]), bool(facts.flip_x[k])
        windows[row] = (top + (out_h - 1) * flip_y, -1 if flip_y else 1, left + (out_w - 1) * flip_x, -1 if flip_x else 1)
    return windows


def _inside(windows: np.ndarray, out_h: int, out_w: int, height: int, width: int) -> np.ndarray:
    """Whether each window lies entirely inside the source."""
    r0, sr, c0, sc = windows.T
    r1, c1 = r0 + sr * (out_h - 1), c0 + sc * (out_w - 1)
    return (np.minimum(r0, r1) >= 0) & (np.maximum(r0, r1) < height) & (np.minimum(c0, c1) >= 0) & (np.maximum(c0, c1) < width)


def _signature(plan: SamplePlan) -> tuple:
    """Plans whose chains have the same steps (and warp canvases) are evaluated together."""
    return tuple(("affine",) if isinstance(s, AffineStep) else ("warp", s.kind, s.control.shape, s.height, s.width) for s in plan.chain)


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Whole numbers in 0..255 (any dtype, (n, h, w, C) with any strides) → contiguous uint8 NHWC,
    converted in one pass."""
    out = torch.empty(image.shape, dtype=torch.uint8, device=image.device)
    out.copy_(image)
    return out
