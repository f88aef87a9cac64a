"""An augmentation worker: takes tasks from a daemon, loads and augments a batch, and sends it straight
to the trainer that asked for it (no extra hop through the daemon).

A worker is a process of its own — started by the daemon, or by hand on another machine with
``augserve worker --connect tcp://HOST:PORT``. It speaks to the daemon over one DEALER socket
(``ready``, ``heartbeat``, ``done``, ``failed``) and to each trainer over a PUSH socket. OpenCV and torch
run single-threaded here unless told otherwise: parallelism comes from processes.

A trainer on this worker's host gets its batches through shared memory when its task allows it: the
worker takes a slot once the pipeline knows the batch's size, the pipeline writes the images straight
into it (``out=``: each byte written once), and the PUSH socket carries only a descriptor
(:mod:`augserve.handoff`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket as host_socket
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import zmq

from . import protocol as P
from . import security
from .lru import LRUCache
from .batch import augment_batch
from .handoff.host import default_dir
from .handoff.sender import Sender
from .sources import CorruptImageError, SkipStats, open_dataset

log = logging.getLogger("augserve.worker")

SEND_TIMEOUT_S = 30.0  # a trainer that cannot take a batch for this long is reported unreachable
PIPELINE_CACHE_SIZE = 8  # built pipelines kept per worker (a DALI pipeline takes a while to build)
SOURCE_CACHE_SIZE = 8  # opened datasets kept per worker
OUTPUT_CACHE_SIZE = 64  # sockets to trainers kept open
MAX_REPORTED_PATHS = 64  # corrupt-file paths quoted in one report
TRAILING_BYTES = (8, 8)  # per image, after the images in a slot: its label and its sample id (int64)


@dataclass
class WorkerOptions:
    connect: str
    backend: str = "albumentations"
    device: str = "cpu"
    threads: int = 1
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 5
    capacity: int = 2
    name: str | None = None
    exit_with_parent: bool = False  # local workers stop when their daemon process is gone
    keys_dir: str | None = None
    keyring: object = None  # a security.Keyring already loaded (Ray actors: no secret left on disk); wins over keys_dir
    insecure: bool = False  # no CurveZMQ: only for a daemon started with --insecure
    shm_dir: str | None = None  # where slots for trainers on this host live (None: $AUGSERVE_SHM_DIR or /dev/shm)
    shm_reserve_mb: int = 64  # megabytes (10^6 bytes) of the shm directory a worker never takes


def _limit_threads(threads: int) -> None:
    """One thread per worker by default: many processes beat many threads for OpenCV/BLAS."""
    import cv2
    import torch

    cv2.setNumThreads(threads if threads > 1 else 0)
    torch.set_num_threads(threads)
    os.environ["AUGSERVE_DALI_THREADS"] = str(threads)


class Worker:
    """The worker's loop. ``run()`` returns when the daemon says ``stop`` (or is gone, for local workers)."""

    def __init__(self, options: WorkerOptions) -> None:
        from pipelines.backends import require_backend

        # A worker started without the CLI (a Ray actor, a test) fails here, in one line, rather than
        # answering every task with the same import error.
        require_backend(options.backend)
        self.options = options
        self.id = options.name or f"{host_socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if options.insecure:
            self.keyring = None
        else:
            self.keyring = options.keyring or security.Keyring.load(options.keys_dir, create=False)
        self.context = zmq.Context.instance()
        self.control: zmq.Socket | None = None
        # Sockets to trainers, keyed by (address, server key); the task thread alone uses them.
        self.outputs: LRUCache = LRUCache(OUTPUT_CACHE_SIZE, on_evict=lambda _key, sock: sock.close(linger=0))
        self.sources: LRUCache = LRUCache(SOURCE_CACHE_SIZE)
        self.pipelines: LRUCache = LRUCache(PIPELINE_CACHE_SIZE)  # spec JSON -> built pipeline
        if options.shm_reserve_mb < 0:
            raise ValueError(f"--shm-reserve-mb must be >= 0, got {options.shm_reserve_mb}")
        # Slot pools for trainers on this host; the task thread alone uses them.
        self.handoff = Sender(options.shm_dir or default_dir(), options.shm_reserve_mb * 10**6, options.device)
        self.parent = os.getppid()
        self.last_sent = 0.0
        self.last_heard = time.monotonic()

    # --- lifecycle -----------------------------------------------------------------------------------

    def run(self) -> int:
        _limit_threads(self.options.threads)
        reaped = self.handoff.reap()
        if reaped:
            log.info("worker %s: removed %d shared-memory slot(s) left by exited workers", self.id, len(reaped))
        self._open_control()
        try:
            return self._loop()
        finally:
            self._close()

    def _open_control(self) -> None:
        if self.control is not None:
            self.control.close(linger=0)
        self.control = self.context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.ROUTING_ID, self.id.encode())
        self.control.setsockopt(zmq.MAXMSGSIZE, P.MAX_HEADER_BYTES + 4096)
        if self.keyring is not None:
            security.secure_client(self.control, self.keyring.worker, self.keyring.daemon.public)
        self.control.connect(self.options.connect)
        self._send_control(P.Ready(**self.hello))
        self.last_heard = time.monotonic()

    @property
    def hello(self) -> dict:
        """Who this worker is; sent with ``ready`` and every heartbeat, so a restarted daemon re-learns it."""
        return {
            "worker": self.id,
            "pid": os.getpid(),
            "host": host_socket.gethostname()[:256],
            "backend": self.options.backend,
            "device": self.options.device,
            "capacity": self.options.capacity,
        }

    def _close(self) -> None:
        try:
            self._send_control(P.Bye(worker=self.id))
        except zmq.ZMQError:
            pass
        if self.control is not None:
            self.control.close(linger=0)

    def _loop(self) -> int:
        """The I/O loop: messages in, reports and heartbeats out. Tasks run on a thread of their own so
        heartbeats keep flowing however long a batch takes (a first batch may open a big dataset)."""
        interval = self.options.heartbeat_interval
        self._wake_read, self._wake_write = os.pipe()
        self.tasks: queue.Queue = queue.Queue()
        self.reports: queue.Queue = queue.Queue()
        runner = threading.Thread(target=self._task_thread, name="augserve-worker-tasks", daemon=True)
        runner.start()
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(timeout=int(interval * 1000)))
                if self._wake_read in events:
                    os.read(self._wake_read, 4096)
                while True:
                    try:
                        report = self.reports.get_nowait()
                    except queue.Empty:
                        break
                    self._send_control(report)
                if self.control in events:
                    self.last_heard = time.monotonic()
                    try:
                        message = P.decode(self.control.recv_multipart(copy=False), P.DAEMON_TO_WORKER)
                    except P.ProtocolError as exc:
                        log.error("ignoring a bad message from the daemon: %s", exc)
                        continue
                    if message.type == "stop":
                        log.info("worker %s: stop requested", self.id)
                        return 0
                    if message.type == "error":
                        log.error("worker %s: the daemon refused a message: %s", self.id, message.body.message)
                    elif message.type in ("task", "drop"):
                        self.tasks.put(message.body)  # in order: a drop follows the tasks sent before it
                now = time.monotonic()
                if now - self.last_sent >= interval:
                    self._send_control(P.Heartbeat(**self.hello))
                if self.options.exit_with_parent and os.getppid() != self.parent:
                    log.warning("worker %s: daemon process is gone; exiting", self.id)
                    return 0
                if now - self.last_heard > interval * self.options.heartbeat_liveness:
                    if self.options.exit_with_parent:
                        log.warning("worker %s: daemon silent for %.1f s; exiting", self.id, now - self.last_heard)
                        return 0
                    log.warning("worker %s: daemon silent; reconnecting to %s", self.id, self.options.connect)
                    poller.unregister(self.control)
                    self._open_control()
                    poller.register(self.control, zmq.POLLIN)
        finally:
            self.tasks.put(None)
            runner.join(timeout=5)
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _task_thread(self) -> None:
        """Runs tasks one after another; owns the PUSH sockets to trainers."""
        while True:
            body = self.tasks.get()
            if body is None:
                break
            if isinstance(body, P.Drop):
                self._drop(body.data)
                continue
            self.reports.put(self._run_task(body))
            os.write(self._wake_write, b"r")
        self.outputs.clear()  # closes every socket (on_evict)
        self.handoff.close()

    def _send_control(self, body: P.Body) -> None:
        self.control.send_multipart(P.encode(body), flags=zmq.NOBLOCK)
        self.last_sent = time.monotonic()

    # --- tasks ---------------------------------------------------------------------------------------

    def _source(self, dataset: P.DatasetRef):
        key = (dataset.ref, dataset.split, tuple(sorted(dataset.options.items())))
        return self.sources.get_or_create(key, lambda: open_dataset(dataset.ref, split=dataset.split, **dataset.options))

    def _pipeline(self, pipeline: P.PipelineRef):
        import pipelines

        # Keyed by the spec itself, not the stream: a trainer's held-out stream attaches anew every epoch
        # with the same spec, and other streams often share one.
        def build():
            # Workers ship uint8; the trainer's client applies `normalize` on its own device.
            spec = pipelines.PipelineSpec.model_validate(pipeline.spec).without_normalize()
            return pipelines.build(spec, backend=self.options.backend, device=self.options.device)

        return self.pipelines.get_or_create(json.dumps(pipeline.spec, sort_keys=True), build)

    def _run_task(self, task: P.Task) -> P.Done | P.Failed:
        """Load, augment and send one batch; returns the report for the daemon."""
        started = time.perf_counter()
        stats = SkipStats()

        def failed(message: str, kind: str) -> P.Failed:
            return P.Failed(worker=self.id, task=task.task, stream=task.stream, message=message[:4000], kind=kind)

        # Where shared memory is allowed, the slot is taken once the pipeline knows the batch's size,
        # and the images are augmented straight into it; with none to be had they go to private memory.
        reservation = self.handoff.reserve(task, TRAILING_BYTES) if task.handoff is not None else None
        try:
            source = self._source(task.dataset)
            pipe = self._pipeline(task.pipeline)
            # Files are decoded between planning and augmenting (augserve.batch): the time spent
            # reading and decoding is reported as the load stage, the rest of the call as augment.
            destination = None if reservation is None else _as_tensor(reservation.images)
            out, kept_ids, labels, load_s = augment_batch(source, pipe, task.ids, task.seed, task.epoch, task.on_error, stats, out=destination)
            loaded = started + load_s
            if out is None:  # every image of the batch was corrupt: an empty batch still completes the plan
                out = np.zeros((0, 1, 1, 1), dtype=np.uint8)
            elif isinstance(out, list):
                raise ValueError("augmented images differ in size; add a crop or resize op to the pipeline so a batch can be stacked")
            augmented = time.perf_counter()
            labels_array = np.asarray(labels, dtype=np.int64)
            ids_array = np.asarray(kept_ids, dtype=np.int64)
            info = dict(
                stream=task.stream, task=task.task, epoch=task.epoch, index=task.index, pipeline_version=task.pipeline.version,
                skipped=[p[:4000] for p in stats.paths[:MAX_REPORTED_PATHS]], worker=self.id,
            )  # fmt: skip
            tensors = [("images", out), ("labels", labels_array), ("sample_ids", ids_array)]
            outgoing = self.handoff.pack(task, info, tensors, reservation)
            try:
                self._send_batch(task, outgoing.frames)
            except BaseException:
                self.handoff.cancel(outgoing)
                raise
            sent = time.perf_counter()
        except CorruptImageError as exc:
            return failed(str(exc), "corrupt")
        except TrainerUnreachable as exc:
            return failed(str(exc), "unreachable")
        except Exception as exc:  # a bad batch must not kill the worker; the daemon retries it elsewhere
            log.exception("task %s failed", task.task)
            return failed(f"{type(exc).__name__}: {exc}", "error")
        finally:
            if reservation is not None:
                reservation.cancel()  # a slot the batch never reached is free again (no-op once packed)
        return P.Done(
            worker=self.id, task=task.task, stream=task.stream, epoch=task.epoch, index=task.index, samples=len(kept_ids),
            skipped=stats.skipped, skipped_paths=[p[:4000] for p in stats.paths[:MAX_REPORTED_PATHS]],
            bytes=int(sum(array.nbytes for _, array in tensors)),
            times=P.StageTimes(load=loaded - started, augment=augmented - loaded, send=sent - augmented),
            via=outgoing.via, fallback=outgoing.fallback,
        )  # fmt: skip

    def _send_batch(self, task: P.Task, frames: list) -> None:
        key = (task.data, task.data_key)
        sock = self.outputs.get(key)
        if sock is None:
            sock = self.context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 64)
            if self.keyring is not None and not task.data.startswith("ipc://"):  # ipc: a private file of one user
                if task.data_key is None:
                    raise ValueError("the trainer sent no data key, and this worker only talks to authenticated trainers")
                security.secure_client(sock, self.keyring.worker, task.data_key.encode())
            sock.connect(task.data)
            self.outputs.put(key, sock)
        if not sock.poll(timeout=int(SEND_TIMEOUT_S * 1000), flags=zmq.POLLOUT):
            raise TrainerUnreachable(f"trainer at {task.data} did not take a batch within {SEND_TIMEOUT_S:.0f} s")
        sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)

    def _drop(self, address: str) -> None:
        for key in [k for k in self.outputs.keys() if k[0] == address]:
            sock = self.outputs.pop(key)
            if sock is not None:
                sock.close(linger=0)
        self.handoff.drop(address)


def _as_tensor(images_into):
    """The pipeline's ``out=`` callable over ``images_into(shape)``: a numpy array (host memory) as a
    tensor over the same memory, a tensor (a device slot) as it is."""
    import torch  # loaded already: the pipelines run on it

    def destination(shape):
        images = images_into(shape)
        return images if isinstance(images, torch.Tensor) else torch.from_numpy(images)

    return destination


class TrainerUnreachable(ConnectionError):
    """The trainer's data socket did not take a batch in time."""


def run_worker(options: WorkerOptions) -> int:
    return Worker(options).run()
