"""Plan-aware decoding: ``read_encoded`` + ``decode_encoded`` against the exact ``read_image``.

Every fixture is written here (cv2, Pillow, numpy), none is committed. The rule checked for each:
the fast path raises ``CorruptImageError`` with the message ``read_image`` gives, or returns an
array whose placement covers the box and whose pixels are the exact decode's (max_factor 1, PNG,
BMP: equal; JPEG at 1/2, 1/4, 1/8: within ``MAD_BOUND`` of the exact decode reduced by
``cv2.INTER_AREA`` to the same grid). 12-bit and arithmetic-coded JPEGs are not covered: nothing
here writes them (OpenCV falls back to 8 bits, Pillow has no such encoder); the decoder hands
such files to OpenCV at any factor.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from augserve.sources import CorruptImageError, ImageFolder, SkipStats, open_dataset
from augserve.sources import decode
from augserve.sources.decode import EncodedImage, Placement, decode_encoded, read_encoded, read_image
from augserve.sources.headers import jpeg_frame, jpeg_header, jpeg_orientation, png_orientation
from augserve.sources.iterate import iter_encoded

# Mean absolute difference (uint8 levels) between a DCT-scaled decode and the exact decode reduced
# by INTER_AREA to the same grid, per box. Measured on these fixtures (textured photo, odd size,
# every orientation, grey, CMYK, progressive, 4:4:4, restart markers; 60 random boxes per factor):
# color at most 0.96 (mean 0.32–0.36) at 1/2, 1/4 and 1/8; grey at most 0.5. JPEGs with 4:2:2
# chroma (halved horizontally only) come out worse, because libjpeg's scaled decode does not filter
# their chroma as finely: at most 1.07 / 4.28 / 4.61 (mean 0.59 / 1.15 / 1.58) at 1/2, 1/4, 1/8.
# The bounds leave room for other libjpeg-turbo builds.
MAD_BOUND = {2: 1.5, 4: 1.5, 8: 1.5}
MAD_BOUND_422 = {2: 2.0, 4: 6.0, 8: 6.5}

WIDTH, HEIGHT = 203, 157  # not multiples of 8 or 16: partial blocks and MCUs at the edges


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(cv2.resize(skimage.data.chelsea(), (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA))


def _jpeg(image: np.ndarray, *params: int) -> bytes:
    ok, data = cv2.imencode(".jpg", image[:, :, ::-1] if image.ndim == 3 else image, [cv2.IMWRITE_JPEG_QUALITY, 90, *params])
    assert ok
    return data.tobytes()


def _pillow(image: np.ndarray, fmt: str, mode: str | None = None, orientation: int | None = None, **options) -> bytes:
    out = io.BytesIO()
    pil = Image.fromarray(image)
    if mode:
        pil = pil.convert(mode)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    pil.save(out, fmt, **options)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _good_files(photo: np.ndarray) -> dict[str, bytes]:
    grey = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    files = {
        "jpeg 4:2:0": _jpeg(photo),
        "jpeg 4:4:4": _jpeg(photo, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444),
        "jpeg 4:2:2": _jpeg(photo, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422),
        "jpeg progressive": _jpeg(photo, cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
        "jpeg restart markers": _jpeg(photo, cv2.IMWRITE_JPEG_RST_INTERVAL, 3),
        "jpeg grey": _jpeg(grey),
        "jpeg cmyk": _pillow(photo, "JPEG", "CMYK", quality=90),
        "png": cv2.imencode(".png", photo[:, :, ::-1])[1].tobytes(),
        "png 16-bit": cv2.imencode(".png", (photo[:, :, ::-1].astype(np.uint16) * 257))[1].tobytes(),
        "png grey+alpha": _pillow(np.dstack([grey, grey]), "PNG", "LA"),
        "png rgba": _pillow(np.dstack([photo, grey]), "PNG"),
        "bmp": cv2.imencode(".bmp", photo[:, :, ::-1])[1].tobytes(),
    }
    for orientation in range(1, 9):
        files[f"jpeg exif {orientation}"] = _pillow(photo, "JPEG", orientation=orientation, quality=90)
    files["jpeg grey exif 6"] = _pillow(grey, "JPEG", orientation=6, quality=90)
    files["png exif 6"] = _pillow(photo, "PNG", orientation=6)
    files["png exif 3 after IDAT"] = _png_exif_after_idat(files["png"], 3)
    return files


def _png_exif_after_idat(png: bytes, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return png[:-12] + _png_chunk(b"eXIf", exif.tobytes()[6:]) + png[-12:]  # before IEND


def _bad_files(photo: np.ndarray) -> dict[str, bytes]:
    jpeg = _jpeg(photo)
    sof = jpeg.find(b"\xff\xc0")
    scan = jpeg.find(b"\xff\xda")
    bad_length = bytearray(jpeg)
    bad_length[sof + 2 : sof + 4] = b"\x00\x03"  # a frame header too short for its components
    bad_components = bytearray(jpeg)
    bad_components[sof + 9] = 0  # zero components
    precision = bytearray(jpeg)
    precision[sof + 4] = 12  # claims 12-bit samples over 8-bit tables and data
    garbage_scan = bytearray(jpeg)
    garbage_scan[scan + 400 : scan + 480] = bytes(range(1, 81))  # entropy data scrambled mid-image
    middle = scan + (len(jpeg) - scan) * 3 // 4
    marker_in_scan = jpeg[:middle] + b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01" + jpeg[middle:]
    png = cv2.imencode(".png", photo[:, :, ::-1])[1].tobytes()
    bad_zlib = bytearray(png)
    idat = png.find(b"IDAT")
    bad_zlib[idat + 4 : idat + 40] = b"\x00" * 36
    return {
        "truncated jpeg": jpeg[: len(jpeg) // 2],
        "truncated jpeg (only EOI missing)": jpeg[:-2],
        "garbage after jpeg magic": b"\xff\xd8" + b"\x17" * 500,
        "jpeg bad SOF length": bytes(bad_length),
        "jpeg zero components": bytes(bad_components),
        "jpeg 12-bit precision claimed": bytes(precision),
        "jpeg garbage in scan": bytes(garbage_scan),
        "jpeg second frame header inside the scan": marker_in_scan,  # below most boxes: region decodes stop before it
        "jpeg empty size": jpeg[: sof + 5] + b"\x00\x00" + jpeg[sof + 7 :],
        "truncated png": png[: len(png) // 2],
        "png corrupt image data": bytes(bad_zlib),
        "bmp header cut": b"BM" + b"\x00" * 10,
        "empty": b"",
        "not an image": b"GIF89a" + b"\x00" * 64,
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory, photo) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("decode_fast")
    paths = {}
    for i, (name, data) in enumerate({**_good_files(photo), **_bad_files(photo)}.items()):
        path = folder / f"{i:02d}.{'png' if b'PNG' in data[:8] else 'jpg'}"
        path.write_bytes(data)
        paths[name] = path
    return paths


def _boxes(height: int, width: int, seed: int) -> list[tuple[float, float, float, float]]:
    """Random boxes, some poking out of the image, plus the whole image and a thin sliver."""
    rng = np.random.default_rng(seed)
    boxes = [(0.0, 0.0, float(width), float(height)), (width - 0.5, 3.25, width + 40.0, 9.75)]
    for _ in range(6):
        x0, x1 = sorted(rng.uniform(-20, width + 20, 2))
        y0, y1 = sorted(rng.uniform(-20, height + 20, 2))
        if min(x1, width) - max(x0, 0) >= 1 and min(y1, height) - max(y0, 0) >= 1:
            boxes.append((x0, y0, x1, y1))
    return boxes


def _exact(path: Path, channels: int) -> np.ndarray | str:
    try:
        return read_image(path, channels)
    except CorruptImageError as exc:
        return str(exc)


def _compare(array: np.ndarray, placement: Placement, exact: np.ndarray, box) -> float:
    """Check ``array``/``placement`` against the exact decode and the box; return the MAD (0 when exact)."""
    height, width = exact.shape[:2]
    f = placement.factor
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == exact.shape[2]
    assert array.flags.c_contiguous and array.flags.writeable
    x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)
    top, left = placement.top, placement.left
    bottom, right = top + f * array.shape[0], left + f * array.shape[1]
    assert top <= y0 and left <= x0 and bottom >= y1 and right >= x1, "the region does not cover the clipped box"
    # Nothing beyond the image but the partial edge block of a reduced decode.
    assert -f < top and -f < left and bottom < height + f and right < width + f
    if f == 1:
        assert top >= 0 and left >= 0
        np.testing.assert_array_equal(array, exact[top:bottom, left:right])
        return 0.0
    # Pixels whose square lies wholly inside the image, against the exact decode averaged over it.
    i0, j0 = -(-max(-top, 0) // f), -(-max(-left, 0) // f)
    i1, j1 = (height - top) // f, (width - left) // f
    i1, j1 = min(i1, array.shape[0]), min(j1, array.shape[1])
    if i1 <= i0 or j1 <= j0:
        return 0.0
    region = exact[top + f * i0 : top + f * i1, left + f * j0 : left + f * j1]
    reference = cv2.resize(region, (j1 - j0, i1 - i0), interpolation=cv2.INTER_AREA).reshape(i1 - i0, j1 - j0, -1)
    return float(np.abs(array[i0:i1, j0:j1].astype(np.int16) - reference).mean())


def _names() -> tuple[list[str], list[str]]:
    """The fixture names, for parametrization (the files themselves are written once per module)."""
    dummy = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    dummy[::7, ::5] = 255
    return list(_good_files(dummy)), list(_bad_files(dummy))


GOOD_NAMES, BAD_NAMES = _names()


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", GOOD_NAMES + BAD_NAMES)
def test_fast_decode_matches_the_exact_one(files, name, channels):
    path = files[name]
    exact = _exact(path, channels)
    try:
        encoded = read_encoded(path)
    except CorruptImageError as exc:
        assert str(exc) == exact, "read_encoded refused a file read_image accepts, or with another reason"
        return
    if isinstance(exact, str):  # refused only when decoded: every box and factor must say the same
        for max_factor in (1, 2, 4):
            with pytest.raises(CorruptImageError) as info:
                decode_encoded(encoded, channels, (1, 1, 30, 20), max_factor=max_factor)
            assert str(info.value) == exact
        return
    assert (encoded.height, encoded.width) == exact.shape[:2]
    whole, placement = decode_encoded(encoded, channels)
    assert placement == Placement(1, 0, 0)
    np.testing.assert_array_equal(whole, exact)
    for max_factor in (1, 2, 4, 8):
        for box in _boxes(encoded.height, encoded.width, seed=max_factor):
            array, placement = decode_encoded(encoded, channels, box, max_factor=max_factor)
            # A JPEG at the factor asked for, or at full scale where decoding just the box is cheaper.
            assert placement.factor in ((max_factor, 1) if encoded.kind == "jpeg" else (1,))
            mad = _compare(array, placement, exact, box)
            if placement.factor == 1:
                assert mad == 0, (name, box, placement, mad)  # full scale: the exact decode's pixels
            if placement.factor > 1 and name in GOOD_NAMES:  # a corrupt file's garbage scales as it may
                bound = (MAD_BOUND_422 if "4:2:2" in name else MAD_BOUND)[placement.factor]
                assert mad <= bound, (name, box, placement, mad)
    # Deterministic: the same call gives the same bytes.
    box = _boxes(encoded.height, encoded.width, seed=11)[-1]
    first, p1 = decode_encoded(encoded, channels, box, max_factor=2)
    second, p2 = decode_encoded(encoded, channels, box, max_factor=2)
    assert p1 == p2 and first.tobytes() == second.tobytes()


def _opencv_only(monkeypatch) -> None:
    monkeypatch.setattr(decode, "scaled_region_decoder", lambda: None)
    monkeypatch.setattr(decode, "region_decoder", lambda: None)


def _overlap(wide: tuple[np.ndarray, Placement], narrow: tuple[np.ndarray, Placement]) -> np.ndarray:
    """The part of ``wide``'s array that lies where ``narrow``'s does (both on the same 1/f grid)."""
    (array, outer), (inner_array, inner) = wide, narrow
    f = outer.factor
    assert inner.factor == f and (inner.top - outer.top) % f == 0 and (inner.left - outer.left) % f == 0
    i, j = (inner.top - outer.top) // f, (inner.left - outer.left) // f
    assert i >= 0 and j >= 0 and i + inner_array.shape[0] <= array.shape[0] and j + inner_array.shape[1] <= array.shape[1]
    return array[i : i + inner_array.shape[0], j : j + inner_array.shape[1]]


@pytest.mark.skipif(decode.scaled_region_decoder() is None, reason="augserve was installed without its libjpeg region decoder")
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", GOOD_NAMES + BAD_NAMES)
def test_scaled_region_decoder_gives_opencvs_pixels_at_each_scale(files, name, channels, monkeypatch):
    """augserve's libjpeg region decoder against OpenCV's decode at the same DCT scale: the same pixels
    over the box (its region may be a few columns wider), the same refusals, every orientation."""
    try:
        encoded = read_encoded(files[name])
    except CorruptImageError:
        return  # refused before decoding: no decoder is involved
    for max_factor in (1, 2, 4, 8):
        for box in _boxes(encoded.height, encoded.width, seed=20 + max_factor)[1:]:
            try:
                ours = decode_encoded(encoded, channels, box, max_factor=max_factor)
            except CorruptImageError as exc:
                ours = str(exc)
            with monkeypatch.context() as patch:
                _opencv_only(patch)
                try:
                    theirs = decode_encoded(encoded, channels, box, max_factor=max_factor)
                except CorruptImageError as exc:
                    theirs = str(exc)
            if isinstance(theirs, str) or isinstance(ours, str):
                assert ours == theirs, (name, box, max_factor)
                continue
            assert ours[1].factor == theirs[1].factor, (name, box, max_factor)
            np.testing.assert_array_equal(_overlap(ours, theirs), theirs[0], err_msg=f"{name} {box} 1/{max_factor}")


def test_header_size_is_the_oriented_size(files):
    for name in GOOD_NAMES:
        encoded = read_encoded(files[name])
        assert (encoded.height, encoded.width) == read_image(files[name]).shape[:2], name
        expected = int(name.split()[-1]) if "exif" in name and "after" not in name else 3 if "after" in name else 1
        assert encoded.orientation == expected, name
        assert encoded.kind == ("jpeg" if name.startswith("jpeg") else name.split()[0])


def test_read_image_is_opencvs_decode(files):
    """read_image still equals cv2.imdecode (orientation applied by OpenCV) + BGR→RGB, byte for byte."""
    for name in GOOD_NAMES:
        raw = np.fromfile(files[name], np.uint8)
        color = cv2.cvtColor(cv2.imdecode(raw, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        grey = cv2.imdecode(raw, cv2.IMREAD_GRAYSCALE)[:, :, None]
        assert read_image(files[name], 3).tobytes() == color.tobytes(), name
        assert read_image(files[name], 1).tobytes() == grey.tobytes(), name


def test_box_outside_and_argument_errors(files, monkeypatch):
    encoded = read_encoded(files["jpeg exif 6"])
    assert (encoded.height, encoded.width) == (WIDTH, HEIGHT)
    array, placement = decode_encoded(encoded, 3, (-50, -50, 10, 20))
    assert placement == Placement(1, 0, 0) and array.shape == (20, 10, 3)  # clipped to the image
    corner = (HEIGHT - 3, WIDTH - 2, HEIGHT + 100, WIDTH + 100)
    array, placement = decode_encoded(encoded, 3, corner, max_factor=1)
    # Clipped to the image's corner; a region decoder may hand out a few more stored columns (rows here).
    assert placement.top <= WIDTH - 2 and placement.left == HEIGHT - 3 and array.shape[1:] == (3, 3)
    assert placement.top + array.shape[0] == WIDTH
    _opencv_only(monkeypatch)
    array, placement = decode_encoded(encoded, 3, corner, max_factor=1)
    assert array.shape == (2, 3, 3) and (placement.top, placement.left) == (WIDTH - 2, HEIGHT - 3)
    for factor in (0, 3, 16, True, 2.0, "2"):
        with pytest.raises(ValueError, match="max_factor"):
            decode_encoded(encoded, 3, None, max_factor=factor)
    with pytest.raises(ValueError, match="does not overlap"):
        decode_encoded(encoded, 3, (HEIGHT + 1, 0, HEIGHT + 5, 10))
    with pytest.raises(ValueError, match="x0 < x1"):
        decode_encoded(encoded, 3, (10, 10, 10, 20))
    with pytest.raises(ValueError, match="finite"):
        decode_encoded(encoded, 3, (0, 0, float("nan"), 20))
    with pytest.raises(TypeError, match="four numbers"):
        decode_encoded(encoded, 3, (0, 0, 5))
    with pytest.raises(ValueError, match="channels"):
        decode_encoded(encoded, 2)
    assert "bytes" in repr(encoded) and str(encoded.raw[:4]) not in repr(encoded)


def test_pixel_cap_and_file_checks_come_from_read_encoded(tmp_path, files, monkeypatch):
    with pytest.raises(CorruptImageError, match=f"{WIDTH}×{HEIGHT} image .* exceeds max_pixels=100"):
        read_encoded(files["jpeg 4:2:0"], max_pixels=100)

    def never(*args, **kwargs):
        raise AssertionError("decoded while only reading")

    monkeypatch.setattr(decode.cv2, "imdecode", never)
    assert read_encoded(files["png"]).kind == "png"  # no decoder runs in read_encoded


def test_region_decoders_fall_back_to_opencv(files, monkeypatch):
    """Without augserve's libjpeg decoder, nvImageCodec decodes the box at full scale; without either
    (or when they fail), the same pixels come from OpenCV."""
    encoded = read_encoded(files["jpeg exif 8"])
    box = (10.5, 20.25, 90.0, 61.0)
    monkeypatch.setattr(decode, "scaled_region_decoder", lambda: None)
    nvimgcodec = decode_encoded(encoded, 3, box)
    monkeypatch.setattr(decode, "region_decoder", lambda: None)
    opencv = decode_encoded(encoded, 3, box)
    assert nvimgcodec[1] == opencv[1] and nvimgcodec[0].tobytes() == opencv[0].tobytes()


def _exif_blob(rng: np.random.Generator) -> bytes:
    from PIL import TiffImagePlugin

    exif = Image.Exif()
    tags = {0x010F: "Make", 0x0110: "Model", 0x0132: "2024:01:01 00:00:00", 0x011A: TiffImagePlugin.IFDRational(72, 1), 0x0128: 2}
    for tag in rng.permutation(list(tags))[: rng.integers(0, len(tags) + 1)]:
        exif[int(tag)] = tags[int(tag)]
    exif[0x0112] = int(rng.integers(0, 10))
    blob = bytearray(exif.tobytes()[6:])
    for _ in range(rng.integers(0, 3)):  # damage a few bytes
        blob[rng.integers(0, len(blob))] = rng.integers(0, 256)
    return bytes(blob)


def _applied_orientation(raw: bytes) -> int | None:
    """The orientation OpenCV applied when decoding ``raw`` (None when it cannot decode it)."""
    data = np.frombuffer(raw, np.uint8)
    oriented = cv2.imdecode(data, cv2.IMREAD_COLOR)
    stored = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if oriented is None:
        return None
    for orientation, (transpose, flip_rows, flip_cols) in decode._ORIENTATIONS.items():
        candidate = stored.transpose(1, 0, 2) if transpose else stored
        candidate = candidate[::-1] if flip_rows else candidate
        candidate = candidate[:, ::-1] if flip_cols else candidate
        if candidate.shape == oriented.shape and (candidate == oriented).all():
            return orientation
    return -1


def test_exif_orientation_agrees_with_opencv_on_damaged_metadata():
    """Our header parser must find the orientation OpenCV applies, or sizes and pixels would differ."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)  # no symmetry: every orientation differs
    jpeg = _pillow(pixels, "JPEG", quality=80)
    png = _pillow(pixels, "PNG")
    for _ in range(60):
        segments = b""
        for _ in range(1 + (rng.random() < 0.2)):  # sometimes two EXIF segments
            payload = b"Exif\x00\x00" + _exif_blob(rng)
            segments += b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
        raw = jpeg[:2] + segments + jpeg[2:]
        assert jpeg_orientation(raw) == _applied_orientation(raw), raw[:80].hex()
        assert jpeg_header(raw) == (jpeg_frame(raw), jpeg_orientation(raw))  # the one walk read_encoded takes
        chunk = _png_chunk(b"eXIf", _exif_blob(rng))
        if rng.random() < 0.2:
            chunk = chunk[:-1] + bytes([chunk[-1] ^ 1])  # bad CRC: libpng drops the chunk
        raw = png[:33] + chunk + png[33:] if rng.random() < 0.5 else png[:-12] + chunk + png[-12:]
        assert png_orientation(raw) == _applied_orientation(raw), raw[:80].hex()


