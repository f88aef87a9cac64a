"""Registry of the built-in datasets, looked up by name.

A builder is a plain function ``builder(split, **options) -> Source``; options are keyword-only
so that a config file can name them and a bad one fails with a message naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .base import Source

Builder = Callable[..., "Source"]

_BUILTINS: dict[str, Builder] = {}


def register_builtin(name: str) -> Callable[[Builder], Builder]:
    """Decorator that registers ``builder`` under ``name``; a second registration raises."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"dataset name must be a non-empty str, got {name!r}")

    def decorator(builder: Builder) -> Builder:
        if name in _BUILTINS:
            raise ValueError(f"dataset {name!r} is already registered (by {_BUILTINS[name].__module__})")
        _BUILTINS[name] = builder
        return builder

    return decorator


def builtin_names() -> list[str]:
    """Names of the built-in datasets, sorted."""
    return sorted(_BUILTINS)


def get_builtin(name: str) -> Builder | None:
    """The builder registered under ``name``, or None."""
    return _BUILTINS.get(name)
