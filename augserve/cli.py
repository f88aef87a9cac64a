"""The ``augserve`` command. Thin: parse → validate → call the library → print.

A mistake a user can make (bad spec, unknown dataset, unwritable path, corrupt image) ends in one line
on stderr and exit status 2 — never a traceback. ``--json`` prints the result as one JSON object on
the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pydantic import ValidationError  # noqa: E402

log = logging.getLogger("augserve")


def _open_source(args):
    from .config import parse_options
    from .sources import open_dataset

    return open_dataset(args.dataset, split=args.split, **parse_options(args.option, "--option"))


def _print_result(args, result: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        print(text)


# --- subcommands -------------------------------------------------------------------------------------


def cmd_preview(args) -> int:
    import pipelines

    from .preview import render_grid, write_png
    from .sources import SkipStats

    spec = pipelines.resolve(args.pipeline)
    source = _open_source(args)
    stats = SkipStats()
    grid = render_grid(source, spec, backend=args.backend, rows=args.rows, variants=args.variants, cell=args.cell, seed=args.seed, stats=stats)
    write_png(args.out, grid)
    result = {"out": args.out, "pipeline": spec.name, "dataset": source.name, "backend": args.backend, "rows": grid.shape[0] // args.cell, "variants": args.variants, "skipped_corrupt": stats.skipped}
    _print_result(args, result, f"wrote {args.out}: {result['rows']} images × {args.variants} variants of {spec.name or 'pipeline'} ({args.backend}) on {source.name}" + (f"; skipped {stats.skipped} corrupt file(s)" if stats.skipped else ""))
    return 0


def cmd_fit_pca(args) -> int:
    import pipelines
    from pipelines import pca

    from .sources import SkipStats, iter_images

    source = _open_source(args)
    if source.channels != 3:
        raise ValueError(f"fit-pca needs an RGB dataset; {source.name} has {source.channels} channel(s)")
    count = len(source) if args.max_images is None else min(len(source), args.max_images)
    stats = SkipStats()
    images = (image for _i, image, _l in _progress(iter_images(source, range(count), on_error=args.on_error, stats=stats), count, "fit-pca"))
    result = pca.fit(images)
    payload = {**result.to_dict(), "dataset": source.name, "skipped_corrupt": stats.skipped}
    lines = [
        f"RGB PCA of {source.name} ({result.images} images, {result.pixels} pixels, 0–1 scale)" + (f"; skipped {stats.skipped} corrupt file(s)" if stats.skipped else ""),
        "eigval: " + json.dumps([round(v, 6) for v in result.eigval]),
        "eigvec (columns): " + json.dumps([[round(v, 6) for v in row] for row in result.eigvec]),
    ]
    if args.write:
        spec = pca.with_fit(pipelines.resolve(args.pipeline), result)
        try:
            with open(args.write, "w", encoding="utf-8") as handle:
                handle.write(f"# pca_color eigen-pairs fitted on {source.name} by `augserve fit-pca`\n")
                handle.write(spec.to_json() + "\n" if args.write.endswith(".json") else spec.to_yaml())
        except OSError as exc:
            raise ValueError(f"cannot write {args.write}: {exc.strerror}") from None
        payload["written"] = args.write
        lines.append(f"wrote {args.write}: {spec.name or 'pipeline'} with these eigen-pairs")
    _print_result(args, payload, "\n".join(lines))
    return 0


def cmd_serve(args) -> int:
    from .config import load_config, parse_dataset_pairs
    from .daemon import Daemon

    overrides = {
        "bind": args.bind,
        "workers": args.workers,
        "backend": args.backend,
        "device": args.device,
        "datasets": parse_dataset_pairs(args.dataset) if args.dataset else None,
        "threads_per_worker": args.threads,
        "metrics_port": args.metrics_port,
        "metrics_host": args.metrics_host,
        "log_level": args.log_level if args.log_level != "warning" else None,
        "keys_dir": args.keys_dir,
        "insecure": args.insecure,
        "transport": args.transport,
    }
    if args.ray is not None:  # --ray [ADDRESS]: the file's ray section, with the address from the flag
        overrides["ray"] = {**_ray_section(args.config), "address": args.ray}
    config = load_config(args.config, overrides)
    if config.ray is not None:
        from .ray_workers import require_ray

        require_ray()  # one line when Ray is not installed
    if config.workers != 0 or config.autoscale is not None:  # with no local workers the backend is the remote workers' business
        from pipelines.backends import require_backend
        from pipelines.backends.base import check_device

        require_backend(config.backend)  # before binding anything: one line, not a failure per worker
        if config.ray is None:  # Ray places workers on other machines, whose GPUs this one cannot see
            check_device(config.device)
    logging.getLogger().setLevel(config.log_level.upper())
    import cv2

    cv2.setNumThreads(0)  # before starting workers: children must not inherit an OpenCV thread pool
    daemon = Daemon(config)
    daemon.install_signal_handlers()
    address = daemon.start()
    scale = f" (autoscaled {config.autoscale.min_workers}-{config.autoscale.max_workers})" if config.autoscale is not None else ""
    kind = " Ray actor" if config.ray is not None else ""
    print(f"augserve: serving on {address} with {config.workers}{kind} {config.backend} worker(s){scale} on {config.device}; Ctrl-C stops", file=sys.stderr, flush=True)
    daemon.serve()
    return 0


def _ray_section(path: str | None) -> dict:
    """The ``ray`` section of the config file, if any (``--ray ADDRESS`` replaces only its address)."""
    from .config import load_config

    if not path:
        return {}
    ray = load_config(path).ray
    return ray.model_dump() if ray is not None else {}


def cmd_worker(args) -> int:
    from .config import check_address
    from .worker import WorkerOptions, run_worker

    check_address(args.connect, "--connect")
    from pipelines.backends import require_backend
    from pipelines.backends.base import check_device

    require_backend(args.backend)
    if args.device:
        check_device(args.device)
    options = WorkerOptions(
        connect=args.connect,
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_liveness=args.heartbeat_liveness,
        capacity=args.capacity,
        name=args.name,
        exit_with_parent=args.local,
        keys_dir=args.keys_dir,
        insecure=args.insecure,
        shm_dir=args.shm_dir,
        shm_reserve_mb=args.shm_reserve_mb,
    )
    import signal

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return run_worker(options)
    except KeyboardInterrupt:
        return 0


def _credentials(args):
    """The keyring of ``--keys-dir`` (default: this user's), or none with ``--insecure``."""
    from .control import Credentials

    return Credentials.load(args.keys_dir, args.insecure)


def _add_credentials(parser) -> None:
    parser.add_argument("--keys-dir", help="keyring (default $AUGSERVE_KEYS_DIR or ~/.config/augserve/keys)")
    parser.add_argument("--insecure", action="store_true", help="talk to a daemon started with --insecure")


def cmd_status(args) -> int:
    from .status import fetch_status, format_status

    if args.watch:
        if args.json:
            raise ValueError("--watch draws a live view; use --json without --watch for one snapshot")
        from .watch import watch

        watch(args.address, interval=args.interval, credentials=_credentials(args))
        return 0
    status = fetch_status(args.address, timeout=args.timeout, credentials=_credentials(args))
    _print_result(args, status, format_status(status))
    return 0


def cmd_tune_set(args) -> int:
    from pipelines.changes import parse_assignments

    from .retune import send_update

    changes = parse_assignments(args.changes) if args.changes else None
    spec = None
    if args.spec:
        import pipelines

        spec = pipelines.resolve(args.spec).to_dict()
    result = send_update(args.address, args.stream, changes=changes, spec=spec, timeout=args.timeout, credentials=_credentials(args))
    summary = {k: result.get(k) for k in ("stream", "version", "from_epoch", "from_index")}
    _print_result(args, {**summary, "spec": result.get("spec")}, f"stream {summary['stream']}: pipeline version {summary['version']} applies from batch {summary['from_index']} of epoch {summary['from_epoch']}")
    return 0


def tune_set_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="augserve tune set", description="Re-tune a live stream: validated by the daemon, applied from the next batch it issues.")
    parser.add_argument("changes", nargs="*", metavar="OP.FIELD=VALUE", help="e.g. rotate.degrees=20 random_resized_crop.scale.0=0.3")
    parser.add_argument("--stream", required=True, help="stream id (see `augserve status`)")
    parser.add_argument("--spec", help="replace the whole pipeline with this preset or spec file instead")
    parser.add_argument("--address", default="tcp://127.0.0.1:5555")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    _add_credentials(parser)
    parser.set_defaults(func=cmd_tune_set, command="tune-set", log_level="warning")
    return parser


