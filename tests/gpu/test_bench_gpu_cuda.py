"""``augserve bench gpu`` on CUDA at a bounded size: both tables run on the device, DALI's rows with its
GPU operators and ``mixed`` decoder where DALI is installed, and every target is judged. Speeds are not
asserted here (a few small batches); the full run is ``tools/gpu_check.sh bench``."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def installed(name: str) -> bool:
    top = name.split(".")[0]
    return importlib.util.find_spec(top) is not None and importlib.util.find_spec(name) is not None


def test_both_tables_run_on_the_gpu_and_every_target_is_judged():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUGSERVE_")}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "augserve", "bench", "gpu", "--batch", "32", "--rounds", "2", "--batches", "2", "--jpeg-files", "64", "--json"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    rows, summary = lines[:-1], lines[-1]
    by = {row["key"]: row for row in rows}
    for key in ("torch", "torch-host", "torch-jpeg", "torch-jpeg-host"):
        assert by[key]["images_per_s"] > 0, by[key]
    assert by["torch"]["note"].startswith("per-sample parameters sampled on cuda:0 (batched torch ops, a CUDA graph)")
    has_dali = installed("nvidia.dali")
    for key in ("dali-backend", "dali", "dali-jpeg"):
        assert (by[key]["images_per_s"] > 0) if has_dali else by[key]["note"].startswith("unavailable: "), by[key]
    assert by["dali-jpeg"]["name"] == "DALI's own pipeline, mixed decoder"
    assert (by["kornia"]["images_per_s"] is not None) == installed("kornia")
    judged = {t["target"]: t["pass"] for t in summary["targets"]}
    assert judged["torch chain ≥ 100,000 images/s"] is not None
    assert (judged["torch chain ≥ 1.5× DALI's own GPU pipeline"] is not None) == has_dali
    assert (judged["torch chain ≥ 6× kornia"] is not None) == installed("kornia")
    assert summary["device"] == torch.cuda.get_device_name(0) and summary["torch_device"] == "cuda:0"
    assert summary["h2d_gb_per_s"]["pinned"] > 0
