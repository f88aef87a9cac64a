"""Bad input: each is a clear error to the peer that sent it, and the daemon keeps serving everyone.

Requests the ``connect`` client would catch on its own side are also sent raw (a zmq DEALER speaking
the wire format by hand), so the daemon's own checks are what is tested.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import msgpack
import pytest
import zmq

from augserve import protocol as P
from augserve.status import fetch_status

try:  # tests/integration is a package in some checkouts (tests/__init__.py) and a plain folder in others
    from .conftest import CROP_FLIP, SHAPES, collect, free_port, open_stream, raw_data_socket, raw_dealer
except ImportError:
    from conftest import CROP_FLIP, SHAPES, collect, free_port, open_stream, raw_data_socket, raw_dealer


@pytest.fixture
def still_serving(daemon):
    """After the test: the daemon is alive and a normal stream still gets every sample."""
    yield daemon
    daemon.assert_alive()
    records = collect(open_stream(daemon.address, batch_size=50, prefetch=4))
    assert sorted(i for r in records for i in r["ids"].tolist()) == list(range(SHAPES["n"]))


def raw_request(address: str, frames: list[bytes], timeout: float = 5.0) -> dict | None:
    """Send ``frames`` as one message from a fresh DEALER; the decoded header of the reply, or None."""
    context = zmq.Context()
    sock = raw_dealer(context, address)
    try:
        sock.send_multipart(frames)
        if not sock.poll(int(timeout * 1000)):
            return None
        message = P.decode(sock.recv_multipart(), P.DAEMON_TO_CLIENT)
        return {**message.body.model_dump(), "type": message.type}
    finally:
        sock.close(linger=0)
        context.term()


def header(**fields) -> bytes:
    return msgpack.packb({"proto": P.PROTOCOL, "v": P.PROTOCOL_VERSION, **fields}, use_bin_type=True)


def attach_fields(**overrides) -> dict:
    fields = {"type": "attach", "dataset": "shapes", "dataset_options": dict(SHAPES), "pipeline": CROP_FLIP, "batch_size": 16, "data": "tcp://127.0.0.1:1"}
    fields.update(overrides)
    return fields


def refused(address: str, **overrides) -> str:
    reply = raw_request(address, [header(**attach_fields(**overrides))])
    assert reply is not None, "no reply to an attach request"
    assert reply["type"] == "error", f"the daemon accepted {overrides}: {reply}"
    return reply["message"]


# --- through connect() ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"dataset": "/etc"}, "unknown dataset '/etc'"),
        ({"batch_size": 0}, "batch_size = 0"),
        ({"rank": 3, "world_size": 3}, "rank"),
        ({"dataset_options": {"size": 8}}, "size"),
        ({"dataset_options": {"color": "red"}}, "color"),
        ({"pipeline": {"ops": [{"op": "random_crop", "size": 64}]}}, "random_crop size 64"),
        ({"resume": {"epoch": 0, "delivered": [999]}}, "outside"),
    ],
)
def test_connect_refusals_are_clear_errors(still_serving, options, message):
    started = time.monotonic()
    with pytest.raises(ValueError, match="daemon refused the stream|invalid stream request") as info:
        open_stream(still_serving.address, **options)
    assert message in str(info.value)
    assert time.monotonic() - started < 5


def test_unknown_pipeline_name_is_refused(still_serving):
    with pytest.raises(ValueError, match="unknown pipeline 'alexnett'"):
        open_stream(still_serving.address, pipeline="alexnett")
    assert "unknown pipeline 'alexnett'" in refused(still_serving.address, pipeline="alexnett")


def test_invalid_spec_names_the_field_and_value(still_serving):
    bad = {"ops": [{"op": "random_crop", "size": 32}, {"op": "rotate", "degrees": 10, "p": 1.5}]}
    message = refused(still_serving.address, pipeline=bad)
    assert "ops[1].rotate.p = 1.5" in message, message
    with pytest.raises(ValueError, match="1.5"):  # connect() validates the spec before sending it
        open_stream(still_serving.address, pipeline=bad)
    message = refused(still_serving.address, pipeline="ops:\n  - {op: mirror, horizontal: 2}\n")
    assert "ops[0].mirror.horizontal = 2" in message, message


def test_a_spec_file_path_is_never_opened_by_the_daemon(still_serving, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("ops:\n  - {op: mirror}\n")
    assert "does not open spec files" in refused(still_serving.address, pipeline=str(spec))
    # A FIFO blocks whoever opens it: had the daemon opened it, its loop would hang and status fail.
    fifo = tmp_path / "spec-fifo.yml"
    os.mkfifo(fifo)
    assert "does not open spec files" in refused(still_serving.address, pipeline=str(fifo))
    assert "unknown pipeline" in refused(still_serving.address, pipeline="/etc/hostname")
    fetch_status(still_serving.address, timeout=2)
    # connect() itself reads a local spec file and sends its content.
    records = collect(open_stream(still_serving.address, pipeline=str(spec), batch_size=100))
    assert sum(len(r["ids"]) for r in records) == SHAPES["n"]


def test_yaml_in_a_spec_cannot_run_code(still_serving, tmp_path):
    marker = tmp_path / "pwned"
    message = refused(still_serving.address, pipeline=f"ops: !!python/object/apply:os.system ['touch {marker}']\n")
    assert "invalid pipeline spec" in message
    assert not marker.exists()


def test_a_yaml_alias_bomb_gets_a_short_refusal(still_serving):
    """YAML aliases expand exponentially when walked: a few hundred bytes of spec text must not
    make the daemon build (and send) a reply of tens of megabytes, nor freeze its loop (``still_serving``
    then runs a whole stream on it). Each level below multiplies the expanded size by 9; 7 levels
    expand to ~5 million items."""
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]" for k in range(1, 7)]
    text = "\n".join(lines) + "\nops: []\n"
    assert len(text) < 400
    context = zmq.Context()
    sock = raw_dealer(context, still_serving.address)
    try:
        sock.send_multipart([header(**attach_fields(pipeline=text))])
        assert sock.poll(30_000), "no reply within 30 s"
        reply = sock.recv_multipart()
    finally:
        sock.close(linger=0)
        context.term()
    size = len(reply[0])
    assert size <= P.MAX_HEADER_BYTES, f"a {len(text)}-byte spec produced a {size:,}-byte error reply (over the protocol's own header limit, so a client cannot even read it)"
    assert len(reply) == 1 and size <= 4096, f"a {len(text)}-byte spec produced a {len(reply)}-frame, {size:,}-byte reply"
    refusal = P.decode(reply)
    assert refusal.type == "error", refusal
    message = refusal.body.message
    assert "invalid pipeline spec" in message and len(message) < 1000 and "\n" not in message, message


# --- malformed messages on the control socket --------------------------------------------------------


@pytest.mark.parametrize(
    "frames, message",
    [
        ([b"\x00\xffgarbage bytes\x01\x02" * 10], "not an augserve message"),
        ([b""], "not an augserve message"),
        ([msgpack.packb({"proto": "http", "v": 1, "type": "status"})], "not an augserve message"),
        ([header(type="status", padding="x" * 40)[:-7]], "not an augserve message"),
        ([msgpack.packb({"proto": "augserve", "v": 999, "type": "status"})], "unsupported protocol version 999"),
        ([msgpack.packb({"proto": "augserve", "type": "status"})], "unsupported protocol version None"),
        ([msgpack.packb([1, 2, 3])], "not an augserve message"),
        ([msgpack.packb({1: "integer keys"})], "not an augserve message"),
        ([header(type="explode")], "unexpected message type 'explode'"),
        ([header(type="batch")], "unexpected message type 'batch'"),
        ([header(type="status", padding="x" * (P.MAX_HEADER_BYTES + 1))], "exceeds"),
        ([header(type="credit", stream="no-such-stream", acks=[])], "unknown stream"),
        ([header(type="credit", stream=[1, 2], acks=[])], "bad 'credit' message: stream = [1, 2]"),
        ([header(type="attach")], "dataset: missing"),
        ([header(**attach_fields(data="file:///etc/passwd"))], "bad data address"),
        ([header(**attach_fields(resume={"epoch": "soon"}))], "resume.epoch = 'soon'"),
        ([header(**attach_fields(prefetch=10**9))], "prefetch"),
        ([header(type="ready", worker="w", pid=1, host="h", backend="torch", device="cpu", capacity=10**6)], "capacity = 1000000"),
    ],
    ids=["garbage", "empty", "wrong-proto", "truncated", "v999", "no-version", "list", "int-keys", "unknown-type", "wrong-direction", "oversized", "unknown-stream", "unhashable-stream", "attach-empty", "data-address", "resume", "prefetch", "worker-capacity"],
)
def test_malformed_control_messages_get_an_error_reply(still_serving, frames, message):
    reply = raw_request(still_serving.address, frames)
    assert reply is not None, "the daemon did not answer"
    assert reply["type"] == "error" and message in reply["message"], reply


def test_acks_of_unknown_batches_and_garbage_acks_do_not_break_a_stream(still_serving):
    """A trainer that sends nonsense on its own stream gets errors; the stream and daemon carry on."""
    context = zmq.Context()
    control, (data, gatekeeper, data_key) = raw_dealer(context, still_serving.address), raw_data_socket(context)
    try:
        control.send_multipart([header(**attach_fields(data=data.getsockopt_string(zmq.LAST_ENDPOINT), data_key=data_key, prefetch=2))])
        assert control.poll(5000)
        attached = P.decode(control.recv_multipart())
        assert attached.type == "attached", attached.body
        stream = attached.body.stream
        for acks in ([[0, 99, 16]], [[0, "x"]], 5, [5], [{"a": 1}], [[0, 0, 0, 0, 0]]):
            control.send_multipart([header(type="credit", stream=stream, acks=acks)])
        # The first is well formed (an ack of a batch never issued is ignored); the other five are refused.
        replies = []
        deadline = time.monotonic() + 5
        while len(replies) < 5 and time.monotonic() < deadline:
            if control.poll(100):
                replies.append(P.decode(control.recv_multipart()))
        assert [r.type for r in replies] == ["error"] * 5, replies
        assert all("bad 'credit' message: acks" in r.body.message for r in replies), replies
        assert not control.poll(300), "an ack of an unknown batch got a reply"
        # Batches still arrive and acks still return credits: drain the whole epoch.
        got = set()
        deadline = time.monotonic() + 20
        while len(got) < -(-SHAPES["n"] // 16) and time.monotonic() < deadline:
            if data.poll(200):
                message = P.decode(data.recv_multipart(), P.WORKER_TO_CLIENT)
                got.add(message.body.index)
                control.send_multipart([header(type="credit", stream=stream, acks=[[message.body.epoch, message.body.index, 16]])])
        assert len(got) == -(-SHAPES["n"] // 16)
        control.send_multipart([header(type="detach", stream=stream)])
    finally:
        control.close(linger=0)
        data.close(linger=0)
        gatekeeper.stop()
        context.term()


# --- the TCP port itself ------------------------------------------------------------------------------

ZMTP3_NULL_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
ZMTP3_READY_DEALER = (lambda body: bytes([0x04, len(body)]) + body)(b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER")


def _tcp(port: int, payload: bytes, read_timeout: float = 1.0) -> bytes | None:
    """Send ``payload`` on a plain TCP connection; what came back before EOF/timeout (None: timed out)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        sock.settimeout(read_timeout)
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except socket.timeout:
            return None
        except ConnectionResetError:
            pass
        return received


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(os.urandom(8192), id="random-bytes"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", id="http"),
        pytest.param(ZMTP3_NULL_GREETING + os.urandom(512), id="greeting-then-garbage"),
        pytest.param(ZMTP3_NULL_GREETING + ZMTP3_READY_DEALER + b"\x02" + struct.pack(">Q", 1 << 62), id="absurd-frame-size"),
        pytest.param(b"\x00" * 100_000, id="zeros"),
    ],
)
def test_raw_bytes_on_the_port_do_not_hurt_the_daemon(still_serving, payload):
    port = int(still_serving.address.rsplit(":", 1)[1])
    _tcp(port, payload, read_timeout=0.3)
    still_serving.assert_alive()
    assert fetch_status(still_serving.address, timeout=3)["protocol"] == P.PROTOCOL_VERSION


