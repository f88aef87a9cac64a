"""The end of a study: is the best spec really better, or did the search pick a lucky draw?

Trials are scored on val with one seed; the best of many is biased upwards (the winner's curse). So the
study retrains three arms with K *new* seeds (``seed + 1 … seed + K``: the study's own seed took part
in the selection) on the same step budget as a trial, and scores each run once on the **test** split:

* ``tuned`` — the best trial's spec (left out when the best trial is the base spec itself);
* ``base``  — the base spec, what the user would train with anyway;
* ``none``  — no augmentation: the base spec's deterministic evaluation pipeline (resize, centre crop,
  normalize; :func:`trainer.data.eval_spec`).

Each arm reports test accuracy as mean ± sample standard deviation over its seeds. ``tuned`` beats
``base`` beyond noise when Welch's one-sided t-test (unequal variances) gives p < ``ALPHA``; only then
does the study write ``best.yaml``. ``base`` against ``none`` is reported the same way: what the
augmentation itself buys.

The runs (arms × seeds) go through the same daemon as the trials, ``jobs`` at a time. Their test
accuracies are stored in the study (``augserve_confirmation``), so running the same command again
reuses them while the best trial and the seeds are unchanged.
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import replace
from typing import Callable

ALPHA = 0.05
STORE_ATTR = "augserve_confirmation"


def seeds_for(study_seed: int, k: int) -> list[int]:
    """The K confirmation seeds: new ones, never the seed the trials were selected with."""
    return [study_seed + 1 + i for i in range(k)]


def welch(a: list[float], b: list[float]) -> dict:
    """Welch's t-test that mean(a) > mean(b): ``{"difference", "t", "df", "p"}``. ``p`` is None when the
    test is undefined (fewer than two values in an arm, or no spread in either)."""
    from scipy import stats

    difference = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2 or (statistics.variance(a) == 0 and statistics.variance(b) == 0):
        return {"difference": difference, "t": None, "df": None, "p": None}
    result = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch–Satterthwaite
    return {"difference": difference, "t": float(result.statistic), "df": df, "p": float(result.pvalue)}


def describe(values: list[float]) -> dict:
    return {
        "accuracies": list(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def arms_of(plan, best_trial) -> list[tuple[str, object]]:
    """``[(arm, spec), ...]``: tuned (unless the best trial is the base spec), base, none."""
    from pipelines import PipelineSpec
    from trainer.data import eval_spec

    arms = []
    spec = PipelineSpec.model_validate(best_trial.user_attrs["spec"])
    if not best_trial.user_attrs.get("baseline") and spec.ops != plan.base.ops:
        arms.append(("tuned", spec))
    arms.append(("base", plan.base))
    arms.append(("none", eval_spec(plan.base).model_copy(update={"name": "no-augmentation"})))
    return arms


def verdict(result: dict) -> str:
    """One sentence: does the tuned spec stand, or the base spec?"""
    arms = result["arms"]
    if "tuned" not in arms:
        return "the best trial is the base spec itself: the base spec stands"
    test = result["tuned_vs_base"]
    gain = 100 * test["difference"]
    if result["tuned_beats_base"]:
        return f"the tuned spec beats the base spec by {gain:+.2f} points of test accuracy (Welch p = {test['p']:.3g} < {ALPHA}): wrote best.yaml"
    why = "p undefined: no spread across seeds" if test["p"] is None else f"Welch p = {test['p']:.3g} >= {ALPHA}"
    return f"the tuned spec's {gain:+.2f} points over the base spec are within the noise across {len(arms['base']['accuracies'])} seeds ({why}): the base spec stands"


def confirm(plan, study, *, jobs: int, stop: threading.Event | None = None, progress: Callable[[str], None] | None = None) -> dict | None:
    """Run (or reuse) the confirmation of ``study``'s best trial; None when there is no complete trial
    or ``confirm_seeds`` is 0. Returns ``{"seeds", "best_trial", "arms": {arm: {accuracies, mean, std,
    spec}}, "tuned_vs_base", "base_vs_none", "tuned_beats_base", "verdict"}``."""
    from .runs import held_out_accuracies

    c = plan.config
    if not c.confirm_seeds:
        return None
    try:
        best = study.best_trial
    except ValueError:
        return None
    seeds = seeds_for(c.seed, c.confirm_seeds)
    arms = arms_of(plan, best)
    stored = study.user_attrs.get(STORE_ATTR) or {}
    accuracies: dict[str, list[float]] = {}
    if stored.get("best_trial") == best.number and stored.get("seeds") == seeds:
        accuracies = {arm: list(values) for arm, values in stored.get("accuracies", {}).items()}
    todo = [(arm, spec, seed) for arm, spec in arms for seed in seeds if len(accuracies.get(arm, [])) < len(seeds)]
    if todo:
        template = replace(plan.trial, eval_split="test")
        results = held_out_accuracies(template, todo, jobs=jobs, stop=stop, progress=progress, label="confirm ")
        for arm, _spec, seed in todo:
            accuracies.setdefault(arm, []).append(results[(arm, seed)])
        study.set_user_attr(STORE_ATTR, {"best_trial": best.number, "seeds": seeds, "accuracies": accuracies})
    result = {
        "seeds": seeds,
        "best_trial": best.number,
        "arms": {arm: {**describe(accuracies[arm]), "spec": spec.to_dict()} for arm, spec in arms},
        "base_vs_none": welch(accuracies["base"], accuracies["none"]),
    }
    if "tuned" in accuracies and any(arm == "tuned" for arm, _ in arms):
        test = welch(accuracies["tuned"], accuracies["base"])
        result["tuned_vs_base"] = test
        result["tuned_beats_base"] = test["p"] is not None and test["p"] < ALPHA and test["difference"] > 0
    else:
        result["tuned_vs_base"] = None
        result["tuned_beats_base"] = False
    result["verdict"] = verdict(result)
    return result
