"""Where a training run gets its batches: a running daemon, or one it starts itself.

``embedded_daemon`` starts ``augserve serve`` as a child process on a free loopback port and stops it at
the end — the default when no ``--connect`` address is given. ``eval_spec`` derives the deterministic
held-out pipeline (resize + centre crop + the same normalize) from a training spec.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

from pipelines.spec import CenterCrop, PipelineSpec, RandomCrop, RandomResizedCrop, Resize

# The usual ratio between the evaluation resize and the crop (256 → 224).
EVAL_CROP_FRACTION = 0.875


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the trainer dies, even by SIGKILL,
    so an embedded daemon is never left behind (the daemon stops cleanly on SIGTERM)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def embedded_daemon(workers: int = 2, backend: str = "albumentations", device: str = "cpu", datasets: dict[str, str] | None = None, timeout: float = 60.0) -> Iterator[str]:
    """Run a daemon for the duration of the ``with`` block; yields its address."""
    from augserve.status import fetch_status

    address = f"tcp://127.0.0.1:{_free_port()}"
    command = [sys.executable, "-m", "augserve", "serve", "--bind", address, "--workers", str(workers), "--backend", backend, "--device", device]
    for name, path in (datasets or {}).items():
        command += ["--dataset", f"{name}={path}"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the embedded daemon exited: {process.stderr.read().decode(errors='replace')[-1500:]}")
            try:
                if len(fetch_status(address, timeout=1.0)["workers"]) >= workers:
                    break
            except ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the embedded daemon's {workers} worker(s) did not start within {timeout:.0f} s")
            time.sleep(0.1)
        yield address
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def output_size(spec: PipelineSpec) -> tuple[int, int] | None:
    """The (height, width) a spec's last size-fixing op produces, or None when sizes follow the input."""
    size = None
    for op in spec.ops:
        if isinstance(op, (RandomCrop, RandomResizedCrop, CenterCrop)):
            size = tuple(op.size)
    return size


def eval_spec(train: PipelineSpec, crop_pad: int | None = None) -> PipelineSpec:
    """Deterministic held-out pipeline for a training spec: no random ops, a centre crop of the training
    output size (after a resize to size / 0.875 when the training spec resizes or random-resized-crops),
    and the training spec's ``normalize``. ``crop_pad`` enlarges the crop (for multi-crop evaluation)."""
    ops: list = []
    size = output_size(train)
    rescales = any(isinstance(op, (Resize, RandomResizedCrop)) for op in train.ops)
    if size is not None:
        if rescales:
            ops.append(Resize(short_side=round(min(size) / EVAL_CROP_FRACTION)))
        pad = crop_pad or 0
        ops.append(CenterCrop(size=(size[0] + pad, size[1] + pad)))
    if train.normalize is not None:
        ops.append(train.normalize)
    return PipelineSpec(name=f"{train.name or 'custom'}-eval", ops=ops, border=train.border, fill=train.fill)

