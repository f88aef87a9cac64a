"""``augserve bench transport``: how fast one batch moves from a worker to a trainer, per transport.

Each transport is a real sender process (a worker's side: a PUSH socket, ``copy=False`` frames) and a
PULL socket in this process (a trainer's side: :func:`protocol.decode`, then
:func:`protocol.frames_to_tensors`, zero-copy). A batch is what ``augserve/worker.py`` sends: a
:class:`protocol.BatchHeader` and three frames — images ``N×S×S×3`` uint8 (NHWC), labels and sample ids
(``N`` int64 each).

* ``tcp``        loopback TCP, no security;
* ``tcp+curve``  loopback TCP with CurveZMQ as augserve uses it by default: the receiver is a CURVE server
  with the *client* key and a :class:`security.Gatekeeper` admitting the *worker* key, the sender a
  CURVE client with the worker key (keys in a temporary directory; the user's keys are never touched);
* ``ipc``        a Unix socket in :func:`security.private_ipc_dir`, what augserve uses for batches when
  the daemon listens on ipc:// (no encryption: the socket file is private to the user);
* ``shm``        the shared-memory hand-off of a worker on the trainer's host (:mod:`augserve.handoff`):
  the sender writes the batch into a slot of its pool (the one copy) and sends a ``shm_batch``
  descriptor over loopback TCP with CurveZMQ, as ``tcp+curve``; the receiver maps the slot (once),
  checks the descriptor and wraps the tensors as views of the slot, which it releases by dropping them.
  The pool holds :data:`SHM_SLOTS` slots, all made, written and handed over once before the rounds
  (:meth:`Channel.fill`), as a worker's pool is once it has run a while; a sender that finds them all
  held waits, as credits would make a worker wait. Slots live in ``$AUGSERVE_SHM_DIR`` or ``/dev/shm``;
* ``cuda-ipc``   (only where CUDA is available) the device-memory hand-off of a GPU worker to a trainer
  on the same GPU (:mod:`augserve.handoff.device`): the batch's images are on ``cuda:0`` already, the
  sender copies them into a device slot of its pool (one device-to-device copy), records and waits for
  the slot's fill event and sends a ``cuda_batch`` descriptor with the labels and ids as frames, over
  loopback TCP with CurveZMQ as ``shm``; the receiver opens each slot once, makes its stream wait for
  the event and views the images on the GPU, and releases the slot by dropping them (the release waits
  for the GPU work queued before it). The images never cross the PCIe bus: it is the figure to hold
  against ``shm`` and ``tcp``, whose batches a GPU worker would first have to copy to the host;
* ``memcpy``     the baseline: the same number of bytes copied into a preallocated numpy buffer.

Those rows time the hand-off of a batch made beforehand. A worker makes each batch first, though, and
where the batch's bytes are written then decides how many times they are written. Four more rows run
the same **producing step** for every batch, in the sender process — the albumentations backend
cropping N source images of (S+32)² pixels to S² and mirroring half of them, fused: parameters sampled
per batch as a worker does, then one slice copy or one ``cv2.flip`` per image, single-threaded as in a
worker — and time it together with what follows it:

* ``produce``      the second baseline: the producing step alone, into a fresh tensor (as a pipeline
  returns it), nothing sent;
* ``tcp-made``     made into a fresh tensor, then sent as frames as ``tcp``: a worker's frame path;
* ``shm-copied``   made into a fresh tensor, then copied into a slot (``write_batch``) and handed over
  as ``shm``: what a worker did before ``out=``, every byte written twice;
* ``shm-in-place`` a slot taken first, the batch made straight into it (the pipeline's ``out=``), then
  handed over as ``shm``: what a worker does now, every byte written once.

``shm-in-place`` × ``produce`` is what the hand-off costs on top of making the batch (1.0: nothing),
× ``tcp-made`` what it gains over frames when both make their batches. Its × tcp and × memcpy compare
a row that also makes its batch with rows that do not, so they understate it.

All of them run in interleaved rounds (:func:`timing.interleaved`) and medians are reported; on a shared
machine the ratios (× tcp, × memcpy) are what holds. GB/s counts the batch's payload bytes (all three
frames; 1 GB = 10⁹ bytes). Every wait is bounded: a sender that dies or stays silent for ``timeout_s``
ends the run with one ConnectionError or TimeoutError line.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import platform
import secrets
import statistics
import tempfile
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import zmq

from .. import protocol as P
from .. import security
from ..handoff.host import default_dir, host_identity
from ..handoff.sender import batch_layout, into_slot, write_batch
from ..handoff.shm import Segment
from ..handoff.slots import NoSlot, SlotPool
from .timing import interleaved

TRANSPORTS = ("tcp", "tcp+curve", "ipc", "shm", "tcp-made", "shm-copied", "shm-in-place")
PRODUCE = "produce"  # the producing step alone: the baseline of the rows that make their batches
PRODUCING = (PRODUCE, "tcp-made", "shm-copied", "shm-in-place")  # senders that make every batch before its hand-off
SENDERS = (*TRANSPORTS[:4], PRODUCE, *TRANSPORTS[4:])  # one process each, in the table's order
CUDA_IPC = "cuda-ipc"  # one more sender where CUDA is available (see senders())
DEVICE = "cuda:0"  # where the cuda-ipc sender's batches are, and its receiver
SOURCE_MARGIN = 32  # source images are this many pixels larger than the crops made of them
SHM_SLOTS = 8  # as a worker's pool at a trainer's prefetch of 6 (credits + 2)
BASELINE = "memcpy"
MAX_BATCH_BYTES = 10**9  # every batch lives several times over: in each sender, in the receive queue, in memcpy's two buffers
SNDHWM = 64  # as a worker's data socket
RCVHWM = 16  # as a trainer's data socket at its default prefetch of 8
WARMUP_BATCHES = 2  # per candidate before the timed rounds: connects, handshakes, first-touch page faults
START_TIMEOUT_S = 60.0  # a sender imports numpy, pyzmq and pydantic; a loaded 2-core machine is slow at it
STOP_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 3600.0
SLICE_S = 0.2  # how often a waiting receiver checks that its sender is still alive
SLOT_WAIT_S = 0.0002  # how long a shm sender sleeps between looks for a released slot
CURVE = ("tcp+curve", "shm", "shm-copied", "shm-in-place", CUDA_IPC)  # transports whose socket is CURVE-secured
SLOTS = ("shm", "shm-copied", "shm-in-place")  # transports that hand over slots


@dataclass(frozen=True)
class TransportBenchConfig:
    """``batch_images``: batch sizes N (images per batch); ``size``: image side S in pixels; ``batches``
    per candidate and round; ``timeout_s``: the longest wait for any one batch or reply."""

    batch_images: tuple[int, ...] = (64, 256)
    size: int = 224
    rounds: int = 3
    batches: int = 60  # per round: shorter rounds measure the cache-cold start after the other candidates more than the stream
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.batch_images:
            raise ValueError("--batch-images needs at least one batch size")
        for name in ("size", "rounds", "batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for count in self.batch_images:
            if count < 1:
                raise ValueError(f"--batch-images must be >= 1, got {count}")
            if payload_bytes(count, self.size) > MAX_BATCH_BYTES:
                raise ValueError(f"--batch-images {count} with --size {self.size} makes a {payload_bytes(count, self.size) / 1e9:.1f} GB batch; at most {MAX_BATCH_BYTES / 1e9:.0f} GB")
        if len(set(self.batch_images)) != len(self.batch_images):
            raise ValueError(f"--batch-images lists a size twice: {' '.join(map(str, self.batch_images))}")
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"--timeout must be > 0 seconds and at most {MAX_TIMEOUT_S:g}, got {self.timeout_s}")


def senders() -> tuple[str, ...]:
    """The sender processes of a run: :data:`SENDERS`, and ``cuda-ipc`` where this process sees a GPU."""
    import torch  # the receiver's business: the bench process wraps tensors anyway

    return (*SENDERS, CUDA_IPC) if torch.cuda.is_available() else SENDERS


def payload_bytes(images: int, size: int) -> int:
    """Bytes of one batch's frames: N×S×S×3 uint8 images, N int64 labels, N int64 sample ids."""
    return images * size * size * 3 + 2 * 8 * images


