"""``augserve bench control-plane``: how many tasks per second one daemon schedules and sees
acknowledged, with no pixels in the way.

Three processes on loopback, CurveZMQ on every socket as deployed (keys in a throwaway directory; the
user's own keyring is never touched):

* the **daemon** — the real ``augserve serve --workers 0``, a subprocess;
* a **fleet** of fake workers — one process holding W worker DEALER sockets that register exactly as
  :mod:`augserve.worker` does (``ready``, ``heartbeat`` every second, ``bye``) and answer each task at
  once: a batch of 1×1×1 uint8 images (one byte per sample, NHWC) plus the task's int64 labels and
  sample ids, pushed straight to its trainer, then a ``done`` report;
* the **trainers**, in this process: S streams that attach to the daemon. ``fake`` trainers are one
  poll loop over S (control DEALER, data PULL) pairs that send, per batch, a receipt ``credit`` on
  arrival and an acknowledgement ``credit`` right after — the two messages a real trainer sends.
  ``real`` trainers are :func:`augserve.connect` streams, each iterated by a thread.

One configuration: the fleet registers W workers; S streams attach and hold still (each gets its
``prefetch`` batches, unacknowledged); then every stream consumes at once. The window opens a short
settle time later and closes when the first stream has everything, so every stream is active
throughout. ``tasks_per_s`` counts batches acknowledged in that window; CPU% (of one core) comes from
``/proc`` over the same window, for the daemon process, its event-loop thread alone, the fleet, this
process, the whole machine (``/proc/stat``) and what of it other processes took. Tasks per stream are
sized from the rate measured before, so each window lasts about ``seconds``; all streams finish, and
every task is checked to have been handled by exactly one fake worker once and acknowledged once.

``idle_workers``: the daemon's CPU with that many workers registered and no stream — what membership
alone (heartbeats, pings) costs.

On a machine with few cores the three processes share them: the figures are a floor for the daemon.
``tasks_per_daemon_cpu_s`` (tasks/s ÷ the daemon's CPU share) says what it would do with a core of its
own, and ``bound_by`` names the part that ran out of CPU.
"""

from __future__ import annotations

import collections
import contextlib
import math
import multiprocessing
import os
import socket as host_socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable

import msgpack
import numpy as np
import zmq

from .. import protocol as P
from .. import security
from ..control import Credentials, close_monitor, control_socket, exchange
from ..status import fetch_status

CLIENT_KINDS = ("fake", "real")
SPEC = {"name": "bench-control-plane", "ops": [{"op": "mirror"}]}  # never run: the fake workers make no pixels
IMAGE_SIDE = 16  # shapes' smallest side; only image 0 is drawn, by the daemon's dry run at attach
MAX_STREAMS = 256
HEARTBEAT_S = 1.0  # as a worker's default --heartbeat-interval
SETTLE_S = 0.2  # after the streams start consuming, before the window opens (their prefetched batches land)
WARMUP_TASKS = 200
MIN_TASKS_PER_STREAM = 20
MAX_TASKS = 2_000_000
START_TIMEOUT_S = 60.0  # the daemon imports pipelines; a loaded 2-core machine is slow at it
SLICE_S = 0.1


@dataclass(frozen=True)
class ControlPlaneConfig:
    """``workers`` and ``streams``: the counts to measure (every pair); ``clients``: ``fake`` and/or
    ``real`` trainers; ``seconds``: the target length of each measured window; ``batch_size``: sample
    ids per task; ``prefetch``: credits per stream; ``capacity``: tasks a fake worker holds at once;
    ``malformed_every``: one fake worker also sends a malformed message after every N tasks it
    handles (0: never); ``idle_workers``: also measure the daemon's CPU with this many workers
    registered and no stream (heartbeats and pings only; 0: skip); ``timeout_s``: the longest any configuration may take."""

    workers: tuple[int, ...] = (1, 4, 16)
    streams: tuple[int, ...] = (1, 4, 16)
    clients: tuple[str, ...] = ("fake",)
    seconds: float = 3.0
    batch_size: int = 64
    prefetch: int = 8
    capacity: int = 2
    malformed_every: int = 0
    idle_workers: int = 0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name, values in (("workers", self.workers), ("streams", self.streams), ("client", self.clients)):
            if not values:
                raise ValueError(f"--{name} needs at least one value")
            if len(set(values)) != len(values):
                raise ValueError(f"--{name} lists a value twice: {' '.join(map(str, values))}")
        for count in self.workers:
            if not 1 <= count <= 1024:
                raise ValueError(f"--workers must be in [1, 1024], got {count}")
        for count in self.streams:
            if not 1 <= count <= MAX_STREAMS:
                raise ValueError(f"--streams must be in [1, {MAX_STREAMS}], got {count}")
        for kind in self.clients:
            if kind not in CLIENT_KINDS:
                raise ValueError(f"unknown --client {kind!r}; choose from {', '.join(CLIENT_KINDS)}")
        if not 0.1 <= self.seconds <= 600:
            raise ValueError(f"--seconds must be in [0.1, 600], got {self.seconds}")
        if not 1 <= self.batch_size <= 65_536:
            raise ValueError(f"--batch-size must be in [1, 65536], got {self.batch_size}")
        if not 1 <= self.prefetch <= 1024:
            raise ValueError(f"--prefetch must be in [1, 1024], got {self.prefetch}")
        if not 1 <= self.capacity <= 64:
            raise ValueError(f"--capacity must be in [1, 64], got {self.capacity}")
        if not 0 <= self.idle_workers <= 4096:
            raise ValueError(f"--idle-workers must be in [0, 4096], got {self.idle_workers}")
        if self.malformed_every < 0:
            raise ValueError(f"--malformed-every must be >= 0, got {self.malformed_every}")
        if not 1 <= self.timeout_s <= 3600:
            raise ValueError(f"--timeout must be in [1, 3600] seconds, got {self.timeout_s}")


