"""A trainer's or the CLI's line to a daemon: one authenticated DEALER, and one request/reply helper.

With keys (the default) the socket is a CurveZMQ client presenting this user's client key to the
daemon's public key, both from the keyring (:mod:`augserve.security`). When nothing answers, the
socket's handshake events say why in one line — a refused key, a daemon with another key or without
keys — instead of a bare time-out.
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq

from . import protocol as P
from . import security
from .config import check_address

_HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED


@dataclass(frozen=True)
class Credentials:
    """How to talk to a daemon: its keyring (``None``: insecure, for a daemon started with ``--insecure``)."""

    keyring: security.Keyring | None

    @classmethod
    def load(cls, keys_dir: str | None = None, insecure: bool = False) -> "Credentials":
        return cls(None if insecure else security.Keyring.load(keys_dir))  # first use creates them


def control_socket(context: zmq.Context, address: str, credentials: Credentials) -> tuple[zmq.Socket, zmq.Socket]:
    """A connected DEALER to the daemon at ``address`` and a monitor socket of its handshakes."""
    check_address(address, "daemon address")
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_HEADER_BYTES + 4096)
    if credentials.keyring is not None:
        security.secure_client(sock, credentials.keyring.client, credentials.keyring.daemon.public)
    monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
    sock.connect(address)
    return sock, monitor


def close_monitor(sock: zmq.Socket, monitor: zmq.Socket | None) -> None:
    """Stop monitoring ``sock`` and close the monitor (in that order: libzmq may stall a socket whose
    monitor endpoint vanished while it still reports to it)."""
    if monitor is None:
        return
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    monitor.close(linger=0)


def silence_reason(monitor: zmq.Socket, address: str, timeout: float, credentials: Credentials) -> str:
    """One line saying why the daemon at ``address`` did not answer, from the handshake events seen."""
    from zmq.utils.monitor import recv_monitor_message

    events = set()
    while monitor.poll(0):
        try:
            events.add(recv_monitor_message(monitor, flags=zmq.NOBLOCK)["event"])
        except (zmq.Again, zmq.ZMQError):
            break
    if zmq.EVENT_HANDSHAKE_FAILED_AUTH in events:
        return f"the daemon at {address} refused this client's key; allow it there with `augserve keys allow --role client ...` or import that daemon's bundle here (`augserve keys import`)"
    if events & {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}:
        if credentials.keyring is None:
            return f"the peer at {address} refused an unauthenticated connection: it runs with keys; drop insecure=True / --insecure"
        return f"the handshake with {address} failed: that daemon has another key than this keyring's, or runs --insecure (then pass insecure=True / --insecure)"
    return f"no augserve daemon answered at {address} within {timeout:g} s (is `augserve serve` running there?)"


def exchange(sock: zmq.Socket, monitor: zmq.Socket, address: str, body: P.Body, expected: set[str], timeout: float, credentials: Credentials) -> P.Message:
    """Send ``body`` on a connected control socket and wait for its reply (an ``error`` reply included).
    ConnectionError, saying why, when nothing answers or the peer is not a compatible daemon."""
    sock.send_multipart(P.encode(body))
    if not sock.poll(timeout=int(timeout * 1000)):
        raise ConnectionError(silence_reason(monitor, address, timeout, credentials))
    try:
        return P.decode(sock.recv_multipart(), expected | {"error"})
    except P.ProtocolError as exc:
        raise ConnectionError(f"the peer at {address} is not a compatible augserve daemon: {exc}") from None


def request(address: str, body: P.Body, expected: set[str], timeout: float = 5.0, credentials: Credentials | None = None) -> P.Message:
    """:func:`exchange` from a fresh connection, closed afterwards."""
    credentials = credentials or Credentials.load()
    context = zmq.Context()
    sock = monitor = None
    try:
        sock, monitor = control_socket(context, address, credentials)
        return exchange(sock, monitor, address, body, expected, timeout, credentials)
    finally:
        if sock is not None:
            close_monitor(sock, monitor)
            sock.close(linger=0)
        context.term()
