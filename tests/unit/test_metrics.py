"""DaemonMetrics (Prometheus series from synthetic daemon calls) and the ``status --watch`` view."""

from __future__ import annotations

import copy
import threading

import pytest
import zmq
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from augserve import protocol as P
from augserve.metrics import STAGE_BUCKETS, DaemonMetrics, NullMetrics
from augserve.watch import render, watch

# The structure of Daemon.status() (two streams, two workers), with made-up values.
STATUS = {
    "address": "tcp://127.0.0.1:5555",
    "uptime_s": 3725.4,
    "backend": "albumentations",
    "device": "cpu",
    "protocol": 1,
    "worker_restarts": 2,
    "skipped_corrupt": 3,
    "streams": [
        {
            "stream": "aaaa1111bbbb", "dataset": "shapes", "split": "train", "pipeline": "crop-flip", "pipeline_version": 1,
            "batch_size": 32, "rank": 0, "world_size": 1, "epoch": 1, "epochs": 5, "batches_per_epoch": 7, "acked": 9,
            "in_flight": 3, "credits": 8, "credits_free": 5, "waiting_reissue": 1, "images_per_s": 812.3, "skipped_corrupt": 3,
            "stage_ms": {"load": 1.5, "augment": 7.25, "send": 0.4}, "client": "trainer-0",
        },
        {
            "stream": "cccc2222dddd", "dataset": "digits", "split": "test", "pipeline": "custom", "pipeline_version": 2,
            "batch_size": 64, "rank": 1, "world_size": 2, "epoch": 0, "epochs": 1, "batches_per_epoch": 14, "acked": 0,
            "in_flight": 0, "credits": 4, "credits_free": 4, "waiting_reissue": 0, "images_per_s": 0.0, "skipped_corrupt": 0,
            "stage_ms": {"load": 0.0, "augment": 0.0, "send": 0.0}, "client": "",
        },
    ],
    "workers": [
        {
            "worker": "local-0-abc123", "pid": 4242, "host": "node1", "backend": "albumentations", "device": "cpu", "busy": 2,
            "capacity": 2, "batches": 17, "images_per_s": 400.5, "stage_ms": {"load": 1.4, "augment": 7.0, "send": 0.5}, "last_heard_s": 0.3,
        },
        {
            "worker": "local-1-def456", "pid": 4243, "host": "node1", "backend": "albumentations", "device": "cpu", "busy": 1,
            "capacity": 2, "batches": 12, "images_per_s": 411.8, "stage_ms": {"load": 1.6, "augment": 7.5, "send": 0.3}, "last_heard_s": 4.0,
        },
    ],
    "queue": {"tasks_in_flight": 3, "waiting_reissue": 1},
}


