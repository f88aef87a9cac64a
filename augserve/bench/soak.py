"""``augserve bench soak``: a daemon under chaos for minutes, four trainers checking exactly-once delivery.

One real ``augserve serve`` subprocess with ``workers`` local workers serves the built-in ``shapes`` set.
Four trainer streams (threads of this process, each with the client's own I/O thread) consume epochs
back to back until the time is up:

* ``ddp-rank0`` and ``ddp-rank1``: ranks 0 and 1 of one world-size-2 job, same seed. Their union in every
  epoch must be every sample id exactly once.
* ``pausing``: stops consuming for ``pause_s`` every ``pause_every_s`` (its credits run out), and every
  ``reattach_every_s`` checkpoints and re-attaches (``state_dict()`` → ``close()`` →
  ``connect(resume=state)``). Every epoch, across re-attachments, must be every id exactly once.
* ``retuned``: an ordered stream re-tuned live every ``retune_every_s`` (``update_pipeline`` with a new
  rotation and crop padding). Every batch's ``pipeline_version`` must be non-decreasing and exactly the
  version the update replies said applies from that batch on.

Meanwhile a chaos thread SIGKILLs a random worker process (its pid from ``fetch_status``; only children
of our daemon) every ``kill_every_s`` seconds, and the daemon restarts it.

Accounting is per job per epoch (:class:`EpochLedger`): an epoch is judged once every stream of the job
has moved past it; the epoch each stream is in when the soak stops is *open* and is checked for
duplicates only. The run fails (``ok`` false, exit status 1) on any lost, duplicated or foreign id, on a
stream error, on a job that completed fewer than ``min_epochs`` epochs or a stream that delivered
nothing (so the accounting can never pass vacuously), on a version out of place, when chaos was asked
for but nothing was killed, when restarts fall short of kills, and when the daemon dies or does not
exit 0 on SIGINT. Resident memory (``VmRSS``) of the daemon and of each worker is sampled at start and
at end. Times are seconds, memory MiB.
"""

from __future__ import annotations

import json
import os
import random
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from ..local import LocalDaemon, free_port
from ..status import fetch_status

START_TIMEOUT_S = 120.0  # workers import torch and OpenCV on a shared 2-core machine
SETTLE_TIMEOUT_S = 60.0  # for killed workers to be restarted and rejoin after the soak
STOP_TIMEOUT_S = 30.0
EPOCHS = 1_000_000  # streams never run out within a soak; the daemon's upper bound


# --- accounting (pure; the unit tests feed it synthetic logs) --------------------------------------------


@dataclass(frozen=True)
class EpochAccount:
    """One epoch of one job. ``delivered``: sample deliveries over all the job's streams; ``lost``: ids of
    the dataset never delivered (``None`` while the epoch is open: a soak that stops mid-epoch cannot
    judge it); ``duplicated``: deliveries of an id beyond its first; ``unexpected``: ids outside
    ``[0, num_samples)``."""

    epoch: int
    delivered: int
    lost: int | None
    duplicated: int
    unexpected: int

    @property
    def complete(self) -> bool:
        return self.lost is not None

    @property
    def clean(self) -> bool:
        return not self.lost and not self.duplicated and not self.unexpected

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "delivered": self.delivered, "lost": self.lost, "duplicated": self.duplicated, "unexpected": self.unexpected}


