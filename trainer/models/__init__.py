"""Model zoo: reference CNNs registered by name.

>>> from trainer import models
>>> net = models.create("resnet50", num_classes=10)      # any name in models.list_models()
>>> net.default_input_size                               # (C, H, W) the net was designed for
(3, 224, 224)

Every model takes NCHW float input and returns N x num_classes logits (GoogLeNet in training mode
with aux heads: a ``GoogLeNetOutputs`` tuple; train it with ``googlenet_loss``), and splits
``forward`` into ``forward_features`` (the last feature map) and ``forward_head``.
"""

from . import alexnet, googlenet, lenet, mobilenet, resnet, vgg  # noqa: F401  (registers the models)
from .googlenet import GoogLeNetOutputs, googlenet_loss
from .registry import ModelRegistry, create, get_builder, list_models, register_model

__all__ = [
    "GoogLeNetOutputs",
    "ModelRegistry",
    "create",
    "get_builder",
    "googlenet_loss",
    "list_models",
    "register_model",
]
