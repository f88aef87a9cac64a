"""augserve.security: key files, the ZAP Gatekeeper and the address checks, with real ZeroMQ sockets on
tcp://127.0.0.1 (random ports) and key directories under tmp_path. Every wait is bounded: a message that
should arrive gets ``ARRIVES_MS``, one that must not gets ``QUIET_MS`` to prove it does not."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time

import pytest
import zmq
import zmq.auth

from augserve import security
from augserve.cli import main
from augserve.security import Gatekeeper, KeyPair, Keyring, default_keys_dir, is_loopback_address, peer, private_ipc_dir, secure_client, secure_server

ARRIVES_MS = 5000
QUIET_MS = 400

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _eventually(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Loopback:
    """One zmq.Context with its Gatekeepers; everything is closed at teardown, Gatekeepers first."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.gatekeepers: list[Gatekeeper] = []
        self.sockets: list[zmq.Socket] = []  # held: a collected socket closes, dropping what it queued

    def gatekeeper(self, allowed, **options) -> Gatekeeper:
        keeper = Gatekeeper(self.context, allowed, **options).start()
        self.gatekeepers.append(keeper)
        return keeper

    def socket(self, kind: int) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        self.sockets.append(sock)
        return sock

    def server(self, pair: KeyPair | None) -> tuple[zmq.Socket, str]:
        router = self.socket(zmq.ROUTER)
        if pair is not None:
            secure_server(router, pair)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        return router, f"tcp://127.0.0.1:{port}"

    def send_from(self, address: str, pair: KeyPair | None = None, server_public: bytes | None = None, payload: bytes = b"hello") -> zmq.Socket:
        dealer = self.socket(zmq.DEALER)
        if pair is not None:
            secure_client(dealer, pair, server_public)
        dealer.connect(address)
        # Queued on the pipe until the handshake succeeds (or forever). A refused handshake tears the
        # pipe down; should that race this send, libzmq blocks it (no pipe): bounded, since the ZAP
        # verdict the tests check comes from the handshake, not from the message.
        dealer.setsockopt(zmq.SNDTIMEO, 5000)
        try:
            dealer.send(payload)
        except zmq.Again:
            pass
        return dealer

    def close(self) -> None:
        for keeper in self.gatekeepers:
            keeper.stop()
        self.context.destroy(linger=0)


@pytest.fixture
def net():
    loopback = Loopback()
    try:
        yield loopback
    finally:
        loopback.close()


@pytest.fixture
def keyring(tmp_path) -> Keyring:
    return Keyring.load(tmp_path / "keys")


def _receive(router: zmq.Socket, timeout_ms: int) -> list[zmq.Frame] | None:
    return router.recv_multipart(copy=False) if router.poll(timeout_ms) else None


# --- sockets and the Gatekeeper ------------------------------------------------------------------------


@pytest.mark.parametrize("role", security.ROLES)
def test_allowed_key_reaches_the_router_and_peer_names_it(net, keyring, role):
    net.gatekeeper({r: keyring.allowed(r) for r in security.ROLES})
    router, address = net.server(keyring.daemon)
    pair = keyring.pair(role)
    net.send_from(address, pair, keyring.daemon.public)
    frames = _receive(router, ARRIVES_MS)
    assert frames is not None, f"an allowed {role} key got no message through"
    assert frames[-1].bytes == b"hello"
    assert peer(frames[-1]) == (role, pair.public.decode())
    assert frames[-1].get("User-Id") == f"{role}:{pair.public.decode()}"


def test_unknown_key_is_refused_counted_and_remembered(net, keyring):
    keeper = net.gatekeeper({"worker": keyring.allowed("worker")})
    router, address = net.server(keyring.daemon)
    stranger = KeyPair.generate()
    net.send_from(address, stranger, keyring.daemon.public)
    assert _receive(router, QUIET_MS) is None
    assert _eventually(lambda: keeper.refused >= 1), "the ZAP handler never saw the stranger"
    refusal = keeper.recent_refusals[-1]
    assert (refusal.mechanism, refusal.public_key, refusal.address) == ("CURVE", stranger.public.decode(), "127.0.0.1")


