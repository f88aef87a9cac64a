"""Model registry: plain builder functions registered by name, instantiated with :func:`create`.

A builder is any callable ``builder(num_classes=..., in_channels=..., **kwargs) -> nn.Module``.
Registering a second builder under a taken name is an error (the test suite iterates over the
registry, so a silent overwrite would drop a model from the tests).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipelines.registry import Registry

ModelBuilder = Callable[..., nn.Module]

__all__ = ["ModelBuilder", "ModelRegistry", "create", "get_builder", "list_models", "register_model"]


class ModelRegistry(Registry[ModelBuilder]):
    """A name → builder mapping that refuses duplicates, and builds models by name."""

    def __init__(self) -> None:
        super().__init__("model")

    def add(self, name: str, builder: ModelBuilder) -> ModelBuilder:
        if not callable(builder):
            raise TypeError(f"builder for model {name!r} must be callable, got {type(builder).__name__}")
        return super().add(name, builder)

    def create(self, name: str, num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
        builder = self.get(name)
        for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        return builder(num_classes=num_classes, in_channels=in_channels, **kwargs)


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
