"""Fixtures for the service integration tests: real ``augserve serve`` processes on loopback ports.

Every daemon here is a real subprocess with real worker processes. Its stdout/stderr (and its workers',
which inherit them) go to a log file that failing assertions quote. Nothing here can hang: start-up,
shutdown and every wait have a deadline, and streams get short ``timeout``/``batch_timeout`` values.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from augserve.handoff import shm as _shm

# True while a pid names a process that has not exited (zombies count as gone); the tests import it from here.
pid_alive = _shm.pid_alive

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from augserve.status import fetch_status  # noqa: E402

START_TIMEOUT_S = 60.0  # workers import torch and OpenCV; a loaded 2-core machine can take a while
STOP_TIMEOUT_S = 20.0  # the daemon gives its workers 5 s to stop before it kills them

# Small, quick datasets and specs: every service test should cost seconds, not minutes.
SHAPES = {"size": 32, "n": 200}
CROP_FLIP = {"name": "crop-flip", "ops": [{"op": "random_crop", "size": 32, "padding": 2}, {"op": "mirror"}]}
GEOMETRIC = {
    "name": "geometric",
    "ops": [
        {"op": "random_crop", "size": 32, "padding": 2},
        {"op": "mirror"},
        {"op": "rotate", "degrees": 15, "p": 0.8},
        {"op": "shear", "degrees": 8, "p": 0.5},
    ],
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test's environment without any AUGSERVE_* setting (so the outer shell cannot leak config)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUGSERVE_") or k == "AUGSERVE_KEYS_DIR"}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def augserve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "augserve", *args]


REPO = Path(__file__).resolve().parents[2]


def run_python(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    """``python ARGS`` from the repository root (so examples/ and tools/ run as written), one thread per
    torch op; a non-zero exit fails the test with the end of its output."""
    env = subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(args[:6])} ... exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def run_augserve(*args: str, env: dict | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run one short ``augserve`` command to completion (bounded by ``timeout``)."""
    return subprocess.run(augserve_command(*args), capture_output=True, text=True, env=env or subprocess_env(), timeout=timeout, stdin=subprocess.DEVNULL)


def raw_dealer(context, address: str):
    """A DEALER to the daemon at ``address`` with this user's client key (to speak the wire by hand)."""
    from augserve.control import Credentials, close_monitor, control_socket

    sock, monitor = control_socket(context, address, Credentials.load())
    close_monitor(sock, monitor)
    return sock


def raw_data_socket(context):
    """A trainer's data socket by hand: a PULL bound on a free loopback port that admits this user's
    worker key. Returns (socket, gatekeeper, data key to send in ``attach``)."""
    import zmq

    from augserve import security

    keyring = security.Keyring.load()
    gatekeeper = security.Gatekeeper(context, {"worker": keyring.allowed("worker")}).start()
    data = context.socket(zmq.PULL)
    data.setsockopt(zmq.LINGER, 0)
    security.secure_server(data, keyring.client)
    data.bind("tcp://127.0.0.1:*")
    return data, gatekeeper, keyring.client.public.decode()


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def freeze_a_busy_worker(daemon: "DaemonProcess", attempts: int = 5) -> tuple[dict, int]:
    """SIGSTOP a worker that holds tasks, so it cannot finish them between the look and its end; returns
    its status row and how many tasks it holds once the daemon has taken what it sent before the stop.

    A result the worker had sent just before the stop reaches the daemon after it, so ``busy`` read at
    once can count a task that will need no re-issue (seen in CI: 2 held, 1 re-issued). The count is
    read until two looks 0.3 s apart agree; a worker left with nothing is resumed and another one tried.
    """
    for _ in range(attempts):
        victim = wait_until(lambda: next((w for w in daemon.status()["workers"] if w["busy"] > 0), None), timeout=20, interval=0.005, what="a worker holding a task")
        os.kill(victim["pid"], signal.SIGSTOP)

        def busy() -> int:
            return next((w["busy"] for w in daemon.status()["workers"] if w["pid"] == victim["pid"]), 0)

        held, previous = busy(), None
        while held != previous:
            time.sleep(0.3)
            previous, held = held, busy()
        if held > 0:
            return victim, held
        os.kill(victim["pid"], signal.SIGCONT)
    pytest.fail(f"no worker still held a task once stopped, in {attempts} tries: killing it would test nothing")


