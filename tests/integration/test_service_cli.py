"""The service's command line: ``augserve status``, ``augserve serve`` (config file, environment,
flags, signals) as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
import yaml

from augserve import protocol as P


try:  # tests/integration is a package in some checkouts (tests/__init__.py) and a plain folder in others
    from .conftest import CROP_FLIP, collect, free_port, open_stream, pid_alive, run_augserve, subprocess_env, wait_until, write_image_folder
except ImportError:
    from conftest import CROP_FLIP, collect, free_port, open_stream, pid_alive, run_augserve, subprocess_env, wait_until, write_image_folder


def _children(pid: int) -> list[int]:
    """The live (not zombie) child processes of ``pid``, from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as handle:
                state, ppid = handle.read().rsplit(")", 1)[1].split()[:2]
        except OSError:  # exited meanwhile
            continue
        if int(ppid) == pid and state != "Z":
            children.append(int(entry))
    return children


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("augserve: error:") and "Traceback" not in proc.stderr
    return lines[0]


def test_status_json_prints_one_object_on_the_last_line(daemon):
    stream = open_stream(daemon.address, dataset="digits", pipeline="lenet5", batch_size=64, prefetch=2)
    try:
        next(iter(stream))  # a live stream to see in the status
        proc = run_augserve("status", "--address", daemon.address, "--json")
    finally:
        stream.close()
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    assert status["address"] == daemon.address and status["protocol"] == P.PROTOCOL_VERSION and status["secure"] is True
    assert len(status["workers"]) == 2 and all(w["pid"] > 0 for w in status["workers"])
    mine = [s for s in status["streams"] if s["stream"] == stream.id]
    assert mine and mine[0]["dataset"] == "digits" and mine[0]["pipeline"] == "lenet5" and mine[0]["in_flight"] <= 2


def test_status_of_an_address_where_nobody_listens_exits_2_with_one_line():
    started = time.monotonic()
    proc = run_augserve("status", "--address", f"tcp://127.0.0.1:{free_port()}", "--timeout", "1", timeout=30)
    assert proc.returncode == 2
    assert "no augserve daemon answered" in _one_error_line(proc)
    assert proc.stdout == ""
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("occupant", ["plain-socket", "another-daemon"])
def test_serve_on_a_port_in_use_exits_nonzero_with_one_line(daemon, occupant):
    listener = None
    if occupant == "plain-socket":
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    else:
        address = daemon.address
    try:
        proc = run_augserve("serve", "--bind", address, "--workers", "1", timeout=60)
    finally:
        if listener is not None:
            listener.close()
    assert proc.returncode != 0
    line = _one_error_line(proc)
    assert "cannot bind" in line and address in line and "in use" in line
    daemon.assert_alive()
    assert len(daemon.status()["workers"]) == 2


@pytest.mark.parametrize(
    "args, env, needle",
    [
        ([], {"AUGSERVE_WORKERS": "many"}, "workers = 'many'"),
        (["--dataset", "extra=/no/such/folder"], {}, "/no/such/folder"),
        (["--bind", "http://127.0.0.1:80"], {}, "http://127.0.0.1:80"),
        (["--config", "/no/such/daemon.yaml"], {}, "cannot read config /no/such/daemon.yaml"),
    ],
    ids=["env-not-a-number", "missing-dataset", "bad-bind", "missing-config"],
)
def test_serve_config_mistakes_end_in_one_line(args, env, needle):
    if "--bind" not in args:
        args = [*args, "--bind", f"tcp://127.0.0.1:{free_port()}"]
    proc = run_augserve("serve", *args, env=subprocess_env(**env), timeout=60)
    assert proc.returncode == 2
    assert needle in _one_error_line(proc)


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_cuda_device_this_machine_lacks_ends_in_one_line_at_start(command):
    """Asked for a GPU index past the visible ones (on a CPU machine: any GPU), ``serve`` and ``worker``
    stop before binding or connecting anything, with one line naming the device."""
    import torch

    device = f"cuda:{torch.cuda.device_count()}"  # one past the last visible GPU; cuda:0 without any
    address = f"tcp://127.0.0.1:{free_port()}"
    args = ["--bind", address, "--workers", "1"] if command == "serve" else ["--connect", address]
    proc = run_augserve(command, *args, "--backend", "torch", "--device", device, timeout=60)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert f"device '{device}' was asked for" in line, line


def test_a_config_error_is_not_reported_as_a_pipeline_spec_error(tmp_path):
    config = tmp_path / "daemon.yaml"
    config.write_text("wrokers: 3\n")
    proc = run_augserve("serve", "--config", str(config), "--bind", f"tcp://127.0.0.1:{free_port()}", timeout=60)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "wrokers" in line
    assert "pipeline spec" not in line, f"a daemon config error is called a pipeline spec error: {line}"


def test_serve_reads_a_config_file_and_the_environment_and_flags_win(start_daemon, tmp_path):
    """Precedence: defaults < file < AUGSERVE_* environment < flags. The file says 3 torch workers,
    serves an extra dataset and names the address; the environment says 1 albumentations worker; the
    flag says 2 workers. Expected: 2 albumentations workers on the file's address, serving its dataset."""
    folder = tmp_path / "folder"
    write_image_folder(folder, per_class=10)
    address = f"tcp://127.0.0.1:{free_port()}"
    config = tmp_path / "daemon.yaml"
    config.write_text(yaml.safe_dump({"bind": address, "workers": 3, "backend": "torch", "datasets": {"mine": str(folder)}, "heartbeat_interval": 0.5}))
    env = subprocess_env(AUGSERVE_WORKERS="1", AUGSERVE_BACKEND="albumentations")
    from_flag = start_daemon("--config", str(config), "--workers", "2", workers=None, bind=address, bind_flag=False, expect_workers=2, env=env)

    # The daemon's local workers are its child processes, all started at once: count those (a third
    # worker still importing torch has not joined yet, but it is already a child).
    def all_joined():
        status = from_flag.status()
        return status if len(status["workers"]) == len(_children(from_flag.pid)) else None

    status = wait_until(all_joined, timeout=30, what="every worker process to join")
    assert status["address"] == address
    assert len(status["workers"]) == 2 and sorted(_children(from_flag.pid)) == from_flag.worker_pids(), "the --workers flag did not win over the environment and the file"
    assert status["backend"] == "albumentations" and {w["backend"] for w in status["workers"]} == {"albumentations"}, "AUGSERVE_BACKEND did not win over the file"
    records = collect(open_stream(address, dataset="mine", pipeline=CROP_FLIP, batch_size=8))
    assert sorted(i for r in records for i in r["ids"].tolist()) == list(range(20))

    # SIGTERM in the middle of a stream: exit status 0, and every worker process is gone with the daemon.
    stream = open_stream(from_flag.address, dataset="mine", pipeline=CROP_FLIP, batch_size=4, prefetch=2, epochs=5)
    try:
        next(iter(stream))
        pids = from_flag.worker_pids()
        assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)
        assert from_flag.stop(signal.SIGTERM) == 0
    finally:
        stream.close()
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout=5, what="the worker processes to exit")
    assert "Traceback" not in from_flag.log()
