"""Host shared-memory segments: one segment is one slot, and none outlives the processes that use it.

A segment is a 0600 file in the shared-memory directory (``/dev/shm`` unless ``AUGSERVE_SHM_DIR`` or
``--shm-dir`` say otherwise) named ``augserve-slot-<pid namespace>-<pid>-<16 hex>`` after the worker
process that made it. Layout (little-endian)::

    bytes 0–8       magic b"AUGSLOT1"
          8–12      state, uint32: 0 free, 1 lent, 2 refused (the word both sides write; see augserve.handoff.slots)
          16–24     generation, uint64: fills published so far
          24–32     capacity, uint64: bytes of data
    4096–4096+cap   data: the batch's tensors, each at a 64-byte aligned offset

**No bus error.** Creating a segment allocates all its pages (``posix_fallocate``): a tmpfs that is
full fails right there with ENOSPC, which becomes a :class:`~augserve.handoff.slots.NoSlot` and a batch
sent as frames — never a SIGBUS later, when a page would first be touched. Before that, a worker checks
that the directory keeps ``reserve`` bytes free after the segment (room for what else uses
``/dev/shm``: NCCL, DataLoader workers).

**No leak.** A name exists only until both sides hold a mapping, and every way out removes it:

- the trainer unlinks a segment's name as soon as it has mapped it (:func:`open_segment`); the memory
  stays until both sides unmap it, which they do when they exit, whatever kills them;
- a worker unlinks the names of its segments when it closes a pool — the stream ended, or the daemon
  dropped a trainer that went silent — and when it exits;
- the names of a worker that died (SIGKILL, OOM) before its trainer mapped them are reaped
  (:func:`reap_orphans`): by the daemon when one of its workers exits, and by every worker as it starts.
  A name whose pid, in this pid namespace, no longer runs is unlinked.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import secrets
import stat
import struct

import numpy as np

from .. import protocol as P
from .slots import FREE, LENT, REFUSED, NoSlot

MAGIC = b"AUGSLOT1"
HEADER_BYTES = 4096  # the data starts on a page boundary
ALIGN = 64  # tensors start on a cache line
PREFIX = "augserve-slot-"
_STATE = struct.Struct("<I")  # at 8
_GENERATION = struct.Struct("<Q")  # at 16
_CAPACITY = struct.Struct("<Q")  # at 24
_NAME = re.compile(P.SEGMENT_PATTERN)
MAX_SEGMENT_BYTES = 1 << 40


def pid_namespace() -> str:
    """The inode of this process's pid namespace (a pid means something only within it)."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return "0"
    digits = "".join(c for c in link if c.isdigit())
    return digits[:20] or "0"


def free_bytes(directory: str) -> int:
    info = os.statvfs(directory)
    return info.f_bavail * info.f_frsize


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


