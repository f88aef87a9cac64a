"""augserve's augmentation pipelines: op specs, seeded per-sample parameters, fused backends, presets.

    import pipelines
    spec = pipelines.load_preset("alexnet")
    pipe = pipelines.build(spec, backend="albumentations")      # "albumentations" | "dali" | "torch"
    out = pipe(images, seed=0, epoch=0, sample_ids=[...])        # uint8 NHWC in → torch tensor out
    params = pipe.sample_params(shapes, seed=0, epoch=0, sample_ids=[...])
"""

from .backends import BACKENDS
from .pipeline import Pipeline, build
from .plan import SamplePlan, fuse
from .presets import list_presets, load_preset, resolve
from .sampling import SampleParams
from .spec import OP_NAMES, PipelineSpec, format_validation_error

__all__ = [
    "BACKENDS",
    "OP_NAMES",
    "Pipeline",
    "PipelineSpec",
    "SampleParams",
    "SamplePlan",
    "build",
    "format_validation_error",
    "fuse",
    "list_presets",
    "load_preset",
    "resolve",
]
