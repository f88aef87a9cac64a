"""``augserve bench gpu-e2e``: ResNet-50 (bf16, channels_last) trained on a GPU from a folder of JPEG
photos, fed four ways in one run.

* **augserve**: one ``augserve serve --backend torch --device cuda:0 --workers N`` for the whole run, and
  ``augserve.connect(..., device="cuda:0")`` with its default transport (shared memory on one host,
  where it can); the workers ship uint8 and the trainer's client normalizes on the GPU.
* **DataLoader**: ``torch.utils.data.DataLoader(num_workers=<all host cores>, pin_memory=True)`` over the
  preset's ordinary albumentations Compose (a full decode of each file, normalize in the workers); the
  run is one DataLoader epoch of reshuffled passes, so the folder's short epochs do not drain it.
* **DALI**: DALI's own pipeline of the same preset and its PyTorch iterator on the same files (nvJPEG
  ``mixed`` decoder of the random crop, then resize and every other op of the preset — the resnet
  preset's PCA lighting too — on the GPU with DALI's random operators; :func:`trainer.bench.loaders.dali_batches`).
  A preset DALI's own pipeline cannot express (one without ``random_resized_crop``) gives the row's reason.
* **synthetic**: one pre-made batch already on the GPU, repeated: the model's own speed.

Every run is a separate trainer process doing the same step (:func:`trainer.loop.train_step`: bf16
autocast, channels_last, SGD); the loaders alternate over ``rounds`` and medians are reported (see
:mod:`trainer.bench.trainer_bench`, whose machinery this is). Images/s trained = images of the timed
steps over their wall time; data stall = the share of that time spent waiting for the next batch.

The folder: ``images`` JPEG photos of 500×375 written by :func:`augserve.bench.photo_folder.write_photo_folder`
into a temporary folder (removed at the end), or the user's ``--folder`` (an ImageFolder). A loader that
cannot run (DALI not installed, or without CUDA support) or fails gives a row saying so; the others
still run. The targets of issue 11 §5 are judged on the augserve row: data stall < 5%, images/s ≥ 90%
of synthetic and ≥ 2× the DataLoader's.

``--device cpu`` runs the same pipeline with every part on the CPU (DALI's CPU decoder): a check that
the command works, not a measurement of anything the targets are about.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import tempfile
import time

import torch

from augserve.bench.report import all_met, ratio, shown

from .trainer_bench import ChildFailed, TrainerBenchConfig, check, check_setup, measure, median_of, synthetic_run

LOADERS = ("augserve", "dataloader", "dali")
REQUIRED = ("augserve", "dataloader", "synthetic")  # rows whose failure makes the run a failure (DALI is optional)
# (field of the augserve row, text, test of its value): issue 11 §5's targets.
TARGETS = (
    ("stall_pct", "data stall < 5%", lambda value: value < 5.0),
    ("vs_synthetic", "images/s ≥ 90% of synthetic", lambda value: value >= 0.90),
    ("vs_dataloader", "images/s ≥ 2× DataLoader", lambda value: value >= 2.0),
)


def check_device(text: str) -> torch.device:
    """``cpu`` or ``cuda[:k]``, present on this machine (``cuda`` is ``cuda:0``); ValueError (one line) otherwise."""
    from augserve.bench.devices import bench_device

    return bench_device(text, "bench gpu-e2e trains on {device}, and CUDA is not available on this machine; --device cpu runs the same pipeline on the CPU as a check")


def dali_unavailable(spec: dict) -> str | None:
    """Why DALI's iterator cannot run ``spec`` here, or None (a DALI without CUDA support shows when its
    run fails): DALI is not installed, or its own pipeline cannot express the spec's chain."""
    from augserve.bench.dali_chain import check_chain
    from pipelines.spec import PipelineSpec

    try:
        check_chain(PipelineSpec.model_validate(spec))
    except ValueError as exc:
        return str(exc)
    try:
        importlib.import_module("nvidia.dali")
    except ImportError:
        return "NVIDIA DALI is not installed (pip install 'augserve[dali]')"
    return None


def worker_decoder(device: torch.device, backend: str) -> str:
    """Where augserve's workers decode the folder's JPEG files: ``cuda:K (nvImageCodec)``, or ``host``
    — probed in this process, which runs on the workers' machine with their packages. Only the torch
    backend on a GPU decodes batches there (``augserve.batch``); a worker without a usable nvImageCodec
    decodes on the host one file at a time (and warns); the row says so."""
    if device.type != "cuda" or backend != "torch":
        return "host"
    from augserve.sources.device_decoder import device_decoder

    if device_decoder(str(device), 3) is None:  # the reason is logged once, to stderr
        return "host (nvImageCodec cannot decode on the GPU here: see the warning)"
    return f"{device} (nvImageCodec)"


