"""`python -m trainer train` as a user runs it: real daemon, real worker and trainer processes, real files."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.transfer import classifier_of

BASE = ["--model", "lenet5_relu", "--dataset", "digits", "--pipeline", "lenet5", "--batch-size", "128", "--optimizer", "sgd", "--lr", "0.1", "--workers", "1", "--no-tensorboard", "--quiet"]


def trainer(*args, check=True, timeout=300):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def summary_of(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A short LeNet run whose checkpoint later tests start from."""
    out = tmp_path_factory.mktemp("pretrained")
    summary = summary_of(trainer(*BASE, "--epochs", "3", "--lr", "0.05", "--out", str(out), "--record-ids", str(out / "ids.txt"), "--json"))
    return out / "checkpoint.pt", summary


def test_json_summary_and_files(pretrained, tmp_path):
    path, summary = pretrained
    assert summary["accuracy"] is not None
    assert 0.5 < summary["accuracy"] <= 1.0  # three epochs of LeNet on digits is far above chance (0.1)
    folder = path.parent
    assert (folder / "metrics.csv").read_text().count("\n") == 4  # header + 3 epochs
    assert json.loads((folder / "summary.json").read_text())["steps"] == summary["steps"]


def test_throughput_and_stall_are_in_range_and_consistent(pretrained):
    """img/s and data stall % of the summary are the means of the per-epoch rows of metrics.csv, and each
    row's img/s agrees with the images that epoch trained (from --record-ids) over its wall time."""
    path, summary = pretrained
    rows = list(csv.DictReader((path.parent / "metrics.csv").open()))
    rate, stall, elapsed = ([float(row[key]) for row in rows] for key in ("img_per_s", "stall_pct", "elapsed_s"))
    images = [0] * len(rows)
    for line in (path.parent / "ids.txt").read_text().splitlines():
        epoch, _index, ids = line.split(",", 2)
        images[int(epoch)] += len(ids.split())
    assert images == [1438] * 3  # every digit of the training split once per epoch
    assert all(math.isfinite(x) for x in (summary["img_per_s"], summary["stall_pct"], *rate, *stall))
    assert summary["img_per_s"] > 0 and all(x > 0 for x in rate)
    assert 0 <= summary["stall_pct"] <= 100 and all(0 <= x <= 100 for x in stall)
    # The summary rounds the mean of the rows (to 0.1 img/s and 0.01 %); the CSV keeps 6 significant digits.
    assert summary["img_per_s"] == pytest.approx(sum(rate) / len(rate), abs=0.1)
    assert summary["stall_pct"] == pytest.approx(sum(stall) / len(stall), abs=0.01)
    # An epoch's img/s counts only its training steps, which fit inside that epoch's wall time (elapsed_s is
    # cumulative and also holds the evaluation, and the daemon start for the first epoch): a lower bound.
    walls = [b - a for a, b in zip([0.0, *elapsed], elapsed)]
    for count, per_s, wall in zip(images, rate, walls):
        assert per_s >= count / wall * 0.999, (count, per_s, wall)  # 0.999: the 6 digits of the CSV
    # And training is most of a later epoch (evaluation: a quarter as many images, no backward pass):
    # stated tolerance, training at least a tenth of the epoch's wall time.
    for count, per_s, wall in zip(images[1:], rate[1:], walls[1:]):
        assert per_s <= 10 * count / wall, (count, per_s, wall)
    # Over the whole run (time_s also holds the daemon start): mean of the rates >= images / time_s.
    assert summary["img_per_s"] >= sum(images) / summary["time_s"] * 0.99


