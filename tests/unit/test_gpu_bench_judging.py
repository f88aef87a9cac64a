"""``augserve bench gpu``'s timing and judging, with candidates that record what is done to them."""

from __future__ import annotations

from augserve.bench.gpu import judge, measure
from augserve.bench.gpu_candidates import Candidate


def recording(name: str, log: list) -> Candidate:
    return Candidate(name, lambda index: log.append((name, "run", index)), "", lambda: log.append((name, "finish")))


def test_each_block_runs_its_batches_and_finishes_them_in_alternating_order():
    log: list = []
    rates = measure({"a": recording("a", log), "b": recording("b", log), "off": Candidate("off", None, "unavailable")}, "cpu", rounds=2, batches=2, batch=8)
    assert set(rates) == {"a", "b"} and all(len(values) == 2 and min(values) > 0 for values in rates.values())
    warmup = [("a", "run", -1), ("a", "finish"), ("b", "run", -1), ("b", "finish"), ("a", "run", -2), ("a", "finish"), ("b", "run", -2), ("b", "finish")]
    first = [("a", "run", 0), ("a", "run", 1), ("a", "finish"), ("b", "run", 0), ("b", "run", 1), ("b", "finish")]
    second = [("b", "run", 2), ("b", "run", 3), ("b", "finish"), ("a", "run", 2), ("a", "run", 3), ("a", "finish")]
    assert log == warmup + first + second


def rows(torch=120_000.0, dali=60_000.0, kornia=None, jpeg=30_000.0, dali_jpeg=20_000.0) -> list[dict]:
    figures = {("memory", "torch"): torch, ("memory", "dali"): dali, ("memory", "kornia"): kornia, ("jpeg", "torch-jpeg"): jpeg, ("jpeg", "dali-jpeg"): dali_jpeg}
    return [{"table": table, "key": key, "images_per_s": rate} for (table, key), rate in figures.items()]


def test_targets_are_judged_from_the_rows_and_the_absolute_one_only_on_cuda():
    on_gpu = {t["target"]: (t["value"], t["pass"]) for t in judge(rows(), "cuda:0")}
    assert on_gpu == {
        "torch chain ≥ 100,000 images/s": (120_000.0, True),
        "torch chain ≥ 1.5× DALI's own GPU pipeline": (2.0, True),
        "torch chain ≥ 6× kornia": (None, None),  # no kornia row: not measured
        "from JPEG files ≥ 1.2× DALI's mixed-decoder pipeline": (1.5, True),
    }
    on_cpu = {t["target"]: (t["value"], t["pass"]) for t in judge(rows(torch=900.0, dali=1000.0, jpeg=10_000.0), "cpu")}
    assert on_cpu["torch chain ≥ 100,000 images/s"] == (900.0, None)
    assert on_cpu["torch chain ≥ 1.5× DALI's own GPU pipeline"] == (0.9, False)
    assert on_cpu["from JPEG files ≥ 1.2× DALI's mixed-decoder pipeline"] == (0.5, False)


def test_the_batch_decode_row_says_so_where_nvimgcodec_cannot_decode(tmp_path, monkeypatch):
    """A worker without a usable nvImageCodec decodes on the host one file at a time: the row named
    for the batch decode must not run (and be judged) under that name."""
    from augserve.bench.gpu_candidates import jpeg_candidates
    from augserve.bench.photo_folder import WEB_SIZE, write_photo_folder

    write_photo_folder(tmp_path / "photos", 4, sizes=WEB_SIZE)
    monkeypatch.setattr("augserve.sources.device_decoder.device_decoder", lambda *args, **kwargs: None)
    found = jpeg_candidates(str(tmp_path / "photos"), 2, "cpu", 1)
    assert found["torch-jpeg"].run is None and found["torch-jpeg"].note == "unavailable: nvImageCodec cannot decode on cpu here (its warning says why)"
    assert found["torch-jpeg-host"].run is not None
