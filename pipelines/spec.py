"""Pipeline specifications: one frozen pydantic model per augmentation op.

A pipeline spec is ``{"name": optional, "ops": [{"op": name, ...}, ...]}`` — an ordered list of ops —
given as a dict, YAML or JSON. Every field is bounded, unknown fields are refused (``extra="forbid"``),
so a typo or an out-of-range value fails when the spec is built, with a message naming the field.

Units used throughout:
  * angles in degrees;
  * sizes and paddings in pixels, ``size`` as ``int`` (square) or ``[height, width]``;
  * ``scale`` as fractions of the image area, ``ratio`` as width / height;
  * color limits on the 0–255 scale; ``pca_color`` eigenvalues on the 0–1 scale (as in the papers);
  * ``warp.magnitude`` as a fraction of the image's shorter side;
  * probabilities in [0, 1].
"""

from __future__ import annotations

import json
import math
import reprlib
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Pixels = Annotated[int, Field(ge=1, le=16384)]

# ImageNet RGB eigen-pairs on the 0–1 pixel scale, as used by the AlexNet-style "lighting" noise
# (fb.resnet.torch, AlexNet §4.1). Columns of EIGVEC are the eigenvectors.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_hw(value: Any) -> Any:
    """Accept ``int`` or ``[h, w]`` for a size; return a ``(h, w)`` tuple (validation happens after)."""
    if isinstance(value, bool):
        raise ValueError(f"size must be an int or [height, width], got {value!r}")
    if isinstance(value, int):
        return (value, value)
    return value


SizeHW = Annotated[tuple[Pixels, Pixels], Field(description="[height, width] in pixels (an int means square)")]


