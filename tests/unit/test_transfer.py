"""Transfer-learning helpers: weight loading (renamed layers, new classes), freezing."""

import copy
import math
from types import SimpleNamespace

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


# --- the head trained on cached activations is the head trained through the frozen backbone ------------


class FakeStream(list):
    """Batches as an augserve stream yields them (``images`` N×C×H×W float32, ``labels``, ``sample_ids``)."""

    def close(self) -> None:
        pass


class FakeRun:
    """The parts of ``trainer.run.Run`` that ``fit_head_on_cached_features`` uses; counts the streams it opens."""

    def __init__(self, config, images, labels) -> None:
        from trainer.loop import Precision

        self.config, self.images, self.labels = config, images, labels
        self.device = torch.device("cpu")
        self.precision = Precision(self.device)
        self.step, self.history, self.streams_opened = 0, [], 0

    def _connect(self, address, **options):
        self.streams_opened += 1
        size = options["batch_size"]
        return FakeStream(
            SimpleNamespace(images=self.images[i : i + size], labels=self.labels[i : i + size], sample_ids=torch.arange(i, min(i + size, len(self.labels))))
            for i in range(0, len(self.labels), size)
        )

    def evaluate(self):
        return None


def pretend_pretrained(images, labels):
    """A resnet20 (BatchNorm in the backbone) trained two short epochs on ``images``, so that its features
    and running statistics mean something, then given a fresh classifier as a transfer run starts with."""
    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=10, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(2):
        for chunk in torch.randperm(len(labels), generator=generator).split(32):
            loss = torch.nn.functional.cross_entropy(model(images[chunk]), labels[chunk])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.fc.reset_parameters()
    return model.eval()


def toy_digits(count: int = 160, seed: int = 1):
    """10 classes, each a fixed random 1×32×32 pattern plus noise: learnable from the frozen features."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 1, 32, 32, generator=generator)
    labels = torch.arange(count) % 10
    images = patterns[labels] + 0.5 * torch.randn(count, 1, 32, 32, generator=generator)
    return images, labels


def head_config(tmp_path, weights: str, epochs: int = 5):
    return SimpleNamespace(
        model="resnet20", dataset="toy", dataset_options={}, pipeline="lenet5", pretrained=weights, out=str(tmp_path / "out"),
        eval_batch_size=64, batch_size=32, epochs=epochs, lr=0.005, momentum=0.9, weight_decay=5e-4, label_smoothing=0.0, seed=3,
    )


def test_cached_head_trains_and_matches_training_through_the_frozen_backbone(tmp_path):
    from trainer.loop import train_step
    from trainer.transfer import fit_head_on_cached_features

    images, labels = toy_digits()
    start = pretend_pretrained(images, labels)
    weights = save_state(tmp_path, start.state_dict())
    config = head_config(tmp_path, weights)
    metrics = SimpleNamespace(epoch=lambda row: None)

    def cached_run():
        model = copy.deepcopy(start)
        freeze(model, "head")
        backbone_calls = []
        model.layer3.register_forward_hook(lambda *args: backbone_calls.append(1))
        run = FakeRun(config, images, labels)
        result = fit_head_on_cached_features(run, model, "unused", metrics)
        return model, run, result, len(backbone_calls)

    first, first_run, first_result, first_calls = cached_run()
    second, second_run, second_result, second_calls = cached_run()
    # The miss opens one un-shuffled stream and runs the backbone once per batch; the hit runs it never.
    assert (first_run.streams_opened, first_calls, first_result["feature_cache_hit"]) == (1, 3, False)  # 160 images / 64
    assert (second_run.streams_opened, second_calls, second_result["feature_cache_hit"]) == (0, 0, True)

    # The head trains: its training loss falls every epoch, and by at least half over the run.
    losses = [row["train_loss"] for row in first_run.history]
    assert len(losses) == config.epochs and all(math.isfinite(x) for x in losses)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.5 * losses[0], losses
    assert [row["train_loss"] for row in second_run.history] == losses  # same seed, same cached inputs

    # The uncached reference: the whole model with its frozen backbone (BatchNorm kept in eval mode), one
    # trainer step per chunk, same optimizer, same seed, same order — the backbone runs at every step.
    reference = copy.deepcopy(start)
    freeze(reference, "head")
    optimizer = torch.optim.SGD(reference.fc.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(config.epochs):
        for chunk in torch.randperm(len(labels), generator=generator).split(config.batch_size):
            reference.train()
            keep_frozen_in_eval(reference)
            train_step(reference, optimizer, first_run.precision, images[chunk], labels[chunk])

    # float32 convolutions over batches of 64 (cache) and 32 (reference) round differently: stated tolerance.
    for key in ("fc.weight", "fc.bias"):
        assert not torch.allclose(first.state_dict()[key], start.state_dict()[key], atol=1e-3), key  # it moved
        assert torch.equal(first.state_dict()[key], second.state_dict()[key]), key  # cache miss == cache hit
        torch.testing.assert_close(first.state_dict()[key], reference.state_dict()[key], rtol=1e-4, atol=1e-5)
    for key, value in start.state_dict().items():  # the backbone (weights and BatchNorm statistics) never moves
        if not key.startswith("fc."):
            assert torch.equal(first.state_dict()[key], value) and torch.equal(reference.state_dict()[key], value), key
