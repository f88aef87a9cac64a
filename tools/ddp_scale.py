"""Images/s one daemon delivers to a torchrun job of N ranks, against 1 rank: the same daemon and the
same workers for every run, the rank counts alternating, medians reported.

    python tools/ddp_scale.py                         # its own daemon (2 workers); ranks 1 and 4
    python tools/ddp_scale.py --ranks 1 2 4 --rounds 3 --json
    python tools/ddp_scale.py --address tcp://127.0.0.1:5555   # a daemon already running

Each run is ``torchrun --nproc-per-node N examples/ddp_loader.py`` (gloo; every step an all-reduce, as
DDP's lockstep; no model) and its figure is the median over epochs 1.. of all ranks' images over the
epoch's wall time (epoch 0 pays the first attach of every rank). By default the data are the built-in
``shapes`` (32×32 RGB, 16,000 images) under random crop (4-pixel padding) + mirror, batches of 64.
The ratio says whether sharding an epoch over N ranks costs throughput: on a host whose cores the
ranks share with the workers, the workers' CPU bounds both runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CROP_FLIP = '{"name": "crop-flip", "ops": [{"op": "random_crop", "size": 32, "padding": 4}, {"op": "mirror"}]}'
SHAPES_OPTIONS = ["size=32", "n=16000"]
RUN_TIMEOUT_S = 600.0


def run_job(address: str, ranks: int, args) -> dict:
    """One torchrun job of ``ranks`` processes; returns rank 0's JSON summary (ValueError with its stderr when it fails)."""
    from augserve.local import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", str(free_port()),
               str(ROOT / "examples" / "ddp_loader.py"), "--address", address, "--dataset", args.dataset, "--pipeline", args.pipeline,
               "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--json"]  # fmt: skip
    for option in args.option:
        command += ["--option", option]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ValueError(f"the {ranks}-rank job exited with {proc.returncode}: {_reason(proc.stderr)}")
    return json.loads(lines[-1])


def _reason(stderr: str) -> str:
    """The error a rank raised (torchrun ends its output with banners and a summary of failed ranks)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    return (errors or lines or ["no output"])[-1][:500]


def measure(address: str, args, say) -> dict:
    runs: dict[int, list[dict]] = {n: [] for n in args.ranks}
    for round_index in range(args.rounds):
        for ranks in args.ranks:
            say(f"round {round_index + 1}/{args.rounds}: {ranks} rank(s)")
            runs[ranks].append(run_job(address, ranks, args))
    base = statistics.median(r["images_per_s"] for r in runs[args.ranks[0]])
    rows = []
    for ranks, summaries in runs.items():
        rate = round(statistics.median(r["images_per_s"] for r in summaries), 1)
        last = summaries[-1]["epochs"][-1]
        rows.append({"ranks": ranks, "images_per_s": rate, "per_rank_images_per_s": round(rate / ranks, 1), "vs_first": round(rate / base, 3),
                     "runs_images_per_s": [r["images_per_s"] for r in summaries], "images_per_epoch": last["images"], "steps_per_rank": last["steps"]})  # fmt: skip
    return {"benchmark": "ddp-scale", "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="a running daemon (default: start one with --workers on a free loopback port)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the daemon this script starts")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4], help="rank counts; the first is the baseline of the ratio")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per rank count; medians are reported")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the figure is the median of epochs 1..)")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE", help=f"dataset option (default for shapes: {' '.join(SHAPES_OPTIONS)})")
    parser.add_argument("--pipeline", default=CROP_FLIP, help="preset name, spec file or spec text (default: 32² random crop + mirror)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args()
    if min(args.ranks) < 1 or args.rounds < 1 or args.epochs < 1 or args.workers < 1 or args.batch_size < 1:
        parser.error("--ranks, --rounds, --epochs, --workers and --batch-size must be >= 1")
    if args.option is None:
        args.option = SHAPES_OPTIONS if args.dataset == "shapes" else []
    sys.path.insert(0, str(ROOT))
    from augserve.bench.transport import conditions
    from augserve.local import LocalDaemon, free_port

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = conditions()  # the load average before this script adds its own
    try:
        with contextlib.ExitStack() as stack:
            address = args.address
            if address is None:
                daemon = LocalDaemon(workers=args.workers, address=f"tcp://127.0.0.1:{free_port()}")
                stack.callback(daemon.stop)
                say(f"starting a daemon with {args.workers} worker(s) on {daemon.address}")
                daemon.wait_ready()
                address = daemon.address
            result = measure(address, args, say)
    except (ValueError, ConnectionError, TimeoutError, subprocess.TimeoutExpired) as exc:
        print(f"ddp_scale: error: {exc}", file=sys.stderr)
        return 2
    result.update({"workers": args.workers if args.address is None else None, "dataset": args.dataset, "options": args.option, "batch_size": args.batch_size,
                   "epochs": args.epochs, "rounds": args.rounds, "conditions": started})  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    c = result["conditions"]
    print(f"images/s delivered to a torchrun job by one daemon ({args.dataset} {' '.join(args.option)}, batch {args.batch_size}; median of {args.rounds} alternating run(s))")
    print("\n| ranks | images/s (all ranks) | per rank | × first | steps per rank per epoch |\n|---:|---:|---:|---:|---|")
    for row in result["rows"]:
        print(f"| {row['ranks']} | {row['images_per_s']:.0f} | {row['per_rank_images_per_s']:.0f} | {row['vs_first']:.2f} | {row['steps_per_rank']} |")
    print(f"\nconditions: {c['cores']} cores ({c['cpu']}), load average {c['load_average'][0]:.2f} at the start; daemon workers: {result['workers'] or 'as running'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
