"""A trainer's stream as the daemon sees it: its request, its epoch plan, credits and tasks in flight.

Flow control is a window of ``prefetch`` credits: a batch counts against the window from the moment it
is issued to a worker until the trainer acknowledges it, so the daemon never has more than ``prefetch``
batches of a stream in flight and the trainer never holds more than that many — however slow it is.
A task re-issued (its worker died, its deadline passed, its batch was lost on the way) keeps its place
in the window (it was already counted), so it goes out as soon as a worker is free.

A task's life: issued to a worker → ``done`` (the worker sent the batch) → received (the trainer's
receipt) → acknowledged (the training loop took it; the credit returns). Each step can be lost; the
:class:`~augserve.scheduler.Scheduler` watches the times and re-issues.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from . import protocol as P
from .epochs import BatchIds, EpochPlan
from .handoff.policy import StreamTransport
from .meters import RateMeter, StageTotals

Key = tuple[int, int]  # (epoch, batch index)


@dataclass
class TaskState:
    """One batch in flight. ``worker`` is ``None`` while it waits to be (re-)issued."""

    task: str
    version: int  # the pipeline version it was first issued with (a re-issue keeps it)
    worker: bytes | None = None
    tried: set[bytes] = field(default_factory=set)  # workers that held it before (at most max_attempts)
    issued_at: float = 0.0
    attempts: int = 0  # times handed to a worker
    done_at: float | None = None  # when a worker reported it sent
    received: bool = False  # the trainer said it arrived
    last_error: str = ""


@dataclass
class StreamState:
    """Daemon-side state of one attached trainer stream.

    ``owner``: who may update or detach it (the authenticated client key, or the connection when the
    daemon runs without keys). ``identity``: the ROUTER routing id replies go to.
    """

    id: str
    owner: str
    identity: bytes
    request: P.Attach
    plan: EpochPlan
    dataset: P.DatasetRef
    spec: dict
    fingerprint: dict = field(default_factory=dict)
    start_epoch: int = 0
    skip: frozenset[int] = frozenset()  # batch indices of start_epoch consumed before a resume
    pipeline_version: int = 1
    versions: dict[int, dict] = field(default_factory=dict)  # version -> spec, for versions still in use
    epoch: int = 0
    next_index: int = 0
    inflight: dict[Key, TaskState] = field(default_factory=dict)
    reissue: deque = field(default_factory=deque)
    acked: int = 0
    reissued: int = 0
    skipped_corrupt: int = 0
    last_heard: float = 0.0
    times: StageTotals = field(default_factory=StageTotals)
    rate: RateMeter = field(default_factory=RateMeter)
    transport: StreamTransport = field(default_factory=lambda: StreamTransport("auto"))  # set from the policy when attached
    _batch_ids: BatchIds = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._batch_ids = BatchIds(self.plan)
        self.epoch = self.start_epoch
        self._advance_past_skipped()
        self.versions.setdefault(self.pipeline_version, self.spec)

    # --- re-tuning -------------------------------------------------------------------------------------

    def update_spec(self, spec: dict) -> tuple[int, int, int]:
        """Make ``spec`` the pipeline of every batch not yet issued. Returns (version, epoch, index) of
        the first batch that uses it; batches already in flight keep the version they were issued with."""
        self.pipeline_version += 1
        self.spec = spec
        self.versions[self.pipeline_version] = spec
        self._forget_unused_versions()
        return self.pipeline_version, self.epoch, self.next_index

    def _forget_unused_versions(self) -> None:
        in_use = {task.version for task in self.inflight.values()} | {self.pipeline_version}
        for version in [v for v in self.versions if v not in in_use]:
            del self.versions[version]

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

    def next_task(self, now: float, reissues: bool = True) -> tuple[Key, TaskState] | None:
        """The next batch to hand to a worker (a re-issue first, unless ``reissues=False``), or ``None``."""
        while reissues and self.reissue:
            key = self.reissue.popleft()
            state = self.inflight.get(key)
            if state is None or state.worker is not None:  # acknowledged or re-issued meanwhile
                continue
            state.issued_at, state.done_at, state.received = now, None, False
            return key, state
        if self.issued_everything() or len(self.inflight) >= self.request.prefetch:
            return None
        key = (self.epoch, self.next_index)
        state = TaskState(f"{self.id}:{key[0]}:{key[1]}", self.pipeline_version, issued_at=now)
        self.inflight[key] = state
        self.next_index += 1
        self._advance_past_skipped()
        return key, state

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
        return self._batch_ids(epoch, index).tolist()

    def task(self, epoch: int, index: int, state: TaskState, data_key: str | None) -> P.Task:
        """The ``task`` message for batch (epoch, index)."""
        return P.Task(
            task=state.task,
            stream=self.id,
            epoch=epoch,
            index=index,
            ids=self.ids(epoch, index),
            seed=self.request.seed,
            dataset=self.dataset,
            pipeline=P.PipelineRef(stream=self.id, version=state.version, spec=self.versions[state.version]),
            data=self.request.data,
            data_key=data_key,
            on_error=self.request.on_error,
        )

    # --- the trainer's side ----------------------------------------------------------------------------

    def ack(self, epoch: int, index: int, samples: int, now: float) -> bool:
        """The trainer consumed batch (epoch, index): free its credit. False for unknown/duplicate acks."""
        state = self.inflight.pop((epoch, index), None)
        if state is None:
            return False
        self.acked += 1
        self.rate.add(samples, now)
        if state.version != self.pipeline_version:
            self._forget_unused_versions()
        return True

    def defer(self, key: Key) -> None:
        """A task :meth:`next_task` gave out that found no worker now: first in line again."""
        self.reissue.appendleft(key)

    def receive(self, epoch: int, index: int) -> None:
        """The trainer has batch (epoch, index) in hand (not yet consumed)."""
        state = self.inflight.get((epoch, index))
        if state is not None:
            state.received = True

    def requeue(self, key: Key) -> None:
        """Put an in-flight batch back in line for another worker."""
        state = self.inflight.get(key)
        if state is None:
            return
        if state.worker is not None:
            state.tried.add(state.worker)
        state.worker, state.done_at, state.received = None, None, False
        self.reissue.append(key)
        self.reissued += 1

    def status(self, now: float) -> dict:
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
            "reissued": self.reissued,
            "images_per_s": round(self.rate.rate(now), 1),
            "skipped_corrupt": self.skipped_corrupt,
            "stage_ms": {k: round(v, 2) for k, v in self.times.mean_ms().items()},
            "client": self.request.client,
            "transport": self.transport.status(),
        }
