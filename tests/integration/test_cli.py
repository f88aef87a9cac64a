"""The augserve command as a user runs it: real processes, real files."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import pipelines


def augserve(*args, check=True):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run([sys.executable, "-m", "augserve", *args], capture_output=True, text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"augserve {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def test_preview_writes_a_grid_png(tmp_path):
    out = tmp_path / "grid.png"
    proc = augserve("preview", "--pipeline", "lenet5", "--dataset", "digits", "--out", str(out), "--rows", "3", "--variants", "4", "--cell", "64", "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    grid = cv2.imread(str(out))
    assert grid.shape == (3 * 64, 5 * 64 + 4, 3)
    assert result["rows"] == 3 and result["skipped_corrupt"] == 0


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_preview_on_other_backends(tmp_path, backend):
    out = tmp_path / f"{backend}.png"
    augserve("preview", "--pipeline", "resnet", "--dataset", "photos", "--out", str(out), "--rows", "2", "--variants", "2", "--cell", "96", "--backend", backend)
    assert cv2.imread(str(out)).shape == (2 * 96, 3 * 96 + 4, 3)


def test_preview_skips_and_counts_corrupt_files(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "data" / name / "ok.png"), np.full((20, 30, 3), 100, np.uint8))
    (tmp_path / "data" / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    proc = augserve("preview", "--pipeline", "mobilenet", "--dataset", str(tmp_path / "data"), "--out", str(tmp_path / "g.png"), "--rows", "3", "--json")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["skipped_corrupt"] == 1
    assert "broken.jpg" in proc.stderr


def test_fit_pca_prints_and_writes_a_spec(tmp_path):
    target = tmp_path / "alexnet-photos.yaml"
    proc = augserve("fit-pca", "--dataset", "photos", "--write", str(target), "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["eigval"]) == 3 and result["eigval"][0] >= result["eigval"][1] >= result["eigval"][2] >= 0
    spec = pipelines.PipelineSpec.from_file(str(target))
    op = next(o for o in spec.ops if o.op == "pca_color")
    np.testing.assert_allclose(op.eigval, result["eigval"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["preview", "--pipeline", "alexnett", "--dataset", "photos", "--out", "x.png"], "unknown pipeline 'alexnett'"),
        (["preview", "--pipeline", "alexnet", "--dataset", "imagenet", "--out", "x.png"], "unknown dataset 'imagenet'"),
        (["preview", "--pipeline", "alexnet", "--dataset", "photos", "--out", "/nonexistent/dir/x.png"], "cannot write /nonexistent/dir/x.png"),
        (["preview", "--pipeline", "alexnet", "--dataset", "photos", "--split", "test", "--out", "x.png"], "test"),
        (["fit-pca", "--dataset", "digits"], "needs an RGB dataset"),
        (["fit-pca", "--dataset", "photos", "--write", "x.yaml", "--pipeline", "mobilenet"], "has no pca_color op"),
        (["preview", "--pipeline", "alexnet", "--dataset", "photos", "--out", "x.png", "--rows", "0"], "--rows must be >= 1"),
    ],
)
def test_user_mistakes_end_in_one_line(tmp_path, args, message):
    proc = augserve(*args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("augserve: error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_invalid_spec_file_names_field_and_value(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ops:\n  - {op: random_resized_crop, size: 224, scale: [0.9, 0.1]}\n  - {op: rotate, degrees: 10, p: 1.5}\n")
    proc = augserve("validate", str(bad), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "ops[0].random_resized_crop.scale" in proc.stderr and "ops[1].rotate.p = 1.5" in proc.stderr


def test_schema_and_validate(tmp_path):
    schema = json.loads(augserve("schema", "--json").stdout)
    assert "ops" in schema["properties"]
    shown = augserve("validate", "resnet").stdout
    assert pipelines.PipelineSpec.model_validate(shown) == pipelines.load_preset("resnet")


def test_bench_pipelines_json_runs_side_by_side():
    proc = augserve("bench", "pipelines", "--images", "4", "--rounds", "1", "--backend", "albumentations", "--json")
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    summary = lines[-1]
    names = [row["name"] for row in summary["rows"]]
    assert "albumentations Compose (baseline)" in names and "augserve albumentations: alexnet-chain" in names
    assert summary["ratio_fused_cpu_vs_compose"] > 0
