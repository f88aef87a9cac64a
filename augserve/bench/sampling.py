"""``augserve bench sampling``: per-sample parameters of a batch sampled and fused by numpy on the host
against the same work as torch ops on the worker's device (``Pipeline(sampling="device")``).

The batch: ``batch`` samples of ``bench gpu``'s chain (random-resized-crop + flip + rotate + shear +
PCA lighting + color shift) on 256×256 RGB inputs. Per device (the CPU, and CUDA when there is one),
in interleaved rounds (:func:`augserve.bench.timing.interleaved`), medians reported:

* ``numpy sample + fuse``: ``sample_batch`` + ``fuse_batch`` — the list of ``SamplePlan`` objects;
* ``numpy sample + fuse + batch arrays``: also what the torch backend then does on the host before its
  first pixel kernel (gathering the plans into :class:`~pipelines.batched_plan.FusedBatch` tensors and
  its facts table) — the host path as a whole;
* ``device sample + fuse``: :class:`~pipelines.device_fusion.DevicePlanner` through the one
  device→host copy of the facts table (on CUDA a replayed CUDA graph; ``eager`` without one).

Only parameter work is timed, no pixels: the time the host spends before a batch's resampling starts.
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.backends.base import check_device

from .gpu_candidates import GPU_CHAIN
from .timing import interleaved


def candidates(device: str, batch: int) -> dict:
    """name -> function(round) returning the number of samples it planned."""
    from pipelines.batched_plan import FusedBatch, facts_table
    from pipelines.device_fusion import DevicePlanner
    from pipelines.plan import color_runs_first, fuse_batch
    from pipelines.sampling import sample_batch
    from pipelines.spec import PipelineSpec

    spec = PipelineSpec.model_validate(GPU_CHAIN).without_normalize()
    first = color_runs_first(spec)
    shapes, ids = np.tile([256, 256, 3], (batch, 1)), np.arange(batch)

    def host_plans(r: int):
        return fuse_batch(sample_batch(spec, shapes, 0, r + 10, ids), first)

    def host_arrays(r: int) -> int:
        facts_table(FusedBatch.from_plans(host_plans(r))).numpy()
        return batch

    def planner_run(planner):
        def run(r: int) -> int:
            planner(shapes, 0, r + 10, ids).facts.cpu()
            return batch

        return run

    found = {
        f"numpy sample + fuse ({device} worker)": lambda r: len(host_plans(r)),
        f"numpy sample + fuse + batch arrays ({device} worker)": host_arrays,
        f"device sample + fuse on {device}": planner_run(DevicePlanner(spec, device, first)),
    }
    if torch.device(device).type == "cuda":
        found[f"device sample + fuse on {device}, eager (no CUDA graph)"] = planner_run(DevicePlanner(spec, device, first, graphs=False))
    return found


def run_sampling_bench(batch: int = 256, rounds: int = 30, devices: list[str] | None = None, threads: int = 1) -> dict:
    """Milliseconds of host time per batch for each candidate on each device (default: cpu, and cuda:0
    when available). ``threads``: torch's intra-op threads (a worker uses one)."""
    devices = devices or ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
    for device in devices:
        try:
            kind = torch.device(device).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
        check_device(device)
    rows, previous = [], torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for device in devices:
            measured = interleaved(candidates(device, batch), rounds, warmup=2)
            ms = {name: 1e3 * batch / result["images_per_s"] for name, result in measured.items()}
            host_path = next(value for name, value in ms.items() if "batch arrays" in name)  # the ratios' baseline
            for name, value in ms.items():
                rows.append({"benchmark": "sampling", "device": device, "name": name, "ms_per_batch": round(value, 3), "vs_host_path": round(host_path / value, 2)})
    finally:
        torch.set_num_threads(previous)
    return {
        "benchmark": "sampling",
        "batch": f"{batch} samples of the gpu chain, 256×256×3 inputs",
        "rounds": rounds,
        "threads": threads,
        "cuda_device": next((torch.cuda.get_device_name(d) for d in devices if torch.device(d).type == "cuda"), None),
        "rows": rows,
    }


def format_table(result: dict) -> str:
    lines = [
        f"Host time to plan a batch — {result['batch']}, median of {result['rounds']} interleaved rounds, {result['threads']} torch thread(s)"
        + (f", GPU: {result['cuda_device']}" if result["cuda_device"] else ""),
        "",
        "| device | candidate | ms per batch | host path ÷ this |",
        "|---|---|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['device']} | {row['name']} | {row['ms_per_batch']:.3f} | {row['vs_host_path']:.2f} |")
    return "\n".join(lines)
