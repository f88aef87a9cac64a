"""``.npz`` arrays: a NumPy archive of uint8 images and integer labels.

Keys:
  ``images``       uint8, (N, H, W, C) with C in {1, 3} (RGB), or (N, H, W) meaning C = 1
  ``labels``       any integer dtype, (N,), values >= 0
  ``images_test``, ``labels_test``  optional, the same for the "test" split
  ``classes``      optional, strings, (K,), K > every label; otherwise classes are "0".."max label"

Construction reads the zip directory, the array headers, the labels and the class names; never
the images. How the images are read depends on how the archive was written:

* ``np.savez`` stores members uncompressed, so the image array is a contiguous run of bytes in
  the file: it is memory-mapped (read-only) on the first ``load``, which then touches only the
  pages of that image. Opening costs the same for 1 MB or 100 GB, and the page cache is shared by
  every worker reading the file. The file must not be rewritten while it is served: a change is
  detected on the next ``load`` (ValueError) rather than read as garbage or crashing on pages cut
  away under the mapping.
* ``np.savez_compressed`` deflates members, which cannot be mapped: the whole array is
  decompressed into memory on the first ``load``, in every worker process. That is accepted up to
  ``max_load_bytes`` (default 256 MiB, options ``max_load_bytes``); a larger compressed array is
  refused at open with a one-line error saying to re-save it with ``np.savez``.

Per-image height × width above ``max_pixels`` (default ``base.DEFAULT_MAX_PIXELS``) is refused at
open. Errors are one-line ValueErrors naming the file.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

from .base import Source, check_max_pixels, check_split

_KEYS = {"train": ("images", "labels"), "test": ("images_test", "labels_test")}

DEFAULT_MAX_LOAD_BYTES = 256 << 20

# Errors that reading a damaged archive can raise besides ValueError.
_READ_ERRORS = (OSError, zipfile.BadZipFile, EOFError, zlib.error, struct.error)

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we do not need, name and extra lengths
_LOCAL_MAGIC = b"PK\x03\x04"


class _Member(NamedTuple):
    """One ``.npy`` member of the archive, from its header alone."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int | None  # where the array data starts in the .npz file; None when compressed

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:  # 3.0 is only written for structured dtypes with non-Latin-1 field names
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    return tuple(shape), bool(fortran), np.dtype(dtype)


def _member(archive: zipfile.ZipFile, raw, key: str, path: str) -> _Member:
    """Header of member ``key`` and, when stored uncompressed, the file offset of its data.

    ``raw`` is the .npz file opened for binary reading. Raises ValueError naming ``path``.
    """
    try:
        info = archive.getinfo(f"{key}.npy")
        if info.flag_bits & 0x1:
            raise ValueError("member is encrypted")
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as f:  # only the first bytes are decompressed
                shape, fortran, dtype = _read_npy_header(f)
            return _Member(shape, dtype, fortran, None)
        # The local header repeats the name and may carry a different extra field than the central
        # directory, so its own lengths say where the member's bytes begin.
        raw.seek(info.header_offset)
        magic, name_length, extra_length = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
        if magic != _LOCAL_MAGIC:
            raise ValueError("bad zip local header (the file is damaged)")
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        raw.seek(start)
        shape, fortran, dtype = _read_npy_header(raw)
        member = _Member(shape, dtype, fortran, raw.tell())
        if not dtype.hasobject and member.offset - start + member.nbytes != info.file_size:
            raise ValueError(f"member holds {info.file_size} bytes but its header describes {shape} {dtype}")
        if start + info.file_size > os.fstat(raw.fileno()).st_size:
            raise ValueError("the file is truncated")
        return member
    except (ValueError, *_READ_ERRORS) as exc:
        raise ValueError(f"{path}: cannot read field {key!r}: {exc}") from exc