def run_gpu_e2e(config: TrainerBenchConfig, folder: str | None = None, images: int = 2048, progress=None) -> dict:
    """Measure and return the result: ``rows`` (one per loader and the synthetic run), medians, ratios,
    targets. ``config``: the trainer side (its ``dataset`` is replaced by the folder); ``folder``: the
    user's image folder, else ``images`` photos are generated."""
    from augserve.bench.photo_folder import WEB_SIZE, describe_folder, write_photo_folder
    from augserve.bench.plots import cpu_name

    device = check_device(config.device)
    config = dataclasses.replace(config, device=str(device))
    if folder is not None:
        described = describe_folder(folder)
        if described["images"] < config.batch_size:
            raise ValueError(f"image folder {described['root']} holds {described['images']} image(s), fewer than the batch size {config.batch_size}")
    elif images < config.batch_size:
        raise ValueError(f"--images ({images}) must be at least --batch-size ({config.batch_size})")
    config = dataclasses.replace(config, loaders=tuple(mode for mode in LOADERS if mode != "dali"), worker_device=config.device, one_epoch=True)
    check_setup(config)  # the mistakes first: a pipeline DALI cannot run is not one
    unavailable = {}
    why = dali_unavailable(config.spec())
    if why is None:
        config = dataclasses.replace(config, loaders=LOADERS)
    else:
        unavailable["dali"] = why
    with tempfile.TemporaryDirectory(prefix="augserve-gpu-e2e-") as scratch:
        if folder is None:
            if progress:
                progress(f"writing {images} JPEG photos of 500×375")
            started = time.perf_counter()
            described = write_photo_folder(os.path.join(scratch, "photos"), images, sizes=WEB_SIZE)
            described["written_s"] = round(time.perf_counter() - started, 1)
        config = dataclasses.replace(config, dataset=described["root"])
        info = check(config)
        runs, failures = measure(config, progress, tolerate=True)
        try:
            runs["synthetic"] = [synthetic_run(config, progress)]
        except ChildFailed as exc:
            failures["synthetic"] = exc.line
    if described["generated"]:
        described["root"] = None  # the temporary folder is gone
    decoder = worker_decoder(device, config.backend)
    rows = _rows(config, runs, failures, unavailable, decoder)
    ours = rows[0]
    targets = [{"target": text, "value": ours[key], "pass": test(ours[key]) if ours[key] is not None else None} for key, text, test in TARGETS]
    by_loader = {row["loader"]: row for row in rows}
    return {
        "benchmark": "gpu-e2e",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "trainer_device": config.device,
        "model": config.model,
        "precision": config.precision,
        "channels_last": config.channels_last,
        "input": "×".join(map(str, info["input"])),
        "classes": info["classes"],
        "pipeline": config.pipeline,
        "pipeline_ops": [op["op"] for op in config.spec()["ops"]],
        "batch_size": config.batch_size,
        "steps": config.steps,
        "warmup_steps": config.warmup_steps,
        "rounds": config.rounds,
        "folder": described,
        "gpu_workers": config.workers,
        "worker_backend": config.backend,
        "worker_device": config.worker_device,
        "worker_jpeg_decoder": decoder,
        "dataloader_workers": config.loader_workers,
        "dali_threads": config.loader_threads,
        "host_cores": os.cpu_count(),
        "cpu": cpu_name(),
        **{f"{loader}_images_per_s": by_loader[loader]["images_per_s"] for loader in (*LOADERS, "synthetic")},
        "augserve_stall_pct": ours["stall_pct"],
        "vs_synthetic": ours["vs_synthetic"],
        "vs_dataloader": ours["vs_dataloader"],
        "vs_dali": ratio(ours["images_per_s"], by_loader["dali"]["images_per_s"]),
        "transport": ours.get("transport"),
        "targets": targets,
        "targets_met": all_met(targets),
        "failed": sorted(mode for mode in failures if mode in REQUIRED),
        "rows": rows,
    }


def _transport(runs: list[dict]) -> str | None:
    """How the augserve batches came: ``shm``, ``frames`` or both with their counts."""
    counts = {"shm": 0, "frames": 0}
    for run in runs:
        for kind, count in (run.get("transport") or {}).items():
            counts[kind] = counts.get(kind, 0) + count
    used = {kind: count for kind, count in counts.items() if count}
    if len(used) == 1:
        return next(iter(used))
    return " + ".join(f"{kind} ({count})" for kind, count in used.items()) or None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def label(config: TrainerBenchConfig, loader: str) -> str:
    """The row's name in the table."""
    if loader == "augserve":
        return f"augserve serve --backend {config.backend} --device {config.worker_device}, {_count(config.workers, 'worker')}"
    if loader == "dataloader":
        return f"DataLoader + albumentations, {_count(config.loader_workers, 'worker')}"
    if loader == "dali":
        decoder = "mixed" if torch.device(config.device).type == "cuda" else "cpu"
        return f"DALI pipeline + DALIGenericIterator ({decoder} decoder, {_count(config.loader_threads, 'thread')})"
    return "model alone (one pre-made batch on the device)"


