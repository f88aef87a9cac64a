"""The ``--device`` of a bench that measures on a GPU and runs on the CPU as a check (``bench gpu``,
``bench gpu-e2e``)."""

from __future__ import annotations

import torch


def bench_device(text: str, without_cuda: str) -> torch.device:
    """``cpu`` or a ``cuda:K`` present on this machine (``cuda`` is ``cuda:0``); a one-line ValueError
    otherwise — ``without_cuda`` (``{device}`` replaced by ``text``) where CUDA is not available."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device must be cpu or cuda[:K], got {text!r}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"--device must be cpu or cuda[:K], got {text!r}")
    if not torch.cuda.is_available():
        raise ValueError(without_cuda.format(device=text))
    if (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", device.index or 0)
