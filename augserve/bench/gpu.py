"""``augserve bench gpu``: the torch backend's chain on a GPU against DALI, kornia and torchvision v2 —
from images in memory and from JPEG files — with issue 11's targets judged in the same run.

The chain (:data:`~augserve.bench.gpu_candidates.GPU_CHAIN`, the one of ../shared/ANCHORS.md):
random-resized-crop 224 + flip + rotate ±15° + shear ±10° + PCA lighting + color shift + normalize to
float16 NCHW. Two tables, their rows made by :mod:`augserve.bench.gpu_candidates`:

* **in memory** — a batch of ``batch`` uint8 RGB 256² images (the built-in ``shapes``) already on the
  device. Rows: augserve's torch backend with its per-sample parameters sampled on the device (batched
  torch ops replayed as a CUDA graph: the row the targets judge) and sampled on the host (numpy);
  augserve's DALI backend (our fused plans run by DALI); **DALI's own pipeline**
  (:mod:`augserve.bench.dali_chain`: DALI's random operators, the graph a DALI user writes — the
  baseline of the target); kornia's ``AugmentationSequential`` and torchvision v2 in a per-image loop
  (both without the color ops: they have no PCA lighting).
* **from JPEG files** — ``jpeg_files`` JPEG photos of 500×375 (written from scikit-image's photos into a
  temporary folder), each batch ``batch`` of them, from the bytes on disk to the normalized batch.
  Rows: augserve's GPU worker path (:func:`augserve.batch.augment_batch`: headers read, every sample
  planned, only each plan's region decoded by nvImageCodec in one call for the batch, the fused chain
  written into a device buffer, then normalized on the device as the trainer's client does); the same
  with the files decoded on the host one at a time (a worker without nvImageCodec); **DALI's own
  pipeline** with its ``mixed`` decoder (``readers.file`` → ``decoders.image_random_crop`` → the chain).

Each candidate runs ``batches`` batches per round, in interleaved rounds whose order alternates
(:func:`augserve.bench.timing.round_order`), the device synchronized before and after each block;
medians of the rounds are reported. A block starts and ends with nothing in flight: DALI's pipelines
schedule each batch one ahead of the one they hand over (as ``pipe.run()`` does, so its stages
overlap), and the last one is taken inside the block — ``pipe.run()`` alone would leave a batch
running into the next candidate's block. One exception: DALI's file reader reads ahead on a thread of
its own, so the files of about one batch are opened and mapped outside its blocks (a small share of a
batch of 500×375 JPEGs, whose cost is the decode). augserve's rows are one worker's synchronous loop, with no
batch made ahead. DALI and nvImageCodec get ``threads`` CPU threads, and so does torch.

``--device cpu`` runs every row on the CPU (DALI's CPU operators and decoder, nvImageCodec's CPU
decoder): a check that the command works, not a measurement of what the targets are about.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from .devices import bench_device
from .gpu_candidates import GPU_CHAIN, Candidate, jpeg_candidates, memory_candidates
from .report import all_met, ratio, shown
from .timing import round_order

INPUT_SIDE = 256  # the in-memory batch's images are INPUT_SIDE² RGB
WARMUP_BATCHES = 2  # per candidate, untimed: CUDA graphs captured, cuDNN and DALI set up, files in the page cache
TABLES = ("memory", "jpeg")
MAX_BATCH = 4096  # images per batch: 0.8 GB of 256² inputs, several copies of it alive at once
MAX_JPEG_FILES = 20_000  # photos written for the JPEG table (~1 GB, a few minutes to write)
# (table, our row, baseline row or None, text, minimum, on CUDA only): issue 11 §4's targets, judged in
# the run. With a baseline the value is our row's images/s over the baseline's, else our images/s.
TARGETS = (
    ("memory", "torch", None, "torch chain ≥ 100,000 images/s", 100_000, True),
    ("memory", "torch", "dali", "torch chain ≥ 1.5× DALI's own GPU pipeline", 1.5, False),
    ("memory", "torch", "kornia", "torch chain ≥ 6× kornia", 6.0, False),
    ("jpeg", "torch-jpeg", "dali-jpeg", "from JPEG files ≥ 1.2× DALI's mixed-decoder pipeline", 1.2, False),
)


def measure(candidates: dict[str, Candidate], device: str, rounds: int, batches: int, batch: int) -> dict[str, list[float]]:
    """key -> images/s of each round, for the candidates that can run."""
    # the device's own queue: a bare synchronize() waits for the current device, cuda:0
    synchronize = (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)
    live = {key: c for key, c in candidates.items() if c.run is not None}
    for index in range(WARMUP_BATCHES):
        for candidate in live.values():
            candidate.run(-1 - index)
            candidate.finish()
    rates: dict[str, list[float]] = {key: [] for key in live}
    for round_index in range(rounds):
        for key, candidate in round_order(live, round_index):
            synchronize()
            start = time.perf_counter()
            for k in range(batches):
                candidate.run(round_index * batches + k)
            candidate.finish()
            synchronize()
            rates[key].append(batches * batch / (time.perf_counter() - start))
    return rates


def copy_bandwidth(device: str, rounds: int) -> dict:
    """GB/s of a 256×3×224×224 uint8 batch host→device, from pageable and from pinned memory."""
    pageable = torch.randint(0, 255, (256, 3, 224, 224), dtype=torch.uint8)
    pinned = pageable.pin_memory()
    results = {}
    for name, source in (("pageable", pageable), ("pinned", pinned)):
        for _ in range(2):
            source.to(device, non_blocking=True)
        torch.cuda.synchronize(device)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            source.to(device, non_blocking=True)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        results[name] = round(pageable.numel() / statistics.median(times) / 1e9, 2)
    return results


def _rows(table: str, candidates: dict[str, Candidate], rates: dict[str, list[float]]) -> list[dict]:
    rows = []
    for key, candidate in candidates.items():
        runs = rates.get(key)
        rows.append({
            "benchmark": "gpu", "table": table, "key": key, "name": candidate.name,
            "images_per_s": round(statistics.median(runs), 1) if runs else None,
            "runs": [round(rate, 1) for rate in runs or []], "note": candidate.note,
        })  # fmt: skip
    baselines = {"memory": ("kornia", "dali"), "jpeg": (None, "dali-jpeg")}[table]
    by_key = {row["key"]: row for row in rows}
    for field, baseline in zip(("vs_kornia", "vs_dali"), baselines):
        reference = by_key.get(baseline, {}).get("images_per_s") if baseline else None
        for row in rows:
            row[field] = ratio(row["images_per_s"], reference)
    return rows


def judge(rows: list[dict], device: str) -> list[dict]:
    """Issue 11 §4's targets from the rows: ``{"target", "value", "pass"}``, ``pass`` None where a row
    is missing or (absolute figures) the run was not on CUDA."""
    by = {(row["table"], row["key"]): row["images_per_s"] for row in rows}
    on_cuda = torch.device(device).type == "cuda"
    judged = []
    for table, ours, baseline, text, minimum, cuda_only in TARGETS:
        value = by.get((table, ours))
        if baseline is not None:
            value = ratio(value, by.get((table, baseline)))
        verdict = None if value is None or (cuda_only and not on_cuda) else value >= minimum
        judged.append({"target": text, "value": value, "unit": "images/s" if baseline is None else "×", "pass": verdict})
    return judged


def run_gpu_bench(device: str = "cuda:0", rounds: int = 10, batch: int = 256, batches: int = 8, jpeg_files: int | None = None,
                  threads: int | None = None, progress=None) -> dict:  # fmt: skip
    """Measure both tables and judge the targets. ``jpeg_files``: photos written for the JPEG table
    (default two batches' worth; 0 leaves the table out); ``threads``: CPU threads of torch, DALI and
    nvImageCodec (default the host's cores, at most 8)."""
    from .photo_folder import WEB_SIZE, write_photo_folder
    from .pipeline_throughput import make_inputs
    from .plots import cpu_name

    device = str(bench_device(device, "bench gpu runs on {device}, and CUDA is not available on this machine; --device cpu runs every row on the CPU as a check"))
    for name, value, minimum, maximum in (("rounds", rounds, 1, 1000), ("batch", batch, 1, MAX_BATCH), ("batches", batches, 1, 1000),
                                           ("jpeg-files", jpeg_files, 0, MAX_JPEG_FILES), ("threads", threads, 1, 256)):  # fmt: skip
        if value is not None and not minimum <= value <= maximum:
            raise ValueError(f"--{name} must be in {minimum}..{maximum}, got {value}")
    jpeg_files = 2 * batch if jpeg_files is None else jpeg_files
    threads = threads or min(8, os.cpu_count() or 1)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    if device != "cpu":
        torch.backends.cudnn.benchmark = True
    say = progress or (lambda text: None)
    try:
        say(f"in memory: {batch} images of {INPUT_SIDE}² on {device}")
        candidates = memory_candidates(make_inputs(batch, INPUT_SIDE), device, threads)
        rows = _rows("memory", candidates, measure(candidates, device, rounds, batches, batch))
        folder = None
        if jpeg_files:
            with tempfile.TemporaryDirectory(prefix="augserve-bench-gpu-") as scratch:
                say(f"from JPEG files: writing {jpeg_files} photos of 500×375")
                folder = write_photo_folder(os.path.join(scratch, "photos"), jpeg_files, sizes=WEB_SIZE)
                candidates = jpeg_candidates(folder["root"], batch, device, threads)
                rows += _rows("jpeg", candidates, measure(candidates, device, rounds, batches, batch))
                del candidates  # DALI's reader and buffers go before their folder does
            folder["root"] = None  # the temporary folder is gone
    finally:
        torch.set_num_threads(previous_threads)
    targets = judge(rows, device)
    return {
        "benchmark": "gpu",
        "device": torch.cuda.get_device_name(device) if device != "cpu" else cpu_name(),
        "torch_device": device,
        "chain": [op["op"] for op in GPU_CHAIN["ops"]],
        "batch": batch,
        "input": f"{INPUT_SIDE}×{INPUT_SIDE}×3 uint8 → 224×224",
        "jpeg_folder": folder,
        "rounds": rounds,
        "batches_per_round": batches,
        "threads": threads,
        "rows": rows,
        "targets": targets,
        "targets_met": all_met(targets),
        "h2d_gb_per_s": copy_bandwidth(device, rounds) if device != "cpu" else None,
    }


def plot(result: dict, path: str) -> str:
    """Bar chart of images/s per implementation (log scale), a panel per table, to ``path``."""
    from .plots import grouped_barh

    panels = []
    for table, title in (("memory", f"in memory: {result['batch']} × {result['input']}"), ("jpeg", "from 500×375 JPEG files")):
        rows = [r for r in result["rows"] if r["table"] == table and r["images_per_s"]]
        panels.append({
            "title": f"{title} on {result['device']}", "groups": [r["name"] for r in rows], "series": ["images/s"],
            "values": {(r["name"], "images/s"): r["images_per_s"] for r in rows}, "xlabel": "images/s",
        })  # fmt: skip
    return grouped_barh(path, panels, "augserve bench gpu")


def format_table(result: dict) -> str:
    check = " (--device cpu: a check that every row runs, not a measurement)" if result["torch_device"] == "cpu" else ""
    lines = [
        f"GPU benchmark on {result['device']}{check} — chain {' + '.join(result['chain'])}, batch {result['batch']}; "
        f"median of {result['rounds']} interleaved rounds of {result['batches_per_round']} batches; {result['threads']} CPU threads",
    ]
    titles = {"memory": f"in memory: {result['input']}, already on {result['torch_device']}", "jpeg": "from JPEG files"}
    if result["jpeg_folder"]:
        folder = result["jpeg_folder"]
        titles["jpeg"] = f"from JPEG files: {folder['images']} photos of 500×375 (q{folder['quality']}, {folder['bytes'] / 1e6:.1f} MB), read from disk to the normalized batch"
    for table in TABLES:
        rows = [row for row in result["rows"] if row["table"] == table]
        if not rows:
            continue
        kornia = table == "memory"  # kornia has no JPEG decoder: no such column in the file table
        lines += ["", titles[table], "", "| implementation | images/s | × DALI's own |" + (" × kornia |" if kornia else "") + " note |",
                  "|---|---:|---:|" + ("---:|" if kornia else "") + "---|"]  # fmt: skip
        for row in rows:
            kornia_cell = f" {shown(row.get('vs_kornia'), '{:.2f}')} |" if kornia else ""
            lines.append(f"| {row['name']} | {shown(row['images_per_s'], '{:.0f}')} | {shown(row['vs_dali'], '{:.2f}')} |{kornia_cell} {row['note']} |")
    lines += ["", "targets (issue 11 §4):"]
    for target in result["targets"]:
        verdict = {True: "pass", False: "FAIL", None: "not judged" if result["torch_device"] == "cpu" else "not measured"}[target["pass"]]
        value = target["value"]
        text = "–" if value is None else (f"{value:,.0f} images/s" if target["unit"] == "images/s" else f"{value:.2f}×")
        lines.append(f"- {target['target']}: {text} — {verdict}")
    copy = result["h2d_gb_per_s"]
    if copy:
        lines += ["", f"host→device copy of a 38.5 MB uint8 batch: pageable {copy['pageable']} GB/s, pinned {copy['pinned']} GB/s"]
    return "\n".join(lines)