# --- sources ------------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path, photo) -> Path:
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat" / "a.jpg").write_bytes(_pillow(photo, "JPEG", orientation=6, quality=90))
    (tmp_path / "cat" / "b.png").write_bytes(cv2.imencode(".png", photo)[1].tobytes())
    (tmp_path / "dog" / "c.jpg").write_bytes(_jpeg(photo)[:-200])  # truncated
    (tmp_path / "dog" / "d.bmp").write_bytes(cv2.imencode(".bmp", photo)[1].tobytes())
    return tmp_path


@pytest.mark.parametrize("channels", [3, 1])
def test_image_folder_load_encoded_and_decode(folder, channels):
    source = ImageFolder(folder, channels=channels)
    encoded = source.load_encoded(0)
    assert isinstance(encoded, EncodedImage) and encoded.orientation == 6 and (encoded.height, encoded.width) == (WIDTH, HEIGHT)
    array, placement = source.decode(encoded)
    np.testing.assert_array_equal(array, source.load(0))
    assert array.shape[2] == channels and placement == Placement(1, 0, 0)
    crop, placement = source.decode(encoded, (10, 20, 110, 140), max_factor=2)
    assert placement.factor in (1, 2) and crop.shape[2] == channels
    with pytest.raises(IndexError, match="out of range"):
        source.load_encoded(len(source))
    with pytest.raises(TypeError, match="integer"):
        source.load_encoded(1.5)
    with pytest.raises(CorruptImageError, match="truncated JPEG"):
        source.load_encoded(2)


