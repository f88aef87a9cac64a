"""The scheduler, driven by explicit times: fairness, capacity, deaths, attempts, deadlines, stray reports.

The last test is a property test: random sequences of events on a small model of workers and trainers,
with the scheduler's invariants checked after every step and completion checked at the end.
"""

from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from augserve import protocol as P
from augserve.epochs import EpochPlan
from augserve.scheduler import Assignment, Expired, Scheduler, SchedulerLimits, StreamFailure
from augserve.streams import StreamState

DATA = "tcp://127.0.0.1:5000"


def hello(name: str, capacity: int = 2) -> P.Hello:
    return P.Hello(worker=name, pid=100, host="node", backend="torch", device="cpu", capacity=capacity)


def make_stream(stream_id, prefetch=4, epochs=1, n=40, batch=10, data=DATA, now=0.0):
    request = P.Attach(dataset="digits", pipeline="lenet5", batch_size=batch, prefetch=prefetch, epochs=epochs, data=data)
    plan = EpochPlan(n, batch, seed=0)
    return StreamState(stream_id, "owner", b"trainer-" + stream_id.encode(), request, plan, P.DatasetRef(ref="digits"), {"name": "v1", "ops": []}, last_heard=now)


def make_scheduler(streams=(), workers=(), now=0.0, **limits) -> Scheduler:
    """``workers``: (identity, capacity) pairs."""
    scheduler = Scheduler(SchedulerLimits(**limits))
    for stream in streams:
        scheduler.add_stream(stream)
    for identity, capacity in workers:
        scheduler.add_worker(identity, hello(identity.decode(), capacity), now)
    return scheduler


def done(identity: bytes, assignment: Assignment, samples: int = 10) -> P.Done:
    epoch, index = assignment.key
    return P.Done(worker=identity.decode(), task=assignment.message.task, stream=assignment.stream, epoch=epoch, index=index, samples=samples)


def failed(identity: bytes, assignment: Assignment, kind: str = "error", message: str = "boom") -> P.Failed:
    return P.Failed(worker=identity.decode(), task=assignment.message.task, stream=assignment.stream, message=message, kind=kind)


def snapshot(scheduler: Scheduler):
    """Everything a stray report must leave alone."""
    workers = {i: (dict(w.tasks), w.done, w.samples) for i, w in scheduler.workers.items()}
    streams = {
        s.id: ({k: (t.worker, t.done_at, t.received, t.attempts, frozenset(t.tried)) for k, t in s.inflight.items()}, list(s.reissue), s.acked, s.skipped_corrupt)
        for s in scheduler.streams.values()
    }
    return workers, streams, scheduler.reissued_total


# --- fair shares and capacity -----------------------------------------------------------------------------


def test_streams_take_turns():
    a, b = make_stream("a", prefetch=4), make_stream("b", prefetch=4)
    scheduler = make_scheduler([a, b], [(b"w", 8)])
    order = [x.stream for x in scheduler.assign(0.0)]
    assert Counter(order) == {"a": 4, "b": 4}
    assert all({order[i], order[i + 1]} == {"a", "b"} for i in range(0, 8, 2))  # every pair serves both


def test_turns_alternate_across_calls_when_one_slot_frees_at_a_time():
    a, b = make_stream("a", prefetch=10), make_stream("b", prefetch=10)
    scheduler = make_scheduler([a, b], [(b"w", 1)])
    served = []
    for step in range(8):
        [assignment] = list(scheduler.assign(float(step)))
        served.append(assignment.stream)
        assert scheduler.done(b"w", done(b"w", assignment), float(step)) is not None
    assert served in (["a", "b"] * 4, ["b", "a"] * 4)


def test_a_stream_without_work_does_not_hold_up_the_other():
    a, b = make_stream("a", prefetch=1), make_stream("b", prefetch=5, n=100)
    scheduler = make_scheduler([a, b], [(b"w", 8)])
    assert Counter(x.stream for x in scheduler.assign(0.0)) == {"a": 1, "b": 5}
    assert list(scheduler.assign(0.0)) == []


def test_each_task_goes_to_the_worker_with_most_free_capacity():
    scheduler = make_scheduler([make_stream("a", prefetch=10, n=100)], [(b"w1", 2), (b"w2", 4)])
    picks = [x.worker for x in scheduler.assign(0.0)]
    # free (w1, w2): (2,4) → w2, (2,3) → w2, (2,2) tie → first, (1,2) → w2, (1,1) → first, (0,1) → w2, then full
    assert picks == [b"w2", b"w2", b"w1", b"w2", b"w1", b"w2"]
    assert {i: len(w.tasks) for i, w in scheduler.workers.items()} == {b"w1": 2, b"w2": 4}


def test_worker_capacity_is_respected():
    a = make_stream("a", prefetch=10)
    scheduler = make_scheduler([a], [(b"w", 3)])
    first = list(scheduler.assign(0.0))
    assert len(first) == 3 and list(scheduler.assign(1.0)) == []
    scheduler.done(b"w", done(b"w", first[1]), 1.0)
    [more] = list(scheduler.assign(2.0))
    assert more.key == (0, 3) and len(scheduler.workers[b"w"].tasks) == 3
    assert len(a.inflight) == 4  # three held + one sent, waiting for its ack


