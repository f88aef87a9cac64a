"""Which way a stream's batches may travel: the trainer's ``transport`` and the daemon's, combined.

``frames`` on either side means frames. Otherwise shared memory is allowed, ``shm`` (either side) making
each batch that cannot take it a warning in the trainer's log and ``auto`` a quiet fallback. A trainer
that sent no ``shm_host`` (no shared memory on its side) gets frames.

:class:`StreamTransport` is what ``augserve status`` shows of it: the mode a stream allows, why frames
when the stream allows nothing else, and the batches that workers reported sending each way (with, for
frames where shared memory was allowed, why). Every field is an enum or a count: nothing a trainer or a
worker reports is shown as free text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from .. import protocol as P

SPARE_SLOTS = 2  # beyond the credits: the batch the training loop holds, and one handed over meanwhile

# Why a stream allows frames only: its trainer asked for them, the daemon did, or the trainer has no shared memory.
FramesReason = Literal["trainer", "daemon", "no_shm"]
_FRAMES_PHRASES = {
    "trainer": "frames (the trainer asked for them)",
    "daemon": "frames (the daemon asked for them)",
    "no_shm": "frames (the trainer has no shared memory)",
}


def frames_reason(request: P.Attach, daemon_transport: str) -> FramesReason | None:
    """Why ``request``'s stream gets frames only, or None when shared memory is allowed."""
    if request.transport == "frames":
        return "trainer"
    if daemon_transport == "frames":
        return "daemon"
    if request.shm_host is None:
        return "no_shm"
    return None


def handoff_for(request: P.Attach, daemon_transport: str) -> tuple[P.Handoff | None, str]:
    """``(what every task of the stream carries, a phrase for the daemon's log)``."""
    reason = frames_reason(request, daemon_transport)
    if reason is not None:
        return None, _FRAMES_PHRASES[reason]
    mode = "shm" if "shm" in (request.transport, daemon_transport) else "auto"
    handoff = P.Handoff(mode=mode, host=request.shm_host, slots=request.prefetch + SPARE_SLOTS)
    return handoff, f"{mode}: shared memory from workers on the trainer's host, frames from the others"


@dataclass
class StreamTransport:
    """A stream's transport as ``augserve status`` shows it. ``mode``: ``frames`` (``frames_reason`` says
    why), ``auto`` or ``shm``; ``batches``: batches the workers reported sending each way; ``fallbacks``:
    of the frames, how many for each :data:`~augserve.protocol.FallbackKind` (shared memory allowed, but
    not usable for that batch)."""

    mode: Literal["frames", "auto", "shm"]
    frames_reason: FramesReason | None = None
    batches: dict[str, int] = field(default_factory=lambda: {via: 0 for via in get_args(P.Via)})
    fallbacks: dict[str, int] = field(default_factory=lambda: {kind: 0 for kind in get_args(P.FallbackKind)})

    @classmethod
    def of(cls, request: P.Attach, daemon_transport: str) -> "StreamTransport":
        reason = frames_reason(request, daemon_transport)
        if reason is not None:
            return cls("frames", reason)
        return cls("shm" if "shm" in (request.transport, daemon_transport) else "auto")

    def count(self, report: P.Done) -> None:
        """Count a worker's ``done``: its ``via`` and ``fallback`` are validated enums (None from older workers)."""
        if report.via is not None:
            self.batches[report.via] += 1
        if report.via == "frames" and report.fallback is not None:
            self.fallbacks[report.fallback] += 1

    def status(self) -> dict:
        return {"mode": self.mode, "frames_reason": self.frames_reason, "batches": dict(self.batches), "fallbacks": dict(self.fallbacks)}
