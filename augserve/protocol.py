"""The wire format — the one place where augserve messages are defined, encoded and decoded.

Every message is a ZeroMQ multipart message:

    frame 0   header: a msgpack map {"proto": "augserve", "v": PROTOCOL_VERSION, "type": <str>, ...fields}
    frame 1…  raw buffers (tensor bytes), sent with ``copy=False`` and described in the header

Never pickle: a header is plain data, a buffer is bytes. Each message type has one frozen pydantic
model below (:data:`MESSAGES`); :func:`decode` checks the envelope (protocol, version, size, nesting
depth, number of frames) and validates the fields into that model, so a handler only ever sees a typed,
bounded body: numbers finite and in range, strings and lists of capped length, no unknown fields.
Anything else is a :class:`ProtocolError` naming the problem — never another exception.

Tensors travel as ``{"name", "dtype", "shape"}`` descriptors in the header plus one frame each; the
receiver wraps each frame as a tensor without copying (:func:`frames_to_tensors`). A worker on the
trainer's host may instead write a batch into a shared-memory slot and send a ``shm_batch``: the same
fields, the slot's segment name and generation, and each tensor's byte offset in the slot — no frames
(:mod:`augserve.handoff`). Version 3 added it, with the trainer's ``transport`` and ``shm_host`` in
``attach`` and the daemon's ``handoff`` in ``task``. A worker on the trainer's own GPU may send a
``cuda_batch`` instead: the images stay in a slot of the worker's device memory, which the trainer opens
through CUDA IPC; the descriptor carries the IPC handles (hex on the wire) and the labels and sample ids
follow as frames. It came later in version 3 as additions only — the ``cuda-ipc`` transport, ``cuda`` in
``attach`` and ``handoff``, ``fallback`` in ``shm_batch`` —, so every message an earlier version-3 peer
sends still decodes, and a peer that never asks for ``cuda-ipc`` is never sent one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Sequence

import msgpack
import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError

PROTOCOL = "augserve"
PROTOCOL_VERSION = 3
MAX_HEADER_BYTES = 1 << 20  # 1 MiB: headers carry ids and settings, never pixel data
MAX_DEPTH = 24  # nesting of maps/lists in a header: a spec needs about 6; a hostile peer sends thousands
MAX_BUFFERS = 8  # raw frames after the header (a batch carries 3)

# dtypes allowed on the wire; "bfloat16" has no numpy dtype and is carried as raw 2-byte words.
WIRE_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bfloat16", "bool")


class ProtocolError(ValueError):
    """A message that is not a valid augserve message of this version."""


# --- bounded field types ------------------------------------------------------------------------------

Id = Annotated[str, Field(min_length=1, max_length=128)]
Name = Annotated[str, Field(max_length=256)]
Text = Annotated[str, Field(max_length=4096)]
Address = Annotated[str, Field(min_length=6, max_length=512)]
PublicKey = Annotated[str, Field(min_length=40, max_length=40, pattern=r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")]
Epoch = Annotated[int, Field(ge=0, le=1_000_000)]
Index = Annotated[int, Field(ge=0, lt=1 << 31)]
Count = Annotated[int, Field(ge=0, lt=1 << 40)]
Seed = Annotated[int, Field(ge=0, lt=1 << 63)]
Seconds = Annotated[float, Field(ge=0, le=1e6)]
Version = Annotated[int, Field(ge=1, lt=1 << 31)]
MAX_IDS = 1 << 20  # sample ids per task
MAX_LISTED = 1 << 18  # acks, receipts, delivered indices per message
Spec = dict[str, Any]  # validated as a PipelineSpec by whoever uses it; bounded here by size and depth
PipelineText = Annotated[str, Field(min_length=1, max_length=65_536)]


class Body(BaseModel):
    """Fields of one message type. Frozen, unknown fields refused, no NaN or infinity anywhere."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    type: ClassVar[str]


class Empty(Body):
    pass


# --- local hand-off (augserve.handoff) ----------------------------------------------------------------