class DaemonProcess:
    """A running ``augserve serve`` subprocess: its address, Popen, log file and status helpers."""

    def __init__(self, address: str, process: subprocess.Popen, log_path: Path, log_handle, insecure: bool = False) -> None:
        from augserve.control import Credentials

        self.credentials = Credentials.load(insecure=insecure)  # how the tests' own requests reach it
        self.address = address
        self.process = process
        self.log_path = log_path
        self._log_handle = log_handle

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        if not self._log_handle.closed:
            self._log_handle.flush()
        return self.log_path.read_text(errors="replace")

    def status(self, timeout: float = 5.0) -> dict:
        return fetch_status(self.address, timeout=timeout, credentials=self.credentials)

    def worker_pids(self) -> list[int]:
        return sorted(w["pid"] for w in self.status()["workers"])

    def assert_alive(self) -> None:
        code = self.process.poll()
        assert code is None, f"daemon exited with {code}:\n{self.log()[-4000:]}"

    def wait_ready(self, workers: int, timeout: float = START_TIMEOUT_S) -> dict:
        """Block until the daemon answers ``status`` and ``workers`` workers have joined."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise AssertionError(f"daemon exited with {code} during start-up:\n{self.log()[-4000:]}")
            try:
                status = fetch_status(self.address, timeout=0.5, credentials=self.credentials)
            except ConnectionError as exc:
                last_error = exc
                continue
            if len(status["workers"]) >= workers:
                return status
            time.sleep(0.1)
        raise AssertionError(f"daemon at {self.address} not ready with {workers} worker(s) after {timeout:g} s ({last_error}):\n{self.log()[-4000:]}")

    def stop(self, signum: int = signal.SIGINT, timeout: float = STOP_TIMEOUT_S) -> int:
        """Signal the daemon and wait for it; returns its exit code (kills it if it overstays)."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                self._log_handle.close()
                raise AssertionError(f"daemon did not stop within {timeout:g} s of signal {signum}:\n{self.log_path.read_text(errors='replace')[-4000:]}") from None
        self._log_handle.close()
        return self.process.returncode


def launch_daemon(log_dir: Path, *flags: str, workers: int | None = 2, bind: str | None = None, bind_flag: bool = True, env: dict | None = None) -> DaemonProcess:
    """Start ``augserve serve`` without waiting for it. ``workers=None`` leaves ``--workers`` out
    (to test config files and the environment); ``bind=None`` picks a free loopback port;
    ``bind_flag=False`` leaves ``--bind`` out (the address then comes from a config file or the
    environment, and ``bind`` says where to find the daemon)."""
    address = bind or f"tcp://127.0.0.1:{free_port()}"
    command = augserve_command("--log-level", "info", "serve", *(["--bind", address] if bind_flag else []), *flags)
    if workers is not None:
        command += ["--workers", str(workers)]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"daemon-{address.rsplit(':', 1)[-1].replace('/', '_')}-{time.monotonic_ns()}.log"
    handle = open(log_path, "w")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env or subprocess_env())
    return DaemonProcess(address, process, log_path, handle, insecure="--insecure" in flags)


@dataclass(frozen=True)
class ServedFolders:
    """The ImageFolder datasets the shared daemon serves besides the built-ins.

    ``folder``: 60 good 32×32 JPEGs in classes a/b plus the three ``corrupt`` files (not a JPEG,
    truncated, empty). ``slow``: 200 32×32 JPEGs where sample 180 (batch 11 of 16-sample batches when
    ``shuffle=False``) is a 3000×3000 noise PNG that takes a worker ~0.1 s to decode."""

    folder: Path
    corrupt: tuple[str, ...]
    slow: Path


@pytest.fixture(scope="session")
def served_folders(tmp_path_factory) -> ServedFolders:
    import cv2

    root = tmp_path_factory.mktemp("datasets")
    folder = root / "folder"
    good = write_image_folder(folder, per_class=30)
    corrupt = (folder / "a" / "100-garbage.jpg", folder / "b" / "100-truncated.jpg", folder / "b" / "101-empty.jpg")
    corrupt[0].write_bytes(b"this is not a jpeg " * 20)
    corrupt[1].write_bytes(Path(good[-1]).read_bytes()[:200])
    corrupt[2].write_bytes(b"")

    slow = root / "slow"
    slow_image = Path(write_image_folder(slow, per_class=100)[180])
    slow_image.unlink()
    noise = np.random.default_rng(0).integers(0, 256, (3000, 3000, 3), dtype=np.uint8)
    assert cv2.imwrite(str(slow_image.with_suffix(".png")), noise, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return ServedFolders(folder, tuple(str(p) for p in corrupt), slow)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory, served_folders):
    """One shared daemon with two workers for the tests that do not disturb it (it also serves the
    ``folder`` and ``slow`` datasets of :func:`served_folders`); stopped with SIGINT at the end of the
    session, which must exit 0."""
    flags = ("--dataset", f"folder={served_folders.folder}", "--dataset", f"slow={served_folders.slow}")
    yield from serving(tmp_path_factory.mktemp("daemon"), *flags, workers=2)


