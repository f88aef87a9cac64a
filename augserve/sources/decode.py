"""Decoding image files (JPEG, PNG, BMP) into uint8 HWC arrays with OpenCV."""

from __future__ import annotations

import os

import cv2
import numpy as np

from .errors import CorruptImageError

_JPEG_MAGIC = b"\xff\xd8"
_JPEG_SOS = b"\xff\xda"  # start of scan: entropy-coded data follows
_JPEG_EOI = b"\xff\xd9"  # end of image
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"  # the final chunk's type and its fixed CRC


def _truncation(data: np.ndarray) -> str | None:
    """Why ``data`` is a cut-off JPEG/PNG, or None.

    Some libjpeg builds behind OpenCV decode a truncated JPEG with only a warning and return grey
    filler for the missing rows, so an incomplete file would silently train as a valid image.
    Inside entropy-coded data a 0xFF byte is always stuffed (FF 00), so an end-of-image marker after
    the last start-of-scan is a reliable sign that the file is complete.
    """
    raw = data.tobytes()
    if raw.startswith(_JPEG_MAGIC):
        if raw.rfind(_JPEG_EOI) <= raw.rfind(_JPEG_SOS):
            return "truncated JPEG: no end-of-image marker"
    elif raw.startswith(_PNG_MAGIC) and _PNG_IEND not in raw:
        return "truncated PNG: no IEND chunk"
    return None


def read_image(path: str | os.PathLike, channels: int = 3) -> np.ndarray:
    """Decode the image file at ``path``.

    Returns uint8, HWC, C-contiguous: RGB (H, W, 3) for ``channels=3`` (grey files are replicated to
    three channels), grey (H, W, 1) for ``channels=1``. EXIF orientation is applied, alpha dropped
    and 16-bit files scaled to 8 bits, as OpenCV does by default.
    Raises ``CorruptImageError`` naming ``path`` when the file cannot be read or decoded.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    try:
        # np.fromfile + imdecode instead of cv2.imread: imread cannot open non-ASCII paths on Windows
        # and reports every failure as a bare None.
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise CorruptImageError(path, exc.strerror or str(exc)) from exc
    if data.size == 0:
        raise CorruptImageError(path, "empty file")
    reason = _truncation(data)
    if reason:
        raise CorruptImageError(path, reason)
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
