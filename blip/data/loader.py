"""Webdataset pipelines over shards, wherever they live (`blip.data.locations`).

Training streams resample shards forever (each rank and worker with its own deterministic seed); evaluation
streams read every sample exactly once, shards split by rank, then by data-loader worker. A corrupt sample
(bad image bytes, bad json, no caption) is skipped and counted: each batch carries `skipped`, the number of
samples dropped since the previous batch, so the count survives worker processes. A training shard cut short (an
interrupted copy) or missing (a remote object gone) is logged and travels the same way (`truncated`: shard,
samples read, reason); in an evaluation stream it is an error, since scores on part of a split would pass for
scores on all of it.

Training streams are exactly resumable. Each worker's stream is a deterministic function of (seed, rank, worker);
every sample gets its own random state (caption choice, augmentation) from its index in that stream; each batch
reports the worker it came from and how far that worker's stream has been read. A `DataPosition` saved with a
checkpoint lets a new loader skip what was consumed (without decoding it) and continue with the same batches,
even when the number of consumed batches is not a multiple of the number of workers (workers are rotated so the
data loader's round robin resumes at the right one).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import get_worker_info

from blip.data.shards import ShardReadError, read_shards

log = logging.getLogger(__name__)
Transform = Callable[[Image.Image], torch.Tensor]
MAX_SKIPS_IN_A_ROW = 1000
MAX_BAD_SHARDS_IN_A_ROW = 100
TRUNCATED = "__truncated__"  # a marker in the sample stream: (shard, samples read, reason)


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
        if not record["captions"]:  # a web sample without a usable caption (or an unreadable record)
            raise ValueError("no caption")
        out["text"] = rng.choice(record["captions"]) if train else record["captions"]
    return out


def note_truncated(exc: ShardReadError) -> Iterator[dict]:
    log.warning("%s", exc)
    yield {TRUNCATED: (exc.shard, exc.samples, exc.reason)}


def decode_samples(src: Iterable[dict], kind: str, transform: Transform, train: bool) -> Iterator[dict]:
    skipped, truncated = 0, []
    for sample in src:
        if TRUNCATED in sample:
            truncated.append(sample[TRUNCATED])
            if len(truncated) >= MAX_BAD_SHARDS_IN_A_ROW:  # every shard missing or cut: the stream would spin
                raise RuntimeError(f"{len(truncated)} shards in a row unreadable (last: {truncated[-1]}): wrong "
                                   "shard locations or credentials?")  # fmt: skip
            continue
        seed = sample.get("__seed__", 0)
        try:
            # Each training sample draws its caption and augmentation from its own seed, so a resumed stream
            # repeats them exactly; fork_rng keeps the global torch RNG (dropout, ...) untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out = _decode_one(sample, kind, transform, train, random.Random(seed))
        except (OSError, ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError) as exc:
            skipped += 1
            log.warning("skipping corrupt sample %s: %s", sample.get("__key__"), exc)
            if skipped >= MAX_SKIPS_IN_A_ROW:  # an endless training stream would otherwise spin forever
                raise RuntimeError(f"{skipped} samples in a row failed to decode as {kind!r} (last: "
                                   f"{sample.get('__key__')}: {exc!r}): wrong shards for this stage, or corrupt data"
                                   ) from exc  # fmt: skip
            continue
        (out["skipped"], skipped), (out["truncated"], truncated) = (skipped, 0), (truncated, [])
        out["stream"] = sample.get("__stream__")
        yield out
    if skipped or truncated:  # corrupt samples at the very end of the stream are still counted
        yield {"skipped": skipped, "truncated": truncated}


def collate(samples: list[dict]) -> dict:
    skipped = sum(s["skipped"] for s in samples)
    truncated = [t for s in samples for t in s["truncated"]]
    samples = [s for s in samples if "image" in s]
    batch: dict[str, Any] = {"skipped": skipped, "truncated": truncated, "key": [s["key"] for s in samples]}
    # (worker, samples of its stream read so far) after this batch: the resume position.
    batch["stream"] = samples[-1]["stream"] if samples else None
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


@dataclass
class DataPosition:
    """How much of a training stream a run consumed: batches in total, raw samples read per (logical) worker."""

    batches: int = 0
    samples: dict[int, int] = field(default_factory=dict)

    def advance(self, batch: dict) -> None:
        self.batches += 1
        if batch.get("stream") is not None:
            worker, read = batch["stream"]
            self.samples[worker] = read


def _shuffle(src: Iterable[dict], buffer: int, rng: random.Random) -> Iterator[dict]:
    pool: list[dict] = []
    for sample in src:
        if TRUNCATED in sample:  # a note, not a sample: passed on at once
            yield sample
            continue
        pool.append(sample)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    yield from pool


def train_pipeline(
    urls: list[str],
    kind: str,
    transform: Transform,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    shuffle_buffer: int = 1000,
    resume: DataPosition | None = None,
) -> wds.DataPipeline:
    """Endless shuffled batches; full batches only, so every step sees `batch_size` samples."""
    resume = resume or DataPosition()

    def logical_worker() -> int:
        worker, workers = _worker_id()
        return (worker + resume.batches) % workers

    def worker_seed() -> int:
        return seed * 1_000_003 + rank * 1_009 + logical_worker()

    def numbered(src: Iterable[dict]) -> Iterator[dict]:
        worker, base = logical_worker(), worker_seed()
        index = -1
        for sample in _shuffle(src, shuffle_buffer, random.Random(base)):
            if TRUNCATED in sample:
                yield sample
                continue
            index += 1
            if index < resume.samples.get(worker, 0):
                continue  # consumed before the checkpoint: skipped without decoding
            sample["__seed__"] = base * 7_919 + index
            sample["__stream__"] = (worker, index + 1)
            yield sample

    return wds.DataPipeline(
        wds.ResampledShards(urls, worker_seed=worker_seed, deterministic=True),
        partial(read_shards, on_error=note_truncated),
        numbered,
        partial(decode_samples, kind=kind, transform=transform, train=True),
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
        read_shards,
        partial(decode_samples, kind=kind, transform=transform, train=False),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )


def make_loader(pipeline: wds.DataPipeline, num_workers: int) -> wds.WebLoader:
    # Batching happens inside the pipeline (in the workers), so the loader itself does not batch.
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=False)
