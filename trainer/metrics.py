"""Run metrics: a CSV row per epoch, TensorBoard scalars, and a progress bar with img/s and data stall.

Data-stall % is the share of a step's wall time spent waiting for its batch: 0% means the loader keeps
up; 50% means the model sat idle half the time.
"""

from __future__ import annotations

import csv
import os
import sys
import time


class StepTimer:
    """Accumulates wait (time blocked on the next batch) and step (wait + compute) seconds."""

    def __init__(self) -> None:
        self.wait = 0.0
        self.total = 0.0
        self.images = 0
        self._mark = time.perf_counter()

    def batch_arrived(self) -> None:
        now = time.perf_counter()
        self.wait += now - self._mark
        self._arrived = now

    def step_done(self, images: int) -> None:
        now = time.perf_counter()
        self.total += now - self._mark
        self.images += images
        self._mark = now

    def restart(self) -> None:
        """Start the clock afresh (after evaluation, so it does not count as waiting)."""
        self._mark = time.perf_counter()

    @property
    def stall_pct(self) -> float:
        return 100.0 * self.wait / self.total if self.total else 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.total if self.total else 0.0


class MetricsLog:
    """``metrics.csv`` (one row per epoch) and, when available, TensorBoard event files in ``folder``."""

    FIELDS = ["epoch", "step", "train_loss", "train_accuracy", "val_accuracy", "lr", "img_per_s", "stall_pct", "elapsed_s"]

    def __init__(self, folder: str | None, tensorboard: bool = True, fresh: bool = True) -> None:
        """``fresh``: a new run starts a new ``metrics.csv``; a resumed run (``fresh=False``) appends."""
        self.folder = folder
        self.writer = None
        if folder is None:
            return
        os.makedirs(folder, exist_ok=True)
        self.csv_path = os.path.join(folder, "metrics.csv")
        if fresh or not os.path.exists(self.csv_path):
            with open(self.csv_path, "w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerow(self.FIELDS)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(folder, "tensorboard"))

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def epoch(self, row: dict) -> None:
        if self.folder is None:
            return
        with open(self.csv_path, "a", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow([_format(row.get(k)) for k in self.FIELDS])
        for key in ("train_loss", "train_accuracy", "val_accuracy", "img_per_s", "stall_pct"):
            if row.get(key) is not None:
                self.scalar(f"epoch/{key}", row[key], row["epoch"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _format(value):
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else value)


def progress_bar(total: int, description: str, enabled: bool, initial: int = 0):
    """A tqdm bar on stderr (disabled in JSON mode or when asked)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="batch", disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=True)
