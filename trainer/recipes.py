"""Training recipes: how each model of the zoo is trained when the user names only model and dataset.

A :class:`Recipe` is a model family's optimiser, batch size, schedule, warm-up, augmentation preset and
run length. ``python -m trainer train`` and ``augserve tune`` start from the recipe of ``--model`` and
override only what the user passes; :func:`recipe_for` finds it by model name.

Run length is a budget in **optimiser steps**, not epochs, so that a small dataset still gets enough
updates: a run lasts ``max(epochs, ceil(steps / batches_per_epoch))`` epochs. ``steps`` is sized for
the built-in datasets (digits: 23 batches of 64 per epoch, shapes: 32), ``epochs`` for a user's own
folder, where it dominates. ``trial_steps`` is one tuning trial's budget (:mod:`trainer.tuning`).

The numbers were fitted on the built-in datasets on a 2-core CPU, one model of each family trained to
the end on shapes at 64² (digits for LeNet-5): how each was found is in the comments of RECIPES below
and in docs/recipes.md, which ``make recipes`` measures again; tests/gpu/test_recipes_gpu.py checks
the big families on a GPU.

Pipelines follow the model's paper (:mod:`pipelines.presets`), fitted to the dataset by
:func:`fit_pipeline`: sizes scaled to the dataset's image side when it is smaller than the preset's
crop, color ops dropped and normalize reduced to one channel for grey images — and grey datasets
(digits) take LeNet's preset, which is made for them (no mirror: a mirrored 2 is not a 2).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

from pipelines.spec import CenterCrop, ColorShift, Normalize, PcaColor, PipelineSpec, RandomCrop, RandomResizedCrop, Resize

__all__ = ["Recipe", "RECIPES", "default_pipeline", "fit_pipeline", "recipe_for", "run_epochs"]


@dataclass(frozen=True)
class Recipe:
    """How one family of models is trained by default (units: images, optimiser steps, epochs)."""

    family: str
    pipeline: str  # a preset name, fitted to the dataset by fit_pipeline()
    batch_size: int
    lr: float
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum 0.9) | "adamw"
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    dropout: float | None = None  # the classifier's dropout; None: the model's own (its paper's)
    zero_init_residual: bool = False  # ResNets: each residual block's last BN scale starts at 0 (Goyal et al. 2017)
    batch_norm: bool = False  # VGG: the BatchNorm variant (a BN layer after each conv; not the paper's net)
    epochs: int = 1  # at least this many epochs (what counts on a large folder)
    steps: int = 600  # and at least this many optimiser steps (what counts on the built-in datasets)
    trial_steps: int = 300  # one tuning trial


# What a model without a recipe of its own takes for the optimiser's details (once the user has given
# batch size, learning rate, run length and pipeline).
GENERIC = Recipe("generic", "", batch_size=0, lr=0.0)

_CIFAR_DEPTHS = ("20", "32", "44", "56", "110")

# Patterns are matched in order; the first that matches the model name wins.
#
# AdamW throughout: with budgets of a few hundred steps the papers' SGD does not get off the ground on
# the built-in datasets. Measured on the 2-core CPU, defaults otherwise equal: LeNet-5 (ReLU) on shapes
# 30.8% with SGD 0.05 against 55.8% with AdamW 2e-3 (960 steps); ResNet-18 on shapes at 64² 20.8% with
# SGD 0.1 against 41.6% with AdamW 1e-3 (320 steps; chance 16.7%). LeNet-5 on digits: 99.2% either way.
# The other families' figures are in docs/recipes.md (`make recipes`).
_ADAMW = dict(optimizer="adamw", weight_decay=0.05, warmup_epochs=1)
RECIPES: tuple[tuple[tuple[str, ...], Recipe], ...] = (
    (("lenet5*",), Recipe("lenet", "lenet5", batch_size=64, lr=2e-3, optimizer="adamw", weight_decay=0.01, epochs=30, steps=700, trial_steps=300)),
    # CIFAR-style ResNets (He et al. 2016, §4.2) and their plain twins: the paper's CIFAR augmentation,
    # on images resized to 32² (fit_pipeline). With the ResNet preset at 64², ResNet-20 stayed at chance
    # on shapes (19.8% after 416 steps of AdamW 1e-3; 17.6% after 160 of 2e-3).
    (tuple(f"resnet{d}" for d in _CIFAR_DEPTHS), Recipe("cifar-resnet", "cifar", batch_size=64, lr=2e-3, epochs=10, steps=800, trial_steps=300, **_ADAMW)),
    (("plain*",), Recipe("plain", "cifar", batch_size=64, lr=2e-3, epochs=10, steps=800, trial_steps=300, **_ADAMW)),
    # The bottleneck ResNets did not learn with ResNet-18's recipe: ResNet-50 ended at 23.0% on shapes at 64²
    # after 320 steps (chance 16.7%). Screened in-process (shapes at 64², flips only, AdamW, cosine, 30
    # warm-up steps): after 100 steps at 1e-3 its training loss was 1.70 but test accuracy 17.0% in eval
    # mode and 18.8% with batch statistics (so not a BatchNorm running-statistics gap); with each block's
    # last BN scale started at zero (Goyal et al. 2017: every block starts as the identity, so the 16-block
    # net trains like a shallow one first) 21.8% at 1e-3, 27.4% at 2e-3, and 34.0% after 200 steps at 1e-3.
    (("resnet50", "resnet101", "resnet152"), Recipe("resnet-bottleneck", "resnet", batch_size=64, lr=1e-3, zero_init_residual=True, epochs=10, steps=480, trial_steps=200, **_ADAMW)),
    (("resnet*",), Recipe("resnet", "resnet", batch_size=64, lr=1e-3, epochs=10, steps=300, trial_steps=150, **_ADAMW)),
    (("googlenet",), Recipe("inception", "inception", batch_size=64, lr=1e-3, epochs=10, steps=300, trial_steps=150, **_ADAMW)),
    # MobileNets learn slowly from scratch: at AdamW 1e-3, 320 steps, MobileNetV2 reached 26.0% on shapes
    # at 64² (chance 16.7%); at 2e-3 it was at 37% after 320 steps and 48% after 544 of a longer run.
    (("mobilenet_v*",), Recipe("mobilenet", "mobilenet", batch_size=64, lr=2e-3, epochs=10, steps=640, trial_steps=300, **_ADAMW)),
    # AlexNet's head is VGG's kind (9216-4096-4096, dropout 0.5 in the paper): 38.2% on shapes at 64² with
    # the paper's dropout, 44.2% without (320 steps of AdamW 1e-3 each).
    (("alexnet",), Recipe("alexnet", "alexnet", batch_size=64, lr=1e-3, dropout=0.0, epochs=10, steps=300, trial_steps=150, **_ADAMW)),
    # VGG (no BatchNorm) sits at chance for a long while: 320 steps of AdamW 5e-4 ended at 17.4% on shapes
    # (chance 16.7%). Measured in-process on shapes at 64² (2,000 images, flips only), the training loss
    # stayed at ln 6 for 60-80 steps at AdamW 1e-4 / 5e-4, SGD 0.01 (either init) and with He fan-in
    # init; with the paper's dropout 0.5 it was still 1.785 after 150 steps at 1e-4, without dropout
    # 1.56 (test 28.8%). The paper's dropout regularises 1.3M images; on a built-in dataset it only keeps
    # the 25088-4096-4096 head from learning. A user's large folder may want it back: --dropout 0.5.
    (("vgg11",), Recipe("vgg", "vgg", batch_size=64, lr=1e-4, dropout=0.0, epochs=10, steps=480, trial_steps=200, **_ADAMW)),
    # Not enough for the deeper VGGs: with VGG-11's recipe VGG-16's training loss stayed at ln 6 for 150
    # steps (VGG-11's fell to 1.56). The paper trained them from VGG-11's layers (Simonyan & Zisserman,
    # §3.1); BatchNorm does the same job from scratch: VGG-16 with a BN layer after each conv, AdamW 5e-4,
    # no dropout, reached training loss 1.23 and 42.4% test in the same 150-step screening (flips only).
    # With the VGG preset's scale jittering it learns more slowly: 31.4% after 320 steps (under twice
    # chance; evaluated at the jitter's middle scale instead, no better); with VGG-11's 480, 53.4%.
    (("vgg*",), Recipe("vgg-bn", "vgg", batch_size=64, lr=5e-4, dropout=0.0, batch_norm=True, epochs=10, steps=480, trial_steps=200, **_ADAMW)),
)


def recipe_for(model: str) -> Recipe:
    """The recipe of ``model`` (a registered name); ValueError naming the model when none matches."""
    from trainer import models

    models.get_builder(model)  # an unknown model: ValueError naming the known ones
    for patterns, recipe in RECIPES:
        if any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns):
            return recipe
    raise ValueError(f"model {model!r} has no training recipe: pass --batch-size, --lr and --epochs yourself")


def run_epochs(min_epochs: int, min_steps: int, batches_per_epoch: int) -> int:
    """Epochs a run lasts to give at least ``min_epochs`` epochs and ``min_steps`` optimiser steps."""
    if batches_per_epoch < 1:
        raise ValueError(f"the dataset gives no full batch per epoch ({batches_per_epoch}): lower --batch-size")
    return max(min_epochs, math.ceil(min_steps / batches_per_epoch))


def _scale(value: int, factor: float) -> int:
    return max(1, round(value * factor))


def fit_pipeline(spec: PipelineSpec, channels: int, image_size: tuple[int, int] | None) -> PipelineSpec:
    """``spec`` fitted to a dataset of ``channels``-plane images of ``image_size`` (H, W; None when the
    sizes vary, e.g. a folder of photos).

    * A spec that crops without rescaling first (no ``resize`` or ``random_resized_crop``: LeNet's
      random crop with padding) is made for images of its crop size: larger images are resized to it.
    * Geometry: when the spec's output side (its last crop) is larger than the dataset's shorter side,
      every size — resize targets, crops, padding — is scaled by the same factor, so the preset keeps its
      proportions (the ResNet preset's 224 crop becomes 64 on 64² shapes). Never scaled up.
    * Grey images (``channels == 1``): color ops (``pca_color``, ``color_shift``) are dropped, and an RGB
      ``normalize`` becomes the mean of its three channels.
    * RGB images with a one-channel ``normalize``: its values are repeated for the three channels.
    """
    out_side = None
    for op in spec.ops:
        if isinstance(op, (RandomCrop, RandomResizedCrop, CenterCrop)):
            out_side = min(op.size)
    factor = 1.0
    if image_size is not None and out_side is not None and out_side > min(image_size):
        factor = min(image_size) / out_side
    ops = []
    rescales = any(isinstance(op, (Resize, RandomResizedCrop)) for op in spec.ops)
    resized = image_size is not None and out_side is not None and not rescales and min(image_size) > out_side
    if resized:
        ops.append(Resize(short_side=out_side))
    for op in spec.ops:
        if channels == 1 and isinstance(op, (PcaColor, ColorShift)):
            continue
        if factor != 1.0:
            if isinstance(op, Resize):
                side = op.short_side
                op = op.model_copy(update={"short_side": tuple(_scale(s, factor) for s in side) if isinstance(side, tuple) else _scale(side, factor)})
            elif isinstance(op, RandomCrop):
                op = op.model_copy(update={"size": tuple(_scale(s, factor) for s in op.size), "padding": round(op.padding * factor)})
            elif isinstance(op, (RandomResizedCrop, CenterCrop)):
                op = op.model_copy(update={"size": tuple(_scale(s, factor) for s in op.size)})
        if isinstance(op, Normalize) and len(op.mean) != channels:
            if channels == 1:
                op = op.model_copy(update={"mean": (sum(op.mean) / len(op.mean),), "std": (sum(op.std) / len(op.std),)})
            elif len(op.mean) == 1:
                op = op.model_copy(update={"mean": op.mean * channels, "std": op.std * channels})
        ops.append(op)
    name = spec.name or "custom"
    if factor != 1.0 or resized:
        name = f"{name}-{min(image_size) if factor != 1.0 else out_side}"
    data = spec.model_dump()
    data.update(name=name, ops=[op.model_dump() for op in ops])
    return PipelineSpec.model_validate(data)


def default_pipeline(recipe: Recipe, channels: int, image_size: tuple[int, int] | None) -> PipelineSpec:
    """The recipe's preset fitted to the dataset; grey datasets take LeNet's preset (made for digits)."""
    import pipelines

    preset = "lenet5" if channels == 1 else recipe.pipeline
    return fit_pipeline(pipelines.load_preset(preset), channels, image_size)


# What a run takes from its recipe when the user leaves it unset (None in TrainConfig). A recipe's
# ``dropout`` may itself be None: the model's own default.
RECIPE_FIELDS = ("batch_size", "lr", "optimizer", "weight_decay", "schedule", "warmup_epochs", "label_smoothing", "dropout", "zero_init_residual", "batch_norm")


def needs_dataset(config) -> bool:
    """Whether settling ``config`` needs the dataset's shape and size (pipeline or run length unset)."""
    return config.pipeline is None or config.epochs is None


def dataset_facts(stream) -> dict:
    """What :func:`settle` needs to know of a dataset, from a stream attached to it (any pipeline):
    ``channels``, ``image_size`` ((H, W), None when the images differ in size) and
    ``batches_per_epoch`` (full batches of the stream's batch size)."""
    info = stream.dataset_info
    size = info.get("image_size")
    return {"channels": int(info.get("channels", 3)), "image_size": tuple(size) if size else None, "batches_per_epoch": stream.batches_per_epoch}


def settle(config, *, channels: int | None = None, image_size: tuple[int, int] | None = None, batches_per_epoch: int | None = None):
    """``config`` (a :class:`trainer.run.TrainConfig`) with every field left None filled from the model's
    recipe: optimiser settings as they stand, the pipeline fitted to the dataset (``channels``,
    ``image_size``), and the number of epochs from ``--steps`` or the recipe's budget over
    ``batches_per_epoch``. Returns a new config; ValueError when the model has no recipe and a field
    is unset."""
    from dataclasses import replace

    unset = [name for name in RECIPE_FIELDS if getattr(config, name) is None]
    if not unset and not needs_dataset(config):
        return config
    try:
        recipe = recipe_for(config.model)
    except ValueError:
        # A model of the user's own: the optimiser's details may default, what must be fitted may not.
        if config.batch_size is None or config.lr is None or needs_dataset(config):
            raise
        recipe = GENERIC
    changes = {name: getattr(recipe, name) for name in unset}
    if "batch_norm" in unset and recipe.batch_norm and config.pretrained:
        # The weights decide the architecture: a plain VGG's would load into the BN variant only in part.
        from trainer import transfer

        changes["batch_norm"] = transfer.has_batch_norm(config.pretrained)
    if config.pipeline is None:
        if channels is None:
            raise ValueError("settling the pipeline needs the dataset's channels")
        changes["pipeline"] = default_pipeline(recipe, channels, image_size)
    if config.epochs is None:
        if batches_per_epoch is None:
            raise ValueError("settling the run length needs the dataset's batches per epoch")
        if config.steps is not None:
            # The budget becomes whole epochs; a settled config holds epochs only (as the user's could).
            changes["epochs"], changes["steps"] = run_epochs(1, config.steps, batches_per_epoch), None
        else:
            changes["epochs"] = run_epochs(recipe.epochs, recipe.steps, batches_per_epoch)
    return replace(config, **changes)