def test_image_folder_max_pixels_applies_to_load_encoded(folder):
    source = ImageFolder(folder, max_pixels=1000)
    with pytest.raises(CorruptImageError, match="exceeds max_pixels=1000"):
        source.load_encoded(0)


def test_array_sources_have_no_encoded_images():
    source = open_dataset("digits")
    assert source.load_encoded(0) is None
    with pytest.raises(IndexError):
        source.load_encoded(len(source))
    with pytest.raises(NotImplementedError, match="decoded arrays"):
        source.decode(None)


def test_iter_encoded_skips_raises_and_counts(folder, caplog):
    source = ImageFolder(folder)
    stats = SkipStats()
    items = list(iter_encoded(source, on_error="skip", stats=stats))
    assert [(i, label) for i, _e, label in items] == [(0, 0), (1, 0), (3, 1)]
    assert all(isinstance(e, EncodedImage) for _i, e, _l in items)
    assert stats.skipped == 1 and stats.paths == [str(folder / "dog" / "c.jpg")]
    assert "skipping" in caplog.text and "c.jpg" in caplog.text
    with pytest.raises(CorruptImageError, match="c.jpg"):
        list(iter_encoded(source, [3, 2], on_error="raise"))
    with pytest.raises(ValueError, match="on_error"):
        iter_encoded(source, on_error="ignore")
    with pytest.raises(TypeError, match="SkipStats"):
        iter_encoded(source, stats={})
    assert [e for _i, e, _l in iter_encoded(open_dataset("digits"), [0, 1])] == [None, None]


