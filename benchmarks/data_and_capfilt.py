"""Data loading and CapFilt throughput.

    python -m benchmarks.data_and_capfilt [--device cuda] [--workers 1 2 8] [--sizes tiny base]

- loader: images/s of the pretraining input pipeline (shards -> JPEG decode -> random resized crop, flip,
  RandAugment -> batches) at base size (224 px from 384 px JPEGs, configs/base.yaml's augmentation), per worker
  count; compared with what the base pretraining step consumes on the same machine
  (results/pretrain_step_<device>.json, when benchmarks/pretrain_step.py ran first);
- capfilt: synthetic captions/s (nucleus sampling, top-p 0.9, 5 to 20 tokens) and filter pairs/s (ITM probability
  + ITC similarity) for the tiny and base models.
Writes benchmarks/results/data_and_capfilt_<device>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks.vs_transformers import ROOT, TOKENIZER, describe, model_config, timed
from blip.config import load_params
from blip.data.loader import make_loader, train_pipeline
from blip.data.locations import shard_urls
from blip.data.scene import render, sample_scene
from blip.data.shards import ShardWriter
from blip.data.tokenizer import load_tokenizer
from blip.data.transforms import train_transform
from blip.models.caption import PROMPT
from blip.models.factory import build_model
from blip.models.generation import GenerationConfig

RESULTS = Path(__file__).parent / "results"


def write_shards(folder: Path, count: int, size: int) -> list[str]:
    writer, rng = ShardWriter(folder, 128), random.Random(0)
    for i in range(count):
        buffer = io.BytesIO()
        render(sample_scene(rng, 3), size).save(buffer, format="JPEG", quality=90)
        record = {"image_id": f"img{i}", "captions": ["a large red circle"]}
        writer.write(f"{i:09d}", {"jpg": buffer.getvalue(), "json": json.dumps(record).encode()})
    writer.close()
    return shard_urls(folder)


def loader_rate(urls: list[str], workers: int, batches: int) -> float:
    params = load_params(ROOT / "configs/base.yaml")
    transform = train_transform(params.model.image_size, params.data.pretrain_augment)
    loader = make_loader(train_pipeline(urls, "pairs", transform, 32, shuffle_buffer=256), workers)
    stream = iter(loader)
    next(stream)  # workers started, first batch decoded
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return 32 * batches / (time.perf_counter() - start)


def capfilt_rates(size: str, device: torch.device, batch: int, bf16: bool) -> dict[str, float]:
    cfg, tokenizer = model_config(size), load_tokenizer(TOKENIZER)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    captioner = build_model("caption", cfg, tokenizer).to(device).eval()
    filter_model = build_model("retrieval", cfg, tokenizer, queue_size=16).to(device).eval()
    texts = tokenizer([PROMPT + "a large red circle to the left of a small blue square"] * batch, return_tensors="pt")
    ids, mask = texts.input_ids.to(device), texts.attention_mask.to(device)
    nucleus = GenerationConfig(method="nucleus", top_p=0.9, max_length=20, min_length=5)
    generator = torch.Generator(device).manual_seed(0)
    rates = {}
    for name, work in (("captions_per_s", lambda: captioner.generate(images, nucleus, generator)),
                       ("filter_pairs_per_s", lambda: filter_model.score_pairs(images, ids, mask))):  # fmt: skip

        @torch.no_grad()
        def call(work: Callable[[], object] = work) -> None:
            with autocast:
                work()

        rates[name] = batch / timed(call, device, repeats=3)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    results: dict = {"device": describe(device), "loader": {}}
    # The fastest base step measured (eager or compiled, any batch) is the rate the loader must keep up with.
    runs = [run for file in RESULTS.glob(f"pretrain_step_{device.type}*.json")
            for run in json.loads(file.read_text()).get("runs", []) if run["size"] == "base"]  # fmt: skip
    consumed = max((run["samples_per_s"] for run in runs), default=None)
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(Path(tmp), 1024, 384)
        need = f"{consumed:.1f}" if consumed else "-"
        print(f"{'workers':>7} {'images/s':>9} {'per worker':>10}   base pretrain step consumes: {need} /s")
        for workers in args.workers:
            rate = loader_rate(urls, workers, batches=8 * workers)
            results["loader"][workers] = {"images_per_s": rate, "per_worker": rate / workers}
            print(f"{workers:>7} {rate:9.0f} {rate / workers:10.0f}")
    results["base_step_samples_per_s"] = consumed
    batch = 64 if device.type == "cuda" else 8
    results["capfilt"] = {size: capfilt_rates(size, device, batch, args.bf16) for size in args.sizes}
    for size, rates in results["capfilt"].items():
        print(f"capfilt {size}: {rates['captions_per_s']:.0f} synthetic captions/s, "
              f"{rates['filter_pairs_per_s']:.0f} filter pairs/s (batch {batch})")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"data_and_capfilt_{device.type}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