class EpochLedger:
    """Sample ids delivered per epoch to one job of ``members`` streams (1, or the ranks of a DDP job).

    Every epoch must deliver each id in ``[0, num_samples)`` exactly once over all members. Epoch ``e`` is
    judged as soon as every member has delivered a batch of a later epoch; epochs nobody delivered into
    but which members moved past count as wholly lost. :meth:`finish` adds the still-open epochs
    (duplicates only). Thread-safe: members record from their own threads.
    """

    def __init__(self, num_samples: int, members: int = 1, first_epoch: int = 0) -> None:
        if num_samples < 1 or members < 1:
            raise ValueError(f"num_samples and members must be >= 1, got {num_samples} and {members}")
        self.num_samples = num_samples
        self.accounts: list[EpochAccount] = []  # judged epochs, in order
        self.late = 0  # deliveries into an epoch already judged (a member went back in time)
        self._counts: dict[int, np.ndarray] = {}
        self._unexpected: dict[int, int] = {}
        self._latest: list[int | None] = [None] * members
        self._next_to_judge = first_epoch
        self._lock = threading.Lock()

    def record(self, epoch: int, sample_ids: Sequence[int] | np.ndarray, member: int = 0) -> None:
        ids = np.asarray(sample_ids, dtype=np.int64).ravel()
        with self._lock:
            if epoch < self._next_to_judge:
                self.late += int(ids.size)
                return
            inside = (ids >= 0) & (ids < self.num_samples)
            counts = self._counts.get(epoch)
            if counts is None:
                counts = self._counts[epoch] = np.zeros(self.num_samples, dtype=np.int64)
            np.add.at(counts, ids[inside], 1)
            self._unexpected[epoch] = self._unexpected.get(epoch, 0) + int((~inside).sum())
            latest = self._latest[member]
            self._latest[member] = epoch if latest is None else max(latest, epoch)
            if all(e is not None for e in self._latest):
                while self._next_to_judge < min(self._latest):
                    self.accounts.append(self._judge(self._next_to_judge, complete=True))
                    self._next_to_judge += 1

    def _judge(self, epoch: int, complete: bool) -> EpochAccount:
        counts = self._counts.pop(epoch, None)
        if counts is None:
            counts = np.zeros(self.num_samples, dtype=np.int64)
        unexpected = self._unexpected.pop(epoch, 0)
        return EpochAccount(
            epoch=epoch,
            delivered=int(counts.sum()) + unexpected,
            lost=int((counts == 0).sum()) if complete else None,
            duplicated=int(np.clip(counts - 1, 0, None).sum()),
            unexpected=unexpected,
        )

    def finish(self) -> list[EpochAccount]:
        """Every epoch: the judged ones, then the open ones (``lost`` None). Call once, at the end."""
        with self._lock:
            open_ = [self._judge(epoch, complete=False) for epoch in sorted(self._counts)]
            return [*self.accounts, *open_]


def version_violations(batches: Iterable[tuple[int, int, int]], starts: dict[int, tuple[int, int]]) -> list[str]:
    """Check an ordered stream's ``(epoch, index, pipeline_version)`` in delivery order against
    ``starts`` (version → the ``(epoch, index)`` its update reply said it applies from; version 1 from
    where the stream began). Each batch must carry exactly the newest version started at or before it,
    so versions never decrease. Returns one line per violation."""
    problems: list[str] = []
    ordered_starts = sorted(starts.items(), key=lambda item: (item[1], item[0]))
    previous = None
    for epoch, index, version in batches:
        expected = max((v for v, start in ordered_starts if start <= (epoch, index)), default=None)
        if previous is not None and version < previous:
            problems.append(f"batch {epoch}/{index} has pipeline version {version} after one of version {previous}")
        elif expected is not None and version != expected:
            problems.append(f"batch {epoch}/{index} has pipeline version {version}, expected {expected} from the update replies")
        previous = version
    return problems


