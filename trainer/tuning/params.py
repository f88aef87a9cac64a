"""The search space of ``augserve tune``: which spec fields a study varies, within which ranges.

A parameter is ``PATH=LOW:HIGH`` (``:log`` appended samples on a log scale), where ``PATH`` addresses a
field of the base spec exactly as live re-tuning does (:mod:`pipelines.changes`): ``rotate.degrees`` (the
first ``rotate`` op), ``2.degrees`` (op number 2, counting from 0), ``random_resized_crop.scale.0`` (the
first element of a pair). A field whose base value is an int (``random_crop.padding``, ``warp.cells``,
``resize.short_side``) is sampled as an int, every other numeric field as a float.

Every range is checked against the op specs' own bounds before a single trial runs: the spec is built
with each end of each range, and with every combination of ends (a box's corners, so that coupled
fields such as ``scale.0 <= scale.1`` are covered too). A range the spec refuses ends in one line
naming the parameter and the spec's complaint.

Defaults, when the user lists no parameter, cover the classic augmentation strengths — and only for
ops the base spec already has (no op is inserted: where an op goes in the chain, and whether it makes
sense at all, e.g. color noise on grey digits, is the recipe's decision, not the tuner's):

============================== ============ =====================================================
path                           range        note
============================== ============ =====================================================
``random_resized_crop.scale.0`` 0.05 – 0.5  smallest crop area; capped at the spec's ``scale[1]``
``rotate.degrees``              0 – 30
``shear.degrees``               0 – 20
``pca_color.alpha_std``         0 – 0.3     AlexNet uses 0.1
``color_shift.limit``           0 – 40      0–255 scale
``warp.magnitude``              0 – 0.1     fraction of the shorter side
============================== ============ =====================================================
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from pydantic import ValidationError

from pipelines.changes import apply_changes, locate
from pipelines.spec import PipelineSpec, format_validation_error

# (op, field, index, low, high) — see the module docstring.
DEFAULT_RANGES: tuple[tuple[str, str, int | None, float, float], ...] = (
    ("random_resized_crop", "scale", 0, 0.05, 0.5),
    ("rotate", "degrees", None, 0.0, 30.0),
    ("shear", "degrees", None, 0.0, 20.0),
    ("pca_color", "alpha_std", None, 0.0, 0.3),
    ("color_shift", "limit", None, 0.0, 40.0),
    ("warp", "magnitude", None, 0.0, 0.1),
)

# Beyond this many parameters the corner check (2**n specs) falls back to each range's ends alone.
MAX_CORNER_PARAMS = 10


@dataclass(frozen=True)
class Param:
    """One searched field: ``name`` (its path, also the Optuna parameter name), range, int/float, log."""

    name: str
    low: float
    high: float
    kind: str = "float"  # "float" | "int"
    log: bool = False
    base: float | None = None  # the base spec's value (None when the field is unset there)
    position: int = 0
    field: str = ""
    index: int | None = None

    def suggest(self, trial) -> float:
        """Draw this parameter's value for an Optuna ``trial``."""
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def contains(self, value: Any) -> bool:
        return value is not None and self.low <= value <= self.high

    def describe(self) -> str:
        return f"{self.name}={_fmt(self.low)}:{_fmt(self.high)}{':log' if self.log else ''}"

    def to_dict(self) -> dict:
        return {"name": self.name, "low": self.low, "high": self.high, "kind": self.kind, "log": self.log}


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _number(text: str, what: str, source: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--param {source}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"--param {source}: {what} must be finite, got {text!r}")
    return value


def _current_value(spec: PipelineSpec, position: int, field: str, index: int | None) -> Any:
    value = getattr(spec.ops[position], field)
    return value[index] if index is not None else value


def _checked(base: PipelineSpec, changes: Mapping[str, Any], source: str) -> PipelineSpec:
    try:
        return apply_changes(base, changes)
    except ValidationError as exc:
        raise ValueError(f"--param {source} breaks the spec's bounds: {format_validation_error(exc)}") from None


