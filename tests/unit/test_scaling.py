"""The autoscaling controller with a real scheduler and a fake pool: windows, cool-down, drain, stop."""

from __future__ import annotations

from augserve import protocol as P
from augserve.autoscale import AutoscaleSettings
from augserve.metrics import DaemonMetrics
from augserve.scaling import Autoscaler

try:
    from .test_scheduler import done, hello, make_scheduler, make_stream
except ImportError:
    from test_scheduler import done, hello, make_scheduler, make_stream


class FakePool:
    def __init__(self, names):
        self.active, self.retired, self.released, self.grown = list(names), [], [], 0

    def names(self):
        return list(self.active)

    def starting(self):
        return False

    def grow(self, now):
        self.grown += 1
        name = f"new-{self.grown}"
        self.active.append(name)
        return name

    def retire(self, name):
        self.active.remove(name)
        self.retired.append(name)
        return True

    def release(self, name, now, grace=10.0):
        self.released.append(name)


def test_a_stall_adds_a_worker_only_after_a_full_settled_window():
    stream = make_stream("a", prefetch=4, n=400)
    scheduler = make_scheduler([stream], [(b"w1", 2)])
    scheduler.workers[b"w1"].done = 1
    pool, metrics = FakePool(["w1"]), DaemonMetrics()
    scaler = Autoscaler(AutoscaleSettings(min_workers=1, max_workers=3, window_s=1.0), pool, scheduler, metrics)
    assert scaler.tick(0.0) == []
    scaler.observe_wait(10, 0.5)  # 50 ms per batch
    assert scaler.tick(0.5) == [] and pool.grown == 0  # the window is not over
    assert scaler.tick(1.0) == [] and pool.names() == ["w1", "new-1"]
    assert scaler.last.action == "add" and "50.0 ms per batch over 10 batch(es)" in scaler.last.reason
    scaler.observe_wait(10, 0.5)
    assert scaler.tick(3.0) == [] and pool.grown == 1  # new-1 has not joined: no window, reports dropped
    scheduler.add_worker(b"new-1", hello("new-1"), 3.0)
    scaler.tick(3.5)  # joined but not warmed up (no task done, idle less than a window)
    scaler.tick(4.5)  # idle a whole window: settled; the window starts here
    scaler.observe_wait(10, 0.1)
    scaler.tick(5.5)
    assert pool.grown == 2 and scaler.status()["target"] == 3  # 50 -> 10 ms: it helped, add again
    text = __import__("prometheus_client").generate_latest(metrics.registry).decode()
    assert 'augserve_autoscale_decisions_total{action="add"} 2.0' in text


def test_a_removal_drains_the_worker_before_it_is_told_to_stop():
    stream = make_stream("a", prefetch=4, n=400)
    scheduler = make_scheduler([stream], [(b"w1", 2), (b"w2", 2)])
    issued = list(scheduler.assign(0.0))
    for w in scheduler.workers.values():
        w.done = 1
    for x in issued[:3]:  # three of four made and waiting at the trainer: the queue is full
        scheduler.done(x.worker, done(x.worker, x), 0.1)
    pool = FakePool(["w1", "w2"])
    scaler = Autoscaler(AutoscaleSettings(min_workers=1, max_workers=2, window_s=1.0, remove_windows=1), pool, scheduler, DaemonMetrics())
    scaler.tick(0.2)
    assert scaler.tick(1.2) == [] and scaler.last.action == "remove"
    [victim] = pool.retired
    assert scheduler.draining == {victim.encode()} and scaler.draining == {victim}
    assert not scheduler.workers[victim.encode()].tasks  # the victim is the worker holding the fewest tasks
    assert scaler.tick(1.7) == []  # it sent two batches its trainer has not confirmed: one may be lost
    scheduler.credit(stream, P.Credit(stream="a", received=[x.key for x in issued]), 1.8)
    assert scaler.tick(1.9) == [victim] and pool.released == [victim] and not scaler.draining
