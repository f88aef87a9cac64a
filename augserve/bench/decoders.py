"""Which JPEG decoder to use when only a random-resized crop of the image is kept.

Synthesized photos (scikit-image's bundled color photographs resized and cropped to 1600×1200 and
500×375, light sensor-like noise added so the files carry realistic detail, encoded by
``cv2.imencode`` at quality 90; nothing is downloaded) are decoded for random-resized-crop boxes
(area scale uniform in [0.08, 1], aspect ratio log-uniform in [3/4, 4/3], torchvision's sampling,
output 224²). Each box gets the DCT reduction factor ``f`` (1, 2, 4 or 8) that keeps the crop at or
above 224 pixels on both sides, and every candidate decodes "at least the box" with it:

- ``cv2 full`` — ``cv2.imdecode`` of the whole image, then the box sliced out (the exact baseline,
  what ``read_image`` does);
- ``cv2 reduced`` — ``cv2.imdecode`` with ``IMREAD_REDUCED_COLOR_f`` (libjpeg-turbo DCT scaling,
  every row and column), then the box sliced out;
- ``simplejpeg`` / ``simplejpeg fast`` — ``simplejpeg.decode_jpeg(min_height, min_width)`` (the same
  DCT scaling), without and with ``fastdct`` + ``fastupsample``; only when simplejpeg is installed;
- ``nvimgcodec ROI`` — nvImageCodec's CPU (libjpeg-turbo) decoder with a region: only the box's
  columns are transformed and decoding stops after its last row, but there is no scaling (f = 1);
- ``libjpeg scaled ROI`` — augserve's libjpeg-turbo region decoder (``augserve/sources/_libjpeg_region.c``):
  DCT scaling, crop and skip-scanlines at once; only where it was built;
- ``Pillow draft`` — ``Image.draft`` (DCT scaling), for reference;
- ``decode_encoded`` — what ``augserve.sources.decode.decode_encoded`` does with ``max_factor=f``.

Every call is timed on its own; the candidates take turns on each box (the order rotating), so the
noise of a shared machine falls on all of them alike. Reported per image size: the median and mean
milliseconds per image of each candidate, and its mean absolute difference (uint8 levels) from the
exact decode reduced by ``cv2.INTER_AREA`` to the same grid. ``rule`` rows are per-sample choices
computed from the same timings: nvImageCodec's ROI for f = 1 and OpenCV's DCT-scaled decode otherwise
(what ``decode_encoded`` does where augserve's libjpeg decoder was not built), and the per-sample best
(a bound no rule reaches).

The summary also gives, per size, how far a whole pipeline lands from exact decoding: random-resized-
crop 224 + mirror run with ``decode: fast`` (region and reduction as planned) and ``decode: exact``
on the same samples, mean absolute difference of the outputs in uint8 levels (``pipeline_mad``).

Run: ``augserve bench decoders`` (a markdown table; ``--json`` for the rows and the summary).
"""

from __future__ import annotations

import io
import math
import statistics
import time
from typing import Callable

import cv2
import numpy as np

from augserve.sources.decode import FACTORS, EncodedImage, Placement, decode_encoded

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
SIZES = ((1600, 1200), (500, 375))  # (width, height)
OUTPUT = 224
QUALITY = 90
NOISE_SIGMA = 3.0  # uint8 levels; upscaled photos alone are smoother (fewer bits per pixel) than camera output
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)

_REDUCED_FLAG = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), integer pixels, x1/y1 exclusive
# (file, box, factor) -> (region covering the box at 1/factor, its placement); the file is an
# EncodedImage of a photo without EXIF: ``raw``, ``height`` and ``width`` are what a decoder needs.
Decode = Callable[[EncodedImage, Box, int], tuple[np.ndarray, Placement]]


