"""LeNet-5 (LeCun, Bottou, Bengio, Haffner, "Gradient-based learning applied to document recognition",
Proc. IEEE 86(11), 1998, §II-B and Fig. 2).

Input: N x C x 32 x 32 float (the paper's 32×32 field with the 28×28 digit centred; C = 1 for grey
digits). Layout: C1 conv 5×5 (6) → S2 pool 2×2 → C3 conv 5×5 (16) → S4 pool 2×2 → C5 (120) → F6 (84)
→ output.

Departures from the paper, all deliberate simplifications that keep the layer sizes:

* C3 is fully connected to all six S2 maps (the paper's Table I connects each C3 map to a subset of
  3–6 maps: 1,516 weights instead of 2,416).
* S2/S4 are plain pooling layers; the paper's subsampling units have a trainable coefficient and bias
  per map followed by the squashing function.
* C5 is written as a fully-connected layer on the flattened 16×5×5 map. On a 32×32 input this is the
  same function as the paper's 5×5 convolution (identical parameter count).
* The output layer is a linear layer trained with cross-entropy instead of the paper's Euclidean RBF
  units with fixed ±1 codes (84×10 weights, no bias).

``lenet5`` keeps the paper's squashing function f(a) = 1.7159 tanh(2a/3) (Appendix A), average pooling
and its weight init (uniform in ±2.4 / fan_in, also Appendix A). ``lenet5_relu`` is the modern variant:
ReLU, max pooling, PyTorch's default init.

Parameters at 10 classes and 1 input channel: 61,706 (C1 156, C3 2,416, C5 48,120, F6 10,164, out 850).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LayerFactory, create_act
from .registry import register_model

__all__ = ["LeNet5", "ScaledTanh", "lenet5", "lenet5_relu"]


class ScaledTanh(nn.Module):
    """f(a) = A tanh(S a) with A = 1.7159, S = 2/3, so that f(±1) = ±1 (LeCun et al. 1998, Appendix A)."""

    def __init__(self, amplitude: float = 1.7159, slope: float = 2.0 / 3.0) -> None:
        super().__init__()
        self.amplitude = amplitude
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.amplitude * torch.tanh(self.slope * x)

    def extra_repr(self) -> str:
        return f"amplitude={self.amplitude}, slope={self.slope:.4f}"


class LeNet5(nn.Module):
    """LeNet-5 on N x C x 32 x 32 inputs; returns N x num_classes logits.

    ``act_layer`` and ``pool_layer`` are classes (``pool_layer(kernel_size)``); ``paper_init`` selects
    the paper's uniform ±2.4/fan_in init instead of PyTorch's default.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        act_layer: LayerFactory = ScaledTanh,
        pool_layer: LayerFactory = nn.AvgPool2d,
        paper_init: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.default_input_size = (in_channels, 32, 32)
        self.num_features = 84
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),  # C1: N x 6 x 28 x 28
            create_act(act_layer),
            pool_layer(2),  # S2: N x 6 x 14 x 14
            nn.Conv2d(6, 16, kernel_size=5),  # C3: N x 16 x 10 x 10
            create_act(act_layer),
            pool_layer(2),  # S4: N x 16 x 5 x 5
        )
        self.pre_logits = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(16 * 5 * 5, 120),  # C5: N x 120
            create_act(act_layer),
            nn.Linear(120, 84),  # F6: N x 84
            create_act(act_layer),
        )
        self.fc = nn.Linear(84, num_classes)
        if paper_init:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    fan_in = m.weight[0].numel()
                    nn.init.uniform_(m.weight, -2.4 / fan_in, 2.4 / fan_in)
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if x.shape[-2:] != (5, 5):
            raise ValueError(
                f"LeNet-5 needs 32x32 inputs (a 5x5 map after S4); got a {tuple(x.shape[-2:])} map"
            )
        x = self.pre_logits(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, **kwargs) -> LeNet5:
    """Classic LeNet-5: scaled tanh, average pooling, the paper's init (LeCun et al. 1998, §II-B)."""
    return LeNet5(num_classes, in_channels, **kwargs)


@register_model("lenet5_relu")
def lenet5_relu(num_classes: int = 10, in_channels: int = 1, **kwargs) -> LeNet5:
    """Modern LeNet-5: ReLU, 2×2 max pooling, PyTorch's default init; same layer sizes."""
    kwargs = {"act_layer": nn.ReLU, "pool_layer": nn.MaxPool2d, "paper_init": False, **kwargs}
    return LeNet5(num_classes, in_channels, **kwargs)
