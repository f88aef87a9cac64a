"""``augserve bench pipelines | e2e | trainer`` as a user runs them: real processes, tiny settings.

Each run uses ``--json`` (rows, one JSON object per line, then the summary on the last line) and
``--plot`` into tmp_path. Speeds are never asserted: the machine is shared and these runs are far too
short to mean anything; only the shape of the output is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from augserve.bench.pipeline_throughput import PER_OP, TRANSLATED_PRESETS

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUGSERVE_")}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    return env


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "augserve", "bench", *args], capture_output=True, text=True, env=_env(), timeout=timeout)


def json_lines(proc: subprocess.CompletedProcess) -> tuple[list[dict], dict]:
    """(rows, summary): every stdout line is one JSON object, the summary is the last."""
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert lines, "no output"
    return lines[:-1], lines[-1]


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100


def test_pipelines_per_op_rows_summary_and_plot(tmp_path):
    plot = tmp_path / "pipelines.png"
    proc = bench("pipelines", "--images", "4", "--rounds", "1", "--op-rounds", "1", "--backend", "albumentations", "--per-op", "--json", "--plot", str(plot))
    rows, summary = json_lines(proc)
    assert summary["benchmark"] == "pipelines" and summary["ratio_fused_cpu_vs_compose"] > 0
    assert summary["plot"] == str(plot)
    assert all(row["benchmark"] == "pipelines" for row in rows)

    chain = [row for row in rows if row["kind"] == "chain"]
    assert {row["name"] for row in chain} == {row["name"] for row in summary["rows"]}
    assert "albumentations Compose (baseline)" in {row["name"] for row in chain}

    per_op = [row for row in rows if row["kind"] == "op"]
    implementations = {"albumentations, uncollated", "albumentations", "augserve albumentations"}
    assert {(row["op"], row["implementation"]) for row in per_op} == {(label, impl) for label, _ in PER_OP for impl in implementations}
    for row in per_op:
        assert set(row) >= {"benchmark", "op", "implementation", "images_per_s", "vs_albumentations"}
        assert row["images_per_s"] > 0
        if row["implementation"] == "albumentations":
            assert row["vs_albumentations"] == 1.0  # the reference: its outputs collated into a batch
        elif row["implementation"] == "albumentations, uncollated":
            assert row["vs_albumentations"] is None  # shown for reference only
        else:
            assert row["vs_albumentations"] > 0

    per_pipeline = [row for row in rows if row["kind"] == "pipeline"]
    assert {row["pipeline"] for row in per_pipeline} >= set(TRANSLATED_PRESETS)
    assert {row["implementation"] for row in per_pipeline} == implementations
    assert summary["per_op"] == per_op and summary["per_pipeline"] == per_pipeline
    assert_png(plot)


MISSING_DALI = "backend 'dali' needs NVIDIA DALI: pip install 'augserve[dali]'"

# The CLI in a fresh interpreter where NVIDIA DALI is absent for real: an import finder placed first
# answers for it as the import system does for a module that is not installed.
_WITHOUT_DALI = """
import sys


class Absent:
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Absent())
from augserve.cli import main

sys.exit(main(sys.argv[1:]))
"""


def bench_without_dali(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _WITHOUT_DALI, "bench", *args], capture_output=True, text=True, env=_env(), timeout=timeout)


def test_pipelines_skips_a_backend_not_installed_in_one_line():
    proc = bench_without_dali("pipelines", "--images", "2", "--rounds", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines.count(f"skipped: {MISSING_DALI}") == 1 and sum("dali" in line for line in lines) == 1
    assert "augserve torch: alexnet-chain" in proc.stdout and "augserve albumentations: alexnet-chain" in proc.stdout

    rows, summary = json_lines(bench_without_dali("pipelines", "--images", "2", "--rounds", "1", "--json"))
    assert summary["backends"] == ["albumentations", "torch"] and summary["skipped_backends"] == {"dali": MISSING_DALI}
    assert not any("dali" in row["name"] for row in rows)


def test_pipelines_refuses_a_backend_asked_for_that_is_not_installed():
    proc = bench_without_dali("pipelines", "--backend", "dali", "--images", "2", "--rounds", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"augserve: error: {MISSING_DALI}"] and proc.stdout == ""


def test_pipelines_by_default_measures_every_backend_installed_here():
    """The dev install brings DALI, so nothing is skipped here: the skip above is the finder's doing."""
    import pipelines
    from augserve.bench.pipeline_throughput import available_backends

    assert available_backends() == (pipelines.BACKENDS.names(), {})


