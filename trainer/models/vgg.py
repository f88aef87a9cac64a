"""VGG (Simonyan, Zisserman, "Very deep convolutional networks for large-scale image recognition",
ICLR 2015, §2.1–2.2 and Table 1).

Stacks of 3×3 stride-1 "same" convolutions with ReLU, 2×2 stride-2 max pooling between stages, and
a 4096-4096 classifier with dropout 0.5 (§3.1). Configurations A, B, D, E of Table 1 are data
(``CONFIGS``); the LRN variant A-LRN and the 1×1-conv variant C are not provided.

Departures from the paper, as in torchvision: an adaptive average pool to 7×7 in front of the
classifier lets the net run on inputs smaller than 224×224 (identity at 224×224); ``batch_norm=True``
inserts BatchNorm after every convolution (not in the paper, which predates it; the conv bias is kept
for parity with torchvision's ``vgg*_bn``); init is He normal (fan-out) for convolutions and N(0, 0.01)
for linear layers (the paper trained A first and copied its layers into the deeper nets, §3.1).

vgg16: 138,357,544 parameters at 1000 classes; vgg19: 143,667,240.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LayerFactory, create_act
from .registry import register_model

__all__ = ["CONFIGS", "VGG", "vgg11", "vgg13", "vgg16", "vgg19"]

M = "M"  # 2×2 max pool
CONFIGS: dict[str, list[int | str]] = {
    "A": [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],  # VGG-11
    "B": [64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],  # VGG-13
    "D": [64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M],  # VGG-16
    "E": [64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M, 512, 512, 512, 512, M],  # VGG-19
}


class VGG(nn.Module):
    """VGG on N x C x H x W inputs (224×224 native, ≥ 32×32); returns N x num_classes logits."""

    def __init__(
        self,
        cfg: list[int | str],
        num_classes: int = 1000,
        in_channels: int = 3,
        batch_norm: bool = False,
        dropout: float = 0.5,
        act_layer: LayerFactory = nn.ReLU,
        norm_layer: LayerFactory = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.default_input_size = (in_channels, 224, 224)
        self.num_features = 4096

        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == M:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(nn.Conv2d(channels, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(norm_layer(v))
            layers.append(create_act(act_layer))
            channels = v
        self.features = nn.Sequential(*layers)  # N x 512 x 7 x 7 at 224×224
        self.global_pool = nn.AdaptiveAvgPool2d((7, 7))
        self.pre_logits = nn.Sequential(
            nn.Flatten(1),  # N x 25088
            nn.Linear(channels * 7 * 7, 4096),
            create_act(act_layer),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            create_act(act_layer),
            nn.Dropout(dropout),  # N x 4096
        )
        self.fc = nn.Linear(4096, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("vgg11")
def vgg11(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> VGG:
    """VGG-11, configuration A (Simonyan & Zisserman 2015, Table 1)."""
    return VGG(CONFIGS["A"], num_classes, in_channels, **kwargs)


@register_model("vgg13")
def vgg13(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> VGG:
    """VGG-13, configuration B (Simonyan & Zisserman 2015, Table 1)."""
    return VGG(CONFIGS["B"], num_classes, in_channels, **kwargs)


@register_model("vgg16")
def vgg16(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> VGG:
    """VGG-16, configuration D (Simonyan & Zisserman 2015, Table 1); ``batch_norm=True`` for BN."""
    return VGG(CONFIGS["D"], num_classes, in_channels, **kwargs)


@register_model("vgg19")
def vgg19(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> VGG:
    """VGG-19, configuration E (Simonyan & Zisserman 2015, Table 1); ``batch_norm=True`` for BN."""
    return VGG(CONFIGS["E"], num_classes, in_channels, **kwargs)
