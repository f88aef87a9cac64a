"""CurveZMQ for augserve: key files, the ZAP handler that admits peers by role, and address checks.

Trust model: every TCP socket of the service is CURVE-encrypted. The daemon's control socket is a
CURVE server holding the *daemon* key; workers present the *worker* key, trainers and the CLI the
*client* key (a trainer's data socket is a CURVE server with that same client key, and workers connect
to it). A :class:`Gatekeeper` — the ZAP handler of a ``zmq.Context`` — admits a peer only when its
public key is allowed for a role, and tags the connection with the User-Id ``"role:<Z85 public key>"``,
so every frame received on it says who sent it (:func:`peer`).

Keys live in one directory per user (:func:`default_keys_dir`), in the ZeroMQ certificate format that
czmq and pyzmq (``zmq.auth.load_certificate``) read too::

    <dir>/daemon.key  daemon.key_secret      the daemon's server key (secret only on the daemon's host)
    <dir>/worker.key  worker.key_secret      the key workers present
    <dir>/client.key  client.key_secret      the key trainers and the CLI present
    <dir>/allowed/worker/NAME.key            public keys of other hosts' workers
    <dir>/allowed/client/NAME.key            ... and of other hosts' trainers

All keys are Z85 text (40 ASCII characters for 32 bytes), as bytes. The directory is created 0700 and
secret files 0600; a secret file that group or others can read is refused, never silently used.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import errno
import fcntl
import ipaddress
import logging
import os
import re
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import zmq
from zmq.utils import z85

log = logging.getLogger("augserve.security")

KEYS_DIR_ENV = "AUGSERVE_KEYS_DIR"
ROLES = ("worker", "client")
PAIRS = ("daemon", *ROLES)  # the key pairs of a keyring, in file-name order
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27: libzmq asks this endpoint of the socket's context
ZAP_VERSION = b"1.0"
BUNDLE_HEADER = "augserve-key-bundle 1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def default_keys_dir() -> Path:
    """``$AUGSERVE_KEYS_DIR``, else ``$XDG_CONFIG_HOME/augserve/keys``, else ``~/.config/augserve/keys``."""
    explicit = os.environ.get(KEYS_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME")
    base = Path(config) if config and os.path.isabs(config) else Path.home() / ".config"  # relative values are invalid (XDG spec)
    return base / "augserve" / "keys"


def z85_key(value: bytes | str, what: str = "key") -> bytes:
    """``value`` as a Z85 CURVE key (40 ASCII bytes decoding to 32); ValueError naming ``what`` otherwise."""
    if isinstance(value, str):
        try:
            value = value.strip().encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"{what} is not a Z85 key: it has non-ASCII characters") from None
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes or str, got {type(value).__name__}")
    if len(value) != 40:
        raise ValueError(f"{what} is not a Z85 CURVE key: expected 40 characters, got {len(value)}")
    try:
        raw = z85.decode(value)
    except (ValueError, KeyError, IndexError, OverflowError):
        raise ValueError(f"{what} is not a Z85 CURVE key: {value.decode('ascii', 'replace')!r} has characters outside the Z85 alphabet") from None
    if len(raw) != 32:
        raise ValueError(f"{what} is not a Z85 CURVE key: decodes to {len(raw)} bytes, not 32")
    return value


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    return role


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"key name {name!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair in Z85. ``secret`` is None for a public-only key (e.g. an imported daemon key)."""

    public: bytes
    secret: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "public", z85_key(self.public, "public key"))
        if self.secret is not None:
            object.__setattr__(self, "secret", z85_key(self.secret, "secret key"))
            if zmq.curve_public(self.secret) != self.public:
                raise ValueError(f"the secret key does not belong to public key {self.public.decode()}")

    @classmethod
    def generate(cls) -> KeyPair:
        _require_curve()
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    def __repr__(self) -> str:  # never print a secret key into a log or a traceback
        return f"KeyPair(public={self.public.decode()!r}, secret={'<hidden>' if self.secret else None})"


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise ValueError(f"this libzmq ({zmq.zmq_version()}) was built without CURVE security")


