"""DDP plumbing: ``torchrun --nproc-per-node N -m trainer train ...`` sets RANK/WORLD_SIZE; each rank
attaches to the daemon with its own rank, and evaluation results are gathered across ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device | None = None

    @classmethod
    def from_environment(cls, device: torch.device) -> "World":
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls(0, 1, device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group (an abandoned gloo group can abort the process at exit)."""
        if self.size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.size <= 1:
            return model
        device_ids = [self.device.index or 0] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def gather(self, probabilities: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate every rank's predictions (held-out shards differ in length by at most one)."""
        if self.size <= 1:
            return probabilities, labels
        parts_p = [None] * self.size
        parts_l = [None] * self.size
        dist.all_gather_object(parts_p, probabilities)
        dist.all_gather_object(parts_l, labels)
        return torch.cat(parts_p), torch.cat(parts_l)
