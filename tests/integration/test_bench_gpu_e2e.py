"""``augserve bench gpu-e2e`` as a user runs it, with ``--device cpu`` and tiny settings: real daemon,
real trainer processes, a real folder of generated JPEG photos.

Every part of the GPU run executes here on the CPU (torch workers, DataLoader, DALI's CPU decoder,
the synthetic batch; bf16 autocast and channels_last included), so the GPU run differs only in the
device. Speeds are never asserted (a loaded 2-core machine, a few steps); the rows, the ratios and the
targets' verdicts are checked against the rows they are computed from.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from test_bench import assert_png, bench, bench_without_dali, json_lines  # the same runners as the other benches

pytestmark = pytest.mark.slow

TINY = ["--device", "cpu", "--model", "resnet20", "--crop-size", "32", "--batch-size", "8", "--steps", "2", "--warmup-steps", "1",
        "--rounds", "1", "--gpu-workers", "1", "--dataloader-workers", "1", "--dali-threads", "1"]  # fmt: skip


def check_ratios_and_targets(rows: list[dict], summary: dict) -> None:
    """Ratios and verdicts follow from the rows' own figures."""
    by = {row["loader"]: row for row in rows}
    ours, synthetic, dataloader = by["augserve"], by["synthetic"], by["dataloader"]
    assert ours["vs_synthetic"] == round(ours["images_per_s"] / synthetic["images_per_s"], 2) == summary["vs_synthetic"]
    assert ours["vs_dataloader"] == round(ours["images_per_s"] / dataloader["images_per_s"], 2) == summary["vs_dataloader"]
    assert synthetic["vs_synthetic"] == 1.0 and dataloader["vs_dataloader"] == 1.0
    targets = {t["target"]: t for t in summary["targets"]}
    assert targets["data stall < 5%"] == {"target": "data stall < 5%", "value": ours["stall_pct"], "pass": ours["stall_pct"] < 5.0}
    assert targets["images/s ≥ 90% of synthetic"]["pass"] == (ours["vs_synthetic"] >= 0.9)
    assert targets["images/s ≥ 2× DataLoader"]["pass"] == (ours["vs_dataloader"] >= 2.0)
    assert summary["targets_met"] == all(t["pass"] for t in targets.values())


def test_cpu_check_runs_all_four_rows(tmp_path):
    plot = tmp_path / "gpu-e2e.png"
    rows, summary = json_lines(bench("gpu-e2e", *TINY, "--images", "16", "--json", "--plot", str(plot), timeout=180))
    assert [row["loader"] for row in rows] == ["augserve", "dataloader", "dali", "synthetic"]
    for row in rows:
        assert row["benchmark"] == "gpu-e2e" and row["images_per_s"] > 0, row
        assert 0.0 <= row["stall_pct"] <= 100.0 and len(row["runs"]) == 1
    by = {row["loader"]: row for row in rows}
    assert by["augserve"]["name"] == "augserve serve --backend torch --device cpu, 1 worker"
    assert by["dali"]["name"] == "DALI pipeline + DALIGenericIterator (cpu decoder, 1 thread)"
    assert by["dali"]["note"] == ""  # DALI's own pipeline of the whole preset, PCA lighting included
    # Trainer and workers on one host: the client's default transport takes shared memory.
    assert by["augserve"]["transport"] == summary["transport"] == "shm"
    # Workers on the CPU decode each file on the host; on a GPU the row names nvImageCodec's device.
    assert by["augserve"]["note"] == "transport: shm; JPEG decoded on host" and summary["worker_jpeg_decoder"] == "host"
    check_ratios_and_targets(rows, summary)

    assert summary["benchmark"] == "gpu-e2e" and summary["failed"] == []
    assert (summary["model"], summary["precision"], summary["channels_last"], summary["input"]) == ("resnet20", "bf16", True, "3×32×32")
    assert summary["pipeline_ops"] == ["random_resized_crop", "mirror", "pca_color", "normalize"]
    assert (summary["worker_backend"], summary["worker_device"], summary["trainer_device"]) == ("torch", "cpu", "cpu")
    folder = summary["folder"]
    assert (folder["images"], folder["sizes"], folder["classes"], folder["generated"], folder["root"]) == (16, {"500×375": 16}, 4, True, None)
    assert summary["rows"] == rows
    assert summary["plot"] == str(plot)
    assert_png(plot)


