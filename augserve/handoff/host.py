"""Whether a worker shares the trainer's shared memory: both sides describe theirs, the worker compares.

A description (:class:`augserve.protocol.ShmHost`) is the kernel's boot id — random per machine and
boot, so two hosts never match — plus the device and inode of the shared-memory directory, and the
effective uid. A tmpfs mount has a device number of its own, so two containers on one machine match
only when they share their ``/dev/shm`` (``docker run --ipc=host`` or ``--ipc=container:NAME``); and a
slot is a 0600 file, so it is private to one user. Nothing is written to find this out: no probe file
that a crash could leave behind.
"""

from __future__ import annotations

import os
import stat

from .. import protocol as P

BOOT_ID = "/proc/sys/kernel/random/boot_id"
DEFAULT_DIR = "/dev/shm"


def default_dir() -> str:
    """``$AUGSERVE_SHM_DIR``, else ``/dev/shm`` (read when called: children may be given another)."""
    return os.environ.get("AUGSERVE_SHM_DIR") or DEFAULT_DIR


def host_identity(directory: str) -> tuple[P.ShmHost | None, str]:
    """``(description, "")`` of this process's shared memory in ``directory``, or ``(None, why not)``."""
    try:
        with open(BOOT_ID, encoding="ascii") as handle:
            boot = handle.read().strip()
    except OSError:
        return None, f"no {BOOT_ID} (shared-memory hand-off needs Linux)"
    try:
        info = os.stat(directory)
    except OSError as exc:
        return None, f"no shared-memory directory {directory} ({exc.strerror})"
    if not stat.S_ISDIR(info.st_mode):
        return None, f"{directory} is not a directory"
    if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
        return None, f"{directory} is not writable by this user"
    try:
        return P.ShmHost(boot=boot, dev=info.st_dev, ino=info.st_ino, uid=os.geteuid()), ""
    except ValueError:
        return None, f"unexpected boot id {boot[:40]!r} in {BOOT_ID}"


def mismatch(mine: P.ShmHost, theirs: P.ShmHost) -> str | None:
    """Why a segment made here could not be opened by the peer described by ``theirs``; None if it can."""
    if mine.boot != theirs.boot:
        return "the trainer is on another host"
    if (mine.dev, mine.ino) != (theirs.dev, theirs.ino):
        return "the trainer sees another shared-memory directory (another container, or another AUGSERVE_SHM_DIR)"
    if mine.uid != theirs.uid:
        return f"the trainer runs as uid {theirs.uid} and this worker as uid {mine.uid}"
    return None