def samples(metrics: DaemonMetrics) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of everything the registry exposes."""
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics, name, **labels):
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


# --- counters and histograms -----------------------------------------------------------------------------


def test_batch_done_counts_images_per_stream_and_worker():
    m = DaemonMetrics()
    m.batch_done("s1", "w1", 32, 0, {"load": 0.002, "augment": 0.02, "send": 0.0004})
    m.batch_done("s1", "w2", 30, 2, {"load": 0.003, "augment": 0.03, "send": 0.0006})
    m.batch_done("s2", "w1", 8, 1, {"load": 0.5, "augment": 12.0, "send": 0.001})
    assert value(m, "augserve_images_total", stream="s1") == 62
    assert value(m, "augserve_images_total", stream="s2") == 8
    assert value(m, "augserve_worker_images_total", worker="w1") == 40
    assert value(m, "augserve_worker_images_total", worker="w2") == 30
    assert value(m, "augserve_skipped_corrupt_total") == 3
    text = generate_latest(m.registry).decode()
    assert 'augserve_images_total{stream="s1"} 62.0' in text
    assert "# TYPE augserve_stage_seconds histogram" in text


def test_stage_histograms_have_buckets_from_1ms_to_10s():
    m = DaemonMetrics()
    m.batch_done("s1", "w1", 4, 0, {"load": 0.002, "augment": 0.02, "send": 0.0004})
    m.batch_done("s1", "w1", 4, 0, {"load": 0.003, "augment": 12.0, "send": 0.0006})
    assert STAGE_BUCKETS[0] == 0.001 and STAGE_BUCKETS[-1] == 10.0
    for stage in ("load", "augment", "send"):
        assert value(m, "augserve_stage_seconds_count", stage=stage) == 2
    assert value(m, "augserve_stage_seconds_sum", stage="load") == pytest.approx(0.005)
    assert value(m, "augserve_stage_seconds_bucket", stage="send", le="0.001") == 2
    assert value(m, "augserve_stage_seconds_bucket", stage="augment", le="0.025") == 1
    assert value(m, "augserve_stage_seconds_bucket", stage="augment", le="10.0") == 1  # 12 s only in +Inf
    assert value(m, "augserve_stage_seconds_bucket", stage="augment", le="+Inf") == 2


def test_batch_done_ignores_odd_times_from_a_peer():
    m = DaemonMetrics()
    m.batch_done("s1", "w1", 4, 0, {"load": "slow", "augment": float("nan"), "send": -1.0})
    m.batch_done("s1", "w1", 4, 0, None)
    m.batch_done(None, "w1", 4, 0, {})  # the stream ended meanwhile: no series comes back for it
    for stage in ("load", "augment", "send"):
        assert value(m, "augserve_stage_seconds_count", stage=stage) == 0
    assert value(m, "augserve_images_total", stream="s1") == 8
    assert value(m, "augserve_worker_images_total", worker="w1") == 12


def test_worker_restarts_counter():
    m = DaemonMetrics()
    assert value(m, "augserve_worker_restarts_total") == 0
    m.worker_restarted()
    m.worker_restarted()
    assert value(m, "augserve_worker_restarts_total") == 2


def test_stream_ended_and_worker_left_remove_their_series():
    m = DaemonMetrics()
    m.batch_done("s1", "w1", 4, 0, {"load": 0.01})
    m.batch_done("s2", "w2", 4, 0, {"load": 0.01})
    status = copy.deepcopy(STATUS)
    status["streams"][0]["stream"], status["streams"][1]["stream"] = "s1", "s2"
    status["workers"][0]["worker"], status["workers"][1]["worker"] = "w1", "w2"
    m.update_from_status(status)
    m.stream_ended("s1")
    m.worker_left("w2")
    m.stream_ended("never-seen")  # harmless
    m.worker_left("never-seen")
    text = generate_latest(m.registry).decode()
    assert 'stream="s1"' not in text and 'worker="w2"' not in text
    assert value(m, "augserve_images_total", stream="s2") == 4
    assert value(m, "augserve_stream_credits", stream="s2") == 4
    assert value(m, "augserve_worker_busy_slots", worker="w1") == 2
    # A later done for the ended stream (stream_id None) and the next status tick do not bring them back.
    m.batch_done(None, "w1", 4, 0, {})
    m.update_from_status({**status, "streams": status["streams"][1:], "workers": status["workers"][:1]})
    text = generate_latest(m.registry).decode()
    assert 'stream="s1"' not in text and 'worker="w2"' not in text


def test_instances_have_separate_registries():
    a, b = DaemonMetrics(), DaemonMetrics()
    a.batch_done("s1", "w1", 5, 0, {})
    assert value(a, "augserve_images_total", stream="s1") == 5
    assert value(b, "augserve_images_total", stream="s1") is None


# --- gauges from the status dict ---------------------------------------------------------------------------


def test_update_from_status_sets_the_gauges():
    m = DaemonMetrics()
    assert "augserve_stream_credits{" not in generate_latest(m.registry).decode()  # nothing before the first status
    m.update_from_status(STATUS)
    assert value(m, "augserve_stream_credits", stream="aaaa1111bbbb") == 8
    assert value(m, "augserve_stream_in_flight", stream="aaaa1111bbbb") == 3
    assert value(m, "augserve_stream_credits", stream="cccc2222dddd") == 4
    assert value(m, "augserve_stream_epoch", stream="aaaa1111bbbb") == 1
    assert value(m, "augserve_stream_images_per_second", stream="aaaa1111bbbb") == pytest.approx(812.3)
    assert value(m, "augserve_stream_info", stream="cccc2222dddd", dataset="digits", split="test", pipeline="custom", pipeline_version="2") == 1
    assert value(m, "augserve_tasks_in_flight") == 3
    assert value(m, "augserve_tasks_waiting_reissue") == 1
    assert value(m, "augserve_workers_connected") == 2
    assert value(m, "augserve_worker_busy_slots", worker="local-0-abc123") == 2
    assert value(m, "augserve_worker_capacity_slots", worker="local-1-def456") == 2
    assert value(m, "augserve_worker_images_per_second", worker="local-1-def456") == pytest.approx(411.8)
    assert value(m, "augserve_uptime_seconds") == pytest.approx(3725.4)
    assert value(m, "augserve_daemon_info", backend="albumentations", device="cpu", protocol="1") == 1

    # The next tick replaces everything: a stream that is gone from the status is gone from the gauges.
    later = copy.deepcopy(STATUS)
    later["streams"] = later["streams"][1:]
    later["workers"] = []
    m.update_from_status(lambda: later)  # the daemon may pass its bound status method
    text = generate_latest(m.registry).decode()
    assert "aaaa1111bbbb" not in text and "local-0-abc123" not in text
    assert value(m, "augserve_workers_connected") == 0


def test_null_metrics_never_builds_the_status():
    n = NullMetrics()
    n.batch_done("s", "w", 1, 0, {})
    n.worker_restarted()
    n.stream_ended("s")
    n.worker_left("w")
    n.update_from_status(lambda: pytest.fail("NullMetrics must not call the status method"))
    n.stop()
    assert n.port is None


def test_metric_names_are_documented_in_the_module_docstring():
    import augserve.metrics as module

    names = {family.name for family in DaemonMetrics().registry.collect()}
    m = DaemonMetrics()
    m.update_from_status(STATUS)
    names |= {family.name for family in m.registry.collect()}
    for name in names:
        documented = name + "_total" if f"``{name}_total``" in module.__doc__ else name
        assert f"``{documented}``" in module.__doc__, name


# --- the watch view ------------------------------------------------------------------------------------------


def rendered(renderable, width=160) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_render_shows_streams_and_workers():
    text = rendered(render(STATUS))
    for expected in (
        "tcp://127.0.0.1:5555", "1:02:05", "albumentations on cpu", "worker restarts 2", "corrupt files skipped 3",
        "aaaa1111bbbb", "shapes/train", "crop-flip v1", "2/5", "3/8", "812", "1.5 / 7.2 / 0.4",
        "cccc2222dddd", "digits/test", "custom v2",
        "local-0-abc123", "4242", "node1", "2/2", "17", "400", "4.0 s ago", "local-1-def456",
    ):  # fmt: skip
        assert expected in text, (expected, text)


def test_render_treats_peer_strings_as_plain_text():
    status = copy.deepcopy(STATUS)
    status["streams"][0]["dataset"] = "[/]evil[bold]"
    status["workers"][0]["worker"] = "[red]w[/red]"
    status["workers"][0]["host"] = "[/"
    text = rendered(render(status))
    assert "[/]evil[bold]/train" in text and "[red]w[/red]" in text


def test_render_without_streams_or_workers_and_when_not_answering():
    empty = {**STATUS, "streams": [], "workers": []}
    text = rendered(render(empty))
    assert "streams: none" in text and "workers: none" in text
    text = rendered(render(None, address="tcp://127.0.0.1:9", error="no augserve daemon answered"))
    assert "daemon not answering" in text and "tcp://127.0.0.1:9" in text
    text = rendered(render(STATUS, error="gone"))  # the last good view stays, under the red line
    assert "daemon not answering: gone" in text and "aaaa1111bbbb" in text


class FakeDaemon:
    """A ROUTER socket on loopback with this user's daemon key, answering ``status`` with STATUS, in a
    thread; ``answer=False`` mutes it."""

    def __init__(self):
        from augserve import security

        keyring = security.Keyring.load()
        self.context = zmq.Context()
        self.gatekeeper = security.Gatekeeper(self.context, {role: keyring.allowed(role) for role in security.ROLES}).start()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        security.secure_server(self.socket, keyring.daemon)
        self.socket.bind("tcp://127.0.0.1:*")
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.answer = True
        self.requests = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            if not self.socket.poll(50):
                continue
            identity, *frames = self.socket.recv_multipart()
            self.requests += 1
            if self.answer:
                self.socket.send_multipart([identity, *P.encode(P.StatusReply(status={**STATUS, "address": self.address}))])

    def close(self):
        self._stop.set()
        self.thread.join(5)
        self.socket.close(linger=0)
        self.gatekeeper.stop()
        self.context.term()


@pytest.fixture
def fake_daemon():
    daemon = FakeDaemon()
    yield daemon
    daemon.close()


def test_watch_polls_and_returns_after_iterations(fake_daemon):
    console = Console(record=True, width=160, color_system=None, force_terminal=False)
    last = watch(fake_daemon.address, interval=0.05, iterations=3, console=console)
    assert fake_daemon.requests == 3
    assert last["streams"][0]["stream"] == "aaaa1111bbbb"
    text = console.export_text()
    assert "aaaa1111bbbb" in text and "local-0-abc123" in text


def test_watch_keeps_retrying_a_silent_daemon(fake_daemon):
    fake_daemon.answer = False
    console = Console(record=True, width=160, color_system=None, force_terminal=False)
    last = watch(fake_daemon.address, interval=0.05, iterations=2, console=console, timeout=0.1)
    assert last is None and fake_daemon.requests == 2
    assert "daemon not answering" in console.export_text()


def test_watch_ends_cleanly_on_ctrl_c(monkeypatch, fake_daemon):
    import augserve.watch as module

    calls = []

    def interrupted(*_args, **_kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return STATUS

    monkeypatch.setattr(module, "fetch_status", interrupted)
    console = Console(record=True, width=160, color_system=None, force_terminal=False)
    assert watch(fake_daemon.address, interval=0.01, console=console) == STATUS
    assert len(calls) == 2


@pytest.mark.parametrize("address", ["localhost:5555", "tcp://127.0.0.1:*"])
def test_watch_refuses_a_bad_address(address):
    with pytest.raises(ValueError, match="daemon address"):
        watch(address, iterations=1, console=Console(record=True))


def test_autoscale_decisions_and_the_target_are_exported():
    import math

    metrics = DaemonMetrics()
    before = samples(metrics)
    assert before[("augserve_autoscale_decisions_total", (("action", "add"),))] == 0.0
    assert before[("augserve_autoscale_decisions_total", (("action", "remove"),))] == 0.0
    metrics.autoscale_observed(0.045, 1)
    metrics.autoscale_decision("add", 2)
    metrics.autoscale_decision("add", 3)
    metrics.autoscale_decision("remove", 2)
    after = samples(metrics)
    assert after[("augserve_autoscale_decisions_total", (("action", "add"),))] == 2.0
    assert after[("augserve_autoscale_decisions_total", (("action", "remove"),))] == 1.0
    assert after[("augserve_workers_target", ())] == 2.0
    assert after[("augserve_trainer_wait_seconds_per_batch", ())] == 0.045
    metrics.autoscale_observed(None, 2)
    assert math.isnan(samples(metrics)[("augserve_trainer_wait_seconds_per_batch", ())])
    NullMetrics().autoscale_decision("add", 2)  # the same calls, doing nothing
    NullMetrics().autoscale_observed(None, 2)
