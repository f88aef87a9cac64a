"""Training recipes: every model has one, pipelines are fitted to the dataset exactly as documented,
and a run settles what the user left unset (and nothing else)."""

import math

import pytest

import pipelines
from pipelines.spec import CenterCrop, Normalize, PcaColor, RandomCrop, RandomResizedCrop, Resize
from trainer import models
from trainer.recipes import GENERIC, RECIPES, default_pipeline, fit_pipeline, recipe_for, run_epochs, settle
from trainer.run import TrainConfig


# Every optimiser field given, so that settle() only fills what a test leaves out (the model options).
GIVEN = dict(epochs=2, batch_size=8, lr=0.1, optimizer="sgd", weight_decay=0.0, schedule="step", warmup_epochs=0.0, label_smoothing=0.0)


class RGBStream:
    """What Run._make_model reads of a stream: three-channel images of two classes."""

    dataset_info = {"channels": 3}
    classes = ["a", "b"]


def assert_flag_parses(model: str, flag: str, field: str) -> None:
    """``--flag`` and ``--no-flag`` set ``field`` True and False; neither leaves it None (the recipe decides)."""
    from trainer.cli import build_parser, config_from

    parser = build_parser()
    base = ["train", "--model", model, "--dataset", "shapes"]
    assert getattr(config_from(parser.parse_args(base)), field) is None
    assert getattr(config_from(parser.parse_args(base + [f"--no-{flag}"])), field) is False
    assert getattr(config_from(parser.parse_args(base + [f"--{flag}"])), field) is True


def test_every_registered_model_has_a_recipe():
    families = {name: recipe_for(name).family for name in models.list_models()}
    assert families["lenet5"] == families["lenet5_relu"] == "lenet"
    assert {families[f"resnet{d}"] for d in (20, 32, 44, 56, 110)} == {"cifar-resnet"}
    assert {families[f"resnet{d}"] for d in (18, 34)} == {"resnet"}  # 34 and 50 are not CIFAR depths
    assert {families[f"resnet{d}"] for d in (50, 101, 152)} == {"resnet-bottleneck"}
    assert families["googlenet"] == "inception" and families["vgg11"] == "vgg" and families["mobilenet_v2"] == "mobilenet"
    assert {families[f"vgg{d}"] for d in (13, 16, 19)} == {"vgg-bn"}  # VGG-11's recipe leaves VGG-16 at chance
    assert all(name.startswith("plain") for name, family in families.items() if family == "plain")
    for _patterns, recipe in RECIPES:
        assert recipe.pipeline in pipelines.list_presets()
        assert recipe.optimizer in ("sgd", "adamw") and recipe.steps >= recipe.trial_steps > 0 and recipe.epochs >= 1
    with pytest.raises(ValueError, match="unknown model 'mynet'"):
        recipe_for("mynet")


@pytest.mark.parametrize("epochs, steps, per_epoch, expected", [(30, 700, 23, 31), (30, 700, 18, 39), (16, 500, 1000, 16), (1, 300, 300, 1), (1, 301, 300, 2)])
def test_run_length_is_the_larger_of_epochs_and_the_step_budget(epochs, steps, per_epoch, expected):
    assert run_epochs(epochs, steps, per_epoch) == expected
    assert run_epochs(epochs, steps, per_epoch) * per_epoch >= max(steps, epochs * per_epoch)


def test_run_length_needs_a_full_batch():
    with pytest.raises(ValueError, match="no full batch per epoch"):
        run_epochs(1, 10, 0)


def test_fit_scales_every_size_of_a_preset_to_a_smaller_dataset():
    vgg = fit_pipeline(pipelines.load_preset("vgg"), 3, (64, 64))
    resize, crop = vgg.ops[0], vgg.ops[1]
    assert isinstance(resize, Resize) and resize.short_side == (73, 146)  # 256..512 × 64/224
    assert isinstance(crop, RandomCrop) and crop.size == (64, 64) and vgg.name == "vgg-64"
    assert vgg.ops[2:] == pipelines.load_preset("vgg").ops[2:]  # mirror, PCA lighting, normalize unchanged
    resnet = fit_pipeline(pipelines.load_preset("resnet"), 3, (48, 60))
    assert isinstance(resnet.ops[0], RandomResizedCrop) and resnet.ops[0].size == (48, 48)
    assert resnet.ops[0].scale == (0.08, 1.0)  # fractions of area do not scale


def test_fit_never_scales_up_and_leaves_varying_sizes_alone():
    for image_size in ((500, 375), None):
        assert fit_pipeline(pipelines.load_preset("resnet"), 3, image_size).ops == pipelines.load_preset("resnet").ops