def serving(log_dir: Path, *flags: str, workers: int = 2):
    """For a fixture to ``yield from``: a ready daemon, stopped with SIGINT afterwards (must exit 0)."""
    proc = launch_daemon(log_dir, *flags, workers=workers)
    try:
        proc.wait_ready(workers)
    except BaseException:
        proc.process.kill()
        proc.process.wait(timeout=10)
        raise
    yield proc
    code = proc.stop(signal.SIGINT)
    assert code == 0, f"daemon exited with {code} on SIGINT:\n{proc.log()[-4000:]}"


@pytest.fixture
def start_daemon(tmp_path):
    """Factory: ``start_daemon(*flags, workers=N, env=..., wait=True)`` → a ready :class:`DaemonProcess`
    of this test alone. Daemons the test did not stop itself are stopped with SIGINT at teardown and
    must exit 0."""
    started: list[DaemonProcess] = []

    def start(*flags: str, workers: int | None = 2, expect_workers: int | None = None, env: dict | None = None, bind: str | None = None, bind_flag: bool = True, wait: bool = True) -> DaemonProcess:
        proc = launch_daemon(tmp_path / "logs", *flags, workers=workers, bind=bind, bind_flag=bind_flag, env=env)
        started.append(proc)
        if wait:
            proc.wait_ready(expect_workers if expect_workers is not None else (workers or 0))
        return proc

    yield start
    failures = []
    for proc in started:
        if proc.process.poll() is not None:
            proc._log_handle.close()
            continue
        code = proc.stop(signal.SIGINT)
        if code != 0:
            failures.append(f"daemon {proc.address} exited with {code} on SIGINT:\n{proc.log()[-4000:]}")
    assert not failures, "\n\n".join(failures)


def open_stream(address: str, dataset: str = "shapes", pipeline=None, batch_size: int = 16, **options):
    """``augserve.connect`` with short time limits (so no test can hang) and the small ``shapes`` set."""
    from augserve import connect

    if dataset == "shapes" and "dataset_options" not in options:
        options["dataset_options"] = dict(SHAPES)
    options.setdefault("timeout", 10.0)
    options.setdefault("batch_timeout", 30.0)
    return connect(address, dataset=dataset, pipeline=CROP_FLIP if pipeline is None else pipeline, batch_size=batch_size, **options)


def collect(stream, limit: int | None = None) -> list[dict]:
    """Iterate ``stream`` (at most ``limit`` batches) into plain numpy copies, keyed fields included."""
    out = []
    for batch in stream:
        out.append(as_record(batch))
        if limit is not None and len(out) >= limit:
            break
    return out


def as_record(batch) -> dict:
    return {
        "epoch": batch.epoch,
        "index": batch.index,
        "images": batch.images.numpy().copy(),
        "labels": batch.labels.numpy().copy(),
        "ids": batch.sample_ids.numpy().copy(),
        "version": batch.pipeline_version,
        "skipped": list(batch.skipped),
    }


def images_by_sample(records: list[dict]) -> dict[tuple[int, int], np.ndarray]:
    """(epoch, sample id) → that sample's augmented image bytes."""
    out = {}
    for record in records:
        for position, sample in enumerate(record["ids"].tolist()):
            key = (record["epoch"], sample)
            assert key not in out, f"sample {sample} delivered twice in epoch {record['epoch']}"
            out[key] = record["images"][position]
    return out


def ids_per_epoch(records: list[dict]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for record in records:
        out.setdefault(record["epoch"], []).extend(record["ids"].tolist())
    return out


def write_image_folder(root: Path, per_class: int = 30, classes: tuple[str, ...] = ("a", "b"), size: int = 32, seed: int = 0) -> list[str]:
    """An ImageFolder of ``size``×``size`` RGB JPEGs, ``per_class`` files per class; returns the paths in
    the order ImageFolder numbers them (sorted classes, sorted files)."""
    import cv2

    rng = np.random.default_rng(seed)
    paths = []
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            image = cv2.resize(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_LINEAR)
            path = root / name / f"{k:03d}.jpg"
            assert cv2.imwrite(str(path), image)
            paths.append(str(path))
    return paths