# --- processes ----------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB (``VmRSS`` of /proc/PID/status); None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def _live_child_of(pid: int, parent: int) -> bool:
    """True when ``pid`` runs (not a zombie) and its parent is ``parent``: chaos kills nothing else."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z" and int(fields[1]) == parent


def _memory(daemon_pid: int, status: dict) -> dict:
    workers = {str(w["pid"]): rss_mib(w["pid"]) for w in status["workers"]}
    daemon = rss_mib(daemon_pid)
    workers_total = round(sum(v for v in workers.values() if v is not None), 1)
    return {"daemon": daemon, "workers": workers, "workers_total": workers_total, "total": round((daemon or 0.0) + workers_total, 1), "trainers": rss_mib(os.getpid())}


# --- trainers -----------------------------------------------------------------------------------------


@dataclass
class StreamReport:
    name: str
    job: str
    rank: int = 0
    world_size: int = 1
    batches: int = 0
    images: int = 0
    attaches: int = 0
    pauses: int = 0
    updates: int = 0
    versions: set[int] = field(default_factory=set)
    error: str | None = None

    def as_dict(self) -> dict:
        return {
            "stream": self.name, "job": self.job, "rank": self.rank, "world_size": self.world_size, "batches": self.batches, "images": self.images,
            "attaches": self.attaches, "pauses": self.pauses, "updates": self.updates, "pipeline_versions": sorted(self.versions), "error": self.error,
        }  # fmt: skip


class _Trainer(threading.Thread):
    """Consumes one stream until ``stop`` is set, recording every batch in the job's ledger. A stream that
    ends or fails before then records its error."""

    def __init__(self, report: StreamReport, ledger: EpochLedger, member: int, connect_kwargs: dict, stop: threading.Event) -> None:
        super().__init__(name=f"soak-{report.name}", daemon=True)
        self.report, self.ledger, self.member = report, ledger, member
        self.connect_kwargs = connect_kwargs
        self.stop = stop

    def run(self) -> None:
        try:
            self._consume()
        except BaseException as exc:  # reported as this stream's failure
            self.report.error = f"{type(exc).__name__}: {exc}"

    def _connect(self, resume: dict | None = None):
        from augserve import connect

        self.report.attaches += 1
        return connect(**self.connect_kwargs, resume=resume)

    def _consume(self) -> None:
        stream = self._connect()
        try:
            batches = iter(stream)
            while not self.stop.is_set():
                batch = next(batches, None)
                if batch is None:
                    raise RuntimeError(f"the stream ended after {self.report.batches} batch(es), before the soak did")
                self.ledger.record(batch.epoch, batch.sample_ids.numpy(), self.member)
                self.report.batches += 1
                self.report.images += len(batch)
                self.report.versions.add(batch.pipeline_version)
                stream, batches = self.after_batch(stream, batches, batch)
        finally:
            stream.close()

    def after_batch(self, stream, batches, batch):
        """What a trainer does between batches; returns the stream and iterator to go on with."""
        return stream, batches


class _PausingTrainer(_Trainer):
    """Pauses now and then (its credits run out) and checkpoints and re-attaches now and then."""

    def __init__(self, *args, pause_every_s: float, pause_s: float, reattach_every_s: float) -> None:
        super().__init__(*args)
        self.pause_every_s, self.pause_s, self.reattach_every_s = pause_every_s, pause_s, reattach_every_s
        now = time.monotonic()
        self.next_pause, self.next_reattach = now + pause_every_s, now + reattach_every_s

    def after_batch(self, stream, batches, batch):
        now = time.monotonic()
        if self.pause_s > 0 and now >= self.next_pause:
            self.report.pauses += 1
            self.stop.wait(self.pause_s)
            self.next_pause = time.monotonic() + self.pause_every_s
        if now >= self.next_reattach and not self.stop.is_set():
            state = stream.state_dict()
            stream.close()
            stream = self._connect(resume=state)
            batches = iter(stream)
            self.next_reattach = time.monotonic() + self.reattach_every_s
        return stream, batches


class _RetunedTrainer(_Trainer):
    """An ordered stream re-tuned every ``retune_every_s``; keeps ``(epoch, index, version)`` of every
    batch and the start each update reply stated, for :func:`version_violations`."""

    def __init__(self, *args, retune_every_s: float) -> None:
        super().__init__(*args)
        self.retune_every_s = retune_every_s
        self.next_update = time.monotonic() + retune_every_s
        self.seen: list[tuple[int, int, int]] = []
        self.starts: dict[int, tuple[int, int]] = {}

    def after_batch(self, stream, batches, batch):
        if not self.starts:
            self.starts[stream.pipeline_version] = (stream.resumed_epoch, 0)
        self.seen.append((batch.epoch, batch.index, batch.pipeline_version))
        if time.monotonic() >= self.next_update:
            k = self.report.updates + 1
            reply = stream.update_pipeline({"rotate.degrees": 5 + 5 * (k % 6), "random_crop.padding": k % 4})
            self.starts[int(reply["version"])] = (int(reply["from_epoch"]), int(reply["from_index"]))
            self.report.updates += 1
            self.next_update = time.monotonic() + self.retune_every_s
        return stream, batches


class _Chaos(threading.Thread):
    """SIGKILLs a random worker of the daemon every ``every_s`` seconds until ``stop`` is set."""

    def __init__(self, address: str, daemon_pid: int, every_s: float, stop: threading.Event, seed: int) -> None:
        super().__init__(name="soak-chaos", daemon=True)
        self.address, self.daemon_pid, self.every_s, self.stop = address, daemon_pid, every_s, stop
        self.rng = random.Random(seed)
        self.kills: list[dict] = []
        self.no_victim = 0  # rounds where every worker was still restarting
        self.error: str | None = None
        self._t0 = time.monotonic()

    def run(self) -> None:
        try:
            while not self.stop.wait(self.every_s):
                killed = {k["pid"] for k in self.kills}
                workers = fetch_status(self.address, timeout=10.0)["workers"]
                victims = sorted(w["pid"] for w in workers if w["pid"] not in killed and _live_child_of(w["pid"], self.daemon_pid))
                if not victims:
                    self.no_victim += 1
                    continue
                pid = self.rng.choice(victims)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    self.no_victim += 1
                    continue
                self.kills.append({"pid": pid, "at_s": round(time.monotonic() - self._t0, 1)})
        except BaseException as exc:
            self.error = f"{type(exc).__name__}: {exc}"


# --- the soak -----------------------------------------------------------------------------------------


@dataclass
class SoakConfig:
    """One soak run. Times in seconds except ``minutes``; ``kill_every_s`` 0 turns chaos off."""

    minutes: float = 30.0
    workers: int = 3
    kill_every_s: float = 5.0
    samples: int = 600
    size: int = 32
    batch_size: int = 32
    prefetch: int = 4
    pause_every_s: float = 10.0
    pause_s: float = 3.0
    reattach_every_s: float = 15.0
    retune_every_s: float = 3.0
    min_epochs: int = 1
    seed: int = 0
    out: str | None = None
    progress_every_s: float = 15.0

    def check(self) -> None:
        if not self.minutes > 0:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}")
        for name in ("workers", "samples", "batch_size", "prefetch", "min_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.size < 8:
            raise ValueError(f"--size must be >= 8 pixels, got {self.size}")
        for name in ("kill_every_s", "pause_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.removesuffix('_s').replace('_', '-')} must be >= 0 seconds, got {getattr(self, name)}")
        for name in ("pause_every_s", "reattach_every_s", "retune_every_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.removesuffix('_s').replace('_', '-')} must be > 0 seconds, got {getattr(self, name)}")
        if self.samples < 2 * self.batch_size:
            raise ValueError(f"--samples ({self.samples}) must be at least 2 × --batch-size ({self.batch_size}): each DDP rank needs a batch")
        if self.out is not None and os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"--out {self.out} exists and is not a directory")


def _specs(size: int) -> tuple[dict, dict]:
    crop_flip = {"name": "soak-crop-flip", "ops": [{"op": "random_crop", "size": size, "padding": 2}, {"op": "mirror"}]}
    retuned = {"name": "soak-retuned", "ops": [*crop_flip["ops"], {"op": "rotate", "degrees": 5, "p": 1.0}]}
    return crop_flip, retuned


def _settle(address: str, workers: int, kills: int) -> tuple[dict, bool]:
    """Wait until the daemon counts at least ``kills`` restarts and all its workers are back."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        status = fetch_status(address, timeout=10.0)
        if status["worker_restarts"] >= kills and len(status["workers"]) >= workers:
            return status, True
        if time.monotonic() > deadline:
            return status, False
        time.sleep(0.25)


