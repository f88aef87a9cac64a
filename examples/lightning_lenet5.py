"""LeNet-5 (the ReLU variant) on the built-in digits with PyTorch Lightning, fed by augserve's Loader.

    python examples/lightning_lenet5.py                      # starts a daemon of its own
    python examples/lightning_lenet5.py --address tcp://127.0.0.1:5555 --devices 2   # DDP on CPU
    python examples/lightning_lenet5.py --resume last.ckpt   # continue, mid-epoch or not

The Loaders go where DataLoaders would: ``fit(model, train_loader, val_loader)``. Lightning iterates
the train loader once per epoch (each epoch gets its own augmentation), reads ``len()`` for its
progress, and saves the loader's ``state_dict()`` in every checkpoint, so ``--resume`` continues with
exactly the batches the interrupted epoch had left. Under DDP each rank's loader takes its rank from
the process group and delivers its own shard.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pipelines  # noqa: E402
from augserve import Loader  # noqa: E402
from augserve.local import local_daemon  # noqa: E402
from trainer import models  # noqa: E402
from trainer.data import eval_spec  # noqa: E402


class LeNet5(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = models.create("lenet5_relu", num_classes=10, in_channels=1)

    def training_step(self, batch, batch_idx):
        images, labels = batch  # an augserve Batch unpacks like a DataLoader's (images, labels)
        loss = F.cross_entropy(self.net(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        accuracy = (self.net(images).argmax(1) == labels).float().mean()
        self.log("val_accuracy", accuracy, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loaders(address: str, batch_size: int) -> tuple[Loader, Loader]:
    spec = pipelines.load_preset("lenet5")
    train = Loader(address, "digits", spec, batch_size, seed=0, drop_last=True)  # equal steps on every DDP rank
    val = Loader(address, "digits", eval_spec(spec), 256, split="test", shuffle=False)
    return train, val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="daemon to use (default: start one with two workers)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP with gloo when > 1)")
    parser.add_argument("--out", default="lightning_logs", help="checkpoints go here")
    parser.add_argument("--resume", help="a checkpoint to continue from")
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)

    with contextlib.ExitStack() as stack:
        address = args.address or stack.enter_context(local_daemon(workers=2))
        train, val = (stack.enter_context(loader) for loader in loaders(address, args.batch_size))
        trainer = L.Trainer(
            accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto", max_epochs=args.epochs,
            default_root_dir=args.out, logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=args.out, save_last=True)],
        )  # fmt: skip
        trainer.fit(LeNet5(), train, val, ckpt_path=args.resume)
        if trainer.is_global_zero:
            print(json.dumps({"epochs": trainer.current_epoch, "val_accuracy": float(trainer.callback_metrics["val_accuracy"])}))


if __name__ == "__main__":
    main()
