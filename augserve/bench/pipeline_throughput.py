"""``augserve bench pipelines``: images/s per core of our backends against albumentations used the
ordinary way, on identical 256×256 uint8 inputs.

The compared chain is the AlexNet-style chain of ../shared/ANCHORS.md: horizontal flip, random resized
crop, rotation ±15°, shear ±10°, AlexNet PCA lighting and an RGB shift. The baseline is an
``albumentations.Compose`` (HorizontalFlip, RandomResizedCrop, Affine(rotate, shear), RGBShift) applied
image by image, plus the AlexNet PCA offset as a plain numpy float add — each op its own pass over the
pixels. Ours samples per-sample parameters and runs one fused resampling plus one color pass.

``per_op=True`` adds, on the same inputs, every op alone (:data:`PER_OP`) and every preset without its
``normalize``, each for every backend and for its ordinary albumentations equivalent
(:class:`OrdinaryPipeline`, the translation of a spec into an ``albumentations.Compose``).
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2
import numpy as np
import torch

import pipelines
from pipelines.spec import IMAGENET_EIGVAL, IMAGENET_EIGVEC, PipelineSpec

from .timing import interleaved

BENCH_CHAIN = {
    "name": "alexnet-chain",
    "ops": [
        {"op": "mirror", "horizontal": 0.5},
        {"op": "random_resized_crop", "size": 224, "scale": [0.08, 1.0]},
        {"op": "rotate", "degrees": 15},
        {"op": "shear", "degrees": 10},
        {"op": "pca_color", "alpha_std": 0.1},
        {"op": "color_shift", "limit": 20},
    ],
}

# Every op alone, as ``(label, op spec)``; the ordinary equivalent is its translation (OrdinaryPipeline):
# HorizontalFlip(p=1), RandomCrop, RandomResizedCrop, Affine(rotate), Affine(shear x and y),
# GridDistortion, ElasticTransform, a numpy float PCA offset, RGBShift, SmallestMaxSize, CenterCrop,
# Normalize (+ HWC→CHW, as our normalize outputs NCHW).
PER_OP: list[tuple[str, dict]] = [
    ("mirror", {"op": "mirror", "horizontal": 1.0}),
    ("random_crop 224", {"op": "random_crop", "size": 224}),
    ("random_resized_crop 224", {"op": "random_resized_crop", "size": 224}),
    ("rotate ±15°", {"op": "rotate", "degrees": 15}),
    ("shear ±10°", {"op": "shear", "degrees": 10}),
    ("warp grid", {"op": "warp", "kind": "grid"}),
    ("warp elastic", {"op": "warp", "kind": "elastic"}),
    ("pca_color", {"op": "pca_color", "alpha_std": 0.1}),
    ("color_shift ±20", {"op": "color_shift", "limit": 20}),
    ("resize short 224", {"op": "resize", "short_side": 224}),
    ("center_crop 224", {"op": "center_crop", "size": 224}),
    ("normalize", {"op": "normalize"}),
]

# Presets with an albumentations translation (every op they use has one).
TRANSLATED_PRESETS = ("lenet5", "cifar", "alexnet", "vgg", "resnet", "inception", "mobilenet")

ORDINARY = "albumentations"  # implementation label of the ordinary albumentations equivalent (collated)
UNCOLLATED = "albumentations, uncollated"  # the same, its outputs discarded instead of batched


def make_inputs(count: int, size: int = 256) -> np.ndarray:
    """``count`` RGB uint8 ``size``² images of the built-in ``shapes`` dataset (textured, real content)."""
    from augserve.sources import open_dataset

    source = open_dataset("shapes", size=size, n=count)
    return np.stack([source.load(i) for i in range(count)])


def albumentations_baseline():
    """The ordinary Compose and the AlexNet PCA offset as a numpy float add, one image at a time."""
    import albumentations as A

    compose = A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.RandomResizedCrop(size=(224, 224), scale=(0.08, 1.0)),
            A.Affine(rotate=(-15, 15), shear=(-10, 10), p=1.0),
            A.RGBShift(r_shift_limit=20, g_shift_limit=20, b_shift_limit=20, p=1.0),
        ]
    )
    eigval, eigvec = np.asarray(IMAGENET_EIGVAL), np.asarray(IMAGENET_EIGVEC)
    rng = np.random.default_rng(0)

    def run(images: np.ndarray) -> int:
        outputs = []
        for image in images:
            out = compose(image=image)["image"]
            offset = eigvec @ (rng.normal(0.0, 0.1, 3) * eigval) * 255.0
            outputs.append(np.clip(out.astype(np.float32) + offset.astype(np.float32), 0, 255).astype(np.uint8))
        np.stack(outputs)  # the batch, as a DataLoader's collate makes it
        return len(images)

    return run


# --- a spec translated into the ordinary albumentations way ------------------------------------------


class _PcaOffset:
    """AlexNet PCA lighting the ordinary way: one numpy float add of ``eigvec @ (alpha * eigval)``."""

    def __init__(self, alpha_std: float, eigval, eigvec) -> None:
        self.alpha_std = alpha_std
        self.eigval = np.asarray(eigval, dtype=np.float64)
        self.eigvec = np.asarray(eigvec, dtype=np.float64)
        self.rng = np.random.default_rng()  # created where the Compose is built (per DataLoader worker)

    def __call__(self, image: np.ndarray, **_params) -> np.ndarray:
        offset = (self.eigvec @ (self.rng.normal(0.0, self.alpha_std, 3) * self.eigval) * 255.0).astype(np.float32)
        if image.shape[-1] == 1:
            offset = offset[:1]
        return np.clip(image.astype(np.float32) + offset, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=16)
def _elastic_alpha(side: int, sigma: float, magnitude: float) -> float:
    """``alpha`` giving albumentations' ElasticTransform field (noise / max|noise|, Gaussian-blurred by
    ``sigma``, times alpha) the displacement scale of our elastic warp: its control points move by
    ``magnitude`` × side (std), and B-spline smoothing with fixed border points leaves about 0.6 of that
    in the dense field (0.6 matches the mean displacement of both on a ramp image, within ~20%)."""
    rng = np.random.default_rng(0)
    field = rng.standard_normal((side, side)).astype(np.float32)
    field /= np.abs(field).max()
    std = float(cv2.GaussianBlur(field, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE).std())
    return 0.6 * magnitude * side / max(std, 1e-9)


def albumentations_transforms(spec: PipelineSpec, image_side: int | None = None) -> list:
    """The ordinary albumentations transforms of ``spec``'s ops, in order (normalize included).

    ``image_side``: the shorter side of the images the op sees (needed only by ``warp elastic``, whose
    albumentations parameters are in pixels). Raises ValueError for an op without an equivalent.
    """
    import albumentations as A

    from pipelines.spec import CenterCrop, ColorShift, Mirror, Normalize, PcaColor, RandomCrop, RandomResizedCrop, Resize, Rotate, Shear, Warp

    border = cv2.BORDER_CONSTANT if spec.border == "constant" else cv2.BORDER_REPLICATE
    fill = float(spec.fill)
    out: list = []
    side = image_side
    for op in spec.ops:
        if isinstance(op, Mirror):
            if op.horizontal > 0:
                out.append(A.HorizontalFlip(p=op.horizontal))
            if op.vertical > 0:
                out.append(A.VerticalFlip(p=op.vertical))
        elif isinstance(op, RandomCrop):
            if op.padding:
                out.append(A.Pad(padding=op.padding, fill=fill, border_mode=border))
            out.append(A.RandomCrop(height=op.size[0], width=op.size[1], pad_if_needed=True, border_mode=border, fill=fill))
            side = min(op.size)
        elif isinstance(op, RandomResizedCrop):
            out.append(A.RandomResizedCrop(size=tuple(op.size), scale=tuple(op.scale), ratio=tuple(op.ratio)))
            side = min(op.size)
        elif isinstance(op, Rotate):
            out.append(A.Affine(rotate=(-op.degrees, op.degrees), border_mode=border, fill=fill, p=op.p))
        elif isinstance(op, Shear):
            out.append(A.Affine(shear={"x": (-op.degrees, op.degrees), "y": (-op.degrees, op.degrees)}, border_mode=border, fill=fill, p=op.p))
        elif isinstance(op, Warp):
            if op.kind == "grid":
                # GridDistortion moves control points by a fraction of the cell, ours by a fraction of the
                # side; 0.8 matches the mean displacement of ours on a ramp image (measured, within ~20%).
                limit = min(op.magnitude * op.cells * 0.8, 0.99)
                out.append(A.GridDistortion(num_steps=op.cells, distort_limit=(-limit, limit), border_mode=border, fill=fill, p=op.p))
            else:
                if side is None:
                    raise ValueError("an albumentations equivalent of warp elastic needs the image side (its parameters are in pixels)")
                sigma = max(side / (2.0 * op.cells), 1.0)
                out.append(A.ElasticTransform(alpha=_elastic_alpha(int(side), sigma, op.magnitude), sigma=sigma, border_mode=border, fill=fill, p=op.p))
        elif isinstance(op, PcaColor):
            out.append(A.Lambda(image=_PcaOffset(op.alpha_std, op.eigval, op.eigvec), p=1.0))
        elif isinstance(op, ColorShift):
            r, g, b = op.limits
            out.append(A.RGBShift(r_shift_limit=(-r, r), g_shift_limit=(-g, g), b_shift_limit=(-b, b), p=op.p))
        elif isinstance(op, Resize):
            if isinstance(op.short_side, tuple):
                low, high = op.short_side
                out.append(A.SmallestMaxSize(max_size=list(range(low, high + 1))))
                side = high
            else:
                out.append(A.SmallestMaxSize(max_size=op.short_side))
                side = op.short_side
        elif isinstance(op, CenterCrop):
            out.append(A.CenterCrop(height=op.size[0], width=op.size[1], pad_if_needed=True, border_mode=border, fill=fill))
            side = min(op.size)
        elif isinstance(op, Normalize):
            out.append(A.Normalize(mean=tuple(op.mean), std=tuple(op.std), max_pixel_value=255.0))
        else:  # pragma: no cover - every op of the spec has a branch above
            raise ValueError(f"no albumentations equivalent for op {op.op!r}")
    return out


class OrdinaryPipeline:
    """A spec the ordinary way: one ``albumentations.Compose`` applied image by image (uint8 HWC in).

    Returns uint8 HWC, or with a trailing ``normalize`` float32 in that op's layout (CHW by default,
    a contiguous copy as a DataLoader collates). The Compose is built on first use, so an instance
    can be handed to DataLoader worker processes cheaply.
    """

    def __init__(self, spec, image_side: int | None = None) -> None:
        self.spec = pipelines.PipelineSpec.model_validate(spec) if not isinstance(spec, PipelineSpec) else spec
        self.image_side = image_side
        self._compose = None
        albumentations_transforms(self.spec, image_side)  # fail now, not inside a worker

    def __getstate__(self) -> dict:
        return {"spec": self.spec.to_dict(), "image_side": self.image_side}

    def __setstate__(self, state: dict) -> None:
        self.spec = PipelineSpec.model_validate(state["spec"])
        self.image_side = state["image_side"]
        self._compose = None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self._compose is None:
            import albumentations as A

            self._compose = A.Compose(albumentations_transforms(self.spec, self.image_side))
        out = self._compose(image=image)["image"]
        normalize = self.spec.normalize
        if normalize is not None and normalize.layout == "NCHW":
            out = np.ascontiguousarray(out.transpose(2, 0, 1))
        return out


def ordinary_for_preset(name: str, image_side: int | None = None) -> OrdinaryPipeline:
    """The ordinary albumentations equivalent of preset ``name``; ValueError for anything else."""
    if name not in TRANSLATED_PRESETS:
        raise ValueError(f"no albumentations equivalent for pipeline {name!r}: the DataLoader side needs one of the presets {', '.join(TRANSLATED_PRESETS)}")
    return OrdinaryPipeline(pipelines.load_preset(name), image_side)


# --- runners -----------------------------------------------------------------------------------------


def ours(backend: str, spec, threads: int):
    if backend == "dali":
        os.environ["AUGSERVE_DALI_THREADS"] = str(threads)
    pipe = pipelines.build(spec, backend=backend)

    def run(images: np.ndarray, round_index: int) -> int:
        out = pipe(images, seed=0, epoch=round_index + 1000, sample_ids=range(len(images)))
        return len(out)

    return run


def ordinary(spec, image_side: int, collate: bool = True):
    """The ordinary pipeline image by image; ``collate``: stack the outputs into one batch (what a
    DataLoader delivers, and what ours returns), else discard them."""
    pipe = OrdinaryPipeline(spec, image_side)

    def run(images: np.ndarray, _round_index: int) -> int:
        outputs = [pipe(image) for image in images]
        if collate:
            np.stack(outputs)
        return len(images)

    return run


def _bind(run, inputs):
    return lambda round_index: run(inputs, round_index)


def available_backends() -> tuple[list[str], dict[str, str]]:
    """The registered backends that can run here, and for each one that cannot (its optional
    dependency is not installed) the one-line reason: ``(names, {name: reason})``."""
    from pipelines.backends import BackendUnavailable, require_backend

    names, skipped = [], {}
    for name in pipelines.BACKENDS.names():
        try:
            require_backend(name)
        except BackendUnavailable as exc:
            skipped[name] = str(exc)
        else:
            names.append(name)
    return names, skipped


def _backends(backends: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """Backends asked for by name must all run here (BackendUnavailable otherwise, before anything is
    measured); by default, every backend that can run here, and the reasons for the others."""
    if backends is None:
        return available_backends()
    from pipelines.backends import require_backend

    for name in backends:
        require_backend(name)
    return list(backends), {}


def run_benchmark(images: int = 64, rounds: int = 5, threads: int = 1, backends: list[str] | None = None, progress=None, per_op: bool = False, op_rounds: int | None = None) -> dict:
    """Measure and return ``{"rows": [...], "ratio": ..., ...}``; every row is images/s per process.

    ``backends``: the backends to measure (each must be installed); by default every registered one
    that is, the others listed with the reason in ``"skipped_backends"`` (name -> one line).
    ``per_op``: also ``"per_op"`` and ``"per_pipeline"`` row lists, measured in a second interleaved pass
    of ``op_rounds`` rounds (default: ``rounds``, at most 3).
    """
    backends, skipped = _backends(backends)
    cv2.setNumThreads(threads if threads > 1 else 0)  # 0: OpenCV runs on the calling thread only
    torch.set_num_threads(threads)
    inputs = make_inputs(images)
    alexnet = pipelines.load_preset("alexnet").without_normalize()
    candidates = {"albumentations Compose (baseline)": (lambda baseline: lambda r: baseline(inputs))(albumentations_baseline())}
    for backend in backends:
        for label, spec in (("alexnet-chain", BENCH_CHAIN), ("alexnet preset", alexnet)):
            candidates[f"augserve {backend}: {label}"] = _bind(ours(backend, spec, threads), inputs)
    if progress:
        progress(f"chain comparison: {len(candidates)} candidates × {rounds} rounds")
    results = interleaved(candidates, rounds=rounds)
    baseline = results["albumentations Compose (baseline)"]["images_per_s"]
    rows = []
    for name, result in results.items():
        rows.append({"name": name, "images_per_s": round(result["images_per_s"], 1), "vs_baseline": round(result["images_per_s"] / baseline, 2)})
    fused = results["augserve albumentations: alexnet-chain"]["images_per_s"] if "albumentations" in backends else None
    result = {
        "benchmark": "pipelines",
        "input": f"{images} × 256×256×3 uint8 → 224×224",
        "threads": threads,
        "rounds": rounds,
        "cpu": _cpu_name(),
        "backends": list(backends),
        "skipped_backends": skipped,
        "rows": rows,
        "ratio_fused_cpu_vs_compose": round(fused / baseline, 2) if fused else None,
        "target_ratio": 1.5,
    }
    if per_op:
        op_rounds = op_rounds or min(rounds, 3)
        result.update(run_per_op(inputs, rounds=op_rounds, threads=threads, backends=backends, progress=progress))
    return result


def run_per_op(inputs: np.ndarray, rounds: int = 3, threads: int = 1, backends: list[str] | None = None, progress=None) -> dict:
    """Every op of :data:`PER_OP` and every preset (without normalize), each backend and the ordinary
    albumentations equivalent, in one interleaved pass over identical inputs. ``backends``: as for
    :func:`run_benchmark` (by default, every one installed here)."""
    backends, _ = _backends(backends)
    side = int(min(inputs.shape[1:3]))
    implementations = [UNCOLLATED, ORDINARY, *(f"augserve {b}" for b in backends)]
    candidates: dict[tuple[str, str, str], object] = {}
    for label, op in PER_OP:
        spec = PipelineSpec.model_validate({"name": label, "ops": [op]})
        candidates[("op", label, UNCOLLATED)] = _bind(ordinary(spec, side, collate=False), inputs)
        candidates[("op", label, ORDINARY)] = _bind(ordinary(spec, side), inputs)
        for backend in backends:
            candidates[("op", label, f"augserve {backend}")] = _bind(ours(backend, spec, threads), inputs)
    for name in pipelines.list_presets():
        spec = pipelines.load_preset(name).without_normalize()
        if name in TRANSLATED_PRESETS:
            candidates[("pipeline", name, UNCOLLATED)] = _bind(ordinary(spec, side, collate=False), inputs)
            candidates[("pipeline", name, ORDINARY)] = _bind(ordinary(spec, side), inputs)
        for backend in backends:
            candidates[("pipeline", name, f"augserve {backend}")] = _bind(ours(backend, spec, threads), inputs)
    if progress:
        progress(f"per-op and per-preset: {len(candidates)} candidates × {rounds} rounds (+1 warm-up)")
    keys = list(candidates)
    results = interleaved({"\x1f".join(key): candidates[key] for key in keys}, rounds=rounds)
    per_op, per_pipeline = [], []
    for kind, name, implementation in keys:
        rate = results["\x1f".join((kind, name, implementation))]["images_per_s"]
        reference = results.get("\x1f".join((kind, name, ORDINARY)))
        vs = round(rate / reference["images_per_s"], 2) if reference and implementation != UNCOLLATED else None
        if kind == "op":
            per_op.append({"benchmark": "pipelines", "kind": "op", "op": name, "implementation": implementation, "images_per_s": round(rate, 1), "vs_albumentations": vs})
        else:
            per_pipeline.append({"benchmark": "pipelines", "kind": "pipeline", "pipeline": name, "implementation": implementation, "images_per_s": round(rate, 1), "vs_albumentations": vs})
    return {"op_rounds": rounds, "implementations": implementations, "per_op": per_op, "per_pipeline": per_pipeline}


def _cpu_name() -> str:
    from .plots import cpu_name

    return cpu_name()


def json_rows(result: dict) -> list[dict]:
    """The rows ``--json`` prints, one per line, before the summary."""
    rows = [{"benchmark": "pipelines", "kind": "chain", **row} for row in result["rows"]]
    return rows + list(result.get("per_op", [])) + list(result.get("per_pipeline", []))


def plot(result: dict, path: str) -> str:
    """Grouped horizontal bars of images/s (log scale): per op and per preset when measured, else the
    chain comparison."""
    from .plots import grouped_barh

    panels = []
    if result.get("per_op"):
        implementations = result["implementations"]
        for kind, key, title in (("per_op", "op", "each op alone"), ("per_pipeline", "pipeline", "each preset without normalize")):
            rows = result[kind]
            groups = list(dict.fromkeys(row[key] for row in rows))
            values = {(row[key], row["implementation"]): row["images_per_s"] for row in rows}
            panels.append({"title": f"{title} — {result['input'].split(' →')[0]}", "groups": groups, "series": implementations, "values": values, "xlabel": "images/s per process (log scale)"})
    else:
        groups = [row["name"] for row in result["rows"]]
        panels.append({"title": f"alexnet chain — {result['input']}", "groups": groups, "series": ["images/s"], "values": {(row["name"], "images/s"): row["images_per_s"] for row in result["rows"]}, "xlabel": "images/s per process (log scale)"})
    return grouped_barh(path, panels, title=f"augserve bench pipelines — {result['threads']} thread(s) per process, median of interleaved rounds")


def format_table(result: dict) -> str:
    lines = [
        f"pipelines benchmark — {result['input']}, {result['threads']} thread(s) per process, median of {result['rounds']} interleaved rounds",
        f"CPU: {result['cpu']}",
        *(f"skipped: {reason}" for reason in result.get("skipped_backends", {}).values()),
        "",
        f"| {'implementation':<46} | {'images/s':>9} | {'× baseline':>10} |",
        f"|{'-' * 48}|{'-' * 11}:|{'-' * 12}:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['name']:<46} | {row['images_per_s']:>9.0f} | {row['vs_baseline']:>10.2f} |")
    if result["ratio_fused_cpu_vs_compose"] is not None:
        lines.append("")
        lines.append(f"fused CPU path vs ordinary Compose: {result['ratio_fused_cpu_vs_compose']:.2f}× (target ≥ {result['target_ratio']}×)")
    if result.get("per_op"):
        implementations = result["implementations"]
        for kind, key, title in (("per_op", "op", "each op alone"), ("per_pipeline", "pipeline", "each preset without normalize")):
            table = {}
            for row in result[kind]:
                table.setdefault(row[key], {})[row["implementation"]] = row
            lines += ["", f"{title}, images/s (× the ordinary albumentations equivalent), median of {result['op_rounds']} interleaved rounds:", ""]
            lines.append("| " + " | ".join([f"{key:<24}", *(f"{name:>24}" for name in implementations)]) + " |")
            lines.append("|" + "|".join(["-" * 26, *("-" * 25 + ":" for _ in implementations)]) + "|")
            for name, cells in table.items():
                shown = []
                for implementation in implementations:
                    row = cells.get(implementation)
                    if row is None:
                        shown.append(f"{'–':>24}")
                    elif implementation == ORDINARY or row["vs_albumentations"] is None:
                        shown.append(f"{row['images_per_s']:>24,.0f}")
                    else:
                        shown.append(f"{row['images_per_s']:>15,.0f} ({row['vs_albumentations']:>5.2f}×)")
                lines.append("| " + " | ".join([f"{name:<24}", *shown]) + " |")
    return "\n".join(lines)
