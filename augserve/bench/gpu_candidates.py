"""The rows of ``augserve bench gpu`` (:mod:`augserve.bench.gpu`): each a :class:`Candidate` that makes
one batch of :data:`GPU_CHAIN` per call — augserve's torch and DALI backends, DALI's own pipeline
(:mod:`augserve.bench.dali_chain`), kornia and torchvision v2 on a batch in memory; augserve's GPU
worker path, the same with host decoding, and DALI's own pipeline with its ``mixed`` decoder on a
folder of JPEG files. A library that is missing or cannot run here gives a row saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD

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


@dataclass
class Candidate:
    """One row: ``run(batch_index)`` makes one batch (None: the row cannot run here, ``note`` says why);
    ``finish()`` completes every batch begun, inside the timed block (DALI's, made one batch ahead)."""

    name: str
    run: Callable[[int], object] | None
    note: str
    finish: Callable[[], None] = lambda: None


def _unavailable(key: str, name: str, exc: Exception) -> tuple[str, Candidate]:
    return key, Candidate(name, None, f"unavailable: {type(exc).__name__}: {exc}".splitlines()[0][:300])


def _dali_candidate(name: str, note: str, build: Callable[[], object]) -> Candidate:
    """A DALI pipeline as ``pipe.run()`` drives it — each batch scheduled one ahead of the one taken —
    but with nothing left in flight at the end of a block: ``run()`` would leave its next batch running
    into the next candidate's block, and its first call schedules a whole prefetch queue."""
    pipe = build()
    pipe.schedule_run()  # the first call fills the prefetch queue: taken here, untimed
    while not pipe.empty():
        pipe.outputs()
    ahead = 0

    def run(index: int) -> None:
        nonlocal ahead
        pipe.schedule_run()
        ahead += 1
        if ahead > 1:
            pipe.outputs()
            ahead -= 1

    def finish() -> None:
        nonlocal ahead
        while ahead:
            pipe.outputs()
            ahead -= 1

    return Candidate(name, run, note, finish)


def memory_candidates(images_host: np.ndarray, device: str, threads: int) -> dict[str, Candidate]:
    """key -> Candidate of the in-memory table, every row on the same batch, already on ``device``."""
    import pipelines

    from . import dali_chain

    batch = images_host.shape[0]
    on_device = torch.from_numpy(images_host).to(device)  # N×H×W×C uint8
    found: dict[str, Candidate] = {}
    graph = ", a CUDA graph" if on_device.is_cuda else ""
    for key, sampling, where in (("torch", "device", f"on {device} (batched torch ops{graph})"), ("torch-host", "host", "on the host (numpy)")):
        pipe = pipelines.build(GPU_CHAIN, backend="torch", device=device, sampling=sampling)
        run = lambda i, pipe=pipe: pipe(on_device, seed=0, epoch=i + 10, sample_ids=range(batch))  # noqa: E731
        found[key] = Candidate(f"augserve torch, {sampling}-sampled", run, f"per-sample parameters sampled {where}, one fused resampling")
    name = "augserve dali backend"
    try:
        dali_pipe = pipelines.build(GPU_CHAIN, backend="dali", device=device)
        host_list = list(images_host)
        found["dali-backend"] = Candidate(name, lambda i: dali_pipe(host_list, seed=0, epoch=i + 10, sample_ids=range(batch)), "augserve's fused plans run by DALI; host uint8 in, uploaded by DALI")
    except Exception as exc:  # noqa: BLE001 - DALI missing or without CUDA support here: the row says so
        found.update([_unavailable("dali-backend", name, exc)])
    name = "DALI's own pipeline"
    try:
        found["dali"] = _dali_candidate(
            name, "DALI's random operators, the same ranges; random_resized_crop, one warp_affine, one color offset, crop_mirror_normalize",
            lambda: dali_chain.build(GPU_CHAIN, batch, device, threads, images=on_device if on_device.is_cuda else images_host),
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        found.update([_unavailable("dali", name, exc)])
    nchw = on_device.permute(0, 3, 1, 2)
    name = "kornia AugmentationSequential"
    try:
        import kornia.augmentation as K

        mean, std = torch.tensor(IMAGENET_MEAN, device=device), torch.tensor(IMAGENET_STD, device=device)
        augment = K.AugmentationSequential(
            K.RandomResizedCrop((224, 224)), K.RandomHorizontalFlip(), K.RandomAffine(degrees=15, shear=10, p=1.0), K.Normalize(mean, std)
        ).to(device)
        found["kornia"] = Candidate(name, lambda i: augment(nchw.float() / 255.0), "crop, flip, affine, normalize; no color ops")
    except Exception as exc:  # noqa: BLE001
        found.update([_unavailable("kornia", name, exc)])
    name = "torchvision v2, per-image loop"
    try:
        from torchvision.transforms import v2

        compose = v2.Compose([v2.RandomResizedCrop(224, antialias=False), v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=15, shear=10), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        found["torchvision"] = Candidate(name, lambda i: torch.stack([compose(image) for image in nchw]), "one draw per image, a Python loop over the batch; no color ops")
    except Exception as exc:  # noqa: BLE001
        found.update([_unavailable("torchvision", name, exc)])
    return found


def jpeg_candidates(root: str, batch: int, device: str, threads: int) -> dict[str, Candidate]:
    """key -> Candidate of the JPEG table: every row reads the files under ``root`` (an image folder)."""
    import pipelines
    from pipelines.normalize import normalize_images
    from pipelines.spec import PipelineSpec

    from ..batch import augment_batch
    from ..sources import SkipStats, open_dataset
    from ..sources.device_decoder import device_decoder
    from . import dali_chain

    source = open_dataset(root)
    spec = PipelineSpec.model_validate(GPU_CHAIN)
    count = len(source)
    found: dict[str, Candidate] = {}
    for key, decode_on_device in (("torch-jpeg", True), ("torch-jpeg-host", False)):
        pipe = pipelines.build(spec.without_normalize(), backend="torch", device=device)
        out = torch.empty((batch, *spec.ops[0].size, 3), dtype=torch.uint8, device=device)  # a worker's device slot

        def run(i: int, pipe=pipe, out=out, decode_on_device=decode_on_device):
            ids = [(i * batch + k) % count for k in range(batch)]
            images, _, _, _ = augment_batch(source, pipe, ids, seed=0, epoch=i + 10, on_error="skip", stats=SkipStats(), out=out, decode_on_device=decode_on_device)
            return normalize_images(images, spec.normalize)

        # run_decoding plans on the device only for the batched decode (one decode per image plans on the host)
        planned = f"planned {'on the device' if decode_on_device and pipe.sampling == 'device' else 'on the host'}"
        if decode_on_device:
            name, note = "augserve torch, nvImageCodec batch decode", f"a GPU worker's path: {planned}, only each plan's region decoded, the batch in one nvImageCodec call on {device}; normalized on the device"
            if device_decoder(device, source.channels, threads=torch.get_num_threads()) is None:  # the worker would decode on the host
                found[key] = Candidate(name, None, f"unavailable: nvImageCodec cannot decode on {device} here (its warning says why)")
                continue
        else:
            name, note = "augserve torch, host decode", f"{planned}; files decoded on the host one at a time (libjpeg-turbo regions), then augmented on {device} and normalized"
        found[key] = Candidate(name, run, note)
    name = "DALI's own pipeline, mixed decoder" if torch.device(device).type == "cuda" else "DALI's own pipeline, cpu decoder"
    try:
        found["dali-jpeg"] = _dali_candidate(
            name, "readers.file, decoders.image_random_crop (the crop's region only), resize, then the chain as in memory",
            lambda: dali_chain.build(GPU_CHAIN, batch, device, threads, files=source.paths),
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        found.update([_unavailable("dali-jpeg", name, exc)])
    return found
