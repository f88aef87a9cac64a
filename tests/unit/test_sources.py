"""Unit tests for augserve.sources: built-in datasets, ImageFolder, .npz, corrupt-file handling."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import struct
import threading
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from augserve.sources import (
    CorruptImageError,
    ImageFolder,
    SkipStats,
    Source,
    builtin_names,
    iter_images,
    open_dataset,
    register_builtin,
)
from augserve.sources import decode
from augserve.sources.base import DEFAULT_MAX_PIXELS


def assert_image(image: np.ndarray, channels: int) -> None:
    assert isinstance(image, np.ndarray)
    assert image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == channels
    assert image.flags.c_contiguous


# --------------------------------------------------------------------------- registry

def test_builtin_names():
    assert builtin_names() == ["digits", "photos", "shapes"]


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="'digits' is already registered"):
        register_builtin("digits")(lambda split="train": None)
    assert builtin_names() == ["digits", "photos", "shapes"]


@pytest.mark.parametrize("name", builtin_names())
def test_every_builtin_honours_the_source_contract(name):
    src = open_dataset(name)
    assert isinstance(src, Source)
    info = src.describe()
    assert info["name"] == name and info["split"] == "train"
    assert info["size"] == len(src) == len(src.labels) > 0
    assert info["num_classes"] == len(src.classes)
    assert src.labels.dtype == np.int64
    assert 0 <= src.labels.min() and src.labels.max() < len(src.classes)
    for i in (0, len(src) - 1):
        image = src.load(i)
        assert_image(image, info["channels"])
        if info["image_size"] is not None:
            assert image.shape[:2] == tuple(info["image_size"])
    # The caller owns the returned array: writing to it must not change the dataset.
    image = src.load(0)
    before = image.copy()
    image[...] = 7
    np.testing.assert_array_equal(src.load(0), before)
    # Workers re-open a source from (name, split, options); pickling follows the same path.
    again = pickle.loads(pickle.dumps(src))
    assert type(again) is type(src) and again.options == src.options
    np.testing.assert_array_equal(again.load(0), before)


def test_load_index_validation():
    src = open_dataset("shapes", n=10)
    with pytest.raises(IndexError, match="10"):
        src.load(10)
    with pytest.raises(IndexError, match="-1"):
        src.load(-1)
    with pytest.raises(TypeError, match="1.5"):
        src.load(1.5)
    assert_image(src.load(np.int64(3)), 3)


# --------------------------------------------------------------------------- digits

def test_digits_sizes_and_split():
    train, test = open_dataset("digits", split="train"), open_dataset("digits", split="test")
    assert len(train) + len(test) == 1797
    assert train.classes == test.classes == [str(d) for d in range(10)]
    assert train.describe()["image_size"] == (32, 32) and train.channels == 1
    assert not set(train.indices.tolist()) & set(test.indices.tolist())
    assert sorted(train.indices.tolist() + test.indices.tolist()) == list(range(1797))
    # Stratified 20 % per class: counts straight from scikit-learn's labels.
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target, minlength=10)
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), np.rint(0.2 * counts))
    image = train.load(0)
    assert image.shape == (32, 32, 1) and image.dtype == np.uint8
    assert image.min() == 0 and image.max() > 200  # 0..16 scaled to the full 0..255 range


def test_digits_split_is_fixed():
    # The split must never change between runs, machines or library versions: pin it.
    test = open_dataset("digits", split="test")
    digest = hashlib.sha256(",".join(map(str, test.indices.tolist())).encode()).hexdigest()
    assert digest == "bc5e78140d93267e2f8735bf33ad6ae935f9909cc0ecc9f8178acddb1dd59048"
    other = open_dataset("digits", split="test")
    np.testing.assert_array_equal(other.labels, test.labels)
    for i in (0, 100, len(test) - 1):
        assert other.load(i).tobytes() == test.load(i).tobytes()


def test_digits_takes_no_options():
    with pytest.raises(TypeError, match="does not accept option"):
        open_dataset("digits", size=28)


# --------------------------------------------------------------------------- shapes

def test_shapes_is_deterministic():
    a, b = open_dataset("shapes", seed=1), open_dataset("shapes", seed=1)
    for i in (0, 5, 1999):
        assert a.load(i).tobytes() == b.load(i).tobytes()
    np.testing.assert_array_equal(a.labels, b.labels)


def test_shapes_differ_by_seed_split_and_index():
    a = open_dataset("shapes", seed=1)
    assert a.load(0).tobytes() != open_dataset("shapes", seed=2).load(0).tobytes()
    assert a.load(0).tobytes() != open_dataset("shapes", split="test", seed=1).load(0).tobytes()
    assert a.load(0).tobytes() != a.load(1).tobytes()


def test_shapes_labels_and_options():
    train = open_dataset("shapes", size=32, n=600, seed=0)
    assert len(train) == 600 and train.describe()["image_size"] == (32, 32)
    assert_image(train.load(599), 3)
    assert train.load(0).shape == (32, 32, 3)
    counts = np.bincount(train.labels, minlength=len(train.classes))
    assert len(train.classes) == 6 and (counts == 100).all()  # balanced, every class present
    assert len(open_dataset("shapes", split="test")) == 500
    assert len(open_dataset("shapes")) == 2000
    # Image (and label) i depends on (seed, split, i, size), not on n.
    small = open_dataset("shapes", size=32, n=10, seed=0)
    np.testing.assert_array_equal(small.labels, train.labels[:10])
    assert small.load(9).tobytes() == train.load(9).tobytes()


@pytest.mark.parametrize(
    "options, error, word",
    [
        ({"size": 8}, ValueError, "size"),
        ({"size": "64"}, TypeError, "size"),
        ({"n": 0}, ValueError, "n"),
        ({"seed": -1}, ValueError, "seed"),
        ({"color": 1}, TypeError, "color"),
    ],
)
def test_shapes_option_errors(options, error, word):
    with pytest.raises(error, match=word):
        open_dataset("shapes", **options)


# --------------------------------------------------------------------------- photos

def test_photos():
    src = open_dataset("photos")
    assert src.classes[:3] == ["astronaut", "chelsea", "coffee"]
    assert "cat" not in src.classes  # same pixels as chelsea
    np.testing.assert_array_equal(src.labels, np.arange(len(src)))
    assert src.describe()["image_size"] is None
    for i in range(len(src)):
        assert_image(src.load(i), 3)
    assert src.load(0).shape == (512, 512, 3)
    with pytest.raises(ValueError, match="no 'test' split"):
        open_dataset("photos", split="test")


# --------------------------------------------------------------------------- ImageFolder

def write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix if path.suffix.lower() != ".jpeg" else ".jpg", image)
    assert ok
    encoded.tofile(path)  # tofile, not imwrite: works for any characters in the path
    return path


def solid(bgr, h=12, w=16) -> np.ndarray:
    return np.full((h, w, 3), bgr, dtype=np.uint8)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write(root / "zebra" / "z1.png", solid((0, 0, 255)))  # red in BGR
    write(root / "zebra" / "nested" / "z2.JPG", solid((0, 255, 0)))
    write(root / "ant" / "a1.jpeg", solid((255, 0, 0)))
    write(root / "ant" / "grey.png", np.full((12, 16), 90, np.uint8))
    write(root / "moose" / "m1.bmp", solid((10, 20, 30)))
    write(root / "moose" / "élan ü.png", solid((40, 50, 60)))
    (root / "moose" / "notes.txt").write_text("not an image")
    write(root / "moose" / ".hidden.png", solid((1, 1, 1)))
    return root


def test_image_folder_labels_and_decoding(folder: Path):
    src = open_dataset(folder)
    assert isinstance(src, ImageFolder)
    assert src.classes == ["ant", "moose", "zebra"]
    assert len(src) == 6
    names = [Path(p).name for p in src.paths]
    assert names == ["a1.jpeg", "grey.png", "m1.bmp", "élan ü.png", "z2.JPG", "z1.png"]
    np.testing.assert_array_equal(src.labels, [0, 0, 1, 1, 2, 2])
    for i in range(len(src)):
        assert_image(src.load(i), 3)
    assert src.load(5)[0, 0].tolist() == [255, 0, 0]  # BGR file -> RGB array
    assert src.load(1)[0, 0].tolist() == [90, 90, 90]  # grey file -> 3 equal channels
    assert src.load(2).shape == (12, 16, 3)
    assert src.describe() == {
        "name": str(folder), "split": "train", "size": 6, "num_classes": 3, "channels": 3, "image_size": None,
    }
    grey = open_dataset(str(folder), channels=1)
    assert_image(grey.load(1), 1)
    assert grey.load(1)[0, 0, 0] == 90
    again = pickle.loads(pickle.dumps(grey))
    assert again.options == {"channels": 1} and again.paths == grey.paths


def test_image_folder_split_layout(tmp_path: Path):
    write(tmp_path / "train" / "b" / "1.png", solid((0, 0, 0)))
    write(tmp_path / "train" / "a" / "1.png", solid((0, 0, 0)))
    write(tmp_path / "val" / "b" / "2.png", solid((0, 0, 0)))
    train, test = open_dataset(tmp_path), open_dataset(tmp_path, split="test")
    assert train.classes == test.classes == ["a", "b"]
    assert len(train) == 2 and len(test) == 1
    np.testing.assert_array_equal(test.labels, [1])  # "b" keeps the id it has in train/
    write(tmp_path / "val" / "c" / "3.png", solid((0, 0, 0)))
    with pytest.raises(ValueError, match="missing from"):
        open_dataset(tmp_path, split="test")


def test_image_folder_errors(tmp_path: Path, folder: Path):
    with pytest.raises(ValueError, match="has no 'test' split"):
        open_dataset(folder, split="test")
    with pytest.raises(ValueError, match="has no 'val' split of its own: it is a hold-out carved from train"):
        open_dataset(folder, split="val")
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        open_dataset(folder, channels=4)
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolder(missing)
    with pytest.raises(ValueError, match="no such file or folder"):
        open_dataset(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}.*no class sub-folders"):
        open_dataset(empty)
    (empty / "cls").mkdir()
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="contains no"):
        open_dataset(empty)


@pytest.fixture
def corrupt_folder(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "bad"
    rng = np.random.default_rng(0)
    good = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
    write(root / "a" / "0_good.jpg", good)
    (root / "a" / "1_random.jpg").write_bytes(rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
    write(root / "a" / "2_good.png", good)
    jpeg = cv2.imencode(".jpg", good)[1].tobytes()
    (root / "b" / "3_half.jpg").parent.mkdir(parents=True)
    (root / "b" / "3_half.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    # Only the end-of-image marker missing: some libjpeg builds decode this without an error.
    (root / "b" / "4_no_eoi.jpg").write_bytes(jpeg[:-2])
    (root / "b" / "5_empty.png").write_bytes(b"")
    png = cv2.imencode(".png", good)[1].tobytes()
    (root / "b" / "6_cut.png").write_bytes(png[: len(png) - 20])
    write(root / "b" / "7_good.bmp", good)
    bad = [str(root / "a" / "1_random.jpg")] + [str(root / "b" / n) for n in ("3_half.jpg", "4_no_eoi.jpg", "5_empty.png", "6_cut.png")]
    return root, bad


def test_corrupt_files_raise_naming_the_path(corrupt_folder):
    root, bad = corrupt_folder
    src = open_dataset(root)
    assert len(src) == 8  # listing never decodes
    for i, path in enumerate(src.paths):
        if path in bad:
            with pytest.raises(CorruptImageError) as info:
                src.load(i)
            assert info.value.path == path
            assert str(info.value).startswith(f"corrupt or unreadable image: {path} (")
            assert isinstance(info.value, ValueError)
        else:
            assert_image(src.load(i), 3)


def test_iter_images_skip_counts_and_logs(corrupt_folder, caplog):
    root, bad = corrupt_folder
    src = open_dataset(root)
    stats = SkipStats()
    with caplog.at_level(logging.WARNING, logger="augserve.sources"):
        items = list(iter_images(src, range(len(src)), on_error="skip", stats=stats))
    assert [i for i, _, _ in items] == [0, 2, 7]
    assert [label for _, _, label in items] == [0, 0, 1]
    for _, image, _ in items:
        assert_image(image, 3)
    assert stats.skipped == 5 and stats.paths == bad
    for path in bad:
        assert any(path in record.getMessage() for record in caplog.records)
    # Without stats it still skips; with a cap the count stays exact.
    assert len(list(iter_images(src))) == 3
    capped = SkipStats(max_paths=2)
    list(iter_images(src, stats=capped))
    assert capped.skipped == 5 and capped.paths == bad[:2]


def test_iter_images_raise(corrupt_folder):
    root, bad = corrupt_folder
    src = open_dataset(root)
    items = iter_images(src, [0, 1, 2], on_error="raise")
    assert next(items)[0] == 0
    with pytest.raises(CorruptImageError) as info:
        next(items)
    assert info.value.path == bad[0]


def test_iter_images_argument_errors():
    src = open_dataset("shapes", n=6)
    with pytest.raises(ValueError, match="on_error"):
        iter_images(src, on_error="ignore")  # raised at call time, not on first next()
    with pytest.raises(TypeError, match="stats"):
        iter_images(src, stats={})
    assert [i for i, _, _ in iter_images(src, [4, 1])] == [4, 1]
    assert [label for _, _, label in iter_images(src)] == src.labels.tolist()


def test_corrupt_image_error_pickles():
    err = pickle.loads(pickle.dumps(CorruptImageError("/x/y.jpg", "bad header")))
    assert err.path == "/x/y.jpg" and str(err) == "corrupt or unreadable image: /x/y.jpg (bad header)"


# --------------------------------------------------------------------------- .npz

def test_npz_round_trip(tmp_path: Path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    labels = np.array([0, 2, 1, 2, 0], dtype=np.int32)
    path = tmp_path / "set.npz"
    np.savez(path, images=images, labels=labels)
    src = open_dataset(path)
    assert len(src) == 5 and src.classes == ["0", "1", "2"]
    assert src.labels.dtype == np.int64 and src.labels.tolist() == labels.tolist()
    assert src.describe() == {
        "name": str(path), "split": "train", "size": 5, "num_classes": 3, "channels": 3, "image_size": (6, 7),
    }
    for i in range(5):
        assert_image(src.load(i), 3)
        np.testing.assert_array_equal(src.load(i), images[i])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(src)).load(4), images[4])
    with pytest.raises(ValueError, match="no 'test' split"):
        open_dataset(path, split="test")


def test_npz_grey_test_split_and_classes(tmp_path: Path):
    path = tmp_path / "grey.npz"
    grey = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    np.savez_compressed(
        path, images=grey, labels=np.array([0, 1, 0, 1]), images_test=grey[:2], labels_test=np.array([1, 1]),
        classes=np.array(["no", "yes"]),
    )
    train, test = open_dataset(str(path)), open_dataset(str(path), split="test")
    assert train.classes == test.classes == ["no", "yes"]
    assert train.channels == 1 and train.load(3).shape == (5, 6, 1)
    np.testing.assert_array_equal(train.load(3)[..., 0], grey[3])
    assert len(test) == 2 and test.labels.tolist() == [1, 1]


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"images": np.zeros((2, 4, 4, 3), np.float32), "labels": [0, 1]}, "'images' must have dtype uint8"),
        ({"images": np.zeros((2, 4, 4, 2), np.uint8), "labels": [0, 1]}, "'images' must have shape"),
        ({"images": np.zeros((2, 4), np.uint8), "labels": [0, 1]}, "'images' must have shape"),
        ({"images": np.zeros((0, 4, 4), np.uint8), "labels": np.zeros(0, int)}, "'images' is empty"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": [0, 1, 1]}, "'labels' must have shape \\(2,\\)"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": [0.0, 1.0]}, "'labels' must have an integer dtype"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": [0, -1]}, "'labels' has negative label"),
        ({"images": np.zeros((2, 4, 4), np.uint8)}, "missing field 'labels'"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": [0, 3], "classes": ["a", "b"]}, "'classes' has 2 names"),
        (
            {"images": np.zeros((2, 4, 4), np.uint8), "labels": [0, 1],
             "images_test": np.zeros((1, 4, 4), np.int16), "labels_test": [0]},
            "'images_test' must have dtype uint8",
        ),
    ],
)
def test_npz_validation_errors(tmp_path: Path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    with pytest.raises(ValueError, match=match) as info:
        open_dataset(path)
    assert str(path) in str(info.value)


def test_npz_unreadable(tmp_path: Path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match=f"cannot read .npz file {path}"):
        open_dataset(path)
    objects = tmp_path / "objects.npz"
    np.savez(objects, images=np.zeros((1, 2, 2), np.uint8), labels=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=f"{objects}: cannot read field 'labels'"):
        open_dataset(objects)


# --------------------------------------------------------------------------- open_dataset

def test_unknown_dataset_message(tmp_path: Path):
    with pytest.raises(ValueError) as info:
        open_dataset("imagenet")
    assert str(info.value) == (
        "unknown dataset 'imagenet': expected one of digits, photos, shapes, "
        "a folder of class sub-folders, or a .npz file"
    )
    other = tmp_path / "file.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="unknown dataset"):
        open_dataset(other)
    with pytest.raises(TypeError, match="name or a path"):
        open_dataset(3)
    with pytest.raises(ValueError, match="split must be one of train, val, test, got 'validation'"):
        open_dataset("digits", split="validation")


def test_complete_files_with_trailing_bytes_still_decode(tmp_path: Path):
    # The truncation check must not reject complete files that carry data after their end marker.
    image = solid((0, 0, 255))
    for suffix in (".jpg", ".png"):
        path = tmp_path / "cls" / f"trailing{suffix}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(cv2.imencode(suffix, image)[1].tobytes() + b"\x00" * 100)
    src = open_dataset(tmp_path)
    for i in range(len(src)):
        assert_image(src.load(i), 3)


def test_a_file_that_grows_while_it_is_read_is_read_whole_or_refused_past_the_limit(tmp_path: Path, monkeypatch):
    """The read is sized by fstat; a file longer than fstat said (written meanwhile) is read on, as far
    as the limit allows."""
    path = tmp_path / "growing.jpg"
    content = cv2.imencode(".jpg", solid((0, 0, 255)))[1].tobytes()
    path.write_bytes(content)
    real_fstat = os.fstat

    def stale_fstat(fd):  # the size before the last 100 bytes were written
        info = real_fstat(fd)
        return os.stat_result((info.st_mode, *info[1:6], info.st_size - 100, *info[7:]))

    monkeypatch.setattr(decode.os, "fstat", stale_fstat)
    assert decode._read_file(path, len(content)) == content
    with pytest.raises(CorruptImageError, match=f"file grew past {len(content) - 1} bytes while it was read"):
        decode._read_file(path, len(content) - 1)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"\xff\xd9", b"\xff\xda", b"\xff", b"\xd9", b"\xda", b"\x00", b"\xff\x00", b"ab"]), max_size=12))
def test_truncation_is_an_end_of_image_after_the_last_start_of_scan(pieces):
    """The check searches from the end marker onwards only; its verdict is the definition's:
    complete when the last end-of-image marker lies after the last start-of-scan."""
    raw = decode.JPEG_MAGIC + b"".join(pieces)
    complete = raw.rfind(b"\xff\xd9") > raw.rfind(b"\xff\xda")
    assert (decode._truncation(raw) is None) == complete


# --------------------------------------------------------------------------- .npz memory-mapping and limits

@pytest.fixture
def count_zip_reads(monkeypatch) -> list[int]:
    """Bytes read through zipfile members (how np.load reads an .npz), summed in a one-item list."""
    total = [0]
    original = zipfile.ZipExtFile.read

    def counting(self, n=-1):
        data = original(self, n)
        total[0] += len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting)
    return total


def test_npz_stored_array_is_memory_mapped_not_read(tmp_path: Path, count_zip_reads):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (120, 256, 256, 3), dtype=np.uint8)  # 23.6 MB
    labels = rng.integers(0, 10, 120)
    path = tmp_path / "big.npz"
    np.savez(path, images=images, labels=labels, images_test=images[:3], labels_test=labels[:3])
    count_zip_reads[0] = 0
    src = open_dataset(path)
    for i in (0, 77, 119):
        np.testing.assert_array_equal(src.load(i), images[i])
    assert type(src.load(5)) is np.ndarray and src.load(5).flags.writeable  # a copy, not a view of the file
    test = open_dataset(path, split="test")
    np.testing.assert_array_equal(test.load(2), images[2])
    # Labels and headers only: far less than one percent of the 23.6 MB of pixels.
    assert count_zip_reads[0] < 64 * 1024
    assert src.labels.tolist() == labels.tolist()


def test_npz_fortran_order_and_grey(tmp_path: Path):
    rng = np.random.default_rng(2)
    images = np.asfortranarray(rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8))
    grey = rng.integers(0, 256, (4, 3, 2), dtype=np.uint8)
    np.savez(tmp_path / "f.npz", images=images, labels=np.zeros(6, np.int8))
    np.savez(tmp_path / "g.npz", images=grey, labels=np.arange(4))
    color, mono = open_dataset(tmp_path / "f.npz"), open_dataset(tmp_path / "g.npz")
    for i in range(6):
        assert_image(color.load(i), 3)
        np.testing.assert_array_equal(color.load(i), images[i])
    assert_image(mono.load(3), 1)
    np.testing.assert_array_equal(mono.load(3)[..., 0], grey[3])


def test_npz_compressed_is_loaded_when_small_and_refused_when_large(tmp_path: Path):
    images = np.arange(10 * 8 * 8, dtype=np.uint8).reshape(10, 8, 8)
    path = tmp_path / "small.npz"
    np.savez_compressed(path, images=images, labels=np.arange(10))
    np.testing.assert_array_equal(open_dataset(path).load(9)[..., 0], images[9])
    with pytest.raises(ValueError) as info:
        open_dataset(path, max_load_bytes=639)
    message = str(info.value)
    assert message.startswith(f"{path}: field 'images' is compressed") and "\n" not in message
    assert "640 bytes" in message and "max_load_bytes=639" in message and "np.savez " in message
    src = open_dataset(path, max_load_bytes=640)
    again = pickle.loads(pickle.dumps(src))
    assert again.options == {"max_load_bytes": 640}
    np.testing.assert_array_equal(again.load(0)[..., 0], images[0])
    # A stored archive is never limited by max_load_bytes: it is mapped, not loaded.
    np.savez(tmp_path / "stored.npz", images=images, labels=np.arange(10))
    assert len(open_dataset(tmp_path / "stored.npz", max_load_bytes=0)) == 10
    with pytest.raises(ValueError, match="max_load_bytes must be >= 0"):
        open_dataset(path, max_load_bytes=-1)


def test_npz_max_pixels(tmp_path: Path):
    path = tmp_path / "wide.npz"
    np.savez(path, images=np.zeros((2, 10, 30), np.uint8), labels=[0, 1])
    assert open_dataset(path).options == {}
    with pytest.raises(ValueError) as info:
        open_dataset(path, max_pixels=299)
    assert str(info.value) == f"{path}: field 'images' holds 30×10 images (300 pixels), over max_pixels=299"
    src = open_dataset(path, max_pixels=300)
    assert src.options == {"max_pixels": 300}
    assert pickle.loads(pickle.dumps(src)).options == {"max_pixels": 300}
    # The test split is checked at open too, even when the train split is the one opened.
    np.savez(path, images=np.zeros((2, 4, 4), np.uint8), labels=[0, 1],
             images_test=np.zeros((1, 40, 40), np.uint8), labels_test=[0])
    with pytest.raises(ValueError, match="'images_test' holds 40×40 images"):
        open_dataset(path, max_pixels=1000)
    with pytest.raises(ValueError, match="max_pixels must be at least 1, got 0"):
        open_dataset(path, max_pixels=0)
    with pytest.raises(TypeError, match="max_pixels must be an integer"):
        open_dataset(path, max_pixels="many")


def test_npz_default_pixel_cap_needs_no_pixels(tmp_path: Path):
    # Headers announcing 60000×60000 images are refused from the header alone; the members hold
    # no such data. A compressed member's size is only known once inflated, so the cap decides.
    header = {"descr": "|u1", "fortran_order": False, "shape": (1, 60000, 60000)}
    for compression in (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED):
        path = tmp_path / f"hostile{compression}.npz"
        with zipfile.ZipFile(path, "w", compression=compression) as archive:
            with archive.open("images.npy", "w") as f:
                np.lib.format.write_array_header_1_0(f, header)
            with archive.open("labels.npy", "w") as f:
                np.lib.format.write_array(f, np.zeros(1, np.int64))
        with pytest.raises(ValueError) as info:
            open_dataset(path)
        if compression == zipfile.ZIP_DEFLATED:
            assert str(info.value) == (
                f"{path}: field 'images' holds 60000×60000 images (3600000000 pixels), over max_pixels={DEFAULT_MAX_PIXELS}"
            )
        else:  # a stored member must hold exactly what its header describes
            assert str(info.value).startswith(f"{path}: cannot read field 'images': member holds 128 bytes")


def test_npz_damaged_files_give_one_line_naming_the_file(tmp_path: Path):
    images = np.random.default_rng(3).integers(0, 256, (50, 16, 16, 3), dtype=np.uint8)
    good = tmp_path / "good.npz"
    np.savez(good, images=images, labels=np.arange(50))
    raw = good.read_bytes()

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(raw[: len(raw) // 2])
    damaged = tmp_path / "damaged.npz"  # local header of the first member overwritten
    damaged.write_bytes(b"XXXX" + raw[4:])
    for path in (truncated, damaged):
        with pytest.raises(ValueError) as info:
            open_dataset(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert "damaged" in str(pytest.raises(ValueError, open_dataset, damaged).value)

    # A member whose size disagrees with its header (bytes cut from the middle, directory intact).
    short = tmp_path / "short.npz"
    with zipfile.ZipFile(short, "w") as archive:
        archive.writestr("images.npy", _npy_bytes(images)[:-100])
        archive.writestr("labels.npy", _npy_bytes(np.arange(50)))
    with pytest.raises(ValueError, match=f"{short}: cannot read field 'images': member holds"):
        open_dataset(short)

    # Compressed data damaged after the headers: found on the first load, still naming the file.
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, images=images, labels=np.arange(50))
    data = bytearray(compressed.read_bytes())
    data[1000:1100] = bytes(100)
    compressed.write_bytes(bytes(data))
    src = open_dataset(compressed)
    with pytest.raises(ValueError) as info:
        src.load(0)
    assert str(compressed) in str(info.value) and "\n" not in str(info.value)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_npz_rewritten_while_served_is_detected(tmp_path: Path):
    path = tmp_path / "set.npz"
    images = np.ones((20, 8, 8), np.uint8)
    np.savez(path, images=images, labels=np.arange(20))
    src = open_dataset(path)
    src.load(19)
    np.savez(path, images=images[:2], labels=np.arange(2))  # truncates the mapped file in place
    with pytest.raises(ValueError, match="changed since the dataset was opened"):
        src.load(19)


# --------------------------------------------------------------------------- pixel cap before decoding

def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg_header(width: int, height: int) -> bytes:
    # SOI, an APP1 segment whose payload contains a fake SOF marker, SOF0, SOS, a little data, EOI.
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 8) + b"Exif\xff\xc0\x00\x01"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app1 + sof0 + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x12\x34" + b"\xff\xd9"


def _bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, -height, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


@pytest.mark.parametrize("make", [_png_header, _jpeg_header, _bmp_header], ids=["png", "jpeg", "bmp"])
def test_oversized_header_is_refused_before_decoding(tmp_path: Path, monkeypatch, make):
    def never(*args, **kwargs):
        raise AssertionError("decoded an image over the pixel cap")

    monkeypatch.setattr(decode.cv2, "imdecode", never)
    path = tmp_path / "cls" / "huge.img.png"
    path.parent.mkdir()
    path.write_bytes(make(60000, 60000))
    src = open_dataset(tmp_path)
    with pytest.raises(CorruptImageError) as info:
        src.load(0)
    assert info.value.path == str(path)
    assert str(info.value) == (
        f"corrupt or unreadable image: {path} "
        f"(60000×60000 image (3600000000 pixels) exceeds max_pixels={DEFAULT_MAX_PIXELS})"
    )
    assert [s for _, _, s in iter_images(src)] == []  # skipped like any corrupt file


@pytest.mark.parametrize("suffix, params", [
    (".jpg", []), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), (".png", []), (".bmp", []),
])
def test_header_sizes_of_real_files(suffix, params):
    for image in (solid((1, 2, 3), h=37, w=53), np.full((21, 9), 7, np.uint8)):
        raw = cv2.imencode(suffix, image, params)[1].tobytes()
        assert decode.image_size(raw) == image.shape[:2]
    assert decode.image_size(_jpeg_header(300, 200)) == (200, 300)  # not fooled by FF C0 inside APP1
    assert decode.image_size(_bmp_header(5, 4)) == (4, 5)  # top-down BMP: negative height


def test_max_pixels_option_of_image_folder(tmp_path: Path):
    write(tmp_path / "a" / "wide.png", solid((0, 0, 0), h=10, w=30))
    default = open_dataset(tmp_path)
    assert default.options == {"channels": 3}
    assert default.load(0).shape == (10, 30, 3)
    capped = open_dataset(tmp_path, max_pixels=299)
    assert capped.options == {"channels": 3, "max_pixels": 299}
    with pytest.raises(CorruptImageError, match="30×10 image \\(300 pixels\\) exceeds max_pixels=299"):
        capped.load(0)
    with pytest.raises(CorruptImageError, match="exceeds max_pixels=299"):
        pickle.loads(pickle.dumps(capped)).load(0)
    assert open_dataset(tmp_path, max_pixels=300).load(0).shape == (10, 30, 3)
    with pytest.raises(ValueError, match="max_pixels must be at least 1"):
        open_dataset(tmp_path, max_pixels=-5)
    with pytest.raises(TypeError, match="max_pixels must be an integer"):
        open_dataset(tmp_path, max_pixels=True)


def test_only_jpeg_png_bmp_content_is_decoded(tmp_path: Path):
    # OpenCV would decode a TIFF whatever its name, and its size would go unchecked.
    path = tmp_path / "c" / "really.png"
    path.parent.mkdir()
    path.write_bytes(cv2.imencode(".tiff", solid((1, 2, 3)))[1].tobytes())
    with pytest.raises(CorruptImageError, match="not a JPEG, PNG or BMP file"):
        open_dataset(tmp_path).load(0)


def test_file_too_large_for_the_cap_is_not_read(tmp_path: Path):
    path = tmp_path / "padded.png"
    path.write_bytes(_png_header(1, 1) + bytes(2 << 20))
    with pytest.raises(CorruptImageError, match="too large"):
        decode.read_image(path, max_pixels=1)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_named_like_an_image_never_blocks(tmp_path: Path):
    write(tmp_path / "a" / "ok.png", solid((0, 0, 0)))
    os.mkfifo(tmp_path / "a" / "pipe.jpg")
    src = open_dataset(tmp_path)
    assert [Path(p).name for p in src.paths] == ["ok.png"]  # listing skips what is not a regular file
    errors = []
    reader = threading.Thread(target=lambda: errors.append(pytest.raises(CorruptImageError, decode.read_image, tmp_path / "a" / "pipe.jpg")), daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "read_image blocked on a FIFO"
    assert "not a regular file" in str(errors[0].value)


# --------------------------------------------------------------------------- ImageFolder confined to its root

@pytest.fixture
def outside(tmp_path: Path) -> Path:
    other = tmp_path / "elsewhere"
    write(other / "secret.png", solid((9, 9, 9)))
    write(other / "cls" / "x.png", solid((9, 9, 9)))
    return other


def test_symlinks_inside_the_root_are_followed(tmp_path: Path):
    root = tmp_path / "data"
    write(root / "a" / "real" / "1.png", solid((0, 0, 0)))
    write(root / "b" / "2.png", solid((0, 0, 0)))
    (root / "a" / "link.png").symlink_to(root / "b" / "2.png")
    (root / "b" / "more").symlink_to(Path("..") / "a" / "real", target_is_directory=True)  # relative
    (root / "a" / "real" / "loop").symlink_to(root / "a", target_is_directory=True)  # a cycle
    src = open_dataset(root)
    names = [os.path.relpath(p, root) for p in src.paths]
    # Each real folder is listed once per class: a/real/loop leads back to a/ and stops there,
    # while from b/ the same loop reaches a/ once.
    assert names == ["a/link.png", "a/real/1.png", "b/2.png", "b/more/1.png", "b/more/loop/link.png"]
    assert src.labels.tolist() == [0, 0, 1, 1, 1]
    for i in range(len(src)):
        assert_image(src.load(i), 3)
    alias = tmp_path / "alias"  # the root itself may be a link
    alias.symlink_to(root, target_is_directory=True)
    assert len(open_dataset(alias)) == 5


@pytest.mark.parametrize("where", ["file", "folder", "class", "split"])
def test_symlinks_leading_outside_refuse_the_dataset(tmp_path: Path, outside: Path, where):
    root = tmp_path / "data"
    write(root / "train" / "a" / "1.png", solid((0, 0, 0)))
    write(root / "val" / "a" / "2.png", solid((0, 0, 0)))
    if where == "file":
        link, target = root / "train" / "a" / "stolen.png", outside / "secret.png"
    elif where == "folder":
        link, target = root / "train" / "a" / "deep", outside
    elif where == "class":
        link, target = root / "train" / "b", outside / "cls"
    else:
        (root / "train" / "a" / "1.png").unlink()
        (root / "train" / "a").rmdir()
        (root / "train").rmdir()
        link, target = root / "train", outside
    link.symlink_to(target, target_is_directory=target.is_dir())
    with pytest.raises(ValueError) as info:
        open_dataset(root)
    message = str(info.value)
    assert message.startswith(f"image folder {root} has 1 symbolic link(s) leading outside it, e.g. {link} -> {target}")
    assert "\n" not in message
    if where in ("file", "folder"):
        assert len(open_dataset(root, split="test")) == 1  # the links are not in the test split
    else:  # classes and the split folders come from train/ whichever split is opened
        with pytest.raises(ValueError, match="leading outside it"):
            open_dataset(root, split="test")


def test_outside_links_are_counted(tmp_path: Path, outside: Path):
    root = tmp_path / "data"
    write(root / "a" / "1.png", solid((0, 0, 0)))
    for i in range(3):
        (root / "a" / f"s{i}.png").symlink_to(outside / "secret.png")
    (root / "a" / "notes.txt").symlink_to(outside / "secret.png")  # never listed, so not counted
    with pytest.raises(ValueError, match=f"has 3 symbolic link\\(s\\) leading outside it, e.g. {root / 'a' / 's0.png'} ->"):
        open_dataset(root)
