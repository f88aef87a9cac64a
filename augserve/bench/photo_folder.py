"""The photo workload of ``augserve bench e2e --photos``: its spec, and a folder of JPEG photos
generated from scikit-image's photos.

``PHOTO_SPEC``: random-resized-crop to 224² (default scale and aspect ranges), horizontal mirror,
normalize (ImageNet mean/std) to float32 NCHW; the trainer's ``PhotoFolderDataset`` is its
albumentations equivalent.

Layout ``root/<class>/<n>.jpg`` (an ImageFolder, see ``augserve.sources.folder``), one class per
source photo (``astronaut``, ``chelsea``, ``coffee``, ``rocket``). By default images alternate between
the two sizes of ``SIZES`` (width × height: 500×375, a small web photo, and 1600×1200, a 2-megapixel
camera frame), so half of them are each; ``sizes`` gives other sizes (``WEB_SIZE`` alone: every image
500×375, the ImageNet-like folder of ``augserve bench gpu-e2e``). Every image is a random 4:3 box of
its photo covering 60–100% of its width, resized, mirrored half the time, jittered in contrast and
brightness, given a light sensor-like grain (σ ``GRAIN`` grey levels, so that upscaled photos carry
the fine detail, and the JPEG the entropy-coded bulk, of a real camera frame) and written with ``cv2.imencode`` at ``quality``.
Nothing is downloaded: the photos are inside the scikit-image wheel. The same ``seed`` writes the
same bytes.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from ..sources.photos import PHOTOS, PhotosSource

PHOTO_SPEC = {"ops": [{"op": "random_resized_crop", "size": 224}, {"op": "mirror"}, {"op": "normalize"}]}
PHOTO_PIPELINE = "random-resized-crop 224 + mirror + normalize (JPEG files → 224² float32 NCHW)"

CLASSES = ("astronaut", "chelsea", "coffee", "rocket")
SIZES = ((500, 375), (1600, 1200))  # (width, height) in pixels
WEB_SIZE = ((500, 375),)  # one size: about an ImageNet photo's
GRAIN = 5.0  # standard deviation of the added noise, in grey levels (0-255)


def _jittered(photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random 4:3 box of ``photo`` (RGB uint8 HWC) resized to ``size`` (width, height), jittered."""
    height, width = photo.shape[:2]
    box_w = min(width, int(height * 4 / 3))
    box_w = int(box_w * rng.uniform(0.6, 1.0))
    box_h = int(box_w * 3 / 4)
    top = int(rng.integers(0, height - box_h + 1))
    left = int(rng.integers(0, width - box_w + 1))
    box = photo[top : top + box_h, left : left + box_w]
    interpolation = cv2.INTER_AREA if size[0] < box_w else cv2.INTER_CUBIC
    image = cv2.resize(box, size, interpolation=interpolation).astype(np.float32)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    image = image * rng.uniform(0.8, 1.2) + rng.uniform(-20.0, 20.0)
    image += rng.normal(0.0, GRAIN, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_photo_folder(root: str | os.PathLike, count: int, seed: int = 0, quality: int = 90, sizes: tuple[tuple[int, int], ...] = SIZES) -> dict:
    """Write ``count`` JPEG photos under ``root`` (created if needed), taking turns through ``sizes``
    ((width, height) pairs in pixels); returns a description:
    ``{"root", "images", "classes", "sizes": {"500×375": n, ...}, "bytes", "quality", "generated": True}``."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if not sizes or any(len(size) != 2 or not all(isinstance(side, int) and 1 <= side <= 8192 for side in size) for size in sizes):
        raise ValueError(f"sizes must be (width, height) pairs of 1..8192 pixels, got {sizes!r}")
    photos = PhotosSource()
    rng = np.random.default_rng(seed)
    written = {f"{w}×{h}": 0 for w, h in sizes}
    total_bytes = 0
    for index in range(count):
        name = CLASSES[index % len(CLASSES)]
        size = sizes[(index // len(CLASSES)) % len(sizes)]  # every class gets every size
        image = _jittered(photos.load(PHOTOS.index(name)), size, rng)
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode a {size[0]}×{size[1]} JPEG")
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{index:05d}.jpg"), "wb") as handle:
            handle.write(encoded.tobytes())
        written[f"{size[0]}×{size[1]}"] += 1
        total_bytes += encoded.size
    return {"root": os.fspath(root), "images": count, "classes": len(set(CLASSES[i % len(CLASSES)] for i in range(count))), "sizes": written, "bytes": total_bytes, "quality": quality, "generated": True}


def describe_folder(root: str | os.PathLike) -> dict:
    """``{"root" (absolute), "images", "classes", "generated": False}`` for a user's image folder;
    raises augserve's one-line ValueError when ``root`` is missing or not an ImageFolder."""
    from ..sources.folder import ImageFolder

    folder = ImageFolder(os.path.abspath(root))
    return {"root": folder.name, "images": len(folder), "classes": len(folder.classes), "generated": False}
