"""Which arriving batches go to the training loop, and when: pure bookkeeping, no sockets, threads or clock.

A batch is known by its place in the plan, the key ``(epoch, index)``. Workers finish batches in any
order, and a batch re-issued after a worker died may arrive twice. :class:`Reorderer` drops the second
copy and releases the rest so that the training loop sees

* ``ordered=True``: exactly plan order, ``(epoch, index)`` ascending;
* ``ordered=False``: whole epochs in turn, each epoch's batches in arrival order. A batch of a later
  epoch waits until *every index* of the epoch being released has been released, so a checkpoint's
  position (one epoch and a set of its indices) is always exact.

The caller bounds how much can be held by the credits it grants the sender; ``max_held`` turns a
violation of that bound into an error instead of unbounded growth.
"""

from __future__ import annotations

import operator
from typing import Generic, Iterable, TypeVar

T = TypeVar("T")


class Reorderer(Generic[T]):
    """Decides which arriving batches to hand to the training loop, and when.

    ``batches_per_epoch``: batches in every epoch, indices ``0..batches_per_epoch-1``.
    ``epochs``: the end epoch, exclusive. ``start_epoch``: the first epoch of this stream (not 0 after a
    resume), ``0 <= start_epoch <= epochs``. ``consumed_at_start``: indices of ``start_epoch`` the
    training loop consumed before a resume; they are never released, and a copy that arrives anyway
    counts as a duplicate. ``max_held``: refuse (ValueError) to buffer more than this many items;
    ``None`` for no limit.

    Memory: one index set per epoch that has some but not all of its batches received; an epoch whose
    batches have all arrived is remembered by its number alone (and, once every epoch before it is
    complete too, by one integer), so late duplicates of finished epochs are still recognised.
    """

    def __init__(
        self,
        batches_per_epoch: int,
        epochs: int,
        start_epoch: int = 0,
        consumed_at_start: Iterable[int] = frozenset(),
        ordered: bool = False,
        max_held: int | None = None,
    ) -> None:
        batches_per_epoch, epochs, start_epoch = (operator.index(v) for v in (batches_per_epoch, epochs, start_epoch))
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        if not 0 <= start_epoch <= epochs:
            raise ValueError(f"start_epoch must be in [0, epochs={epochs}], got {start_epoch}")
        consumed = frozenset(operator.index(i) for i in consumed_at_start)
        bad = sorted(i for i in consumed if not 0 <= i < batches_per_epoch)
        if bad:
            raise ValueError(f"consumed_at_start names batch indices {bad} outside [0, {batches_per_epoch})")
        if max_held is not None and operator.index(max_held) < 0:
            raise ValueError(f"max_held must be >= 0 or None, got {max_held}")
        self.batches_per_epoch = batches_per_epoch
        self.epochs = epochs
        self.start_epoch = start_epoch
        self.consumed_at_start = consumed if start_epoch < epochs else frozenset()
        self.ordered = bool(ordered)
        self.max_held = max_held

        self._received: dict[int, set[int]] = {}  # epochs with some, not all, indices received
        self._full: set[int] = set()  # complete epochs above the first incomplete one
        self._complete_below = start_epoch  # every epoch in [start_epoch, this) is complete
        self._pending: dict[tuple[int, int], T] = {}  # ordered: items waiting for their predecessors
        self._later: dict[int, list[T]] = {}  # unordered: items of epochs after the gate, arrival order
        self._held = 0
        self._released = 0
        self._accepted = 0
        self._duplicates = 0
        self._total = (epochs - start_epoch) * batches_per_epoch - len(self.consumed_at_start)
        for index in self.consumed_at_start:
            self._record(start_epoch, index)
        self._next: tuple[int, int] | None = self._after((start_epoch, -1))  # ordered: the next key to release
        self._gate = self._complete_below  # unordered: the epoch being released

    # --- the one mutating call -------------------------------------------------------------------------

    def offer(self, epoch: int, index: int, item: T) -> list[T]:
        """Take the batch ``(epoch, index)``; return the items now releasable, in release order.

        A key already received (or consumed before the resume) returns ``[]`` and counts in
        :attr:`duplicates`. A key outside the plan raises ValueError, as does holding more than
        ``max_held`` items; after either error the Reorderer is unchanged.
        """
        epoch, index = operator.index(epoch), operator.index(index)
        if not (self.start_epoch <= epoch < self.epochs and 0 <= index < self.batches_per_epoch):
            raise ValueError(
                f"batch (epoch={epoch}, index={index}) is outside the plan: "
                f"epochs [{self.start_epoch}, {self.epochs}), indices [0, {self.batches_per_epoch})"
            )
        if self.seen(epoch, index):
            self._duplicates += 1
            return []
        if self.ordered:
            releasable = (epoch, index) == self._next
        else:
            releasable = epoch == self._gate
        if not releasable and self.max_held is not None and self._held >= self.max_held:
            raise ValueError(
                f"batch (epoch={epoch}, index={index}) would be held beyond max_held={self.max_held} "
                f"(waiting for epoch {self.gate_epoch}, batches {self._missing_preview(self.gate_epoch)})"
            )
        self._record(epoch, index)
        self._accepted += 1
        out = self._release_ordered(epoch, index, item) if self.ordered else self._release_unordered(epoch, item)
        self._released += len(out)
        return out

    # --- queries ---------------------------------------------------------------------------------------

    def seen(self, epoch: int, index: int) -> bool:
        """Whether ``(epoch, index)`` has been received, or was consumed before the resume.

        This, with :attr:`received`, is how the caller learns of receipts: ``offer`` returns ``[]`` both
        for a duplicate and for a new batch that is held, and only the latter is progress.
        """
        if epoch < self._complete_below or epoch in self._full:
            return True
        return index in self._received.get(epoch, ())

    def missing(self, epoch: int) -> list[int]:
        """Indices of ``epoch`` not yet received, ascending ("epoch 3 is waiting for batches 5, 9")."""
        if not self.start_epoch <= epoch < self.epochs:
            raise ValueError(f"epoch {epoch} is outside the plan's epochs [{self.start_epoch}, {self.epochs})")
        if epoch < self._complete_below or epoch in self._full:
            return []
        got = self._received.get(epoch, ())
        return [i for i in range(self.batches_per_epoch) if i not in got]

    @property
    def received(self) -> int:
        """Distinct plan keys received so far (neither duplicates nor ``consumed_at_start`` count)."""
        return self._accepted

    @property
    def released(self) -> int:
        """Items returned by :meth:`offer` so far."""
        return self._released

    @property
    def remaining(self) -> int:
        """Batches still to release in the whole stream."""
        return self._total - self._released

    @property
    def done(self) -> bool:
        """Every batch of the plan (less ``consumed_at_start``) has been released."""
        return self._released == self._total

    @property
    def gate_epoch(self) -> int:
        """The lowest epoch not yet wholly released (``epochs`` when done). Unordered mode releases only
        this epoch's batches; ordered mode is at the epoch of its next key."""
        if self.ordered:
            return self._next[0] if self._next is not None else self.epochs
        return self._gate

    @property
    def held(self) -> int:
        """Items received but not yet released."""
        return self._held

    @property
    def duplicates(self) -> int:
        """Offers dropped because their key was already received or consumed before the resume."""
        return self._duplicates

    def __repr__(self) -> str:
        mode = "ordered" if self.ordered else "unordered"
        return f"Reorderer({mode}, gate_epoch={self.gate_epoch}, held={self.held}, remaining={self.remaining}, duplicates={self.duplicates})"

    # --- internals -------------------------------------------------------------------------------------

    def _record(self, epoch: int, index: int) -> None:
        got = self._received.setdefault(epoch, set())
        got.add(index)
        if len(got) == self.batches_per_epoch:
            del self._received[epoch]  # complete: its number is enough to recognise late duplicates
            self._full.add(epoch)
            while self._complete_below in self._full:
                self._full.remove(self._complete_below)
                self._complete_below += 1

    def _after(self, key: tuple[int, int]) -> tuple[int, int] | None:
        """The plan key after ``key``, skipping ``consumed_at_start``; None past the last epoch."""
        epoch, index = key
        while True:
            index += 1
            if index >= self.batches_per_epoch:
                epoch, index = epoch + 1, 0
            if epoch >= self.epochs:
                return None
            if not (epoch == self.start_epoch and index in self.consumed_at_start):
                return epoch, index

    def _release_ordered(self, epoch: int, index: int, item: T) -> list[T]:
        self._pending[(epoch, index)] = item
        self._held += 1
        out: list[T] = []
        while self._next in self._pending:
            out.append(self._pending.pop(self._next))
            self._next = self._after(self._next)
        self._held -= len(out)
        return out

    def _release_unordered(self, epoch: int, item: T) -> list[T]:
        if epoch != self._gate:
            self._later.setdefault(epoch, []).append(item)
            self._held += 1
            return []
        out = [item]
        # The gate opens only when the gate epoch's index set is complete, never on a count.
        while self._gate < self._complete_below:
            self._gate += 1
            waiting = self._later.pop(self._gate, [])
            self._held -= len(waiting)
            out.extend(waiting)
        return out

    def _missing_preview(self, epoch: int, limit: int = 8) -> str:
        if epoch >= self.epochs:
            return "none"
        missing = self.missing(epoch)
        text = ", ".join(map(str, missing[:limit]))
        return text + (f", ... ({len(missing)} in all)" if len(missing) > limit else "")
