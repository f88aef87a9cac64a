"""``augserve bench trainer``: registered here, above the service, because it trains a model (see
:mod:`trainer.bench.trainer_bench`). ``augserve/cli.py`` calls :func:`add_parser` beside the service's own
bench commands; the flags, errors and output follow :mod:`augserve.bench.cli`."""

from __future__ import annotations

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


def add_parser(bench_kinds, backends: list[str]) -> None:
    """Register ``trainer`` on the ``augserve bench`` sub-parsers (``backends``: the backend names)."""
    trainer = bench_kinds.add_parser("trainer", help="a real training step fed by augserve vs by a torch DataLoader: images/s and data stall")
    trainer.add_argument("--model", default="lenet5_relu", help="a model of trainer.models (e.g. lenet5_relu, resnet18)")
    trainer.add_argument("--dataset", default="digits", help="built-in name (digits, shapes, photos), a folder of class sub-folders, or a .npz file")
    trainer.add_argument("--dataset-option", action="append", metavar="KEY=VALUE", help="dataset option, e.g. size=64 for shapes (repeatable)")
    trainer.add_argument("--pipeline", default="lenet5", help="preset: lenet5, alexnet, vgg, resnet, inception or mobilenet (the DataLoader side needs its albumentations equivalent)")
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