class Segment:
    """A slot's memory on the worker's side (a :class:`~augserve.handoff.slots.SlotMemory`); ``data`` is
    a uint8 numpy view of its data region."""

    def __init__(self, directory: str, name: str, mapping: mmap.mmap, capacity: int) -> None:
        self.directory = directory
        self.name = name
        self.capacity = capacity
        self._mapping = mapping
        self.data = np.frombuffer(mapping, dtype=np.uint8, count=capacity, offset=HEADER_BYTES)

    @classmethod
    def create(cls, directory: str, capacity: int, reserve: int = 0) -> "Segment":
        """A new FREE segment of ``capacity`` data bytes, every page allocated. :class:`NoSlot` when the
        directory would keep less than ``reserve`` bytes free, or has no room at all."""
        size = HEADER_BYTES + capacity
        if size > MAX_SEGMENT_BYTES:
            raise NoSlot("unavailable", f"a {_mb(size)} slot is beyond the {_mb(MAX_SEGMENT_BYTES)} limit")
        try:
            free = free_bytes(directory)
        except OSError as exc:
            raise NoSlot("unavailable", f"cannot inspect {directory}: {exc.strerror}") from None
        if size + reserve > free:
            raise NoSlot("no_space", no_space_message(directory, size, free, reserve))
        name = f"{PREFIX}{pid_namespace()}-{os.getpid()}-{secrets.token_hex(8)}"
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise NoSlot("unavailable", f"cannot create a slot in {directory}: {exc.strerror}") from None
        try:
            os.posix_fallocate(fd, 0, size)  # every page now, so a full tmpfs fails here and not with SIGBUS
            mapping = mmap.mmap(fd, size)
        except OSError as exc:
            _unlink(directory, name)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise NoSlot("no_space", no_space_message(directory, size, free, reserve, racing=True)) from None
            raise NoSlot("unavailable", f"cannot allocate a {_mb(size)} slot in {directory}: {exc.strerror}") from None
        finally:
            os.close(fd)
        mapping[0:8] = MAGIC
        _CAPACITY.pack_into(mapping, 24, capacity)
        return cls(directory, name, mapping, capacity)

    def state(self) -> int:
        return _STATE.unpack_from(self._mapping, 8)[0]

    def write(self, offset: int, source: np.ndarray) -> None:
        if offset + source.nbytes > self.capacity:
            raise ValueError(f"{source.nbytes} bytes at offset {offset} overflow the {self.capacity}-byte slot {self.name}")
        target = self.data[offset : offset + source.nbytes]
        if source.nbytes and _address(source) == _address(target):
            return  # its producer wrote it here already (a batch written in place): nothing to copy
        target[...] = source

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` of the slot's data from ``offset`` as a writable uint8 array (for a producer that
        writes a tensor in place)."""
        if offset < 0 or offset + nbytes > self.capacity:
            raise ValueError(f"{nbytes} bytes at offset {offset} overflow the {self.capacity}-byte slot {self.name}")
        return self.data[offset : offset + nbytes]

    def publish(self, generation: int) -> None:
        _GENERATION.pack_into(self._mapping, 16, generation)
        _STATE.pack_into(self._mapping, 8, LENT)

    def reclaim(self) -> None:
        _STATE.pack_into(self._mapping, 8, FREE)

    def close(self) -> None:
        _unlink(self.directory, self.name)  # usually gone already: the trainer unlinks what it maps
        self.data = None
        try:
            self._mapping.close()
        except BufferError:  # a view of it is still alive somewhere: it unmaps when that goes
            pass


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def no_space_message(directory: str, size: int, free: int, reserve: int, racing: bool = False) -> str:
    kept = f" and keep the {_mb(reserve)} reserve free" if reserve else ""
    how = "ran out of room while allocating" if racing else f"has {_mb(free)} free; it cannot hold"
    return (f"{directory} {how} a {_mb(size)} slot{kept}: batches go as frames "
            f"(give it more room, e.g. `docker run --shm-size=2g`, or lower --shm-reserve-mb)")  # fmt: skip


class MappedSegment:
    """A slot's memory on the trainer's side: mapped once, read through its header."""

    def __init__(self, name: str, mapping: mmap.mmap, capacity: int) -> None:
        self.name = name
        self.mapping = mapping
        self.capacity = capacity

    def header(self) -> tuple[int, int]:
        """``(state, generation)`` as the segment says now."""
        return _STATE.unpack_from(self.mapping, 8)[0], _GENERATION.unpack_from(self.mapping, 16)[0]

    def release(self, generation: int) -> None:
        """The trainer is done with fill ``generation``: the slot is FREE for its worker again."""
        state, current = self.header()
        if state == LENT and current == generation:
            _STATE.pack_into(self.mapping, 8, FREE)

    def refuse(self) -> None:
        """The trainer cannot use this slot (see :data:`~augserve.handoff.slots.REFUSED`): its worker's
        pool stops lending."""
        _STATE.pack_into(self.mapping, 8, REFUSED)


def open_segment(directory: str, name: str) -> MappedSegment:
    """Map the segment ``name`` of ``directory`` and unlink its name (see the module docstring).

    Refused with a one-line :class:`~augserve.protocol.ProtocolError`: a name outside the pattern, a
    link, anything but a regular file of this user's, a size that disagrees with its header."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise P.ProtocolError(f"bad slot name {name!r}")
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise P.ProtocolError(f"slot {name} is gone from {directory} (its worker exited, or the trainer sees another directory)") from None
    except OSError as exc:
        raise P.ProtocolError(f"cannot open slot {name}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise P.ProtocolError(f"slot {name} is not a regular file")
        if info.st_uid != os.geteuid():
            raise P.ProtocolError(f"slot {name} belongs to uid {info.st_uid}, not to this trainer's uid {os.geteuid()}")
        if not HEADER_BYTES < info.st_size <= MAX_SEGMENT_BYTES:
            raise P.ProtocolError(f"slot {name} has {info.st_size} bytes: not a slot")
        mapping = mmap.mmap(fd, info.st_size)
    finally:
        os.close(fd)
    capacity = _CAPACITY.unpack_from(mapping, 24)[0]
    if mapping[0:8] != MAGIC or capacity != info.st_size - HEADER_BYTES:
        mapping.close()
        raise P.ProtocolError(f"slot {name} does not hold an augserve slot header")
    _unlink(directory, name)  # both sides hold a mapping now: from here no crash can leave the name behind
    return MappedSegment(name, mapping, capacity)


def _unlink(directory: str, name: str) -> None:
    try:
        os.unlink(os.path.join(directory, name))
    except FileNotFoundError:
        pass


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not): a pid that exists but is not ours counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # cannot tell: leave its segments alone


def reap_orphans(directory: str) -> list[str]:
    """Unlink the slot names in ``directory`` left by dead processes of this pid namespace and this
    user; returns them. Names of live processes, of other namespaces or other users are left alone."""
    namespace, me, uid = pid_namespace(), os.getpid(), os.geteuid()
    reaped = []
    try:
        names = os.listdir(directory)
    except OSError:
        return reaped
    for name in names:
        if not _NAME.fullmatch(name):
            continue
        ns, pid = name[len(PREFIX) :].split("-")[:2]
        if ns != namespace or int(pid) == me or pid_alive(int(pid)):
            continue
        try:
            if os.lstat(os.path.join(directory, name)).st_uid != uid:
                continue
        except FileNotFoundError:
            continue
        _unlink(directory, name)
        reaped.append(name)
    return reaped
