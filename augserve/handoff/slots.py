"""The slot lifecycle of the local hand-off, whatever memory a slot is made of.

A worker keeps one :class:`SlotPool` per stream. A slot's life::

    FREE ──acquire──▶ FILLING ──lend──▶ LENT ──the trainer lets go──▶ FREE
                         └──────── give_back (nothing was sent) ──────▶ FREE
    FREE ──retire (too small for the batch at hand)──▶ closed;   any ──pool.close()──▶ closed

``FILLING`` is the worker's own business: nothing outside the process knows of it. ``lend`` publishes a
new generation and the ``LENT`` state in the slot's shared state word, just before the worker sends the
descriptor; from then on only the trainer may set the word back to ``FREE`` (or the worker, when the
send failed and the trainer never heard of it). Returning a slot is a write into memory both processes
map, so no message travels for it, and a trainer that keeps a batch simply keeps its slot.

A trainer that cannot use a slot at all (it cannot open the CUDA IPC handle of a device slot) writes
``REFUSED`` into its state word instead of ``FREE``: from then on the pool refuses every batch
(:class:`NoSlot` "unavailable") and the worker sends them another way, without a message back.

A pool never waits: when every slot is lent and the pool is at its size, :meth:`SlotPool.acquire`
raises :class:`NoSlot` and the batch goes as frames instead. Slots are made on demand, each as large as
the largest batch the pool has seen, so a pool holds as many slots as the trainer has actually kept.

This module does not know what a slot is made of: :class:`SlotMemory` is the seam. Host shared memory
(:mod:`augserve.handoff.shm`) implements it, and so does device memory shared through CUDA IPC
(:mod:`augserve.handoff.device`), with its state word in a small host segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol

FREE = 0
LENT = 1
REFUSED = 2  # written by a trainer that cannot use the slot: the pool stops lending
MAX_RETIRED = 64  # names reported in one descriptor (the protocol's bound)

NoSlotKind = Literal["no_space", "busy", "unavailable", "other_host"]


class SlotMemory(Protocol):
    """One slot's memory as its owner (the worker) sees it."""

    name: str  # how the trainer finds it
    capacity: int  # bytes of data it holds

    def state(self) -> int:
        """FREE, LENT or REFUSED, as the shared state word says now."""

    def write(self, offset: int, source) -> None:
        """Copy ``source`` (uint8 bytes: a host array, or a tensor for device memory) to ``offset``
        bytes into the slot's data; nothing to do when ``source`` is that very memory (a tensor its
        producer wrote in place, see :meth:`view`)."""

    def view(self, offset: int, nbytes: int):
        """A writable uint8 view over ``nbytes`` of the slot's data from ``offset`` (a host array; a
        tensor on the device for device memory)."""

    def publish(self, generation: int) -> None:
        """Write ``generation``, then the LENT state: the filled slot is the trainer's from here."""

    def reclaim(self) -> None:
        """Set the state word back to FREE (a lent slot whose descriptor never left)."""

    def close(self) -> None:
        """Let go of this side's hold: unmap, and remove the name if it is still there."""


class NoSlot(Exception):
    """No slot for this batch; ``kind`` says why (see :class:`augserve.protocol.Fallback`)."""

    def __init__(self, kind: NoSlotKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(eq=False)
class Slot:
    memory: SlotMemory
    generation: int = 0  # fills published so far
    filling: bool = False


class SlotPool:
    """At most ``max_slots`` slots made by ``create(capacity_bytes)`` (which raises :class:`NoSlot`
    when it cannot make one). Used by one thread."""

    def __init__(self, create: Callable[[int], SlotMemory], max_slots: int) -> None:
        if max_slots < 1:
            raise ValueError(f"a pool needs at least one slot, got max_slots={max_slots}")
        self._create = create
        self.max_slots = max_slots
        self.slots: list[Slot] = []
        self.slot_bytes = 0  # capacity of new slots: the largest batch seen
        self._retired: list[str] = []
        self.closed = False

    def acquire(self, nbytes: int) -> Slot:
        """A slot of at least ``nbytes``, now FILLING. A free slot too small for it is retired and a
        bigger one made in its place; with every slot lent and the pool full, :class:`NoSlot` ("busy")."""
        if self.closed:
            raise NoSlot("unavailable", "the pool is closed")
        states = {id(slot): slot.memory.state() for slot in self.slots}
        refused = next((slot for slot in self.slots if states[id(slot)] == REFUSED), None)
        if refused is not None:
            raise NoSlot("unavailable", f"the trainer could not use slot {refused.memory.name} (its log says why)")
        self.slot_bytes = max(self.slot_bytes, nbytes)
        free = [slot for slot in self.slots if not slot.filling and states[id(slot)] == FREE]
        for slot in free:
            if slot.memory.capacity >= nbytes:
                slot.filling = True
                return slot
        if free and len(self.slots) >= self.max_slots:
            self._retire(free[0])
        if len(self.slots) >= self.max_slots:
            raise NoSlot("busy", f"all {len(self.slots)} slots of this stream's pool are held by the trainer")
        slot = Slot(self._create(self.slot_bytes), filling=True)
        self.slots.append(slot)
        return slot

    def lend(self, slot: Slot) -> int:
        """Publish the filled slot to the trainer; returns the generation its descriptor must name."""
        if not slot.filling:
            raise ValueError(f"slot {slot.memory.name} is not being filled")
        slot.generation += 1
        slot.memory.publish(slot.generation)
        slot.filling = False
        return slot.generation

    def give_back(self, slot: Slot) -> None:
        """The batch in ``slot`` was not sent: the slot is FREE again."""
        if slot.filling:
            slot.filling = False
        elif slot in self.slots:
            slot.memory.reclaim()

    def take_retired(self) -> list[str]:
        """Names of slots closed since the last call (the trainer may let go of their mappings)."""
        retired, self._retired = self._retired[:MAX_RETIRED], self._retired[MAX_RETIRED:]
        return retired

    def _retire(self, slot: Slot) -> None:
        self.slots.remove(slot)
        self._retired.append(slot.memory.name)
        slot.memory.close()

    def close(self) -> None:
        """Close every slot, lent or not: the trainer's mappings stay valid until it lets go of them."""
        self.closed = True
        slots, self.slots = self.slots, []
        for slot in slots:
            slot.memory.close()
