"""Daemon-side stream accounting: the credit window, acks, re-issue, resume skipping."""

import pytest

from augserve.epochs import EpochPlan
from augserve.streams import AttachRequest, Stream


def make_stream(prefetch=3, epochs=1, skip=(), start_epoch=0, n=40, batch=10):
    request = AttachRequest(dataset="digits", pipeline="lenet5", batch_size=batch, prefetch=prefetch, epochs=epochs, data="tcp://127.0.0.1:1")
    return Stream("s", b"c", request, EpochPlan(n, batch, seed=0), {"ref": "digits", "split": "train", "options": {}}, {}, start_epoch=start_epoch, skip=set(skip))


def drain(stream):
    tasks = []
    while (task := stream.next_task(0.0)) is not None:
        tasks.append(task)
    return tasks


def test_never_more_than_prefetch_in_flight():
    stream = make_stream(prefetch=3)
    assert [t[:2] for t in drain(stream)] == [(0, 0), (0, 1), (0, 2)]
    assert stream.ack(0, 1) and not stream.ack(0, 1)  # a duplicate ack is ignored
    assert [t[:2] for t in drain(stream)] == [(0, 3)]
    assert not stream.has_work()


def test_reissue_does_not_need_a_new_credit():
    stream = make_stream(prefetch=2)
    first = drain(stream)
    for epoch, index, _ids, _task, _version in first:
        stream.assign((epoch, index), b"w1")
    assert stream.requeue_worker(b"w1") == 2
    again = drain(stream)
    assert [t[:2] for t in again] == [(0, 0), (0, 1)] and [t[3] for t in again] == [t[3] for t in first]
    assert len(stream.inflight) == 2


def test_epochs_roll_over_and_finish():
    stream = make_stream(prefetch=100, epochs=2)
    tasks = drain(stream)
    assert [t[:2] for t in tasks] == [(e, i) for e in range(2) for i in range(4)]
    for epoch, index, _ids, _task, _version in tasks:
        stream.ack(epoch, index)
    assert stream.finished()


def test_resume_skips_consumed_batches_of_its_epoch_only():
    stream = make_stream(prefetch=100, epochs=2, start_epoch=0, skip={0, 2})
    assert [t[:2] for t in drain(stream)] == [(0, 1), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]


def test_attach_request_refuses_bad_values():
    with pytest.raises(Exception, match="batch_size"):
        AttachRequest(dataset="digits", pipeline="lenet5", batch_size=0, data="tcp://127.0.0.1:1")
    with pytest.raises(Exception, match="Extra inputs"):
        AttachRequest(dataset="digits", pipeline="lenet5", batch_size=1, data="tcp://127.0.0.1:1", path="/etc/passwd")


def test_an_update_applies_to_batches_not_yet_issued_and_reissues_keep_their_version():
    stream = make_stream(prefetch=2)
    issued = drain(stream)
    for epoch, index, _ids, _task, _version in issued:
        stream.assign((epoch, index), b"w")
    version, epoch, index = stream.update_spec({"ops": [], "name": "v2"})
    assert (version, epoch, index) == (2, 0, 2)
    stream.requeue_worker(b"w")
    assert [t[4] for t in drain(stream)] == [1, 1]  # re-issued: still version 1
    stream.ack(0, 0)
    assert drain(stream)[0][4] == 2 and stream.versions[2] == {"ops": [], "name": "v2"}
