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
channel count. Listing happens at construction; decoding never does. Only regular files are
listed (a FIFO or device named ``x.jpg`` would block or never end when read). ``max_pixels`` caps
height × width of every image (default ``base.DEFAULT_MAX_PIXELS``); see ``decode.read_encoded``.
``load_encoded`` reads and checks a file without decoding it, and ``decode`` then decodes all of it
or only the part an augmentation keeps (``decode.decode_encoded``).

The dataset is confined to ``root``: symbolic links (to files or folders, at any depth, including
``train/`` and the class folders) are followed only when their real path stays inside the real
path of ``root``. A link leading outside refuses the whole dataset with one error that counts
them and names one: a service that opens folders named by its clients must not read files
elsewhere, and silently dropping samples would change the dataset (and for a class folder, the
label ids) behind the operator's back. ``root`` itself may be a link. To serve a folder of links
into shared storage, open the storage folder itself or bind-mount it under the root.
Each real folder is listed at most once per class, so a link loop cannot make listing endless.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import SPLITS, Source, check_max_pixels, check_split
from .decode import EncodedImage, Placement, decode_encoded, read_encoded

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class _Confinement:
    """Checks symbolic links against the real path of the dataset root and counts the escapes."""

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        self.escapes = 0
        self.example: tuple[str, str] | None = None

    def allows(self, path: str | os.PathLike, is_link: bool) -> bool:
        """Whether ``path`` may be used; only links are resolved (a plain entry of a folder that is
        inside the root is inside it too)."""
        if not is_link:
            return True
        real = os.path.realpath(path)
        try:
            inside = os.path.commonpath([self.root, real]) == self.root
        except ValueError:  # different drives on Windows
            inside = False
        if not inside:
            self.escapes += 1
            if self.example is None:
                self.example = (os.fspath(path), real)
        return inside

    def check(self, dataset: str) -> None:
        if self.escapes:
            link, target = self.example  # type: ignore[misc]
            raise ValueError(
                f"image folder {dataset} has {self.escapes} symbolic link(s) leading outside it, e.g. "
                f"{link} -> {target}; a dataset is confined to its root: open the linked folder itself instead"
            )


def _subdirs(path: Path, confinement: _Confinement) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(
            e.name
            for e in entries
            if not e.name.startswith(".") and e.is_dir() and confinement.allows(e.path, e.is_symlink())
        )


def _image_files(class_dir: Path, confinement: _Confinement) -> list[str]:
    """Image files below ``class_dir``, sorted; folders are visited depth-first in name order so
    that which of two links to one folder is listed does not depend on the file system's order."""
    found: list[str] = []
    seen: set[tuple[int, int]] = set()  # (device, inode) of the folders listed: link loops end here
    pending = [os.fspath(class_dir)]
    while pending:
        folder = pending.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
            subfolders = []
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    if confinement.allows(e.path, e.is_symlink()):
                        subfolders.append(e.path)
                elif e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                    if confinement.allows(e.path, e.is_symlink()):
                        found.append(e.path)
            pending.extend(reversed(subfolders))
        except OSError:  # an unreadable or vanished folder lists nothing, as with os.walk
            continue
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

    def __init__(
        self, root: str | os.PathLike, split: str = "train", *, channels: int = 3, max_pixels: int | None = None
    ) -> None:
        if isinstance(channels, bool) or channels not in (1, 3):
            raise ValueError(f"ImageFolder option channels must be 1 or 3, got {channels!r}")
        cap = check_max_pixels(max_pixels)
        path = Path(root)
        if not path.is_dir():
            raise ValueError(f"image folder does not exist or is not a directory: {os.fspath(root)}")
        dirs = split_dirs(path)
        if split not in dirs and split in SPLITS:
            raise ValueError(
                f"image folder {os.fspath(root)} has no {split!r} split: it needs train/ and val/ "
                "(or test/) sub-folders; without them every image is in the 'train' split"
            )
        options: dict[str, int] = {"channels": channels}
        if max_pixels is not None:  # only when given, so the options of a default dataset stay as they were
            options["max_pixels"] = cap
        super().__init__(os.fspath(root), check_split(split, tuple(dirs), os.fspath(root)), options)
        self._channels = channels
        self._max_pixels = cap

        confinement = _Confinement(path)
        for d in {dirs["train"], dirs[split]}:
            confinement.allows(d, d.is_symlink())
        self._classes = _subdirs(dirs["train"], confinement)
        confinement.check(os.fspath(root))
        if not self._classes:
            raise ValueError(f"image folder {dirs['train']} has no class sub-folders")
        split_dir = dirs[split]
        if split != "train":
            extra = sorted(set(_subdirs(split_dir, confinement)) - set(self._classes))
            confinement.check(os.fspath(root))
            if extra:
                raise ValueError(f"image folder {split_dir} has classes missing from {dirs['train']}: {', '.join(extra)}")

        paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(self._classes):
            class_dir = split_dir / name
            files = _image_files(class_dir, confinement) if class_dir.is_dir() else []
            paths.extend(files)
            labels.extend([label] * len(files))
        confinement.check(os.fspath(root))
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
        return self.decode(self._load_encoded(index))[0]

    def _load_encoded(self, index: int) -> EncodedImage:
        return read_encoded(self.paths[index], self._max_pixels)

    def decode(
        self, encoded: EncodedImage, box: tuple[float, float, float, float] | None = None, max_factor: int = 1
    ) -> tuple[np.ndarray, Placement]:
        """``decode_encoded(encoded, self.channels, box, max_factor)``; see ``Source.decode``."""
        return decode_encoded(encoded, self._channels, box, max_factor)