# How batches reach a trainer: "frames" always over ZeroMQ; "shm" through shared memory for every worker
# that can (each one that cannot is a warning in the trainer's log); "auto" likewise, quietly; "cuda-ipc"
# as "shm", and in the worker's device memory from workers on the trainer's own GPU (opt-in).
Transport = Literal["auto", "frames", "shm", "cuda-ipc"]
Via = Literal["frames", "shm", "cuda-ipc"]  # how one batch went
# Why a batch went a slower way than its stream allows (see Fallback): frames where shared memory was
# allowed, or host shared memory where device memory was ("other_gpu", and the others for device slots).
FallbackKind = Literal["other_host", "no_space", "busy", "unavailable", "other_gpu"]
SEGMENT_PATTERN = r"^augserve-slot-[0-9]{1,20}-[0-9]{1,10}-[0-9a-f]{16}$"  # prefix-pid namespace-pid-random
SegmentName = Annotated[str, Field(min_length=1, max_length=80, pattern=SEGMENT_PATTERN)]


class ShmHost(Body):
    """Which shared memory a process sees: the kernel's boot id (one per machine and boot), the device
    and inode of its shared-memory directory (one per tmpfs mount, so two containers differ unless they
    share it), and its effective uid (a slot is private to its owner). Equal on both sides ⇔ a segment
    one creates there, the other can open."""

    boot: Annotated[str, Field(pattern=r"^[0-9a-f-]{32,36}$")]
    dev: Annotated[int, Field(ge=0, lt=1 << 64)]
    ino: Annotated[int, Field(ge=0, lt=1 << 64)]
    uid: Annotated[int, Field(ge=0, lt=1 << 32)]


GPU_UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


class CudaDevice(Body):
    """A GPU as every process on its host names it: its UUID (lower-case, without CUDA's ``GPU-``
    prefix). Device indices are no use here: ``CUDA_VISIBLE_DEVICES`` renumbers them per process."""

    uuid: Annotated[str, Field(pattern=GPU_UUID_PATTERN)]


class Handoff(Body):
    """What a task tells its worker about the trainer's shared memory: the mode (``auto``/``shm``),
    where the trainer is, and how many slots the worker's pool for this stream may hold (its credits,
    plus the batch the training loop holds and one in transition). ``cuda`` (optional): the trainer's
    GPU when it asked for ``cuda-ipc`` — a worker on that GPU keeps the batch in device memory."""

    mode: Literal["auto", "shm"]
    host: ShmHost
    slots: Annotated[int, Field(ge=1, le=1100)]
    cuda: CudaDevice | None = None


def _from_hex(value: Any) -> Any:
    """Bytes travel as lower-case hex text (the header is made in pydantic's JSON mode); raw msgpack
    bytes are taken as they are."""
    if isinstance(value, str):
        if len(value) % 2 or not re.fullmatch(r"[0-9a-f]*", value):
            raise ValueError("not an even number of lower-case hex digits")
        return bytes.fromhex(value)
    return value


def HexBytes(min_length: int, max_length: int):  # noqa: N802 - a type, spelled as one
    """Bytes of ``min_length``..``max_length`` (checked after decoding), hex text on the wire."""
    return Annotated[bytes, BeforeValidator(_from_hex), PlainSerializer(bytes.hex, return_type=str), Field(min_length=min_length, max_length=max_length)]


CUDA_IPC_HANDLE_BYTES = 64  # cudaIpcMemHandle_t and cudaIpcEventHandle_t
MAX_CUDA_MEMORY_HANDLE_BYTES = 1024  # torch's versioned handle: 2 bytes + a cudaIpcMemHandle_t (66), more for expandable segments
CUDA_REF_COUNTERS = 10_000  # counters in one torch reference-counter file (torch's CUDA_IPC_REF_COUNTER_FILE_SIZE)
REF_COUNTER_PATTERN = r"^/torch_[0-9]{1,10}_[0-9]{1,20}_[0-9]{1,20}$"  # torch's at::NewProcessWideShmHandle(): /torch_<pid>_<random>_<n>


