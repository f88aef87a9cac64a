"""ResNets and their plain counterparts (He, Zhang, Ren, Sun, "Deep residual learning for image
recognition", CVPR 2016).

* ImageNet nets (§3.4, Table 1): ``resnet18``/``34`` (basic blocks), ``resnet50``/``101``/``152``
  (bottleneck blocks, §4.1 "Deeper Bottleneck Architectures"); 7×7/2 conv + 3×3/2 max-pool stem,
  four stages of 64/128/256/512 (×4 for bottlenecks) channels, global average pool, fc.
* CIFAR nets (§4.2): ``resnet20``/``32``/``44``/``56``/``110`` = 6n+2 layers: a 3×3 conv with 16
  channels, three stages of n basic blocks with 16/32/64 channels (stride 2 at the start of stages
  2 and 3), global average pool, fc.
* ``plain*``: the same nets with every shortcut removed (§3.4 "Plain Network"), for the degradation
  experiment (Fig. 1, Fig. 4 left, Fig. 6 left, Table 2).

Shortcuts (§3.3; options A/B/C compared in §4.1, Table 3): identity when shapes match; where the
shape changes, ``shortcut="A"`` zero-pads the extra channels of a stride-subsampled identity (no
parameters), ``"B"`` projects with a 1×1 conv + BN and no activation (the "convolutional block"),
``"C"`` projects on every block. Defaults as in the paper: B for the ImageNet nets, A for the CIFAR
nets (§4.2). For the parameter-matched comparison of Table 2 build the ImageNet ResNets with
``shortcut="A"``.

Departures from the paper: bottleneck blocks put the stride on the 3×3 conv ("ResNet v1.5", as
torchvision and timm do; the paper's models strided the first 1×1 conv, which ``stride_in_1x1=True``
restores at the same parameter count). Optional, off by default: ``zero_init_residual=True`` zeroes
the last BN weight of every residual branch (Goyal et al. 2017, "Accurate, large minibatch SGD").
BN follows every conv (§3.4); convs use He normal init (§3.4 cites [13]) in fan-out mode, as
torchvision.

Parameters at 1000 classes: resnet18 11,689,512; resnet34 21,797,672; resnet50 25,557,032;
resnet101 44,549,160; resnet152 60,192,808. CIFAR nets at 10 classes (option A, so the same for
their plain twins): resnet20 269,722; resnet32 464,154; resnet44 658,586; resnet56 853,018;
resnet110 1,727,962 (§4.2, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerFactory, create_act
from .registry import register_model

__all__ = [
    "CONFIGS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ZeroPadShortcut",
    "make_shortcut",
]

SHORTCUTS = ("A", "B", "C", None)


class ZeroPadShortcut(nn.Module):
    """Option A shortcut: subsample the identity by ``stride`` and append zero channels; no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"zero-padding shortcut cannot reduce channels ({in_channels} -> {out_channels})"
            )
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            # Same output size as a stride-s conv with "same" padding: ceil(H / s).
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


def make_shortcut(
    kind: str | None, in_channels: int, out_channels: int, stride: int, norm_layer: LayerFactory
) -> nn.Module | None:
    """The shortcut of one residual block, or None for a plain block (``kind=None``)."""
    if kind not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of 'A', 'B', 'C' or None (plain), got {kind!r}")
    if kind is None:
        return None
    shape_changes = stride != 1 or in_channels != out_channels
    if kind == "C" or (kind == "B" and shape_changes):
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            norm_layer(out_channels),
        )
    if kind == "A" and shape_changes:
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return nn.Identity()


