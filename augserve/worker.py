"""An augmentation worker: takes tasks from a daemon, loads and augments a batch, and sends it straight
to the trainer that asked for it (no extra hop through the daemon).

A worker is a process of its own — started by the daemon, or by hand on another machine with
``augserve worker --connect tcp://HOST:PORT``. It speaks to the daemon over one DEALER socket
(``ready``, ``heartbeat``, ``done``, ``failed``) and to each trainer over a PUSH socket. OpenCV and torch
run single-threaded here unless told otherwise: parallelism comes from processes.
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
from .sources import CorruptImageError, SkipStats, iter_images, open_dataset

log = logging.getLogger("augserve.worker")

SEND_TIMEOUT_S = 30.0
PIPELINE_CACHE_SIZE = 8  # built pipelines kept per worker (a DALI pipeline takes a while to build)  # a trainer that cannot take a batch for this long is treated as gone


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
        self.options = options
        self.id = options.name or f"{host_socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.context = zmq.Context.instance()
        self.control: zmq.Socket | None = None
        self.outputs: dict[str, zmq.Socket] = {}  # data address -> PUSH socket
        self.sources: dict[tuple, object] = {}
        self.pipelines: dict[str, object] = {}  # spec JSON -> built pipeline, oldest first
        self.parent = os.getppid()
        self.last_sent = 0.0
        self.last_heard = time.monotonic()

    # --- lifecycle -----------------------------------------------------------------------------------

    def run(self) -> int:
        _limit_threads(self.options.threads)
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
        self.control.connect(self.options.connect)
        self._send_control("ready", self.hello)
        self.last_heard = time.monotonic()

    @property
    def hello(self) -> dict:
        """Who this worker is; sent with ``ready`` and every heartbeat, so a restarted daemon re-learns it."""
        return {
            "worker": self.id,
            "pid": os.getpid(),
            "host": host_socket.gethostname(),
            "backend": self.options.backend,
            "device": self.options.device,
            "capacity": self.options.capacity,
        }

    def _close(self) -> None:
        try:
            self._send_control("bye", {"worker": self.id})
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
                        message_type, fields = self.reports.get_nowait()
                    except queue.Empty:
                        break
                    self._send_control(message_type, fields)
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
                    if message.type in ("task", "drop"):
                        self.tasks.put(message)  # in order: a drop follows the tasks sent before it
                now = time.monotonic()
                if now - self.last_sent >= interval:
                    self._send_control("heartbeat", self.hello)
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
            message = self.tasks.get()
            if message is None:
                break
            if message.type == "drop":
                self._drop(message.get("data"))
                continue
            report = self._run_task(message)
            if report is not None:
                self.reports.put(report)
                os.write(self._wake_write, b"r")
        for sock in self.outputs.values():
            sock.close(linger=0)
        self.outputs.clear()

    def _send_control(self, message_type: str, fields: dict) -> None:
        self.control.send_multipart(P.encode(message_type, fields), flags=zmq.NOBLOCK)
        self.last_sent = time.monotonic()

    # --- tasks ---------------------------------------------------------------------------------------

    def _source(self, dataset: dict):
        key = (dataset["ref"], dataset.get("split", "train"), tuple(sorted(dataset.get("options", {}).items())))
        if key not in self.sources:
            self.sources[key] = open_dataset(dataset["ref"], split=key[1], **dataset.get("options", {}))
        return self.sources[key]

    def _pipeline(self, pipeline: dict):
        import pipelines

        # Keyed by the spec itself, not the stream: a trainer's held-out stream attaches anew every epoch
        # with the same spec, and other streams often share one. Least recently used first out.
        key = json.dumps(pipeline["spec"], sort_keys=True)
        built = self.pipelines.pop(key, None)
        if built is None:
            # Workers ship uint8; the trainer's client applies `normalize` on its own device.
            spec = pipelines.PipelineSpec.model_validate(pipeline["spec"]).without_normalize()
            built = pipelines.build(spec, backend=self.options.backend, device=self.options.device)
            while len(self.pipelines) >= PIPELINE_CACHE_SIZE:
                self.pipelines.pop(next(iter(self.pipelines)))
        self.pipelines[key] = built  # re-inserted: dicts keep insertion order, so this is the newest
        return built

    def _run_task(self, message: P.Message) -> tuple[str, dict] | None:
        """Load, augment and send one batch; returns the report for the daemon (``done``/``failed``)."""
        started = time.perf_counter()
        try:
            task, stream, epoch, index, ids, seed = message.require("task", "stream", "epoch", "index", "ids", "seed")
            dataset, pipeline, data = message.require("dataset", "pipeline", "data")
        except P.ProtocolError as exc:
            log.error("bad task: %s", exc)
            return None
        on_error = message.get("on_error", "skip")
        try:
            source = self._source(dataset)
            stats = SkipStats()
            kept_ids, images, labels = [], [], []
            for sample_id, image, label in iter_images(source, ids, on_error=on_error, stats=stats):
                kept_ids.append(sample_id)
                images.append(image)
                labels.append(label)
            loaded = time.perf_counter()
            if images:
                pipe = self._pipeline(pipeline)
                out = pipe(images, seed=seed, epoch=epoch, sample_ids=kept_ids)
                if isinstance(out, list):
                    raise ValueError("augmented images differ in size; add a crop or resize op to the pipeline so a batch can be stacked")
                out = out.cpu()
            else:  # every image of the batch was corrupt: an empty batch still completes the plan
                out = np.zeros((0, 1, 1, 1), dtype=np.uint8)
            augmented = time.perf_counter()
            labels_array = np.asarray(labels, dtype=np.int64)
            ids_array = np.asarray(kept_ids, dtype=np.int64)
            header = {
                "stream": stream,
                "task": task,
                "epoch": epoch,
                "index": index,
                "pipeline_version": pipeline["version"],
                "skipped": stats.paths,
                "worker": self.id,
                "tensors": [P.describe("images", out), P.describe("labels", labels_array), P.describe("sample_ids", ids_array)],
            }
            frames = P.encode("batch", header, [P.tensor_buffer(out), P.tensor_buffer(labels_array), P.tensor_buffer(ids_array)])
            self._send_batch(data, frames)
            sent = time.perf_counter()
        except CorruptImageError as exc:
            return "failed", {"worker": self.id, "task": task, "stream": stream, "message": str(exc), "kind": "corrupt"}
        except Exception as exc:  # a bad batch must not kill the worker; the daemon reports it to the stream
            log.exception("task %s failed", task)
            return "failed", {"worker": self.id, "task": task, "stream": stream, "message": f"{type(exc).__name__}: {exc}", "kind": "error"}
        return (
            "done",
            {
                "worker": self.id,
                "task": task,
                "stream": stream,
                "epoch": epoch,
                "index": index,
                "samples": len(kept_ids),
                "skipped": stats.skipped,
                "skipped_paths": stats.paths,
                "bytes": int(sum(memoryview(f).nbytes for f in frames[1:])),
                "times": {"load": loaded - started, "augment": augmented - loaded, "send": sent - augmented},
            },
        )

    def _send_batch(self, address: str, frames: list) -> None:
        sock = self.outputs.get(address)
        if sock is None:
            sock = self.context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 64)
            sock.connect(address)
            self.outputs[address] = sock
        if not sock.poll(timeout=int(SEND_TIMEOUT_S * 1000), flags=zmq.POLLOUT):
            raise ConnectionError(f"trainer at {address} did not take a batch within {SEND_TIMEOUT_S:.0f} s")
        sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)

    def _drop(self, address: str | None) -> None:
        sock = self.outputs.pop(address, None) if address else None
        if sock is not None:
            sock.close(linger=0)


def run_worker(options: WorkerOptions) -> int:
    return Worker(options).run()
