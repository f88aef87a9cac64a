"""Autoscaling on measured data stall, with a real daemon, real workers and a real client.

A trainer that takes batches as fast as they come stalls with one worker: the daemon adds workers
(towards MAX) and the epoch still arrives exactly once. A trainer slower than its workers leaves the
result queues full: the daemon drains and removes workers down to MIN, losing and duplicating nothing.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest

try:  # tests/integration is a package in some checkouts and a plain folder in others
    from .conftest import GEOMETRIC, free_port, ids_per_epoch, open_stream, wait_until
except ImportError:
    from conftest import GEOMETRIC, free_port, ids_per_epoch, open_stream, wait_until


class Watcher(threading.Thread):
    """Samples the daemon's worker count every 0.2 s while a test runs."""

    def __init__(self, daemon) -> None:
        super().__init__(daemon=True)
        self.daemon_process, self.counts, self._done = daemon, [], threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            try:
                self.counts.append(len(self.daemon_process.status(timeout=2.0)["workers"]))
            except (ConnectionError, TimeoutError):
                pass

    def stop(self) -> list[int]:
        self._done.set()
        self.join(timeout=5)
        return self.counts


def consume(stream, sleep: float = 0.0) -> list[tuple[int, int, list[int]]]:
    out = []
    for batch in stream:
        out.append((batch.epoch, batch.index, batch.sample_ids.tolist()))
        if sleep:
            time.sleep(sleep)
    return out


def assert_exactly_once(received, stream, n: int, epochs: int) -> None:
    keys = [(e, i) for e, i, _ in received]
    assert len(keys) == len(set(keys)) == stream.batches_per_epoch * epochs, "a batch was lost or delivered twice"
    per_epoch = ids_per_epoch([{"epoch": e, "ids": __import__("numpy").array(ids)} for e, _, ids in received])
    assert {e: sorted(ids) for e, ids in per_epoch.items()} == {e: list(range(n)) for e in range(epochs)}


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    [line] = [line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name]
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.slow
def test_a_stalling_trainer_gets_more_workers_and_every_batch_once(start_daemon, tmp_path):
    config = tmp_path / "daemon.yaml"
    config.write_text("autoscale: {window_s: 1.0}\n")
    port = free_port()
    daemon = start_daemon("--config", str(config), "--workers", "auto:1:3", "--metrics-port", str(port), workers=None, expect_workers=1)
    assert daemon.status()["autoscale"]["target"] == 1
    assert metric(port, "augserve_workers_target") == 1.0
    n, epochs = 1200, 2
    # 128-pixel images through rotate + shear: one worker cannot keep up with a trainer that only takes them
    stream = open_stream(daemon.address, pipeline=GEOMETRIC, batch_size=32, dataset_options={"size": 128, "n": n}, epochs=epochs, prefetch=8, seed=3)
    watcher = Watcher(daemon)
    watcher.start()
    started = time.monotonic()
    received = consume(stream)
    counts = watcher.stop()
    took = time.monotonic() - started
    assert_exactly_once(received, stream, n, epochs)
    log = daemon.log()
    assert max(counts) >= 2 and max(counts) <= 3, f"worker counts {counts} over {took:.1f} s:\n{log[-3000:]}"
    adds = [line for line in log.splitlines() if "autoscale: add a worker (1 -> 2" in line]
    assert len(adds) == 1 and "trainers stall; trainers waited" in adds[0] and "ms per batch" in adds[0], log[-3000:]
    assert "remove a worker" not in log  # the trainer never stopped stalling enough to leave queues full
    assert metric(port, 'augserve_autoscale_decisions_total{action="add"}') >= 1.0
    assert metric(port, 'augserve_autoscale_decisions_total{action="remove"}') == 0.0
    assert metric(port, "augserve_workers_target") >= 2.0


@pytest.mark.slow
def test_a_slow_trainer_leaves_queues_full_and_the_pool_shrinks_to_min(start_daemon, tmp_path):
    config = tmp_path / "daemon.yaml"
    config.write_text("workers: 3\nautoscale: {min_workers: 1, max_workers: 3, window_s: 1.0, remove_windows: 1}\n")
    port = free_port()
    daemon = start_daemon("--config", str(config), "--metrics-port", str(port), workers=None, expect_workers=3)
    n, epochs = 800, 1
    stream = open_stream(daemon.address, batch_size=16, dataset_options={"size": 32, "n": n}, epochs=epochs, prefetch=4, seed=5)
    watcher = Watcher(daemon)
    watcher.start()
    results: list = []
    consumer = threading.Thread(target=lambda: results.append(consume(stream, sleep=0.12)), daemon=True)
    consumer.start()
    wait_until(lambda: len(daemon.status()["workers"]) == 1, timeout=40, interval=0.2, what="the pool to shrink to 1 worker")
    consumer.join(timeout=40)
    assert not consumer.is_alive(), "the stream did not finish"
    counts = watcher.stop()
    [received] = results
    assert_exactly_once(received, stream, n, epochs)
    log = daemon.log()
    removals = [line for line in log.splitlines() if "autoscale: remove a worker" in line]
    assert [r.split("remove a worker (")[1][:6] for r in removals] == ["3 -> 2", "2 -> 1"], log[-3000:]
    assert all("queues stayed full" in r for r in removals)
    assert log.count("drained; telling it to stop") == 2
    assert "exited with" not in log  # retired workers are stopped, not crashed, and not restarted
    assert min(counts) == 1 and daemon.status()["worker_restarts"] == 0
    assert metric(port, 'augserve_autoscale_decisions_total{action="remove"}') == 2.0
    assert metric(port, "augserve_workers_target") == 1.0