class BasicBlock(nn.Module):
    """Two 3×3 convs (§3.4, Fig. 5 left); output has ``channels`` channels."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        shortcut: str | None = "B",
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(channels)
        self.act1 = create_act(act_layer)
        self.conv2 = nn.Conv2d(channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm_layer(out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride, norm_layer)
        self.act2 = create_act(act_layer)

    def zero_init_last(self) -> None:
        if getattr(self.bn2, "weight", None) is not None:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act2(out)


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 → 1×1 expand (×4) (§4.1, Fig. 5 right); output has ``4 * channels`` channels."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        shortcut: str | None = "B",
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, channels, 1, stride=s1, bias=False)
        self.bn1 = norm_layer(channels)
        self.act1 = create_act(act_layer)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=s3, padding=1, bias=False)
        self.bn2 = norm_layer(channels)
        self.act2 = create_act(act_layer)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride, norm_layer)
        self.act3 = create_act(act_layer)

    def zero_init_last(self) -> None:
        if getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act3(out)


class ResNet(nn.Module):
    """ResNet / plain net on N x C x H x W inputs; returns N x num_classes logits.

    ``block`` and ``layers`` (blocks per stage) define the depth, ``widths`` the base channels per
    stage, ``stem`` is "imagenet" (7×7/2 conv + max-pool, 224×224 native) or "cifar" (3×3 conv,
    32×32 native); ``shortcut`` is "A", "B", "C" or None for a plain net.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        stem: str = "imagenet",
        shortcut: str | None = "B",
        zero_init_residual: bool = False,
        stride_in_1x1: bool = False,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        if len(widths) != len(layers):
            raise ValueError(f"need one width per stage: widths={widths}, layers={layers}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of 'A', 'B', 'C' or None (plain), got {shortcut!r}")
        if zero_init_residual and shortcut is None:
            raise ValueError("zero_init_residual=True would zero every block of a plain net (no shortcut)")
        block_kwargs = {}
        if stride_in_1x1:
            if block is not Bottleneck:
                raise ValueError("stride_in_1x1 applies to bottleneck blocks only")
            block_kwargs["stride_in_1x1"] = True

        self.num_classes = num_classes
        self.is_plain = shortcut is None
        native = 224 if stem == "imagenet" else 32
        self.default_input_size = (in_channels, native, native)

        imagenet = stem == "imagenet"
        if imagenet:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.act1 = create_act(act_layer)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if imagenet else nn.Identity()

        # Stage outputs, e = block.expansion:
        #   ImageNet stem, 224×224:   layer1 N x 64e x 56 x 56, layer2 N x 128e x 28 x 28,
        #                             layer3 N x 256e x 14 x 14, layer4 N x 512e x 7 x 7
        #   CIFAR stem, 32×32:        layer1 N x 16 x 32 x 32, layer2 N x 32 x 16 x 16, layer3 N x 64 x 8 x 8
        channels = widths[0]
        self.stage_names: list[str] = []
        for i, (width, depth) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(channels, width, stride, shortcut, norm_layer, act_layer, **block_kwargs))
                channels = width * block.expansion
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        self.num_features = channels
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))  # N x 64 x 112 x 112 | N x 16 x 32 x 32
        x = self.maxpool(x)  # N x 64 x 56 x 56 | N x 16 x 32 x 32
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x  # N x 512e x 7 x 7 | N x 64 x 8 x 8

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_CIFAR = dict(block=BasicBlock, widths=(16, 32, 64), stem="cifar", shortcut="A")
CONFIGS: dict[str, dict] = {
    "resnet18": dict(block=BasicBlock, layers=[2, 2, 2, 2]),
    "resnet34": dict(block=BasicBlock, layers=[3, 4, 6, 3]),
    "resnet50": dict(block=Bottleneck, layers=[3, 4, 6, 3]),
    "resnet101": dict(block=Bottleneck, layers=[3, 4, 23, 3]),
    "resnet152": dict(block=Bottleneck, layers=[3, 8, 36, 3]),
    "resnet20": dict(_CIFAR, layers=[3, 3, 3]),  # n = 3
    "resnet32": dict(_CIFAR, layers=[5, 5, 5]),  # n = 5
    "resnet44": dict(_CIFAR, layers=[7, 7, 7]),  # n = 7
    "resnet56": dict(_CIFAR, layers=[9, 9, 9]),  # n = 9
    "resnet110": dict(_CIFAR, layers=[18, 18, 18]),  # n = 18
}


def _create(variant: str, num_classes: int, in_channels: int, plain: bool = False, **kwargs) -> ResNet:
    cfg = dict(CONFIGS[variant])
    if plain:
        if "shortcut" in kwargs:
            raise TypeError(f"plain nets have no shortcuts; use {variant} with shortcut=... instead")
        cfg["shortcut"] = None
    cfg.update(kwargs)
    return ResNet(num_classes=num_classes, in_channels=in_channels, **cfg)


