"""Daemon-side stream accounting: the credit window, acks, re-issue, resume skipping, pipeline versions."""

import pytest

from augserve import protocol as P
from augserve.epochs import EpochPlan
from augserve.streams import StreamState, TaskState

SPEC = {"name": "v1", "ops": []}


def make_stream(prefetch=3, epochs=1, skip=(), start_epoch=0, n=40, batch=10, stream_id="s"):
    request = P.Attach(dataset="digits", pipeline="lenet5", batch_size=batch, prefetch=prefetch, epochs=epochs, data="tcp://127.0.0.1:5000")
    return StreamState(
        stream_id, "owner", b"client", request, EpochPlan(n, batch, seed=3), P.DatasetRef(ref="digits"), dict(SPEC),
        start_epoch=start_epoch, skip=frozenset(skip),
    )  # fmt: skip


def drain(stream, now=0.0, worker=b"w"):
    """Every task the stream hands out now, each marked as given to ``worker`` (as the scheduler does)."""
    out = []
    while (picked := stream.next_task(now)) is not None:
        picked[1].worker = worker
        out.append(picked)
    return out


def keys(tasks):
    return [key for key, _state in tasks]


# --- the credit window ------------------------------------------------------------------------------------


def test_never_more_than_prefetch_in_flight():
    stream = make_stream(prefetch=3)
    assert keys(drain(stream)) == [(0, 0), (0, 1), (0, 2)]
    assert not stream.has_work() and stream.next_task(0.0) is None
    assert stream.ack(0, 1, 10, 1.0)
    assert stream.has_work()
    assert keys(drain(stream)) == [(0, 3)]
    assert len(stream.inflight) == 3 and stream.issued_everything() and not stream.finished()


def test_the_window_holds_over_a_whole_run():
    stream = make_stream(prefetch=2, epochs=3, n=50, batch=10)
    issued, now = [], 0.0
    while not stream.finished():
        for key, _state in drain(stream, now):
            issued.append(key)
            assert len(stream.inflight) <= 2
        oldest = min(stream.inflight)
        assert stream.ack(*oldest, 10, now)
        now += 1.0
    assert issued == [(e, i) for e in range(3) for i in range(5)]
    assert stream.acked == 15 and not stream.has_work()


def test_unknown_and_duplicate_acks_are_refused():
    stream = make_stream(prefetch=2)
    drain(stream)
    assert not stream.ack(0, 5, 10, 0.0)  # never issued
    assert not stream.ack(3, 0, 10, 0.0)  # an epoch that does not exist
    assert stream.ack(0, 0, 10, 0.0)
    assert not stream.ack(0, 0, 10, 0.0)  # duplicate
    assert stream.acked == 1 and list(stream.inflight) == [(0, 1)]


# --- re-issue ---------------------------------------------------------------------------------------------


def test_reissue_keeps_window_task_id_and_version():
    stream = make_stream(prefetch=2)
    first = drain(stream, now=1.0, worker=b"w1")
    first_ids = [state.task for _key, state in first]
    assert first_ids == ["s:0:0", "s:0:1"]
    first[0][1].done_at, first[0][1].received = 2.0, True
    stream.update_spec({"name": "v2", "ops": []})
    for key in keys(first):
        stream.requeue(key)
    assert stream.reissued == 2 and len(stream.inflight) == 2
    assert stream.has_work()  # a re-issue needs no new credit
    again = drain(stream, now=5.0, worker=b"w2")
    assert keys(again) == [(0, 0), (0, 1)]
    assert [state.task for _key, state in again] == first_ids
    assert [state.version for _key, state in again] == [1, 1]  # issued under version 1, re-issued under it too
    state = again[0][1]
    assert (state.tried, state.worker, state.issued_at, state.done_at, state.received) == ({b"w1"}, b"w2", 5.0, None, False)
    assert stream.task(0, 0, state, None).pipeline == P.PipelineRef(stream="s", version=1, spec=SPEC)
    assert len(stream.inflight) == 2 and not stream.has_work()


def test_requeue_of_an_acknowledged_batch_is_a_no_op():
    stream = make_stream(prefetch=2)
    drain(stream)
    stream.ack(0, 0, 10, 0.0)
    stream.requeue((0, 0))
    assert stream.reissued == 0 and not stream.reissue


def test_stale_reissue_entries_are_skipped():
    stream = make_stream(prefetch=2, n=30)
    drain(stream, worker=b"w1")
    stream.requeue((0, 0))
    stream.requeue((0, 1))
    stream.ack(0, 0, 10, 0.0)  # acknowledged while waiting: its entry is stale
    assert keys(drain(stream, worker=b"w2")) == [(0, 1), (0, 2)]  # then a new batch in the freed credit
    assert not stream.reissue


def test_requeue_remembers_every_worker_that_held_the_batch():
    stream = make_stream(prefetch=1)
    drain(stream, worker=b"w1")
    stream.requeue((0, 0))
    stream.requeue((0, 0))  # requeued again before anyone took it: nobody new to remember
    drain(stream, worker=b"w2")
    stream.requeue((0, 0))
    assert stream.inflight[(0, 0)].tried == {b"w1", b"w2"}


def test_a_deferred_batch_is_first_in_line():
    stream = make_stream(prefetch=3)
    drain(stream, worker=b"w1")
    stream.requeue((0, 0))
    stream.requeue((0, 1))
    key, state = stream.next_task(1.0)
    assert key == (0, 0)
    stream.defer(key)  # no worker for it now
    assert list(stream.reissue) == [(0, 0), (0, 1)] and state.worker is None
    assert keys(drain(stream, worker=b"w2")) == [(0, 0), (0, 1)]


