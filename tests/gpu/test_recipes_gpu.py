"""Defaults that learn, for the big models: one of each family trained on shapes at 64² with nothing but
``--model`` and ``--dataset`` (plus the device) ends well above chance. The small models run the same
check on the CPU (tests/integration/test_recipes_learn.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BIG = ["resnet18", "resnet50", "googlenet", "mobilenet_v2", "alexnet", "vgg11", "vgg16", "resnet56"]


@pytest.mark.parametrize("model", BIG)
def test_big_model_learns_shapes_at_64_with_its_recipe(model):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    command = [sys.executable, "-m", "trainer", "train", "--model", model, "--dataset", "shapes", "--device", "cuda", "--workers", "8", "--json", "--no-tensorboard"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    # The family's preset fitted to the 64² images; the CIFAR nets' preset resizes them to its 32².
    assert summary["pipeline"].endswith("-32" if model == "resnet56" else "-64"), summary
    assert summary["accuracy"] >= 2 / 6, summary  # twice chance on 6 classes
