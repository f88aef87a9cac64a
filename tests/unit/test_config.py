"""Daemon config: file < environment < flags, every field validated with a clear message."""

import pytest
from pydantic import ValidationError

from augserve.config import DaemonConfig, check_address, load_config


def test_precedence_file_env_flags(tmp_path):
    path = tmp_path / "daemon.yaml"
    path.write_text("workers: 3\nbackend: torch\nheartbeat_interval: 2.5\n")
    config = load_config(str(path), environ={})
    assert (config.workers, config.backend, config.heartbeat_interval) == (3, "torch", 2.5)
    config = load_config(str(path), environ={"AUGSERVE_WORKERS": "5"})
    assert config.workers == 5 and config.backend == "torch"
    config = load_config(str(path), {"workers": 1, "backend": None}, environ={"AUGSERVE_WORKERS": "5"})
    assert config.workers == 1 and config.backend == "torch"


def test_datasets_from_env_and_flags(tmp_path):
    (tmp_path / "a").mkdir()
    config = load_config(None, {"datasets": {"b": str(tmp_path)}}, environ={"AUGSERVE_DATASETS": f"a={tmp_path / 'a'}"})
    assert config.datasets == {"a": str(tmp_path / "a"), "b": str(tmp_path)}


@pytest.mark.parametrize(
    "values, match",
    [
        ({"workers": -1}, "workers"),
        ({"backend": "opencv"}, "backend"),
        ({"device": "gpu0"}, "device must be 'cpu' or 'cuda:K'"),
        ({"bind": "localhost:5555"}, "expected tcp://HOST:PORT or ipc://PATH"),
        ({"datasets": {"digits": "/tmp"}}, "is a built-in"),
        ({"datasets": {"x": "/nonexistent/folder"}}, "no such file or folder"),
        ({"wrokers": 2}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_named(values, match):
    with pytest.raises(ValidationError, match=match):
        DaemonConfig.model_validate(values)


def test_bad_env_value_is_named():
    with pytest.raises(ValidationError, match="workers"):
        load_config(None, environ={"AUGSERVE_WORKERS": "many"})


def test_bad_config_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("workers: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(str(path), environ={})
    with pytest.raises(ValueError, match="cannot read config"):
        load_config(str(tmp_path / "missing.yaml"), environ={})


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:5555", "tcp://*:5555", "ipc:///tmp/x.sock", "tcp://[::1]:80"])
def test_good_addresses(address):
    check_address(address)


@pytest.mark.parametrize("address", ["127.0.0.1:5555", "tcp://127.0.0.1", "tcp://127.0.0.1:99999", "udp://x:1", "ipc://"])
def test_bad_addresses(address):
    with pytest.raises(ValueError, match="expected tcp://HOST:PORT or ipc://PATH"):
        check_address(address)
