"""Decoding whole batches on the worker's device (``augserve.sources.device_decoder``) and the batched
path of ``augment_batch`` / ``Pipeline.run_decoding``, run here with device "cpu": nvImageCodec's CPU
decoder is libjpeg-turbo, so every region must be exactly OpenCV's pixels, and every bad file must get
the exact decoder's verdict. The fixtures are ``test_decode_fast``'s (every JPEG kind, EXIF
orientation, PNG/BMP, and the bad inputs), written once per module.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import pipelines
from augserve.batch import augment_batch
from augserve.sources import CorruptImageError, ImageFolder, SkipStats
from augserve.sources.decode import read_encoded, read_image
from augserve.sources.device_decoder import DeviceDecoder, device_decoder

import test_decode_fast
from test_decode_fast import BAD_NAMES, GOOD_NAMES, WIDTH

SPEC = {"ops": [{"op": "random_resized_crop", "size": 48}, {"op": "mirror"}, {"op": "rotate", "degrees": 20, "p": 0.5}]}


# test_decode_fast's module fixtures: every JPEG kind, EXIF orientation, PNG/BMP and bad input, written once.
photo = test_decode_fast.photo
files = test_decode_fast.files


def _readable(files: dict[str, Path]) -> list[str]:
    """The fixtures ``read_encoded`` accepts (the others never reach a decoder)."""
    names = []
    for name in GOOD_NAMES + BAD_NAMES:
        try:
            read_encoded(files[name])
        except CorruptImageError:
            continue
        names.append(name)
    return names


def _boxes(height: int, width: int) -> list:
    return [None, (0.0, 0.0, float(width), float(height)), (10.5, 20.25, 90.0, 61.0), (width - 0.5, 3.25, width + 40.0, 9.75), (-20, 50.5, 35.5, height + 9)]


@pytest.mark.parametrize("channels", [3, 1])
def test_batched_regions_are_the_exact_decodes_pixels(files, channels):
    """One call for every readable file and box: each region is OpenCV's pixels at its placement, or
    None — and None exactly where the file is not for nvImageCodec or the exact decode refuses it."""
    decoder = DeviceDecoder(__import__("nvidia.nvimgcodec", fromlist=["x"]), "cpu", channels)
    names = _readable(files)
    images = [read_encoded(files[name]) for name in names]
    for slot in range(5):
        boxes = [_boxes(image.height, image.width)[slot] for image in images]
        for name, image, box, found in zip(names, images, boxes, decoder.decode(images, boxes)):
            try:
                exact = read_image(files[name], channels)
            except CorruptImageError:
                assert found is None, f"{name}: decoded a file the exact decoder refuses"
                continue
            takes = name.startswith("jpeg") and "cmyk" not in name
            assert (found is not None) == takes, f"{name}: expected {'a region' if takes else 'None (the exact decode)'}"
            if found is None:
                continue
            region, placement = found
            assert region.dtype == torch.uint8 and region.device.type == "cpu" and placement.factor == 1
            top, left = placement.top, placement.left
            bottom, right = top + region.shape[0], left + region.shape[1]
            if box is not None:  # covers the clipped box, and no more than its whole pixels
                x0, y0 = max(box[0], 0), max(box[1], 0)
                x1, y1 = min(box[2], image.width), min(box[3], image.height)
                assert (top, left) == (int(y0), int(x0)) and (bottom, right) == (int(np.ceil(y1)), int(np.ceil(x1))), (name, box, placement)
            else:
                assert (top, left, bottom, right) == (0, 0, image.height, image.width)
            np.testing.assert_array_equal(region.numpy(), exact[top:bottom, left:right], err_msg=f"{name} box {box}")


def test_a_samples_region_does_not_depend_on_its_batch(files):
    decoder = device_decoder("cpu", 3)
    names = [n for n in GOOD_NAMES if n.startswith("jpeg") and "cmyk" not in n]
    images = [read_encoded(files[n]) for n in names]
    boxes = [(5.0 + k, 7.0, 120.0, 99.5) for k in range(len(images))]
    together = decoder.decode(images, boxes)
    for k in range(len(images)):
        (alone,) = decoder.decode([images[k]], [boxes[k]])
        assert alone[1] == together[k][1] and torch.equal(alone[0], together[k][0]), names[k]
    assert decoder.decode([], []) == []
    with pytest.raises(ValueError, match="does not overlap"):
        decoder.decode(images[:1], [(WIDTH + 5, 0, WIDTH + 9, 4)])
    with pytest.raises(ValueError, match="2 boxes for 1 images"):
        decoder.decode(images[:1], [None, None])


def test_device_decoders_are_made_once_per_thread_and_refuse_bad_arguments():
    assert device_decoder("cpu", 3) is device_decoder("cpu", 3)
    assert device_decoder("cpu", 1) is not device_decoder("cpu", 3)
    from nvidia import nvimgcodec

    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        DeviceDecoder(nvimgcodec, "cpu", 2)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda"):
        DeviceDecoder(nvimgcodec, "mps", 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_no_gpu_means_no_device_decoder_and_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="augserve.sources"):
        assert device_decoder("cuda:0", 3) is None
        assert device_decoder("cuda:0", 3) is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "augserve.sources"]
    assert len(warnings) == 1 and warnings[0].startswith("nvImageCodec cannot decode on cuda:0 (") and warnings[0].endswith(
        "); JPEG files are decoded on the CPU, one at a time"
    )


# --- the batched path of augment_batch -----------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory, files) -> Path:
    """Every fixture in a two-class folder: good files of each kind and size, and the bad ones."""
    root = tmp_path_factory.mktemp("device_folder")
    for k, name in enumerate(GOOD_NAMES + BAD_NAMES):
        target = root / ("a" if k % 2 else "b")
        target.mkdir(exist_ok=True)
        shutil.copy(files[name], target / f"{k:02d}{files[name].suffix}")
    return root


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("spec", [SPEC, {"ops": [{"op": "warp", "kind": "grid", "magnitude": 0.05}, {"op": "center_crop", "size": 64}]}],
                         ids=["crop-rotate", "local-warp"])  # fmt: skip
def test_batched_device_path_gives_the_exact_paths_bytes_and_skips(folder, channels, spec):
    """Decoded on the device in one call per planning round, regions on canvases: the bytes of the
    pipeline run on whole exact decodes, with the same files skipped and counted in the same order."""
    source = ImageFolder(folder, channels=channels)
    ids = list(range(len(source)))
    fast = pipelines.build(spec, backend="torch")
    exact = pipelines.build({**spec, "decode": "exact"}, backend="torch")
    ours, reference = SkipStats(), SkipStats()
    images, kept, labels, _ = augment_batch(source, fast, ids, 7, 1, "skip", ours, decode_on_device=True)
    expected, kept_ref, labels_ref, _ = augment_batch(source, exact, ids, 7, 1, "skip", reference)
    assert kept == kept_ref and labels == labels_ref
    assert (ours.skipped, ours.paths) == (reference.skipped, reference.paths)
    assert sorted(ours.paths) == [p for p in source.paths if not _decodes(p, channels)]  # refused from the header or when decoded
    assert torch.equal(images, expected)


def test_one_device_decode_per_planning_round(folder, monkeypatch):
    """Files that fail to decode are all found in one round and the batch planned once more without
    them; the per-image decoder is never asked for a JPEG nvImageCodec took."""
    source = ImageFolder(folder)
    calls = []
    real = DeviceDecoder.decode
    monkeypatch.setattr(DeviceDecoder, "decode", lambda self, images, boxes: calls.append(len(images)) or real(self, images, boxes))
    stats = SkipStats()
    images, kept, _, _ = augment_batch(source, pipelines.build(SPEC, backend="torch"), range(len(source)), 0, 0, "skip", stats, decode_on_device=True)
    readable = [p for p in source.paths if _reads(p)]
    refused_when_decoded = [p for p in readable if not _decodes(p, 3)]
    assert len(refused_when_decoded) > 1  # several in one batch: still one more round, not one per file
    assert calls == [len(readable), len(readable) - len(refused_when_decoded)]
    assert images.shape[0] == len(kept) == len(source) - stats.skipped


def test_on_error_raise_raises_the_first_bad_file_as_the_exact_path_does(folder):
    source = ImageFolder(folder)
    ids = [i for i, p in enumerate(source.paths) if _reads(p)]
    with pytest.raises(CorruptImageError) as ours:
        augment_batch(source, pipelines.build(SPEC, backend="torch"), ids, 0, 0, "raise", SkipStats(), decode_on_device=True)
    with pytest.raises(CorruptImageError) as exact:
        augment_batch(source, pipelines.build({**SPEC, "decode": "exact"}, backend="torch"), ids, 0, 0, "raise", SkipStats())
    assert str(ours.value) == str(exact.value)


def _reads(path) -> bool:
    """Whether ``read_encoded`` accepts the file (its header and size)."""
    try:
        read_encoded(path)
    except CorruptImageError:
        return False
    return True


def _decodes(path, channels: int) -> bool:
    """Whether the exact decoder accepts the file."""
    try:
        read_image(path, channels)
    except CorruptImageError:
        return False
    return True


def test_out_destination_and_when_the_device_path_applies(folder, monkeypatch):
    source = ImageFolder(folder)
    ids = [i for i, p in enumerate(source.paths) if _reads(p)][:6]
    pipe = pipelines.build(SPEC, backend="torch")
    asked = []

    def destination(shape):
        asked.append(shape)
        return torch.full(shape, 9, dtype=torch.uint8)

    images, kept, _, _ = augment_batch(source, pipe, ids, 3, 0, "skip", SkipStats(), out=destination, decode_on_device=True)
    plain, _, _, _ = augment_batch(source, pipe, ids, 3, 0, "skip", SkipStats(), decode_on_device=True)
    assert torch.equal(images, plain) and asked[-1] == tuple(images.shape)
    # Not asked for, or no device decoder here: one decode per image, as before (torch on the CPU plans DCT reductions).
    monkeypatch.setattr("augserve.batch.device_decoder", lambda *a, **k: pytest.fail("the device decoder was asked for"))
    per_image, _, _, _ = augment_batch(source, pipe, ids, 3, 0, "skip", SkipStats())
    exact_spec = augment_batch(source, pipelines.build({**SPEC, "decode": "exact"}, backend="torch"), ids, 3, 0, "skip", SkipStats(), decode_on_device=True)[0]
    assert torch.equal(exact_spec, plain)  # decode: exact keeps OpenCV's whole decode: the same pixels here
    monkeypatch.setattr("augserve.batch.device_decoder", lambda *a, **k: None)
    fallback, _, _, _ = augment_batch(source, pipe, ids, 3, 0, "skip", SkipStats(), decode_on_device=True)
    assert torch.equal(fallback, per_image)


def test_run_decoding_with_decode_batch_groups_sizes_and_checks_regions():
    """Images of two sizes: one backend run per size, outputs back in batch order; a region that does not
    fit its image is refused with one line."""
    rng = np.random.default_rng(3)
    images = [cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 1) for h, w in ((60, 80), (50, 70), (60, 80), (50, 70))]
    pipe = pipelines.build({"ops": [{"op": "random_resized_crop", "size": 32}, {"op": "mirror"}]}, backend="torch")
    shapes = [image.shape for image in images]
    seen = []

    def regions(boxes):
        seen.append(boxes)
        out = []
        for image, box in zip(images, boxes):
            x0, y0 = int(box[0]), int(box[1])
            x1, y1 = int(np.ceil(box[2])), int(np.ceil(box[3]))
            out.append((torch.from_numpy(image[y0:y1, x0:x1].copy()), (y0, x0)))
        return out

    ours = pipe.run_decoding(shapes, None, seed=4, sample_ids=[10, 11, 12, 13], decode_batch=regions)
    reference = pipe(images, seed=4, sample_ids=[10, 11, 12, 13])
    assert len(seen) == 1 and torch.equal(ours, reference)
    with pytest.raises(ValueError, match=r"image 0: decoded region \(70, 90, 3\) at \(0, 0\) does not fit its header's shape \(60, 80, 3\)"):
        pipe.run_decoding(shapes, None, decode_batch=lambda boxes: [(torch.zeros((70, 90, 3), dtype=torch.uint8), (0, 0))] * 4)


# --- the decoder bench's device mode ---------------------------------------------------------------------


def test_device_decoder_bench_on_the_cpu(monkeypatch):
    """The CPU rows run and give OpenCV's pixels; candidates that cannot run here say why; a CUDA device
    this machine lacks is one line."""
    import importlib.util
    import sys

    from augserve.bench.device_decoders import format_table, run_device_decoders

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if DALI were not installed
    result = run_device_decoders("cpu", photos=1, rounds=1, batch=3)
    rows = {(row["size"], row["candidate"]): row for row in result["rows"]}
    for size in ("1600×1200", "500×375"):
        for name in ("nvimgcodec CPU batch, ROI", "nvimgcodec CPU batch, whole + crop", "OpenCV per image (exact)"):
            assert rows[(size, name)]["images_per_s"] > 0 and rows[(size, name)]["mad"] == 0.0, name
        for name in ("DALI cpu decoders.image + crop", "DALI cpu decoders.image_crop (ROI)"):
            assert rows[(size, name)]["images_per_s"] is None
            assert rows[(size, name)]["note"] == "unavailable: ModuleNotFoundError: import of nvidia.dali halted; None in sys.modules"
        if importlib.util.find_spec("torchvision") is None:
            assert rows[(size, "torchvision decode_jpeg(cpu) + crop")]["note"] == "unavailable: ModuleNotFoundError: No module named 'torchvision'"
    assert set(result["config"]["fastest"]) == {"1600×1200", "500×375"}
    table = format_table(result)
    assert "| 500×375 | nvimgcodec CPU batch, ROI |" in table and "| 500×375 | DALI cpu decoders.image + crop | – |" in table
    with pytest.raises(ValueError, match="^--device must be cpu or cuda"):
        run_device_decoders("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device 'cuda:0' was asked for but CUDA is not available on this machine: "):
            run_device_decoders("cuda:0")


# --- the batched path planned on the device ----------------------------------------------------------------

DEVICE_SPECS = {
    "crop-mirror-rotate": SPEC,
    "gpu chain": {"ops": [{"op": "random_resized_crop", "size": 40}, {"op": "mirror"}, {"op": "rotate", "degrees": 15}, {"op": "shear", "degrees": 10},
                          {"op": "pca_color"}, {"op": "color_shift", "limit": 20}]},  # fmt: skip
    "center crop": {"ops": [{"op": "resize", "short_side": 48}, {"op": "center_crop", "size": 40}]},
}


def _recording_regions(images: list[np.ndarray], seen: list):
    """A ``decode_batch`` that cuts each box (widened to whole pixels) out of the decoded ``images``
    and records the boxes it was asked for."""

    def regions(boxes):
        seen.append(boxes)
        out = []
        for image, box in zip(images, boxes):
            if box is None:
                out.append((torch.from_numpy(image.copy()), (0, 0)))
                continue
            x0, y0, x1, y1 = int(box[0]), int(box[1]), int(np.ceil(box[2])), int(np.ceil(box[3]))
            out.append((torch.from_numpy(image[y0:y1, x0:x1].copy()), (y0, x0)))
        return out

    return regions


@pytest.mark.parametrize("name", sorted(DEVICE_SPECS))
def test_run_decoding_planned_on_the_device_decodes_the_same_boxes_into_the_same_bytes(name):
    """A GPU worker's path with its plans made on the device (here device "cpu"): the boxes asked of
    the decoder are the host plans' (the matrices agree to the last bits or within 1e-9 where cos/sin
    enter), and the bytes are the host path's — images of two sizes, so two canvas batches."""
    rng = np.random.default_rng(5)
    images = [cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 1) for h, w in ((60, 80), (72, 56), (60, 80), (72, 56), (60, 80))]
    shapes, ids = [image.shape for image in images], [7, 3, 11, 40, 2]
    on_host = pipelines.build(DEVICE_SPECS[name], backend="torch", sampling="host")
    on_device = pipelines.build(DEVICE_SPECS[name], backend="torch", sampling="device")
    assert on_device.sampling == "device"
    host_boxes, device_boxes = [], []
    for epoch in range(3):
        reference = on_host.run_decoding(shapes, None, seed=9, epoch=epoch, sample_ids=ids, decode_batch=_recording_regions(images, host_boxes))
        ours = on_device.run_decoding(shapes, None, seed=9, epoch=epoch, sample_ids=ids, decode_batch=_recording_regions(images, device_boxes))
        assert torch.equal(ours, reference) and torch.equal(ours, on_host(images, seed=9, epoch=epoch, sample_ids=ids))
        out = torch.full_like(reference, 77)
        assert on_device.run_decoding(shapes, None, seed=9, epoch=epoch, sample_ids=ids, out=out, decode_batch=_recording_regions(images, [])) is out
        assert torch.equal(out, reference)
    for host, device in zip(host_boxes, device_boxes):
        assert [box is None for box in host] == [box is None for box in device]
        np.testing.assert_allclose([box for box in device if box], [box for box in host if box], rtol=0, atol=1e-6)


