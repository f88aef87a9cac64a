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

The same machinery runs ``augserve bench gpu-e2e`` (:mod:`trainer.bench.gpu_e2e`): the config's
further fields put the trainer on a CUDA device (``device``, ``precision``, ``channels_last``; model and
batches there, one pre-made batch already there for the synthetic run), the daemon's workers on one
(``worker_device``), size the DataLoader apart from the daemon (``dataloader_workers``) and add DALI's
own iterator (``loaders``). Their defaults keep this benchmark as it was. The batch sources are in
:mod:`trainer.bench.loaders`.

``python -m trainer.bench.trainer_bench MODE --config JSON`` is the trainer process (MODE: augserve,
dataloader, dali or synthetic); it prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch

LOADERS = {"augserve": "augserve (daemon + connect)", "dataloader": "torch DataLoader + albumentations", "dali": "DALI pipeline + DALIGenericIterator"}
MODES = (*LOADERS, "synthetic")
PRECISIONS = {"fp32": "none", "bf16": "bf16"}  # --precision -> trainer.loop.Precision's amp name
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
    # Beyond ``augserve bench trainer`` (which keeps these defaults): see the module docstring.
    device: str = "cpu"  # the trainer's: cpu or cuda[:k]
    precision: str = "fp32"  # a key of PRECISIONS
    channels_last: bool = False
    worker_device: str = "cpu"  # the daemon workers'
    dataloader_workers: int | None = None  # None: ``workers``
    dali_threads: int | None = None  # None: the DataLoader's worker count
    crop_size: int | None = None  # the preset's random_resized_crop resized (see loaders.bench_spec)
    loaders: tuple[str, ...] = ("augserve", "dataloader")
    one_epoch: bool = False  # the DataLoader draws the whole run as one epoch (see loaders.dataloader_batches)
    child_timeout_s: float = CHILD_TIMEOUT_S

    @property
    def loader_workers(self) -> int:
        return self.workers if self.dataloader_workers is None else self.dataloader_workers

    @property
    def loader_threads(self) -> int:
        return self.loader_workers if self.dali_threads is None else self.dali_threads

    def spec(self) -> dict:
        """The pipeline every loader applies, as a spec dict."""
        from trainer.bench.loaders import bench_spec

        return bench_spec(self.pipeline, self.crop_size).to_dict()


EXTENDED_FIELDS = tuple(f.name for f in fields(TrainerBenchConfig) if f.name not in ("model", "dataset", "dataset_options", "pipeline", "batch_size", "steps", "warmup_steps", "workers", "rounds", "backend", "threads", "lr", "seed"))


class ChildFailed(RuntimeError):
    """A trainer process exited with an error or ran out of time; ``line``: the gist, one line."""

    def __init__(self, message: str, line: str) -> None:
        super().__init__(message)
        self.line = line


def check_setup(config: TrainerBenchConfig):
    """The checks that need no dataset (pipeline, precision, loaders, model name): ValueError (one line)
    for a mistake, before anything is generated or started. Returns the spec every loader applies."""
    import pipelines
    from trainer import models

    from augserve.bench.dali_chain import check_chain
    from augserve.bench.pipeline_throughput import ordinary_for_preset

    ordinary_for_preset(config.pipeline)  # refuses pipelines without an albumentations equivalent
    spec = pipelines.PipelineSpec.model_validate(config.spec())
    if config.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    unknown = [mode for mode in config.loaders if mode not in LOADERS]
    if unknown or not config.loaders:
        raise ValueError(f"loaders must be some of {', '.join(LOADERS)}, got {list(config.loaders)}")
    if "dali" in config.loaders:
        try:
            check_chain(spec)
        except ValueError as exc:
            raise ValueError(f"pipeline {config.pipeline}: {exc}") from None
    if config.model not in models.list_models():
        raise ValueError(f"unknown model {config.model!r}; known models: {', '.join(models.list_models())}")
    return spec


def check(config: TrainerBenchConfig) -> dict:
    """Validate a configuration before any process starts; ValueError (one line) for a mistake.

    Returns what the trainer will see: classes, channels and the input size.
    """
    from augserve.sources import open_dataset
    from trainer import models
    from trainer.bench.loaders import folder_files
    from trainer.data import output_size

    spec = check_setup(config)
    if "dali" in config.loaders:
        folder_files(config.dataset, config.dataset_options)
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
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=config.child_timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"{mode} trainer process ran past {config.child_timeout_s:.0f} s", f"ran past {config.child_timeout_s:.0f} s") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise ChildFailed(f"{mode} trainer process failed ({proc.returncode}):\n{proc.stderr[-2000:]}", lines[-1].strip()[:300] if lines else f"exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(config: TrainerBenchConfig, progress=None, tolerate: bool = False) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Run every loader of ``config.loaders`` ``config.rounds`` times, alternating (the order reverses
    every other round), against one daemon when ``augserve`` is among them.

    Returns (runs per loader: the trainer processes' JSON, failures per loader: one line each). A
    failure raises :class:`ChildFailed` (a RuntimeError), or with ``tolerate`` is recorded and that loader
    is not run again (a daemon that does not start counts as augserve's failure).
    """
    from augserve.local import local_daemon
    from trainer.bench.loaders import served_datasets

    runs: dict[str, list[dict]] = {mode: [] for mode in config.loaders}
    failures: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        address = None
        if "augserve" in config.loaders:
            try:
                address = stack.enter_context(local_daemon(config.workers, config.backend, config.worker_device, served_datasets(config.dataset)))
            except (ConnectionError, TimeoutError) as exc:
                if not tolerate:
                    raise
                failures["augserve"] = f"the daemon did not start: {exc}"
        for round_index in range(config.rounds):
            order = list(config.loaders) if round_index % 2 == 0 else list(reversed(config.loaders))
            for mode in (m for m in order if m not in failures):
                try:
                    run = _run_child(mode, config, address if mode == "augserve" else None, seed=config.seed + round_index)
                except ChildFailed as exc:
                    if not tolerate:
                        raise
                    failures[mode] = exc.line
                    if progress:
                        progress(f"round {round_index + 1}/{config.rounds}: {LOADERS[mode]}: failed: {exc.line}")
                    continue
                runs[mode].append(run)
                if progress:
                    progress(f"round {round_index + 1}/{config.rounds}: {LOADERS[mode]}: {run['images_per_s']:.0f} img/s, stall {run['stall_pct']:.1f}%")
    return runs, failures


def synthetic_run(config: TrainerBenchConfig, progress=None) -> dict:
    """One trainer process on one pre-made batch (no loader at all): the model's own speed."""
    run = _run_child("synthetic", config, None, seed=config.seed)
    if progress:
        progress(f"model alone (one pre-made batch, no loader): {run['images_per_s']:.0f} img/s")
    return run


def median_of(runs: list[dict], key: str, digits: int):
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), digits) if values else None


