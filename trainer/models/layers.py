"""Small building blocks shared by the model families (no registered models here)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

LayerFactory = Callable[..., nn.Module]

__all__ = ["ConvNormAct", "LayerFactory", "create_act", "make_divisible"]


def create_act(act_layer: LayerFactory, inplace: bool = True) -> nn.Module:
    """Instantiate an activation, in place when its constructor has an ``inplace`` argument.

    ``act_layer`` is a class or factory (``nn.ReLU``, ``nn.Tanh``, ``functools.partial(...)``).
    """
    try:
        accepts_inplace = "inplace" in inspect.signature(act_layer).parameters
    except (TypeError, ValueError):  # builtins without a signature
        accepts_inplace = False
    return act_layer(inplace=inplace) if accepts_inplace else act_layer()


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a scaled channel count to the nearest multiple of ``divisor`` (MobileNet width multiplier).

    Never goes below ``min_value`` (default ``divisor``) nor more than 10% below ``value``, the rule
    of the reference MobileNet implementations.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvNormAct(nn.Sequential):
    """Conv2d → norm → activation, "same" padding for odd kernels.

    With ``norm_layer=None`` the convolution carries a bias (a normalisation layer would make it
    redundant); with ``act_layer=None`` there is no activation (MobileNetV2's linear bottleneck).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        norm_layer: LayerFactory | None = nn.BatchNorm2d,
        act_layer: LayerFactory | None = nn.ReLU,
    ) -> None:
        padding = (kernel_size - 1) // 2 if padding is None else padding
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                      groups=groups, bias=norm_layer is None)
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if act_layer is not None:
            layers.append(create_act(act_layer))
        super().__init__(*layers)
        self.out_channels = out_channels
