"""Admission's checks, without a daemon: specs, caps, resume states, and jobs off the caller's thread."""

import threading

import pytest

from augserve import protocol as P
from augserve.admission import Admission, Refused
from augserve.config import DaemonConfig
from augserve.fingerprint import stream_fingerprint


@pytest.fixture
def admission():
    woken = threading.Event()
    adm = Admission(DaemonConfig(max_ops=3, max_batch_bytes=64 * 32 * 32 * 3, max_pending_admissions=2), woken.set)
    adm.woken = woken
    yield adm
    adm.close()


def attach(**fields) -> P.Attach:
    base = {"dataset": "shapes", "dataset_options": {"size": 32, "n": 50}, "pipeline": {"ops": [{"op": "random_crop", "size": 32}]}, "batch_size": 8, "data": "tcp://127.0.0.1:1"}
    return P.Attach(**{**base, **fields})


def test_a_good_request_is_admitted_with_its_plan_and_fingerprint(admission):
    admitted = admission.admit(attach(seed=5))
    assert admitted.plan.num_samples == 50 and admitted.plan.num_batches() == 7 and admitted.batch_bytes == 8 * 32 * 32 * 3
    assert admitted.fingerprint["seed"] == 5 and admitted.fingerprint["num_samples"] == 50
    assert admitted.info.classes and admitted.info.channels == 3
    assert admitted.dataset == P.DatasetRef(ref="shapes", split="train", options={"size": 32, "n": 50})


@pytest.mark.parametrize(
    "fields, message, code",
    [
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'", "unknown_dataset"),
        ({"batch_size": 65}, "over this daemon's max_batch_bytes 196,608", "limit"),
        ({"pipeline": {"ops": [{"op": "mirror"}] * 4}}, "pipeline has 4 ops; this daemon allows at most max_ops=3", "limit"),
        ({"pipeline": "[" * 3000}, "pipeline text nests 3000 brackets deep; at most 24 allowed", "invalid"),
        ({"pipeline": "spec.yaml"}, "the daemon does not open spec files", "invalid"),
        ({"pipeline": {"ops": [{"op": "random_crop", "size": 64}]}}, "random_crop size 64", "invalid"),
        ({"data": "tcp://127.0.0.1:*"}, "data address", "invalid"),
        ({"rank": 2, "world_size": 2}, "rank must be in [0, world_size)", "invalid"),
    ],
)
def test_refusals_name_the_problem(admission, fields, message, code):
    with pytest.raises((Refused, ValueError)) as info:
        admission.admit(attach(**fields))
    assert message in str(info.value)
    if isinstance(info.value, Refused):
        assert info.value.code == code


def test_resume_states_are_checked_against_the_run(admission):
    request = attach(epochs=3)
    admitted = admission.admit(request)
    state = P.ResumeState(epoch=1, delivered=[0, 2], fingerprint=admitted.fingerprint)
    assert admission.check_resume(state, 3, 7, admitted.fingerprint) == (1, frozenset({0, 2}))
    other = stream_fingerprint(**{**admitted.fingerprint, "batch_size": 16, "pipeline": request.pipeline})
    with pytest.raises(Refused, match="batch_size 16 != 8") as info:  # saved != current
        admission.check_resume(P.ResumeState(epoch=1, fingerprint=other), 3, 7, admitted.fingerprint)
    assert info.value.code == "resume_mismatch"
    with pytest.raises(Refused, match="outside this stream's 3 epoch"):
        admission.check_resume(P.ResumeState(epoch=4), 3, 7, admitted.fingerprint)
    with pytest.raises(Refused, match=r"outside \[0, 7\)"):
        admission.check_resume(P.ResumeState(epoch=0, delivered=[7]), 3, 7, admitted.fingerprint)


def test_jobs_run_off_the_callers_thread_and_come_back_through_results(admission):
    caller = threading.get_ident()
    ran_on = []
    admission.submit(lambda: ran_on.append(threading.get_ident()) or "ok", "first")
    assert admission.woken.wait(10)
    results = []
    while len(results) < 1:
        results += admission.results()
    assert results == [("first", "ok")] and ran_on and ran_on[0] != caller and admission.pending == 0


def test_failures_become_refusals_and_pending_work_is_capped(admission):
    gate = threading.Event()
    admission.submit(lambda: gate.wait(10) and (_ for _ in ()).throw(KeyError("boom")), "a")
    admission.submit(lambda: gate.wait(10) and (_ for _ in ()).throw(ValueError("bad value")), "b")
    with pytest.raises(Refused, match="busy admitting 2 other request") as info:
        admission.submit(lambda: None, "c")
    assert info.value.code == "busy"
    gate.set()
    results = {}
    while len(results) < 2:
        results.update(admission.results())
    assert isinstance(results["a"], Refused) and "KeyError" in str(results["a"])
    assert isinstance(results["b"], Refused) and str(results["b"]) == "bad value"