def _batch(images: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images NHWC uint8, labels int64, sample ids int64); random pixels, so nothing compresses."""
    rng = np.random.default_rng(images)
    return rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8), np.arange(images, dtype=np.int64) % 10, np.arange(images, dtype=np.int64)


# --- the sender (a worker's side), in its own process ---------------------------------------------


class Producer:
    """The producing step of the rows that make their batches (see the module docstring): ``make(N,
    index, out)`` returns batch ``index`` of ``N`` images — uint8 N×S×S×3, made into ``out`` when given."""

    def __init__(self, batch_images: tuple[int, ...], size: int) -> None:
        import cv2
        import torch

        import pipelines

        cv2.setNumThreads(0)  # as in a worker: one thread, parallelism comes from processes
        torch.set_num_threads(1)
        self.pipe = pipelines.build({"ops": [{"op": "random_crop", "size": size}, {"op": "mirror", "horizontal": 0.5}]})
        rng = np.random.default_rng(size)
        side = size + SOURCE_MARGIN
        self.sources = {count: rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8) for count in batch_images}

    def make(self, count: int, index: int, out=None):
        # The batch index as the epoch: every batch crops at new places, as in training.
        return self.pipe(self.sources[count], seed=0, epoch=index % 1_000_000, sample_ids=range(count), out=out)


def _waiting_for_a_slot(pool: SlotPool, timeout_s: float):
    """``slot_for`` of :func:`write_batch` that waits (bounded) while the receiver holds every slot."""

    def acquire(nbytes: int):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return pool.acquire(nbytes)
            except NoSlot as exc:
                if exc.kind != "busy":
                    raise ValueError(str(exc)) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the receiver released no slot within {timeout_s:g} s") from None
                time.sleep(SLOT_WAIT_S)

    return acquire


def _sender_main(conn, transport: str, endpoint: str, keys_dir: str | None, batch_images: tuple[int, ...], size: int, timeout_s: float,
                 shm_dir: str | None = None) -> None:  # fmt: skip
    """Connect a PUSH socket to ``endpoint``, then obey ``conn``: ``("send", N, count, first_index,
    fill)`` sends ``count`` batches of ``N`` images and answers ``("sent", count)`` — with ``fill``, one
    batch in each slot of the pool, every slot made first at the largest batch's size (see
    :meth:`Channel.fill`); ``("stop",)`` ends. A failure is reported as ``("error", text)``; a vanished
    parent ends the process."""
    parent = os.getppid()
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    pool = SlotPool(partial(Segment.create, shm_dir), SHM_SLOTS) if transport in SLOTS else None
    device_batches = gpu = None
    try:
        if transport == CUDA_IPC:
            import torch

            from ..handoff.cuda import gpu_uuid
            from ..handoff.device import create_device_slot

            pool, gpu = SlotPool(partial(create_device_slot, shm_dir, DEVICE, 0), SHM_SLOTS), gpu_uuid(DEVICE)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, SNDHWM)
        if transport in CURVE:
            keyring = security.Keyring.load(keys_dir, create=False)
            security.secure_client(sock, keyring.worker, keyring.client.public)
        sock.connect(endpoint)
        batches = {count: _batch(count, size) for count in batch_images}
        largest = max(batch_layout([count * size * size * 3, 8 * count, 8 * count])[1] for count in batch_images)
        if transport == CUDA_IPC:  # made on the GPU beforehand, as a GPU worker's pipeline leaves them
            device_batches = {count: torch.from_numpy(batch[0]).to(DEVICE) for count, batch in batches.items()}
        producer = Producer(batch_images, size) if transport in PRODUCING else None
        conn.send(("ready", os.getpid()))
        while True:
            while not conn.poll(1.0):
                if os.getppid() != parent:
                    return
            command = conn.recv()
            if command[0] == "stop":
                return
            _, count, batches_to_send, first_index, fill = command
            images, labels, ids = batches[count]
            filling = [pool.acquire(largest) for _ in range(batches_to_send)] if fill else None
            for index in range(first_index, first_index + batches_to_send):
                if transport == PRODUCE:
                    producer.make(count, index)
                    continue
                info = dict(stream="bench", task=f"bench-{index}", epoch=0, index=index, pipeline_version=1, worker="bench-sender")
                slot_for = _waiting_for_a_slot(pool, timeout_s) if pool is not None else None
                if filling:
                    slot_for = lambda nbytes: filling.pop(0)  # noqa: E731 - the next slot made for the fill
                if transport in ("tcp-made", "shm-copied"):
                    images = producer.make(count, index)
                elif transport == "shm-in-place":
                    slot_for, images = _made_in_slot(producer, pool, slot_for, count, index, size)
                tensors = [("images", images), ("labels", labels), ("sample_ids", ids)]
                if transport == CUDA_IPC:
                    frames = _into_device_slot(pool, slot_for, info, gpu, device_batches[count], tensors[1:])
                elif pool is not None:
                    slot, generation, descriptors = write_batch(pool, tensors, slot_for)
                    frames = P.encode(P.ShmBatch(**info, segment=slot.memory.name, generation=generation, tensors=descriptors, retired=pool.take_retired()))
                else:
                    header = P.BatchHeader(**info, tensors=[P.describe(name, array) for name, array in tensors])
                    frames = P.encode(header, [P.tensor_buffer(array) for _, array in tensors])
                if not sock.poll(timeout=int(timeout_s * 1000), flags=zmq.POLLOUT):
                    raise TimeoutError(f"the receiver did not take a batch within {timeout_s:g} s")
                sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
            conn.send(("sent", batches_to_send))
    except (EOFError, BrokenPipeError):
        return  # the parent is gone; nobody to report to
    except Exception as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    finally:
        sock.close(linger=0)
        context.term()
        if pool is not None:
            pool.close()  # unlinks the names the receiver has not mapped


def _into_device_slot(pool: SlotPool, slot_for, info: dict, gpu: str, images, others: list) -> list:
    """The cuda-ipc row's hand-off: ``images`` (on the GPU) copied into a device slot, lent, described."""
    from ..handoff.device import cuda_batch_frames

    slot = slot_for(int(images.nbytes))
    try:
        slot.memory.write(0, images)
        pool.lend(slot)
        return cuda_batch_frames(info, pool, slot, gpu, images, others)
    except BaseException:
        pool.give_back(slot)
        raise