def test_fit_resizes_images_larger_than_a_crop_without_rescaling():
    lenet = fit_pipeline(pipelines.load_preset("lenet5"), 3, (64, 64))
    assert lenet.ops[0] == Resize(short_side=32) and lenet.ops[1] == RandomCrop(size=32, padding=2)
    assert lenet.name == "lenet5-32"
    assert fit_pipeline(pipelines.load_preset("lenet5"), 1, (32, 32)).ops == pipelines.load_preset("lenet5").ops


def test_fit_to_grey_drops_color_ops_and_averages_normalize():
    grey = fit_pipeline(pipelines.load_preset("alexnet"), 1, (32, 32))
    assert not any(isinstance(op, PcaColor) for op in grey.ops)
    assert grey.normalize.mean == pytest.approx((sum((0.485, 0.456, 0.406)) / 3,))
    assert grey.normalize.std == pytest.approx((sum((0.229, 0.224, 0.225)) / 3,))
    rgb = fit_pipeline(pipelines.load_preset("lenet5"), 3, (32, 32))
    assert rgb.normalize == Normalize(mean=(0.26,) * 3, std=(0.36,) * 3)


def test_grey_datasets_take_lenets_preset_whatever_the_family():
    spec = default_pipeline(recipe_for("resnet18"), 1, (32, 32))
    assert spec.ops == pipelines.load_preset("lenet5").ops  # no mirror on digits
    spec = default_pipeline(recipe_for("resnet18"), 3, (64, 64))
    assert spec.name == "resnet-64" and spec.ops[0].size == (64, 64)
    assert default_pipeline(recipe_for("googlenet"), 3, None).ops[0] == pipelines.load_preset("inception").ops[0]
    assert isinstance(fit_pipeline(pipelines.load_preset("alexnet"), 3, (64, 64)).ops[1], RandomCrop)
    assert not any(isinstance(op, CenterCrop) for op in spec.ops)


def test_settle_fills_only_what_is_unset():
    config = TrainConfig(model="resnet18", dataset="shapes", lr=0.3)
    settled = settle(config, channels=3, image_size=(64, 64), batches_per_epoch=31)
    recipe = recipe_for("resnet18")
    assert settled.lr == 0.3  # given: kept
    assert (settled.batch_size, settled.optimizer, settled.weight_decay, settled.warmup_epochs) == (recipe.batch_size, recipe.optimizer, recipe.weight_decay, recipe.warmup_epochs)
    assert settled.epochs == max(recipe.epochs, math.ceil(recipe.steps / 31))
    assert settled.pipeline.name == "resnet-64"
    assert config.lr == 0.3 and config.pipeline is None  # the input is not changed
    by_steps = settle(TrainConfig(model="resnet18", dataset="shapes", steps=100), channels=3, image_size=(64, 64), batches_per_epoch=31)
    assert by_steps.epochs == 4 and by_steps.steps is None  # ceil(100 / 31): a step budget, rounded up to whole epochs
    by_steps.validate()
    given = settle(TrainConfig(model="resnet18", pipeline="resnet", epochs=2, batch_size=8, lr=0.1, optimizer="sgd", weight_decay=0.0, schedule="step", warmup_epochs=0.0, label_smoothing=0.1))
    assert given.pipeline == "resnet" and given.epochs == 2 and given.schedule == "step"  # nothing to settle: no dataset needed


def test_a_model_without_a_recipe_needs_the_essentials(monkeypatch):
    # A model of the user's own, registered under a name no recipe pattern matches (patched in, so the
    # registry the other tests iterate stays as it is).
    monkeypatch.setattr(models, "get_builder", lambda name: object())

    with pytest.raises(ValueError, match="model 'test_recipeless_net' has no training recipe: pass --batch-size, --lr and --epochs yourself"):
        settle(TrainConfig(model="test_recipeless_net", pipeline="resnet", epochs=2, batch_size=8), channels=3, image_size=None, batches_per_epoch=5)
    settled = settle(TrainConfig(model="test_recipeless_net", pipeline="resnet", epochs=2, batch_size=8, lr=0.1))
    assert (settled.optimizer, settled.weight_decay, settled.schedule) == (GENERIC.optimizer, GENERIC.weight_decay, GENERIC.schedule)


def test_both_epochs_and_steps_is_a_mistake():
    with pytest.raises(ValueError, match="give --epochs or --steps, not both"):
        TrainConfig(epochs=2, steps=10).validate()


