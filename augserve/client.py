"""The trainer side: ``connect(...)`` attaches to a daemon and returns an iterable :class:`Stream`.

``connect`` opens the sockets and attaches (the one blocking exchange); the :class:`Stream` it returns
runs a background I/O thread that owns both sockets — the control DEALER (credits, acks, receipts,
heartbeats) and the data PULL socket that workers push batches into — so the training loop never
stalls the protocol. The thread wraps each arriving frame as a tensor without copying, checks it
belongs to this stream's plan, and hands it to a pure :class:`~augserve.reorder.Reorderer`, which drops
duplicates (a re-issued batch may arrive twice) and decides when each batch may go to the training loop.
A batch is acknowledged when the training loop takes it; the ack returns its credit to the daemon.

With keys (the default) both sockets are CurveZMQ-authenticated: the control socket presents this
user's client key, and the data socket admits only the worker keys the daemon vouches for.

A worker on the trainer's host may hand a batch over through shared memory instead (``transport``,
:mod:`augserve.handoff`): the data socket then carries a descriptor, and the batch's tensors are views
of the worker's slot. The slot goes back to the worker when the last of those views is gone — in a
plain loop, when the loop takes the next batch; :meth:`Batch.clone` keeps a copy for longer. With
``transport="cuda-ipc"`` a worker on the trainer's own GPU hands over a slot of its device memory the
same way: ``batch.images`` is then a view of that slot on the GPU, and nothing crosses the PCIe bus.
"""

from __future__ import annotations

import logging
import os
import queue
import socket as host_socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np
import torch
import zmq
from pydantic import ValidationError

from pipelines.backends.base import check_device
from pipelines.normalize import normalize_images

from . import protocol as P
from . import security
from .closing import Closing
from .config import check_address
from .control import Credentials, close_monitor, control_socket, exchange
from .epochs import BatchIds, EpochPlan
from .handoff.host import default_dir, host_identity
from .handoff.receiver import SlotReader
from .reorder import Reorderer

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

    ``images, labels = batch`` unpacks it as a ``(images, labels)`` pair, the shape a training step
    written for a ``DataLoader`` expects; ``len(batch)`` stays the number of samples.

    A batch that came through shared memory (uint8 on the CPU, no ``normalize``) views its worker's
    slot, which returns to the worker when the last reference to these tensors (or a view of them) is
    gone. Keeping a batch is safe — its bytes stay as they are — but holds a slot: the worker then
    sends frames once all of its slots are held. :meth:`clone` copies a batch out of its slot.

    A batch that came through CUDA IPC (``transport="cuda-ipc"``, no ``normalize``) has ``images`` on
    the stream's GPU, a view of the worker's device slot; it is ready on the default stream (the
    stream batches are made ready on for every transport). Its slot returns to the worker when the
    last view is gone *and* the work queued by then on the current stream of the thread that let go
    has finished: kernels reading it on another stream must be ordered before that (or the batch
    cloned). ``labels`` and ``sample_ids`` stay on the host, as for frames.
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

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.images, self.labels))

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "Batch":
        """This batch with ``images``, ``labels`` and ``sample_ids`` on ``device`` (a new Batch; Lightning
        and Accelerate call it to place a batch)."""
        images, labels, ids = (t.to(device, non_blocking=non_blocking) for t in (self.images, self.labels, self.sample_ids))
        return replace(self, images=images, labels=labels, sample_ids=ids)

    def clone(self) -> "Batch":
        """A copy that owns its memory (a shared-memory slot is free again once this batch is dropped)."""
        return replace(self, images=self.images.clone(), labels=self.labels.clone(), sample_ids=self.sample_ids.clone(), skipped=list(self.skipped))

    def pin_memory(self) -> "Batch":
        """This batch in pinned host memory (what ``DataLoader(pin_memory=True)`` calls)."""
        return replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory(), sample_ids=self.sample_ids.pin_memory())


def _data_address(daemon: str) -> str:
    """Where this trainer receives batches: same transport as the daemon, any free port/path."""
    if daemon.startswith("ipc://"):
        return f"ipc://{security.private_ipc_dir()}/data-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
    host = daemon[len("tcp://") :].rpartition(":")[0]
    if host in ("127.0.0.1", "localhost", "[::1]", "::1"):
        return "tcp://127.0.0.1:*"
    return "tcp://0.0.0.0:*"