def test_no_workers_no_assignments():
    a = make_stream("a")
    scheduler = make_scheduler([a])
    assert list(scheduler.assign(0.0)) == [] and not a.inflight


def test_the_message_describes_the_task():
    a = make_stream("a", prefetch=1)
    scheduler = make_scheduler([a], [(b"w", 1)])
    [x] = list(scheduler.assign(0.0))
    assert (x.worker, x.stream, x.key) == (b"w", "a", (0, 0))
    assert x.message == a.task(0, 0, a.inflight[(0, 0)], None)
    assert scheduler.workers[b"w"].tasks == {"a:0:0": ("a", (0, 0))}
    assert (a.inflight[(0, 0)].worker, a.inflight[(0, 0)].attempts) == (b"w", 1)


def test_duplicate_stream_ids_are_refused():
    scheduler = make_scheduler([make_stream("a")])
    with pytest.raises(ValueError, match="stream a exists"):
        scheduler.add_stream(make_stream("a"))


# --- worker deaths and retries ----------------------------------------------------------------------------


def test_a_dead_workers_tasks_go_to_another_worker():
    a = make_stream("a", prefetch=2)
    scheduler = make_scheduler([a], [(b"w1", 2)])
    first = list(scheduler.assign(0.0))
    assert [x.worker for x in first] == [b"w1", b"w1"]
    scheduler.add_worker(b"w2", hello("w2", 2), 1.0)
    assert scheduler.remove_worker(b"w1", "exited") == (2, [])
    assert list(a.reissue) == [(0, 0), (0, 1)] and all(t.worker is None for t in a.inflight.values())
    again = list(scheduler.assign(2.0))
    assert [(x.worker, x.key, x.message.task) for x in again] == [(b"w2", k, x.message.task) for k, x in zip([(0, 0), (0, 1)], first)]
    assert scheduler.workers[b"w2"].tasks == {"a:0:0": ("a", (0, 0)), "a:0:1": ("a", (0, 1))}
    assert [a.inflight[k].attempts for k in [(0, 0), (0, 1)]] == [2, 2]
    assert scheduler.reissued_total == 2 and len(a.inflight) == 2


def test_a_batch_acknowledged_before_its_worker_died_is_not_requeued():
    a = make_stream("a", prefetch=2)
    scheduler = make_scheduler([a], [(b"w", 2)])
    list(scheduler.assign(0.0))
    scheduler.credit(a, P.Credit(stream="a", acks=[(0, 0, 10)]), 1.0)  # a copy got through before its report
    assert scheduler.remove_worker(b"w", "exited") == (1, [])
    assert list(a.reissue) == [(0, 1)] and scheduler.reissued_total == 1


def test_removing_an_unknown_worker_does_nothing():
    scheduler = make_scheduler([make_stream("a")], [(b"w", 1)])
    list(scheduler.assign(0.0))
    before = snapshot(scheduler)
    assert scheduler.remove_worker(b"ghost", "exited") == (0, [])
    assert snapshot(scheduler) == before


def test_a_retried_task_avoids_the_worker_it_failed_on():
    a = make_stream("a", prefetch=1)
    scheduler = make_scheduler([a], [(b"big", 4), (b"small", 1)])
    [x] = list(scheduler.assign(0.0))
    assert x.worker == b"big"
    assert scheduler.failed(b"big", failed(b"big", x), 1.0) is None
    [y] = list(scheduler.assign(2.0))
    assert (y.worker, y.key) == (b"small", (0, 0))  # though "big" has more room


def test_a_retry_waits_for_a_worker_that_has_not_held_it():
    a, b = make_stream("a", prefetch=2, n=100), make_stream("b", prefetch=1)
    scheduler = make_scheduler([b], [(b"small", 1)])
    [other] = list(scheduler.assign(0.0))
    assert other.worker == b"small"  # now full
    scheduler.add_worker(b"big", hello("big", 3), 0.0)
    scheduler.add_stream(a)
    xs = list(scheduler.assign(0.0))
    assert [(x.stream, x.key, x.worker) for x in xs] == [("a", (0, 0), b"big"), ("a", (0, 1), b"big")]
    assert scheduler.failed(b"big", failed(b"big", xs[0]), 1.0) is None
    assert list(scheduler.assign(2.0)) == []  # "big" has room, but it failed this batch: wait for "small"
    assert list(a.reissue) == [(0, 0)] and a.inflight[(0, 0)].worker is None
    assert scheduler.done(b"small", done(b"small", other), 3.0) is b
    [y] = list(scheduler.assign(4.0))
    assert (y.stream, y.key, y.worker) == ("a", (0, 0), b"small")


def test_a_waiting_retry_does_not_hold_back_new_batches():
    """Batch (0, 0) failed on "big" and waits for "small" (busy); "big" still has room and the stream
    has credits: its new batches go out meanwhile."""
    a, b = make_stream("a", prefetch=3, n=100), make_stream("b", prefetch=1)
    scheduler = make_scheduler([b], [(b"small", 1)])
    [other] = list(scheduler.assign(0.0))
    scheduler.add_worker(b"big", hello("big", 4), 0.0)
    scheduler.add_stream(a)
    first = list(scheduler.assign(0.0))
    assert [x.key for x in first] == [(0, 0), (0, 1), (0, 2)]
    assert scheduler.failed(b"big", failed(b"big", first[0]), 1.0) is None
    for x in first[1:]:
        scheduler.done(b"big", done(b"big", x), 1.0)
    scheduler.credit(a, P.Credit(stream="a", received=[(0, 1), (0, 2)], acks=[(0, 1, 10), (0, 2, 10)]), 1.0)
    xs = list(scheduler.assign(2.0))
    assert [(x.key, x.worker) for x in xs] == [((0, 3), b"big"), ((0, 4), b"big")]  # (0, 0) still waits
    assert list(a.reissue) == [(0, 0)]
    scheduler.done(b"small", done(b"small", other), 3.0)
    [y] = list(scheduler.assign(4.0))
    assert (y.key, y.worker) == ((0, 0), b"small")


