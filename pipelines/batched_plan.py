"""A batch's fused plans as a few tensors: what the torch backend runs, wherever they were made.

:func:`pipelines.plan.fuse_batch` makes one :class:`~pipelines.plan.SamplePlan` object per sample;
:func:`pipelines.device_fusion.fuse_on_device` makes the same numbers as tensors on the worker's device
with no per-sample object. :class:`FusedBatch` is the layout both end in (:meth:`FusedBatch.from_plans`
converts the former), so the backend has one code path and a sample's bytes cannot depend on where its
plan was computed. :func:`copy_windows` is the torch twin of :func:`pipelines.plan.axis_aligned`'s
pixel-copy test (same tolerance, same formulas), evaluated where the matrices are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .plan import PIXEL_ATOL, SamplePlan, WarpStep, AffineStep


@dataclass
class FusedBatch:
    """Fused geometry and color of N samples.

    ``inverse``: (N, 3, 3) float64 destination→source matrices in continuous pixel coordinates (see
    :mod:`pipelines.geometry`); for a sample with a ``chain`` an unused identity. ``out_hw``: (N, 2)
    int64 output sizes. ``offsets``: (N, 3) float64 color offsets on the 0–255 scale, zero in the
    columns beyond the sample's channel count and for samples whose color is unchanged; ``colored``:
    (N,) bool, whether the sample has a color pass at all. ``color_matrices``: (N, 3, 3) float64 C×C
    color matrices in the top-left corner, or ``None`` when every one is the identity (what every color
    op of today makes). These tensors live on one device (the host for plans made by numpy).

    Host-side: ``in_shapes`` (N, 3) int64 (H, W, C) of the inputs; ``chains`` (host plans only) the
    warp chain of each sample, ``None`` where the geometry is affine. ``invalid``: (N,) bool tensor of
    samples whose parameters the numpy path refuses (device plans defer those checks), and
    ``explain()``, which raises the numpy path's one-line error for them. ``facts``: the
    :func:`facts_table` of the batch when its maker computed it already (on the device, with the rest).
    """

    in_shapes: np.ndarray
    inverse: torch.Tensor
    out_hw: torch.Tensor
    offsets: torch.Tensor
    colored: torch.Tensor
    color_first: bool = False
    color_matrices: torch.Tensor | None = None
    chains: list[list[AffineStep | WarpStep] | None] | None = None
    invalid: torch.Tensor | None = None
    explain: Callable[[], None] | None = None
    facts: torch.Tensor | None = None
    _host_facts: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.in_shapes)

    def host_facts(self) -> np.ndarray:
        """:func:`facts_table` on the host, (N, 10) int64 of :data:`FACT_COLUMNS`: fetched once (for
        device plans the batch's one device→host copy). Raises the numpy path's error when a sample is
        invalid."""
        if self._host_facts is None:
            table = (facts_table(self) if self.facts is None else self.facts).cpu().numpy()
            if table[:, FACT_COLUMNS.index("invalid")].any():
                if self.explain is not None:
                    self.explain()
                raise ValueError("invalid augmentation parameters in this batch")
            self._host_facts = table
        return self._host_facts

    def select(self, positions: list[int]) -> "FusedBatch":
        """The batch of the samples at ``positions`` (in that order): every tensor indexed on its device,
        the host facts too when fetched already."""
        rows = np.asarray(positions, dtype=np.int64)
        index = torch.from_numpy(rows).to(self.inverse.device)

        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.index_select(0, index.to(tensor.device))

        return FusedBatch(
            self.in_shapes[rows], pick(self.inverse), pick(self.out_hw), pick(self.offsets), pick(self.colored),
            color_first=self.color_first, color_matrices=pick(self.color_matrices),
            chains=None if self.chains is None else [self.chains[k] for k in rows.tolist()],
            invalid=pick(self.invalid), explain=self.explain, facts=pick(self.facts),
            _host_facts=None if self._host_facts is None else self._host_facts[rows],
        )  # fmt: skip

    def sizes(self) -> "OutputSizes":
        """Input shapes and output sizes on the host (what ``pipelines.destination.output_shape`` reads)."""
        table = self.host_facts()
        return OutputSizes(self.in_shapes, table[:, :2])

    @classmethod
    def from_plans(cls, plans: list[SamplePlan]) -> "FusedBatch":
        """The batch of ``plans`` (host tensors): a gather over per-sample objects, stacked in a few
        numpy calls."""
        n, eye = len(plans), np.eye(3)
        in_shapes = np.array([plan.in_shape for plan in plans], dtype=np.int64).reshape(n, 3)
        out_hw = np.array([plan.out_hw for plan in plans], dtype=np.int64).reshape(n, 2)
        inverses = [plan.inverse for plan in plans]
        affine = [inverse is not None for inverse in inverses]
        inverse = np.stack([m if ok else eye for m, ok in zip(inverses, affine)]) if n else np.empty((0, 3, 3))
        chains = None if all(affine) else [None if ok else plan.chain for plan, ok in zip(plans, affine)]
        colors = [plan.color for plan in plans]
        colored = np.array([color is not None for color in colors], dtype=bool)
        offsets, matrices = np.zeros((n, 3)), np.broadcast_to(eye, (n, 3, 3)).copy()
        for count in {len(color[1]) for color in colors if color is not None}:  # 1 or 3 channels
            rows = [i for i, color in enumerate(colors) if color is not None and len(color[1]) == count]
            offsets[rows, :count] = np.stack([colors[i][1] for i in rows])
            matrices[rows, :count, :count] = np.stack([colors[i][0] for i in rows])
        return cls(
            in_shapes,
            torch.from_numpy(inverse),
            torch.from_numpy(out_hw),
            torch.from_numpy(offsets),
            torch.from_numpy(colored),
            color_first=bool(plans[0].color_first) if plans else False,
            color_matrices=None if (matrices == eye).all() else torch.from_numpy(matrices),
            chains=chains,
        )


@dataclass(frozen=True)
class OutputSizes:
    """The sizes of a batch: ``in_shapes`` (N, 3) int64 H, W, C; ``out_hw`` (N, 2) int64."""

    in_shapes: np.ndarray
    out_hw: np.ndarray

    def __len__(self) -> int:
        return len(self.in_shapes)


def _whole(values: torch.Tensor) -> torch.Tensor:
    return (values - torch.round(values)).abs() <= PIXEL_ATOL


def copy_windows(inverse: torch.Tensor, out_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples only copy whole pixels, and from where — :func:`pipelines.plan.axis_aligned`'s
    ``copies`` and :meth:`~pipelines.plan.AxisAligned.window`, as tensors on ``inverse``'s device.

    ``inverse``: (N, 3, 3) float64 affine dst→src matrices; ``out_hw``: (N, 2) int64. Returns ``copies``
    (N,) bool and ``windows`` (N, 4) int64 ``(r0, sr, c0, sc)``: destination (i, j) takes source pixel
    (r0 + sr i, c0 + sc j), sr, sc = ±1 (a mirrored window starts at its far edge); zeros where not a copy.
    """
    a, d = inverse[:, 0, 0], inverse[:, 1, 1]
    aligned = (inverse[:, 0, 1].abs() <= PIXEL_ATOL) & (inverse[:, 1, 0].abs() <= PIXEL_ATOL) & (a.abs() > PIXEL_ATOL) & (d.abs() > PIXEL_ATOL)
    flip_x, flip_y = a < 0, d < 0
    out_h, out_w = out_hw[:, 0], out_hw[:, 1]
    # x = a * X + tx over the output's continuous X in [0, out_w]; mirrored: X -> out_w - X.
    left = torch.where(flip_x, inverse[:, 0, 2] + a * out_w.to(torch.float64), inverse[:, 0, 2])
    top = torch.where(flip_y, inverse[:, 1, 2] + d * out_h.to(torch.float64), inverse[:, 1, 2])
    unit = ((a.abs() - 1.0).abs() <= PIXEL_ATOL) & ((d.abs() - 1.0).abs() <= PIXEL_ATOL)
    copies = aligned & unit & _whole(left) & _whole(top)
    # Rounded only where they are whole numbers: elsewhere they may be anything (huge, inf).
    top = torch.where(copies, torch.round(top), 0.0).to(torch.int64)
    left = torch.where(copies, torch.round(left), 0.0).to(torch.int64)
    step_y, step_x = 1 - 2 * flip_y.to(torch.int64), 1 - 2 * flip_x.to(torch.int64)
    windows = torch.stack([top + (out_h - 1) * flip_y, step_y, left + (out_w - 1) * flip_x, step_x], dim=1)
    return copies, torch.where(copies[:, None], windows, 0)


TIE_ATOL = 1e-4  # a color offset this close to a .5 tie is not rounded ahead (see TorchBackend._color_tensors)
FACT_COLUMNS = ("out_h", "out_w", "copies", "r0", "sr", "c0", "sc", "colored", "ties", "invalid")


def facts_table(fused: FusedBatch) -> torch.Tensor:
    """What the host must know of a batch to split it into passes, as one (N, 10) int64 tensor of
    :data:`FACT_COLUMNS` on the batch's device — so that knowing it costs one device→host copy.

    ``copies``/``r0 sr c0 sc``: :func:`copy_windows`; ``colored``: the sample has a color pass;
    ``ties``: one of its offsets lies within :data:`TIE_ATOL` of a .5 tie; ``invalid``: see
    :class:`FusedBatch` (0 when the batch has no such flags)."""
    copies, windows = copy_windows(fused.inverse, fused.out_hw)
    fraction = (fused.offsets - torch.floor(fused.offsets) - 0.5).abs()
    ties = (fraction <= TIE_ATOL).any(dim=1)
    invalid = torch.zeros_like(ties) if fused.invalid is None else fused.invalid
    flags = torch.stack([fused.colored, ties, invalid], dim=1).to(torch.int64)
    return torch.cat([fused.out_hw, copies[:, None].to(torch.int64), windows, flags], dim=1)
