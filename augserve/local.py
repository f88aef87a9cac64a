"""A daemon as a child process: :class:`LocalDaemon`, and :func:`local_daemon` for a ``with`` block.
Trainers use it when no ``--connect`` address is given; benchmarks (the soak among them) use it too."""

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


class LocalDaemon:
    """``augserve serve`` as a child process of this one (it dies with it, even by SIGKILL), its output
    in a log file: ``log_path``, or a temporary file removed by :meth:`stop`. ``address``: a private
    ``ipc://`` socket by default — only this user's processes reach it, and batches to trainers on this
    host then travel without encryption (see the transport figures in the README)."""

    def __init__(self, workers: int = 2, backend: str = "albumentations", device: str = "cpu", datasets: dict[str, str] | None = None,
                 address: str | None = None, log_path: str | None = None) -> None:  # fmt: skip
        from .security import private_ipc_dir

        self.workers = workers
        self.address = address or f"ipc://{private_ipc_dir()}/daemon-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
        self._temporary_log = log_path is None
        if log_path is None:  # a file, not a pipe: a pipe nobody reads would fill and stall the daemon
            handle, log_path = tempfile.mkstemp(prefix="augserve-daemon-", suffix=".log")
            os.close(handle)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        command = [sys.executable, "-m", "augserve", "serve", "--bind", self.address, "--workers", str(workers), "--backend", backend, "--device", device]
        for name, path in (datasets or {}).items():
            command += ["--dataset", f"{name}={path}"]
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as handle:
            return handle.read().decode(errors="replace")[-chars:]

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Block until the daemon answers and its workers have joined; returns its status. A daemon that
        exits is a ConnectionError quoting its last log line; one that stays short of workers, a TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                tail = self.log_tail().strip().splitlines()
                raise ConnectionError(f"the local daemon exited with {self.process.returncode} during start-up: {tail[-1] if tail else 'no output'}")
            try:
                status = fetch_status(self.address, timeout=1.0)
                if len(status["workers"]) >= self.workers:
                    return status
            except ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the local daemon did not have {self.workers} worker(s) within {timeout:.0f} s (log: {self.log_path})")
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGINT, as a user's Ctrl-C; returns the exit code (-9 when it had to be killed)."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            return self.process.returncode
        finally:
            self._log.close()
            if self._temporary_log:
                with contextlib.suppress(OSError):
                    os.unlink(self.log_path)


@contextlib.contextmanager
def local_daemon(workers: int = 2, backend: str = "albumentations", device: str = "cpu", datasets: dict[str, str] | None = None, timeout: float = 60.0) -> Iterator[str]:
    """A :class:`LocalDaemon` for a ``with`` block: started, its workers waited for, its address yielded,
    stopped with SIGINT at the end."""
    daemon = LocalDaemon(workers, backend, device, datasets)
    try:
        daemon.wait_ready(timeout)
        yield daemon.address
    finally:
        daemon.stop(timeout=15)