def run_trainer_bench(config: TrainerBenchConfig, progress=None) -> dict:
    """Measure and return the result dict (rows per loader, medians, ratio)."""
    from augserve.bench.plots import cpu_name

    info = check(config)
    runs, _ = measure(config, progress)
    synthetic = synthetic_run(config, progress)
    rows = []
    for mode, mode_runs in runs.items():
        rows.append(
            {
                "benchmark": "trainer",
                "loader": mode,
                "workers": config.workers,
                "images_per_s": median_of(mode_runs, "images_per_s", 1),
                "stall_pct": median_of(mode_runs, "stall_pct", 1),
                "first_batch_s": median_of(mode_runs, "first_batch_s", 3),
                "final_loss": median_of(mode_runs, "final_loss", 4),
                "runs": [{"images_per_s": round(r["images_per_s"], 1), "stall_pct": round(r["stall_pct"], 1)} for r in mode_runs],
            }
        )
    rows.append({"benchmark": "trainer", "loader": "none", "workers": 0, "images_per_s": round(synthetic["images_per_s"], 1), "stall_pct": 0.0, "first_batch_s": None, "final_loss": round(synthetic["final_loss"], 4), "runs": [{"images_per_s": round(synthetic["images_per_s"], 1), "stall_pct": 0.0}]})
    ours, baseline = rows[0], rows[1]
    return {
        "benchmark": "trainer",
        **{k: v for k, v in asdict(config).items() if k not in ("threads", *EXTENDED_FIELDS)},
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


def _batches(mode: str, config: TrainerBenchConfig, address: str | None, seed: int, precision, facts: dict):
    """The endless ``(images, labels)`` iterator of ``mode`` (see :mod:`trainer.bench.loaders`)."""
    from trainer.bench import loaders

    spec = config.spec()
    source = (config.dataset, config.dataset_options)
    if mode == "augserve":
        # A preset travels by name, as a user passes it; a resized one as its spec.
        pipeline = config.pipeline if config.crop_size is None else spec
        return loaders.augserve_batches(address, *source, pipeline, config.batch_size, seed, device=config.device, facts=facts)
    if mode == "dataloader":
        samples = (config.warmup_steps + config.steps) * config.batch_size if config.one_epoch else None
        return loaders.dataloader_batches(*source, spec, config.batch_size, config.loader_workers, seed, pin_memory=precision.device.type == "cuda", samples=samples)
    if mode == "dali":
        return loaders.dali_batches(*source, spec, config.batch_size, config.loader_threads, seed, device=config.device)
    return loaders.synthetic_batches(*source, spec, config.batch_size, seed, place=precision.prepare)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.bench.trainer_bench")
    parser.add_argument("mode", choices=MODES)
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
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # one input shape for the whole run
    source = open_dataset(config.dataset, split="train", **config.dataset_options)
    model = models.create(config.model, num_classes=len(source.classes), in_channels=source.channels).to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = build_optimizer(TrainConfig(lr=config.lr, momentum=0.9, optimizer="sgd", weight_decay=5e-4), model.parameters())
    precision = Precision.create(device, PRECISIONS[config.precision], config.channels_last)

    started = time.perf_counter()
    facts: dict = {}
    batches = _batches(args.mode, config, args.address, args.seed, precision, facts)
    timer, first_batch, losses = None, None, []
    for step in range(config.warmup_steps + config.steps):
        if step == config.warmup_steps:
            _synchronize(device)  # nothing of the warm-up steps may spill into the timed ones
            timer = StepTimer()  # the clock starts now: waiting for the first timed batch counts
        images, labels = next(batches)
        if timer is not None:
            timer.batch_arrived()
        if first_batch is None:
            first_batch = time.perf_counter() - started
        # train_step reads the loss back (float), which waits for the step's GPU work: each step's time
        # is its compute, so the wait before it is the data stall.
        loss, _correct = train_step(model, optimizer, precision, images, labels)
        if timer is not None:
            timer.step_done(int(labels.shape[0]))
        losses.append(loss)
    _synchronize(device)
    batches.close()
    result = {"mode": args.mode, "images_per_s": timer.images_per_s, "stall_pct": timer.stall_pct, "first_batch_s": first_batch, "first_loss": losses[0], "final_loss": losses[-1], "steps": config.steps, "input": list(images.shape[1:])}
    if args.mode == "augserve":
        result["transport"] = facts.get("transport")
    print(json.dumps(result))


if __name__ == "__main__":
    child_main()
