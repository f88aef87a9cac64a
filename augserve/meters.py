"""Running measurements the daemon reports: items per second over a window, and seconds per stage."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


@dataclass
class StageTotals:
    """Running totals of seconds per stage (load, augment, send) over the batches reported."""

    load: float = 0.0
    augment: float = 0.0
    send: float = 0.0
    batches: int = 0

    def add(self, load: float, augment: float, send: float) -> None:
        self.load += load
        self.augment += augment
        self.send += send
        self.batches += 1

    def mean_ms(self) -> dict:
        n = max(self.batches, 1)
        return {"load": 1000 * self.load / n, "augment": 1000 * self.augment / n, "send": 1000 * self.send / n}


class RateMeter:
    """Items per second over the last ``window`` seconds. Holds at most ``max_events`` events, so a
    flood of tiny batches cannot grow it: beyond that, neighbouring events are merged."""

    def __init__(self, window: float = 10.0, max_events: int = 1024) -> None:
        self.window = window
        self.max_events = max_events
        self.events: deque[tuple[float, int]] = deque()

    def add(self, count: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._expire(now)
        if len(self.events) >= self.max_events:
            stamp, previous = self.events.pop()
            count += previous
        self.events.append((now, count))

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._expire(now)
        if len(self.events) < 2:
            return 0.0
        span = max(now - self.events[0][0], 1e-3)
        return sum(c for _, c in self.events) / span

    def _expire(self, now: float) -> None:
        while self.events and now - self.events[0][0] > self.window:
            self.events.popleft()