def test_client_key_is_not_a_worker(net, keyring):
    """Roles are separate: a client key is refused where only workers are allowed."""
    keeper = net.gatekeeper({"worker": keyring.allowed("worker")})
    router, address = net.server(keyring.daemon)
    net.send_from(address, keyring.client, keyring.daemon.public)
    assert _receive(router, QUIET_MS) is None
    assert _eventually(lambda: keeper.refused == 1)


def test_null_client_gets_nothing_through(net, keyring):
    net.gatekeeper({"worker": keyring.allowed("worker")})
    router, address = net.server(keyring.daemon)
    net.send_from(address)  # no CURVE at all
    assert _receive(router, QUIET_MS) is None


def test_client_expecting_another_server_key_does_not_talk(net, keyring):
    net.gatekeeper({"worker": keyring.allowed("worker")})
    router, address = net.server(keyring.daemon)
    net.send_from(address, keyring.worker, KeyPair.generate().public)  # an impostor's key, as the client sees it
    assert _receive(router, QUIET_MS) is None


@pytest.mark.parametrize("mechanism", ["NULL", "PLAIN"])
def test_gatekeeper_admits_only_curve(net, keyring, mechanism):
    """A socket of the context that asks ZAP about NULL or PLAIN peers gets a refusal."""
    keeper = net.gatekeeper({"worker": keyring.allowed("worker")})
    router = net.socket(zmq.ROUTER)
    router.setsockopt(zmq.ZAP_DOMAIN, b"augserve")
    if mechanism == "PLAIN":
        router.setsockopt(zmq.PLAIN_SERVER, 1)
    address = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    dealer = net.socket(zmq.DEALER)
    if mechanism == "PLAIN":
        dealer.setsockopt(zmq.PLAIN_USERNAME, b"worker")
        dealer.setsockopt(zmq.PLAIN_PASSWORD, b"password")
    dealer.connect(address)
    dealer.send(b"hello")
    assert _receive(router, QUIET_MS) is None
    assert _eventually(lambda: keeper.refused == 1)
    assert keeper.recent_refusals[-1].mechanism == mechanism


def test_without_a_gatekeeper_nobody_gets_in(net, keyring):
    """ZAP is enforced: libzmq alone would admit every CURVE key when no handler answers."""
    router, address = net.server(keyring.daemon)
    net.send_from(address, keyring.worker, keyring.daemon.public)
    assert _receive(router, QUIET_MS) is None


def test_allow_and_replace_change_who_gets_in(net, keyring):
    keeper = net.gatekeeper({"worker": []})
    router, address = net.server(keyring.daemon)
    net.send_from(address, keyring.worker, keyring.daemon.public, b"before")
    assert _receive(router, QUIET_MS) is None and _eventually(lambda: keeper.refused == 1)

    keeper.allow("worker", [keyring.worker.public])
    net.send_from(address, keyring.worker, keyring.daemon.public, b"after")
    frames = _receive(router, ARRIVES_MS)
    assert frames is not None and frames[-1].bytes == b"after" and peer(frames[-1])[0] == "worker"

    keeper.replace("worker", [])
    net.send_from(address, keyring.worker, keyring.daemon.public, b"removed")
    assert _receive(router, QUIET_MS) is None and _eventually(lambda: keeper.refused == 2)

    keeper.allow("worker", [keyring.worker.public])
    with pytest.raises(ValueError, match="allowed as worker already; one key has one role"):
        keeper.allow("client", [keyring.worker.public])
    with pytest.raises(ValueError, match="unknown role"):
        keeper.allow("admin", [keyring.worker.public])
    with pytest.raises(ValueError, match="40 characters"):
        keeper.allow("worker", [b"short"])


