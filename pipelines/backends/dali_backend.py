"""NVIDIA DALI backend: the fused sample plans as one DALI pipeline fed through ``external_source``.

Each batch goes through a pipeline built once per *structure* — which geometry pass (``warp_affine``
or ``remap``), whether a color pass runs and on which side of it — and reused for every later batch
(building one costs far more than running it). Per-sample parameters travel next to the images as
DALI per-sample argument inputs: the 2×3 ``matrix`` and output ``size`` of ``warp_affine``, the
``M`` (C×C) and ``T`` (C) of ``coord_transform``; the dense maps of ``remap`` as inputs.

Plans whose geometry is an integer window, possibly flipped (crops, padding, mirror, identity), take
``slice`` + ``flip`` instead: an exact copy, about 3× cheaper than ``warp_affine`` on the CPU build.

Conventions, checked against OpenCV (the albumentations backend is the reference):

* ``warp_affine`` with ``inverse_map=True`` samples the source at ``matrix @ (j + 0.5, i + 0.5)`` and
  puts pixel centres at half-integers — the continuous convention of :mod:`pipelines.geometry` — so
  ``plan.inverse`` is passed as is (no :func:`~pipelines.geometry.to_pixel_center_inverse`). Bilinear
  weights are computed in float, not OpenCV's 1/32-pixel fixed point: interpolated outputs differ by
  one level on a few percent of the values at most (measured, CPU and H200 GPU alike); integer
  translations and flips (weights 0 and 1) are exact.
* ``fill_value=fill`` gives ``border="constant"``; no ``fill_value`` clamps the source coordinates,
  which is OpenCV's ``BORDER_REPLICATE`` for bilinear sampling.
* ``coord_transform`` to uint8 and ``cast`` round half away from zero and saturate; OpenCV's
  ``saturate_cast`` rounds half to even. The two differ by one level on exact ``.5`` ties only, which
  continuous random offsets practically never produce. An identity color (``M = I``, ``T = 0``) is
  exact, so a sample without a color change that shares a color pass with others keeps its bytes.

Local warps (``plan.chain``): ``fn.experimental.remap`` exists for the GPU only; it is NPP's remap,
whose output has the *input's* shape and which leaves pixels whose source falls outside the image
unwritten (measured on an H200: garbage, not the documented constant 0). On the GPU the image is
therefore placed on a canvas with a one-pixel ring of ``fill`` that also holds the output, the dense
map (:func:`pipelines.source_map.source_map` with a torch device, computed on the
GPU) is clamped into that canvas — which reproduces OpenCV's constant border exactly, or clamps into
the image for ``replicate`` — and the output window is cropped. **On the CPU** DALI has no remap:
those samples are resampled on the host with OpenCV's ``cv2.remap`` — the same kernel the
albumentations backend uses — and only their color pass runs in a (color-only) DALI pipeline, in
the plan's order. Samples of one batch are grouped by (geometry pass, channels, color order), so a
sample's output never depends on the other samples of its batch.

Threads: ``num_threads`` (argument, else ``$AUGSERVE_DALI_THREADS``, else 1 — one thread per worker
process; parallelism comes from processes). Outputs are copied out of DALI's buffers: CPU with
``TensorList.as_array`` → ``torch.from_numpy``, GPU with ``nvidia.dali.plugin.pytorch.feed_ndarray``
into a torch CUDA tensor on the current stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from ..borders import BORDERS
from ..plan import AxisAligned, SamplePlan, axis_aligned
from ..source_map import source_map
from . import opencv_kernels
from .base import Backend

THREADS_ENV = "AUGSERVE_DALI_THREADS"
_MIN_BATCH = 16  # pipelines are built for at least this many samples, then grow by powers of two


@dataclass(frozen=True)
class Structure:
    """What a DALI pipeline computes. ``geometry``: ``"window"`` (``slice`` + ``flip``: integer
    windows and flips, copied exactly), ``"affine"`` (``warp_affine``), ``"remap"`` (``experimental.remap``,
    GPU only) or ``"none"`` (color only); ``color``: ``None``, ``"first"`` (before the geometry) or
    ``"last"``."""

    geometry: str
    color: str | None


@pipeline_def
def _augment(structure: Structure, on_gpu: bool, border: str, fill: int):
    """The graph of one :class:`Structure`. Named inputs: ``images`` (H×W×C uint8, host), ``anchor`` /
    ``shape`` ([y, x] / [h, w] int32) and ``flip_h`` / ``flip_v`` (int32 0/1), ``matrix`` (2×3 float32,
    dst→src), ``size`` ([out_h, out_w] float32), ``color_m`` (C×C float32), ``color_t``
    (C float32), ``canvas`` ([h, w] int32), ``mapx``/``mapy`` (canvas-sized float32), ``crop``
    ([out_h, out_w] float32)."""
    images = fn.external_source(name="images", layout="HWC", dtype=types.UINT8)
    if on_gpu:
        images = images.gpu()

    def color(data):
        matrix = fn.external_source(name="color_m", dtype=types.FLOAT)
        offset = fn.external_source(name="color_t", dtype=types.FLOAT)
        return fn.coord_transform(data, M=matrix, T=offset, dtype=types.UINT8)

    if structure.color == "first":
        images = color(images)
    if structure.geometry == "window":  # integer window (+ flips): a copy, no resampling
        anchor = fn.external_source(name="anchor", dtype=types.INT32)
        shape = fn.external_source(name="shape", dtype=types.INT32)
        images = fn.slice(images, anchor, shape, axes=[0, 1], out_of_bounds_policy="pad", fill_values=float(fill))
        horizontal = fn.external_source(name="flip_h", dtype=types.INT32)
        vertical = fn.external_source(name="flip_v", dtype=types.INT32)
        images = fn.flip(images, horizontal=horizontal, vertical=vertical)
    elif structure.geometry == "affine":
        matrix = fn.external_source(name="matrix", dtype=types.FLOAT)
        size = fn.external_source(name="size", dtype=types.FLOAT)
        fill_arg = {"fill_value": float(fill)} if BORDERS[border].pads_with_fill else {}
        images = fn.warp_affine(
            images, matrix=matrix, size=size, inverse_map=True, interp_type=types.INTERP_LINEAR, **fill_arg
        )
    elif structure.geometry == "remap":
        images = _remap(images, fill if BORDERS[border].pads_with_fill else 0)
    if structure.color == "last":
        images = color(images)
    return images


def _remap(images, fill: int):
    """GPU remap to a per-sample output size.

    NPP's remap (behind ``experimental.remap``) leaves an output pixel *unwritten* when its source lies
    outside the image, and its output has the input's shape. So the image is first placed on a canvas
    with a one-pixel ring (and more, to hold the output) of ``fill`` — ``slice`` from (-1, -1) with
    padding — and the host clamps every source coordinate into that canvas: OpenCV's constant border
    is then reproduced exactly (a tap outside the image reads ``fill``), and ``replicate`` clamps into
    the image itself. The top-left ``out_h``×``out_w`` of the remapped canvas is the result.
    """
    canvas = fn.external_source(name="canvas", dtype=types.INT32)
    mapx = fn.external_source(name="mapx", device="gpu", dtype=types.FLOAT)
    mapy = fn.external_source(name="mapy", device="gpu", dtype=types.FLOAT)
    crop = fn.external_source(name="crop", dtype=types.FLOAT)
    images = fn.slice(images, start=[-1, -1], shape=canvas, axes=[0, 1], out_of_bounds_policy="pad", fill_values=float(fill))
    images = fn.experimental.remap(images, mapx, mapy, interp=types.INTERP_LINEAR, pixel_origin="center")
    return fn.crop(images, crop=crop, crop_pos_x=0.0, crop_pos_y=0.0)


@dataclass
class _Built:
    pipe: object
    max_batch: int


class DaliBackend(Backend):
    """Runs :class:`~pipelines.plan.SamplePlan` s with NVIDIA DALI on ``cpu`` or ``cuda[:k]``.

    ``run`` takes H×W×C uint8 images (a list of numpy arrays, or an N×H×W×C uint8 tensor, which is
    brought to the host) and returns uint8 N×H×W×C on ``self.device`` — or a list of H×W×C tensors when
    output sizes differ.
    """

    name = "dali"
    devices = ("cpu", "cuda")

    def __init__(self, spec, device: str = "cpu", num_threads: int | None = None) -> None:
        super().__init__(spec, device)
        if num_threads is None:
            raw = os.environ.get(THREADS_ENV, "1")
            try:
                num_threads = int(raw)
            except ValueError:
                raise ValueError(f"{THREADS_ENV} must be a positive integer, got {raw!r}") from None
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
        self.num_threads = num_threads
        self.on_gpu = device.startswith("cuda")
        if self.on_gpu:
            index = torch.device(device).index
            self.device_id = torch.cuda.current_device() if index is None else index
            self.device = f"cuda:{self.device_id}"
        else:
            self.device_id = None
        self._built: dict[Structure, _Built] = {}

    # --- batch ----------------------------------------------------------------------------------------

    def run(self, images, plans: list[SamplePlan]):
        if isinstance(images, torch.Tensor):
            images = list(images.cpu().numpy())
        if len(images) != len(plans):
            raise ValueError(f"got {len(plans)} plans for {len(images)} images")
        if not plans:
            raise ValueError("empty batch: no images were given")
        groups: dict[tuple, list[int]] = {}
        windows: dict[int, tuple] = {}
        facts = axis_aligned(plans)
        for index, plan in enumerate(plans):
            window = _window(facts, index, plan.out_hw, images[index].shape, self.border)
            if window is not None:
                geometry, windows[index] = "window", window
            else:
                geometry = "affine" if plan.chain is None else "remap"
            groups.setdefault((geometry, plan.channels, plan.color_first), []).append(index)
        if len(groups) == 1:
            (geometry, _, _), = groups
            return self._run_group(geometry, images, plans, [windows.get(i) for i in range(len(plans))])
        outputs: list[torch.Tensor | None] = [None] * len(plans)
        for (geometry, _, _), indices in groups.items():
            result = self._run_group(
                geometry, [images[i] for i in indices], [plans[i] for i in indices], [windows.get(i) for i in indices]
            )
            for index, out in zip(indices, result):
                outputs[index] = out
        if all(o.shape == outputs[0].shape for o in outputs):
            return torch.stack(outputs)
        return outputs

    def _run_group(self, geometry: str, images: list[np.ndarray], plans: list[SamplePlan], windows: list):
        """One pass of DALI (plus, for CPU remaps, OpenCV on the host) over samples of one structure."""
        color = None
        if any(plan.color is not None for plan in plans):
            color = "first" if plans[0].color_first else "last"
        images = [np.ascontiguousarray(image) for image in images]
        if geometry == "remap" and not self.on_gpu:
            if color == "first":
                images = self._as_numpy(self._execute(Structure("none", color), images, plans))
            images = [self._remap_on_host(image, plan) for image, plan in zip(images, plans)]
            if color != "last":
                return self._host_to_output(images)
            return self._execute(Structure("none", color), images, plans)
        return self._execute(Structure(geometry, color), images, plans, windows)

    # --- DALI -----------------------------------------------------------------------------------------

    def _pipeline(self, structure: Structure, batch: int):
        built = self._built.get(structure)
        if built is None or built.max_batch < batch:
            max_batch = max(_MIN_BATCH, 1 << (batch - 1).bit_length())
            self._built.pop(structure, None)  # free the smaller one first
            pipe = _augment(
                structure=structure, on_gpu=self.on_gpu, border=self.border, fill=self.fill,
                batch_size=max_batch, num_threads=self.num_threads, device_id=self.device_id,
                prefetch_queue_depth=1, seed=0,
            )
            pipe.build()
            built = self._built[structure] = _Built(pipe, max_batch)
        return built.pipe

    def _execute(self, structure: Structure, images: list[np.ndarray], plans: list[SamplePlan], windows=None):
        inputs = {"images": images}
        if structure.color is not None:
            inputs["color_m"], inputs["color_t"] = _color_inputs(plans)
        if structure.geometry == "window":
            inputs["anchor"] = [np.asarray(w[0], dtype=np.int32) for w in windows]
            inputs["shape"] = [np.asarray(plan.out_hw, dtype=np.int32) for plan in plans]
            inputs["flip_h"] = [np.asarray(w[1], dtype=np.int32) for w in windows]
            inputs["flip_v"] = [np.asarray(w[2], dtype=np.int32) for w in windows]
        elif structure.geometry == "affine":
            inputs["matrix"] = [np.ascontiguousarray(plan.inverse[:2], dtype=np.float32) for plan in plans]
            inputs["size"] = [np.asarray(plan.out_hw, dtype=np.float32) for plan in plans]
        elif structure.geometry == "remap":
            inputs.update(self._remap_inputs(images, plans))
        (out,) = self._pipeline(structure, len(images)).run(**inputs)
        return self._to_torch(out)

    def _remap_inputs(self, images: list[np.ndarray], plans: list[SamplePlan]) -> dict:
        """Canvas sizes, canvas-sized maps (on the GPU, integer pixel centres, canvas offset +1) and crops."""
        canvases, mapxs, mapys, crops = [], [], [], []
        for image, plan in zip(images, plans):
            height, width = image.shape[:2]
            out_h, out_w = plan.out_hw
            canvas_h, canvas_w = max(height + 3, out_h), max(width + 3, out_w)
            x, y = source_map(plan, device=self.device)
            u, v = x - 0.5, y - 0.5  # integer pixel centres
            if self.border == "replicate":
                u, v = u.clamp(0.0, width - 1.0), v.clamp(0.0, height - 1.0)
            else:  # at most one step into the fill ring: taps outside the image read the fill
                u, v = u.clamp(-1.0, float(width)), v.clamp(-1.0, float(height))
            full_x = torch.zeros((canvas_h, canvas_w), dtype=torch.float32, device=self.device)
            full_y = torch.zeros((canvas_h, canvas_w), dtype=torch.float32, device=self.device)
            full_x[:out_h, :out_w], full_y[:out_h, :out_w] = u + 1.0, v + 1.0
            canvases.append(np.array([canvas_h, canvas_w], dtype=np.int32))
            mapxs.append(full_x)
            mapys.append(full_y)
            crops.append(np.array([out_h, out_w], dtype=np.float32))
        return {"canvas": canvases, "mapx": mapxs, "mapy": mapys, "crop": crops}

    def _to_torch(self, out):
        """DALI TensorList → uint8 N×H×W×C tensor on ``self.device`` (a list if the shapes differ)."""
        if not self.on_gpu:
            if out.is_dense_tensor():
                return torch.from_numpy(out.as_array())  # as_array copies out of DALI's buffer
            return [torch.from_numpy(np.array(out[i])) for i in range(len(out))]
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(self.device)
        if out.is_dense_tensor():
            tensor = out.as_tensor()
            result = torch.empty(tensor.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(tensor, result, cuda_stream=stream)
            return result
        results = []
        for i in range(len(out)):
            sample = out[i]
            result = torch.empty(sample.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(sample, result, cuda_stream=stream)
            results.append(result)
        return results

    # --- host side of the CPU remap path ---------------------------------------------------------------

    def _remap_on_host(self, image: np.ndarray, plan: SamplePlan) -> np.ndarray:
        """OpenCV bilinear remap (integer pixel centres, hence the −0.5): DALI's CPU build has no remap."""
        return opencv_kernels.remap(image, plan, self.border, self.fill)

    def _as_numpy(self, out) -> list[np.ndarray]:
        return [o.numpy() for o in out]

    def _host_to_output(self, images: list[np.ndarray]):
        tensors = [torch.from_numpy(np.ascontiguousarray(image)) for image in images]
        if all(t.shape == tensors[0].shape for t in tensors):
            return torch.stack(tensors)
        return tensors


