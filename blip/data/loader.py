"""Webdataset pipelines over the ingested shards.

Training streams resample shards forever (each rank and worker with its own deterministic seed); evaluation
streams read every sample exactly once, shards split by rank, then by data-loader worker. A corrupt sample
(bad image bytes, bad json) is skipped and counted: each batch carries `skipped`, the number of samples
dropped since the previous batch, so the count survives worker processes.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import get_worker_info

log = logging.getLogger(__name__)
Transform = Callable[[Image.Image], torch.Tensor]


def _image(data: bytes, transform: Transform) -> torch.Tensor:
    image = Image.open(io.BytesIO(data))
    image.load()
    return transform(image.convert("RGB"))


def _decode_one(sample: dict, kind: str, transform: Transform, train: bool, rng: random.Random) -> dict:
    record = json.loads(sample["json"])
    out: dict[str, Any] = {"key": sample["__key__"], "record": record}
    if kind == "nlvr":
        out["image"] = _image(sample["left.jpg"], transform)
        out["image2"] = _image(sample["right.jpg"], transform)
        out["text"] = record["sentence"]
        return out
    out["image"] = _image(sample["jpg"], transform)
    if kind == "vqa":
        out["text"] = record["question"]
    else:  # one random caption per step in training; all of them in evaluation
        out["text"] = rng.choice(record["captions"]) if train else record["captions"]
    return out


def decode_samples(src: Iterable[dict], kind: str, transform: Transform, train: bool, seed: int = 0) -> Iterator[dict]:
    rng = random.Random(seed)
    skipped = 0
    for sample in src:
        try:
            out = _decode_one(sample, kind, transform, train, rng)
        except (OSError, ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError) as exc:
            skipped += 1
            log.warning("skipping corrupt sample %s: %s", sample.get("__key__"), exc)
            continue
        out["skipped"], skipped = skipped, 0
        yield out
    if skipped:  # corrupt samples at the very end of the stream are still counted
        yield {"skipped": skipped}


def collate(samples: list[dict]) -> dict:
    skipped = sum(s["skipped"] for s in samples)
    samples = [s for s in samples if "image" in s]
    batch: dict[str, Any] = {"skipped": skipped, "key": [s["key"] for s in samples]}
    batch["record"] = [s["record"] for s in samples]
    batch["text"] = [s["text"] for s in samples]
    for name in ("image", "image2"):
        if samples and name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


def _worker_id() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def split_by_rank(rank: int, world_size: int) -> Callable[[Iterable], Iterator]:
    def split(src: Iterable) -> Iterator:
        return itertools.islice(src, rank, None, world_size)

    return split


def split_by_worker(src: Iterable) -> Iterator:
    worker, workers = _worker_id()
    return itertools.islice(src, worker, None, workers)


def train_pipeline(
    urls: list[str],
    kind: str,
    transform: Transform,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    shuffle_buffer: int = 1000,
) -> wds.DataPipeline:
    """Endless shuffled batches; full batches only, so every step sees `batch_size` samples."""

    def worker_seed() -> int:
        worker, _ = _worker_id()
        return seed * 1_000_003 + rank * 1_009 + worker

    def decode(src: Iterable[dict]) -> Iterator[dict]:
        return decode_samples(src, kind, transform, train=True, seed=worker_seed())

    return wds.DataPipeline(
        wds.ResampledShards(urls, worker_seed=worker_seed, deterministic=True),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(shuffle_buffer, rng=random.Random(seed + rank)),
        decode,
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )


def eval_pipeline(
    urls: list[str], kind: str, transform: Transform, batch_size: int, *, rank: int = 0, world_size: int = 1
) -> wds.DataPipeline:
    """Every sample once, in shard order; this rank's shards, split again across workers."""
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        split_by_rank(rank, world_size),
        split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        partial(decode_samples, kind=kind, transform=transform, train=False),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )


def make_loader(pipeline: wds.DataPipeline, num_workers: int) -> wds.WebLoader:
    # Batching happens inside the pipeline (in the workers), so the loader itself does not batch.
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=False)
