"""The supervisor: the daemon's local worker processes — started, watched, restarted, stopped.

It never blocks the daemon's loop: a worker that died young is restarted after a back-off that grows
with each quick death in a row (0.25 s, 0.5 s, … up to 10 s), scheduled rather than slept, so a
crash-looping pool costs the loop nothing and is visible in the log and the restart count.
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


class Supervisor:
    """``Supervisor(command_for, count)``: ``command_for(name)`` is the argv of a worker called ``name``.

    Local workers are known by name (``local-<slot>-<random>``, new at each start), never by pid alone:
    a remote worker may well have the same pid as one of ours."""

    def __init__(self, command_for: Callable[[str], list[str]], count: int, env: dict | None = None) -> None:
        self._command_for = command_for
        self._env = env
        self.slots = [Slot(i) for i in range(count)]
        self.restarts = 0

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot, time.monotonic())

    def _spawn(self, slot: Slot, now: float) -> None:
        slot.name = f"local-{slot.index}-{uuid.uuid4().hex[:6]}"
        slot.process = subprocess.Popen(self._command_for(slot.name), stdin=subprocess.DEVNULL, env=self._env)
        slot.started, slot.restart_at = now, None

    def poll(self, now: float) -> list[str]:
        """Reap dead workers (returns their names) and start the restarts that are due."""
        gone = []
        for slot in self.slots:
            process = slot.process
            if process is not None and process.poll() is not None:
                gone.append(slot.name)
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
