"""The trainer process of ``augserve bench e2e``: consumes batches, touches each, prints one JSON line.

``python -m trainer.bench.e2e_trainer augserve --address A ...`` or ``... dataloader --source S ...``.
``--workload npz`` (the default): the ``alexnet`` preset on an ``.npz`` of decoded images;
``--workload photos``: ``PHOTO_SPEC`` on an ImageFolder of JPEG files (``--source`` is the folder).
Timing starts after a few warm-up batches; "first batch" is measured from attach / DataLoader creation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2
import numpy as np
import torch

import pipelines
from augserve.bench.photo_folder import PHOTO_SPEC
from pipelines.normalize import normalize_images

WARMUP = 3


class CompatDataset(torch.utils.data.Dataset):
    """The ``alexnet`` preset the ordinary way: an albumentations Compose per image, plus the AlexNet
    PCA offset as a numpy float add, then normalize and HWC→CHW. With ``ship_uint8`` the workers stop
    before normalize and return uint8 H×W×C (the trainer normalizes, as augserve's client does)."""

    def __init__(self, source: str, ship_uint8: bool = False) -> None:
        self.source = source
        self.ship_uint8 = ship_uint8
        self.images = None

    def __len__(self) -> int:
        with np.load(self.source) as data:
            return len(data["labels"])

    def _load(self):
        if self.images is None:
            import albumentations as A

            from pipelines.spec import IMAGENET_EIGVAL, IMAGENET_EIGVEC, IMAGENET_MEAN, IMAGENET_STD

            with np.load(self.source) as data:
                self.images, self.labels = data["images"], data["labels"]
            self.compose = A.Compose([A.SmallestMaxSize(max_size=256), A.RandomCrop(224, 224), A.HorizontalFlip(p=0.5)])
            self.normalize = A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
            self.eigval, self.eigvec = np.asarray(IMAGENET_EIGVAL), np.asarray(IMAGENET_EIGVEC)
            self.rng = np.random.default_rng()

    def __getitem__(self, index: int):
        self._load()
        image = self.compose(image=self.images[index])["image"]
        offset = self.eigvec @ (self.rng.normal(0.0, 0.1, 3) * self.eigval) * 255.0
        image = np.clip(image.astype(np.float32) + offset.astype(np.float32), 0, 255).astype(np.uint8)
        if self.ship_uint8:
            return torch.from_numpy(image), int(self.labels[index])
        image = self.normalize(image=image)["image"]
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), int(self.labels[index])


class PhotoFolderDataset(torch.utils.data.Dataset):
    """The photo workload (``PHOTO_SPEC``) as albumentations users write it: a full decode (``cv2.imread`` +
    ``cv2.cvtColor`` BGR→RGB) of each file, then ``Compose([RandomResizedCrop((224, 224)),
    HorizontalFlip(), Normalize(), ToTensorV2()])`` with default scale, ratio and ImageNet mean/std:
    float32 3×224×224. Files and labels are those augserve lists for the folder (its ImageFolder)."""

    def __init__(self, root: str) -> None:
        from augserve.sources.folder import ImageFolder

        folder = ImageFolder(root)
        self.paths, self.labels = folder.paths, folder.labels.tolist()
        self.compose = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        if self.compose is None:  # built in the worker process
            import albumentations as A
            from albumentations.pytorch import ToTensorV2

            self.compose = A.Compose([A.RandomResizedCrop(size=(224, 224)), A.HorizontalFlip(), A.Normalize(), ToTensorV2()])
        image = cv2.imread(self.paths[index], cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"OpenCV could not read {self.paths[index]}")
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        return self.compose(image=image)["image"], self.labels[index]


def _worker_init(_):
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def batches_from_photo_dataloader(args):
    cv2.setNumThreads(0)  # before forking workers (see README: fork + OpenCV thread pool deadlock)
    dataset = PhotoFolderDataset(args.source)
    # One long run of reshuffled epochs, as augserve streams them: a bench folder holds a few batches,
    # and a worker idling at every epoch's end (or restarting, without persistent workers) would cost
    # the baseline time that an ImageNet-sized epoch never shows.
    needed = (WARMUP + args.batches) * args.batch_size
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=needed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        worker_init_fn=_worker_init, drop_last=True, prefetch_factor=4,
    )  # fmt: skip
    yield from loader


def batches_from_dataloader(args):
    if args.workload == "photos":
        yield from batches_from_photo_dataloader(args)
        return
    cv2.setNumThreads(0)  # before forking workers (see README: fork + OpenCV thread pool deadlock)
    ship_uint8 = args.mode == "dataloader-uint8"
    loader = torch.utils.data.DataLoader(
        CompatDataset(args.source, ship_uint8), batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        worker_init_fn=_worker_init, drop_last=True, persistent_workers=False, prefetch_factor=4,
    )  # fmt: skip
    normalize = pipelines.load_preset("alexnet").normalize
    while True:
        for images, labels in loader:
            # The uint8 variant normalizes here, with the same function augserve's client uses.
            yield (normalize_images(images, normalize) if ship_uint8 else images), labels


def batches_from_augserve(args):
    from augserve import connect

    pipeline = PHOTO_SPEC if args.workload == "photos" else "alexnet"
    stream = connect(args.address, dataset="bench", pipeline=pipeline, batch_size=args.batch_size, seed=args.seed, epochs=1000, prefetch=8, timeout=30)
    try:
        for batch in stream:
            yield batch.images, batch.labels
    finally:
        stream.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["augserve", "dataloader", "dataloader-uint8"])
    parser.add_argument("--workload", choices=["npz", "photos"], default="npz")
    parser.add_argument("--address")
    parser.add_argument("--source")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.workload == "photos" and args.mode == "dataloader-uint8":
        parser.error("dataloader-uint8 exists for the npz workload only")
    try:
        result = measure(args)
    except ValueError as exc:
        # A file of the user's folder that cannot be read, re-raised here from a DataLoader worker with
        # the worker's traceback in its text: its last line is the message, and exit status 2 tells
        # the bench that this is the user's to fix.
        print(str(exc).strip().splitlines()[-1].removeprefix("ValueError: "), file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


def measure(args) -> dict:
    """Consume ``WARMUP + args.batches`` batches; returns the JSON line's fields."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    source = batches_from_augserve(args) if args.mode == "augserve" else batches_from_dataloader(args)
    checksum = 0.0
    first_batch = None
    timed_images, timed_start = 0, None
    for count, (images, labels) in enumerate(source):
        if images.dtype != torch.float32 or images.shape[1:] != (3, 224, 224):
            raise SystemExit(f"unexpected batch {images.dtype} {tuple(images.shape)}")
        checksum += float(images[0, 0, 0, 0]) + int(labels[0])  # touch the batch
        if first_batch is None:
            first_batch = time.perf_counter() - started
        if count + 1 == WARMUP:
            timed_start = time.perf_counter()
        elif count + 1 > WARMUP:
            timed_images += images.shape[0]
        if count + 1 >= WARMUP + args.batches:
            break
    elapsed = time.perf_counter() - timed_start
    source.close()
    return {"mode": args.mode, "images_per_s": timed_images / elapsed, "first_batch_s": first_batch, "images": timed_images, "checksum": checksum}


if __name__ == "__main__":
    main()
