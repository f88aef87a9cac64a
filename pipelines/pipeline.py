"""``Pipeline``: a validated spec bound to a backend; samples parameters, fuses them, runs the backend."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .backends import backend_class
from .decode_plan import affine_source_boxes, largest_reduction, on_canvas, reaim, source_box
from .destination import Destination, output_shape, resolve
from .device_fusion import DevicePlanner, choose_sampling
from .images import as_batch
from .normalize import normalize_images
from .plan import SamplePlan, color_runs_first, fuse, fuse_batch
from .sampling import BatchParams, SampleParams, sample_batch
from .spec import PipelineSpec


# decode(index, box or None, max_factor) -> (uint8 H×W×C array, (factor, top, left))
DecodeRegion = Callable[[int, "tuple[float, float, float, float] | None", int], "tuple[np.ndarray, tuple[int, int, int]]"]
# decode_batch([box or None, ...]) -> [(uint8 H×W×C full-scale region, tensor or array, (top, left)), ...]
DecodeBatch = Callable[[list], "list[tuple[torch.Tensor | np.ndarray, tuple[int, int]]]"]


class Pipeline:
    """Apply ``spec`` with ``backend`` on ``device``.

    ``pipe(images, seed=, epoch=, sample_ids=)`` returns a torch tensor: uint8 N×H×W×C, or — when the
    spec ends with ``normalize`` — its dtype and layout. Images whose outputs differ in size come back
    as a list. ``fused=False`` runs each op as its own pass (uint8 in between): the reference that the
    fused single pass is tested against.

    ``out=`` (``__call__``, ``apply``, ``run_decoding``): a uint8 N×H×W×C CPU tensor, C-contiguous, or a
    callable that returns one given (N, H, W, C) — see :mod:`pipelines.destination`. The batch is
    written there and that tensor returned. The albumentations backend writes each sample's result
    straight into its row (no temporary, no copy); the torch and DALI backends make the batch on their
    device and copy it into ``out`` once (from a GPU: the one device-to-host copy the batch needs anyway).

    ``sampling``: where ``__call__`` samples and fuses the parameters — ``"host"`` (numpy), ``"device"``
    (torch ops on the torch backend's device, :mod:`pipelines.device_fusion`: same parameters, same
    bytes, no per-sample Python) or ``"auto"`` (device on a GPU). ``pipe.sampling`` says which was
    chosen; specs with a local ``warp``, ``apply`` (replay), ``run_decoding`` with one decode per image
    and ``sample_params`` use the host (``run_decoding`` with ``decode_batch``, a GPU worker's path,
    samples on the device too).
    """

    def __init__(self, spec: PipelineSpec, backend: str = "albumentations", device: str = "cpu", fused: bool = True, sampling: str = "auto") -> None:
        self.spec = spec
        self.backend_name = backend
        self.device = device
        self.fused = fused
        self._geometry_spec = spec.without_normalize()
        self._color_first = color_runs_first(self._geometry_spec)
        self.backend = backend_class(backend)(self._geometry_spec, device)
        self.sampling = choose_sampling(sampling, self._geometry_spec, self.backend, fused)
        self._planner = DevicePlanner(self._geometry_spec, device, self._color_first) if self.sampling == "device" else None

    def __repr__(self) -> str:
        return f"Pipeline({self.spec.name or 'unnamed'!r}, backend={self.backend_name!r}, device={self.device!r}, ops={len(self.spec.ops)})"

    # --- parameters ------------------------------------------------------------------------------------

    def sample_params(self, shapes: Sequence[Sequence[int]], seed: int = 0, epoch: int = 0, sample_ids: Sequence[int] | None = None) -> list[SampleParams]:
        """The replay record of each sample. ``shapes``: (H, W, C) or (H, W) per image."""
        return self._sample(shapes, seed, epoch, sample_ids).records()

    def _sample(self, shapes, seed, epoch, sample_ids) -> BatchParams:
        shapes, ids = _checked_shapes(shapes, sample_ids)
        return sample_batch(self._geometry_spec, shapes, seed, epoch, ids)

    def plans(self, params: Sequence[SampleParams] | BatchParams) -> list[SamplePlan]:
        batch = params if isinstance(params, BatchParams) else BatchParams.from_records(list(params))
        return fuse_batch(batch, self._color_first)

    # --- execution -------------------------------------------------------------------------------------

    def __call__(self, images, seed: int = 0, epoch: int = 0, sample_ids: Sequence[int] | None = None, out: Destination | None = None):
        batch, shapes = as_batch(images)
        if self.sampling == "device":  # no BatchParams, no SamplePlan: tensors on the device
            fused = self._planner(shapes, seed, epoch, sample_ids)
            target = None if out is None else self._destination(out, fused.sizes())
            result = self.backend.run_fused(batch, fused)
            return self._finish(result if target is None else target.copy_(result))  # one copy into out
        params = self._sample(shapes, seed, epoch, sample_ids)
        return self._run(batch, params, self._destination(out, params))

    def apply(self, images, params: Sequence[SampleParams], out: Destination | None = None):
        """Replay recorded parameters on ``images`` (one record per image)."""
        batch, shapes = as_batch(images)
        if len(params) != len(shapes):
            raise ValueError(f"got {len(params)} parameter records for {len(shapes)} images")
        for index, (record, shape) in enumerate(zip(params, shapes)):
            if tuple(record.in_shape) != tuple(shape):
                raise ValueError(f"image {index}: shape {shape} does not match its record's in_shape {tuple(record.in_shape)}")
        batch_params = BatchParams.from_records(list(params))
        return self._run(batch, batch_params, self._destination(out, batch_params))

    def run_decoding(self, shapes: Sequence[Sequence[int]], decode: DecodeRegion, seed: int = 0, epoch: int = 0, sample_ids: Sequence[int] | None = None,
                     out: Destination | None = None, decode_batch: DecodeBatch | None = None):  # fmt: skip
        """Augment images that are not decoded yet: plan each from its header's shape, then decode.

        ``shapes``: (H, W, C) of each image as its decoder will deliver it. ``decode(i, box,
        max_factor)`` decodes image ``i``: at least the region ``box`` = (x0, y0, x1, y1) of the
        full-resolution image (None: all of it), at a reduction of at most ``max_factor``; it returns
        ``(array, (factor, top, left))`` — uint8 H×W×C and where it sits (see
        :mod:`pipelines.decode_plan`). With the spec's ``decode: exact`` (or ``fused=False``) every
        image is decoded whole and the output is byte-identical to decoding first and calling the
        pipeline. ``out``: as for ``__call__``; a callable is called before the first decode.

        ``decode_batch(boxes)``, when given, replaces ``decode`` on the plan-aware path (``decode:
        fast``, fused): one call for the whole batch with each image's box (as above, or None), returning
        per image ``(region, (top, left))`` — uint8 H×W×C at full scale, a tensor on any device (a GPU
        decoder's output) or an array. The regions go back on zero canvases of their images' sizes on
        this pipeline's device and the plans run unchanged (:func:`~pipelines.decode_plan.on_canvas`'s
        reasoning): the bytes of decoding the same pixels whole, and every image of one size in one
        backend call. With device sampling (``sampling`` ``device``, or ``auto`` on a GPU) the batch is
        planned on the device as ``__call__`` plans it, and only the boxes come to the host.
        """
        if decode_batch is not None and self.sampling == "device" and self.spec.decode != "exact":
            return self._decode_planned_on_device(shapes, seed, epoch, sample_ids, out, decode_batch)
        params = self._sample(shapes, seed, epoch, sample_ids)
        target = self._destination(out, params)
        if self.spec.decode == "exact" or not self.fused:
            images = []
            for index, shape in enumerate(params.in_shapes.tolist()):
                image = decode(index, None, 1)[0]
                if tuple(image.shape) != tuple(shape):
                    raise ValueError(f"image {index}: decoded shape {tuple(image.shape)} differs from its header's {tuple(shape)}")
                images.append(image)
            return self._run(images, params, target)
        plans = fuse_batch(params, self._color_first)
        if decode_batch is not None:
            regions = decode_batch([source_box(plan) for plan in plans])

            def run(canvas, members: list[int]):
                return self.backend.run(canvas, [plans[index] for index in members])

            return self._finish(self._run_on_canvases(regions, [plan.in_shape for plan in plans], run, target))
        images = []
        for index, plan in enumerate(plans):
            image, (factor, top, left) = decode(index, source_box(plan), largest_reduction(plan))
            if factor == 1 and self.backend.reads_only_sampled_pixels:  # the exact decode's bytes: see on_canvas
                if image.shape != plan.in_shape:
                    image = on_canvas(image, top, left, plan.in_shape)
            else:
                plans[index] = reaim(plan, factor, top, left, image.shape)
            images.append(image)
        return self._finish(self._backend_run(images, plans, target))

    def _decode_planned_on_device(self, shapes, seed: int, epoch: int, sample_ids, out: Destination | None, decode_batch: DecodeBatch):
        """``run_decoding``'s batched path with the plans made on the device (:class:`DevicePlanner`):
        the boxes come from the matrices, brought to the host right after the batch's facts (two small
        device→host copies: N×10 int64 and N×3×3 float64), with no per-sample plan object; the same
        boxes and bytes as the host path's."""
        in_shapes, ids = _checked_shapes(shapes, sample_ids)
        fused = self._planner(in_shapes, seed, epoch, ids)
        sizes = fused.sizes()  # the facts' device→host copy; raises for invalid parameters
        target = self._destination(out, sizes)
        boxes = affine_source_boxes(fused.inverse.cpu().numpy(), sizes.out_hw, sizes.in_shapes[:, :2])

        def run(canvas, members: list[int]):
            return self.backend.run_fused(canvas, fused if len(members) == len(fused) else fused.select(members))

        return self._finish(self._run_on_canvases(decode_batch(boxes), sizes.in_shapes.tolist(), run, target))

    def _run_on_canvases(self, regions, in_shapes: list, run: Callable[[torch.Tensor, list[int]], object], out: torch.Tensor | None):
        """``run_decoding``'s batched path: each ``(region, (top, left))`` on a zero canvas of its
        image's ``in_shapes`` entry (H, W, C), one uint8 N×H×W×C canvas batch per shape on this
        pipeline's device, ``run(canvas, members)`` (the backend on those batch positions) once each,
        the outputs back in batch order (into ``out`` when given)."""
        if len(regions) != len(in_shapes):
            raise ValueError(f"decode_batch returned {len(regions)} regions for {len(in_shapes)} images")
        groups: dict[tuple, list[int]] = {}
        for index, in_shape in enumerate(in_shapes):
            groups.setdefault(tuple(in_shape), []).append(index)
        device = torch.device(self.device)
        outputs: list = [None] * len(in_shapes)
        for shape, members in groups.items():
            canvas = torch.zeros((len(members), *shape), dtype=torch.uint8, device=device)
            for k, index in enumerate(members):
                region, (top, left) = regions[index]
                region = torch.as_tensor(region)
                fits = region.ndim == 3 and region.shape[2] == shape[2] and 0 <= top and 0 <= left
                if not fits or top + region.shape[0] > shape[0] or left + region.shape[1] > shape[1]:
                    raise ValueError(f"image {index}: decoded region {tuple(region.shape)} at ({top}, {left}) does not fit its header's shape {shape}")
                canvas[k, top : top + region.shape[0], left : left + region.shape[1]] = region  # uploads a host region
            result = run(canvas, members)
            if len(groups) == 1:
                outputs = result
                break
            for k, index in enumerate(members):
                outputs[index] = result[k]
        if isinstance(outputs, list) and all(o.shape == outputs[0].shape for o in outputs):
            outputs = torch.stack(outputs)
        if out is None:
            return outputs
        out.copy_(outputs)  # one size: out= was checked against the batch's outputs
        return out

    def _run(self, batch, params: BatchParams, out: torch.Tensor | None = None):
        if self.fused:
            result = self._backend_run(batch, fuse_batch(params, self._color_first), out)
        else:
            result = self._run_step_by_step(batch, params.records(), out)
        return self._finish(result)

    def _destination(self, out: Destination | None, params) -> torch.Tensor | None:
        """The checked ``out`` tensor for the batch of ``params`` (:class:`BatchParams`, or a device
        plan's :class:`~pipelines.batched_plan.OutputSizes`; None without ``out``)."""
        if out is None:
            return None
        if self.spec.normalize is not None:
            raise ValueError("out= takes uint8 outputs, but this spec ends with normalize (float output): "
                             "build the pipeline from spec.without_normalize() and normalize afterwards, or leave out= out")  # fmt: skip
        return resolve(out, output_shape(params), device=self.device)

    def _backend_run(self, images, plans: list[SamplePlan], out: torch.Tensor | None):
        """``backend.run``, into ``out`` when given: in place where the backend writes into a destination
        (``writes_in_place``), else one copy of its result."""
        if out is None:
            return self.backend.run(images, plans)
        if self.backend.writes_in_place:
            return self.backend.run(images, plans, out=out)
        result = self.backend.run(images, plans)
        out.copy_(torch.stack(result) if isinstance(result, list) else result)
        return out

    def _run_step_by_step(self, batch, params: list[SampleParams], out: torch.Tensor | None = None):
        """One pass per op record, uint8 between passes: what an ordinary per-op pipeline does. With
        ``out``, each sample's last pass writes into its row."""
        outputs = []
        for index, record in enumerate(params):
            image = batch[index : index + 1] if isinstance(batch, torch.Tensor) else [batch[index]]
            shape = tuple(record.in_shape)
            for position, op_record in enumerate(record.ops):
                step = SampleParams(record.sample_id, shape, shape, [op_record])
                plan = fuse(step)
                last = out is not None and position == len(record.ops) - 1
                image = self._backend_run(image, [plan], out[index : index + 1] if last else None)
                shape = (*plan.out_hw, shape[2])
            if out is not None and not record.ops:  # no op ran: the input is the output
                row = image[0]
                out[index].copy_(row if isinstance(row, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(row)))
            row = image[0]  # a numpy image when no op ran on a list input
            outputs.append(row if isinstance(row, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(row)))
        if out is not None:
            return out
        if all(o.shape == outputs[0].shape for o in outputs):
            return torch.stack(outputs)
        return outputs

    def _finish(self, out):
        op = self.spec.normalize
        if op is None:
            return out
        if isinstance(out, list):
            return [normalize_images(o[None], op)[0] for o in out]
        return normalize_images(out, op)