class CudaMemory(Body):
    """A device slot as torch's CUDA IPC shares it (``UntypedStorage._share_cuda_``): the ``handle`` of
    the CUDA allocation that holds it, the slot's ``size`` and ``offset`` in bytes within that
    allocation, and the reference counter torch keeps for the share — a shared-memory file
    ``ref_counter`` (``/torch_<pid>_<n>_<n>``) and the int64 at ``ref_counter_offset`` in it, which the
    trainer decrements when it lets go of the slot for good, so the worker may free it."""

    handle: HexBytes(2, MAX_CUDA_MEMORY_HANDLE_BYTES)
    size: Annotated[int, Field(ge=1, lt=1 << 40)]
    offset: Annotated[int, Field(ge=0, lt=1 << 40)]
    ref_counter: Annotated[str, Field(max_length=64, pattern=REF_COUNTER_PATTERN)]
    ref_counter_offset: Annotated[int, Field(ge=0, lt=CUDA_REF_COUNTERS)]


# --- trainer -> daemon ------------------------------------------------------------------------------------


class ResumeState(Body):
    """Where a stream stood: batches of ``epoch`` already consumed, and the run that wrote it."""

    epoch: Epoch
    delivered: Annotated[list[Index], Field(max_length=MAX_LISTED)] = Field(default_factory=list)
    fingerprint: dict[str, Any] | None = None


class Attach(Body):
    type: ClassVar[str] = "attach"
    dataset: Annotated[str, Field(min_length=1, max_length=200)]
    split: Literal["train", "val", "test"] = "train"
    dataset_options: Annotated[dict[Annotated[str, Field(max_length=64)], int | float | Annotated[str, Field(max_length=256)]], Field(max_length=32)] = Field(default_factory=dict)
    pipeline: PipelineText | Spec
    batch_size: Annotated[int, Field(ge=1, le=1 << 20)]
    seed: Seed = 0
    epochs: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    rank: Annotated[int, Field(ge=0, lt=65_536)] = 0
    world_size: Annotated[int, Field(ge=1, le=65_536)] = 1
    prefetch: Annotated[int, Field(ge=1, le=1024)] = 8
    ordered: bool = False
    shuffle: bool = True
    drop_last: bool = False
    on_error: Literal["skip", "raise"] = "skip"
    data: Address
    data_key: PublicKey | None = None  # the trainer's CURVE server key for its data socket
    resume: ResumeState | None = None
    client: Name = ""
    transport: Transport = "auto"
    shm_host: ShmHost | None = None  # where the trainer's shared memory is; None: it has none (frames only)
    cuda: CudaDevice | None = None  # the trainer's GPU, sent with transport "cuda-ipc" only


class Wait(Body):
    """The trainer's data stall since its last report: ``batches`` its training loop took and the
    ``seconds`` it spent blocked waiting for them (the daemon's autoscaler adds workers on it)."""

    batches: Annotated[int, Field(ge=1, le=MAX_LISTED)]
    seconds: Seconds


class Credit(Body):
    """Heartbeat of a stream: batches consumed (``acks``: epoch, index, samples), batches that arrived at
    the trainer (``received``: epoch, index), and ``final`` once the trainer has everything. ``wait``
    (optional; left out when there is nothing to report, so older peers see the same message): the
    training loop's wait for batches since the last report."""

    type: ClassVar[str] = "credit"
    stream: Id
    acks: Annotated[list[tuple[Epoch, Index, Count]], Field(max_length=MAX_LISTED)] = Field(default_factory=list)
    received: Annotated[list[tuple[Epoch, Index]], Field(max_length=MAX_LISTED)] = Field(default_factory=list)
    final: bool = False
    wait: Wait | None = None


class Detach(Body):
    type: ClassVar[str] = "detach"
    stream: Id


class Status(Empty):
    type: ClassVar[str] = "status"


class Update(Body):
    """Live re-tuning: a whole ``spec`` or ``changes`` by path (``{"rotate.degrees": 20}``)."""

    type: ClassVar[str] = "update"
    stream: Id
    request: Id | None = None
    spec: PipelineText | Spec | None = None
    changes: Annotated[dict[Annotated[str, Field(max_length=200)], Any], Field(max_length=64)] | None = None


# --- daemon -> trainer ------------------------------------------------------------------------------------