def _advertised(endpoint: str) -> str:
    if endpoint.startswith("tcp://0.0.0.0:"):
        return f"tcp://{host_socket.gethostbyname(host_socket.gethostname())}:{endpoint.rsplit(':', 1)[1]}"
    return endpoint


class _Link:
    """The sockets of one stream: control DEALER to the daemon, data PULL for batches, and the data
    socket's gatekeeper. Owned by :func:`connect` until the stream's I/O thread takes them over."""

    def __init__(self, address: str, credentials: Credentials, data_address: str | None, prefetch: int) -> None:
        self.address = address
        self.credentials = credentials
        self.context = zmq.Context()
        self.gatekeeper: security.Gatekeeper | None = None
        self.control = self.monitor = None
        self.data = self.context.socket(zmq.PULL)
        try:
            self.data.setsockopt(zmq.LINGER, 0)
            self.data.setsockopt(zmq.RCVHWM, max(4, 2 * prefetch))
            self.data_key: str | None = None
            keyring = credentials.keyring
            data_address = data_address or _data_address(address)
            # Over TCP, workers are admitted by key: this user's own, then those the daemon vouches for.
            # An ipc:// socket is a 0600 file in this user's 0700 directory: only this user's processes
            # reach it, so batches skip the encryption (which costs most of the bandwidth, see README).
            if keyring is not None and not data_address.startswith("ipc://"):
                self.gatekeeper = security.Gatekeeper(self.context, {"worker": keyring.allowed("worker")}).start()
                security.secure_server(self.data, keyring.client)
                self.data_key = keyring.client.public.decode()
            self.data.bind(data_address)
            self.data_endpoint = self.data.getsockopt_string(zmq.LAST_ENDPOINT)
            if self.data_endpoint.startswith("ipc://"):
                os.chmod(self.data_endpoint[len("ipc://") :], 0o600)
            self.control, self.monitor = control_socket(self.context, address, credentials)
        except BaseException:
            self.close()
            raise

    def attach(self, request: P.Attach, timeout: float) -> P.Attached:
        """The one blocking exchange: send ``attach``, wait for ``attached`` or a refusal."""
        reply = exchange(self.control, self.monitor, self.address, request, {"attached"}, timeout, self.credentials)
        close_monitor(self.control, self.monitor)
        self.monitor = None
        if reply.type == "error":
            raise ValueError(f"daemon refused the stream: {reply.body.message}")
        attached = reply.body
        if self.gatekeeper is not None and attached.worker_keys:
            self.gatekeeper.allow("worker", [k.encode() for k in attached.worker_keys])
        # A frame bigger than any batch this daemon allows is cut off by libzmq before it is buffered.
        self.data.setsockopt(zmq.MAXMSGSIZE, attached.max_batch_bytes + (1 << 20))
        return attached

    def close(self, detach_linger_ms: int = 0) -> None:
        endpoint = getattr(self, "data_endpoint", None)
        if self.control is not None:
            close_monitor(self.control, self.monitor)
            self.control.close(linger=detach_linger_ms)
        self.data.close(linger=0)
        if self.gatekeeper is not None:
            self.gatekeeper.stop()
        self.context.term()
        if endpoint and endpoint.startswith("ipc://"):
            try:
                os.unlink(endpoint[len("ipc://") :])
            except OSError:
                pass