def test_resume_sees_the_same_sample_sequence(tmp_path):
    whole, part = tmp_path / "whole.txt", tmp_path / "part.txt"
    trainer(*BASE, "--epochs", "2", "--record-ids", str(whole), "--out", str(tmp_path / "a"))
    trainer(*BASE, "--epochs", "2", "--record-ids", str(part), "--out", str(tmp_path / "b"), "--stop-after", "7")
    assert len(part.read_text().splitlines()) == 7
    trainer(*BASE, "--epochs", "2", "--record-ids", str(part), "--out", str(tmp_path / "b"), "--resume", str(tmp_path / "b" / "checkpoint.pt"))
    assert part.read_text().splitlines() == whole.read_text().splitlines()
    # The resumed run also ends with the same weights as the uninterrupted one (same data, same steps).
    a = ckpt.load(str(tmp_path / "a" / "checkpoint.pt"))["model"]
    b = ckpt.load(str(tmp_path / "b" / "checkpoint.pt"))["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def _backbone(state: dict, model_name: str = "lenet5_relu") -> dict:
    from trainer import models

    head = classifier_of(models.create(model_name, num_classes=10, in_channels=1))[0]
    return {k: v for k, v in state.items() if not k.startswith(head + ".")}


def _head(state: dict) -> dict:
    return {k: v for k, v in state.items() if k not in _backbone(state)}


def test_frozen_backbone_with_cached_activations(pretrained, tmp_path):
    path, _ = pretrained
    args = [*BASE, "--epochs", "2", "--pretrained", str(path), "--freeze", "head", "--out", str(tmp_path / "t"), "--json"]
    first = summary_of(trainer(*args))
    assert first["feature_cache_hit"] is False and first["backbone_passes"] == 1  # two epochs, one backbone pass
    assert first["epochs"] == 2
    first_head = _head(ckpt.load(str(tmp_path / "t" / "checkpoint.pt"))["model"])
    first_loss = [float(row["train_loss"]) for row in csv.DictReader((tmp_path / "t" / "metrics.csv").open())]
    assert len(first_loss) == 2 and first_loss[1] < first_loss[0], first_loss  # the head learns
    second = summary_of(trainer(*args))
    assert second["feature_cache_hit"] is True and second["backbone_passes"] == 0
    # Trained on the activations read back from disk, the head ends exactly where the first run's did.
    second_head = _head(ckpt.load(str(tmp_path / "t" / "checkpoint.pt"))["model"])
    assert first_head.keys() == second_head.keys() == {"fc.weight", "fc.bias"}
    pretrained_head = _head(ckpt.load(str(path))["model"])
    for key in first_head:
        assert torch.equal(first_head[key], second_head[key]), key
        assert not torch.allclose(first_head[key], pretrained_head[key], atol=1e-4), key  # and it did move
    before = _backbone(ckpt.load(str(path))["model"])
    after = _backbone(ckpt.load(str(tmp_path / "t" / "checkpoint.pt"))["model"])
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_frozen_backbone_without_cache_stays_bit_identical(pretrained, tmp_path):
    path, _ = pretrained
    trainer(*BASE, "--epochs", "1", "--pretrained", str(path), "--freeze", "head", "--no-feature-cache", "--out", str(tmp_path / "n"))
    before = _backbone(ckpt.load(str(path))["model"])
    after = _backbone(ckpt.load(str(tmp_path / "n" / "checkpoint.pt"))["model"])
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_multi_crop_and_ensemble_are_reported_beside_single(pretrained, tmp_path):
    path, _ = pretrained
    summary = summary_of(trainer(*BASE, "--epochs", "1", "--multi-crop", "10", "--ensemble", str(path), "--json"))
    assert 0 <= summary["multi_crop_accuracy"] <= 1 and 0 <= summary["ensemble_accuracy"] <= 1
    assert summary["ensemble_size"] == 2 and summary["accuracy"] is not None
    # Both are fractions of the same 359 held-out digits; were the ten-crop figure computed from the centre
    # view alone (the single-crop image: the centre of the 4-pixel-padded crop), they would be equal. The run
    # is deterministic (same seed); on it they differ by dozens of images.
    assert summary["multi_crop_accuracy"] * 359 == pytest.approx(round(summary["multi_crop_accuracy"] * 359), abs=1e-3)
    assert summary["multi_crop_accuracy"] != summary["accuracy"]


def test_multi_crop_evaluates_ten_views_of_every_held_out_image(monkeypatch):
    """In process, the same run with a spy on the crop function the run uses: every held-out image, padded
    to 36×36, is evaluated as ten 32×32 views (the real daemon and workers still serve the batches)."""
    from trainer import run as run_module

    real, calls = run_module.ten_crops, []

    def spy(size):
        crop = real(size)

        def recorded(images):
            views = crop(images)
            calls.append((tuple(images.shape), [tuple(v.shape) for v in views]))
            return views

        return recorded

    monkeypatch.setattr(run_module, "ten_crops", spy)
    config = run_module.TrainConfig(model="lenet5_relu", dataset="digits", pipeline="lenet5", epochs=1, batch_size=128, optimizer="sgd", lr=0.1, workers=1, multi_crop=10, tensorboard=False, progress=False)
    summary = run_module.Run(config).fit()
    assert calls and sum(shape[0] for shape, _ in calls) == 359  # the held-out split, each image once
    for (n, c, h, w), views in calls:
        assert (c, h, w) == (1, 36, 36) and views == [(n, 1, 32, 32)] * 10
    assert summary["multi_crop_accuracy"] is not None and summary["accuracy"] is not None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "lenet9"], "unknown model 'lenet9'"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--resume", "/nonexistent/checkpoint.pt"], "checkpoint not found"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--freeze", "some"], "--freeze must be none, head or last:K"),
    ],
)
def test_user_mistakes_end_in_one_line(args, message):
    proc = trainer(*BASE, *args, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_ddp_ranks_see_every_sample_exactly_once(start_daemon, tmp_path):
    """torchrun with two gloo ranks, each attached with its own rank: one epoch covers the (trimmed)
    training set exactly once across ranks, and both ranks take the same number of steps."""
    daemon = start_daemon(workers=2)
    record = tmp_path / "ids.txt"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "trainer", "train", *BASE, "--epochs", "2", "--connect", daemon.address, "--record-ids", str(record), "--json"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["accuracy"] is not None
    seen = {0: [], 1: []}
    steps = []
    for rank in (0, 1):
        lines = (tmp_path / f"ids.txt.rank{rank}").read_text().splitlines()
        steps.append(len(lines))
        for line in lines:
            epoch, _index, ids = line.split(",", 2)
            seen[int(epoch)].extend(int(i) for i in ids.split())
    assert steps[0] == steps[1] == 2 * 5  # 1,438 digits over 2 ranks → 5 full batches of 128 each
    for epoch in (0, 1):
        assert len(seen[epoch]) == len(set(seen[epoch])) == 2 * 5 * 128


def test_degradation_experiment_writes_its_figure(tmp_path):
    """The miniature degradation experiment runs end to end (one short epoch per net) and plots."""
    out = tmp_path / "degradation.png"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    command = [sys.executable, "-m", "trainer.experiments.degradation", "--depths", "20", "--epochs", "1", "--dataset", "digits", "--workers", "1", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import cv2

    assert cv2.imread(str(out)) is not None
    curves = json.loads((tmp_path / "degradation" / "curves.json").read_text())
    assert set(curves) == {"plain20", "resnet20"} and all(len(v) == 1 for v in curves.values())
