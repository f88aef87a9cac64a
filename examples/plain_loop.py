"""LeNet-5 (the ReLU variant) on the built-in digits in a plain PyTorch loop, fed by augserve's Loader.

    python examples/plain_loop.py                      # starts a daemon of its own on a private socket
    python examples/plain_loop.py --address tcp://127.0.0.1:5555 --checkpoint run.pt

The loop is the one written for a DataLoader: ``set_epoch`` each epoch, ``images, labels = batch``,
and the loader's ``state_dict()`` saved with the model, so a rerun with the same ``--checkpoint``
continues at the next epoch with that epoch's own augmentation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pipelines  # noqa: E402
from augserve import Loader  # noqa: E402
from augserve.local import local_daemon  # noqa: E402
from trainer import models  # noqa: E402
from trainer.data import eval_spec  # noqa: E402


def accuracy(model: torch.nn.Module, loader: Loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="daemon to use (default: start one with two workers)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--checkpoint", help="save model, optimizer and loader position here each epoch; resume from it if it exists")
    args = parser.parse_args()
    torch.manual_seed(0)

    with contextlib.ExitStack() as stack:
        address = args.address or stack.enter_context(local_daemon(workers=2))
        spec = pipelines.load_preset("lenet5")
        train = stack.enter_context(Loader(address, "digits", spec, args.batch_size, seed=0))
        test = stack.enter_context(Loader(address, "digits", eval_spec(spec), 256, split="test", shuffle=False))
        model = models.create("lenet5_relu", num_classes=10, in_channels=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        start = 0
        if args.checkpoint and os.path.exists(args.checkpoint):
            state = torch.load(args.checkpoint, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            train.load_state_dict(state["loader"])
            start = state["epoch"] + 1

        for epoch in range(start, args.epochs):
            train.set_epoch(epoch)  # as with a DistributedSampler; each epoch gets new augmentation
            model.train()
            for images, labels in train:
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            test_accuracy = accuracy(model, test)
            print(f"epoch {epoch}: {len(train)} batches, last loss {loss.item():.3f}, test accuracy {test_accuracy:.3f}", flush=True)
            if args.checkpoint:
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loader": train.state_dict(), "epoch": epoch}
                torch.save(state, args.checkpoint)
        print(json.dumps({"epochs": args.epochs, "test_accuracy": test_accuracy}))


if __name__ == "__main__":
    main()
