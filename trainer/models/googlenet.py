"""GoogLeNet / Inception v1 (Szegedy et al., "Going deeper with convolutions", CVPR 2015, §4–5,
Table 1, Fig. 2b and Fig. 3).

Nine Inception modules, each concatenating four branches: 1×1; 1×1 reduce → 3×3; 1×1 reduce → 5×5;
3×3 max-pool → 1×1 projection (Fig. 2b, channel numbers from Table 1). Two auxiliary classifiers on
top of inception 4a and 4d (§5: 5×5/3 average pool, 1×1 conv with 128 filters, fc 1024 + ReLU,
dropout 0.7, linear classifier) add 0.3 × their losses during training and are dropped at inference.

The default configuration is torchvision's (6,624,904 parameters at 1000 classes without the aux
heads; 13,004,888 with them), which departs from the paper:

* every conv is followed by BatchNorm (eps 1e-3) and has no bias (BN came after the paper);
* the "5×5" branch uses a 3×3 kernel (a slip of the port torchvision's weights came from, kept there
  because changing it would need retraining: pytorch/vision#906);
* no local response normalization;
* init is a truncated normal with std 0.01 for convs and linear layers, as torchvision.

The paper's configuration is ``googlenet(norm_layer=None, branch3_kernel=5, lrn=True)``: convs with
bias and no BN, a real 5×5 branch, LRN after the first max-pool and after conv3 (Fig. 3; Caffe's
k=1, n=5, α=1e-4, β=0.75); convs then use He normal init so the net trains without BN. That
configuration has 6,998,552 parameters at 1000 classes without aux heads.

Also: the main classifier's dropout is the paper's 0.4 (torchvision uses 0.2); the pooling in front of
the aux heads and the head is adaptive where the paper's fixed windows would not fit small inputs.
Inputs from 32×32 up work; 224×224 is native.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvNormAct, LayerFactory, create_act
from .registry import register_model

__all__ = ["GoogLeNet", "GoogLeNetOutputs", "Inception", "InceptionAux", "googlenet", "googlenet_loss"]


class GoogLeNetOutputs(NamedTuple):
    """What a GoogLeNet with aux heads returns in training mode: N x num_classes logits each."""

    logits: torch.Tensor
    aux1: torch.Tensor
    aux2: torch.Tensor


def googlenet_loss(
    outputs: GoogLeNetOutputs | torch.Tensor, targets: torch.Tensor, aux_weight: float = 0.3, **kwargs
) -> torch.Tensor:
    """Cross-entropy of the main logits + ``aux_weight`` × (aux1 + aux2) losses (§5: weight 0.3).

    ``outputs`` may also be a plain logits tensor (eval mode, or ``aux_logits=False``); ``kwargs``
    go to ``F.cross_entropy`` (``label_smoothing=``, ``reduction=``...).
    """
    if isinstance(outputs, GoogLeNetOutputs):
        aux = F.cross_entropy(outputs.aux1, targets, **kwargs) + F.cross_entropy(outputs.aux2, targets, **kwargs)
        return F.cross_entropy(outputs.logits, targets, **kwargs) + aux_weight * aux
    return F.cross_entropy(outputs, targets, **kwargs)


class Inception(nn.Module):
    """One Inception module (Fig. 2b); output: N x (ch1x1 + ch3x3 + ch5x5 + pool_proj) x H x W."""

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        branch3_kernel: int = 3,
        norm_layer: LayerFactory | None = None,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        self.branch1 = conv(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(conv(in_channels, ch3x3red, 1), conv(ch3x3red, ch3x3, 3))
        self.branch3 = nn.Sequential(conv(in_channels, ch5x5red, 1), conv(ch5x5red, ch5x5, branch3_kernel))
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1), conv(in_channels, pool_proj, 1)
        )
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


class InceptionAux(nn.Module):
    """Auxiliary classifier (§5) on an N x C x 14 x 14 map (at 224×224 input); returns N x num_classes."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        dropout: float = 0.7,
        norm_layer: LayerFactory | None = None,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        self.conv = ConvNormAct(in_channels, 128, 1, norm_layer=norm_layer, act_layer=act_layer)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.act = create_act(act_layer)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) >= 5:
            x = F.avg_pool2d(x, kernel_size=5, stride=3)  # N x C x 4 x 4 at 14×14
        x = F.adaptive_avg_pool2d(x, 4)  # identity at 14×14; makes small inputs fit fc1
        x = torch.flatten(self.conv(x), 1)  # N x 2048
        return self.fc2(self.dropout(self.act(self.fc1(x))))