def _made_in_slot(producer: Producer, pool: SlotPool, slot_for, count: int, index: int, size: int):
    """Take a slot for batch ``index`` (images, then labels and ids: 8 bytes each per image), make the
    images straight into its start, and return ``(slot_for of write_batch, the images)``."""
    import torch  # loaded by the producer already

    shape = (count, size, size, 3)
    nbytes = count * size * size * 3
    slot = slot_for(batch_layout([nbytes, 8 * count, 8 * count])[1])
    try:
        images = producer.make(count, index, out=torch.from_numpy(slot.memory.view(0, nbytes).reshape(shape)))
    except BaseException:
        pool.give_back(slot)  # never lent: FREE again
        raise
    return into_slot(slot), images


# --- the receiver (a trainer's side) --------------------------------------------------------------


class Channel:
    """One transport under test: a PULL socket bound here and the sender process that pushes into it.

    :meth:`move` asks for batches and receives them; every wait in it is bounded by the config's
    ``timeout_s``, and a sender that died or reported an error becomes a ConnectionError."""

    def __init__(self, transport: str, config: TransportBenchConfig, keys_dir: str | os.PathLike | None = None) -> None:
        if transport not in (*SENDERS, CUDA_IPC):
            raise ValueError(f"unknown transport {transport!r}; transports are {', '.join((*SENDERS, CUDA_IPC))}")
        if transport in CURVE and keys_dir is None:
            raise ValueError(f"{transport} needs a keys directory")
        self.shm_dir = self.reader = None
        if transport == CUDA_IPC:
            self.shm_dir, self.reader = default_dir(), _device_reader()
        elif transport in SLOTS:
            self.shm_dir = default_dir()
            if host_identity(self.shm_dir)[0] is None:
                raise ValueError(f"shm cannot be measured here: {host_identity(self.shm_dir)[1]}")
            from ..handoff.receiver import SlotReader  # torch: the receiver's business, not the senders' it spawns

            self.reader = SlotReader(self.shm_dir)
        self.transport = transport
        self.config = config
        self.process = None
        self.conn = None
        self.gatekeeper: security.Gatekeeper | None = None
        self.ipc_path: str | None = None
        self._next_index = 0
        self._early_reply: tuple | None = None
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.PULL)
        try:
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.setsockopt(zmq.RCVHWM, RCVHWM)
            self.sock.setsockopt(zmq.MAXMSGSIZE, max(payload_bytes(n, config.size) for n in config.batch_images) + (1 << 20))
            if transport in CURVE:
                keyring = security.Keyring.load(keys_dir, create=False)
                self.gatekeeper = security.Gatekeeper(self.context, {"worker": [keyring.worker.public]}).start()
                security.secure_server(self.sock, keyring.client)
            if transport == "ipc":
                self.ipc_path = str(security.private_ipc_dir() / f"bench-transport-{os.getpid()}-{secrets.token_hex(4)}")
                self.sock.bind(f"ipc://{self.ipc_path}")
                os.chmod(self.ipc_path, 0o600)
            else:
                self.sock.bind("tcp://127.0.0.1:*")
            endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
            # spawn, not fork: this process may hold zmq contexts and torch threads a fork would copy
            spawn = multiprocessing.get_context("spawn")
            self.conn, child = spawn.Pipe()
            args = (child, transport, endpoint, None if keys_dir is None else str(keys_dir), tuple(config.batch_images), config.size, config.timeout_s, self.shm_dir)
            self.process = spawn.Process(target=_sender_main, args=args, name=f"augserve-bench-{transport}", daemon=True)
            self.process.start()
            child.close()
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        reply = self._reply(time.monotonic() + timeout_s, f"start within {timeout_s:g} s")
        if reply[0] != "ready":
            raise ConnectionError(f"the {self.transport} sender answered {reply[0]!r} instead of 'ready'")

    def move(self, images: int, count: int, fill: bool = False) -> None:
        """Have the sender push ``count`` batches of ``images`` images; receive, decode and wrap each
        (``produce``: have it make them; nothing is sent). ``fill``: see :meth:`fill`."""
        shape = (images, self.config.size, self.config.size, 3)
        first = self._next_index
        self._next_index += count
        try:
            self.conn.send(("send", images, count, first, fill))
        except OSError:  # BrokenPipeError: the sender is gone
            raise self._died() from None
        for index in range(first, first + count if self.transport != PRODUCE else first):
            self._receive_one(index, shape)
        reply = self._reply(time.monotonic() + self.config.timeout_s, f"confirm its batches within {self.config.timeout_s:g} s")
        if reply != ("sent", count):
            raise ConnectionError(f"the {self.transport} sender answered {reply!r} instead of ('sent', {count})")

    def fill(self) -> None:
        """Make the sender's whole pool now (a no-op for transports without one): it makes every slot at
        the largest batch's size and sends one batch in each, so each slot is written once and mapped
        here — the state of a worker's pool once it has run a while. Made during the timed rounds, a
        slot costs its allocation, zeroing and page faults (~10 ms for 38.5 MB) inside a round of tens
        of milliseconds: the ``shm`` row was slow and erratic whenever the receiver happened to hold a
        third slot. Each slot is handed over, so the receiver unlinks its name as for any batch and a
        SIGKILLed sender leaves none behind."""
        if self.transport in (*SLOTS, CUDA_IPC):
            self.move(max(self.config.batch_images), SHM_SLOTS, fill=True)

    def _receive_one(self, index: int, shape: tuple[int, ...]) -> None:
        deadline = time.monotonic() + self.config.timeout_s
        while True:
            if self.sock.poll(timeout=int(SLICE_S * 1000), flags=zmq.POLLIN):
                try:
                    frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    break
                except zmq.Again:  # seen on a fresh connection: POLLIN with no whole message to take yet
                    pass
            self._check_sender()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no batch over {self.transport} within {self.config.timeout_s:g} s (the sender, pid {self.pid}, is alive but sent nothing)")
        message = P.decode(frames, P.WORKER_TO_CLIENT)
        if message.type == "shm_batch":
            tensors = self.reader.wrap(message.body)  # released when `tensors` goes, at the end of this call
        elif message.type == "cuda_batch":
            tensors = self.reader.wrap(message.body, message.buffers)  # likewise, once the GPU is past it
        else:
            tensors = P.frames_to_tensors(message.body.tensors, message.buffers)
        if message.body.index != index or tuple(tensors["images"].shape) != shape:
            raise ValueError(f"{self.transport}: expected batch {index} of shape {shape}, got batch {message.body.index} of {tuple(tensors['images'].shape)}")

    def _check_sender(self) -> None:
        """Raise ConnectionError when the sender reported an error or is dead. Its ``sent`` reply may
        come before the last batches do (they are queued, not yet delivered): that one is kept."""
        if self._early_reply is None and self.conn.poll(0):
            self._early_reply = self._read_reply()
        if not self.process.is_alive():
            raise self._died()

    def _reply(self, deadline: float, what: str) -> tuple:
        if self._early_reply is not None:
            reply, self._early_reply = self._early_reply, None
            return reply
        while not self.conn.poll(SLICE_S):
            if not self.process.is_alive():
                raise self._died()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {self.transport} sender (pid {self.pid}) did not {what}")
        return self._read_reply()

    def _read_reply(self) -> tuple:
        try:
            reply = self.conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if reply[0] == "error":
            raise ConnectionError(f"the {self.transport} sender failed: {reply[1]}")
        return reply

    def _died(self) -> ConnectionError:
        self.process.join(1.0)
        code = self.process.exitcode
        how = "is unreachable" if code is None else f"died (signal {-code})" if code < 0 else f"exited with status {code}"
        return ConnectionError(f"the {self.transport} sender (pid {self.pid}) {how}; no more batches can arrive")

    def close(self) -> None:
        if self.process is not None:
            if self.process.is_alive():
                with contextlib.suppress(OSError):
                    self.conn.send(("stop",))
                self.process.join(STOP_TIMEOUT_S)
            for end in (self.process.terminate, self.process.kill):
                if not self.process.is_alive():
                    break
                end()
                self.process.join(STOP_TIMEOUT_S)
        if self.conn is not None:
            self.conn.close()
        self.sock.close(linger=0)
        if self.gatekeeper is not None:
            self.gatekeeper.stop()
        self.context.term()
        if self.ipc_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ipc_path)
        if self.reader is not None:
            self.reader.close()


