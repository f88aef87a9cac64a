"""The metrics HTTP endpoint, in-process, scraped over loopback with urllib."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from augserve.metrics import DaemonMetrics


def scrape(port: int) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def metrics():
    m = DaemonMetrics()
    yield m
    m.stop()


def test_port_0_serves_on_a_free_port_and_scrapes(metrics):
    port = metrics.start_http(0)
    assert 0 < port < 65536 and metrics.port == port
    assert metrics.url == f"http://127.0.0.1:{port}/metrics"
    metrics.batch_done("s1", "w1", 32, 1, {"load": 0.002, "augment": 0.02, "send": 0.001})
    metrics.worker_restarted()
    metrics.update_from_status(
        {
            "uptime_s": 1.0, "backend": "torch", "device": "cpu", "protocol": 1,
            "streams": [{"stream": "s1", "credits": 8, "in_flight": 2, "epoch": 0, "images_per_s": 3.5}],
            "workers": [{"worker": "w1", "busy": 1, "capacity": 2, "images_per_s": 3.0}],
            "queue": {"tasks_in_flight": 2, "waiting_reissue": 0},
        }
    )  # fmt: skip
    found = scrape(port)
    assert found[("augserve_images_total", (("stream", "s1"),))] == 32
    assert found[("augserve_worker_images_total", (("worker", "w1"),))] == 32
    assert found[("augserve_skipped_corrupt_total", ())] == 1
    assert found[("augserve_worker_restarts_total", ())] == 1
    assert found[("augserve_stage_seconds_count", (("stage", "augment"),))] == 1
    assert found[("augserve_stream_credits", (("stream", "s1"),))] == 8
    assert found[("augserve_worker_busy_slots", (("worker", "w1"),))] == 1
    assert found[("augserve_tasks_in_flight", ())] == 2

    metrics.stream_ended("s1")  # the next scrape no longer has the stream
    found = scrape(port)
    assert not any(dict(labels).get("stream") == "s1" for _name, labels in found)


def test_port_in_use_is_a_clear_error():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        m = DaemonMetrics()
        with pytest.raises(ValueError) as error:
            m.start_http(port)
        assert str(error.value) == f"cannot serve metrics on port {port}: address in use"
        m.stop()  # nothing started: a no-op


def test_two_endpoints_in_one_process_and_stop_frees_the_port():
    a, b = DaemonMetrics(), DaemonMetrics()
    try:
        port_a, port_b = a.start_http(0), b.start_http(0)
        assert port_a != port_b
        a.batch_done("only-in-a", "w", 1, 0, {})
        assert ("augserve_images_total", (("stream", "only-in-a"),)) in scrape(port_a)
        assert ("augserve_images_total", (("stream", "only-in-a"),)) not in scrape(port_b)
        with pytest.raises(RuntimeError, match="already served"):
            a.start_http(0)
    finally:
        a.stop()
        b.stop()
    a.stop()  # twice is fine
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port_a}/metrics", timeout=2)
    again = DaemonMetrics()
    try:
        assert again.start_http(port_a) == port_a  # the port is free again
    finally:
        again.stop()


def test_a_host_that_cannot_be_bound_is_a_value_error():
    with pytest.raises(ValueError, match="cannot serve metrics on 192.0.2.1:0"):
        DaemonMetrics().start_http(0, host="192.0.2.1")  # TEST-NET-1: not an address of this machine


def test_a_running_daemon_exposes_its_metrics(start_daemon):
    """A real daemon with --metrics-port: after a stream, the scrape shows images per stream and
    worker, stage latencies, credits and connected workers."""
    import socket
    import urllib.request

    from conftest import collect, open_stream, wait_until

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = start_daemon("--metrics-port", str(port), workers=2)
    with open_stream(daemon.address, batch_size=16, prefetch=2) as stream:
        it = iter(stream)
        next(it)

        def scrape_text() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

        # The gauges are refreshed on the daemon's housekeeping tick: wait for one that saw this stream.
        credits = f'augserve_stream_credits{{stream="{stream.id}"}} 2.0'
        wait_until(lambda: credits in scrape_text(), timeout=10, interval=0.1, what=f"the scrape to show {credits!r}")
        collect(it)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "augserve_workers_connected 2.0" in text
    assert 'augserve_stage_seconds_count{stage="augment"}' in text
    assert "augserve_worker_images_total" in text


# --- where the endpoint listens: metrics_host ---------------------------------------------------------
# Loopback only: Linux routes all of 127.0.0.0/8 to the loopback interface, so 127.0.0.2 stands in for
# "another address of this machine": an endpoint on 127.0.0.1 is not there, one on 0.0.0.0 is.


def _reachable(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as reply:
            return reply.status == 200 and b"augserve_" in reply.read()
    except OSError:
        return False


def test_default_host_is_loopback_127_0_0_1_only(metrics):
    port = metrics.start_http(0)
    assert metrics._server.socket.getsockname()[0] == "127.0.0.1"
    assert _reachable("127.0.0.1", port)
    assert not _reachable("127.0.0.2", port)


def test_host_0_0_0_0_listens_on_every_address(metrics):
    metrics.worker_restarted()
    port = metrics.start_http(0, host="0.0.0.0")
    assert metrics._server.socket.getsockname()[:2] == ("0.0.0.0", port)
    assert metrics.url == f"http://0.0.0.0:{port}/metrics"
    assert _reachable("127.0.0.1", port) and _reachable("127.0.0.2", port)
    assert scrape(port)[("augserve_worker_restarts_total", ())] == 1


def test_a_host_that_does_not_resolve_is_a_value_error():
    with pytest.raises(ValueError, match=r"^cannot serve metrics on no-such-host\.invalid:0: "):
        DaemonMetrics().start_http(0, host="no-such-host.invalid")  # .invalid never resolves (RFC 2606)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--metrics-port", "0", "--metrics-host", "0.0.0.0:9100"], "metrics_host = '0.0.0.0:9100': metrics_host must be an IP address (127.0.0.1, 0.0.0.0, ::) or a host name, got '0.0.0.0:9100'"),
        (["--metrics-port", "0", "--metrics-host", "http://x"], "metrics_host must be an IP address"),
        (["--metrics-host", "0.0.0.0"], "metrics_host is set but metrics_port is not, so no metrics are served: set metrics_port (--metrics-port) too"),
    ],
    ids=["host-with-port", "url", "host-without-port"],
)
def test_serve_refuses_a_bad_metrics_host_in_one_line(argv, expected, capsys):
    from augserve.cli import main

    assert main(["serve", "--bind", "tcp://127.0.0.1:*", "--workers", "0", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("augserve: error: invalid daemon config: ") and expected in err[0], err


def test_a_running_daemon_serves_metrics_on_the_host_asked_for(start_daemon):
    """--metrics-host 0.0.0.0 (what a scraper in another container needs); the default stays loopback."""
    from conftest import free_port, wait_until

    everywhere, loopback = free_port(), free_port()
    start_daemon("--metrics-port", str(everywhere), "--metrics-host", "0.0.0.0", workers=0)
    start_daemon("--metrics-port", str(loopback), workers=0)
    wait_until(lambda: _reachable("127.0.0.2", everywhere), timeout=10, interval=0.1, what="metrics on 0.0.0.0 reachable via 127.0.0.2")
    assert _reachable("127.0.0.1", loopback) and not _reachable("127.0.0.2", loopback)
