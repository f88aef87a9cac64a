"""augserve.Loader under the frameworks users already run: Lightning (fit with a validation loader,
a mid-epoch crash resumed from Lightning's own checkpoint), Accelerate with two gloo processes, and
every script in examples/ run as written (small sizes by their flags)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("accelerate")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from augserve import Loader  # noqa: E402
from conftest import free_port, run_python  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
N_TRAIN = 1438  # the built-in digits, train split
STEPS = 23  # 1,438 training digits in batches of 64
EVAL = {"name": "digits-eval", "ops": [{"op": "normalize", "mean": [0.26], "std": [0.36]}]}


class Recorder(L.LightningModule):
    """LeNet-5 that notes, per training step, the epoch, sample ids and a digest of each augmented image."""

    def __init__(self) -> None:
        super().__init__()
        from trainer import models

        self.net = models.create("lenet5_relu", num_classes=10, in_channels=1)
        self.train_seen: list[tuple[int, int, list[int], list[str]]] = []  # (global step, epoch, ids, digests)
        self.val_batches: dict[int, int] = {}

    def training_step(self, batch, batch_idx):
        digests = [hashlib.blake2b(image.numpy().tobytes(), digest_size=8).hexdigest() for image in batch.images]
        self.train_seen.append((self.global_step, batch.epoch, batch.sample_ids.tolist(), digests))
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.val_batches[self.current_epoch] = self.val_batches.get(self.current_epoch, 0) + 1
        self.log("val_loss", F.cross_entropy(self.net(images), labels))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loaders(address: str) -> tuple[Loader, Loader]:
    options = {"timeout": 10.0, "batch_timeout": 30.0}
    return Loader(address, "digits", "lenet5", 64, seed=0, **options), Loader(address, "digits", EVAL, 128, split="test", shuffle=False, **options)


def fit(address: str, epochs: int, callbacks=(), ckpt_path=None, validate: bool = False) -> Recorder:
    torch.manual_seed(0)
    model = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(callbacks), callbacks=list(callbacks), num_sanity_val_steps=0, limit_val_batches=1.0 if validate else 0,
    )  # fmt: skip
    train, val = loaders(address)
    with train, val:
        trainer.fit(model, train, val if validate else None, ckpt_path=ckpt_path)
    return model


def by_sample(model: Recorder) -> dict[tuple[int, int], str]:
    out = {}
    for _step, epoch, ids, digests in model.train_seen:
        for sample, digest in zip(ids, digests):
            assert (epoch, sample) not in out, f"sample {sample} twice in epoch {epoch}"
            out[(epoch, sample)] = digest
    return out


def test_lightning_fit_gets_new_augmentation_each_epoch_and_validates_from_a_second_loader(daemon):
    model = fit(daemon.address, epochs=3, validate=True)
    assert [epoch for _s, epoch, _i, _d in model.train_seen] == [e for e in range(3) for _ in range(STEPS)]
    seen = by_sample(model)
    for epoch in range(3):
        assert sorted(s for e, s in seen if e == epoch) == list(range(N_TRAIN))  # every digit once per epoch
    for a, b in ((0, 1), (1, 2)):
        same = sum(seen[(a, s)] == seen[(b, s)] for s in range(N_TRAIN))
        assert same < N_TRAIN // 10, f"{same} digits got the same augmentation in epochs {a} and {b}"
    assert model.val_batches == {0: 3, 1: 3, 2: 3}  # 360 test digits in batches of 128, every epoch


class Crash(Exception):
    pass


class CrashAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            raise Crash(f"stopped at step {trainer.global_step}")


def test_lightning_resumes_mid_epoch_with_exactly_the_remaining_samples(daemon, tmp_path):
    whole = by_sample(fit(daemon.address, epochs=2))

    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=30, save_top_k=-1)
    crashed = Recorder()
    with pytest.raises(Crash):
        torch.manual_seed(0)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[saver, CrashAt(33)], num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
        train, _ = loaders(daemon.address)
        with train:
            trainer.fit(crashed, train)
    checkpoint = tmp_path / "step=30.ckpt"
    assert checkpoint.exists(), sorted(p.name for p in tmp_path.iterdir())
    before = [(epoch, ids) for step, epoch, ids, _d in crashed.train_seen if step < 30]  # what the checkpoint covers
    consumed = {s for epoch, ids in before if epoch == 1 for s in ids}
    assert len(consumed) == 7 * 64  # step 30 is the 8th step of epoch 1

    resumed = fit(daemon.address, epochs=2, ckpt_path=str(checkpoint), callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "again")])
    rest = by_sample(resumed)
    assert {epoch for epoch, _ in rest} == {1} and len(resumed.train_seen) == STEPS - 7
    assert not consumed & {s for _, s in rest}
    assert consumed | {s for _, s in rest} == set(range(N_TRAIN))  # exactly the remaining samples...
    assert all(whole[key] == digest for key, digest in rest.items())  # ...with the uninterrupted run's augmentation


def test_accelerate_with_two_gloo_processes_trains_each_sample_once(daemon, tmp_path):
    record = tmp_path / "ids.json"
    run_python("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
               str(EXAMPLES / "accelerate_lenet5.py"), "--address", daemon.address, "--epochs", "1", "--record", str(record))  # fmt: skip
    ranks = [json.loads(Path(f"{record}.rank{r}").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]  # from the process group Accelerate set up
    ids = ranks[0]["ids"]["0"] + ranks[1]["ids"]["0"]
    assert len(ids) == len(set(ids)) == 2 * 11 * 64  # drop_last: 719 digits per rank → 11 full batches each
    assert sorted(ranks[0]["positions"]) == ["0", "1"]  # state_dict() gathered both ranks' positions
    assert all(p["epoch"] == 1 and p["delivered"] == [] for p in ranks[0]["positions"].values())


@pytest.mark.parametrize("script", ["plain_loop.py", "lightning_lenet5.py"])
def test_examples_run_as_written(daemon, tmp_path, script):
    proc = run_python(str(EXAMPLES / script), "--address", daemon.address, "--epochs", "1", *(["--out", str(tmp_path)] if "lightning" in script else []))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 1


def test_plain_loop_example_starts_its_own_daemon(tmp_path):
    proc = run_python(str(EXAMPLES / "plain_loop.py"), "--epochs", "1", "--checkpoint", str(tmp_path / "run.pt"))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["epochs"] == 1
    state = torch.load(tmp_path / "run.pt", weights_only=True)
    assert state["loader"]["positions"]["0"]["epoch"] == 1
