"""The trainer side: ``connect(...)`` attaches to a daemon and returns an iterable :class:`Stream`.

A background I/O thread owns both sockets — the control DEALER (attach, credits/acks, heartbeats) and the
data PULL socket that workers push batches into — so the training loop never stalls the protocol. It
wraps each arriving frame as a tensor without copying, drops duplicates (a batch re-issued after a worker
died may arrive twice), restores plan order when ``ordered=True``, and hands batches over through a
queue bounded by the credit window. A batch is acknowledged when the training loop takes it; the ack
returns its credit to the daemon.
"""

from __future__ import annotations

import logging
import os
import queue
import socket as host_socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import zmq

from pipelines.normalize import normalize_images

from . import protocol as P
from .config import check_address

log = logging.getLogger("augserve.client")

_END = object()


class StreamError(RuntimeError):
    """The daemon ended this stream (a corrupt image with ``on_error="raise"``, a worker error, ...)."""


@dataclass
class Batch:
    """One augmented batch.

    ``images``: the pipeline's output — uint8 N×H×W×C, or the dtype/layout of its ``normalize`` op —
    on the stream's device. ``labels``, ``sample_ids``: int64 (N,). ``epoch``, ``index``: its place in
    the plan. ``pipeline_version``: the spec version that made it. ``skipped``: paths of corrupt files
    left out of it.
    """

    images: torch.Tensor
    labels: torch.Tensor
    sample_ids: torch.Tensor
    epoch: int
    index: int
    pipeline_version: int
    skipped: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _data_address(daemon: str) -> str:
    """Where this trainer receives batches: same transport as the daemon, any free port/path."""
    if daemon.startswith("ipc://"):
        return f"ipc://{tempfile.gettempdir()}/augserve-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
    host = daemon[len("tcp://") :].rpartition(":")[0]
    if host in ("127.0.0.1", "localhost", "[::1]", "::1"):
        return "tcp://127.0.0.1:*"
    return "tcp://0.0.0.0:*"