def _rows(config: TrainerBenchConfig, runs: dict, failures: dict, unavailable: dict, decoder: str) -> list[dict]:
    rows = []
    for loader in (*LOADERS, "synthetic"):
        loader_runs = runs.get(loader) or []
        workers = {"augserve": config.workers, "dataloader": config.loader_workers, "dali": config.loader_threads}.get(loader, 0)
        row = {
            "benchmark": "gpu-e2e", "loader": loader, "name": label(config, loader), "workers": workers,
            "images_per_s": median_of(loader_runs, "images_per_s", 1), "stall_pct": median_of(loader_runs, "stall_pct", 1),
            "first_batch_s": median_of(loader_runs, "first_batch_s", 3), "final_loss": median_of(loader_runs, "final_loss", 4),
            "runs": [{"images_per_s": round(r["images_per_s"], 1), "stall_pct": round(r["stall_pct"], 1)} for r in loader_runs],
        }  # fmt: skip
        notes = []
        if loader in unavailable:
            notes.append(f"unavailable: {unavailable[loader]}")
        if loader in failures:
            notes.append(f"failed: {failures[loader]}")
        if loader == "augserve":
            row["transport"] = _transport(loader_runs)
            if row["transport"]:
                notes.append(f"transport: {row['transport']}")
            if loader_runs:
                notes.append(f"JPEG decoded on {decoder}")
        row["note"] = "; ".join(notes)
        rows.append(row)
    synthetic = rows[-1]["images_per_s"]
    dataloader = rows[1]["images_per_s"]
    for row in rows:
        row["vs_synthetic"] = ratio(row["images_per_s"], synthetic)
        row["vs_dataloader"] = ratio(row["images_per_s"], dataloader)
    return rows


def json_rows(result: dict) -> list[dict]:
    return list(result["rows"])


def format_table(result: dict) -> str:
    folder = result["folder"]
    if folder["generated"]:
        where = f"{folder['images']} generated JPEG photos of 500×375, {folder['classes']} classes, {folder['bytes'] / 1e6:.0f} MB (written in {folder['written_s']} s)"
    else:
        where = f"{folder['images']} images of {folder['root']}, {folder['classes']} classes"
    layout = ", channels_last" if result["channels_last"] else ""
    lines = [
        f"gpu-e2e — {result['model']} ({result['precision']}{layout}) on {result['device']}, batch {result['batch_size']} of {result['input']}, "
        f"pipeline {result['pipeline']} ({', '.join(result['pipeline_ops'])})",
        f"{where}; host: {result['host_cores']} cores ({result['cpu']})",
        f"median of {result['rounds']} alternating runs of {result['steps']} timed steps (after {result['warmup_steps']} warm-up steps)",
        "",
        "| loader | images/s trained | data stall | × synthetic | × DataLoader | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['name']} | {shown(row['images_per_s'], '{:.0f}')} | {shown(row['stall_pct'], '{:.1f}%')} | {shown(row['vs_synthetic'], '{:.2f}')} | "
            f"{shown(row['vs_dataloader'], '{:.2f}')} | {row['note']} |"
        )
    lines += ["", "targets (the augserve row):"]
    for target in result["targets"]:
        verdict = {True: "pass", False: "FAIL", None: "not measured"}[target["pass"]]
        value = target["value"]
        text = "–" if value is None else (f"{value:.1f}%" if "stall" in target["target"] else f"{value:.2f}×")
        lines.append(f"- {target['target']}: {text} — {verdict}")
    if result["failed"]:
        lines += ["", f"failed: {', '.join(result['failed'])} (see the notes)"]
    return "\n".join(lines)


def plot(result: dict, path: str) -> str:
    from augserve.bench.plots import loader_comparison

    rows = [row for row in result["rows"] if row["images_per_s"] is not None]
    short = {"augserve": "augserve\n({workers} × {backend})", "dataloader": "DataLoader\n+ albumentations\n({workers} workers)", "dali": "DALI iterator\n({workers} threads)", "synthetic": "synthetic\n(no loader)"}
    labels = [short[row["loader"]].format(workers=row["workers"], backend=result["worker_backend"]) for row in rows]
    title = f"augserve bench gpu-e2e — {result['model']} ({result['precision']}) on {result['device']}, batch {result['batch_size']} of {result['input']}"
    return loader_comparison(path, labels, [row["images_per_s"] for row in rows], [row["stall_pct"] or 0.0 for row in rows], title)
