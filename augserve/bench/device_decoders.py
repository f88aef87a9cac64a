"""``augserve bench decoders --device D``: whole batches of JPEGs decoded on one device, each sample only
needing a random-resized-crop box of its image — which decoder a GPU worker should use.

The files and boxes are :mod:`augserve.bench.decoders`' (synthesized photos of 1600×1200 and 500×375,
q90, torchvision's random-resized-crop boxes); a batch is ``batch`` samples of one size, the photos
repeated with different boxes. Every candidate decodes the same batch to uint8 H×W×C images on the
device that cover each box:

- ``nvimgcodec batch, ROI`` — :class:`augserve.sources.device_decoder.DeviceDecoder`, what a worker
  runs: one call for the batch, only each box decoded (nvJPEG's ROI decode on a GPU: the hardware
  JPEG engine where it takes the file, else the CUDA decoder; libjpeg-turbo on the CPU);
- ``nvimgcodec batch, whole + crop`` — the same decoder on whole images, the box a view;
- on a GPU also ``ROI, CUDA decoder only`` (no hardware engine) and ``ROI, plain upsampling``
  (nvJPEG's own chroma upsampling instead of libjpeg's "fancy" one, which the worker asks for
  because it is what OpenCV's pixels use);
- ``DALI <mixed|cpu> decoders.image + crop`` and ``decoders.image_crop (ROI)`` — DALI's decoders
  (nvImageCodec underneath; its defaults, e.g. ``hw_decoder_load`` 0.65), fed the bytes through an
  external source, when DALI is importable;
- ``torchvision decode_jpeg + crop`` — ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG
  batched on CUDA; it has no ROI, so whole images and the box a view), when torchvision is importable;
- ``OpenCV per image (exact)`` — ``cv2.imdecode`` of each file, the box sliced out and uploaded: the
  exact decode the CPU path falls back to, as the baseline.

Each candidate decodes the whole batch once per round, in interleaved rounds (the order rotating), the
device synchronized before and after; images/s is the batch over the median time. ``mad`` is the mean
absolute difference (uint8 levels) of its boxes from OpenCV's exact decode. A candidate that cannot run
here gets a row saying why.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import cv2
import numpy as np
import torch

from augserve.sources.device_decoder import GPU_BACKENDS, DeviceDecoder

from .decoders import Box, make_photos, random_resized_crop_box

# decode(files, boxes) -> the decoder's own output, left where it was made (the timed part)
BatchDecode = Callable[[list, list], object]
# regions(output, boxes) -> one uint8 H×W×C region per sample covering its box (tensor or array) and its (top, left)
Regions = Callable[[object, list], list]


def _as_given(output, boxes) -> list:
    return output


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ours(device: str, whole: bool, **options) -> tuple[BatchDecode, Regions]:
    from nvidia import nvimgcodec

    decoder = DeviceDecoder(nvimgcodec, device, 3, **options)

    def decode(files, boxes):
        found = decoder.decode(files, [None] * len(files) if whole else boxes)
        regions = []
        for item, box in zip(found, boxes):
            if item is None:
                raise RuntimeError("nvImageCodec did not decode a bench photo")
            region, placement = item
            if whole:
                x0, y0, x1, y1 = box
                region, placement = region[y0:y1, x0:x1], (y0, x0)
            else:
                placement = (placement.top, placement.left)
            regions.append((region, placement))
        return regions

    return decode, _as_given


def _dali(device: torch.device, batch: int, roi: bool) -> tuple[BatchDecode, Regions]:
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"

    @pipeline_def(batch_size=batch, num_threads=1, device_id=device.index if gpu else None, exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
    def decoding():
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
        where = "mixed" if gpu else "cpu"
        if not roi:
            return fn.decoders.image(jpegs, device=where, output_type=types.RGB)
        w, h, x, y = (fn.external_source(name=name, dtype=types.FLOAT) for name in ("w", "h", "x", "y"))
        return fn.decoders.image_crop(jpegs, device=where, output_type=types.RGB, crop_w=w, crop_h=h, crop_pos_x=x, crop_pos_y=y)

    pipe = decoding()
    pipe.build()

    def regions(images, boxes):
        images = images.as_cpu() if gpu else images
        out = []
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            image = np.asarray(images.at(k))
            out.append((image, (y0, x0)) if roi else (image[y0:y1, x0:x1], (y0, x0)))
        return out

    def decode(files, boxes):
        pipe.feed_input("jpegs", [np.frombuffer(f.raw, np.uint8) for f in files])
        if roi:  # DALI's anchor is pos × (size - crop): the position that puts the crop on the box
            columns = {"w": [], "h": [], "x": [], "y": []}
            for f, (x0, y0, x1, y1) in zip(files, boxes):
                columns["w"].append(x1 - x0)
                columns["h"].append(y1 - y0)
                columns["x"].append(x0 / (f.width - (x1 - x0)) if f.width > x1 - x0 else 0.0)
                columns["y"].append(y0 / (f.height - (y1 - y0)) if f.height > y1 - y0 else 0.0)
            for name, values in columns.items():
                pipe.feed_input(name, [np.array(v, np.float32) for v in values])
        (images,) = pipe.run()
        return images  # on the device: the timing stops at the decode

    return decode, regions


def _torchvision(device: torch.device) -> tuple[BatchDecode, Regions]:
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(files, boxes):
        data = [torch.frombuffer(bytearray(f.raw), dtype=torch.uint8) for f in files]
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return [(image.permute(1, 2, 0)[y0:y1, x0:x1], (y0, x0)) for image, (x0, y0, x1, y1) in zip(images, boxes)]

    return decode, _as_given


def _opencv(device: torch.device) -> tuple[BatchDecode, Regions]:
    def decode(files, boxes):
        out = []
        for f, (x0, y0, x1, y1) in zip(files, boxes):
            image = cv2.imdecode(np.frombuffer(f.raw, np.uint8), cv2.IMREAD_COLOR)
            region = torch.from_numpy(cv2.cvtColor(image[y0:y1, x0:x1], cv2.COLOR_BGR2RGB))
            out.append((region.to(device) if device.type == "cuda" else region, (y0, x0)))
        return out

    return decode, _as_given


def candidates(device: str, batch: int) -> dict[str, tuple[tuple[BatchDecode, Regions] | None, str]]:
    """name -> ((batch decode, its regions), note); None where the candidate cannot run here (the note says why)."""
    where = torch.device(device)
    if where.type == "cuda" and where.index is None:
        where = torch.device("cuda", torch.cuda.current_device())
    gpu = where.type == "cuda"
    kind = "GPU" if gpu else "CPU"
    makers: dict[str, tuple[Callable[[], tuple[BatchDecode, Regions]], str]] = {
        f"nvimgcodec {kind} batch, ROI": (lambda: _ours(str(where), whole=False), "what a worker runs: one call, only each box"),
        f"nvimgcodec {kind} batch, whole + crop": (lambda: _ours(str(where), whole=True), "whole images, the box a view"),
    }
    if gpu:
        makers["nvimgcodec GPU batch, ROI, CUDA decoder only"] = (lambda: _ours(str(where), whole=False, backends=GPU_BACKENDS[1:]), "no hardware JPEG engine")
        makers["nvimgcodec GPU batch, ROI, plain upsampling"] = (lambda: _ours(str(where), whole=False, fancy_upsampling=False), "nvJPEG's chroma upsampling, not libjpeg's")
    dali = "mixed" if gpu else "cpu"
    makers[f"DALI {dali} decoders.image + crop"] = (lambda: _dali(where, batch, roi=False), "DALI's defaults; the box a view")
    makers[f"DALI {dali} decoders.image_crop (ROI)"] = (lambda: _dali(where, batch, roi=True), "DALI's defaults; only each box")
    makers[f"torchvision decode_jpeg({where.type}) + crop"] = (lambda: _torchvision(where), "no ROI: whole images, the box a view")
    makers["OpenCV per image (exact)" + (" + upload" if gpu else "")] = (lambda: _opencv(where), "the exact decode, one file at a time")
    found = {}
    for name, (make, note) in makers.items():
        try:
            found[name] = (make(), note)
        except Exception as exc:  # noqa: BLE001 - a library missing or unable to run here: a row that says so
            found[name] = (None, f"unavailable: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    return found


def _mad(regions: list, boxes: list[Box], exact: list[np.ndarray]) -> float:
    """Mean |region - exact decode| over the boxes (uint8 levels)."""
    total = []
    for (region, (top, left)), (x0, y0, x1, y1), reference in zip(regions, boxes, exact):
        region = region.cpu().numpy() if isinstance(region, torch.Tensor) else np.asarray(region)
        i0, j0 = y0 - top, x0 - left  # the box inside the region
        crop = region[i0 : i0 + y1 - y0, j0 : j0 + x1 - x0]
        if crop.shape != (y1 - y0, x1 - x0, 3):
            raise RuntimeError(f"a decoded region of shape {region.shape} at ({top}, {left}) does not cover box {(x0, y0, x1, y1)}")
        total.append(float(np.abs(crop.astype(np.int16) - reference[y0:y1, x0:x1]).mean()))
    return statistics.fmean(total)


def run_device_decoders(device: str = "cuda:0", photos: int = 6, rounds: int = 5, batch: int = 128, seed: int = 0, progress=None) -> dict:
    """Time every candidate decoding ``batch`` samples per image size on ``device`` (``cpu`` or
    ``cuda[:K]``), ``rounds`` interleaved rounds. Returns ``{"config": ..., "rows": [...]}``: per (size,
    candidate) ``images_per_s`` (None with a ``note`` saying why when it cannot run), ``ms_per_batch``
    (median), ``mad`` (levels from OpenCV's exact decode) and ``vs_opencv`` (images/s ratio)."""
    from pipelines.backends.base import check_device

    if photos < 1 or rounds < 1 or batch < 1:
        raise ValueError(f"photos, rounds and batch must be >= 1, got {photos}, {rounds}, {batch}")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be cpu or cuda[:K], got {device!r}")
    check_device(device)
    say = progress or (lambda text: None)
    where = torch.device(device)
    rng = np.random.default_rng(seed)
    files = make_photos(photos, seed)
    sizes = list(dict.fromkeys((f.width, f.height) for f in files))
    batches = {}
    for width, height in sizes:
        group = [f for f in files if (f.width, f.height) == (width, height)]
        chosen = [group[k % len(group)] for k in range(batch)]
        batches[(width, height)] = (chosen, [random_resized_crop_box(rng, f.height, f.width) for f in chosen])
    found = candidates(device, batch)
    names = [name for name, (decode, _) in found.items() if decode is not None]
    say(f"decoders on {device}: {batch} samples per size, {rounds} rounds, candidates: {', '.join(names)}")

    rows = []
    for (width, height), (chosen, boxes) in batches.items():
        exact = {id(f): cv2.cvtColor(cv2.imdecode(np.frombuffer(f.raw, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for f in chosen}
        references = [exact[id(f)] for f in chosen]
        mad = {}
        for name in list(names):  # the first call checks coverage and measures the pixels; a second warms up
            decode, regions = found[name][0]
            try:
                mad[name] = _mad(regions(decode(chosen, boxes), boxes), boxes, references)
                decode(chosen, boxes)
            except Exception as exc:  # noqa: BLE001 - e.g. a library built for another CUDA: its row says so
                found[name] = (None, f"failed: {type(exc).__name__}: {str(exc).strip()[:200]}")
                names.remove(name)
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(rounds):
            shift = round_index % max(len(names), 1)
            for name in names[shift:] + names[:shift]:
                _synchronize(where)
                start = time.perf_counter()
                found[name][0][0](chosen, boxes)
                _synchronize(where)
                times[name].append(time.perf_counter() - start)
            say(f"decoders on {device}, {width}×{height}: round {round_index + 1}/{rounds} done")
        baseline = next((name for name in names if name.startswith("OpenCV")), None)
        for name, (decode, note) in found.items():
            row = {"size": f"{width}×{height}", "candidate": name, "note": note, "images_per_s": None, "ms_per_batch": None, "mad": None, "vs_opencv": None}
            if decode is not None:
                seconds = statistics.median(times[name])
                row.update(images_per_s=round(batch / seconds, 1), ms_per_batch=round(seconds * 1000, 3), mad=round(mad[name], 3))
                if baseline is not None:
                    row["vs_opencv"] = round(statistics.median(times[baseline]) / seconds, 2)
            rows.append(row)
    config = {"device": torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu", "batch": batch, "photos": photos, "rounds": rounds,
              "torch": torch.__version__, "fastest": _fastest(rows)}  # fmt: skip
    return {"config": config, "rows": rows}


def _fastest(rows: list[dict]) -> dict:
    """Per size, the candidate with the most images/s and how far ahead of the next it is."""
    best = {}
    for size in dict.fromkeys(row["size"] for row in rows):
        ranked = sorted((row for row in rows if row["size"] == size and row["images_per_s"]), key=lambda row: -row["images_per_s"])
        if ranked:
            ahead = ranked[0]["images_per_s"] / ranked[1]["images_per_s"] if len(ranked) > 1 else None
            best[size] = {"candidate": ranked[0]["candidate"], "ahead_of_next": None if ahead is None else round(ahead, 2)}
    return best


def format_table(result: dict) -> str:
    """A markdown table of :func:`run_device_decoders`' result."""
    config = result["config"]
    lines = [
        f"{config['batch']} random-resized-crop samples per size decoded on {config['device']}, {config['rounds']} interleaved rounds (torch {config['torch']})",
        "fastest: " + "; ".join(f"{size} {b['candidate']}" + (f" ({b['ahead_of_next']:.2f}× the next)" if b["ahead_of_next"] else "") for size, b in config["fastest"].items()),
        "",
        "| size | candidate | images/s | ms per batch | × OpenCV per image | MAD vs exact | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        if row["images_per_s"] is None:
            lines.append(f"| {row['size']} | {row['candidate']} | – | – | – | – | {row['note']} |")
            continue
        ratio = f"{row['vs_opencv']:.2f}×" if row["vs_opencv"] is not None else "–"
        lines.append(f"| {row['size']} | {row['candidate']} | {row['images_per_s']:.0f} | {row['ms_per_batch']:.2f} | {ratio} | {row['mad']:.2f} | {row['note']} |")
    return "\n".join(lines)
