"""Where a training run gets its batches: a running daemon, or one it starts itself.

``embedded_daemon`` starts ``augserve serve`` as a child process on a free loopback port and stops it at
the end — the default when no ``--connect`` address is given. ``eval_spec`` derives the deterministic
held-out pipeline (resize + centre crop + the same normalize) from a training spec.
"""

from __future__ import annotations

from augserve.local import local_daemon
from pipelines.spec import CenterCrop, PipelineSpec, RandomCrop, RandomResizedCrop, Resize

# The usual ratio between the evaluation resize and the crop (256 → 224).
EVAL_CROP_FRACTION = 0.875


# The embedded default of `python -m trainer train`: a daemon of its own for the run.
embedded_daemon = local_daemon


def output_size(spec: PipelineSpec) -> tuple[int, int] | None:
    """The (height, width) a spec's last size-fixing op produces, or None when sizes follow the input."""
    size = None
    for op in spec.ops:
        if isinstance(op, (RandomCrop, RandomResizedCrop, CenterCrop)):
            size = tuple(op.size)
    return size


def eval_spec(train: PipelineSpec, crop_pad: int | None = None) -> PipelineSpec:
    """Deterministic held-out pipeline for a training spec: no random ops, a centre crop of the training
    output size (after a resize to size / 0.875 when the training spec resizes or random-resized-crops),
    and the training spec's ``normalize``. ``crop_pad`` enlarges the crop (for multi-crop evaluation)."""
    ops: list = []
    size = output_size(train)
    rescales = any(isinstance(op, (Resize, RandomResizedCrop)) for op in train.ops)
    if size is not None:
        if rescales:
            ops.append(Resize(short_side=round(min(size) / EVAL_CROP_FRACTION)))
        pad = crop_pad or 0
        ops.append(CenterCrop(size=(size[0] + pad, size[1] + pad)))
    if train.normalize is not None:
        ops.append(train.normalize)
    return PipelineSpec(name=f"{train.name or 'custom'}-eval", ops=ops, border=train.border, fill=train.fill)