# Table 1: (#1×1, #3×3 reduce, #3×3, #5×5 reduce, #5×5, pool proj) per module.
INCEPTION_CONFIGS: dict[str, tuple[int, int, int, int, int, int]] = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


def _caffe_lrn() -> nn.Module:
    return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)


class GoogLeNet(nn.Module):
    """GoogLeNet on N x C x H x W inputs (224×224 native, ≥ 32×32).

    Returns N x num_classes logits, or :class:`GoogLeNetOutputs` in training mode when
    ``aux_logits=True``. ``norm_layer=None`` removes BatchNorm (convs get a bias).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        aux_logits: bool = True,
        branch3_kernel: int = 3,
        lrn: bool = False,
        dropout: float = 0.4,
        aux_dropout: float = 0.7,
        norm_layer: LayerFactory | None = partial(nn.BatchNorm2d, eps=1e-3),
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        if branch3_kernel not in (3, 5):
            raise ValueError(f"branch3_kernel must be 3 (torchvision) or 5 (paper), got {branch3_kernel!r}")
        self.num_classes = num_classes
        self.default_input_size = (in_channels, 224, 224)
        self.num_features = 1024
        conv = partial(ConvNormAct, norm_layer=norm_layer, act_layer=act_layer)
        inception = partial(Inception, branch3_kernel=branch3_kernel, norm_layer=norm_layer, act_layer=act_layer)
        pool = partial(nn.MaxPool2d, kernel_size=3, stride=2, ceil_mode=True)

        self.conv1 = conv(in_channels, 64, 7, stride=2)  # N x 64 x 112 x 112
        self.maxpool1 = pool()  # N x 64 x 56 x 56
        self.lrn1 = _caffe_lrn() if lrn else nn.Identity()
        self.conv2 = conv(64, 64, 1)
        self.conv3 = conv(64, 192, 3)  # N x 192 x 56 x 56
        self.lrn2 = _caffe_lrn() if lrn else nn.Identity()
        self.maxpool2 = pool()  # N x 192 x 28 x 28

        channels = 192
        for name in INCEPTION_CONFIGS:
            module = inception(channels, *INCEPTION_CONFIGS[name])
            self.add_module(f"inception{name}", module)
            channels = module.out_channels
        self.maxpool3 = pool()  # after 3b: N x 480 x 14 x 14
        self.maxpool4 = pool()  # after 4e: N x 832 x 7 x 7

        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes, aux_dropout, norm_layer, act_layer)  # on 4a
            self.aux2 = InceptionAux(528, num_classes, aux_dropout, norm_layer, act_layer)  # on 4d
        else:
            self.aux1 = self.aux2 = None

        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d) and norm_layer is None:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def _trunk(self, x: torch.Tensor, with_aux: bool):
        aux1 = aux2 = None
        x = self.lrn1(self.maxpool1(self.conv1(x)))  # N x 64 x 56 x 56
        x = self.maxpool2(self.lrn2(self.conv3(self.conv2(x))))  # N x 192 x 28 x 28
        x = self.inception3a(x)  # N x 256 x 28 x 28
        x = self.inception3b(x)  # N x 480 x 28 x 28
        x = self.maxpool3(x)  # N x 480 x 14 x 14
        x = self.inception4a(x)  # N x 512 x 14 x 14
        if with_aux:
            aux1 = self.aux1(x)
        x = self.inception4b(x)  # N x 512 x 14 x 14
        x = self.inception4c(x)  # N x 512 x 14 x 14
        x = self.inception4d(x)  # N x 528 x 14 x 14
        if with_aux:
            aux2 = self.aux2(x)
        x = self.inception4e(x)  # N x 832 x 14 x 14
        x = self.maxpool4(x)  # N x 832 x 7 x 7
        x = self.inception5a(x)  # N x 832 x 7 x 7
        x = self.inception5b(x)  # N x 1024 x 7 x 7
        return x, aux1, aux2

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._trunk(x, with_aux=False)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.global_pool(x), 1))  # N x 1024
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> GoogLeNetOutputs | torch.Tensor:
        with_aux = self.training and self.aux1 is not None
        x, aux1, aux2 = self._trunk(x, with_aux)
        logits = self.forward_head(x)
        return GoogLeNetOutputs(logits, aux1, aux2) if with_aux else logits


@register_model("googlenet")
def googlenet(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> GoogLeNet:
    """GoogLeNet (Szegedy et al. 2015, Table 1), torchvision's BN configuration by default.

    ``norm_layer=None, branch3_kernel=5, lrn=True`` gives the paper's; ``aux_logits=False`` drops
    the auxiliary heads.
    """
    return GoogLeNet(num_classes, in_channels, **kwargs)
