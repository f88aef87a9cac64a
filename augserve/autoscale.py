"""Autoscaling on measured data stall: the policy, pure (observations in, a decision out; no clock, no I/O).

The reference is Cachew's policy (Graur et al., USENIX ATC'22): add a worker while the trainers' wait per
batch improves by more than a few percent after the last addition; remove one while the result queues
stay full. Here:

- **Observation** — one window of ``window_s`` seconds measured while the pool was settled (every
  worker it asked for up, none draining): the seconds trainers spent waiting for their next batch
  divided by the batches they took (:class:`WaitMeter` sums what clients report in ``credit``), and
  the fraction of the window's samples in which every active stream's results queue was full (its
  credits used, nearly all of them batches already made and waiting for the trainer: workers idle).
- **Add** while trainers stall (wait per batch above ``min_wait_s``) and fewer than ``max_workers`` run,
  unless the last addition improved the wait by less than ``threshold`` (a fraction: 0.03 = 3 %): the
  pool has found where more workers stop helping (the *plateau*), and adds again only when the wait
  grows beyond the plateau's by more than ``threshold`` (the load changed).
- **Remove** when the queues stayed full (``full_fraction`` of the time) for ``remove_windows`` windows
  in a row and more than ``min_workers`` run.
- **No flapping** — a window right after a change is never used (the controller discards it); an
  addition that undoes a removal (the removal made trainers stall) forbids removals for
  ``flap_hold_windows`` windows.

A decision's ``reason`` is the one log line that explains it, with the measurements that led to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Action = Literal["add", "remove", "hold"]


@dataclass(frozen=True)
class AutoscaleSettings:
    """Bounds and thresholds of the policy. Seconds; fractions in [0, 1]."""

    min_workers: int = 1
    max_workers: int = 4
    window_s: float = 5.0  # length of one observation window
    threshold: float = 0.03  # an addition must cut the wait per batch by more than this fraction
    min_wait_s: float = 0.002  # a wait per batch below this is no stall (scheduling noise)
    full_fraction: float = 0.9  # queues count as "stayed full" when full in this fraction of the samples
    remove_windows: int = 2  # windows in a row with full queues before a removal
    flap_hold_windows: int = 10  # after an addition that undid a removal, no removal for this many windows

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers:
            raise ValueError(f"autoscale bounds must satisfy 0 <= min <= max, got min={self.min_workers} max={self.max_workers}")
        if self.max_workers < 1:
            raise ValueError(f"autoscale max_workers must be >= 1, got {self.max_workers}")
        if not self.window_s > 0:
            raise ValueError(f"autoscale window_s must be > 0, got {self.window_s}")
        for name in ("threshold", "full_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"autoscale {name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class Observation:
    """One settled window. ``wait_per_batch`` is ``None`` when no trainer reported a batch in it."""

    workers: int
    wait_per_batch: float | None  # seconds
    batches: int  # batches the trainers took in the window
    full: float  # fraction of the window's samples with every active stream's queue full
    active_streams: int


@dataclass(frozen=True)
class Decision:
    action: Action
    workers: int  # how many run now
    target: int  # how many should run
    reason: str


@dataclass
class AutoscalePolicy:
    """Call :meth:`decide` once per settled window; apply its ``target``; see the module docstring."""

    settings: AutoscaleSettings
    _last_action: Action = "hold"
    _wait_before_add: float | None = None  # the wait per batch measured just before the last addition
    _plateau: float | None = None  # the wait at which an addition stopped helping
    _full_windows: int = 0
    _no_remove_windows: int = 0
    history: list[Decision] = field(default_factory=list)

    def decide(self, obs: Observation) -> Decision:
        decision = self._decide(obs)
        if decision.action != "hold":
            self._last_action = decision.action
        self.history.append(decision)
        return decision

    def _decide(self, obs: Observation) -> Decision:
        s = self.settings
        self._no_remove_windows = max(0, self._no_remove_windows - 1)
        measured = _describe(obs)
        if obs.workers < s.min_workers:
            return Decision("add", obs.workers, s.min_workers, f"below the minimum of {s.min_workers}; {measured}")
        if obs.workers > s.max_workers:
            return Decision("remove", obs.workers, s.max_workers, f"above the maximum of {s.max_workers}; {measured}")
        if obs.active_streams == 0:
            self._full_windows = 0
            return Decision("hold", obs.workers, obs.workers, f"no active stream; {measured}")
        wait = obs.wait_per_batch
        previous = self._wait_before_add if self._last_action == "add" else None
        if previous is not None and wait is not None:
            self._wait_before_add = None  # the last addition is judged once
            improvement = (previous - wait) / previous if previous > 0 else 0.0
            if improvement <= s.threshold and wait >= s.min_wait_s:
                self._plateau = wait
                return Decision("hold", obs.workers, obs.workers, f"the last addition cut the wait per batch by {improvement:.1%} (from {previous * 1e3:.1f} ms), not more than {s.threshold:.0%}: holding; {measured}")
        if obs.full >= s.full_fraction and (wait is None or wait < s.min_wait_s):
            self._full_windows += 1
            if obs.workers <= s.min_workers:
                return Decision("hold", obs.workers, obs.workers, f"queues full but at the minimum of {s.min_workers}; {measured}")
            if self._no_remove_windows > 0:
                return Decision("hold", obs.workers, obs.workers, f"queues full, but a removal made trainers stall recently ({self._no_remove_windows} window(s) to go); {measured}")
            if self._full_windows >= s.remove_windows:
                self._full_windows = 0
                self._plateau = None
                return Decision("remove", obs.workers, obs.workers - 1, f"queues stayed full for {s.remove_windows} window(s); {measured}")
            return Decision("hold", obs.workers, obs.workers, f"queues full ({self._full_windows}/{s.remove_windows} window(s)); {measured}")
        self._full_windows = 0
        if wait is None or wait < s.min_wait_s:
            return Decision("hold", obs.workers, obs.workers, f"trainers do not stall; {measured}")
        if obs.workers >= s.max_workers:
            return Decision("hold", obs.workers, obs.workers, f"trainers stall but at the maximum of {s.max_workers}; {measured}")
        if self._plateau is not None:
            if wait <= self._plateau * (1 + s.threshold):
                return Decision("hold", obs.workers, obs.workers, f"trainers stall, but more workers stopped helping at {self._plateau * 1e3:.1f} ms per batch; {measured}")
            self._plateau = None  # the load grew: try again
        if self._last_action == "remove":
            self._no_remove_windows = s.flap_hold_windows
        self._wait_before_add = wait
        return Decision("add", obs.workers, obs.workers + 1, f"trainers stall; {measured}")


def _describe(obs: Observation) -> str:
    wait = "no batches taken" if obs.wait_per_batch is None else f"trainers waited {obs.wait_per_batch * 1e3:.1f} ms per batch over {obs.batches} batch(es)"
    return f"{wait}, queues full {obs.full:.0%} of the window, {obs.active_streams} active stream(s), {obs.workers} worker(s)"


class WaitMeter:
    """Sums what trainers report: seconds their training loop waited for batches, and batches taken.

    :meth:`take` returns the sums since the last take and starts over: one window's worth."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.batches = 0

    def add(self, batches: int, seconds: float) -> None:
        self.batches += batches
        self.seconds += seconds

    def take(self) -> tuple[int, float]:
        out = (self.batches, self.seconds)
        self.batches, self.seconds = 0, 0.0
        return out
