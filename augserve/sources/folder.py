"""ImageFolder: a directory of class sub-folders holding JPEG/PNG/BMP files.

Layout, either flat (every file is in the "train" split)::

    root/cat/001.jpg  root/dog/a.png ...

or split (used when ``root/train`` exists next to ``root/val`` or ``root/test``; "test" reads
``test/`` when present, else ``val/``)::

    root/train/cat/001.jpg ...  root/val/cat/101.jpg ...

Class names are the sorted sub-folder names (of ``train/`` in the split layout, so label ids agree
between splits); label ``k`` is ``classes[k]``. Files are found recursively below each class folder
and listed in sorted order; names starting with "." are ignored. Images are decoded by ``load`` as
uint8 HWC with ``channels`` = 3 (RGB; grey files replicated) or 1 (grey), so one dataset has one
channel count. Listing happens at construction; decoding never does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import SPLITS, Source, check_split
from .decode import read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def _subdirs(path: Path) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _image_files(class_dir: Path) -> list[str]:
    found = []
    for parent, dirs, files in os.walk(class_dir, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(
            os.path.join(parent, f)
            for f in files
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return sorted(found)


def split_dirs(root: Path) -> dict[str, Path]:
    """Map split name -> folder of class sub-folders for ``root`` (see the module docstring)."""
    train, val, test = root / "train", root / "val", root / "test"
    if train.is_dir() and (test.is_dir() or val.is_dir()):
        return {"train": train, "test": test if test.is_dir() else val}
    return {"train": root}


class ImageFolder(Source):
    """Images in class sub-folders; see the module docstring.

    ``name`` is ``root`` as given, so ``open_dataset(src.name, src.split, **src.options)`` re-opens it.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, channels: int = 3) -> None:
        if isinstance(channels, bool) or channels not in (1, 3):
            raise ValueError(f"ImageFolder option channels must be 1 or 3, got {channels!r}")
        path = Path(root)
        if not path.is_dir():
            raise ValueError(f"image folder does not exist or is not a directory: {os.fspath(root)}")
        dirs = split_dirs(path)
        if split not in dirs and split in SPLITS:
            raise ValueError(
                f"image folder {os.fspath(root)} has no {split!r} split: it needs train/ and val/ "
                "(or test/) sub-folders; without them every image is in the 'train' split"
            )
        super().__init__(os.fspath(root), check_split(split, tuple(dirs), os.fspath(root)), {"channels": channels})
        self._channels = channels

        self._classes = _subdirs(dirs["train"])
        if not self._classes:
            raise ValueError(f"image folder {dirs['train']} has no class sub-folders")
        split_dir = dirs[split]
        if split != "train":
            extra = sorted(set(_subdirs(split_dir)) - set(self._classes))
            if extra:
                raise ValueError(f"image folder {split_dir} has classes missing from {dirs['train']}: {', '.join(extra)}")

        paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(self._classes):
            class_dir = split_dir / name
            files = _image_files(class_dir) if class_dir.is_dir() else []
            paths.extend(files)
            labels.extend([label] * len(files))
        if not paths:
            raise ValueError(
                f"image folder {split_dir} contains no {'/'.join(IMAGE_EXTENSIONS)} files in its class sub-folders"
            )
        self.paths = paths
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    @property
    def labels(self) -> np.ndarray:
        return self._labels.copy()

    @property
    def channels(self) -> int:
        return self._channels

    def _load(self, index: int) -> np.ndarray:
        return read_image(self.paths[index], self._channels)
