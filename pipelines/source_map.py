"""Dense source coordinates of a plan's output pixels: what ``remap`` samples when a local warp is present."""

from __future__ import annotations

import numpy as np

from . import geometry as G
from .plan import AffineStep, SamplePlan


def source_map(plan: SamplePlan, dtype=np.float32, device=None):
    """Dense source coordinates (x, y) — continuous pixel coordinates — of every output pixel centre:
    two (out_h, out_w) arrays. Used when the geometry has a warp. numpy (``dtype``) by default; with a
    torch ``device``, float64 tensors computed there (the same arithmetic, on a GPU ~20× faster)."""
    out_h, out_w = plan.out_hw
    if device is None:
        x, y = (a.copy() for a in G.pixel_centers(out_h, out_w))
    else:
        import torch

        x = (torch.arange(out_w, dtype=torch.float64, device=device) + 0.5).expand(out_h, out_w)
        y = (torch.arange(out_h, dtype=torch.float64, device=device) + 0.5)[:, None].expand(out_h, out_w)
    steps = plan.chain if plan.chain is not None else [AffineStep(plan.inverse)]
    for step in steps:
        if isinstance(step, AffineStep):
            m = step.inverse
            x, y = m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]
        else:
            control = step.control if device is None else torch.as_tensor(step.control, dtype=torch.float64, device=device)
            dx, dy = G.warp_displacement(x, y, control, step.kind, step.height, step.width)
            x, y = x + dx, y + dy
    return (x.astype(dtype), y.astype(dtype)) if device is None else (x, y)