class Stream(Closing, torch.utils.data.IterableDataset):
    """Batches from a daemon. Made by :func:`connect`; iterate it (or hand it to
    ``DataLoader(stream, batch_size=None)``)."""

    def __init__(self, link: _Link, request: P.Attach, attached: P.Attached, device: torch.device, pin_memory: bool,
                 batch_timeout: float, heartbeat_interval: float, shm_dir: str = "/dev/shm") -> None:  # fmt: skip
        super().__init__()
        self._link = link
        self.address = link.address
        self.device = device
        self.pin_memory = pin_memory
        self.batch_timeout = batch_timeout
        self.heartbeat_interval = heartbeat_interval
        self._request = request
        self.id = attached.stream
        self.batches_per_epoch = attached.batches_per_epoch
        self.samples_per_epoch = attached.samples_per_epoch
        self.dataset_info = attached.dataset.model_dump()
        self.classes = list(attached.dataset.classes)
        self.pipeline_version = attached.pipeline_version
        self.spec = attached.spec
        self.fingerprint = attached.fingerprint
        self.epochs = request.epochs
        self._epoch = self._epoch_at_start = attached.start_epoch
        self._consumed_at_start = frozenset(attached.skip)
        self._consumed: set[int] = set(self._consumed_at_start)  # written by the consumer
        self._remaining = max(0, (self.epochs - self._epoch) * self.batches_per_epoch - len(self._consumed))
        plan = EpochPlan(attached.num_samples, request.batch_size, request.seed, request.rank, request.world_size, request.shuffle, request.drop_last)
        self._expected_ids = BatchIds(plan)  # what each batch may carry
        from pipelines import PipelineSpec

        self._normalize_by_version = {self.pipeline_version: PipelineSpec.model_validate(self.spec).normalize}
        self.version_starts = {self.pipeline_version: (self._epoch, 0)}
        self.duplicates_dropped = 0
        self.rejected_batches = 0
        self.transport = request.transport
        self._slots = SlotReader(shm_dir) if request.shm_host is not None else None
        self._device_slots = _device_reader(shm_dir, request.cuda, device) if request.cuda is not None else None
        # Batches received each way (duplicates included); "cuda-ipc" only for a stream that asked for it.
        self.batches_by_transport = {"shm": 0, "frames": 0, **({"cuda-ipc": 0} if self._device_slots is not None else {})}
        self._fallbacks_said: set[tuple[str, str]] = set()  # (how, fallback kind) already logged
        self._queue: queue.Queue = queue.Queue()
        self._acks: list[tuple[int, int, int]] = []
        self._acks_lock = threading.Lock()
        self._waited = (0, 0.0)  # (batches taken, seconds the loop waited for them) since the last credit
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._closed = False
        self._requests: queue.Queue = queue.Queue()  # (request id, payload, reply queue) for the I/O thread
        self._pending: dict[str, queue.Queue] = {}
        self._thread = threading.Thread(target=self._io_loop, name=f"augserve-stream-{self.id}", daemon=True)
        self._thread.start()

    # --- the I/O thread --------------------------------------------------------------------------------

    def _io_loop(self) -> None:
        link = self._link
        poller = zmq.Poller()
        poller.register(link.control, zmq.POLLIN)
        poller.register(link.data, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        reorder: Reorderer[Batch] = Reorderer(
            self.batches_per_epoch, self.epochs, self._epoch_at_start, self._consumed_at_start, self._request.ordered, max_held=self._request.prefetch
        )
        receipts: list[tuple[int, int]] = []
        last_sent = 0.0
        last_batch = time.monotonic()
        try:
            while not self._stop.is_set() and not reorder.done:
                events = dict(poller.poll(timeout=int(self.heartbeat_interval * 500)))
                now = time.monotonic()
                if self._wake_read in events:
                    self._drain_wakeups()
                    self._send_requests()
                if link.control in events:
                    self._drain_control()
                if link.data in events:
                    for _ in range(64):
                        try:
                            frames = link.data.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        batch = self._unpack(frames)
                        if batch is None:
                            continue
                        if reorder.seen(batch.epoch, batch.index):
                            self.duplicates_dropped += 1  # a copy of a re-issued task
                            continue
                        try:
                            released = reorder.offer(batch.epoch, batch.index, batch)
                        except ValueError as exc:
                            self.rejected_batches += 1
                            log.warning("dropping a batch: %s", exc)
                            continue
                        receipts.append((batch.epoch, batch.index))
                        last_batch = now
                        for item in released:
                            self._queue.put(item)
                with self._acks_lock:
                    acks, self._acks = self._acks, []
                if acks or receipts or now - last_sent >= self.heartbeat_interval:
                    credit = P.Credit(stream=self.id, acks=acks, received=receipts, wait=self._take_wait())
                    link.control.send_multipart(P.encode(credit), flags=zmq.NOBLOCK)
                    receipts, last_sent = [], now
                if now - last_batch > self.batch_timeout and self._queue.qsize() == 0:
                    gate = reorder.gate_epoch
                    waiting = reorder.missing(gate)[:8] if gate < self.epochs else []
                    raise TimeoutError(f"no batch from the daemon at {self.address} for {self.batch_timeout:g} s (epoch {gate} is waiting for batches {waiting})")
        except BaseException as exc:  # surfaced in the consumer's thread
            self._error = exc if not isinstance(exc, P.ProtocolError) else StreamError(str(exc))
        finally:
            self._queue.put(_END)

    def _drain_wakeups(self) -> None:
        try:
            os.read(self._wake_read, 4096)
        except BlockingIOError:
            pass

    def _send_requests(self) -> None:
        while True:
            try:
                request_id, payload, reply = self._requests.get_nowait()
            except queue.Empty:
                return
            self._pending[request_id] = reply
            self._link.control.send_multipart(P.encode(P.Update(stream=self.id, request=request_id, **payload)), flags=zmq.NOBLOCK)

    def _drain_control(self) -> None:
        while True:
            try:
                frames = self._link.control.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_control(P.decode(frames, P.DAEMON_TO_CLIENT))

    def _on_control(self, message: P.Message) -> None:
        body = message.body
        request = getattr(body, "request", None)
        waiting = self._pending.pop(request, None) if request else None
        if message.type == "updated":
            from pipelines import PipelineSpec

            self._normalize_by_version[body.version] = PipelineSpec.model_validate(body.spec).normalize
            self.version_starts[body.version] = (body.from_epoch, body.from_index)
            if waiting is not None:
                waiting.put(body)
        elif message.type == "error" and waiting is not None:
            waiting.put(ValueError(body.message))  # a refused update leaves the stream running
        elif message.type in ("stream_error", "error"):
            raise StreamError(f"stream {self.id}: {body.message}")

    def _unpack(self, frames) -> Batch | None:
        """The batch in ``frames``, or ``None`` (logged) when it is malformed or not of this stream's plan."""
        try:
            message = P.decode(frames, P.WORKER_TO_CLIENT)
            header = message.body
            if header.stream != self.id:
                return None  # a late batch of an earlier stream on a reused address
            if message.type == "shm_batch":
                if self._slots is None:
                    raise P.ProtocolError("a shared-memory batch arrived, but this stream asked for frames")
                tensors = self._slots.wrap(header)
                # Only the images stay in the slot: the ids are checked against the plan below, and a
                # copy cannot change after that check (the worker can still write to its slot).
                tensors["labels"], tensors["sample_ids"] = tensors["labels"].clone(), tensors["sample_ids"].clone()
                if header.fallback is not None:
                    self._say_fallback(header, "come through host shared memory, not CUDA IPC")
            elif message.type == "cuda_batch":
                if self._device_slots is None:
                    raise P.ProtocolError("a CUDA IPC batch arrived, but this stream did not ask for one")
                tensors = self._device_slots.wrap(header, message.buffers)  # labels and ids: frames on the host
            else:
                tensors = P.frames_to_tensors(header.tensors, message.buffers)
                if header.fallback is not None:
                    self._say_fallback(header)
            images, labels, ids = tensors["images"], tensors["labels"], tensors["sample_ids"]
            if not header.index < self.batches_per_epoch:
                raise P.ProtocolError(f"batch index {header.index} outside [0, {self.batches_per_epoch})")
            if labels.shape != ids.shape or labels.ndim != 1 or images.shape[0] != ids.shape[0]:
                raise P.ProtocolError(f"images {list(images.shape)}, labels {list(labels.shape)} and sample ids {list(ids.shape)} disagree")
            # Corrupt files may be left out, but a batch never carries a sample its plan does not name.
            if not np.isin(ids.numpy(), self._expected_ids(header.epoch, header.index)).all():
                raise P.ProtocolError(f"batch {header.index} of epoch {header.epoch} carries sample ids outside its plan")
        except (P.ProtocolError, KeyError) as exc:
            self.rejected_batches += 1
            log.warning("dropping a malformed batch: %s", exc)
            return None
        self.batches_by_transport[_VIA[message.type]] += 1
        if self.pin_memory and images.numel() and not images.is_cuda and torch.cuda.is_available():
            images = images.pin_memory()  # the one copy: frame -> pinned host memory
        if self.device.type == "cuda":
            images = images.to(self.device, non_blocking=True)
        version = header.pipeline_version
        if version not in self._normalize_by_version:
            self._link.control.poll(timeout=1000)  # the daemon announced the version before issuing it
            self._drain_control()
        normalize = self._normalize_by_version.get(version, self._normalize_by_version[max(self._normalize_by_version)])
        if normalize is not None and images.numel():
            # Here, on the I/O thread, so it overlaps the training step (torch releases the GIL).
            images = normalize_images(images, normalize)
        return Batch(images, labels, ids, header.epoch, header.index, version, list(header.skipped))

    def _say_fallback(self, header: P.BatchHeader | P.ShmBatch, how: str = "come as frames, not through shared memory") -> None:
        """Log once per way and reason why batches come a slower way than the stream allows: a warning
        when the trainer asked for ``shm`` or ``cuda-ipc``, or when /dev/shm is too small or unusable."""
        fallback = header.fallback
        if self._slots is None or (how, fallback.kind) in self._fallbacks_said:
            return
        self._fallbacks_said.add((how, fallback.kind))
        quiet = self.transport == "auto" and fallback.kind in ("other_host", "busy")
        log.log(logging.INFO if quiet else logging.WARNING, "stream %s: batches from worker %s %s: %s", self.id, header.worker, how, fallback.message)

    # --- the consumer side -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        while True:
            asked = time.monotonic()
            item = self._queue.get()
            if item is not _END:
                self._count_wait(time.monotonic() - asked)
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

    def _count_wait(self, seconds: float) -> None:
        """The training loop waited ``seconds`` for a batch: its data stall, reported in the next credit."""
        with self._acks_lock:
            batches, waited = self._waited
            self._waited = (batches + 1, waited + seconds)

    def _take_wait(self) -> P.Wait | None:
        with self._acks_lock:
            (batches, seconds), self._waited = self._waited, (0, 0.0)
        if batches == 0:
            return None
        return P.Wait(batches=min(batches, P.MAX_LISTED), seconds=min(max(seconds, 0.0), 1e6))

    def _hand_over(self, batch: Batch) -> Batch:
        with self._acks_lock:
            self._acks.append((batch.epoch, batch.index, len(batch)))
        self._wake()
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
        self._wake()
        try:
            result = reply.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the daemon did not answer the update within {timeout:g} s") from None
        if isinstance(result, BaseException):
            raise result
        return {"version": result.version, "from_epoch": result.from_epoch, "from_index": result.from_index, "spec": result.spec}

    def state_dict(self) -> dict:
        """Where this stream stands — put it in the trainer's checkpoint; ``connect(..., resume=state)``
        continues exactly there. Position counts batches handed to the training loop."""
        epoch, consumed = self._epoch, set(self._consumed)
        if len(consumed) >= self.batches_per_epoch:
            epoch, consumed = epoch + 1, set()
        request = self._request.model_dump(exclude={"data", "data_key", "resume", "shm_host", "cuda"})
        return {"epoch": epoch, "delivered": sorted(consumed), "fingerprint": self.fingerprint, "stream": request}

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

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"w")
        except (BlockingIOError, OSError):
            pass  # the I/O thread is awake already (pipe full) or gone

    def close(self) -> None:
        """Detach and release sockets. Safe to call twice; also runs at garbage collection."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            with self._acks_lock:
                acks, self._acks = self._acks, []
            control = self._link.control
            control.send_multipart(P.encode(P.Credit(stream=self.id, acks=acks)), flags=zmq.NOBLOCK)
            control.send_multipart(P.encode(P.Detach(stream=self.id)), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        os.close(self._wake_read)
        os.close(self._wake_write)
        self._link.close(detach_linger_ms=200)  # give the detach a moment to leave
        if self._slots is not None:
            self._slots.close()
        if self._device_slots is not None:
            self._device_slots.close()


_VIA = {"batch": "frames", "shm_batch": "shm", "cuda_batch": "cuda-ipc"}  # message type -> how the batch came


def _device_reader(shm_dir: str, gpu: P.CudaDevice, device: torch.device):
    """The reader of a ``cuda-ipc`` stream's device slots (torch's CUDA calls, on the stream's device)."""
    from .handoff.cuda import CudaOpener
    from .handoff.device_receiver import DeviceSlotReader

    return DeviceSlotReader(shm_dir, gpu.uuid, CudaOpener(device))


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