def test_a_batch_received_before_its_worker_died_is_not_redone():
    a = make_stream("a", prefetch=2)
    scheduler = make_scheduler([a], [(b"w1", 2), (b"w2", 2)])
    x, y = list(scheduler.assign(0.0))
    scheduler.credit(a, P.Credit(stream="a", received=[x.key]), 1.0)  # it arrived; the "done" report was lost
    requeued, failures = scheduler.remove_worker(x.worker, "exited")
    assert failures == [] and list(a.reissue) == ([y.key] if y.worker == x.worker else [])
    assert a.inflight[x.key].worker is None and a.inflight[x.key].attempts == 1
    scheduler.credit(a, P.Credit(stream="a", acks=[(*x.key, 10)]), 2.0)
    assert x.key not in a.inflight


def test_a_retry_goes_back_once_every_worker_has_held_it():
    a = make_stream("a", prefetch=1)
    scheduler = make_scheduler([a], [(b"w1", 1), (b"w2", 2)], max_attempts=10)
    holders = []
    for step in range(4):
        [x] = list(scheduler.assign(float(step)))
        holders.append(x.worker)
        assert scheduler.failed(x.worker, failed(x.worker, x), float(step)) is None
    assert holders == [b"w2", b"w1", b"w2", b"w2"]  # both tried: the one with most room, every time
    assert a.inflight[(0, 0)].tried == {b"w1", b"w2"}


def test_a_task_that_kills_max_attempts_workers_ends_only_its_stream():
    a, b = make_stream("a", prefetch=1), make_stream("b", prefetch=1)
    scheduler = make_scheduler([a], [(b"w1", 1)], max_attempts=3)
    [x] = list(scheduler.assign(0.0))
    for n, (dying, next_worker) in enumerate([(b"w1", b"w2"), (b"w2", b"w3")], start=1):
        scheduler.add_worker(next_worker, hello(next_worker.decode(), 2), float(n))
        assert scheduler.remove_worker(dying, "exited") == (1, [])
        [x] = list(scheduler.assign(float(n)))
        assert (x.worker, x.key, a.inflight[(0, 0)].attempts) == (next_worker, (0, 0), n + 1)
    scheduler.add_stream(b)
    [y] = list(scheduler.assign(3.0))
    assert (y.stream, y.worker) == ("b", b"w3")
    requeued, failures = scheduler.remove_worker(b"w3", "exited")
    assert requeued == 1  # b's task, on its first attempt
    [failure] = failures
    assert (failure.stream, failure.kind) == ("a", "attempts")
    assert failure.message.startswith("batch 0 of epoch 0 (task a:0:0) failed 3 time(s), giving up; last: its worker w3 exited")
    assert list(b.reissue) == [(0, 0)] and b.inflight[(0, 0)].attempts == 1 and b.inflight[(0, 0)].last_error == "its worker w3 exited"


def test_unreachable_is_a_death():
    a = make_stream("a", prefetch=2)
    scheduler = make_scheduler([a], [(b"w1", 1), (b"w2", 1)], max_attempts=1)
    xs = list(scheduler.assign(0.0))
    assert [x.worker for x in xs] == [b"w1", b"w2"]
    [failure] = scheduler.unreachable(b"w1")
    assert b"w1" not in scheduler.workers
    assert failure == StreamFailure("a", "batch 0 of epoch 0 (task a:0:0) failed 1 time(s), giving up; last: its worker w1 was unreachable", "attempts")


def test_a_stream_ended_during_a_round_gets_no_more_tasks():
    a, b = make_stream("a", prefetch=3), make_stream("b", prefetch=3)
    scheduler = make_scheduler([a, b], [(b"w1", 10)], max_attempts=1)
    sent = []
    for x in scheduler.assign(0.0):
        sent.append(x.stream)
        if len(sent) == 2:  # the send of a second task fails: its worker is gone, both streams fail
            for failure in scheduler.unreachable(x.worker):
                scheduler.remove_stream(failure.stream)
            scheduler.add_worker(b"w2", hello("w2", 10), 0.0)
    assert len(sent) == 2 and not scheduler.streams


def test_a_stream_removed_during_a_round_gets_nothing_more():
    a, b = make_stream("a", prefetch=3), make_stream("b", prefetch=3)
    scheduler = make_scheduler([a, b], [(b"w", 10)])
    sent = []
    for x in scheduler.assign(0.0):
        sent.append(x.stream)
        if len(sent) == 1:  # the first send of the round ends the other stream (its turn comes next)
            scheduler.remove_stream("b" if x.stream == "a" else "a")
    assert len(sent) == 3 and len(set(sent)) == 1


