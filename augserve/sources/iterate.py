"""Iterating over a source while skipping (and counting) or raising on corrupt files."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from .base import Source
from .decode import EncodedImage
from .errors import CorruptImageError

logger = logging.getLogger(__name__)

_Item = TypeVar("_Item")

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


def _check(on_error: str, stats: SkipStats | None) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if stats is not None and not isinstance(stats, SkipStats):
        raise TypeError(f"stats must be a SkipStats or None, got {type(stats).__name__}")


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
    _check(on_error, stats)
    # Validation above runs at call time; the generator below only starts on the first next().
    return _iterate(source, source.load, range(len(source)) if indices is None else indices, on_error, stats)


def iter_encoded(
    source: Source,
    indices: Iterable[int] | None = None,
    on_error: str = "skip",
    stats: SkipStats | None = None,
) -> Iterator[tuple[int, EncodedImage | None, int]]:
    """Yield ``(index, encoded, label)`` for each of ``indices`` (default: every image, in order).

    ``encoded`` is what ``source.load_encoded(index)`` returns: the file read and checked but not
    decoded (``decode.EncodedImage``; decode it with ``source.decode``), or None for every index of
    a source that holds decoded arrays (use ``iter_images`` there). Files refused without decoding
    (unreadable, bad header, over the pixel cap, truncated) are skipped or raised as in
    ``iter_images``; a file that fails only when decoded raises from ``source.decode`` later.
    """
    _check(on_error, stats)
    return _iterate(source, source.load_encoded, range(len(source)) if indices is None else indices, on_error, stats)


def _iterate(
    source: Source,
    load: Callable[[int], _Item],
    indices: Iterable[int],
    on_error: str,
    stats: SkipStats | None,
) -> Iterator[tuple[int, _Item, int]]:
    labels = source.labels  # fetched once: sources return a fresh array per access
    for index in indices:
        try:
            item = load(index)  # range-checks index before it is used on labels
        except CorruptImageError as exc:
            if on_error == "raise":
                raise
            logger.warning("skipping %s", exc)
            if stats is not None:
                stats.record(exc.path)
            continue
        yield int(index), item, int(labels[index])
