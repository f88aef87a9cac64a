"""Fusion on the device: :func:`pipelines.plan.fuse_batch` as batched torch ops, no per-sample object.

Per op the forward matrices of the whole batch (N, 3, 3) float64, composed in spec order, inverted in
closed form; color offsets summed per sample; the out sizes carried along — each step the formula of
:func:`pipelines.plan._batch_forward` / ``fuse_batch`` in the same operation order, so a plan made here
has the bits of the numpy one wherever the sampled parameters have (IEEE +, −, ×, ÷ are the same on
every device). Two differences of form, none of value: every geometric op is composed even where no
sample applies it (an identity product is exact), and errors the numpy path raises (a crop larger than
its canvas, a singular transform, PCA lighting on grey images) become a per-sample ``invalid`` flag that
the backend checks with the one device→host copy it makes anyway (``FusedBatch.explain`` then lets the
numpy path raise its one-line error).

:class:`DevicePlanner` runs sampling + fusion + the backend's :func:`~pipelines.batched_plan.facts_table`
for a batch from one uploaded (N, 5) int64 table; on CUDA as a CUDA graph per batch size.

Local warps have no device version: their chains are per-sample lists of steps, grouped by shape on the
host. :func:`choose_sampling` sends a spec with a ``warp`` to the host path.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Callable, NamedTuple

import numpy as np
import torch

from .batched_plan import FusedBatch, facts_table
from .device_sampling import DeviceParams, constant, device_inputs, divide, fixed_size, keeping_constants, sample_on_device
from .plan import fuse_batch
from .sampling import sample_batch
from .spec import PipelineSpec, Warp

log = logging.getLogger(__name__)

_NO_DEVICE_VERSION = (Warp,)  # ops whose fusion only the host path does
SAMPLING_MODES = ("auto", "host", "device")
MAX_SIZES_MET = 64  # batch sizes a planner remembers having met (a graph is captured on the second)


def choose_sampling(requested: str, spec: PipelineSpec, backend, fused: bool) -> str:
    """Where a pipeline samples and fuses: ``"device"`` or ``"host"``.

    ``requested``: ``"host"`` (numpy, always possible), ``"device"`` (needs a backend that runs a
    :class:`FusedBatch`, i.e. torch, and the fused path) or ``"auto"`` (device when such a backend runs
    on a device other than the CPU). A spec with an op that has no device version (``warp``) samples on
    the host either way: same parameters, same bytes, only slower."""
    if requested not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, got {requested!r}")
    capable = hasattr(backend, "run_fused")
    if requested == "device" and not capable:
        raise ValueError(f"sampling='device' needs the torch backend, got backend {backend.name!r}")
    if requested == "device" and not fused:
        raise ValueError("sampling='device' needs the fused path: fused=False replays each op on the host")
    if requested == "host" or not capable or not fused or any(isinstance(op, _NO_DEVICE_VERSION) for op in spec.ops):
        return "host"
    if requested == "auto" and torch.device(backend.device).type == "cpu":
        return "host"
    return "device"


class Fused(NamedTuple):
    """The tensors of a :class:`FusedBatch` made on the device (same names, layouts and dtypes)."""

    inverse: torch.Tensor  # (N, 3, 3) float64
    out_hw: torch.Tensor  # (N, 2) int64
    offsets: torch.Tensor  # (N, 3) float64
    colored: torch.Tensor  # (N,) bool
    invalid: torch.Tensor  # (N,) bool


class DevicePlanner:
    """Samples and fuses batches of ``spec`` (without ``normalize``) on ``device``: what
    ``Pipeline(sampling="device")`` calls instead of ``sample_batch`` + ``fuse_batch``.

    Per batch the host builds one (N, 5) int64 table (:func:`~pipelines.device_sampling.device_inputs`)
    and uploads it; the device does the rest — a few hundred small kernels. On CUDA (``graphs`` None or
    True) they are captured as a CUDA graph per batch size, the second time that size comes (a size met
    once runs eagerly), and replayed, so the host launches one graph instead of hundreds of kernels; a
    capture that fails is logged once and the same function runs eagerly (same kernels, same bits). Up
    to ``max_graphs`` batch sizes keep their graph."""

    def __init__(self, spec: PipelineSpec, device, color_first: bool = False, graphs: bool | None = None, max_graphs: int = 4) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.color_first = color_first
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device!r}")
        self._max_graphs = max_graphs
        self._replays: OrderedDict[int, _Replay] = OrderedDict()
        self._sizes_met: OrderedDict[int, None] = OrderedDict()  # batch sizes planned so far, the latest last

    def __call__(self, shapes, seed: int, epoch: int, sample_ids=None) -> FusedBatch:
        """The :class:`FusedBatch` of a batch of images of ``shapes`` ((N, 3) of H, W, C)."""
        in_shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 3)
        sample_ids = range(len(in_shapes)) if sample_ids is None else sample_ids
        inputs = torch.from_numpy(device_inputs(in_shapes, seed, epoch, sample_ids))
        # non_blocking: an upload from pageable memory is staged at once, with no wait for the device.
        inverse, out_hw, offsets, colored, invalid, facts = self._replay(inputs) if self.graphs else self.work(inputs.to(self.device, non_blocking=True))
        ids = inputs[:, 0].numpy()

        def explain() -> None:
            fuse_batch(sample_batch(self.spec, in_shapes, seed, epoch, ids), self.color_first)

        return FusedBatch(in_shapes, inverse, out_hw, offsets, colored, color_first=self.color_first, invalid=invalid, explain=explain, facts=facts)

    def work(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Everything the device does for a batch, a pure function of ``inputs`` (on the device):
        the :class:`Fused` tensors and the batch's facts table."""
        fused = fuse_on_device(sample_on_device(self.spec, inputs))
        return (*fused, facts_table(fused))

    def _replay(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        replay = self._replays.get(len(inputs))
        if replay is None:
            if not self._met_before(len(inputs)):
                # A size met once — a batch planned again without its corrupt files, an epoch's last
                # batch, a half after running out of memory — runs eagerly: a capture costs a few eager
                # runs and pays off only for a size that comes back.
                return self.work(inputs.to(self.device, non_blocking=True))
            try:
                replay = _Replay(self.work, inputs.to(self.device))
            except RuntimeError as exc:  # a driver or build without graph support: eager gives the same bits
                log.warning("CUDA graph capture of the parameter sampling failed (%s); running it without graphs", exc)
                self.graphs = False
                return self.work(inputs.to(self.device))
            self._replays[len(inputs)] = replay
            while len(self._replays) > self._max_graphs:
                self._replays.popitem(last=False)
        self._replays.move_to_end(len(inputs))
        return replay(inputs)

    def _met_before(self, size: int) -> bool:
        """Whether a batch of ``size`` samples was planned before; notes that one is now (the last
        :data:`MAX_SIZES_MET` sizes are remembered)."""
        met = size in self._sizes_met
        self._sizes_met[size] = None
        self._sizes_met.move_to_end(size)
        while len(self._sizes_met) > MAX_SIZES_MET:
            self._sizes_met.popitem(last=False)
        return met


class _Replay:
    """``function(inputs)`` captured as a CUDA graph for one input shape. Each call copies new inputs
    into the captured input tensor, replays, and returns copies of the outputs (the next replay
    overwrites the captured ones)."""

    def __init__(self, function: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], example: torch.Tensor) -> None:
        with torch.cuda.device(example.device), keeping_constants() as self.constants:  # the graph reads them: held as long as it
            self.inputs = example.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (lazy inits, constant uploads)
                for _ in range(2):
                    function(self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of the process's other threads (pinning a buffer) may go on meanwhile.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = function(self.inputs)

    def __call__(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.inputs.copy_(inputs, non_blocking=True)
        self.graph.replay()
        return tuple(output.clone() for output in self.outputs)


def plan_on_device(spec: PipelineSpec, shapes, seed: int, epoch: int, sample_ids, device, color_first: bool = False) -> FusedBatch:
    """One batch through a :class:`DevicePlanner` without graphs (``shapes``: (N, 3) of H, W, C;
    ``sample_ids``: N ids or None for 0 .. N-1)."""
    return DevicePlanner(spec, device, color_first, graphs=False)(shapes, seed, epoch, sample_ids)


# --- matrices of a batch -----------------------------------------------------------------------------


def _matrices(a, b, c, d, e, f) -> torch.Tensor:
    """(N, 3, 3) affine matrices ``[[a, b, c], [d, e, f], [0, 0, 1]]`` from (N,) float64 entries."""
    top = torch.stack([a, b, c, d, e, f], dim=1).view(-1, 2, 3)
    return torch.cat([top, constant((0.0, 0.0, 1.0), torch.float64, top.device).expand(len(top), 1, 3)], dim=1)


def _filled(value: float, like: torch.Tensor) -> torch.Tensor:
    """(N,) float64 ``value`` for the N samples of ``like``, without a kernel (a broadcast constant)."""
    return constant((value,), torch.float64, like.device).expand(len(like))


def _about_centers(l00, l01, l10, l11, hw: torch.Tensor) -> torch.Tensor:
    """The 2×2 maps ``[[l00, l01], [l10, l11]]`` about each canvas centre (``plan._about_centers``)."""
    half = hw.to(torch.float64) / 2.0
    cx, cy = half[:, 1], half[:, 0]
    return _matrices(l00, l01, cx - (l00 * cx + l01 * cy), l10, l11, cy - (l10 * cx + l11 * cy))


def _compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` summed left to right, the order of ``plan._compose``'s numpy sum (the same bits)."""
    products = a[:, :, :, None] * b[:, None, :, :]
    return products[:, :, 0] + products[:, :, 1] + products[:, :, 2]


def _invert_affine(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form inverses (``plan._invert_affine``) and the samples whose transform is singular."""
    a, b, c, d = m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
    tx, ty = m[:, 0, 2], m[:, 1, 2]
    det = a * d - b * c
    i00, i01, i10, i11 = d / det, -b / det, -c / det, a / det
    inverse = _matrices(i00, i01, -(i00 * tx + i01 * ty), i10, i11, -(i10 * tx + i11 * ty))
    return inverse, det.abs() < 1e-12


def _forward(name: str, arrays: dict, hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward matrices (N, 3, 3) of one geometric op and the canvases after it (``plan._batch_forward``)."""
    ones, zeros = _filled(1.0, hw), _filled(0.0, hw)
    if name == "mirror":
        horizontal, vertical, size = arrays["horizontal"], arrays["vertical"], hw.to(torch.float64)
        sx, tx = torch.where(horizontal, -1.0, ones), torch.where(horizontal, size[:, 1], 0.0)
        sy, ty = torch.where(vertical, -1.0, ones), torch.where(vertical, size[:, 0], 0.0)
        return _matrices(sx, zeros, tx, zeros, sy, ty), hw
    if name in ("random_crop", "center_crop"):
        left, top = -arrays["left"].to(torch.float64), -arrays["top"].to(torch.float64)
        return _matrices(ones, zeros, left, zeros, ones, top), torch.stack([arrays["height"], arrays["width"]], dim=1)
    if name == "random_resized_crop":
        out_h, out_w = arrays["size"]
        sx, sy = divide(out_w, arrays["width"].to(torch.float64)), divide(out_h, arrays["height"].to(torch.float64))
        left, top = -arrays["left"].to(torch.float64) * sx, -arrays["top"].to(torch.float64) * sy
        return _matrices(sx, zeros, left, zeros, sy, top), fixed_size(hw, (out_h, out_w))
    if name == "resize":
        out = torch.stack([arrays["height"], arrays["width"]], dim=1)
        scale = out.to(torch.float64) / hw.to(torch.float64)
        return _matrices(scale[:, 1], zeros, zeros, zeros, scale[:, 0], zeros), out
    if name == "rotate":
        theta = torch.where(arrays["applied"], arrays["angle"], 0.0) * (math.pi / 180.0)  # np.radians
        c, s = torch.cos(theta), torch.sin(theta)
        return _about_centers(c, s, -s, c, hw), hw
    if name == "shear":
        tx = torch.tan(torch.where(arrays["applied"], arrays["x"], 0.0) * (math.pi / 180.0))
        ty = torch.tan(torch.where(arrays["applied"], arrays["y"], 0.0) * (math.pi / 180.0))
        return _about_centers(ones, tx, ty, ones, hw), hw
    if name == "warp":
        raise ValueError("op 'warp' has no device fusion: pipelines with local warps sample and fuse on the host")
    raise ValueError(f"not a geometric op: {name!r}")


def fuse_on_device(params: DeviceParams) -> Fused:
    """The fused plans of ``params``, on their device: a pure function of them (see ``fuse_batch``)."""
    n, device = len(params), params.in_shapes.device
    channels = params.in_shapes[:, 2]
    hw = params.in_shapes[:, :2]
    forward = torch.eye(3, dtype=torch.float64, device=device).expand(n, 3, 3)
    offsets = torch.zeros((n, 3), dtype=torch.float64, device=device)
    colored = torch.zeros(n, dtype=torch.bool, device=device)
    invalid = params.invalid
    for name, arrays in params.ops:
        if name == "pca_color":
            invalid = invalid | (channels != 3)  # refused by the numpy path for the whole batch
            offsets, colored = offsets + arrays["offset"], torch.ones_like(colored)
        elif name == "color_shift":
            applied = arrays["applied"]
            offsets = torch.where(applied[:, None], offsets + arrays["offset"], offsets)
            colored = colored | applied
        else:
            matrices, hw = _forward(name, arrays, hw)
            forward = _compose(matrices, forward)
    inverse, singular = _invert_affine(forward)
    # Offsets beyond a sample's channels are dropped (a grey image uses the first), as SamplePlan.color.
    offsets = torch.where(torch.arange(3, device=device)[None, :] < channels[:, None], offsets, 0.0)
    return Fused(inverse, hw, offsets, colored, invalid | singular)
