"""Median pruning against Hyperband for the same wall time: ``make tune-pruners``.

Runs one ``augserve tune`` study per pruner (median, hyperband, none) on one daemon, each stopped after
``--seconds`` of starting trials (``--timeout``), with the same seed, search space and step budget, and
reports how many trials each ran (complete / pruned) and the best val accuracy it found. Confirmation
is off: this compares search efficiency, not the final claim.

    python -m trainer.experiments.pruners --model lenet5_relu --dataset digits --seconds 120
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def compare(model: str, dataset: str, seconds: float, pruners: list[str], steps: int | None, workers: int, jobs: int) -> list[dict]:
    from trainer.data import embedded_daemon
    from trainer.tuning.study import TuneConfig, run_study

    rows = []
    with embedded_daemon(workers, "albumentations", "cpu", {}) as address, tempfile.TemporaryDirectory() as scratch:
        for pruner in pruners:
            config = TuneConfig(model=model, dataset=dataset, trials=1000, timeout=seconds, steps=steps, pruner=pruner, confirm_seeds=0,
                                connect=address, jobs=jobs, out=os.path.join(scratch, pruner), seed=0)  # fmt: skip
            summary = run_study(config)
            rows.append({
                "pruner": pruner, "trials": summary["n_complete"] + summary["n_pruned"], "complete": summary["n_complete"], "pruned": summary["n_pruned"],
                "best_val_accuracy": summary["best_value"], "time_s": summary["time_s"], "trial_epochs": summary["trial_epochs"],
            })  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| pruner | trials run | complete | pruned | best val accuracy | wall time |", "|---|---|---|---|---|---|"]
    for r in rows:
        best = "n/a" if r["best_val_accuracy"] is None else f"{r['best_val_accuracy']:.4f}"
        lines.append(f"| {r['pruner']} | {r['trials']} | {r['complete']} | {r['pruned']} | {best} | {r['time_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.experiments.pruners", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet5_relu")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--seconds", type=float, default=120.0, help="each study stops starting trials after this long")
    parser.add_argument("--pruners", nargs="+", default=["median", "hyperband", "none"], choices=["median", "hyperband", "none"])
    parser.add_argument("--steps", type=int, help="per trial (default: the model's recipe)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import cv2

    cv2.setNumThreads(0)
    print(markdown(compare(args.model, args.dataset, args.seconds, args.pruners, args.steps, args.workers, args.jobs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
