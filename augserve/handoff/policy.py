"""Which way a stream's batches may travel: the trainer's ``transport`` and the daemon's, combined; and
which way one worker sends one batch (:func:`route`).

``frames`` on either side means frames. Otherwise shared memory is allowed, ``shm`` (either side) making
each batch that cannot take it a warning in the trainer's log and ``auto`` a quiet fallback. A trainer
that sent no ``shm_host`` (no shared memory on its side) gets frames. A trainer that asked for
``cuda-ipc`` (and said which GPU it is on) also allows device memory: workers on its GPU keep the
batch there, the other workers of its host use host shared memory, workers elsewhere frames. ``auto``
never picks device memory: ``cuda-ipc`` is the trainer's explicit choice (see ``augserve.connect``).

:class:`StreamTransport` is what ``augserve status`` shows of it: the mode a stream allows, why frames
when the stream allows nothing else, and the batches that workers reported sending each way (with, for
frames where shared memory was allowed, why). Every field is an enum or a count: nothing a trainer or a
worker reports is shown as free text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from .. import protocol as P
from .host import mismatch

SPARE_SLOTS = 2  # beyond the credits: the batch the training loop holds, and one handed over meanwhile

# Why a stream allows frames only: its trainer asked for them, the daemon did, or the trainer has no shared memory.
FramesReason = Literal["trainer", "daemon", "no_shm"]
_FRAMES_PHRASES = {
    "trainer": "frames (the trainer asked for them)",
    "daemon": "frames (the daemon asked for them)",
    "no_shm": "frames (the trainer has no shared memory)",
}


Route = Literal["cuda-ipc", "shm", "frames"]


def route(handoff: P.Handoff | None, worker_host: P.ShmHost | None, unavailable: str, worker_device: str, worker_gpu: str | None) -> tuple[Route, str | None, str]:
    """How a worker hands its trainer a batch of a task carrying ``handoff``: ``(route, why not a better
    one — a FallbackKind or None —, in words)``. ``worker_host``: the worker's shared memory (None:
    none, ``unavailable`` says why); ``worker_device``: where it augments (``"cpu"``, ``"cuda:1"``);
    ``worker_gpu``: that GPU's UUID (None when not a GPU or unknown; only read when the trainer asked
    for ``cuda-ipc``). Pure: what a worker can actually get (room, free slots) comes after."""
    if handoff is None:
        return "frames", None, ""
    if worker_host is None:
        return "frames", "unavailable", f"no shared memory on the worker's side: {unavailable}"
    reason = mismatch(worker_host, handoff.host)
    if reason is not None:
        return "frames", "other_host", reason
    if handoff.cuda is None:
        return "shm", None, ""
    if not worker_device.startswith("cuda"):
        return "shm", "other_gpu", f"the worker augments on {worker_device}, not on the trainer's GPU"
    if worker_gpu is None:
        return "shm", "unavailable", f"cannot tell which GPU the worker's {worker_device} is"
    if worker_gpu != handoff.cuda.uuid:
        return "shm", "other_gpu", f"the worker's {worker_device} is GPU {worker_gpu}, another GPU than the trainer's ({handoff.cuda.uuid})"
    return "cuda-ipc", None, ""


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
    cuda = request.cuda if request.transport == "cuda-ipc" else None
    mode = "shm" if "shm" in (request.transport, daemon_transport) or cuda is not None else "auto"
    handoff = P.Handoff(mode=mode, host=request.shm_host, slots=request.prefetch + SPARE_SLOTS, cuda=cuda)
    if cuda is not None:
        return handoff, f"cuda-ipc: device memory from workers on the trainer's GPU {cuda.uuid}, shared memory from the other workers on its host, frames from the others"
    return handoff, f"{mode}: shared memory from workers on the trainer's host, frames from the others"


def _modes(request: P.Attach) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The ways (``Via``) and fallback kinds a stream of ``request`` counts: device memory and another
    GPU only for a trainer that asked for ``cuda-ipc``."""
    vias, kinds = get_args(P.Via), get_args(P.FallbackKind)
    if request.transport == "cuda-ipc" and request.cuda is not None:
        return vias, kinds
    return tuple(v for v in vias if v != "cuda-ipc"), tuple(k for k in kinds if k != "other_gpu")


@dataclass
class StreamTransport:
    """A stream's transport as ``augserve status`` shows it. ``mode``: ``frames`` (``frames_reason`` says
    why), ``auto``, ``shm`` or ``cuda-ipc``; ``batches``: batches the workers reported sending each way;
    ``fallbacks``: of the batches that went a slower way than the stream allows (frames where shared
    memory was allowed, host memory where device memory was), how many for each
    :data:`~augserve.protocol.FallbackKind`. ``cuda-ipc`` and ``other_gpu`` are keys of a ``cuda-ipc``
    stream only."""

    mode: Literal["frames", "auto", "shm", "cuda-ipc"]
    frames_reason: FramesReason | None = None
    batches: dict[str, int] = field(default_factory=lambda: {via: 0 for via in get_args(P.Via) if via != "cuda-ipc"})
    fallbacks: dict[str, int] = field(default_factory=lambda: {kind: 0 for kind in get_args(P.FallbackKind) if kind != "other_gpu"})

    @classmethod
    def of(cls, request: P.Attach, daemon_transport: str) -> "StreamTransport":
        reason = frames_reason(request, daemon_transport)
        if reason is not None:
            return cls("frames", reason)
        vias, kinds = _modes(request)
        mode = "cuda-ipc" if "cuda-ipc" in vias else "shm" if "shm" in (request.transport, daemon_transport) else "auto"
        return cls(mode, batches={via: 0 for via in vias}, fallbacks={kind: 0 for kind in kinds})

    def count(self, report: P.Done) -> None:
        """Count a worker's ``done``: its ``via`` and ``fallback`` are validated enums (None from older
        workers); a way or a kind this stream does not allow is not counted."""
        if report.via in self.batches:
            self.batches[report.via] += 1
        if report.via != "cuda-ipc" and report.fallback in self.fallbacks:
            self.fallbacks[report.fallback] += 1

    def status(self) -> dict:
        return {"mode": self.mode, "frames_reason": self.frames_reason, "batches": dict(self.batches), "fallbacks": dict(self.fallbacks)}
