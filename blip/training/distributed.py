"""One process or `torchrun` DDP: NCCL on GPU, gloo on CPU, side effects on rank 0 only.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK (and, multi-node, the c10d rendezvous); plain `python -m blip`
runs as rank 0 of 1 with no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(timeout_minutes: float = 10.0) -> DistContext:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # A bounded timeout: a rank that dies mid-collective makes the others fail instead of hanging forever.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return DistContext(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_true(flag: bool, ctx: DistContext) -> bool:
    """Whether `flag` holds on every rank (so all ranks take the same branch, e.g. stop on a bad loss)."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def mean_over_ranks(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    if not ctx.distributed or not values:
        return values
    tensor = torch.tensor(list(values.values()), device=ctx.device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / ctx.world_size).tolist(), strict=True))
