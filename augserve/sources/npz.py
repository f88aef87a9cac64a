"""``.npz`` arrays: a NumPy archive of uint8 images and integer labels.

Keys:
  ``images``       uint8, (N, H, W, C) with C in {1, 3} (RGB), or (N, H, W) meaning C = 1
  ``labels``       any integer dtype, (N,), values >= 0
  ``images_test``, ``labels_test``  optional, the same for the "test" split
  ``classes``      optional, strings, (K,), K > every label; otherwise classes are "0".."max label"

Construction reads only the array headers and the labels; the image array of the split is loaded
into memory on the first ``load`` (an ``.npz`` member cannot be memory-mapped).
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from .base import Source, check_split

_KEYS = {"train": ("images", "labels"), "test": ("images_test", "labels_test")}


def _header(archive: zipfile.ZipFile, key: str, path: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of member ``key`` without reading its data."""
    try:
        with archive.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # rarer header versions: let numpy parse the whole member
                with np.load(path, allow_pickle=False) as data:
                    array = data[key]
                    shape, dtype = array.shape, array.dtype
    except ValueError as exc:
        raise ValueError(f"{path}: cannot read field {key!r}: {exc}") from exc
    return tuple(shape), np.dtype(dtype)


def _read(data, key: str, path: str) -> np.ndarray:
    try:
        return data[key]
    except ValueError as exc:  # e.g. an object array, which would need pickle to load
        raise ValueError(f"{path}: cannot read field {key!r}: {exc}") from exc


def _check_images(shape: tuple[int, ...], dtype: np.dtype, key: str, path: str) -> None:
    if dtype != np.uint8:
        raise ValueError(f"{path}: field {key!r} must have dtype uint8, got {dtype}")
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise ValueError(f"{path}: field {key!r} must have shape N×H×W×C with C in {{1, 3}} or N×H×W, got {shape}")
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise ValueError(f"{path}: field {key!r} is empty, shape {shape}")


def _check_labels(labels: np.ndarray, n: int, key: str, path: str) -> np.ndarray:
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: field {key!r} must have an integer dtype, got {labels.dtype}")
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"{path}: field {key!r} must have shape ({n},) to match the images, got {labels.shape}")
    if labels.min() < 0:
        raise ValueError(f"{path}: field {key!r} has negative label {labels.min()}")
    return labels.astype(np.int64)


class NpzSource(Source):
    """Images and labels from an ``.npz`` file; see the module docstring.

    ``name`` is the path as given, so ``open_dataset(src.name, src.split)`` re-opens it.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train") -> None:
        name = os.fspath(path)
        try:
            archive = zipfile.ZipFile(name)
        except FileNotFoundError:
            raise ValueError(f".npz file does not exist: {name}") from None
        except (OSError, zipfile.BadZipFile) as exc:
            raise ValueError(f"cannot read .npz file {name}: {exc}") from exc
        try:
            with archive, np.load(name, allow_pickle=False) as data:
                members = set(data.files)
                for key in _KEYS["train"]:
                    if key not in members:
                        raise ValueError(f"{name}: missing field {key!r} (found: {', '.join(sorted(members))})")
                splits = ("train", "test") if set(_KEYS["test"]) <= members else ("train",)
                super().__init__(name, check_split(split, splits, name))
                label_sets = {}
                for s in splits:
                    images_key, labels_key = _KEYS[s]
                    shape, dtype = _header(archive, images_key, name)
                    _check_images(shape, dtype, images_key, name)
                    label_sets[s] = _check_labels(_read(data, labels_key, name), shape[0], labels_key, name)
                    if s == split:
                        self._shape = shape
                classes = _read(data, "classes", name) if "classes" in members else None
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
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

    def _array(self) -> np.ndarray:
        if self._images is None:
            key = _KEYS[self.split][0]
            try:
                with np.load(self.name, allow_pickle=False) as data:
                    images = data[key]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
                raise ValueError(f"cannot read field {key!r} of .npz file {self.name}: {exc}") from exc
            if images.shape != self._shape or images.dtype != np.uint8:
                raise ValueError(f"{self.name}: field {key!r} changed since the dataset was opened")
            self._images = images
        return self._images

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
        return (image[..., None] if image.ndim == 2 else image).copy()