def test_zap_protocol_answers_and_bounded_memory(net, keyring):
    """The handler speaks RFC 27 to any requester on the context's ZAP endpoint."""
    keeper = net.gatekeeper({"client": [keyring.client.public]}, log_interval=3600)
    requester = net.socket(zmq.REQ)
    requester.connect(security.ZAP_ENDPOINT)

    def ask(*frames: bytes) -> list[bytes]:
        requester.send_multipart(list(frames))
        assert requester.poll(ARRIVES_MS), "the ZAP handler did not answer"
        return requester.recv_multipart()

    raw = zmq.utils.z85.decode(keyring.client.public)
    assert ask(b"1.0", b"7", b"augserve", b"10.0.0.9", b"", b"CURVE", raw) == [b"1.0", b"7", b"200", b"OK", f"client:{keyring.client.public.decode()}".encode(), b""]
    assert ask(b"1.0", b"8", b"augserve", b"10.0.0.9", b"", b"CURVE", b"\0" * 32)[2] == b"400"
    assert ask(b"1.0", b"9", b"augserve", b"10.0.0.9", b"", b"NULL")[2] == b"400"
    assert ask(b"1.0", b"10", b"augserve", b"10.0.0.9", b"", b"CURVE", b"too short")[2] == b"400"
    assert ask(b"9.9", b"11", b"augserve", b"10.0.0.9", b"", b"CURVE", raw)[2] == b"500"
    assert ask(b"1.0", b"12")[1:3] == [b"12", b"500"]
    assert keeper.refused == 5
    for n in range(Gatekeeper.REMEMBER + 10):
        ask(b"1.0", str(n).encode(), b"augserve", b"10.0.0.9", b"", b"NULL")
    assert keeper.refused == 5 + Gatekeeper.REMEMBER + 10
    assert len(keeper.recent_refusals) == Gatekeeper.REMEMBER


def test_refusals_are_logged_at_a_bounded_rate(net, keyring, caplog):
    keeper = net.gatekeeper({"worker": keyring.allowed("worker")}, log_interval=3600)
    router, address = net.server(keyring.daemon)
    with caplog.at_level(logging.WARNING, logger="augserve.security"):
        for _ in range(3):
            net.send_from(address, KeyPair.generate(), keyring.daemon.public)
        assert _eventually(lambda: keeper.refused == 3)
    lines = [r.getMessage() for r in caplog.records if r.name == "augserve.security"]
    assert len(lines) == 1 and "refused key" in lines[0] and "127.0.0.1" in lines[0], lines


def test_one_gatekeeper_per_context_and_a_prompt_stop(net, keyring):
    keeper = net.gatekeeper({})
    with pytest.raises(ValueError, match="one Gatekeeper per context"):
        Gatekeeper(net.context, {}).start()
    started = time.monotonic()
    keeper.stop()
    assert time.monotonic() - started < 2.0 and not keeper.running
    with Gatekeeper(net.context, {"worker": [keyring.worker.public]}) as again:  # the endpoint is free again
        assert again.running
    assert not again.running


def test_peer_without_authentication_is_none(net):
    router, address = net.server(None)
    net.send_from(address)
    frames = _receive(router, ARRIVES_MS)
    assert frames is not None and peer(frames[-1]) is None
    with pytest.raises(TypeError, match="copy=False"):
        peer(b"hello")


def test_secure_socket_options_are_checked(net, keyring, tmp_path):
    public_only = KeyPair(keyring.daemon.public)
    with pytest.raises(ValueError, match="secret key"):
        secure_server(net.socket(zmq.ROUTER), public_only)
    with pytest.raises(ValueError, match="secret key"):
        secure_client(net.socket(zmq.DEALER), public_only, keyring.daemon.public)
    with pytest.raises(ValueError, match="server public key"):
        secure_client(net.socket(zmq.DEALER), keyring.worker, b"x" * 40 + b"y")
    with pytest.raises(ValueError, match="domain"):
        secure_server(net.socket(zmq.ROUTER), keyring.daemon, domain="")
    bound, _ = net.server(None)
    with pytest.raises(ValueError, match="before the socket binds"):
        secure_server(bound, keyring.daemon)


def test_keypair_validation_and_repr(keyring):
    with pytest.raises(ValueError, match="does not belong"):
        KeyPair(keyring.worker.public, keyring.client.secret)
    assert keyring.worker.secret.decode() not in repr(keyring.worker) and keyring.worker.secret.decode() not in repr(keyring)
    assert KeyPair(keyring.worker.public.decode(), keyring.worker.secret.decode()) == keyring.worker  # str accepted


# --- key files -----------------------------------------------------------------------------------------