def test_e2e_scaling_rows_summary_and_plot(tmp_path):
    plot = tmp_path / "e2e.png"
    proc = bench("e2e", "--workers", "2", "--scaling", "--batch-size", "8", "--batches", "2", "--rounds", "1", "--images", "32", "--json", "--plot", str(plot))
    rows, summary = json_lines(proc)
    assert {(row["loader"], row["workers"]) for row in rows} == {(loader, w) for loader in ("augserve", "dataloader", "dataloader-uint8") for w in (1, 2)}
    for row in rows:
        assert row["benchmark"] == "e2e" and row["section"] == "npz" and row["images_per_s"] > 0 and len(row["runs"]) == 1
    assert summary["benchmark"] == "e2e" and summary["workers"] == 2 and summary["sections"] == ["npz"] and summary["photos"] is None
    assert [point["workers"] for point in summary["scaling"]] == [1, 2]
    assert all(point["ratio"] > 0 and point["ratio_vs_uint8"] > 0 for point in summary["scaling"])
    assert summary["ratio"] > 0 and set(summary["worker_stage_share"]) == {"load", "augment", "send"}
    assert_png(plot)


def test_e2e_photos_rows_summary_and_table():
    proc = bench("e2e", "--photos", "--no-npz", "--photo-count", "8", "--workers", "2", "--batch-size", "4", "--batches", "2", "--rounds", "1", "--json")
    rows, summary = json_lines(proc)
    assert [(row["section"], row["loader"]) for row in rows] == [("photos", "augserve"), ("photos", "dataloader")]
    for row in rows:
        assert row["benchmark"] == "e2e" and row["workers"] == 2 and row["images_per_s"] > 0 and len(row["runs"]) == 1
    assert summary["benchmark"] == "e2e" and summary["sections"] == ["photos"] and "ratio" not in summary
    photos = summary["photos"]
    assert photos["folder"] == {**photos["folder"], "images": 8, "classes": 4, "generated": True, "sizes": {"500×375": 4, "1600×1200": 4}}
    assert photos["spec"]["ops"][0] == {"op": "random_resized_crop", "size": 224}
    assert photos["augserve_images_per_s"] == rows[0]["images_per_s"] and photos["dataloader_images_per_s"] == rows[1]["images_per_s"]
    assert photos["ratio"] == round(photos["augserve_images_per_s"] / photos["dataloader_images_per_s"], 2) > 0
    assert photos["target_ratio"] == 2.0 and set(photos["worker_stage_share"]) == {"load", "augment", "send"}
    assert photos["rows"] == rows == summary["rows"]


