"""Decoding image files (JPEG, PNG, BMP) into uint8 HWC arrays, whole or only the part a crop needs.

Reading is split in two so that a worker can plan an augmentation before it decodes:

- ``read_encoded(path, max_pixels)`` reads the file and does every check that needs no decoding:
  regular file, file size, header (format, width and height, parsed here without any decoder),
  pixel cap and truncation. A corrupt or hostile file announcing 60000 × 60000 pixels is refused
  there, before any decoder allocates gigabytes. Only JPEG, PNG and BMP content is accepted,
  whatever the file is called: OpenCV would also decode TIFF, WebP, EXR and more, whose sizes this
  module does not check. The EXIF orientation is read too, so the size it reports is the size of
  the image as delivered.
- ``decode_encoded(image, channels, box, max_factor)`` decodes it: all of it, or at least ``box``
  at a reduced scale (JPEG DCT scaling, 1/2, 1/4 or 1/8), a JPEG's only in the rows and columns of
  the box (libjpeg-turbo's crop and skip-scanlines: augserve's own decoder, which also scales, else
  nvImageCodec's CPU decoder at full scale, else OpenCV). ``augserve.bench.decoders`` measured the
  candidates; see ``_decode_jpeg_region`` for the rule this follows. Every path gives the same bytes
  on every call, and the same pixels as OpenCV's decode at the same scale.

``read_image(path, channels, max_pixels)`` is the two in a row with no box: exactly OpenCV's decode
of the whole file. PIL is not used, so its decompression-bomb warning and error never occur here.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass

import cv2
import numpy as np

from pipelines.decode_plan import REDUCTIONS

from .base import check_max_pixels
from .errors import CorruptImageError
from .region_decoder import decode_scaled_region, region_decoder, scaled_region_decoder
from .headers import JPEG_MAGIC, PNG_MAGIC, JpegFrame, image_size, jpeg_frame, jpeg_header, checked_size, png_orientation

__all__ = [
    "EncodedImage", "Placement", "decode_encoded", "image_size", "orientation_steps", "oriented_placement", "region_decodable",
    "read_encoded", "read_image", "stored_region",
]  # fmt: skip

_JPEG_SOS = b"\xff\xda"  # start of scan: entropy-coded data follows
_JPEG_EOI = b"\xff\xd9"  # end of image
_PNG_IEND = b"IEND\xaeB`\x82"  # the final chunk's type and its fixed CRC

# A compressed image file is never larger than this many bytes per allowed pixel (16-bit RGBA PNG
# stored without compression needs 8) plus room for metadata; anything bigger is not read.
_MAX_BYTES_PER_PIXEL = 16
_METADATA_ALLOWANCE = 1 << 20

FACTORS = tuple(sorted(REDUCTIONS))  # the reductions a plan may ask for: JPEG DCT scaling's 1, 1/2, 1/4, 1/8
_REDUCED = {  # (channels, factor) -> imdecode flag; OpenCV applies these as libjpeg DCT scaling
    (3, 1): cv2.IMREAD_COLOR,
    (3, 2): cv2.IMREAD_REDUCED_COLOR_2,
    (3, 4): cv2.IMREAD_REDUCED_COLOR_4,
    (3, 8): cv2.IMREAD_REDUCED_COLOR_8,
    (1, 1): cv2.IMREAD_GRAYSCALE,
    (1, 2): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (1, 4): cv2.IMREAD_REDUCED_GRAYSCALE_4,
    (1, 8): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
# EXIF orientation -> (transpose, flip rows, flip columns), applied in this order to the stored
# image: OpenCV's ExifTransform, so our orientation is bit-for-bit what cv2.imdecode would apply.
_ORIENTATIONS = {
    1: (False, False, False),
    2: (False, False, True),
    3: (False, True, True),
    4: (False, True, False),
    5: (True, False, False),
    6: (True, False, True),
    7: (True, True, True),
    8: (True, True, False),
}


@dataclass(frozen=True)
class EncodedImage:
    """A file's bytes after every check that needs no decoding (regular file, size, header, pixel cap, truncation).

    ``height`` and ``width`` are in pixels as delivered, i.e. after the EXIF ``orientation``
    (1..8; 1 when absent) is applied: orientations 5–8 swap the stored height and width.
    ``kind`` is "jpeg", "png" or "bmp". PNG files carry EXIF in an eXIf chunk, which OpenCV
    honours, so a PNG can have an orientation other than 1 too. ``frame``: a JPEG's start-of-frame
    header as read with the rest (None for other kinds, or where the image was built without it).
    """

    path: str
    raw: bytes
    kind: str
    height: int
    width: int
    orientation: int
    frame: JpegFrame | None = None  # a JPEG's start-of-frame header, read with the rest (None: not read yet)

    def __repr__(self) -> str:  # the bytes would flood logs and tracebacks
        return (
            f"EncodedImage(path={self.path!r}, kind={self.kind!r}, height={self.height}, width={self.width}, "
            f"orientation={self.orientation}, {len(self.raw)} bytes)"
        )


@dataclass(frozen=True)
class Placement:
    """Where a decoded array sits in the full-resolution, oriented image: array pixel (i, j) covers the square
    [left + factor*j, left + factor*(j+1)) × [top + factor*i, top + factor*(i+1)) in continuous pixel coordinates
    (x first, then y).

    With ``factor`` > 1 the last row or column may reach past the image edge (the image's size is
    not a multiple of the factor: the decoder pads the edge), and after an orientation that flips
    the image that padded pixel comes first, so ``top``/``left`` can be negative, by less than
    ``factor``.
    """

    factor: int
    top: int
    left: int


def _truncation(raw: bytes) -> str | None:
    """Why ``raw`` is a cut-off JPEG/PNG, or None.

    Some libjpeg builds behind OpenCV decode a truncated JPEG with only a warning and return grey
    filler for the missing rows, so an incomplete file would silently train as a valid image.
    Inside entropy-coded data a 0xFF byte is always stuffed (FF 00), so an end-of-image marker after
    the last start-of-scan is a reliable sign that the file is complete. It is looked for from the end,
    where it is, and only the bytes after it are searched for a start-of-scan: searching for the last
    start-of-scan from the end instead walks back through all of a baseline file's image data (110 µs
    on a 400 KB photo, a third of reading it).
    """
    if raw.startswith(JPEG_MAGIC):
        end = raw.rfind(_JPEG_EOI)
        if end < 0 or raw.find(_JPEG_SOS, end) >= 0:  # no end, or a scan begins after the last one
            return "truncated JPEG: no end-of-image marker"
    elif raw.startswith(PNG_MAGIC) and _PNG_IEND not in raw:
        return "truncated PNG: no IEND chunk"
    return None


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
        # The size fstat gave and one byte more: read(max_bytes + 1) would allocate and hand back a
        # buffer of the limit's size (~200 MB) for every file, 5x the cost of reading a photo itself.
        raw = f.read(info.st_size + 1)
        if len(raw) > info.st_size:  # grown since fstat: the rest too, as far as the limit's one byte more
            raw += f.read(max_bytes + 1 - len(raw))
            if len(raw) > max_bytes:
                raise CorruptImageError(path, f"file grew past {max_bytes} bytes while it was read: too large for an image of the allowed size")
        return raw


def _check_channels(channels: object) -> int:
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    return int(channels)  # type: ignore[arg-type]


def read_encoded(path: str | os.PathLike, max_pixels: int | None = None) -> EncodedImage:
    """Read the image file at ``path`` and check everything that needs no decoding.

    ``max_pixels`` caps height × width (None: ``base.DEFAULT_MAX_PIXELS``, 8192 × 8192); a larger
    image is refused from its header, as is a file too large to hold an image of at most that size.
    Raises ``CorruptImageError`` naming ``path`` when the file cannot be read, is not a regular
    file, is empty, is not JPEG/PNG/BMP content, has a header cut short, is over the cap or is
    truncated.
    """
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
        if raw.startswith(JPEG_MAGIC):  # size, frame and orientation from one walk over the header
            frame, orientation = jpeg_header(raw)
            height, width = checked_size(frame.height, frame.width)
        else:
            frame = None
            height, width = image_size(raw)
    except ValueError as exc:
        raise CorruptImageError(path, str(exc)) from None
    if height * width > cap:
        raise CorruptImageError(path, f"{width}×{height} image ({width * height} pixels) exceeds max_pixels={cap}")
    reason = _truncation(raw)
    if reason:
        raise CorruptImageError(path, reason)
    if frame is not None:
        kind = "jpeg"
    elif raw.startswith(PNG_MAGIC):
        kind, orientation = "png", png_orientation(raw)
    else:
        kind, orientation = "bmp", 1
    if _ORIENTATIONS[orientation][0]:
        height, width = width, height
    return EncodedImage(os.fspath(path), raw, kind, height, width, orientation, frame)


# --- orientation -----------------------------------------------------------------------------------


def orientation_steps(orientation: int) -> tuple[bool, bool, bool]:
    """(transpose, flip rows, flip columns): what EXIF ``orientation`` (1..8) does to the stored image,
    in this order (OpenCV's ExifTransform)."""
    return _ORIENTATIONS[orientation]


def _stored_size(image: EncodedImage) -> tuple[int, int]:
    """(height, width) of ``image`` as stored, before its orientation."""
    return (image.width, image.height) if _ORIENTATIONS[image.orientation][0] else (image.height, image.width)


def _stored_box(box: tuple[float, float, float, float], orientation: int, height: int, width: int):
    """``box`` (x0, y0, x1, y1) of the oriented ``height`` × ``width`` image, in stored coordinates."""
    transpose, flip_rows, flip_cols = _ORIENTATIONS[orientation]
    x0, y0, x1, y1 = box
    if flip_cols:
        x0, x1 = width - x1, width - x0
    if flip_rows:
        y0, y1 = height - y1, height - y0
    return (y0, x0, y1, x1) if transpose else (x0, y0, x1, y1)


def oriented_placement(placement: Placement, rows: int, cols: int, orientation: int, height: int, width: int) -> Placement:
    """Where a stored-orientation region of ``rows`` × ``cols`` pixels placed at ``placement`` lies once
    ``orientation`` is applied; ``height`` × ``width`` is the oriented image's size. The array itself
    is transposed first (when the orientation transposes), then flipped: :func:`_orient`'s order."""
    transpose, flip_rows, flip_cols = _ORIENTATIONS[orientation]
    f, top, left = placement.factor, placement.top, placement.left
    if transpose:
        rows, cols, top, left = cols, rows, left, top
    if flip_rows:
        top = height - (top + f * rows)
    if flip_cols:
        left = width - (left + f * cols)
    return Placement(f, top, left)


def _orient(array: np.ndarray, placement: Placement, orientation: int, height: int, width: int):
    """Apply ``orientation`` to a stored-orientation region and its placement; ``height`` × ``width``
    is the oriented image's size. ``array``: 2-D, or HWC with up to 4 channels."""
    if orientation == 1:
        return array, placement
    transpose, flip_rows, flip_cols = _ORIENTATIONS[orientation]
    moved = oriented_placement(placement, array.shape[0], array.shape[1], orientation, height, width)
    if transpose:
        array = cv2.transpose(array)
    if flip_rows or flip_cols:
        array = cv2.flip(array, -1 if flip_rows and flip_cols else 0 if flip_rows else 1)
    return array, moved


# --- decoding ---------------------------------------------------------------------------------------


def _check_box(box, height: int, width: int) -> tuple[float, float, float, float]:
    """``box`` validated and clipped to the ``height`` × ``width`` image."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise TypeError(f"box must be four numbers (x0, y0, x1, y1), got {box!r}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise ValueError(f"box must be finite with x0 < x1 and y0 < y1, got {box!r}")
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {box!r} does not overlap the {width}×{height} image")
    return x0, y0, x1, y1


def _span(start: float, stop: float, factor: int, size: int) -> tuple[int, int]:
    """Indices [i0, i1) of the 1/``factor`` grid of a ``size``-pixel axis that cover [start, stop)."""
    return int(start // factor), min(math.ceil(stop / factor), -(-size // factor))


def _imdecode(image: EncodedImage, flag: int) -> np.ndarray:
    """``cv2.imdecode`` of the stored image (no orientation), raising CorruptImageError as read_image does."""
    try:
        array = cv2.imdecode(np.frombuffer(image.raw, dtype=np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as exc:
        raise CorruptImageError(image.path, str(exc).strip().splitlines()[-1]) from exc
    if array is None:
        raise CorruptImageError(image.path, "not a decodable JPEG/PNG/BMP image")
    return array


def _finish(array: np.ndarray, channels: int) -> np.ndarray:
    """An RGB (H, W, 3) or 2-D grey region as the caller's C-contiguous RGB (H, W, 3) or grey (H, W, 1)."""
    if channels == 1:
        array = array.reshape(array.shape[0], array.shape[1], 1)
    return np.ascontiguousarray(array)


def _decode_opencv(image: EncodedImage, channels: int, stored_box, factor: int, stored_size):
    """The stored-orientation region at 1/``factor`` decoded by OpenCV (2-D grey or RGB) and its placement."""
    array = _imdecode(image, _REDUCED[(channels, factor)])
    if factor > 1 and array.shape[:2] != (-(-stored_size[0] // factor), -(-stored_size[1] // factor)):
        # Not libjpeg's DCT scaling (whose output is the size divided, rounded up): let the caller
        # fall back to the exact decode rather than misplace the pixels.
        raise CorruptImageError(image.path, f"decoded {array.shape[1]}×{array.shape[0]} at 1/{factor}, not the header's size")
    i0 = j0 = 0
    whole = array
    if stored_box is not None:
        x0, y0, x1, y1 = stored_box
        i0, i1 = _span(y0, y1, factor, stored_size[0])
        j0, j1 = _span(x0, x1, factor, stored_size[1])
        array = array[i0:i1, j0:j1]
    # OpenCV decodes to BGR: the conversion is also the copy that lets the whole decode go (a region
    # must not keep it alive); a grey region is copied for that alone.
    if channels == 3:
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    elif array.shape != whole.shape:
        array = np.array(array)
    return array, Placement(factor, i0 * factor, j0 * factor)


def decode_encoded(
    image: EncodedImage,
    channels: int = 3,
    box: tuple[float, float, float, float] | None = None,
    max_factor: int = 1,
) -> tuple[np.ndarray, Placement]:
    """Decode ``image``, or at least the part of it inside ``box``, at up to 1/``max_factor`` scale.

    ``box`` = (x0, y0, x1, y1): the region of the oriented full-resolution image, in continuous
    pixel coordinates, that must be covered; it is clipped to the image (None: the whole image).
    ``max_factor`` (1, 2, 4 or 8) is the largest reduction allowed; a JPEG is decoded at that
    reduction (libjpeg DCT scaling) unless libjpeg cannot scale it (lossless JPEG); PNG and BMP
    always at full scale: ``placement.factor`` says which. Which decoder runs (see
    ``_decode_jpeg_region``) never changes the pixels: each gives OpenCV's at that scale.

    Returns ``(array, placement)``: uint8 HWC, C-contiguous and owned by the caller, RGB (H, W, 3)
    for ``channels=3`` (grey files replicated) or grey (H, W, 1) for ``channels=1``, covering at
    least the box, and where it sits (``Placement``). At full scale the pixels are exactly those of
    ``read_image``; at a reduced scale a JPEG's are its DCT-scaled decode, close to the exact
    decode averaged over factor × factor squares. EXIF orientation is applied, alpha dropped and
    16-bit files scaled to 8 bits, as OpenCV does by default.

    Raises ``CorruptImageError`` when the file cannot be decoded (with the reason ``read_image``
    gives), ``ValueError`` for a bad ``channels``, ``max_factor`` or a box outside the image.
    """
    channels = _check_channels(channels)
    if isinstance(max_factor, bool) or not isinstance(max_factor, (int, np.integer)) or max_factor not in FACTORS:
        raise ValueError(f"max_factor must be one of {', '.join(map(str, FACTORS))}, got {max_factor!r}")
    if box is not None:
        box = _check_box(box, image.height, image.width)
    stored_size = _stored_size(image)
    stored_box = None if box is None else _stored_box(box, image.orientation, image.height, image.width)
    factor = int(max_factor) if image.kind == "jpeg" else 1
    array = placement = None
    if image.kind == "jpeg" and stored_box is not None:
        found = _decode_jpeg_region(image, channels, stored_box, factor, stored_size)
        if found is not None:
            array, placement = found
    if array is None and factor > 1:
        try:
            array, placement = _decode_opencv(image, channels, stored_box, factor, stored_size)
        except CorruptImageError:  # e.g. lossless JPEG, which libjpeg cannot scale: try at full scale
            pass
    if array is None:  # the exact path; it also gives read_image's reason when nothing can decode the file
        array, placement = _decode_opencv(image, channels, stored_box, 1, stored_size)
    array, placement = _orient(array, placement, image.orientation, image.height, image.width)
    return _finish(array, channels), placement


def read_image(path: str | os.PathLike, channels: int = 3, max_pixels: int | None = None) -> np.ndarray:
    """Decode the whole image file at ``path``: ``decode_encoded(read_encoded(path, max_pixels), channels)``.

    Returns uint8, HWC, C-contiguous: RGB (H, W, 3) for ``channels=3`` (grey files are replicated to
    three channels), grey (H, W, 1) for ``channels=1``. EXIF orientation is applied, alpha dropped
    and 16-bit files scaled to 8 bits, as OpenCV does by default.

    ``max_pixels`` caps height × width (None: ``base.DEFAULT_MAX_PIXELS``, 8192 × 8192); see
    ``read_encoded``. Raises ``CorruptImageError`` naming ``path`` when the file cannot be read or
    decoded, is not a regular file, is not JPEG/PNG/BMP content, or is over the cap.
    """
    channels = _check_channels(channels)
    return decode_encoded(read_encoded(path, max_pixels), channels)[0]


def region_decodable(image: EncodedImage) -> bool:
    """Whether ``image`` is a JPEG that a region decoder (augserve's libjpeg-turbo one, nvImageCodec) may
    decode instead of OpenCV: baseline, extended and progressive Huffman-coded 8-bit grey or color, what
    every libjpeg-turbo build (OpenCV's, ours, nvImageCodec's CPU decoder) decodes alike, and nvJPEG
    decodes on a GPU. CMYK/YCCK, 12-bit, lossless and arithmetic-coded files, PNG and BMP go to OpenCV."""
    if image.kind != "jpeg":
        return False
    frame = image.frame if image.frame is not None else jpeg_frame(image.raw)
    return frame.marker in (0xC0, 0xC1, 0xC2) and frame.precision == 8 and frame.components in (1, 3)


def _full_scale_rect(stored_box, stored_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(i0, j0, i1, j1)``: the whole pixels of the stored image that cover ``stored_box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = stored_box
    i0, i1 = _span(y0, y1, 1, stored_size[0])
    j0, j1 = _span(x0, x1, 1, stored_size[1])
    return i0, j0, i1, j1


def stored_region(image: EncodedImage, box: tuple[float, float, float, float] | None) -> tuple[int, int, int, int]:
    """``(i0, j0, i1, j1)``: rows [i0, i1) × columns [j0, j1) of the stored (not yet oriented)
    full-resolution image that cover ``box`` (x0, y0, x1, y1 of the oriented image, clipped to it;
    None: all of it) — what a region decoder is asked for. ValueError/TypeError for a bad box, as
    :func:`decode_encoded` raises."""
    stored_size = _stored_size(image)
    if box is None:
        return (0, 0) + stored_size
    box = _check_box(box, image.height, image.width)
    return _full_scale_rect(_stored_box(box, image.orientation, image.height, image.width), stored_size)


def _decode_jpeg_region(image: EncodedImage, channels: int, stored_box, factor: int, stored_size):
    """The stored box of the JPEG ``image`` decoded by a region decoder, as (RGB or 2-D grey, placement),
    or None to let OpenCV decode it.

    First choice, where it was built: augserve's libjpeg-turbo decoder, which decodes just the box at
    1/``factor`` — rows above it entropy-decoded only, rows below it not at all, only its columns
    transformed — with the pixels of OpenCV's decode at that scale. 1.3-1.6× faster than OpenCV's
    scaled whole decode for random-resized-crop boxes (``augserve bench decoders``).

    Where it was not built: at full scale nvImageCodec's region decoder (crop and skip-scanlines, no
    scaling), the same pixels as OpenCV's whole decode, 2.3× (1600×1200) and 1.2× (500×375) faster; at a
    reduced scale OpenCV's DCT-scaled whole decode (None here). nvImageCodec at full scale would be faster
    than OpenCV's scaled decode for some small boxes high in the image, but its pixels would differ
    from the scaled ones: a ``decode: fast`` run must give the same bytes whichever decoders are
    installed, so the scale is the caller's, never the decoder's choice.
    """
    if not region_decodable(image):
        return None
    x0, y0, x1, y1 = stored_box
    i0, i1 = _span(y0, y1, factor, stored_size[0])
    j0, j1 = _span(x0, x1, factor, stored_size[1])
    if scaled_region_decoder() is not None:
        scaled = decode_scaled_region(image.raw, channels, factor, i0, j0, i1, j1)
        if scaled is None:  # libjpeg refused the file or warned: OpenCV gives its pixels or its reason
            return None
        array, col0 = scaled
        return array, Placement(factor, i0 * factor, col0 * factor)
    if factor != 1:
        return None
    if (i0, j0, i1, j1) == (0, 0) + stored_size:  # the whole image: OpenCV decodes it faster
        return None
    decoder = region_decoder()
    array = None if decoder is None else decoder.decode(image.raw, channels, i0, j0, i1, j1)
    return None if array is None else (array, Placement(1, i0, j0))
