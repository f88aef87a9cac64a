"""The ``val`` split: a deterministic hold-out carved from a dataset's train split.

``open_dataset(name, "val", val_fraction=0.1, val_seed=0)`` is the held-out part of the train split;
``open_dataset(name, "train", val_fraction=0.1, val_seed=0)`` is the rest. The two never share a
sample and together are the whole train split. ``test`` ignores the two options, so one trainer can
pass the same ``dataset_options`` to every stream it opens (and a resume fingerprint, which holds
the options, cannot switch hold-outs). Without ``val_fraction`` the train split is whole, as before.

The hold-out is stratified: from every class, the ``round(count × fraction)`` samples whose
SplitMix64 hash of ``(val_seed, index)`` is smallest — a pure function of the seed, the labels and the
indices, the same on every machine and numpy version, whatever order samples are read in.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Source

VAL_OPTIONS = ("val_fraction", "val_seed")


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 values (wrapping arithmetic)."""
    z = values.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def check_val_options(fraction: object, seed: object) -> tuple[float, int]:
    """``(fraction, seed)`` validated: a fraction in (0, 1) and a seed in [0, 2^63)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"dataset option val_fraction must be a number strictly between 0 and 1, got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 1 << 63:
        raise ValueError(f"dataset option val_seed must be an integer >= 0, got {seed!r}")
    return float(fraction), int(seed)


def holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask (N,): which samples of a train split with these ``labels`` are held out."""
    labels = np.asarray(labels)
    order = _splitmix64(np.arange(len(labels), dtype=np.uint64) ^ np.uint64(_splitmix64(np.array([seed]))[0]))
    held = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(len(members) * fraction))
        if count:
            held[members[np.argsort(order[members], kind="stable")[:count]]] = True
    return held


class HeldOut(Source):
    """The ``train`` or ``val`` part of ``base`` (a train split) under a hold-out; indices are re-numbered
    0..len-1 in the base's order. Files are read, checked and decoded by ``base``."""

    def __init__(self, base: Source, part: str, fraction: float, seed: int) -> None:
        if part not in ("train", "val"):
            raise ValueError(f"a hold-out has a 'train' and a 'val' part, got {part!r}")
        if base.split != "train":
            raise ValueError(f"a hold-out is carved from a train split, got {base.split!r}")
        options: dict[str, Any] = {**base.options, "val_fraction": fraction, "val_seed": seed}
        super().__init__(base.name, part, options)
        self.base = base
        held = holdout(base.labels, fraction, seed)
        self.indices = np.flatnonzero(held if part == "val" else ~held)
        if len(self.indices) == 0:
            raise ValueError(f"dataset {base.name!r}: val_fraction={fraction} leaves the {part} split empty ({len(held)} train samples)")

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def classes(self) -> list[str]:
        return self.base.classes

    @property
    def labels(self) -> np.ndarray:
        return self.base.labels[self.indices]

    @property
    def channels(self) -> int:
        return self.base.channels

    @property
    def image_size(self) -> tuple[int, int] | None:
        return self.base.image_size

    def _load(self, index: int) -> np.ndarray:
        return self.base.load(int(self.indices[index]))

    def _load_encoded(self, index: int):
        return self.base.load_encoded(int(self.indices[index]))

    def decode(self, encoded, box=None, max_factor: int = 1):
        return self.base.decode(encoded, box, max_factor)