def test_dropout_comes_from_the_recipe_unless_given():
    """VGG's recipe trains without the paper's dropout; a given --dropout wins; families whose recipe
    says nothing keep their model's own (None: the builder's default)."""
    vgg = recipe_for("vgg11")
    assert vgg.dropout == 0.0
    everything = dict(pipeline="vgg", **GIVEN)
    assert settle(TrainConfig(model="vgg11", **everything)).dropout == 0.0
    assert settle(TrainConfig(model="vgg11", dropout=0.5, **everything)).dropout == 0.5
    assert settle(TrainConfig(model="resnet18", **everything)).dropout is None
    with pytest.raises(ValueError, match=r"--dropout must be in \[0, 1\), got 1.0"):
        TrainConfig(dropout=1.0).validate()


def test_dropout_reaches_the_model_and_a_model_without_one_says_so():
    from trainer.run import Run

    run = Run(TrainConfig(model="vgg11", dataset="shapes", dropout=0.25))
    model = run._make_model(RGBStream())
    assert [m.p for m in model.modules() if m.__class__.__name__ == "Dropout"] == [0.25, 0.25]
    with pytest.raises(ValueError, match="--dropout: model 'resnet18' has no dropout to set"):
        Run(TrainConfig(model="resnet18", dataset="shapes", dropout=0.25))._make_model(RGBStream())


def test_recipes_table_shows_a_recipes_dropout_only_where_it_sets_one():
    from trainer.experiments.recipes_check import markdown

    row = dict(model="vgg11", dataset="shapes", family="vgg", pipeline="vgg-64", optimizer="adamw", lr=1e-4, batch_size=64, dropout=0.0, steps=480, epochs=15, accuracy=0.404, chance=1 / 6, learns=True, time_s=2367)
    lines = markdown([row, {**row, "model": "resnet18", "dropout": None}], "cmd").splitlines()
    assert lines[-2] == "| vgg11 | shapes | vgg | vgg-64 | adamw 0.0001, 64, dropout 0 | 480 (15) | 40.4% | 16.7% | yes | 2367 s | – |"
    assert "| adamw 0.0001, 64 | 480 (15) |" in lines[-1]


def test_bottleneck_resnets_start_each_block_as_the_identity_unless_told_otherwise():
    """ResNet-50/101/152 take their own recipe (zero-γ: each block's last BN scale starts at 0); ResNet-18
    and the CIFAR ResNets keep the paper's init; --no-zero-init-residual and --zero-init-residual win."""
    from trainer.run import Run

    everything = dict(pipeline="resnet", **GIVEN)
    for model in ("resnet50", "resnet101", "resnet152"):
        assert recipe_for(model).family == "resnet-bottleneck" and recipe_for(model).zero_init_residual is True
        assert settle(TrainConfig(model=model, **everything)).zero_init_residual is True
    for model in ("resnet18", "resnet34", "resnet56", "vgg11"):
        assert settle(TrainConfig(model=model, **everything)).zero_init_residual is False
    assert settle(TrainConfig(model="resnet50", zero_init_residual=False, **everything)).zero_init_residual is False
    assert settle(TrainConfig(model="resnet18", zero_init_residual=True, **everything)).zero_init_residual is True

    assert_flag_parses("resnet50", "zero-init-residual", "zero_init_residual")

    def last_bn_scales(model):
        return [float(block.bn3.weight.detach().abs().sum()) for block in model.modules() if block.__class__.__name__ == "Bottleneck"]

    zeroed = Run(TrainConfig(model="resnet50", dataset="shapes", zero_init_residual=True))._make_model(RGBStream())
    paper = Run(TrainConfig(model="resnet50", dataset="shapes", zero_init_residual=False))._make_model(RGBStream())
    assert len(last_bn_scales(zeroed)) == 16 and set(last_bn_scales(zeroed)) == {0.0}
    assert all(scale > 0 for scale in last_bn_scales(paper))
    with pytest.raises(ValueError, match="--zero-init-residual: model 'vgg11' has no residual blocks to start at zero"):
        Run(TrainConfig(model="vgg11", dataset="shapes", zero_init_residual=True))._make_model(RGBStream())