def _device_reader():
    """The cuda-ipc row's receiver: device slots opened on :data:`DEVICE` (ValueError when impossible)."""
    import torch

    from ..handoff.cuda import CudaOpener, gpu_uuid, unusable
    from ..handoff.device_receiver import DeviceSlotReader

    why = unusable(DEVICE) or (None if host_identity(default_dir())[0] is not None else host_identity(default_dir())[1])
    if why is not None:
        raise ValueError(f"cuda-ipc cannot be measured here: {why}")
    return DeviceSlotReader(default_dir(), gpu_uuid(DEVICE), CudaOpener(torch.device(DEVICE)))


# --- the benchmark --------------------------------------------------------------------------------


def curve_library() -> str:
    """What backs libzmq's CURVE in this process: libsodium when it is loaded as a shared library (read
    from /proc/self/maps, so Linux only), else a note saying what else it may be."""
    if not zmq.has("curve"):
        return "none: this libzmq was built without CURVE"
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as handle:
            libraries = {line.split()[-1] for line in handle if "/" in line}
    except OSError:
        return "unknown (no /proc/self/maps)"
    sodium = sorted(os.path.basename(path) for path in libraries if "libsodium" in os.path.basename(path))
    if sodium:
        return f"libsodium ({sodium[0]})"
    return "not a shared libsodium (libzmq's built-in TweetNaCl, or libsodium linked in statically)"


