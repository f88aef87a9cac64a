"""A tiny name → object registry that refuses duplicates: ops, backends, presets, datasets and models
all register through it."""

from __future__ import annotations

import fnmatch
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects. Registering a name twice is an error; looking up an unknown name raises
    ``ValueError`` listing the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items:
            old = self._items[name]
            owner = f"{old.__module__}.{getattr(old, '__qualname__', '')}".rstrip(".") if callable(old) else ""
            raise ValueError(f"{self.kind} {name!r} is already registered" + (f" (by {owner})" if owner else ""))
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add` (the name is checked at once, the item when it arrives)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        return lambda item: self.add(name, item)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise ValueError(f"unknown {self.kind} {name!r}: expected one of {known}") from None

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted names, optionally filtered by a shell-style ``pattern`` (``"resnet*"``)."""
        names = sorted(self._items)
        return names if pattern is None else fnmatch.filter(names, pattern)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
