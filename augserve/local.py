"""A daemon for the duration of a ``with`` block: ``augserve serve`` as a child process on a private
``ipc://`` socket. Trainers use it when no ``--connect`` address is given; benchmarks use it too."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Iterator

from .status import fetch_status


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the parent dies, even by SIGKILL, so a
    local daemon is never left behind (the daemon stops cleanly on SIGTERM)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def local_daemon(workers: int = 2, backend: str = "albumentations", device: str = "cpu", datasets: dict[str, str] | None = None, timeout: float = 60.0) -> Iterator[str]:
    """Start a daemon with ``workers`` local workers, wait until they joined, yield its address, stop it
    with SIGINT at the end. Its log goes to a temporary file (a pipe nobody reads would fill and stall
    the daemon on a long run); the file's tail is in the error if the daemon fails to start."""
    # A private ipc socket: only this user's processes reach it, and batches to trainers on this host
    # then travel without encryption (see the transport figures in the README).
    from .security import private_ipc_dir

    address = f"ipc://{private_ipc_dir()}/daemon-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
    command = [sys.executable, "-m", "augserve", "serve", "--bind", address, "--workers", str(workers), "--backend", backend, "--device", device]
    for name, path in (datasets or {}).items():
        command += ["--dataset", f"{name}={path}"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    with tempfile.TemporaryFile(mode="w+b", prefix="augserve-daemon-") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        try:
            _wait_for_workers(address, workers, process, log, timeout)
            yield address
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _wait_for_workers(address: str, workers: int, process: subprocess.Popen, log, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the local daemon exited: {log.read().decode(errors='replace')[-1500:]}")
        try:
            if len(fetch_status(address, timeout=1.0)["workers"]) >= workers:
                return
        except ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the local daemon's {workers} worker(s) did not start within {timeout:.0f} s")
        time.sleep(0.1)