def test_keyring_files_modes_and_format(tmp_path):
    directory = tmp_path / "config" / "augserve" / "keys"
    previous = os.umask(0)  # the modes must not depend on the umask
    try:
        keyring = Keyring.load(directory)
    finally:
        os.umask(previous)
    assert _mode(directory) == 0o700
    for name in security.PAIRS:
        assert _mode(directory / f"{name}.key_secret") == 0o600
        assert _mode(directory / f"{name}.key") == 0o644
        # The ZeroMQ certificate format: pyzmq (and czmq) read our files.
        assert zmq.auth.load_certificate(directory / f"{name}.key_secret") == (keyring.pair(name).public, keyring.pair(name).secret)
        assert zmq.auth.load_certificate(directory / f"{name}.key") == (keyring.pair(name).public, None)
    assert len({keyring.daemon.public, keyring.worker.public, keyring.client.public}) == 3
    assert Keyring.load(directory, create=False) == keyring  # the second load reads, and reads the same


def test_a_complete_keyring_is_only_read(keyring, monkeypatch):
    """A read-only mount (containers) works: loading a complete keyring writes nothing."""

    def no_write(*args, **kwargs):
        raise AssertionError("wrote a file")

    monkeypatch.setattr(security, "_write_file", no_write)
    assert Keyring.load(keyring.directory, create=True) == keyring


def test_group_readable_secret_is_refused_with_the_fix(keyring):
    secret = keyring.directory / "worker.key_secret"
    os.chmod(secret, 0o640)
    with pytest.raises(ValueError, match=rf"{secret}.*readable by group/others.*chmod 600 {secret}"):
        Keyring.load(keyring.directory)
    os.chmod(secret, 0o600)
    assert Keyring.load(keyring.directory) == keyring


def test_group_writable_directory_is_refused(keyring):
    os.chmod(keyring.directory, 0o770)
    with pytest.raises(ValueError, match=rf"writable by group/others.*chmod 700 {keyring.directory}"):
        Keyring.load(keyring.directory)


def test_missing_keys_without_create(tmp_path):
    with pytest.raises(ValueError, match=rf"no augserve keys in {tmp_path / 'nothing'}.*augserve keys create --keys-dir {tmp_path / 'nothing'}"):
        Keyring.load(tmp_path / "nothing", create=False)
    assert not (tmp_path / "nothing").exists()


def test_mismatched_public_file_is_refused(keyring):
    (keyring.directory / "client.key").write_text(f'curve\n    public-key = "{KeyPair.generate().public.decode()}"\n')
    with pytest.raises(ValueError, match="client.key does not match"):
        Keyring.load(keyring.directory)