class DatasetInfo(Body):
    name: Name
    split: Literal["train", "val", "test"]
    classes: Annotated[list[Name], Field(max_length=1 << 20)]
    channels: Annotated[int, Field(ge=1, le=4)]
    # (height, width) when every image of the split has it, None when sizes vary (a folder of photos).
    image_size: tuple[Annotated[int, Field(ge=1, le=1 << 16)], Annotated[int, Field(ge=1, le=1 << 16)]] | None = None


class Attached(Body):
    type: ClassVar[str] = "attached"
    stream: Id
    batches_per_epoch: Annotated[int, Field(ge=1, lt=1 << 31)]
    samples_per_epoch: Count
    num_samples: Count
    start_epoch: Epoch
    skip: Annotated[list[Index], Field(max_length=MAX_LISTED)] = Field(default_factory=list)
    pipeline_version: Version
    spec: Spec
    dataset: DatasetInfo
    fingerprint: dict[str, Any]
    worker_keys: Annotated[list[PublicKey], Field(max_length=4096)] = Field(default_factory=list)
    max_batch_bytes: Annotated[int, Field(ge=1)]


class Error(Body):
    type: ClassVar[str] = "error"
    message: Text
    code: Annotated[str, Field(max_length=32)] = "error"
    stream: Id | None = None
    request: Id | None = None


class StatusReply(Body):
    type: ClassVar[str] = "status_reply"
    status: dict[str, Any]


class StreamError(Body):
    type: ClassVar[str] = "stream_error"
    stream: Id
    message: Text
    kind: Annotated[str, Field(max_length=32)] = "error"


class Updated(Body):
    type: ClassVar[str] = "updated"
    stream: Id
    version: Version
    from_epoch: Epoch
    from_index: Index
    spec: Spec
    request: Id | None = None


# --- worker -> daemon -------------------------------------------------------------------------------------


class Hello(Body):
    """Who a worker is: sent with ``ready`` and every ``heartbeat``, so a restarted daemon re-learns it."""

    worker: Id
    pid: Annotated[int, Field(ge=0, lt=1 << 32)]
    host: Name
    backend: Annotated[str, Field(max_length=32)]
    device: Annotated[str, Field(max_length=32)]
    capacity: Annotated[int, Field(ge=1, le=64)]


class Ready(Hello):
    type: ClassVar[str] = "ready"


class Heartbeat(Hello):
    type: ClassVar[str] = "heartbeat"


class StageTimes(Body):
    """Seconds a batch spent loading, augmenting and sending."""

    load: Seconds = 0.0
    augment: Seconds = 0.0
    send: Seconds = 0.0


class Done(Body):
    type: ClassVar[str] = "done"
    worker: Id
    task: Id
    stream: Id
    epoch: Epoch
    index: Index
    samples: Count
    skipped: Count = 0
    skipped_paths: Annotated[list[Text], Field(max_length=1024)] = Field(default_factory=list)
    bytes: Count = 0
    times: StageTimes = StageTimes()
    # Optional (left out by workers before them, so older peers see the same message): which way the
    # batch went to the trainer and, for frames although the task allowed shared memory, why.
    via: Via | None = None
    fallback: FallbackKind | None = None


FailureKind = Literal["corrupt", "error", "unreachable"]


class Failed(Body):
    """A task that did not complete. ``corrupt``: an unreadable image under ``on_error="raise"`` (ends the
    stream); ``error``: an exception (retried elsewhere up to the attempt limit); ``unreachable``: the
    trainer did not take the batch in time (retried)."""

    type: ClassVar[str] = "failed"
    worker: Id
    task: Id
    stream: Id
    message: Text
    kind: FailureKind = "error"


class Bye(Body):
    type: ClassVar[str] = "bye"
    worker: Id


# --- daemon -> worker -------------------------------------------------------------------------------------


class DatasetRef(Body):
    """What a worker opens: a built-in name or a path from the daemon's own config (never a client's)."""

    ref: Annotated[str, Field(min_length=1, max_length=4096)]
    split: Literal["train", "val", "test"] = "train"
    options: dict[str, int | float | str] = Field(default_factory=dict)


class PipelineRef(Body):
    stream: Id
    version: Version
    spec: Spec


