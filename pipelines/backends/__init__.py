"""Backend registry. Backends import lazily: DALI and CUDA are only loaded when asked for.

A backend may need a package that only an extra installs (``dali``: ``pip install 'augserve[dali]'``).
Asking for it without that package raises :class:`BackendUnavailable`, an ``ImportError`` whose message
is one line naming the backend and the install command: from :func:`backend_class` (hence
``pipelines.build``), or earlier, without importing anything heavy, from :func:`require_backend`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import NamedTuple

from ..registry import Registry
from .base import Backend

# name -> "module:Class" (imported on first use so `import pipelines` stays light)
BACKENDS: Registry[str] = Registry("backend")
BACKENDS.add("albumentations", "pipelines.backends.albumentations_backend:AlbumentationsBackend")
BACKENDS.add("torch", "pipelines.backends.torch_backend:TorchBackend")
BACKENDS.add("dali", "pipelines.backends.dali_backend:DaliBackend")


class Requirement(NamedTuple):
    """The module a backend imports that the base install does not bring, and what installs it."""

    module: str
    what: str
    extra: str


# Backends not in this table need only the base dependencies.
OPTIONAL: dict[str, Requirement] = {"dali": Requirement("nvidia.dali", "NVIDIA DALI", "dali")}


class BackendUnavailable(ImportError):
    """A registered backend whose optional dependency is not installed (the message says how to install it)."""


def _unavailable(name: str, need: Requirement) -> BackendUnavailable:
    return BackendUnavailable(f"backend {name!r} needs {need.what}: pip install 'augserve[{need.extra}]'", name=need.module)


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a parent package may be imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent is missing, or the module was blocked (None in sys.modules)
        return False


def require_backend(name: str) -> None:
    """Raise :class:`BackendUnavailable` when backend ``name``'s optional dependency is missing (the
    registry's ValueError for an unknown name). Cheap: the dependency is looked up, not imported."""
    BACKENDS.get(name)
    need = OPTIONAL.get(name)
    if need is not None and not _installed(need.module):
        raise _unavailable(name, need)


def _is_missing(exc: ModuleNotFoundError, module: str) -> bool:
    """Whether ``exc`` is about ``module`` itself or one of its parent packages (not a module it imports)."""
    return exc.name is not None and (module == exc.name or module.startswith(exc.name + "."))


def backend_class(name: str) -> type[Backend]:
    module_name, class_name = BACKENDS.get(name).split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        need = OPTIONAL.get(name)
        if need is not None and _is_missing(exc, need.module):
            raise _unavailable(name, need) from None
        raise
    return getattr(module, class_name)


__all__ = ["BACKENDS", "OPTIONAL", "Backend", "BackendUnavailable", "backend_class", "require_backend"]
