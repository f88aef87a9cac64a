"""``augserve bench pipelines``: images/s per core of our backends against albumentations used the
ordinary way, on identical 256×256 uint8 inputs cut to 224×224.

The compared chain is the AlexNet-style chain of ../shared/ANCHORS.md: horizontal flip, random resized
crop, rotation ±15°, shear ±10°, AlexNet PCA lighting and an RGB shift. The baseline is an
``albumentations.Compose`` (HorizontalFlip, RandomResizedCrop, Affine(rotate, shear), RGBShift) applied
image by image, plus the AlexNet PCA offset as a plain numpy float add — each op its own pass over the
pixels. Ours samples per-sample parameters and runs one fused resampling plus one colour pass.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2
import numpy as np
import torch

import pipelines
from pipelines.spec import IMAGENET_EIGVAL, IMAGENET_EIGVEC

from .timing import interleaved

BENCH_CHAIN = {
    "name": "alexnet-chain",
    "ops": [
        {"op": "mirror", "horizontal": 0.5},
        {"op": "random_resized_crop", "size": 224, "scale": [0.08, 1.0]},
        {"op": "rotate", "degrees": 15},
        {"op": "shear", "degrees": 10},
        {"op": "pca_color", "alpha_std": 0.1},
        {"op": "color_shift", "limit": 20},
    ],
}


def make_inputs(count: int, size: int = 256) -> np.ndarray:
    """``count`` RGB uint8 ``size``² images of the built-in ``shapes`` dataset (textured, real content)."""
    from augserve.sources import open_dataset

    source = open_dataset("shapes", size=size, n=count)
    return np.stack([source.load(i) for i in range(count)])


def albumentations_baseline():
    """The ordinary Compose and the AlexNet PCA offset as a numpy float add, one image at a time."""
    import albumentations as A

    compose = A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.RandomResizedCrop(size=(224, 224), scale=(0.08, 1.0)),
            A.Affine(rotate=(-15, 15), shear=(-10, 10), p=1.0),
            A.RGBShift(r_shift_limit=20, g_shift_limit=20, b_shift_limit=20, p=1.0),
        ]
    )
    eigval, eigvec = np.asarray(IMAGENET_EIGVAL), np.asarray(IMAGENET_EIGVEC)
    rng = np.random.default_rng(0)

    def run(images: np.ndarray) -> int:
        for image in images:
            out = compose(image=image)["image"]
            offset = eigvec @ (rng.normal(0.0, 0.1, 3) * eigval) * 255.0
            np.clip(out.astype(np.float32) + offset.astype(np.float32), 0, 255).astype(np.uint8)
        return len(images)

    return run


def ours(backend: str, spec, threads: int):
    if backend == "dali":
        os.environ["AUGSERVE_DALI_THREADS"] = str(threads)
    pipe = pipelines.build(spec, backend=backend)

    def run(images: np.ndarray, round_index: int) -> int:
        out = pipe(images, seed=0, epoch=round_index + 1000, sample_ids=range(len(images)))
        return len(out)

    return run


def run_benchmark(images: int = 64, rounds: int = 5, threads: int = 1, backends: list[str] | None = None, progress=None) -> dict:
    """Measure and return ``{"rows": [...], "ratio": ..., ...}``; every row is images/s per process."""
    cv2.setNumThreads(threads if threads > 1 else 0)  # 0: OpenCV runs on the calling thread only
    torch.set_num_threads(threads)
    inputs = make_inputs(images)
    backends = backends or pipelines.BACKENDS.names()
    alexnet = pipelines.load_preset("alexnet").without_normalize()
    candidates = {"albumentations Compose (baseline)": (lambda baseline: lambda r: baseline(inputs))(albumentations_baseline())}
    for backend in backends:
        for label, spec in (("alexnet-chain", BENCH_CHAIN), ("alexnet preset", alexnet)):
            run = ours(backend, spec, threads)
            candidates[f"augserve {backend}: {label}"] = (lambda run: lambda r: run(inputs, r))(run)
    results = interleaved(candidates, rounds=rounds)
    baseline = results["albumentations Compose (baseline)"]["images_per_s"]
    rows = []
    for name, result in results.items():
        rows.append({"name": name, "images_per_s": round(result["images_per_s"], 1), "vs_baseline": round(result["images_per_s"] / baseline, 2)})
    fused = results["augserve albumentations: alexnet-chain"]["images_per_s"] if "albumentations" in backends else None
    return {
        "benchmark": "pipelines",
        "input": f"{images} × 256×256×3 uint8 → 224×224",
        "threads": threads,
        "rounds": rounds,
        "cpu": _cpu_name(),
        "rows": rows,
        "ratio_fused_cpu_vs_compose": round(fused / baseline, 2) if fused else None,
        "target_ratio": 1.5,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def format_table(result: dict) -> str:
    lines = [
        f"pipelines benchmark — {result['input']}, {result['threads']} thread(s) per process, median of {result['rounds']} interleaved rounds",
        f"CPU: {result['cpu']}",
        "",
        f"| {'implementation':<46} | {'images/s':>9} | {'× baseline':>10} |",
        f"|{'-' * 48}|{'-' * 11}:|{'-' * 12}:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['name']:<46} | {row['images_per_s']:>9.0f} | {row['vs_baseline']:>10.2f} |")
    if result["ratio_fused_cpu_vs_compose"] is not None:
        lines.append("")
        lines.append(f"fused CPU path vs ordinary Compose: {result['ratio_fused_cpu_vs_compose']:.2f}× (target ≥ {result['target_ratio']}×)")
    return "\n".join(lines)
