"""Cross-rank pieces of ITC/ITM on two gloo processes: the gather keeps gradients, negatives avoid positives."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blip.models import contrastive as C


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        gathered = C.gather_with_grad(x)
        weights = torch.arange(4, dtype=torch.float)[:, None] * (rank + 1)  # each rank weighs rows differently
        (gathered * weights).sum().backward()
        # Image ids: rank 0 holds images 0,1; rank 1 holds 1,2 -> image 1 is positive across ranks.
        ids = torch.tensor([[0, 1], [1, 2]][rank])
        sim = torch.zeros(2, 4)
        embeds = torch.arange(4, dtype=torch.float)[rank * 2 : rank * 2 + 2, None, None].expand(2, 1, 2).contiguous()
        embeds.requires_grad_(True)
        picks = set()
        for _ in range(100):
            neg_images, neg_ids, _ = C.sample_negatives(
                sim, sim, embeds, torch.arange(rank * 2, rank * 2 + 2)[:, None], torch.ones(2, 1), ids
            )
            picks |= {(row, int(v)) for row, v in enumerate(neg_images[:, 0, 0].detach())}
            picks |= {(row, int(v)) for row, v in enumerate(neg_ids[:, 0])}
        neg_images.sum().backward()
        results[rank] = (x.grad.tolist(), sorted(picks), embeds.grad is not None)
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_and_global_negatives() -> None:
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
    # d/dx of sum over ranks r of (r+1) * row_index * x_row: rank 0 owns rows 0,1; rank 1 rows 2,3 (x3 total weight).
    assert results[0][0] == [[0.0] * 3, [3.0] * 3]
    assert results[1][0] == [[6.0] * 3, [9.0] * 3]
    # Global rows: 0 -> image 0, 1 -> image 1, 2 -> image 1, 3 -> image 2.
    image_of_row = {0: 0, 1: 1, 2: 1, 3: 2}
    for rank, own_ids in ((0, [0, 1]), (1, [1, 2])):
        picks = results[rank][1]
        assert all(image_of_row[v] != own_ids[row] for row, v in picks)
        assert any(v >= 2 for _, v in picks) if rank == 0 else any(v < 2 for _, v in picks)  # other rank's rows
        assert results[rank][2]