# --- CPU time from /proc -----------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), or of one ``thread`` of it."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        with open(path, encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        raise ValueError(f"cannot read {path}: the control-plane bench measures CPU time from Linux's /proc") from None
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime and stime: fields 14 and 15 of stat(5)


def machine_busy_seconds() -> float:
    """CPU seconds all cores of this machine spent on anything but idling since boot (``/proc/stat``)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except OSError:
        raise ValueError("cannot read /proc/stat: the control-plane bench measures CPU time from Linux's /proc") from None
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICKS  # user..steal, less idle and iowait (guest is inside user)


@dataclass(frozen=True)
class _Probe:
    """CPU seconds so far of each measured part, and when they were read."""

    at: float
    cpu: dict[str, float]


def _probe(pids: dict[str, tuple[int, int | None]]) -> _Probe:
    cpu = {name: cpu_seconds(pid, thread) for name, (pid, thread) in pids.items()}
    return _Probe(time.perf_counter(), {**cpu, "machine": machine_busy_seconds()})


# --- the fleet of fake workers (its own process) ----------------------------------------------------


class _FakeWorker:
    """One worker's control socket and its data sockets to trainers (by data address and key)."""

    def __init__(self, context: zmq.Context, address: str, keyring: security.Keyring, name: str, capacity: int) -> None:
        self.name = name
        self.hello = {"worker": name, "pid": os.getpid(), "host": host_socket.gethostname()[:256], "backend": "bench-fake", "device": "cpu", "capacity": capacity}
        self.control = context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, 1000)  # the bye should leave
        self.control.setsockopt(zmq.ROUTING_ID, name.encode())
        self.control.setsockopt(zmq.MAXMSGSIZE, P.MAX_HEADER_BYTES + 4096)
        security.secure_client(self.control, keyring.worker, keyring.daemon.public)
        self.control.connect(address)
        self.outputs: dict[tuple[str, str | None], zmq.Socket] = {}
        self.last_sent = 0.0
        self.send(P.Ready(**self.hello))

    def send(self, body: P.Body) -> None:
        self.control.send_multipart(P.encode(body), flags=zmq.NOBLOCK)
        self.last_sent = time.monotonic()

    def output(self, context: zmq.Context, keyring: security.Keyring, data: str, data_key: str | None) -> zmq.Socket:
        sock = self.outputs.get((data, data_key))
        if sock is None:
            if data_key is None:
                raise ValueError("the trainer sent no data key")
            sock = context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1024)  # above any stream's credits: a send never waits here
            security.secure_client(sock, keyring.worker, data_key.encode())
            sock.connect(data)
            self.outputs[(data, data_key)] = sock
        return sock

    def drop(self, data: str) -> None:
        for key in [k for k in self.outputs if k[0] == data]:
            self.outputs.pop(key).close(linger=0)

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.send(P.Bye(worker=self.name))
        for sock in self.outputs.values():
            sock.close(linger=0)
        self.control.close()


# A well-formed envelope with a field out of bounds, and bytes that are not msgpack at all.
_MALFORMED = (
    msgpack.packb({"proto": P.PROTOCOL, "v": P.PROTOCOL_VERSION, "type": "done", "worker": "w", "task": "", "stream": "s", "epoch": -1, "index": 0, "samples": 0}),
    b"\xc1 not an augserve message",
)


