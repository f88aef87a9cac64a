"""The ``Source`` interface: an indexable, labelled collection of images.

Every source hands out images as ``np.ndarray`` of dtype uint8, layout HWC with C = 1 (grey) or
3 (RGB), C-contiguous and owned by the caller (safe to modify). Labels are int64 class ids that
index ``classes``.

Sources are opened by name + options inside each worker process, so construction must stay cheap
and heavy state (decoded arrays, file handles) is created lazily on first use. Pickling a source
pickles only ``(name, split, options)``; the receiver re-opens it.
"""

from __future__ import annotations

import abc
import operator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # annotations only: decode imports this module, never the other way round
    from .decode import EncodedImage, Placement

SPLITS = ("train", "val", "test")  # "val": a hold-out of train (sources.holdout), never a source's own

# The largest image, in pixels (height × width), a source hands out: 8192 × 8192, "64 MP".
# A corrupt or hostile file announcing 60000 × 60000 would otherwise make a worker allocate and
# decode ~10 GB. Sources that read files take ``max_pixels`` as an option to raise or lower it.
DEFAULT_MAX_PIXELS = 8192 * 8192


def check_max_pixels(value: object) -> int:
    """``value`` as a pixel cap: None means ``DEFAULT_MAX_PIXELS``; otherwise an int >= 1."""
    if value is None:
        return DEFAULT_MAX_PIXELS
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"max_pixels must be an integer number of pixels, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"max_pixels must be at least 1, got {value}")
    return int(value)


def check_split(split: object, available: tuple[str, ...], dataset: str) -> str:
    """Validate ``split`` against the known splits and those this dataset actually has."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split not in available:
        raise ValueError(f"dataset {dataset!r} has no {split!r} split (available: {', '.join(available)})")
    return split  # type: ignore[return-value]


def _reopen(name: str, split: str, options: dict[str, Any]) -> "Source":
    from .open import open_dataset  # deferred: open imports every source module

    return open_dataset(name, split=split, **options)


class Source(abc.ABC):
    """Base class of all datasets. Subclasses implement ``_load``, ``__len__`` and the properties."""

    def __init__(self, name: str, split: str, options: dict[str, Any] | None = None) -> None:
        # ``open_dataset(self.name, self.split, **self.options)`` must rebuild an equal source.
        self.name = name
        self.split = split
        self.options = dict(options or {})

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @property
    @abc.abstractmethod
    def classes(self) -> list[str]:
        """Class names; label ``k`` means ``classes[k]``."""

    @property
    @abc.abstractmethod
    def labels(self) -> np.ndarray:
        """Label of every image, int64, shape (N,)."""

    @property
    @abc.abstractmethod
    def channels(self) -> int:
        """Channels of every image: 1 (grey) or 3 (RGB)."""

    @property
    def image_size(self) -> tuple[int, int] | None:
        """``(height, width)`` in pixels when every image has it, else None."""
        return None

    @abc.abstractmethod
    def _load(self, index: int) -> np.ndarray:
        """Image ``index`` (already range-checked), uint8 HWC."""

    def _index(self, index: int) -> int:
        """``index`` as an int in range, or TypeError/IndexError naming it."""
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"image index must be an integer, got {index!r}") from None
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"image index {i} out of range for {self.name!r} ({self.split}, {n} images)")
        return i

    def load(self, index: int) -> np.ndarray:
        """Image ``index`` as a C-contiguous uint8 HWC array (C = ``channels``).

        Raises ``CorruptImageError`` (naming the file) for a file that cannot be decoded.
        """
        return np.ascontiguousarray(self._load(self._index(index)))

    def load_encoded(self, index: int) -> "EncodedImage | None":
        """Image ``index`` read and checked but not decoded (``decode.EncodedImage``: its oriented
        height and width are known), or None when this source holds decoded arrays (then use ``load``).

        Lets a worker sample an augmentation from the shape before decoding, then ``decode`` only
        what the augmentation keeps. Range-checked like ``load``; raises ``CorruptImageError``
        (naming the file) for a file refused without decoding (unreadable, bad header, over the
        pixel cap, truncated).
        """
        return self._load_encoded(self._index(index))

    def _load_encoded(self, index: int) -> "EncodedImage | None":
        """Image ``index`` (already range-checked) undecoded; None: this source holds arrays."""
        return None

    def decode(
        self, encoded: "EncodedImage", box: tuple[float, float, float, float] | None = None, max_factor: int = 1
    ) -> "tuple[np.ndarray, Placement]":
        """Decode what ``load_encoded`` returned, with this source's ``channels``: at least ``box``
        (x0, y0, x1, y1 of the oriented image; None: all of it) at up to 1/``max_factor`` scale.

        Returns ``(array, placement)`` as ``decode.decode_encoded`` does; with no box and
        ``max_factor=1`` the array equals ``load(index)``. Only sources whose ``load_encoded``
        returns images implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} holds decoded arrays: it has no encoded images to decode")

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary: name, split, size, num_classes, channels, image_size."""
        return {
            "name": self.name,
            "split": self.split,
            "size": len(self),
            "num_classes": len(self.classes),
            "channels": self.channels,
            "image_size": self.image_size,
        }

    def __reduce__(self):
        return (_reopen, (self.name, self.split, dict(self.options)))

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}{opts})"