# --- files -----------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _check_private_dir(path: Path) -> None:
    """Refuse a key directory others could write into: they could replace keys or allow their own."""
    mode = _mode(path)
    if mode & 0o022:
        raise ValueError(f"{path} is writable by group/others (mode {mode:04o}), so anyone could replace its keys; fix with `chmod 700 {path}`")


def _check_secret_file(path: Path) -> None:
    mode = _mode(path)
    if mode & 0o077:
        raise ValueError(f"{path} is readable by group/others (mode {mode:04o}); a secret key must be private: fix with `chmod 600 {path}`")


def _make_private_dir(path: Path) -> None:
    """``path`` and its missing parents; the ones created here get mode 0700 whatever the umask."""
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            directory.mkdir(mode=0o700)
            os.chmod(directory, 0o700)
    if not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")


def _write_file(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` atomically (a reader sees the old file or the new one), with ``mode``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask may have taken bits away; a public key stays readable
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _certificate(title: str, public: bytes, secret: bytes | None) -> str:
    """The ZeroMQ certificate format (czmq's zcert, pyzmq's zmq.auth), so other tools read our files."""
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if secret is None:
        banner = f"#   ZeroMQ CURVE Public Certificate: {title}\n#   Generated on {stamp} by augserve. Safe to share.\n"
    else:
        banner = f"#   ZeroMQ CURVE **Secret** Certificate: {title}\n#   Generated on {stamp} by augserve.\n#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n"
    lines = [banner, "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a certificate file, or from a file holding one bare Z85 key."""
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a key file (not ASCII text)") from None
    except PermissionError:  # typically a container user reading keys made by the host's user
        raise ValueError(f"cannot read {path}: it belongs to uid {path.stat().st_uid} and you are uid {os.getuid()}; chown it to the user that runs augserve") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    values: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition("=")
        if sep and name.strip() in ("public-key", "secret-key"):
            values[name.strip()] = value.strip().strip("\"'")
    if not values and len(lines) == 1:
        values["public-key"] = lines[0]  # `echo KEY > allowed/worker/NAME.key`
    if "public-key" not in values:
        raise ValueError(f"{path} holds no public-key")
    public = z85_key(values["public-key"], f"public-key in {path}")
    secret = z85_key(values["secret-key"], f"secret-key in {path}") if "secret-key" in values else None
    return public, secret


def _read_public(path: Path) -> bytes:
    public, secret = _read_certificate(path)
    if secret is not None:
        raise ValueError(f"{path} holds a secret key but is a public file; move it to {path.name}_secret with `chmod 600`")
    return public


def _read_pair(directory: Path, name: str) -> KeyPair | None:
    public_file, secret_file = directory / f"{name}.key", directory / f"{name}.key_secret"
    if secret_file.exists():
        _check_secret_file(secret_file)
        public, secret = _read_certificate(secret_file)
        if secret is None:
            raise ValueError(f"{secret_file} holds no secret-key")
        try:
            pair = KeyPair(public, secret)
        except ValueError as exc:
            raise ValueError(f"{secret_file}: {exc}") from None
        if public_file.exists() and _read_public(public_file) != public:
            raise ValueError(f"{public_file} does not match {secret_file}; remove the stale one or run `augserve keys create --force`")
        return pair
    if public_file.exists():
        return KeyPair(_read_public(public_file))
    return None


def _write_pair(directory: Path, name: str, pair: KeyPair) -> None:
    secret_file = directory / f"{name}.key_secret"
    if pair.secret is None:
        secret_file.unlink(missing_ok=True)  # first, so the public file never meets a stale secret
    else:
        _write_file(secret_file, _certificate(f"augserve {name} key", pair.public, pair.secret), 0o600)
    _write_file(directory / f"{name}.key", _certificate(f"augserve {name} key", pair.public, None), 0o644)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialize writers of one key directory (the daemon's workers all load it at once on first use)."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _writing(directory: Path) -> Iterator[None]:
    """Turn an OSError while writing keys into the one-line error a user can act on."""
    try:
        yield
    except OSError as exc:
        raise ValueError(f"cannot write keys in {directory}: {exc.strerror or exc}") from None


def _missing(directory: Path, what: str) -> ValueError:
    hint = "augserve keys create" if directory == default_keys_dir() else f"augserve keys create --keys-dir {directory}"
    return ValueError(f"{what} in {directory}: run `{hint}` (or import a bundle with `augserve keys import FILE`)")


def _resolve(directory: str | os.PathLike | None) -> Path:
    return (default_keys_dir() if directory is None else Path(directory)).expanduser()


# --- keyring ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keyring:
    """One user's keys. Directory mode 0700, secret files 0600 (a secret file readable by group/others
    is refused, naming it and the chmod that fixes it)."""

    directory: Path
    daemon: KeyPair  # the daemon's CURVE server key (secret None on a host that only imported it)
    worker: KeyPair  # the key workers present
    client: KeyPair  # the key trainers/CLI present; also the server key of a trainer's data socket

    @classmethod
    def load(cls, directory: str | os.PathLike | None = None, create: bool = True) -> Keyring:
        """The keyring in ``directory`` (default :func:`default_keys_dir`); with ``create``, missing key
        pairs (and the directory) are generated. A complete keyring is only read, so a read-only mount works."""
        directory = _resolve(directory)
        if not directory.is_dir():
            if not create:
                raise _missing(directory, "no augserve keys")
            with _writing(directory):
                _make_private_dir(directory)
        _check_private_dir(directory)
        pairs = {name: _read_pair(directory, name) for name in PAIRS}
        missing = [name for name, pair in pairs.items() if pair is None]
        if missing and not create:
            raise _missing(directory, f"no {' and '.join(missing)} key")
        if missing:
            with _writing(directory), _locked(directory):
                for name in missing:
                    pair = _read_pair(directory, name)  # another process may have written it meanwhile
                    if pair is None:
                        pair = KeyPair.generate()
                        _write_pair(directory, name, pair)
                        log.info("created the %s key pair in %s", name, directory)
                    pairs[name] = pair
        return cls(directory, **pairs)

    @classmethod
    def create(cls, directory: str | os.PathLike | None = None, force: bool = False) -> tuple[Keyring, tuple[str, ...]]:
        """Generate the missing key pairs (``force``: all three, replacing the old ones; allowed keys stay).
        Returns the keyring and the names of the pairs written."""
        directory = _resolve(directory)
        if not force:
            before = {name for name in PAIRS if directory.is_dir() and _read_pair(directory, name) is not None}
            keyring = cls.load(directory, create=True)
            return keyring, tuple(name for name in PAIRS if name not in before)
        with _writing(directory):
            _make_private_dir(directory)
            _check_private_dir(directory)
            with _locked(directory):
                for name in PAIRS:
                    _write_pair(directory, name, KeyPair.generate())
        return cls.load(directory, create=False), PAIRS

    def pair(self, name: str) -> KeyPair:
        if name not in PAIRS:
            raise ValueError(f"unknown key pair {name!r}; pairs are {', '.join(PAIRS)}")
        return getattr(self, name)

    def _allowed_files(self, role: str) -> list[Path]:
        folder = self.directory / "allowed" / _check_role(role)
        if not folder.is_dir():
            return []
        _check_private_dir(folder.parent)
        _check_private_dir(folder)
        return sorted(folder.glob("*.key"))

    def allowed(self, role: str) -> frozenset[bytes]:
        """Public keys admitted as ``role``: this keyring's own key of that role plus ``allowed/<role>/*.key``."""
        return frozenset({self.pair(role).public, *(_read_public(path) for path in self._allowed_files(role))})

    def allowed_named(self, role: str) -> dict[str, bytes]:
        """``allowed/<role>/`` as {name: public key} (without this keyring's own key)."""
        return {path.stem: _read_public(path) for path in self._allowed_files(role)}

    def allow(self, role: str, public: bytes | str, name: str) -> Path:
        """Admit ``public`` as ``role``: writes ``allowed/<role>/<name>.key`` (replacing that name's key)."""
        _check_role(role)
        public = z85_key(public, "public key")
        _check_name(name)
        for other in ROLES:
            if other != role and public in self.allowed(other):
                raise ValueError(f"{public.decode()} is already allowed as {other}; one key has one role")
        if public == self.daemon.public:
            raise ValueError("that is the daemon's own key, not a worker's or a client's")
        folder = self.directory / "allowed" / role
        with _writing(self.directory):
            _make_private_dir(folder)
            _check_private_dir(folder.parent)
            _check_private_dir(folder)
            path = folder / f"{name}.key"
            _write_file(path, _certificate(f"augserve {role} {name}", public, None), 0o644)
        return path

    def export_bundle(self, role: str) -> str:
        """Text for another host: the daemon's public key and this ``role``'s key pair, secret included.
        A client bundle also carries the worker keys, which a trainer's data socket must admit."""
        pair = self.pair(_check_role(role))
        if pair.secret is None:
            raise ValueError(f"{self.directory} has no {role} secret key to export")
        host = socket.gethostname()
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        lines = [
            f"# augserve keys for a {role} host: the daemon's public key and the {role} key pair.",
            f"# Exported from {self.directory} on {host} at {stamp}.",
            f"# WARNING: this text holds the {role} SECRET key: whoever has it is admitted as a {role}.",
            "# Copy it over a secure channel, run `augserve keys import FILE` on the other host, then delete it.",
            BUNDLE_HEADER,
            f"daemon-public {self.daemon.public.decode()}",
            f"role {role}",
            f"public {pair.public.decode()}",
            f"secret {pair.secret.decode()}",
        ]
        if role == "client":
            own = f"worker-of-{z85.decode(self.daemon.public)[:4].hex()}"
            lines.append(f"allow worker {own} {self.worker.public.decode()}")
            lines += [f"allow worker {name} {key.decode()}" for name, key in self.allowed_named("worker").items() if key != self.worker.public]
        return "\n".join(lines) + "\n"

    @classmethod
    def import_bundle(cls, text: str, directory: str | os.PathLike | None = None) -> Keyring:
        """Write a bundle's daemon public key, role pair and allowed keys into ``directory``. Refused when
        that directory holds the secret key of another daemon (it would stop being that daemon)."""
        daemon_public, role, pair, allow = _parse_bundle(text)
        directory = _resolve(directory)
        with _writing(directory):
            _make_private_dir(directory)
            _check_private_dir(directory)
            with _locked(directory):
                current = _read_pair(directory, "daemon")
                if current is not None and current.public != daemon_public and current.secret is not None:
                    raise ValueError(f"{directory} holds the secret key of another daemon ({current.public.decode()}); import into another --keys-dir")
                if current is None or current.public != daemon_public:
                    _write_pair(directory, "daemon", KeyPair(daemon_public))
                _write_pair(directory, role, pair)
        keyring = cls.load(directory, create=True)  # the other role's pair, if missing, is generated here
        for allowed_role, name, public in allow:
            if public != keyring.pair(allowed_role).public:
                keyring.allow(allowed_role, public, name)
        return keyring


def _parse_bundle(text: str) -> tuple[bytes, str, KeyPair, list[tuple[str, str, bytes]]]:
    if not isinstance(text, str):
        raise TypeError(f"a key bundle is text, got {type(text).__name__}")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines or lines[0] != BUNDLE_HEADER:
        raise ValueError(f"not an augserve key bundle: expected a line {BUNDLE_HEADER!r} (make one with `augserve keys export`)")
    fields: dict[str, str] = {}
    allow: list[tuple[str, str, bytes]] = []
    for number, line in enumerate(lines[1:], start=2):
        tokens = line.split()
        if tokens[0] == "allow" and len(tokens) == 4:
            allow.append((_check_role(tokens[1]), _check_name(tokens[2]), z85_key(tokens[3], f"bundle: allowed {tokens[1]} key {tokens[2]}")))
        elif tokens[0] in ("daemon-public", "role", "public", "secret") and len(tokens) == 2 and tokens[0] not in fields:
            fields[tokens[0]] = tokens[1]
        else:
            raise ValueError(f"bundle: cannot read line {number}: {line[:60]!r}")
    absent = [name for name in ("daemon-public", "role", "public", "secret") if name not in fields]
    if absent:
        raise ValueError(f"bundle: missing {', '.join(absent)}")
    role = _check_role(fields["role"])
    try:
        pair = KeyPair(fields["public"].encode("ascii", "replace"), fields["secret"].encode("ascii", "replace"))
    except ValueError as exc:
        raise ValueError(f"bundle: {role} key pair: {exc}") from None
    daemon_public = z85_key(fields["daemon-public"], "bundle: daemon-public")
    return daemon_public, role, pair, allow


# --- sockets ---------------------------------------------------------------------------------------


def _unused(sock: zmq.Socket, what: str) -> None:
    if sock.get(zmq.LAST_ENDPOINT):
        raise ValueError(f"{what}() must be called before the socket binds or connects")


def secure_server(sock: zmq.Socket, keypair: KeyPair, domain: str = "augserve") -> None:
    """Make ``sock`` a CURVE server with ``keypair`` whose peers the context's ZAP handler must admit.
    Call before ``bind``. ZAP is enforced: with no :class:`Gatekeeper` running, nobody gets in (libzmq
    would otherwise admit every CURVE key when no handler answers)."""
    _require_curve()
    if keypair.secret is None:
        raise ValueError(f"a CURVE server needs a secret key; only the public key {keypair.public.decode()} is here")
    if not domain:
        raise ValueError("the ZAP domain must not be empty (an empty domain skips authentication)")
    _unused(sock, "secure_server")
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keypair.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keypair.public)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    try:
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (AttributeError, zmq.ZMQError):
        raise ValueError(f"libzmq {zmq.zmq_version()} cannot enforce ZAP (ZMQ_ZAP_ENFORCE_DOMAIN needs 4.3 or newer)") from None


def secure_client(sock: zmq.Socket, keypair: KeyPair, server_public: bytes) -> None:
    """Make ``sock`` a CURVE client presenting ``keypair`` to the server whose public key is
    ``server_public`` (a server holding another key is not talked to). Call before ``connect``."""
    _require_curve()
    if keypair.secret is None:
        raise ValueError(f"a CURVE client needs a secret key; only the public key {keypair.public.decode()} is here")
    server_public = z85_key(server_public, "server public key")
    _unused(sock, "secure_client")
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keypair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keypair.secret)


class Refusal(NamedTuple):
    time: float  # time.time()
    address: str  # the peer's IP address as libzmq reports it
    mechanism: str  # "CURVE", "NULL", "PLAIN"
    public_key: str | None  # Z85, for CURVE
    reason: str


class Gatekeeper:
    """ZAP handler (RFC 27) for one ``zmq.Context``: admits a CURVE peer whose public key is allowed for
    a role and refuses everything else (other keys, NULL, PLAIN), logging at most one line per
    ``log_interval`` seconds and counting refusals (:attr:`refused`; the last ``REMEMBER`` are kept in
    :attr:`recent_refusals`). An admitted connection gets User-Id ``f"{role}:{z85 public key}"``.

    Start it before any :func:`secure_server` socket of the context binds; stop it after they close.
    """

    REMEMBER = 64

    def __init__(self, context: zmq.Context, allowed: dict[str, Iterable[bytes]], log_interval: float = 10.0) -> None:
        self._context = context
        self._lock = threading.Lock()
        self._roles: dict[bytes, str] = {}  # replaced, never mutated: the handler thread reads it unlocked
        self._refused = 0
        self._recent: collections.deque[Refusal] = collections.deque(maxlen=self.REMEMBER)
        self._log_interval = log_interval
        self._last_log = float("-inf")
        self._unlogged = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for role, keys in allowed.items():
            self.allow(role, keys)

    def _update(self, role: str, keys: Iterable[bytes], replace: bool) -> None:
        _check_role(role)
        keys = {z85_key(key, f"{role} key") for key in keys}
        with self._lock:
            roles = {key: r for key, r in self._roles.items() if not (replace and r == role)}
            for key in keys:
                if roles.get(key, role) != role:
                    raise ValueError(f"key {key.decode()} is allowed as {roles[key]} already; one key has one role")
                roles[key] = role
            self._roles = roles

    def allow(self, role: str, keys: Iterable[bytes]) -> None:
        """Admit ``keys`` as ``role`` from the next handshake on (thread-safe; keys already allowed stay)."""
        self._update(role, keys, replace=False)

    def replace(self, role: str, keys: Iterable[bytes]) -> None:
        """Make ``keys`` the whole allow-list of ``role`` (e.g. re-read after a key was removed).
        Connections already admitted stay open: close them to drop a removed key's peer."""
        self._update(role, keys, replace=True)

    @property
    def refused(self) -> int:
        """Connections refused so far."""
        with self._lock:
            return self._refused

    @property
    def recent_refusals(self) -> tuple[Refusal, ...]:
        with self._lock:
            return tuple(self._recent)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Gatekeeper:
        if self._thread is not None:
            raise ValueError("this Gatekeeper is running already")
        sock = self._context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ZAP_ENDPOINT)  # bound here, so that a handshake right after start() finds it
        except zmq.ZMQError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ValueError("another ZAP handler already serves this zmq.Context (one Gatekeeper per context)") from None
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="augserve-zap", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout)
        if thread.is_alive():
            log.warning("the ZAP handler thread did not stop within %.1f s", timeout)

    def __enter__(self) -> Gatekeeper:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _serve(self, sock: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):  # ms: how long stop() may wait
                    continue
                request = sock.recv_multipart()
                try:
                    reply = self._answer(request)
                except Exception:  # a bug here must not leave libzmq waiting: that handshake fails, the rest go on
                    log.exception("the ZAP handler failed on a request; refusing it")
                    reply = [ZAP_VERSION, request[1] if len(request) > 1 else b"", b"500", b"internal error", b"", b""]
                sock.send_multipart(reply)
        except zmq.ContextTerminated:
            pass
        finally:
            sock.close(linger=0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply: [version, request id, status code, status text, user id, metadata]."""
        request_id = request[1] if len(request) > 1 else b""
        if len(request) < 6:
            return self._refuse(request_id, b"500", "malformed ZAP request", "?", "?", None)
        version, _, domain, address, _identity, mechanism = request[:6]
        credentials = request[6:]
        address_text, mechanism_text = address.decode("ascii", "replace"), mechanism.decode("ascii", "replace")
        if version != ZAP_VERSION:
            return self._refuse(request_id, b"500", f"unsupported ZAP version {version!r}", address_text, mechanism_text, None)
        if mechanism != b"CURVE":
            return self._refuse(request_id, b"400", f"{mechanism_text} security is not admitted (CURVE only)", address_text, mechanism_text, None)
        if len(credentials) != 1 or len(credentials[0]) != 32:
            return self._refuse(request_id, b"400", "malformed CURVE credentials", address_text, mechanism_text, None)
        public = z85.encode(credentials[0])
        role = self._roles.get(public)
        if role is None:
            return self._refuse(request_id, b"400", f"key not allowed in domain {domain.decode('ascii', 'replace')!r}", address_text, mechanism_text, public.decode())
        return [ZAP_VERSION, request_id, b"200", b"OK", f"{role}:{public.decode()}".encode(), b""]

    def _refuse(self, request_id: bytes, code: bytes, reason: str, address: str, mechanism: str, public: str | None) -> list[bytes]:
        now = time.monotonic()
        with self._lock:
            self._refused += 1
            self._recent.append(Refusal(time.time(), address, mechanism, public, reason))
            due = now - self._last_log >= self._log_interval
            if due:
                unlogged, self._unlogged, self._last_log = self._unlogged, 0, now
            else:
                self._unlogged += 1
            total = self._refused
        if due:
            who = f"key {public}" if public else mechanism
            more = f", {unlogged} more not logged since the last report" if unlogged else ""
            log.warning("refused %s from %s: %s (%d refused so far%s)", who, address, reason, total, more)
        return [ZAP_VERSION, request_id, code, reason.encode("utf-8", "replace")[:255], b"", b""]


def peer(frame: zmq.Frame) -> tuple[str, str] | None:
    """(role, Z85 public key) of the peer that sent ``frame`` (received with ``copy=False``); None when
    the connection was not authenticated (insecure mode) or carries no User-Id."""
    if not isinstance(frame, zmq.Frame):
        raise TypeError(f"peer() needs a zmq.Frame (recv with copy=False), got {type(frame).__name__}")
    try:
        user_id = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    if isinstance(user_id, bytes):
        user_id = user_id.decode("utf-8", "replace")
    if not user_id:
        return None
    role, sep, public = user_id.partition(":")
    if not sep or role not in ROLES:
        raise ValueError(f"User-Id {user_id!r} was not set by augserve's Gatekeeper")
    return role, z85_key(public, "User-Id key").decode()


# --- local addresses -------------------------------------------------------------------------------


def private_ipc_dir() -> Path:
    """A directory for this user's ipc:// sockets: ``$XDG_RUNTIME_DIR/augserve`` or
    ``<tempdir>/augserve-<uid>``, created 0700. One owned by another user, a symbolic link, or one
    that group/others can enter is refused (ValueError naming it)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        path = Path(runtime) / "augserve"
    else:
        path = Path(tempfile.gettempdir()) / f"augserve-{os.getuid()}"
    try:
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ValueError(f"cannot create {path}: {exc.strerror}") from None
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path} is not a directory (a symbolic link or a file): remove it")
    if info.st_uid != os.getuid():
        raise ValueError(f"{path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}): another user could read or replace its sockets; remove it or set XDG_RUNTIME_DIR")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ValueError(f"{path} is open to group/others (mode {mode:04o}); fix with `chmod 700 {path}`")
    return path


def _loopback_host(endpoint: str) -> bool:
    if endpoint.startswith("["):
        host = endpoint[1 : endpoint.find("]")] if "]" in endpoint else ""
    else:
        host = endpoint.rpartition(":")[0] if ":" in endpoint else endpoint
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False  # "*", another host name, an interface name: may be reachable from elsewhere
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_loopback_address(address: str) -> bool:
    """True when ``address`` cannot be reached from another host: ``tcp://`` on 127.x, ``localhost`` or
    ``[::1]``, ``ipc://``, ``inproc://``. ``tcp://0.0.0.0``, ``tcp://*``, other hosts and other transports: False."""
    scheme, sep, rest = str(address).partition("://")
    if not sep:
        raise ValueError(f"{address!r} is not a ZeroMQ address (tcp://HOST:PORT, ipc://PATH or inproc://NAME)")
    scheme = scheme.lower()
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    return all(_loopback_host(part) for part in rest.split(";"))  # "tcp://SOURCE;DEST": both must be local
