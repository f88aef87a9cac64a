"""Training and evaluation loops over augserve streams.

One stream covers all epochs of a run (its batches carry their epoch), delivered in plan order so a run
is reproducible and a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .metrics import StepTimer


@dataclass
class Precision:
    """Autocast settings: ``dtype`` None for full precision; ``scaler`` only for float16 on CUDA."""

    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, device: torch.device, amp: str, channels_last: bool) -> "Precision":
        dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        if dtype is torch.float16 and device.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA device; use bf16 on CPU")
        scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
        return cls(device, dtype, channels_last, scaler)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


def loss_of(outputs, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy; GoogLeNet's auxiliary outputs (a tuple ``(logits, aux1, aux2)``) are weighted 0.3."""
    if isinstance(outputs, tuple):
        main = F.cross_entropy(outputs[0], targets, label_smoothing=label_smoothing)
        aux = [F.cross_entropy(o, targets, label_smoothing=label_smoothing) for o in outputs[1:] if o is not None]
        return main + 0.3 * sum(aux)
    return F.cross_entropy(outputs, targets, label_smoothing=label_smoothing)


def logits_of(outputs) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, tuple) else outputs


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    batches: int = 0
    timer: StepTimer = field(default_factory=StepTimer)

    def add(self, loss: float, correct: int, count: int) -> None:
        self.loss_sum += loss * count
        self.correct += correct
        self.seen += count
        self.batches += 1

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.seen, 1)


def train_step(model, optimizer, precision: Precision, images: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> tuple[float, int]:
    """One optimizer step. Returns (loss, number correct)."""
    images = precision.prepare(images)
    labels = labels.to(precision.device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        outputs = model(images)
        loss = loss_of(outputs, labels, label_smoothing)
    if precision.scaler is not None:
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
    else:
        loss.backward()
        optimizer.step()
    correct = int((logits_of(outputs).argmax(1) == labels).sum())
    return float(loss.detach()), correct


@torch.no_grad()
def predict(model, batches, precision: Precision, crops=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and labels over ``batches`` (an iterable of augserve Batches).

    ``crops``: a function images -> list of image batches (multi-crop); their softmaxes are averaged.
    """
    model.eval()
    probabilities, labels = [], []
    for batch in batches:
        images = precision.prepare(batch.images)
        views = crops(images) if crops is not None else [images]
        total = None
        for view in views:
            with precision.autocast():
                logits = logits_of(model(view)).float()
            soft = logits.softmax(dim=1)
            total = soft if total is None else total + soft
        probabilities.append((total / len(views)).cpu())
        labels.append(batch.labels.cpu())
    return torch.cat(probabilities), torch.cat(labels)


def accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probabilities.argmax(1) == labels).float().mean()) if len(labels) else 0.0


def ten_crops(size: tuple[int, int]):
    """Four corners and the centre of each image, plus their mirrors (AlexNet §4.1's test-time
    averaging). Input N×C×H×W larger than ``size``; returns ten N×C×h×w views."""
    height, width = size

    def crop(images: torch.Tensor) -> list[torch.Tensor]:
        full_h, full_w = images.shape[-2:]
        if full_h < height or full_w < width:
            raise ValueError(f"multi-crop needs images larger than {height}x{width}, got {full_h}x{full_w}")
        top, left = (full_h - height) // 2, (full_w - width) // 2
        corners = [(0, 0), (0, full_w - width), (full_h - height, 0), (full_h - height, full_w - width), (top, left)]
        views = [images[..., y : y + height, x : x + width] for y, x in corners]
        return views + [v.flip(-1) for v in views]

    return crop


class Throughput:
    """Wall-clock images/s of a whole run."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.images = 0

    def add(self, count: int) -> None:
        self.images += count

    @property
    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)
