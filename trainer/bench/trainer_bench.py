"""``augserve bench trainer``: a real model trained for a few steps, fed by augserve or by a DataLoader.

Both sides run the same training step (``trainer.loop.train_step``: forward, cross-entropy, backward,
an SGD step from ``trainer.run.build_optimizer``) in a separate trainer process on the CPU, on the same
source and the same preset:

* **augserve**: ``augserve serve --workers N`` (one daemon for the whole benchmark) and
  ``augserve.connect(..., ordered=False)``; workers ship uint8, the trainer's client normalizes.
* **DataLoader**: ``torch.utils.data.DataLoader(num_workers=N, persistent_workers=True)`` over a
  Dataset applying the preset's ordinary ``albumentations.Compose`` (see
  :class:`~augserve.bench.pipeline_throughput.OrdinaryPipeline`; normalize included, in the workers).

After ``warmup_steps`` untimed steps, each run times ``steps`` steps and reports images/s (images over
wall time of those steps) and the data stall (time blocked waiting for the next batch over step time,
as ``trainer.metrics.StepTimer`` measures it in training runs). Runs alternate between the loaders
(the order flips every round) and medians are reported. One extra run trains on a single pre-made batch
(no loader at all): the model's own ceiling on this machine.

``python -m trainer.bench.trainer_bench MODE --config JSON`` is the trainer process (MODE: augserve,
dataloader or synthetic); it prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch

LOADERS = {"augserve": "augserve (daemon + connect)", "dataloader": "torch DataLoader + albumentations"}
SERVED_NAME = "bench"  # a dataset given by path is served under this name
CHILD_TIMEOUT_S = 1800.0


@dataclass
class TrainerBenchConfig:
    model: str = "lenet5_relu"
    dataset: str = "digits"
    dataset_options: dict = field(default_factory=dict)
    pipeline: str = "lenet5"
    batch_size: int = 128
    steps: int = 60
    warmup_steps: int = 5
    workers: int = 2
    rounds: int = 2
    backend: str = "albumentations"
    threads: int = 1
    lr: float = 0.01
    seed: int = 0


def _builtin(dataset: str) -> bool:
    from augserve.config import BUILTIN_DATASETS

    return dataset in BUILTIN_DATASETS


def check(config: TrainerBenchConfig) -> dict:
    """Validate a configuration before any process starts; ValueError (one line) for a mistake.

    Returns what the trainer will see: classes, channels and the input size.
    """
    import pipelines
    from augserve.sources import open_dataset
    from trainer import models
    from trainer.data import output_size

    from augserve.bench.pipeline_throughput import ordinary_for_preset

    ordinary_for_preset(config.pipeline)  # refuses pipelines without an albumentations equivalent
    spec = pipelines.load_preset(config.pipeline)
    if config.model not in models.list_models():
        raise ValueError(f"unknown model {config.model!r}; known models: {', '.join(models.list_models())}")
    source = open_dataset(config.dataset, split="train", **config.dataset_options)
    if len(source) < config.batch_size:
        raise ValueError(f"--batch-size {config.batch_size} exceeds the {len(source)} training images of {source.name}")
    channels = source.channels
    if spec.normalize is not None and len(spec.normalize.mean) not in (1, channels):
        raise ValueError(f"pipeline {config.pipeline} normalizes {len(spec.normalize.mean)} channels but {source.name} has {channels}")
    if channels == 1 and any(op.op in ("pca_color", "color_shift") for op in spec.ops):
        raise ValueError(f"pipeline {config.pipeline} has color ops; {source.name} is grey (1 channel)")
    size = output_size(spec) or source.image_size
    if size is None:
        raise ValueError(f"pipeline {config.pipeline} keeps each image's own size on {source.name}, whose images differ in size: batches need one size")
    classes = len(source.classes)
    shape = (channels, *size)
    try:
        with torch.device("meta"):
            net = models.create(config.model, num_classes=classes, in_channels=channels)
            net.train()
            net(torch.empty(2, *shape))
    except NotImplementedError:
        pass  # an op without a meta kernel: the trainer process will tell
    except RuntimeError as exc:
        raise ValueError(f"model {config.model} cannot take {'×'.join(map(str, shape))} inputs (pipeline {config.pipeline} on {source.name}): {str(exc).splitlines()[0]}") from None
    return {"classes": classes, "channels": channels, "input": list(shape), "train_images": len(source)}


# --- the parent: daemon, alternating trainer processes, medians ---------------------------------------


def _run_child(mode: str, config: TrainerBenchConfig, address: str | None, seed: int) -> dict:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": str(config.threads)}
    command = [sys.executable, "-m", "trainer.bench.trainer_bench", mode, "--config", json.dumps(asdict(config)), "--seed", str(seed)]
    if address:
        command += ["--address", address]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} trainer process failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_trainer_bench(config: TrainerBenchConfig, progress=None) -> dict:
    """Measure and return the result dict (rows per loader, medians, ratio)."""
    from augserve.local import local_daemon

    from augserve.bench.plots import cpu_name

    info = check(config)
    served = {} if _builtin(config.dataset) else {SERVED_NAME: os.path.abspath(config.dataset)}
    runs: dict[str, list[dict]] = {"augserve": [], "dataloader": []}
    with local_daemon(config.workers, config.backend, "cpu", served) as address:
        for round_index in range(config.rounds):
            order = ["augserve", "dataloader"] if round_index % 2 == 0 else ["dataloader", "augserve"]
            for mode in order:
                run = _run_child(mode, config, address if mode == "augserve" else None, seed=config.seed + round_index)
                runs[mode].append(run)
                if progress:
                    progress(f"round {round_index + 1}/{config.rounds}: {LOADERS[mode]}: {run['images_per_s']:.0f} img/s, stall {run['stall_pct']:.1f}%")
    synthetic = _run_child("synthetic", config, None, seed=config.seed)
    if progress:
        progress(f"model alone (one pre-made batch, no loader): {synthetic['images_per_s']:.0f} img/s")
    rows = []
    for mode, mode_runs in runs.items():
        rows.append(
            {
                "benchmark": "trainer",
                "loader": mode,
                "workers": config.workers,
                "images_per_s": round(statistics.median(r["images_per_s"] for r in mode_runs), 1),
                "stall_pct": round(statistics.median(r["stall_pct"] for r in mode_runs), 1),
                "first_batch_s": round(statistics.median(r["first_batch_s"] for r in mode_runs), 3),
                "final_loss": round(statistics.median(r["final_loss"] for r in mode_runs), 4),
                "runs": [{"images_per_s": round(r["images_per_s"], 1), "stall_pct": round(r["stall_pct"], 1)} for r in mode_runs],
            }
        )
    rows.append({"benchmark": "trainer", "loader": "none", "workers": 0, "images_per_s": round(synthetic["images_per_s"], 1), "stall_pct": 0.0, "first_batch_s": None, "final_loss": round(synthetic["final_loss"], 4), "runs": [{"images_per_s": round(synthetic["images_per_s"], 1), "stall_pct": 0.0}]})
    ours, baseline = rows[0], rows[1]
    return {
        "benchmark": "trainer",
        **{k: v for k, v in asdict(config).items() if k not in ("threads",)},
        "trainer_threads": config.threads,
        "input": "×".join(map(str, info["input"])),
        "classes": info["classes"],
        "cpu": cpu_name(),
        "augserve_images_per_s": ours["images_per_s"],
        "dataloader_images_per_s": baseline["images_per_s"],
        "ratio": round(ours["images_per_s"] / baseline["images_per_s"], 2) if baseline["images_per_s"] else None,
        "augserve_stall_pct": ours["stall_pct"],
        "dataloader_stall_pct": baseline["stall_pct"],
        "model_only_images_per_s": rows[2]["images_per_s"],
        "rows": rows,
    }


def json_rows(result: dict) -> list[dict]:
    return list(result["rows"])


def format_table(result: dict) -> str:
    options = "".join(f" {k}={v}" for k, v in result["dataset_options"].items())
    lines = [
        f"trainer benchmark — {result['model']} on {result['dataset']}{options} ({result['input']} float32), pipeline {result['pipeline']}, batch {result['batch_size']}, "
        f"{result['workers']} worker process(es) per loader, trainer on CPU with {result['trainer_threads']} thread(s)",
        f"median of {result['rounds']} alternating runs of {result['steps']} timed steps (after {result['warmup_steps']} warm-up steps); CPU: {result['cpu']}",
        "",
        "| loader | images/s trained | data stall | first batch |",
        "|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        name = LOADERS.get(row["loader"], "model alone (one pre-made batch, no loader)")
        first = f"{row['first_batch_s'] * 1000:.0f} ms" if row["first_batch_s"] is not None else "–"
        lines.append(f"| {name} | {row['images_per_s']:.0f} | {row['stall_pct']:.1f}% | {first} |")
    lines += ["", f"ratio (augserve / DataLoader): {result['ratio']:.2f}×" if result["ratio"] is not None else "ratio: n/a"]
    return "\n".join(lines)


def plot(result: dict, path: str) -> str:
    from augserve.bench.plots import loader_comparison

    rows = result["rows"]
    labels = [LOADERS.get(row["loader"], "model alone\n(no loader)").replace(" + ", "\n+ ").replace(" (", "\n(") for row in rows]
    title = f"augserve bench trainer — {result['model']} on {result['dataset']} ({result['input']}), pipeline {result['pipeline']}, batch {result['batch_size']}, {result['workers']} workers"
    return loader_comparison(path, labels, [row["images_per_s"] for row in rows], [row["stall_pct"] for row in rows], title)


# --- the trainer process -------------------------------------------------------------------------------


class OrdinaryDataset(torch.utils.data.Dataset):
    """The source with the preset's ordinary albumentations Compose applied per image (in the workers)."""

    def __init__(self, dataset: str, options: dict, pipeline: str) -> None:
        from augserve.sources import open_dataset

        from augserve.bench.pipeline_throughput import ordinary_for_preset

        self.source = open_dataset(dataset, split="train", **options)
        self.labels = self.source.labels
        size = self.source.image_size
        self.transform = ordinary_for_preset(pipeline, image_side=min(size) if size else None)
        normalize = self.transform.spec.normalize
        self.dtype = normalize.dtype if normalize is not None else None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image = torch.from_numpy(self.transform(self.source.load(index)))
        if self.dtype not in (None, "float32"):
            image = image.to(getattr(torch, self.dtype))
        return image, int(self.labels[index])


