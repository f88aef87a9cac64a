"""Changing a spec's hyper-parameters by dotted path — what live re-tuning and tuning studies send.

A path names an op and a field: ``rotate.degrees`` (the first ``rotate`` op), ``2.degrees`` (op number 2,
counting from 0), and an element of a pair with a trailing index: ``random_resized_crop.scale.0``.
The result is validated like any spec, so a change that breaks a bound is refused naming the field.
"""

from __future__ import annotations

from typing import Any, Mapping

import yaml

from .spec import PipelineSpec


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """``["rotate.degrees=20", "color_shift.limit=10"]`` → ``{"rotate.degrees": 20, ...}``; values are YAML
    scalars or lists (``[0.2, 1.0]``)."""
    changes = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"a change must look like op.field=value, got {pair!r}")
        try:
            changes[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ValueError(f"cannot parse the value of {pair!r}") from None
    return changes


def locate(spec: PipelineSpec, path: str) -> tuple[int, str, int | None]:
    """(op position, field name, element index or None) that ``path`` addresses in ``spec``."""
    parts = path.split(".")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"bad parameter path {path!r}: expected op.field or op.field.index (e.g. rotate.degrees)")
    op_key, field = parts[0], parts[1]
    if op_key.isdigit():
        position = int(op_key)
        if position >= len(spec.ops):
            raise ValueError(f"bad parameter path {path!r}: the pipeline has {len(spec.ops)} ops")
    else:
        matches = [i for i, op in enumerate(spec.ops) if op.op == op_key]
        if not matches:
            present = ", ".join(op.op for op in spec.ops) or "no ops"
            raise ValueError(f"bad parameter path {path!r}: the pipeline has no {op_key!r} op (it has {present})")
        position = matches[0]
    op = spec.ops[position]
    if field == "op" or field not in type(op).model_fields:
        fields = ", ".join(name for name in type(op).model_fields if name != "op")
        raise ValueError(f"bad parameter path {path!r}: {op.op} has no field {field!r} (fields: {fields})")
    index = None
    if len(parts) == 3:
        if not parts[2].isdigit() or not isinstance(getattr(op, field), (tuple, list)):
            raise ValueError(f"bad parameter path {path!r}: {op.op}.{field} is not a list to index")
        index = int(parts[2])
        if index >= len(getattr(op, field)):
            raise ValueError(f"bad parameter path {path!r}: {op.op}.{field} has {len(getattr(op, field))} values")
    return position, field, index


def apply_changes(spec: PipelineSpec, changes: Mapping[str, Any]) -> PipelineSpec:
    """A new, validated spec with ``changes`` applied (``spec`` itself is frozen and stays as it is)."""
    data = spec.to_dict()
    for path, value in changes.items():
        position, field, index = locate(spec, path)
        if index is None:
            data["ops"][position][field] = value
        else:
            current = list(data["ops"][position][field])
            current[index] = value
            data["ops"][position][field] = current
    return PipelineSpec.model_validate(data)
