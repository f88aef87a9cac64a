"""The wire format — the one place where augserve messages are encoded and decoded.

Every message is a ZeroMQ multipart message:

    frame 0   header: a msgpack map {"proto": "augserve", "v": PROTOCOL_VERSION, "type": <str>, ...fields}
    frame 1…  raw buffers (tensor bytes), sent with ``copy=False`` and described in the header

Never pickle: a header is plain data, a buffer is bytes. A peer speaking another protocol version gets a
clear refusal (:class:`ProtocolError` naming both versions); malformed or truncated messages raise
:class:`ProtocolError` instead of crashing the receiver.

Tensors travel as ``{"name", "dtype", "shape"}`` descriptors in the header plus one frame each; the
receiver wraps each frame as a tensor without copying (:func:`frames_to_tensors`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np

PROTOCOL = "augserve"
PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20  # 1 MiB: headers carry ids and settings, never pixel data

# Message types, by direction. The set is closed: anything else is refused.
CLIENT_TO_DAEMON = {"attach", "credit", "detach", "status", "update"}
DAEMON_TO_CLIENT = {"attached", "error", "status_reply", "stream_error", "updated"}
WORKER_TO_DAEMON = {"ready", "heartbeat", "done", "failed", "bye"}
DAEMON_TO_WORKER = {"task", "drop", "stop", "ping"}
WORKER_TO_CLIENT = {"batch"}
MESSAGE_TYPES = CLIENT_TO_DAEMON | DAEMON_TO_CLIENT | WORKER_TO_DAEMON | DAEMON_TO_WORKER | WORKER_TO_CLIENT

# dtypes allowed on the wire; "bfloat16" has no numpy dtype and is carried as raw 2-byte words.
WIRE_DTYPES = {"uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bfloat16", "bool"}


class ProtocolError(ValueError):
    """A message that is not a valid augserve message of this version."""


@dataclass
class Message:
    """A decoded message: its ``type``, its header ``fields`` and its raw ``buffers`` (zmq frames or bytes)."""

    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    buffers: list[Any] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def require(self, *keys: str) -> tuple:
        """The values of ``keys``; a missing one is a :class:`ProtocolError` naming it."""
        missing = [k for k in keys if k not in self.fields]
        if missing:
            raise ProtocolError(f"'{self.type}' message lacks field(s): {', '.join(missing)}")
        return tuple(self.fields[k] for k in keys)


def encode(message_type: str, fields: dict[str, Any] | None = None, buffers: Sequence[Any] = ()) -> list[Any]:
    """Frames of one message: ``[header, *buffers]``. Buffers go out as they are (no copy)."""
    if message_type not in MESSAGE_TYPES:
        raise ValueError(f"unknown message type {message_type!r}")
    header = {"proto": PROTOCOL, "v": PROTOCOL_VERSION, "type": message_type, **(fields or {})}
    return [msgpack.packb(header, use_bin_type=True), *buffers]


def decode(frames: Sequence[Any], expected: set[str] | None = None) -> Message:
    """Parse frames (bytes or zmq.Frame) into a :class:`Message`, checking protocol and version.

    ``expected``: the message types acceptable here; others are refused.
    """
    if not frames:
        raise ProtocolError("empty message")
    raw = frames[0]
    raw = raw.bytes if hasattr(raw, "bytes") else bytes(raw)
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for garbage and truncation
        raise ProtocolError(f"malformed header ({type(exc).__name__}): not an augserve message") from None
    if not isinstance(header, dict) or header.get("proto") != PROTOCOL:
        raise ProtocolError("malformed header: not an augserve message")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r}: this peer speaks version {PROTOCOL_VERSION}")
    message_type = header.get("type")
    if message_type not in MESSAGE_TYPES or (expected is not None and message_type not in expected):
        raise ProtocolError(f"unexpected message type {message_type!r}")
    fields = {k: v for k, v in header.items() if k not in ("proto", "v", "type")}
    return Message(message_type, fields, list(frames[1:]))


# --- tensors ----------------------------------------------------------------------------------------


def describe(name: str, array) -> dict:
    """Header descriptor of a numpy array or torch tensor (must be C-contiguous on the host)."""
    dtype = str(array.dtype).removeprefix("torch.")
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"dtype {dtype} of tensor {name!r} cannot travel on the wire")
    return {"name": name, "dtype": dtype, "shape": list(array.shape)}


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


def frames_to_tensors(descriptors: list[dict], buffers: Sequence[Any]) -> dict:
    """Wrap received frames as torch tensors without copying; checks every size against its header."""
    import torch

    if len(descriptors) != len(buffers):
        raise ProtocolError(f"header describes {len(descriptors)} tensors but {len(buffers)} frames arrived")
    tensors = {}
    for descriptor, frame in zip(descriptors, buffers):
        try:
            name, dtype, shape = descriptor["name"], descriptor["dtype"], [int(v) for v in descriptor["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"malformed tensor descriptor {descriptor!r}") from None
        if dtype not in WIRE_DTYPES:
            raise ProtocolError(f"tensor {name!r} has unsupported dtype {dtype!r}")
        buffer = frame.buffer if hasattr(frame, "buffer") else frame
        torch_dtype = getattr(torch, dtype)
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        expected = int(np.prod(shape, dtype=np.int64)) * itemsize
        size = memoryview(buffer).nbytes
        if size != expected:
            raise ProtocolError(f"tensor {name!r}: frame has {size} bytes, header says {expected} ({dtype} {shape})")
        if expected == 0:
            tensors[name] = torch.empty(shape, dtype=torch_dtype)
            continue
        import warnings

        with warnings.catch_warnings():  # zmq frames are read-only; we never write into them
            warnings.simplefilter("ignore", UserWarning)
            tensors[name] = torch.frombuffer(buffer, dtype=torch_dtype).reshape(shape)
    return tensors
