"""The autoscaling controller: measures windows, asks the policy, applies its decisions to the pool.

It sits between three things the daemon owns: the pool of workers (local processes —
:class:`~augserve.supervisor.Supervisor` — or Ray actors — :class:`~augserve.ray_workers.RayPool`; both
offer the :class:`WorkerPool` methods), the :class:`~augserve.scheduler.Scheduler` (which knows the
queues and drains workers), and the :class:`~augserve.autoscale.AutoscalePolicy` (which decides).

Each housekeeping tick the daemon calls :meth:`Autoscaler.tick`. A window counts only while the pool is
*settled* — every worker it asked for has joined the scheduler and finished its first task (or been
idle for a window: there may be nothing for it to do), and none is draining — so the seconds a new
worker spends starting and warming up (opening the dataset, building the pipeline), or an old one
draining, never enter a measurement (the cool-down).
A removal drains first: the scheduler gives the chosen worker no new task, and once it holds none and
each batch it sent has reached its trainer, :meth:`tick` returns its name for the daemon to send
``stop``; the pool kills it if it overstays. Nothing is lost or sent twice on the way.

Every decision other than *hold* is one INFO line with the measurements behind it, and a metric.
"""

from __future__ import annotations

import logging
from typing import Protocol

from .autoscale import AutoscalePolicy, AutoscaleSettings, Decision, Observation, WaitMeter
from .scheduler import Scheduler

log = logging.getLogger("augserve.autoscale")

STOP_GRACE_S = 10.0  # a drained worker told to stop is killed if still running this much later


class WorkerPool(Protocol):
    def names(self) -> list[str]: ...

    def starting(self) -> bool: ...

    def grow(self, now: float) -> str: ...

    def retire(self, name: str) -> bool: ...

    def release(self, name: str, now: float, grace: float = STOP_GRACE_S) -> None: ...


class Autoscaler:
    """``Autoscaler(settings, pool, scheduler, metrics)``; feed it trainers' waits with :meth:`observe_wait`
    and call :meth:`tick` on each housekeeping tick; send ``stop`` to each name it returns."""

    def __init__(self, settings: AutoscaleSettings, pool: WorkerPool, scheduler: Scheduler, metrics) -> None:
        self.settings = settings
        self.policy = AutoscalePolicy(settings)
        self.pool = pool
        self.scheduler = scheduler
        self.metrics = metrics
        self.meter = WaitMeter()
        self.draining: set[str] = set()  # names being drained before they are told to stop
        self.last: Decision | None = None
        self._window_start: float | None = None
        self._samples = 0
        self._full_samples = 0
        self._last_wait: float | None = None
        self._joined: dict[str, float] = {}  # worker name -> when the controller first saw it connected

    def observe_wait(self, batches: int, seconds: float) -> None:
        """A trainer's ``wait`` report: its loop took ``batches`` and waited ``seconds`` for them."""
        self.meter.add(batches, seconds)

    def target(self) -> int:
        return len(self.pool.names())

    def tick(self, now: float) -> list[str]:
        """Measure, decide, apply. Returns the drained workers to tell ``stop`` now."""
        to_stop = [name for name in self.draining if self.scheduler.drained(name.encode())]
        for name in to_stop:
            self.draining.discard(name)
            self.pool.release(name, now)
        if not self._settled(now):
            self._restart_window(now)
            return to_stop
        if self._window_start is None:
            self._restart_window(now)
        active, full = self.scheduler.queues_full()
        self._samples += 1
        self._full_samples += int(full)
        if now - self._window_start < self.settings.window_s:
            return to_stop
        batches, seconds = self.meter.take()
        wait = seconds / batches if batches else None
        self._last_wait = wait
        observation = Observation(len(self.pool.names()), wait, batches, self._full_samples / max(1, self._samples), active)
        self._restart_window(now)
        decision = self.policy.decide(observation)
        self.last = decision
        self.metrics.autoscale_observed(wait, decision.target)
        if decision.action == "hold":
            log.debug("autoscale: hold at %d worker(s): %s", decision.workers, decision.reason)
            return to_stop
        self._apply(decision, now)
        return to_stop

    def _settled(self, now: float) -> bool:
        names = self.pool.names()
        if self.draining or self.pool.starting():
            return False
        workers = self.scheduler.workers
        self._joined = {name: self._joined.get(name, now) for name in names if name.encode() in workers}
        return len(self._joined) == len(names) and all(
            workers[name.encode()].done > 0 or now - joined >= self.settings.window_s for name, joined in self._joined.items()
        )

    def _restart_window(self, now: float) -> None:
        self.meter.take()  # reports from before the window would mix two pool sizes
        self._window_start, self._samples, self._full_samples = now, 0, 0

    def _apply(self, decision: Decision, now: float) -> None:
        changed = 0
        if decision.action == "add":
            for _ in range(decision.target - decision.workers):
                name = self.pool.grow(now)
                changed += 1
                log.info("autoscale: add a worker (%d -> %d, %s): %s", decision.workers, decision.target, name, decision.reason)
        else:
            for _ in range(decision.workers - decision.target):
                name = self._victim()
                if name is None:
                    break
                self.pool.retire(name)
                if self.scheduler.drain(name.encode()):
                    self.draining.add(name)
                changed += 1
                log.info("autoscale: remove a worker (%d -> %d, draining %s): %s", decision.workers, decision.target, name, decision.reason)
        for _ in range(changed):
            self.metrics.autoscale_decision(decision.action, self.target())

    def _victim(self) -> str | None:
        """The worker holding the fewest tasks; among equals the newest (the first to go when scaling down)."""
        names = self.pool.names()
        if not names:
            return None
        held = {name: len(self.scheduler.workers[name.encode()].tasks) if name.encode() in self.scheduler.workers else 0 for name in names}
        return min(reversed(names), key=lambda name: held[name])

    def status(self) -> dict:
        return {
            "min_workers": self.settings.min_workers,
            "max_workers": self.settings.max_workers,
            "target": self.target(),
            "draining": sorted(self.draining),
            "wait_per_batch_ms": None if self._last_wait is None else round(self._last_wait * 1e3, 2),
            "last_decision": None if self.last is None else {"action": self.last.action, "workers": self.last.workers, "target": self.last.target, "reason": self.last.reason},
        }
