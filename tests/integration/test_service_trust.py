"""Trust and limits: who may say what to a daemon, and the caps that bound what any peer can make it do.

Every daemon here runs with keys (the default): the test session's keyring (``AUGSERVE_KEYS_DIR``).
Strangers are made with fresh key pairs; each refusal must be one clear line, and the daemon must go on
serving the keys it trusts.
"""

from __future__ import annotations

import os
import stat
import time
from types import SimpleNamespace

import msgpack
import pytest
import zmq

from augserve import protocol as P
from augserve import security
from augserve.control import Credentials, request
from augserve.retune import send_update

try:  # tests/integration is a package in some checkouts and a plain folder in others
    from .conftest import CROP_FLIP, SHAPES, collect, free_port, ids_per_epoch, open_stream, raw_dealer, run_augserve, subprocess_env
except ImportError:
    from conftest import CROP_FLIP, SHAPES, collect, free_port, ids_per_epoch, open_stream, raw_dealer, run_augserve, subprocess_env


def stranger(keyring: security.Keyring) -> Credentials:
    """Credentials with the right daemon key but a client key the daemon never allowed."""
    return Credentials(SimpleNamespace(client=security.KeyPair.generate(), daemon=keyring.daemon, worker=keyring.worker))


def header(**fields) -> bytes:
    return msgpack.packb({"proto": P.PROTOCOL, "v": P.PROTOCOL_VERSION, **fields}, use_bin_type=True)


# --- authentication ------------------------------------------------------------------------------------


def test_a_key_the_daemon_does_not_know_is_refused_at_the_handshake(daemon):
    keyring = security.Keyring.load()
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="refused this client's key"):
        request(daemon.address, P.Status(), {"status_reply"}, timeout=2.0, credentials=stranger(keyring))
    assert time.monotonic() - started < 5
    attach = P.Attach(dataset="shapes", pipeline="lenet5", batch_size=8, data="tcp://127.0.0.1:1")
    with pytest.raises(ConnectionError, match="refused this client's key"):
        request(daemon.address, attach, {"attached"}, timeout=2.0, credentials=stranger(keyring))
    daemon.assert_alive()
    assert daemon.status()["secure"] is True


def test_a_connection_without_keys_is_refused(daemon):
    with pytest.raises(ConnectionError, match="refused an unauthenticated connection"):
        request(daemon.address, P.Status(), {"status_reply"}, timeout=2.0, credentials=Credentials(None))
    with pytest.raises(ConnectionError, match="refused an unauthenticated connection"):
        open_stream(daemon.address, timeout=2.0, insecure=True)


def test_a_daemon_with_another_key_is_not_talked_to(daemon, tmp_path):
    other = security.Keyring.load(tmp_path / "other-keys")  # its own daemon key, not the one serving
    with pytest.raises(ConnectionError, match="another key"):
        open_stream(daemon.address, timeout=2.0, keys_dir=str(other.directory))


def test_worker_messages_need_a_worker_key(daemon):
    """A trainer's key cannot register as a worker, report tasks done, or fail a stream."""
    context = zmq.Context()
    sock = raw_dealer(context, daemon.address)
    try:
        hello = {"worker": "impostor", "pid": 1, "host": "h", "backend": "torch", "device": "cpu", "capacity": 4}
        sock.send_multipart([header(type="ready", **hello)])
        sock.send_multipart([header(type="failed", worker="impostor", task="t", stream="s", message="boom")])
        replies = []
        deadline = time.monotonic() + 5
        while len(replies) < 2 and time.monotonic() < deadline:
            if sock.poll(100):
                replies.append(P.decode(sock.recv_multipart()).body)
        assert [r.code for r in replies] == ["forbidden", "forbidden"], replies
        assert "is a worker message and this connection's key is not a worker key" in replies[0].message
    finally:
        sock.close(linger=0)
        context.term()
    status = daemon.status()
    assert "impostor" not in [w["worker"] for w in status["workers"]]
    assert status["refused_messages"] >= 2


def test_only_the_owner_may_retune_or_detach_a_stream(start_daemon, tmp_path):
    keyring = security.Keyring.load()
    colleague = security.KeyPair.generate()
    allowed = keyring.allow("client", colleague.public, f"colleague-{os.getpid()}")
    try:
        served = start_daemon(workers=1)  # reads the allow-list at start: the colleague's key gets in
    finally:
        allowed.unlink()
    stream = open_stream(served.address, prefetch=2, epochs=50, batch_timeout=20)
    try:
        next(iter(stream))
        theirs = Credentials(SimpleNamespace(client=colleague, daemon=keyring.daemon, worker=keyring.worker))
        assert request(served.address, P.Status(), {"status_reply"}, credentials=theirs).type == "status_reply"  # allowed in...
        with pytest.raises(ValueError, match="belongs to another client key; only its owner may re-tune it"):
            send_update(served.address, stream.id, changes={"random_crop.padding": 3}, credentials=theirs)  # ...but not to re-tune
        reply = request(served.address, P.Detach(stream=stream.id), {"error"}, credentials=theirs, timeout=3.0)
        assert reply.type == "error" and "unknown stream" in reply.body.message
        assert send_update(served.address, stream.id, changes={"random_crop.padding": 3})["version"] == 2  # the owner (same user) may
        assert any(s["stream"] == stream.id for s in served.status()["streams"])
    finally:
        stream.close()


