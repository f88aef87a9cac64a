"""``augserve status``: ask a daemon for its live state and print it."""

from __future__ import annotations

from . import protocol as P
from .control import Credentials, request

# Why a stream's batches go as frames: for the whole stream (its policy) ...
FRAMES_REASONS = {"trainer": "forced by the trainer", "daemon": "forced by the daemon", "no_shm": "the trainer has no shared memory"}
# ... and for single batches of a stream that allows shared memory (augserve.protocol.Fallback's kinds)
FALLBACK_REASONS = {
    "other_host": "remote host (or another /dev/shm or user)",
    "no_space": "/dev/shm too small",
    "busy": "the trainer holds every slot",
    "unavailable": "no shared memory on the worker",
    "other_gpu": "the worker is on another GPU (or the CPU)",
}


def fetch_status(address: str, timeout: float = 5.0, credentials: Credentials | None = None) -> dict:
    """The daemon's status dict; ConnectionError when nothing answers within ``timeout`` seconds."""
    reply = request(address, P.Status(), {"status_reply"}, timeout, credentials)
    if reply.type == "error":
        raise ConnectionError(f"daemon at {address} refused the status request: {reply.body.message}")
    return reply.body.status


def format_status(status: dict) -> str:
    lines = [
        f"daemon {status['address']} — up {status['uptime_s']:.0f} s, {status['backend']} on {status['device']}, "
        f"protocol v{status['protocol']}, worker restarts {status['worker_restarts']}, corrupt files skipped {status['skipped_corrupt']}",
        f"queue: {status['queue']['tasks_in_flight']} task(s) in flight, {status['queue']['waiting_reissue']} waiting for re-issue",
        "",
        "streams:" if status["streams"] else "streams: none",
    ]
    for s in status["streams"]:
        ms = s["stage_ms"]
        lines.append(
            f"  {s['stream']}  {s['dataset']}/{s['split']} · {s['pipeline']} v{s['pipeline_version']} · batch {s['batch_size']} · rank {s['rank']}/{s['world_size']}"
            f" · epoch {s['epoch'] + 1}/{s['epochs']} · acked {s['acked']} · in flight {s['in_flight']}/{s['credits']} credits"
            f" · {s['images_per_s']:.0f} img/s · load {ms['load']:.1f} / augment {ms['augment']:.1f} / send {ms['send']:.1f} ms per batch"
            + (f" · transport {format_transport(s['transport'])}" if s.get("transport") else "")
        )
    lines.append("workers:" if status["workers"] else "workers: none")
    for w in status["workers"]:
        ms = w["stage_ms"]
        lines.append(
            f"  {w['worker']}  pid {w['pid']} on {w['host']} · {w['backend']}/{w['device']} · busy {w['busy']}/{w['capacity']} · {w['batches']} batches"
            f" · {w['images_per_s']:.0f} img/s · load {ms['load']:.1f} / augment {ms['augment']:.1f} / send {ms['send']:.1f} ms"
        )
    return "\n".join(lines)


def format_transport(transport: dict) -> str:
    """``frames (forced by the trainer)``, or ``shm: 40 batches through shared memory, 3 as frames (the
    trainer holds every slot 3)`` — a stream's ``transport`` status."""
    if transport["mode"] == "frames":
        reason = transport.get("frames_reason")
        return f"frames ({FRAMES_REASONS.get(reason, reason)})" if reason else "frames"
    batches, fallbacks = transport["batches"], transport["fallbacks"]
    device = f"{batches['cuda-ipc']} batches in device memory, " if "cuda-ipc" in batches else ""
    text = f"{transport['mode']}: {device}{batches['shm']} batches through shared memory, {batches['frames']} as frames"
    why = [f"{FALLBACK_REASONS.get(kind, kind)} {count}" for kind, count in fallbacks.items() if count]
    return text + (f" ({', '.join(why)})" if why else "")
