"""Augmentation hyper-parameter tuning: ``augserve tune`` runs an Optuna study (TPE sampler, median
pruning on per-epoch held-out accuracy) whose trials are short training runs attached to one daemon.

    from trainer.tuning import TuneConfig, run_study
    summary = run_study(TuneConfig(model="lenet5_relu", dataset="digits", trials=20, params=["rotate.degrees=0:30"]))

Modules: :mod:`~trainer.tuning.params` (search space: parsing, bounds, applying values to a spec),
:mod:`~trainer.tuning.study` (the study, trials, daemon, resuming), :mod:`~trainer.tuning.report`
(best.yaml, trials.csv, plots), :mod:`~trainer.tuning.cli` (``add_parser`` for the ``augserve`` command).
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