class Task(Body):
    type: ClassVar[str] = "task"
    task: Id
    stream: Id
    epoch: Epoch
    index: Index
    ids: Annotated[list[Annotated[int, Field(ge=0, lt=1 << 40)]], Field(max_length=MAX_IDS)]
    seed: Seed
    dataset: DatasetRef
    pipeline: PipelineRef
    data: Address
    data_key: PublicKey | None = None
    on_error: Literal["skip", "raise"] = "skip"
    handoff: Handoff | None = None  # None: frames (the trainer or the daemon asked for them)


class Drop(Body):
    type: ClassVar[str] = "drop"
    data: Address


class Stop(Empty):
    type: ClassVar[str] = "stop"


class Ping(Empty):
    type: ClassVar[str] = "ping"


# --- worker -> trainer ------------------------------------------------------------------------------------


class TensorDescriptor(Body):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    dtype: Literal[WIRE_DTYPES]  # type: ignore[valid-type]
    shape: Annotated[list[Annotated[int, Field(ge=0, lt=1 << 40)]], Field(max_length=8)]


class SlotTensor(TensorDescriptor):
    """A tensor inside a shared-memory slot: ``offset`` bytes from the start of the slot's data."""

    offset: Annotated[int, Field(ge=0, lt=1 << 40)]


class BatchInfo(Body):
    """What every batch says about itself, whichever way its bytes travel."""

    stream: Id
    task: Id
    epoch: Epoch
    index: Index
    pipeline_version: Version
    skipped: Annotated[list[Text], Field(max_length=1024)] = Field(default_factory=list)
    worker: Id


class Fallback(Body):
    """Why a batch came as frames although the trainer's transport allowed shared memory: ``other_host``
    (the worker does not share the trainer's shared memory), ``no_space`` (the shared-memory directory is
    too full), ``busy`` (every slot of the pool is still held by the trainer), ``unavailable`` (anything
    else: no shared-memory directory, an error creating a slot)."""

    kind: FallbackKind
    message: Text


class BatchHeader(BatchInfo):
    """A batch as frames: one frame per tensor follows this header."""

    type: ClassVar[str] = "batch"
    tensors: Annotated[list[TensorDescriptor], Field(max_length=MAX_BUFFERS)]
    fallback: Fallback | None = None


class ShmBatch(BatchInfo):
    """A batch in a shared-memory slot of the sending worker (no frames follow). ``generation`` counts
    the slot's fills, so the trainer can tell this batch from an earlier one in the same slot;
    ``retired``: segments of this worker's pool for the stream it has closed since its last
    ``shm_batch`` (the trainer lets go of their mappings). ``fallback`` (optional): why host memory
    although the trainer asked for ``cuda-ipc`` (the worker is on another GPU, ...)."""

    type: ClassVar[str] = "shm_batch"
    segment: SegmentName
    generation: Annotated[int, Field(ge=1, lt=1 << 63)]
    tensors: Annotated[list[SlotTensor], Field(max_length=MAX_BUFFERS)]
    retired: Annotated[list[SegmentName], Field(max_length=64)] = Field(default_factory=list)
    fallback: Fallback | None = None


class CudaBatch(BatchInfo):
    """A batch whose images lie in a device slot of the sending worker, on the trainer's GPU ``gpu``;
    one frame per entry of ``tensors`` (labels, sample ids) follows. ``segment`` and ``generation``: the
    slot's state word in host shared memory, as in ``shm_batch``; ``memory``: the slot's device memory;
    ``event``: the IPC handle of the worker's event recorded after the images were written; ``images``:
    where they lie in the slot. ``retired`` as in ``shm_batch``."""

    type: ClassVar[str] = "cuda_batch"
    segment: SegmentName
    generation: Annotated[int, Field(ge=1, lt=1 << 63)]
    gpu: CudaDevice
    memory: CudaMemory
    event: HexBytes(CUDA_IPC_HANDLE_BYTES, CUDA_IPC_HANDLE_BYTES)
    images: SlotTensor
    tensors: Annotated[list[TensorDescriptor], Field(max_length=MAX_BUFFERS)]
    retired: Annotated[list[SegmentName], Field(max_length=64)] = Field(default_factory=list)


