"""``augserve bench gpu`` as a user runs it, with ``--device cpu`` and tiny settings: both tables (in
memory, from a real folder of generated JPEG files), every row that can run here, and the targets.

On the CPU every row runs the same code as on a GPU but for the device (DALI's CPU operators and
decoder, nvImageCodec's CPU decoder). Speeds are never asserted; the ratios and verdicts are checked
against the rows they come from.
"""

from __future__ import annotations

import importlib.util

import pytest
from test_bench import assert_png, bench, bench_without_dali, json_lines  # the same runners as the other benches

pytestmark = pytest.mark.slow

TINY = ["--device", "cpu", "--batch", "4", "--rounds", "2", "--batches", "1", "--jpeg-files", "8", "--threads", "1"]
MEMORY = ["torch", "torch-host", "dali-backend", "dali", "kornia", "torchvision"]
JPEG = ["torch-jpeg", "torch-jpeg-host", "dali-jpeg"]


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_ratios_and_targets(rows: list[dict], summary: dict) -> None:
    by = {(row["table"], row["key"]): row for row in rows}
    for row in rows:
        baseline = by.get((row["table"], "dali" if row["table"] == "memory" else "dali-jpeg"))
        rate = row["images_per_s"]
        expected = round(rate / baseline["images_per_s"], 2) if rate and baseline and baseline["images_per_s"] else None
        assert row["vs_dali"] == expected, row
    rate = lambda table, key: by[(table, key)]["images_per_s"]  # noqa: E731
    targets = {t["target"]: t for t in summary["targets"]}
    absolute = targets["torch chain ≥ 100,000 images/s"]
    assert absolute == {"target": "torch chain ≥ 100,000 images/s", "value": rate("memory", "torch"), "unit": "images/s", "pass": None}  # not judged off CUDA
    versus_dali = targets["torch chain ≥ 1.5× DALI's own GPU pipeline"]
    if rate("memory", "dali"):
        assert versus_dali["value"] == round(rate("memory", "torch") / rate("memory", "dali"), 2) and versus_dali["pass"] == (versus_dali["value"] >= 1.5)
    else:
        assert versus_dali["value"] is None and versus_dali["pass"] is None
    from_jpeg = targets["from JPEG files ≥ 1.2× DALI's mixed-decoder pipeline"]
    if rate("jpeg", "dali-jpeg"):
        assert from_jpeg["value"] == round(rate("jpeg", "torch-jpeg") / rate("jpeg", "dali-jpeg"), 2) and from_jpeg["pass"] == (from_jpeg["value"] >= 1.2)
    assert summary["targets_met"] is None  # the absolute target is never judged on the CPU


def test_cpu_check_runs_both_tables_and_judges_from_the_rows(tmp_path):
    plot = tmp_path / "gpu.png"
    rows, summary = json_lines(bench("gpu", *TINY, "--json", "--plot", str(plot), timeout=240))
    assert [row["key"] for row in rows if row["table"] == "memory"] == MEMORY
    assert [row["key"] for row in rows if row["table"] == "jpeg"] == JPEG
    for row in rows:
        missing = {"kornia": "kornia", "torchvision": "torchvision"}.get(row["key"])
        if missing and not installed(missing):
            assert row["images_per_s"] is None and row["note"] == f"unavailable: ModuleNotFoundError: No module named '{missing}'"
        else:
            assert row["images_per_s"] > 0 and len(row["runs"]) == 2, row
    names = {row["key"]: row["name"] for row in rows}
    assert names["torch"] == "augserve torch, device-sampled" and names["torch-host"] == "augserve torch, host-sampled"
    assert names["dali-jpeg"] == "DALI's own pipeline, cpu decoder"
    check_ratios_and_targets(rows, summary)
    assert (summary["torch_device"], summary["batch"], summary["rounds"], summary["batches_per_round"], summary["threads"]) == ("cpu", 4, 2, 1, 1)
    folder = summary["jpeg_folder"]
    assert (folder["images"], folder["sizes"], folder["root"], folder["generated"]) == (8, {"500×375": 8}, None, True)
    assert summary["h2d_gb_per_s"] is None and summary["rows"] == rows and summary["plot"] == str(plot)
    assert_png(plot)


def test_readable_table_without_dali_says_why_and_runs_the_rest():
    proc = bench_without_dali("gpu", *TINY, "--jpeg-files", "4", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert "(--device cpu: a check that every row runs, not a measurement)" in table
    assert "| DALI's own pipeline | – | – | – | unavailable: ModuleNotFoundError: No module named 'nvidia.dali' |" in table
    assert "| DALI's own pipeline, cpu decoder | – | – | unavailable: ModuleNotFoundError: No module named 'nvidia.dali' |" in table
    for name in ("augserve torch, device-sampled", "augserve torch, nvImageCodec batch decode", "augserve torch, host decode"):
        assert f"| {name} | " in table and f"| {name} | –" not in table
    assert "- torch chain ≥ 1.5× DALI's own GPU pipeline: – — not judged" in table
    assert "- from JPEG files ≥ 1.2× DALI's mixed-decoder pipeline: – — not judged" in table
    assert "from JPEG files: 4 photos of 500×375 (q90" in table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "cuda:0"], "bench gpu runs on cuda:0, and CUDA is not available on this machine; --device cpu runs every row on the CPU as a check"),
        (["--device", "tpu"], "--device must be cpu or cuda[:K], got 'tpu'"),
        (["--device", "cpu", "--batches", "0"], "--batches must be >= 1, got 0"),
        (["--device", "cpu", "--batches", "5000"], "--batches must be in 1..1000, got 5000"),
        (["--device", "cpu", "--jpeg-files", "-1"], "--jpeg-files must be in 0..20000, got -1"),
        (["--device", "cpu", "--batch", "5000"], "--batch must be in 1..4096, got 5000"),
    ],
)
def test_bad_settings_end_in_one_line(args, message):
    import torch

    if torch.cuda.is_available() and args[1] == "cuda:0":
        pytest.skip("this machine has CUDA")
    proc = bench("gpu", *args, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"augserve: error: {message}", proc.stderr[-2000:]
