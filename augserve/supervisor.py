"""The supervisor: the daemon's local worker processes — started, watched, restarted, stopped.

It never blocks the daemon's loop: a worker that died young is restarted after a back-off that grows
with each quick death in a row (0.25 s, 0.5 s, … up to 10 s), scheduled rather than slept, so a
crash-looping pool costs the loop nothing and is visible in the log and the restart count.

The pool can grow and shrink (autoscaling): :meth:`Supervisor.grow` starts one more worker;
:meth:`Supervisor.retire` marks one that is not restarted when it exits, and :meth:`Supervisor.release`
— called once the daemon has drained it and told it to stop — kills it if it overstays ``grace`` seconds.
"""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("augserve.supervisor")

QUICK_DEATH_S = 10.0  # a worker that dies younger than this counts towards the back-off
MAX_BACKOFF_S = 10.0


@dataclass
class Slot:
    """One local worker place: its current process (``None`` while waiting to restart)."""

    index: int
    name: str = ""  # the worker id its process was given (its ROUTER identity at the daemon)
    process: subprocess.Popen | None = None
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None
    retiring: bool = False  # not restarted when it exits; the slot goes away
    kill_at: float | None = None  # a retiring worker still running then is killed


class ResizablePool:
    """Growing and shrinking a pool of named worker places (the autoscaler's side of it), shared by the
    :class:`Supervisor` (local processes) and :class:`~augserve.ray_workers.RayPool` (Ray actors). A pool
    keeps ``slots`` (each with ``index``, ``name``, ``retiring`` and ``kill_at``) and says how to make a
    slot (``_new_slot(index)``), start its worker (``_spawn(slot, now)``) and whether one runs (``_running``)."""

    slots: list
    _next_index: int

    def _new_slot(self, index: int):
        raise NotImplementedError

    def _spawn(self, slot, now: float) -> None:
        raise NotImplementedError

    def _running(self, slot) -> bool:
        raise NotImplementedError

    @property
    def size(self) -> int:
        """Worker places that are not being retired (a place waiting to restart counts)."""
        return sum(1 for slot in self.slots if not slot.retiring)

    def names(self) -> list[str]:
        """The current names of the places that are not being retired, oldest place first."""
        return [slot.name for slot in self.slots if not slot.retiring]

    def starting(self) -> bool:
        """True while a place that is not being retired waits to (re)start its worker."""
        return any(not self._running(slot) and not slot.retiring for slot in self.slots)

    def grow(self, now: float) -> str:
        """Start one more worker; returns its name."""
        slot = self._new_slot(self._next_index)
        self._next_index += 1
        self.slots.append(slot)
        self._spawn(slot, now)
        return slot.name

    def retire(self, name: str) -> bool:
        """This worker is not restarted when it exits (the daemon drains it first). False if not ours."""
        for slot in self.slots:
            if slot.name == name and not slot.retiring:
                slot.retiring = True
                return True
        return False

    def release(self, name: str, now: float, grace: float = 10.0) -> None:
        """The daemon told this retiring worker to stop: kill it if it is still running ``grace`` s on."""
        for slot in self.slots:
            if slot.name == name and slot.retiring and slot.kill_at is None:
                slot.kill_at = now + grace


class Supervisor(ResizablePool):
    """``Supervisor(command_for, count)``: ``command_for(name)`` is the argv of a worker called ``name``.

    Local workers are known by name (``local-<slot>-<random>``, new at each start), never by pid alone:
    a remote worker may well have the same pid as one of ours."""

    def __init__(self, command_for: Callable[[str], list[str]], count: int, env: dict | None = None) -> None:
        self._command_for = command_for
        self._env = env
        self.slots = [Slot(i) for i in range(count)]
        self._next_index = count
        self.restarts = 0

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot, time.monotonic())

    def _new_slot(self, index: int) -> Slot:
        return Slot(index)

    def _running(self, slot: Slot) -> bool:
        return slot.process is not None

    def _spawn(self, slot: Slot, now: float) -> None:
        slot.name = f"local-{slot.index}-{uuid.uuid4().hex[:6]}"
        slot.process = subprocess.Popen(self._command_for(slot.name), stdin=subprocess.DEVNULL, env=self._env)
        slot.started, slot.restart_at = now, None

    def poll(self, now: float) -> list[str]:
        """Reap dead workers (returns their names, retired ones included) and start the restarts that are due."""
        return [name for name, _retired in self.poll_exits(now)]

    def poll_exits(self, now: float) -> list[tuple[str, bool]]:
        """Like :meth:`poll`, with each name whether the worker was retired (so not restarted)."""
        gone: list[tuple[str, bool]] = []
        for slot in list(self.slots):
            process = slot.process
            if slot.retiring:
                if process is not None and process.poll() is None and slot.kill_at is not None and now >= slot.kill_at:
                    log.warning("retired worker %s (pid %d) overstayed its stop; killing it", slot.name, process.pid)
                    process.kill()
                    process.wait()
                if process is None or process.poll() is not None:
                    log.info("local worker %s retired%s", slot.name, f" (exit status {process.returncode})" if process is not None else "")
                    self.slots.remove(slot)
                    gone.append((slot.name, True))
                continue
            if process is not None and process.poll() is not None:
                gone.append((slot.name, False))
                slot.quick_deaths = slot.quick_deaths + 1 if now - slot.started < QUICK_DEATH_S else 0
                delay = 0.0 if slot.quick_deaths == 0 else min(MAX_BACKOFF_S, 0.25 * 2 ** (slot.quick_deaths - 1))
                level = logging.WARNING if slot.quick_deaths < 3 else logging.ERROR
                log.log(level, "local worker %d (pid %d) exited with %s; restarting in %.2f s%s", slot.index, process.pid, process.returncode, delay,
                        f" ({slot.quick_deaths} quick deaths in a row)" if slot.quick_deaths > 1 else "")  # fmt: skip
                slot.process, slot.restart_at = None, now + delay
                self.restarts += 1
            if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(slot, now)
        return gone

    def kill(self, name: str) -> bool:
        """Kill a hung local worker (it is restarted at the next :meth:`poll`). False if not ours."""
        for slot in self.slots:
            if slot.name == name and slot.process is not None and slot.process.poll() is None:
                slot.process.kill()
                return True
        return False

    def stop(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` seconds for workers told to stop, then kill the rest."""
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            if slot.process is None:
                continue
            try:
                slot.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                slot.process.kill()
                slot.process.wait()
            slot.process = None
