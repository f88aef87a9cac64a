"""Interleaved timing: every candidate runs once per round, rounds repeat, medians are reported.

Interleaving spreads the noise of a shared machine over all candidates alike, so their ratio holds
even when absolute figures drift. The order alternates, forwards in even rounds and backwards in odd
ones, so that no candidate always runs right after the same one: with a fixed order, a candidate that
followed another of the same kind measured ~5% faster than in the opposite position (caches, the
allocator's free lists), a bias that a ratio does not cancel.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def round_order(candidates: dict[str, Callable[[int], int]], round_index: int) -> list[tuple[str, Callable[[int], int]]]:
    """The candidates in the order round ``round_index`` runs them: as given in even rounds, reversed
    in odd ones."""
    order = list(candidates.items())
    return order if round_index % 2 == 0 else order[::-1]


def interleaved(candidates: dict[str, Callable[[int], int]], rounds: int, warmup: int = 1) -> dict[str, dict]:
    """``candidates``: name -> function(round) returning the number of images it processed.

    Returns name -> {"images_per_s": median over rounds, "runs": [images/s of each round]}.
    """
    for round_index in range(warmup):
        for run in candidates.values():
            run(-1 - round_index)
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(rounds):
        for name, run in round_order(candidates, round_index):
            start = time.perf_counter()
            count = run(round_index)
            rates[name].append(count / (time.perf_counter() - start))
    return {name: {"images_per_s": statistics.median(values), "runs": values} for name, values in rates.items()}