def test_run_decoding_planned_on_the_device_refuses_what_the_host_refuses_in_the_same_line():
    grey = [(40, 50, 1)] * 2
    spec = {"ops": [{"op": "random_resized_crop", "size": 16}, {"op": "pca_color"}]}
    never = lambda boxes: pytest.fail("nothing is decoded for a batch whose parameters are refused")  # noqa: E731
    with pytest.raises(ValueError) as on_host:
        pipelines.build(spec, backend="torch", sampling="host").run_decoding(grey, None, decode_batch=never)
    with pytest.raises(ValueError) as on_device:
        pipelines.build(spec, backend="torch", sampling="device").run_decoding(grey, None, decode_batch=never)
    assert str(on_device.value) == str(on_host.value) == "pca_color needs RGB images (3 channels), got 1 channel(s)"


def test_augment_batch_through_nvimgcodec_is_the_same_planned_on_either_side(folder):
    """``augment_batch`` over real JPEG files (every kind, orientation and bad input of the fixtures)
    and the batched nvImageCodec decode: a pipeline that plans on the device gives the host-planned
    bytes, bad files skipped alike."""
    source = ImageFolder(folder)
    ids = list(range(len(source)))
    results = []
    for sampling in ("host", "device"):
        pipe = pipelines.build(SPEC, backend="torch", sampling=sampling)
        stats = SkipStats()
        images, kept, labels, _ = augment_batch(source, pipe, ids, 3, 1, "skip", stats, decode_on_device=True)
        results.append((images, kept, labels, stats.skipped))
    (host_images, *host_rest), (device_images, *device_rest) = results
    assert device_rest == host_rest and torch.equal(device_images, host_images)
