"""Fitting ``pca_color``'s eigen-pairs on a dataset: the RGB covariance in one streaming pass.

Memory stays bounded whatever the dataset size: only a pixel count, a 3-vector of sums and a 3×3 matrix
of sums of products are kept (float64, pixel values on the 0–1 scale, as in the AlexNet paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .spec import PcaColor, PipelineSpec


class RgbCovariance:
    """Streaming accumulator of the RGB covariance of uint8 H×W×3 images."""

    def __init__(self) -> None:
        self.pixels = 0
        self.images = 0
        self._sum = np.zeros(3)
        self._products = np.zeros((3, 3))

    def update(self, image: np.ndarray) -> None:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"fit-pca needs RGB uint8 H×W×3 images, got {image.dtype} of shape {image.shape}")
        values = image.reshape(-1, 3).astype(np.float64) / 255.0
        self.pixels += values.shape[0]
        self.images += 1
        self._sum += values.sum(axis=0)
        self._products += values.T @ values

    def mean(self) -> np.ndarray:
        return self._sum / max(self.pixels, 1)

    def covariance(self) -> np.ndarray:
        if self.pixels < 2:
            raise ValueError("fit-pca needs at least one image with two pixels")
        mean = self.mean()
        return self._products / self.pixels - np.outer(mean, mean)


@dataclass(frozen=True)
class PcaFit:
    """Eigen-pairs of an RGB covariance: ``eigval`` descending, ``eigvec`` columns the eigenvectors."""

    eigval: tuple[float, float, float]
    eigvec: tuple[tuple[float, float, float], ...]
    mean: tuple[float, float, float]
    images: int
    pixels: int

    def to_dict(self) -> dict:
        return {"eigval": list(self.eigval), "eigvec": [list(r) for r in self.eigvec], "mean": list(self.mean), "images": self.images, "pixels": self.pixels}


def eigen_pairs(covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, clipped at 0) and eigenvectors (columns; each with a non-negative sum,
    a fixed sign so that refits give identical output)."""
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    signs = np.where(vectors.sum(axis=0) < 0, -1.0, 1.0)
    return values, vectors * signs


def fit(images: Iterable[np.ndarray]) -> PcaFit:
    """Fit on an iterable of RGB uint8 H×W×3 images (one pass)."""
    accumulator = RgbCovariance()
    for image in images:
        accumulator.update(image)
    if accumulator.images == 0:
        raise ValueError("fit-pca found no readable RGB images")
    values, vectors = eigen_pairs(accumulator.covariance())
    return PcaFit(
        eigval=tuple(float(v) for v in values),
        eigvec=tuple(tuple(float(v) for v in row) for row in vectors),
        mean=tuple(float(v) for v in accumulator.mean()),
        images=accumulator.images,
        pixels=accumulator.pixels,
    )


def with_fit(spec: PipelineSpec, result: PcaFit) -> PipelineSpec:
    """``spec`` with every ``pca_color`` op using the fitted eigen-pairs (error if it has none)."""
    if not any(isinstance(op, PcaColor) for op in spec.ops):
        raise ValueError(f"pipeline {spec.name or 'spec'!r} has no pca_color op to write the eigen-pairs into")
    ops = [op.model_copy(update={"eigval": result.eigval, "eigvec": result.eigvec}) if isinstance(op, PcaColor) else op for op in spec.ops]
    return PipelineSpec.model_validate({**spec.to_dict(), "ops": [op.model_dump(mode="json") for op in ops]})
