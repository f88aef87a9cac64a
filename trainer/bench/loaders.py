"""The batch sources of the trainer benchmarks, each an endless iterator of ``(images, labels)`` pairs.

Every source applies the same spec, :func:`bench_spec` (a preset, optionally with its crop resized), to
the same training split, and yields ``images`` float (the spec's ``normalize`` dtype, N×C×H×W) and
``labels`` int64 (N,):

* :func:`augserve_batches`: ``augserve.connect(..., ordered=False)`` to a running daemon; the workers
  ship uint8 and the client normalizes on the trainer's device (a CUDA device: pinned copy, then there).
  The transport that batches came by (shared memory or frames) is counted into a ``facts`` dict.
* :func:`dataloader_batches`: ``torch.utils.data.DataLoader`` over :class:`OrdinaryDataset` (the spec's
  ordinary ``albumentations.Compose``, normalize included, in the workers), pinned for a CUDA trainer.
* :func:`dali_batches`: DALI's own pipeline of the spec and ``DALIGenericIterator``, as DALI's ResNet-50
  example writes it (:func:`augserve.bench.dali_chain.build`, the graph ``bench gpu`` holds us against):
  ``readers.file`` over the folder's files, ``decoders.image_random_crop`` (the ``mixed`` nvJPEG decoder
  on a CUDA device, the CPU decoder otherwise; the crop is decoded, not the whole file), ``resize`` to
  the crop size (bilinear, no antialias: the resampling our backends do), then the spec's other ops
  with DALI's random operators (the resnet preset's PCA lighting included) and ``crop_mirror_normalize``
  (flip, the spec's mean/std, CHW). Specs that start with ``random_resized_crop`` (resnet, inception,
  mobilenet); DALI's random streams, so the same work with other bytes.
* :func:`synthetic_batches`: one real augmented batch made up front, placed on the trainer's device
  once and repeated: the model's own speed with no loader.
"""

from __future__ import annotations

import math
import os

import torch

import pipelines
from pipelines.spec import PipelineSpec, RandomResizedCrop

SERVED_NAME = "bench"  # a dataset given by path is served under this name


def bench_spec(pipeline: str, crop_size: int | None = None) -> PipelineSpec:
    """Preset ``pipeline``, with its ``random_resized_crop`` to ``crop_size``² when given (a smaller
    input for a quick check on a CPU); ValueError when the preset has no such op."""
    spec = pipelines.load_preset(pipeline)
    if crop_size is None:
        return spec
    if not any(isinstance(op, RandomResizedCrop) for op in spec.ops):
        raise ValueError(f"--crop-size resizes a random_resized_crop, and pipeline {pipeline} has none")
    ops = [op.model_copy(update={"size": (crop_size, crop_size)}) if isinstance(op, RandomResizedCrop) else op for op in spec.ops]
    return PipelineSpec.model_validate({**spec.to_dict(), "ops": [op.model_dump(mode="json") for op in ops]})


def _builtin(dataset: str) -> bool:
    from augserve.config import BUILTIN_DATASETS

    return dataset in BUILTIN_DATASETS


def dataset_name(dataset: str) -> str:
    """What a daemon started by a benchmark serves ``dataset`` as: its built-in name, or ``SERVED_NAME``."""
    return dataset if _builtin(dataset) else SERVED_NAME


def served_datasets(dataset: str) -> dict[str, str]:
    """The ``--dataset NAME=PATH`` mapping a benchmark's daemon needs for ``dataset`` (none for a built-in)."""
    return {} if _builtin(dataset) else {SERVED_NAME: os.path.abspath(dataset)}


class OrdinaryDataset(torch.utils.data.Dataset):
    """The source with the spec's ordinary albumentations Compose applied per image (in the workers).

    ``spec``: a spec dict (see :func:`bench_spec`). Items: the image as the Compose returns it (float32
    C×H×W with a trailing NCHW ``normalize``, cast to its dtype) and the label as an int.
    """

    def __init__(self, dataset: str, options: dict, spec: dict) -> None:
        from augserve.sources import open_dataset

        from augserve.bench.pipeline_throughput import OrdinaryPipeline

        self.source = open_dataset(dataset, split="train", **options)
        self.labels = self.source.labels
        size = self.source.image_size
        self.transform = OrdinaryPipeline(spec, image_side=min(size) if size else None)
        normalize = self.transform.spec.normalize
        self.dtype = normalize.dtype if normalize is not None else None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image = torch.from_numpy(self.transform(self.source.load(index)))
        if self.dtype not in (None, "float32"):
            image = image.to(getattr(torch, self.dtype))
        return image, int(self.labels[index])