def _worker_init(_):
    import cv2

    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def _forever(loader):
    while True:
        yield from loader


def _dataloader_batches(config: TrainerBenchConfig, seed: int):
    # The class from the imported module, not from ``__main__``: picklable by reference for any start method.
    from trainer.bench.trainer_bench import OrdinaryDataset as Dataset

    dataset = Dataset(config.dataset, config.dataset_options, config.pipeline)
    workers = config.workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
        num_workers=workers, persistent_workers=workers > 0, prefetch_factor=max(2, math.ceil(8 / workers)) if workers > 0 else None,
        worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    return _forever(loader)


def _augserve_batches(config: TrainerBenchConfig, address: str, seed: int):
    from augserve import connect

    dataset = config.dataset if _builtin(config.dataset) else SERVED_NAME
    stream = connect(address, dataset=dataset, pipeline=config.pipeline, batch_size=config.batch_size, seed=seed, epochs=1000, prefetch=8, ordered=False, drop_last=True, dataset_options=config.dataset_options, timeout=30)
    try:
        for batch in stream:
            yield batch.images, batch.labels
    finally:
        stream.close()


def _synthetic_batches(config: TrainerBenchConfig, seed: int):
    """One real augmented batch, made up front and repeated: the model's speed with no loader."""
    dataset = OrdinaryDataset(config.dataset, config.dataset_options, config.pipeline)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dataset), generator=generator)[: config.batch_size].tolist()
    items = [dataset[i] for i in picks]
    images, labels = torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])
    while True:
        yield images, labels