@register_model("resnet18")
def resnet18(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-18, basic blocks [2, 2, 2, 2] (He et al. 2016, Table 1)."""
    return _create("resnet18", num_classes, in_channels, **kwargs)


@register_model("resnet34")
def resnet34(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-34, basic blocks [3, 4, 6, 3] (He et al. 2016, Table 1, Fig. 3 right)."""
    return _create("resnet34", num_classes, in_channels, **kwargs)


@register_model("resnet50")
def resnet50(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-50, bottleneck blocks [3, 4, 6, 3] (He et al. 2016, Table 1, §4.1)."""
    return _create("resnet50", num_classes, in_channels, **kwargs)


@register_model("resnet101")
def resnet101(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-101, bottleneck blocks [3, 4, 23, 3] (He et al. 2016, Table 1, §4.1)."""
    return _create("resnet101", num_classes, in_channels, **kwargs)


@register_model("resnet152")
def resnet152(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-152, bottleneck blocks [3, 8, 36, 3] (He et al. 2016, Table 1, §4.1)."""
    return _create("resnet152", num_classes, in_channels, **kwargs)


@register_model("plain18")
def plain18(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    """Plain-18: ResNet-18 without shortcuts (He et al. 2016, §3.4, Table 2)."""
    return _create("resnet18", num_classes, in_channels, plain=True, **kwargs)


@register_model("plain34")
def plain34(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    """Plain-34: ResNet-34 without shortcuts (He et al. 2016, §3.4, Fig. 3 middle, Table 2)."""
    return _create("resnet34", num_classes, in_channels, plain=True, **kwargs)


@register_model("plain50")
def plain50(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-50's layers without shortcuts (bottleneck blocks; not trained in the paper)."""
    return _create("resnet50", num_classes, in_channels, plain=True, **kwargs)


@register_model("plain101")
def plain101(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-101's layers without shortcuts (bottleneck blocks; not trained in the paper)."""
    return _create("resnet101", num_classes, in_channels, plain=True, **kwargs)


@register_model("plain152")
def plain152(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-152's layers without shortcuts (bottleneck blocks; not trained in the paper)."""
    return _create("resnet152", num_classes, in_channels, plain=True, **kwargs)


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-20 for CIFAR, n = 3, option A shortcuts (He et al. 2016, §4.2, Table 6)."""
    return _create("resnet20", num_classes, in_channels, **kwargs)


@register_model("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-32 for CIFAR, n = 5 (He et al. 2016, §4.2, Table 6)."""
    return _create("resnet32", num_classes, in_channels, **kwargs)


@register_model("resnet44")
def resnet44(num_classes: int = 10, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-44 for CIFAR, n = 7 (He et al. 2016, §4.2, Table 6)."""
    return _create("resnet44", num_classes, in_channels, **kwargs)


@register_model("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-56 for CIFAR, n = 9 (He et al. 2016, §4.2, Table 6)."""
    return _create("resnet56", num_classes, in_channels, **kwargs)


@register_model("resnet110")
def resnet110(num_classes: int = 10, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-110 for CIFAR, n = 18 (He et al. 2016, §4.2, Table 6)."""
    return _create("resnet110", num_classes, in_channels, **kwargs)


@register_model("plain20")
def plain20(num_classes: int = 10, in_channels: int = 3, **kwargs) -> ResNet:
    """Plain-20 for CIFAR (He et al. 2016, §4.2, Fig. 6 left)."""
    return _create("resnet20", num_classes, in_channels, plain=True, **kwargs)


@register_model("plain32")
def plain32(num_classes: int = 10, in_channels: int = 3, **kwargs) -> ResNet:
    """Plain-32 for CIFAR (He et al. 2016, §4.2, Fig. 6 left)."""
    return _create("resnet32", num_classes, in_channels, plain=True, **kwargs)


@register_model("plain44")
def plain44(num_classes: int = 10, in_channels: int = 3, **kwargs) -> ResNet:
    """Plain-44 for CIFAR (He et al. 2016, §4.2, Fig. 6 left)."""
    return _create("resnet44", num_classes, in_channels, plain=True, **kwargs)


@register_model("plain56")
def plain56(num_classes: int = 10, in_channels: int = 3, **kwargs) -> ResNet:
    """Plain-56 for CIFAR (He et al. 2016, §4.2, Fig. 6 left)."""
    return _create("resnet56", num_classes, in_channels, plain=True, **kwargs)


@register_model("plain110")
def plain110(num_classes: int = 10, in_channels: int = 3, **kwargs) -> ResNet:
    """Plain-110 for CIFAR (the paper's Fig. 6 stops at plain-56; kept for the sweep)."""
    return _create("resnet110", num_classes, in_channels, plain=True, **kwargs)
