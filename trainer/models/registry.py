"""Model registry: plain builder functions registered by name, instantiated with :func:`create`.

A builder is any callable ``builder(num_classes=..., in_channels=..., **kwargs) -> nn.Module``.
Registering a second builder under a taken name is an error (the test suite iterates over the
registry, so a silent overwrite would drop a model from the tests).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

ModelBuilder = Callable[..., nn.Module]

__all__ = ["ModelBuilder", "ModelRegistry", "create", "get_builder", "list_models", "register_model"]


class ModelRegistry:
    """A name → builder mapping that refuses duplicates."""

    def __init__(self) -> None:
        self._builders: dict[str, ModelBuilder] = {}

    def register(self, name: str) -> Callable[[ModelBuilder], ModelBuilder]:
        """Decorator registering ``builder`` under ``name``; returns the builder unchanged."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"model name must be a non-empty string, got {name!r}")

        def decorator(builder: ModelBuilder) -> ModelBuilder:
            if not callable(builder):
                raise TypeError(f"builder for model {name!r} must be callable, got {type(builder).__name__}")
            if name in self._builders:
                old = self._builders[name]
                raise ValueError(
                    f"model {name!r} is already registered "
                    f"(by {old.__module__}.{getattr(old, '__qualname__', old)})"
                )
            self._builders[name] = builder
            return builder

        return decorator

    def get(self, name: str) -> ModelBuilder:
        try:
            return self._builders[name]
        except KeyError:
            raise ValueError(
                f"unknown model {name!r}; known models: {', '.join(self.names())}"
            ) from None

    def names(self, pattern: str | None = None) -> list[str]:
        names = sorted(self._builders)
        return names if pattern is None else fnmatch.filter(names, pattern)

    def create(self, name: str, num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
        builder = self.get(name)
        for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        return builder(num_classes=num_classes, in_channels=in_channels, **kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __len__(self) -> int:
        return len(self._builders)


_REGISTRY = ModelRegistry()


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """``@register_model("resnet50")`` on a builder function; raises ValueError if the name is taken."""
    return _REGISTRY.register(name)


def get_builder(name: str) -> ModelBuilder:
    """The builder registered as ``name``; ValueError listing the known names if there is none."""
    return _REGISTRY.get(name)


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style pattern (``"resnet*"``)."""
    return _REGISTRY.names(pattern)


def create(name: str, num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
    """Instantiate the model registered as ``name``.

    ``num_classes`` is the size of the output layer, ``in_channels`` the number of input planes
    (1 for grey digits, 3 for RGB); other keyword arguments go to the builder unchanged (an unknown
    one raises TypeError there). Instantiate under ``with torch.device("meta"):`` to count
    parameters without allocating them.
    """
    return _REGISTRY.create(name, num_classes=num_classes, in_channels=in_channels, **kwargs)
