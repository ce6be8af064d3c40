"""torchrun support: who this process is, the process group, and the few collectives the trainer uses.

Without torchrun (no WORLD_SIZE) everything here is a no-op for one process, so the same trainer
code runs alone and under DDP. The backend is NCCL on GPU and gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def from_env() -> DistInfo:
    """This process's place under torchrun (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init(info: DistInfo, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the process group (env:// rendezvous set up by torchrun); idempotent."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_all(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a copy; the input is untouched)."""
    total = values.clone()
    if dist.is_initialized():
        dist.all_reduce(total)
    return total


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
