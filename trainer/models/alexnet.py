"""AlexNet (Krizhevsky, Sutskever, Hinton, "ImageNet classification with deep convolutional neural
networks", NIPS 2012, §3 and Fig. 2).

Single-tower layout of torchvision's AlexNet (64, 192, 384, 256, 256 conv channels; the "one weird
trick" variant): the paper's net is split over two GPUs with 96, 256, 384, 384, 256 channels and
grouped connections in conv2, conv4 and conv5. An adaptive average pool to 6×6 in front of the
classifier lets the net run on inputs smaller than 224×224 (it is the identity at 224×224).

Local response normalization after the ReLUs of conv1 and conv2 (§3.3: k=2, n=5, α=1e-4, β=0.75) is
optional (``lrn=True``) and off by default, as in torchvision. Note that ``nn.LocalResponseNorm``
divides α by n, so it is given α·n to compute the paper's formula. Convolutions use He (kaiming)
normal init and linear layers N(0, 0.01), not the paper's N(0, 0.01) everywhere with some biases at 1.

61,100,840 parameters at 1000 classes and 3 input channels.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LayerFactory, create_act
from .registry import register_model

__all__ = ["AlexNet", "alexnet"]

# AlexNet §3.3: b = a / (k + α Σ a²)^β over n = 5 adjacent channels.
_LRN_SIZE, _LRN_ALPHA, _LRN_BETA, _LRN_K = 5, 1e-4, 0.75, 2.0


def _lrn() -> nn.LocalResponseNorm:
    return nn.LocalResponseNorm(_LRN_SIZE, alpha=_LRN_ALPHA * _LRN_SIZE, beta=_LRN_BETA, k=_LRN_K)


class AlexNet(nn.Module):
    """AlexNet on N x C x H x W inputs (224×224 native, ≥ 63×63); returns N x num_classes logits."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        lrn: bool = False,
        dropout: float = 0.5,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.default_input_size = (in_channels, 224, 224)
        self.num_features = 4096

        def norm() -> list[nn.Module]:
            return [_lrn()] if lrn else []

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2),
            create_act(act_layer),
            *norm(),
            nn.MaxPool2d(kernel_size=3, stride=2),  # N x 64 x 27 x 27
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            create_act(act_layer),
            *norm(),
            nn.MaxPool2d(kernel_size=3, stride=2),  # N x 192 x 13 x 13
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            create_act(act_layer),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            create_act(act_layer),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            create_act(act_layer),
            nn.MaxPool2d(kernel_size=3, stride=2),  # N x 256 x 6 x 6
        )
        self.global_pool = nn.AdaptiveAvgPool2d((6, 6))
        self.pre_logits = nn.Sequential(
            nn.Flatten(1),  # N x 9216
            nn.Dropout(dropout),
            nn.Linear(256 * 6 * 6, 4096),
            create_act(act_layer),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            create_act(act_layer),  # N x 4096
        )
        self.fc = nn.Linear(4096, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
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


@register_model("alexnet")
def alexnet(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> AlexNet:
    """AlexNet, single tower (Krizhevsky et al. 2012, §3.5 / Fig. 2); ``lrn=True`` adds §3.3's LRN."""
    return AlexNet(num_classes, in_channels, **kwargs)