def test_a_frame_larger_than_any_control_message_is_refused_at_the_transport(still_serving):
    """The daemon only ever receives headers (≤ MAX_HEADER_BYTES); a peer announcing a 4 GiB frame
    must be disconnected, not buffered (the daemon would hold whatever it sends in memory)."""
    port = int(still_serving.address.rsplit(":", 1)[1])
    reply = _tcp(port, ZMTP3_NULL_GREETING + ZMTP3_READY_DEALER + b"\x02" + struct.pack(">Q", 1 << 32) + b"\x00" * 65536, read_timeout=1.0)
    assert reply is not None, "the daemon kept the connection open, waiting for a 4 GiB control message"


# --- nobody there --------------------------------------------------------------------------------------


def test_connect_to_an_unreachable_address_fails_within_its_timeout():
    from augserve import connect

    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="no augserve daemon answered"):
        connect(address, dataset="digits", pipeline="lenet5", batch_size=64, timeout=1.5)
    assert time.monotonic() - started < 1.5 + 2
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        fetch_status(address, timeout=1.0)
    assert time.monotonic() - started < 1.0 + 2


def test_connect_to_a_port_that_does_not_speak_zmq_fails_within_its_timeout():
    from augserve import connect

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(ConnectionError):
            connect(f"tcp://127.0.0.1:{listener.getsockname()[1]}", dataset="digits", pipeline="lenet5", batch_size=64, timeout=1.5)
        assert time.monotonic() - started < 1.5 + 2
    finally:
        for conn, _ in accepted:
            conn.close()
        listener.close()
