"""A device that runs out of memory augments the batch in halves (``augserve.batch``): the same bytes as
the whole batch, skipped files counted once, one warning per split, and a single sample that still does
not fit raises (the worker then reports the task as an ``error``, which the daemon re-issues).

The fault is injected here: a real pipeline wrapped so that a call with more than ``room`` samples
raises ``torch.OutOfMemoryError`` after the real work, as CUDA's allocator does when a batch's last
tensor does not fit. (tests/gpu/test_device_decode_gpu.py makes a real CUDA out-of-memory.)
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import pipelines
from augserve.batch import augment_batch
from augserve.sources import ImageFolder, SkipStats, open_dataset

SPEC = {"ops": [{"op": "random_resized_crop", "size": 40}, {"op": "mirror"}, {"op": "rotate", "degrees": 15, "p": 0.5}]}


class OutOfMemoryAbove:
    """``pipe`` on a device with room for ``room`` samples per call: larger calls do the real work, then
    raise ``torch.OutOfMemoryError``. ``calls`` records each call's batch size."""

    def __init__(self, pipe, room: int) -> None:
        self.pipe = pipe
        self.room = room
        self.calls: list[int] = []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def _check(self, count: int, result):
        self.calls.append(count)
        if count > self.room:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {count} samples' worth")
        return result

    def __call__(self, images, **kwargs):
        return self._check(len(images), self.pipe(images, **kwargs))

    def run_decoding(self, shapes, decode, **kwargs):
        return self._check(len(shapes), self.pipe.run_decoding(shapes, decode, **kwargs))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Ten JPEGs of two sizes and one that fails only when decoded (a frame header OpenCV refuses)."""
    root = tmp_path_factory.mktemp("oom")
    rng = np.random.default_rng(5)
    for k in range(10):
        (root / "ab"[k % 2]).mkdir(exist_ok=True)
        height, width = (70, 90) if k % 3 else (64, 100)
        image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (5, 5), 1)
        assert cv2.imwrite(str(root / "ab"[k % 2] / f"{k}.jpg"), image)
    good = (root / "a" / "0.jpg").read_bytes()
    sof = good.find(b"\xff\xc0")
    bad = bytearray(good)
    bad[sof + 9] = 0  # zero components: readable header, refused when decoded
    (root / "a" / "5b.jpg").write_bytes(bytes(bad))
    return root


def _run(source, pipe, seed=3, out=None, **kwargs):
    stats = SkipStats()
    images, kept, labels, _ = augment_batch(source, pipe, range(len(source)), seed, 1, "skip", stats, out=out, **kwargs)
    return images, kept, labels, stats


@pytest.mark.parametrize("on_device", [False, True], ids=["per-image decode", "batched decode"])
@pytest.mark.parametrize("room", [1, 3, 6])
def test_halves_give_the_whole_batchs_bytes_and_count_skips_once(folder, caplog, room, on_device):
    source = ImageFolder(folder)
    pipe = pipelines.build(SPEC, backend="torch")
    whole, kept, labels, stats = _run(source, pipe, decode_on_device=on_device)
    assert stats.skipped == 1 and len(kept) == len(source) - 1
    tight = OutOfMemoryAbove(pipe, room)
    with caplog.at_level(logging.WARNING, logger="augserve.worker"):
        halves, kept_h, labels_h, stats_h = _run(source, tight, decode_on_device=on_device)
    assert torch.equal(halves, whole) and kept_h == kept and labels_h == labels
    assert (stats_h.skipped, stats_h.paths) == (stats.skipped, stats.paths)  # the bad file, once
    splits = [r for r in caplog.records if r.getMessage().startswith("out of device memory")]
    # One warning per call that ran out of memory, each followed by its halves; every kept sample made once.
    assert len(splits) == sum(1 for n in tight.calls if n > room) > 0 and {r.levelno for r in splits} == {logging.WARNING}
    assert splits[0].getMessage() == f"out of device memory augmenting {len(source)} samples: retrying as {(len(source) + 1) // 2} and {len(source) // 2}"
    assert sum(n for n in tight.calls if n <= room) == len(kept)


def test_the_joined_batch_goes_into_out_once(folder):
    source = ImageFolder(folder)
    pipe = pipelines.build(SPEC, backend="torch")
    whole = _run(source, pipe)[0]
    asked = []
    slot = torch.full((len(source), *whole.shape[1:]), 7, dtype=torch.uint8)  # room for every file, as a worker's slot

    def destination(shape):
        asked.append(shape)
        return slot[: shape[0]]

    images = _run(source, OutOfMemoryAbove(pipe, 2), out=destination)[0]
    assert images.data_ptr() == slot.data_ptr() and torch.equal(slot[: len(whole)], whole)
    # Planned with the bad file, again without it (then out of memory), and the joined halves once.
    assert asked == [(len(source), *whole.shape[1:]), tuple(whole.shape), tuple(whole.shape)]


def test_arrays_and_outputs_of_different_sizes(caplog):
    digits = open_dataset("digits")
    ids = list(range(0, 200, 20))
    for spec in (SPEC, {"ops": [{"op": "resize", "short_side": 24}, {"op": "mirror"}]}):
        pipe = pipelines.build(spec, backend="torch")
        whole = augment_batch(digits, pipe, ids, 0, 0, "skip", SkipStats())
        halves = augment_batch(digits, OutOfMemoryAbove(pipe, 4), ids, 0, 0, "skip", SkipStats())
        assert halves[1:3] == whole[1:3]
        assert torch.equal(halves[0], whole[0])
    # Images of two sizes without a crop: a list, in order, as the whole batch gives it.
    source_images = [np.full((20 + k % 2 * 5, 30, 3), k, dtype=np.uint8) for k in range(6)]

    pipe = pipelines.build({"ops": [{"op": "mirror"}]}, backend="torch")
    whole = pipe(source_images, seed=1, sample_ids=range(6))
    from augserve.batch import _in_slices

    def attempt(part, out, skips):
        images = OutOfMemoryAbove(pipe, 2)([source_images[i] for i in part], seed=1, sample_ids=part)
        return [o.cpu() for o in images] if isinstance(images, list) else images, list(part), [0] * len(part), 0.0

    joined = _in_slices(attempt, list(range(6)), None, SkipStats())[0]
    assert isinstance(whole, list) and isinstance(joined, list) and len(joined) == 6
    assert all(torch.equal(a, b) for a, b in zip(joined, whole))


def test_a_single_sample_that_does_not_fit_raises(folder):
    source = ImageFolder(folder)
    tight = OutOfMemoryAbove(pipelines.build(SPEC, backend="torch"), 0)
    with pytest.raises(torch.OutOfMemoryError):
        _run(source, tight)
    assert tight.calls[0] == len(source) - 1 and tight.calls[-1] == 1  # the whole batch first, one sample last
