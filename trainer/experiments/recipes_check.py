"""Do the default recipes learn? Train each model with nothing but ``--model`` and ``--dataset`` and
report held-out accuracy against chance: ``make recipes`` (writes docs/recipes.md).

    python -m trainer.experiments.recipes_check --models lenet5 resnet18 --datasets digits shapes

Every run is ``trainer.run.Run(TrainConfig(model=M, dataset=D))`` — the recipe settles the rest — on one
embedded daemon shared by all runs. A model "learns" when its test accuracy is at least twice chance
(1 / classes); the table says how far above it each run lands, with its steps, wall time and date.

The page is rewritten from its start to the end of its table; whatever follows the table (the story of
how the recipes were found, written by hand) is kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import date

DEFAULT_MODELS = ["lenet5", "lenet5_relu", "resnet20", "plain20", "resnet18", "resnet50", "googlenet", "mobilenet_v1", "mobilenet_v2", "alexnet", "vgg11", "vgg16"]
DEFAULT_DATASETS = ["digits", "shapes"]
CLASSES = {"digits": 10, "shapes": 6}


def check(model: str, dataset: str, address: str, seed: int = 0) -> dict:
    """One run with the recipe's defaults; returns the summary fields the table shows."""
    from trainer.recipes import recipe_for
    from trainer.run import Run, TrainConfig

    run = Run(TrainConfig(model=model, dataset=dataset, connect=address, seed=seed, progress=False, tensorboard=False))
    started = time.perf_counter()
    try:
        summary = run.fit()
    finally:
        run.close()
    chance = 1.0 / CLASSES.get(dataset, len(getattr(run, "classes", [])) or 10)
    return {
        "model": model, "dataset": dataset, "family": recipe_for(model).family, "pipeline": summary["pipeline"],
        "optimizer": summary.get("optimizer"), "lr": summary.get("lr"), "batch_size": summary.get("batch_size"), "dropout": summary.get("dropout"),
        "zero_init_residual": summary.get("zero_init_residual", False), "batch_norm": summary.get("batch_norm", False),
        "steps": summary["steps"], "epochs": summary["epochs"], "accuracy": summary["accuracy"], "chance": chance,
        "learns": summary["accuracy"] is not None and summary["accuracy"] >= 2 * chance, "time_s": round(time.perf_counter() - started, 1),
        "measured": date.today().isoformat(),
    }  # fmt: skip


def _model_options(row: dict) -> str:
    """The recipe's model options where it sets them (else the model's own are used and not shown)."""
    dropout = "" if row.get("dropout") is None else f", dropout {row['dropout']:g}"
    return dropout + (", zero-γ" if row.get("zero_init_residual") else "") + (", BatchNorm" if row.get("batch_norm") else "")


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# Do the default recipes learn?",
        "",
        "Each row is `python -m trainer train --model M --dataset D` with no other flag: the model's recipe",
        "(trainer/recipes.py) chooses batch size, optimiser, learning rate, warm-up, schedule, run length",
        "and the augmentation preset fitted to the dataset. Held-out = the dataset's test split.",
        f"Measured on a 2-core CPU machine with `{command}`.",
        "",
        "| model | dataset | family | pipeline | optimiser, lr, batch | steps (epochs) | test accuracy | chance | learns | time | measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        accuracy = "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['family']} | {r['pipeline']} | {r['optimizer']} {r['lr']:g}, {r['batch_size']}{_model_options(r)} | "
            f"{r['steps']} ({r['epochs']}) | {accuracy} | {100 * r['chance']:.1f}% | {'yes' if r['learns'] else '**no**'} | {r['time_s']:.0f} s | {r.get('measured', '–')} |"
        )
    return "\n".join(lines) + "\n"


def page(generated: str, existing: str | None) -> str:
    """The page to write: ``generated`` (heading, text, table) followed by whatever came after the
    table of the ``existing`` page (None: there was none)."""
    if not existing:
        return generated
    lines = existing.splitlines(keepends=True)
    table = [i for i, line in enumerate(lines) if line.startswith("|")]
    if not table:
        return generated
    rest = "".join(lines[table[-1] + 1 :]).lstrip("\n")
    return generated + ("\n" + rest if rest else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.experiments.recipes_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="docs/recipes.md", help="markdown table (a .jsonl of the rows is written beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import cv2
    import torch

    from trainer.data import embedded_daemon

    cv2.setNumThreads(0)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    rows = []
    jsonl = os.path.splitext(args.out)[0] + ".jsonl"
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with embedded_daemon(args.workers, "albumentations", "cpu", {}) as address, open(jsonl, "w", encoding="utf-8") as handle:
        for dataset in args.datasets:
            for model in args.models:
                row = check(model, dataset, address)
                rows.append(row)
                handle.write(json.dumps(row) + "\n")
                handle.flush()
                print(f"{model} on {dataset}: {row['accuracy']} in {row['steps']} steps, {row['time_s']} s", file=sys.stderr, flush=True)
    command = "python -m trainer.experiments.recipes_check " + " ".join(argv if argv is not None else sys.argv[1:])
    existing = None
    if os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as handle:
            existing = handle.read()
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(page(markdown(rows, command.strip()), existing))
    return 0 if all(r["learns"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
