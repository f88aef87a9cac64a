"""LeNet-5 (the ReLU variant) on the built-in digits with Hugging Face Accelerate, fed by augserve's Loader.

    python examples/accelerate_lenet5.py                                   # one process, its own daemon
    accelerate launch --cpu --num_processes 2 examples/accelerate_lenet5.py --address tcp://127.0.0.1:5555

``accelerator.prepare()`` hands the Loader back as it is (it is not a DataLoader to re-shard): the
loader already takes its rank and world size from the process group Accelerate set up, and each rank
gets its own shard, so every sample of an epoch is trained on exactly once across the processes.
``register_for_checkpointing(loader)`` puts its position into ``save_state`` / ``load_state``.
With several processes, pass ``--address`` of one daemon that every rank shares.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from augserve import Loader  # noqa: E402
from augserve.local import local_daemon  # noqa: E402
from trainer import models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="daemon to use (default: start one with two workers; one process only)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--record", help="write the sample ids each rank trained on, per epoch, to this JSON file (one per rank: .rankN)")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    if args.address is None and accelerator.num_processes > 1:
        parser.error("with several processes, give --address of a daemon they share")
    torch.manual_seed(0)
    with contextlib.ExitStack() as stack:
        address = args.address or stack.enter_context(local_daemon(workers=2))
        loader = stack.enter_context(Loader(address, "digits", "lenet5", args.batch_size, seed=0, drop_last=True))
        model = models.create("lenet5_relu", num_classes=10, in_channels=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        accelerator.register_for_checkpointing(loader)  # save_state() now saves the stream position

        seen: dict[int, list[int]] = {}
        for epoch in range(args.epochs):
            loader.set_epoch(epoch)
            model.train()
            for batch in loader:
                images, labels = batch.to(accelerator.device)
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
                seen.setdefault(epoch, []).extend(batch.sample_ids.tolist())
            mean_loss = accelerator.reduce(loss.detach(), reduction="mean")
            accelerator.print(f"epoch {epoch}: {len(loader)} steps per rank, last loss {mean_loss.item():.3f}")
        positions = loader.state_dict()["positions"]  # every rank's, gathered: what save_state() writes
        if args.record:
            with open(f"{args.record}.rank{accelerator.process_index}", "w") as handle:
                json.dump({"rank": loader.rank, "world_size": loader.world_size, "ids": seen, "positions": positions}, handle)
        accelerator.print(json.dumps({"epochs": args.epochs, "processes": accelerator.num_processes, "loss": mean_loss.item()}))
    # Then the process group goes, and the DDP-wrapped model and optimiser first (ours and the
    # accelerator's references): DDP's reducer keeps gloo's group and its last works alive, and released
    # at interpreter exit they can abort a rank ("terminate called without an active exception") after
    # training went fine. The same order as trainer.run.Run.close().
    model, optimizer = accelerator.free_memory(model, optimizer)  # both None now; collected
    accelerator.end_training()


if __name__ == "__main__":
    main()
