"""The ``augserve bench`` subcommands of the service: ``pipelines``, ``e2e``, ``gpu``, ``sampling``, ``soak``,
``transport``, ``decoders`` and ``control-plane`` (``trainer`` and ``gpu-e2e``,
which train, are registered by :mod:`trainer.bench.cli`, above the service).

``augserve/cli.py`` calls :func:`add_bench_commands` with its ``bench`` sub-parsers. Every handler takes
the parsed ``args``, raises ValueError (one line) for a user's mistake, and prints either a readable
table or, with ``--json``, one JSON object per line: the rows first, the summary object last.
``--plot PATH.png`` also writes a chart (matplotlib, Agg backend).

Heavy imports (torch, OpenCV, albumentations, matplotlib) happen inside the handlers, so building the
parser stays cheap.
"""

from __future__ import annotations

import json
import sys



def print_rows_and_summary(args, rows: list[dict], summary: dict, text: str) -> None:
    if args.json:
        for row in rows:
            print(json.dumps(row))
        print(json.dumps(summary))
    else:
        print(text)


def progress_for(args):
    """Progress lines on stderr in table mode; quiet with --json (stdout stays machine-readable)."""
    if args.json:
        return None
    return lambda text: print(text, file=sys.stderr, flush=True)


def at_least(args, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def plot_note(path: str | None) -> str:
    return f"\nwrote {path}" if path else ""


# --- handlers ----------------------------------------------------------------------------------------


def cmd_bench_gpu(args) -> int:
    from .plots import check_png_path

    check_png_path(args.plot)
    from .gpu import format_table, plot, run_gpu_bench

    result = run_gpu_bench(device=args.device, rounds=args.rounds, batch=args.batch, batches=args.batches, jpeg_files=args.jpeg_files,
                           threads=args.threads, progress=progress_for(args))  # fmt: skip
    if args.plot:
        result["plot"] = plot(result, args.plot)
    print_rows_and_summary(args, result["rows"], result, format_table(result) + plot_note(args.plot))
    return 0


def cmd_bench_sampling(args) -> int:
    at_least(args, 1, "batch", "rounds", "threads")
    from .sampling import format_table, run_sampling_bench

    result = run_sampling_bench(batch=args.batch, rounds=args.rounds, devices=args.device or None, threads=args.threads)
    print_rows_and_summary(args, result["rows"], result, format_table(result))
    return 0


def cmd_bench_pipelines(args) -> int:
    from .plots import check_png_path

    at_least(args, 1, "images", "rounds", "threads", "op_rounds")
    check_png_path(args.plot)
    from .pipeline_throughput import format_table, json_rows, plot, run_benchmark

    result = run_benchmark(images=args.images, rounds=args.rounds, threads=args.threads, backends=args.backend or None, progress=progress_for(args), per_op=args.per_op, op_rounds=args.op_rounds)
    if args.plot:
        result["plot"] = plot(result, args.plot)
    print_rows_and_summary(args, json_rows(result), result, format_table(result) + plot_note(args.plot))
    return 0


def cmd_bench_e2e(args) -> int:
    from .plots import check_png_path

    at_least(args, 1, "workers", "batch_size", "batches", "rounds", "images", "photo_count")
    photos = args.photos or args.folder is not None
    if args.no_npz and not photos:
        raise ValueError("--no-npz leaves nothing to measure: add --photos or --folder DIR")
    if args.scaling and args.no_npz:
        raise ValueError("--scaling measures the .npz comparison: drop --no-npz")
    if not args.no_npz and args.images < args.batch_size:
        raise ValueError(f"--images ({args.images}) must be at least --batch-size ({args.batch_size})")
    if args.photo_count is not None and (args.folder is not None or not args.photos):
        raise ValueError("--photo-count sizes the generated photos of --photos: it does not apply " + ("to --folder" if args.folder is not None else "without --photos"))
    photo_count = 96 if args.photo_count is None else args.photo_count
    if photos and args.folder is None and photo_count < args.batch_size:
        raise ValueError(f"--photo-count ({photo_count}) must be at least --batch-size ({args.batch_size})")
    check_png_path(args.plot)
    from .e2e import format_table, json_rows, plot, run_e2e

    result = run_e2e(
        workers=args.workers, batch_size=args.batch_size, batches=args.batches, rounds=args.rounds, images=args.images, progress=progress_for(args),
        scaling=args.scaling, npz=not args.no_npz, photos=photos, folder=args.folder, photo_count=photo_count,
    )  # fmt: skip
    if args.plot:
        result["plot"] = plot(result, args.plot)
    print_rows_and_summary(args, json_rows(result), result, format_table(result) + plot_note(args.plot))
    return 0


def cmd_bench_soak(args) -> int:
    from .soak import SoakConfig, format_table, json_rows, run_soak

    config = SoakConfig(
        minutes=args.minutes, workers=args.workers, kill_every_s=args.kill_every, samples=args.samples, size=args.size,
        batch_size=args.batch_size, prefetch=args.prefetch, pause_every_s=args.pause_every, pause_s=args.pause,
        reattach_every_s=args.reattach_every, retune_every_s=args.retune_every, min_epochs=args.min_epochs, seed=args.seed, out=args.out,
    )  # fmt: skip
    result = run_soak(config, progress=progress_for(args))
    print_rows_and_summary(args, json_rows(result), result, format_table(result))
    return 0 if result["ok"] else 1


def cmd_bench_transport(args) -> int:
    from .transport import TransportBenchConfig, format_table, json_rows, run_transport_bench

    config = TransportBenchConfig(batch_images=tuple(args.batch_images), size=args.size, rounds=args.rounds, batches=args.batches, timeout_s=args.timeout)
    result = run_transport_bench(config, progress=progress_for(args))
    print_rows_and_summary(args, json_rows(result), result, format_table(result))
    return 0


def cmd_bench_decoders(args) -> int:
    at_least(args, 1, "photos", "rounds", "batch")
    if args.device is not None:  # whole batches on one device: which decoder a GPU worker should use
        from .device_decoders import format_table, run_device_decoders

        result = run_device_decoders(device=args.device, photos=args.photos, rounds=args.rounds, batch=args.batch, progress=progress_for(args))
        rows = [{"benchmark": "decoders-device", **row} for row in result["rows"]]
        print_rows_and_summary(args, rows, {"benchmark": "decoders-device", **result["config"]}, format_table(result))
        return 0
    from .decoders import format_table, run_decoders

    result = run_decoders(photos=args.photos, rounds=args.rounds, progress=progress_for(args))
    rows = [{"benchmark": "decoders", **row} for row in result["rows"]]
    print_rows_and_summary(args, rows, {"benchmark": "decoders", **result["config"]}, format_table(result))
    return 0


def cmd_bench_control_plane(args) -> int:
    from .control_plane import ControlPlaneConfig, format_table, json_rows, run_control_plane_bench

    config = ControlPlaneConfig(
        workers=tuple(args.worker_counts), streams=tuple(args.stream_counts), clients=tuple(args.client), seconds=args.seconds, batch_size=args.batch_size,
        prefetch=args.prefetch, capacity=args.capacity, malformed_every=args.malformed_every, idle_workers=args.idle_workers, timeout_s=args.timeout,
    )  # fmt: skip
    result = run_control_plane_bench(config, progress=progress_for(args))
    print_rows_and_summary(args, json_rows(result), result, format_table(result))
    return 0 if result["exactly_once"] else 1


# --- registration ------------------------------------------------------------------------------------


def add_output_flags(sub) -> None:
    """``--json`` and ``--plot PATH.png``, as every chart-drawing bench takes them."""
    sub.add_argument("--json", action="store_true", help="one JSON object per line: the rows, then the summary")
    sub.add_argument("--plot", metavar="PATH.png", help="also write a PNG chart")


def add_bench_commands(bench_kinds, backends: list[str]) -> None:
    """Register ``pipelines``, ``e2e``, ``gpu``, ``sampling``, ``soak``, ``transport``, ``decoders`` and ``control-plane``
    under ``augserve bench`` (``bench_kinds``: the ``bench`` parser's sub-parsers; ``backends``: the augmentation backend
    names)."""

    pipelines_ = bench_kinds.add_parser("pipelines", help="images/s per core: our backends vs an ordinary albumentations Compose")
    pipelines_.add_argument("--images", type=int, default=64, help="batch size (256² inputs)")
    pipelines_.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    pipelines_.add_argument("--threads", type=int, default=1, help="threads per process (1 = per core)")
    pipelines_.add_argument("--backend", action="append", choices=backends, help="only these backends (repeatable)")
    pipelines_.add_argument("--per-op", action="store_true", help="also each op alone and each preset, every backend vs its albumentations equivalent")
    pipelines_.add_argument("--op-rounds", type=int, default=None, help="interleaved rounds of the --per-op pass (default: --rounds, at most 3)")
    add_output_flags(pipelines_)
    pipelines_.set_defaults(func=cmd_bench_pipelines)

    e2e = bench_kinds.add_parser(
        "e2e", help="images/s delivered to a trainer process: augserve vs torch DataLoader",
        description="Images/s delivered to a trainer process, augserve vs torch DataLoader + albumentations, alternating runs, medians. "
        "By default on an .npz of decoded 256² images with the alexnet preset; --photos adds the same comparison on a folder of "
        "generated JPEG photos (--folder DIR: on yours), --no-npz leaves the .npz one out. --workers, --batch-size, --batches and "
        "--rounds apply to both.",
    )  # fmt: skip
    e2e.add_argument("--workers", type=int, default=2, help="worker processes on both sides (with --scaling: the largest count)")
    e2e.add_argument("--batch-size", type=int, default=64)
    e2e.add_argument("--batches", type=int, default=30, help="timed batches per run (after 3 warm-up batches)")
    e2e.add_argument("--rounds", type=int, default=3, help="alternating runs per loader; medians are reported")
    e2e.add_argument("--images", type=int, default=512, help="images in the 256² source (.npz)")
    e2e.add_argument("--scaling", action="store_true", help="measure the .npz comparison at every worker count from 1 to --workers (a scaling curve)")
    e2e.add_argument("--photos", action="store_true", help="also compare on JPEG photos (generated: a mix of 500×375 and 1600×1200), random-resized-crop 224 + mirror + normalize; "
                     "the baseline decodes each file with cv2.imread")  # fmt: skip
    e2e.add_argument("--folder", metavar="DIR", help="the photo comparison on your own image folder (class sub-folders of JPEG/PNG/BMP files) instead of generated photos; implies --photos")
    e2e.add_argument("--photo-count", type=int, metavar="N", help="photos generated for --photos, half at each size (default 96)")
    e2e.add_argument("--no-npz", action="store_true", help="leave out the .npz comparison (with --photos or --folder)")
    add_output_flags(e2e)
    e2e.set_defaults(func=cmd_bench_e2e)

    gpu = bench_kinds.add_parser("gpu", help="the torch backend's chain vs DALI, kornia and torchvision v2, in memory and from JPEG files, with issue 11's targets")
    gpu.add_argument("--device", default="cuda:0", help="cuda[:K]; cpu runs every row on the CPU as a check, not a measurement")
    gpu.add_argument("--rounds", type=int, default=10, help="interleaved rounds; medians are reported")
    gpu.add_argument("--batch", type=int, default=256, help="images per batch (256² inputs in memory, 500×375 JPEG files)")
    gpu.add_argument("--batches", type=int, default=8, help="batches per candidate and round")
    gpu.add_argument("--jpeg-files", type=int, default=None, help="JPEG photos written for the file table (default 2 × --batch; 0 leaves it out)")
    gpu.add_argument("--threads", type=int, default=None, help="CPU threads of torch, DALI and nvImageCodec (default the host's cores, at most 8)")
    add_output_flags(gpu)
    gpu.set_defaults(func=cmd_bench_gpu)

    sampling = bench_kinds.add_parser("sampling", help="host time to plan a batch: numpy sample + fuse vs sampling on the worker's device")
    sampling.add_argument("--batch", type=int, default=256, help="samples per batch (256² inputs)")
    sampling.add_argument("--rounds", type=int, default=30, help="interleaved rounds; medians are reported")
    sampling.add_argument("--device", action="append", help="cpu, cuda:0, ... (repeatable; default: cpu, and cuda:0 when available)")
    sampling.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a worker uses 1)")
    sampling.add_argument("--json", action="store_true", help="one JSON object per line: the rows, then the summary")
    sampling.set_defaults(func=cmd_bench_sampling)

    soak = bench_kinds.add_parser("soak", help="minutes of four trainers against a daemon whose workers get SIGKILLed: exactly-once per epoch, memory, restarts")
    soak.add_argument("--minutes", type=float, default=30.0, help="how long the trainers stream")
    soak.add_argument("--workers", type=int, default=3, help="local worker processes of the daemon")
    soak.add_argument("--kill-every", type=float, default=5.0, metavar="SECONDS", help="SIGKILL a random worker this often (0: no chaos)")
    soak.add_argument("--samples", type=int, default=600, help="images in the shapes set (its n option)")
    soak.add_argument("--size", type=int, default=32, help="shapes image side in pixels")
    soak.add_argument("--batch-size", type=int, default=32)
    soak.add_argument("--prefetch", type=int, default=4, help="credits per stream")
    soak.add_argument("--pause-every", type=float, default=10.0, metavar="SECONDS", help="the pausing trainer stops consuming this often ...")
    soak.add_argument("--pause", type=float, default=3.0, metavar="SECONDS", help="... for this long")
    soak.add_argument("--reattach-every", type=float, default=15.0, metavar="SECONDS", help="the pausing trainer checkpoints and re-attaches this often")
    soak.add_argument("--retune-every", type=float, default=3.0, metavar="SECONDS", help="the re-tuned trainer updates its pipeline this often")
    soak.add_argument("--min-epochs", type=int, default=1, help="fail when a job completes fewer epochs")
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--out", metavar="DIR", help="write soak.json and daemon.log there")
    soak.add_argument("--json", action="store_true", help="one JSON object per line: streams and jobs, then the summary")
    soak.set_defaults(func=cmd_bench_soak)

    transport = bench_kinds.add_parser("transport", help="GB/s of one batch from a worker-like sender to a trainer-like receiver: tcp, tcp+curve, ipc, shm vs memcpy")
    transport.add_argument("--batch-images", type=int, nargs="+", default=[64, 256], metavar="N", help="images per batch, one or more batch sizes")
    transport.add_argument("--size", type=int, default=224, help="image side in pixels (N×size×size×3 uint8)")
    transport.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    transport.add_argument("--batches", type=int, default=60, help="timed batches per transport, batch size and round (fewer: the cold start after the other candidates weighs more)")
    transport.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="longest wait for any one batch before the run fails")
    transport.add_argument("--json", action="store_true", help="one JSON object per line: the rows, then the summary")
    transport.set_defaults(func=cmd_bench_transport)

    decoders = bench_kinds.add_parser("decoders", help="JPEG decoding of random-resized-crop regions: whole-image, DCT-reduced and region decoders vs ours")
    decoders.add_argument("--photos", type=int, default=6, help="synthesized photos per size (1600×1200 and 500×375)")
    decoders.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    decoders.add_argument("--device", metavar="DEVICE", help="cpu or cuda:K: decode whole batches on this device instead (nvImageCodec with and "
                          "without ROI, DALI's decoders, torchvision's decode_jpeg, OpenCV per image), images/s per candidate")  # fmt: skip
    decoders.add_argument("--batch", type=int, default=128, help="with --device: samples per batch and image size")
    decoders.add_argument("--json", action="store_true", help="one JSON object per line: the rows, then the summary")
    decoders.set_defaults(func=cmd_bench_decoders)

    control = bench_kinds.add_parser(
        "control-plane", help="tasks/s one daemon schedules and sees acknowledged: fake workers and trainers, no pixels",
        description="The real daemon (--workers 0) with a process of fake workers that answer each task at once with a 1×1×1-pixel batch, "
        "and trainers in this process that acknowledge each batch on arrival; every (workers, streams) pair is measured over a window of "
        "about --seconds, with the CPU %% of the daemon, its event loop, the workers and the trainers. Exit status 1 when a task was not "
        "handled and acknowledged exactly once.",
    )  # fmt: skip
    # dest: augserve/cli.py checks any scalar `workers` argument for >= 1; these are lists.
    control.add_argument("--workers", dest="worker_counts", type=int, nargs="+", default=[1, 4, 16], metavar="W", help="fake worker counts to measure")
    control.add_argument("--streams", dest="stream_counts", type=int, nargs="+", default=[1, 4, 16], metavar="S", help="trainer stream counts to measure")
    control.add_argument("--client", nargs="+", default=["fake"], choices=["fake", "real"], help="fake: one poll loop of raw trainer sockets; real: augserve.connect streams, a thread each")
    control.add_argument("--seconds", type=float, default=3.0, help="target length of each measured window")
    control.add_argument("--batch-size", type=int, default=64, help="sample ids per task (the images are 1×1×1 whatever it is)")
    control.add_argument("--prefetch", type=int, default=8, help="credits per stream")
    control.add_argument("--capacity", type=int, default=2, help="tasks a fake worker holds at once")
    control.add_argument("--malformed-every", type=int, default=0, metavar="N", help="one fake worker also sends a malformed message after every N of its tasks (0: never)")
    control.add_argument("--idle-workers", type=int, default=0, metavar="N", help="also measure the daemon's CPU with N workers registered and no stream (0: skip)")
    control.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS", help="longest any one configuration may take")
    control.add_argument("--json", action="store_true", help="one JSON object per line: the rows, then the summary")
    control.set_defaults(func=cmd_bench_control_plane)
