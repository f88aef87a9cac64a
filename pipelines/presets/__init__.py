"""Named pipeline presets, one YAML file each in this folder; every file cites its source.

``load_preset(name)`` returns a validated :class:`~pipelines.spec.PipelineSpec`; ``resolve`` accepts a
preset name, a spec file path, YAML/JSON text, a dict or a spec.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources

from ..registry import Registry
from ..spec import PipelineSpec

PRESETS: Registry[str] = Registry("preset")
for _entry in sorted(resources.files(__name__).iterdir(), key=lambda e: e.name):
    if _entry.name.endswith(".yaml"):
        PRESETS.add(_entry.name.removesuffix(".yaml"), _entry.name)


def list_presets() -> list[str]:
    return PRESETS.names()


@lru_cache(maxsize=None)
def load_preset(name: str) -> PipelineSpec:
    """The preset ``name`` (e.g. ``"alexnet"``) as a validated spec."""
    filename = PRESETS.get(name)
    return PipelineSpec.model_validate(resources.files(__name__).joinpath(filename).read_text(encoding="utf-8"))


def resolve(spec) -> PipelineSpec:
    """A :class:`PipelineSpec` from a spec, dict, preset name, path to a YAML/JSON file, or YAML/JSON text."""
    if isinstance(spec, PipelineSpec):
        return spec
    if isinstance(spec, dict):
        return PipelineSpec.model_validate(spec)
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text in PRESETS:
            return load_preset(text)
        if text.endswith((".yaml", ".yml", ".json")):
            if not os.path.isfile(text):
                raise ValueError(f"pipeline file not found: {text}")
            return PipelineSpec.from_file(text)
        if any(ch in text for ch in "\n:{"):
            return PipelineSpec.model_validate(text)
        raise ValueError(f"unknown pipeline {text!r}: expected a preset ({', '.join(list_presets())}), a .yaml/.json file, or spec text")
    raise TypeError(f"pipeline must be a preset name, spec, dict or YAML text, got {type(spec).__name__}")