def test_cpu_check_on_a_folder_without_dali_reports_the_row(tmp_path):
    """A user's folder, and a machine without DALI: its row says so, the others run, exit 0 — in the
    readable table too."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "mine" / name).mkdir(parents=True)
        for k in range(4):
            cv2.imwrite(str(tmp_path / "mine" / name / f"{k}.jpg"), rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    proc = bench_without_dali("gpu-e2e", *TINY, "--folder", str(tmp_path / "mine"), "--steps", "1", "--warmup-steps", "0", timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert "| DALI pipeline + DALIGenericIterator (cpu decoder, 1 thread) | – | – | – | – | unavailable: NVIDIA DALI is not installed (pip install 'augserve[dali]') |" in table
    assert "8 images of " in table and "2 classes" in table
    for name in ("augserve serve --backend torch --device cpu, 1 worker", "DataLoader + albumentations, 1 worker", "model alone (one pre-made batch on the device)"):
        assert f"| {name} | " in table and f"| {name} | –" not in table
    assert "- data stall < 5%: " in table and "not measured" not in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_default_device_without_cuda_is_one_line():
    proc = bench("gpu-e2e", timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "augserve: error: bench gpu-e2e trains on cuda:0, and CUDA is not available on this machine; --device cpu runs the same pipeline on the CPU as a check"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu-workers", "0"], "--gpu-workers must be >= 1, got 0"),
        (["--dataloader-workers", "0"], "--dataloader-workers must be >= 1, got 0"),
        (["--timeout", "0"], "--timeout must be > 0, got 0.0"),
        (["--device", "tpu"], "--device must be cpu or cuda[:K], got 'tpu'"),
        (["--device", "cuda:x"], "--device must be cpu or cuda[:K], got 'cuda:x'"),
        (["--images", "8", "--batch-size", "16"], "--images (8) must be at least --batch-size (16)"),
        (["--folder", "FOLDER", "--images", "8"], "--images sizes the generated folder: it does not apply to --folder"),
        (["--folder", "FOLDER", "--batch-size", "16"], "holds 1 image(s), fewer than the batch size 16"),
        (["--folder", "missing"], "missing"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--pipeline", "lenet5", "--crop-size", "32"], "--crop-size resizes a random_resized_crop, and pipeline lenet5 has none"),
        (["--pipeline", "SPEC"], "no albumentations equivalent for pipeline"),
        (["--plot", "out.jpg"], "--plot must name a .png file"),
    ],
)
def test_mistakes_end_in_one_line(tmp_path, monkeypatch, capsys, args, message):
    """Refused before any folder is written or process started (in-process: no daemon could start)."""
    from augserve.cli import main

    (tmp_path / "folder" / "cat").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "folder" / "cat" / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "custom.yaml").write_text("ops:\n  - {op: mirror}\n")
    monkeypatch.chdir(tmp_path)
    args = [{"FOLDER": "folder", "SPEC": "custom.yaml"}.get(a, a) for a in args]
    assert main(["bench", "gpu-e2e", "--device", "cpu", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith("augserve: error: ") and message in captured.err


def test_photo_folder_of_one_size(tmp_path):
    """gpu-e2e's folder: every file 500×375 (the default keeps alternating with 1600×1200)."""
    from augserve.bench.photo_folder import WEB_SIZE, write_photo_folder

    described = write_photo_folder(tmp_path / "web", 6, sizes=WEB_SIZE)
    assert described["sizes"] == {"500×375": 6} and described["classes"] == 4
    files = sorted((tmp_path / "web").rglob("*.jpg"))
    assert len(files) == 6 and all(cv2.imread(str(f)).shape == (375, 500, 3) for f in files)
    assert write_photo_folder(tmp_path / "both", 8)["sizes"] == {"500×375": 4, "1600×1200": 4}
    with pytest.raises(ValueError, match="sizes must be"):
        write_photo_folder(tmp_path / "none", 1, sizes=())
