"""A trainer's stream as the daemon sees it: its request, its epoch plan, credits and in-flight batches.

Flow control is a window of ``prefetch`` credits: a batch counts against the window from the moment it
is issued to a worker until the trainer acknowledges it, so the daemon never has more than ``prefetch``
batches of a stream in flight and the trainer never holds more than that many — however slow it is.
A task re-issued after a worker died keeps its place in the window (it was already counted), so it is
sent as soon as a worker is free, never blocked behind later batches.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .epochs import EpochPlan


class AttachRequest(BaseModel):
    """What a trainer asks for when it attaches (the fields of the ``attach`` message)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: Annotated[str, Field(min_length=1, max_length=200)]
    split: Literal["train", "test"] = "train"
    dataset_options: dict[str, int | str] = Field(default_factory=dict)
    pipeline: str | dict[str, Any]
    batch_size: Annotated[int, Field(ge=1)]
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    epochs: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    rank: Annotated[int, Field(ge=0)] = 0
    world_size: Annotated[int, Field(ge=1, le=65_536)] = 1
    prefetch: Annotated[int, Field(ge=1, le=1024)] = 8
    ordered: bool = False
    shuffle: bool = True
    drop_last: bool = False
    on_error: Literal["skip", "raise"] = "skip"
    data: Annotated[str, Field(min_length=6, max_length=500)]
    resume: dict[str, Any] | None = None
    client: str = ""


@dataclass
class InFlight:
    """One issued batch: which worker has it (``None`` while waiting to be re-issued)."""

    task: str
    worker: bytes | None
    issued_at: float
    version: int = 1  # the pipeline version this batch was first issued with (a re-issue keeps it)


@dataclass
class StageTimes:
    """Running totals of seconds per stage over the batches a worker reported."""

    load: float = 0.0
    augment: float = 0.0
    send: float = 0.0
    batches: int = 0

    def add(self, times: dict) -> None:
        self.load += float(times.get("load", 0.0))
        self.augment += float(times.get("augment", 0.0))
        self.send += float(times.get("send", 0.0))
        self.batches += 1

    def mean_ms(self) -> dict:
        n = max(self.batches, 1)
        return {"load": 1000 * self.load / n, "augment": 1000 * self.augment / n, "send": 1000 * self.send / n}


