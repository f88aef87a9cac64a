"""``augserve bench trainer`` and ``augserve bench gpu-e2e``: registered here, above the service, because
they train a model (see :mod:`trainer.bench.trainer_bench` and :mod:`trainer.bench.gpu_e2e`).
``augserve/cli.py`` calls :func:`add_parser` beside the service's own bench commands; the flags, errors
and output follow :mod:`augserve.bench.cli`."""

from __future__ import annotations

import argparse
import os
import sys

from augserve.bench.cli import add_output_flags, at_least, plot_note, print_rows_and_summary, progress_for
from augserve.config import parse_options


def cmd_bench_trainer(args) -> int:
    from augserve.bench.plots import check_png_path

    at_least(args, 1, "workers", "batch_size", "steps", "rounds", "threads")
    at_least(args, 0, "warmup_steps")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    check_png_path(args.plot)
    from trainer.bench.trainer_bench import TrainerBenchConfig, format_table, json_rows, plot, run_trainer_bench

    config = TrainerBenchConfig(
        model=args.model, dataset=args.dataset, dataset_options=parse_options(args.dataset_option),
        pipeline=args.pipeline, batch_size=args.batch_size, steps=args.steps, warmup_steps=args.warmup_steps,
        workers=args.workers, rounds=args.rounds, backend=args.backend, threads=args.threads, lr=args.lr,
    )  # fmt: skip
    result = run_trainer_bench(config, progress=progress_for(args))
    if args.plot:
        result["plot"] = plot(result, args.plot)
    print_rows_and_summary(args, json_rows(result), result, format_table(result) + plot_note(args.plot))
    return 0


