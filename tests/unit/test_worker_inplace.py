"""A worker's batch written once: the slot is taken when the pipeline knows the batch's size, the
pipeline augments straight into it, and the descriptor describes it as it lies — the same bytes as the
frame path, also when a sample fails only when decoded and the batch is planned again without it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import pipelines
from augserve import protocol as P
from augserve.batch import augment_batch
from augserve.handoff.receiver import SlotReader
from augserve.handoff.sender import Sender
from augserve.sources import SkipStats, open_dataset
from augserve.worker import TRAILING_BYTES, _as_tensor

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm") or not sys.platform.startswith("linux"), reason="needs Linux and /dev/shm")

SPEC = {"ops": [{"op": "random_resized_crop", "size": 32}, {"op": "mirror"}, {"op": "rotate", "degrees": 10}, {"op": "color_shift", "limit": 20}]}
INFO = dict(stream="s1", task="s1:0:0", epoch=0, index=0, pipeline_version=1, worker="w")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Six PNGs of two classes; the fourth's header is fine but its pixel data is not (it fails only when decoded)."""
    rng = np.random.default_rng(3)
    for index in range(6):
        picture = cv2.resize(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8), (120 + 4 * index, 90), interpolation=cv2.INTER_LINEAR)
        data = bytearray(cv2.imencode(".png", picture)[1].tobytes())
        if index == 3:
            start = data.find(b"IDAT")
            data[start + 4 : start + 40] = b"\x00" * 36
        (tmp_path / f"class{index % 2}").mkdir(exist_ok=True)
        (tmp_path / f"class{index % 2}" / f"{index}.png").write_bytes(bytes(data))
    return tmp_path


def task(host: P.ShmHost, ids: list[int]) -> P.Task:
    return P.Task(
        task="s1:0:0", stream="s1", epoch=0, index=0, ids=ids, seed=7, dataset=P.DatasetRef(ref="x"),
        pipeline=P.PipelineRef(stream="s1", version=1, spec=SPEC), data="tcp://127.0.0.1:9", handoff=P.Handoff(mode="auto", host=host, slots=3),
    )  # fmt: skip


def run_in_place(shm_dir: str, source, ids: list[int]):
    """What the worker does: reserve, augment into the reservation, pack. Returns (the pipeline's
    output, the shapes it asked for, the slot's data address, the message, the skip stats)."""
    sender = Sender(shm_dir)
    the_task = task(sender.identity, ids)
    reservation = sender.reserve(the_task, TRAILING_BYTES)
    asked = []

    def images_into(shape):
        asked.append(tuple(shape))
        return reservation.images(shape)

    stats = SkipStats()
    out, kept, labels, _ = augment_batch(source, pipelines.build(SPEC), ids, 7, 0, "skip", stats, out=_as_tensor(images_into))
    slot_start = reservation.slot[1].memory.data.ctypes.data
    tensors = [("images", out), ("labels", np.asarray(labels, dtype=np.int64)), ("sample_ids", np.asarray(kept, dtype=np.int64))]
    outgoing = sender.pack(the_task, INFO, tensors, reservation)
    assert outgoing.via == "shm"
    return out, asked, slot_start, P.decode(outgoing.frames, P.WORKER_TO_CLIENT), stats, sender


def test_files_are_augmented_into_the_slot_and_a_late_corrupt_one_shrinks_the_batch(shm_dir, folder):
    source = open_dataset(str(folder))
    ids = list(range(6))
    expected, kept, labels, _ = augment_batch(source, pipelines.build(SPEC), ids, 7, 0, "skip", SkipStats())  # the frame path: no out=
    assert tuple(expected.shape) == (5, 32, 32, 3) and len(kept) == 5

    out, asked, slot_start, message, stats, sender = run_in_place(shm_dir, source, ids)
    assert asked == [(6, 32, 32, 3), (5, 32, 32, 3)]  # planned with every file, then again without the one that failed
    assert stats.skipped == 1 and stats.paths[0].endswith("3.png")
    assert out.data_ptr() == slot_start, "the pipeline wrote the images at the start of the slot"
    assert message.type == "shm_batch" and [(t.name, t.shape) for t in message.body.tensors] == [
        ("images", [5, 32, 32, 3]), ("labels", [5]), ("sample_ids", [5])
    ]  # fmt: skip
    got = SlotReader(shm_dir).wrap(message.body)
    assert torch.equal(got["images"], expected) and got["sample_ids"].tolist() == kept and got["labels"].tolist() == labels
    sender.close()


def test_decoded_arrays_are_augmented_into_the_slot(shm_dir):
    source = open_dataset("shapes", n=40, size=48)
    ids = [3, 1, 4, 15, 9, 2, 6, 5]
    expected, *_ = augment_batch(source, pipelines.build(SPEC), ids, 7, 0, "skip", SkipStats())
    out, asked, slot_start, message, _, sender = run_in_place(shm_dir, source, ids)
    assert asked == [(8, 32, 32, 3)] and out.data_ptr() == slot_start
    assert torch.equal(SlotReader(shm_dir).wrap(message.body)["images"], expected)
    sender.close()
