"""Defaults that learn: ``python -m trainer train --model M --dataset D`` with no other flag ends well above
chance, because the model's recipe settles batch size, optimiser, rate, run length and pipeline.

The small models run here in full (their whole default budget, bounded in time); the big ones run on
shapes at 64² in tests/gpu/test_recipes_gpu.py, and ``make recipes`` measures every family on this
CPU (docs/recipes.md)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def train(*args, timeout=300):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", *args, "--json", "--workers", "2", "--no-tensorboard"], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_lenet5_on_digits_learns_with_nothing_but_model_and_dataset(tmp_path):
    summary = train("--model", "lenet5", "--dataset", "digits", "--out", str(tmp_path))
    # The recipe: AdamW at 2e-3, batch 64, at least 700 steps: 31 epochs of digits' 23 batches (1,437
    # train images: 22 full batches of 64 and a last one of 29).
    assert (summary["optimizer"], summary["lr"], summary["batch_size"]) == ("adamw", 0.002, 64)
    assert summary["epochs"] == 31 and summary["steps"] == 31 * 23
    assert summary["pipeline"] == "lenet5"
    assert summary["accuracy"] >= 0.95  # chance is 0.10; 99.2% measured
    # The checkpoint records the settled values, as plain data.
    import torch

    payload = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert payload["config"]["lr"] == 0.002 and payload["config"]["pipeline"]["name"] == "lenet5"


def test_lenet5_relu_on_rgb_shapes_learns_with_its_recipe():
    summary = train("--model", "lenet5_relu", "--dataset", "shapes", "--dataset-option", "size=32")
    assert summary["pipeline"] == "lenet5"  # LeNet's preset on RGB 32² images: normalize repeated over 3 channels
    assert summary["accuracy"] >= 2 / 6  # twice chance on 6 classes; 56% measured
