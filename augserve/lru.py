"""``LRUCache``: a bounded, thread-safe mapping that lets go of the least recently used entry.

Meant for per-process caches of costly, resource-holding objects (opened datasets, built
pipelines) keyed by what identifies them, so that a long-lived process does not grow without bound
as clients come and go. ``on_evict`` is where such an object is closed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MISSING = object()


class LRUCache(Generic[K, V]):
    """At most ``maxsize`` entries; inserting beyond that evicts the least recently used one.

    "Used" means inserted (``put``, ``get_or_create``) or read (``get``, ``get_or_create``);
    ``in``, ``len`` and ``keys`` do not count as use.

    ``on_evict(key, value)`` is called for each value the cache lets go of on its own: an entry
    evicted beyond ``maxsize``, a value replaced by ``put`` with a different object, and every
    entry dropped by ``clear``. It is not called by ``pop``, which hands the value to the caller.
    It always runs after the cache's lock is released, so it may use the cache; an exception from
    it propagates from the call that evicted, once every evicted value has been handed over.

    All methods are safe to call from several threads. ``get_or_create`` calls ``factory``
    outside the lock and at most once at a time per key: concurrent callers for the same missing
    key wait for the first one's result (or its exception) instead of building a duplicate.
    """

    def __init__(self, maxsize: int, on_evict: Callable[[K, V], None] | None = None) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"maxsize must be an int, got {type(maxsize).__name__} {maxsize!r}")
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        if on_evict is not None and not callable(on_evict):
            raise TypeError(f"on_evict must be callable or None, got {on_evict!r}")
        self.maxsize = maxsize
        self._on_evict = on_evict
        self._data: OrderedDict[K, V] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        # Keys whose factory is running: the future the waiting callers block on, and its thread.
        self._pending: dict[K, tuple[Future, int]] = {}

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value of ``key`` (now the most recently used), or ``default``."""
        with self._lock:
            value = self._data.get(key, _MISSING)
            if value is _MISSING:
                return default
            self._data.move_to_end(key)
            return value  # type: ignore[return-value]

    def put(self, key: K, value: V) -> None:
        """Store ``value`` under ``key`` as the most recently used entry, evicting beyond ``maxsize``."""
        with self._lock:
            released = self._insert(key, value)
        self._release(released)

    def get_or_create(self, key: K, factory: Callable[[], V]) -> V:
        """The value of ``key``; when missing, ``factory()`` is called, stored and returned.

        An exception from ``factory`` propagates (to every caller waiting on that key) and stores
        nothing. A factory that asks the cache for its own key raises RuntimeError (it would wait
        for itself forever).
        """
        with self._lock:
            value = self._data.get(key, _MISSING)
            if value is not _MISSING:
                self._data.move_to_end(key)
                return value  # type: ignore[return-value]
            pending = self._pending.get(key)
            if pending is None:
                future: Future = Future()
                self._pending[key] = (future, threading.get_ident())
        if pending is not None:
            future, owner = pending
            if owner == threading.get_ident():
                raise RuntimeError(f"LRUCache.get_or_create: the factory for {key!r} asked for {key!r} again")
            return future.result()
        try:
            value = factory()
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            future.set_exception(exc)
            raise
        with self._lock:
            del self._pending[key]
            released = self._insert(key, value)
        future.set_result(value)
        self._release(released)
        return value

    def pop(self, key: K, default: V | None = None) -> V | None:
        """Remove ``key`` and return its value (``on_evict`` is not called), or ``default``."""
        with self._lock:
            return self._data.pop(key, default)

    def clear(self) -> None:
        """Remove every entry, calling ``on_evict`` for each, oldest first."""
        with self._lock:
            released = list(self._data.items())
            self._data.clear()
        self._release(released)

    def keys(self) -> list[K]:
        """The keys, least recently used first (a snapshot)."""
        with self._lock:
            return list(self._data)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data

    def __repr__(self) -> str:
        return f"LRUCache(maxsize={self.maxsize}, size={len(self)})"

    def _insert(self, key: K, value: V) -> list[tuple[K, V]]:
        """Store under the held lock; return the entries let go of, for ``_release``."""
        released = []
        old = self._data.pop(key, _MISSING)
        if old is not _MISSING and old is not value:
            released.append((key, old))
        self._data[key] = value
        while len(self._data) > self.maxsize:
            released.append(self._data.popitem(last=False))
        return released

    def _release(self, released: list[tuple[K, V]]) -> None:
        if self._on_evict is None:
            return
        first: BaseException | None = None
        for key, value in released:
            try:
                self._on_evict(key, value)
            except BaseException as exc:  # hand over the rest before raising
                if first is None:
                    first = exc
        if first is not None:
            raise first