class OpSpec(BaseModel):
    """Base of every op spec: frozen, no unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _range_validator(name: str, low: float, high: float, *, allow_equal: bool = True):
    def check(value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not (low <= lo <= high and low <= hi <= high):
            raise ValueError(f"{name} values must lie in [{low}, {high}], got {list(value)}")
        if lo > hi or (lo == hi and not allow_equal):
            raise ValueError(f"{name} must be [min, max] with min <= max, got {list(value)}")
        return value

    return check


class Mirror(OpSpec):
    """Flip left-right with probability ``horizontal`` and top-bottom with probability ``vertical``."""

    op: Literal["mirror"] = "mirror"
    horizontal: Probability = 0.5
    vertical: Probability = 0.0


class RandomCrop(OpSpec):
    """Pad each side by ``padding`` pixels (with the pipeline's border fill), then cut a random
    ``size`` window at integer pixel offsets."""

    op: Literal["random_crop"] = "random_crop"
    size: SizeHW
    padding: Annotated[int, Field(ge=0, le=4096)] = 0

    _size = field_validator("size", mode="before")(_as_hw)


class RandomResizedCrop(OpSpec):
    """Cut a random whole-pixel box covering a fraction ``scale`` of the area with aspect ``ratio``
    (width/height; both before rounding to whole pixels, as torchvision does), resized to ``size``. Ten
    tries, then a centred fallback — the Inception recipe."""

    op: Literal["random_resized_crop"] = "random_resized_crop"
    size: SizeHW
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    _size = field_validator("size", mode="before")(_as_hw)
    _scale = field_validator("scale")(_range_validator("scale", 1e-4, 1.0))
    _ratio = field_validator("ratio")(_range_validator("ratio", 1e-2, 100.0))


class Rotate(OpSpec):
    """Rotate about the image centre by an angle uniform in ±``degrees``, with probability ``p``."""

    op: Literal["rotate"] = "rotate"
    degrees: Annotated[float, Field(ge=0.0, le=180.0)]
    p: Probability = 1.0


class Shear(OpSpec):
    """Shear about the image centre, x and y angles each uniform in ±``degrees``, with probability ``p``."""

    op: Literal["shear"] = "shear"
    degrees: Annotated[float, Field(ge=0.0, le=60.0)]
    p: Probability = 1.0


class Warp(OpSpec):
    """Local (non-affine) warping by a displacement field defined on a ``cells``×``cells`` control grid.

    ``grid``: control displacements uniform in ±``magnitude``, interpolated piecewise-linearly
    (grid distortion). ``elastic``: Gaussian control displacements (std ``magnitude``), interpolated by
    cubic B-splines into a smooth field (free-form elastic deformation). ``magnitude`` is a fraction of
    the shorter image side. Control points on the image border stay fixed, so no outside fill is pulled in.
    """

    op: Literal["warp"] = "warp"
    kind: Literal["grid", "elastic"] = "elastic"
    magnitude: Annotated[float, Field(ge=0.0, le=0.25)] = 0.03
    p: Probability = 1.0
    cells: Annotated[int, Field(ge=2, le=32)] = 4


class PcaColor(OpSpec):
    """AlexNet's PCA lighting (Krizhevsky et al. 2012, §4.1): add ``eigvec @ (alpha * eigval)`` to every
    pixel, ``alpha ~ N(0, alpha_std)`` per component, one draw per image.

    ``eigval`` (descending) and ``eigvec`` (columns are eigenvectors) are those of the RGB covariance of
    the training set on the 0–1 scale; defaults are ImageNet's. ``augserve fit-pca`` fits them on a dataset.
    """

    op: Literal["pca_color"] = "pca_color"
    alpha_std: Annotated[float, Field(ge=0.0, le=2.0)] = 0.1
    eigval: tuple[float, float, float] = IMAGENET_EIGVAL
    eigvec: tuple[
        tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]
    ] = IMAGENET_EIGVEC

    @field_validator("eigval")
    @classmethod
    def _non_negative(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v < 0 or not math.isfinite(v) for v in value):
            raise ValueError(f"eigval must be finite and >= 0, got {list(value)}")
        return value

    @field_validator("eigvec")
    @classmethod
    def _finite(cls, value):
        if any(not math.isfinite(v) for row in value for v in row):
            raise ValueError("eigvec must hold finite numbers")
        return value


ColorLimit = Annotated[float, Field(ge=0.0, le=255.0)]


class ColorShift(OpSpec):
    """Add a per-channel offset uniform in ±limit (0–255 scale), with probability ``p``.

    ``limit`` applies to every channel; ``r``, ``g``, ``b`` override it per channel. A grey image uses
    the red limit.
    """

    op: Literal["color_shift"] = "color_shift"
    limit: ColorLimit = 20.0
    r: ColorLimit | None = None
    g: ColorLimit | None = None
    b: ColorLimit | None = None
    p: Probability = 1.0

    @property
    def limits(self) -> tuple[float, float, float]:
        """Per-channel (r, g, b) limits after applying the overrides."""
        return tuple(self.limit if v is None else v for v in (self.r, self.g, self.b))  # type: ignore[return-value]


class Resize(OpSpec):
    """Scale so the shorter side becomes ``short_side`` pixels (aspect kept). A ``[min, max]`` range
    draws the side uniformly per image — VGG's scale jittering."""

    op: Literal["resize"] = "resize"
    short_side: Pixels | tuple[Pixels, Pixels]

    @field_validator("short_side")
    @classmethod
    def _ordered(cls, value):
        if isinstance(value, tuple) and value[0] > value[1]:
            raise ValueError(f"short_side must be [min, max] with min <= max, got {list(value)}")
        return value


class CenterCrop(OpSpec):
    """Cut the central ``size`` window (integer offsets, padding with the border fill if the image is smaller)."""

    op: Literal["center_crop"] = "center_crop"
    size: SizeHW

    _size = field_validator("size", mode="before")(_as_hw)


class Normalize(OpSpec):
    """Convert to float: ``(x / 255 - mean) / std`` per channel (mean, std on the 0–1 scale), in ``dtype``
    and ``layout``. Must be the last op. Services ship uint8 and apply it on the trainer's device."""

    op: Literal["normalize"] = "normalize"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @model_validator(mode="after")
    def _check(self) -> "Normalize":
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise ValueError(
                f"mean and std need 1 or 3 values each and the same count, got mean={list(self.mean)} std={list(self.std)}"
            )
        if any(s <= 0 or not math.isfinite(s) for s in self.std):
            raise ValueError(f"std values must be > 0, got {list(self.std)}")
        return self


GEOMETRY_OPS = (Mirror, RandomCrop, RandomResizedCrop, Rotate, Shear, Warp, Resize, CenterCrop)
COLOR_OPS = (PcaColor, ColorShift)

AnyOp = Annotated[
    Union[Mirror, RandomCrop, RandomResizedCrop, Rotate, Shear, Warp, PcaColor, ColorShift, Resize, CenterCrop, Normalize],
    Field(discriminator="op"),
]

OP_NAMES = tuple(cls.model_fields["op"].default for cls in (*GEOMETRY_OPS, *COLOR_OPS, Normalize))


class PipelineSpec(BaseModel):
    """An ordered list of augmentation ops.

    ``border`` is how pixels from outside the source image are filled (padding, rotation corners):
    ``constant`` uses ``fill`` (0–255), ``replicate`` repeats the edge pixel.

    ``decode`` applies to sources of image files (JPEG/PNG/BMP folders) served by workers: ``fast``
    reads each file's header, plans the sample, then decodes only the region the plan reads, at the
    largest JPEG DCT reduction (1/2, 1/4, 1/8) that keeps at least one source pixel per output pixel;
    ``exact`` decodes every image whole at full resolution first. Same geometry either way; the
    pixels differ by what DCT scaling changes (see the README's decode figures).

    ``PipelineSpec.model_validate`` accepts a dict, or YAML / JSON text of one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    ops: list[AnyOp] = Field(default_factory=list)
    border: Literal["constant", "replicate"] = "constant"
    fill: Annotated[int, Field(ge=0, le=255)] = 0
    decode: Literal["fast", "exact"] = "fast"

    @model_validator(mode="before")
    @classmethod
    def _parse_text(cls, data: Any) -> Any:
        if isinstance(data, (str, bytes)):
            try:
                data = yaml.safe_load(data)
            except yaml.YAMLError as exc:
                raise ValueError(f"pipeline spec is not valid YAML/JSON: {exc}") from None
            if not isinstance(data, dict):
                raise ValueError(f"pipeline spec must be a mapping with an 'ops' list, got {type(data).__name__}")
        return data

    @model_validator(mode="after")
    def _normalize_last(self) -> "PipelineSpec":
        positions = [i for i, op in enumerate(self.ops) if isinstance(op, Normalize)]
        if len(positions) > 1 or (positions and positions[0] != len(self.ops) - 1):
            raise ValueError("normalize must appear at most once, as the last op")
        return self

    # --- convenience -------------------------------------------------------------------------------

    @property
    def normalize(self) -> Normalize | None:
        """The trailing ``normalize`` op, if any."""
        return self.ops[-1] if self.ops and isinstance(self.ops[-1], Normalize) else None

    def without_normalize(self) -> "PipelineSpec":
        """The same pipeline producing uint8 (what a service ships; the client normalizes on device)."""
        if self.normalize is None:
            return self
        return self.model_copy(update={"ops": list(self.ops[:-1])})

    @classmethod
    def from_file(cls, path: str) -> "PipelineSpec":
        """Load a spec from a ``.yaml``/``.yml``/``.json`` file."""
        with open(path, encoding="utf-8") as handle:
            return cls.model_validate(handle.read())

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_defaults=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def json_schema(cls) -> dict:
        """JSON schema of a pipeline spec (for editors and validation outside Python)."""
        return cls.model_json_schema()


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = 8
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80
_SHORT_REPR.maxlevel = 3
_MAX_ERRORS_SHOWN = 6


def _short(value) -> str:
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def format_validation_error(error: ValidationError, what: str = "pipeline spec") -> str:
    """One line naming each bad field and value, e.g. ``ops[1].rotate.p = 1.5: Input should be <= 1``."""
    parts = []
    errors = error.errors(include_url=False)
    for item in errors[:_MAX_ERRORS_SHOWN]:
        location = ""
        for key in item.get("loc", ()):
            location += f"[{key}]" if isinstance(key, int) else (f".{key}" if location else str(key))
        message = item.get("msg", "invalid").removeprefix("Value error, ")
        value = item.get("input")
        # Bounded: a hostile spec (a YAML alias bomb) must not produce a megabyte-long message.
        shown = "" if isinstance(value, dict) or item.get("type") == "missing" else f" = {_short(value)}"
        parts.append(f"{location or '<root>'}{shown}: {message}")
    if len(errors) > _MAX_ERRORS_SHOWN:
        parts.append(f"and {len(errors) - _MAX_ERRORS_SHOWN} more error(s)")
    return f"invalid {what}: " + "; ".join(parts)
