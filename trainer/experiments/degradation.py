"""The degradation experiment of the ResNet paper (He et al. 2016, §4.2, Fig. 6) in miniature.

Trains plain and residual CIFAR-style nets of two depths (default 20 and 56 layers) on a built-in
dataset, all from one local daemon, and plots their training error per epoch. In the paper the deeper
*plain* net trains worse than the shallower one (degradation), while the deeper *residual* net trains
better. A few epochs on a small set show the trend, not the paper's numbers.

    python -m trainer.experiments.degradation --depths 20 56 --epochs 6 --out out/degradation.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def run(depths: list[int], dataset: str, pipeline: str, epochs: int, batch_size: int, lr: float, workers: int, dataset_options: dict, out_dir: str) -> dict:
    from trainer.data import embedded_daemon
    from trainer.run import Run, TrainConfig

    curves = {}
    with embedded_daemon(workers=workers) as address:
        for depth in depths:
            for kind in ("plain", "resnet"):
                name = f"{kind}{depth}"
                config = TrainConfig(
                    model=name, dataset=dataset, dataset_options=dataset_options, pipeline=pipeline, epochs=epochs, batch_size=batch_size,
                    lr=lr, weight_decay=1e-4, schedule="constant", warmup_epochs=0.0, connect=address, out=os.path.join(out_dir, name),
                    tensorboard=False, progress=False, seed=0,
                )  # fmt: skip
                summary = Run(config).fit()
                curves[name] = {"train_error": [1.0 - r["train_accuracy"] for r in _rows(out_dir, name)], "val_accuracy": summary["accuracy"]}
                print(f"{name}: final training error {curves[name]['train_error'][-1]:.3f}, held-out accuracy {summary['accuracy']}", file=sys.stderr, flush=True)
    return curves


def _rows(out_dir: str, name: str) -> list[dict]:
    import csv

    with open(os.path.join(out_dir, name, "metrics.csv"), encoding="utf-8") as handle:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(handle)]


def plot(curves: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, kind in zip(axes, ("plain", "resnet")):
        for name, curve in sorted(curves.items(), key=lambda item: int("".join(filter(str.isdigit, item[0])))):
            if name.startswith(kind):
                depth = "".join(filter(str.isdigit, name))
                axis.plot(range(1, len(curve["train_error"]) + 1), [100 * e for e in curve["train_error"]], marker="o", label=f"{depth} layers")
        axis.set_title("plain" if kind == "plain" else "residual")
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    axes[0].set_ylabel("training error (%)")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 56], help="6n+2 depths (20, 32, 44, 56, 110)")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE", help="default for shapes: size=32 n=2000")
    parser.add_argument("--pipeline", default="lenet5-free", help="preset or spec; the default is random crop with padding + mirror")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="out/degradation.png")
    args = parser.parse_args(argv)
    for depth in args.depths:
        if depth < 8 or (depth - 2) % 6:
            parser.error(f"--depths takes 6n+2 values (20, 32, 44, 56, 110), got {depth}")
    from augserve.config import parse_options

    options = {**({"size": 32, "n": 2000} if args.dataset == "shapes" else {}), **parse_options(args.dataset_option)}
    pipeline = args.pipeline
    if pipeline == "lenet5-free":  # CIFAR-style augmentation of the paper: 4-pixel padding + crop, mirror
        size = int(options.get("size", 32))  # digits are 32×32 too
        mirror = [] if args.dataset == "digits" else [{"op": "mirror"}]  # a mirrored digit is another symbol
        channels = 1 if args.dataset == "digits" else 3
        pipeline = {"name": "cifar", "ops": [{"op": "random_crop", "size": size, "padding": 4}, *mirror, {"op": "normalize", "mean": [0.5] * channels, "std": [0.25] * channels}]}
    out_dir = os.path.splitext(args.out)[0]
    os.makedirs(out_dir, exist_ok=True)
    curves = run(args.depths, args.dataset, pipeline, args.epochs, args.batch_size, args.lr, args.workers, options, out_dir)
    plot(curves, args.out, f"Training error on {args.dataset}: plain vs residual ({', '.join(map(str, args.depths))} layers)")
    with open(os.path.join(out_dir, "curves.json"), "w", encoding="utf-8") as handle:
        json.dump({k: v["train_error"] for k, v in curves.items()}, handle, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
