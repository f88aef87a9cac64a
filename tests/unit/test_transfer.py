"""Transfer-learning helpers: weight loading (renamed layers, new classes), freezing."""

import pytest
import torch

from trainer import models
from trainer.transfer import classifier_of, freeze, keep_frozen_in_eval, load_pretrained, stages_of


def save_state(tmp_path, state, name="weights.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def test_other_library_names_load_by_position_and_classifier_is_replaced(tmp_path):
    source = models.create("alexnet", num_classes=1000)
    # Rename every tensor as another library would (same order, same shapes).
    renamed = {f"net.layer{i}.{key.rsplit('.', 1)[-1]}": value for i, (key, value) in enumerate(source.state_dict().items())}
    target = models.create("alexnet", num_classes=7)
    report = load_pretrained(target, save_state(tmp_path, renamed))
    assert report["replaced"] == ["fc.weight", "fc.bias"]  # the old 1000-class head is not loaded
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(target.state_dict()[key], value), key
    assert target.fc.out_features == 7


def test_same_names_load_directly(tmp_path):
    source = models.create("resnet18", num_classes=1000)
    target = models.create("resnet18", num_classes=5)
    report = load_pretrained(target, save_state(tmp_path, {"state_dict": source.state_dict()}))
    assert report["replaced"] == ["fc.weight", "fc.bias"]
    assert torch.equal(target.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_mismatched_architecture_is_refused(tmp_path):
    path = save_state(tmp_path, {f"x{i}": torch.zeros(3) for i in range(5)})
    with pytest.raises(ValueError, match="another architecture"):
        load_pretrained(models.create("resnet18", num_classes=5), path)


def test_freeze_modes():
    model = models.create("resnet18", num_classes=5)
    freeze(model, "head")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    freeze(model, "last:1")
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"}
    assert classifier_of(model)[0] == "fc" and stages_of(model)[-1] is model.layer4
    with pytest.raises(ValueError, match="has 6 stages"):
        freeze(model, "last:9")


def test_frozen_batchnorm_stays_in_eval_mode():
    model = models.create("resnet18", num_classes=5)
    freeze(model, "head")
    model.train()
    keep_frozen_in_eval(model)
    assert not model.bn1.training and not model.layer1[0].bn1.training and model.fc.training
