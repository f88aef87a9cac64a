"""The daemon's configuration — the one schema for ``augserve serve``.

Every field can come from a YAML file (``--config daemon.yaml``), an ``AUGSERVE_<FIELD>`` environment
variable, or a command-line flag; later sources win: defaults < file < environment < flags. Nothing
reads the environment at import time: :func:`load_config` does, when called.
"""

from __future__ import annotations

import ipaddress
import math

import os
import re
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENV_PREFIX = "AUGSERVE_"
BUILTIN_DATASETS = ("digits", "shapes", "photos")
# A DNS name (RFC 1123): dot-separated labels of letters, digits and inner hyphens, 253 characters at most.
_HOST_NAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


class AutoscaleConfig(BaseModel):
    """Autoscaling of the workers on measured data stall (:mod:`augserve.autoscale`). Seconds; fractions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_workers: Annotated[int, Field(ge=0, le=256)] = 1
    max_workers: Annotated[int, Field(ge=1, le=256)] = 4
    window_s: Annotated[float, Field(gt=0, le=3600)] = Field(5.0, description="seconds of one observation window")
    threshold: Annotated[float, Field(ge=0, le=1)] = Field(0.03, description="an addition must cut the wait per batch by more than this fraction")
    min_wait_s: Annotated[float, Field(ge=0, le=60)] = Field(0.002, description="a wait per batch below this is no stall")
    full_fraction: Annotated[float, Field(ge=0, le=1)] = Field(0.9, description="queues 'stayed full' when full this fraction of a window")
    remove_windows: Annotated[int, Field(ge=1, le=1000)] = 2
    flap_hold_windows: Annotated[int, Field(ge=0, le=100_000)] = 10

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleConfig:
        if self.min_workers > self.max_workers:
            raise ValueError(f"autoscale min_workers ({self.min_workers}) is above max_workers ({self.max_workers})")
        return self


class RayConfig(BaseModel):
    """Workers as Ray actors (:mod:`augserve.ray_workers`): where the cluster is and what each actor asks for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: Annotated[str, Field(min_length=1, max_length=512)] = Field("auto", description="'auto' (the running cluster), 'local' (start one here) or a cluster address")
    num_cpus: Annotated[float, Field(ge=0, le=1024)] = 1.0
    num_gpus: Annotated[float, Field(ge=0, le=64)] = 0.0
    max_restarts: Annotated[int, Field(ge=-1, le=10_000)] = Field(3, description="Ray restarts of a dead actor (-1: forever)")
    # The address actors connect to; default: the bind address with a wildcard host replaced by this host's IP.
    connect: str | None = Field(None, description="the daemon's address as the actors' nodes reach it, e.g. tcp://10.0.0.5:5555")

    @field_validator("connect")
    @classmethod
    def _connect(cls, value: str | None) -> str | None:
        if value is not None:
            check_address(value, "ray.connect")
        return value


def parse_workers(value: Any) -> Any:
    """``"auto:MIN:MAX"`` → ``(MIN, MAX)``; ``None`` for anything else (a count: the schema checks it).
    ValueError naming the value when it starts with ``auto`` but is not of that form."""
    if not (isinstance(value, str) and value.strip().lower().startswith("auto")):
        return None
    parts = value.strip().split(":")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts[1:]):
        raise ValueError(f"workers must be a count or auto:MIN:MAX (e.g. auto:1:8), got {value!r}")
    low, high = int(parts[1]), int(parts[2])
    if high < 1 or low > high:
        raise ValueError(f"workers {value!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return low, high


class DaemonConfig(BaseModel):
    """Settings of one daemon. Times in seconds.

    ``workers`` is the number of workers to start with; ``auto:MIN:MAX`` (in a file, the environment or
    ``--workers``) starts MIN and autoscales between MIN and MAX (``autoscale``). With ``ray`` the workers
    are Ray actors instead of local processes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bind: str = "tcp://127.0.0.1:5555"
    workers: Annotated[int, Field(ge=0, le=256)] = 2
    autoscale: AutoscaleConfig | None = None
    ray: RayConfig | None = None
    backend: Literal["albumentations", "torch", "dali"] = "albumentations"
    device: str = "cpu"
    datasets: dict[str, str] = Field(default_factory=dict, description="extra datasets: name -> folder or .npz path")
    heartbeat_interval: Annotated[float, Field(gt=0, le=60)] = 1.0
    heartbeat_liveness: Annotated[int, Field(ge=2, le=100)] = 5
    tasks_per_worker: Annotated[int, Field(ge=1, le=16)] = 2
    threads_per_worker: Annotated[int, Field(ge=1, le=64)] = 1
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    # Loopback by default: the endpoint has no authentication. 0.0.0.0 (or ::) lets a scraper in
    # another container or pod reach it.
    metrics_host: str = Field("127.0.0.1", description="address the metrics endpoint listens on: an IP address or a host name")
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
    # Hand-off to trainers on the workers' host (augserve.handoff): auto = shared memory where it can, else frames.
    transport: Literal["auto", "frames", "shm"] = "auto"
    shm_dir: str = Field("/dev/shm", description="shared-memory directory of the local workers' slots")
    shm_reserve_mb: Annotated[int, Field(ge=0, le=1 << 30)] = Field(64, description="megabytes of shm_dir the workers leave free for others")

    @model_validator(mode="before")
    @classmethod
    def _auto_workers(cls, values: Any) -> Any:
        if isinstance(values, dict):
            bounds = parse_workers(values.get("workers"))
            if bounds is not None:
                autoscale = values.get("autoscale") or {}
                if not isinstance(autoscale, dict):
                    autoscale = autoscale.model_dump() if isinstance(autoscale, BaseModel) else {}
                values = {**values, "workers": bounds[0], "autoscale": {**autoscale, "min_workers": bounds[0], "max_workers": bounds[1]}}
        return values

    @model_validator(mode="after")
    def _workers_within_bounds(self) -> DaemonConfig:
        scale = self.autoscale
        if scale is not None and not scale.min_workers <= self.workers <= scale.max_workers:
            raise ValueError(f"workers ({self.workers}) must lie within autoscale's [{scale.min_workers}, {scale.max_workers}]")
        return self

    @field_validator("bind")
    @classmethod
    def _address(cls, value: str) -> str:
        check_address(value, "bind", bind=True)
        return value

    @field_validator("metrics_host")
    @classmethod
    def _metrics_host(cls, value: str) -> str:
        check_host(value, "metrics_host")
        return value

    @model_validator(mode="after")
    def _metrics_host_needs_port(self) -> DaemonConfig:
        if "metrics_host" in self.model_fields_set and self.metrics_port is None:
            raise ValueError("metrics_host is set but metrics_port is not, so no metrics are served: set metrics_port (--metrics-port) too")
        return self

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


def check_host(host: str, what: str = "host") -> None:
    """Accept an IPv4/IPv6 address (``0.0.0.0``, ``::``) or a DNS host name to listen on; refuse the rest."""
    if isinstance(host, str):
        try:
            ipaddress.ip_address(host)
            return
        except ValueError:
            if _HOST_NAME.fullmatch(host):
                return
    raise ValueError(f"{what} must be an IP address (127.0.0.1, 0.0.0.0, ::) or a host name, got {host!r}")


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