def run_soak(config: SoakConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run the soak and return its result (see :func:`format_table`; ``ok`` says whether it passed).
    The daemon's log goes to ``config.out`` (with ``soak.json``), else to a folder removed at the end."""
    config.check()
    if config.out:
        os.makedirs(config.out, exist_ok=True)
        return _soak(config, config.out, progress)
    with tempfile.TemporaryDirectory(prefix="augserve-soak-") as folder:
        return _soak(config, folder, progress)


def _trainers(config: SoakConfig, address: str, stop: threading.Event) -> tuple[list[_Trainer], dict[str, EpochLedger]]:
    """The four trainers (not started) and the ledger of each job: ``ddp`` (two ranks), ``pausing``, ``retuned``."""
    crop_flip, retuned_spec = _specs(config.size)
    common = {"address": address, "dataset": "shapes", "dataset_options": {"size": config.size, "n": config.samples}, "batch_size": config.batch_size,
              "epochs": EPOCHS, "prefetch": config.prefetch, "timeout": 30.0, "batch_timeout": 60.0}  # fmt: skip
    ledgers = {"ddp": EpochLedger(config.samples, members=2), "pausing": EpochLedger(config.samples), "retuned": EpochLedger(config.samples)}
    trainers = [
        _Trainer(StreamReport(f"ddp-rank{rank}", "ddp", rank, 2), ledgers["ddp"], rank, {**common, "pipeline": crop_flip, "seed": config.seed, "rank": rank, "world_size": 2}, stop)
        for rank in (0, 1)
    ]
    trainers.append(
        _PausingTrainer(StreamReport("pausing", "pausing"), ledgers["pausing"], 0, {**common, "pipeline": crop_flip, "seed": config.seed + 1}, stop,
                        pause_every_s=config.pause_every_s, pause_s=config.pause_s, reattach_every_s=config.reattach_every_s)
    )  # fmt: skip
    trainers.append(
        _RetunedTrainer(StreamReport("retuned", "retuned"), ledgers["retuned"], 0, {**common, "pipeline": retuned_spec, "seed": config.seed + 2, "ordered": True}, stop,
                        retune_every_s=config.retune_every_s)
    )  # fmt: skip
    return trainers, ledgers


def _watch(config: SoakConfig, daemon: LocalDaemon, trainers: list[_Trainer], ledgers: dict[str, EpochLedger], chaos: _Chaos | None, progress) -> str | None:
    """Wait out the soak; returns why it stopped early (the daemon or a stream died), else None."""
    started = time.monotonic()
    deadline, next_progress = started + config.minutes * 60, started + config.progress_every_s
    while (now := time.monotonic()) < deadline:
        time.sleep(min(0.5, deadline - now))
        if daemon.process.poll() is not None:
            return f"the daemon exited with {daemon.process.returncode}"
        if dead := [t.report.name for t in trainers if not t.is_alive()]:
            return f"stream(s) {', '.join(dead)} stopped"
        if progress and time.monotonic() >= next_progress:
            batches = sum(t.report.batches for t in trainers)
            judged = sum(len(ledger.accounts) for ledger in ledgers.values())
            progress(f"soak {time.monotonic() - started:.0f}/{config.minutes * 60:.0f} s: {batches} batches, {judged} epochs judged, {len(chaos.kills) if chaos else 0} kills")
            next_progress += config.progress_every_s
    return None


def _judge_jobs(ledgers: dict[str, EpochLedger], streams: list[StreamReport], min_epochs: int) -> tuple[list[dict], list[str]]:
    """Each job's per-epoch accounts and totals, and the failures they show."""
    jobs, failures = [], []
    for name, ledger in ledgers.items():
        accounts = ledger.finish()
        judged = [a for a in accounts if a.complete]
        bad = [a for a in accounts if not a.clean]
        if len(judged) < min_epochs:
            failures.append(f"job {name} completed {len(judged)} epoch(s), fewer than {min_epochs}")
        for account in bad[:5]:
            failures.append(f"job {name} epoch {account.epoch}: {account.lost if account.complete else '?'} lost, {account.duplicated} duplicated, {account.unexpected} foreign id(s)")
        if len(bad) > 5:
            failures.append(f"job {name}: {len(bad) - 5} more epoch(s) with lost or duplicated ids")
        if ledger.late:
            failures.append(f"job {name}: {ledger.late} id(s) delivered into epochs already complete")
        jobs.append(
            {
                "job": name,
                "streams": [r.name for r in streams if r.job == name],
                "epochs_completed": len(judged),
                "lost": sum(a.lost for a in judged),
                "duplicated": sum(a.duplicated for a in accounts),
                "unexpected": sum(a.unexpected for a in accounts),
                "late": ledger.late,
                "epochs": [a.as_dict() for a in accounts],
            }
        )
    return jobs, failures


def _soak(config: SoakConfig, folder: str, progress: Callable[[str], None] | None) -> dict:
    # On TCP, as a daemon serving other hosts would be (authenticated, encrypted batches).
    daemon = LocalDaemon(config.workers, address=f"tcp://127.0.0.1:{free_port()}", log_path=os.path.join(folder, "daemon.log"))
    failures: list[str] = []
    stop = threading.Event()
    try:
        memory_start = _memory(daemon.pid, daemon.wait_ready(START_TIMEOUT_S))
        trainers, ledgers = _trainers(config, daemon.address, stop)
        chaos = _Chaos(daemon.address, daemon.pid, config.kill_every_s, stop, config.seed) if config.kill_every_s > 0 else None
        threads = [*trainers, *([chaos] if chaos else [])]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        stopped_early = _watch(config, daemon, trainers, ledgers, chaos, progress)
        stop.set()
        elapsed = time.monotonic() - started
        for thread in threads:
            thread.join(timeout=90.0)
            if thread.is_alive():
                failures.append(f"{thread.name} did not stop within 90 s of the end of the soak")
        if stopped_early:
            failures.append(f"stopped early after {elapsed:.0f} s: {stopped_early}")
        kills = len(chaos.kills) if chaos else 0
        end_status, memory_end = {"worker_restarts": None, "workers": []}, None
        if daemon.process.poll() is None:
            end_status, settled = _settle(daemon.address, config.workers, kills)
            memory_end = _memory(daemon.pid, end_status)
            if not settled:
                failures.append(f"after {kills} kill(s) the daemon counts {end_status['worker_restarts']} restart(s) and {len(end_status['workers'])}/{config.workers} worker(s)")
    finally:
        stop.set()  # also on an error or Ctrl-C: no thread keeps streaming from a stopped daemon
        exit_code = daemon.stop(STOP_TIMEOUT_S)
    if exit_code != 0:
        failures.append(f"the daemon exited with {exit_code} (0 expected after SIGINT)")

    streams = [t.report for t in trainers]
    for report in streams:
        if report.error:
            failures.append(f"stream {report.name} failed: {report.error}")
        if report.batches == 0:
            failures.append(f"stream {report.name} delivered nothing")
    jobs, job_failures = _judge_jobs(ledgers, streams, config.min_epochs)
    failures += job_failures
    retuned = next(t for t in trainers if isinstance(t, _RetunedTrainer))
    violations = version_violations(retuned.seen, retuned.starts)
    failures += [f"stream retuned: {line}" for line in violations[:5]]
    if chaos and chaos.error:
        failures.append(f"chaos thread failed: {chaos.error}")
    if chaos and kills == 0:
        failures.append("chaos was asked for but no worker was killed")

    images = sum(r.images for r in streams)
    result = {
        "benchmark": "soak",
        "ok": not failures,
        "failures": failures,
        "minutes": config.minutes,
        "elapsed_s": round(elapsed, 1),
        "workers": config.workers,
        "dataset": "shapes",
        "dataset_options": {"size": config.size, "n": config.samples},
        "batch_size": config.batch_size,
        "prefetch": config.prefetch,
        "kill_every_s": config.kill_every_s,
        "kills": kills,
        "kills_detail": chaos.kills if chaos else [],
        "worker_restarts": end_status["worker_restarts"],
        "batches": sum(r.batches for r in streams),
        "images": images,
        "images_per_s": round(images / elapsed, 1),
        "version_violations": len(violations),
        "memory_mib": {"start": memory_start, "end": memory_end},
        "streams": [{**r.as_dict(), "images_per_s": round(r.images / elapsed, 1)} for r in streams],
        "jobs": jobs,
        "daemon_exit_code": exit_code,
        "daemon_log": daemon.log_path if config.out else None,
        "daemon_log_tail": daemon.log_tail() if failures else None,
    }
    if config.out:
        with open(os.path.join(config.out, "soak.json"), "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
        result["out"] = os.path.join(config.out, "soak.json")
    return result


# --- output -------------------------------------------------------------------------------------------


def json_rows(result: dict) -> list[dict]:
    """One row per stream and per job (without the per-epoch list), ahead of the summary line."""
    rows = [{"benchmark": "soak", "kind": "stream", **s} for s in result["streams"]]
    rows += [{"benchmark": "soak", "kind": "job", **{k: v for k, v in j.items() if k != "epochs"}} for j in result["jobs"]]
    return rows


def format_table(result: dict) -> str:
    options = result["dataset_options"]
    chaos = f"SIGKILL a worker every {result['kill_every_s']:g} s" if result["kill_every_s"] else "no chaos"
    lines = [
        f"soak — {result['elapsed_s']:.0f} s of {result['minutes']:g} min, shapes {options['size']}² × {options['n']}, batch {result['batch_size']}, "
        f"{result['workers']} worker(s), {chaos}: {'PASSED' if result['ok'] else 'FAILED'}",
        "",
        "| job | streams | epochs completed | lost | duplicated | foreign |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for job in result["jobs"]:
        lines.append(f"| {job['job']} | {', '.join(job['streams'])} | {job['epochs_completed']} | {job['lost']} | {job['duplicated']} | {job['unexpected']} |")
    lines += ["", "| stream | batches | images | img/s | attaches | pauses | updates | versions | error |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for s in result["streams"]:
        versions = s["pipeline_versions"]
        shown = f"{versions[0]}…{versions[-1]} ({len(versions)})" if len(versions) > 1 else ",".join(map(str, versions))
        lines.append(f"| {s['stream']} | {s['batches']} | {s['images']} | {s['images_per_s']:.0f} | {s['attaches']} | {s['pauses']} | {s['updates']} | {shown} | {s['error'] or ''} |")
    lines += ["", f"kills {result['kills']} · worker restarts {result['worker_restarts']} · {result['batches']} batches · {result['images']} images · {result['images_per_s']:.0f} img/s"]
    start, end = result["memory_mib"]["start"], result["memory_mib"]["end"] or {}

    def mib(value) -> str:
        return "–" if value is None else f"{value:.1f}"

    lines += ["", "| resident memory (MiB) | start | end |", "|---|---:|---:|"]
    lines.append(f"| daemon | {mib(start['daemon'])} | {mib(end.get('daemon'))} |")
    lines.append(f"| workers, sum ({len(start['workers'])} at start, {len(end.get('workers', {}))} at end) | {mib(start['workers_total'])} | {mib(end.get('workers_total'))} |")
    lines.append(f"| this process (the trainers) | {mib(start['trainers'])} | {mib(end.get('trainers'))} |")
    for label, snapshot in (("start", start), ("end", end)):
        if snapshot.get("workers"):
            lines.append(f"workers at {label}: " + " · ".join(f"pid {pid} {mib(v)}" for pid, v in snapshot["workers"].items()))
    if result["failures"]:
        lines += ["", "failures:", *(f"  - {line}" for line in result["failures"])]
        if result.get("daemon_log_tail"):
            lines += ["", "daemon log (tail):", result["daemon_log_tail"]]
    if result.get("out"):
        lines += ["", f"wrote {result['out']}"]
    return "\n".join(lines)