def test_credit_records_receipts_then_acknowledgements():
    a = make_stream("a", prefetch=3)
    scheduler = make_scheduler([a], [(b"w", 3)])
    list(scheduler.assign(0.0))
    scheduler.credit(a, P.Credit(stream="a", received=[(0, 0), (0, 2), (7, 7)], acks=[(0, 1, 10), (0, 0, 10), (0, 1, 10)]), 4.0)
    assert list(a.inflight) == [(0, 2)] and a.inflight[(0, 2)].received
    assert (a.acked, a.last_heard) == (2, 4.0)


# --- failure reports --------------------------------------------------------------------------------------


def test_corrupt_ends_the_stream():
    a = make_stream("a", prefetch=2)
    scheduler = make_scheduler([a], [(b"w", 2)])
    x = next(iter(scheduler.assign(0.0)))
    failure = scheduler.failed(b"w", failed(b"w", x, "corrupt", "cannot decode a.png"), 1.0)
    assert failure == StreamFailure("a", "cannot decode a.png", "corrupt")


@pytest.mark.parametrize("kind", ["error", "unreachable"])
def test_errors_are_retried_until_attempts_run_out(kind):
    a = make_stream("a", prefetch=1)
    scheduler = make_scheduler([a], [(b"w1", 1), (b"w2", 1)], max_attempts=3)
    holders = []
    for attempt in range(1, 4):
        [x] = list(scheduler.assign(float(attempt)))
        holders.append(x.worker)
        result = scheduler.failed(x.worker, failed(x.worker, x, kind, f"oops {attempt}"), float(attempt))
        if attempt < 3:
            assert result is None and list(a.reissue) == [(0, 0)] and a.inflight[(0, 0)].last_error == f"oops {attempt}"
    assert holders == [b"w1", b"w2", b"w1"]  # each retry avoids the worker it just failed on
    assert result == StreamFailure("a", "batch 0 of epoch 0 (task a:0:0) failed 3 time(s), giving up; last: oops 3", "attempts")


# --- deadlines --------------------------------------------------------------------------------------------


def test_a_task_not_reported_in_time_is_reissued_and_the_late_report_ignored():
    a = make_stream("a", prefetch=1)
    scheduler = make_scheduler([a], [(b"slow", 2), (b"fast", 1)], task_timeout=10.0, worker_liveness=5.0, stream_liveness=100.0)
    [x] = list(scheduler.assign(0.0))
    assert x.worker == b"slow"
    for now in (4.0, 8.0, 10.0):  # heartbeats keep it alive, but it never reports
        scheduler.heard(b"slow", now)
        scheduler.heard(b"fast", now)
        assert scheduler.expire(now) == Expired()
    scheduler.heard(b"slow", 10.5)
    scheduler.heard(b"fast", 10.5)
    expired = scheduler.expire(10.5)
    assert (expired.reissued, expired.silent_workers, expired.failures) == (1, [], [])
    assert scheduler.workers[b"slow"].tasks == {} and list(a.reissue) == [(0, 0)]
    assert a.inflight[(0, 0)].last_error == "no report within the 10 s task deadline"
    [y] = list(scheduler.assign(11.0))
    assert (y.worker, y.key, y.message.task) == (b"fast", (0, 0), x.message.task)
    held = snapshot(scheduler)
    assert scheduler.done(b"slow", done(b"slow", x), 12.0) is None  # the late report
    assert snapshot(scheduler) == held
    state = a.inflight[(0, 0)]
    assert (state.worker, state.done_at, state.attempts) == (b"fast", None, 2)
    assert scheduler.done(b"fast", done(b"fast", y), 13.0) is a
    assert state.done_at == 13.0 and scheduler.workers[b"fast"].tasks == {}


def test_a_batch_sent_but_never_received_is_reissued():
    a = make_stream("a", prefetch=2)
    scheduler = make_scheduler([a], [(b"w", 2)], delivery_timeout=5.0, task_timeout=100.0, worker_liveness=100.0, stream_liveness=100.0)
    xs = list(scheduler.assign(0.0))
    for x in xs:
        scheduler.done(b"w", done(b"w", x), 1.0)
    scheduler.credit(a, P.Credit(stream="a", received=[(0, 0)]), 2.0)
    assert scheduler.expire(6.0) == Expired()  # exactly delivery_timeout: not yet
    expired = scheduler.expire(6.5)
    assert expired.reissued == 1
    assert list(a.reissue) == [(0, 1)]  # (0, 0) arrived: not re-issued although not yet acknowledged
    assert a.inflight[(0, 0)].worker == b"w" and a.inflight[(0, 0)].received
    assert a.inflight[(0, 1)].last_error == "sent but not received by the trainer within 5 s"
    scheduler.heard(b"w", 90.0)
    scheduler.credit(a, P.Credit(stream="a"), 90.0)
    assert scheduler.expire(90.0).reissued == 0  # nothing else is late, however long we wait
    [y] = list(scheduler.assign(90.0))
    assert (y.key, y.message.task) == ((0, 1), "a:0:1")


