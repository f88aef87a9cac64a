"""``digits``: scikit-learn's 1,797 real 8×8 handwritten digits, upsampled to 32×32 grey.

Images are uint8 (32, 32, 1), values 0..255; labels 0..9 with classes "0".."9". The data ship
inside scikit-learn, so nothing is downloaded. A fixed stratified 80/20 train/test split is
defined by a hash of the sample index, so it is identical on every machine and library version.
"""

from __future__ import annotations

import functools
import hashlib

import cv2
import numpy as np

from .base import Source, check_split
from .registry import register_builtin

SIZE = 32
TEST_FRACTION = 0.2
_SPLIT_KEY = b"augserve-digits-split-v1"
_CLASSES = [str(d) for d in range(10)]


def _split_rank(index: int) -> int:
    # A cryptographic hash rather than a seeded numpy/sklearn shuffle: RNG streams and
    # train_test_split internals may change between versions; blake2b of a fixed key will not.
    digest = hashlib.blake2b(b"%d" % index, key=_SPLIT_KEY, digest_size=8).digest()
    return int.from_bytes(digest, "little")


@functools.lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(images uint8 (1797, 32, 32, 1), labels int64 (1797,), {split: sorted sample indices}).

    Cached per process (about 1.8 MB) and read-only so no caller can alter another's data.
    """
    from sklearn.datasets import load_digits  # deferred: importing sklearn costs ~0.5 s

    bunch = load_digits()
    raw = bunch.images.astype(np.float32) * (255.0 / 16.0)  # sklearn's pixel values are 0..16
    # Cubic interpolation gives smooth strokes instead of 4×4 blocks; it overshoots, hence the clip.
    images = np.stack([cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC) for img in raw])
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)

    test = []
    for digit in range(len(_CLASSES)):
        members = np.flatnonzero(labels == digit)
        n_test = int(round(TEST_FRACTION * len(members)))
        ranked = sorted(members.tolist(), key=_split_rank)
        test.extend(ranked[:n_test])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test] = True
    splits = {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}

    for array in (images, labels, *splits.values()):
        array.setflags(write=False)
    return images, labels, splits


class DigitsSource(Source):
    """The ``digits`` dataset; see the module docstring."""

    def __init__(self, split: str = "train") -> None:
        super().__init__("digits", check_split(split, ("train", "test"), "digits"))

    @property
    def indices(self) -> np.ndarray:
        """Positions of this split's images in scikit-learn's original order, int64, sorted."""
        return _arrays()[2][self.split]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def classes(self) -> list[str]:
        return list(_CLASSES)

    @property
    def labels(self) -> np.ndarray:
        return _arrays()[1][self.indices]

    @property
    def channels(self) -> int:
        return 1

    @property
    def image_size(self) -> tuple[int, int]:
        return (SIZE, SIZE)

    def _load(self, index: int) -> np.ndarray:
        images, _, splits = _arrays()
        return images[splits[self.split][index]].copy()


@register_builtin("digits")
def build_digits(split: str = "train") -> DigitsSource:
    return DigitsSource(split)
