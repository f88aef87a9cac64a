"""``augserve tune set --stream ID op.field=value ...``: re-tune a live stream from outside its trainer."""

from __future__ import annotations

import uuid

import zmq

from . import protocol as P
from .config import check_address


def send_update(address: str, stream: str, changes: dict | None = None, spec=None, timeout: float = 5.0) -> dict:
    """Ask the daemon at ``address`` to change ``stream``'s pipeline; returns the ``updated`` fields.
    A refused change raises ValueError with the daemon's message; no answer raises ConnectionError."""
    check_address(address, "daemon address")
    if (changes is None) == (spec is None):
        raise ValueError("give either changes (op.field=value ...) or a whole spec")
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        payload = {"changes": changes} if changes is not None else {"spec": spec}
        sock.send_multipart(P.encode("update", {"stream": stream, "request": uuid.uuid4().hex, **payload}))
        if not sock.poll(timeout=int(timeout * 1000)):
            raise ConnectionError(f"no augserve daemon answered at {address} within {timeout:g} s")
        reply = P.decode(sock.recv_multipart(), {"updated", "error"})
    except P.ProtocolError as exc:
        raise ConnectionError(f"the peer at {address} is not a compatible augserve daemon: {exc}") from None
    finally:
        sock.close(linger=0)
        context.term()
    if reply.type == "error":
        raise ValueError(str(reply.get("message")))
    return reply.fields
