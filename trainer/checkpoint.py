"""Checkpoints: model, optimizer, AMP scaler, progress counters and the *stream position*, so a run
resumes exactly — same weights, same optimizer state, same next batch."""

from __future__ import annotations

import os
from typing import Any

import torch


def save(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, scaler: Any, step: int, epoch: int, stream_state: dict | None, config: dict, metrics: dict | None = None) -> None:
    """Write atomically (temp file + rename) so an interruption never leaves half a checkpoint."""
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
    temporary = path + ".tmp"
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load(path: str) -> dict:
    """A checkpoint written by :func:`save` (ValueError naming the file when it is not one)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path} is not a checkpoint (no state dict inside)")
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
