"""Backend registry. Backends import lazily: DALI and CUDA are only loaded when asked for."""

from __future__ import annotations

import importlib

from ..registry import Registry
from .base import Backend

# name -> "module:Class" (imported on first use so `import pipelines` stays light)
BACKENDS: Registry[str] = Registry("backend")
BACKENDS.add("albumentations", "pipelines.backends.albumentations_backend:AlbumentationsBackend")
BACKENDS.add("torch", "pipelines.backends.torch_backend:TorchBackend")
BACKENDS.add("dali", "pipelines.backends.dali_backend:DaliBackend")


def backend_class(name: str) -> type[Backend]:
    module_name, class_name = BACKENDS.get(name).split(":")
    return getattr(importlib.import_module(module_name), class_name)


__all__ = ["BACKENDS", "Backend", "backend_class"]
