"""``shapes``: procedurally drawn colored shapes on textured backgrounds, labelled by shape.

Images are RGB uint8 (size, size, 3). Image ``i`` is a pure function of (seed, split, i, size),
drawn on demand by ``load(i)``: its random numbers come from ``SeedSequence([seed, split id, i])``,
so any worker can draw any image without generating the ones before it, and train and test
(split ids 0 and 1) never share an image. Shapes are drawn in coordinates relative to the image
side, so the same (seed, split, i) gives the same picture at every ``size``.

Color, position, scale (circumradius 18–38 % of the side) and rotation are random, and the
background is a gradient, stripes or smooth noise in other random colors, so the task is
learnable but not solvable from a single pixel statistic.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from .base import Source, check_split
from .registry import register_builtin

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
DEFAULT_N = {"train": 2000, "test": 500}
_SPLIT_IDS = {"train": 0, "test": 1}
_LABEL_STREAM = 0x1ABE1  # a 4th SeedSequence word keeps label draws apart from image draws
_SUBPIXEL_BITS = 4  # cv2 drawing with fixed-point vertices: 1/16-pixel precision

# Images are generated on demand, but epoch plans hold every id: bound what a request can make a
# daemon allocate (10M ids = 80 MB per permutation).
MAX_N = 10_000_000


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"shapes option {name} must be an int, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"shapes option {name} must be in [{low}, {high}], got {value!r}")
    return int(value)


def _polygon(label: str) -> np.ndarray:
    """Vertices (K, 2) of ``label``'s outline around the origin, circumradius about 1."""
    if label == "square":
        angles = np.arange(4) * (np.pi / 2) + np.pi / 4
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if label == "triangle":
        angles = np.arange(3) * (2 * np.pi / 3)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if label == "star":
        angles = np.arange(10) * (np.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if label == "cross":
        w = 0.3  # half-width of an arm
        return np.array(
            [(w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
             (-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w)], dtype=np.float64
        )
    raise ValueError(f"no polygon for shape {label!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float32 (size, size, 3) texture in 0..255 blending two nearby random colors."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(3)
    angle = rng.uniform(0, 2 * np.pi)
    along = xx * np.float32(math.cos(angle)) + yy * np.float32(math.sin(angle))
    if kind == 0:  # linear gradient
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    elif kind == 1:  # stripes, 2–8 periods across the image
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 8) * along + rng.uniform(0, 2 * np.pi))
    else:  # smooth noise: a coarse random grid, interpolated up
        cells = int(rng.integers(3, 9))
        coarse = rng.random((cells, cells), dtype=np.float32)
        t = np.clip(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC), 0, 1)
    # The second color stays near the first so the background has less contrast than the shape.
    c0 = rng.uniform(0, 255, 3)
    c1 = np.clip(c0 + rng.uniform(-90, 90, 3), 0, 255)
    return (c0 + t[..., None] * (c1 - c0)).astype(np.float32)


def _shape_color(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random RGB color at least 120 (Euclidean, 0..255 scale) away from the background mean."""
    mean = background.reshape(-1, 3).mean(axis=0)
    for _ in range(8):
        color = rng.uniform(0, 255, 3)
        if np.linalg.norm(color - mean) >= 120:
            return color
    # Rare (grey backgrounds): fall back to whichever of black and white is farther.
    return np.zeros(3) if mean.sum() > 3 * 127.5 else np.full(3, 255.0)


def _shape_mask(rng: np.random.Generator, label: str, size: int) -> np.ndarray:
    """uint8 (size, size) coverage of the shape, 0..255, anti-aliased."""
    radius = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0, 2 * np.pi)
    mask = np.zeros((size, size), dtype=np.uint8)
    one = 1 << _SUBPIXEL_BITS

    def fixed(value: float) -> int:
        return int(round(value * one))

    if label in ("circle", "ring"):
        # Radius factors keep the areas of round shapes comparable to the polygons'.
        outer = 0.8 if label == "circle" else 0.9
        cv2.circle(mask, (fixed(cx), fixed(cy)), fixed(outer * radius), 255, -1, cv2.LINE_AA, _SUBPIXEL_BITS)
        if label == "ring":
            cv2.circle(mask, (fixed(cx), fixed(cy)), fixed(0.5 * radius), 0, -1, cv2.LINE_AA, _SUBPIXEL_BITS)
        return mask
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    points = _polygon(label) @ rotation.T * radius + (cx, cy)
    cv2.fillPoly(mask, [np.rint(points * one).astype(np.int32)], 255, cv2.LINE_AA, _SUBPIXEL_BITS)
    return mask


def render(seed: int, split_id: int, index: int, label: int, size: int) -> np.ndarray:
    """Draw one image: RGB uint8 (size, size, 3) of shape ``CLASSES[label]``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_id, index]))
    background = _background(rng, size)
    color = _shape_color(rng, background).astype(np.float32)
    alpha = _shape_mask(rng, CLASSES[label], size)[..., None].astype(np.float32) / 255.0
    image = background * (1.0 - alpha) + color * alpha
    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)  # sensor-like grain
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


class ShapesSource(Source):
    """The ``shapes`` dataset; see the module docstring.

    Options: ``size`` (image side in pixels, default 64), ``n`` (number of images, default 2000 for
    train and 500 for test), ``seed`` (non-negative int, default 0).
    """

    def __init__(self, split: str = "train", *, size: int = 64, n: int | None = None, seed: int = 0) -> None:
        split = check_split(split, ("train", "test"), "shapes")
        self.size = _check_int("size", size, 16, 4096)
        self.n = DEFAULT_N[split] if n is None else _check_int("n", n, 1, MAX_N)
        self.seed = _check_int("seed", seed, 0, 2**63 - 1)
        super().__init__("shapes", split, {"size": self.size, "n": self.n, "seed": self.seed})
        self._split_id = _SPLIT_IDS[split]

    def _block_labels(self, block: int) -> np.ndarray:
        # Labels come in blocks of len(CLASSES), each a random permutation: every class is present
        # once n >= len(CLASSES), counts differ by at most one, and label i depends on i alone (not n).
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._split_id, block, _LABEL_STREAM]))
        return rng.permutation(len(CLASSES))

    def _label(self, index: int) -> int:
        block, position = divmod(index, len(CLASSES))
        return int(self._block_labels(block)[position])

    def __len__(self) -> int:
        return self.n

    @property
    def classes(self) -> list[str]:
        return list(CLASSES)

    @functools.cached_property
    def _labels(self) -> np.ndarray:
        blocks = -(-self.n // len(CLASSES))
        labels = np.concatenate([self._block_labels(b) for b in range(blocks)])[: self.n].astype(np.int64)
        labels.setflags(write=False)
        return labels

    @property
    def labels(self) -> np.ndarray:
        return self._labels.copy()

    @property
    def channels(self) -> int:
        return 3

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.size, self.size)

    def _load(self, index: int) -> np.ndarray:
        return render(self.seed, self._split_id, index, self._label(index), self.size)


@register_builtin("shapes")
def build_shapes(split: str = "train", *, size: int = 64, n: int | None = None, seed: int = 0) -> ShapesSource:
    return ShapesSource(split, size=size, n=n, seed=seed)
