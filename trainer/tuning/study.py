"""``augserve tune``: an Optuna study of augmentation hyper-parameters, scored on a validation split and
confirmed on the test split across seeds.

How a study runs
----------------
* **Search space** — :mod:`trainer.tuning.params`: fields of the base spec (``--param``) or the defaults.
* **Sampler** — TPE, seeded (``--seed``). Its first ``startup_trials`` trials are random (default
  ``min(10, max(2, trials // 3))``); when the study is new, the very first trial is the base spec itself
  (its values that lie inside the ranges), so the table always shows what the tuning bought.
* **Settled from the recipe** — batch size, optimiser, learning rate, base spec (the recipe's preset
  fitted to the dataset) and the trial budget (``steps``, rounded up to whole epochs) come from
  :mod:`trainer.recipes` unless given (:func:`settle`, once the daemon has described the dataset).
* **Objective** — top-1 accuracy on the dataset's *val* split after the last epoch: a stratified
  hold-out of ``val_fraction`` of the train split (seeded by ``seed``) that the trials' train stream
  never yields. Never training accuracy, never test. The base spec's trial ending at chance
  (:func:`chance_bound`) stops the study with one line (:class:`AtChance`): nothing to rank.
* **Confirmation** — :mod:`trainer.tuning.confirm`: the best spec, the base spec and no augmentation
  retrained with ``confirm_seeds`` new seeds and scored once on the *test* split; ``best.yaml`` only
  when the tuned spec beats the base spec (Welch's t-test).
* **Pruning** — ``pruner``: ``median`` (a MedianPruner: after every epoch the trial reports its val
  accuracy and is stopped when that falls below the median of earlier trials at the same epoch, never
  after its last epoch: a finished trial's value is kept; not before epoch ``prune_from_epoch``, default
  half the epochs, rounded up — stronger augmentation typically learns *slower* at first and ends
  better, so judging trials on their first epoch would bias the study towards weak augmentation;
  disabled for the first ``prune_startup`` complete trials, default ``min(5, max(2, trials // 4))``),
  ``hyperband`` (Optuna's HyperbandPruner over the epochs, smallest rung ``prune_from_epoch`` or 1,
  reduction factor 3) or ``none``.
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
  (model, dataset, base spec, search space, epochs, batch size, lr, optimiser, val fraction, seed) is
  refused rather than mixed — unless it holds no trial that counts (then it starts over).
* **Outputs** (``out``) — ``report.md``, ``best.yaml`` (only when confirmed; ``--pipeline best.yaml``
  trains with it), ``trials.csv``, ``history.png``, ``confirmation.png``, ``importances.png``, and
  ``trials/trial-NNNN.yaml`` (each trial's spec). See :mod:`trainer.tuning.report`.
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
    from trainer.run import TrainConfig

HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 40
SETTINGS_ATTR = "augserve_tune_settings"


@dataclass
class TuneConfig:
    model: str
    dataset: str
    trials: int = 20
    params: list[str] = field(default_factory=list)  # "path=LOW:HIGH[:log]"; empty → defaults
    pipeline: str | None = None  # preset or file; None → the model's recipe preset fitted to the dataset
    steps: int | None = None  # a trial's budget in optimiser steps (None → the recipe's trial_steps)
    epochs: int | None = None  # or in epochs (give one of the two)
    batch_size: int | None = None  # None → the recipe's
    lr: float | None = None  # None → the recipe's
    dataset_options: dict = field(default_factory=dict)
    val_fraction: float = 0.2  # the hold-out of train that scores trials
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
    pruner: str = "median"  # "median" | "hyperband" | "none"
    prune_startup: int | None = None
    prune_from_epoch: int | None = None
    startup_trials: int | None = None
    confirm_seeds: int = 3  # K: retrain best, base spec and no augmentation with K new seeds (0: skip)


PRUNERS = ("median", "hyperband", "none")


@dataclass
class Plan:
    """What :func:`prepare` settled before any daemon is contacted, and :func:`settle` once the
    daemon described the dataset (``trial`` is then every trial's training config but its spec)."""

    config: TuneConfig
    base: "PipelineSpec"
    pipeline_name: str
    params: list[Param]
    out: str
    storage: str
    study_name: str
    trial: "TrainConfig | None" = None
    classes: int = 0
    val_size: int = 0


def _slug(text: str) -> str:
    text = os.path.basename(os.path.normpath(text)) or text
    text = re.sub(r"\.(npz|ya?ml|json)$", "", text)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "data"


def prepare(config: TuneConfig) -> Plan:
    """Every check that needs no daemon: numbers, model, base spec, search space, paths. ValueError on a mistake."""
    from pydantic import ValidationError

    import pipelines
    from pipelines import format_validation_error

    checks = [
        (config.trials >= 1, f"--trials must be >= 1, got {config.trials}"),
        (config.steps is None or config.steps >= 1, f"--steps must be >= 1, got {config.steps}"),
        (config.epochs is None or config.epochs >= 1, f"--epochs must be >= 1, got {config.epochs}"),
        (config.steps is None or config.epochs is None, "give --steps or --epochs, not both"),
        (config.batch_size is None or config.batch_size >= 1, f"--batch-size must be >= 1, got {config.batch_size}"),
        (config.lr is None or config.lr > 0, f"--lr must be > 0, got {config.lr}"),
        (0.0 < config.val_fraction < 1.0, f"--val-fraction must be strictly between 0 and 1, got {config.val_fraction}"),
        (config.jobs is None or config.jobs >= 1, f"--jobs must be >= 1, got {config.jobs}"),
        (config.timeout is None or config.timeout > 0, f"--timeout must be > 0 seconds, got {config.timeout}"),
        (config.threads >= 1, f"--threads must be >= 1, got {config.threads}"),
        (config.workers >= 1 or config.connect, f"--workers must be >= 1, got {config.workers}"),
        (config.pruner in PRUNERS, f"--pruner must be one of {', '.join(PRUNERS)}, got {config.pruner!r}"),
        (config.prune_startup is None or config.prune_startup >= 0, f"--prune-startup must be >= 0, got {config.prune_startup}"),
        (config.prune_from_epoch is None or config.prune_from_epoch >= 1, f"--prune-from-epoch must be >= 1, got {config.prune_from_epoch}"),
        (config.startup_trials is None or config.startup_trials >= 1, f"--startup-trials must be >= 1, got {config.startup_trials}"),
        (config.confirm_seeds >= 0, f"--confirm-seeds must be >= 0, got {config.confirm_seeds}"),
        (config.confirm_seeds != 1, "--confirm-seeds 1 cannot measure noise: use 0 (skip) or >= 2"),
        (not set(config.dataset_options) & {"val_fraction", "val_seed"}, "the hold-out is the tuner's: pass --val-fraction, not dataset options val_fraction/val_seed"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    from trainer import models
    from trainer.recipes import recipe_for

    models.get_builder(config.model)  # ValueError naming the known models
    if config.pipeline is None:
        pipeline_name = recipe_for(config.model).pipeline  # fitted to the dataset by settle()
    else:
        pipeline_name = config.pipeline
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
    c, t = plan.config, plan.trial
    return {
        "model": c.model, "dataset": c.dataset, "dataset_options": dict(c.dataset_options), "base_spec": plan.base.to_dict(),
        "params": [p.to_dict() for p in plan.params], "epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr,
        "optimizer": t.optimizer, "val_fraction": c.val_fraction, "seed": c.seed,
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


def _attach(address: str, refused: str, **options):
    """Attach (then the caller closes); a refusal becomes one line: ``refused`` + the daemon's reason."""
    from augserve import connect

    try:
        return connect(address, epochs=1, prefetch=1, timeout=30.0, **options)
    except ValueError as exc:
        reason = str(exc).removeprefix("daemon refused the stream: ")
        raise ValueError(f"{refused}: {reason}") from None


def settle(plan: Plan, address: str) -> Plan:
    """Ask the daemon about the dataset and settle every trial's training config: the recipe's batch
    size, optimiser and learning rate (unless given), the base spec fitted to the images (when no
    --pipeline was given), and the number of epochs that gives the step budget. Refuses, in one line and
    before any trial runs, an unknown dataset, bad options, a spec the dataset cannot take, or a dataset
    without the held-out splits tuning needs (val, carved from train; test, for the confirmation)."""
    from dataclasses import replace

    from trainer import recipes
    from trainer.data import eval_spec
    from trainer.run import PROBE_SPEC, TrainConfig

    c = plan.config
    recipe = recipes.recipe_for(c.model) if None in (c.batch_size, c.lr, c.pipeline) or c.epochs is None else None
    batch_size = c.batch_size or recipe.batch_size
    options = {**c.dataset_options, "val_fraction": c.val_fraction, "val_seed": c.seed}
    common = dict(dataset=c.dataset, batch_size=batch_size, dataset_options=options)
    probe = _attach(address, f"the daemon refused --dataset {c.dataset}", pipeline=PROBE_SPEC, **common)
    facts, classes = recipes.dataset_facts(probe), len(probe.dataset_info["classes"])
    batches = facts["batches_per_epoch"]
    probe.close()
    if batches < 1:
        raise ValueError(f"--dataset {c.dataset}: the train split (less the {c.val_fraction:g} hold-out) has no full batch of {batch_size}: lower --batch-size")
    base, params = plan.base, plan.params
    if c.pipeline is None:
        base = recipes.default_pipeline(recipe, facts["channels"], facts["image_size"])
        params = build_search_space(base, c.params)
    _attach(address, f"the daemon refused --dataset {c.dataset} with --pipeline {base.name or plan.pipeline_name}", pipeline=base, **common).close()
    val = _attach(address, f"--dataset {c.dataset} cannot hold out a val split to score trials on", pipeline=eval_spec(base), split="val", shuffle=False, **common)
    val_size = int(val.samples_per_epoch)
    val.close()
    if c.confirm_seeds:
        test = _attach(address, f"--dataset {c.dataset} has no test split for the final confirmation (pass --confirm-seeds 0 to skip it)", pipeline=eval_spec(base), split="test", shuffle=False, **common)
        test.close()
    if c.epochs is not None:
        epochs = c.epochs
    else:
        epochs = recipes.run_epochs(1, c.steps or recipe.trial_steps, batches)
    trial = recipes.settle(
        TrainConfig(model=c.model, dataset=c.dataset, dataset_options=options, pipeline=base, epochs=epochs, batch_size=batch_size,
                    lr=c.lr, seed=c.seed, device=c.device, connect=address, eval_split="val", out=None, tensorboard=False, progress=False)
    )  # fmt: skip
    return replace(plan, base=base, params=params, trial=trial, classes=classes, val_size=val_size)


def daemon_workers(address: str) -> int:
    from augserve.status import fetch_status

    try:
        return len(fetch_status(address, timeout=5.0).get("workers", []))
    except ConnectionError:
        return 1


class AtChance(ValueError):
    """The base spec's trial learnt nothing measurable: the study stops rather than rank noise."""


def chance_bound(classes: int, held_out: int) -> float:
    """Accuracy a classifier guessing one class reaches on a stratified hold-out of ``held_out`` samples,
    plus three binomial standard deviations: a trial at or below it has learnt nothing we can tell."""
    p = 1.0 / max(1, classes)
    return p + 3.0 * math.sqrt(p * (1 - p) / max(1, held_out))


# --- one trial ---------------------------------------------------------------------------------------


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
        return not stop.is_set()  # no traceback per interrupted trial; one line says why (interrupted, at chance)

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


def make_objective(plan: Plan, stop: threading.Event | None = None) -> Callable:
    """Optuna's objective: one training run of the trial's spec, scored by its val accuracy. The base
    spec's own trial (enqueued first) ending at chance stops the study: its settings do not learn, and
    ranking the other trials would rank noise."""
    from dataclasses import replace

    from .runs import train_once

    c = plan.config
    trial_dir = os.path.join(plan.out, "trials")
    spec_name = f"{plan.base.name or 'custom'}-tuned"
    bound = chance_bound(plan.classes, plan.val_size)

    def objective(trial) -> float:
        values = {p.name: p.suggest(trial) for p in plan.params}
        spec = apply_values(plan.base, values, name=spec_name)
        trial.set_user_attr("spec", spec.to_dict())
        path = os.path.join(trial_dir, f"trial-{trial.number:04d}.yaml")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(f"# trial {trial.number} of study {plan.study_name}: " + ", ".join(f"{k}={v:g}" for k, v in values.items()) + "\n")
            handle.write(spec.to_yaml())
        summary = train_once(replace(plan.trial, pipeline=spec), stop, [trial_reporter(trial, plan.trial.epochs)])
        if summary.get("accuracy") is None:
            raise ValueError(f"dataset {c.dataset!r} has no held-out split to score trials on")
        for key in ("train_accuracy", "img_per_s", "stall_pct", "time_s", "epochs", "steps"):
            trial.set_user_attr(key, summary.get(key))
        value = float(summary["accuracy"])
        if trial.user_attrs.get("baseline") and value <= bound:
            t = plan.trial
            if stop is not None:
                stop.set()  # the study ends here: no traceback from Optuna, one line from the CLI
            raise AtChance(
                f"the base spec's trial ended at chance: val accuracy {value:.4f} <= {bound:.4f} ({plan.classes} classes, {plan.val_size} val samples) "
                f"after {summary.get('steps')} steps of {c.model} (batch {t.batch_size}, {t.optimizer} lr {t.lr:g}); "
                "nothing to rank: raise --steps (or --epochs), or change --lr, and run again"
            )
        return value

    return objective


# --- the study ---------------------------------------------------------------------------------------


def open_study(plan: Plan, n_total: int):
    import optuna

    c = plan.config
    startup = c.startup_trials if c.startup_trials is not None else min(10, max(2, n_total // 3))
    sampler = optuna.samplers.TPESampler(seed=c.seed, n_startup_trials=startup)
    epochs = plan.trial.epochs
    if c.pruner == "median":
        prune_startup = c.prune_startup if c.prune_startup is not None else min(5, max(2, n_total // 4))
        # Trials report step = epoch number (1, 2, ...); the earliest prune is at step == n_warmup_steps.
        prune_from = c.prune_from_epoch if c.prune_from_epoch is not None else max(1, math.ceil(epochs / 2))
        pruner = optuna.pruners.MedianPruner(n_startup_trials=prune_startup, n_warmup_steps=prune_from)
    elif c.pruner == "hyperband":
        # Successive halving in several brackets over the epochs a trial reports (Li et al. 2018); the
        # smallest rung is prune_from_epoch (default 1), each next rung 3× later.
        pruner = optuna.pruners.HyperbandPruner(min_resource=c.prune_from_epoch or 1, max_resource=epochs, reduction_factor=3)
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
    if stored is not None and stored != wanted and not counted(study):
        # Nothing was learnt under the old settings (e.g. the base spec's trial ended at chance, and the
        # user raised --steps): start over instead of refusing.
        optuna.delete_study(study_name=plan.study_name, storage=storage)
        return open_study(plan, n_total)
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
            plan = settle(plan, address)
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
                objective = make_objective(plan, stop)
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
            from .confirm import confirm

            torch.set_num_threads(config.threads)
            stop = threading.Event()
            say = None if progress is None else (lambda line: print(line, file=sys.stderr, flush=True))
            with _stop_on_interrupt(stop):
                confirmation = confirm(plan, study, jobs=jobs, stop=stop, progress=say)
    finally:
        torch.set_num_threads(threads)
        optuna.logging.set_verbosity(verbosity)
    summary = report.write_outputs(study, plan, confirmation)
    summary.update({"n_ran": ran, "jobs": jobs, "time_s": round(time.perf_counter() - started, 1)})
    return summary
