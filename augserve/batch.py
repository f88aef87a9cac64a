"""One batch of a task, loaded and augmented: what a worker computes between a task and its send.

Sources of decoded arrays (digits, shapes, ``.npz``) are loaded and then augmented. Sources of image
files (folders) take the plan-aware path: each file's header gives its shape, the pipeline plans
every sample from the shapes, and only then is each file decoded — the region its plan reads, at
the reduction the plan allows when the spec says ``decode: fast`` (``Pipeline.run_decoding``).
A file that fails only when decoded is skipped (or raised) like one refused from its header, and the
rest of the batch is planned again without it: each sample's parameters depend on its own id and
shape alone, so the others come out the same.

On a GPU (the torch backend on ``cuda:K``, ``decode: fast``) the files are decoded on the device, the
whole batch in one nvImageCodec call (:mod:`augserve.sources.device_decoder`: nvJPEG, only each plan's
region, at full scale — nvJPEG has no DCT reduction), and the pipeline runs on the device images.
Files nvImageCodec does not take (PNG, BMP, CMYK…) or cannot decode get the exact CPU decode, which
also gives the verdict on a corrupt file: skipped and counted with its path exactly as on the CPU path.

A device that runs out of memory (``torch.OutOfMemoryError``) does not fail the batch: its cached
memory is released and the batch is augmented in halves, recursively down to one sample, and the
pieces joined. Each sample's parameters depend only on its id and shape, so the bytes are those of
the whole batch. A single sample that still does not fit raises, and the worker reports the task as
an ``error``, which the daemon hands to another worker.

``out`` (the pipeline's ``out=``, see :mod:`pipelines.destination`): where the images go, e.g. a
callable that hands out the start of a shared-memory slot. When samples are skipped the batch is
planned again with fewer images, so a callable is asked again for fewer rows: the kept images lie one
after another from the start of the destination. Halves made after running out of memory are joined
and copied into ``out`` once.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import torch

from pipelines.destination import resolve

from .handoff.pinned import to_host
from .sources import CorruptImageError, SkipStats, Source, iter_encoded, iter_images
from .sources.device_decoder import DeviceDecoder, device_decoder

log = logging.getLogger("augserve.worker")

# run(items, out, skips) -> (images, kept ids, labels, seconds decoding): one attempt at a batch
Attempt = Callable[[list, object, SkipStats], tuple]


def augment_batch(source: Source, pipe, ids: Sequence[int], seed: int, epoch: int, on_error: str, stats: SkipStats, out=None,
                  decode_on_device: bool | None = None):  # fmt: skip
    """``(images, kept_ids, labels, load_s)``: uint8 N×H×W×C — ``out``'s tensor when given (on the host or
    a device), else on the host: a tensor, or a list of tensors when sizes differ; None when every
    sample was skipped —, the ids and labels of the samples kept, and the seconds spent reading and
    decoding (the rest was augmenting).

    ``decode_on_device``: decode JPEG files in batches with nvImageCodec on the pipeline's device (the
    torch backend's; ``cpu`` too, which is how the CPU tests run this path); None: when the pipeline
    is the torch backend on a CUDA device. Only with the spec's ``decode: fast``; ``exact`` keeps
    OpenCV's decode, whose bytes it promises."""
    started = time.perf_counter()
    items = iter_encoded(source, ids, on_error=on_error, stats=stats)
    first = next(items, None)
    if first is not None and first[1] is None:  # a source of arrays (all None): nothing to plan before decoding
        loaded = list(iter_images(source, ids, on_error=on_error, stats=stats))

        def attempt(part, out, skips):
            kept = [sample_id for sample_id, _, _ in part]
            images = pipe([image for _, image, _ in part], seed=seed, epoch=epoch, sample_ids=kept, out=out)
            return _delivered(images, out), kept, [label for _, _, label in part], 0.0
    else:
        loaded = [] if first is None else [first, *items]
        decoder = _batch_decoder(source, pipe, decode_on_device)

        def attempt(part, out, skips):
            return _augment_files(source, pipe, part, seed, epoch, on_error, skips, out, decoder)
    load_s = time.perf_counter() - started
    if not loaded:
        return None, [], [], load_s
    images, kept, labels, decode_s = _in_slices(attempt, loaded, out, stats)
    return images, kept, labels, load_s + decode_s


def _batch_decoder(source: Source, pipe, on_device: bool | None) -> DeviceDecoder | None:
    """The decoder of whole batches on the pipeline's device, or None for one decode per image."""
    if on_device is None:
        on_device = pipe.backend_name == "torch" and str(pipe.device).startswith("cuda")
    if not on_device or pipe.spec.decode == "exact" or not pipe.fused:
        return None
    return device_decoder(pipe.device, source.channels, threads=torch.get_num_threads())


