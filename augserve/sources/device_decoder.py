"""Decoding a whole batch of JPEG regions in one call with nvImageCodec, on a worker's device.

On ``cuda:K`` the batch is decoded by nvJPEG (nvImageCodec's hardware JPEG engine where the GPU has one
and the file suits it, else its CUDA decoder) into device memory, and each image comes back as a torch
tensor over that memory (DLPack, no copy). On ``cpu`` the same calls run nvImageCodec's CPU decoder
(libjpeg-turbo): the pixels of OpenCV's decode, which is how the CPU tests check this path.

Only the region a sample's plan reads is decoded (nvImageCodec's ROI decode), always at full scale:
nvJPEG has no DCT scaling, so ``max_factor`` does not apply here, and the region covers at least the
box (whole pixels, see :func:`~augserve.sources.decode.stored_region`).

The rules are :mod:`augserve.sources.decode`'s: only the JPEG kinds of
:func:`~augserve.sources.decode.region_decodable` go to nvImageCodec (8-bit baseline, extended or
progressive Huffman-coded grey or color); the decoder never applies EXIF orientation, this module
applies it to the region as ``decode`` does, with the same placement arithmetic
(:func:`~augserve.sources.decode.oriented_placement`); ``channels`` 1 is the luma plane, 3 is RGB with
grey replicated. Anything else — a PNG, BMP, CMYK or 12-bit JPEG, a file nvImageCodec cannot decode —
comes back as None, and the caller decodes it exactly (``decode_encoded``), which either succeeds with
OpenCV's pixels or raises ``CorruptImageError`` naming the file: the same verdict as the exact path.

Determinism: every backend is given ``load_hint=1.0`` with the FIXED policy, so which nvJPEG backend
decodes an image depends on the file and its region alone, never on the batch it travels in (DALI's
default sends a fraction of each batch to the hardware decoder, whose pixels can differ from the CUDA
decoder's). GPUs of another model may decode with another backend and so to slightly different bytes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .decode import EncodedImage, Placement, orientation_steps, oriented_placement, region_decodable, stored_region
from .region_decoder import decode_params, thread_local_codec

# nvImageCodec backends on a GPU, in order of preference: the hardware JPEG engine (A100, H100, H200…;
# nvImageCodec skips it where there is none or it cannot take the file), then the CUDA decoder.
GPU_BACKENDS = ("HW_GPU_ONLY", "GPU_ONLY")

Box = tuple[float, float, float, float]


class DeviceDecoder:
    """nvImageCodec on one device (``cpu`` or ``cuda[:K]``) for images of ``channels`` (1 or 3).

    ``threads``: nvImageCodec's CPU threads (parsing, and Huffman decoding where it is done on the
    host). ``backends``: names of ``nvimgcodec.BackendKind`` members for a GPU (default
    :data:`GPU_BACKENDS`); ignored on the CPU, which has one. ``fancy_upsampling``: libjpeg's
    smooth chroma upsampling, what OpenCV's pixels (the CPU path's) use; nvJPEG's own is cruder
    (``augserve bench decoders --device cuda:0`` measures both). libjpeg-turbo does it by default.
    """

    def __init__(self, nvimgcodec, device: str, channels: int, threads: int = 1, backends: Sequence[str] = GPU_BACKENDS,
                 fancy_upsampling: bool = True) -> None:  # fmt: skip
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.nvimgcodec = nvimgcodec
        self.device = torch.device(device)
        self.channels = channels
        self._cuda = self.device.type == "cuda"
        options = f":fancy_upsampling={int(bool(fancy_upsampling))}"
        if self._cuda:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            unknown = [name for name in backends if name not in nvimgcodec.BackendKind.__members__]
            if unknown or not backends:
                raise ValueError(f"backends must name nvimgcodec.BackendKind members ({', '.join(nvimgcodec.BackendKind.__members__)}), got {list(backends)!r}")
            kinds = [nvimgcodec.Backend(nvimgcodec.BackendKind.__members__[name], load_hint=1.0, load_hint_policy=nvimgcodec.LoadHintPolicy.FIXED) for name in backends]
            self.decoder = nvimgcodec.Decoder(device_id=index, backends=kinds, max_num_cpu_threads=threads, options=options)
        elif self.device.type == "cpu":
            self.decoder = nvimgcodec.Decoder(
                device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nvimgcodec.Backend(nvimgcodec.CPU_ONLY)], max_num_cpu_threads=threads,
                options=options,
            )  # fmt: skip
        else:
            raise ValueError(f"device must be 'cpu' or 'cuda[:K]', got {device!r}")
        self.params = decode_params(nvimgcodec)[channels]

    def __repr__(self) -> str:
        return f"DeviceDecoder(device={str(self.device)!r}, channels={self.channels})"

    def decode(self, images: Sequence[EncodedImage], boxes: Sequence[Box | None]) -> list[tuple[torch.Tensor, Placement] | None]:
        """Decode at least ``boxes[k]`` (x0, y0, x1, y1 of the oriented image, clipped to it; None: all
        of it) of each ``images[k]``, all in one nvImageCodec call.

        Returns, per image, ``(region, placement)`` — ``region`` uint8 H×W×C (C = ``channels``) on this
        decoder's device, oriented, ``placement.factor`` 1 — or None where nvImageCodec does not take
        the file or could not decode it (the caller decodes it exactly instead). The regions may be
        views of nvImageCodec's buffers: read them, do not write them. ValueError/TypeError for a box
        outside its image, as ``decode_encoded`` raises.
        """
        if len(images) != len(boxes):
            raise ValueError(f"got {len(boxes)} boxes for {len(images)} images")
        nvimgcodec = self.nvimgcodec
        streams, wanted = [], []  # what goes to nvImageCodec, and (position, stored rectangle) of each
        for position, (image, box) in enumerate(zip(images, boxes)):
            rect = stored_region(image, box)
            if not region_decodable(image):
                continue
            try:
                stream = nvimgcodec.CodeStream(image.raw)
                if rect[:2] != (0, 0) or (rect[2], rect[3]) != (stream.height, stream.width):
                    stream = stream.get_sub_code_stream(region=nvimgcodec.Region(*rect))
            except Exception:  # noqa: BLE001 - a file nvImageCodec cannot parse: the exact decode gives the verdict
                continue
            streams.append(stream)
            wanted.append((position, rect))
        results: list[tuple[torch.Tensor, Placement] | None] = [None] * len(images)
        if not streams:
            return results
        decoded = self._decode(streams)
        for (position, (i0, j0, i1, j1)), image_out in zip(wanted, decoded):
            if image_out is None:
                continue
            region = self._tensor(image_out)
            if tuple(region.shape) != (i1 - i0, j1 - j0, self.channels):
                continue  # not what was asked: let the exact decode give the pixels or the reason
            results[position] = self._orient(region, Placement(1, i0, j0), images[position])
        return results

    def upload(self, array: np.ndarray) -> torch.Tensor:
        """An image decoded on the host (the exact path), as a tensor on this decoder's device."""
        tensor = torch.from_numpy(array)
        return tensor if not self._cuda else tensor.to(self.device)

    def _decode(self, streams: list) -> list:
        try:
            if self._cuda:
                # On the stream torch works on, so the regions are ordered before the kernels that read them.
                return self.decoder.decode(streams, params=self.params, cuda_stream=torch.cuda.current_stream(self.device).cuda_stream)
            return self.decoder.decode(streams, params=self.params)
        except Exception:  # noqa: BLE001 - a whole-batch failure: every file gets the exact decode's verdict
            return [None] * len(streams)

    def _tensor(self, image) -> torch.Tensor:
        """nvImageCodec's decoded image as a uint8 H×W×C tensor over the same memory."""
        if self._cuda:
            return torch.from_dlpack(image)  # keeps nvImageCodec's buffer alive; syncs its stream with torch's
        return torch.from_numpy(np.asarray(image))  # the array's base is the image: its buffer stays alive

    def _orient(self, region: torch.Tensor, placement: Placement, image: EncodedImage) -> tuple[torch.Tensor, Placement]:
        """``decode._orient`` for a tensor: transpose, then flips, and the same placement arithmetic."""
        if image.orientation == 1:
            return region, placement
        transpose, flip_rows, flip_cols = orientation_steps(image.orientation)
        moved = oriented_placement(placement, region.shape[0], region.shape[1], image.orientation, image.height, image.width)
        if transpose:
            region = region.permute(1, 0, 2)
        flips = [axis for axis, flip in ((0, flip_rows), (1, flip_cols)) if flip]
        return (region.flip(flips) if flips else region), moved


def device_decoder(device: str, channels: int, threads: int = 1) -> DeviceDecoder | None:
    """This thread's :class:`DeviceDecoder` for ``device`` and ``channels``, made on first use; None where
    nvImageCodec is not installed or cannot decode there (one warning either way: JPEG files are then
    decoded on the CPU, one at a time — a GPU worker's throughput would otherwise drop unexplained)."""
    key = ("device", str(device), int(channels), int(threads))
    return thread_local_codec(
        key, lambda nvimgcodec: DeviceDecoder(nvimgcodec, device, channels, threads),
        f"nvImageCodec cannot decode on {device} ({{error}}); JPEG files are decoded on the CPU, one at a time",
        f"nvImageCodec is not installed (pip install 'nvidia-nvimgcodec-cu13[all]'), so JPEG files are decoded on the CPU, one at a time, not on {device}",
    )  # fmt: skip