def test_an_acknowledged_batch_is_never_reissued():
    a = make_stream("a", prefetch=1)
    scheduler = make_scheduler([a], [(b"w", 1)], task_timeout=10.0, worker_liveness=100.0, stream_liveness=100.0)
    [x] = list(scheduler.assign(0.0))
    scheduler.credit(a, P.Credit(stream="a", acks=[(0, 0, 10)]), 1.0)  # acked before its worker reported
    assert scheduler.expire(50.0).reissued == 0
    assert scheduler.done(b"w", done(b"w", x), 51.0) is a  # the report still frees the worker
    assert scheduler.workers[b"w"].tasks == {}
    [y] = list(scheduler.assign(51.0))
    assert y.key == (0, 1)


def test_deadline_reissue_counts_attempts():
    a = make_stream("a", prefetch=1)
    scheduler = make_scheduler([a], [(b"w", 1)], task_timeout=1.0, max_attempts=2, worker_liveness=100.0, stream_liveness=100.0)
    list(scheduler.assign(0.0))
    assert scheduler.expire(2.0).reissued == 1
    list(scheduler.assign(2.0))
    expired = scheduler.expire(4.0)
    assert expired.reissued == 0
    assert expired.failures == [StreamFailure("a", "batch 0 of epoch 0 (task a:0:0) failed 2 time(s), giving up; last: no report within the 1 s task deadline", "attempts")]


# --- silence ----------------------------------------------------------------------------------------------


def test_silent_workers_are_written_off_and_their_tasks_requeued():
    a = make_stream("a", prefetch=2)
    scheduler = make_scheduler([a], [(b"w1", 1), (b"w2", 1)], worker_liveness=5.0, stream_liveness=100.0)
    list(scheduler.assign(0.0))
    scheduler.heard(b"w2", 4.0)
    assert scheduler.heard(b"ghost", 4.0) is None
    assert scheduler.expire(5.0).silent_workers == []
    expired = scheduler.expire(5.5)
    assert [w.identity for w in expired.silent_workers] == [b"w1"]
    assert (expired.reissued, expired.failures, expired.silent_streams) == (0, [], [])
    assert set(scheduler.workers) == {b"w2"} and list(a.reissue) == [(0, 0)]
    assert a.inflight[(0, 0)].last_error == "its worker w1 went silent for 5.5 s"


def test_silent_streams_are_reported_and_not_reissued():
    a, b = make_stream("a", prefetch=1), make_stream("b", prefetch=1)
    scheduler = make_scheduler([a, b], [(b"w", 2)], stream_liveness=10.0, task_timeout=1.0, worker_liveness=100.0)
    list(scheduler.assign(0.0))
    scheduler.credit(b, P.Credit(stream="b"), 5.0)
    expired = scheduler.expire(10.5)
    assert expired.silent_streams == ["a"]
    assert expired.reissued == 1 and list(b.reissue) == [(0, 0)] and not a.reissue  # only b's late task
    assert "a" in scheduler.streams  # the daemon ends it


# --- stray reports ----------------------------------------------------------------------------------------


def stray_setup():
    a, b = make_stream("a", prefetch=2), make_stream("b", prefetch=1, data="tcp://127.0.0.1:6000")
    scheduler = make_scheduler([a, b], [(b"w1", 2), (b"w2", 2)])
    xs = list(scheduler.assign(0.0))
    return scheduler, {(x.stream, x.key): x for x in xs}


def test_stray_reports_change_nothing():
    scheduler, xs = stray_setup()
    x = xs[("a", (0, 0))]
    holder = x.worker
    other = b"w2" if holder == b"w1" else b"w1"
    before = snapshot(scheduler)
    strays = [
        (b"ghost", done(b"ghost", x)),  # unknown worker
        (holder, done(holder, x).model_copy(update={"task": "a:9:9"})),  # unknown task
        (other, done(other, x)),  # a task of another worker
        (holder, done(holder, x).model_copy(update={"index": 1})),  # a task it holds, but not this batch
    ]
    for identity, report in strays:
        assert scheduler.done(identity, report, 1.0) is None
        assert snapshot(scheduler) == before


def test_stray_failures_change_nothing():
    scheduler, xs = stray_setup()
    x = xs[("a", (0, 0))]
    holder = x.worker
    other = b"w2" if holder == b"w1" else b"w1"
    before = snapshot(scheduler)
    for identity, task in [(b"ghost", x.message.task), (holder, "a:9:9"), (other, x.message.task)]:
        for kind in ("corrupt", "error"):
            report = P.Failed(worker=identity.decode(), task=task, stream="a", message="x", kind=kind)
            assert scheduler.failed(identity, report, 1.0) is None
    assert snapshot(scheduler) == before


def test_reports_for_an_ended_stream_are_stray():
    scheduler, xs = stray_setup()
    y = xs[("b", (0, 0))]
    stream, _drops = scheduler.remove_stream("b")
    assert stream.id == "b"
    before = snapshot(scheduler)
    assert scheduler.done(y.worker, done(y.worker, y), 1.0) is None
    assert scheduler.failed(y.worker, failed(y.worker, y, "corrupt"), 1.0) is None
    assert snapshot(scheduler) == before