def test_concurrent_first_use_agrees_on_one_keyring(tmp_path):
    results, errors = [], []

    def load():
        try:
            results.append(Keyring.load(tmp_path / "shared"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and len(results) == 6
    assert all(result == results[0] for result in results)


def test_create_keeps_or_replaces(tmp_path):
    keyring, written = Keyring.create(tmp_path / "k")
    assert written == security.PAIRS
    again, written = Keyring.create(tmp_path / "k")
    assert again == keyring and written == ()
    keyring.allow("worker", KeyPair.generate().public, "gpu-box")
    fresh, written = Keyring.create(tmp_path / "k", force=True)
    assert written == security.PAIRS
    assert all(fresh.pair(name).public != keyring.pair(name).public for name in security.PAIRS)
    assert set(fresh.allowed_named("worker")) == {"gpu-box"}  # other hosts' keys survive


def test_allow_validates_and_writes_a_certificate(keyring):
    other = KeyPair.generate()
    path = keyring.allow("worker", other.public, "gpu-box.2")
    assert path == keyring.directory / "allowed" / "worker" / "gpu-box.2.key"
    assert zmq.auth.load_certificate(path) == (other.public, None)
    assert _mode(keyring.directory / "allowed") == 0o700 and _mode(path.parent) == 0o700
    assert keyring.allowed("worker") == {keyring.worker.public, other.public}
    assert keyring.allowed("client") == {keyring.client.public}
    bare = KeyPair.generate().public
    (path.parent / "by-hand.key").write_text(bare.decode() + "\n")  # `echo KEY > allowed/worker/NAME.key`
    assert bare in keyring.allowed("worker")

    good = KeyPair.generate().public
    for role, public, name, message in [
        ("worker", good[:39], "a", "40 characters"),
        ("worker", good[:39] + b" ", "a", "outside the Z85 alphabet"),
        ("worker", '"' * 40, "a", "outside the Z85 alphabet"),
        ("worker", "é" * 40, "a", "non-ASCII"),
        ("worker", good, "../escape", "key name"),
        ("worker", good, "a/b", "key name"),
        ("worker", good, ".hidden", "key name"),
        ("worker", good, "", "key name"),
        ("admin", good, "a", "unknown role"),
        ("client", other.public, "a", "already allowed as worker"),
        ("worker", keyring.daemon.public, "a", "daemon's own key"),
    ]:
        with pytest.raises(ValueError, match=message):
            keyring.allow(role, public, name)
    assert sorted(p.name for p in (keyring.directory / "allowed" / "worker").iterdir()) == ["by-hand.key", "gpu-box.2.key"]


def test_a_secret_in_an_allowed_file_is_refused(keyring):
    other = KeyPair.generate()
    folder = keyring.directory / "allowed" / "client"
    folder.mkdir(parents=True, mode=0o700)
    (folder / "leak.key").write_text(f'curve\n    public-key = "{other.public.decode()}"\n    secret-key = "{other.secret.decode()}"\n')
    with pytest.raises(ValueError, match="leak.key holds a secret key"):
        keyring.allowed("client")


# --- bundles --------------------------------------------------------------------------------------------


def test_export_import_round_trip_and_the_keys_work(net, keyring, tmp_path):
    keyring.allow("worker", KeyPair.generate().public, "remote-worker")
    bundle = keyring.export_bundle("client")
    assert keyring.client.secret.decode() in bundle and "SECRET" in bundle.split("augserve-key-bundle")[0]

    trainer = Keyring.import_bundle(bundle, tmp_path / "trainer-host")
    assert trainer.daemon == KeyPair(keyring.daemon.public) and trainer.daemon.secret is None
    assert trainer.client == keyring.client
    assert keyring.allowed("worker") <= trainer.allowed("worker")  # the trainer's data socket admits the workers
    assert _mode(trainer.directory / "client.key_secret") == 0o600 and _mode(trainer.directory) == 0o700

    worker = Keyring.import_bundle(keyring.export_bundle("worker"), tmp_path / "worker-host")
    assert worker.worker == keyring.worker and worker.daemon.secret is None
    assert Keyring.import_bundle(bundle, tmp_path / "trainer-host") == trainer  # importing again changes nothing

    # The imported keys on real sockets: trainer -> daemon (control), worker -> trainer (data).
    net.gatekeeper({role: keyring.allowed(role) | trainer.allowed(role) for role in security.ROLES})
    control, control_address = net.server(keyring.daemon)
    net.send_from(control_address, trainer.client, trainer.daemon.public, b"attach")
    frames = _receive(control, ARRIVES_MS)
    assert frames is not None and peer(frames[-1]) == ("client", keyring.client.public.decode())
    data, data_address = net.server(trainer.client)
    net.send_from(data_address, worker.worker, trainer.client.public, b"batch")
    frames = _receive(data, ARRIVES_MS)
    assert frames is not None and peer(frames[-1]) == ("worker", keyring.worker.public.decode())


def _replace_line(bundle: str, prefix: str, new: str | None) -> str:
    lines = [line for line in bundle.splitlines() if not line.startswith(prefix)]
    if new is not None:
        lines.append(new)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda b, k: b.replace("augserve-key-bundle 1", "augserve-key-bundle 9"), "not an augserve key bundle"),
        (lambda b, k: "", "not an augserve key bundle"),
        (lambda b, k: _replace_line(b, "secret ", f"secret {KeyPair.generate().secret.decode()}"), "does not belong"),
        (lambda b, k: _replace_line(b, "secret ", None), "missing secret"),
        (lambda b, k: _replace_line(b, "role ", "role admin"), "unknown role"),
        (lambda b, k: _replace_line(b, "daemon-public ", "daemon-public tooshort"), "daemon-public is not a Z85"),
        (lambda b, k: b + f"public {k.client.public.decode()}\n", "cannot read line"),
        (lambda b, k: b + "surprise here\n", "cannot read line"),
        (lambda b, k: b + f"allow worker ../x {k.worker.public.decode()}\n", "key name"),
    ],
)
def test_import_refuses_a_bad_bundle(keyring, tmp_path, tamper, message):
    with pytest.raises(ValueError, match=message):
        Keyring.import_bundle(tamper(keyring.export_bundle("client"), keyring), tmp_path / "other")
    assert not (tmp_path / "other" / "client.key_secret").exists()


