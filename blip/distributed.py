"""The one home of distributed code: one process or `torchrun` DDP (NCCL on GPU, gloo on CPU), and the
collectives the models and evaluations use, each a no-op in a single process.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK (and, multi-node, the c10d rendezvous); plain `python -m blip`
runs as rank 0 of 1 with no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


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


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def gather_padded(x: torch.Tensor, pad_value: int) -> torch.Tensor:
    """Gather [B, L] token rows whose L differs by rank (each pads to its own longest): pad to the global L."""
    if not distributed():
        return x
    length = torch.tensor([x.shape[1]], device=x.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    return gather_no_grad(F.pad(x, (0, int(length) - x.shape[1]), value=pad_value))


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Every rank computed a loss on the gathered tensor: sum their gradients, keep this rank's slice.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        size = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * size : (dist.get_rank() + 1) * size]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _GatherWithGrad.apply(x) if distributed() else x


def rank_offset(batch: int) -> int:
    return dist.get_rank() * batch if distributed() else 0


def rank_slice(rows: int) -> slice:
    """This rank's contiguous share of `rows` query rows."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return slice(rows * rank // world, rows * (rank + 1) // world)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order."""
    if not dist.is_initialized():
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts
