"""``augserve tune``: the argparse side. ``add_parser(subcommands)`` registers the subcommand on the
``augserve`` command's subparsers (with ``func=run_command``); ``main(argv)`` runs it on its own
(``python -m trainer.tuning ...``) with the same error handling as ``augserve``: a mistake ends in one
line ``augserve: error: ...`` on stderr and exit status 2.

This module imports nothing heavy (no torch, no optuna) until the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

EXAMPLES = """examples:
  augserve tune --model lenet5 --dataset digits
  augserve tune --model lenet5_relu --dataset digits --trials 20 --pruner hyperband
  augserve tune --model resnet18 --dataset shapes --dataset-option size=64 --trials 30 \\
      --param random_resized_crop.scale.0=0.05:0.6 --param pca_color.alpha_std=0.01:0.5:log
  augserve tune ... --connect tcp://127.0.0.1:5555 --jobs 2   # a running daemon

Parameters address a field of the base spec as OP.FIELD (first op of that name), N.FIELD (op number N)
or OP.FIELD.I (element I of a pair). Without --param: the crop's smallest area (scale.0, 0.05-0.5),
rotate.degrees (0-30), shear.degrees (0-20), pca_color.alpha_std (0-0.3), color_shift.limit (0-40),
warp.magnitude (0-0.1) -- for the ops the base spec has.

