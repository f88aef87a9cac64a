"""Prometheus metrics of a daemon: ``augserve serve --metrics-port N`` serves them at ``http://HOST:N/metrics``.

HOST is ``metrics_host`` (``--metrics-host``): 127.0.0.1 by default, since the endpoint has no
authentication; ``0.0.0.0`` (or ``::``) for a scraper in another container or pod.

:class:`DaemonMetrics` owns its own :class:`~prometheus_client.CollectorRegistry` (never the global one),
so several daemons — or several tests — can live in one process. The daemon's event loop calls a few
cheap methods (:meth:`~DaemonMetrics.batch_done`, :meth:`~DaemonMetrics.worker_restarted`,
:meth:`~DaemonMetrics.worker_left`, :meth:`~DaemonMetrics.stream_ended`,
:meth:`~DaemonMetrics.update_from_status`); the HTTP server runs in a background thread and reads only
prometheus-client's thread-safe metrics and the last status snapshot (an immutable reference swap), so a
scrape never touches the daemon's own state. :class:`NullMetrics` has the same methods and does nothing:
a daemon without ``metrics_port`` uses it and calls the same lines unconditionally.

Metrics (every series with a ``stream`` label disappears when that stream ends, every series with a
``worker`` label when that worker leaves or dies, so series do not grow without bound):

| name | type | labels | unit / meaning |
|---|---|---|---|
| ``augserve_images_total`` | counter | ``stream`` | images augmented and sent for the stream |
| ``augserve_worker_images_total`` | counter | ``worker`` | images the worker augmented and sent |
| ``augserve_stage_seconds`` | histogram | ``stage`` = ``load`` / ``augment`` / ``send`` | seconds per batch in that stage (buckets 1 ms – 10 s) |
| ``augserve_skipped_corrupt_total`` | counter | — | corrupt source files skipped |
| ``augserve_worker_restarts_total`` | counter | — | local worker processes restarted after they died |
| ``augserve_stream_credits`` | gauge | ``stream`` | the stream's credit window (``prefetch``), batches |
| ``augserve_stream_in_flight`` | gauge | ``stream`` | batches issued and not yet acknowledged |
| ``augserve_stream_epoch`` | gauge | ``stream`` | current epoch (0-based) |
| ``augserve_stream_images_per_second`` | gauge | ``stream`` | images/s the trainer acknowledged, last 10 s |
| ``augserve_stream_info`` | gauge (always 1) | ``stream``, ``dataset``, ``split``, ``pipeline``, ``pipeline_version`` | what the stream serves |
| ``augserve_tasks_in_flight`` | gauge | — | batches in flight over all streams |
| ``augserve_tasks_waiting_reissue`` | gauge | — | batches of dead workers waiting for a free worker |
| ``augserve_workers_connected`` | gauge | — | workers connected to the daemon |
| ``augserve_worker_busy_slots`` | gauge | ``worker`` | tasks the worker holds now |
| ``augserve_worker_capacity_slots`` | gauge | ``worker`` | tasks the worker can hold at once |
| ``augserve_worker_images_per_second`` | gauge | ``worker`` | images/s the worker finished, last 10 s |
| ``augserve_uptime_seconds`` | gauge | — | seconds since the daemon started |
| ``augserve_autoscale_decisions_total`` | counter | ``action`` = ``add`` / ``remove`` | workers the autoscaler added or removed |
| ``augserve_workers_target`` | gauge | — | workers the autoscaler wants (set at each window it measured) |
| ``augserve_trainer_wait_seconds_per_batch`` | gauge | — | seconds trainers waited per batch in the autoscaler's last window (NaN: no batch taken) |
| ``augserve_daemon_info`` | gauge (always 1) | ``backend``, ``device``, ``protocol`` | the daemon's settings |

Counters also get prometheus-client's ``*_created`` timestamp series. The gauges come from the status
dict the daemon hands to :meth:`~DaemonMetrics.update_from_status` at each housekeeping tick (every
``heartbeat_interval / 2`` seconds), so they are at most that old when scraped.
"""

from __future__ import annotations

import errno
import math
import threading
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

STAGES = ("load", "augment", "send")
# 1 ms … 10 s: a batch of a few images on a fast core up to a large batch on a loaded machine.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

StatusSource = dict | Callable[[], dict]


