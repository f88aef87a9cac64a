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
from .holdout import VAL_OPTIONS, HeldOut, check_val_options
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

    ``split`` is "train", "val" or "test". "val" is a hold-out carved from the train split and needs
    the option ``val_fraction`` (``val_seed`` too, default 0); "train" with the same options is the
    rest of it, and "test" ignores them (see :mod:`augserve.sources.holdout`). The other ``options``
    are the dataset's keyword options (``shapes``:
    size, n, seed; ImageFolder: channels, max_pixels; ``.npz``: max_pixels, max_load_bytes).
    ``max_pixels`` caps the height × width of one image (default ``base.DEFAULT_MAX_PIXELS``,
    8192 × 8192); larger images are refused before they are decoded. A built-in name wins over a
    same-named local path.
    Raises a one-line ValueError for anything else.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"dataset must be a name or a path, got {type(name_or_path).__name__} {name_or_path!r}")
    held_out = {key: options.pop(key) for key in VAL_OPTIONS if key in options}
    if split == "val" and "val_fraction" not in held_out:
        raise ValueError(
            f"dataset {os.fspath(name_or_path)!r} has no 'val' split of its own: it is a hold-out carved from "
            "train — pass the dataset option val_fraction (e.g. 0.1; val_seed picks which samples)"
        )
    if held_out and split in ("train", "val"):
        if "val_fraction" not in held_out:
            raise ValueError("dataset option val_seed needs val_fraction too")
        fraction, seed = check_val_options(held_out["val_fraction"], held_out.get("val_seed", 0))
        return HeldOut(_open(name_or_path, "train", options), split, fraction, seed)
    return _open(name_or_path, split, options)


def _open(name_or_path: str | os.PathLike, split: str, options: dict[str, Any]) -> Source:
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
    raise _unknown(name_or_path)


def check_dataset_name(name_or_path: str | os.PathLike) -> None:
    """Raise :func:`open_dataset`'s one-line error for a name that is neither a built-in dataset nor
    an existing folder or ``.npz`` file — without opening anything (a caller that starts a daemon
    for it can fail first)."""
    path = Path(name_or_path)
    if isinstance(name_or_path, str) and get_builtin(name_or_path) is not None:
        return
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".npz"):
        return
    raise _unknown(name_or_path)


def _unknown(name_or_path: str | os.PathLike) -> ValueError:
    text = os.fspath(name_or_path)
    looks_like_path = os.sep in text or "/" in text or text.lower().endswith(".npz")
    missing = " (no such file or folder)" if looks_like_path and not Path(text).exists() else ""
    return ValueError(
        f"unknown dataset {text!r}{missing}: expected one of {', '.join(builtin_names())}, "
        "a folder of class sub-folders, or a .npz file"
    )
