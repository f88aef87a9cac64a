"""``augserve bench e2e``: images/s delivered to a trainer process — augserve vs a torch DataLoader.

Both sides get the same number of worker processes, the same source (an ``.npz`` of RGB 256×256
``shapes`` images, decoded arrays) and the same pipeline (the ``alexnet`` preset: resize 256, random
224 crop, mirror, PCA lighting, normalize to float32 NCHW). The trainer is a separate process that only
touches each batch. The baseline is ``DataLoader(num_workers=N)`` over a Dataset applying the
equivalent ``albumentations.Compose`` to each image; ours is ``augserve serve --workers N`` and
``augserve.connect`` (workers ship uint8, the trainer's client normalizes). Runs alternate between
the two so machine noise hits both alike; medians are reported with their ratio.

``scaling=True`` (``--scaling``) repeats the comparison for every worker count from 1 to N, one daemon
per count, for a curve of images/s against workers on both sides.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

from ..local import local_daemon
from ..status import fetch_status
from .plots import cpu_name


def write_source(path: str, count: int, size: int = 256) -> None:
    """An ``.npz`` source of ``count`` RGB ``size``² shapes images (uint8) with their labels."""
    from augserve.sources import open_dataset

    source = open_dataset("shapes", size=size, n=count)
    images = np.stack([source.load(i) for i in range(count)])
    np.savez(path, images=images, labels=source.labels)


def _run_trainer(mode: str, args: list[str], timeout: float) -> dict:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "augserve.bench.e2e_trainer", mode, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} trainer failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(source: str, workers: int, batch_size: int, batches: int, rounds: int, progress=None) -> tuple[dict[str, list[dict]], dict]:
    """Alternating runs of both loaders with ``workers`` worker processes; returns (runs, daemon status)."""
    with local_daemon(workers, datasets={"bench": source}) as address:
        common = ["--batch-size", str(batch_size), "--batches", str(batches)]
        runs: dict[str, list[dict]] = {"augserve": [], "dataloader": [], "dataloader-uint8": []}
        for round_index in range(rounds):
            runs["augserve"].append(_run_trainer("augserve", [*common, "--address", address, "--seed", str(round_index)], timeout=600))
            if progress:
                progress(f"{workers} worker(s), round {round_index + 1}/{rounds}: augserve {runs['augserve'][-1]['images_per_s']:.0f} img/s")
            for mode in ("dataloader", "dataloader-uint8"):
                runs[mode].append(_run_trainer(mode, [*common, "--source", source, "--workers", str(workers)], timeout=600))
                if progress:
                    progress(f"{workers} worker(s), round {round_index + 1}/{rounds}: {LOADERS[mode]} {runs[mode][-1]['images_per_s']:.0f} img/s")
        status = fetch_status(address)
    return runs, status


LOADERS = {
    "augserve": "augserve (daemon + connect)",
    "dataloader": "torch DataLoader + albumentations",
    # The same DataLoader shipping uint8 and normalizing in the trainer, as augserve does: it separates
    # what the transport gains from what the fused augmentation gains.
    "dataloader-uint8": "torch DataLoader, uint8 + normalize in the trainer",
}


def run_e2e(workers: int = 2, batch_size: int = 64, batches: int = 30, rounds: int = 3, images: int = 512, progress=None, scaling: bool = False) -> dict:
    """Measure and return the result dict (see :func:`format_table`).

    ``scaling``: measure every worker count from 1 to ``workers`` (one daemon per count), giving one row
    per (loader, workers); the summary's headline figures are those at ``workers``.
    """
    counts = list(range(1, workers + 1)) if scaling else [workers]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="augserve-bench-") as folder:
        source = os.path.join(folder, "shapes256.npz")
        write_source(source, images)
        for count in counts:
            runs, status = _measure(source, count, batch_size, batches, rounds, progress)
            for loader, loader_runs in runs.items():
                rows.append(
                    {
                        "benchmark": "e2e",
                        "loader": loader,
                        "workers": count,
                        "images_per_s": round(statistics.median(r["images_per_s"] for r in loader_runs), 1),
                        "first_batch_s": round(statistics.median(r["first_batch_s"] for r in loader_runs), 3),
                        "runs": [round(r["images_per_s"], 1) for r in loader_runs],
                    }
                )
    top = {row["loader"]: row for row in rows if row["workers"] == workers}
    ours, baseline = top["augserve"]["images_per_s"], top["dataloader"]["images_per_s"]
    curve = [
        {"workers": count, **{f"{loader}_images_per_s": row["images_per_s"] for loader in LOADERS for row in rows if row["workers"] == count and row["loader"] == loader}}
        for count in counts
    ]
    for point in curve:
        point["ratio"] = round(point["augserve_images_per_s"] / point["dataloader_images_per_s"], 2)
        point["ratio_vs_uint8"] = round(point["augserve_images_per_s"] / point["dataloader-uint8_images_per_s"], 2)
    return {
        "benchmark": "e2e",
        "workers": workers,
        "batch_size": batch_size,
        "batches_timed": batches,
        "rounds": rounds,
        "images": images,
        "cpu": cpu_name(),
        "pipeline": "alexnet (256² uint8 → 224² float32 NCHW)",
        "augserve_images_per_s": ours,
        "dataloader_images_per_s": baseline,
        "ratio": round(ours / baseline, 2),
        "dataloader_uint8_images_per_s": top["dataloader-uint8"]["images_per_s"],
        "ratio_vs_uint8_dataloader": round(ours / top["dataloader-uint8"]["images_per_s"], 2),
        "target_ratio": 1.3,
        "augserve_first_batch_s": top["augserve"]["first_batch_s"],
        "dataloader_first_batch_s": top["dataloader"]["first_batch_s"],
        "worker_stage_share": _stage_share(status),
        "scaling": curve if scaling else None,
        "rows": rows,
    }


def json_rows(result: dict) -> list[dict]:
    """The rows ``--json`` prints before the summary: one per (loader, workers)."""
    return list(result["rows"])


def plot(result: dict, path: str) -> str:
    """Images/s against workers for both loaders, and their ratio (one point each without --scaling)."""
    from .plots import scaling_plot

    counts = sorted({row["workers"] for row in result["rows"]})
    curves = {
        LOADERS[loader]: [next(r["images_per_s"] for r in result["rows"] if r["loader"] == loader and r["workers"] == count) for count in counts]
        for loader in LOADERS
    }
    title = f"augserve bench e2e — {result['pipeline']}, batch {result['batch_size']}, median of {result['rounds']} alternating runs"
    return scaling_plot(path, counts, curves, title, ratio_of=(LOADERS["augserve"], LOADERS["dataloader"]), ratio_label="augserve / DataLoader")


def _stage_share(status: dict) -> dict:
    """Share of worker time per stage (load / augment / send), averaged over the workers."""
    totals = {"load": 0.0, "augment": 0.0, "send": 0.0}
    for worker in status["workers"]:
        for key in totals:
            totals[key] += worker["stage_ms"][key] * max(worker["batches"], 0)
    whole = sum(totals.values()) or 1.0
    return {key: round(value / whole, 3) for key, value in totals.items()}


def format_table(result: dict) -> str:
    share = result["worker_stage_share"]
    return "\n".join(
        [
            f"end-to-end benchmark — {result['workers']} worker process(es), batch {result['batch_size']}, {result['pipeline']}, median of {result['rounds']} alternating runs of {result['batches_timed']} batches",
            "",
            "| loader | images/s to the trainer | first batch after attach/start |",
            "|---|---:|---:|",
            f"| augserve (daemon + connect) | {result['augserve_images_per_s']:.0f} | {result['augserve_first_batch_s'] * 1000:.0f} ms |",
            f"| torch DataLoader + albumentations | {result['dataloader_images_per_s']:.0f} | {result['dataloader_first_batch_s'] * 1000:.0f} ms |",
            f"| torch DataLoader, uint8 + normalize in the trainer | {result['dataloader_uint8_images_per_s']:.0f} | – |",
            "",
            f"ratio: {result['ratio']:.2f}× (target ≥ {result['target_ratio']}×); against the uint8 DataLoader {result['ratio_vs_uint8_dataloader']:.2f}×",
            f"worker time by stage (at {result['workers']} workers): load {share['load']:.0%}, augment {share['augment']:.0%}, send (transport) {share['send']:.0%}",
        ]
        + _scaling_lines(result)
    )


def _scaling_lines(result: dict) -> list[str]:
    if not result.get("scaling"):
        return []
    lines = ["", "scaling (images/s to the trainer, medians):", "", "| workers | augserve | DataLoader | ratio | DataLoader uint8 | ratio |", "|---:|---:|---:|---:|---:|---:|"]
    for point in result["scaling"]:
        lines.append(
            f"| {point['workers']} | {point['augserve_images_per_s']:.0f} | {point['dataloader_images_per_s']:.0f} | {point['ratio']:.2f}× "
            f"| {point['dataloader-uint8_images_per_s']:.0f} | {point['ratio_vs_uint8']:.2f}× |"
        )
    return lines
