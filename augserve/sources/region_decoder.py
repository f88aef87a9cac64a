"""Decoders of just a region of a JPEG: augserve's own libjpeg-turbo one, and nvImageCodec's CPU decoder.

:func:`scaled_region_decoder` is the first choice: ``augserve/sources/_libjpeg_region.c``, built with the
package where libjpeg's headers and a C compiler exist (``setup.py``), decodes a region at a DCT-scaled
size (1/1, 1/2, 1/4, 1/8): libjpeg-turbo's scaling, crop and skip-scanlines together, which no Python
binding offers. Its pixels are exactly those of OpenCV's decode at the same scale (``IMREAD_REDUCED_*``)
over the same rows and columns.

:func:`region_decoder`, where the former was not built: nvImageCodec's CPU-only JPEG decoder, for a
region at full scale only — libjpeg-turbo's crop and skip-scanlines behind nvImageCodec's Python API (the ``nvidia-nvimgcodec-cu13``
wheel, a base dependency on Linux, ~115 MB with its libraries against DALI's ~600 MB; no GPU needed): it
entropy-decodes the rows down to the region's last, transforms only the region's columns, and stops.
One decoder per thread, made anew in a forked child (its threads live in the parent), and none where
nvImageCodec is not installed (no wheel for the platform, or removed): the caller then decodes with
OpenCV, the same pixels more slowly. :func:`thread_local_codec` keeps any such nvImageCodec object
(the batched device decoder of :mod:`augserve.sources.device_decoder` too).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Callable

import numpy as np

log = logging.getLogger("augserve.sources")

_LOCAL = threading.local()  # per thread, and made anew in a forked child: nvImageCodec objects own threads
_INHERITED: list = []


def decode_params(nvimgcodec) -> dict:
    """nvImageCodec's decode parameters per channel count: 1 → grey (the luma plane, as OpenCV's
    ``IMREAD_GRAYSCALE`` gives it), 3 → RGB (grey files replicated). EXIF orientation is never applied
    by the decoder: the caller applies it (``decode._orient``), as for every other decoder."""
    return {
        channels: nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=spec, sample_format=layout)
        for channels, spec, layout in (
            (1, nvimgcodec.ColorSpec.GRAY, nvimgcodec.SampleFormat.I_Y),
            (3, nvimgcodec.ColorSpec.SRGB, nvimgcodec.SampleFormat.I_RGB),
        )
    }


class RegionDecoder:
    """nvImageCodec's CPU-only JPEG decoder (libjpeg-turbo with crop and skip-scanlines) and its
    decode parameters per channel count."""

    def __init__(self, nvimgcodec) -> None:
        self.nvimgcodec = nvimgcodec
        self.decoder = nvimgcodec.Decoder(
            device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
            backends=[nvimgcodec.Backend(nvimgcodec.CPU_ONLY)],
            max_num_cpu_threads=1,  # a worker process is one core: no thread pool of its own
        )
        self.params = decode_params(nvimgcodec)

    def decode(self, raw: bytes, channels: int, i0: int, j0: int, i1: int, j1: int) -> np.ndarray | None:
        """Rows [i0, i1) × columns [j0, j1) of the stored image: RGB or 2-D grey, owned; None on failure."""
        nvimgcodec = self.nvimgcodec
        try:
            stream = nvimgcodec.CodeStream(raw).get_sub_code_stream(region=nvimgcodec.Region(i0, j0, i1, j1))
            decoded = self.decoder.decode(stream, params=self.params[channels])
        except Exception:  # noqa: BLE001 - whatever went wrong, OpenCV decodes it or gives read_image's reason
            return None
        if decoded is None:
            return None
        array = np.array(decoded.cpu())  # a copy the caller owns, not a view of nvImageCodec's buffer
        if array.shape[:2] != (i1 - i0, j1 - j0) or array.shape[2:] not in ((1,), (3,)):
            return None
        return array.reshape(array.shape[0], array.shape[1]) if channels == 1 else array


def thread_local_codec(key, make: Callable, unusable: str, missing: str | None = None):
    """This thread's nvImageCodec object for ``key``, made by ``make(nvimgcodec)`` on first use in this
    process; None where nvImageCodec is not installed (one warning, ``missing``, when given: silent
    where its absence is an expected set-up) or when ``make`` fails — then one warning: ``unusable``
    with ``{error}`` replaced by the exception, saying what is done instead."""
    state = getattr(_LOCAL, "state", None)
    if state is None or state[0] != os.getpid():
        if state is not None:  # inherited through fork: never destroy its objects here, their threads live in the parent
            _INHERITED.append(state)
        state = (os.getpid(), {})
        _LOCAL.state = state
    made = state[1]
    if key not in made:
        try:
            from nvidia import nvimgcodec

            made[key] = make(nvimgcodec)
        except ImportError:
            if missing is not None:
                log.warning(missing)
            made[key] = None
        except Exception as exc:  # noqa: BLE001 - installed but unusable (a library missing): the caller's fallback
            log.warning(unusable.format(error=f"{type(exc).__name__}: {exc}"))
            made[key] = None
    return made[key]


@functools.cache  # looked up once per process: it is asked for every JPEG region decoded
def scaled_region_decoder():
    """The compiled libjpeg-turbo region decoder (module ``augserve.sources._libjpeg_region``), or None
    where the package was installed without it (no C compiler or no libjpeg headers at build time)."""
    try:
        from . import _libjpeg_region
    except ImportError:
        return None
    return _libjpeg_region


def decode_scaled_region(raw: bytes, channels: int, factor: int, i0: int, j0: int, i1: int, j1: int) -> tuple[np.ndarray, int] | None:
    """Rows [i0, i1) and at least columns [j0, j1) of the JPEG ``raw`` decoded at 1/``factor`` (indices
    of that scaled image, whose size is the stored size divided by ``factor``, rounded up), as
    ``(array, first column)``: uint8 RGB (H, W, 3) or 2-D grey, C-contiguous, writable, owned. None
    where the decoder is not built, or libjpeg refused the file or warned about it (corrupt data):
    the caller's OpenCV decode then gives the file's pixels or its error."""
    decoder = scaled_region_decoder()
    if decoder is None:
        return None
    try:
        data, col0, cols = decoder.decode(raw, channels, factor, i0, j0, i1, j1)
    except ValueError:
        return None
    shape = (i1 - i0, cols, 3) if channels == 3 else (i1 - i0, cols)
    return np.frombuffer(data, dtype=np.uint8).reshape(shape), col0


def region_decoder() -> RegionDecoder | None:
    """This thread's region decoder, or None where nvImageCodec is not installed."""
    return thread_local_codec("region", RegionDecoder, "nvImageCodec's CPU decoder is unusable ({error}); JPEG regions are decoded with OpenCV")