def cmd_schema(args) -> int:
    from pipelines import PipelineSpec

    print(json.dumps(PipelineSpec.json_schema(), indent=None if args.json else 2))
    return 0


def cmd_validate(args) -> int:
    import pipelines

    spec = pipelines.resolve(args.pipeline)
    _print_result(args, spec.to_dict(), spec.to_yaml().rstrip())
    return 0


def _progress(iterable, total: int, label: str):
    """A one-line progress bar on stderr when it is a terminal (quiet in logs and pipes)."""
    if not sys.stderr.isatty():
        yield from iterable
        return
    width = 30
    for done, item in enumerate(iterable, start=1):
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        sys.stderr.flush()
        yield item
    sys.stderr.write("\n")


# --- parser ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    import pipelines

    parser = argparse.ArgumentParser(prog="augserve", description="Data-augmentation service for PyTorch.")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"], help="logging verbosity")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    backends = pipelines.BACKENDS.names()

    def dataset_arguments(sub, default=None):
        sub.add_argument("--dataset", required=default is None, default=default, help="built-in name (digits, shapes, photos), a folder of class sub-folders, or a .npz file")
        sub.add_argument("--split", default="train", choices=["train", "val", "test"], help="val: a hold-out of train, with --option val_fraction=F (and val_seed=S)")
        sub.add_argument("--option", action="append", metavar="KEY=VALUE", help="dataset option, e.g. size=128 for shapes (repeatable)")

    preview = commands.add_parser("preview", help="write a PNG grid of originals and augmented variants")
    preview.add_argument("--pipeline", required=True, help="preset name or spec file (.yaml/.json)")
    dataset_arguments(preview)
    preview.add_argument("--out", required=True, help="PNG file to write")
    preview.add_argument("--backend", default="albumentations", choices=backends)
    preview.add_argument("--rows", type=int, default=4, help="number of source images")
    preview.add_argument("--variants", type=int, default=6, help="augmented variants per image")
    preview.add_argument("--cell", type=int, default=160, help="tile size in pixels")
    preview.add_argument("--seed", type=int, default=0)
    preview.add_argument("--json", action="store_true")
    preview.set_defaults(func=cmd_preview)

    fit_pca = commands.add_parser("fit-pca", help="fit pca_color eigen-pairs on a dataset (one streaming pass)")
    dataset_arguments(fit_pca)
    fit_pca.add_argument("--max-images", type=int, default=None, help="use at most this many images")
    fit_pca.add_argument("--pipeline", default="alexnet", help="spec to write the eigen-pairs into (with --write)")
    fit_pca.add_argument("--write", metavar="FILE", help="write the --pipeline spec with the fitted eigen-pairs to FILE (.yaml or .json)")
    fit_pca.add_argument("--on-error", default="skip", choices=["skip", "raise"], help="corrupt images: skip and count, or stop")
    fit_pca.add_argument("--json", action="store_true")
    fit_pca.set_defaults(func=cmd_fit_pca)

    bench = commands.add_parser("bench", help="benchmarks (ours and the baseline side by side)")
    bench_kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    from .bench.cli import add_bench_commands
    from trainer.bench.cli import add_parser as add_trainer_bench  # it trains: it sits above the service

    add_bench_commands(bench_kinds, backends)
    add_trainer_bench(bench_kinds, backends)

    serve = commands.add_parser("serve", help="run the daemon and its worker processes")
    serve.add_argument("--config", help="daemon.yaml; every field can also come from AUGSERVE_<FIELD> or a flag")
    serve.add_argument("--bind", help="control address (default tcp://127.0.0.1:5555; ipc://PATH accepted)")
    serve.add_argument("--workers", type=_workers_arg, help="worker processes (default 2), or auto:MIN:MAX to autoscale on the trainers' data stall")
    serve.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS", help="run the workers as Ray actors on the cluster at ADDRESS (default auto; 'local' starts one here); needs augserve[ray]")
    serve.add_argument("--backend", choices=backends, help="augmentation backend (default albumentations)")
    serve.add_argument("--device", help="cpu or cuda:K (default cpu)")
    serve.add_argument("--dataset", action="append", metavar="NAME=PATH", help="serve a folder or .npz file under NAME (repeatable)")
    serve.add_argument("--threads", type=int, help="threads per worker process (default 1)")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on http://METRICS_HOST:PORT/metrics")
    serve.add_argument("--metrics-host", help="address the metrics endpoint listens on (default 127.0.0.1; 0.0.0.0 for a scraper in another container or pod)")
    serve.add_argument("--keys-dir", help="CurveZMQ keys (default $AUGSERVE_KEYS_DIR or ~/.config/augserve/keys; created on first use)")
    serve.add_argument("--insecure", action="store_true", default=None, help="no authentication: anyone who reaches the address is trusted")
    serve.add_argument("--transport", choices=["auto", "frames", "shm"], help="batches to trainers on the workers' host: auto (default) = shared memory where it can, else frames")
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser("worker", help="run one worker that joins a daemon (possibly on another machine)")
    worker.add_argument("--connect", required=True, help="the daemon's address, e.g. tcp://HOST:5555")
    worker.add_argument("--backend", default="albumentations", choices=backends)
    worker.add_argument("--device", default="cpu")
    worker.add_argument("--threads", type=int, default=1)
    worker.add_argument("--capacity", type=int, default=2, help="tasks held at once (one runs, the rest wait)")
    worker.add_argument("--heartbeat-interval", type=float, default=1.0)
    worker.add_argument("--heartbeat-liveness", type=int, default=5)
    worker.add_argument("--name", help="worker id (default host-pid-random)")
    worker.add_argument("--keys-dir", help="CurveZMQ keys with the daemon's public key and a worker key pair (see `augserve keys export`)")
    worker.add_argument("--insecure", action="store_true", help="talk to a daemon started with --insecure")
    worker.add_argument("--shm-dir", help="shared-memory directory for trainers on this host (default $AUGSERVE_SHM_DIR or /dev/shm)")
    worker.add_argument("--shm-reserve-mb", type=int, default=64, help="megabytes of --shm-dir this worker leaves free for others (default 64)")
    worker.add_argument("--local", action="store_true", help=argparse.SUPPRESS)
    worker.set_defaults(func=cmd_worker)

    status = commands.add_parser("status", help="live streams and workers of a daemon")
    status.add_argument("--address", default="tcp://127.0.0.1:5555")
    status.add_argument("--timeout", type=float, default=5.0)
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", action="store_true", help="a live terminal view, refreshed every --interval seconds (Ctrl-C ends it)")
    status.add_argument("--interval", type=float, default=1.0)
    _add_credentials(status)
    status.set_defaults(func=cmd_status)

    from trainer.tuning.cli import add_parser as add_tune_parser  # tuning drives training: it sits above the service

    add_tune_parser(commands)
    from .keys_cli import add_parser as add_keys_parser

    add_keys_parser(commands)

    schema = commands.add_parser("schema", help="print the JSON schema of a pipeline spec")
    schema.add_argument("--json", action="store_true", help="compact, on one line")
    schema.set_defaults(func=cmd_schema)

    validate = commands.add_parser("validate", help="validate a pipeline spec and print it with defaults filled in")
    validate.add_argument("pipeline", help="preset name or spec file")
    validate.add_argument("--json", action="store_true")
    validate.set_defaults(func=cmd_validate)
    return parser


