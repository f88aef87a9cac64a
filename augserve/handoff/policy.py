"""Which way a stream's batches may travel: the trainer's ``transport`` and the daemon's, combined.

``frames`` on either side means frames. Otherwise shared memory is allowed, ``shm`` (either side) making
each batch that cannot take it a warning in the trainer's log and ``auto`` a quiet fallback. A trainer
that sent no ``shm_host`` (no shared memory on its side) gets frames.
"""

from __future__ import annotations

from .. import protocol as P

SPARE_SLOTS = 2  # beyond the credits: the batch the training loop holds, and one handed over meanwhile


def handoff_for(request: P.Attach, daemon_transport: str) -> tuple[P.Handoff | None, str]:
    """``(what every task of the stream carries, a phrase for the daemon's log)``."""
    choices = (request.transport, daemon_transport)
    if "frames" in choices:
        side = "trainer" if request.transport == "frames" else "daemon"
        return None, f"frames (the {side} asked for them)"
    if request.shm_host is None:
        return None, "frames (the trainer has no shared memory)"
    mode = "shm" if "shm" in choices else "auto"
    handoff = P.Handoff(mode=mode, host=request.shm_host, slots=request.prefetch + SPARE_SLOTS)
    return handoff, f"{mode}: shared memory from workers on the trainer's host, frames from the others"