# --- the registry -----------------------------------------------------------------------------------------

_BY_DIRECTION: dict[str, tuple[type[Body], ...]] = {
    "client_to_daemon": (Attach, Credit, Detach, Status, Update),
    "daemon_to_client": (Attached, Error, StatusReply, StreamError, Updated),
    "worker_to_daemon": (Ready, Heartbeat, Done, Failed, Bye),
    "daemon_to_worker": (Task, Drop, Stop, Ping, Error),
    "worker_to_client": (BatchHeader, ShmBatch, CudaBatch),
}
MESSAGES: dict[str, type[Body]] = {model.type: model for models in _BY_DIRECTION.values() for model in models}
CLIENT_TO_DAEMON = frozenset(m.type for m in _BY_DIRECTION["client_to_daemon"])
DAEMON_TO_CLIENT = frozenset(m.type for m in _BY_DIRECTION["daemon_to_client"])
WORKER_TO_DAEMON = frozenset(m.type for m in _BY_DIRECTION["worker_to_daemon"])
DAEMON_TO_WORKER = frozenset(m.type for m in _BY_DIRECTION["daemon_to_worker"])
WORKER_TO_CLIENT = frozenset(m.type for m in _BY_DIRECTION["worker_to_client"])
MESSAGE_TYPES = frozenset(MESSAGES)
_CARRIES_BUFFERS = frozenset({"batch", "cuda_batch"})


@dataclass
class Message:
    """A decoded message: its ``type``, its typed ``body`` and its raw ``buffers`` (zmq frames or bytes)."""

    type: str
    body: Body
    buffers: list[Any] = field(default_factory=list)


def encode(body: Body, buffers: Sequence[Any] = ()) -> list[Any]:
    """Frames of one message: ``[header, *buffers]``. Buffers go out as they are (no copy)."""
    if not isinstance(getattr(type(body), "type", None), str):
        raise ValueError(f"{type(body).__name__} is not a message type")
    header = {"proto": PROTOCOL, "v": PROTOCOL_VERSION, "type": body.type, **body.model_dump(mode="json", exclude_defaults=True)}
    return [msgpack.packb(header, use_bin_type=True), *buffers]


def decode(frames: Sequence[Any], expected: frozenset[str] | set[str] | None = None) -> Message:
    """Parse frames (bytes or zmq.Frame) into a typed :class:`Message`.

    ``expected``: the message types acceptable here; others are refused. Every failure is a
    :class:`ProtocolError` whose text names the problem (for a bad field: its path and value).
    """
    if not frames:
        raise ProtocolError("empty message")
    raw = frames[0]
    raw = raw.bytes if hasattr(raw, "bytes") else bytes(raw)
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several types for garbage, truncation and deep nesting
        raise ProtocolError(f"malformed header ({type(exc).__name__}): not an augserve message") from None
    if not isinstance(header, dict) or header.get("proto") != PROTOCOL:
        raise ProtocolError("malformed header: not an augserve message")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r}: this peer speaks version {PROTOCOL_VERSION}")
    message_type = header.get("type")
    if not isinstance(message_type, str) or message_type not in MESSAGES or (expected is not None and message_type not in expected):
        raise ProtocolError(f"unexpected message type {_short(message_type)}")
    buffers = list(frames[1:])
    limit = MAX_BUFFERS if message_type in _CARRIES_BUFFERS else 0
    if len(buffers) > limit:
        raise ProtocolError(f"'{message_type}' message has {len(buffers)} extra frame(s); at most {limit} allowed")
    too_deep, bad = _scan(header)
    if too_deep:
        raise ProtocolError(f"'{message_type}' header nests more than {MAX_DEPTH} levels deep")
    fields = {k: v for k, v in header.items() if k not in ("proto", "v", "type")}
    try:
        body = MESSAGES[message_type].model_validate(fields)
    except ValidationError as exc:
        raise ProtocolError(f"bad '{message_type}' message: {describe_validation_error(exc)}") from None
    if bad is not None:  # free-form fields (specs, changes, status) are not checked by their models
        raise ProtocolError(f"bad '{message_type}' message: {bad[0]} = {bad[1]!r}: not a finite number")
    return Message(message_type, body, buffers)


