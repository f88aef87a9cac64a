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
travels in.

Plans arrive as :class:`~pipelines.batched_plan.FusedBatch` tensors: ``run`` gathers a list of
``SamplePlan`` objects into one (the host path's per-sample Python work), ``run_fused`` takes one made
on the device (:mod:`pipelines.device_fusion`) as it is. Either way the passes are the same — the host
learns how to split the batch (output sizes, pixel copies and their windows, color flags) from one
small table copied from the plans' device, and matrices and offsets stay where they were made — so a
sample's bytes do not depend on where its plan came from. Copies take the window-copy fast path on
both; only local warps (host plans) take the chain path.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import geometry as G
from ..borders import BORDERS
from ..batched_plan import FACT_COLUMNS, FusedBatch
from ..plan import AffineStep, WarpStep
from .base import Backend

_CHAIN_ELEMENTS = 1 << 24  # per warp-chain chunk: bounds each (B, P, K) weight temporary to 64 MB


@dataclass
class _Group:
    """Samples sharing input shape and output size: resampled together."""

    positions: np.ndarray  # int64 (n,): where the samples sit in the batch
    in_shape: tuple[int, int, int]
    out_hw: tuple[int, int]
    images: torch.Tensor | list[torch.Tensor]  # uint8 (n, H, W, C) on the device, or (CPU) a list of H×W×C


@dataclass
class _Facts:
    """What the host needs to know of a :class:`FusedBatch` to split it into passes (arrays of length N),
    fetched from the plan's device in one copy."""

    out_hw: np.ndarray  # int64 (N, 2)
    copies: np.ndarray  # bool: whole-pixel copies (see ``copy_windows``)
    windows: np.ndarray  # int64 (N, 4): ``(r0, sr, c0, sc)`` of each copy
    colored: np.ndarray  # bool: the sample has a color pass
    ties: np.ndarray  # bool: a color offset sits near a .5 tie (batched_plan.TIE_ATOL)


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
        return self.run_fused(images, FusedBatch.from_plans(plans))

    def run_fused(self, images, fused: FusedBatch):
        """:meth:`run` on a batch of plans as tensors (made on the host from plans, or on the device by
        :func:`pipelines.device_fusion.plan_on_device`): the same passes, the same bytes."""
        count = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        if count != len(fused):
            raise ValueError(f"got {len(fused)} plans for {count} images")
        if count == 0:
            raise ValueError("empty batch: no images were given")
        facts = self._facts(fused)
        results = []  # (positions, uint8 (n, h, w, C) tensor)
        for group in self._groups(images, fused, facts):
            if fused.color_first and facts.colored[group.positions].any():
                group.images = self._finish(self._stacked(group), self._color_tensors(fused, facts, group.positions, group.in_shape[2]))
            results.extend(self._geometry(group, fused, facts))
        return self._assemble(results, fused, facts)

    def _facts(self, fused: FusedBatch) -> _Facts:
        """The host's part of ``fused`` (:meth:`~pipelines.batched_plan.FusedBatch.host_facts`): the
        only device→host copy a batch planned on the device makes."""
        column = dict(zip(FACT_COLUMNS, fused.host_facts().T))
        copies = column["copies"].astype(bool)
        if fused.chains is not None:  # warped samples have no matrix to copy with
            copies &= np.array([chain is None for chain in fused.chains])
        windows = np.stack([column[name] for name in ("r0", "sr", "c0", "sc")], axis=1)
        return _Facts(np.stack([column["out_h"], column["out_w"]], axis=1), copies, windows, column["colored"].astype(bool), column["ties"].astype(bool))

    def _groups(self, images, fused: FusedBatch, facts: _Facts) -> list[_Group]:
        keys = np.concatenate([fused.in_shapes, facts.out_hw], axis=1)
        if (keys == keys[0]).all():
            members = [np.arange(len(keys))]
        else:  # groups in order of first appearance
            _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
            inverse = inverse.reshape(-1)
            members = [np.flatnonzero(inverse == g) for g in np.argsort(first)]
        shapes = [(tuple(int(v) for v in keys[m[0], :3]), (int(keys[m[0], 3]), int(keys[m[0], 4]))) for m in members]
        if isinstance(images, torch.Tensor):
            batch = self._to_device(images)
            shape = tuple(batch.shape[1:])
            groups = []
            for positions, (in_shape, out_hw) in zip(members, shapes):
                if in_shape != shape:
                    raise ValueError(f"image {positions[0]}: shape {shape} does not match its plan's in_shape {in_shape}")
                picked = batch if len(positions) == batch.shape[0] else batch[torch.from_numpy(positions).to(batch.device)]
                groups.append(_Group(positions, in_shape, out_hw, picked))
            return groups
        groups = []
        for positions, (in_shape, out_hw) in zip(members, shapes):
            arrays = [images[i] if images[i].ndim == 3 else images[i][..., None] for i in positions.tolist()]
            for i, array in zip(positions.tolist(), arrays):
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
            groups.append(_Group(positions, in_shape, out_hw, picked))
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

    def _assemble(self, results, fused: FusedBatch, facts: _Facts):
        shapes = np.concatenate([facts.out_hw, fused.in_shapes[:, 2:]], axis=1)
        if (shapes == shapes[0]).all():
            if len(results) == 1:  # one piece covering the batch in order: no copy
                return results[0][1]
            height, width, channels = (int(v) for v in shapes[0])
            out = torch.empty((len(shapes), height, width, channels), dtype=torch.uint8, device=self._device)
            for positions, piece in results:
                out[torch.from_numpy(positions).to(self._device)] = piece
            return out
        outputs: list[torch.Tensor | None] = [None] * len(shapes)
        for positions, piece in results:
            for k, position in enumerate(positions.tolist()):
                outputs[position] = piece[k]
        return outputs

    # --- geometry ------------------------------------------------------------------------------------

    def _geometry(self, group: _Group, fused: FusedBatch, facts: _Facts):
        """Split a group into pixel copies, affine resamplings and warp chains; run each batched.
        Members are indices into the group (``group.positions[k]`` is the batch position)."""
        positions = group.positions
        exact = np.flatnonzero(facts.copies[positions])
        chained = np.zeros(len(positions), dtype=bool) if fused.chains is None else np.array([fused.chains[p] is not None for p in positions.tolist()])
        interpolated = np.flatnonzero(~facts.copies[positions] & ~chained)
        chains: dict[tuple, list[int]] = defaultdict(list)
        for k in np.flatnonzero(chained).tolist():
            chains[_signature(fused.chains[positions[k]])].append(k)

        pieces = []
        if exact.size:
            pieces.append((exact, self._copy_windows(group, exact.tolist(), facts.windows[positions[exact]])))
        if interpolated.size:
            grid = self._affine_grid(_take(fused.inverse, positions[interpolated]), group.in_shape[:2], group.out_hw)
            pieces.append((interpolated, self._resample(group, interpolated.tolist(), grid)))
        for members in chains.values():
            grid = self._chain_grid([fused.chains[positions[k]] for k in members], group.in_shape[:2], group.out_hw)
            pieces.append((np.array(members), self._resample(group, members, grid)))

        results = []
        for members, image in pieces:
            color = None if fused.color_first else self._color_tensors(fused, facts, positions[members], group.in_shape[2])
            results.append((positions[members], self._finish(image, color)))
        return results

    def _affine_grid(self, matrices: torch.Tensor, in_hw, out_hw) -> torch.Tensor:
        """(n, out_h, out_w, 2) normalised source coordinates of every destination pixel centre.
        ``matrices``: (n, 3, 3) float64 dst→src, on the host or the device."""
        (in_h, in_w), (out_h, out_w) = in_hw, out_hw
        # Fold the pixel centres (+0.5) and grid_sample's normalisation (2 x / W - 1) into the matrices,
        # in float64 where the matrices are (IEEE operations: the same bits on the host and the device),
        # so the device evaluates x_n = a j + b i + c per pixel index (i, j).
        rows = matrices[:, :2, :]
        shift = 0.5 * rows[:, :, 0] + 0.5 * rows[:, :, 1] + rows[:, :, 2]
        folded = torch.cat([rows[:, :, :2], shift[:, :, None]], dim=2)
        coefficients = torch.stack([folded[:, 0] * (2.0 / in_w), folded[:, 1] * (2.0 / in_h)], dim=1)
        coefficients[:, :, 2] -= 1.0
        theta = coefficients.to(torch.float32).to(self._device)
        cols = torch.arange(out_w, dtype=torch.float32, device=self._device)
        rows_i = torch.arange(out_h, dtype=torch.float32, device=self._device)
        grid = torch.empty((len(matrices), out_h, out_w, 2), dtype=torch.float32, device=self._device)
        for axis in (0, 1):
            along_row = theta[:, axis, 0, None] * cols + theta[:, axis, 2, None]  # (n, out_w)
            along_col = theta[:, axis, 1, None] * rows_i  # (n, out_h)
            torch.add(along_row[:, None, :], along_col[:, :, None], out=grid[..., axis])
        return grid

    def _chain_grid(self, chains: list[list[AffineStep | WarpStep]], in_hw, out_hw) -> torch.Tensor:
        """Like :meth:`_affine_grid` for chains with the same signature (see ``source_map.source_map``)."""
        (in_h, in_w), (out_h, out_w) = in_hw, out_hw
        steps = list(zip(*chains))  # step index → that step of every chain
        # One upload for every per-sample parameter of the chain.
        blocks = [np.stack([s.inverse[:2] for s in column]) if isinstance(column[0], AffineStep) else np.stack([s.control for s in column]) for column in steps]
        flat = torch.from_numpy(np.concatenate([b.reshape(len(chains), -1) for b in blocks], axis=1).astype(np.float32)).to(self._device)
        params, start = [], 0
        for block in blocks:
            size = int(np.prod(block.shape[1:]))
            params.append(flat[:, start : start + size].reshape(block.shape))
            start += size
        xs = torch.arange(out_w, dtype=torch.float32, device=self._device) + 0.5
        ys = torch.arange(out_h, dtype=torch.float32, device=self._device) + 0.5
        points_x = xs.repeat(out_h)  # (P,), row-major over the destination
        points_y = ys.repeat_interleave(out_w)
        grid = torch.empty((len(chains), out_h * out_w, 2), dtype=torch.float32, device=self._device)
        knots = max((s.control.shape[0] + 2 for s in chains[0] if not isinstance(s, AffineStep)), default=1)
        chunk = max(1, _CHAIN_ELEMENTS // (out_h * out_w * knots))
        for lo in range(0, len(chains), chunk):
            hi = min(lo + chunk, len(chains))
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
        return grid.view(len(chains), out_h, out_w, 2)

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

    def _color_tensors(self, fused: FusedBatch, facts: _Facts, members: np.ndarray, channels: int) -> "_Color | None":
        """The color pass of the batch positions ``members`` as device tensors; ``None`` when none of them
        changes the color."""
        if not facts.colored[members].any():
            return None
        offsets = _take(fused.offsets, members)[:, :channels]
        matrices = None if fused.color_matrices is None else _take(fused.color_matrices, members)[:, :channels, :channels]
        if matrices is None or bool((matrices == torch.eye(channels, dtype=matrices.dtype, device=matrices.device)).all()):
            # Offsets only (pca_color, color_shift) on integer pixels: round(x + o) = x + round(o) unless
            # o sits on a .5 tie (then the parity of x decides). Away from ties, add whole numbers: no
            # float rounding per pixel, and uint8 pixels can take it in int16.
            if not facts.ties[members].any():
                # ±1024 saturates 0..255 exactly like any larger offset, and fits int16.
                whole = torch.round(offsets).clamp(-1024, 1024).to(torch.float32).to(self._device)
                return _Color(None, whole, integral=True)
            return _Color(None, offsets.to(torch.float32).to(self._device), integral=False)
        packed = torch.cat([offsets, matrices.reshape(len(members), -1)], dim=1).to(torch.float32).to(self._device)
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


def _inside(windows: np.ndarray, out_h: int, out_w: int, height: int, width: int) -> np.ndarray:
    """Whether each window lies entirely inside the source."""
    r0, sr, c0, sc = windows.T
    r1, c1 = r0 + sr * (out_h - 1), c0 + sc * (out_w - 1)
    return (np.minimum(r0, r1) >= 0) & (np.maximum(r0, r1) < height) & (np.minimum(c0, c1) >= 0) & (np.maximum(c0, c1) < width)


def _signature(chain: list[AffineStep | WarpStep]) -> tuple:
    """Chains with the same steps (and warp canvases) are evaluated together."""
    return tuple(("affine",) if isinstance(s, AffineStep) else ("warp", s.kind, s.control.shape, s.height, s.width) for s in chain)


def _take(values: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
    """``values[positions]`` along the first axis, on ``values``' device; no gather for the whole batch."""
    if len(positions) == len(values) and (positions == np.arange(len(values))).all():
        return values
    return values[torch.from_numpy(positions).to(values.device, non_blocking=True)]  # staged: no wait for the device


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Whole numbers in 0..255 (any dtype, (n, h, w, C) with any strides) → contiguous uint8 NHWC,
    converted in one pass."""
    out = torch.empty(image.shape, dtype=torch.uint8, device=image.device)
    out.copy_(image)
    return out
