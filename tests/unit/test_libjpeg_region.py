"""augserve's libjpeg-turbo region decoder (``augserve/sources/_libjpeg_region.c``) called directly: what it
returns and how it refuses. Its pixels against OpenCV's, file by file, are checked in test_decode_fast.py."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from augserve.sources.region_decoder import decode_scaled_region, scaled_region_decoder

libjpeg = scaled_region_decoder()
pytestmark = pytest.mark.skipif(libjpeg is None, reason="augserve was installed without its libjpeg region decoder")

HEIGHT, WIDTH = 120, 200


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    rng = np.random.default_rng(1)
    image = cv2.GaussianBlur(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8), (5, 5), 1.5)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])  # 4:2:0, 16×16 iMCUs
    assert ok
    return data.tobytes()


@pytest.mark.parametrize("denom", [1, 2, 4, 8])
def test_a_region_is_opencvs_scaled_decode_over_its_rows_and_columns(jpeg, denom):
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[denom]
    whole = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), flag), cv2.COLOR_BGR2RGB)
    height, width = whole.shape[:2]
    assert (height, width) == (-(-HEIGHT // denom), -(-WIDTH // denom))
    top, left, bottom, right = height // 3, width // 3, height - 1, width // 2 + 1
    data, col0, cols = libjpeg.decode(jpeg, 3, denom, top, left, bottom, right)
    assert isinstance(data, bytearray) and len(data) == (bottom - top) * cols * 3
    assert col0 <= left and col0 + cols >= right and col0 + cols <= width
    region = np.frombuffer(data, np.uint8).reshape(bottom - top, cols, 3)
    np.testing.assert_array_equal(region, whole[top:bottom, col0 : col0 + cols])
    # The wrapper: a writable array the caller owns, and the same first column.
    array, first = decode_scaled_region(jpeg, 3, denom, top, left, bottom, right)
    assert first == col0 and array.flags.writeable and array.flags.c_contiguous
    grey, _ = decode_scaled_region(jpeg, 1, denom, top, left, bottom, right)
    luma = cv2.imdecode(np.frombuffer(jpeg, np.uint8), {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}[denom])
    np.testing.assert_array_equal(grey, luma[top:bottom, first : first + grey.shape[1]])


def test_the_whole_image_and_a_single_pixel(jpeg):
    data, col0, cols = libjpeg.decode(jpeg, 3, 1, 0, 0, HEIGHT, WIDTH)
    assert (col0, cols) == (0, WIDTH) and len(data) == HEIGHT * WIDTH * 3
    data, col0, cols = libjpeg.decode(jpeg, 1, 1, HEIGHT - 1, WIDTH - 1, HEIGHT, WIDTH)
    assert col0 + cols == WIDTH and len(data) == cols


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((2, 1, 0, 0, 10, 10), "channels must be 1 or 3"),
        ((3, 3, 0, 0, 10, 10), "denom 1, 2, 4 or 8"),
        ((3, 1, 0, 0, HEIGHT + 1, 10), "not inside the 200 x 120 image"),
        ((3, 2, 0, 0, 10, WIDTH // 2 + 1), "not inside the 100 x 60 image"),
        ((3, 1, 5, 0, 5, 10), "rows \\[5, 5\\)"),
        ((3, 1, -1, 0, 5, 10), "not inside"),
    ],
)
def test_bad_arguments_are_one_clear_error(jpeg, args, message):
    with pytest.raises(ValueError, match=message):
        libjpeg.decode(jpeg, *args)


@pytest.mark.parametrize("raw", [b"", b"\xff\xd8" + b"\x17" * 300, b"not a jpeg at all"], ids=["empty", "garbage after magic", "text"])
def test_what_libjpeg_cannot_decode_is_a_value_error_and_the_wrapper_says_none(raw):
    with pytest.raises(ValueError, match="^libjpeg: "):
        libjpeg.decode(raw, 3, 1, 0, 0, 1, 1)
    assert decode_scaled_region(raw, 3, 1, 0, 0, 1, 1) is None


def test_a_file_libjpeg_warns_about_is_refused_not_decoded():
    """A restart marker out of sequence: libjpeg warns, resynchronises and would go on; the decoder
    refuses, so that OpenCV decides what such a file gives (as on the exact path)."""
    rng = np.random.default_rng(1)
    image = cv2.GaussianBlur(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8), (5, 5), 1.5)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_RST_INTERVAL, 2])
    assert ok
    broken = bytearray(data.tobytes())
    first_restart = broken.find(b"\xff\xd0")
    assert first_restart > 0
    broken[first_restart + 1] = 0xD5  # RST5 where RST0 belongs
    assert libjpeg.decode(data.tobytes(), 3, 1, 0, 0, HEIGHT, WIDTH)[1:] == (0, WIDTH)
    with pytest.raises(ValueError, match="^libjpeg: Corrupt JPEG data: found marker 0xd5 instead of RST0"):
        libjpeg.decode(bytes(broken), 3, 1, 0, 0, HEIGHT, WIDTH)
    assert decode_scaled_region(bytes(broken), 3, 1, 0, 0, HEIGHT, WIDTH) is None


def test_any_buffer_is_accepted(jpeg):
    expected = libjpeg.decode(jpeg, 3, 2, 3, 4, 20, 30)
    assert libjpeg.decode(bytearray(jpeg), 3, 2, 3, 4, 20, 30) == expected
    assert libjpeg.decode(memoryview(jpeg), 3, 2, 3, 4, 20, 30) == expected
    with pytest.raises(TypeError):
        libjpeg.decode("a string", 3, 2, 3, 4, 20, 30)