def _augment_files(source: Source, pipe, encoded: list, seed: int, epoch: int, on_error: str, stats: SkipStats, out, decoder: DeviceDecoder | None):
    """Plan, decode and augment ``encoded`` items (sample id, EncodedImage, label), planning again
    without the files that fail to decode."""
    encoded = list(encoded)  # files that fail are deleted from this copy
    load_s = 0.0
    while encoded:
        failed: list[tuple[int, CorruptImageError]] = []

        def decode(index: int, box, max_factor: int):
            nonlocal load_s
            begin = time.perf_counter()
            try:
                array, placement = source.decode(encoded[index][1], box, max_factor)
            except CorruptImageError as exc:
                failed.append((index, exc))
                raise
            finally:
                load_s += time.perf_counter() - begin
            return array, (placement.factor, placement.top, placement.left)

        def decode_batch(boxes):
            nonlocal load_s
            begin = time.perf_counter()
            try:
                return _device_regions(decoder, source, [image for _, image, _ in encoded], boxes, failed)
            finally:
                load_s += time.perf_counter() - begin

        shapes = [(image.height, image.width, source.channels) for _, image, _ in encoded]
        kept = [sample_id for sample_id, _, _ in encoded]
        try:
            images = pipe.run_decoding(
                shapes, decode, seed=seed, epoch=epoch, sample_ids=kept, out=out, decode_batch=None if decoder is None else decode_batch
            )  # fmt: skip
        except CorruptImageError:
            if on_error == "raise" or not failed:
                raise
            for _, error in failed:  # in batch order, as one decode per image finds them
                log.warning("skipping %s", error)
                stats.record(error.path)
            for index, _ in reversed(failed):
                del encoded[index]
            continue
        return _delivered(images, out), kept, [label for _, _, label in encoded], load_s
    return None, [], [], load_s


def _device_regions(decoder: DeviceDecoder, source: Source, images: list, boxes: list, failed: list):
    """``decode_batch`` for ``Pipeline.run_decoding``: every image's region from one device decode, the
    ones it leaves (None) from the exact decode, uploaded. Files the exact decode refuses are added to
    ``failed`` as (position, error) and the first is raised once all are known, so the batch is planned
    again once, without all of them."""
    regions = []
    for index, (found, image, box) in enumerate(zip(decoder.decode(images, boxes), images, boxes)):
        if found is None:
            try:
                array, placement = source.decode(image, box, 1)
            except CorruptImageError as exc:
                failed.append((index, exc))
                continue
            found = (decoder.upload(array), placement)
        region, placement = found
        regions.append((region, (placement.top, placement.left)))
    if failed:
        raise failed[0][1]
    return regions


def _in_slices(attempt: Attempt, items: list, out, stats: SkipStats):
    """``attempt(items, out, skips)``; when the device runs out of memory, the same on each half of
    ``items`` (recursively, down to one sample), joined. Skipped files are added to ``stats`` only from
    attempts that finished, so none is counted twice."""
    skips = SkipStats(max_paths=stats.max_paths)
    try:
        result = attempt(items, out, skips)
    except torch.OutOfMemoryError:
        if len(items) == 1:
            raise
        result = None  # retried below, once the error and the tensors its traceback holds are gone
    if result is not None:
        _add_skips(stats, skips)
        return result
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the failed attempt's cached blocks go back to the device
    half = (len(items) + 1) // 2
    log.warning("out of device memory augmenting %d samples: retrying as %d and %d", len(items), half, len(items) - half)
    return _joined(_in_slices(attempt, items[:half], None, stats), _in_slices(attempt, items[half:], None, stats), out)


def _add_skips(stats: SkipStats, more: SkipStats) -> None:
    for path in more.paths:
        stats.record(path)
    stats.skipped += more.skipped - len(more.paths)  # skips past ``more``'s path cap


def _joined(first: tuple, second: tuple, out) -> tuple:
    """Two attempts' results as one, the images in order (into ``out`` when given)."""
    parts = [images for images in (first[0], second[0]) if images is not None]
    if not parts:
        images = None
    elif len(parts) == 1:
        images = parts[0]
    elif all(isinstance(p, torch.Tensor) for p in parts) and parts[0].shape[1:] == parts[1].shape[1:]:
        images = torch.cat(parts)
    else:  # outputs of different sizes: a list, as the whole batch would have been
        images = [row for part in parts for row in part]
    if out is not None and isinstance(images, torch.Tensor):
        target = resolve(out, tuple(images.shape))
        target.copy_(images)
        images = target
    return images, first[1] + second[1], first[2] + second[2], first[3] + second[3]


def _delivered(images, out):
    """A pipeline's output as ``augment_batch`` returns it: ``out``'s tensor as it is (host memory, or a
    worker's device slot), anything else on the host (a tensor, or a list of them when sizes differ) —
    from a device, in page-locked memory, so a GPU worker's frames leave it in one DMA."""
    if out is not None:
        return images
    return [to_host(o) for o in images] if isinstance(images, list) else to_host(images)