def _read(archive: zipfile.ZipFile, key: str, path: str) -> np.ndarray:
    """Member ``key`` loaded whole (labels, class names), never unpickled."""
    try:
        with archive.open(f"{key}.npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, *_READ_ERRORS) as exc:  # e.g. an object array, which would need pickle
        raise ValueError(f"{path}: cannot read field {key!r}: {exc}") from exc


def _check_images(member: _Member, key: str, path: str, max_pixels: int) -> None:
    shape, dtype = member.shape, member.dtype
    if dtype != np.uint8:
        raise ValueError(f"{path}: field {key!r} must have dtype uint8, got {dtype}")
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise ValueError(f"{path}: field {key!r} must have shape N×H×W×C with C in {{1, 3}} or N×H×W, got {shape}")
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise ValueError(f"{path}: field {key!r} is empty, shape {shape}")
    if shape[1] * shape[2] > max_pixels:
        raise ValueError(
            f"{path}: field {key!r} holds {shape[2]}×{shape[1]} images ({shape[1] * shape[2]} pixels),"
            f" over max_pixels={max_pixels}"
        )


def _check_labels(labels: np.ndarray, n: int, key: str, path: str) -> np.ndarray:
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: field {key!r} must have an integer dtype, got {labels.dtype}")
    _check_labels_shape(labels.shape, n, key, path)
    if labels.min() < 0:
        raise ValueError(f"{path}: field {key!r} has negative label {labels.min()}")
    return labels.astype(np.int64)


def _check_labels_shape(shape: tuple[int, ...], n: int, key: str, path: str) -> None:
    if len(shape) != 1 or shape[0] != n:
        raise ValueError(f"{path}: field {key!r} must have shape ({n},) to match the images, got {shape}")


def _check_max_load_bytes(value: object) -> int:
    if value is None:
        return DEFAULT_MAX_LOAD_BYTES
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"max_load_bytes must be an integer number of bytes, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"max_load_bytes must be >= 0, got {value}")
    return int(value)


def _stamp(path: str) -> tuple[int, int, int, int]:
    info = os.stat(path)
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


class NpzSource(Source):
    """Images and labels from an ``.npz`` file; see the module docstring.

    ``name`` is the path as given, so ``open_dataset(src.name, src.split, **src.options)`` re-opens
    it. Options: ``max_pixels`` (per-image height × width) and ``max_load_bytes`` (largest
    compressed image array loaded into memory), both None for the defaults.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str = "train",
        *,
        max_pixels: int | None = None,
        max_load_bytes: int | None = None,
    ) -> None:
        name = os.fspath(path)
        pixel_cap = check_max_pixels(max_pixels)
        load_cap = _check_max_load_bytes(max_load_bytes)
        # Only options that were given, so that equal datasets keep equal options (cache keys).
        options = {}
        if max_pixels is not None:
            options["max_pixels"] = pixel_cap
        if max_load_bytes is not None:
            options["max_load_bytes"] = load_cap
        try:
            archive = zipfile.ZipFile(name)
        except FileNotFoundError:
            raise ValueError(f".npz file does not exist: {name}") from None
        except (*_READ_ERRORS, ValueError) as exc:
            raise ValueError(f"cannot read .npz file {name}: {exc}") from exc
        try:
            with archive, open(name, "rb") as raw:
                members = {n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")}
                for key in _KEYS["train"]:
                    if key not in members:
                        raise ValueError(f"{name}: missing field {key!r} (found: {', '.join(sorted(members))})")
                splits = ("train", "test") if set(_KEYS["test"]) <= members else ("train",)
                super().__init__(name, check_split(split, splits, name), options)
                label_sets = {}
                for s in splits:
                    images_key, labels_key = _KEYS[s]
                    images = _member(archive, raw, images_key, name)
                    _check_images(images, images_key, name, pixel_cap)
                    # The labels header first: a damaged or hostile member must not be loaded whole
                    # before its size is known to match the images.
                    _check_labels_shape(_member(archive, raw, labels_key, name).shape, images.shape[0], labels_key, name)
                    label_sets[s] = _check_labels(_read(archive, labels_key, name), images.shape[0], labels_key, name)
                    if s == split:
                        self._shape = images.shape
                        if images.offset is None and images.nbytes > load_cap:
                            raise ValueError(
                                f"{name}: field {images_key!r} is compressed (np.savez_compressed), so its "
                                f"{images.nbytes} bytes would be loaded into every worker's memory, over "
                                f"max_load_bytes={load_cap}; re-save the file with np.savez so it can be memory-mapped"
                            )
                classes = _read(archive, "classes", name) if "classes" in members else None
        except _READ_ERRORS as exc:
            raise ValueError(f"cannot read .npz file {name}: {exc}") from exc

        top = max(int(labels.max()) for labels in label_sets.values())
        if classes is None:
            self._classes = [str(k) for k in range(top + 1)]
        else:
            if classes.ndim != 1 or classes.dtype.kind not in "US":
                raise ValueError(f"{name}: field 'classes' must be a 1-D array of strings, got {classes.dtype} {classes.shape}")
            if len(classes) <= top:
                raise ValueError(f"{name}: field 'classes' has {len(classes)} names but labels go up to {top}")
            self._classes = [c.decode() if isinstance(c, bytes) else str(c) for c in classes.tolist()]
        self._labels = label_sets[split]
        self._images: np.ndarray | None = None
        self._mapped_stamp: tuple[int, int, int, int] | None = None  # file identity when mapped

    def _array(self) -> np.ndarray:
        if self._images is None:
            self._images, self._mapped_stamp = self._open_images()
        elif self._mapped_stamp is not None:
            # Reading a page that a rewrite cut off the mapped file kills the process (SIGBUS), so
            # check that the file is still the one mapped. A rewrite between this check and the
            # read remains possible: files being served are meant to be left alone.
            try:
                stamp = _stamp(self.name)
            except OSError as exc:
                raise ValueError(f"cannot read .npz file {self.name}: {exc}") from exc
            if stamp != self._mapped_stamp:
                raise ValueError(f"{self.name}: the file changed since the dataset was opened")
        return self._images

    def _open_images(self) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
        """The split's image array (memory-mapped, or loaded when compressed) and, when mapped,
        the identity of the file it maps."""
        key = _KEYS[self.split][0]
        changed = f"{self.name}: field {key!r} changed since the dataset was opened"
        try:
            stamp = _stamp(self.name)
            with zipfile.ZipFile(self.name) as archive, open(self.name, "rb") as raw:
                member = _member(archive, raw, key, self.name)
                if member.shape != self._shape or member.dtype != np.uint8:
                    raise ValueError(changed)
                if member.offset is None:
                    return _read(archive, key, self.name), None
            try:
                images = np.memmap(
                    self.name, dtype=np.uint8, mode="r", offset=member.offset, shape=member.shape,
                    order="F" if member.fortran else "C",
                )
            except ValueError as exc:  # e.g. the file shrank since _member looked at it
                raise OSError(str(exc)) from exc
            if _stamp(self.name) != stamp:
                raise ValueError(changed)
        except (KeyError, *_READ_ERRORS) as exc:
            raise ValueError(f"cannot read field {key!r} of .npz file {self.name}: {exc}") from exc
        return images, stamp

    def __len__(self) -> int:
        return self._shape[0]

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    @property
    def labels(self) -> np.ndarray:
        return self._labels.copy()

    @property
    def channels(self) -> int:
        return 1 if len(self._shape) == 3 else self._shape[3]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self._shape[1], self._shape[2])

    def _load(self, index: int) -> np.ndarray:
        image = self._array()[index]
        # np.array, not .copy(): a plain C-ordered ndarray, never an np.memmap view of the file.
        return np.array(image[..., None] if image.ndim == 2 else image, order="C")
