"""Property-based fuzzing of every control message against one live daemon (real processes, real sockets).

Hypothesis draws messages of every type the daemon accepts — headers built from each type's real field
names with valid-looking values, mutated with boundary numbers, infinities and NaN, huge strings, deep
nesting, wrong types, unknown and missing fields — mixed with random msgpack maps, random bytes,
truncated headers, wrong protocol versions and extra frames. They go out from a DEALER with this user's
*client* key and from one with its *worker* key, each also sending the other role's messages.

Headers are msgpack-encoded by hand, so invalid values reach the daemon. After each message the same
socket sends a *sentinel* (an unknown message type with a serial number); the daemon answers a peer's
messages in order, so the replies before the sentinel's refusal are exactly the replies to that message.
Each reply must decode as a daemon message, and must be the one the rules predict:

- a header :func:`augserve.protocol.decode` refuses (as the daemon calls it: daemon-bound types only)
  gets an ``error`` (code ``protocol``) quoting that refusal; headers that break a rule the protocol
  states (envelope, size, depth, extra frames, unknown or missing fields, non-finite numbers,
  non-string keys) must be among them;
- another role's message gets ``forbidden``;
- ``status`` gets ``status_reply``; ``attach``/``update`` exactly one ``attached``/``updated`` or
  ``error``; ``credit``/``detach`` of an unknown stream an ``unknown_stream`` error;
- valid worker reports get no reply at all.

Afterwards the daemon is alive, counts exactly the refusals predicted, and a normal two-epoch stream
delivers every sample exactly once per epoch. ``AUGSERVE_FUZZ_EXAMPLES`` sets the number of examples.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from augserve import protocol as P
from augserve import security
from augserve.daemon import MAX_ERROR_CHARS
from augserve.status import fetch_status

try:  # tests/integration is a package in some checkouts and a plain folder in others
    from .conftest import CROP_FLIP, SHAPES, collect, ids_per_epoch, open_stream, raw_data_socket, raw_dealer, serving, wait_until
except ImportError:
    from conftest import CROP_FLIP, SHAPES, collect, ids_per_epoch, open_stream, raw_data_socket, raw_dealer, serving, wait_until

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("AUGSERVE_FUZZ_EXAMPLES", 2000))
MAX_FRAME = P.MAX_HEADER_BYTES + 4096  # the daemon's MAXMSGSIZE: a bigger frame is cut off by libzmq (no reply)
REPLY_TIMEOUT_S = 15.0  # only reached when something is wrong: replies come in milliseconds
INF, NAN = float("inf"), float("nan")
HANDLED = P.CLIENT_TO_DAEMON | P.WORKER_TO_DAEMON
REPLIES = P.DAEMON_TO_CLIENT | P.DAEMON_TO_WORKER


# --- the daemon under test -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    """One daemon (2 workers, built-in datasets) for this module; must exit 0 on SIGINT at the end."""
    yield from serving(tmp_path_factory.mktemp("fuzz-daemon"), workers=2)


def worker_dealer(context: zmq.Context, address: str, identity: bytes) -> zmq.Socket:
    """A DEALER presenting this user's *worker* key, with a fixed routing id (as a worker has)."""
    keyring = security.Keyring.load()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
    security.secure_client(sock, keyring.worker, keyring.daemon.public)
    sock.connect(address)
    return sock


def receive(sock: zmq.Socket, copy: bool = True) -> list | None:
    """One message if one is there, else ``None``. Never blocks: a message ``poll`` saw can vanish
    before ``recv`` when its sender's connection closes (a worker closing its socket to a trainer)."""
    try:
        return sock.recv_multipart(flags=zmq.NOBLOCK, copy=copy)
    except zmq.Again:
        return None


# --- encoding by hand ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deep:
    """``levels`` nested one-element lists (or maps) around nil, as raw msgpack: deeper than
    ``msgpack.packb`` agrees to write."""

    levels: int
    kind: str = "list"

    def packed(self) -> bytes:
        return (b"\x91" if self.kind == "list" else b"\x81\xa1k") * self.levels + b"\xc0"


@dataclass(frozen=True)
class Placeholder:
    """A value known only while the test runs (a live stream id, the sink's address), filled in at send time."""

    what: str

    def __repr__(self) -> str:
        return f"<{self.what}>"


LIVE_STREAM = Placeholder("live stream")
SINK, SINK_KEY = Placeholder("sink address"), Placeholder("sink key")
TASK = {name: Placeholder(f"last task.{name}") for name in ("task", "stream", "epoch", "index")}


