"""A training run: model + optimizer + augserve streams + evaluation + checkpoints + metrics.

Called by ``python -m trainer train``; every step a user can get wrong raises ValueError with one line.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import torch

from augserve.sources.open import check_dataset_name

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .data import embedded_daemon, eval_spec, output_size
from .loop import EpochStats, Precision, Throughput, accuracy, predict, ten_crops, train_step
from .metrics import MetricsLog, progress_bar
from .schedule import learning_rate

log = logging.getLogger("trainer")

# The attach that asks a dataset its shape and length before the recipe is fitted: any image survives it.
PROBE_SPEC = {"name": "probe", "ops": [{"op": "center_crop", "size": 1}]}


@dataclass
class TrainConfig:
    model: str = "lenet5"
    dataset: str = "digits"
    dataset_options: dict = field(default_factory=dict)
    eval_split: str = "test"  # what evaluate() scores: "test", or "val" (a hold-out of train: tuning)
    # None: from the model's recipe (trainer/recipes.py), fitted to the dataset once the daemon says
    # what it holds; Run.fit settles them before training, and the checkpoint records the settled values.
    pipeline: object = None
    epochs: int | None = None
    steps: int | None = None  # a budget in optimiser steps instead of epochs (rounded up to whole epochs)
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    optimizer: str | None = None
    schedule: str | None = None
    warmup_epochs: float | None = None
    step_epochs: int = 30
    gamma: float = 0.1
    label_smoothing: float | None = None
    dropout: float | None = None  # the classifier's dropout; None: the recipe's, else the model's own
    zero_init_residual: bool | None = None  # ResNets: zero γ of each block's last BN; None: the recipe's
    batch_norm: bool | None = None  # VGG: the BatchNorm variant; None: the recipe's (with --pretrained: the weights')
    amp: str = "none"
    channels_last: bool = False
    device: str = "auto"
    connect: str | None = None
    workers: int = 2
    backend: str = "albumentations"
    worker_device: str = "cpu"
    serve_datasets: dict = field(default_factory=dict)
    seed: int = 0
    prefetch: int = 8
    out: str | None = None
    resume: str | None = None
    checkpoint_every: int = 0
    stop_after: int = 0
    record_ids: str | None = None
    multi_crop: int = 1
    ensemble: list = field(default_factory=list)
    pretrained: str | None = None
    freeze: str = "none"
    cache_features: bool = True
    tensorboard: bool = True
    progress: bool = True
    eval_batch_size: int = 256

    def validate(self) -> None:
        checks = [
            (self.epochs is None or self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.epochs is None or self.steps is None, "give --epochs or --steps, not both"),
            (self.batch_size is None or self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr is None or self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay is None or self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_epochs is None or self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (self.dropout is None or 0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.optimizer in (None, "sgd", "adamw"), f"--optimizer must be sgd or adamw, got {self.optimizer!r}"),
            (self.schedule in (None, "step", "cosine", "constant"), f"--schedule must be step, cosine or constant, got {self.schedule!r}"),
            (self.eval_split in ("test", "val"), f"eval_split must be test or val, got {self.eval_split!r}"),
            (self.amp in ("none", "bf16", "fp16"), f"--amp must be none, bf16 or fp16, got {self.amp!r}"),
            (self.multi_crop in (1, 10), f"--multi-crop must be 1 or 10, got {self.multi_crop}"),
            (self.freeze == "none" or self.freeze == "head" or self.freeze.startswith("last:"), f"--freeze must be none, head or last:K, got {self.freeze!r}"),
            (self.checkpoint_every >= 0 and self.stop_after >= 0, "--checkpoint-every and --stop-after must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA, which this machine does not have")
    return device


def build_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    # No weight decay on biases and norm layers (their scale carries no L2 meaning).
    parameters = [p for p in parameters if p.requires_grad]
    decay = [p for p in parameters if p.ndim > 1]
    no_decay = [p for p in parameters if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr)


def ensemble_member(payload: dict, model: str, num_classes: int, in_channels: int) -> torch.nn.Module:
    """The model of a trainer checkpoint ``payload`` (or a plain state dict of ``model``), with its
    weights: the architecture its config recorded (name, and VGG's BatchNorm variant)."""
    from . import models

    config = payload["config"] if isinstance(payload.get("config"), dict) else {}
    options = {"batch_norm": True} if config.get("batch_norm") else {}
    member = models.create(config.get("model", model), num_classes=num_classes, in_channels=in_channels, **options)
    member.load_state_dict(ckpt.model_state(payload))
    return member


# Model options that a builder takes only when set (False is every builder's default): passed only then,
# and named in the summary only then.
SWITCHED_OPTIONS = ("zero_init_residual", "batch_norm")


class StopRequested(RuntimeError):
    """Raised at the next batch once :meth:`Run.request_stop` was called."""


# Model initialisation draws from torch's global generator: runs started in several threads at once
# (tuning trials) seed and build under this lock, so a model's first weights depend on its seed alone.
_INIT_LOCK = threading.Lock()


class Run:
    """Everything a run holds; :meth:`fit` trains, :meth:`summary` reports.

    Hooks for what drives a run (the tuner, a notebook): ``epoch_callbacks`` are called as
    ``callback(run, row)`` after every epoch with that epoch's history row (``val_accuracy`` included);
    one that raises ends the run with its exception. :meth:`request_stop` (any thread) ends the run
    with :class:`StopRequested` at its next batch.
    """

    def __init__(self, config: TrainConfig, epoch_callbacks: Iterable[Callable[["Run", dict], None]] = ()) -> None:
        from . import models

        config.validate()
        models.get_builder(config.model)  # an unknown model fails here, before any daemon starts
        if not config.connect:  # so does an unknown dataset for the daemon this run starts itself
            check_dataset_name(config.dataset)
        self.config = config
        self.epoch_callbacks = list(epoch_callbacks)
        self._stop = threading.Event()
        self.device = pick_device(config.device)
        self.world = dist_utils.World.from_environment(self.device)
        self.precision = Precision.create(self.device, config.amp, config.channels_last)
        self.step = 0
        self.start_epoch = 0
        self.stream_state = None
        self.history: list[dict] = []
        self.summary_extra: dict = {}
        self._started = time.perf_counter()  # reset when fit() starts; elapsed_s counts from there
        self.has_test: bool | None = None  # learnt on the first evaluation (the daemon knows the splits)

    # --- set-up ----------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """End the run at its next batch (it raises :class:`StopRequested` from :meth:`fit`)."""
        self._stop.set()

    def _make_model(self, stream) -> torch.nn.Module:
        from . import models, transfer

        channels = int(stream.dataset_info.get("channels", 3))
        num_classes = len(stream.classes)
        self._in_channels = channels
        with _INIT_LOCK:
            torch.manual_seed(self.config.seed)
            options = {} if self.config.dropout is None else {"dropout": self.config.dropout}
            options.update({option: True for option in SWITCHED_OPTIONS if getattr(self.config, option)})
            try:
                model = models.create(self.config.model, num_classes=num_classes, in_channels=channels, **options)
            except TypeError as exc:
                option = next((name for name in options if name in str(exc)), None)
                if option is None:
                    raise
                missing = {"dropout": "no dropout to set", "zero_init_residual": "no residual blocks to start at zero", "batch_norm": "no BatchNorm variant"}[option]
                raise ValueError(f"--{option.replace('_', '-')}: model {self.config.model!r} has {missing}") from None
        if self.config.pretrained:
            transfer.load_pretrained(model, self.config.pretrained)
        transfer.freeze(model, self.config.freeze)
        model.to(self.device)
        if self.config.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def _connect(self, address: str, **overrides):
        from augserve import connect

        options = dict(
            dataset=self.config.dataset,
            pipeline=self.config.pipeline,
            batch_size=self.config.batch_size,
            seed=self.config.seed,
            epochs=self.config.epochs,
            rank=self.world.rank,
            world_size=self.world.size,
            prefetch=self.config.prefetch,
            ordered=True,
            drop_last=self.world.size > 1,  # DDP ranks must take the same number of steps
            dataset_options=self.config.dataset_options,
            device=self.device,
            timeout=30.0,
        )
        options.update(overrides)
        return connect(address, **options)

    def _settle(self, address: str) -> None:
        """Fill what the user left unset from the model's recipe; the pipeline and the run length need the
        dataset, which one short attach (a 1-pixel crop, one credit) reports."""
        from . import recipes

        config = self.config
        if config.batch_size is None:
            config = replace(config, batch_size=recipes.recipe_for(config.model).batch_size)
        facts = {}
        if recipes.needs_dataset(config):
            probe = self._connect(address, pipeline=PROBE_SPEC, batch_size=config.batch_size, epochs=1, prefetch=1, dataset_options=config.dataset_options)
            try:
                facts = recipes.dataset_facts(probe)
            finally:
                probe.close()
        self.config = recipes.settle(config, **facts)
        self.config.validate()

    @contextlib.contextmanager
    def _daemon(self):
        if self.config.connect:
            yield self.config.connect
            return
        if self.world.size > 1:
            raise ValueError("distributed runs need a shared daemon: start `augserve serve` and pass --connect")
        with embedded_daemon(self.config.workers, self.config.backend, self.config.worker_device, self.config.serve_datasets) as address:
            yield address

    # --- training --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the model and optimiser, then leave the process group (a no-op for one process).

        The order matters for DDP on gloo: the DDP wrapper's reducer keeps the process group and its
        last work objects alive; released at interpreter exit instead, they can abort the process
        ("terminate called without an active exception") after the job has finished."""
        for name in ("model", "optimizer"):
            self.__dict__.pop(name, None)
        gc.collect()
        self.world.close()

    def fit(self) -> dict:
        config = self.config
        torch.manual_seed(config.seed)
        started = self._started = time.perf_counter()
        metrics = MetricsLog(config.out if self.world.is_main else None, tensorboard=config.tensorboard, fresh=config.resume is None)
        resume_payload = ckpt.load(config.resume) if config.resume else None
        with self._daemon() as address:
            self.address = address
            self._settle(address)
            config = self.config
            stream_options = {}
            if resume_payload is not None:
                if not resume_payload.get("stream"):
                    raise ValueError(f"{config.resume} holds no stream position (a head-only transfer run cannot be resumed; use it with --pretrained)")
                self.step = int(resume_payload["step"])
                stream_options["resume"] = dict(resume_payload["stream"])
            stream = self._connect(address, **stream_options)
            try:
                model = self._make_model(stream)
                self.model = self.world.wrap(model)
                if self.config.freeze == "head" and self.config.cache_features and self.config.pretrained:
                    from .transfer import fit_head_on_cached_features

                    stream.close()
                    result = fit_head_on_cached_features(self, model, address, metrics)
                    self.summary_extra.update(result)
                    self._save(None, self.config.epochs - 1)
                    return self._finish(started, metrics)
                optimizer = build_optimizer(config, self.model.parameters())
                if resume_payload is not None:
                    model.load_state_dict(resume_payload["model"])
                    if resume_payload.get("optimizer"):
                        optimizer.load_state_dict(resume_payload["optimizer"])
                    if resume_payload.get("scaler") and self.precision.scaler is not None:
                        self.precision.scaler.load_state_dict(resume_payload["scaler"])
                self.optimizer = optimizer
                self._train(stream, metrics)
            finally:
                stream.close()
            if not self.summary_extra.get("stopped_after"):
                self.summary_extra.update(self._extra_evaluations())
            return self._finish(started, metrics)

    def _train(self, stream, metrics: MetricsLog) -> None:
        config = self.config
        steps_per_epoch = stream.batches_per_epoch
        total_steps = steps_per_epoch * config.epochs
        record = None
        if config.record_ids:
            path = config.record_ids if self.world.size == 1 else f"{config.record_ids}.rank{self.world.rank}"
            record = open(path, "a", encoding="utf-8")
        throughput = Throughput()
        stats, epoch, bar = None, None, None
        self._train_mode()
        try:
            iterator = iter(stream)
            while True:
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                if self._stop.is_set():
                    raise StopRequested(f"stopped on request at step {self.step}")
                if batch.epoch != epoch:
                    if stats is not None:
                        bar.close()
                        self._end_epoch(epoch, stats, metrics)
                        self._train_mode()
                    epoch, stats = batch.epoch, EpochStats()
                    done_before = len(stream.resumed_batches) if epoch == stream.resumed_epoch else 0
                    bar = progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", config.progress and self.world.is_main, initial=done_before)
                stats.timer.batch_arrived()
                lr = learning_rate(self.step, base_lr=config.lr, total_steps=total_steps, steps_per_epoch=steps_per_epoch, schedule=config.schedule, warmup_epochs=config.warmup_epochs, step_epochs=config.step_epochs, gamma=config.gamma)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, correct = train_step(self.model, self.optimizer, self.precision, batch.images, batch.labels, config.label_smoothing)
                stats.add(loss, correct, len(batch))
                stats.timer.step_done(len(batch))
                throughput.add(len(batch))
                self.step += 1
                if record is not None:
                    record.write(f"{batch.epoch},{batch.index}," + " ".join(map(str, batch.sample_ids.tolist())) + "\n")
                metrics.scalar("train/loss", loss, self.step)
                metrics.scalar("train/lr", lr, self.step)
                bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{stats.timer.images_per_s:.0f}", stall=f"{stats.timer.stall_pct:.0f}%", refresh=False)
                bar.update(1)
                if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    self._save(stream, epoch)
                if config.stop_after and self.step >= config.stop_after:
                    self._save(stream, epoch)
                    self.summary_extra["stopped_after"] = self.step
                    bar.close()
                    return
            if stats is not None:
                bar.close()
                self._end_epoch(epoch, stats, metrics)
                self._save(stream, epoch)
        finally:
            if record is not None:
                record.close()
            self.summary_extra["train_img_per_s"] = throughput.images_per_s

    def _train_mode(self) -> None:
        from .transfer import keep_frozen_in_eval

        self.model.train()
        keep_frozen_in_eval(self.model)

    def _end_epoch(self, epoch: int, stats: EpochStats, metrics: MetricsLog) -> None:
        val = self.evaluate() if self.has_test is not False else None
        row = {
            "epoch": epoch + 1,
            "step": self.step,
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "val_accuracy": val,
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_per_s": stats.timer.images_per_s,
            "stall_pct": stats.timer.stall_pct,
            "elapsed_s": time.perf_counter() - self._started,
        }
        self.history.append(row)
        metrics.epoch(row)
        if self.world.is_main and self.config.progress:
            shown = f"{val:.4f}" if val is not None else "n/a"
            log.info("epoch %d: loss %.4f, train acc %.4f, val acc %s, %.0f img/s, stall %.1f%%", epoch + 1, stats.loss, stats.accuracy, shown, row["img_per_s"], row["stall_pct"])
        for callback in self.epoch_callbacks:
            callback(self, row)

    # --- evaluation ------------------------------------------------------------------------------------

    def evaluate(self, crops: int = 1, model: torch.nn.Module | None = None) -> float | None:
        """Top-1 accuracy on the held-out split with a centre crop (or ten crops); None without one."""
        probabilities, labels = self.predict(crops, model)
        return accuracy(probabilities, labels) if self.has_test else None

    def predict(self, crops: int = 1, model: torch.nn.Module | None = None):
        import pipelines

        train_spec = pipelines.resolve(self.config.pipeline)
        size = output_size(train_spec)
        if crops == 10 and size is None:
            raise ValueError("--multi-crop 10 needs a pipeline with a fixed crop size")
        pad = max(4, round(min(size) * 0.125)) if crops == 10 else None
        spec = eval_spec(train_spec, crop_pad=pad)
        try:
            stream = self._connect(self.address, pipeline=spec, split=self.config.eval_split, batch_size=self.config.eval_batch_size, epochs=1, shuffle=False, ordered=False, drop_last=False)
        except ValueError as exc:
            if "split" not in str(exc) or self.has_test:
                raise
            self.has_test = False
            log.warning("no held-out split for %s: %s", self.config.dataset, exc)
            return torch.empty(0, 1), torch.empty(0, dtype=torch.long)
        self.has_test = True
        try:
            probabilities, labels = predict(model or self.model, stream, self.precision, ten_crops(size) if crops == 10 else None)
        finally:
            stream.close()
        return self.world.gather(probabilities, labels)

    def _extra_evaluations(self) -> dict:
        """Ten-crop and ensemble accuracies, reported beside the single-crop, single-model figure."""
        extra: dict = {}
        if self.has_test is False:
            return extra
        if self.config.multi_crop == 10:
            extra["multi_crop_accuracy"] = self.evaluate(crops=10)
        if self.config.ensemble:
            probabilities, labels = self.predict()
            members = 1
            for path in self.config.ensemble:
                member = ensemble_member(ckpt.load(path), self.config.model, probabilities.shape[1], self._in_channels)
                member.to(self.device)
                other, other_labels = self.predict(model=member)
                if not torch.equal(other_labels, labels):
                    raise ValueError(f"ensemble member {path} saw the held-out set in another order")
                probabilities, members = probabilities + other, members + 1
            extra["ensemble_accuracy"] = accuracy(probabilities / members, labels)
            extra["ensemble_size"] = members
        return extra

    # --- checkpoints and summary -----------------------------------------------------------------------

    def _save(self, stream, epoch: int) -> None:
        if not self.world.is_main or not self.config.out:
            return
        position = None
        if stream is not None:
            state = stream.state_dict()
            # The fingerprint (when the client provides one) lets a resume refuse a position from another run.
            position = {k: state[k] for k in ("epoch", "delivered", "fingerprint") if k in state}
        ckpt.save(os.path.join(self.config.out, "checkpoint.pt"), model=self.model, optimizer=self.optimizer, scaler=self.precision.scaler, step=self.step, epoch=epoch, stream_state=position, config=self.config_record(), metrics=self.history[-1] if self.history else None)

    def config_record(self) -> dict:
        """The (settled) config as plain data: a spec becomes its dict, so a checkpoint loads with
        ``weights_only=True``."""
        record = asdict(self.config)
        if hasattr(self.config.pipeline, "to_dict"):
            record["pipeline"] = self.config.pipeline.to_dict()
        return record

    def _finish(self, started: float, metrics: MetricsLog) -> dict:
        pipeline = self.config.pipeline
        name = pipeline if isinstance(pipeline, str) else getattr(pipeline, "name", None) or "custom"
        summary = {"model": self.config.model, "dataset": self.config.dataset, "pipeline": name}
        summary.update({key: getattr(self.config, key) for key in ("batch_size", "lr", "optimizer", "dropout") if getattr(self.config, key) is not None})
        summary.update({option: True for option in SWITCHED_OPTIONS if getattr(self.config, option)})
        last = self.history[-1] if self.history else {}
        summary["accuracy"] = last.get("val_accuracy")
        summary["best_accuracy"] = max((r["val_accuracy"] for r in self.history if r.get("val_accuracy") is not None), default=None)
        summary["train_accuracy"] = last.get("train_accuracy")
        walls = [r for r in self.history if r.get("img_per_s")]
        summary["img_per_s"] = round(sum(r["img_per_s"] for r in walls) / len(walls), 1) if walls else round(self.summary_extra.get("train_img_per_s", 0.0), 1)
        summary["stall_pct"] = round(sum(r["stall_pct"] for r in walls) / len(walls), 2) if walls else None
        summary["epochs"] = len(self.history)
        summary["steps"] = self.step
        summary["parameters"] = sum(p.numel() for p in self.model.parameters()) if hasattr(self, "model") else None
        summary["time_s"] = round(time.perf_counter() - started, 1)
        summary["device"] = str(self.device)
        summary.update({k: v for k, v in self.summary_extra.items() if k != "train_img_per_s"})
        metrics.close()
        if self.config.out and self.world.is_main:
            with open(os.path.join(self.config.out, "summary.json"), "w", encoding="utf-8") as handle:
                json.dump(summary, handle, indent=2)
        return summary