def test_e2e_photos_on_a_user_folder_text_table(tmp_path):
    from augserve.bench.photo_folder import write_photo_folder

    write_photo_folder(tmp_path / "mine", 4)
    proc = bench("e2e", "--folder", str(tmp_path / "mine"), "--no-npz", "--workers", "1", "--batch-size", "4", "--batches", "1", "--rounds", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"4 images in 4 classes from {tmp_path / 'mine'}" in proc.stdout
    assert "| torch DataLoader + cv2.imread + albumentations |" in proc.stdout and "ratio: " in proc.stdout


def test_e2e_missing_folder_exits_2_with_one_line(tmp_path):
    proc = bench("e2e", "--folder", str(tmp_path / "missing"), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"augserve: error: image folder does not exist or is not a directory: {tmp_path / 'missing'}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--folder", "file.npz"], "image folder does not exist or is not a directory"),
        (["--folder", "empty"], "has no class sub-folders"),
        (["--folder", "no-images"], "contains no .jpg/.jpeg/.png/.bmp files in its class sub-folders"),
        (["--folder", "few", "--batch-size", "4"], "holds 1 image(s), fewer than the batch size 4"),
        (["--no-npz"], "--no-npz leaves nothing to measure"),
        (["--photos", "--no-npz", "--scaling"], "--scaling measures the .npz comparison"),
        (["--photo-count", "8"], "does not apply without --photos"),
        (["--folder", "few", "--photo-count", "8"], "does not apply to --folder"),
        (["--photos", "--photo-count", "2", "--batch-size", "4"], "--photo-count (2) must be at least --batch-size (4)"),
    ],
)
def test_e2e_photo_mistakes_end_in_one_line(tmp_path, monkeypatch, capsys, args, message):
    """Checked before anything is measured: in-process, the error comes back in milliseconds."""
    from augserve.cli import main

    (tmp_path / "file.npz").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-images" / "cat").mkdir(parents=True)
    (tmp_path / "no-images" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "few" / "cat").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "few" / "cat" / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    monkeypatch.chdir(tmp_path)  # relative --folder paths, as a user types them
    assert main(["bench", "e2e", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith("augserve: error: ") and message in captured.err


def test_trainer_rows_summary_and_plot(tmp_path):
    plot = tmp_path / "trainer.png"
    proc = bench("trainer", "--model", "lenet5_relu", "--dataset", "digits", "--pipeline", "lenet5", "--batch-size", "16", "--steps", "3", "--warmup-steps", "1", "--workers", "1", "--rounds", "1", "--json", "--plot", str(plot))
    rows, summary = json_lines(proc)
    assert [row["loader"] for row in rows] == ["augserve", "dataloader", "none"]
    for row in rows:
        assert row["benchmark"] == "trainer" and row["images_per_s"] > 0
        assert 0.0 <= row["stall_pct"] <= 100.0
    assert summary["benchmark"] == "trainer" and summary["input"] == "1×32×32"
    assert summary["ratio"] > 0 and summary["model_only_images_per_s"] > 0
    assert summary["augserve_stall_pct"] == rows[0]["stall_pct"]
    assert_png(plot)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pipeline", "SPEC"], "no albumentations equivalent for pipeline"),
        (["--model", "alexnet"], "cannot take 1×32×32 inputs"),
        (["--plot", "out.jpg"], "--plot must name a .png file"),
        (["--dataset-option", "size"], "--dataset-option must look like KEY=VALUE"),
    ],
)
def test_trainer_mistakes_end_in_one_line(tmp_path, args, message):
    spec = tmp_path / "custom.yaml"
    spec.write_text("ops:\n  - {op: mirror}\n")
    proc = bench("trainer", *[str(spec) if a == "SPEC" else a for a in args], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_decoders_rows_and_summary():
    """``augserve bench decoders``: every candidate timed on both photo sizes; ours decodes fewer pixels
    than the whole image (at most a few iMCU columns more than the box) and lands near it (MAD in levels)."""
    rows, summary = json_lines(bench("decoders", "--photos", "1", "--rounds", "1", "--json"))
    assert summary["benchmark"] == "decoders" and summary["photos"] == 1
    sizes = {row["size"] for row in rows}
    assert sizes == {"1600×1200", "500×375"}
    for size in sizes:
        by_name = {row["candidate"]: row for row in rows if row["size"] == size}
        assert {"cv2 full (exact)", "libjpeg scaled ROI", "decode_encoded"} <= set(by_name)
        assert all(row["ms_median"] > 0 for row in by_name.values())
        ours, exact = by_name["decode_encoded"], by_name["cv2 full (exact)"]
        width, height = map(int, size.split("×"))
        assert ours["decoded_kpixels"] < width * height / 1000 and exact["mad"] == 0
        assert by_name["libjpeg scaled ROI"]["mad"] == ours["mad"]  # the decoder decode_encoded uses
        assert 0 <= ours["mad"] < 2.0
