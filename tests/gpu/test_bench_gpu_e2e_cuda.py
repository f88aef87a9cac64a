"""``augserve bench gpu-e2e`` on CUDA with its defaults (ResNet-50, bf16, channels_last, 224², torch
workers on the GPU), at a bounded size: every row runs on the device. Speeds and targets are not
asserted here (a few steps of a small batch); the full run is the command in the README."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_default_run_on_cuda_has_every_row():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUGSERVE_")}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "augserve", "bench", "gpu-e2e", "--images", "128", "--batch-size", "32", "--steps", "3", "--warmup-steps", "2",
               "--rounds", "1", "--gpu-workers", "2", "--dataloader-workers", "4", "--timeout", "120", "--json"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    rows, summary = lines[:-1], lines[-1]
    assert [row["loader"] for row in rows] == ["augserve", "dataloader", "dali", "synthetic"]
    by = {row["loader"]: row for row in rows}
    for loader in ("augserve", "dataloader", "synthetic"):
        assert by[loader]["images_per_s"] > 0, by[loader]
    if importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None:
        assert by["dali"]["images_per_s"] > 0, by["dali"]  # the mixed (nvJPEG) decoder on this GPU
        assert by["dali"]["name"].startswith("DALI pipeline + DALIGenericIterator (mixed decoder")
    else:
        assert by["dali"]["note"].startswith("unavailable: ")
    assert by["augserve"]["name"] == "augserve serve --backend torch --device cuda:0, 2 workers" and by["augserve"]["transport"]
    if importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.nvimgcodec") is not None:
        assert summary["worker_jpeg_decoder"] == "cuda:0 (nvImageCodec)" and by["augserve"]["note"].endswith("; JPEG decoded on cuda:0 (nvImageCodec)")
    assert (summary["model"], summary["precision"], summary["channels_last"], summary["input"]) == ("resnet50", "bf16", True, "3×224×224")
    assert summary["trainer_device"] == summary["worker_device"] == "cuda:0" and summary["failed"] == []
    assert summary["device"] == torch.cuda.get_device_name(0)
    assert [t["pass"] is not None for t in summary["targets"]] == [True, True, True]
