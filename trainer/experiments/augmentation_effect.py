"""Does augmentation pay off? The papers' claim checked in miniature: ``make augmentation-effect``.

On a built-in dataset cut to a few samples per class (shapes, 100 per class by default: where a
network overfits and augmentation should matter most), one model is trained with K seeds per arm and
scored on the test split:

* ``none``        no augmentation (the preset's deterministic resize / centre crop / normalize);
* ``preset``      the model's recipe preset (LeNet's: small translations, rotation, shear);
* ``tuned``       the best spec of a short ``augserve tune`` study on the same data (scored on val, a
  hold-out of train: the test split is used here only);
* ``crop+flip``   AlexNet/ResNet-style random-resized crops and mirroring, without PCA lighting;
* ``crop+flip+pca`` the same plus AlexNet's PCA lighting (alpha_std 0.1), which the paper credits with
  "over 1%" less top-1 error on ImageNet.

The table gives test accuracy mean ± std per arm; Welch's one-sided t-tests say whether an arm beats
``none`` and whether PCA lighting beats the same chain without it. Whatever comes out is reported.

    python -m trainer.experiments.augmentation_effect --out docs/augmentation-effect
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

LABELS = {
    "none": "no augmentation",
    "preset": "recipe preset",
    "tuned": "tuned",
    "crop+flip": "crop + flip",
    "crop+flip+pca": "crop + flip + PCA",
}


def crop_flip(side: int, pca: bool) -> dict:
    """Random-resized crop (scale 0.25–1) + mirror (+ PCA lighting) + normalize, at ``side``²."""
    ops = [{"op": "random_resized_crop", "size": side, "scale": [0.25, 1.0]}, {"op": "mirror"}]
    if pca:
        ops.append({"op": "pca_color", "alpha_std": 0.1})
    ops.append({"op": "normalize"})
    return {"name": "crop-flip-pca" if pca else "crop-flip", "ops": ops}


def tuned_spec(args, address: str, out_dir: str):
    """The best trial's spec of a short study on the same data (its own confirmation is this experiment)."""
    from pipelines import PipelineSpec
    from trainer.tuning.study import TuneConfig, run_study

    summary = run_study(
        TuneConfig(model=args.model, dataset=args.dataset, dataset_options=args.dataset_options, trials=args.trials, steps=args.steps,
                   seed=0, connect=address, out=os.path.join(out_dir, "tune"), confirm_seeds=0, jobs=args.jobs)
    )  # fmt: skip
    if summary["best_trial_spec"] is None:
        raise ValueError("the tuning study ended without a complete trial")
    print(f"tuned: trial {summary['best_trial']}, val accuracy {summary['best_value']:.4f}, {summary['best_params']}", file=sys.stderr, flush=True)
    return PipelineSpec.from_file(summary["best_trial_spec"]), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.experiments.augmentation_effect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet5_relu")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--dataset-option", action="append", metavar="KEY=VALUE", help="default for shapes: n=600 size=32 (100 per class)")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per run (and per tuning trial)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=12, help="trials of the tuning study")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="docs/augmentation-effect", help="writes OUT.png, OUT.md and OUT.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import cv2
    import torch

    from augserve.config import parse_options
    from trainer.data import embedded_daemon
    from trainer.tuning.confirm import describe, welch
    from trainer.tuning.report import plot_confirmation

    args.dataset_options = parse_options(args.dataset_option) if args.dataset_option else ({"n": 600, "size": 32} if args.dataset == "shapes" else {})
    cv2.setNumThreads(0)
    torch.set_num_threads(1)
    started = time.perf_counter()
    work_dir = args.out + "-runs"
    with embedded_daemon(args.workers, "albumentations", "cpu", {}) as address:
        tuned, study = tuned_spec(args, address, work_dir)
        result = run_arms(args, address, tuned)
    seeds = result["seeds"]
    arms = {arm: {**describe(values), "spec": result["specs"][arm]} for arm, values in result["accuracies"].items()}
    tests = {f"{arm} vs none": welch(result["accuracies"][arm], result["accuracies"]["none"]) for arm in arms if arm != "none"}
    tests["crop+flip+pca vs crop+flip"] = welch(result["accuracies"]["crop+flip+pca"], result["accuracies"]["crop+flip"])
    summary = {
        "model": args.model, "dataset": args.dataset, "dataset_options": args.dataset_options, "steps": args.steps, "seeds": seeds,
        "arms": arms, "tests": tests, "tuned_params": study["best_params"], "time_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    options = ", ".join(f"{k}={v}" for k, v in args.dataset_options.items())
    plot_confirmation({"arms": arms}, args.out + ".png", f"{args.model} on {args.dataset} ({options}), {args.steps} steps\ntest accuracy over seeds {seeds}", labels=LABELS)
    with open(args.out + ".md", "w", encoding="utf-8") as handle:
        handle.write(markdown(summary, "python -m trainer.experiments.augmentation_effect " + " ".join(argv if argv is not None else sys.argv[1:])))
    print(markdown(summary, ""), flush=True)
    return 0


def run_arms(args, address: str, tuned) -> dict:
    """Every arm × seed, ``jobs`` runs at a time; test accuracy of each."""
    import pipelines
    from trainer import recipes
    from trainer.data import eval_spec
    from trainer.run import TrainConfig
    from trainer.tuning.runs import held_out_accuracies

    from augserve.sources import open_dataset

    template = TrainConfig(model=args.model, dataset=args.dataset, dataset_options=args.dataset_options, steps=args.steps, connect=address, out=None, tensorboard=False, progress=False)
    source = open_dataset(args.dataset, "train", **args.dataset_options)  # a built-in set: its shape, read here
    if source.channels != 3 or source.image_size is None:
        raise ValueError(f"--dataset {args.dataset}: this experiment needs RGB images of one size (PCA lighting, crops of one side)")
    side = min(source.image_size)
    preset = recipes.default_pipeline(recipes.recipe_for(args.model), 3, source.image_size)
    specs = {
        "none": eval_spec(preset).model_copy(update={"name": "no-augmentation"}),
        "preset": preset,
        "tuned": tuned,
        "crop+flip": pipelines.resolve(crop_flip(side, pca=False)),
        "crop+flip+pca": pipelines.resolve(crop_flip(side, pca=True)),
    }
    seeds = [1 + i for i in range(args.seeds)]
    runs = [(arm, spec, seed) for arm, spec in specs.items() for seed in seeds]
    results = held_out_accuracies(template, runs, jobs=args.jobs, progress=lambda line: print(line, file=sys.stderr, flush=True))
    accuracies = {arm: [results[(arm, seed)] for seed in seeds] for arm in specs}
    return {"seeds": seeds, "accuracies": accuracies, "specs": {arm: spec.to_dict() for arm, spec in specs.items()}}


def markdown(summary: dict, command: str) -> str:
    from trainer.tuning.report import format_arm

    lines = [
        "| arm | test accuracy (mean ± std) | runs |",
        "|---|---|---|",
    ]
    for arm, stats in summary["arms"].items():
        lines.append(f"| {LABELS[arm]} | {format_arm(stats)} | " + ", ".join(f"{100 * v:.1f}" for v in stats["accuracies"]) + " |")
    lines.append("")
    for name, test in summary["tests"].items():
        p = "undefined" if test["p"] is None else f"{test['p']:.3g}"
        lines.append(f"- {name}: {100 * test['difference']:+.2f} points, Welch one-sided p = {p}")
    if command:
        lines += ["", f"`{command.strip()}` ({summary['time_s']:.0f} s)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