def pack(value: Any) -> bytes:
    """msgpack of ``value``; containers are written here so a :class:`Deep` can sit anywhere inside."""
    if isinstance(value, Deep):
        return value.packed()
    if isinstance(value, dict):
        n = len(value)
        head = bytes([0x80 | n]) if n < 16 else (b"\xde" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xdf" + n.to_bytes(4, "big"))
        return head + b"".join(pack(k) + pack(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        n = len(value)
        head = bytes([0x90 | n]) if n < 16 else (b"\xdc" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xdd" + n.to_bytes(4, "big"))
        return head + b"".join(pack(v) for v in value)
    return msgpack.packb(value, use_bin_type=True)


def envelope(kind: Any, fields: dict | None = None, **named: Any) -> dict:
    """A header of type ``kind``; ``fields`` may hold keys that are not identifiers (or not strings)."""
    return {"proto": P.PROTOCOL, "v": P.PROTOCOL_VERSION, "type": kind, **(fields or {}), **named}


def static(value: Any) -> Any:
    """``value`` with every :class:`Placeholder` replaced by a plain string (for headers cut short)."""
    if isinstance(value, dict):
        return {k: static(v) for k, v in value.items()}
    return "placeholder" if isinstance(value, Placeholder) else value


def shorten(value: Any, width: int = 80) -> str:
    """repr of ``value`` with long strings, bytes and lists cut (a failing example stays readable)."""
    if isinstance(value, (str, bytes)) and len(value) > width:
        return f"{value[:20]!r}...<{len(value)} {'chars' if isinstance(value, str) else 'bytes'}>"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{shorten(k)}: {shorten(v)}" for k, v in list(value.items())[:40]) + ("" if len(value) <= 40 else f", ...<{len(value)} keys>") + "}"
    if isinstance(value, (list, tuple)):
        items = ", ".join(shorten(v) for v in value[:8]) + ("" if len(value) <= 8 else f", ...<{len(value)} items>")
        return f"[{items}]"
    return repr(value)


@dataclass
class Sent:
    """One fuzzed message: from the ``client`` or the ``worker`` socket; a header value (packed by hand)
    or raw header bytes; and extra frames."""

    socket: str
    header: Any = None
    raw: bytes | None = None
    extra: list[bytes] = field(default_factory=list)
    note: str = ""  # how it was made

    def __repr__(self) -> str:
        what = f"raw={shorten(self.raw)}" if self.raw is not None else f"header={shorten(self.header)}"
        return f"Sent({self.socket}, {self.note}, {what}, extra={len(self.extra)} frame(s) {[len(f) for f in self.extra]})"

    def _repr_pretty_(self, printer, cycle) -> None:  # Hypothesis prints falsifying examples with this
        printer.text(repr(self))


# --- what the protocol says must be refused, independently of protocol.decode ----------------------------


def rule_broken(header: Any, header_bytes: bytes, extra: list[bytes]) -> str | None:
    """The first rule of the wire format (module docstring of ``augserve.protocol``) that this message
    breaks, found without ``protocol.decode``; ``None`` when it breaks none of these."""
    if len(header_bytes) > P.MAX_HEADER_BYTES:
        return "header over MAX_HEADER_BYTES"
    if not isinstance(header, dict) or header.get("proto") != P.PROTOCOL:
        return "not an augserve envelope"
    if header.get("v") != P.PROTOCOL_VERSION:
        return "another protocol version"
    kind = header.get("type")
    if not isinstance(kind, str) or kind not in HANDLED:
        return "a type no daemon accepts"
    if extra:  # only batches (worker to trainer) carry buffers
        return "extra frames on a control message"
    stack, worst = [(header, 1)], None
    while stack:
        item, level = stack.pop()
        if isinstance(item, Deep):
            level += item.levels
            if level - 1 > P.MAX_DEPTH:
                return "nested deeper than MAX_DEPTH"
            continue
        if isinstance(item, float) and not math.isfinite(item):
            worst = worst or "a non-finite number"
        if isinstance(item, dict):
            if level > P.MAX_DEPTH:
                return "nested deeper than MAX_DEPTH"
            if any(not isinstance(k, (str, bytes)) for k in item):
                worst = worst or "a map key that is not a string"
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            if level > P.MAX_DEPTH:
                return "nested deeper than MAX_DEPTH"
            stack.extend((v, level + 1) for v in item)
    if worst:
        return worst
    fields = {k for k in header if k not in ("proto", "v", "type")}
    model = P.MESSAGES[kind].model_fields
    unknown = [k for k in fields if k not in model]
    if unknown:
        return f"unknown field {unknown[0]!r}"
    missing = [name for name, info in model.items() if info.is_required() and name not in fields]
    if missing:
        return f"missing field {missing[0]!r}"
    return None


# --- strategies ----------------------------------------------------------------------------------------

BOUNDARY_INTS = (0, 1, -1, 2, 63, 64, 65, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40 - 1, 2**40, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 10**6, 10**6 + 1, 65_535, 65_536, 65_537)
SPECIAL_FLOATS = (INF, -INF, NAN, -0.0, 0.5, 1e308, 5e-324, 1e6, 1e6 + 1, -1.0)
LONG_TEXT = (0, 39, 40, 41, 64, 65, 128, 129, 200, 201, 256, 257, 512, 513, 4096, 4097, 65_536, 65_537)  # around every bound

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from(BOUNDARY_INTS),
    st.floats(),
    st.sampled_from(SPECIAL_FLOATS),
    st.text(max_size=24),
    st.sampled_from(LONG_TEXT).map(lambda n: "x" * n),
    st.binary(max_size=24),
    st.builds(Deep, st.sampled_from((P.MAX_DEPTH - 2, P.MAX_DEPTH - 1, P.MAX_DEPTH, P.MAX_DEPTH + 1, 100, 3000)), st.sampled_from(("list", "map"))),
)
keys = st.one_of(st.text(max_size=10), st.sampled_from(("epoch", "ops", "op", "size", "p", "stream", "type", "v")), st.binary(max_size=4), st.integers(-3, 3))
wide = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=8)


def pool(*values: Any) -> st.SearchStrategy:
    return st.sampled_from(values)


def index_lists(size: int, valid: bool) -> st.SearchStrategy:
    """``acks`` (size 3: epoch, index, samples) or ``received`` (size 2: epoch, index) lists."""
    if valid:
        return st.lists(st.tuples(st.integers(0, 2), st.integers(0, 15), st.integers(0, 16)) if size == 3 else st.tuples(st.integers(0, 2), st.integers(0, 15)), max_size=4)
    small = st.one_of(st.integers(0, 3), st.sampled_from((-1, 10**6, 10**6 + 1, 2**31 - 1, 2**31, 2**40, INF, NAN, 0.5, "0")))
    return st.one_of(st.lists(st.tuples(*[small] * size), min_size=1, max_size=4), pool([[0, i, 16][:size] for i in range(50_000)], [[0] * (size + 1)], [[0] * (size - 1)], [0], "x", {}))


GOOD_SPECS = (CROP_FLIP, "lenet5", "ops:\n  - {op: random_crop, size: 16}\n  - {op: mirror}\n", {"ops": [{"op": "random_crop", "size": 16}]}, {"ops": []})
BAD_SPECS = (
    "alexnett", "/etc/passwd", "spec.yaml", "", "[" * 3000, "{a: [" * 30, "ops: !!python/object/apply:os.system ['true']\n",
    {"ops": [{"op": "rotate", "degrees": 10, "p": 1.5}]}, {"ops": [{"op": "random_crop", "size": 64}]},
    {"ops": [{"op": "mirror", "p": NAN}]}, {"ops": [{"op": "rotate", "degrees": INF}]}, {"ops": [{"op": "nope"}]},
    {"ops": "mirror"}, {"ops": [{"op": "mirror"}] * 65}, {"name": "x" * 5000, "ops": []}, {"ops": [{"op": "mirror", "extra": 1}]},
)  # fmt: skip
LONG = {n: "x" * n for n in (33, 128, 129, 201, 256, 257, 4096, 4097)}

# Per field name (every field of every message the daemon accepts): values a correct peer could send,
# and values on the wrong side of each bound or of the wrong type. An attach's ``data``/``data_key``
# are drawn together (DATA below).
FIELDS: dict[str, tuple[tuple | st.SearchStrategy, tuple | st.SearchStrategy]] = {
    # attach
    "dataset": (("shapes", "shapes", "shapes", "digits", "photos"), ("imagenet", "/etc", "", LONG[201], "folder")),
    "split": (("train", "val", "test"), ("validation", "", None)),
    "dataset_options": ((dict(SHAPES), dict(SHAPES), {"size": 16, "n": 20}, {}),
                        ({"size": 8}, {"n": 0}, {"n": 10_000_001}, {"size": 2**63}, {"size": "32"}, {"color": "red"},
                         {f"k{i}": i for i in range(33)}, {"x" * 65: 1}, {"size": True}, {"size": 32.0})),  # fmt: skip
    "pipeline": (GOOD_SPECS, BAD_SPECS),
    "batch_size": ((16, 16, 1, 50), (0, -1, 65_537, 2**20, 2**20 + 1, 2**63, 16.5, "16")),
    "seed": ((0, 1, 2**63 - 1), (2**63, -1, 0.5)),
    "epochs": ((1, 1, 2, 10**6), (0, 10**6 + 1)),
    "rank": ((0, 0, 1), (3, 65_535, 65_536, -1)),
    "world_size": ((1, 1, 2), (0, 65_536, 65_537)),
    "prefetch": ((1, 4, 8), (0, 1024, 1025)),
    "ordered": ((True, False), (0, 1, 2, "yes", None)),
    "shuffle": ((True, False), (0, 1, 2, "yes", None)),
    "drop_last": ((True, False), (0, 1, 2, "yes", None)),
    "on_error": (("skip", "raise"), ("ignore", "")),
    "resume": ((None, {"epoch": 0}, {"epoch": 1, "delivered": [0, 1]}),
               ({"epoch": 0, "delivered": [999]}, {"epoch": 2}, {"epoch": INF}, {"epoch": -1}, {"epoch": 0, "fingerprint": {"dataset": "digits"}},
                {"epoch": 0, "fingerprint": "x"}, {"epoch": 0, "extra": 1}, {"epoch": 0, "delivered": list(range(P.MAX_LISTED + 1))}, [], "soon")),  # fmt: skip
    "client": (("", "fuzz"), (LONG[257],)),
    # credit, detach, update
    "stream": ((LIVE_STREAM, LIVE_STREAM, "no-such-stream"), ("", LONG[129], 7, [1, 2])),
    "acks": (index_lists(3, valid=True), index_lists(3, valid=False)),
    "received": (index_lists(2, valid=True), index_lists(2, valid=False)),
    "final": ((False, True), (1, "yes")),
    "request": (("r-1", None), ("", LONG[129])),
    "spec": ((*GOOD_SPECS, None), BAD_SPECS),
    "changes": (({"random_crop.padding": 4}, {"mirror.p": 0.5}, {"random_crop.size": 64}, None),
                ({}, {"nope.x": 1}, {LONG[201]: 1}, {f"k{i}": 1 for i in range(65)}, {"mirror.p": NAN}, {"random_crop": {"size": 16}}, ["mirror.p", 0.5])),  # fmt: skip
    # ready, heartbeat, done, failed, bye
    "worker": (("fuzz-worker", LONG[128]), ("", LONG[129])),
    "pid": ((0, 1, os.getpid(), 2**32 - 1), (2**32, -1)),
    "host": (("localhost", LONG[256]), (LONG[257],)),
    "backend": (("albumentations", "torch"), (LONG[33],)),
    "device": (("cpu", "cuda:0"), (LONG[33],)),
    "capacity": ((1, 2, 64, 2.0), (65, 0, -1, INF, NAN, 1.5)),
    "task": ((TASK["task"], TASK["task"], "t-1"), ("", LONG[129])),
    "epoch": ((TASK["epoch"], TASK["epoch"], 0, 10**6), (10**6 + 1, -1, INF)),
    "index": ((TASK["index"], TASK["index"], 0, 2**31 - 1), (2**31, -1)),
    "samples": ((16, 0, 2**40 - 1), (2**40, -1)),
    "skipped": ((0, 1, 2**40 - 1), (2**40, -1)),
    "bytes": ((0, 49_152, 2**40 - 1), (2**40, -1)),
    "skipped_paths": (([], ["/x.jpg"]), ([LONG[4097]], ["a"] * 1025)),
    "times": (({}, {"load": 0.1, "augment": 0.2, "send": 0.0}), ({"load": INF}, {"augment": NAN}, {"send": -1.0}, {"send": 1e6 + 1}, [], {"extra": 1}, "fast")),
    "message": (("boom", "", LONG[4096]), (LONG[4097],)),
    "kind": (("error", "unreachable", "corrupt"), ("other",)),
}
REPORT_STREAM = ((TASK["stream"], TASK["stream"], LIVE_STREAM, "no-such-stream"), ("", LONG[129]))  # `stream` of done/failed
# Where an accepted stream's batches go: the sink (with its key, without one, with another key), or an
# address where nobody listens (a worker's PUSH socket queues the batches; the stream's end drops them).
DATA = (
    ({"data": SINK, "data_key": SINK_KEY}, {"data": SINK, "data_key": SINK_KEY}, {"data": SINK}, {"data": SINK, "data_key": "A" * 40},
     {"data": "tcp://127.0.0.1:1"}, {"data": "tcp://127.0.0.1:1", "data_key": SINK_KEY}),
    ({"data": "tcp://127.0.0.1:0", "data_key": SINK_KEY}, {"data": "tcp://127.0.0.1:*", "data_key": SINK_KEY}, {"data": "file:///etc/passwd"},
     {"data": "inproc://x"}, {"data": ""}, {"data": "x" * 513}, {"data": 5}, {"data": None}, {}, {"data": SINK, "data_key": "x" * 39},
     {"data": SINK, "data_key": "~" * 40}, {"data": SINK, "data_key": 5}, {"data": SINK, "data_key": None}),
)  # fmt: skip
ROLE = {kind: "worker" if kind in P.WORKER_TO_DAEMON else "client" for kind in P.MESSAGES}


def choose(values: tuple | st.SearchStrategy) -> st.SearchStrategy:
    return values if isinstance(values, st.SearchStrategy) else st.sampled_from(values)


@st.composite
def structured(draw) -> Sent:
    """A message of a real type. Mode 0: fields a correct peer could send; mode 1: one field wrong (on
    the wrong side of a bound, or any value at all); mode 2: each field wrong now and then, plus up to 3
    mutations (a wide value, a deleted field, an unknown field), maybe another protocol version and
    extra frames."""
    kind = draw(st.sampled_from(sorted(HANDLED) if draw(st.integers(0, 4)) else sorted(P.MESSAGES)))
    role = ROLE[kind] if draw(st.integers(0, 6)) else {"client": "worker", "worker": "client"}[ROLE[kind]]
    mode = draw(st.integers(0, 2))
    model = P.MESSAGES[kind].model_fields
    names = [name for name, info in model.items() if name not in ("data", "data_key") and (info.is_required() or draw(st.booleans()))]
    names += ["data"] if "data" in model else []
    wrong = draw(st.sampled_from(names)) if mode == 1 and names else None
    fields: dict[Any, Any] = {}
    for name in names:
        valid, edge = DATA if name == "data" else REPORT_STREAM if (name == "stream" and kind in ("done", "failed")) else FIELDS.get(name, (wide, wide))
        if name == wrong and name != "data" and draw(st.booleans()):
            value = draw(wide)
        else:
            value = draw(choose(edge if name == wrong or (mode == 2 and not draw(st.integers(0, 3))) else valid))
        if name == "data":
            fields.update(value)
        else:
            fields[name] = value
    extra: list[bytes] = []
    if mode == 2:
        mutable = [name for name in model if name not in ("data", "data_key")]
        for _ in range(draw(st.integers(0, 3))):
            action = draw(st.sampled_from(("wide", "drop", "unknown")))
            if action == "unknown" or not mutable:
                fields[draw(keys)] = draw(wide)
            elif action == "wide":
                fields[draw(st.sampled_from(mutable))] = draw(wide)
            else:
                fields.pop(draw(st.sampled_from(mutable)), None)
        if not draw(st.integers(0, 4)):
            fields["v"] = draw(st.one_of(pool(1, 3, 0, -1, 2.0, "2", None, True, 2**64 - 1), wide))  # another protocol version
        if not draw(st.integers(0, 4)):
            extra = draw(st.lists(st.binary(max_size=64), min_size=1, max_size=10))
    return Sent(role, header=envelope(kind, fields), extra=extra, note=f"{kind} (mode {mode}) from the {role} socket")


@st.composite
def random_map(draw) -> Sent:
    header = draw(st.dictionaries(keys, wide, max_size=6))
    for key, values in (("proto", pool(P.PROTOCOL, "http", b"augserve")), ("v", pool(2, 1, 3, 2.0, "2")), ("type", st.sampled_from(sorted(P.MESSAGES) + ["", "explode"]))):
        if draw(st.integers(0, 3)):
            header[key] = draw(st.one_of(values, wide))
    return Sent(draw(pool("client", "worker")), header=header, note="random map")


@st.composite
def raw_bytes(draw) -> Sent:
    """Random bytes, or a real header cut short, as the header frame."""
    if draw(st.booleans()):
        raw = draw(st.binary(max_size=256))
        note = "random bytes"
    else:
        whole = pack(static(draw(structured()).header))
        raw = whole[: draw(st.integers(0, max(0, len(whole) - 1)))]
        note = "truncated header"
    return Sent(draw(pool("client", "worker")), raw=raw, note=note)


@st.composite
def oversized(draw) -> Sent:
    """A header just over the protocol's limit (but under the transport's, so it still reaches the loop)."""
    kind = draw(st.sampled_from(sorted(HANDLED)))
    padding = "x" * (P.MAX_HEADER_BYTES - 40 + draw(st.integers(0, 80)))
    return Sent(ROLE[kind], header=envelope(kind, padding=padding), note="oversized header")


messages = st.one_of(structured(), structured(), structured(), random_map(), raw_bytes(), oversized())


# --- the fuzzer: send, predict, check ---------------------------------------------------------------------


class Mismatch(AssertionError):
    pass


class Fuzzer:
    """Both DEALERs, the data sink accepted streams send to, and what the daemon must have done so far."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.context = zmq.Context()
        self.sink, self.gatekeeper, self.sink_key = raw_data_socket(self.context)
        self.sink_address = self.sink.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sockets = {"client": raw_dealer(self.context, daemon.address), "worker": worker_dealer(self.context, daemon.address, f"fuzz-worker-{uuid.uuid4().hex[:8]}".encode())}
        self.live: list[str] = []  # streams this client attached and has not ended, newest last
        self.cleaned: set[str] = set()  # streams detached by the fuzzer itself (their reply, if any, is not a fuzz reply)
        self.last_task: P.Task | None = None
        self.decoded: P.Message | None = None  # the current message as protocol.decode reads it (None: refused)
        self.serial = 0
        self.refusals = 0  # messages the daemon must count in refused_messages
        self.stats: Counter = Counter()

    def close(self) -> None:
        for sock in (*self.sockets.values(), self.sink):
            sock.close(linger=0)
        self.gatekeeper.stop()
        self.context.term()

    # --- filling in the runtime values --------------------------------------------------------------

    def resolve(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if value is LIVE_STREAM:
            return self.live[-1] if self.live else "no-live-stream"
        if value is SINK:
            return self.sink_address
        if value is SINK_KEY:
            return self.sink_key
        if isinstance(value, Placeholder):  # a field of the last task this socket was handed
            name = value.what.rsplit(".", 1)[1]
            task = self.last_task
            return getattr(task, name) if task is not None else {"task": "no-task", "stream": "no-stream", "epoch": 0, "index": 0}[name]
        return value

    def frames(self, sent: Sent) -> tuple[Any, list[bytes]]:
        header = self.resolve(sent.header) if sent.raw is None else None
        return header, [sent.raw if sent.raw is not None else pack(header), *sent.extra]

    # --- one example ---------------------------------------------------------------------------------

    def check(self, sent: Sent) -> None:
        header, frames = self.frames(sent)
        assume(all(len(f) <= MAX_FRAME for f in frames))  # a bigger frame never reaches the loop (tested elsewhere)
        expect, allowed, asynchronous, note = self.predict(sent, header, frames)
        sock = self.sockets[sent.socket]
        sock.send_multipart(frames)
        replies = []
        if asynchronous:
            replies += self.read(sent.socket, until=lambda r: True, what=f"the reply to {note}")
        replies += self.fence(sent.socket)
        self.judge(sent, note, expect, allowed, replies)
        for reply in replies:
            self.stats[reply.type if reply.type != "error" else f"error:{reply.body.code}"] += 1
            if reply.type == "attached":
                self.live.append(reply.body.stream)
        if self.decoded is not None and self.decoded.type == "detach" and sent.socket == "client" and self.decoded.body.stream in self.live:
            self.live.remove(self.decoded.body.stream)  # ended by the fuzz itself
        while len(self.live) > 2:  # keep few streams alive: each holds worker time
            self.detach(self.live.pop(0))
        self.drain_sink()

    def predict(self, sent: Sent, header: Any, frames: list[bytes]):
        """(expected replies as (type, code, message or None), alternatives allowed, wait for an
        asynchronous reply, a note) for this message, from the protocol and the daemon's rules."""
        self.decoded = None
        try:
            message = self.decoded = P.decode(frames, HANDLED)  # as the daemon decodes
        except P.ProtocolError as exc:
            self.refusals += 1
            text = str(exc)
            if len(text) > MAX_ERROR_CHARS:
                text = text[: MAX_ERROR_CHARS - 3] + "..."
            return [("error", "protocol", text)], None, False, f"a message protocol.decode refuses ({text[:120]})"
        broken = rule_broken(header, frames[0], frames[1:]) if sent.raw is None else None
        if broken is not None:
            raise Mismatch(f"protocol.decode accepted a message that breaks a protocol rule ({broken}): {sent!r} decoded as {message.type} {message.body!r}"[:3000])
        kind = message.type
        self.stats[f"valid:{kind}:{sent.socket}"] += 1
        if ROLE[kind] != sent.socket:
            self.refusals += 1
            return [("error", "forbidden", None)], None, False, f"a valid {kind!r} from the {sent.socket} key"
        if sent.socket == "worker":
            return [], None, False, f"a valid worker report {kind!r}"
        if kind == "status":
            return [("status_reply", None, None)], None, False, "status"
        if kind in ("attach", "update"):
            success = "attached" if kind == "attach" else "updated"
            return None, {success, "error"}, True, f"a valid {kind!r}"
        stream = message.body.stream
        if stream in self.live:  # an own stream: no reply, or unknown_stream if it ended meanwhile
            return [], [("error", "unknown_stream", None)], False, f"{kind!r} of a live stream"
        return [("error", "unknown_stream", None)], None, False, f"{kind!r} of an unknown stream"

    def judge(self, sent: Sent, note: str, expect, allowed, replies: list[P.Message]) -> None:
        got = [(r.type, getattr(r.body, "code", None), getattr(r.body, "message", None)) for r in replies]

        def fits(wanted) -> bool:
            return len(wanted) == len(got) and all(t == gt and (c is None or c == gc) and (m is None or m == gm) for (t, c, m), (gt, gc, gm) in zip(wanted, got))

        if expect is None:  # attach / update: exactly one reply of an allowed type
            ok = len(got) == 1 and got[0][0] in allowed
        else:
            ok = fits(expect) or (allowed is not None and fits(allowed))
        if not ok:
            wanted = f"one of {sorted(allowed)}" if expect is None else expect if allowed is None else f"{expect} or {allowed}"
            self.fail(f"{note}: expected {wanted}, got {got}\nmessage: {sent!r}")

    # --- reading replies ------------------------------------------------------------------------------

    def read(self, role: str, until, what: str) -> list[P.Message]:
        """Replies on ``role``'s socket up to and including the first one ``until`` accepts; unsolicited
        messages (a stream's end, a worker's tasks and pings) are checked and set aside."""
        sock = self.sockets[role]
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        out = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000)):
                self.daemon.assert_alive()
                self.fail(f"no {what} within {REPLY_TIMEOUT_S:g} s (the daemon is alive); so far: {[(r.type, r.body) for r in out]}")
            frames = receive(sock)
            if frames is None:
                continue
            try:
                reply = P.decode(frames, REPLIES)
            except P.ProtocolError as exc:
                self.fail(f"the daemon sent an invalid message on the {role} socket: {exc}; frames {shorten(frames)}")
            if self.unsolicited(role, reply):
                continue
            out.append(reply)
            if until(reply):
                return out

    def unsolicited(self, role: str, reply: P.Message) -> bool:
        if role == "worker" and reply.type in ("task", "ping", "drop"):  # the daemon took the fuzz socket for a worker
            if reply.type == "task":
                self.last_task = reply.body
            self.stats[f"to the fake worker:{reply.type}"] += 1
            return True
        if role == "worker" and reply.type == "stop":
            self.fail("the daemon told its workers to stop in the middle of the run")
        if role == "client" and reply.type == "stream_error":
            if reply.body.stream in self.live:
                self.live.remove(reply.body.stream)
            self.stats[f"stream_error:{reply.body.kind}"] += 1
            return True
        if reply.type == "error" and reply.body.code == "unknown_stream" and reply.body.stream in self.cleaned:
            return True  # the fuzzer's own detach of a stream that had already ended
        return False

    def fence(self, role: str) -> list[P.Message]:
        """Send a sentinel on ``role``'s socket; the replies before its refusal (which is dropped)."""
        self.serial += 1
        self.refusals += 1
        sentinel = f"sentinel-{self.serial}"
        self.sockets[role].send_multipart([pack(envelope(sentinel))])
        expected = f"unexpected message type {sentinel!r}"
        replies = self.read(role, until=lambda r: r.type == "error" and r.body.message == expected, what=f"refusal of {sentinel}")
        return replies[:-1]

    def detach(self, stream: str) -> None:
        self.cleaned.add(stream)
        self.sockets["client"].send_multipart(P.encode(P.Detach(stream=stream)))

    def drain_sink(self) -> None:
        while receive(self.sink, copy=False) is not None:
            self.stats["batches delivered to the sink"] += 1

    def fail(self, text: str) -> None:
        """Raise a mismatch, quoting the daemon's log; first read what is still on its way, so the next
        example (Hypothesis shrinks by replaying) starts in step."""
        for role, sock in self.sockets.items():
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and sock.poll(100):
                receive(sock)
        raise Mismatch(f"{text}\n--- daemon log (tail) ---\n{self.daemon.log()[-3000:]}")

    def finish(self) -> None:
        """End what the fuzz left behind: the fake worker says bye, the fuzz streams are detached."""
        self.sockets["worker"].send_multipart(P.encode(P.Bye(worker="fuzz-worker")))
        for stream in list(self.live):
            self.detach(stream)
        self.live.clear()
        for role in self.sockets:
            self.fence(role)
        self.drain_sink()