def _workers_arg(text: str) -> int | str:
    """``--workers``: a count (an int), or ``auto:MIN:MAX`` (checked by the config schema)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if text.lower().startswith("auto"):
        return text
    raise argparse.ArgumentTypeError(f"must be a count or auto:MIN:MAX (e.g. auto:1:8), got {text!r}")


def _positive(args) -> None:
    if args.command == "serve" and isinstance(args.workers, int) and args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    for name in ("rows", "variants", "cell", "images", "rounds", "threads", "max_images", "capacity", "workers", "batch_size", "batches"):
        if args.command == "serve":
            break  # serve's settings are validated by its config schema (0 local workers is valid)
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `augserve tune set ...` re-tunes a live stream; plain `augserve tune ...` runs a study.
    if argv[:2] == ["tune", "set"]:
        args = tune_set_parser().parse_args(argv[2:])
    else:
        args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from pipelines import format_validation_error
    from pipelines.backends import BackendUnavailable

    from .sources import CorruptImageError

    try:
        _positive(args)
        return args.func(args)
    except ValidationError as exc:
        what = "daemon config" if exc.title == "DaemonConfig" else "pipeline spec"
        print(f"augserve: error: {format_validation_error(exc, what)}", file=sys.stderr)
    except (ValueError, TypeError, CorruptImageError, FileNotFoundError, ConnectionError, TimeoutError, BackendUnavailable) as exc:
        print(f"augserve: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("augserve: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