def _window(facts: AxisAligned, index: int, out_hw: tuple[int, int], shape: tuple[int, ...], border: str) -> tuple[tuple[int, int], int, int] | None:
    """``((top, left), flip_h, flip_v)`` when sample ``index`` copies an integer window, possibly
    flipped — so ``slice`` + ``flip`` reproduce it exactly — else ``None``. ``slice`` pads with a
    constant only, so under a border mode that does not fill, the window must lie inside the image."""
    if not facts.copies[index]:
        return None
    (top, left), (out_h, out_w) = facts.window(index), out_hw
    inside = 0 <= top and 0 <= left and top + out_h <= shape[0] and left + out_w <= shape[1]
    if not (inside or BORDERS[border].pads_with_fill):
        return None
    return (top, left), int(facts.flip_x[index]), int(facts.flip_y[index])


def _color_inputs(plans: list[SamplePlan]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-sample ``M`` (C×C) and ``T`` (C) float32; identity for samples whose color is unchanged."""
    matrices, offsets = [], []
    for plan in plans:
        channels = plan.channels
        if plan.color is None:
            matrix, offset = np.eye(channels), np.zeros(channels)
        else:
            matrix, offset = plan.color
        matrices.append(np.ascontiguousarray(matrix, dtype=np.float32))
        offsets.append(np.ascontiguousarray(offset, dtype=np.float32))
    return matrices, offsets