# --- the tests -------------------------------------------------------------------------------------------

HELLO = {"worker": "fuzz-worker", "pid": 1, "host": "localhost", "backend": "albumentations", "device": "cpu", "capacity": 1}
ATTACH = {"dataset": "shapes", "dataset_options": dict(SHAPES), "pipeline": CROP_FLIP, "batch_size": 16, "data": "tcp://127.0.0.1:1"}


@pytest.mark.parametrize(
    "role, header, words",
    [
        ("worker", envelope("ready", **{**HELLO, "capacity": INF}), ["capacity"]),
        ("worker", envelope("done", worker="w", task="t", stream="s", epoch=0, index=0, samples=16, times=[]), ["times"]),
        ("client", envelope("attach", **ATTACH, resume={"epoch": INF}), ["resume.epoch"]),
        ("client", envelope("attach", **{**ATTACH, "pipeline": "[" * 3000}), ["pipeline", "3000", "nest"]),
    ],
    ids=["ready-capacity-inf", "done-times-empty-list", "attach-resume-epoch-inf", "attach-pipeline-3000-brackets"],
)
def test_regressions_get_an_error_naming_the_problem(fuzz_daemon, role, header, words):
    before = fetch_status(fuzz_daemon.address, timeout=5)
    context = zmq.Context()
    sock = raw_dealer(context, fuzz_daemon.address) if role == "client" else worker_dealer(context, fuzz_daemon.address, b"regression-" + uuid.uuid4().hex[:8].encode())
    try:
        sock.send_multipart([pack(header)])
        assert sock.poll(int(REPLY_TIMEOUT_S * 1000)), f"no reply to {shorten(header)}:\n{fuzz_daemon.log()[-3000:]}"
        frames = receive(sock)
        assert frames is not None, "the reply vanished between poll and recv"
        reply = P.decode(frames, REPLIES)
    finally:
        sock.close(linger=0)
        context.term()
    assert reply.type == "error", reply
    message = reply.body.message.lower()
    assert all(word.lower() in message for word in words), f"{words} not all in {reply.body.message!r}"
    fuzz_daemon.assert_alive()
    after = fetch_status(fuzz_daemon.address, timeout=5)
    assert sorted(w["pid"] for w in after["workers"]) == sorted(w["pid"] for w in before["workers"]), "a bad message changed the worker pool"
    assert after["streams"] == []