def make_photos(photos: int, seed: int = 0) -> list[EncodedImage]:
    """``photos`` JPEG files per size (as if read by ``read_encoded``: no EXIF, orientation 1).

    Photo ``k`` is ``PHOTOS[k % 4]`` scaled to cover the size and cropped at an offset that depends
    on ``k``, mirrored for odd ``k // 4``, so more than four photos still differ.
    """
    import skimage.data  # deferred: importing scikit-image is slow

    rng = np.random.default_rng(seed)
    files = []
    for width, height in SIZES:
        for k in range(photos):
            photo = getattr(skimage.data, PHOTOS[k % len(PHOTOS)])()
            if (k // len(PHOTOS)) % 2:
                photo = photo[:, ::-1]
            h, w = photo.shape[:2]
            scale = max(width / w, height / h) * (1 + 0.1 * (k // len(PHOTOS)))
            size = (max(width, math.ceil(w * scale)), max(height, math.ceil(h * scale)))
            big = cv2.resize(photo, size, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
            top, left = (size[1] - height) // 2, (size[0] - width) // 2
            image = big[top : top + height, left : left + width].astype(np.float32)
            image += rng.normal(0.0, NOISE_SIGMA, image.shape).astype(np.float32)
            image = np.clip(image, 0, 255).astype(np.uint8)
            ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
            if not ok:
                raise RuntimeError("cv2.imencode failed to write a JPEG")
            files.append(EncodedImage(f"{PHOTOS[k % len(PHOTOS)]}-{k}-{width}x{height}.jpg", encoded.tobytes(), "jpeg", height, width, 1))
    return files


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int) -> Box:
    """torchvision's ``RandomResizedCrop.get_params``: 10 tries, then the centre crop of clamped ratio."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif ratio > RATIO[1]:
        h, w = height, round(height * RATIO[1])
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def crop_factor(box: Box, output: int = OUTPUT) -> int:
    """The largest of 1, 2, 4, 8 that keeps both sides of ``box`` at or above ``output`` pixels."""
    side = min(box[2] - box[0], box[3] - box[1])
    return max(f for f in FACTORS if side >= output * f or f == 1)


def _grid_rect(box: Box, factor: int) -> tuple[int, int, int, int]:
    """``(i0, j0, i1, j1)``: rows and columns of the 1/``factor`` grid that cover ``box``."""
    x0, y0, x1, y1 = box
    return y0 // factor, x0 // factor, -(-y1 // factor), -(-x1 // factor)


def _slice(image: np.ndarray, box: Box, factor: int) -> tuple[np.ndarray, Placement]:
    """The part of a decode at 1/``factor`` that covers ``box``, copied, and where it sits."""
    i0, j0, i1, j1 = _grid_rect(box, factor)
    return np.array(image[i0:i1, j0:j1]), Placement(factor, i0 * factor, j0 * factor)


def _cv2_full(file: EncodedImage, box: Box, factor: int) -> tuple[np.ndarray, Placement]:
    image = cv2.imdecode(np.frombuffer(file.raw, np.uint8), cv2.IMREAD_COLOR)
    return _slice(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), box, 1)


def _cv2_reduced(file: EncodedImage, box: Box, factor: int) -> tuple[np.ndarray, Placement]:
    image = cv2.imdecode(np.frombuffer(file.raw, np.uint8), _REDUCED_FLAG[factor])
    region, placement = _slice(image, box, factor)
    return cv2.cvtColor(region, cv2.COLOR_BGR2RGB), placement


def _simplejpeg(fast: bool) -> Decode | None:
    try:
        import simplejpeg
    except ImportError:
        return None

    def decode(file: EncodedImage, box: Box, factor: int) -> tuple[np.ndarray, Placement]:
        height, width = file.height, file.width
        image = simplejpeg.decode_jpeg(
            file.raw, "RGB", fastdct=fast, fastupsample=fast, min_height=-(-height // factor), min_width=-(-width // factor)
        )
        return _slice(image, box, factor)

    return decode


def _nvimgcodec_roi() -> Decode | None:
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return None
    decoder = nvimgcodec.Decoder(
        device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
        backends=[nvimgcodec.Backend(nvimgcodec.CPU_ONLY)],
        max_num_cpu_threads=1,
    )
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False)

    def decode(file: EncodedImage, box: Box, factor: int) -> tuple[np.ndarray, Placement]:
        x0, y0, x1, y1 = box
        stream = nvimgcodec.CodeStream(file.raw).get_sub_code_stream(region=nvimgcodec.Region(y0, x0, y1, x1))
        image = decoder.decode(stream, params=params)
        return np.array(image.cpu()), Placement(1, y0, x0)

    return decode


def _libjpeg_scaled_roi() -> Decode | None:
    from augserve.sources.region_decoder import decode_scaled_region, scaled_region_decoder

    if scaled_region_decoder() is None:
        return None

    def decode(file: EncodedImage, box: Box, factor: int) -> tuple[np.ndarray, Placement]:
        i0, j0, i1, j1 = _grid_rect(box, factor)
        found = decode_scaled_region(file.raw, 3, factor, i0, j0, i1, j1)
        if found is None:
            raise RuntimeError(f"libjpeg refused {file.path}")
        region, col0 = found
        return region, Placement(factor, i0 * factor, col0 * factor)

    return decode


def _pillow_draft(file: EncodedImage, box: Box, factor: int) -> tuple[np.ndarray, Placement]:
    from PIL import Image

    with Image.open(io.BytesIO(file.raw)) as image:
        image.draft("RGB", (-(-file.width // factor), -(-file.height // factor)))
        scale = next(f for f in FACTORS if -(-file.width // f) == image.size[0])
        return _slice(np.asarray(image.convert("RGB")), box, scale)


def _ours(file: EncodedImage, box: Box, factor: int) -> tuple[np.ndarray, Placement]:
    return decode_encoded(file, 3, box, max_factor=factor)


def candidates() -> dict[str, Decode]:
    """Name -> decode function for every candidate available in this environment."""
    found: dict[str, Decode | None] = {
        "cv2 full (exact)": _cv2_full,
        "cv2 reduced": _cv2_reduced,
        "simplejpeg": _simplejpeg(fast=False),
        "simplejpeg fast": _simplejpeg(fast=True),
        "nvimgcodec ROI": _nvimgcodec_roi(),
        "libjpeg scaled ROI": _libjpeg_scaled_roi(),
        "Pillow draft": _pillow_draft,
        "decode_encoded": _ours,
    }
    return {name: fn for name, fn in found.items() if fn is not None}


def _mad(exact: np.ndarray, region: np.ndarray, placement: Placement, box: Box) -> float:
    """Mean absolute difference between ``region`` and the exact decode reduced to its grid, over the
    pixels of ``region`` that lie inside the image."""
    f, top, left = placement.factor, placement.top, placement.left
    rows = min(region.shape[0], (exact.shape[0] - top) // f)
    cols = min(region.shape[1], (exact.shape[1] - left) // f)
    reference = exact[top : top + rows * f, left : left + cols * f]
    if f > 1:
        reference = cv2.resize(reference, (cols, rows), interpolation=cv2.INTER_AREA)
    return float(np.abs(region[:rows, :cols].astype(np.int16) - reference).mean())


def pipeline_mad(files: list[EncodedImage], seed: int = 0) -> dict[str, float]:
    """Per image size: mean |fast - exact| (uint8 levels) of random-resized-crop 224 + mirror outputs,
    the same samples planned once and decoded both ways (``Pipeline.run_decoding``)."""
    import pipelines

    spec = {"ops": [{"op": "random_resized_crop", "size": OUTPUT}, {"op": "mirror"}]}
    fast, exact = pipelines.build(spec), pipelines.build({**spec, "decode": "exact"})
    result = {}
    for size in dict.fromkeys(f"{f.width}×{f.height}" for f in files):
        group = [f for f in files if f"{f.width}×{f.height}" == size]

        def decode(index, box, max_factor, group=group):
            array, placement = decode_encoded(group[index], 3, box, max_factor)
            return array, (placement.factor, placement.top, placement.left)

        shapes = [(f.height, f.width, 3) for f in group]
        ours = fast.run_decoding(shapes, decode, seed=seed).numpy().astype(np.int16)
        reference = exact.run_decoding(shapes, decode, seed=seed).numpy().astype(np.int16)
        result[size] = float(np.abs(ours - reference).mean())
    return result


def run_decoders(photos: int = 6, rounds: int = 3, progress=None, boxes_per_photo: int = 4, seed: int = 0) -> dict:
    """Time every candidate on ``photos`` photos per size, ``boxes_per_photo`` crop boxes each, ``rounds`` times.

    Returns ``{"config": ..., "rows": [...]}`` with one row per (size, candidate): ``ms_median`` and
    ``ms_mean`` per image, ``by_factor`` (median ms per DCT factor), and for decoders ``mad`` (uint8
    levels, mean over boxes) and ``decoded_kpixels`` (mean pixels handed out, thousands). Rows named
    ``rule: ...`` pick one of the decoders per box from the same timings.
    """
    if photos < 1 or rounds < 1 or boxes_per_photo < 1:
        raise ValueError(f"photos, rounds and boxes_per_photo must be >= 1, got {photos}, {rounds}, {boxes_per_photo}")
    say = progress or (lambda text: None)
    decoders = candidates()
    names = list(decoders)
    rng = np.random.default_rng(seed)
    files = make_photos(photos, seed)
    say(f"decoders: {len(files)} photos, {boxes_per_photo} boxes each, {rounds} rounds, candidates: {', '.join(names)}")

    samples: list[tuple[EncodedImage, Box, int]] = []
    mad: dict[tuple[str, str], list[float]] = {}
    kpixels: dict[tuple[str, str], list[float]] = {}
    bits_per_pixel: dict[str, list[float]] = {}
    for file in files:
        size = f"{file.width}×{file.height}"
        exact = cv2.cvtColor(cv2.imdecode(np.frombuffer(file.raw, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        bits_per_pixel.setdefault(size, []).append(8 * len(file.raw) / (file.height * file.width))
        for _ in range(boxes_per_photo):
            box = random_resized_crop_box(rng, file.height, file.width)
            factor = crop_factor(box)
            samples.append((file, box, factor))
            for name, decode in decoders.items():
                region, placement = decode(file, box, factor)
                _check_covers(name, region, placement, box, (file.height, file.width))
                mad.setdefault((size, name), []).append(_mad(exact, region, placement, box))
                kpixels.setdefault((size, name), []).append(region.shape[0] * region.shape[1] / 1000)

    times: dict[str, list[list[float]]] = {name: [[] for _ in samples] for name in names}
    for round_index in range(rounds):
        for s, (file, box, factor) in enumerate(samples):
            shift = (s + round_index) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                decoders[name](file, box, factor)
                times[name][s].append(time.perf_counter() - start)
        say(f"decoders: round {round_index + 1}/{rounds} done")

    per_sample = {name: [statistics.median(t) * 1000 for t in times[name]] for name in names}
    rules: dict[str, list[float]] = {}
    if "nvimgcodec ROI" in per_sample:
        roi, scaled = per_sample["nvimgcodec ROI"], per_sample["cv2 reduced"]
        rules["rule: ROI if f=1 else cv2 reduced"] = [
            roi[s] if factor == 1 else scaled[s] for s, (_file, _box, factor) in enumerate(samples)
        ]
    rules["rule: per-sample best (bound)"] = [min(per_sample[n][s] for n in names) for s in range(len(samples))]

    rows = []
    for size in bits_per_pixel:
        picked = [s for s, (file, _box, _f) in enumerate(samples) if f"{file.width}×{file.height}" == size]
        factors = sorted({samples[s][2] for s in picked})
        for name, values in list(per_sample.items()) + list(rules.items()):
            ms = [values[s] for s in picked]
            row = {
                "size": size,
                "candidate": name,
                "ms_median": statistics.median(ms),
                "ms_mean": statistics.fmean(ms),
                "by_factor": {f: statistics.median([values[s] for s in picked if samples[s][2] == f]) for f in factors},
            }
            if name in decoders:
                row["mad"] = statistics.fmean(mad[(size, name)])
                row["decoded_kpixels"] = statistics.fmean(kpixels[(size, name)])
            rows.append(row)
    config = {
        "pipeline_mad": pipeline_mad(files, seed),
        "photos": photos,
        "rounds": rounds,
        "boxes_per_photo": boxes_per_photo,
        "quality": QUALITY,
        "noise_sigma": NOISE_SIGMA,
        "output": OUTPUT,
        "bits_per_pixel": {size: statistics.fmean(v) for size, v in bits_per_pixel.items()},
        "factor_counts": {
            size: {f: sum(1 for file, _b, g in samples if f"{file.width}×{file.height}" == size and g == f) for f in FACTORS}
            for size in bits_per_pixel
        },
        "opencv": cv2.__version__,
    }
    return {"config": config, "rows": rows}


def _check_covers(name: str, region: np.ndarray, placement: Placement, box: Box, shape: tuple[int, int]) -> None:
    f = placement.factor
    x0, y0, x1, y1 = box
    bottom = min(placement.top + f * region.shape[0], shape[0])
    right = min(placement.left + f * region.shape[1], shape[1])
    if placement.top > y0 or placement.left > x0 or bottom < y1 or right < x1:
        raise RuntimeError(f"{name}: decoded {region.shape} at {placement} does not cover box {box}")


def format_table(result: dict) -> str:
    """A markdown table of ``run_decoders``'s result: one row per image size and candidate."""
    config = result["config"]
    factors = sorted({f for row in result["rows"] for f in row["by_factor"]})
    lines = [
        f"JPEG q{config['quality']}, random-resized-crop boxes (scale {SCALE[0]}–{SCALE[1]}, output {config['output']}²), "
        f"{config['photos']} photos × {config['boxes_per_photo']} boxes per size, {config['rounds']} rounds, OpenCV {config['opencv']}",
        "pipeline (random-resized-crop 224 + mirror), decode fast vs exact, mean |difference|: "
        + ", ".join(f"{k} {v:.2f} levels" for k, v in config["pipeline_mad"].items()),
        "bits per pixel: " + ", ".join(f"{k} {v:.2f}" for k, v in config["bits_per_pixel"].items())
        + "; boxes per factor: " + "; ".join(
            f"{k}: " + ", ".join(f"f={f} {n}" for f, n in counts.items() if n) for k, counts in config["factor_counts"].items()
        ),
        "",
        "| size | candidate | median ms | mean ms | vs exact (mean) | "
        + " | ".join(f"median ms f={f}" for f in factors)
        + " | decoded kpx | MAD vs exact |",
        "|---|---|---:|---:|---:|" + "---:|" * len(factors) + "---:|---:|",
    ]
    exact = {row["size"]: row["ms_mean"] for row in result["rows"] if row["candidate"].startswith("cv2 full")}
    for row in result["rows"]:
        by_factor = " | ".join(f"{row['by_factor'][f]:.2f}" if f in row["by_factor"] else "–" for f in factors)
        mad = f"{row['mad']:.2f}" if "mad" in row else "–"
        kpx = f"{row['decoded_kpixels']:.0f}" if "decoded_kpixels" in row else "–"
        speedup = exact[row["size"]] / row["ms_mean"] if row["size"] in exact else float("nan")
        lines.append(
            f"| {row['size']} | {row['candidate']} | {row['ms_median']:.2f} | {row['ms_mean']:.2f} | {speedup:.2f}× | "
            f"{by_factor} | {kpx} | {mad} |"
        )
    return "\n".join(lines)