class _Fleet:
    """W fake workers on one poll loop. Each task is answered at once: batch to the trainer, ``done``
    to the daemon. A task header is read with msgpack alone: this process is a load generator and
    spends as little CPU as it can (the trainer validates the batch fully)."""

    def __init__(self, address: str, keys_dir: str) -> None:
        self.address = address
        self.keyring = security.Keyring.load(keys_dir, create=False)
        self.context = zmq.Context()
        # One socket per (worker, trainer) pair: 64 × 64 is past libzmq's default of 1023 per context.
        self.context.set(zmq.MAX_SOCKETS, 1 << 16)
        self.workers: list[_FakeWorker] = []
        self.handled: collections.Counter = collections.Counter()
        self.malformed_every = 0
        self.malformed_sent = 0
        self.first_worker_tasks = 0
        self.errors_heard = 0
        self._zeros = b""

    def start(self, count: int, capacity: int, malformed_every: int, tag: str) -> None:
        self.handled.clear()
        self.malformed_every, self.malformed_sent, self.errors_heard, self.first_worker_tasks = malformed_every, 0, 0, 0
        self.workers = [_FakeWorker(self.context, self.address, self.keyring, f"bench-{tag}-w{k}-{os.getpid()}", capacity) for k in range(count)]

    def stop(self) -> dict:
        for worker in self.workers:
            worker.close()
        self.workers = []
        counts = collections.Counter(self.handled.values())
        return {
            "handled": {f"{s}|{e}|{i}": n for (s, e, i), n in self.handled.items()},
            "total": sum(self.handled.values()),
            "times_handled": dict(counts),
            "malformed_sent": self.malformed_sent,
            "errors_heard": self.errors_heard,
        }

    def on_message(self, worker: _FakeWorker, frames: list) -> None:
        header = msgpack.unpackb(frames[0], raw=False)
        kind = header.get("type")
        if kind == "task":
            self._task(worker, header)
        elif kind == "drop":
            worker.drop(header["data"])
        elif kind == "error":
            self.errors_heard += 1
        # "ping" needs no answer (any message keeps the daemon's liveness); "stop" ends with the bench.

    def _task(self, worker: _FakeWorker, task: dict) -> None:
        ids = np.asarray(task["ids"], dtype=np.int64)
        n = len(ids)
        if len(self._zeros) < 8 * n:
            self._zeros = bytes(8 * n)
        batch = P.BatchHeader(
            stream=task["stream"], task=task["task"], epoch=task["epoch"], index=task["index"], pipeline_version=task["pipeline"]["version"], worker=worker.name,
            tensors=[
                P.TensorDescriptor(name="images", dtype="uint8", shape=[n, 1, 1, 1]),
                P.TensorDescriptor(name="labels", dtype="int64", shape=[n]),
                P.TensorDescriptor(name="sample_ids", dtype="int64", shape=[n]),
            ],
        )  # fmt: skip
        frames = P.encode(batch, [self._zeros[:n], self._zeros[: 8 * n], ids.tobytes()])
        worker.output(self.context, self.keyring, task["data"], task.get("data_key")).send_multipart(frames, flags=zmq.NOBLOCK)
        self.handled[(task["stream"], task["epoch"], task["index"])] += 1
        worker.send(P.Done(worker=worker.name, task=task["task"], stream=task["stream"], epoch=task["epoch"], index=task["index"], samples=n, bytes=17 * n))
        if self.malformed_every and worker is self.workers[0]:
            self.first_worker_tasks += 1
        if self.malformed_every and worker is self.workers[0] and self.first_worker_tasks % self.malformed_every == 0:
            worker.control.send(_MALFORMED[self.malformed_sent % len(_MALFORMED)], flags=zmq.NOBLOCK)
            self.malformed_sent += 1

    def heartbeats(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if now - worker.last_sent >= HEARTBEAT_S:
                worker.send(P.Heartbeat(**worker.hello))

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.context.term()


def _fleet_main(conn, address: str, keys_dir: str) -> None:
    """The fleet process: obeys ``conn`` — ``("start", W, capacity, malformed_every, tag)`` registers W
    workers, ``("stop",)`` says bye and answers the counts, ``("exit",)`` ends — while its workers serve
    tasks. A failure is reported as ``("error", text)``; a vanished parent ends the process."""
    parent = os.getppid()
    fleet = _Fleet(address, keys_dir)
    poller = zmq.Poller()
    poller.register(conn.fileno(), zmq.POLLIN)
    try:
        conn.send(("ready", os.getpid()))
        while True:
            events = dict(poller.poll(int(SLICE_S * 1000)))
            for worker in fleet.workers:
                if events.get(worker.control):
                    for _ in range(256):
                        try:
                            frames = worker.control.recv_multipart(flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        fleet.on_message(worker, frames)
            fleet.heartbeats()
            if events.get(conn.fileno()):
                command = conn.recv()
                if command[0] == "exit":
                    return
                for worker in fleet.workers:
                    poller.unregister(worker.control)
                if command[0] == "start":
                    fleet.start(*command[1:])
                    for worker in fleet.workers:
                        poller.register(worker.control, zmq.POLLIN)
                    conn.send(("started", [w.name for w in fleet.workers]))
                elif command[0] == "stop":
                    conn.send(("stopped", fleet.stop()))
            elif os.getppid() != parent:
                return
    except (EOFError, BrokenPipeError):
        return
    except Exception as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    finally:
        fleet.close()


class _FleetProcess:
    """The parent's handle on the fleet process: start/stop its workers, every wait bounded."""

    def __init__(self, address: str, keys_dir: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        spawn = multiprocessing.get_context("spawn")  # no fork: this process holds zmq contexts
        self.conn, child = spawn.Pipe()
        self.process = spawn.Process(target=_fleet_main, args=(child, address, keys_dir), name="augserve-bench-fleet", daemon=True)
        self.process.start()
        child.close()
        self.pid = self._ask(None, "ready", START_TIMEOUT_S)[1]

    def start(self, workers: int, capacity: int, malformed_every: int, tag: str) -> list[str]:
        return self._ask(("start", workers, capacity, malformed_every, tag), "started", self.timeout_s)[1]

    def stop(self) -> dict:
        return self._ask(("stop",), "stopped", self.timeout_s)[1]

    def check(self) -> None:
        """Raise ConnectionError when the fleet died or reported an error while it served tasks."""
        if self.conn.poll(0):
            reply = self.conn.recv()
            raise ConnectionError(f"the fake-worker process failed: {reply[1]}" if reply[0] == "error" else f"the fake-worker process said {reply!r} unasked")
        if not self.process.is_alive():
            raise ConnectionError(f"the fake-worker process (pid {self.process.pid}) exited with status {self.process.exitcode}")

    def _ask(self, command, expected: str, timeout_s: float) -> tuple:
        if command is not None:
            self.conn.send(command)
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(SLICE_S):
            if not self.process.is_alive():
                raise ConnectionError(f"the fake-worker process (pid {self.process.pid}) exited with status {self.process.exitcode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the fake-worker process did not answer {expected!r} within {timeout_s:g} s")
        try:
            reply = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(1.0)
            raise ConnectionError(f"the fake-worker process (pid {self.process.pid}) exited with status {self.process.exitcode}") from None
        if reply[0] == "error":
            raise ConnectionError(f"the fake-worker process failed: {reply[1]}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("exit",))
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


# --- the daemon ---------------------------------------------------------------------------------------


class _Daemon:
    """``augserve serve --workers 0`` on a free loopback port with the bench's keys; its log in a
    temporary file quoted when it fails."""

    def __init__(self, keys_dir: str, streams: int, log_dir: str) -> None:
        from ..local import _die_with_parent, free_port

        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.log_path = os.path.join(log_dir, "daemon.log")
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1", "AUGSERVE_MAX_STREAMS_PER_CLIENT": str(max(32, streams + 1))}
        command = [sys.executable, "-m", "augserve", "--log-level", "warning", "serve", "--bind", self.address, "--workers", "0", "--keys-dir", keys_dir]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        self.credentials = Credentials.load(keys_dir)

    @property
    def pid(self) -> int:
        return self.process.pid

    def status(self, timeout: float = 5.0) -> dict:
        self.check_alive()
        return fetch_status(self.address, timeout=timeout, credentials=self.credentials)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise ConnectionError(f"the daemon exited with {self.process.returncode}: {self.log_tail()}")

    def log_tail(self) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as handle:
            lines = handle.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def wait_until(self, what: str, predicate: Callable[[dict], bool], timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = self.status(timeout=1.0)
                if predicate(status):
                    return status
            except TimeoutError:
                pass
            except ConnectionError:
                self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the daemon at {self.address} did not have {what} within {timeout_s:g} s")
            time.sleep(SLICE_S)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


# --- trainers -------------------------------------------------------------------------------------------


def _attach_request(config: ControlPlaneConfig, tasks: int, data: str, data_key: str | None) -> P.Attach:
    """One epoch of exactly ``tasks`` batches: ``shapes`` with ``tasks × batch_size`` samples."""
    return P.Attach(
        dataset="shapes", dataset_options={"size": IMAGE_SIDE, "n": tasks * config.batch_size}, pipeline=SPEC, batch_size=config.batch_size,
        epochs=1, prefetch=config.prefetch, data=data, data_key=data_key, client="augserve-bench-control-plane",
    )  # fmt: skip


@dataclass
class _Tally:
    """What one stream's trainer saw: batches acknowledged (by (epoch, index)), copies dropped, when done."""

    stream: str
    planned: int
    acked: set
    duplicates: int = 0
    finished_at: float | None = None

    def take(self, key: tuple[int, int]) -> bool:
        if key in self.acked:
            self.duplicates += 1
            return False
        self.acked.add(key)
        return True


class _FakeTrainers:
    """S streams on one poll loop in this process. Each batch gets a receipt and an acknowledgement,
    in two ``credit`` messages, the moment it arrives."""

    def __init__(self, daemon: _Daemon, keys_dir: str, config: ControlPlaneConfig) -> None:
        self.daemon = daemon
        self.config = config
        self.credentials = Credentials.load(keys_dir)
        keyring = self.credentials.keyring
        self.context = zmq.Context()
        self.gatekeeper = security.Gatekeeper(self.context, {"worker": keyring.allowed("worker")}).start()
        self.links: list[tuple[zmq.Socket, zmq.Socket, _Tally]] = []

    def attach(self, streams: int, tasks_per_stream: int) -> list[_Tally]:
        keyring = self.credentials.keyring
        for _ in range(streams):
            data = self.context.socket(zmq.PULL)
            data.setsockopt(zmq.LINGER, 0)
            data.setsockopt(zmq.RCVHWM, max(4, 2 * self.config.prefetch))
            security.secure_server(data, keyring.client)
            data.bind("tcp://127.0.0.1:*")
            control, monitor = control_socket(self.context, self.daemon.address, self.credentials)
            self.links.append((control, data, None))
            request = _attach_request(self.config, tasks_per_stream, data.getsockopt_string(zmq.LAST_ENDPOINT), keyring.client.public.decode())
            reply = exchange(control, monitor, self.daemon.address, request, {"attached"}, self.config.timeout_s, self.credentials)
            close_monitor(control, monitor)
            if reply.type == "error":
                raise ConnectionError(f"the daemon refused a stream: {reply.body.message}")
            self.links[-1] = (control, data, _Tally(reply.body.stream, tasks_per_stream, set()))
        return [tally for _, _, tally in self.links]

    def run(self, on_first_finished: Callable[[], None], deadline: float, check: Callable[[], None]) -> None:
        """Consume until every stream has all its batches; ``check`` runs every slice and raises
        when the other side is gone."""
        poller = zmq.Poller()
        for control, data, _ in self.links:
            poller.register(control, zmq.POLLIN)
            poller.register(data, zmq.POLLIN)
        open_streams = len(self.links)
        last_heartbeat = time.monotonic()
        while open_streams:
            events = dict(poller.poll(int(SLICE_S * 1000)))
            now = time.monotonic()
            for control, data, tally in self.links:
                if events.get(control):
                    self._control(control, tally)
                if events.get(data):
                    self._batches(control, data, tally)
                if tally.finished_at is None and len(tally.acked) == tally.planned:
                    tally.finished_at = time.perf_counter()
                    control.send_multipart(P.encode(P.Detach(stream=tally.stream)), flags=zmq.NOBLOCK)
                    if open_streams == len(self.links):
                        on_first_finished()
                    open_streams -= 1
            if now - last_heartbeat >= HEARTBEAT_S:  # a stream silent for long is written off by the daemon
                for control, _, tally in self.links:
                    if tally.finished_at is None:
                        control.send_multipart(P.encode(P.Credit(stream=tally.stream)), flags=zmq.NOBLOCK)
                last_heartbeat = now
            check()
            if now > deadline:
                short = [f"{t.stream}: {len(t.acked)}/{t.planned}" for _, _, t in self.links if t.finished_at is None][:4]
                raise TimeoutError(f"streams did not finish within {self.config.timeout_s:g} s ({', '.join(short)} batches acknowledged)")

    def _control(self, control: zmq.Socket, tally: _Tally) -> None:
        while True:
            try:
                frames = control.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            message = P.decode(frames, P.DAEMON_TO_CLIENT)
            if message.type in ("error", "stream_error"):
                raise ConnectionError(f"stream {tally.stream}: the daemon said: {message.body.message}")

    def _batches(self, control: zmq.Socket, data: zmq.Socket, tally: _Tally) -> None:
        for _ in range(64):
            try:
                frames = data.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            header = msgpack.unpackb(frames[0], raw=False)
            if header.get("stream") != tally.stream:
                continue  # a late batch of a stream this socket no longer serves
            key = (header["epoch"], header["index"])
            if not tally.take(key):
                continue
            samples = header["tensors"][2]["shape"][0]
            control.send_multipart(P.encode(P.Credit(stream=tally.stream, received=[key])), flags=zmq.NOBLOCK)
            control.send_multipart(P.encode(P.Credit(stream=tally.stream, acks=[(*key, samples)])), flags=zmq.NOBLOCK)

    def close(self) -> None:
        for control, data, _ in self.links:
            control.close(linger=200)
            data.close(linger=0)
        self.gatekeeper.stop()
        self.context.term()


class _RealTrainers:
    """S :func:`augserve.connect` streams, each iterated by a thread of this process."""

    def __init__(self, daemon: _Daemon, keys_dir: str, config: ControlPlaneConfig) -> None:
        self.daemon = daemon
        self.keys_dir = keys_dir
        self.config = config
        self.streams: list = []
        self.tallies: list[_Tally] = []
        self.errors: list[str] = []

    def attach(self, streams: int, tasks_per_stream: int) -> list[_Tally]:
        from ..client import connect

        config = self.config
        for _ in range(streams):
            stream = connect(
                self.daemon.address, "shapes", SPEC, config.batch_size, epochs=1, prefetch=config.prefetch,
                dataset_options={"size": IMAGE_SIDE, "n": tasks_per_stream * config.batch_size}, keys_dir=self.keys_dir,
                timeout=config.timeout_s, batch_timeout=config.timeout_s,
            )  # fmt: skip
            self.streams.append(stream)
            self.tallies.append(_Tally(stream.id, tasks_per_stream, set()))
        return self.tallies

    def run(self, on_first_finished: Callable[[], None], deadline: float, check: Callable[[], None]) -> None:
        lock = threading.Lock()
        finished = []

        def consume(stream, tally: _Tally) -> None:
            try:
                for batch in stream:
                    tally.take((batch.epoch, batch.index))
                tally.duplicates += stream.duplicates_dropped
            except Exception as exc:
                self.errors.append(f"stream {tally.stream}: {type(exc).__name__}: {exc}")
            tally.finished_at = time.perf_counter()
            with lock:
                finished.append(tally)
                if len(finished) == 1:
                    on_first_finished()

        threads = [threading.Thread(target=consume, args=pair, name=f"bench-trainer-{pair[1].stream}", daemon=True) for pair in zip(self.streams, self.tallies)]
        for thread in threads:
            thread.start()
        alive = threads
        while alive:
            alive[0].join(SLICE_S)
            check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"streams did not finish within {self.config.timeout_s:g} s")  # close() ends the threads
            alive = [thread for thread in alive if thread.is_alive()]
        if self.errors:
            raise ConnectionError(self.errors[0])

    def close(self) -> None:
        for stream in self.streams:
            stream.close()


# --- one configuration -----------------------------------------------------------------------------------


def _bound_by(cpu_pct: dict[str, float], cores: int) -> str:
    """The part that ran out of CPU: the machine when its cores were nearly all busy (naming the share
    other processes took), else a single-threaded part near 100 % of one core, else none (latency:
    credits × round trips)."""
    if cpu_pct["machine"] >= 90 * cores:
        return f"machine ({cores} cores busy, {cpu_pct['others']:.0f} % by other processes)"
    parts = {"daemon loop": cpu_pct["daemon_loop"], "workers": cpu_pct["workers"], "trainers": cpu_pct["trainers"]}
    name, pct = max(parts.items(), key=lambda item: item[1])
    return name if pct >= 90 else "latency"


def _measure(daemon: _Daemon, fleet: _FleetProcess, keys_dir: str, config: ControlPlaneConfig, client: str, workers: int, streams: int,
             tasks_per_stream: int, tag: str) -> dict:  # fmt: skip
    """Register the workers, attach the streams, time the steady window, drain, check exactly-once."""
    names = fleet.start(workers, config.capacity, config.malformed_every, tag)
    daemon.wait_until(f"{workers} fake worker(s)", lambda s: {w["worker"] for w in s["workers"]} == set(names), config.timeout_s)
    before = daemon.status()
    trainers = (_FakeTrainers if client == "fake" else _RealTrainers)(daemon, keys_dir, config)
    try:
        tallies = trainers.attach(streams, tasks_per_stream)
        pids = {"daemon": (daemon.pid, None), "daemon_loop": (daemon.pid, daemon.pid), "workers": (fleet.pid, None), "trainers": (os.getpid(), None)}
        window: dict[str, object] = {}

        def acked() -> int:
            return sum(len(t.acked) for t in tallies)

        def open_window() -> None:
            window["start"], window["acked_start"] = _probe(pids), acked()

        def close_window() -> None:
            window["end"], window["acked_end"] = _probe(pids), acked()
            if "start" not in window:  # finished within the settle time: the whole run is the window
                window["start"], window["acked_start"] = window["started"], 0

        window["started"] = _probe(pids)
        timer = threading.Timer(SETTLE_S, open_window)
        timer.start()
        try:
            trainers.run(close_window, time.monotonic() + config.timeout_s, fleet.check)
        finally:
            timer.cancel()
    finally:
        trainers.close()
    daemon.wait_until("no streams left", lambda s: not s["streams"], config.timeout_s)
    counts = fleet.stop()
    after = daemon.wait_until("no workers left", lambda s: not s["workers"], config.timeout_s)
    start, end = window["start"], window["end"]
    seconds = end.at - start.at
    tasks = window["acked_end"] - window["acked_start"]
    cpu_pct = {name: 100 * (end.cpu[name] - start.cpu[name]) / seconds for name in end.cpu}
    cpu_pct["others"] = max(0.0, cpu_pct["machine"] - cpu_pct["daemon"] - cpu_pct["workers"] - cpu_pct["trainers"])
    rate = tasks / seconds
    return {
        "benchmark": "control-plane",
        "client": client,
        "workers": workers,
        "streams": streams,
        "batch_size": config.batch_size,
        "prefetch": config.prefetch,
        "capacity": config.capacity,
        "tasks": streams * tasks_per_stream,
        "window_s": _sig(seconds),
        "window_tasks": tasks,
        "tasks_per_s": _sig(rate),
        "cpu_pct": {name: round(value, 1) for name, value in cpu_pct.items()},
        "tasks_per_daemon_cpu_s": _sig(rate / (cpu_pct["daemon"] / 100)) if cpu_pct["daemon"] > 0 else None,
        "bound_by": _bound_by(cpu_pct, os.cpu_count() or 1),
        **_exactly_once(tallies, counts),
        "reissued": after["reissued_tasks"] - before["reissued_tasks"],
        "refused_messages": after["refused_messages"] - before["refused_messages"],
        "malformed_sent": counts["malformed_sent"],
    }


def _exactly_once(tallies: list[_Tally], counts: dict) -> dict:
    """Every planned batch handled by the fake workers exactly once and acknowledged exactly once."""
    handled: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for key, times in counts["handled"].items():
        stream, epoch, index = key.split("|")
        handled[stream][(int(epoch), int(index))] = times
    ok = set(handled) == {t.stream for t in tallies}
    for tally in tallies:
        planned = {(0, index) for index in range(tally.planned)}
        seen = handled.get(tally.stream, collections.Counter())
        ok = ok and tally.acked == planned and set(seen) == planned and all(n == 1 for n in seen.values()) and tally.duplicates == 0
    return {
        "acked": sum(len(t.acked) for t in tallies),
        "handled": counts["total"],
        "duplicates": sum(t.duplicates for t in tallies) + sum(n - 1 for c in handled.values() for n in c.values()),
        "exactly_once": ok,
    }


# --- the benchmark -------------------------------------------------------------------------------------


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


def run_control_plane_bench(config: ControlPlaneConfig, progress=None) -> dict:
    """Measure every (client kind, workers, streams) of ``config``; returns rows and a summary."""
    from .transport import conditions

    say = progress or (lambda text: None)
    started = conditions()
    rows = []
    with tempfile.TemporaryDirectory(prefix="augserve-bench-control-") as scratch, contextlib.ExitStack() as stack:
        keys_dir = os.path.join(scratch, "keys")
        security.Keyring.load(keys_dir)  # a throwaway keyring: the user's own keys stay untouched
        say("starting the daemon (--workers 0) and the fake-worker process")
        daemon = _Daemon(keys_dir, max(config.streams), scratch)
        stack.callback(daemon.close)
        fleet = _FleetProcess(daemon.address, keys_dir, config.timeout_s)
        stack.callback(fleet.close)
        daemon.wait_until("answered", lambda s: True, START_TIMEOUT_S)
        say(f"warm-up: {WARMUP_TASKS} tasks, 1 worker, 1 stream")
        warm = _measure(daemon, fleet, keys_dir, config, "fake", 1, 1, WARMUP_TASKS, "warmup")
        rate = {kind: warm["tasks_per_s"] for kind in config.clients}
        for client in config.clients:
            for workers in config.workers:
                for streams in config.streams:
                    # Sized so the window lasts about `seconds` at the last rate seen, whole streams of it.
                    tasks = max(MIN_TASKS_PER_STREAM, math.ceil(rate[client] * (config.seconds + SETTLE_S) / streams))
                    tasks = min(tasks, MAX_TASKS // streams)
                    say(f"{client} trainers: {workers} worker(s), {streams} stream(s), {streams * tasks} tasks")
                    row = _measure(daemon, fleet, keys_dir, config, client, workers, streams, tasks, f"{client}{workers}x{streams}")
                    rows.append(row)
                    rate[client] = row["tasks_per_s"]
        idle = None
        if config.idle_workers:
            say(f"idle: {config.idle_workers} worker(s), no stream, {config.seconds:g} s")
            idle = _measure_idle(daemon, fleet, config)
    return {**_summary(config, rows, started), "idle": idle}


def _measure_idle(daemon: _Daemon, fleet: _FleetProcess, config: ControlPlaneConfig) -> dict:
    """The daemon's CPU with ``idle_workers`` registered and no stream: what worker membership alone
    costs (each worker heartbeats every second; the daemon pings each one twice a second)."""
    names = fleet.start(config.idle_workers, config.capacity, 0, "idle")
    daemon.wait_until(f"{config.idle_workers} idle worker(s)", lambda s: {w["worker"] for w in s["workers"]} == set(names), config.timeout_s)
    pids = {"daemon": (daemon.pid, None), "daemon_loop": (daemon.pid, daemon.pid)}
    start = _probe(pids)
    time.sleep(config.seconds)
    fleet.check()
    end = _probe(pids)
    fleet.stop()
    daemon.wait_until("no workers left", lambda s: not s["workers"], config.timeout_s)
    seconds = end.at - start.at
    pct = {name: 100 * (end.cpu[name] - start.cpu[name]) / seconds for name in pids}
    return {"workers": config.idle_workers, "window_s": _sig(seconds), "cpu_pct": {name: round(pct[name], 1) for name in pids},
            "daemon_cpu_pct_per_100_workers": _sig(100 * pct["daemon"] / config.idle_workers)}  # fmt: skip


def _summary(config: ControlPlaneConfig, rows: list[dict], started: dict) -> dict:
    per_cpu = [r["tasks_per_daemon_cpu_s"] for r in rows if r["tasks_per_daemon_cpu_s"]]
    return {
        "benchmark": "control-plane",
        "workers": list(config.workers),
        "streams": list(config.streams),
        "clients": list(config.clients),
        "batch_size": config.batch_size,
        "prefetch": config.prefetch,
        "capacity": config.capacity,
        "seconds": config.seconds,
        "rows": rows,
        "max_tasks_per_s": max(r["tasks_per_s"] for r in rows),
        "min_tasks_per_s": min(r["tasks_per_s"] for r in rows),
        "median_tasks_per_daemon_cpu_s": _sig(statistics.median(per_cpu)) if per_cpu else None,
        "exactly_once": all(r["exactly_once"] for r in rows),
        "conditions": started,
    }


def json_rows(result: dict) -> list[dict]:
    return list(result["rows"])


def _per_cpu_s(value: float | None) -> str:
    # None: the daemon's CPU time over the window read 0 (/proc counts it in 10 ms ticks; a short run)
    return "–" if value is None else f"{value:.0f}"


def format_table(result: dict) -> str:
    lines = [
        f"control-plane benchmark — the real daemon, fake workers answering each task at once with a 1×1×1-pixel batch, trainers acknowledging "
        f"each batch on arrival; batch {result['batch_size']} ids, {result['prefetch']} credits per stream, {result['capacity']} tasks per worker",
        "",
        "| trainers | workers | streams | tasks/s | daemon CPU % | daemon loop % | workers % | trainers % | other processes % | tasks per daemon CPU-s | bound by | exactly once |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["rows"]:
        c = r["cpu_pct"]
        per_cpu = _per_cpu_s(r["tasks_per_daemon_cpu_s"])
        once = "yes" if r["exactly_once"] else f"NO ({r['acked']}/{r['tasks']} acked, {r['duplicates']} duplicates)"
        lines.append(
            f"| {r['client']} | {r['workers']} | {r['streams']} | {r['tasks_per_s']:.0f} | {c['daemon']:.0f} | {c['daemon_loop']:.0f} | {c['workers']:.0f} "
            f"| {c['trainers']:.0f} | {c['others']:.0f} | {per_cpu} | {r['bound_by']} | {once} |"
        )
    c = result["conditions"]
    load = "" if c["load_average"] is None else f", load average {c['load_average'][0]:.2f} at the start"
    idle = result.get("idle")
    if idle:
        lines += ["", f"idle: {idle['workers']} workers registered, no stream: daemon {idle['cpu_pct']['daemon']:.1f} % CPU "
                      f"(its loop {idle['cpu_pct']['daemon_loop']:.1f} %), {idle['daemon_cpu_pct_per_100_workers']:.2f} % per 100 workers"]  # fmt: skip
    lines += [
        "",
        f"tasks/s: {result['min_tasks_per_s']:.0f} to {result['max_tasks_per_s']:.0f}; median tasks per daemon CPU-second {_per_cpu_s(result['median_tasks_per_daemon_cpu_s'])}",
        "CPU % is of one core; the daemon, the fake workers, the trainers and any other process share this machine's cores, so tasks/s is a floor for a daemon with a core of its own",
        f"conditions: {c['cores']} cores ({c['cpu']}){load}; Python {c['python']}, pyzmq {c['pyzmq']}, libzmq {c['libzmq']}; CURVE by {c['curve']}",
    ]
    return "\n".join(lines)
