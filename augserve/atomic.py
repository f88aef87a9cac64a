"""Crash-safe file writes: a reader finds the old file or the new one, never half of either.

:func:`atomic_write` writes a unique temporary file beside the target, flushes and fsyncs it, renames
it over the target (``os.replace`` is atomic on POSIX) and fsyncs the directory so the rename itself
survives a power cut. With ``keep_previous`` the file being replaced stays as ``<name>.prev`` — hard
linked before the rename, so the target exists at every instant — and :func:`load_with_fallback`
reads that copy when the newest one does not load (a disk that lied about fsync, a file truncated by
hand, a write that bypassed this module).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import BinaryIO, Callable, TypeVar

log = logging.getLogger("augserve.atomic")

T = TypeVar("T")
PathLike = str | os.PathLike


def previous_path(path: PathLike) -> str:
    """Where :func:`atomic_write` keeps the copy it replaced: ``<path>.prev``."""
    return os.fspath(path) + ".prev"


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None], keep_previous: bool = True) -> None:
    """Replace ``path`` with what ``write(handle)`` writes into a binary file handle.

    The directory must exist. On any exception (from ``write`` or the file system) the temporary file
    is removed, the exception propagates and ``path`` (and ``<path>.prev``) are untouched. A process
    killed outright can leave a ``.<name>.*.tmp`` file beside the target; it is never read. The new
    file gets the old file's permission bits, or 0o644 for a new file (``mkstemp`` creates 0o600).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle_fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle_fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), _mode_of(path))
            os.fsync(handle.fileno())
        if keep_previous and os.path.exists(path):
            _keep_previous(path, folder)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(folder)


def atomic_write_bytes(path: PathLike, data: bytes, keep_previous: bool = True) -> None:
    """:func:`atomic_write` of a bytes-like object."""
    atomic_write(path, lambda handle: handle.write(data), keep_previous=keep_previous)


def load_with_fallback(path: PathLike, load: Callable[[str], T]) -> T:
    """``load(path)``, or ``load(<path>.prev)`` with a warning naming the unreadable file when the newest
    copy is missing or fails to load. ValueError naming both files (and why each failed) when neither
    loads. ``load`` should raise on a corrupt file; any ``Exception`` it raises counts as unreadable."""
    path = os.fspath(path)
    previous = previous_path(path)
    try:
        return load(path)
    except Exception as exc:
        newest_error = _reason(exc)
    if not os.path.exists(previous):
        raise ValueError(f"cannot read {path} ({newest_error}) and there is no {previous} to fall back to")
    try:
        value = load(previous)
    except Exception as exc:
        raise ValueError(f"cannot read {path} ({newest_error}) nor {previous} ({_reason(exc)})") from None
    log.warning("%s is unreadable (%s); loaded the previous copy %s instead", path, newest_error, previous)
    return value


# --- helpers ------------------------------------------------------------------------------------------


def _keep_previous(path: str, folder: str) -> None:
    """Make ``<path>.prev`` the current ``path`` without ``path`` ever going missing: hard link under a
    unique name, then rename that link over the old ``.prev``. File systems without hard links get a
    rename instead; a crash before the new file lands then leaves only ``.prev``, which the loader reads."""
    previous = previous_path(path)
    link = os.path.join(folder, f".{os.path.basename(path)}.{os.urandom(6).hex()}.prev")
    try:
        os.link(path, link)
    except OSError:
        os.replace(path, previous)
        return
    try:
        os.replace(link, previous)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        raise


def _mode_of(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o644


def _fsync_directory(folder: str) -> None:
    # Some platforms and file systems cannot open or fsync a directory; the rename is then as durable
    # as that file system makes it, which is all anyone can do there.
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
