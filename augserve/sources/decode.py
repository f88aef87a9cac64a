"""Decoding image files (JPEG, PNG, BMP) into uint8 HWC arrays with OpenCV.

Before anything is decoded, the image's width and height are read from its header (parsed here,
without any decoder) and checked against a pixel cap, so a corrupt or hostile file announcing
60000 × 60000 pixels is refused instead of making the process allocate gigabytes. Only JPEG, PNG
and BMP content is decoded, whatever the file is called: OpenCV would also decode TIFF, WebP, EXR
and more, whose sizes this module does not check. PIL is not used, so its decompression-bomb
warning and error never occur on this path.
"""

from __future__ import annotations

import os
import stat

import cv2
import numpy as np

from .base import check_max_pixels
from .errors import CorruptImageError

_JPEG_MAGIC = b"\xff\xd8"
_JPEG_SOS = b"\xff\xda"  # start of scan: entropy-coded data follows
_JPEG_EOI = b"\xff\xd9"  # end of image
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"  # the final chunk's type and its fixed CRC
_BMP_MAGIC = b"BM"

# Start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# A compressed image file is never larger than this many bytes per allowed pixel (16-bit RGBA PNG
# stored without compression needs 8) plus room for metadata; anything bigger is not read.
_MAX_BYTES_PER_PIXEL = 16
_METADATA_ALLOWANCE = 1 << 20


def _truncation(raw: bytes) -> str | None:
    """Why ``raw`` is a cut-off JPEG/PNG, or None.

    Some libjpeg builds behind OpenCV decode a truncated JPEG with only a warning and return grey
    filler for the missing rows, so an incomplete file would silently train as a valid image.
    Inside entropy-coded data a 0xFF byte is always stuffed (FF 00), so an end-of-image marker after
    the last start-of-scan is a reliable sign that the file is complete.
    """
    if raw.startswith(_JPEG_MAGIC):
        if raw.rfind(_JPEG_EOI) <= raw.rfind(_JPEG_SOS):
            return "truncated JPEG: no end-of-image marker"
    elif raw.startswith(_PNG_MAGIC) and _PNG_IEND not in raw:
        return "truncated PNG: no IEND chunk"
    return None


def _jpeg_size(raw: bytes) -> tuple[int, int]:
    i = len(_JPEG_MAGIC)
    while True:
        i = raw.find(b"\xff", i)  # libjpeg, too, skips stray bytes between segments
        if i < 0:
            raise ValueError("JPEG header ends before its frame header")
        while i < len(raw) and raw[i] == 0xFF:  # fill bytes
            i += 1
        if i >= len(raw):
            raise ValueError("JPEG header ends before its frame header")
        marker = raw[i]
        i += 1
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            continue
        if marker in (0xD9, 0xDA):
            raise ValueError("JPEG has no frame header before its image data")
        if i + 7 > len(raw):
            raise ValueError("JPEG header ends before its frame header")
        if marker in _JPEG_SOF:
            # length (2), sample precision (1), height (2), width (2)
            return int.from_bytes(raw[i + 3 : i + 5], "big"), int.from_bytes(raw[i + 5 : i + 7], "big")
        length = int.from_bytes(raw[i : i + 2], "big")
        if length < 2:
            raise ValueError(f"JPEG segment FF{marker:02X} has invalid length {length}")
        i += length


def image_size(raw: bytes) -> tuple[int, int]:
    """``(height, width)`` in pixels announced by the header of a JPEG, PNG or BMP file's bytes.

    Reads only the header; nothing is decoded. Raises ValueError with the reason for content that
    is none of the three formats, a header that is cut short, or a zero width or height.
    """
    if raw.startswith(_JPEG_MAGIC):
        height, width = _jpeg_size(raw)
    elif raw.startswith(_PNG_MAGIC):
        if len(raw) < 24 or raw[12:16] != b"IHDR":
            raise ValueError("PNG does not start with an IHDR chunk")
        width, height = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    elif raw.startswith(_BMP_MAGIC) and len(raw) >= 18:
        info_size = int.from_bytes(raw[14:18], "little")
        if info_size == 12 and len(raw) >= 22:  # OS/2 BITMAPCOREHEADER: unsigned 16-bit sizes
            width, height = int.from_bytes(raw[18:20], "little"), int.from_bytes(raw[20:22], "little")
        elif info_size >= 16 and len(raw) >= 26:
            width = int.from_bytes(raw[18:22], "little", signed=True)
            height = abs(int.from_bytes(raw[22:26], "little", signed=True))  # negative: top-down rows
        else:
            raise ValueError("BMP header is cut short or of an unknown kind")
    else:
        raise ValueError("not a JPEG, PNG or BMP file")
    if width <= 0 or height <= 0:
        raise ValueError(f"header gives an empty {width}×{height} image")
    return height, width


def _read_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    # O_NONBLOCK: opening a FIFO (or a device) named like an image must not wait for a writer;
    # the regular-file check below then refuses it. It changes nothing for regular files.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    with open(os.open(path, flags), "rb", closefd=True) as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CorruptImageError(path, "not a regular file")
        if info.st_size > max_bytes:
            raise CorruptImageError(path, f"file of {info.st_size} bytes is too large for an image of the allowed size")
        return f.read(max_bytes + 1)


def read_image(path: str | os.PathLike, channels: int = 3, max_pixels: int | None = None) -> np.ndarray:
    """Decode the image file at ``path``.

    Returns uint8, HWC, C-contiguous: RGB (H, W, 3) for ``channels=3`` (grey files are replicated to
    three channels), grey (H, W, 1) for ``channels=1``. EXIF orientation is applied, alpha dropped
    and 16-bit files scaled to 8 bits, as OpenCV does by default.

    ``max_pixels`` caps height × width (None: ``base.DEFAULT_MAX_PIXELS``, 8192 × 8192); a larger
    image is refused from its header, before any decoding, as is a file too large to hold an image
    of at most that size.
    Raises ``CorruptImageError`` naming ``path`` when the file cannot be read or decoded, is not
    a regular file, is not JPEG/PNG/BMP content, or is over the cap.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    cap = check_max_pixels(max_pixels)
    try:
        # Our own read + imdecode instead of cv2.imread: imread cannot open non-ASCII paths on
        # Windows, reports every failure as a bare None and would decode before we see the size.
        raw = _read_file(path, cap * _MAX_BYTES_PER_PIXEL + _METADATA_ALLOWANCE)
    except OSError as exc:
        raise CorruptImageError(path, exc.strerror or str(exc)) from exc
    if not raw:
        raise CorruptImageError(path, "empty file")
    try:
        height, width = image_size(raw)
    except ValueError as exc:
        raise CorruptImageError(path, str(exc)) from None
    if height * width > cap:
        raise CorruptImageError(path, f"{width}×{height} image ({width * height} pixels) exceeds max_pixels={cap}")
    reason = _truncation(raw)
    if reason:
        raise CorruptImageError(path, reason)
    data = np.frombuffer(raw, dtype=np.uint8)
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    try:
        image = cv2.imdecode(data, flag)
    except cv2.error as exc:
        raise CorruptImageError(path, str(exc).strip().splitlines()[-1]) from exc
    if image is None:
        raise CorruptImageError(path, "not a decodable JPEG/PNG/BMP image")
    if channels == 1:
        return np.ascontiguousarray(image.reshape(image.shape[0], image.shape[1], 1))
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # OpenCV decodes to BGR
