"""Checkpoints: model, optimizer, AMP scaler, progress counters and the *stream position*, so a run
resumes exactly — same weights, same optimizer state, same next batch."""

from __future__ import annotations

import os
import zipfile
from functools import partial
from typing import Any

import torch

from augserve.atomic import atomic_write, load_with_fallback, previous_path


def save(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, scaler: Any, step: int, epoch: int, stream_state: dict | None, config: dict, metrics: dict | None = None) -> None:
    """Write atomically (see :func:`augserve.atomic.atomic_write`): an interruption never leaves half a
    checkpoint, and the checkpoint replaced stays as ``<path>.prev`` for :func:`load` to fall back to."""
    payload = {
        "format": "augserve-trainer/1",
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "epoch": epoch,
        "stream": stream_state,
        "config": config,
        "metrics": metrics or {},
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    atomic_write(path, lambda handle: torch.save(payload, handle))


def load(path: str, *, mapped: bool = False) -> dict:
    """A checkpoint written by :func:`save`; when ``path`` is truncated or corrupt, the previous one
    (``<path>.prev``) with a warning. ValueError naming the file(s) when none is readable.

    ``mapped``: the tensors are memory-mapped from the file instead of read (torch's zip format, what
    ``torch.save`` writes; an older file is read whole): for a caller that looks at the names only."""
    if not os.path.isfile(path) and not os.path.isfile(previous_path(path)):
        raise ValueError(f"checkpoint not found: {path}")
    return load_with_fallback(path, partial(_read, mapped=mapped))


def _read(path: str, mapped: bool = False) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped and zipfile.is_zipfile(path))
    if not isinstance(payload, dict):
        raise ValueError("not a checkpoint (no state dict inside)")
    return payload


def model_state(payload: dict) -> dict:
    """The model weights of a trainer checkpoint, or the payload itself when it is a plain state dict
    (torchvision/timm weight files saved with ``torch.save(model.state_dict())``)."""
    if payload.get("format", "").startswith("augserve-trainer"):
        return payload["model"]
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(payload.get(key), dict):
            return payload[key]
    return payload


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
