"""Admission: everything the daemon checks before it accepts a stream or a re-tuning, off its event loop.

Opening a dataset, parsing a spec and dry-running it on the first image can take seconds (a big
ImageFolder is listed, a DALI pipeline is built), so the daemon hands these jobs to a small thread pool
and keeps serving heartbeats and batches meanwhile. Every check ends in :class:`Refused` with one line
naming the problem; nothing else escapes a job (the daemon turns any other exception into a refusal).
"""

from __future__ import annotations

import logging
import queue
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ValidationError

from . import protocol as P
from .config import BUILTIN_DATASETS, DaemonConfig, check_address
from .epochs import EpochPlan
from .fingerprint import check_fingerprint, stream_fingerprint
from .lru import LRUCache

log = logging.getLogger("augserve.admission")


class Refused(ValueError):
    """A request the daemon will not serve; ``code`` goes in the error reply."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Admitted:
    """What an accepted attach needs to become a stream."""

    plan: EpochPlan
    dataset: P.DatasetRef
    spec: dict
    fingerprint: dict
    start_epoch: int
    skip: frozenset[int]
    info: P.DatasetInfo
    batch_bytes: int


class Admission:
    """Checks attach and update requests on ``threads`` threads; results come back through :meth:`results`
    (a queue the daemon drains on its loop) and ``wake`` is called after each one is ready."""

    def __init__(self, config: DaemonConfig, wake: Callable[[], None], threads: int = 2) -> None:
        self.config = config
        self._wake = wake
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="augserve-admission")
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._sources: LRUCache = LRUCache(config.source_cache)
        self.pending = 0
        self._pool.submit(_warm_up)  # the first request should not wait for these imports

    # --- the loop's side -------------------------------------------------------------------------------

    def submit(self, job: Callable[[], Any], context: Any) -> None:
        """Run ``job`` off the loop; ``(context, result or Refused)`` arrives in :meth:`results`."""
        if self.pending >= self.config.max_pending_admissions:
            raise Refused(f"the daemon is busy admitting {self.pending} other request(s); try again shortly", "busy")
        self.pending += 1
        future = self._pool.submit(job)
        future.add_done_callback(lambda done: self._finish(done, context))

    def _finish(self, future: Future, context: Any) -> None:
        try:
            result = future.result()
        except Refused as exc:
            result = exc
        except ValidationError as exc:
            from pipelines import format_validation_error

            result = Refused(format_validation_error(exc))
        except (ValueError, TypeError) as exc:  # the pipelines and sources packages name the problem
            result = Refused(str(exc))
        except MemoryError:
            result = Refused("the request needs more memory than this daemon has (dataset too large?)")
        except Exception as exc:  # a bug or a hostile input must answer the peer, not kill a thread
            log.warning("admission job failed", exc_info=True)
            result = Refused(f"{type(exc).__name__}: {str(exc)[:500]}")
        self._results.put((context, result))
        self._wake()

    def results(self) -> list[tuple[Any, Any]]:
        done = []
        while True:
            try:
                done.append(self._results.get_nowait())
            except queue.Empty:
                break
        self.pending -= len(done)
        return done

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sources.clear()

    # --- the jobs --------------------------------------------------------------------------------------

    def admit(self, request: P.Attach) -> Admitted:
        """Resolve the dataset, validate and dry-run the spec, check the batch size and the resume state."""
        config = self.config
        if request.batch_size > config.max_batch_size:
            raise Refused(f"batch_size {request.batch_size} exceeds this daemon's max_batch_size {config.max_batch_size}")
        try:
            check_address(request.data, "data address")  # the trainer's bound endpoint: a concrete port
        except ValueError as exc:
            raise Refused(str(exc)) from None
        dataset = self.resolve_dataset(request)
        spec = self.parse_spec(request.pipeline)
        source = self.source(dataset)
        batch_bytes = self._check_batch_bytes(request.batch_size, self.dry_run(spec, source))
        plan = EpochPlan(len(source), request.batch_size, request.seed, request.rank, request.world_size, request.shuffle, request.drop_last)
        spec_dict = spec.to_dict()
        fingerprint = stream_fingerprint(
            dataset=request.dataset, split=request.split, dataset_options=dict(request.dataset_options), pipeline=spec_dict,
            seed=request.seed, batch_size=request.batch_size, world_size=request.world_size, rank=request.rank,
            shuffle=request.shuffle, drop_last=request.drop_last, num_samples=len(source),
        )  # fmt: skip
        start_epoch, skip = 0, frozenset()
        if request.resume is not None:
            start_epoch, skip = self.check_resume(request.resume, request.epochs, plan.num_batches(), fingerprint)
        info = P.DatasetInfo(name=request.dataset, split=request.split, classes=[str(c) for c in source.classes], channels=source.channels, image_size=source.image_size)
        return Admitted(plan, dataset, spec_dict, fingerprint, start_epoch, skip, info, batch_bytes)

    def _check_batch_bytes(self, batch_size: int, out_shape: tuple[int, int, int]) -> int:
        """Bytes of one uint8 batch of this output shape; over ``max_batch_bytes`` is refused."""
        batch_bytes = batch_size * out_shape[0] * out_shape[1] * out_shape[2]
        limit = self.config.max_batch_bytes
        if batch_bytes > limit:
            raise Refused(
                f"a batch of {batch_size} × {out_shape[0]}×{out_shape[1]}×{out_shape[2]} uint8 is {batch_bytes:,} bytes, over this"
                f" daemon's max_batch_bytes {limit:,}; lower batch_size or the output size",
                "limit",
            )
        return batch_bytes

    def check_update(self, dataset: P.DatasetRef, current: dict, request: P.Update, batch_size: int) -> dict:
        """The new spec of a re-tuning (a whole spec, or changes to the current one), dry-run on the data."""
        from pipelines import PipelineSpec
        from pipelines.changes import apply_changes

        if request.spec is not None:
            spec = self.parse_spec(request.spec)
        elif request.changes:
            spec = apply_changes(PipelineSpec.model_validate(current), dict(request.changes))
            self._check_ops(spec)
        else:
            raise Refused("an update needs 'spec' or a non-empty 'changes' mapping")
        self._check_batch_bytes(batch_size, self.dry_run(spec, self.source(dataset)))
        return spec.to_dict()

    # --- the checks ------------------------------------------------------------------------------------

    def resolve_dataset(self, request: P.Attach) -> P.DatasetRef:
        """Map the requested *name* to what workers open. Clients never pass paths."""
        if request.dataset in BUILTIN_DATASETS:
            ref = request.dataset
        elif request.dataset in self.config.datasets:
            ref = self.config.datasets[request.dataset]
        else:
            known = ", ".join(sorted([*BUILTIN_DATASETS, *self.config.datasets]))
            raise Refused(f"unknown dataset {request.dataset!r}: this daemon serves {known}", "unknown_dataset")
        return P.DatasetRef(ref=ref, split=request.split, options=dict(request.dataset_options))

    def parse_spec(self, value):
        """A spec sent by a peer: a preset name, a dict or YAML/JSON text — never a path the daemon opens."""
        import pipelines

        if isinstance(value, str):
            if "\n" not in value and value.strip().endswith((".yaml", ".yml", ".json")):
                raise Refused("the daemon does not open spec files; send the spec itself (connect() reads a local file for you)")
            depth = P.text_depth(value)
            if depth > P.MAX_DEPTH:
                raise Refused(f"pipeline text nests {depth} brackets deep; at most {P.MAX_DEPTH} allowed")
        try:
            spec = pipelines.resolve(value)
        except RecursionError:
            raise Refused("pipeline spec is nested too deeply") from None
        self._check_ops(spec)
        return spec

    def _check_ops(self, spec) -> None:
        if len(spec.ops) > self.config.max_ops:
            raise Refused(f"pipeline has {len(spec.ops)} ops; this daemon allows at most max_ops={self.config.max_ops}", "limit")

    def source(self, dataset: P.DatasetRef):
        from .sources import open_dataset

        key = (dataset.ref, dataset.split, tuple(sorted(dataset.options.items())))
        try:
            return self._sources.get_or_create(key, lambda: open_dataset(dataset.ref, split=dataset.split, **dataset.options))
        except (TypeError, ValueError) as exc:
            raise Refused(str(exc)) from None

    @staticmethod
    def dry_run(spec, source) -> tuple[int, int, int]:
        """Sample and fuse the first image's parameters, so a spec that cannot apply to this dataset
        (pca_color on grey images, a crop larger than the image) is refused now. Returns the output
        (H, W, C) of that image."""
        import pipelines

        from .sources import CorruptImageError

        try:
            image = source.load(0)
        except CorruptImageError:
            size = source.image_size or (1, 1)
            return (*size, source.channels)  # the stream will skip it; nothing more to learn from it
        pipe = pipelines.build(spec.without_normalize())
        try:
            plan = pipe.plans(pipe.sample_params([image.shape], seed=0))[0]
        except (ValueError, TypeError) as exc:
            raise Refused(str(exc)) from None
        if spec.normalize is not None and len(spec.normalize.mean) not in (1, image.shape[2]):
            raise Refused(f"normalize has {len(spec.normalize.mean)} mean values but {source.name} images have {image.shape[2]} channel(s)")
        return (*plan.out_hw, image.shape[2])

    @staticmethod
    def check_resume(state: P.ResumeState, epochs: int, batches_per_epoch: int, fingerprint: dict) -> tuple[int, frozenset[int]]:
        """Validate a client's resume state against this stream: same run, a position inside it."""
        if state.fingerprint is not None:
            try:
                check_fingerprint(state.fingerprint, fingerprint)
            except ValueError as exc:
                raise Refused(str(exc), "resume_mismatch") from None
        if state.epoch > epochs:
            raise Refused(f"resume epoch {state.epoch} is outside this stream's {epochs} epoch(s)", "resume_mismatch")
        delivered = frozenset(state.delivered)
        if any(i >= batches_per_epoch for i in delivered):
            raise Refused(f"resume state names batch indices outside [0, {batches_per_epoch}); was it saved with another batch_size or dataset?", "resume_mismatch")
        return state.epoch, delivered


def _warm_up() -> None:
    import pipelines  # noqa: F401  (albumentations, OpenCV: seconds on a cold start)

    from . import sources  # noqa: F401