def test_import_never_replaces_a_daemon_secret(keyring, tmp_path):
    other = Keyring.load(tmp_path / "other-daemon")
    with pytest.raises(ValueError, match="secret key of another daemon"):
        Keyring.import_bundle(other.export_bundle("worker"), keyring.directory)
    assert Keyring.load(keyring.directory) == keyring


def test_default_keys_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(security.KEYS_DIR_ENV, str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_keys_dir() == tmp_path / "explicit"
    monkeypatch.delenv(security.KEYS_DIR_ENV)
    assert default_keys_dir() == tmp_path / "xdg" / "augserve" / "keys"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_keys_dir() == tmp_path / "home" / ".config" / "augserve" / "keys"


# --- local addresses ------------------------------------------------------------------------------------


def test_private_ipc_dir_under_xdg_runtime_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = private_ipc_dir()
    assert path == tmp_path / "augserve" and _mode(path) == 0o700
    assert private_ipc_dir() == path  # an existing, private one is fine
    os.chmod(path, 0o755)
    with pytest.raises(ValueError, match=rf"{path} is open to group/others.*chmod 700"):
        private_ipc_dir()
    os.chmod(path, 0o700)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(path).st_uid + 1)
    with pytest.raises(ValueError, match=rf"{path} belongs to uid"):
        private_ipc_dir()


def test_private_ipc_dir_in_the_temp_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(security.tempfile, "gettempdir", lambda: str(tmp_path))
    expected = tmp_path / f"augserve-{os.getuid()}"
    expected.symlink_to(tmp_path)  # planted by someone else before us
    with pytest.raises(ValueError, match="not a directory"):
        private_ipc_dir()
    expected.unlink()
    assert private_ipc_dir() == expected and _mode(expected) == 0o700


@pytest.mark.parametrize(
    "address, local",
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.3.2.1:*", True),
        ("tcp://localhost:5555", True),
        ("tcp://LOCALHOST:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://[::ffff:127.0.0.1]:5555", True),
        ("ipc:///run/user/1000/augserve/control", True),
        ("ipc://@abstract", True),
        ("inproc://control", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://[::]:5555", False),
        ("tcp://192.168.1.4:5555", False),
        ("tcp://daemon:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://127.0.0.1:5000;192.168.1.4:5555", False),
        ("tcp://127.0.0.1:0;127.0.0.1:5555", True),
        ("ws://127.0.0.1:5555", False),
        ("pgm://127.0.0.1;239.192.1.1:5555", False),
    ],
)
def test_is_loopback_address(address, local):
    assert is_loopback_address(address) is local


def test_is_loopback_address_needs_an_address():
    with pytest.raises(ValueError, match="not a ZeroMQ address"):
        is_loopback_address("127.0.0.1:5555")


