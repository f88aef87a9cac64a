"""Page-locked host memory of a worker on a GPU (:mod:`augserve.handoff.pinned`), on a real GPU: frames
come from page-locked blocks, a host shared-memory slot is registered with CUDA for its whole life and a
device-to-host copy lands in it, and a GPU worker's batch for a trainer on another host is page-locked
from the pipeline on (its ``out=``)."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from augserve import protocol as P  # noqa: E402
from augserve.handoff import pinned, shm  # noqa: E402
from augserve.handoff.receiver import SlotReader  # noqa: E402
from augserve.handoff.sender import Sender  # noqa: E402


@pytest.fixture
def shm_dir():
    directory = tempfile.mkdtemp(prefix="augserve-gpu-test-", dir="/dev/shm")
    yield directory
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)


def test_a_device_tensor_goes_to_page_locked_host_memory_with_its_values():
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, device="cuda:0")
    host = pinned.to_host(images)
    assert host.device.type == "cpu" and host.is_pinned() and torch.equal(host, images.cpu())
    frames = pinned.host_array((4, 32, 32, 3), "cuda:0")
    assert isinstance(frames, torch.Tensor) and frames.is_pinned() and frames.dtype == torch.uint8 and frames.is_contiguous()


def test_a_slot_is_registered_while_it_lives_and_a_device_copy_lands_in_it(shm_dir):
    segment = pinned.PinnedSegment.create(shm_dir, 1 << 20, device="cuda:0")
    assert segment.pinned
    view = torch.from_numpy(segment.view(0, 1 << 20))
    assert view.is_pinned()  # CUDA knows the mapping: copies into it are DMA
    source = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda:0")
    view.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(view, source.cpu())
    del view
    segment.close()
    assert not segment.pinned and os.listdir(shm_dir) == []


def test_a_gpu_workers_batch_for_another_host_is_page_locked_from_the_pipeline_on(shm_dir):
    sender = Sender(shm_dir, device="cuda:0")
    away = sender.identity.model_copy(update={"boot": "f" * 32})
    task = P.Task(
        task="s1:0:0", stream="s1", epoch=0, index=0, ids=[5, 9], seed=0, dataset=P.DatasetRef(ref="digits"),
        pipeline=P.PipelineRef(stream="s1", version=1, spec={}), data="tcp://127.0.0.1:9", handoff=P.Handoff(mode="auto", host=away, slots=2),
    )  # fmt: skip
    reservation = sender.reserve(task, (8, 8))
    images = reservation.images((2, 4, 4, 3))  # frames: no slot on another host
    assert reservation.slot is None and isinstance(images, torch.Tensor) and images.is_pinned()
    images.copy_(torch.arange(96, dtype=torch.uint8, device="cuda:0").view(2, 4, 4, 3))
    info = dict(stream="s1", task="s1:0:0", epoch=0, index=0, pipeline_version=1, worker="w")
    out = sender.pack(task, info, [("images", images), ("sample_ids", np.array([5, 9], dtype=np.int64))], reservation)
    message = P.decode(out.frames, P.WORKER_TO_CLIENT)
    assert out.via == "frames" and torch.equal(P.frames_to_tensors(message.body.tensors, message.buffers)["images"], images)

    here = task.model_copy(update={"handoff": P.Handoff(mode="auto", host=sender.identity, slots=2)})
    slot = sender.pack(here, info, [("images", images), ("sample_ids", np.array([5, 9], dtype=np.int64))])
    assert slot.via == "shm" and slot.slot[1].memory.pinned
    assert torch.equal(SlotReader(shm_dir).wrap(P.decode(slot.frames).body)["images"], images)
    sender.close()
    assert [name for name in os.listdir(shm_dir) if name.startswith(shm.PREFIX)] == []
