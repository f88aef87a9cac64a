"""``photos``: the color photographs bundled with scikit-image, one class per photograph.

Images are RGB uint8 (H, W, 3) of varying sizes (300×451 up to 872×1000). There is only a
"train" split: with one image per class the set exists to preview and benchmark augmentation
(and to overfit on purpose), not to measure generalisation.

Only images stored inside the scikit-image wheel are used, so nothing is ever downloaded.
``skimage.data.cat`` is left out: it returns the same pixels as ``chelsea``, and two classes
sharing one image could never be told apart.
"""

from __future__ import annotations

import functools

import numpy as np

from .base import Source, check_split
from .registry import register_builtin

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "colorwheel",
)


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """Photo ``name`` as read-only RGB uint8 HWC, decoded once per process (about 6 MB for all)."""
    import skimage.data  # deferred: importing scikit-image is slow

    image = np.ascontiguousarray(getattr(skimage.data, name)(), dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"skimage.data.{name} is not an RGB image: shape {image.shape}")
    image.setflags(write=False)
    return image


class PhotosSource(Source):
    """The ``photos`` dataset; see the module docstring."""

    def __init__(self, split: str = "train") -> None:
        super().__init__("photos", check_split(split, ("train",), "photos"))

    def __len__(self) -> int:
        return len(PHOTOS)

    @property
    def classes(self) -> list[str]:
        return list(PHOTOS)

    @property
    def labels(self) -> np.ndarray:
        return np.arange(len(PHOTOS), dtype=np.int64)

    @property
    def channels(self) -> int:
        return 3

    def _load(self, index: int) -> np.ndarray:
        return _photo(PHOTOS[index]).copy()


@register_builtin("photos")
def build_photos(split: str = "train") -> PhotosSource:
    return PhotosSource(split)