def test_the_second_entry_of_a_twice_requeued_batch_is_skipped():
    stream = make_stream(prefetch=1)
    drain(stream, worker=b"w1")
    stream.requeue((0, 0))
    stream.requeue((0, 0))
    assert list(stream.reissue) == [(0, 0), (0, 0)]
    assert keys(drain(stream, worker=b"w2")) == [(0, 0)]
    assert not stream.reissue and stream.inflight[(0, 0)].worker == b"w2"


# --- epochs and resume ------------------------------------------------------------------------------------


def test_epochs_roll_over_and_finish():
    stream = make_stream(prefetch=100, epochs=2, n=35)
    tasks = drain(stream)
    assert keys(tasks) == [(e, i) for e in range(2) for i in range(4)]
    for epoch in range(2):  # each batch gets its slice of its epoch's permutation; the last one is short
        ids = [stream.ids(epoch, i) for i in range(4)]
        assert [len(x) for x in ids] == [10, 10, 10, 5]
        assert sorted(sum(ids, [])) == list(range(35))
        assert ids == [stream.plan.batch(epoch, i).tolist() for i in range(4)]
    assert stream.ids(0, 0) != stream.ids(1, 0)
    for key in keys(tasks):
        assert not stream.finished()
        stream.ack(*key, 10, 0.0)
    assert stream.finished() and stream.acked == 8


def test_resume_skips_consumed_batches_of_its_epoch_only():
    stream = make_stream(prefetch=100, epochs=3, start_epoch=1, skip={0, 2})
    assert keys(drain(stream)) == [(1, 1), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]


def test_resume_with_every_batch_of_its_epoch_consumed_starts_the_next():
    stream = make_stream(prefetch=100, epochs=2, start_epoch=0, skip={0, 1, 2, 3})
    assert (stream.epoch, stream.next_index) == (1, 0)
    assert keys(drain(stream)) == [(1, 0), (1, 1), (1, 2), (1, 3)]


def test_resume_of_a_finished_run_has_nothing_to_do():
    stream = make_stream(epochs=2, start_epoch=1, skip={0, 1, 2, 3})
    assert stream.finished() and not stream.has_work() and stream.next_task(0.0) is None


def test_the_task_message():
    stream = make_stream(prefetch=1)
    [(key, state)] = drain(stream)
    task = stream.task(*key, state, None)
    assert task == P.Task(
        task="s:0:0", stream="s", epoch=0, index=0, ids=stream.plan.batch(0, 0).tolist(), seed=0, dataset=P.DatasetRef(ref="digits"),
        pipeline=P.PipelineRef(stream="s", version=1, spec=SPEC), data="tcp://127.0.0.1:5000", on_error="skip",
    )  # fmt: skip


# --- pipeline versions ------------------------------------------------------------------------------------


def test_an_update_applies_to_batches_not_yet_issued():
    stream = make_stream(prefetch=2)
    issued = drain(stream)
    assert stream.update_spec({"name": "v2", "ops": []}) == (2, 0, 2)
    assert stream.versions == {1: SPEC, 2: {"name": "v2", "ops": []}}
    for key in keys(issued):
        stream.requeue(key)
    assert [state.version for _key, state in drain(stream)] == [1, 1]  # re-issued: still version 1
    stream.ack(0, 0, 10, 0.0)
    [(key, state)] = drain(stream)
    assert (key, state.version) == ((0, 2), 2)
    assert stream.task(*key, state, None).pipeline.spec == {"name": "v2", "ops": []}
    assert stream.versions == {1: SPEC, 2: {"name": "v2", "ops": []}}  # (0, 1) still runs version 1
    stream.ack(0, 1, 10, 0.0)
    assert stream.versions == {2: {"name": "v2", "ops": []}}


def test_versions_do_not_grow_with_many_updates():
    stream = make_stream(prefetch=1)
    drain(stream)  # one version-1 task in flight throughout
    for n in range(2, 1002):
        stream.update_spec({"name": f"v{n}", "ops": []})
        assert set(stream.versions) == {1, n}
    assert stream.pipeline_version == 1001
    stream.ack(0, 0, 10, 0.0)
    assert stream.versions == {1001: {"name": "v1001", "ops": []}}


def test_versions_in_use_are_exactly_those_of_tasks_in_flight_and_the_current_one():
    stream = make_stream(prefetch=3, n=100)
    for n in range(2, 6):
        drain(stream)
        stream.update_spec({"name": f"v{n}", "ops": []})
        stream.ack(*min(stream.inflight), 10, 0.0)
        assert set(stream.versions) == {t.version for t in stream.inflight.values()} | {stream.pipeline_version}


# --- status -----------------------------------------------------------------------------------------------


def test_status_counts_credits_and_rate():
    stream = make_stream(prefetch=3)
    drain(stream)
    stream.requeue((0, 1))
    stream.ack(0, 0, 10, 0.0)
    stream.ack(0, 2, 10, 1.0)
    status = stream.status(1.0)
    assert (status["in_flight"], status["credits_free"], status["waiting_reissue"], status["reissued"], status["acked"]) == (1, 2, 1, 1, 2)
    assert status["images_per_s"] == pytest.approx(20.0)
    assert status["pipeline"] == "v1" and status["batches_per_epoch"] == 4
    no_batch_yet = {"mode": "auto", "frames_reason": None, "batches": {"frames": 0, "shm": 0}, "fallbacks": {"other_host": 0, "no_space": 0, "busy": 0, "unavailable": 0}}
    assert status["transport"] == no_batch_yet  # the daemon sets the stream's policy when it attaches (StreamTransport.of)


def test_task_state_defaults():
    state = TaskState("s:0:0", 1)
    assert (state.worker, state.tried, state.attempts, state.done_at, state.received) == (None, set(), 0, None, False)