def _worker_init(_):
    import cv2

    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def forever(loader):
    """An epoch-by-epoch iterable (a DataLoader, a DALI iterator with ``auto_reset``) as one endless stream."""
    while True:
        yield from loader


def dataloader_batches(dataset: str, options: dict, spec: dict, batch_size: int, workers: int, seed: int, pin_memory: bool = False, samples: int | None = None):
    """``samples``: draw that many samples as one DataLoader epoch (reshuffled passes over the source,
    ``RandomSampler(num_samples=...)``), as ``bench e2e`` does: a small folder's epoch of a few batches
    would otherwise end every few steps, and each end drains the workers' prefetch and idles the
    workers beyond its batch count — a cost an ImageNet-sized epoch never shows. None: plain epochs."""
    # The class from the imported module, not from ``__main__``: picklable by reference for any start method.
    from trainer.bench.loaders import OrdinaryDataset as Dataset

    source = Dataset(dataset, options, spec)
    generator = torch.Generator().manual_seed(seed)
    order = {"shuffle": True} if samples is None else {"sampler": torch.utils.data.RandomSampler(source, num_samples=samples, generator=generator)}
    loader = torch.utils.data.DataLoader(
        source, batch_size=batch_size, drop_last=True, **order,
        num_workers=workers, persistent_workers=workers > 0, prefetch_factor=max(2, math.ceil(8 / workers)) if workers > 0 else None,
        worker_init_fn=_worker_init, generator=generator, pin_memory=pin_memory,
    )  # fmt: skip
    return forever(loader)


def augserve_batches(address: str, dataset: str, options: dict, pipeline, batch_size: int, seed: int, device: str = "cpu", facts: dict | None = None):
    """``pipeline``: a preset name or a spec dict. ``facts["transport"]`` gets the count of batches
    received each way (``{"shm": n, "frames": m}``) when the stream closes."""
    from augserve import connect

    stream = connect(address, dataset=dataset_name(dataset), pipeline=pipeline, batch_size=batch_size, seed=seed, epochs=1000, prefetch=8, ordered=False, drop_last=True, dataset_options=options, device=device, timeout=30)
    try:
        for batch in stream:
            yield batch.images, batch.labels
    finally:
        if facts is not None:
            facts["transport"] = dict(stream.batches_by_transport)
        stream.close()


def synthetic_batches(dataset: str, options: dict, spec: dict, batch_size: int, seed: int, place=lambda images: images):
    """One real augmented batch, made up front, given to ``place`` once (e.g. moved to the trainer's
    device in its memory format), and repeated: the model's speed with no loader."""
    source = OrdinaryDataset(dataset, options, spec)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(source), generator=generator)[:batch_size].tolist()
    items = [source[i] for i in picks]
    images, labels = place(torch.stack([image for image, _ in items])), torch.tensor([label for _, label in items])
    while True:
        yield images, labels


def folder_files(dataset: str, options: dict) -> tuple[list[str], list[int]]:
    """The files and labels of an image folder's training split, as augserve lists them (so DALI reads
    exactly what the other loaders read); ValueError for a source that is not a folder of files."""
    from augserve.sources import open_dataset

    source = open_dataset(dataset, split="train", **options)
    paths = getattr(source, "paths", None)
    if paths is None:
        raise ValueError(f"the dali loader reads image files, and {source.name} is not a folder of them (or has a hold-out)")
    return list(paths), [int(label) for label in source.labels]


def dali_batches(dataset: str, options: dict, spec: dict, batch_size: int, threads: int, seed: int, device: str = "cpu"):
    """DALI's own pipeline of ``spec`` on the folder's files (see the module docstring). ``device``:
    ``cpu`` (CPU decoder, no GPU needed) or ``cuda[:k]`` (mixed decoder, outputs on that GPU).
    ValueError (one line) for a spec DALI's own pipeline cannot express (:func:`augserve.bench.dali_chain.check_chain`)."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    from augserve.bench import dali_chain

    spec = PipelineSpec.model_validate(spec)
    dali_chain.check_chain(spec)  # before listing the files: a refused spec costs nothing
    files, labels = folder_files(dataset, options)
    pipe = dali_chain.build(spec, batch_size, device, threads, seed=seed, files=files, labels=labels)
    iterator = DALIGenericIterator([pipe], ["images", "labels"], reader_name="Reader", last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
    for outputs in forever(iterator):
        out = outputs[0]
        yield out["images"], out["labels"].view(-1).long()