# --- the `augserve keys` command ------------------------------------------------------------------------


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_create_show_and_force(tmp_path, capsys):
    keys = str(tmp_path / "keys")
    code, out, err = _run(capsys, "keys", "show", "--keys-dir", keys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("augserve: error: no augserve keys") and "augserve keys create" in err

    code, out, _ = _run(capsys, "keys", "create", "--keys-dir", keys)
    assert code == 0 and "created the daemon, worker, client key pair(s)" in out
    keyring = Keyring.load(keys, create=False)

    code, out, _ = _run(capsys, "keys", "--keys-dir", keys)  # plain `augserve keys` shows
    assert code == 0 and keyring.worker.public.decode() in out and keyring.worker.secret.decode() not in out
    code, out, _ = _run(capsys, "keys", "--keys-dir", keys, "show", "--json")  # the flag before the action counts
    shown = json.loads(out.splitlines()[-1])
    assert shown["directory"] == keys and shown["public_keys"]["client"] == keyring.client.public.decode()
    assert shown["secret_keys"] == {"daemon": True, "worker": True, "client": True} and shown["allowed"] == {"worker": {}, "client": {}}

    code, out, _ = _run(capsys, "keys", "create", "--keys-dir", keys)
    assert code == 0 and "exist already" in out and Keyring.load(keys) == keyring
    code, out, _ = _run(capsys, "keys", "create", "--force", "--json", "--keys-dir", keys)
    assert code == 0 and json.loads(out)["created"] == ["daemon", "worker", "client"]
    assert Keyring.load(keys).daemon != keyring.daemon


def test_cli_default_directory_comes_from_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(security.KEYS_DIR_ENV, str(tmp_path / "env-keys"))
    code, out, _ = _run(capsys, "keys", "create", "--json")
    assert code == 0 and json.loads(out)["directory"] == str(tmp_path / "env-keys")


def test_cli_export_import_allow(tmp_path, capsys, monkeypatch):
    daemon_keys, worker_keys = str(tmp_path / "daemon"), str(tmp_path / "worker")
    keyring = Keyring.load(daemon_keys)
    bundle = tmp_path / "worker.keys"
    bundle.write_text("old")
    os.chmod(bundle, 0o644)
    code, out, _ = _run(capsys, "keys", "export", "--role", "worker", "--out", str(bundle), "--keys-dir", daemon_keys)
    assert code == 0 and "SECRET" in out and _mode(bundle) == 0o600
    assert keyring.worker.secret.decode() in bundle.read_text()

    code, out, _ = _run(capsys, "keys", "import", str(bundle), "--keys-dir", worker_keys, "--json")
    assert code == 0
    imported = json.loads(out)
    assert imported["public_keys"]["daemon"] == keyring.daemon.public.decode() and imported["secret_keys"]["daemon"] is False
    assert Keyring.load(worker_keys).worker == keyring.worker

    code, out, _ = _run(capsys, "keys", "export", "--role", "client", "--keys-dir", daemon_keys)  # to stdout
    assert code == 0 and out.count("augserve-key-bundle 1") == 1
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(out))
    code, _, _ = _run(capsys, "keys", "import", "-", "--keys-dir", str(tmp_path / "trainer"))
    assert code == 0 and Keyring.load(tmp_path / "trainer").client == keyring.client

    other = KeyPair.generate().public.decode()
    code, out, _ = _run(capsys, "keys", "allow", "--role", "client", "--name", "laptop", other, "--keys-dir", daemon_keys)
    assert code == 0 and "laptop" in out
    assert other.encode() in Keyring.load(daemon_keys).allowed("client")
    code, out, _ = _run(capsys, "keys", "show", "--json", "--keys-dir", daemon_keys)
    assert json.loads(out)["allowed"]["client"] == {"laptop": other}

    for argv, message in [
        (["keys", "allow", "--role", "client", "--name", "bad", "not-a-key"], "not a Z85 CURVE key"),
        (["keys", "allow", "--role", "worker", "--name", "../up", other], "key name"),
        (["keys", "import", str(tmp_path / "missing.keys")], "cannot read"),
        (["keys", "import", str(tmp_path / "daemon" / "worker.key")], "not an augserve key bundle"),
        (["keys", "export", "--role", "worker", "--out", str(tmp_path / "no" / "such" / "dir" / "f")], "cannot write"),
    ]:
        code, out, err = _run(capsys, *argv, "--keys-dir", daemon_keys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("augserve: error:") and message in err, (argv, err)


def test_cli_allow_takes_a_key_that_starts_with_a_dash(tmp_path, capsys):
    """One Z85 key in 85 starts with '-', which argparse would read as an option; it is taken as the key,
    before or after the other flags, and after an explicit '--'."""
    keys = str(tmp_path / "keys")
    Keyring.load(keys)
    dashed = "-" + KeyPair.generate().public.decode()[1:]
    for name, argv in (("first", [dashed, "--keys-dir", keys]), ("second", ["--keys-dir", keys, "--", dashed]), ("third", ["--json", dashed, "--keys-dir", keys])):
        code, out, err = _run(capsys, "keys", "allow", "--role", "worker", "--name", name, *argv)
        assert code == 0, err
        assert Keyring.load(keys).allowed_named("worker")[name] == dashed.encode()
