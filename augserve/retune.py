"""``augserve tune set --stream ID op.field=value ...``: re-tune a live stream from outside its trainer."""

from __future__ import annotations

import uuid

from . import protocol as P
from .control import Credentials, request


def send_update(address: str, stream: str, changes: dict | None = None, spec=None, timeout: float = 5.0, credentials: Credentials | None = None) -> dict:
    """Ask the daemon at ``address`` to change ``stream``'s pipeline; returns the ``updated`` fields.
    A refused change raises ValueError with the daemon's message; no answer raises ConnectionError.
    Only the stream's owner (the same client key) may re-tune it."""
    if (changes is None) == (spec is None):
        raise ValueError("give either changes (op.field=value ...) or a whole spec")
    body = P.Update(stream=stream, request=uuid.uuid4().hex, changes=changes, spec=spec)
    reply = request(address, body, {"updated"}, timeout, credentials)
    if reply.type == "error":
        raise ValueError(reply.body.message)
    return reply.body.model_dump()
