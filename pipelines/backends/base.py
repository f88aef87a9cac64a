"""What every backend implements: run fused sample plans on a batch, return uint8 N×H×W×C."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from ..plan import SamplePlan
from ..spec import PipelineSpec


class Backend(ABC):
    """A way of executing :class:`~pipelines.plan.SamplePlan` s.

    ``run`` receives the validated batch (a list of H×W×C uint8 numpy arrays, or an N×H×W×C uint8 torch
    tensor) and one plan per image, and returns uint8 N×H×W×C as a torch tensor on the backend's device —
    or a list of H×W×C tensors when the output sizes differ. Kernels never draw random numbers.
    """

    name: str = ""
    devices: tuple[str, ...] = ("cpu",)
    # Whether the kernels read only the pixels they sample, so an image's untouched pixels cost nothing:
    # a decoded region can then go back on a (lazily zeroed) canvas of the image's size and the plan
    # run unchanged (see Pipeline.run_decoding). Backends that convert or upload whole images re-aim
    # the plan at the region instead.
    reads_only_sampled_pixels: bool = False
    # Whether ``run(images, plans, out=...)`` writes each sample's result straight into its row of a
    # preallocated uint8 batch (Pipeline's ``out=``); otherwise the pipeline copies the result in once.
    writes_in_place: bool = False

    def __init__(self, spec: PipelineSpec, device: str = "cpu") -> None:
        kind = device.split(":")[0]
        if kind not in self.devices:
            raise ValueError(f"backend {self.name!r} does not run on device {device!r}: supported {', '.join(self.devices)}")
        check_device(device)
        self.spec = spec
        self.device = device
        self.border = spec.border
        self.fill = spec.fill

    @abstractmethod
    def run(self, images: list[np.ndarray] | torch.Tensor, plans: list[SamplePlan]) -> torch.Tensor | list[torch.Tensor]:
        ...


def check_device(device: str) -> None:
    """One-line ValueError unless ``device`` ('cpu' or 'cuda[:K]') exists on this machine: CUDA that
    this torch build lacks or no GPU is visible, or an index past the visible GPUs."""
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return
    if not torch.cuda.is_available():
        reason = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)"
        raise ValueError(f"device {device!r} was asked for but CUDA is not available on this machine: {reason}")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise ValueError(f"device {device!r} was asked for but this machine has {count} CUDA device(s): use cuda:0 … cuda:{count - 1}")


def same_output_shape(plans: list[SamplePlan]) -> bool:
    first = (plans[0].out_hw, plans[0].channels)
    return all((p.out_hw, p.channels) == first for p in plans)