Trials are scored on a hold-out of the train split (--val-fraction); the test split is used once, at
the end: the best spec, the base spec and no augmentation are retrained with --confirm-seeds new seeds
and best.yaml is written only when the best spec beats the base spec beyond noise (Welch's t-test).
Batch size, learning rate, optimiser, run length and base spec come from the model's recipe unless
given. Running the same command again continues the study stored in --storage and runs only the
trials still missing to reach --trials."""


def add_parser(subcommands) -> argparse.ArgumentParser:
    """Register ``tune`` on ``subcommands`` (an ``add_subparsers()`` result); returns its parser."""
    tune = subcommands.add_parser(
        "tune",
        help="search augmentation hyper-parameters with an Optuna study (TPE, pruning on val accuracy, confirmed across seeds)",
        description="Search augmentation hyper-parameters: each trial trains --model for a budget of optimiser steps on a daemon's stream with a candidate spec and is scored by top-1 accuracy on a hold-out of train (val); the winner is confirmed on the test split across seeds.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = tune.add_argument_group("what to tune")
    what.add_argument("--model", required=True, help="registered model name (see trainer.models.list_models())")
    what.add_argument("--dataset", required=True, help="dataset name served by the daemon (needs a test split for the confirmation)")
    what.add_argument("--dataset-option", action="append", metavar="KEY=VALUE", help="dataset option, e.g. size=64 (repeatable)")
    what.add_argument("--pipeline", help="base spec: preset name or spec file (default: the model's recipe preset fitted to the dataset)")
    what.add_argument("--param", action="append", metavar="PATH=LOW:HIGH[:log]", help="a field to search, e.g. rotate.degrees=0:30 or random_resized_crop.scale.0=0.05:0.5 (repeatable; default: see below)")
    study = tune.add_argument_group("study")
    study.add_argument("--trials", type=int, default=20, help="complete + pruned trials the study should hold in total (default 20)")
    study.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    study.add_argument("--seed", type=int, default=0, help="seeds the TPE sampler, the streams and the models' initial weights")
    study.add_argument("--jobs", type=int, help="trials at once, as threads (default: min(2, daemon workers))")
    study.add_argument("--startup-trials", type=int, help="random trials before TPE models the results (default min(10, max(2, trials/3)))")
    study.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"], help="median: stop a trial below the median of earlier ones at the same epoch; hyperband: successive halving in brackets (default median)")
    study.add_argument("--prune-startup", type=int, help="complete trials before the median pruner acts (default min(5, max(2, trials/4)))")
    study.add_argument("--prune-from-epoch", type=int, help="median: earliest epoch after which a trial may be pruned (default: half the epochs, rounded up); hyperband: its smallest rung (default 1)")
    study.add_argument("--no-prune", action="store_true", help="run every trial to its last epoch (= --pruner none)")
    study.add_argument("--no-baseline", action="store_true", help="do not start a new study with the base spec's own values")
    study.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT/study.db)")
    study.add_argument("--study-name", help="default: tune-MODEL-DATASET")
    trial = tune.add_argument_group("each trial")
    length = trial.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimiser steps per trial, rounded up to whole epochs (default: the model's recipe)")
    length.add_argument("--epochs", type=int, help="epochs per trial instead")
    trial.add_argument("--batch-size", type=int, help="default: the model's recipe")
    trial.add_argument("--lr", type=float, help="default: the model's recipe")
    trial.add_argument("--val-fraction", type=float, default=0.2, help="share of each class of the train split held out to score trials (default 0.2)")
    trial.add_argument("--device", default="auto", help="trainer device: auto, cpu, cuda or cuda:K")
    trial.add_argument("--threads", type=int, default=1, help="torch intra-op threads per trial (default 1)")
    data = tune.add_argument_group("data service")
    data.add_argument("--connect", help="address of a running daemon; without it one daemon is started for the whole study")
    data.add_argument("--workers", type=int, default=2, help="workers of the embedded daemon (default 2)")
    data.add_argument("--backend", default="albumentations", choices=["albumentations", "torch", "dali"], help="embedded daemon's backend")
    data.add_argument("--serve-dataset", action="append", metavar="NAME=PATH", help="embedded daemon: serve a folder or .npz as NAME")
    confirm = tune.add_argument_group("confirmation")
    confirm.add_argument("--confirm-seeds", type=int, default=3, help="retrain best, base spec and no augmentation with K new seeds and compare on the test split (default 3; 0 skips, and no best.yaml is written)")
    output = tune.add_argument_group("output")
    output.add_argument("--out", help="folder for report.md, best.yaml, trials.csv, history.png, confirmation.png, importances.png, study.db (default out/tune-MODEL-DATASET)")
    output.add_argument("--quiet", action="store_true", help="no line per finished trial on stderr")
    output.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    tune.set_defaults(func=run_command)
    return tune


def config_from(args):
    from augserve.config import parse_dataset_pairs, parse_options

    from .study import TuneConfig

    return TuneConfig(
        model=args.model, dataset=args.dataset, trials=args.trials, params=list(args.param or []), pipeline=args.pipeline,
        steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, dataset_options=parse_options(args.dataset_option),
        val_fraction=args.val_fraction, confirm_seeds=args.confirm_seeds,
        seed=args.seed, jobs=args.jobs, timeout=args.timeout, connect=args.connect, workers=args.workers, backend=args.backend,
        serve_datasets=parse_dataset_pairs(args.serve_dataset or []), device=args.device, threads=args.threads, out=args.out,
        storage=args.storage, study_name=args.study_name, baseline=not args.no_baseline, pruner="none" if args.no_prune else args.pruner,
        prune_startup=args.prune_startup, prune_from_epoch=args.prune_from_epoch, startup_trials=args.startup_trials,
    )  # fmt: skip


def format_summary(summary: dict) -> str:
    lines = []
    if summary["best_value"] is None:
        lines.append("no complete trial yet: nothing to call best")
    else:
        params = ", ".join(f"{k}={v:.4g}" for k, v in summary["best_params"].items())
        base = f" (base spec {summary['baseline_value']:.4f})" if summary.get("baseline_value") is not None else ""
        lines.append(f"best val accuracy {summary['best_value']:.4f}{base} at trial {summary['best_trial']}: {params}")
    confirmation = summary.get("confirmation")
    if confirmation is not None:
        from .report import ARM_LABELS, format_arm

        arms = ", ".join(f"{ARM_LABELS[arm]} {format_arm(stats)}" for arm, stats in confirmation["arms"].items())
        lines.append(f"test accuracy over seeds {confirmation['seeds']}: {arms}")
        lines.append(confirmation["verdict"])
    elif summary["best_value"] is not None:
        lines.append(f"not confirmed across seeds (--confirm-seeds 0): no best.yaml; the best trial's spec is {summary['best_trial_spec']}")
    lines.append(
        f"{summary['n_trials']} trial(s) in study {summary['study_name']}: {summary['n_complete']} complete, {summary['n_pruned']} pruned"
        + (f", {summary['n_failed']} failed" if summary.get("n_failed") else "")
        + f"; {summary['n_ran']} run now ({summary['time_s']} s)"
    )
    lines.append(f"wrote {summary['report_md']}, {summary['trials_csv']}, {summary['history_png']}, {summary['importances_png']}")
    if summary.get("importances_note"):
        lines.append(f"note: {summary['importances_note']}")
    elif summary.get("importances"):
        lines.append("importances: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["importances"].items()))
    return "\n".join(lines)


def run_command(args) -> int:
    """``augserve tune``: run or continue the study, print the trial table and the summary."""
    import cv2

    from .study import progress_printer, run_study

    cv2.setNumThreads(0)
    summary = run_study(config_from(args), progress=None if args.quiet else progress_printer())
    table = summary.pop("table")
    print(table)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="augserve", description="Data-augmentation service for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``augserve tune ...`` standalone (``argv`` with or without the leading ``tune``)."""
    import logging

    from pydantic import ValidationError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] != ["tune"]:
        argv = ["tune", *argv]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pipelines import format_validation_error

    try:
        return args.func(args)
    except ValidationError as exc:
        print(f"augserve: error: {format_validation_error(exc)}", file=sys.stderr)
    except (ValueError, TypeError, FileNotFoundError, ConnectionError, TimeoutError) as exc:
        print(f"augserve: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("augserve: interrupted", file=sys.stderr)
        return 130
    return 2
