"""Learning-rate schedules as functions of the global step: step decay, cosine, both with linear warm-up.

Per-step (not per-epoch) so warm-up is smooth and a resumed run lands on exactly the same rate.
"""

from __future__ import annotations

import math


def learning_rate(step: int, *, base_lr: float, total_steps: int, steps_per_epoch: int, schedule: str = "cosine", warmup_epochs: float = 0.0, step_epochs: int = 30, gamma: float = 0.1, min_lr: float = 0.0) -> float:
    """The rate for optimizer step ``step`` (0-based).

    ``step``: divide by ``1/gamma`` every ``step_epochs`` epochs (AlexNet/VGG/ResNet papers);
    ``cosine``: half a cosine from ``base_lr`` to ``min_lr`` over the run (after warm-up);
    ``constant``: ``base_lr``. Warm-up ramps linearly from ~0 over ``warmup_epochs`` (Goyal et al. 2017).
    """
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * gamma ** (step // max(1, step_epochs * steps_per_epoch))
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown schedule {schedule!r}: expected step, cosine or constant")