def test_decoder_bench_runs_and_formats():
    from augserve.bench.decoders import format_table, run_decoders

    result = run_decoders(photos=1, rounds=1, boxes_per_photo=1)
    names = {row["candidate"] for row in result["rows"]}
    assert {"cv2 full (exact)", "cv2 reduced", "decode_encoded"} <= names
    exact = [row for row in result["rows"] if row["candidate"] == "decode_encoded"]
    assert all(row["mad"] < 1.5 for row in exact)
    table = format_table(result)
    assert table.count("\n| 1600×1200 |") == table.count("\n| 500×375 |") > 0


def _decode_in_child(path):
    encoded = read_encoded(path)
    return decode_encoded(encoded, 3, (10.0, 20.0, 90.0, 61.0))[0].tobytes()


def test_a_forked_child_decodes_regions_with_its_own_decoder(files):
    """Workers are forked from a parent that may have decoded already: the child makes its own
    region decoder (the parent's threads do not exist there) and gets the same bytes."""
    import multiprocessing

    path = files["jpeg exif 8"]
    here = _decode_in_child(path)  # the parent's decoder exists now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        there = pool.apply(_decode_in_child, (path,))
    assert there == here


@pytest.mark.parametrize("decoders", ["nvimgcodec and OpenCV", "OpenCV only"])
def test_fast_pipeline_gives_the_same_bytes_whichever_decoders_are_installed(decoders, monkeypatch):
    """``decode: fast`` chooses the scale from the plan, never from the decoder: a worker with augserve's
    libjpeg decoder, one with only nvImageCodec and one with only OpenCV deliver the same batch."""
    import pipelines
    from augserve.bench.decoders import make_photos

    files = make_photos(2, seed=3)  # 1600×1200 and 500×375 JPEGs
    spec = {"ops": [{"op": "random_resized_crop", "size": 224, "scale": [0.08, 1.0]}, {"op": "mirror"}]}
    pipeline = pipelines.build(spec)
    shapes = [(f.height, f.width, 3) for f in files]
    factors = []

    def decode_file(index, box, max_factor):
        array, placement = decode_encoded(files[index], 3, box, max_factor)
        factors.append(placement.factor)
        return array, (placement.factor, placement.top, placement.left)

    ours = pipeline.run_decoding(shapes, decode_file, seed=5).numpy()
    with monkeypatch.context() as patch:
        patch.setattr(decode, "scaled_region_decoder", lambda: None)
        if decoders == "OpenCV only":
            patch.setattr(decode, "region_decoder", lambda: None)
        theirs = pipeline.run_decoding(shapes, decode_file, seed=5).numpy()
    assert any(f > 1 for f in factors[: len(files)]), "no box was reduced: the test would not compare scaled decodes"
    assert factors[: len(files)] == factors[len(files) :]
    np.testing.assert_array_equal(ours, theirs)


