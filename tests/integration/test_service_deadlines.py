"""Deadlines and attempts, against workers that misbehave on purpose.

A :class:`FakeWorker` holds a real worker key and speaks the wire by hand, so it can do what a buggy
or hostile worker would: keep tasks forever while heartbeating, report a batch sent that never was,
fail tasks, or die holding them. The daemon must re-issue to an honest worker and deliver every sample
exactly once — or, when a task has killed too many workers, end that stream with a message naming it.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time

import pytest
import zmq

from augserve import protocol as P
from augserve import security

try:  # tests/integration is a package in some checkouts and a plain folder in others
    from .conftest import SHAPES, augserve_command, collect, ids_per_epoch, open_stream, subprocess_env, wait_until
except ImportError:
    from conftest import SHAPES, augserve_command, collect, ids_per_epoch, open_stream, subprocess_env, wait_until


class FakeWorker:
    """A worker that heartbeats every 0.1 s and answers each task with ``policy(task)``:
    ``"hold"`` (keep it, never report), ``"done"`` (report it sent without sending), ``"error"``
    (report a failure) or ``"die"`` (stop heartbeating and vanish, holding everything)."""

    def __init__(self, address: str, name: str, policy, capacity: int = 2, pid: int = 1) -> None:
        keyring = security.Keyring.load()
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, name.encode())
        security.secure_client(self.sock, keyring.worker, keyring.daemon.public)
        self.sock.connect(address)
        self.name, self.policy = name, policy
        self.hello = dict(worker=name, pid=pid, host="fake", backend="albumentations", device="cpu", capacity=capacity)
        self.tasks: list[P.Task] = []
        self.dead = False
        self._stop = threading.Event()
        self._send(P.Ready(**self.hello))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _send(self, body: P.Body) -> None:
        self.sock.send_multipart(P.encode(body))

    def _run(self) -> None:
        last = 0.0
        while not self._stop.is_set() and not self.dead:
            if self.sock.poll(50):
                message = P.decode(self.sock.recv_multipart(), P.DAEMON_TO_WORKER)
                if message.type == "task":
                    self._on_task(message.body)
            if time.monotonic() - last > 0.1 and not self.dead:
                self._send(P.Heartbeat(**self.hello))
                last = time.monotonic()
        self.sock.close(linger=0)

    def _on_task(self, task: P.Task) -> None:
        self.tasks.append(task)
        action = self.policy(task)
        if action == "done":
            self._send(P.Done(worker=self.name, task=task.task, stream=task.stream, epoch=task.epoch, index=task.index, samples=len(task.ids)))
        elif action == "error":
            self._send(P.Failed(worker=self.name, task=task.task, stream=task.stream, message="CUDA out of memory (fake)", kind="error"))
        elif action == "die":
            self.dead = True

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.context.term()


@pytest.fixture
def fakes():
    made: list[FakeWorker] = []

    def make(*args, **kwargs) -> FakeWorker:
        made.append(FakeWorker(*args, **kwargs))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


@contextlib.contextmanager
def honest_worker(address: str, name: str = "honest"):
    """A real worker process joining ``address`` for the duration of the block."""
    worker = subprocess.Popen(augserve_command("worker", "--connect", address, "--name", name, "--heartbeat-interval", "0.2"), env=subprocess_env(), stdin=subprocess.DEVNULL)
    try:
        yield worker
    finally:
        worker.terminate()
        worker.wait(10)


def deadline_daemon(start_daemon, **settings):
    env = subprocess_env(AUGSERVE_HEARTBEAT_INTERVAL="0.2", **{f"AUGSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    return start_daemon(workers=0, env=env)


def epoch_exactly_once(records) -> None:
    assert sorted(ids_per_epoch(records)[0]) == list(range(SHAPES["n"]))


def test_a_worker_that_holds_tasks_forever_loses_them_at_the_deadline(start_daemon, fakes):
    daemon = deadline_daemon(start_daemon, task_timeout=2)
    hoarder = fakes(daemon.address, "hoarder", lambda task: "hold")
    wait_until(lambda: daemon.status()["workers"], 10, what="the hoarder to join")
    stream = open_stream(daemon.address, batch_size=20, prefetch=4, ordered=True)
    wait_until(lambda: len(hoarder.tasks) >= 2, 10, what="tasks to reach the hoarder")
    with honest_worker(daemon.address):
        records = collect(stream)
    epoch_exactly_once(records)
    assert daemon.status()["reissued_tasks"] >= 2
    assert "past their deadline re-issued" in daemon.log()


def test_a_batch_reported_sent_but_never_received_is_reissued(start_daemon, fakes):
    daemon = deadline_daemon(start_daemon, delivery_timeout=2)
    liar = fakes(daemon.address, "liar", lambda task: "done", capacity=1)
    wait_until(lambda: daemon.status()["workers"], 10, what="the liar to join")
    stream = open_stream(daemon.address, batch_size=20, prefetch=3)
    wait_until(lambda: liar.tasks, 10, what="a task to reach the liar")
    with honest_worker(daemon.address):
        records = collect(stream)
    epoch_exactly_once(records)
    assert daemon.status()["reissued_tasks"] >= 1


def test_a_transient_worker_error_is_retried_on_another_worker(start_daemon, fakes):
    daemon = deadline_daemon(start_daemon)
    flaky = fakes(daemon.address, "flaky", lambda task: "error", capacity=1)
    wait_until(lambda: daemon.status()["workers"], 10, what="the flaky worker to join")
    with honest_worker(daemon.address):
        wait_until(lambda: len(daemon.status()["workers"]) == 2, 60, what="the honest worker to join")
        records = collect(open_stream(daemon.address, batch_size=20, prefetch=4))
    epoch_exactly_once(records)
    assert flaky.tasks, "the flaky worker was never given a task"
    assert "retrying" in daemon.log()


def test_a_task_that_kills_its_workers_ends_its_stream_naming_it(start_daemon, fakes):
    """Each worker that takes the poisoned batch dies; after max_attempts deaths the stream ends with
    a message naming the batch, and the daemon carries on serving (no crash loop of the pool)."""
    daemon = deadline_daemon(start_daemon, max_attempts=2)
    stream = open_stream(daemon.address, batch_size=200, prefetch=1, batch_timeout=30, shuffle=False)
    for k in range(2):
        victim = fakes(daemon.address, f"victim-{k}", lambda task: "die", capacity=1)
        wait_until(lambda: victim.dead, 20, what=f"victim {k} to take the task")
    with pytest.raises(Exception, match=r"batch 0 of epoch 0 \(task .*\) failed 2 time\(s\), giving up; last: its worker victim-1 went silent"):
        collect(stream)
    daemon.assert_alive()
    assert not daemon.status()["streams"]


def test_a_silent_remote_worker_never_costs_a_local_worker_its_life(start_daemon, fakes):
    """Local workers are known by name: a remote worker that happens to share a local worker's pid and
    then goes silent is written off alone."""
    env = subprocess_env(AUGSERVE_HEARTBEAT_INTERVAL="0.2")
    daemon = start_daemon(workers=1, env=env)
    [local] = daemon.status()["workers"]
    twin = fakes(daemon.address, "remote-twin", lambda task: "hold", pid=local["pid"])
    wait_until(lambda: len(daemon.status()["workers"]) == 2, 10, what="the remote twin to join")
    twin.close()  # silent from now on
    wait_until(lambda: len(daemon.status()["workers"]) == 1, 10, what="the twin to be written off")
    time.sleep(1.0)  # a wrongly killed local worker would be reaped and restarted within this
    status = daemon.status()
    assert [w["pid"] for w in status["workers"]] == [local["pid"]] and status["worker_restarts"] == 0
