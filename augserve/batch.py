"""One batch of a task, loaded and augmented: what a worker computes between a task and its send.

Sources of decoded arrays (digits, shapes, ``.npz``) are loaded and then augmented. Sources of image
files (folders) take the plan-aware path: each file's header gives its shape, the pipeline plans
every sample from the shapes, and only then is each file decoded — the region its plan reads, at
the reduction the plan allows when the spec says ``decode: fast`` (``Pipeline.run_decoding``).
A file that fails only when decoded is skipped (or raised) like one refused from its header, and the
rest of the batch is planned again without it: each sample's parameters depend on its own id and
shape alone, so the others come out the same.

``out`` (the pipeline's ``out=``, see :mod:`pipelines.destination`): where the images go, e.g. a
callable that hands out the start of a shared-memory slot. When samples are skipped the batch is
planned again with fewer images, so a callable is asked again for fewer rows: the kept images lie one
after another from the start of the destination.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence


from .sources import CorruptImageError, SkipStats, Source, iter_encoded, iter_images

log = logging.getLogger("augserve.worker")


def augment_batch(source: Source, pipe, ids: Sequence[int], seed: int, epoch: int, on_error: str, stats: SkipStats, out=None):
    """``(images, kept_ids, labels, load_s)``: uint8 N×H×W×C on the CPU (a tensor — ``out``'s when
    given —, or a list of tensors when sizes differ and no ``out`` was given; None when every sample
    was skipped), the ids and labels of the samples kept, and the seconds spent reading and decoding
    (the rest was augmenting)."""
    started = time.perf_counter()
    items = iter_encoded(source, ids, on_error=on_error, stats=stats)
    first = next(items, None)
    if first is not None and first[1] is None:  # a source of arrays (all None): nothing to plan before decoding
        return _decoded(source, pipe, ids, seed, epoch, on_error, stats, out)
    encoded = [] if first is None else [first, *items]
    load_s = time.perf_counter() - started
    while encoded:
        failed: list[int] = []

        def decode(index: int, box, max_factor: int):
            nonlocal load_s
            begin = time.perf_counter()
            try:
                array, placement = source.decode(encoded[index][1], box, max_factor)
            except CorruptImageError:
                failed.append(index)
                raise
            finally:
                load_s += time.perf_counter() - begin
            return array, (placement.factor, placement.top, placement.left)

        shapes = [(image.height, image.width, source.channels) for _, image, _ in encoded]
        kept = [sample_id for sample_id, _, _ in encoded]
        try:
            images = pipe.run_decoding(shapes, decode, seed=seed, epoch=epoch, sample_ids=kept, out=out)
        except CorruptImageError as exc:
            if on_error == "raise" or not failed:
                raise
            log.warning("skipping %s", exc)
            stats.record(exc.path)
            del encoded[failed[0]]
            continue
        return _on_cpu(images), kept, [label for _, _, label in encoded], load_s
    return None, [], [], load_s


def _decoded(source: Source, pipe, ids, seed: int, epoch: int, on_error: str, stats: SkipStats, out=None):
    started = time.perf_counter()
    kept, images, labels = [], [], []
    for sample_id, image, label in iter_images(source, ids, on_error=on_error, stats=stats):
        kept.append(sample_id)
        images.append(image)
        labels.append(label)
    load_s = time.perf_counter() - started
    if not images:
        return None, [], [], load_s
    return _on_cpu(pipe(images, seed=seed, epoch=epoch, sample_ids=kept, out=out)), kept, labels, load_s


def _on_cpu(out):
    """A pipeline's output (a tensor, or a list of them when sizes differ) on the host."""
    return [o.cpu() for o in out] if isinstance(out, list) else out.cpu()
