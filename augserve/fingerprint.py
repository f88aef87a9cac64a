"""Stream fingerprints: which run a saved stream position belongs to.

A position (epoch, delivered batch indices) only means something for the stream that wrote it: with
another batch size, seed, shard, dataset or pipeline, "batch 17 of epoch 3" names other samples, or
other augmentations of them. The client stores a fingerprint beside the position in its ``state_dict``;
a resume compares the saved one with the fingerprint of the stream about to attach, and refuses to
continue when they differ, naming every field that does.

A fingerprint is plain JSON (it lives in checkpoints and travels between peers)::

    {"dataset": "digits", "split": "train", "dataset_options": {...}, "pipeline": {"name": "lenet5",
     "digest": "3f1c…(16 hex)"}, "seed": 0, "batch_size": 64, "world_size": 1, "rank": 0,
     "shuffle": true, "drop_last": false, "num_samples": 1437}

A saved fingerprint is untrusted input: :func:`check_fingerprint` validates it against a frozen,
strict, bounded model and turns every problem into a one-line ``ValueError``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FINGERPRINT_FIELDS = ("dataset", "split", "dataset_options", "pipeline", "seed", "batch_size", "world_size", "rank", "shuffle", "drop_last", "num_samples")

MAX_OPTION_NODES = 1024  # values inside dataset_options, all levels together
MAX_OPTION_DEPTH = 16
MAX_OPTION_TEXT = 4096  # characters of one string (a root path) or key
_MAX_INT = 1 << 63

Name = Annotated[str, Field(max_length=256)]
Positive = Annotated[int, Field(ge=1, lt=1 << 31)]
Count = Annotated[int, Field(ge=0, lt=1 << 40)]


class PipelineDigest(BaseModel):
    """The attach-time pipeline: its name (informative only) and the digest that is compared."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: Name | None
    digest: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]


class Fingerprint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    dataset: Annotated[str, Field(min_length=1, max_length=256)]
    split: Name
    dataset_options: dict[str, Any]
    pipeline: PipelineDigest
    seed: Annotated[int, Field(ge=0, lt=_MAX_INT)]
    batch_size: Positive
    world_size: Positive
    rank: Annotated[int, Field(ge=0, lt=1 << 31)]
    shuffle: bool
    drop_last: bool
    num_samples: Count

    @field_validator("dataset_options")
    @classmethod
    def _plain_json(cls, value: dict) -> dict:
        _check_json(value)
        return value

    @model_validator(mode="after")
    def _rank_in_world(self) -> "Fingerprint":
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        return self


def stream_fingerprint(*, dataset: str, split: str, dataset_options: dict, pipeline: dict | str, seed: int, batch_size: int, world_size: int, rank: int, shuffle: bool, drop_last: bool, num_samples: int) -> dict:
    """The fingerprint of a stream as it attaches (a plain JSON-able dict, see the module docstring).

    ``pipeline`` is what the stream attached with: a preset name, or a spec dict (or YAML/JSON text of
    one; files are not opened here — read them first, as ``connect()`` does). It is reduced to
    ``{"name", "digest"}``: the digest is sha256 (first 16 hex) of the canonical JSON of the validated
    spec without its ``name``, so a preset and the same spec written out agree, and renaming a spec
    changes nothing. Live re-tuning (``Stream.update``) changes the spec mid-run on purpose; the
    fingerprint deliberately keeps the *attach-time* pipeline, and a resume compares attach-time with
    attach-time — a re-tuned run resumes by attaching with its original pipeline and re-applying its
    changes. A release that adds a spec field with a default changes digests (old positions are refused).

    ``num_samples`` is the size of the split as the daemon reports it (before sharding). Raises
    ValueError naming the first bad argument.
    """
    fingerprint = {
        "dataset": dataset,
        "split": split,
        "dataset_options": _canonical_options(dataset_options),
        "pipeline": _pipeline_digest(pipeline),
        "seed": seed,
        "batch_size": batch_size,
        "world_size": world_size,
        "rank": rank,
        "shuffle": shuffle,
        "drop_last": drop_last,
        "num_samples": num_samples,
    }
    _validate(fingerprint, "stream fingerprint")
    return fingerprint


def check_fingerprint(saved: dict, current: dict) -> None:
    """Refuse a resume whose saved fingerprint is not the current stream's.

    ``saved`` comes from a checkpoint or a peer and may be anything: a malformed one is a ValueError
    saying what is wrong with it. Otherwise a ValueError in one line names every differing field with
    its saved and current value, e.g. ``resume state was saved by another run: batch_size 64 != 128,
    seed 0 != 1``. Pipelines are compared by digest of the attach-time spec (see
    :func:`stream_fingerprint`); ``dataset_options`` by canonical JSON (``1`` and ``1.0`` differ).
    """
    old = _validate(saved, "resume fingerprint")
    new = _validate(current, "current fingerprint")
    differences = []
    for name in FINGERPRINT_FIELDS:
        before, after = _comparable(old, name), _comparable(new, name)
        if before != after:
            differences.append(f"{name} {_show(old, name)} != {_show(new, name)}")
    if differences:
        raise ValueError("resume state was saved by another run: " + ", ".join(differences))


