"""What JPEG, PNG and BMP files announce before their pixels: size, JPEG frame, EXIF orientation.

Nothing here decodes an image. ``image_size`` refuses content that is none of the three formats or
whose header is cut short (ValueError with the reason); the EXIF orientation is read leniently,
as OpenCV does: metadata that cannot be parsed means "no orientation" (1), never an error.

The orientation is found where OpenCV's decoders find it, so that the size this module announces
after orientation is the size ``cv2.imdecode`` returns:

- JPEG: the APP1 segments that start with ``Exif\\0\\0`` (before the first start-of-scan); OpenCV
  keeps the first value it reads, so a later segment only counts when earlier ones had none;
- PNG: the first ``eXIf`` chunk (anywhere before IEND) whose CRC holds and whose data starts with
  ``II`` or ``MM``, as libpng accepts it;
- the TIFF structure inside is read like OpenCV's ``ExifReader``: byte order ``II`` (little-endian)
  or anything else (big-endian), tag mark 42, then the entries of IFD0 in order; the orientation
  tag's 16-bit value is read whatever its declared type; an entry that points outside the data
  ends the directory, keeping what was read before it. Values outside 1..8 mean no change.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

JPEG_MAGIC = b"\xff\xd8"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BMP_MAGIC = b"BM"

# Start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_APP1 = 0xE1
_EXIF_PREFIX = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112

# IFD0 tags OpenCV's ExifReader parses, by how many bytes of the data they reach through their
# value: strings read ``count`` bytes at their offset; the rest read rationals (8 bytes each).
_STRING_TAGS = frozenset({0x010E, 0x010F, 0x0110, 0x0131, 0x0132, 0x8298})
_RATIONAL_TAGS = {0x011A: 1, 0x011B: 1, 0x013E: 2, 0x013F: 6, 0x0211: 3, 0x0214: 6}


@dataclass(frozen=True)
class JpegFrame:
    """A JPEG's start-of-frame header: size in pixels as stored (before EXIF orientation), sample
    precision in bits, number of components and the SOF marker (0xC0 baseline, 0xC1 extended,
    0xC2 progressive, 0xC3 lossless, 0xC9.. arithmetic-coded)."""

    height: int
    width: int
    precision: int
    components: int
    marker: int


def _segments(raw: bytes, strict: bool):
    """Yield ``(marker, start, length)`` of each JPEG segment with a length field, until a
    start-of-scan or end-of-image marker; ``start`` is the index of the length field.

    ``strict``: raise ValueError where the header is cut short or a length is invalid (the reasons
    ``image_size`` gives), instead of stopping quietly.
    """
    i = len(JPEG_MAGIC)
    while True:
        i = raw.find(b"\xff", i)  # libjpeg, too, skips stray bytes between segments
        if i < 0:
            break
        while i < len(raw) and raw[i] == 0xFF:  # fill bytes
            i += 1
        if i >= len(raw):
            break
        marker = raw[i]
        i += 1
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            continue
        if marker in (0xD9, 0xDA):
            if strict:
                raise ValueError("JPEG has no frame header before its image data")
            return
        if i + 7 > len(raw):
            break
        length = int.from_bytes(raw[i : i + 2], "big")
        if length < 2 and marker not in _JPEG_SOF:
            if strict:
                raise ValueError(f"JPEG segment FF{marker:02X} has invalid length {length}")
            return
        yield marker, i, length
        i += length
    if strict:
        raise ValueError("JPEG header ends before its frame header")


def _frame_at(raw: bytes, marker: int, i: int) -> JpegFrame:
    # length (2), sample precision (1), height (2), width (2), components (1)
    components = raw[i + 7] if i + 7 < len(raw) else 0
    return JpegFrame(int.from_bytes(raw[i + 3 : i + 5], "big"), int.from_bytes(raw[i + 5 : i + 7], "big"), raw[i + 2], components, marker)


def _exif_orientation_at(raw: bytes, marker: int, i: int, length: int) -> int | None:
    """The orientation in the segment at ``i`` when it is an EXIF APP1 that has one (out-of-range
    values mean 1), else None."""
    if marker == _APP1 and length > 2 + len(_EXIF_PREFIX) and raw[i + 2 : i + 8] == _EXIF_PREFIX:
        value = tiff_orientation(memoryview(raw)[i + 8 : i + length])
        if value is not None:
            return value if 1 <= value <= 8 else 1
    return None


def jpeg_frame(raw: bytes) -> JpegFrame:
    """The first start-of-frame header of the JPEG ``raw``; ValueError when there is none."""
    for marker, i, _length in _segments(raw, strict=True):
        if marker in _JPEG_SOF:
            return _frame_at(raw, marker, i)
    raise AssertionError("unreachable: strict _segments raises when it runs out")  # pragma: no cover


def jpeg_header(raw: bytes) -> tuple[JpegFrame, int]:
    """:func:`jpeg_frame` and :func:`jpeg_orientation` of the JPEG ``raw`` in one walk over its
    segments (reading a file walked them twice, then once more to check the frame before decoding):
    the frame's ValueError when it has none, else the frame and the orientation, exactly as the two
    functions give them. The walk is the strict one; once the frame is found, where it would raise is
    where the lenient walk of the orientation stops."""
    frame = orientation = None
    try:
        for marker, i, length in _segments(raw, strict=True):
            if frame is None and marker in _JPEG_SOF:
                frame = _frame_at(raw, marker, i)
            elif orientation is None:
                orientation = _exif_orientation_at(raw, marker, i, length)
    except ValueError:
        if frame is None:
            raise
    return frame, 1 if orientation is None else orientation


def image_size(raw: bytes) -> tuple[int, int]:
    """``(height, width)`` in pixels announced by the header of a JPEG, PNG or BMP file's bytes,
    as stored (before any EXIF orientation).

    Reads only the header; nothing is decoded. Raises ValueError with the reason for content that
    is none of the three formats, a header that is cut short, or a zero width or height.
    """
    if raw.startswith(JPEG_MAGIC):
        frame = jpeg_frame(raw)
        height, width = frame.height, frame.width
    elif raw.startswith(PNG_MAGIC):
        if len(raw) < 24 or raw[12:16] != b"IHDR":
            raise ValueError("PNG does not start with an IHDR chunk")
        width, height = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    elif raw.startswith(BMP_MAGIC) and len(raw) >= 18:
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
    return checked_size(height, width)


def checked_size(height: int, width: int) -> tuple[int, int]:
    """``(height, width)``; ValueError for a header that announces no pixels."""
    if width <= 0 or height <= 0:
        raise ValueError(f"header gives an empty {width}×{height} image")
    return height, width


def tiff_orientation(data: bytes | memoryview) -> int | None:
    """The orientation value in IFD0 of a TIFF structure (EXIF payload), or None when absent.

    Follows OpenCV's ExifReader (see the module docstring), so the value may be outside 1..8.
    """
    little = len(data) > 1 and data[0] == data[1] == 0x49  # "II"; anything else reads big-endian
    order = "little" if little else "big"
    size = len(data)

    def u16(at: int) -> int:
        if at + 1 >= size:
            raise IndexError
        return int.from_bytes(data[at : at + 2], order)

    def u32(at: int) -> int:
        if at + 3 >= size:
            raise IndexError
        return int.from_bytes(data[at : at + 4], order)

    try:
        if u16(2) != 42:
            return None
        offset = u32(4)
        count = u16(offset)
        offset += 2
        for _ in range(count):
            tag = u16(offset)
            if tag == _ORIENTATION_TAG:
                return u16(offset + 8)
            if tag in _STRING_TAGS:
                length = u32(offset + 4)
                start = 8 if length <= 4 else u32(offset + 8)
                if start > size or start + length > size:
                    raise IndexError
            elif tag in _RATIONAL_TAGS:
                start = u32(offset + 8)
                u32(start + 8 * _RATIONAL_TAGS[tag] - 4)  # the last of the rationals must be inside
            elif tag in (0x0128, 0x0213):  # resolution unit, YCbCr positioning: a 16-bit value
                u16(offset + 8)
            offset += 12
    except IndexError:
        return None
    return None


def jpeg_orientation(raw: bytes) -> int:
    """EXIF orientation (1..8) of the JPEG ``raw``; 1 when absent, unreadable or out of range."""
    for marker, i, length in _segments(raw, strict=False):
        orientation = _exif_orientation_at(raw, marker, i, length)
        if orientation is not None:
            return orientation
    return 1


def png_orientation(raw: bytes) -> int:
    """EXIF orientation (1..8) of the PNG ``raw`` from its eXIf chunk; 1 when absent or unreadable."""
    view = memoryview(raw)
    i = len(PNG_MAGIC)
    while i + 12 <= len(raw):
        length = int.from_bytes(raw[i : i + 4], "big")
        kind = raw[i + 4 : i + 8]
        end = i + 12 + length
        if kind == b"IEND" or end > len(raw):
            break
        if kind == b"eXIf" and length >= 2:
            data = view[i + 8 : i + 8 + length]
            crc_ok = zlib.crc32(view[i + 4 : i + 8 + length]) == int.from_bytes(raw[end - 4 : end], "big")
            if crc_ok and data[0] == data[1] and data[0] in (0x49, 0x4D):  # "II" or "MM"
                value = tiff_orientation(data)
                return value if value is not None and 1 <= value <= 8 else 1
        i = end
    return 1
