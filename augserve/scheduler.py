"""The scheduler: streams × workers × tasks, with deadlines and attempts. Pure: no sockets, no clock.

The daemon feeds it events (a worker joined, reported, went silent; a trainer acknowledged or received
batches) with the current time, and asks it what to send. Every decision is made here, so every rule of
delivery can be tested without a process or a socket:

- **Fair shares.** Streams take turns (round robin over those with work); each task goes to the worker
  with the most free capacity.
- **Deadlines.** A task not reported within ``task_timeout`` is re-issued to another worker (a worker
  that heartbeats but never finishes cannot hold a stream hostage). A batch reported sent but not
  received by its trainer within ``delivery_timeout`` was lost on the way and is re-issued too.
- **Attempts.** Each hand-out counts. A task whose attempts reach ``max_attempts`` — it killed that
  many workers, or failed on them — ends its stream with a message naming the batch and the last error,
  instead of crash-looping the pool.
- **Exactly once** is kept by the trainer: it drops duplicates that re-issues may cause.
- **Draining.** A worker being retired (autoscaling down) gets no new task; it is *drained* once it
  holds none and every batch it sent has reached its trainer, and only then is it told to stop — so a
  removal neither loses nor duplicates a batch.
- **Hand-off.** A stream may come with a :class:`~augserve.protocol.Handoff` (shared memory allowed);
  every task of it carries one, so each worker decides for itself whether it can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from . import protocol as P
from .meters import RateMeter, StageTotals
from .streams import Key, StreamState, TaskState


@dataclass(frozen=True)
class SchedulerLimits:
    """Seconds and counts that bound how long anything may take."""

    task_timeout: float = 300.0
    delivery_timeout: float = 30.0
    max_attempts: int = 4
    worker_liveness: float = 5.0  # silence after which a worker is written off
    stream_liveness: float = 10.0  # silence after which a trainer is written off


@dataclass
class WorkerState:
    """A connected worker: who it says it is, and the tasks it holds (task id -> (stream, key))."""

    identity: bytes
    hello: P.Hello
    last_heard: float
    tasks: dict[str, tuple[str, Key]] = field(default_factory=dict)
    done: int = 0
    samples: int = 0
    rate: RateMeter = field(default_factory=RateMeter)
    times: StageTotals = field(default_factory=StageTotals)

    @property
    def free(self) -> int:
        return self.hello.capacity - len(self.tasks)

    @property
    def name(self) -> str:
        return self.identity.decode(errors="replace")


@dataclass(frozen=True)
class Assignment:
    """Send ``task`` (a ``P.Task``) of ``stream`` to ``worker``."""

    worker: bytes
    stream: str
    key: Key
    message: P.Task


@dataclass(frozen=True)
class StreamFailure:
    """End ``stream`` and tell its trainer ``message``."""

    stream: str
    message: str
    kind: str = "error"


@dataclass
class Expired:
    """What :meth:`Scheduler.expire` found: workers written off, tasks re-issued, streams to end."""

    silent_workers: list[WorkerState] = field(default_factory=list)
    reissued: int = 0
    silent_streams: list[str] = field(default_factory=list)
    failures: list[StreamFailure] = field(default_factory=list)


class Scheduler:
    def __init__(self, limits: SchedulerLimits | None = None) -> None:
        self.limits = limits or SchedulerLimits()
        self.streams: dict[str, StreamState] = {}
        self.workers: dict[bytes, WorkerState] = {}
        self.handoffs: dict[str, P.Handoff] = {}  # stream id -> what its tasks tell workers about shared memory
        self.draining: set[bytes] = set()  # workers that get no new task (being retired)
        self.reissued_total = 0
        self._rotation = 0

    # --- membership ------------------------------------------------------------------------------------

    def add_stream(self, stream: StreamState, handoff: P.Handoff | None = None) -> None:
        """Serve ``stream``; its tasks carry ``handoff`` (``None``: frames only)."""
        if stream.id in self.streams:
            raise ValueError(f"stream {stream.id} exists")
        self.streams[stream.id] = stream
        if handoff is not None:
            self.handoffs[stream.id] = handoff

    def remove_stream(self, stream_id: str) -> tuple[StreamState | None, list[tuple[bytes, str]]]:
        """Forget a stream. Returns it and the (worker, data address) pairs no other stream still uses,
        so those workers can close their sockets to that trainer."""
        stream = self.streams.pop(stream_id, None)
        self.handoffs.pop(stream_id, None)
        if stream is None:
            return None, []
        for worker in self.workers.values():
            worker.tasks = {t: w for t, w in worker.tasks.items() if w[0] != stream_id}
        if any(s.request.data == stream.request.data for s in self.streams.values()):
            return stream, []
        return stream, [(identity, stream.request.data) for identity in self.workers]

    def add_worker(self, identity: bytes, hello: P.Hello, now: float) -> WorkerState:
        worker = self.workers.get(identity)
        if worker is None:
            worker = self.workers[identity] = WorkerState(identity, hello, now)
        worker.last_heard = now
        return worker

    def heard(self, identity: bytes, now: float) -> WorkerState | None:
        worker = self.workers.get(identity)
        if worker is not None:
            worker.last_heard = now
        return worker

    def remove_worker(self, identity: bytes, reason: str) -> tuple[int, list[StreamFailure]]:
        """A worker died or left: its tasks go back in line (each death counts as an attempt).
        Returns how many were re-queued, and the streams whose task ran out of attempts."""
        self.draining.discard(identity)
        worker = self.workers.pop(identity, None)
        if worker is None:
            return 0, []
        before, failures = self.reissued_total, []
        for stream_id, key in worker.tasks.values():
            failure = self._retry(stream_id, key, identity, f"its worker {worker.name} {reason}")
            if failure is not None:
                failures.append(failure)
        return self.reissued_total - before, _unique(failures)  # not counting batches acknowledged meanwhile

    # --- hand-out --------------------------------------------------------------------------------------

    def assign(self, now: float) -> Iterator[Assignment]:
        """Tasks to send now: streams in turn, each task to the least-loaded worker. The caller sends
        each one before taking the next, and calls :meth:`unreachable` when a send fails."""
        waiting: set[str] = set()  # streams whose first re-issue waits for a worker that has not tried it
        while self.workers:
            streams = [s for s in self.streams.values() if s.has_work()]
            if not streams:
                return
            self._rotation = (self._rotation + 1) % len(streams)
            progress = False
            for stream in streams[self._rotation :] + streams[: self._rotation]:
                if not self.workers:
                    return
                if max((w.free for w in self.workers.values() if w.identity not in self.draining), default=0) <= 0:
                    return
                if stream.id not in self.streams:  # ended by an earlier failure of this round
                    continue
                # A retry waiting for a fresh worker must not hold back the stream's new batches.
                picked = stream.next_task(now, reissues=stream.id not in waiting)
                if picked is None:
                    continue
                key, state = picked
                worker = self._pick_worker(state.tried)
                if worker is None:  # a retry waits for a worker that has not failed it yet
                    stream.defer(key)
                    waiting.add(stream.id)
                    progress = True  # the stream may still have new batches to hand out this round
                    continue
                state.worker, state.attempts = worker.identity, state.attempts + 1
                worker.tasks[state.task] = (stream.id, key)
                progress = True
                message = stream.task(*key, state, stream.request.data_key)
                handoff = self.handoffs.get(stream.id)
                if handoff is not None:
                    message = message.model_copy(update={"handoff": handoff})
                yield Assignment(worker.identity, stream.id, key, message)
            if not progress:
                return

    def _pick_worker(self, tried: set[bytes]) -> WorkerState | None:
        """The worker with the most free capacity. A retried task goes to a worker that has not held it
        yet; while all such workers are busy it waits (``None``) rather than return to one that failed
        it. Only when every worker has tried it may it go back to one of them."""
        usable = [w for w in self.workers.values() if w.identity not in self.draining]
        fresh = [w for w in usable if w.identity not in tried]
        candidates = [w for w in (fresh or usable) if w.free > 0]
        return max(candidates, key=lambda w: w.free) if candidates else None

    def drain(self, identity: bytes) -> bool:
        """Give this worker no new task from now on. False if it is not connected."""
        if identity not in self.workers:
            return False
        self.draining.add(identity)
        return True

    def drained(self, identity: bytes) -> bool:
        """True once the worker holds no task and each batch it sent is at its trainer (or re-queued):
        stopping it then cannot lose a batch. A worker that is gone is drained."""
        worker = self.workers.get(identity)
        if worker is None:
            return True
        if worker.tasks:
            return False
        return not any(
            state.worker == identity and state.done_at is not None and not state.received for stream in self.streams.values() for state in stream.inflight.values()
        )

    def unreachable(self, identity: bytes) -> list[StreamFailure]:
        """A send to this worker failed: it is gone."""
        return self.remove_worker(identity, "was unreachable")[1]

    # --- reports from workers --------------------------------------------------------------------------

    def done(self, identity: bytes, report: P.Done, now: float) -> StreamState | None:
        """A worker sent a batch. Returns its stream (``None`` for a stray report: the stream ended, or
        the task was taken from this worker)."""
        worker = self.workers.get(identity)
        if worker is None:
            return None
        worker.last_heard = now
        where = worker.tasks.get(report.task)
        if where is None or where[1] != (report.epoch, report.index):
            return None  # a report naming another batch leaves the task with its worker
        del worker.tasks[report.task]
        worker.done += 1
        worker.samples += report.samples
        worker.rate.add(report.samples, now)
        worker.times.add(report.times.load, report.times.augment, report.times.send)
        stream = self.streams.get(where[0])
        if stream is None:
            return None
        state = stream.inflight.get(where[1])
        if state is not None and state.worker == identity:
            state.done_at = now
        stream.times.add(report.times.load, report.times.augment, report.times.send)
        stream.skipped_corrupt += report.skipped
        return stream

    def failed(self, identity: bytes, report: P.Failed, now: float) -> StreamFailure | None:
        """A task failed on a worker: ``corrupt`` ends the stream (the trainer asked for that), anything
        else is retried on another worker until the attempts run out."""
        worker = self.workers.get(identity)
        if worker is None:
            return None
        worker.last_heard = now
        where = worker.tasks.pop(report.task, None)
        if where is None or where[0] not in self.streams:
            return None
        stream_id, key = where
        if report.kind == "corrupt":
            return StreamFailure(stream_id, report.message, "corrupt")
        return self._retry(stream_id, key, identity, report.message)

    # --- reports from trainers -------------------------------------------------------------------------

    def credit(self, stream: StreamState, message: P.Credit, now: float) -> None:
        stream.last_heard = now
        for epoch, index in message.received:
            stream.receive(epoch, index)
        for epoch, index, samples in message.acks:
            stream.ack(epoch, index, samples, now)

    # --- time ------------------------------------------------------------------------------------------

    def expire(self, now: float) -> Expired:
        """Write off silent workers and trainers; re-issue tasks past their deadline or lost on the way."""
        result = Expired()
        for identity, worker in list(self.workers.items()):
            if now - worker.last_heard > self.limits.worker_liveness:
                result.silent_workers.append(worker)
                result.failures += self.remove_worker(identity, f"went silent for {now - worker.last_heard:.1f} s")[1]
        for stream in list(self.streams.values()):
            if now - stream.last_heard > self.limits.stream_liveness:
                result.silent_streams.append(stream.id)
                continue
            for key, state in list(stream.inflight.items()):
                late = self._lateness(state, now)
                if late is None:
                    continue
                holder = self.workers.get(state.worker) if state.worker is not None else None
                if holder is not None:
                    holder.tasks.pop(state.task, None)
                failure = self._retry(stream.id, key, state.worker, late)
                if failure is not None:
                    result.failures.append(failure)
                    break
                result.reissued += 1
        result.failures = _unique(result.failures)
        return result

    def _lateness(self, state: TaskState, now: float) -> str | None:
        if state.worker is None or state.received:
            return None
        if state.done_at is None and now - state.issued_at > self.limits.task_timeout:
            return f"no report within the {self.limits.task_timeout:g} s task deadline"
        if state.done_at is not None and now - state.done_at > self.limits.delivery_timeout:
            return f"sent but not received by the trainer within {self.limits.delivery_timeout:g} s"
        return None

    def _retry(self, stream_id: str, key: Key, worker: bytes | None, reason: str) -> StreamFailure | None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return None
        state = stream.inflight.get(key)
        if state is None or (worker is not None and state.worker not in (worker, None)):
            return None  # acknowledged meanwhile, or already handed to another worker
        if state.received:  # the trainer has it (the worker died after sending): nothing to redo
            state.worker = None
            return None
        state.last_error = reason
        if state.attempts >= self.limits.max_attempts:
            epoch, index = key
            return StreamFailure(stream_id, f"batch {index} of epoch {epoch} (task {state.task}) failed {state.attempts} time(s), giving up; last: {reason}", "attempts")
        if state.worker is not None or key not in stream.reissue:
            stream.requeue(key)
            self.reissued_total += 1
        return None

    # --- views -----------------------------------------------------------------------------------------

    def streams_of(self, owner: str) -> int:
        return sum(1 for s in self.streams.values() if s.owner == owner)

    def queues_full(self) -> tuple[int, bool]:
        """(active streams, whether each one's results queue is full): all its credits used but one at
        most, by batches already made and waiting for the trainer — the workers have nothing to do for
        it. Active: it still has batches to issue."""
        active = [s for s in self.streams.values() if not s.issued_everything()]
        full = all(
            sum(1 for t in s.inflight.values() if t.done_at is not None or t.received) >= max(1, s.request.prefetch - 1) for s in active
        )
        return len(active), bool(active) and full

    def in_flight(self) -> int:
        return sum(len(s.inflight) for s in self.streams.values())

    def waiting_reissue(self) -> int:
        return sum(len(s.reissue) for s in self.streams.values())


def _unique(failures: list[StreamFailure]) -> list[StreamFailure]:
    seen, unique = set(), []
    for failure in failures:
        if failure.stream not in seen:
            seen.add(failure.stream)
            unique.append(failure)
    return unique
