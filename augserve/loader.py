"""A drop-in for the ``DataLoader`` of a training loop: :class:`Loader`, one epoch of augmented batches
per ``iter()``, its position saved and restored with ``state_dict()`` / ``load_state_dict()``.

Frameworks (Lightning, Accelerate, plain loops written for a ``DataLoader``) iterate the train loader
anew each epoch, call ``set_epoch`` on its sampler, ask ``len()`` for the steps of an epoch, and save
``state_dict()`` of loaders that have one (torchdata's ``StatefulDataLoader`` protocol). A
:class:`~augserve.client.Stream` is single-use, so the loader attaches **one stream per epoch**:
``connect(..., epochs=e + 1, resume={"epoch": e, "delivered": D})`` starts the daemon's plan at epoch
``e``, skipping the batches ``D`` of it that were consumed before a restart. Because the epoch is part
of every sample's augmentation seed ``(seed, e, id)`` and of the shuffle, each epoch brings new crops
and a new order, and epoch ``e`` is the same bytes whether it follows epoch ``e - 1`` in this process
or starts a resumed run. An attach costs milliseconds once the daemon is warm, so nothing is gained by
keeping a stream open across epochs (and nothing is produced while the trainer validates).

Epochs. Each ``iter()`` delivers the next epoch: 0, 1, 2, ... An iterator left before its end
(``break``, ``limit_train_batches``) counts as that epoch done. ``set_epoch(e)`` chooses the epoch the
next ``iter()`` delivers, as ``DistributedSampler.set_epoch`` does; ``loader.sampler.set_epoch(e)``
works too, which is where DDP loops and Lightning call it. The epoch is chosen at the iterator's first
``next()``, so a ``set_epoch`` between ``iter()`` and the first batch still counts (Lightning calls them
in that order).

Length. ``len(loader)``: batches per epoch for this rank, a whole epoch even when a restored position
skips part of it (what Lightning counts steps against). The daemon knows the dataset's size, so the
first ``len()`` attaches the stream of the next epoch early; the next ``iter()`` takes it over.

Position. ``state_dict()`` is where the next batch comes from: ``{"epoch", "delivered", "fingerprint"}``
per rank, ``delivered`` being the batch indices of that epoch already handed to the training loop.
While an iterator is running that is its stream's position; otherwise the start of the next epoch.
``load_state_dict(state)`` makes the next ``iter()`` continue there: exactly the batches not yet seen,
with the same bytes. The fingerprint makes the daemon refuse a state saved with another dataset,
pipeline, seed, batch size or world size. Plain data only (ints, strings, lists, dicts): it survives
``torch.save`` / ``torch.load(weights_only=True)``.

DDP. ``rank`` and ``world_size`` default to those of the initialised ``torch.distributed`` process
group (else 0 and 1), read when a stream attaches, so a loader made before the group exists is fine.
Every rank's daemon plan takes its own shard: across ranks each sample of an epoch is delivered exactly
once. Frameworks save the checkpoint of rank 0 only but call ``state_dict()`` on every rank, and ranks
consume different batch indices when batches arrive out of order, so under an initialised group of
more than one process ``state_dict()`` is a collective: it gathers every rank's position
(``all_gather_object``), and each rank picks its own in ``load_state_dict``. Call it on every rank, as
Lightning and Accelerate do.

One loader feeds one training loop from one thread: iterating it from two threads at once, inside a
``DataLoader`` worker process (the daemon's workers already do the loading: ``num_workers=0``), or
after :meth:`Loader.close` raises a one-line ``RuntimeError``.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any, Iterator

import torch

from .client import Batch, Stream, connect
from .closing import Closing
from .config import check_address

STATE_VERSION = 1

# connect() arguments the loader owns: which epoch a stream covers and where it starts.
_OWNED = ("epochs", "resume")
_OPTIONS = frozenset(inspect.signature(connect).parameters) - {"address", "dataset", "pipeline", "batch_size", "seed", "rank", "world_size", *_OWNED}


class Loader(Closing, torch.utils.data.IterableDataset):
    """Batches of a daemon, one epoch per ``iter()``: a drop-in for a training ``DataLoader``.

    ``address``, ``dataset``, ``pipeline``, ``batch_size``, ``seed``: as for :func:`augserve.connect`;
    ``rank`` / ``world_size``: ``None`` takes them from ``torch.distributed`` when it is initialised.
    ``options``: any other :func:`~augserve.connect` argument (``split``, ``shuffle``, ``drop_last``,
    ``prefetch``, ``ordered``, ``device``, ``dataset_options``, ``timeout``, ...), except ``epochs`` and
    ``resume``, which the loader sets (use :meth:`set_epoch` and :meth:`load_state_dict`).
    ``drop_last`` left unset is True when the world size is above 1: every rank then takes the same
    number of steps (a rank with one batch more would wait forever in DDP's all-reduce; a
    ``DistributedSampler`` pads for the same reason), and False on one process.

    Yields :class:`~augserve.client.Batch` objects; ``images, labels = batch`` unpacks one. Works on its
    own and as ``DataLoader(loader, batch_size=None)`` (``num_workers=0``). See the module docstring for
    how epochs, ``len()``, ``state_dict()`` and DDP behave.
    """

    def __init__(self, address: str, dataset: str, pipeline: Any, batch_size: int, *, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, **options: Any) -> None:  # fmt: skip
        super().__init__()
        owned = sorted(set(options) & set(_OWNED))
        if owned:
            raise TypeError(f"Loader sets {', '.join(owned)} itself: use set_epoch(epoch) and load_state_dict(state) instead")
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise TypeError(f"Loader got unknown option(s) {', '.join(unknown)}; it takes {', '.join(sorted(_OPTIONS))}")
        check_address(address, "daemon address")
        for name, value in (("rank", rank), ("world_size", world_size)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"{name} must be an int or None, got {value!r}")
        self.address = address
        self.dataset_name = dataset
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.seed = seed
        self.options = options
        self._rank, self._world_size = rank, world_size
        self._lock = threading.RLock()  # guards the fields below
        self._step = threading.Lock()  # held by the one next() that may run at a time
        self._epoch = 0  # where the next iteration starts: this epoch, less the batches in _skip
        self._skip: frozenset[int] = frozenset()
        self._fingerprint: dict | None = None  # of the state loaded, checked by the daemon
        self._stream: Stream | None = None  # the running iteration's stream
        self._owner: threading.Thread | None = None  # the thread running it
        self._generation = 0  # counts iterations begun; an older iterator finds itself replaced
        self._prepared: tuple[tuple, Stream] | None = None  # attached by len() for the next iteration
        self._lengths: dict[tuple[int, int], int] = {}  # (rank, world_size) -> batches per epoch
        self._closed = False

    # --- topology ---------------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """This process's rank: as given, else the process group's, else 0."""
        return self._topology()[0]

    @property
    def world_size(self) -> int:
        """Ranks sharing each epoch: as given, else the process group's, else 1."""
        return self._topology()[1]

    def _topology(self) -> tuple[int, int]:
        rank, world_size = self._rank, self._world_size
        if rank is None or world_size is None:
            group_rank, group_size = (_dist().get_rank(), _dist().get_world_size()) if _distributed() else (0, 1)
            rank = group_rank if rank is None else rank
            world_size = group_size if world_size is None else world_size
        return rank, world_size

    # --- what frameworks call ---------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next ``iter()`` delivers (from its start, unless a loaded state is in that epoch)."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        with self._lock:
            if epoch != self._epoch:
                self._epoch, self._skip = epoch, frozenset()

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` delivers."""
        return self._epoch

    @property
    def sampler(self) -> "_EpochSetter":
        """``loader.sampler.set_epoch(e)``: where DDP loops and Lightning call it on a ``DataLoader``."""
        return _EpochSetter(self)

    batch_sampler = None  # as on DataLoader(batch_size=None): batches come whole

    def __len__(self) -> int:
        self._check_usable()
        key = self._topology()
        with self._lock:
            if key not in self._lengths:
                self._prepare(key)
            return self._lengths[key]

    def __iter__(self) -> Iterator[Batch]:
        self._check_usable()
        return self._run()

    def state_dict(self) -> dict:
        """Where the next batch comes from, for every rank (a collective under DDP: see the module docstring)."""
        self._check_usable()
        rank, world_size = self._topology()
        with self._lock:
            if self._stream is not None:
                saved = self._stream.state_dict()
                position = {"epoch": saved["epoch"], "delivered": saved["delivered"], "fingerprint": saved["fingerprint"]}
            else:
                position = {"epoch": self._epoch, "delivered": sorted(self._skip), "fingerprint": self._fingerprint}
        positions = {rank: position}
        if world_size > 1 and _gathers(rank, world_size):
            gathered: list = [None] * world_size
            _dist().all_gather_object(gathered, (rank, position))
            positions = dict(gathered)
        return {"version": STATE_VERSION, "world_size": world_size, "positions": {str(r): p for r, p in sorted(positions.items())}}

    def load_state_dict(self, state: dict) -> None:
        """Make the next ``iter()`` continue where ``state`` (a :meth:`state_dict`) stood, for this rank."""
        self._check_usable()
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or not isinstance(state.get("positions"), dict):
            raise ValueError(f"not a Loader state_dict (version {STATE_VERSION}): expected keys version, world_size, positions")
        rank, world_size = self._topology()
        if state.get("world_size") != world_size:
            raise ValueError(f"the loader state was saved with world_size {state.get('world_size')}, this loader has world_size {world_size}")
        position = state["positions"].get(str(rank))
        if position is None:
            raise ValueError(f"the loader state holds the position of rank(s) {sorted(state['positions'])} but not of rank {rank}; under DDP call state_dict() on every rank")
        epoch, delivered = position.get("epoch"), position.get("delivered", [])
        if not isinstance(epoch, int) or epoch < 0 or not isinstance(delivered, list) or not all(isinstance(i, int) and i >= 0 for i in delivered):
            raise ValueError(f"the loader state's position is malformed: epoch {epoch!r}, delivered {str(delivered)[:80]}")
        with self._lock:
            self._epoch, self._skip, self._fingerprint = epoch, frozenset(delivered), position.get("fingerprint")

    # --- iteration --------------------------------------------------------------------------------------

    def _run(self) -> Iterator[Batch]:
        with self._lock:
            self._check_usable()
            owner = self._owner
            if self._stream is not None and owner is not None and owner is not threading.current_thread() and owner.is_alive():
                raise RuntimeError(f"Loader is already being iterated by thread {owner.name!r}; one loader feeds one training loop from one thread")
            stream = self._begin()
            generation = self._generation
        finished = False
        batches = iter(stream)
        try:
            while True:
                if not self._step.acquire(blocking=False):
                    raise RuntimeError("Loader iterated from two threads at once; one loader feeds one training loop from one thread")
                try:
                    if generation != self._generation or self._closed:
                        why = "the loader was closed" if self._closed else f"a later iter() started epoch {self._epoch - 1}"
                        raise RuntimeError(f"this iterator of the loader ended: {why}")
                    try:
                        batch = next(batches)
                    except StopIteration:
                        finished = True
                        return
                finally:
                    self._step.release()
                yield batch
        finally:
            with self._lock:
                if generation == self._generation and self._stream is stream:
                    self._stream, self._owner = None, None
                    if not finished:
                        stream.close()

    def _begin(self) -> Stream:
        """Attach the stream of the next epoch (or take the one ``len()`` attached); the epoch after it
        is next, whether this one runs to its end or not."""
        if self._stream is not None:
            self._stream.close()  # an earlier iterator left mid-epoch: its epoch counts as done
            self._stream = None
        key = (self._epoch, self._skip, self._topology())
        stream = self._take_prepared(key) or self._attach(*key)
        self._lengths[key[2]] = stream.batches_per_epoch
        self._stream, self._owner = stream, threading.current_thread()
        self._generation += 1
        self._epoch, self._skip, self._fingerprint = self._epoch + 1, frozenset(), stream.fingerprint
        return stream

    def _prepare(self, topology: tuple[int, int]) -> None:
        key = (self._epoch, self._skip, topology)
        if self._prepared is None or self._prepared[0] != key:
            self._drop_prepared()
            self._prepared = (key, self._attach(*key))
        self._lengths[topology] = self._prepared[1].batches_per_epoch

    def _take_prepared(self, key: tuple) -> Stream | None:
        # A state loaded since len() attached brings a fingerprint the prepared stream was not checked against.
        if self._prepared is not None and self._prepared[0] == key and self._prepared[1].fingerprint == (self._fingerprint or self._prepared[1].fingerprint):
            stream, self._prepared = self._prepared[1], None
            return stream
        self._drop_prepared()
        return None

    def _drop_prepared(self) -> None:
        if self._prepared is not None:
            self._prepared[1].close()
            self._prepared = None

    def _attach(self, epoch: int, skip: frozenset, topology: tuple[int, int]) -> Stream:
        rank, world_size = topology
        resume = {"epoch": epoch, "delivered": sorted(skip), "fingerprint": self._fingerprint}
        options = {"drop_last": world_size > 1, **self.options}
        return connect(self.address, self.dataset_name, self.pipeline, self.batch_size, seed=self.seed, epochs=epoch + 1,
                       rank=rank, world_size=world_size, resume=resume, **options)  # fmt: skip

    # --- teardown ---------------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("Loader was closed; make a new one")
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("Loader inside a DataLoader worker process: use DataLoader(loader, batch_size=None) with num_workers=0 (the daemon's workers do the loading)")

    def close(self) -> None:
        """Detach the running stream, if any. Safe to call twice; a closed loader cannot be iterated."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drop_prepared()
            if self._stream is not None:
                self._stream.close()
                self._stream = None

    def __getstate__(self):
        raise TypeError("a Loader holds live sockets and cannot be pickled; use DataLoader(loader, batch_size=None) with num_workers=0")

    def __repr__(self) -> str:
        return f"Loader({self.address!r}, dataset={self.dataset_name!r}, batch_size={self.batch_size}, seed={self.seed}, epoch={self._epoch})"


class _EpochSetter:
    """What ``loader.sampler`` returns: the ``set_epoch`` of a DataLoader's sampler, for DDP loops and Lightning."""

    def __init__(self, loader: Loader) -> None:
        self._loader = loader

    def set_epoch(self, epoch: int) -> None:
        self._loader.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self._loader.epoch


def _dist():
    return torch.distributed


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gathers(rank: int, world_size: int) -> bool:
    """Whether this loader's ranks are the process group's (then state_dict gathers across it)."""
    return _distributed() and _dist().get_world_size() == world_size and _dist().get_rank() == rank