# --- helpers ------------------------------------------------------------------------------------------


def _validate(value: Any, what: str) -> Fingerprint:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping of {', '.join(FINGERPRINT_FIELDS)}, got {type(value).__name__}")
    try:
        return Fingerprint.model_validate(value)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False)[:4]:
            where = ".".join(part if isinstance(part, str) and part.isidentifier() and len(part) <= 40 else _short(part, 40) for part in error["loc"]) or "fingerprint"
            problems.append(f"{where}: {error['msg'][:200]}")
        more = exc.error_count() - len(problems)
        suffix = f" (and {more} more)" if more > 0 else ""
        raise ValueError(f"{what} is malformed: " + "; ".join(problems) + suffix) from None


def _comparable(fingerprint: Fingerprint, name: str) -> Any:
    value = getattr(fingerprint, name)
    if name == "pipeline":
        return value.digest
    if name == "dataset_options":
        return _canonical_json(value)
    return value


def _show(fingerprint: Fingerprint, name: str) -> str:
    value = getattr(fingerprint, name)
    if name == "pipeline":
        return f"{value.name}@{value.digest}" if value.name else value.digest
    if name == "dataset_options":
        text = _canonical_json(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return _short(value, 60)


def _short(value: Any, limit: int) -> str:
    """A bounded one-line rendering of a value from an untrusted source (never raises)."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return str(value) if abs(value) < 10**30 else f"<int of {value.bit_length()} bits>"
    return f"<{type(value).__name__}>"


def _check_json(value: Any) -> None:
    """Plain JSON (str-keyed dicts, lists, str, finite float, int, bool, None), bounded in size and depth.
    Iterative: a hostile value nested a million levels deep must not exhaust the stack."""
    stack, nodes = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_OPTION_NODES or depth > MAX_OPTION_DEPTH:
            raise ValueError(f"more than {MAX_OPTION_NODES} values or {MAX_OPTION_DEPTH} levels")
        if isinstance(item, (dict, list, tuple)) and len(item) > MAX_OPTION_NODES:
            raise ValueError(f"more than {MAX_OPTION_NODES} values")
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str) or len(key) > MAX_OPTION_TEXT:
                    raise ValueError(f"keys must be strings of at most {MAX_OPTION_TEXT} characters, got {_short(key, 40)}")
                stack.append((child, depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            if len(item) > MAX_OPTION_TEXT:
                raise ValueError(f"strings must have at most {MAX_OPTION_TEXT} characters")
        elif isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                raise ValueError(f"numbers must be finite, got {item}")
        elif isinstance(item, int) and not isinstance(item, bool):
            if not -_MAX_INT <= item < _MAX_INT:
                raise ValueError(f"integers must lie in [-2**63, 2**63), got {_short(item, 40)}")
        elif not (item is None or isinstance(item, bool)):
            raise ValueError(f"values must be plain JSON, got {type(item).__name__}")


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _canonical_options(options: dict) -> dict:
    if not isinstance(options, dict):
        raise ValueError(f"dataset_options must be a mapping, got {type(options).__name__}")
    try:
        _check_json(options)
    except ValueError as exc:
        raise ValueError(f"dataset_options: {exc}") from None
    return json.loads(_canonical_json(options))  # tuples become lists, as they would in a checkpoint


def _pipeline_digest(pipeline: dict | str) -> dict:
    import pipelines  # the package below; imported here so the daemon's children need not load specs

    if isinstance(pipeline, str) and pipeline not in pipelines.list_presets() and pipeline.strip().endswith((".yaml", ".yml", ".json")):
        raise ValueError("stream_fingerprint does not open spec files; pass the spec or a preset name")
    if not isinstance(pipeline, (str, dict, pipelines.PipelineSpec)):
        raise ValueError(f"pipeline must be a preset name or a spec dict, got {type(pipeline).__name__}")
    spec = pipelines.resolve(pipeline).to_dict()
    name = spec.pop("name", None)
    if name is None and isinstance(pipeline, str) and pipeline in pipelines.list_presets():
        name = pipeline
    digest = hashlib.sha256(_canonical_json(spec).encode("ascii")).hexdigest()[:16]
    return {"name": name, "digest": digest}