def build(spec, backend: str = "albumentations", device: str = "cpu", fused: bool = True, sampling: str = "auto") -> Pipeline:
    """Bind a spec (a :class:`PipelineSpec`, dict, YAML/JSON text or preset name) to a backend;
    ``sampling`` as for :class:`Pipeline`."""
    from .presets import resolve

    return Pipeline(resolve(spec), backend=backend, device=device, fused=fused, sampling=sampling)


def as_uint8_numpy(out) -> np.ndarray:
    """Helper for tests and previews: a uint8 N×H×W×C output as a numpy array on the host."""
    return out.cpu().numpy() if isinstance(out, torch.Tensor) else np.stack([o.cpu().numpy() for o in out])


def _checked_shapes(shapes, sample_ids) -> tuple[list[tuple[int, int, int]], list[int]]:
    """``shapes`` as (H, W, C) (a grey (H, W) gets C = 1) and the sample ids (default 0..N-1); one-line
    ValueError for an empty batch or a count of ids that differs."""
    shapes = [tuple(map(int, s)) if len(s) == 3 else (*map(int, s), 1) for s in shapes]
    if not shapes:
        raise ValueError("empty batch: no shapes were given")
    ids = list(range(len(shapes))) if sample_ids is None else list(sample_ids)
    if len(ids) != len(shapes):
        raise ValueError(f"got {len(ids)} sample_ids for {len(shapes)} images")
    return shapes, ids