# --- binding ------------------------------------------------------------------------------------------


def test_a_public_bind_without_keys_refuses_to_start(tmp_path):
    empty = tmp_path / "no-keys"
    env = subprocess_env(AUGSERVE_KEYS_DIR=str(empty))
    proc = run_augserve("serve", "--bind", f"tcp://0.0.0.0:{free_port()}", "--workers", "0", env=env, timeout=60)
    assert proc.returncode != 0
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("augserve: error:") and str(empty) in line and "augserve keys create" in line, proc.stderr
    assert not empty.exists() or not any(empty.iterdir()), "a public bind must not invent keys nobody else has"


def test_insecure_daemon_on_loopback_serves_insecure_clients_only(start_daemon):
    served = start_daemon("--insecure", workers=1)
    assert request(served.address, P.Status(), {"status_reply"}, credentials=Credentials(None)).body.status["secure"] is False
    records = collect(open_stream(served.address, insecure=True, batch_size=100))
    assert sorted(ids_per_epoch(records)[0]) == list(range(SHAPES["n"]))
    with pytest.raises(ConnectionError, match="runs --insecure"):
        open_stream(served.address, timeout=2.0)
    assert "INSECURE" in served.log()


def test_ipc_sockets_are_private(start_daemon, tmp_path):
    path = tmp_path / "control.sock"
    served = start_daemon(bind=f"ipc://{path}", workers=1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stream = open_stream(served.address, batch_size=100)
    try:
        assert stream._link.data_key is None  # a private file: batches skip the encryption
        data = stream._link.data_endpoint[len("ipc://") :]
        assert stat.S_IMODE(os.stat(os.path.dirname(data)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(data).st_mode) == 0o600
        assert sorted(ids_per_epoch(collect(stream))[0]) == list(range(SHAPES["n"]))
    finally:
        stream.close()
    assert not os.path.exists(data), "the data socket's file outlived its stream"


# --- limits -------------------------------------------------------------------------------------------


@pytest.fixture
def limited(start_daemon):
    """A daemon with small caps: 64 KiB per batch, 2 ops per spec, 1 stream per client key."""
    env = subprocess_env(AUGSERVE_MAX_BATCH_BYTES="65536", AUGSERVE_MAX_OPS="2", AUGSERVE_MAX_STREAMS_PER_CLIENT="1")
    return start_daemon(workers=1, env=env)


def test_bytes_per_batch_are_capped(limited):
    with pytest.raises(ValueError, match=r"a batch of 64 × 32×32×3 uint8 is 196,608 bytes, over this daemon's max_batch_bytes 65,536"):
        open_stream(limited.address, batch_size=64)
    records = collect(open_stream(limited.address, batch_size=16))  # 49,152 bytes: under the cap
    assert sum(len(r["ids"]) for r in records) == SHAPES["n"]


def test_ops_per_spec_are_capped(limited):
    three = {"ops": [{"op": "random_crop", "size": 32}, {"op": "mirror"}, {"op": "rotate", "degrees": 5}]}
    with pytest.raises(ValueError, match="pipeline has 3 ops; this daemon allows at most max_ops=2"):
        open_stream(limited.address, pipeline=three)


def test_streams_per_client_are_capped_and_freed_on_detach(limited):
    first = open_stream(limited.address, epochs=100, prefetch=2)
    try:
        with pytest.raises(ValueError, match=r"this client already has 1 streams \(max_streams_per_client=1\)"):
            open_stream(limited.address)
    finally:
        first.close()
    deadline = time.monotonic() + 10
    while limited.status()["streams"] and time.monotonic() < deadline:
        time.sleep(0.05)
    collect(open_stream(limited.address, batch_size=16))  # the slot is free again


def test_a_resume_state_of_another_run_names_the_difference(daemon):
    stream = open_stream(daemon.address, batch_size=20, seed=3, prefetch=2)
    try:
        next(iter(stream))
        state = stream.state_dict()
    finally:
        stream.close()
    assert state["fingerprint"]["batch_size"] == 20 and state["fingerprint"]["seed"] == 3
    with pytest.raises(ValueError, match=r"resume state was saved by another run: ") as refused:
        open_stream(daemon.address, batch_size=25, seed=4, resume=state)
    assert "batch_size 20 != 25" in str(refused.value) and "seed 3 != 4" in str(refused.value)
    with pytest.raises(ValueError, match=r"pipeline"):
        open_stream(daemon.address, batch_size=20, seed=3, resume=state, pipeline={"ops": [{"op": "random_crop", "size": 30}]})
    records = collect(open_stream(daemon.address, batch_size=20, seed=3, resume=state, pipeline=CROP_FLIP))
    assert len(records) == -(-SHAPES["n"] // 20) - 1  # the same run resumes, minus the batch it had