class DaemonMetrics:
    """The daemon's metrics, in a registry of their own; see the module docstring for the table."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.images = Counter("augserve_images", "Images augmented and sent, per stream.", ["stream"], registry=self.registry)
        self.worker_images = Counter("augserve_worker_images", "Images augmented and sent, per worker.", ["worker"], registry=self.registry)
        self.stage_seconds = Histogram("augserve_stage_seconds", "Seconds per batch in each worker stage.", ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.skipped_corrupt = Counter("augserve_skipped_corrupt", "Corrupt source files skipped.", registry=self.registry)
        self.worker_restarts = Counter("augserve_worker_restarts", "Local worker processes restarted after they died.", registry=self.registry)
        self._stages = {stage: self.stage_seconds.labels(stage) for stage in STAGES}  # bound once: observe() is the hot path
        self.autoscale_decisions = Counter("augserve_autoscale_decisions", "Workers the autoscaler added or removed.", ["action"], registry=self.registry)
        self.workers_target = Gauge("augserve_workers_target", "Workers the autoscaler wants.", registry=self.registry)
        self.trainer_wait = Gauge("augserve_trainer_wait_seconds_per_batch", "Seconds trainers waited per batch in the autoscaler's last window.", registry=self.registry)
        for action in ("add", "remove"):
            self.autoscale_decisions.labels(action)  # both series exist (at 0) from the start
        self._status = _StatusCollector()
        self.registry.register(self._status)
        self._server = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # --- calls from the daemon's loop --------------------------------------------------------------

    def batch_done(self, stream_id: str | None, worker_id: str, samples: int, skipped: int, times: dict) -> None:
        """A worker reported a finished batch. ``stream_id`` None: the stream already ended (its series
        are gone and stay gone). ``times`` is the worker's ``{stage: seconds}``; odd values are ignored,
        never raised on (it comes from a peer)."""
        samples = max(0, int(samples))
        if samples:
            if stream_id is not None:
                self.images.labels(stream_id).inc(samples)
            self.worker_images.labels(worker_id).inc(samples)
        skipped = max(0, int(skipped))
        if skipped:
            self.skipped_corrupt.inc(skipped)
        if isinstance(times, dict):
            for stage, child in self._stages.items():
                seconds = times.get(stage)
                if isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0:
                    child.observe(seconds)

    def worker_restarted(self) -> None:
        self.worker_restarts.inc()

    def autoscale_decision(self, action: str, target: int) -> None:
        """The autoscaler added or removed a worker (``action``); it now wants ``target`` workers."""
        self.autoscale_decisions.labels(action).inc()
        self.workers_target.set(target)

    def autoscale_observed(self, wait_per_batch: float | None, target: int) -> None:
        """One measured window: trainers' seconds of wait per batch (``None``: no batch taken), and the target."""
        self.trainer_wait.set(math.nan if wait_per_batch is None else wait_per_batch)
        self.workers_target.set(target)

    def stream_ended(self, stream_id: str) -> None:
        """Drop the stream's labelled series (its counter and its status gauges)."""
        _remove(self.images, stream_id)
        self._status.forget("streams", "stream", stream_id)

    def worker_left(self, worker_id: str) -> None:
        """Drop the worker's labelled series (workers restart under new names)."""
        _remove(self.worker_images, worker_id)
        self._status.forget("workers", "worker", worker_id)

    def update_from_status(self, status: StatusSource) -> None:
        """Refresh the gauges from ``Daemon.status()``: pass the dict, or the bound method itself
        (``self.status``) so that :class:`NullMetrics` never pays for building it."""
        self._status.snapshot = status() if callable(status) else status

    # --- HTTP --------------------------------------------------------------------------------------

    def start_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` in a daemon thread; returns the port (the real one for 0).

        ``host``: an IP address (``0.0.0.0`` / ``::`` for every interface) or a name that resolves to
        one of this machine's. ValueError, one line, when it cannot be bound there."""
        if self._server is not None:
            raise RuntimeError(f"metrics are already served on port {self.port}")
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ValueError(f"cannot serve metrics on port {port}: address in use") from None
            raise ValueError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._server, self._thread = server, thread
        self.port = int(server.server_address[1])
        return self.port

    def stop(self) -> None:
        """Shut the HTTP server down (safe to call twice, or without :meth:`start_http`)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    @property
    def url(self) -> str | None:
        if self._server is None:
            return None
        host = self._server.server_address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"


class NullMetrics:
    """Same interface as :class:`DaemonMetrics`, does nothing: for a daemon without ``metrics_port``."""

    port = None
    url = None

    def batch_done(self, stream_id, worker_id, samples, skipped, times) -> None:
        pass

    def worker_restarted(self) -> None:
        pass

    def autoscale_decision(self, action, target) -> None:
        pass

    def autoscale_observed(self, wait_per_batch, target) -> None:
        pass

    def stream_ended(self, stream_id) -> None:
        pass

    def worker_left(self, worker_id) -> None:
        pass

    def update_from_status(self, status) -> None:
        pass  # never calls a callable: no status dict is built for nothing

    def start_http(self, port: int, host: str = "127.0.0.1") -> int:
        raise RuntimeError("metrics are disabled for this daemon")

    def stop(self) -> None:
        pass


def _remove(metric, label: str) -> None:
    try:
        metric.remove(label)
    except KeyError:
        pass  # never had a sample


class _StatusCollector(Collector):
    """Gauges built at scrape time from the last status snapshot (replaced whole, never mutated)."""

    def __init__(self) -> None:
        self.snapshot: dict | None = None

    def forget(self, section: str, key: str, value: str) -> None:
        snapshot = self.snapshot
        if snapshot is not None:
            self.snapshot = {**snapshot, section: [entry for entry in snapshot.get(section, []) if entry.get(key) != value]}

    def describe(self) -> Iterable[Metric]:
        return self._families({})

    def collect(self) -> Iterable[Metric]:
        snapshot = self.snapshot
        return self._families(snapshot) if snapshot is not None else []

    @staticmethod
    def _families(status: dict) -> list[Metric]:
        streams = status.get("streams", [])
        workers = status.get("workers", [])
        queue = status.get("queue", {})

        def gauge(name, doc, labels=None):
            return GaugeMetricFamily(name, doc, labels=labels)

        uptime = gauge("augserve_uptime_seconds", "Seconds since the daemon started.")
        info = gauge("augserve_daemon_info", "The daemon's settings (always 1).", ["backend", "device", "protocol"])
        in_flight_all = gauge("augserve_tasks_in_flight", "Batches in flight over all streams.")
        reissue = gauge("augserve_tasks_waiting_reissue", "Batches of dead workers waiting for a free worker.")
        connected = gauge("augserve_workers_connected", "Workers connected to the daemon.")
        credits = gauge("augserve_stream_credits", "The stream's credit window (prefetch), in batches.", ["stream"])
        in_flight = gauge("augserve_stream_in_flight", "Batches of the stream issued and not yet acknowledged.", ["stream"])
        epoch = gauge("augserve_stream_epoch", "The stream's current epoch (0-based).", ["stream"])
        stream_rate = gauge("augserve_stream_images_per_second", "Images per second the trainer acknowledged (last 10 s).", ["stream"])
        stream_info = gauge("augserve_stream_info", "What the stream serves (always 1).", ["stream", "dataset", "split", "pipeline", "pipeline_version"])
        busy = gauge("augserve_worker_busy_slots", "Tasks the worker holds now.", ["worker"])
        capacity = gauge("augserve_worker_capacity_slots", "Tasks the worker can hold at once.", ["worker"])
        worker_rate = gauge("augserve_worker_images_per_second", "Images per second the worker finished (last 10 s).", ["worker"])
        if status:
            uptime.add_metric([], float(status.get("uptime_s", 0.0)))
            info.add_metric([str(status.get("backend", "")), str(status.get("device", "")), str(status.get("protocol", ""))], 1)
            in_flight_all.add_metric([], queue.get("tasks_in_flight", 0))
            reissue.add_metric([], queue.get("waiting_reissue", 0))
            connected.add_metric([], len(workers))
        for s in streams:
            sid = str(s.get("stream"))
            credits.add_metric([sid], s.get("credits", 0))
            in_flight.add_metric([sid], s.get("in_flight", 0))
            epoch.add_metric([sid], s.get("epoch", 0))
            stream_rate.add_metric([sid], s.get("images_per_s", 0.0))
            stream_info.add_metric([sid, str(s.get("dataset", "")), str(s.get("split", "")), str(s.get("pipeline", "")), str(s.get("pipeline_version", ""))], 1)
        for w in workers:
            wid = str(w.get("worker"))
            busy.add_metric([wid], w.get("busy", 0))
            capacity.add_metric([wid], w.get("capacity", 0))
            worker_rate.add_metric([wid], w.get("images_per_s", 0.0))
        return [uptime, info, in_flight_all, reissue, connected, credits, in_flight, epoch, stream_rate, stream_info, busy, capacity, worker_rate]
