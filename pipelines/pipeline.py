"""``Pipeline``: a validated spec bound to a backend; samples parameters, fuses them, runs the backend."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .backends import backend_class
from .decode_plan import largest_reduction, on_canvas, reaim, source_box
from .images import as_batch
from .normalize import normalize_images
from .plan import SamplePlan, color_runs_first, fuse, fuse_batch
from .sampling import BatchParams, SampleParams, sample_batch
from .spec import PipelineSpec


# decode(index, box or None, max_factor) -> (uint8 H×W×C array, (factor, top, left))
DecodeRegion = Callable[[int, "tuple[float, float, float, float] | None", int], "tuple[np.ndarray, tuple[int, int, int]]"]


class Pipeline:
    """Apply ``spec`` with ``backend`` on ``device``.

    ``pipe(images, seed=, epoch=, sample_ids=)`` returns a torch tensor: uint8 N×H×W×C, or — when the
    spec ends with ``normalize`` — its dtype and layout. Images whose outputs differ in size come back
    as a list. ``fused=False`` runs each op as its own pass (uint8 in between): the reference that the
    fused single pass is tested against.
    """

    def __init__(self, spec: PipelineSpec, backend: str = "albumentations", device: str = "cpu", fused: bool = True) -> None:
        self.spec = spec
        self.backend_name = backend
        self.device = device
        self.fused = fused
        self._geometry_spec = spec.without_normalize()
        self._color_first = color_runs_first(self._geometry_spec)
        self.backend = backend_class(backend)(self._geometry_spec, device)

    def __repr__(self) -> str:
        return f"Pipeline({self.spec.name or 'unnamed'!r}, backend={self.backend_name!r}, device={self.device!r}, ops={len(self.spec.ops)})"

    # --- parameters ------------------------------------------------------------------------------------

    def sample_params(self, shapes: Sequence[Sequence[int]], seed: int = 0, epoch: int = 0, sample_ids: Sequence[int] | None = None) -> list[SampleParams]:
        """The replay record of each sample. ``shapes``: (H, W, C) or (H, W) per image."""
        return self._sample(shapes, seed, epoch, sample_ids).records()

    def _sample(self, shapes, seed, epoch, sample_ids) -> BatchParams:
        shapes = [tuple(map(int, s)) if len(s) == 3 else (*map(int, s), 1) for s in shapes]
        if not shapes:
            raise ValueError("empty batch: no shapes were given")
        ids = list(range(len(shapes))) if sample_ids is None else list(sample_ids)
        if len(ids) != len(shapes):
            raise ValueError(f"got {len(ids)} sample_ids for {len(shapes)} images")
        return sample_batch(self._geometry_spec, shapes, seed, epoch, ids)

    def plans(self, params: Sequence[SampleParams] | BatchParams) -> list[SamplePlan]:
        batch = params if isinstance(params, BatchParams) else BatchParams.from_records(list(params))
        return fuse_batch(batch, self._color_first)

    # --- execution -------------------------------------------------------------------------------------

    def __call__(self, images, seed: int = 0, epoch: int = 0, sample_ids: Sequence[int] | None = None):
        batch, shapes = as_batch(images)
        return self._run(batch, self._sample(shapes, seed, epoch, sample_ids))

    def apply(self, images, params: Sequence[SampleParams]):
        """Replay recorded parameters on ``images`` (one record per image)."""
        batch, shapes = as_batch(images)
        if len(params) != len(shapes):
            raise ValueError(f"got {len(params)} parameter records for {len(shapes)} images")
        for index, (record, shape) in enumerate(zip(params, shapes)):
            if tuple(record.in_shape) != tuple(shape):
                raise ValueError(f"image {index}: shape {shape} does not match its record's in_shape {tuple(record.in_shape)}")
        return self._run(batch, BatchParams.from_records(list(params)))

    def run_decoding(self, shapes: Sequence[Sequence[int]], decode: DecodeRegion, seed: int = 0, epoch: int = 0, sample_ids: Sequence[int] | None = None):
        """Augment images that are not decoded yet: plan each from its header's shape, then decode.

        ``shapes``: (H, W, C) of each image as its decoder will deliver it. ``decode(i, box,
        max_factor)`` decodes image ``i``: at least the region ``box`` = (x0, y0, x1, y1) of the
        full-resolution image (None: all of it), at a reduction of at most ``max_factor``; it returns
        ``(array, (factor, top, left))`` — uint8 H×W×C and where it sits (see
        :mod:`pipelines.decode_plan`). With the spec's ``decode: exact`` (or ``fused=False``) every
        image is decoded whole and the output is byte-identical to decoding first and calling the
        pipeline.
        """
        params = self._sample(shapes, seed, epoch, sample_ids)
        if self.spec.decode == "exact" or not self.fused:
            images = []
            for index, shape in enumerate(params.in_shapes.tolist()):
                image = decode(index, None, 1)[0]
                if tuple(image.shape) != tuple(shape):
                    raise ValueError(f"image {index}: decoded shape {tuple(image.shape)} differs from its header's {tuple(shape)}")
                images.append(image)
            return self._run(images, params)
        plans = fuse_batch(params, self._color_first)
        images = []
        for index, plan in enumerate(plans):
            image, (factor, top, left) = decode(index, source_box(plan), largest_reduction(plan))
            if factor == 1 and self.backend.reads_only_sampled_pixels:  # the exact decode's bytes: see on_canvas
                if image.shape != plan.in_shape:
                    image = on_canvas(image, top, left, plan.in_shape)
            else:
                plans[index] = reaim(plan, factor, top, left, image.shape)
            images.append(image)
        return self._finish(self.backend.run(images, plans))

    def _run(self, batch, params: BatchParams):
        if self.fused:
            out = self.backend.run(batch, fuse_batch(params, self._color_first))
        else:
            out = self._run_step_by_step(batch, params.records())
        return self._finish(out)

    def _run_step_by_step(self, batch, params: list[SampleParams]):
        """One pass per op record, uint8 between passes: what an ordinary per-op pipeline does."""
        outputs = []
        for index, record in enumerate(params):
            image = batch[index : index + 1] if isinstance(batch, torch.Tensor) else [batch[index]]
            shape = tuple(record.in_shape)
            for op_record in record.ops:
                step = SampleParams(record.sample_id, shape, shape, [op_record])
                plan = fuse(step)
                image = self.backend.run(image, [plan])
                shape = (*plan.out_hw, shape[2])
            outputs.append(image[0] if isinstance(image, torch.Tensor) else image[0])
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


def build(spec, backend: str = "albumentations", device: str = "cpu", fused: bool = True) -> Pipeline:
    """Bind a spec (a :class:`PipelineSpec`, dict, YAML/JSON text or preset name) to a backend."""
    from .presets import resolve

    return Pipeline(resolve(spec), backend=backend, device=device, fused=fused)


def as_uint8_numpy(out) -> np.ndarray:
    """Helper for tests and previews: a uint8 N×H×W×C output as a numpy array on the host."""
    return out.cpu().numpy() if isinstance(out, torch.Tensor) else np.stack([o.cpu().numpy() for o in out])
