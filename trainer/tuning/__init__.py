"""Augmentation hyper-parameter tuning: ``augserve tune`` runs an Optuna study (TPE sampler, median or
Hyperband pruning on per-epoch val accuracy) whose trials are short training runs attached to one
daemon, and confirms the winner against the base spec on the test split across seeds.

    from trainer.tuning import TuneConfig, run_study
    summary = run_study(TuneConfig(model="lenet5_relu", dataset="digits", trials=20, params=["rotate.degrees=0:30"]))

Modules: :mod:`~trainer.tuning.params` (search space: parsing, bounds, applying values to a spec),
:mod:`~trainer.tuning.study` (the study, trials, daemon, resuming), :mod:`~trainer.tuning.runs` (one
training run in a study), :mod:`~trainer.tuning.confirm` (the confirmation across seeds),
:mod:`~trainer.tuning.report` (report.md, best.yaml, trials.csv, plots), :mod:`~trainer.tuning.cli` (``add_parser`` for the ``augserve`` command).
"""

from .params import DEFAULT_RANGES, Param, apply_values, baseline_values, build_search_space, default_params, parse_param

__all__ = [
    "DEFAULT_RANGES",
    "Param",
    "TuneConfig",
    "apply_values",
    "baseline_values",
    "build_search_space",
    "default_params",
    "parse_param",
    "run_study",
]


def __getattr__(name: str):
    # The study pulls in torch and optuna: only when asked for.
    if name in ("TuneConfig", "run_study"):
        from . import study

        return getattr(study, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
