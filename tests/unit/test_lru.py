"""Unit tests for augserve.lru.LRUCache."""

from __future__ import annotations

import threading
import time

import pytest

from augserve.lru import LRUCache


def recorder():
    evicted: list[tuple[str, int]] = []
    return evicted, lambda key, value: evicted.append((key, value))


def test_maxsize_validation():
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"maxsize must be at least 1, got {bad}"):
            LRUCache(bad)
    with pytest.raises(TypeError, match="maxsize"):
        LRUCache(2.0)
    with pytest.raises(TypeError, match="maxsize"):
        LRUCache(True)
    with pytest.raises(TypeError, match="on_evict"):
        LRUCache(2, on_evict=3)


def test_eviction_order_follows_use():
    evicted, on_evict = recorder()
    cache: LRUCache[str, int] = LRUCache(3, on_evict)
    for i, key in enumerate("abc"):
        cache.put(key, i)
    assert cache.keys() == ["a", "b", "c"] and len(cache) == 3 and evicted == []
    assert cache.get("a") == 0  # a is now the most recently used
    assert "b" in cache  # membership is not use
    cache.put("d", 3)
    assert evicted == [("b", 1)]
    assert cache.keys() == ["c", "a", "d"]
    assert "b" not in cache and cache.get("b") is None and cache.get("b", -1) == -1
    cache.put("c", 20)  # re-putting refreshes and replaces
    assert evicted == [("b", 1), ("c", 2)]
    cache.put("e", 4)
    assert evicted == [("b", 1), ("c", 2), ("a", 0)]
    assert cache.keys() == ["d", "c", "e"]
    assert cache.get("c") == 20


def test_put_same_object_is_not_evicted():
    evicted, on_evict = recorder()
    cache = LRUCache(2, on_evict)
    value = object()
    cache.put("k", value)
    cache.put("k", value)
    assert evicted == [] and len(cache) == 1


def test_maxsize_one():
    evicted, on_evict = recorder()
    cache = LRUCache(1, on_evict)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.keys() == ["b"] and evicted == [("a", 1)]


def test_pop_and_clear():
    evicted, on_evict = recorder()
    cache = LRUCache(4, on_evict)
    for i, key in enumerate("abc"):
        cache.put(key, i)
    assert cache.pop("b") == 1 and cache.pop("b") is None and cache.pop("b", 9) == 9
    assert evicted == []  # popped values belong to the caller
    cache.get("a")
    cache.clear()
    assert evicted == [("c", 2), ("a", 0)] and len(cache) == 0 and cache.keys() == []


def test_get_or_create():
    evicted, on_evict = recorder()
    cache = LRUCache(2, on_evict)
    calls = []

    def make(value):
        def factory():
            calls.append(value)
            return value
        return factory

    assert cache.get_or_create("a", make(1)) == 1
    assert cache.get_or_create("a", make(99)) == 1  # cached: no second call
    assert calls == [1]
    cache.get_or_create("b", make(2))
    cache.get_or_create("a", make(99))  # use a, so b is the oldest
    cache.get_or_create("c", make(3))
    assert evicted == [("b", 2)] and cache.keys() == ["a", "c"]


def test_get_or_create_factory_error_stores_nothing():
    cache = LRUCache(2)

    def broken():
        raise OSError("no such dataset")

    with pytest.raises(OSError, match="no such dataset"):
        cache.get_or_create("a", broken)
    assert "a" not in cache
    assert cache.get_or_create("a", lambda: 5) == 5  # a later try runs the factory again


def test_get_or_create_recursion_raises():
    cache = LRUCache(2)
    with pytest.raises(RuntimeError, match="asked for 'a' again"):
        cache.get_or_create("a", lambda: cache.get_or_create("a", lambda: 1))
    assert "a" not in cache


def test_on_evict_runs_outside_the_lock_and_errors_propagate():
    seen = []

    def on_evict(key, value):
        seen.append((key, value, len(cache)))  # would deadlock if called under the lock
        if key == "a":
            raise RuntimeError("close failed")

    cache = LRUCache(1, on_evict)
    cache.put("a", 1)
    with pytest.raises(RuntimeError, match="close failed"):
        cache.put("b", 2)
    assert cache.keys() == ["b"] and seen == [("a", 1, 1)]
    cache.put("c", 3)
    assert seen[-1] == ("b", 2, 1)


def test_clear_hands_over_every_value_even_when_one_callback_fails():
    seen = []

    def on_evict(key, value):
        seen.append(key)
        raise ValueError(key)

    cache = LRUCache(3, on_evict)
    for key in "xyz":
        cache.put(key, 0)
    with pytest.raises(ValueError, match="x"):
        cache.clear()
    assert seen == ["x", "y", "z"] and len(cache) == 0


def test_concurrent_get_or_create_calls_factory_once():
    cache = LRUCache(4)
    calls = []
    started = threading.Event()

    def slow():
        calls.append(1)
        started.set()
        time.sleep(0.2)
        return object()

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_create("k", slow))) for _ in range(6)]
    threads[0].start()
    started.wait(5)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert len(results) == 6 and all(r is results[0] for r in results)


def test_concurrent_waiters_see_the_factory_error():
    cache = LRUCache(4)
    started, release = threading.Event(), threading.Event()

    def failing():
        started.set()
        release.wait(5)
        raise KeyError("boom")

    errors = []

    def call():
        try:
            cache.get_or_create("k", failing)
        except KeyError as exc:
            errors.append(exc)

    first = threading.Thread(target=call)
    first.start()
    started.wait(5)
    waiter = threading.Thread(target=call)
    waiter.start()
    time.sleep(0.05)
    release.set()
    first.join(10)
    waiter.join(10)
    assert len(errors) == 2 and "k" not in cache


def test_threads_hammering_keep_the_bound():
    evicted = []
    lock = threading.Lock()

    def on_evict(key, value):
        with lock:
            evicted.append(key)

    cache = LRUCache(8, on_evict)
    sizes = []

    def work(offset):
        for i in range(2000):
            key = (offset * 7 + i) % 50
            if i % 3:
                cache.put(key, i)
            else:
                cache.get_or_create(key, lambda: -1)
            sizes.append(len(cache))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(sizes) == 8000 and max(sizes) <= 8
    assert len(cache) == 8 and len(set(cache.keys())) == 8
    assert len(evicted) > 0
