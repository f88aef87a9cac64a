"""``augserve bench gpu``: our torch and DALI GPU backends against kornia and torchvision v2 on the same
batch, plus the host-to-device copy path. Needs CUDA.

The batch: 256 uint8 RGB 256×256 images → 224×224 with random-resized-crop + flip + rotate ±15° + shear
±10° + PCA lighting + color shift + normalize (the chain of ../shared/ANCHORS.md; kornia's and
torchvision's sequences have no PCA lighting — they run the rest). Each candidate runs in interleaved
rounds, timed with ``torch.cuda.synchronize``; medians are reported.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

GPU_CHAIN = {
    "name": "gpu-chain",
    "ops": [
        {"op": "random_resized_crop", "size": 224},
        {"op": "mirror"},
        {"op": "rotate", "degrees": 15},
        {"op": "shear", "degrees": 10},
        {"op": "pca_color"},
        {"op": "color_shift", "limit": 20},
        {"op": "normalize", "dtype": "float16"},
    ],
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _timed(run, rounds: int, warmup: int = 2) -> list[float]:
    for i in range(warmup):
        run(-1 - i)
    torch.cuda.synchronize()
    times = []
    for i in range(rounds):
        start = time.perf_counter()
        run(i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def candidates(images_host: np.ndarray, device: str) -> dict:
    """name -> (function(round) that augments the batch, note). Missing libraries are reported, not fatal."""
    import pipelines

    batch = images_host.shape[0]
    gpu_uint8 = torch.from_numpy(images_host).to(device)  # N×H×W×C on the device
    found: dict = {}
    # Sampling "auto" (on the device where it can), then host sampling as every figure before device-side
    # sampling was measured: what it gains.
    for name, sampling in (("augserve torch (GPU, per-sample fused)", "auto"), ("augserve torch (GPU, host-sampled)", "host")):
        torch_pipe = pipelines.build(GPU_CHAIN, backend="torch", device=device, sampling=sampling)
        where = "on the device (batched torch ops, a CUDA graph)" if torch_pipe.sampling == "device" else "on the host (numpy)"
        found[name] = (lambda r, pipe=torch_pipe: pipe(gpu_uint8, seed=0, epoch=r + 10, sample_ids=range(batch)), f"input on GPU; per-sample params sampled {where}")
    try:
        dali_pipe = pipelines.build(GPU_CHAIN, backend="dali", device=device)
        host_list = [image for image in images_host]
        found["augserve dali (GPU)"] = (lambda r: dali_pipe(host_list, seed=0, epoch=r + 10, sample_ids=range(batch)), "host uint8 in, uploaded by DALI")
    except Exception as exc:  # DALI missing or without CUDA support here
        found["augserve dali (GPU)"] = (None, f"unavailable: {type(exc).__name__}: {exc}")
    try:
        import kornia.augmentation as K

        mean = torch.tensor(MEAN, device=device)
        std = torch.tensor(STD, device=device)
        augment = K.AugmentationSequential(
            K.RandomResizedCrop((224, 224)), K.RandomHorizontalFlip(), K.RandomAffine(degrees=15, shear=10, p=1.0), K.Normalize(mean, std)
        ).to(device)
        nchw = gpu_uint8.permute(0, 3, 1, 2)
        found["kornia AugmentationSequential"] = (lambda r: augment(nchw.float() / 255.0), "crop, flip, affine, normalize; no color")
    except Exception as exc:
        found["kornia AugmentationSequential"] = (None, f"unavailable: {type(exc).__name__}: {exc}")
    try:
        from torchvision.transforms import v2

        compose = v2.Compose([v2.RandomResizedCrop(224, antialias=False), v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=15, shear=10), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
        nchw = gpu_uint8.permute(0, 3, 1, 2)

        def torchvision_loop(r):
            return torch.stack([compose(image) for image in nchw])

        found["torchvision v2, per-image loop"] = (torchvision_loop, "one draw per image, Python loop on GPU tensors")
    except Exception as exc:
        found["torchvision v2, per-image loop"] = (None, f"unavailable: {type(exc).__name__}: {exc}")
    return found


def copy_bandwidth(device: str, rounds: int) -> dict:
    """GB/s of a 256×3×224×224 uint8 batch host→device, from pageable and from pinned memory."""
    pageable = torch.randint(0, 255, (256, 3, 224, 224), dtype=torch.uint8)
    pinned = pageable.pin_memory()
    results = {}
    for name, source in (("pageable", pageable), ("pinned", pinned)):
        times = _timed(lambda r, s=source: s.to(device, non_blocking=True), rounds)
        results[name] = round(pageable.numel() / statistics.median(times) / 1e9, 2)
    return results


def run_gpu_bench(device: str = "cuda:0", rounds: int = 10, batch: int = 256) -> dict:
    if not torch.cuda.is_available():
        raise ValueError("bench gpu needs a CUDA device; none is available on this machine")
    from .pipeline_throughput import make_inputs

    torch.backends.cudnn.benchmark = True
    images = make_inputs(batch)
    rows = []
    for name, (run, note) in candidates(images, device).items():
        if run is None:
            rows.append({"benchmark": "gpu", "name": name, "images_per_s": None, "note": note})
            continue
        times = _timed(run, rounds)
        rows.append({"benchmark": "gpu", "name": name, "images_per_s": round(batch / statistics.median(times), 1), "note": note})
    kornia = next((r["images_per_s"] for r in rows if r["name"].startswith("kornia") and r["images_per_s"]), None)
    for row in rows:
        row["vs_kornia"] = round(row["images_per_s"] / kornia, 2) if kornia and row["images_per_s"] else None
    return {
        "benchmark": "gpu",
        "device": torch.cuda.get_device_name(device),
        "batch": f"{batch} × 256×256×3 uint8 → 224×224",
        "rounds": rounds,
        "rows": rows,
        "h2d_gb_per_s": copy_bandwidth(device, rounds),
    }


def plot(result: dict, path: str) -> str:
    """Bar chart of images/s per implementation (log scale) to ``path``."""
    from .plots import grouped_barh

    rows = [r for r in result["rows"] if r["images_per_s"]]
    panel = {
        "title": f"{result['batch']} on {result['device']}",
        "groups": [r["name"] for r in rows],
        "series": ["images/s"],
        "values": {(r["name"], "images/s"): r["images_per_s"] for r in rows},
    }
    return grouped_barh(path, [panel], "augserve bench gpu")


def format_table(result: dict) -> str:
    lines = [f"GPU benchmark on {result['device']} — {result['batch']}, median of {result['rounds']} rounds", "", "| implementation | images/s | × kornia | note |", "|---|---:|---:|---|"]
    for row in result["rows"]:
        rate = f"{row['images_per_s']:.0f}" if row["images_per_s"] else "–"
        ratio = f"{row['vs_kornia']:.2f}" if row.get("vs_kornia") else "–"
        lines.append(f"| {row['name']} | {rate} | {ratio} | {row['note']} |")
    copy = result["h2d_gb_per_s"]
    lines += ["", f"host→device copy of a 38.5 MB uint8 batch: pageable {copy['pageable']} GB/s, pinned {copy['pinned']} GB/s"]
    return "\n".join(lines)