def test_remove_stream_drops_an_address_only_when_no_other_stream_uses_it():
    a, b = make_stream("a", data=DATA), make_stream("b", data=DATA)
    c = make_stream("c", data="tcp://127.0.0.1:6000")
    scheduler = make_scheduler([a, b, c], [(b"w1", 4), (b"w2", 4)])
    list(scheduler.assign(0.0))
    assert scheduler.remove_stream("a") == (a, [])
    assert all(s != "a" for w in scheduler.workers.values() for s, _ in w.tasks.values())
    assert scheduler.remove_stream("b") == (b, [(b"w1", DATA), (b"w2", DATA)])
    assert scheduler.remove_stream("c") == (c, [(b"w1", "tcp://127.0.0.1:6000"), (b"w2", "tcp://127.0.0.1:6000")])
    assert scheduler.remove_stream("c") == (None, [])
    assert all(not w.tasks for w in scheduler.workers.values())


def test_done_counts_for_worker_and_stream():
    a = make_stream("a", prefetch=1)
    scheduler = make_scheduler([a], [(b"w", 1)])
    [x] = list(scheduler.assign(0.0))
    report = done(b"w", x, samples=7).model_copy(update={"skipped": 2, "times": P.StageTimes(load=0.5, augment=0.25, send=0.125)})
    assert scheduler.done(b"w", report, 3.0) is a
    worker = scheduler.workers[b"w"]
    assert (worker.done, worker.samples, worker.last_heard, worker.times.load) == (1, 7, 3.0, 0.5)
    assert (a.skipped_corrupt, a.times.augment, a.inflight[(0, 0)].done_at) == (2, 0.25, 3.0)
    assert (scheduler.in_flight(), scheduler.waiting_reissue(), scheduler.streams_of("owner")) == (1, 0, 1)


# --- property: invariants under random events -------------------------------------------------------------

PROPERTY_LIMITS = dict(task_timeout=4.0, delivery_timeout=2.0, worker_liveness=3.0, stream_liveness=1e9)