def conditions() -> dict:
    from .plots import cpu_name

    return {
        "cores": os.cpu_count(),
        "cpu": cpu_name(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "curve": curve_library(),
    }


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


def run_transport_bench(config: TransportBenchConfig, progress=None) -> dict:
    """Measure every transport and the memcpy baseline at every batch size; returns rows and summary."""
    say = progress or (lambda text: None)
    started = conditions()
    with tempfile.TemporaryDirectory(prefix="augserve-bench-keys-") as keys_dir, contextlib.ExitStack() as stack:
        if not zmq.has("curve"):
            raise ValueError(f"libzmq {zmq.zmq_version()} was built without CURVE, so tcp+curve cannot be measured")
        security.Keyring.load(keys_dir)  # a throwaway keyring: the user's own keys stay untouched
        names = senders()
        say(f"starting {len(names)} sender processes ({', '.join(names)})")
        channels = {name: stack.enter_context(contextlib.closing(Channel(name, config, keys_dir))) for name in names}
        for channel in channels.values():
            channel.wait_ready()
            channel.fill()
        candidates, buffers = {}, {}
        for images in config.batch_images:
            nbytes = payload_bytes(images, config.size)
            source = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
            target = np.empty_like(source)

            def copy(round_index: int, source=source, target=target, images=images) -> int:
                count = config.batches if round_index >= 0 else WARMUP_BATCHES
                for _ in range(count):
                    np.copyto(target, source)
                return count * images

            buffers[images] = (source, target)
            candidates[(BASELINE, images)] = copy
            for name, channel in channels.items():

                def move(round_index: int, channel=channel, images=images) -> int:
                    count = config.batches if round_index >= 0 else WARMUP_BATCHES
                    channel.move(images, count)
                    return count * images

                candidates[(name, images)] = move
        say(f"measuring: {config.rounds} interleaved rounds of {config.batches} batches per transport and batch size")
        timed = interleaved(candidates, config.rounds)
    return _result(config, timed, started)


ROWS = (BASELINE, *SENDERS, CUDA_IPC)  # the table's order; cuda-ipc only in a run that measured it


def _result(config: TransportBenchConfig, timed: dict, started: dict) -> dict:
    rows, by_batch = [], []
    measured = [name for name in ROWS if (name, config.batch_images[0]) in timed]
    for images in config.batch_images:
        nbytes = payload_bytes(images, config.size)
        rate = {name: timed[(name, images)]["images_per_s"] * nbytes / images / 1e9 for name in measured}
        for name in measured:
            runs = timed[(name, images)]["runs"]
            rows.append({
                "benchmark": "transport",
                "transport": name,
                "batch_images": images,
                "image_size": config.size,
                "batch_bytes": nbytes,
                "batch_mb": _sig(nbytes / 1e6),
                "gb_per_s": _sig(rate[name]),
                "batches_per_s": _sig(timed[(name, images)]["images_per_s"] / images),
                "vs_tcp": _sig(rate[name] / rate["tcp"]),
                "vs_memcpy": _sig(rate[name] / rate[BASELINE]),
                "vs_produce": _sig(rate[name] / rate[PRODUCE]) if name in PRODUCING else None,  # rows that make their batches only
                "makes_batches": name in PRODUCING,
                "runs_gb_per_s": [_sig(r * nbytes / images / 1e9) for r in runs],
            })  # fmt: skip
        by_batch.append({
            "batch_images": images,
            "batch_mb": _sig(nbytes / 1e6),
            "gb_per_s": {name: _sig(rate[name]) for name in measured},
            "curve_vs_tcp": _sig(rate["tcp+curve"] / rate["tcp"]),
            "ipc_vs_tcp": _sig(rate["ipc"] / rate["tcp"]),
            "shm_vs_tcp": _sig(rate["shm"] / rate["tcp"]),
            "shm_vs_memcpy": _sig(rate["shm"] / rate[BASELINE]),
            "in_place_vs_tcp": _sig(rate["shm-in-place"] / rate["tcp"]),
            "in_place_vs_memcpy": _sig(rate["shm-in-place"] / rate[BASELINE]),
            "in_place_vs_produce": _sig(rate["shm-in-place"] / rate[PRODUCE]),
            "in_place_vs_copied": _sig(rate["shm-in-place"] / rate["shm-copied"]),
            "in_place_vs_tcp_made": _sig(rate["shm-in-place"] / rate["tcp-made"]),
            "copied_vs_produce": _sig(rate["shm-copied"] / rate[PRODUCE]),
            **({"cuda_ipc_vs_tcp": _sig(rate[CUDA_IPC] / rate["tcp"]), "cuda_ipc_vs_shm": _sig(rate[CUDA_IPC] / rate["shm"]),
                "cuda_ipc_vs_memcpy": _sig(rate[CUDA_IPC] / rate[BASELINE])} if CUDA_IPC in rate else {}),
        })  # fmt: skip
    return {
        "benchmark": "transport",
        "batch_images": list(config.batch_images),
        "image_size": config.size,
        "rounds": config.rounds,
        "batches": config.batches,
        "rows": rows,
        "by_batch": by_batch,
        "curve_vs_tcp": _sig(statistics.median(b["curve_vs_tcp"] for b in by_batch)),
        "ipc_vs_tcp": _sig(statistics.median(b["ipc_vs_tcp"] for b in by_batch)),
        "shm_vs_tcp": _sig(statistics.median(b["shm_vs_tcp"] for b in by_batch)),
        "shm_vs_memcpy": _sig(statistics.median(b["shm_vs_memcpy"] for b in by_batch)),
        **{key: _sig(statistics.median(b[key] for b in by_batch)) for key in (*IN_PLACE_RATIOS, *CUDA_IPC_RATIOS) if key in by_batch[0]},
        "conditions": started,
    }


IN_PLACE_RATIOS = ("in_place_vs_tcp", "in_place_vs_memcpy", "in_place_vs_produce", "in_place_vs_copied", "in_place_vs_tcp_made", "copied_vs_produce")
CUDA_IPC_RATIOS = ("cuda_ipc_vs_tcp", "cuda_ipc_vs_shm", "cuda_ipc_vs_memcpy")  # in a run with a cuda-ipc row only


def _fmt(value: float) -> str:
    """Three significant digits without an exponent for what a table shows (0.0123, 9.63, 38.54, 1904)."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def json_rows(result: dict) -> list[dict]:
    """The rows ``--json`` prints before the summary: one per (transport, batch size)."""
    return list(result["rows"])


def format_table(result: dict) -> str:
    size = result["image_size"]
    lines = [
        f"transport benchmark — one batch (N×{size}×{size}×3 uint8 images + labels + ids) from a PUSH sender process to a PULL receiver "
        f"that decodes it and wraps it as tensors without copying; median of {result['rounds']} interleaved round(s) of {result['batches']} batches",
        f"memcpy, tcp, tcp+curve, ipc, shm: the hand-off of a batch made beforehand. produce, tcp-made, shm-copied, shm-in-place: each batch is "
        f"first made (random crop of {size + SOURCE_MARGIN}² sources to {size}² + mirror, albumentations backend, one thread) — produce: that "
        f"alone; tcp-made: made, then sent as frames over tcp; shm-copied: made, then copied into a slot; shm-in-place: made straight into "
        f"the slot — and the time includes making it",
        "",
        "| transport | batch | MB | GB/s | batches/s | × tcp | × memcpy | × produce |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        name = f"{row['transport']} (baseline)" if row["transport"] in (BASELINE, PRODUCE) else row["transport"]
        vs_produce = "—" if row["vs_produce"] is None else _fmt(row["vs_produce"])
        lines.append(
            f"| {name} | {row['batch_images']}×{size}×{size}×3 | {_fmt(row['batch_bytes'] / 1e6)} | {_fmt(row['gb_per_s'])} | {_fmt(row['batches_per_s'])} "
            f"| {_fmt(row['vs_tcp'])} | {_fmt(row['vs_memcpy'])} | {vs_produce} |"
        )
    per_batch = ", ".join(f"{_fmt(b['curve_vs_tcp'])}× at {_fmt(b['batch_mb'])} MB" for b in result["by_batch"])
    ipc = ", ".join(f"{_fmt(b['ipc_vs_tcp'])}× at {_fmt(b['batch_mb'])} MB" for b in result["by_batch"])
    shared = ", ".join(f"{_fmt(b['shm_vs_tcp'])}× tcp and {_fmt(b['shm_vs_memcpy'])}× memcpy at {_fmt(b['batch_mb'])} MB" for b in result["by_batch"])
    in_place = ", ".join(
        f"{_fmt(b['in_place_vs_produce'])}× produce, {_fmt(b['in_place_vs_copied'])}× shm-copied, {_fmt(b['in_place_vs_tcp_made'])}× tcp-made, "
        f"{_fmt(b['in_place_vs_tcp'])}× tcp, "
        f"{_fmt(b['in_place_vs_memcpy'])}× memcpy at {_fmt(b['batch_mb'])} MB"
        for b in result["by_batch"]
    )  # fmt: skip
    c = result["conditions"]
    load = "" if c["load_average"] is None else f", load average {c['load_average'][0]:.2f} at the start"
    lines += [
        "",
        f"tcp+curve / tcp: {per_batch} (median {_fmt(result['curve_vs_tcp'])}×)",
        f"ipc / tcp: {ipc} (median {_fmt(result['ipc_vs_tcp'])}×)",
        f"shm: {shared} (median {_fmt(result['shm_vs_tcp'])}× tcp, {_fmt(result['shm_vs_memcpy'])}× memcpy)",
        f"shm-in-place: {in_place} (median {_fmt(result['in_place_vs_produce'])}× produce, {_fmt(result['in_place_vs_copied'])}× shm-copied, "
        f"{_fmt(result['in_place_vs_tcp_made'])}× tcp-made)",
        f"conditions: {c['cores']} cores ({c['cpu']}){load}; Python {c['python']}, pyzmq {c['pyzmq']}, libzmq {c['libzmq']}; CURVE by {c['curve']}",
    ]
    if "cuda_ipc_vs_tcp" in result:
        device = ", ".join(
            f"{_fmt(b['cuda_ipc_vs_tcp'])}× tcp, {_fmt(b['cuda_ipc_vs_shm'])}× shm, {_fmt(b['cuda_ipc_vs_memcpy'])}× memcpy at {_fmt(b['batch_mb'])} MB"
            for b in result["by_batch"]
        )  # fmt: skip
        lines.insert(-1, f"cuda-ipc (images on {DEVICE}, handed over in device memory): {device} (median {_fmt(result['cuda_ipc_vs_tcp'])}× tcp, "
                         f"{_fmt(result['cuda_ipc_vs_shm'])}× shm)")  # fmt: skip
    return "\n".join(lines)
