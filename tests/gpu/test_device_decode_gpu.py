"""JPEG batches decoded on the GPU (nvImageCodec → nvJPEG) and a real CUDA out-of-memory in a batch.

nvJPEG's pixels are not libjpeg-turbo's (another IDCT), so the GPU regions are compared with OpenCV's
exact decode within ``MAD_BOUND`` levels; what must hold exactly: every file the exact decoder refuses
is refused here too (None: the caller's exact decode then skips it), the placement arithmetic (EXIF
orientation included) is the CPU path's, and a sample's bytes do not depend on its batch or the call.
The fixtures are tests/unit/test_decode_fast.py's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # the fixtures of test_device_decoder and test_decode_fast

import pipelines  # noqa: E402
from augserve.batch import augment_batch  # noqa: E402
from augserve.sources import CorruptImageError, ImageFolder, SkipStats  # noqa: E402
from augserve.sources.decode import decode_encoded, read_encoded, read_image  # noqa: E402
from augserve.sources.device_decoder import DeviceDecoder, device_decoder  # noqa: E402
import test_device_decoder  # noqa: E402
from test_decode_fast import GOOD_NAMES  # noqa: E402
from test_device_decoder import _readable  # noqa: E402

# Every JPEG kind, EXIF orientation, PNG/BMP and bad input as files, and all of them in a two-class folder.
photo, files, folder = test_device_decoder.photo, test_device_decoder.files, test_device_decoder.folder

DEVICE = "cuda:0"
MAD_BOUND = 1.5  # mean |nvJPEG - libjpeg-turbo| per region, uint8 levels (fancy upsampling on both)
DAMAGED = ("jpeg garbage in scan", "jpeg second frame header inside the scan")  # OpenCV decodes them with warnings: any pixels go
SPEC = {"ops": [{"op": "random_resized_crop", "size": 64}, {"op": "mirror"}, {"op": "rotate", "degrees": 20, "p": 0.5}]}


@pytest.fixture(scope="module")
def decoder() -> DeviceDecoder:
    found = device_decoder(DEVICE, 3)
    assert found is not None, "nvImageCodec cannot decode on the GPU here (see the warning above)"
    return found


def _box(slot: int, height: int, width: int):
    """The whole image, a box inside, a sliver at the right edge, one poking out at the bottom left."""
    return [None, (10.5, 20.25, 90.0, 61.0), (width - 0.5, 3.25, width + 40.0, 9.75), (-20, 50.5, 35.5, height + 9)][slot]


def test_gpu_regions_follow_the_exact_decoders_rules(decoder, files):
    names = _readable(files)
    images = [read_encoded(files[name]) for name in names]
    for slot in range(4):
        boxes = [_box(slot, image.height, image.width) for image in images]
        for name, image, box_k, found in zip(names, images, boxes, decoder.decode(images, boxes)):
            try:
                exact = read_image(files[name], 3)
            except CorruptImageError:
                assert found is None, f"{name}: the GPU decoded a file the exact decoder refuses"
                continue
            if name in DAMAGED:
                continue
            takes = name.startswith("jpeg") and "cmyk" not in name
            assert (found is not None) == takes, name
            if found is None:
                continue
            region, placement = found
            assert region.device == torch.device(DEVICE) and region.dtype == torch.uint8
            # Where it sits is the CPU path's: decode_encoded at full scale places the same box the same way.
            cpu_region, cpu_placement = decode_encoded(image, 3, box_k, 1)
            assert placement == cpu_placement and tuple(region.shape) == cpu_region.shape, (name, box_k)
            mad = float(np.abs(region.cpu().numpy().astype(np.int16) - cpu_region).mean())
            assert mad <= MAD_BOUND, (name, box_k, mad)
            assert exact.shape[:2] == (image.height, image.width)


def test_gpu_bytes_do_not_depend_on_the_batch_or_the_call(decoder, files):
    names = [n for n in GOOD_NAMES if n.startswith("jpeg") and "cmyk" not in n]
    images = [read_encoded(files[n]) for n in names]
    boxes = [(3.0 + k, 7.5, 120.0, 99.0) for k in range(len(images))]
    first = decoder.decode(images, boxes)
    second = decoder.decode(images, boxes)
    for k, name in enumerate(names):
        (alone,) = decoder.decode([images[k]], [boxes[k]])
        assert torch.equal(first[k][0], second[k][0]) and torch.equal(first[k][0], alone[0]), name


def test_gpu_roi_is_the_whole_decode_cropped(decoder, files):
    names = [n for n in GOOD_NAMES if n.startswith("jpeg") and "cmyk" not in n]
    images = [read_encoded(files[n]) for n in names]
    regions = decoder.decode(images, [(30.0, 40.0, 150.0, 120.0)] * len(images))
    wholes = decoder.decode(images, [None] * len(images))
    for name, (region, placement), (whole, _) in zip(names, regions, wholes):
        crop = whole[placement.top : placement.top + region.shape[0], placement.left : placement.left + region.shape[1]]
        assert torch.equal(region, crop), name


def test_a_gpu_worker_decodes_on_the_device_and_skips_as_the_cpu_path(folder, monkeypatch):
    source = ImageFolder(folder)
    ids = list(range(len(source)))
    calls = []
    real = DeviceDecoder.decode
    monkeypatch.setattr(DeviceDecoder, "decode", lambda self, images, boxes: calls.append(len(images)) or real(self, images, boxes))
    gpu = pipelines.build(SPEC, backend="torch", device=DEVICE)
    ours, reference = SkipStats(), SkipStats()
    images, kept, labels, _ = augment_batch(source, gpu, ids, 5, 0, "skip", ours)  # torch on CUDA: the device path by default
    again = augment_batch(source, gpu, ids, 5, 0, "skip", SkipStats())[0]
    cpu, kept_cpu, labels_cpu, _ = augment_batch(source, pipelines.build({**SPEC, "decode": "exact"}, backend="torch"), ids, 5, 0, "skip", reference)
    assert calls and (kept, labels) == (kept_cpu, labels_cpu)
    assert (ours.skipped, ours.paths) == (reference.skipped, reference.paths)
    assert torch.equal(images, again)
    assert float((images.to(torch.int16) - cpu.to(torch.int16)).abs().float().mean()) <= MAD_BOUND + 0.5


def test_a_gpu_worker_plans_its_jpeg_batches_on_the_device_with_the_host_plans_bytes(folder):
    """The batched decode path plans on the device by default on CUDA (one CUDA graph per batch size,
    the matrices brought back for the boxes): the same kept samples and bytes as host planning."""
    source = ImageFolder(folder)
    ids = list(range(len(source)))
    on_device = pipelines.build(SPEC, backend="torch", device=DEVICE)
    on_host = pipelines.build(SPEC, backend="torch", device=DEVICE, sampling="host")
    assert on_device.sampling == "device"
    for epoch in range(2):
        ours = augment_batch(source, on_device, ids, 5, epoch, "skip", SkipStats())
        reference = augment_batch(source, on_host, ids, 5, epoch, "skip", SkipStats())
        assert ours[1:3] == reference[1:3] and torch.equal(ours[0], reference[0])


def test_a_real_cuda_out_of_memory_is_retried_in_halves(tmp_path, caplog):
    """Most of the GPU taken by this process (a real allocation): the batch runs out of memory, is made in
    halves, and comes out with the bytes of the run that had room."""
    rng = np.random.default_rng(0)
    (tmp_path / "c").mkdir()
    for k in range(16):
        image = cv2.GaussianBlur(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8), (9, 9), 3)
        assert cv2.imwrite(str(tmp_path / "c" / f"{k:02d}.png"), image)  # PNG: decoded on the host either way
    source = ImageFolder(tmp_path)
    pipe = pipelines.build({"ops": [{"op": "rotate", "degrees": 30}, {"op": "random_resized_crop", "size": 1024, "scale": [0.5, 1.0]}]},
                           backend="torch", device=DEVICE)  # fmt: skip
    ids = list(range(16))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    base = torch.cuda.memory_allocated(DEVICE)
    augment_batch(source, pipe, ids[:1], 0, 0, "skip", SkipStats())
    per_sample = torch.cuda.max_memory_allocated(DEVICE) - base
    reference = augment_batch(source, pipe, ids, 0, 0, "skip", SkipStats())[0]
    torch.cuda.empty_cache()
    hog = None
    for spare in range(3, 40):  # room for about three samples; a little more where free memory is not one block
        free, _ = torch.cuda.mem_get_info(DEVICE)
        try:
            hog = torch.empty(int(free - spare * per_sample), dtype=torch.uint8, device=DEVICE)
            break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
    assert hog is not None, "could not take most of the GPU's memory"
    try:
        with caplog.at_level("WARNING", logger="augserve.worker"):
            squeezed = augment_batch(source, pipe, ids, 0, 0, "skip", SkipStats())[0]
    finally:
        del hog
        torch.cuda.empty_cache()
    assert any(r.getMessage().startswith("out of device memory augmenting 16 samples") for r in caplog.records)
    assert torch.equal(squeezed, reference)


def _service_helpers():
    """tests/integration/conftest.py (real daemon processes), loaded under its own name."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "integration" / "conftest.py"
    spec = importlib.util.spec_from_file_location("augserve_integration_helpers", path)
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_stream_goes_on_through_a_workers_cuda_out_of_memory(tmp_path):
    """A real daemon with one GPU worker started while this process holds most of the GPU: its batches
    run out of memory, are made in halves, and the stream delivers every sample with the bytes the
    worker makes when it has room (computed here first, in this process: same GPU, same code)."""
    helpers = _service_helpers()
    rng = np.random.default_rng(1)
    for k in range(16):
        (tmp_path / "big" / "ab"[k % 2]).mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        image = cv2.resize(coarse, (2048, 2048), interpolation=cv2.INTER_CUBIC)
        assert cv2.imwrite(str(tmp_path / "big" / "ab"[k % 2] / f"{k:02d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    spec = {"ops": [{"op": "rotate", "degrees": 30}, {"op": "random_resized_crop", "size": 2048, "scale": [0.5, 1.0]}], "decode": "exact"}
    source = ImageFolder(tmp_path / "big")
    pipe = pipelines.build(spec, backend="torch", device=DEVICE)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    base = torch.cuda.memory_allocated(DEVICE)
    augment_batch(source, pipe, [0], 0, 0, "skip", SkipStats())
    per_sample = torch.cuda.max_memory_allocated(DEVICE) - base
    expected = {sample: image.numpy() for sample, image in zip(range(16), augment_batch(source, pipe, range(16), 5, 0, "skip", SkipStats())[0])}
    del pipe
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(DEVICE)
    context = total - free - torch.cuda.memory_reserved(DEVICE)  # what a process's CUDA context takes outside torch's allocator
    hog = torch.empty(int(free - context - (1 << 28) - 3 * per_sample), dtype=torch.uint8, device=DEVICE)  # the worker gets about three samples
    daemon = helpers.launch_daemon(tmp_path / "logs", "--dataset", f"big={tmp_path / 'big'}", "--backend", "torch", "--device", DEVICE, workers=1)
    try:
        daemon.wait_ready(1, timeout=120)
        delivered = {}
        stream = helpers.open_stream(daemon.address, dataset="big", pipeline=spec, batch_size=16, seed=5, epochs=1, batch_timeout=120.0)
        for batch in stream:
            for position, sample in enumerate(batch.sample_ids.tolist()):
                delivered[sample] = batch.images[position].cpu().numpy()
    finally:
        del hog
        torch.cuda.empty_cache()
        code = daemon.stop()
    log = daemon.log()
    assert code == 0, log[-4000:]
    assert "out of device memory augmenting 16 samples: retrying as 8 and 8" in log, log[-4000:]
    assert sorted(delivered) == list(range(16))
    for sample, image in expected.items():
        np.testing.assert_array_equal(delivered[sample], image, err_msg=f"sample {sample}")
