"""``open_dataset``: one entry point from a dataset name or path to a ``Source``."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable

from .base import Source

# Imported for their @register_builtin side effect: the registry is filled when this package loads.
from . import digits, photos, shapes  # noqa: F401  isort: skip
from .folder import ImageFolder
from .npz import NpzSource
from .registry import builtin_names, get_builtin


def _check_options(dataset: str, factory: Callable[..., Source], options: dict[str, Any]) -> None:
    accepted = [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"dataset {dataset!r} does not accept option(s) {', '.join(unknown)}"
            f" (accepted: {', '.join(accepted) or 'none'})"
        )


def open_dataset(name_or_path: str | os.PathLike, split: str = "train", **options: Any) -> Source:
    """Open a dataset by built-in name, ImageFolder directory or ``.npz`` file.

    ``split`` is "train" or "test"; ``options`` are the dataset's keyword options (``shapes``:
    size, n, seed; ImageFolder: channels, max_pixels; ``.npz``: max_pixels, max_load_bytes).
    ``max_pixels`` caps the height × width of one image (default ``base.DEFAULT_MAX_PIXELS``,
    8192 × 8192); larger images are refused before they are decoded. A built-in name wins over a
    same-named local path.
    Raises a one-line ValueError for anything else.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"dataset must be a name or a path, got {type(name_or_path).__name__} {name_or_path!r}")
    if isinstance(name_or_path, str):
        builder = get_builtin(name_or_path)
        if builder is not None:
            _check_options(name_or_path, builder, options)
            return builder(split, **options)
    path = Path(name_or_path)
    if path.is_dir():
        _check_options(os.fspath(path), ImageFolder, options)
        return ImageFolder(name_or_path, split, **options)
    if path.is_file() and path.suffix.lower() == ".npz":
        _check_options(os.fspath(path), NpzSource, options)
        return NpzSource(name_or_path, split, **options)
    text = os.fspath(name_or_path)
    looks_like_path = os.sep in text or "/" in text or text.lower().endswith(".npz")
    missing = " (no such file or folder)" if looks_like_path and not path.exists() else ""
    raise ValueError(
        f"unknown dataset {text!r}{missing}: expected one of {', '.join(builtin_names())}, "
        "a folder of class sub-folders, or a .npz file"
    )
