"""``python -m trainer train ...`` — thin: parse, validate, run, print a summary (``--json``: one JSON
object on the last line). User mistakes end in one line and exit status 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Train the reference CNNs from an augserve stream.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="train a model (starts a local daemon unless --connect is given)")
    what = train.add_argument_group("what to train")
    what.add_argument("--model", default="lenet5", help="registered model name (see trainer.models.list_models())")
    what.add_argument("--dataset", default="digits", help="dataset name served by the daemon")
    what.add_argument("--dataset-option", action="append", metavar="KEY=VALUE", help="dataset option, e.g. size=64 (repeatable)")
    what.add_argument("--pipeline", help="preset name or spec file (default: the model's recipe preset, fitted to the dataset's image size and channels)")
    length = what.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="epochs to train (default: the model's recipe: at least its epochs and its step budget)")
    length.add_argument("--steps", type=int, help="optimiser steps to train instead, rounded up to whole epochs")
    what.add_argument("--batch-size", type=int, help="(default: the model's recipe)")
    optim = train.add_argument_group("optimisation")
    optim.add_argument("--optimizer", choices=["sgd", "adamw"], help="(default: the model's recipe)")
    optim.add_argument("--lr", type=float, help="peak learning rate (default: the model's recipe)")
    optim.add_argument("--momentum", type=float, default=0.9)
    optim.add_argument("--weight-decay", type=float, help="L2 regularisation, not applied to biases and norm layers (default: the model's recipe)")
    optim.add_argument("--schedule", choices=["step", "cosine", "constant"], help="(default: the model's recipe)")
    optim.add_argument("--warmup-epochs", type=float, help="linear warm-up (default: the model's recipe)")
    optim.add_argument("--step-epochs", type=int, default=30, help="step schedule: epochs between decays")
    optim.add_argument("--gamma", type=float, default=0.1, help="step schedule: decay factor")
    optim.add_argument("--label-smoothing", type=float, help="(default: the model's recipe)")
    optim.add_argument("--dropout", type=float, help="dropout of the classifier, for models that have one (default: the model's recipe, else the paper's)")
    optim.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, help="ResNets: start each residual block's last BatchNorm scale at zero, so every block starts as the identity (default: the model's recipe)")
    optim.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, help="VGG: the BatchNorm variant, a BN layer after each conv (default: the model's recipe; with --pretrained, what the weights have)")
    optim.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast precision")
    optim.add_argument("--channels-last", action="store_true")
    optim.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K")
    optim.add_argument("--seed", type=int, default=0)
    data = train.add_argument_group("data service")
    data.add_argument("--connect", help="address of a running daemon; without it a local daemon is started and stopped")
    data.add_argument("--workers", type=int, default=2, help="workers of the local daemon")
    data.add_argument("--backend", default="albumentations", choices=["albumentations", "torch", "dali"], help="local daemon's backend")
    data.add_argument("--worker-device", default="cpu", help="local daemon's device (cpu or cuda:K)")
    data.add_argument("--serve-dataset", action="append", metavar="NAME=PATH", help="local daemon: serve a folder or .npz as NAME")
    data.add_argument("--prefetch", type=int, default=8, help="batches in flight (credits)")
    run = train.add_argument_group("run")
    run.add_argument("--out", help="folder for checkpoint.pt, metrics.csv, tensorboard/ and summary.json")
    run.add_argument("--resume", help="checkpoint to resume from (model, optimizer, scaler and stream position)")
    run.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    run.add_argument("--stop-after", type=int, default=0, help="stop (with a checkpoint) after N steps in total")
    run.add_argument("--record-ids", help="append each step's epoch, batch index and sample ids to this file")
    run.add_argument("--no-tensorboard", action="store_true")
    run.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch log")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    evaluation = train.add_argument_group("evaluation")
    evaluation.add_argument("--multi-crop", type=int, default=1, choices=[1, 10], help="also report ten-crop accuracy")
    evaluation.add_argument("--ensemble", nargs="+", default=[], metavar="CHECKPOINT", help="also report the accuracy of these checkpoints' averaged softmax (with this run's model)")
    evaluation.add_argument("--eval-batch-size", type=int, default=256)
    transfer = train.add_argument_group("transfer learning")
    transfer.add_argument("--pretrained", help="weights to start from: a trainer checkpoint or a torchvision/timm state dict file")
    transfer.add_argument("--freeze", default="none", help="none, head (train only the classifier) or last:K (train the last K stages and the head)")
    transfer.add_argument("--no-feature-cache", action="store_true", help="with --freeze head: run the backbone every step instead of caching its activations")
    return parser


def config_from(args):
    from augserve.config import parse_dataset_pairs, parse_options

    from .run import TrainConfig

    return TrainConfig(
        model=args.model, dataset=args.dataset, dataset_options=parse_options(args.dataset_option), pipeline=args.pipeline,
        epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        optimizer=args.optimizer, schedule=args.schedule, warmup_epochs=args.warmup_epochs, step_epochs=args.step_epochs, gamma=args.gamma,
        label_smoothing=args.label_smoothing, dropout=args.dropout, zero_init_residual=args.zero_init_residual, batch_norm=args.batch_norm, amp=args.amp, channels_last=args.channels_last, device=args.device, connect=args.connect,
        workers=args.workers, backend=args.backend, worker_device=args.worker_device, serve_datasets=parse_dataset_pairs(args.serve_dataset or []),
        seed=args.seed, prefetch=args.prefetch, out=args.out, resume=args.resume, checkpoint_every=args.checkpoint_every,
        stop_after=args.stop_after, record_ids=args.record_ids, multi_crop=args.multi_crop, ensemble=list(args.ensemble),
        pretrained=args.pretrained, freeze=args.freeze, cache_features=not args.no_feature_cache, tensorboard=not args.no_tensorboard,
        progress=not (args.quiet or args.json), eval_batch_size=args.eval_batch_size,
    )  # fmt: skip


def format_summary(summary: dict) -> str:
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.2f}%"

    lines = [
        f"{summary['model']} on {summary['dataset']} ({summary['pipeline']}): held-out accuracy {pct(summary.get('accuracy'))}"
        + (f" (best {pct(summary.get('best_accuracy'))})" if summary.get("best_accuracy") is not None else ""),
        f"throughput {summary.get('img_per_s') or 0:.0f} img/s, data stall {summary.get('stall_pct') or 0:.1f}%, {summary.get('epochs')} epoch(s), {summary.get('steps')} steps, {summary.get('time_s')} s on {summary.get('device')}",
    ]
    if summary.get("multi_crop_accuracy") is not None:
        lines.append(f"ten-crop accuracy {pct(summary['multi_crop_accuracy'])} (single crop {pct(summary.get('accuracy'))})")
    if summary.get("ensemble_accuracy") is not None:
        lines.append(f"ensemble of {summary['ensemble_size']} accuracy {pct(summary['ensemble_accuracy'])} (single model {pct(summary.get('accuracy'))})")
    if summary.get("stopped_after"):
        lines.append(f"stopped after {summary['stopped_after']} steps as asked; resume with --resume")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if (args.quiet or args.json) else logging.INFO, format="%(message)s")
    import cv2
    from pydantic import ValidationError

    from pipelines import format_validation_error

    cv2.setNumThreads(0)
    try:
        from .run import Run

        run = Run(config_from(args))
        try:
            summary = run.fit()
        finally:
            run.close()
    except ValidationError as exc:
        print(f"trainer: error: {format_validation_error(exc)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, ConnectionError, TimeoutError, FileNotFoundError) as exc:
        print(f"trainer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trainer: interrupted", file=sys.stderr)
        return 130
    if not run.world.is_main:
        return 0  # rank 0 reports for the whole job
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    return 0