class World:
    """The scheduler plus a model of what it talks to: workers that may do, fail, lose or never finish their
    tasks, reports still on their way, and trainers that keep what arrives, drop duplicates, report receipts
    and acknowledge what they consume (the trainer is the one that keeps delivery exactly-once)."""

    def __init__(self, streams, workers, max_attempts):
        self.scheduler = Scheduler(SchedulerLimits(max_attempts=max_attempts, **PROPERTY_LIMITS))
        self.max_attempts = max_attempts
        self.now = 0.0
        self.expected, self.arrived, self.unreported, self.consumed = {}, {}, {}, {}
        self.ended = {}  # stream id -> the StreamFailure that ended it
        for n, (prefetch, epochs, num_samples, batch) in enumerate(streams):
            stream = make_stream(f"s{n}", prefetch=prefetch, epochs=epochs, n=num_samples, batch=batch, data=f"tcp://127.0.0.1:{5000 + n}")
            self.scheduler.add_stream(stream)
            self.expected[stream.id] = [(e, i) for e in range(epochs) for i in range(stream.plan.num_batches())]
            self.arrived[stream.id], self.unreported[stream.id], self.consumed[stream.id] = set(), set(), []
        self.jobs = {}  # worker -> assignments it received and has not finished
        self.hung = set()  # workers that stopped heartbeating (and working)
        self.reports = []  # (worker, P.Done) on their way to the daemon
        self.joined = 0
        self.seen = Counter()  # what happened, for the test's statistics
        for capacity in workers:
            self.join(capacity)

    # --- events -----------------------------------------------------------------------------------------

    def alive(self, working=False):
        return sorted(w for w in self.jobs if not (working and w in self.hung))

    def join(self, capacity):
        identity = f"w{self.joined}".encode()
        self.joined += 1
        self.scheduler.add_worker(identity, hello(identity.decode(), capacity), self.now)
        self.jobs[identity] = []

    def end(self, failure: StreamFailure):
        assert failure.stream in self.scheduler.streams
        stream = self.scheduler.streams[failure.stream]
        if failure.kind == "attempts":
            assert any(t.attempts >= self.max_attempts for t in stream.inflight.values())
        else:
            assert failure.kind == "corrupt"
        self.ended[failure.stream] = failure
        self.scheduler.remove_stream(failure.stream)

    def worker_gone(self, identity):
        self.jobs.pop(identity, None)
        self.hung.discard(identity)

    def assign(self, fail_at=None):
        s = self.scheduler
        known = {(sid, k) for sid, stream in s.streams.items() for k in stream.inflight}
        waiting = {(sid, k) for sid, stream in s.streams.items() for k, t in stream.inflight.items() if t.worker is None}
        for n, x in enumerate(s.assign(self.now)):
            stream = s.streams[x.stream]
            state = stream.inflight[x.key]
            # a batch is handed out again only while it waits for re-issue (its holder died, failed or missed a deadline)
            assert (x.stream, x.key) in waiting or (x.stream, x.key) not in known
            assert x.key not in self.consumed[x.stream]  # nothing acknowledged is issued again
            waiting.discard((x.stream, x.key))
            known.add((x.stream, x.key))
            epoch, index = x.key
            assert state.worker == x.worker and state.task == x.message.task == f"{x.stream}:{epoch}:{index}"
            assert (x.message.epoch, x.message.index, x.message.pipeline.version) == (epoch, index, state.version)
            assert x.message.ids == stream.plan.batch(epoch, index).tolist()
            if n == fail_at:  # the send fails: the worker is gone
                for failure in s.unreachable(x.worker):
                    self.end(failure)
                self.worker_gone(x.worker)
                waiting |= {(sid, k) for sid, st_ in s.streams.items() for k, t in st_.inflight.items() if t.worker is None}
            else:
                self.jobs[x.worker].append(x)

    def work(self, w, j):
        workers = self.alive(working=True)
        if not workers or not self.jobs[workers[w % len(workers)]]:
            return
        identity = workers[w % len(workers)]
        x = self.jobs[identity].pop(j % len(self.jobs[identity]))
        if x.stream in self.scheduler.streams and x.key not in self.consumed[x.stream]:
            self.arrived[x.stream].add(x.key)  # a duplicate just overwrites: the trainer keeps one copy
            self.unreported[x.stream].add(x.key)
        self.reports.append((identity, done(identity, x)))

    def report(self, r):
        if self.reports:
            identity, report = self.reports.pop(r % len(self.reports))
            stream = self.scheduler.done(identity, report, self.now)
            assert stream is None or stream is self.scheduler.streams[report.stream]
            self.seen["stray report" if stream is None else "report"] += 1

    def fail(self, w, kind):
        workers = self.alive(working=True)
        if not workers or not self.jobs[workers[w % len(workers)]]:
            return
        identity = workers[w % len(workers)]
        x = self.jobs[identity].pop(0)
        failure = self.scheduler.failed(identity, failed(identity, x, kind), self.now)
        if failure is not None:
            self.end(failure)

    def credit(self, n, acks, receipts):
        sid = f"s{n}"
        if sid not in self.scheduler.streams:
            return
        consume = sorted(self.arrived[sid])[:acks]
        received = sorted(self.unreported[sid]) if receipts else []
        if receipts:
            self.unreported[sid].clear()
        self.arrived[sid] -= set(consume)
        self.consumed[sid] += consume
        message = P.Credit(stream=sid, acks=[(e, i, 1) for e, i in consume], received=received)
        self.scheduler.credit(self.scheduler.streams[sid], message, self.now)

    def kill(self, w):
        workers = self.alive()
        if workers:
            identity = workers[w % len(workers)]
            for failure in self.scheduler.remove_worker(identity, "exited")[1]:
                self.end(failure)
            self.worker_gone(identity)

    def hang(self, w):
        workers = self.alive(working=True)
        if workers:
            self.hung.add(workers[w % len(workers)])

    def tick(self, seconds):
        self.now += seconds
        for identity in self.alive(working=True):
            assert self.scheduler.heard(identity, self.now) is not None

    def expire(self):
        expired = self.scheduler.expire(self.now)
        assert expired.silent_streams == []
        self.seen["deadline re-issue"] += expired.reissued
        self.seen["silent worker"] += len(expired.silent_workers)
        for worker in expired.silent_workers:
            assert worker.identity in self.hung  # only workers that stopped heartbeating
            self.worker_gone(worker.identity)
        for failure in expired.failures:
            self.end(failure)

    def update(self, n):
        stream = self.scheduler.streams.get(f"s{n}")
        if stream is not None:
            stream.update_spec({"name": f"v{stream.pipeline_version + 1}", "ops": []})

    # --- what must hold after every step ----------------------------------------------------------------

    def check(self):
        s = self.scheduler
        assert set(s.workers) == set(self.jobs)
        holders = {}  # (stream, key) -> the workers whose `tasks` list it
        for identity, worker in s.workers.items():
            assert len(worker.tasks) <= worker.hello.capacity
            for task, (sid, key) in worker.tasks.items():
                holders.setdefault((sid, key), []).append(identity)
                assert sid in s.streams  # an ended stream leaves no task behind
                state = s.streams[sid].inflight.get(key)
                if state is None:
                    assert key in self.consumed[sid]  # acknowledged before its worker reported
                else:
                    assert (state.task, state.worker, state.done_at) == (task, identity, None)
        # the old holder's entry goes when a batch is re-issued, so no batch is ever listed by two workers
        assert all(len(ws) == 1 for ws in holders.values()), holders
        for sid, stream in s.streams.items():
            assert len(stream.inflight) <= stream.request.prefetch
            assert stream.acked == len(self.consumed[sid])  # every acknowledgement was accepted
            assert set(stream.versions) == {t.version for t in stream.inflight.values()} | {stream.pipeline_version}
            for key, state in stream.inflight.items():
                assert key not in self.consumed[sid] and key in self.expected[sid]
                assert 0 <= state.attempts <= self.max_attempts
                if state.worker is None:
                    assert key in stream.reissue or state.received  # waiting for a worker, or already with the trainer
                elif state.done_at is None:
                    assert holders.get((sid, key)) == [state.worker]  # held by exactly the worker it names
                else:
                    assert (sid, key) not in holders  # reported sent: no worker holds it any more

    def finish(self):
        """All workers alive and heartbeating, every report delivered, trainers acknowledging what arrives."""
        self.hung.clear()
        if not self.jobs:
            self.join(2)
        for _ in range(400):
            if all(stream.finished() for stream in self.scheduler.streams.values()):
                break
            self.tick(1.0)
            while self.reports:
                self.report(0)
            self.assign()
            for identity in self.alive():
                while self.jobs[identity]:
                    self.work(self.alive().index(identity), 0)
            while self.reports:
                self.report(0)
            for n in range(len(self.expected)):
                self.credit(n, 1 << 20, True)
            self.expire()
            self.check()
        for sid, expected in self.expected.items():
            if sid in self.ended:
                assert sid not in self.scheduler.streams
                continue
            stream = self.scheduler.streams[sid]
            assert stream.finished(), (sid, stream.status(self.now))
            assert sorted(self.consumed[sid]) == expected  # every batch of every epoch, acknowledged once
            assert len(set(self.consumed[sid])) == len(self.consumed[sid]) == stream.acked


