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


def test_workers_auto_min_max_starts_min_and_autoscales(tmp_path):
    config = load_config(None, {"workers": "auto:1:8"})
    assert config.workers == 1 and (config.autoscale.min_workers, config.autoscale.max_workers) == (1, 8)
    assert config.autoscale.threshold == 0.03
    path = tmp_path / "daemon.yaml"
    path.write_text("workers: auto:2:4\nautoscale: {window_s: 1.5}\n")
    config = load_config(str(path), environ={})
    assert (config.workers, config.autoscale.min_workers, config.autoscale.max_workers, config.autoscale.window_s) == (2, 2, 4, 1.5)
    assert load_config(None, environ={"AUGSERVE_WORKERS": "auto:0:3"}).autoscale.max_workers == 3
    path.write_text("workers: 3\nautoscale: {min_workers: 1, max_workers: 3}\n")  # start at 3, scale within [1, 3]
    assert load_config(str(path), environ={}).workers == 3
    assert load_config(None, {"workers": 2}).autoscale is None


@pytest.mark.parametrize(
    "values, match",
    [
        ({"workers": "auto:4:2"}, "need 0 <= MIN <= MAX"),
        ({"workers": "auto:1"}, r"a count or auto:MIN:MAX"),
        ({"workers": "auto:a:b"}, r"a count or auto:MIN:MAX"),
        ({"workers": 5, "autoscale": {"min_workers": 1, "max_workers": 3}}, r"within autoscale's \[1, 3\]"),
        ({"autoscale": {"min_workers": 3, "max_workers": 2}, "workers": 3}, "min_workers \\(3\\) is above max_workers \\(2\\)"),
        ({"autoscale": {"threshold": 2}}, "threshold"),
        ({"ray": {"num_cpus": -1}}, "num_cpus"),
        ({"ray": {"connect": "10.0.0.5:5555"}}, "bad ray.connect"),
        ({"ray": {"nodes": 3}}, "nodes"),
    ],
)
def test_bad_autoscale_and_ray_settings_are_named(values, match):
    with pytest.raises(ValidationError, match=match):
        DaemonConfig.model_validate(values)


def test_ray_section_defaults():
    ray = DaemonConfig.model_validate({"ray": {}}).ray
    assert (ray.address, ray.num_cpus, ray.num_gpus, ray.max_restarts, ray.connect) == ("auto", 1.0, 0.0, 3, None)
