"""Iterating over a source while skipping (and counting) or raising on corrupt files."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from .base import Source
from .errors import CorruptImageError

logger = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")


@dataclass
class SkipStats:
    """Corrupt images skipped so far: a count, and the first ``max_paths`` paths.

    The path list is capped so a dataset with millions of bad files cannot grow it without bound.
    """

    skipped: int = 0
    paths: list[str] = field(default_factory=list)
    max_paths: int = 100

    def record(self, path: str) -> None:
        self.skipped += 1
        if len(self.paths) < self.max_paths:
            self.paths.append(path)


def iter_images(
    source: Source,
    indices: Iterable[int] | None = None,
    on_error: str = "skip",
    stats: SkipStats | None = None,
) -> Iterator[tuple[int, np.ndarray, int]]:
    """Yield ``(index, image, label)`` for each of ``indices`` (default: every image, in order).

    ``image`` is what ``source.load(index)`` returns (uint8 HWC); ``label`` is an int.
    With ``on_error="skip"`` an image that raises ``CorruptImageError`` is logged with its path,
    recorded in ``stats`` (when given) and left out; with ``"raise"`` the error propagates.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if stats is not None and not isinstance(stats, SkipStats):
        raise TypeError(f"stats must be a SkipStats or None, got {type(stats).__name__}")
    # Validation above runs at call time; the generator below only starts on the first next().
    return _iterate(source, range(len(source)) if indices is None else indices, on_error, stats)


def _iterate(
    source: Source, indices: Iterable[int], on_error: str, stats: SkipStats | None
) -> Iterator[tuple[int, np.ndarray, int]]:
    labels = source.labels  # fetched once: sources return a fresh array per access
    for index in indices:
        try:
            image = source.load(index)  # range-checks index before it is used on labels
        except CorruptImageError as exc:
            if on_error == "raise":
                raise
            logger.warning("skipping %s", exc)
            if stats is not None:
                stats.record(exc.path)
            continue
        yield int(index), image, int(labels[index])
