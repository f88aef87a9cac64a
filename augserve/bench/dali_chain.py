"""DALI's own pipeline for a chain of augserve ops: the baseline ``augserve bench gpu`` holds ours against.

Not augserve's DALI backend (:mod:`pipelines.backends.dali_backend`), which runs *our* sampled and fused
per-sample plans in DALI: this is the graph a DALI user writes, with DALI's own random operators
drawing every parameter inside the pipeline — the figure a user would otherwise get from DALI. Two
sources of images:

* ``images``: a uint8 N×H×W×C batch already in memory (on the GPU for a GPU pipeline, as augserve's
  rows get it), fed through ``external_source`` → ``random_resized_crop``;
* ``files``: JPEG files read by ``readers.file`` → ``decoders.image_random_crop`` (the ``mixed``
  nvJPEG decoder on a GPU, which decodes only the crop's region; ``cpu`` on the CPU) → ``resize``.

Then, in both: rotation and shear about the output's centre in one ``warp_affine`` (zero fill,
bilinear), AlexNet's PCA lighting and the per-channel shift as one per-image offset added by
``coord_transform`` (the offset ``eigvec @ (alpha * eigval)`` is itself a ``coord_transform`` of the
drawn ``alpha``), and ``crop_mirror_normalize`` (flip with the chain's probability, normalize to the
chain's dtype, NCHW). Same parameter ranges as augserve's ops; DALI's random streams, not augserve's,
so the bytes differ while the work is the same.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipelines.spec import ColorShift, Mirror, Normalize, PcaColor, PipelineSpec, RandomResizedCrop, Rotate, Shear

SUPPORTED = (RandomResizedCrop, Mirror, Rotate, Shear, PcaColor, ColorShift)  # normalize is the spec's own field
DALI_DTYPES = {"float32": "FLOAT", "float16": "FLOAT16", "bfloat16": "FLOAT16"}  # DALI has no bfloat16 output


def check_chain(spec: PipelineSpec) -> RandomResizedCrop:
    """The chain's random_resized_crop; ValueError (one line) for a chain this graph cannot express:
    it must start with random_resized_crop, and every other op must be one of :data:`SUPPORTED`, at
    most once each."""
    ops = list(spec.without_normalize().ops)
    if not ops or not isinstance(ops[0], RandomResizedCrop):
        raise ValueError("DALI's own pipeline here starts with random_resized_crop")
    kinds = [type(op) for op in ops]
    unsupported = [op.op for op in ops if not isinstance(op, SUPPORTED)]
    if unsupported:
        raise ValueError(f"DALI's own pipeline here has no {', '.join(unsupported)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError("DALI's own pipeline here takes each op at most once")
    if any(isinstance(op, Mirror) and op.vertical for op in ops):
        raise ValueError("DALI's own pipeline here flips left-right only (crop_mirror_normalize)")
    if spec.normalize is not None and spec.normalize.layout != "NCHW":
        raise ValueError("DALI's own pipeline here normalizes to NCHW only")
    return ops[0]


def normalize_arguments(normalize: Normalize | None) -> tuple[list[float], list[float]]:
    """``crop_mirror_normalize``'s ``mean`` and ``std`` for a spec's ``normalize`` (1 or 3 values on the
    0–1 scale): three values each on DALI's 0–255 scale; mean 0 and std 1 (no change) without one."""
    if normalize is None:
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    mean, std = ((np.resize(np.asarray(values, np.float32), 3) * 255.0).tolist() for values in (normalize.mean, normalize.std))
    return mean, std


def _one(spec: PipelineSpec, kind):
    return next((op for op in spec.ops if isinstance(op, kind)), None)


def _maybe(fn, drawn, p: float):
    """``drawn`` with probability ``p``, else zero (no rotation, shear or shift for that image)."""
    return drawn if p >= 1.0 else drawn * fn.random.coin_flip(probability=p)


def _geometry(fn, types, images, spec: PipelineSpec, height: int, width: int):
    """Rotation and shear about the output's centre (each with its op's probability), one warp."""
    rotate, shear = _one(spec, Rotate), _one(spec, Shear)
    if rotate is None and shear is None:
        return images
    center = [width / 2.0, height / 2.0]
    transforms = []
    if shear is not None:
        angles = _maybe(fn, fn.random.uniform(range=(-shear.degrees, shear.degrees), shape=[2]), shear.p)
        transforms.append(fn.transforms.shear(angles=angles, center=center))
    if rotate is not None:
        angle = _maybe(fn, fn.random.uniform(range=(-rotate.degrees, rotate.degrees)), rotate.p)
        transforms.append(fn.transforms.rotation(angle=angle, center=center))
    matrix = transforms[0] if len(transforms) == 1 else fn.transforms.combine(*transforms)
    return fn.warp_affine(images, matrix=matrix, fill_value=0.0, interp_type=types.INTERP_LINEAR, inverse_map=False)