def connect(
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
    keys_dir: str | None = None,
    insecure: bool = False,
    transport: str = "auto",
) -> Stream:
    """Attach to the daemon at ``address`` and return the stream of batches (see :class:`Stream`).

    ``resume``: a :meth:`Stream.state_dict` of the same run; the daemon refuses one saved by a run with
    another dataset, split, pipeline, seed, batch size or world size, naming the difference.
    ``keys_dir``: the keyring (default ``$AUGSERVE_KEYS_DIR`` or ``~/.config/augserve/keys``, created
    on first use); ``insecure=True`` talks to a daemon started with ``--insecure``.
    ``transport``: how batches from workers on this host arrive — ``"auto"`` through shared memory where
    a worker can (same host, same ``/dev/shm`` or ``$AUGSERVE_SHM_DIR``, room in it), else as frames;
    ``"frames"`` always over ZeroMQ; ``"shm"`` as ``auto``, with a warning for each reason a batch still
    came as frames; ``"cuda-ipc"`` (``device`` a GPU) as ``shm``, and workers on the stream's very GPU
    keep each batch in their device memory and hand it over through CUDA IPC: ``batch.images`` is a
    view of it on the GPU. Workers on other GPUs of this host use host shared memory and say why in
    this log; workers on other hosts always send frames (pinned on arrival for a GPU stream).
    ``cuda-ipc`` is opt-in: ``auto`` never picks it (it has not been measured against the host path
    on enough machines to be chosen for the user).
    """
    check_address(address, "daemon address")
    if timeout <= 0 or batch_timeout <= 0:
        raise ValueError("timeout and batch_timeout must be > 0 seconds")
    device = torch.device(device)
    check_device(str(device))
    if transport not in ("auto", "frames", "shm", "cuda-ipc"):
        raise ValueError(f"transport must be 'auto', 'frames', 'shm' or 'cuda-ipc', got {transport!r}")
    shm_dir, shm_host, cuda = default_dir(), None, None
    if transport == "cuda-ipc":
        from .handoff.cuda import trainer_gpu

        cuda = trainer_gpu(transport, device)
    if transport != "frames":
        shm_host, why_not = host_identity(shm_dir)
        if shm_host is None:
            if transport in ("shm", "cuda-ipc"):  # a device slot's state word lives in host shared memory too
                raise ValueError(f"transport={transport!r} needs shared memory: {why_not}")
            log.info("batches come as frames: %s", why_not)
    fields = {
        "dataset": dataset, "split": split, "dataset_options": dict(dataset_options or {}), "pipeline": _pipeline_payload(pipeline),
        "batch_size": batch_size, "seed": seed, "epochs": epochs, "rank": rank, "world_size": world_size, "prefetch": prefetch,
        "ordered": ordered, "shuffle": shuffle, "drop_last": drop_last, "on_error": on_error, "resume": _resume_state(resume),
        "client": f"{host_socket.gethostname()}:{os.getpid()}"[:256], "transport": transport, "shm_host": shm_host, "cuda": cuda,
    }  # fmt: skip
    link = _Link(address, Credentials.load(keys_dir, insecure), data_address, prefetch if isinstance(prefetch, int) else 8)
    try:
        try:
            request = P.Attach(**fields, data=_advertised(link.data_endpoint), data_key=link.data_key)
        except ValidationError as exc:
            raise ValueError(f"invalid stream request: {P.describe_validation_error(exc)}") from None
        attached = link.attach(request, timeout)
        if cuda is not None:
            log.info("stream %s: transport cuda-ipc: batches from workers on this trainer's GPU %s (%s) stay in device memory; "
                     "the other workers of this host use host shared memory, workers elsewhere frames", attached.stream, cuda.uuid, device)  # fmt: skip
        return Stream(link, request, attached, device, pin_memory or device.type == "cuda", batch_timeout, heartbeat_interval, shm_dir)
    except BaseException:
        link.close()
        raise


def _resume_state(resume: dict | None) -> dict | None:
    """A :meth:`Stream.state_dict` reduced to what the daemon checks (position and fingerprint)."""
    if resume is None:
        return None
    if not isinstance(resume, dict) or "epoch" not in resume:
        raise ValueError("resume must be a stream's state_dict(): {'epoch': int, 'delivered': [...], 'fingerprint': {...}}")
    return {"epoch": resume["epoch"], "delivered": list(resume.get("delivered", [])), "fingerprint": resume.get("fingerprint")}