def make_param(base: PipelineSpec, path: str, low: float, high: float, log: bool = False, source: str | None = None) -> Param:
    """A validated :class:`Param` for ``path`` in ``base`` with range ``[low, high]``."""
    source = source or f"{path}={_fmt(low)}:{_fmt(high)}"
    try:
        position, field, index = locate(base, path)
    except ValueError as exc:
        raise ValueError(f"--param {source}: {exc}") from None
    current = _current_value(base, position, field, index)
    if isinstance(current, bool) or not (current is None or isinstance(current, (int, float))):
        op = base.ops[position].op
        hint = f" (a pair: address one element, e.g. {path}.0)" if isinstance(current, (tuple, list)) else ""
        raise ValueError(f"--param {source}: {op}.{field} is not a number{hint}")
    kind = "int" if isinstance(current, int) else "float"
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ValueError(f"--param {source}: {base.ops[position].op}.{field} takes whole numbers, got {_fmt(low)}:{_fmt(high)}")
    if not low < high:
        raise ValueError(f"--param {source}: bad range, LOW must be < HIGH (got {_fmt(low)}:{_fmt(high)})")
    if log and low <= 0:
        raise ValueError(f"--param {source}: a log range needs LOW > 0 (got {_fmt(low)})")
    for end in (low, high):
        _checked(base, {path: int(end) if kind == "int" else float(end)}, source)
    return Param(name=path, low=low, high=high, kind=kind, log=log, base=current, position=position, field=field, index=index)


def parse_param(text: str, base: PipelineSpec) -> Param:
    """``"rotate.degrees=0:30"`` (or ``...=1e-3:0.3:log``) → a :class:`Param` checked against ``base``."""
    path, sep, rest = text.partition("=")
    path = path.strip()
    parts = [p.strip() for p in rest.split(":")]
    if not sep or not path or len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"--param must look like op.field=LOW:HIGH[:log] (e.g. rotate.degrees=0:30), got {text!r}")
    if len(parts) == 3 and parts[2] != "log":
        raise ValueError(f"--param {text}: the optional third part must be 'log', got {parts[2]!r}")
    low = _number(parts[0], "LOW", text)
    high = _number(parts[1], "HIGH", text)
    return make_param(base, path, low, high, log=len(parts) == 3, source=text)


def default_params(base: PipelineSpec) -> list[Param]:
    """The default search space for ``base`` (see the module docstring); ValueError if it has none of those ops."""
    present = {op.op for op in base.ops}
    params = []
    for op_name, field, index, low, high in DEFAULT_RANGES:
        if op_name not in present:
            continue
        path = f"{op_name}.{field}" + (f".{index}" if index is not None else "")
        if op_name == "random_resized_crop":
            first = next(op for op in base.ops if op.op == op_name)
            high = min(high, first.scale[1])
            if high <= low:
                continue
        params.append(make_param(base, path, low, high))
    if not params:
        tunable = ", ".join(sorted({op for op, *_ in DEFAULT_RANGES}))
        ops = ", ".join(op.op for op in base.ops) or "no ops"
        raise ValueError(f"the base pipeline {base.name or ''!s} has none of the ops tuned by default ({tunable}; it has {ops}): list parameters with --param op.field=LOW:HIGH")
    return params


def build_search_space(base: PipelineSpec, texts: Iterable[str] | None) -> list[Param]:
    """Parse the ``--param`` texts (or take the defaults), refuse duplicates and check combined ranges."""
    texts = list(texts or [])
    params = [parse_param(text, base) for text in texts] if texts else default_params(base)
    seen: dict[tuple, str] = {}
    for param in params:
        key = (param.position, param.field, param.index)
        if key in seen:
            raise ValueError(f"--param {param.name} and --param {seen[key]} address the same field ({base.ops[param.position].op}.{param.field}" + (f"[{param.index}]" if param.index is not None else "") + ")")
        seen[key] = param.name
    check_combinations(base, params)
    return params


def check_combinations(base: PipelineSpec, params: list[Param]) -> None:
    """Build the spec at every corner of the search box (or, with many parameters, at all-low and
    all-high); a refused combination is a ValueError naming the values."""
    if len(params) < 2:
        return
    ends = [(p.low, p.high) for p in params]
    corners = itertools.product(*ends) if len(params) <= MAX_CORNER_PARAMS else [tuple(e[0] for e in ends), tuple(e[1] for e in ends)]
    for corner in corners:
        values = {p.name: (int(v) if p.kind == "int" else float(v)) for p, v in zip(params, corner)}
        try:
            apply_changes(base, values)
        except ValidationError as exc:
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            raise ValueError(f"--param ranges combine into an invalid spec at {shown}: {format_validation_error(exc)}") from None


def apply_values(base: PipelineSpec, values: Mapping[str, Any], name: str | None = None) -> PipelineSpec:
    """``base`` with the sampled ``values`` (path → value) applied, validated; named ``name`` if given."""
    spec = apply_changes(base, dict(values))
    return spec.model_copy(update={"name": name}) if name is not None else spec


def baseline_values(params: list[Param]) -> dict[str, float]:
    """The base spec's own values of the parameters that lie inside their ranges (the first trial's)."""
    return {p.name: p.base for p in params if p.contains(p.base)}