streams_strategy = st.lists(
    st.tuples(st.integers(1, 4), st.integers(1, 2), st.integers(1, 30), st.integers(3, 10)),  # prefetch, epochs, samples, batch
    min_size=1, max_size=3,
)
events_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("assign"), st.none() | st.integers(0, 6)),
        st.tuples(st.just("work"), st.integers(0, 5), st.integers(0, 5)),
        st.tuples(st.just("report"), st.integers(0, 20)),
        st.tuples(st.just("fail"), st.integers(0, 5), st.sampled_from(["error", "error", "unreachable", "corrupt"])),
        st.tuples(st.just("credit"), st.integers(0, 2), st.integers(0, 4), st.booleans()),
        st.tuples(st.just("kill"), st.integers(0, 5)),
        st.tuples(st.just("join"), st.integers(1, 3)),
        st.tuples(st.just("hang"), st.integers(0, 5)),
        st.tuples(st.just("tick"), st.sampled_from([0.5, 1.0, 2.0, 3.5, 5.0])),
        st.tuples(st.just("tick"), st.sampled_from([0.5, 1.0, 2.0, 3.5, 5.0])),
        st.tuples(st.just("expire")),
        st.tuples(st.just("expire")),
        st.tuples(st.just("update"), st.integers(0, 2)),
    ),
    min_size=30,
    max_size=100,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    streams=streams_strategy,
    workers=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    max_attempts=st.sampled_from([2, 4, 1000]),
    events=events_strategy,
)
def test_invariants_hold_under_random_events(streams, workers, max_attempts, events):
    world = World(streams, workers, max_attempts)
    world.check()
    for name, *args in events:
        getattr(world, name)(*args)
        world.check()
    world.finish()
    event(f"streams finished: {len(world.expected) - len(world.ended)} of {len(world.expected)}")
    event(f"ended: {sorted(f.kind for f in world.ended.values())}")
    event(f"re-issued: {'yes' if world.scheduler.reissued_total else 'no'}")
    for what in ("stray report", "deadline re-issue", "silent worker"):
        event(f"{what}: {'yes' if world.seen[what] else 'no'}")


# --- draining (autoscaling down) --------------------------------------------------------------------------


def test_a_draining_worker_gets_no_new_task_and_is_drained_once_its_batches_reached_the_trainer():
    a = make_stream("a", prefetch=4, n=80)
    scheduler = make_scheduler([a], [(b"w1", 2), (b"w2", 2)])
    first = list(scheduler.assign(0.0))
    assert sorted(x.worker for x in first) == [b"w1", b"w1", b"w2", b"w2"]
    assert scheduler.drain(b"w1") and not scheduler.drain(b"nobody")
    held = [x for x in first if x.worker == b"w1"]
    scheduler.done(b"w1", done(b"w1", held[0]), 1.0)
    assert not scheduler.drained(b"w1")  # one task still held
    scheduler.done(b"w1", done(b"w1", held[1]), 1.1)
    assert not scheduler.drained(b"w1")  # both sent, neither received: a lost batch would need re-issue
    scheduler.credit(a, P.Credit(stream="a", received=[held[0].key], acks=[(*held[1].key, 10)]), 1.2)
    assert scheduler.drained(b"w1")
    # the credits freed by the ack go to w2 only, however free w1 is
    scheduler.done(b"w2", done(b"w2", [x for x in first if x.worker == b"w2"][0]), 1.3)
    assert [x.worker for x in scheduler.assign(1.4)] == [b"w2"]
    assert scheduler.remove_worker(b"w1", "retired") == (0, []) and not scheduler.draining
    assert scheduler.drained(b"w1")  # gone counts as drained


def test_a_retry_never_goes_to_a_draining_worker():
    a = make_stream("a", prefetch=2)
    scheduler = make_scheduler([a], [(b"w1", 2), (b"w2", 2)])
    first = list(scheduler.assign(0.0))
    scheduler.drain(b"w2")
    victim = first[0].worker
    scheduler.remove_worker(victim, "exited")
    again = list(scheduler.assign(1.0))
    assert all(x.worker != b"w2" for x in again)
    if victim == b"w2":
        assert again == []


def test_queues_are_full_when_every_active_stream_has_its_batches_made_and_waiting():
    a, b = make_stream("a", prefetch=3), make_stream("b", prefetch=3)
    scheduler = make_scheduler([a, b], [(b"w", 8)])
    assert scheduler.queues_full() == (2, False)  # nothing issued yet
    issued = list(scheduler.assign(0.0))
    for x in issued[:-1]:
        scheduler.done(b"w", done(b"w", x), 1.0)
    assert scheduler.queues_full() == (2, True)  # each has prefetch - 1 = 2 ready at least
    scheduler.credit(a, P.Credit(stream="a", acks=[(*x.key, 10) for x in issued if x.stream == "a"]), 2.0)
    assert scheduler.queues_full() == (2, False)  # a's credits came back: its workers have work
    assert make_scheduler().queues_full() == (0, False)