class Stream(torch.utils.data.IterableDataset):
    """Batches from a daemon. Iterate it (or hand it to ``DataLoader(stream, batch_size=None)``)."""

    def __init__(
        self,
        address: str,
        dataset: str,
        pipeline: Any,
        batch_size: int,
        seed: int = 0,
        epochs: int = 1,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 8,
        ordered: bool = False,
        shuffle: bool = True,
        drop_last: bool = False,
        split: str = "train",
        dataset_options: dict | None = None,
        resume: dict | None = None,
        device: str | torch.device = "cpu",
        pin_memory: bool = False,
        on_error: str = "skip",
        timeout: float = 10.0,
        batch_timeout: float = 120.0,
        heartbeat_interval: float = 1.0,
        data_address: str | None = None,
    ) -> None:
        super().__init__()
        check_address(address, "daemon address")
        if timeout <= 0 or batch_timeout <= 0:
            raise ValueError("timeout and batch_timeout must be > 0 seconds")
        self.address = address
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available")
        self.pin_memory = pin_memory or self.device.type == "cuda"
        self.timeout = timeout
        self.batch_timeout = batch_timeout
        self.heartbeat_interval = heartbeat_interval
        self._spec_payload = _pipeline_payload(pipeline)
        self._request = {
            "dataset": dataset,
            "split": split,
            "dataset_options": dict(dataset_options or {}),
            "pipeline": self._spec_payload,
            "batch_size": batch_size,
            "seed": seed,
            "epochs": epochs,
            "rank": rank,
            "world_size": world_size,
            "prefetch": prefetch,
            "ordered": ordered,
            "shuffle": shuffle,
            "drop_last": drop_last,
            "on_error": on_error,
            "resume": resume,
            "client": f"{host_socket.gethostname()}:{os.getpid()}",
        }
        self._context = zmq.Context()
        self._control = self._context.socket(zmq.DEALER)
        self._data = self._context.socket(zmq.PULL)
        for sock in (self._control, self._data):
            sock.setsockopt(zmq.LINGER, 0)
        self._data.setsockopt(zmq.RCVHWM, max(4, 2 * prefetch))
        self._closed = False
        self._thread: threading.Thread | None = None
        try:
            self._data.bind(data_address or _data_address(address))
            self._request["data"] = self._advertised(self._data.getsockopt_string(zmq.LAST_ENDPOINT))
            self._control.connect(address)
            self._attach()
        except BaseException:
            self._close_sockets()
            raise
        self._queue: queue.Queue = queue.Queue()
        self._acks: list[tuple[int, int, int]] = []
        self._acks_lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._requests: queue.Queue = queue.Queue()  # (request id, payload, reply queue) for the I/O thread
        self._pending: dict[str, queue.Queue] = {}
        self._thread = threading.Thread(target=self._io_loop, name=f"augserve-stream-{self.id}", daemon=True)
        self._thread.start()

    # --- attach ----------------------------------------------------------------------------------------

    @staticmethod
    def _advertised(endpoint: str) -> str:
        if endpoint.startswith("tcp://0.0.0.0:"):
            return f"tcp://{host_socket.gethostbyname(host_socket.gethostname())}:{endpoint.rsplit(':', 1)[1]}"
        return endpoint

    def _attach(self) -> None:
        self._control.send_multipart(P.encode("attach", self._request))
        if not self._control.poll(timeout=int(self.timeout * 1000)):
            raise ConnectionError(f"no augserve daemon answered at {self.address} within {self.timeout:g} s (is `augserve serve` running there?)")
        try:
            reply = P.decode(self._control.recv_multipart(), {"attached", "error"})
        except P.ProtocolError as exc:
            raise ConnectionError(f"the peer at {self.address} is not a compatible augserve daemon: {exc}") from None
        if reply.type == "error":
            raise ValueError(f"daemon refused the stream: {reply.get('message')}")
        self.id = reply.require("stream")[0]
        self.batches_per_epoch = int(reply.require("batches_per_epoch")[0])
        self.samples_per_epoch = int(reply.get("samples_per_epoch", 0))
        self.dataset_info = reply.get("dataset", {})
        self.classes = self.dataset_info.get("classes", [])
        self.pipeline_version = int(reply.get("pipeline_version", 1))
        self.spec = reply.get("spec", {})
        self.epochs = int(self._request["epochs"])
        self._epoch = self._epoch_at_start = int(reply.get("start_epoch", 0))
        self._consumed_at_start = frozenset(int(i) for i in reply.get("skip", []))  # read by the I/O thread
        self._consumed: set[int] = set(self._consumed_at_start)  # written by the consumer
        self._remaining = max(0, (self.epochs - self._epoch) * self.batches_per_epoch - len(self._consumed))
        from pipelines import PipelineSpec

        self._normalize_by_version = {self.pipeline_version: PipelineSpec.model_validate(self.spec).normalize}
        self.version_starts = {self.pipeline_version: (self._epoch, 0)}

    # --- the I/O thread --------------------------------------------------------------------------------

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._control, zmq.POLLIN)
        poller.register(self._data, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        ordered = self._request["ordered"]
        seen: set[tuple[int, int]] = set()  # (epoch, index) received: drops duplicates of re-issued tasks
        pending: dict[tuple[int, int], Batch] = {}  # ordered: batches waiting for their predecessors
        held: dict[int, list[Batch]] = {}  # unordered: batches of later epochs, until this epoch is complete
        next_key = self._next_ordered_key(self._epoch, -1)
        gate_epoch, delivered_in_gate = self._epoch_at_start, 0
        to_deliver = self._remaining
        delivered = 0
        last_sent = 0.0
        last_batch = time.monotonic()

        def expected(epoch: int) -> int:
            return self.batches_per_epoch - (len(self._consumed_at_start) if epoch == self._epoch_at_start else 0)

        try:
            while not self._stop.is_set() and delivered < to_deliver:
                events = dict(poller.poll(timeout=int(self.heartbeat_interval * 500)))
                now = time.monotonic()
                if self._wake_read in events:
                    os.read(self._wake_read, 4096)
                    self._send_requests()
                if self._control in events:
                    self._drain_control()
                if self._data in events:
                    for _ in range(64):
                        try:
                            frames = self._data.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        batch = self._unpack(frames)
                        if batch is None:
                            continue
                        key = (batch.epoch, batch.index)
                        if key in seen or (batch.epoch == self._epoch_at_start and batch.index in self._consumed_at_start):
                            continue  # a duplicate of a re-issued task
                        seen.add(key)
                        last_batch = now
                        if ordered:
                            pending[key] = batch
                            while next_key in pending:
                                self._queue.put(pending.pop(next_key))
                                delivered += 1
                                next_key = self._next_ordered_key(*next_key)
                            current = next_key[0]
                        else:
                            # Whole epochs in turn: a batch of epoch e+1 that overtook the last ones of
                            # epoch e waits (within the credit window), so a checkpoint's position always
                            # lies in one epoch and a resume loses nothing.
                            held.setdefault(batch.epoch, []).append(batch)
                            while held.get(gate_epoch):
                                self._queue.put(held[gate_epoch].pop())
                                delivered += 1
                                delivered_in_gate += 1
                                if delivered_in_gate >= expected(gate_epoch):
                                    held.pop(gate_epoch, None)
                                    gate_epoch, delivered_in_gate = gate_epoch + 1, 0
                            current = gate_epoch
                        if len(seen) > 4 * self.batches_per_epoch:  # forget epochs long finished
                            seen = {k for k in seen if k[0] >= current - 1}
                with self._acks_lock:
                    acks, self._acks = self._acks, []
                if acks or now - last_sent >= self.heartbeat_interval:
                    self._control.send_multipart(P.encode("credit", {"stream": self.id, "acks": acks}), flags=zmq.NOBLOCK)
                    last_sent = now
                if now - last_batch > self.batch_timeout and self._queue.qsize() == 0:
                    raise TimeoutError(f"no batch from the daemon at {self.address} for {self.batch_timeout:g} s")
        except BaseException as exc:  # surfaced in the consumer's thread
            self._error = exc if not isinstance(exc, P.ProtocolError) else StreamError(str(exc))
        finally:
            self._queue.put(_END)

    def _next_ordered_key(self, epoch: int, index: int) -> tuple[int, int]:
        index += 1
        while True:
            if index >= self.batches_per_epoch:
                epoch, index = epoch + 1, 0
            if epoch == self._epoch_at_start and index in self._consumed_at_start:
                index += 1
                continue
            return epoch, index

    def _send_requests(self) -> None:
        while True:
            try:
                request_id, payload, reply = self._requests.get_nowait()
            except queue.Empty:
                return
            self._pending[request_id] = reply
            self._control.send_multipart(P.encode("update", {"stream": self.id, "request": request_id, **payload}), flags=zmq.NOBLOCK)

    def _drain_control(self) -> None:
        while True:
            try:
                frames = self._control.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_control(P.decode(frames, P.DAEMON_TO_CLIENT))

    def _on_control(self, message: P.Message) -> None:
        waiting = self._pending.pop(message.get("request"), None) if message.get("request") else None
        if message.type == "updated":
            from pipelines import PipelineSpec

            version = int(message.require("version")[0])
            self._normalize_by_version[version] = PipelineSpec.model_validate(message.get("spec")).normalize
            self.version_starts[version] = (int(message.get("from_epoch")), int(message.get("from_index")))
            if waiting is not None:
                waiting.put(message.fields)
        elif message.type == "error" and waiting is not None:
            waiting.put(ValueError(str(message.get("message"))))  # a refused update leaves the stream running
        elif message.type in ("stream_error", "error"):
            raise StreamError(f"stream {self.id}: {message.get('message')}")

    def _unpack(self, frames) -> Batch | None:
        try:
            message = P.decode(frames, P.WORKER_TO_CLIENT)
            if message.get("stream") != self.id:
                return None  # a late batch of an earlier stream on a reused address
            tensors = P.frames_to_tensors(message.require("tensors")[0], message.buffers)
        except P.ProtocolError as exc:
            log.warning("dropping a malformed batch: %s", exc)
            return None
        images = tensors["images"]
        if self.pin_memory and images.numel() and torch.cuda.is_available():
            images = images.pin_memory()  # the one copy: frame -> pinned host memory
        if self.device.type == "cuda":
            images = images.to(self.device, non_blocking=True)
        version = int(message.get("pipeline_version", 1))
        if version not in self._normalize_by_version:
            self._control.poll(timeout=1000)  # the daemon announced the version before issuing it
            self._drain_control()
        normalize = self._normalize_by_version.get(version, self._normalize_by_version[max(self._normalize_by_version)])
        if normalize is not None and images.numel():
            # Here, on the I/O thread, so it overlaps the training step (torch releases the GIL).
            images = normalize_images(images, normalize)
        return Batch(images, tensors["labels"], tensors["sample_ids"], int(message.get("epoch")), int(message.get("index")), version, list(message.get("skipped", [])))

    # --- the consumer side -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self._queue.get()
            if item is not _END and len(item) == 0:
                self._hand_over(item)  # every image of this batch was corrupt: count it, yield nothing
                continue
            if item is _END:
                self._queue.put(_END)  # later calls see the end too
                if self._error is not None:
                    error, self._error = self._error, None
                    self.close()
                    raise error
                self.close()
                return
            yield self._hand_over(item)

    def _hand_over(self, batch: Batch) -> Batch:
        with self._acks_lock:
            self._acks.append((batch.epoch, batch.index, len(batch)))
        os.write(self._wake_write, b"a")
        if batch.epoch != self._epoch:
            self._epoch, self._consumed = batch.epoch, set()
        self._consumed.add(batch.index)
        return batch

    def update_pipeline(self, spec_or_changes, timeout: float = 10.0) -> dict:
        """Re-tune this stream live. ``spec_or_changes``: a whole spec (preset name, PipelineSpec, dict with
        ``ops``, YAML text or file) or a mapping of changes by path (``{"rotate.degrees": 20}``).

        Validated by the daemon and applied from the next batch it has not yet issued; batches already in
        flight keep their version. Returns ``{"version", "from_epoch", "from_index", "spec"}``; every
        batch's ``pipeline_version`` says which spec made it. A refused change raises ValueError and
        leaves the stream as it was.
        """
        if self._closed or not self._thread.is_alive():
            raise StreamError(f"stream {self.id} has ended; nothing to re-tune")
        if isinstance(spec_or_changes, dict) and "ops" not in spec_or_changes:
            payload = {"changes": dict(spec_or_changes)}
        else:
            payload = {"spec": _pipeline_payload(spec_or_changes)}
        reply: queue.Queue = queue.Queue()
        self._requests.put((uuid.uuid4().hex, payload, reply))
        os.write(self._wake_write, b"u")
        try:
            result = reply.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the daemon did not answer the update within {timeout:g} s") from None
        if isinstance(result, BaseException):
            raise result
        return {k: result[k] for k in ("version", "from_epoch", "from_index", "spec")}

    def state_dict(self) -> dict:
        """Where this stream stands — put it in the trainer's checkpoint; ``connect(..., resume=state)``
        continues exactly there. Position counts batches handed to the training loop."""
        epoch, consumed = self._epoch, set(self._consumed)
        if len(consumed) >= self.batches_per_epoch:
            epoch, consumed = epoch + 1, set()
        return {"epoch": epoch, "delivered": sorted(consumed), "stream": dict(self._request, data=None, resume=None)}

    def __len__(self) -> int:
        return self._remaining

    @property
    def resumed_epoch(self) -> int:
        """The epoch this stream started in (not 0 after a resume)."""
        return self._epoch_at_start

    @property
    def resumed_batches(self) -> frozenset:
        """Batch indices of :attr:`resumed_epoch` consumed before a resume (skipped by this stream)."""
        return self._consumed_at_start

    # --- teardown --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Detach and release sockets. Safe to call twice; also runs at garbage collection."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._stop.set()
            os.write(self._wake_write, b"x")
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=5)
            try:
                with self._acks_lock:
                    acks = self._acks
                self._control.send_multipart(P.encode("credit", {"stream": self.id, "acks": acks}), flags=zmq.NOBLOCK)
                self._control.send_multipart(P.encode("detach", {"stream": self.id}), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            os.close(self._wake_read)
            os.close(self._wake_write)
        self._close_sockets()

    def _close_sockets(self) -> None:
        endpoint = None
        try:
            endpoint = self._data.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError:
            pass
        self._control.close(linger=200)  # give the detach a moment to leave
        self._data.close(linger=0)
        self._context.term()
        if endpoint and endpoint.startswith("ipc://"):
            try:
                os.unlink(endpoint[len("ipc://") :])
            except OSError:
                pass

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _pipeline_payload(pipeline: Any):
    """What travels in ``attach``: a preset name, or the spec as a dict. Files are read here, by the client."""
    import pipelines

    if isinstance(pipeline, pipelines.PipelineSpec):
        return pipeline.to_dict()
    if isinstance(pipeline, str) and pipeline in pipelines.list_presets():
        return pipeline
    if isinstance(pipeline, (str, os.PathLike, dict)):
        return pipelines.resolve(pipeline).to_dict()
    raise TypeError(f"pipeline must be a preset name, PipelineSpec, dict, YAML text or spec file, got {type(pipeline).__name__}")


def connect(address: str, dataset: str, pipeline: Any, batch_size: int, **options) -> Stream:
    """Attach to the daemon at ``address`` and return the stream of batches (see :class:`Stream`)."""
    return Stream(address, dataset, pipeline, batch_size, **options)
