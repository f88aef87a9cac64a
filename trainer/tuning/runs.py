"""One training run inside a study (a trial, or a confirmation run), and a set of them in parallel: :class:`trainer.run.Run` in this
thread, ended at its next batch when the study's ``stop`` event is set (Ctrl-C reaches only the main
thread; runs in worker threads watch the event)."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Iterable


@contextlib.contextmanager
def forward_stop(stop: threading.Event, run):
    """While the block runs, a set ``stop`` becomes ``run.request_stop()``."""
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if stop.wait(0.05):
                run.request_stop()
                return

    watcher = threading.Thread(target=watch, daemon=True, name="run-stop")
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def train_once(config, stop: threading.Event | None = None, epoch_callbacks: Iterable[Callable] = ()) -> dict:
    """Train ``config`` (a settled :class:`trainer.run.TrainConfig`) and return its summary. A stop
    request surfaces as KeyboardInterrupt (an Optuna trial then ends FAIL and runs again on resume)."""
    from trainer.run import Run, StopRequested

    run = Run(config, epoch_callbacks=epoch_callbacks)
    watcher = forward_stop(stop, run) if stop is not None else contextlib.nullcontext()
    try:
        with watcher:
            return run.fit()
    except StopRequested:
        raise KeyboardInterrupt from None
    finally:
        run.close()


def held_out_accuracies(template, runs, *, jobs: int, stop: threading.Event | None = None, progress: Callable[[str], None] | None = None, label: str = "") -> dict:
    """Train ``template`` (a settled or settleable :class:`trainer.run.TrainConfig`) once per
    ``(arm, spec, seed)`` of ``runs`` with that pipeline and seed, ``jobs`` runs at a time (threads,
    as trials are), and return ``{(arm, seed): held-out accuracy}`` (on ``template.eval_split``).
    ``progress`` gets one line per finished run, prefixed with ``label``."""
    results: dict[tuple[str, int], float] = {}

    def one(arm: str, spec, seed: int) -> None:
        started = time.perf_counter()
        summary = train_once(replace(template, pipeline=spec, seed=seed), stop)
        results[(arm, seed)] = float(summary["accuracy"])
        if progress is not None:
            progress(f"{label}{arm} seed {seed}: {template.eval_split} accuracy {summary['accuracy']:.4f} [{time.perf_counter() - started:.1f} s]")

    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="run") as pool:
        for future in [pool.submit(one, *run) for run in runs]:
            future.result()
    return results
