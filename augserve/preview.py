"""``augserve preview``: a PNG grid of originals (first column) and augmented variants beside them."""

from __future__ import annotations

import cv2
import numpy as np

import pipelines
from pipelines.pipeline import as_uint8_numpy

from .sources import iter_images, SkipStats


def _fit(image: np.ndarray, cell: int) -> np.ndarray:
    """Letterbox an H×W×C uint8 image into a cell×cell RGB tile (aspect kept, grey padding)."""
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    height, width = image.shape[:2]
    factor = cell / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_NEAREST  # keep small digits crisp
    resized = cv2.resize(image, size, interpolation=interpolation)
    tile = np.full((cell, cell, 3), 48, dtype=np.uint8)
    top, left = (cell - resized.shape[0]) // 2, (cell - resized.shape[1]) // 2
    tile[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return tile


def render_grid(source, spec, backend: str = "albumentations", rows: int = 4, variants: int = 6, cell: int = 160, seed: int = 0, stats: SkipStats | None = None) -> np.ndarray:
    """RGB uint8 grid: ``rows`` images from ``source``, each followed by ``variants`` augmentations
    (epochs 0..variants-1 of that sample under ``seed``). The spec's ``normalize`` is left out so the
    pixels stay viewable."""
    pipe = pipelines.build(pipelines.resolve(spec).without_normalize(), backend=backend)
    step = max(1, len(source) // rows)
    indices = list(range(0, len(source), step))[:rows]
    lines = []
    for index, image, _label in iter_images(source, indices, on_error="skip", stats=stats):
        tiles = [_fit(image, cell)]
        for epoch in range(variants):
            out = as_uint8_numpy(pipe([image], seed=seed, epoch=epoch, sample_ids=[index]))[0]
            tiles.append(_fit(out, cell))
        separator = np.full((cell, 4, 3), 255, dtype=np.uint8)
        lines.append(np.concatenate([tiles[0], separator, *tiles[1:]], axis=1))
    if not lines:
        raise ValueError("preview found no readable images in the dataset")
    return np.concatenate(lines, axis=0)


def write_png(path: str, grid: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not encode a PNG for {path}")
    try:
        encoded.tofile(path)
    except OSError as exc:
        raise ValueError(f"cannot write {path}: {exc.strerror}") from None
