"""The daemon's configuration — the one schema for ``augserve serve``.

Every field can come from a YAML file (``--config daemon.yaml``), an ``AUGSERVE_<FIELD>`` environment
variable, or a command-line flag; later sources win: defaults < file < environment < flags. Nothing
reads the environment at import time: :func:`load_config` does, when called.
"""

from __future__ import annotations

import math

import os
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

ENV_PREFIX = "AUGSERVE_"
BUILTIN_DATASETS = ("digits", "shapes", "photos")


class DaemonConfig(BaseModel):
    """Settings of one daemon. Times in seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bind: str = "tcp://127.0.0.1:5555"
    workers: Annotated[int, Field(ge=0, le=256)] = 2
    backend: Literal["albumentations", "torch", "dali"] = "albumentations"
    device: str = "cpu"
    datasets: dict[str, str] = Field(default_factory=dict, description="extra datasets: name -> folder or .npz path")
    heartbeat_interval: Annotated[float, Field(gt=0, le=60)] = 1.0
    heartbeat_liveness: Annotated[int, Field(ge=2, le=100)] = 5
    tasks_per_worker: Annotated[int, Field(ge=1, le=16)] = 2
    threads_per_worker: Annotated[int, Field(ge=1, le=64)] = 1
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Trust: CurveZMQ keys (see augserve.security). Without keys only loopback and ipc binds start.
    keys_dir: str | None = Field(None, description="key directory (default $AUGSERVE_KEYS_DIR or ~/.config/augserve/keys)")
    insecure: bool = Field(False, description="no authentication or encryption: any peer that reaches the port is trusted")
    # Limits: each, when hit, refuses that request with a message naming it.
    max_streams: Annotated[int, Field(ge=1, le=100_000)] = 256
    max_streams_per_client: Annotated[int, Field(ge=1, le=100_000)] = 32
    max_batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 65_536
    max_batch_bytes: Annotated[int, Field(ge=1024, le=1 << 40)] = 1 << 30
    max_ops: Annotated[int, Field(ge=1, le=1024)] = 64
    max_pending_admissions: Annotated[int, Field(ge=1, le=1024)] = 32
    source_cache: Annotated[int, Field(ge=1, le=1024)] = 16
    # Deadlines and attempts (seconds; counts).
    task_timeout: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    delivery_timeout: Annotated[float, Field(gt=0, le=86_400)] = 30.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 4

    @field_validator("bind")
    @classmethod
    def _address(cls, value: str) -> str:
        check_address(value, "bind", bind=True)
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        kind, _, index = value.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
            raise ValueError(f"device must be 'cpu' or 'cuda:K', got {value!r}")
        return value

    @field_validator("datasets")
    @classmethod
    def _dataset_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if not name or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"dataset name {name!r} must be letters, digits, '-' or '_'")
            if name in BUILTIN_DATASETS:
                raise ValueError(f"dataset name {name!r} is a built-in; choose another name for {path}")
            if not os.path.exists(path):
                raise ValueError(f"dataset {name!r}: no such file or folder: {path}")
        return value


def check_address(address: str, what: str = "address", bind: bool = False) -> None:
    """Accept ``tcp://HOST:PORT`` (port may be ``*`` when binding) and ``ipc://PATH``; refuse the rest."""
    if not isinstance(address, str):
        raise ValueError(f"{what} must be a string like tcp://127.0.0.1:5555, got {address!r}")
    if address.startswith("ipc://") and len(address) > len("ipc://"):
        return
    if address.startswith("tcp://"):
        host, sep, port = address[len("tcp://") :].rpartition(":")
        if sep and host and ((port == "*" and bind) or (port.isdigit() and 0 < int(port) < 65536)):
            return
        if port == "*":
            raise ValueError(f"bad {what} {address!r}: a port of '*' only makes sense when binding; give the daemon's port")
    raise ValueError(f"bad {what} {address!r}: expected tcp://HOST:PORT or ipc://PATH")


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in DaemonConfig.model_fields:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if name == "datasets":
            values[name] = parse_dataset_pairs(raw.split(","))
        else:
            values[name] = raw  # pydantic converts "4" to 4 and refuses nonsense with the field named
    return values


def parse_dataset_pairs(pairs: list[str]) -> dict[str, str]:
    """``["name=path", ...]`` → ``{name: path}``; a malformed pair is an error naming it."""
    datasets = {}
    for pair in pairs:
        pair = pair.strip()
        if not pair:
            continue
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--dataset must look like NAME=PATH, got {pair!r}")
        datasets[name] = path
    return datasets


def parse_options(pairs: list[str] | None, what: str = "--dataset-option") -> dict[str, int | float | str]:
    """``["size=64", "val_fraction=0.1"]`` → ``{"size": 64, "val_fraction": 0.1}`` (integers and finite
    decimals parsed, the rest kept as text); a malformed pair is an error naming the flag."""
    options: dict[str, int | float | str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} must look like KEY=VALUE, got {pair!r}")
        options[key] = _option_value(value)
    return options


def _option_value(text: str) -> int | float | str:
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) and any(c.isdigit() for c in text) else text


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> DaemonConfig:
    """Defaults < ``path`` (YAML) < ``AUGSERVE_*`` environment < ``overrides`` (flags set by the user)."""
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle) or {}
        except OSError as exc:
            raise ValueError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config {path} must be a mapping of settings")
        values.update(loaded)
    values.update(_from_env(os.environ if environ is None else environ))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "datasets":
            values["datasets"] = {**values.get("datasets", {}), **value}
        else:
            values[key] = value
    return DaemonConfig.model_validate(values)
