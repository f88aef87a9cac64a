"""One training run inside a study (a trial, or a confirmation run): :class:`trainer.run.Run` in this
thread, ended at its next batch when the study's ``stop`` event is set (Ctrl-C reaches only the main
thread; runs in worker threads watch the event)."""

from __future__ import annotations

import contextlib
import threading
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
        run.world.close()