def describe_validation_error(error: ValidationError, limit: int = 3) -> str:
    """One line naming each bad field (path = value: reason), values shortened, at most ``limit`` of them."""
    parts = []
    for item in error.errors()[:limit]:
        path = ".".join(str(p) for p in item["loc"]) or "message"
        if item["type"] == "missing":
            parts.append(f"{path}: missing")
        else:
            parts.append(f"{path} = {_short(item.get('input'))}: {item['msg']}")
    more = len(error.errors()) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _scan(header: dict) -> tuple[bool, tuple[str, float] | None]:
    """One walk over a decoded header, without recursion (so no depth can overflow the stack): whether
    it nests deeper than MAX_DEPTH (the walk stops there), and the path and value of its first infinite
    or NaN float, or ``None``."""
    stack: list[tuple[str, Any, int]] = [("", header, 1)]
    bad = None
    while stack:
        path, item, level = stack.pop()
        if isinstance(item, float):
            if bad is None and not math.isfinite(item):
                bad = (path, item)
            continue
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else None
        if children is None:
            continue
        if level > MAX_DEPTH:
            return True, bad
        stack.extend((f"{path}.{key}" if path else str(key), child, level + 1) for key, child in children)
    return False, bad


def text_depth(text: str) -> int:
    """Deepest bracket nesting of YAML/JSON text (a quick over-estimate: quoted brackets count too), so a
    spec string of thousands of ``[`` is refused before a parser recurses into it."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    return deepest


# --- tensors ----------------------------------------------------------------------------------------


def describe(name: str, array) -> TensorDescriptor:
    """Header descriptor of a numpy array or torch tensor (must be C-contiguous on the host)."""
    dtype = str(array.dtype).removeprefix("torch.")
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"dtype {dtype} of tensor {name!r} cannot travel on the wire")
    return TensorDescriptor(name=name, dtype=dtype, shape=list(array.shape))


def tensor_buffer(array):
    """A zero-copy buffer of a C-contiguous numpy array or CPU torch tensor."""
    if hasattr(array, "numpy"):  # torch.Tensor
        if array.device.type != "cpu":
            raise ValueError("only host tensors can be sent; copy CUDA tensors to the host first")
        if not array.is_contiguous():
            array = array.contiguous()
        if str(array.dtype) == "torch.bfloat16":
            import torch

            array = array.view(torch.int16)
        array = array.numpy()
    if array.size == 0:
        return b""  # memoryview cannot cast an empty view; the receiver rebuilds the shape from the header
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return memoryview(array).cast("B")


def tensor_layout(descriptor: TensorDescriptor) -> tuple[Any, int]:
    """``(torch dtype, bytes)`` of a described tensor: what a frame or a slot region must hold."""
    import torch

    torch_dtype = getattr(torch, descriptor.dtype)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    return torch_dtype, int(np.prod(descriptor.shape, dtype=object)) * itemsize if descriptor.shape else itemsize


def frames_to_tensors(descriptors: Sequence[TensorDescriptor], buffers: Sequence[Any]) -> dict:
    """Wrap received frames as torch tensors without copying; checks every size against its header."""
    import warnings

    import torch

    if len(descriptors) != len(buffers):
        raise ProtocolError(f"header describes {len(descriptors)} tensors but {len(buffers)} frames arrived")
    tensors = {}
    for descriptor, frame in zip(descriptors, buffers):
        name, dtype, shape = descriptor.name, descriptor.dtype, list(descriptor.shape)
        buffer = frame.buffer if hasattr(frame, "buffer") else frame
        torch_dtype, expected = tensor_layout(descriptor)
        size = memoryview(buffer).nbytes
        if size != expected:
            raise ProtocolError(f"tensor {name!r}: frame has {size} bytes, header says {expected} ({dtype} {shape})")
        if expected == 0:
            tensors[name] = torch.empty(shape, dtype=torch_dtype)
            continue
        with warnings.catch_warnings():  # zmq frames are read-only; we never write into them
            warnings.simplefilter("ignore", UserWarning)
            tensors[name] = torch.frombuffer(buffer, dtype=torch_dtype).reshape(shape)
    return tensors
