"""Plan-aware decoding through the service: workers read headers, plan, then decode only the region
each sample keeps (reduced where the plan allows), deterministically, and skip files that fail only
when decoded."""

from pathlib import Path

import cv2
import numpy as np
import pytest

import pipelines
from augserve.sources import ImageFolder

try:
    from .conftest import collect, images_by_sample, open_stream
except ImportError:  # collected without the package context
    from conftest import collect, images_by_sample, open_stream

SPEC = {"ops": [{"op": "random_resized_crop", "size": 48, "scale": [0.3, 1.0]}, {"op": "mirror"}]}


def write_photos(root: Path) -> list[Path]:
    """12 smooth JPEG "photos" of two sizes in classes a/b (reductions of 2× and 4× apply)."""
    rng = np.random.default_rng(3)
    paths = []
    for k in range(12):
        height, width = ((240, 320), (480, 640))[k % 2]
        coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        path = root / "ab"[k % 2] / f"{k:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
        paths.append(path)
    return paths


def without_quantization_tables(raw: bytes) -> bytes:
    """A JPEG whose header is fine (size, markers, end-of-image) but which no decoder can decode:
    its quantization tables (DQT segments) are cut out."""
    out, i = bytearray(raw[:2]), 2
    while raw[i] == 0xFF and raw[i + 1] != 0xDA:
        length = int.from_bytes(raw[i + 2 : i + 4], "big")
        if raw[i + 1] != 0xDB:
            out += raw[i : i + 2 + length]
        i += 2 + length
    return bytes(out + raw[i:])


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    paths = write_photos(root)
    broken = root / "b" / "99-no-tables.jpg"
    broken.write_bytes(without_quantization_tables(paths[1].read_bytes()))
    return root


def local_fast(folder: Path, spec: dict, seed: int, epoch: int, ids: list[int]) -> np.ndarray:
    """What a worker computes for these samples, in this process."""
    source = ImageFolder(folder)
    pipe = pipelines.build(spec)
    encoded = [source.load_encoded(i) for i in ids]

    def decode(index, box, max_factor):
        array, placement = source.decode(encoded[index], box, max_factor)
        return array, (placement.factor, placement.top, placement.left)

    return pipe.run_decoding([(e.height, e.width, 3) for e in encoded], decode, seed=seed, epoch=epoch, sample_ids=ids).numpy()


def test_the_service_delivers_what_plan_aware_decoding_computes(start_daemon, photo_folder):
    """Same bytes as the local computation, whichever of the two workers took each batch; the file
    that fails only when decoded is skipped and reported, the rest of its batch delivered."""
    daemon = start_daemon("--dataset", f"jpegs={photo_folder}", workers=2)
    records = collect(open_stream(daemon.address, dataset="jpegs", pipeline=SPEC, batch_size=4, seed=7, epochs=2))
    delivered = images_by_sample(records)
    source = ImageFolder(photo_folder)
    broken = source.paths.index(str(photo_folder / "b" / "99-no-tables.jpg"))
    assert {sample for _, sample in delivered} == set(range(len(source))) - {broken}
    assert sum(len(r["skipped"]) for r in records) == 2  # once per epoch
    assert all(path.endswith("99-no-tables.jpg") for r in records for path in r["skipped"])
    for (epoch, sample), image in delivered.items():
        np.testing.assert_array_equal(image, local_fast(photo_folder, SPEC, 7, epoch, [sample])[0])


def test_fast_decoding_stays_close_to_exact_decoding(photo_folder):
    """The same samples decoded whole vs region-and-reduced: the geometry is the same, the pixels
    differ by what the reduction averages — the exact path samples 5–13× down-scaled crops with
    plain bilinear taps, which alias (measured: mean 3.3 levels on these photos). Other crops of
    the same photos (another seed) differ by far more, so the bound tells geometry apart."""
    ids = list(range(12))
    fast = local_fast(photo_folder, SPEC, 1, 0, ids).astype(int)
    exact = local_fast(photo_folder, {**SPEC, "decode": "exact"}, 1, 0, ids).astype(int)
    other_crops = local_fast(photo_folder, {**SPEC, "decode": "exact"}, 2, 0, ids).astype(int)
    assert np.abs(fast - exact).mean() < 5.0
    assert np.abs(other_crops - exact).mean() > 20.0
