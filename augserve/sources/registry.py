"""Registry of the built-in datasets, looked up by name.

A builder is a plain function ``builder(split, **options) -> Source``; options are keyword-only
so that a config file can name them and a bad one fails with a message naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from pipelines.registry import Registry

if TYPE_CHECKING:
    from .base import Source

Builder = Callable[..., "Source"]

_BUILTINS: Registry[Builder] = Registry("dataset")


def register_builtin(name: str) -> Callable[[Builder], Builder]:
    """Decorator that registers ``builder`` under ``name``; a second registration raises."""
    return _BUILTINS.register(name)


def builtin_names() -> list[str]:
    """Names of the built-in datasets, sorted."""
    return _BUILTINS.names()


def get_builtin(name: str) -> Builder | None:
    """The builder registered under ``name``, or None."""
    return _BUILTINS.get(name) if name in _BUILTINS else None
