"""MobileNets.

* ``mobilenet_v1``: Howard et al., "MobileNets: Efficient convolutional neural networks for mobile
  vision applications", arXiv:1704.04861, 2017 — depthwise separable convolutions (§3.1, Fig. 3),
  the body of Table 1, width multiplier α (§3.3) and resolution multiplier ρ (§3.4).
* ``mobilenet_v2``: Sandler et al., "MobileNetV2: Inverted residuals and linear bottlenecks",
  CVPR 2018 — inverted residual blocks with linear bottlenecks (§3.2–3.3, Table 1) and the body of
  Table 2, ReLU6, dropout before the classifier as in torchvision.

Width multiplier ``alpha`` scales every layer's channels, rounded to a multiple of 8 and never more
than 10% down (the reference implementations' rule; the papers do not say how they round).
MobileNetV2 does not shrink its last 1×1 conv below 1280 channels (Sandler et al. §4). Resolution multiplier
``rho`` only sets ``default_input_size`` = round(224 ρ): the nets are fully convolutional up to a
global average pool, so ρ is a property of the input pipeline (the paper's 224, 192, 160, 128
are ρ = 1, 6/7, 5/7, 4/7).

Parameters at 1000 classes: mobilenet_v1 (α = 1) 4,231,976; α = 0.75: 2,585,560; α = 0.5: 1,331,592;
α = 0.25: 470,072 (Table 6: 4.2M, 2.6M, 1.3M, 0.5M); mobilenet_v2 (α = 1) 3,504,872 (torchvision).
Departures: v1 ends with an fc after global pooling (the paper's Table 1 "FC"), no dropout by default;
the paper's Table 1 misprints the stride of the last depthwise conv as 2 — it is 1 (7×7 stays 7×7).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ConvNormAct, LayerFactory, make_divisible
from .registry import register_model

__all__ = [
    "V1_LAYERS",
    "V2_SETTINGS",
    "DepthwiseSeparable",
    "InvertedResidual",
    "MobileNetV1",
    "MobileNetV2",
    "mobilenet_v1",
    "mobilenet_v2",
]


def _check_multipliers(alpha: float, rho: float) -> None:
    for name, value in (("alpha", alpha), ("rho", rho)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def _input_size(in_channels: int, rho: float) -> tuple[int, int, int]:
    side = round(224 * rho)
    return (in_channels, side, side)


# Table 1 (Howard et al.): (output channels, stride) of the 13 depthwise separable layers.
V1_LAYERS: list[tuple[int, int]] = [
    (64, 1),  # N x 64 x 112 x 112
    (128, 2),
    (128, 1),  # N x 128 x 56 x 56
    (256, 2),
    (256, 1),  # N x 256 x 28 x 28
    (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),  # N x 512 x 14 x 14
    (1024, 2),
    (1024, 1),  # N x 1024 x 7 x 7
]


class DepthwiseSeparable(nn.Sequential):
    """3×3 depthwise conv + BN + act, then 1×1 pointwise conv + BN + act (Howard et al., Fig. 3 right)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__(
            ConvNormAct(in_channels, in_channels, 3, stride, groups=in_channels,
                        norm_layer=norm_layer, act_layer=act_layer),
            ConvNormAct(in_channels, out_channels, 1, norm_layer=norm_layer, act_layer=act_layer),
        )


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class MobileNetV1(nn.Module):
    """MobileNet v1 on N x C x H x W inputs (≥ 32×32); returns N x num_classes logits."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        alpha: float = 1.0,
        rho: float = 1.0,
        dropout: float = 0.0,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        _check_multipliers(alpha, rho)
        self.num_classes = num_classes
        self.alpha, self.rho = alpha, rho
        self.default_input_size = _input_size(in_channels, rho)

        channels = make_divisible(32 * alpha)
        layers: list[nn.Module] = [
            ConvNormAct(in_channels, channels, 3, stride=2, norm_layer=norm_layer, act_layer=act_layer)
        ]  # N x 32 x 112 x 112
        for out, stride in V1_LAYERS:
            out = make_divisible(out * alpha)
            layers.append(DepthwiseSeparable(channels, out, stride, norm_layer, act_layer))
            channels = out
        self.features = nn.Sequential(*layers)  # N x 1024 x 7 x 7
        self.num_features = channels
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.global_pool(x), 1))  # N x 1024
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Table 2 (Sandler et al.): expansion t, output channels c, repeats n, first stride s.
V2_SETTINGS: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),  # N x 16 x 112 x 112
    (6, 24, 2, 2),  # N x 24 x 56 x 56
    (6, 32, 3, 2),  # N x 32 x 28 x 28
    (6, 64, 4, 2),  # N x 64 x 14 x 14
    (6, 96, 3, 1),  # N x 96 x 14 x 14
    (6, 160, 3, 2),  # N x 160 x 7 x 7
    (6, 320, 1, 1),  # N x 320 x 7 x 7
]


class InvertedResidual(nn.Module):
    """1×1 expand (×t) + act → 3×3 depthwise + act → 1×1 linear projection (Sandler et al., Table 1).

    Residual connection between the thin bottlenecks when the stride is 1 and the channels match.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expand_ratio: int,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU6,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        hidden = round(in_channels * expand_ratio)
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(in_channels, hidden, 1, norm_layer=norm_layer, act_layer=act_layer))
        layers += [
            ConvNormAct(hidden, hidden, 3, stride, groups=hidden, norm_layer=norm_layer, act_layer=act_layer),
            ConvNormAct(hidden, out_channels, 1, norm_layer=norm_layer, act_layer=None),  # linear bottleneck
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNet v2 on N x C x H x W inputs (≥ 32×32); returns N x num_classes logits."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        alpha: float = 1.0,
        rho: float = 1.0,
        dropout: float = 0.2,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU6,
    ) -> None:
        super().__init__()
        _check_multipliers(alpha, rho)
        self.num_classes = num_classes
        self.alpha, self.rho = alpha, rho
        self.default_input_size = _input_size(in_channels, rho)

        channels = make_divisible(32 * alpha)
        layers: list[nn.Module] = [
            ConvNormAct(in_channels, channels, 3, stride=2, norm_layer=norm_layer, act_layer=act_layer)
        ]  # N x 32 x 112 x 112
        for t, c, n, s in V2_SETTINGS:
            out = make_divisible(c * alpha)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t, norm_layer, act_layer))
                channels = out
        last = make_divisible(1280 * max(1.0, alpha))
        layers.append(ConvNormAct(channels, last, 1, norm_layer=norm_layer, act_layer=act_layer))
        self.features = nn.Sequential(*layers)  # N x 1280 x 7 x 7
        self.num_features = last
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.global_pool(x), 1))  # N x 1280
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("mobilenet_v1")
def mobilenet_v1(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> MobileNetV1:
    """MobileNet v1 (Howard et al. 2017, Table 1); ``alpha`` (§3.3) and ``rho`` (§3.4) multipliers."""
    return MobileNetV1(num_classes, in_channels, **kwargs)


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> MobileNetV2:
    """MobileNet v2 (Sandler et al. 2018, Table 2); ``alpha`` width and ``rho`` resolution multipliers."""
    return MobileNetV2(num_classes, in_channels, **kwargs)