def child_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.bench.trainer_bench")
    parser.add_argument("mode", choices=["augserve", "dataloader", "synthetic"])
    parser.add_argument("--config", required=True, help="TrainerBenchConfig as JSON")
    parser.add_argument("--address")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = TrainerBenchConfig(**json.loads(args.config))

    import cv2

    from augserve.sources import open_dataset
    from trainer import models
    from trainer.loop import Precision, train_step
    from trainer.metrics import StepTimer
    from trainer.run import TrainConfig, build_optimizer

    cv2.setNumThreads(0)  # before DataLoader workers fork (OpenCV's thread pool does not survive fork)
    torch.set_num_threads(config.threads)
    torch.manual_seed(args.seed)
    source = open_dataset(config.dataset, split="train", **config.dataset_options)
    model = models.create(config.model, num_classes=len(source.classes), in_channels=source.channels)
    model.train()
    optimizer = build_optimizer(TrainConfig(lr=config.lr, momentum=0.9, optimizer="sgd", weight_decay=5e-4), model.parameters())
    precision = Precision.create(torch.device("cpu"), "none", False)

    started = time.perf_counter()
    if args.mode == "augserve":
        batches = _augserve_batches(config, args.address, args.seed)
    elif args.mode == "dataloader":
        batches = _dataloader_batches(config, args.seed)
    else:
        batches = _synthetic_batches(config, args.seed)
    timer, first_batch, losses = None, None, []
    for step in range(config.warmup_steps + config.steps):
        if step == config.warmup_steps:
            timer = StepTimer()  # the clock starts now: waiting for the first timed batch counts
        images, labels = next(batches)
        if timer is not None:
            timer.batch_arrived()
        if first_batch is None:
            first_batch = time.perf_counter() - started
        loss, _correct = train_step(model, optimizer, precision, images, labels)
        if timer is not None:
            timer.step_done(int(labels.shape[0]))
        losses.append(loss)
    batches.close()
    print(json.dumps({"mode": args.mode, "images_per_s": timer.images_per_s, "stall_pct": timer.stall_pct, "first_batch_s": first_batch, "first_loss": losses[0], "final_loss": losses[-1], "steps": config.steps, "input": list(images.shape[1:])}))


if __name__ == "__main__":
    child_main()