def test_deeper_vggs_take_the_batchnorm_variant_unless_told_or_their_weights_say_otherwise(tmp_path):
    """VGG-13/16/19 train the BatchNorm variant by default (VGG-11 keeps the paper's net); --no-batch-norm
    and --batch-norm win; with --pretrained the weights decide, so a plain VGG's load whole."""
    import torch

    from trainer.run import Run

    everything = dict(pipeline="vgg", **GIVEN)
    for model in ("vgg13", "vgg16", "vgg19"):
        assert recipe_for(model).batch_norm is True and recipe_for(model).dropout == 0.0
        assert settle(TrainConfig(model=model, **everything)).batch_norm is True
    for model in ("vgg11", "resnet18", "alexnet"):
        assert settle(TrainConfig(model=model, **everything)).batch_norm is False
    assert settle(TrainConfig(model="vgg16", batch_norm=False, **everything)).batch_norm is False
    assert settle(TrainConfig(model="vgg11", batch_norm=True, **everything)).batch_norm is True

    assert_flag_parses("vgg16", "batch-norm", "batch_norm")

    def batch_norms(model):
        return sum(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())

    assert batch_norms(Run(TrainConfig(model="vgg13", dataset="shapes", batch_norm=True))._make_model(RGBStream())) == 10  # one per conv
    plain = Run(TrainConfig(model="vgg13", dataset="shapes", batch_norm=False))._make_model(RGBStream())
    assert batch_norms(plain) == 0
    with pytest.raises(ValueError, match="--batch-norm: model 'resnet18' has no BatchNorm variant"):
        Run(TrainConfig(model="resnet18", dataset="shapes", batch_norm=True))._make_model(RGBStream())

    # The weights decide by their tensors' names (tiny stand-ins here: a VGG-13's weights are 0.5 GB).
    plain_weights, bn_weights = tmp_path / "vgg13.pt", tmp_path / "vgg13_bn.pt"
    torch.save({"features.0.weight": torch.zeros(1), "features.2.weight": torch.zeros(1)}, plain_weights)
    torch.save({"features.0.weight": torch.zeros(1), "features.1.running_mean": torch.zeros(1)}, bn_weights)
    assert settle(TrainConfig(model="vgg13", pretrained=str(plain_weights), **everything)).batch_norm is False
    assert settle(TrainConfig(model="vgg13", pretrained=str(bn_weights), **everything)).batch_norm is True
    assert settle(TrainConfig(model="vgg13", pretrained=str(plain_weights), batch_norm=True, **everything)).batch_norm is True  # told
    legacy = tmp_path / "legacy_bn.pt"  # torch's pre-zip format cannot be memory-mapped: read whole
    torch.save({"features.1.running_mean": torch.zeros(1)}, legacy, _use_new_zipfile_serialization=False)
    assert settle(TrainConfig(model="vgg13", pretrained=str(legacy), **everything)).batch_norm is True

    # An ensemble member is rebuilt as its checkpoint's config says, BatchNorm included.
    from trainer import checkpoint
    from trainer.run import ensemble_member

    trained = models.create("vgg13", num_classes=2, batch_norm=True)
    checkpoint.save(str(tmp_path / "member.pt"), model=trained, optimizer=None, scaler=None, step=0, epoch=1, stream_state=None, config={"model": "vgg13", "batch_norm": True})
    member = ensemble_member(checkpoint.load(str(tmp_path / "member.pt")), "vgg16", 2, 3)
    assert batch_norms(member) == 10 and all(torch.equal(a, b) for a, b in zip(member.state_dict().values(), trained.state_dict().values()))


def test_recipes_table_shows_zero_gamma_where_a_recipe_sets_it():
    from trainer.experiments.recipes_check import markdown

    row = dict(model="resnet50", dataset="shapes", family="resnet-bottleneck", pipeline="resnet-64", optimizer="adamw", lr=1e-3, batch_size=64, dropout=None, zero_init_residual=True, steps=480, epochs=15, accuracy=0.5, chance=1 / 6, learns=True, time_s=1200)
    lines = markdown([row, {**row, "model": "resnet18", "zero_init_residual": False}], "cmd").splitlines()
    assert "| adamw 0.001, 64, zero-γ | 480 (15) |" in lines[-2]
    assert "| adamw 0.001, 64 | 480 (15) |" in lines[-1]
    vgg = dict(row, model="vgg16", family="vgg-bn", pipeline="vgg-64", lr=5e-4, dropout=0.0, zero_init_residual=False, batch_norm=True)
    assert "| adamw 0.0005, 64, dropout 0, BatchNorm | 480 (15) |" in markdown([vgg], "cmd").splitlines()[-1]


def test_make_recipes_rewrites_the_table_and_keeps_the_story_below_it():
    from trainer.experiments.recipes_check import markdown, page

    row = dict(model="resnet18", dataset="shapes", family="resnet", pipeline="resnet-64", optimizer="adamw", lr=1e-3, batch_size=64, dropout=None, steps=320, epochs=10, accuracy=0.416, chance=1 / 6, learns=True, time_s=837, measured="2026-12-07")
    generated = markdown([row], "cmd")
    assert generated.splitlines()[-1].endswith("| 837 s | 2026-12-07 |")
    old = markdown([{**row, "accuracy": 0.2, "learns": False, "measured": "2026-12-01"}], "old") + "\nHow the recipes were found:\n\n- by hand.\n"
    assert page(generated, old) == generated + "\nHow the recipes were found:\n\n- by hand.\n"
    assert page(generated, None) == page(generated, "") == generated
    assert page(generated, markdown([row], "old")) == generated  # nothing below the table: nothing kept