class RateMeter:
    """Items per second over the last ``window`` seconds."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self.events: deque[tuple[float, int]] = deque()

    def add(self, count: int, now: float | None = None) -> None:
        self.events.append((time.monotonic() if now is None else now, count))

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self.events and now - self.events[0][0] > self.window:
            self.events.popleft()
        if not self.events:
            return 0.0
        span = max(now - self.events[0][0], 1e-3)
        return sum(c for _, c in self.events) / span if len(self.events) > 1 else 0.0


@dataclass
class Stream:
    """Daemon-side state of one attached trainer."""

    id: str
    client: bytes
    request: AttachRequest
    plan: EpochPlan
    dataset: dict  # {"ref", "split", "options"} as workers open it
    spec: dict
    pipeline_version: int = 1
    versions: dict[int, dict] = field(default_factory=dict)  # version -> spec dict
    version_starts: dict[int, tuple[int, int]] = field(default_factory=dict)  # version -> first (epoch, index)
    start_epoch: int = 0
    skip: set[int] = field(default_factory=set)  # batch indices of start_epoch already consumed (resume)
    epoch: int = 0
    next_index: int = 0
    inflight: dict[tuple[int, int], InFlight] = field(default_factory=dict)
    reissue: deque = field(default_factory=deque)
    acked: int = 0
    skipped_corrupt: int = 0
    last_heard: float = field(default_factory=time.monotonic)
    created: float = field(default_factory=time.monotonic)
    times: StageTimes = field(default_factory=StageTimes)
    rate: RateMeter = field(default_factory=RateMeter)
    _shard_epoch: int = -1
    _shard: Any = None

    def __post_init__(self) -> None:
        self.epoch = self.start_epoch
        self._advance_past_skipped()
        self.versions.setdefault(self.pipeline_version, self.spec)
        self.version_starts.setdefault(self.pipeline_version, (self.epoch, self.next_index))

    def update_spec(self, spec: dict) -> tuple[int, int, int]:
        """Make ``spec`` the pipeline of every batch not yet issued. Returns (version, epoch, index) of
        the first batch that uses it; batches already in flight keep the version they were issued with."""
        self.pipeline_version += 1
        self.spec = spec
        self.versions[self.pipeline_version] = spec
        self.version_starts[self.pipeline_version] = (self.epoch, self.next_index)
        return self.pipeline_version, self.epoch, self.next_index

    # --- issuing ---------------------------------------------------------------------------------------

    @property
    def end_epoch(self) -> int:
        return self.request.epochs

    def issued_everything(self) -> bool:
        return self.epoch >= self.end_epoch

    def finished(self) -> bool:
        return self.issued_everything() and not self.inflight

    def has_work(self) -> bool:
        """A task can be sent now: a re-issue, or a new batch within the credit window."""
        return bool(self.reissue) or (not self.issued_everything() and len(self.inflight) < self.request.prefetch)

    def next_task(self, now: float) -> tuple[int, int, list[int], str, int] | None:
        """(epoch, index, sample ids, task id, pipeline version) of the next batch to send, or ``None``."""
        while self.reissue:
            key = self.reissue.popleft()
            entry = self.inflight.get(key)
            if entry is None:  # acknowledged meanwhile
                continue
            entry.issued_at = now
            return (*key, self.ids(*key), entry.task, entry.version)
        if self.issued_everything() or len(self.inflight) >= self.request.prefetch:
            return None
        key = (self.epoch, self.next_index)
        task = f"{self.id}:{key[0]}:{key[1]}"
        self.inflight[key] = InFlight(task, None, now, self.pipeline_version)
        self.next_index += 1
        self._advance_past_skipped()
        return (*key, self.ids(*key), task, self.pipeline_version)

    def _advance_past_skipped(self) -> None:
        while not self.issued_everything():
            if self.next_index >= self.plan.num_batches():
                self.epoch, self.next_index = self.epoch + 1, 0
                continue
            if self.epoch == self.start_epoch and self.next_index in self.skip:
                self.next_index += 1
                continue
            break

    def ids(self, epoch: int, index: int) -> list[int]:
        if self._shard_epoch != epoch:  # one permutation per epoch, not per batch
            self._shard, self._shard_epoch = self.plan.shard(epoch), epoch
        size = self.plan.batch_size
        return self._shard[index * size : (index + 1) * size].tolist()

    def assign(self, key: tuple[int, int], worker: bytes) -> None:
        if key in self.inflight:
            self.inflight[key].worker = worker

    # --- acknowledgements and faults -------------------------------------------------------------------

    def ack(self, epoch: int, index: int, samples: int = 0) -> bool:
        """The trainer consumed batch (epoch, index): free its credit. False for unknown/duplicate acks."""
        entry = self.inflight.pop((int(epoch), int(index)), None)
        if entry is None:
            return False
        self.acked += 1
        self.rate.add(samples)
        return True

    def requeue_worker(self, worker: bytes) -> int:
        """Tasks the (dead) ``worker`` held go back to the front of the queue; returns how many."""
        keys = sorted(k for k, v in self.inflight.items() if v.worker == worker)
        for key in keys:
            self.inflight[key].worker = None
            self.reissue.append(key)
        return len(keys)

    def status(self) -> dict:
        return {
            "stream": self.id,
            "dataset": self.request.dataset,
            "split": self.request.split,
            "pipeline": self.spec.get("name") or "custom",
            "pipeline_version": self.pipeline_version,
            "batch_size": self.request.batch_size,
            "rank": self.request.rank,
            "world_size": self.request.world_size,
            "epoch": min(self.epoch, self.end_epoch - 1),
            "epochs": self.end_epoch,
            "batches_per_epoch": self.plan.num_batches(),
            "acked": self.acked,
            "in_flight": len(self.inflight),
            "credits": self.request.prefetch,
            "credits_free": max(0, self.request.prefetch - len(self.inflight)),
            "waiting_reissue": len(self.reissue),
            "images_per_s": round(self.rate.rate(), 1),
            "skipped_corrupt": self.skipped_corrupt,
            "stage_ms": {k: round(v, 2) for k, v in self.times.mean_ms().items()},
            "client": self.request.client,
        }
