"""``augserve tune``: an Optuna study of augmentation hyper-parameters, scored by held-out accuracy.

How a study runs
----------------
* **Search space** — :mod:`trainer.tuning.params`: fields of the base spec (``--param``) or the defaults.
* **Sampler** — TPE, seeded (``--seed``). Its first ``startup_trials`` trials are random (default
  ``min(10, max(2, trials // 3))``); when the study is new, the very first trial is the base spec itself
  (its values that lie inside the ranges), so the table always shows what the tuning bought.
* **Objective** — top-1 accuracy on the dataset's *test* split after the last epoch, never training
  accuracy. A dataset without a test split is refused before any trial runs. (The best value is picked
  on that same split, so it is an optimistic estimate of the tuned recipe; confirm it with a longer run.)
* **Pruning** — a MedianPruner: after every epoch the trial reports its held-out accuracy and is stopped
  when that falls below the median of earlier trials at the same epoch (never after its last epoch:
  a finished trial's value is kept). Not before epoch ``prune_from_epoch`` (default: half the epochs,
  rounded up): stronger augmentation typically learns *slower* at first and ends better, so judging
  trials on their first epoch would bias the study towards weak augmentation. Disabled for the first
  ``prune_startup`` complete trials (default ``min(5, max(2, trials // 4))``) and altogether with
  ``prune=False``.
* **Trials are in-process training runs** (:class:`trainer.run.Run`, with the epoch callback
  :func:`trial_reporter` that reports each epoch to Optuna and raises ``TrialPruned``, and its
  ``request_stop`` for Ctrl-C), attached to one daemon for the whole study:
  ``connect`` or an embedded one (``trainer.data.embedded_daemon``). In-process rather than one
  ``python -m trainer train`` subprocess per trial because pruning needs per-epoch reports (a
  subprocess would need a side channel), a subprocess pays a 3–5 s interpreter + torch import per trial
  (as long as a whole short LeNet trial), and the daemon already runs the CPU-heavy augmentation in its
  own processes. Concurrent trials (``jobs``, default ``min(2, daemon workers)``) are **threads**:
  torch releases the GIL inside its kernels and the client's socket I/O runs in its own thread, so
  threads overlap well; each trial's intra-op pool is one thread (``threads``, process-wide
  ``torch.set_num_threads``) so that J trials plus the daemon's workers do not oversubscribe the cores.
* **Reproducibility** — every trial uses the same ``seed`` for the stream (same sample order, same
  random draws: common random numbers, so trials differ only in the parameters) and for the model's
  initial weights. With ``jobs=1`` a study is repeatable end to end; with ``jobs > 1`` TPE's suggestions
  depend on which trial ends first (and models with dropout share torch's global generator), so it is not.
* **Storage and resuming** — SQLite (``DIR/study.db``) or any Optuna RDB URL, ``load_if_exists``. The
  trials that count are complete + pruned ones: running the same command again runs only the missing
  ones to reach ``trials`` in total. Ctrl-C stops the trials in flight at their next batch (they end
  FAIL, do not count, and run again on resume); a trial left RUNNING by a killed tuner is marked failed
  by Optuna's heartbeat once ``HEARTBEAT_GRACE_S`` have passed and does not count either. The enqueued
  base-spec trial runs alone before any concurrency (two threads can pop the same enqueued trial on
  SQLite, optuna/optuna#4002). A stored study made with other settings
  (model, dataset, base spec, search space, epochs, batch size, lr, seed) is refused rather than mixed.
* **Outputs** (``out``) — ``best.yaml`` (the best trial's spec; ``--pipeline best.yaml`` trains with
  it), ``trials.csv``, ``history.png``, ``importances.png``, and ``trials/trial-NNNN.yaml`` (each trial's
  spec). See :mod:`trainer.tuning.report`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .params import Param, apply_values, baseline_values, build_search_space

if TYPE_CHECKING:
    from pipelines import PipelineSpec

HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 40
SETTINGS_ATTR = "augserve_tune_settings"

# Model creation draws from torch's global generator; trials running in threads take turns here so
# each gets the weights its seed gives.


@dataclass
class TuneConfig:
    model: str
    dataset: str
    trials: int = 20
    params: list[str] = field(default_factory=list)  # "path=LOW:HIGH[:log]"; empty → defaults
    pipeline: str | None = None  # preset or file; None → lenet5 for lenet*, else resnet
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.1
    dataset_options: dict = field(default_factory=dict)
    seed: int = 0
    jobs: int | None = None
    timeout: float | None = None
    connect: str | None = None
    workers: int = 2
    backend: str = "albumentations"
    serve_datasets: dict = field(default_factory=dict)
    device: str = "auto"
    threads: int = 1
    out: str | None = None
    storage: str | None = None
    study_name: str | None = None
    baseline: bool = True
    prune: bool = True
    prune_startup: int | None = None
    prune_from_epoch: int | None = None
    startup_trials: int | None = None


@dataclass
class Plan:
    """What :func:`prepare` settled before any daemon is contacted."""

    config: TuneConfig
    base: "PipelineSpec"
    pipeline_name: str
    params: list[Param]
    out: str
    storage: str
    study_name: str


def _slug(text: str) -> str:
    text = os.path.basename(os.path.normpath(text)) or text
    text = re.sub(r"\.(npz|ya?ml|json)$", "", text)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "data"


def default_pipeline(model: str) -> str:
    return "lenet5" if model.lower().startswith("lenet") else "resnet"


def prepare(config: TuneConfig) -> Plan:
    """Every check that needs no daemon: numbers, model, base spec, search space, paths. ValueError on a mistake."""
    from pydantic import ValidationError

    import pipelines
    from pipelines import format_validation_error

    checks = [
        (config.trials >= 1, f"--trials must be >= 1, got {config.trials}"),
        (config.epochs >= 1, f"--epochs must be >= 1, got {config.epochs}"),
        (config.batch_size >= 1, f"--batch-size must be >= 1, got {config.batch_size}"),
        (config.lr > 0, f"--lr must be > 0, got {config.lr}"),
        (config.jobs is None or config.jobs >= 1, f"--jobs must be >= 1, got {config.jobs}"),
        (config.timeout is None or config.timeout > 0, f"--timeout must be > 0 seconds, got {config.timeout}"),
        (config.threads >= 1, f"--threads must be >= 1, got {config.threads}"),
        (config.workers >= 1 or config.connect, f"--workers must be >= 1, got {config.workers}"),
        (config.prune_startup is None or config.prune_startup >= 0, f"--prune-startup must be >= 0, got {config.prune_startup}"),
        (config.prune_from_epoch is None or config.prune_from_epoch >= 1, f"--prune-from-epoch must be >= 1, got {config.prune_from_epoch}"),
        (config.startup_trials is None or config.startup_trials >= 1, f"--startup-trials must be >= 1, got {config.startup_trials}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    from trainer import models

    models.get_builder(config.model)  # ValueError naming the known models
    pipeline_name = config.pipeline or default_pipeline(config.model)
    try:
        base = pipelines.resolve(pipeline_name)
    except ValidationError as exc:
        raise ValueError(f"--pipeline {pipeline_name}: {format_validation_error(exc)}") from None
    params = build_search_space(base, config.params)
    out = config.out or os.path.join("out", f"tune-{_slug(config.model)}-{_slug(config.dataset)}")
    storage = config.storage or f"sqlite:///{os.path.abspath(os.path.join(out, 'study.db'))}"
    study_name = config.study_name or f"tune-{_slug(config.model)}-{_slug(config.dataset)}"
    return Plan(config, base, pipeline_name, params, out, storage, study_name)


def settings_of(plan: Plan) -> dict:
    """What must match for a stored study to be continued (JSON-able)."""
    c = plan.config
    return {
        "model": c.model, "dataset": c.dataset, "dataset_options": dict(c.dataset_options), "base_spec": plan.base.to_dict(),
        "params": [p.to_dict() for p in plan.params], "epochs": c.epochs, "batch_size": c.batch_size, "lr": c.lr, "seed": c.seed,
    }  # fmt: skip


# --- the daemon ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def study_daemon(config: TuneConfig):
    """The address every trial attaches to: ``connect``, or an embedded daemon for the whole study."""
    if config.connect:
        yield config.connect
        return
    from trainer.data import embedded_daemon

    with embedded_daemon(config.workers, config.backend, "cpu", config.serve_datasets) as address:
        yield address


def check_dataset(plan: Plan, address: str) -> dict:
    """Attach once to the train and the test split (closing at once): refuses an unknown dataset, bad
    options, or a dataset without a held-out split, in one line, before any trial runs."""
    from augserve import connect
    from trainer.data import eval_spec

    c = plan.config
    common = dict(dataset=c.dataset, batch_size=c.batch_size, epochs=1, dataset_options=c.dataset_options, prefetch=1, timeout=30.0)
    try:
        stream = connect(address, pipeline=plan.base, **common)
    except ValueError as exc:
        reason = str(exc).removeprefix("daemon refused the stream: ")
        raise ValueError(f"the daemon refused --dataset {c.dataset} with --pipeline {plan.pipeline_name}: {reason}") from None
    info = dict(stream.dataset_info)
    stream.close()
    try:
        stream = connect(address, pipeline=eval_spec(plan.base), split="test", shuffle=False, **common)
    except ValueError as exc:
        if "split" in str(exc):
            raise ValueError(f"--dataset {c.dataset} has no held-out (test) split, and tuning scores trials by held-out accuracy: {exc}") from None
        raise
    stream.close()
    return info


def daemon_workers(address: str) -> int:
    from augserve.status import fetch_status

    try:
        return len(fetch_status(address, timeout=5.0).get("workers", []))
    except ConnectionError:
        return 1


# --- one trial ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _forward_stop(stop: threading.Event, run):
    """While the block runs, a set ``stop`` becomes ``run.request_stop()``."""
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if stop.wait(0.05):
                run.request_stop()
                return

    watcher = threading.Thread(target=watch, daemon=True, name="trial-stop")
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


@contextlib.contextmanager
def _stop_on_interrupt(stop: threading.Event):
    """While optimizing: Ctrl-C sets ``stop`` (so running trials end at their next batch, as FAIL, and
    are run again on resume) and raises KeyboardInterrupt in the main thread as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        stop.set()
        raise KeyboardInterrupt

    def quiet_once_stopped(record: logging.LogRecord) -> bool:
        return not stop.is_set()  # no traceback per interrupted trial; one line says "interrupted"

    previous = signal.signal(signal.SIGINT, handler)
    optuna_log = logging.getLogger("optuna.study._optimize")  # where optuna logs each failed trial
    optuna_log.addFilter(quiet_once_stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        optuna_log.removeFilter(quiet_once_stopped)


def trial_reporter(trial, epochs: int):
    """An epoch callback for :class:`trainer.run.Run`: reports each epoch's held-out accuracy to the
    Optuna ``trial`` and ends the run (``optuna.TrialPruned``) when the pruner says so; the last epoch
    is never pruned."""
    import optuna

    def report(run, row: dict) -> None:
        value, epoch = row.get("val_accuracy"), row["epoch"]
        if value is None:
            raise ValueError(f"dataset {run.config.dataset!r} has no held-out split to score trials on")
        trial.report(value, epoch)
        if epoch < epochs and trial.should_prune():
            raise optuna.TrialPruned(f"held-out accuracy {value:.4f} after epoch {epoch} is below the median of earlier trials")

    return report


def make_objective(plan: Plan, address: str, stop: threading.Event | None = None) -> Callable:
    from trainer.run import Run, StopRequested, TrainConfig

    c = plan.config
    trial_dir = os.path.join(plan.out, "trials")
    spec_name = f"{plan.base.name or 'custom'}-tuned"

    def objective(trial) -> float:
        values = {p.name: p.suggest(trial) for p in plan.params}
        spec = apply_values(plan.base, values, name=spec_name)
        trial.set_user_attr("spec", spec.to_dict())
        path = os.path.join(trial_dir, f"trial-{trial.number:04d}.yaml")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(f"# trial {trial.number} of study {plan.study_name}: " + ", ".join(f"{k}={v:g}" for k, v in values.items()) + "\n")
            handle.write(spec.to_yaml())
        config = TrainConfig(
            model=c.model, dataset=c.dataset, dataset_options=dict(c.dataset_options), pipeline=spec, epochs=c.epochs,
            batch_size=c.batch_size, lr=c.lr, seed=c.seed, device=c.device, connect=address, out=None,
            tensorboard=False, progress=False,
        )  # fmt: skip
        run = Run(config, epoch_callbacks=[trial_reporter(trial, c.epochs)])
        # Ctrl-C reaches only the main thread: trials in worker threads watch ``stop`` and end at their
        # next batch, as FAIL (KeyboardInterrupt), to run again on resume.
        watcher = _forward_stop(stop, run) if stop is not None else contextlib.nullcontext()
        try:
            with watcher:
                summary = run.fit()
        except StopRequested:
            raise KeyboardInterrupt from None
        finally:
            run.world.close()
        if summary.get("accuracy") is None:
            raise ValueError(f"dataset {c.dataset!r} has no held-out split to score trials on")
        for key in ("train_accuracy", "img_per_s", "stall_pct", "time_s", "epochs"):
            trial.set_user_attr(key, summary.get(key))
        return float(summary["accuracy"])

    return objective


# --- the study ---------------------------------------------------------------------------------------


def open_study(plan: Plan, n_total: int):
    import optuna

    c = plan.config
    startup = c.startup_trials if c.startup_trials is not None else min(10, max(2, n_total // 3))
    sampler = optuna.samplers.TPESampler(seed=c.seed, n_startup_trials=startup)
    if c.prune:
        prune_startup = c.prune_startup if c.prune_startup is not None else min(5, max(2, n_total // 4))
        # Trials report step = epoch number (1, 2, ...); the earliest prune is at step == n_warmup_steps.
        prune_from = c.prune_from_epoch if c.prune_from_epoch is not None else max(1, math.ceil(c.epochs / 2))
        pruner = optuna.pruners.MedianPruner(n_startup_trials=prune_startup, n_warmup_steps=prune_from)
    else:
        pruner = optuna.pruners.NopPruner()
    engine_kwargs = {"connect_args": {"timeout": 60}} if plan.storage.startswith("sqlite") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(plan.storage, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=HEARTBEAT_GRACE_S)
    study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name=plan.study_name, direction="maximize", load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # RUNNING trials of a killed tuner, silent for HEARTBEAT_GRACE_S
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ValueError(f"study {plan.study_name!r} in {plan.storage} minimizes; a tuning study maximizes held-out accuracy (use another --study-name)")
    wanted = settings_of(plan)
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, wanted)
    elif stored != wanted:
        differ = ", ".join(k for k in wanted if stored.get(k) != wanted[k])
        raise ValueError(f"study {plan.study_name!r} in {plan.storage} was made with other settings ({differ}); continue it with the same ones, or pass another --study-name or --out")
    return study


def counted(study) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))


def progress_printer(stream=sys.stderr) -> Callable:
    """An Optuna callback printing one line per finished trial."""

    def callback(study, trial) -> None:
        state = trial.state.name.lower()
        value = "" if trial.value is None else f" {trial.value:.4f}"
        if trial.value is None and trial.intermediate_values:
            last = max(trial.intermediate_values)
            value = f" {trial.intermediate_values[last]:.4f} after epoch {last}"
        try:
            best = f"; best {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = ""
        params = " ".join(f"{k}={v:.4g}" for k, v in trial.params.items())
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        print(f"trial {trial.number} {state}{value} [{seconds:.1f} s] {params}{best}", file=stream, flush=True)

    return callback


def run_study(config: TuneConfig, progress: Callable | None = None) -> dict:
    """Run (or continue) the study and write its outputs; returns the summary (what ``--json`` prints)."""
    started = time.perf_counter()
    plan = prepare(config)
    import optuna
    import torch

    from . import report

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    threads = torch.get_num_threads()
    ran = 0
    try:
        with study_daemon(config) as address:
            check_dataset(plan, address)
            os.makedirs(os.path.join(plan.out, "trials"), exist_ok=True)
            study = open_study(plan, config.trials)
            before = counted(study)
            remaining = max(0, config.trials - before)
            jobs = config.jobs or max(1, min(2, daemon_workers(address)))
            jobs = max(1, min(jobs, remaining or 1))
            if config.baseline and not study.trials:
                start = baseline_values(plan.params)
                if start:
                    study.enqueue_trial(start, user_attrs={"baseline": True})
            if remaining:
                torch.set_num_threads(config.threads)
                done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                finished = []  # trials of this invocation that count (complete or pruned)
                callbacks = [optuna.study.MaxTrialsCallback(config.trials, states=done_states), lambda _s, t: finished.append(t.number) if t.state in done_states else None]
                if progress is not None:
                    callbacks.append(progress)
                stop = threading.Event()
                objective = make_objective(plan, address, stop)
                deadline = None if config.timeout is None else time.monotonic() + config.timeout
                # Enqueued (WAITING) trials run one at a time: on SQLite, two threads can pop the same
                # waiting trial (no SELECT ... FOR UPDATE; optuna/optuna#4002) and then both tell it.
                waiting = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
                with _stop_on_interrupt(stop):
                    if waiting and jobs > 1:
                        study.optimize(objective, n_trials=min(waiting, remaining), timeout=config.timeout, n_jobs=1, callbacks=callbacks)
                    left = config.trials - counted(study)
                    time_left = None if deadline is None else deadline - time.monotonic()
                    if left > 0 and (time_left is None or time_left > 0):
                        study.optimize(objective, n_trials=left, timeout=time_left, n_jobs=jobs, callbacks=callbacks)
                ran = len(finished)
    finally:
        torch.set_num_threads(threads)
        optuna.logging.set_verbosity(verbosity)
    summary = report.write_outputs(study, plan)
    summary.update({"n_ran": ran, "jobs": jobs, "time_s": round(time.perf_counter() - started, 1)})
    return summary