def cmd_bench_gpu_e2e(args) -> int:
    from augserve.bench.plots import check_png_path

    at_least(args, 1, "gpu_workers", "dataloader_workers", "dali_threads", "batch_size", "steps", "rounds", "threads", "crop_size", "images")
    at_least(args, 0, "warmup_steps")
    for name in ("lr", "timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.folder is not None and args.images is not None:
        raise ValueError("--images sizes the generated folder: it does not apply to --folder")
    check_png_path(args.plot)
    from trainer.bench.gpu_e2e import check_device, format_table, json_rows, plot, run_gpu_e2e
    from trainer.bench.trainer_bench import TrainerBenchConfig

    device = str(check_device(args.device))  # before anything is written or started
    config = TrainerBenchConfig(
        model=args.model, pipeline=args.pipeline, crop_size=args.crop_size, batch_size=args.batch_size, steps=args.steps,
        warmup_steps=args.warmup_steps, rounds=args.rounds, workers=args.gpu_workers, backend=args.backend, threads=args.threads,
        lr=args.lr, device=device, worker_device=device, precision=args.precision, channels_last=args.channels_last,
        dataloader_workers=args.dataloader_workers or os.cpu_count() or 1, dali_threads=args.dali_threads, child_timeout_s=args.timeout,
    )  # fmt: skip
    # Progress on stderr with --json too: stdout stays machine-readable, and a run cut short by a time
    # limit still leaves each finished run's figures behind.
    result = run_gpu_e2e(config, folder=args.folder, images=2048 if args.images is None else args.images, progress=lambda text: print(text, file=sys.stderr, flush=True))
    if args.plot:
        result["plot"] = plot(result, args.plot)
    print_rows_and_summary(args, json_rows(result), result, format_table(result) + plot_note(args.plot))
    return 1 if result["failed"] else 0


def add_parser(bench_kinds, backends: list[str]) -> None:
    """Register ``trainer`` and ``gpu-e2e`` on the ``augserve bench`` sub-parsers (``backends``: the
    backend names)."""
    trainer = bench_kinds.add_parser("trainer", help="a real training step fed by augserve vs by a torch DataLoader: images/s and data stall")
    trainer.add_argument("--model", default="lenet5_relu", help="a model of trainer.models (e.g. lenet5_relu, resnet18)")
    trainer.add_argument("--dataset", default="digits", help="built-in name (digits, shapes, photos), a folder of class sub-folders, or a .npz file")
    trainer.add_argument("--dataset-option", action="append", metavar="KEY=VALUE", help="dataset option, e.g. size=64 for shapes (repeatable)")
    trainer.add_argument("--pipeline", default="lenet5", help="preset: lenet5, cifar, alexnet, vgg, resnet, inception or mobilenet (the DataLoader side needs its albumentations equivalent)")
    trainer.add_argument("--batch-size", type=int, default=128)
    trainer.add_argument("--steps", type=int, default=60, help="timed training steps per run")
    trainer.add_argument("--warmup-steps", type=int, default=5, help="untimed steps before them")
    trainer.add_argument("--workers", type=int, default=2, help="augmentation worker processes on both sides")
    trainer.add_argument("--rounds", type=int, default=2, help="alternating runs per loader; medians are reported")
    trainer.add_argument("--backend", default="albumentations", choices=backends, help="augserve workers' backend")
    trainer.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    trainer.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    add_output_flags(trainer)
    trainer.set_defaults(func=cmd_bench_trainer)

    gpu_e2e = bench_kinds.add_parser(
        "gpu-e2e", help="ResNet-50 (bf16, channels_last) trained on a GPU from JPEG photos: augserve vs DataLoader vs DALI vs synthetic data",
        description="Trains a model on a CUDA device from a folder of JPEG photos (by default 2,048 generated photos of 500×375), fed by "
        "augserve (torch workers on the same GPU), by a torch DataLoader + albumentations with all host cores, and by DALI's own "
        "pipeline and PyTorch iterator, then on one pre-made batch (synthetic: the model's own speed); alternating runs, medians. "
        "Reports images/s trained, data stall, the ratios and issue 11's targets. Exit status 1 when the augserve, DataLoader or "
        "synthetic run failed. --device cpu runs the same pipeline on the CPU as a check.",
    )  # fmt: skip
    gpu_e2e.add_argument("--device", default="cuda:0", help="the trainer's and the augserve workers' device (cuda[:K], or cpu for a check)")
    gpu_e2e.add_argument("--model", default="resnet50", help="a model of trainer.models")
    gpu_e2e.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="bf16 autocast or full float32")
    gpu_e2e.add_argument("--channels-last", default=True, action=argparse.BooleanOptionalAction, help="model and batches in channels_last memory format")
    gpu_e2e.add_argument("--folder", metavar="DIR", help="your image folder (class sub-folders of JPEG files) instead of generated photos")
    gpu_e2e.add_argument("--images", type=int, metavar="N", help="photos of 500×375 to generate (default 2048)")
    gpu_e2e.add_argument("--pipeline", default="resnet", help="preset every loader applies (DALI: its random_resized_crop, mirror and normalize)")
    gpu_e2e.add_argument("--crop-size", type=int, metavar="PIXELS", help="the preset's random_resized_crop size (default: the preset's, 224 for resnet)")
    gpu_e2e.add_argument("--batch-size", type=int, default=256)
    gpu_e2e.add_argument("--steps", type=int, default=30, help="timed training steps per run")
    gpu_e2e.add_argument("--warmup-steps", type=int, default=10, help="untimed steps before them")
    gpu_e2e.add_argument("--rounds", type=int, default=2, help="alternating runs per loader; medians are reported")
    gpu_e2e.add_argument("--gpu-workers", type=int, default=8, help="augserve worker processes (on --device)")
    gpu_e2e.add_argument("--backend", default="torch", choices=backends, help="augserve workers' backend")
    gpu_e2e.add_argument("--dataloader-workers", type=int, help="DataLoader worker processes (default: all host cores)")
    gpu_e2e.add_argument("--dali-threads", type=int, help="DALI pipeline threads (default: as many as DataLoader workers)")
    gpu_e2e.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    gpu_e2e.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    gpu_e2e.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS", help="longest one trainer process may take before its row is marked failed")
    add_output_flags(gpu_e2e)
    gpu_e2e.set_defaults(func=cmd_bench_gpu_e2e)
