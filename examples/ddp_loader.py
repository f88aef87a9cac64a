"""The ranks of a torchrun job share one daemon: each reads its own shard of every epoch through
augserve's Loader, and across the ranks each sample of an epoch arrives exactly once.

    augserve serve --bind tcp://127.0.0.1:5555 --workers 2 &
    torchrun --nproc-per-node 4 examples/ddp_loader.py --address tcp://127.0.0.1:5555 --epochs 3 --json

There is no model: each step does only what DDP's gradient all-reduce does to a training loop — every
rank waits for the others (one all-reduce of a scalar per step, gloo) — so what is measured is how fast
the service feeds the job. The Loader takes its rank and world size from the process group and, with
more than one rank, ``drop_last`` so every rank takes the same number of steps.

``--json``: rank 0 prints one JSON line: per epoch the images all ranks received, the wall time from
the ranks' common start to the last rank's last batch (seconds), their ratio (images/s), and the steps
of each rank. ``--record PATH``: every rank writes ``PATH.rankN.json`` with each batch it received,
``[epoch, index, [sample ids]]`` in arrival order.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from augserve import Loader  # noqa: E402
from augserve.config import parse_options  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="the daemon every rank shares, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE", help="dataset option, e.g. n=16000 for shapes (repeatable)")
    parser.add_argument("--pipeline", default="lenet5", help="preset name, spec file or YAML/JSON spec text")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", metavar="PATH", help="write each rank's batches to PATH.rankN.json")
    parser.add_argument("--json", action="store_true", help="rank 0 prints a JSON summary line")
    args = parser.parse_args()
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be >= 1")
    options = parse_options(args.option, "--option")

    torch.set_num_threads(1)  # several ranks share this host's cores with the daemon's workers
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    received: list[list] = []
    epochs = []
    with Loader(args.address, args.dataset, args.pipeline, args.batch_size, seed=args.seed, dataset_options=options, timeout=30.0, batch_timeout=120.0) as loader:
        for epoch in range(args.epochs):
            loader.set_epoch(epoch)
            if distributed:
                dist.barrier()  # a common start, so the epoch's wall time is the job's
            started = time.time()  # wall clock: comparable across the ranks of one host
            images = steps = 0
            for batch in loader:
                received.append([batch.epoch, batch.index, batch.sample_ids.tolist()])
                images += len(batch)
                steps += 1
                if distributed:
                    dist.all_reduce(torch.zeros(1))  # DDP's lockstep: no rank runs ahead of the others
            epochs.append(_gathered(epoch, images, steps, started, time.time(), distributed))
    if args.record:
        with open(f"{args.record}.rank{rank}.json", "w", encoding="utf-8") as handle:
            json.dump({"rank": rank, "world_size": world_size, "batches": received}, handle)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    if args.json and rank == 0:
        later = [e["images_per_s"] for e in epochs[1:]] or [epochs[0]["images_per_s"]]  # epoch 0 pays the ranks' first attach
        print(json.dumps({"world_size": world_size, "dataset": args.dataset, "options": options, "batch_size": args.batch_size,
                          "epochs": epochs, "images_per_s": round(statistics.median(later), 1)}))  # fmt: skip


def _gathered(epoch: int, images: int, steps: int, started: float, ended: float, distributed: bool) -> dict:
    """One epoch across every rank: images summed, from the earliest start to the latest end."""
    per_rank = [(images, steps, started, ended)]
    if distributed:
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, (images, steps, started, ended))
    total = sum(r[0] for r in per_rank)
    seconds = max(r[3] for r in per_rank) - min(r[2] for r in per_rank)
    return {"epoch": epoch, "images": total, "seconds": round(seconds, 4), "images_per_s": round(total / seconds, 1), "steps": [r[1] for r in per_rank]}


if __name__ == "__main__":
    main()
