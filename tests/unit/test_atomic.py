"""Crash-safe writes: the target holds the old bytes or the new ones, never a mixture; .prev fallback."""

import logging
import os

import pytest

from augserve import atomic
from augserve.atomic import atomic_write, atomic_write_bytes, load_with_fallback, previous_path


def read(path):
    with open(path, "rb") as handle:
        return handle.read()


def listing(folder):
    return sorted(os.listdir(folder))


def test_write_replaces_and_keeps_previous(tmp_path):
    target = tmp_path / "state.bin"
    atomic_write_bytes(target, b"one")
    assert read(target) == b"one" and listing(tmp_path) == ["state.bin"]
    atomic_write_bytes(target, b"two")
    assert read(target) == b"two" and read(previous_path(target)) == b"one"
    atomic_write_bytes(target, b"three")
    assert read(target) == b"three" and read(previous_path(target)) == b"two"
    assert listing(tmp_path) == ["state.bin", "state.bin.prev"]  # no temporary or link left behind


def test_keep_previous_false_leaves_no_prev(tmp_path):
    target = tmp_path / "cache.npz"
    atomic_write_bytes(target, b"a", keep_previous=False)
    atomic_write_bytes(target, b"b", keep_previous=False)
    assert read(target) == b"b" and listing(tmp_path) == ["cache.npz"]


def test_crash_mid_write_keeps_old_bytes_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "checkpoint.pt"
    atomic_write_bytes(target, b"good old bytes")
    atomic_write_bytes(target, b"older still")  # now there is a .prev too
    before = listing(tmp_path)

    def crash(handle):
        handle.write(b"half of the new")
        raise KeyboardInterrupt  # not even an Exception: cleanup must still happen

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert read(target) == b"older still" and read(previous_path(target)) == b"good old bytes"
    assert listing(tmp_path) == before


def test_crash_on_first_write_creates_nothing(tmp_path):
    def crash(handle):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "new.bin", crash)
    assert listing(tmp_path) == []


def test_failed_rename_leaves_target_and_removes_temporary(tmp_path, monkeypatch):
    target = tmp_path / "t.bin"
    atomic_write_bytes(target, b"old")

    def refuse(src, dst):
        raise PermissionError("read-only")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(PermissionError):
        atomic_write_bytes(target, b"new", keep_previous=False)
    monkeypatch.undo()
    assert read(target) == b"old" and listing(tmp_path) == ["t.bin"]


def test_without_hard_links_the_old_file_is_renamed_to_prev(tmp_path, monkeypatch):
    target = tmp_path / "t.bin"
    atomic_write_bytes(target, b"old")

    def no_links(src, dst):
        raise OSError("links not supported")

    monkeypatch.setattr(atomic.os, "link", no_links)
    atomic_write_bytes(target, b"new")
    assert read(target) == b"new" and read(previous_path(target)) == b"old"
    assert listing(tmp_path) == ["t.bin", "t.bin.prev"]


def test_permissions_of_the_replaced_file_are_kept(tmp_path):
    target = tmp_path / "t.bin"
    atomic_write_bytes(target, b"x")
    assert os.stat(target).st_mode & 0o777 == 0o644  # not mkstemp's 0600
    os.chmod(target, 0o640)
    atomic_write_bytes(target, b"y")
    assert os.stat(target).st_mode & 0o777 == 0o640


def strict_load(path):
    data = read(path)
    if not data.startswith(b"OK:"):
        raise RuntimeError(f"bad magic in {os.path.basename(path)}")
    return data[3:]


def test_load_prefers_newest(tmp_path):
    target = tmp_path / "s"
    atomic_write_bytes(target, b"OK:1")
    atomic_write_bytes(target, b"OK:2")
    assert load_with_fallback(target, strict_load) == b"2"


def test_corrupt_newest_falls_back_with_a_warning_naming_it(tmp_path, caplog):
    target = tmp_path / "s"
    atomic_write_bytes(target, b"OK:1")
    atomic_write_bytes(target, b"OK:2")
    target.write_bytes(b"OK"[:1])  # truncated behind our back
    with caplog.at_level(logging.WARNING, logger="augserve.atomic"):
        assert load_with_fallback(target, strict_load) == b"1"
    assert str(target) in caplog.text and "RuntimeError" in caplog.text and previous_path(target) in caplog.text


def test_missing_newest_falls_back(tmp_path):
    target = tmp_path / "s"
    atomic_write_bytes(target, b"OK:1")
    atomic_write_bytes(target, b"OK:2")
    os.unlink(target)  # what a crash leaves on a file system without hard links
    assert load_with_fallback(target, strict_load) == b"1"


def test_neither_loading_names_both_files(tmp_path):
    target = tmp_path / "s"
    atomic_write_bytes(target, b"junk")
    atomic_write_bytes(target, b"more junk")
    with pytest.raises(ValueError) as info:
        load_with_fallback(target, strict_load)
    message = str(info.value)
    assert str(target) in message and previous_path(target) in message and "\n" not in message


def test_no_prev_names_both_files(tmp_path):
    target = tmp_path / "s"
    target.write_bytes(b"junk")
    with pytest.raises(ValueError, match="no .*s.prev to fall back to"):
        load_with_fallback(target, strict_load)