def test_fuzzed_messages_get_the_replies_the_protocol_promises(fuzz_daemon):
    started = time.monotonic()
    before = fetch_status(fuzz_daemon.address, timeout=5)
    worker_pids = sorted(w["pid"] for w in before["workers"])
    fuzzer = Fuzzer(fuzz_daemon)
    try:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,  # examples run against a live daemon; a replayed one proves nothing about the next run
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much, HealthCheck.large_base_example],
        )
        @given(sent=messages)
        def fuzz(sent: Sent) -> None:
            fuzzer.check(sent)

        fuzz()
        fuzzer.finish()
    finally:
        fuzzer.close()
    fuzzed = time.monotonic()

    fuzz_daemon.assert_alive()
    status = fetch_status(fuzz_daemon.address, timeout=5)
    refused = status["refused_messages"] - before["refused_messages"]
    assert refused > 0 and refused == fuzzer.refusals, f"daemon counted {refused} refused messages, the rules predict {fuzzer.refusals}"
    # The fuzz's streams end and its fake worker leaves; the real workers were never restarted.
    wait_until(lambda: not fetch_status(fuzz_daemon.address, timeout=5)["streams"], timeout=20, what="the fuzz streams to end")
    status = fetch_status(fuzz_daemon.address, timeout=5)
    assert sorted(w["pid"] for w in status["workers"]) == worker_pids, status["workers"]
    assert status["worker_restarts"] == before["worker_restarts"]

    records = collect(open_stream(fuzz_daemon.address, epochs=2, batch_size=16))
    per_epoch = ids_per_epoch(records)
    assert sorted(per_epoch) == [0, 1]
    for epoch, ids in per_epoch.items():
        assert sorted(ids) == list(range(SHAPES["n"])), f"epoch {epoch}: {len(ids)} ids, {len(set(ids))} distinct"
    fuzz_daemon.assert_alive()
    print(f"\nfuzz: {EXAMPLES} examples in {fuzzed - started:.1f} s, then a clean stream in {time.monotonic() - fuzzed:.1f} s; refused {refused};",
          ", ".join(f"{k} {v}" for k, v in sorted(fuzzer.stats.items())))  # fmt: skip