def _color(fn, types, images, spec: PipelineSpec):
    """PCA lighting and the channel shift as one per-image offset on the 0–255 scale (uint8 saturated)."""
    pca, shift = _one(spec, PcaColor), _one(spec, ColorShift)
    offset = None
    if pca is not None:
        # eigvec @ (alpha * eigval) for a drawn alpha: the product with a fixed 3×3 basis, as a transform.
        basis = np.asarray(pca.eigvec, np.float32) * np.asarray(pca.eigval, np.float32)[None, :] * 255.0
        alpha = fn.random.normal(shape=[3]) * float(pca.alpha_std)
        offset = fn.reshape(fn.coord_transform(fn.reshape(alpha, shape=[1, 3]), M=basis.ravel().tolist()), shape=[3])
    if shift is not None:
        low, high = -np.asarray(shift.limits, np.float32), np.asarray(shift.limits, np.float32)
        drawn = fn.random.uniform(range=(0.0, 1.0), shape=[3])
        shifted = _maybe(fn, drawn * types.Constant(high - low) + types.Constant(low), shift.p)
        offset = shifted if offset is None else offset + shifted
    if offset is None:
        return images
    return fn.coord_transform(images, T=offset, dtype=types.UINT8)


def build(spec: PipelineSpec | dict, batch: int, device: str, threads: int, seed: int = 0, images=None, files: Sequence[str] | None = None,
          labels: Sequence[int] | None = None):  # fmt: skip
    """A built DALI pipeline of ``spec`` producing ``batch`` images per ``run()``: from ``images`` (the
    same uint8 N×H×W×C batch every iteration: a numpy array, or a CUDA tensor for a GPU pipeline, which
    ``external_source`` copies each iteration — ~50 µs for 256 × 256² on an H100, left in: DALI's
    documented default) or
    from JPEG ``files`` (read in a random order, epoch after epoch, by a reader named ``Reader`` — the
    name ``DALIGenericIterator``'s ``reader_name`` takes). ``device``: ``cpu`` (no GPU needed) or
    ``cuda[:k]``. Its output is ``spec.normalize``'s dtype (bfloat16 as float16), NCHW; with
    ``labels`` (one int per file) a second output, each image's label (int32, shape (1,))."""
    import torch
    from nvidia.dali import fn, pipeline_def, types

    spec = PipelineSpec.model_validate(spec)
    crop = check_chain(spec)
    if (images is None) == (files is None):
        raise ValueError("give images or files, not both")
    if labels is not None and (files is None or len(labels) != len(files)):
        raise ValueError("labels go with files, one each")
    on_gpu = torch.device(device).type == "cuda"
    height, width = crop.size
    mirror = _one(spec, Mirror)
    normalize = spec.normalize
    mean, std = normalize_arguments(normalize)
    dtype = getattr(types, DALI_DTYPES[normalize.dtype]) if normalize else types.UINT8

    @pipeline_def
    def chain():
        if files is not None:
            labelled = {} if labels is None else {"labels": [int(label) for label in labels]}
            jpegs, label = fn.readers.file(files=list(files), random_shuffle=True, name="Reader", **labelled)
            decoded = fn.decoders.image_random_crop(
                jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                random_area=list(crop.scale), random_aspect_ratio=list(crop.ratio), num_attempts=10,
            )  # fmt: skip
            out = fn.resize(decoded, resize_x=width, resize_y=height, interp_type=types.INTERP_LINEAR, antialias=False)
        else:
            fed = fn.external_source(source=lambda: images, batch=True, layout="HWC", device="gpu" if on_gpu else "cpu")
            out = fn.random_resized_crop(
                fed, size=[height, width], random_area=list(crop.scale), random_aspect_ratio=list(crop.ratio), num_attempts=10,
                interp_type=types.INTERP_LINEAR, antialias=False,
            )  # fmt: skip
        out = _color(fn, types, _geometry(fn, types, out, spec, height, width), spec)
        flip = fn.random.coin_flip(probability=mirror.horizontal) if mirror is not None else 0
        out = fn.crop_mirror_normalize(out, mirror=flip, dtype=dtype, output_layout="CHW", mean=mean, std=std)
        return out if labels is None else (out, label)

    device_id = (torch.device(device).index or 0) if on_gpu else None
    pipe = chain(batch_size=batch, num_threads=threads, device_id=device_id, seed=seed)
    pipe.build()
    return pipe