_SEGMENTS = st.sampled_from([
    b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00",  # APP0
    b"\xff\xc0\x00\x11\x08\x00\x20\x00\x30\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01",  # baseline SOF, 48×32
    b"\xff\xc2\x00\x0b\x08\x00\x10\x00\x10\x01\x01\x11\x00",  # progressive grey SOF, 16×16
    b"\xff\xe1\x00\x22Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00",  # EXIF 6
    b"\xff\xe1\x00\x22Exif\x00\x00II\x2a\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x09\x00\x00\x00\x00\x00\x00\x00",  # EXIF 9: out of range
    b"\xff\xe1\x00\x08Exif",  # an APP1 too short for EXIF
    b"\xff\xdb\x00\x04\x00\x00",  # a tiny DQT
    b"\xff\xff\xff", b"\x00\x13",  # fill bytes, stray bytes
    b"\xff\xd0",  # a marker without a length
    b"\xff\xe2\x00\x01",  # a length below 2
    b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00",  # start of scan
    b"\xff\xd9",  # end of image
    b"\xff\xe3\x40\x00",  # a length past the end
])


@settings(max_examples=600, deadline=None)
@given(st.lists(_SEGMENTS, max_size=8))
def test_one_walk_over_a_jpeg_header_reads_what_the_two_walks_read(segments):
    """``jpeg_header`` (read_encoded's one walk) gives ``jpeg_frame``'s frame or its very error, and
    ``jpeg_orientation``'s orientation, on headers of every shape: frames before and after EXIF, two of
    each, short or bad lengths, headers cut anywhere, scans before the frame."""
    raw = b"\xff\xd8" + b"".join(segments)
    try:
        expected = (jpeg_frame(raw), jpeg_orientation(raw))
    except ValueError as exc:
        with pytest.raises(ValueError) as info:
            jpeg_header(raw)
        assert str(info.value) == str(exc)
        return
    assert jpeg_header(raw) == expected
