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


# --- checkpoints and the feature cache are written atomically ------------------------------------------


def save_checkpoint(path, model, step):
    from trainer import checkpoint

    checkpoint.save(str(path), model=model, optimizer=None, scaler=None, step=step, epoch=0, stream_state={"epoch": 0, "delivered": [step]}, config={"model": "lenet5"})


def test_checkpoint_keeps_the_previous_one_and_no_temporaries(tmp_path):
    from trainer import checkpoint

    model = models.create("lenet5", num_classes=10)
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, model, step=1)
    save_checkpoint(path, model, step=2)
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt", "checkpoint.pt.prev"]
    assert checkpoint.load(str(path))["step"] == 2
    assert checkpoint.load(str(path) + ".prev")["stream"] == {"epoch": 0, "delivered": [1]}


def test_truncated_checkpoint_loads_the_previous_with_a_warning(tmp_path, caplog):
    from trainer import checkpoint

    model = models.create("lenet5", num_classes=10)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, step=1)
    save_checkpoint(path, model, step=2)
    path.write_bytes(path.read_bytes()[:1000])  # a torn write by something that bypassed atomic_write
    with caplog.at_level("WARNING"):
        payload = checkpoint.load(str(path))
    assert payload["step"] == 1
    assert all(torch.equal(checkpoint.model_state(payload)[key], value) for key, value in model.state_dict().items())
    assert str(path) in caplog.text and "checkpoint.pt.prev" in caplog.text
    (tmp_path / "checkpoint.pt.prev").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot read .*checkpoint\.pt .* nor .*checkpoint\.pt\.prev"):
        checkpoint.load(str(path))
    with pytest.raises(ValueError, match="checkpoint not found"):
        checkpoint.load(str(tmp_path / "missing.pt"))


def test_checkpoint_crash_mid_save_keeps_the_old_file(tmp_path, monkeypatch):
    from trainer import checkpoint

    model = models.create("lenet5", num_classes=10)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, step=1)
    before = path.read_bytes()

    def torn(payload, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 partial")
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(checkpoint.torch, "save", torn)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        save_checkpoint(path, model, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_feature_cache_round_trip_and_corrupt_cache_is_a_miss(tmp_path, caplog):
    import numpy as np

    from trainer.transfer import read_feature_cache, write_feature_cache

    path = str(tmp_path / "cache.npz")
    assert read_feature_cache(path) is None
    features, labels = np.random.default_rng(0).random((5, 3), dtype=np.float32), np.arange(5)
    write_feature_cache(path, features, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.npz"]  # no .prev, no .npz.npz, no temporary
    got_features, got_labels = read_feature_cache(path)
    assert np.array_equal(got_features, features) and np.array_equal(got_labels, labels)
    with open(path, "r+b") as handle:
        handle.truncate(100)
    with caplog.at_level("WARNING"):
        assert read_feature_cache(path) is None
    assert path in caplog.text
    write_feature_cache(path, features, labels[:4])  # inconsistent lengths: not trusted either
    assert read_feature_cache(path) is None
